"""Render a model repository for a deployment file: one version directory per instance.

Instance i of a server group is version i+1 of its model (python_backend_utils/deployment.py),
so the repository must hold exactly `num_instances` versions of `context` and `generation`.
Where the orchestrator reads its deployment by default, a link to the file: edits to the
file reach the running orchestrator as they would without rendering.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from python_backend_utils.deployment import Deployment

DEPLOYMENT_FILE = Path("disaggregated_serving_bls") / "disagg_config.yaml"
_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc")


class RenderError(ValueError):
    """The source repository cannot serve the deployment."""


def render_repository(source: Path, deployment_file: Path, target: Path) -> Deployment:
    """Copy `source` to `target` (which must not exist) with the deployment's instance count."""
    deployment = Deployment.load(deployment_file)
    shutil.copytree(source, target, ignore=_SKIP)
    for group in (deployment.context_servers, deployment.generation_servers):
        model = target / group.model_name
        first = model / "1"
        if not first.is_dir():
            raise RenderError(f"{source / group.model_name / '1'} is missing: every instance is a copy of version 1")
        for version in _versions(model):
            if version > group.num_instances:
                shutil.rmtree(model / str(version))
        for version in range(2, group.num_instances + 1):
            if not (model / str(version)).exists():
                shutil.copytree(first, model / str(version), ignore=_SKIP)
    (target / DEPLOYMENT_FILE).unlink(missing_ok=True)
    (target / DEPLOYMENT_FILE).symlink_to(Path(deployment_file).resolve())
    return deployment


def _versions(model: Path) -> list[int]:
    return sorted(int(p.name) for p in model.iterdir() if p.is_dir() and p.name.isdigit())
