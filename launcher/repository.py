"""Render a model repository for one deployment: instance counts and settings, no hand edits.

Instance i of a server group is version i+1 of its model (python_backend_utils/orchestration/deployment.py),
so the repository must hold exactly `num_instances` versions of `context` and `generation`.
Where the orchestrator reads its deployment by default goes a link to the file: edits to the
file reach the running orchestrator as they would without rendering. Settings
(`MODEL.KEY=VALUE`) replace a config.pbtxt parameter, or the instance count of `aggregated`, through
Triton's own ModelConfig protobuf.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from python_backend_utils.orchestration.deployment import Deployment
from python_backend_utils.orchestration.local_workers import VersionError, add_versions, remove_versions_above

DEPLOYMENT_FILE = Path("disaggregated_serving_bls") / "disagg_config.yaml"
INSTANCE_COUNT = "instance_count"
_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc")


class RenderError(ValueError):
    """The source repository cannot serve what was asked of it."""


@dataclass(frozen=True)
class Setting:
    model: str
    key: str
    value: str

    @classmethod
    def parse(cls, text: str) -> Setting:
        target, sep, value = text.partition("=")
        model, dot, key = target.partition(".")
        if not (sep and dot and model and key):
            raise RenderError(f"{text!r}: write MODEL.KEY=VALUE, e.g. aggregated.cpu_cores=0;1")
        return cls(model, key, value)


def render_repository(
    source: Path, target: Path, deployment_file: Path | None = None, settings: tuple[Setting, ...] = ()
) -> Deployment | None:
    """Copy `source` to `target` (which must not exist), shaped by the deployment and the settings."""
    deployment = Deployment.load(deployment_file) if deployment_file is not None else None
    shutil.copytree(source, target, ignore=_SKIP)
    if deployment is not None:
        for group in (deployment.context_servers, deployment.generation_servers):
            try:
                add_versions(target / group.model_name, range(2, group.num_instances + 1))
                remove_versions_above(target / group.model_name, group.num_instances)
            except VersionError as error:
                raise RenderError(str(error)) from None
    linked = deployment_file if deployment_file is not None else source / DEPLOYMENT_FILE
    if Path(linked).is_file():
        (target / DEPLOYMENT_FILE).unlink(missing_ok=True)
        (target / DEPLOYMENT_FILE).symlink_to(Path(linked).resolve())
    apply_settings(target, settings)
    return deployment


def apply_settings(target: Path, settings: tuple[Setting, ...]) -> None:
    """Change the parameters and instance counts of a rendered repository's config.pbtxt files."""
    for setting in settings:
        config = target / setting.model / "config.pbtxt"
        if not config.is_file():
            raise RenderError(f"{setting.model}.{setting.key}: there is no model {setting.model!r} in the repository")
        if setting.key == INSTANCE_COUNT:
            set_instance_count(config, setting.value)
        else:
            set_parameter(config, setting.key, setting.value)


def read_config(config: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(config.read_text(), model_config_pb2.ModelConfig())


def write_config(config: Path, model: model_config_pb2.ModelConfig) -> None:
    config.write_text(text_format.MessageToString(model))


def set_parameter(config: Path, key: str, value: str) -> None:
    """Replace the value of an existing string parameter of a config.pbtxt."""
    model = read_config(config)
    if key not in model.parameters:
        known = ", ".join(sorted(model.parameters))
        raise RenderError(f"{config.parent.name} has no parameter {key!r}; it has: {known}, and {INSTANCE_COUNT}")
    model.parameters[key].string_value = value
    write_config(config, model)


def set_instance_count(config: Path, value: str) -> None:
    if not value.isdigit() or int(value) < 1:
        raise RenderError(f"{INSTANCE_COUNT}={value!r}: give a positive integer")
    model = read_config(config)
    if len(model.instance_group) != 1:
        raise RenderError(f"{config.parent.name}: its config.pbtxt has no single instance_group to resize")
    model.instance_group[0].count = int(value)
    write_config(config, model)
