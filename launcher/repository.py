"""Render a model repository for one deployment: instance counts and settings, no hand edits.

Instance i of a server group is version i+1 of its model (python_backend_utils/orchestration/deployment.py),
so the repository must hold exactly `num_instances` versions of `context` and `generation`.
Where the orchestrator reads its deployment by default goes a link to the file: edits to the
file reach the running orchestrator as they would without rendering. Settings
(`MODEL.KEY=VALUE`) replace a config.pbtxt parameter, or the instance count of `aggregated`.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from python_backend_utils.orchestration.deployment import Deployment
from python_backend_utils.orchestration.local_instances import VersionError, add_versions, remove_versions_above

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


def set_parameter(config: Path, key: str, value: str) -> None:
    """Replace the value of an existing string parameter of a config.pbtxt."""
    if '"' in value or "\\" in value:
        raise RenderError(f"{key}={value!r}: quotes and backslashes are not allowed in a setting")
    text, count = re.subn(
        rf'(parameters {{ key: "{re.escape(key)}", value: {{ string_value: )"[^"]*"',
        lambda match: f'{match.group(1)}"{value}"',
        config.read_text(),
    )
    if count != 1:
        known = re.findall(r'parameters { key: "([^"]+)"', config.read_text())
        raise RenderError(f"{config.parent.name} has no parameter {key!r}; it has: {', '.join(known)}, "
                          f"and {INSTANCE_COUNT}")
    config.write_text(text)


def set_instance_count(config: Path, value: str) -> None:
    if not value.isdigit() or int(value) < 1:
        raise RenderError(f"{INSTANCE_COUNT}={value!r}: give a positive integer")
    text, count = re.subn(r"instance_group \[ { count: \d+,", f"instance_group [ {{ count: {value},",
                          config.read_text())
    if count != 1:
        raise RenderError(f"{config.parent.name}: its config.pbtxt has no single instance_group to resize")
    config.write_text(text)
