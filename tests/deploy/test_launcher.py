"""The launcher: the command and environment it builds, and real starts that succeed or fail."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from launcher.children import kill_group, spawn
from launcher.cli import MODES, banner
from launcher.openai_process import OpenAIFrontend, frontend_target
from launcher.ports import free_ports, free_server_ports
from launcher.runtime import TritonRuntime, find_runtime
from launcher.server import ServerStartError, TritonServer, server_shell
from launcher.supervisor import ORCHESTRATOR_MODEL, OrchestratorWatch
from python_backend_utils.environment import resolve_model_dir
from python_backend_utils.triton_glue.stub_recovery import stub_pids
from tests.helpers import wait_until

ECHO_CONFIG = """
name: "{name}"
backend: "python"
max_batch_size: 0
input [ {{ name: "IN", data_type: TYPE_INT32, dims: [ 1 ] }} ]
output [ {{ name: "OUT", data_type: TYPE_INT32, dims: [ 1 ] }} ]
instance_group [ {{ count: 1, kind: KIND_CPU }} ]
"""
ECHO_MODEL = """
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def initialize(self, args):
        {initialize}

    def execute(self, requests):
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor("OUT", pb_utils.get_input_tensor_by_name(r, "IN").as_numpy())])
            for r in requests
        ]
"""


def write_model(repository: Path, name: str, initialize: str = "pass") -> Path:
    (repository / name / "1").mkdir(parents=True)
    (repository / name / "config.pbtxt").write_text(ECHO_CONFIG.format(name=name))
    (repository / name / "1" / "model.py").write_text(ECHO_MODEL.format(initialize=initialize))
    return repository


def our_shm_regions() -> set[str]:
    """Shared-memory regions of servers started by this test process."""
    return {p.name for p in Path("/dev/shm").glob(f"triton_disagg_{os.getpid()}_*")}


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_command_for_the_pypi_runtime_on_cpu():
    runtime = TritonRuntime(Path("/rt/tritonserver"), Path("/rt/backends"), ())
    server = TritonServer(Path("/repo"), http_port=1, grpc_port=2, metrics_port=3, models=["ensemble", "ensemble_unary"])
    command = server.command(runtime, "prefix_")
    assert command[0] == "/rt/tritonserver"
    for flag in [
        "--model-repository=/repo",
        "--http-port=1",
        "--grpc-port=2",
        "--metrics-port=3",
        "--backend-directory=/rt/backends",
        "--backend-config=python,shm-region-prefix-name=prefix_",
        "--disable-auto-complete-config",
        "--allow-gpu-metrics=false",
        "--pinned-memory-pool-byte-size=0",
        "--cuda-memory-pool-byte-size=0:0",
        "--model-control-mode=explicit",
        "--load-model=ensemble",
        "--load-model=ensemble_unary",
        f"--http-restricted-api=model-repository:triton-disagg-admin-key={server.admin_key}",
        f"--grpc-restricted-protocol=model-repository:triton-disagg-admin-key={server.admin_key}",
    ]:
        assert flag in command
    assert len(server.admin_key) >= 32 and server.admin_key != TritonServer().admin_key


def test_the_server_runs_with_the_larger_thread_stack_and_umask_077():
    """Files the server and its stubs create (the /dev/shm regions holding prompts) are this user's only."""
    command = server_shell(["/rt/tritonserver", "--http-port=1"], 64 << 20)
    result = subprocess.run([*command[:4], "sh", "-c", "ulimit -s; umask"], capture_output=True, text=True,
                            check=True, preexec_fn=lambda: os.umask(0o022))
    assert result.stdout.split() == [str(64 << 10), "0077"]
    assert command[4:] == ["/rt/tritonserver", "--http-port=1"]


def test_command_for_a_system_server_on_gpu_loads_every_model():
    command = TritonServer(Path("/repo"), device="cuda").command(TritonRuntime(Path("tritonserver"), None, ()), "p_")
    assert not any(flag.startswith(("--backend-directory", "--allow-gpu-metrics", "--model-control-mode")) for flag in command)


def test_environment_puts_this_interpreter_first_and_the_runtime_libraries_on_the_library_path():
    runtime = TritonRuntime(Path("/rt/tritonserver"), Path("/rt/backends"), (Path("/rt/libs"),))
    env = runtime.environment({"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/opt/lib", "HOME": "/home/x"})
    assert env["PATH"] == f"{Path(sys.executable).parent}{os.pathsep}/usr/bin"
    assert env["LD_LIBRARY_PATH"].split(os.pathsep) == ["/rt/libs", sysconfig.get_config_var("LIBDIR"), "/opt/lib"]
    assert env["HOME"] == "/home/x"


def test_pypi_runtime_gets_a_backend_directory_with_the_stub_for_this_python(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no system tritonserver
    runtime = find_runtime()
    python_dir = runtime.backend_directory / "python"
    assert (python_dir / "libtriton_python.so").is_file()
    assert (python_dir / "triton_python_backend_utils.py").is_file()
    assert os.access(python_dir / "triton_python_backend_stub", os.X_OK)
    assert runtime.library_dirs[0].name == "nvidia_pytriton.libs"


def test_banner_shows_the_urls_and_a_working_curl_line():
    text = banner(TritonServer(http_port=9000, grpc_port=9001, metrics_port=9002), "ensemble")
    assert "curl -s http://localhost:9000/v2/models/ensemble/generate -d " in text
    assert "--url localhost:9001 --stream" in text
    assert "http://localhost:9002/metrics" in text


def test_every_mode_that_serves_an_ensemble_gets_the_openai_frontend():
    assert {mode: frontend_target(models) for mode, models in MODES.items()} == {
        "disaggregated": "disaggregated_serving_bls", "both": "disaggregated_serving_bls",
        "orchestrator": "disaggregated_serving_bls", "aggregated": "aggregated",
        "context-server": None, "generation-server": None,
    }
    frontend = OpenAIFrontend(triton_grpc_url="localhost:9001", triton_model="aggregated", port=9100)
    text = banner(TritonServer(http_port=9000, grpc_port=9001, metrics_port=9002), "ensemble", frontend)
    assert "curl -s http://localhost:9100/v1/chat/completions" in text


def test_perf_analyzer_runs_with_no_hand_made_links():
    result = subprocess.run([sys.executable, "-m", "launcher.perf_analyzer", "--version"], capture_output=True,
                            text=True, timeout=60)
    assert "Perf Analyzer Version" in result.stdout + result.stderr
    bin_dir = subprocess.run([sys.executable, "-m", "launcher.perf_analyzer", "--bin-dir"], capture_output=True,
                             text=True, check=True).stdout.strip()
    by_name = subprocess.run([str(Path(bin_dir) / "perf_analyzer"), "--version"], capture_output=True, text=True)
    assert "Perf Analyzer Version" in by_name.stdout + by_name.stderr


@pytest.mark.integration
def test_failed_start_is_retried_once_and_leaves_nothing_behind(tmp_path):
    repository = write_model(tmp_path / "repo", "broken", initialize='raise RuntimeError("broken on purpose")')
    regions_before = our_shm_regions()
    server = TritonServer(
        repository,
        **free_server_ports(),
        log_file=tmp_path / "server.log",
        ready_timeout_s=120,
    )
    with pytest.raises(ServerStartError) as raised:
        server.start()
    message = str(raised.value)
    assert message.count("tritonserver exited with status") == 2
    assert "broken on purpose" in message
    assert not server.running and not group_alive(server.pid)
    assert our_shm_regions() == regions_before


@pytest.mark.integration
def test_cli_serves_until_sigterm_then_stops_the_server(tmp_path):
    repository = write_model(tmp_path / "repo", "echo")
    http_port, grpc_port, metrics_port = free_ports(3)
    cli = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launcher.cli",
            f"--model-repository={repository}",
            "--load-model=echo",
            f"--http-port={http_port}",
            f"--grpc-port={grpc_port}",
            f"--metrics-port={metrics_port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        lines = []
        for line in cli.stdout:
            lines.append(line)
            if "Ctrl-C stops the server." in line:
                break
        assert any("tritonserver is ready" in line for line in lines), "".join(lines)
        with urllib.request.urlopen(f"http://localhost:{http_port}/v2/models/echo/ready", timeout=5) as response:
            assert response.status == 200
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    time.sleep(0.5)
    assert processes_mentioning(str(repository)) == []


def start_cli(repository: Path, model: str) -> tuple[subprocess.Popen, int, queue.Queue]:
    """`disagg-serve` serving one model, once it is ready; its port and a queue of its stderr lines."""
    http_port, grpc_port, metrics_port = free_ports(3)
    cli = subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", f"--model-repository={repository}", f"--load-model={model}",
         f"--http-port={http_port}", f"--grpc-port={grpc_port}", f"--metrics-port={metrics_port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    errors: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [errors.put(line) for line in cli.stderr], daemon=True).start()
    for line in cli.stdout:
        if "Ctrl-C stops the server." in line:
            return cli, http_port, errors
    raise AssertionError("disagg-serve exited before it was ready")


def assert_stops_on_sigterm(cli: subprocess.Popen) -> None:
    cli.send_signal(signal.SIGTERM)
    assert cli.wait(timeout=60) == 128 + signal.SIGTERM


def kill_if_running(cli: subprocess.Popen) -> None:
    """A failed test's launcher: its whole group goes."""
    if cli.poll() is None:
        os.killpg(cli.pid, signal.SIGKILL)
        cli.wait()


def next_launcher_line(errors: queue.Queue) -> str:
    """The launcher's next own line on stderr (tritonserver logs there too)."""
    while not (line := errors.get(timeout=120)).startswith("disagg-serve:"):
        pass
    return line


def post(url: str, body: bytes, content_type: str) -> int:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def model_ready(http_port: int, model: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://localhost:{http_port}/v2/models/{model}/ready", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@pytest.mark.integration
def test_bodies_that_crashed_triton_are_answered_and_a_crash_is_restarted(tmp_path):
    """Triton 2.51 parses a form-encoded body on its thread's stack: 4.2 MB crashed it with 8 MiB
    stacks. Now 8.4 MB is answered; 40 MB still crashes it, and the launcher starts it again."""
    repository = write_model(tmp_path / "repo", "echo")
    cli, http_port, errors = start_cli(repository, "echo")
    url = f"http://localhost:{http_port}/v2/models/echo/infer"
    form = "application/x-www-form-urlencoded"
    try:
        assert post(url, b"a" * 8_400_000, form) == 500  # Triton: "failed to parse the request JSON buffer"
        assert model_ready(http_port, "echo")
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            post(url, b"a" * 40_000_000, form)
        restarted = [next_launcher_line(errors) for _ in range(2)]
        assert "exited with status -11; restarting in 1 s (disagg_launcher_restarts_total 1)" in restarted[0]
        assert "ready again (disagg_launcher_restarts_total 1)" in restarted[1]
        assert model_ready(http_port, "echo")
        assert_stops_on_sigterm(cli)
    finally:
        kill_if_running(cli)
    time.sleep(0.5)
    assert processes_mentioning(str(repository)) == []


def test_the_orchestrator_watch_counts_a_stub_lost_at_two_looks_in_a_row(monkeypatch):
    monkeypatch.setattr("launcher.supervisor.STUB_CHECK_INTERVAL_S", 0.0)
    looks = iter([[7], [], [7], [], []])
    watch = OrchestratorWatch(Path("/repo"), expected=False, find=lambda *_: next(looks))
    assert [watch.lost() for _ in range(5)] == [None, None, None, None, "the orchestrator's stub process is gone"]
    aggregated = OrchestratorWatch(Path("/repo"), expected=False, find=lambda *_: [])
    assert [aggregated.lost() for _ in range(3)] == [None] * 3  # never had one
    loading = OrchestratorWatch(Path("/repo"), expected=True, find=lambda *_: [])
    assert [loading.lost() for _ in range(2)] == [None, "the orchestrator's stub process is gone"]


@pytest.mark.integration
def test_a_server_whose_orchestrator_stub_died_is_restarted(tmp_path):
    """Triton 2.51 neither restarts the stub of a decoupled model nor ends the requests it held: an
    ensemble whose orchestrator stub died would hang until tritonserver restarted."""
    repository = write_model(tmp_path / "repo", ORCHESTRATOR_MODEL)
    with (repository / ORCHESTRATOR_MODEL / "config.pbtxt").open("a") as config:
        config.write("model_transaction_policy { decoupled: true }\n")  # as ours is: Triton restarts the others'
    cli, http_port, errors = start_cli(repository, ORCHESTRATOR_MODEL)
    try:
        [stub] = stub_pids(repository, ORCHESTRATOR_MODEL, 1)
        os.kill(stub, signal.SIGKILL)
        restarted = [next_launcher_line(errors) for _ in range(2)]
        assert ("the orchestrator's stub process is gone: tritonserver stopped; restarting in 1 s "
                "(disagg_launcher_restarts_total 1)") in restarted[0]
        assert "ready again (disagg_launcher_restarts_total 1)" in restarted[1]
        assert model_ready(http_port, ORCHESTRATOR_MODEL)
        assert stub_pids(repository, ORCHESTRATOR_MODEL, 1) not in ([], [stub])
        assert_stops_on_sigterm(cli)
    finally:
        kill_if_running(cli)


# --- Stopping the launcher: nothing is left behind, at any moment and by any signal (issue 26) ---

LEFTOVER_BOUND_S = 30
# Each stub ends itself once its server is gone, as our models' stubs do, and loads for a second.
WATCHED_SLOW_LOAD = ("from python_backend_utils.triton_glue.server_watch import exit_with_server; exit_with_server(); "
                     "import time; time.sleep(1)")


@dataclass(frozen=True)
class StopCase:
    moment: str  # "triton-start" (a stub is loading), "frontend-start" (Triton ready, no banner yet), "ready"
    signals: tuple[signal.Signals, ...]  # sent one second apart
    to_group: bool = True  # to the launcher's process group, as a terminal or a supervisor sends it


STOP_CASES = {
    "sigterm-during-triton-start": StopCase("triton-start", (signal.SIGTERM,)),
    "sigterm-during-frontend-start": StopCase("frontend-start", (signal.SIGTERM,)),
    "sigterm-after-ready": StopCase("ready", (signal.SIGTERM,)),
    "ctrl-c": StopCase("ready", (signal.SIGINT,)),
    "two-sigterms": StopCase("ready", (signal.SIGTERM, signal.SIGTERM)),
    "sigkill-of-the-launcher": StopCase("ready", (signal.SIGKILL,), to_group=False),
}


class Deployment:
    """`disagg-serve` with the OpenAI frontend, started as a terminal starts it: in a session of its
    own. Its two models are echo models that watch their server as ours do and take WATCHED_SLOW_LOAD
    to load, so it starts in seconds. Everything of it mentions `work` on its command line (the
    repository the server and stubs load, the model directory the frontend names), its /dev/shm
    regions carry the launcher's pid, and it listens on `ports`."""

    def __init__(self, work: Path) -> None:
        self.work = work
        for name in ("ensemble_aggregated", "aggregated"):  # the names that make the launcher start the frontend
            write_model(work / "repo", name, initialize=WATCHED_SLOW_LOAD)
        (work / "model").symlink_to(resolve_model_dir(None))  # the frontend's tokenizer
        self.ports = free_ports(4)
        http, grpc, metrics, openai = self.ports
        self.lines: list[str] = []
        self.launcher = subprocess.Popen(
            [sys.executable, "-m", "launcher.cli", f"--model-repository={work / 'repo'}",
             "--load-model=ensemble_aggregated", "--load-model=aggregated", f"--model-dir={work / 'model'}",
             f"--http-port={http}", f"--grpc-port={grpc}", f"--metrics-port={metrics}", f"--openai-port={openai}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        threading.Thread(target=lambda: self.lines.extend(self.launcher.stdout), daemon=True).start()

    @property
    def ready(self) -> bool:
        return any("Ctrl-C stops the server." in line for line in self.lines)

    def processes(self) -> list[int]:
        """Live processes of this deployment (zombies are gone for good, their parent just did not wait)."""
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if (entry.name.isdigit() and str(self.work).encode() in (entry / "cmdline").read_bytes()
                        and (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"):
                    found.append(int(entry.name))
            except (OSError, IndexError):
                continue
        return found

    def regions(self) -> list[str]:
        return sorted(path.name for path in Path("/dev/shm").glob(f"triton_disagg_{self.launcher.pid}_*"))

    def busy_ports(self) -> list[int]:
        busy = []
        for port in self.ports:
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(("0.0.0.0", port))
                except OSError:
                    busy.append(port)
        return busy

    def leftovers(self) -> dict[str, list]:
        commands = []
        for pid in self.processes():
            with contextlib.suppress(OSError):
                commands.append(f"{pid} {(Path('/proc') / str(pid) / 'cmdline').read_bytes()[:100]!r}")
        return {name: found for name, found in
                [("processes", commands), ("regions", self.regions()), ("ports", self.busy_ports())] if found}

    def wait_for(self, moment: str) -> None:
        """Until the launcher is at `moment` of its start."""
        def there() -> bool:
            assert self.launcher.poll() is None, "".join(self.lines[-30:])
            if moment == "triton-start":
                return bool(self.regions())  # a stub exists: Triton is loading the models
            if moment == "frontend-start":
                return any(b"openai_frontend" in cmdline for cmdline in self.command_lines())
            return self.ready
        wait_until(there, timeout_s=180, interval_s=0.02)

    def command_lines(self) -> list[bytes]:
        lines = []
        for pid in self.processes():
            with contextlib.suppress(OSError):
                lines.append((Path("/proc") / str(pid) / "cmdline").read_bytes())
        return lines

    def send(self, signum: signal.Signals, to_group: bool) -> None:
        with contextlib.suppress(ProcessLookupError):
            if to_group:
                os.killpg(self.launcher.pid, signum)
            else:
                os.kill(self.launcher.pid, signum)

    def remove(self) -> None:
        """Kill what is left by pid and remove its regions, so that a failed case costs the next ones nothing."""
        for pid in [self.launcher.pid, *self.processes()]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.launcher.wait()
        for name in self.regions():
            (Path("/dev/shm") / name).unlink(missing_ok=True)


@pytest.mark.integration
@pytest.mark.parametrize("case", STOP_CASES.values(), ids=STOP_CASES.keys())
def test_stopping_the_launcher_leaves_nothing_behind(tmp_path, case):
    deployment = Deployment(tmp_path)
    try:
        deployment.wait_for(case.moment)
        stopped_at = time.monotonic()
        for index, signum in enumerate(case.signals):
            if index:
                time.sleep(1)
            deployment.send(signum, case.to_group)
        if case.moment != "ready":
            time.sleep(0.5)  # the banner would come now if the start went on
            assert not deployment.ready, "the signal came too late to stop the start"
        if case.to_group:
            # The launcher exits last: a supervisor that starts it again at once must find the ports free.
            assert deployment.launcher.wait(timeout=stopped_at + LEFTOVER_BOUND_S - time.monotonic()) == 128 + case.signals[0]
            left = deployment.leftovers()
        else:
            left = deployment.leftovers()
            while left and time.monotonic() - stopped_at < LEFTOVER_BOUND_S:
                time.sleep(0.25)
                left = deployment.leftovers()
        assert left == {}, "the launcher's last lines:\n" + "".join(deployment.lines[-8:])
    finally:
        deployment.remove()


def test_a_child_forked_for_a_thread_outlives_that_thread():
    """PR_SET_PDEATHSIG fires when the forking *thread* ends: servers started from a thread pool
    (the scale-out tests) must not die with its threads."""
    started = []
    thread = threading.Thread(target=lambda: started.append(spawn(["sleep", "60"])))
    thread.start()
    thread.join()
    child = started[0]
    try:
        time.sleep(0.5)
        assert child.poll() is None
    finally:
        kill_group(child)


@pytest.mark.integration
def test_stubs_end_when_their_server_is_killed(tmp_path):
    """A killed tritonserver that its parent has not reaped yet still passes the stub's own parent
    check (kill(pid, 0)): without the watch its stubs lived on, each holding its /dev/shm region."""
    repository = write_model(tmp_path / "repo", "watched", initialize=WATCHED_SLOW_LOAD)
    write_model(repository, "watched2", initialize=WATCHED_SLOW_LOAD)
    server = TritonServer(repository, **free_server_ports(), log_file=tmp_path / "server.log")
    server.start()
    try:
        stubs = processes_mentioning(str(repository / "watched"))
        assert len(stubs) == 2 and our_shm_regions()
        os.kill(server.pid, signal.SIGKILL)  # the server alone, and left unreaped
        wait_until(lambda: not processes_mentioning(str(repository / "watched")) and not our_shm_regions(),
                   timeout_s=10)
    finally:
        server.stop()
