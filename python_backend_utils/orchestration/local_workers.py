"""Instances on this server follow the deployment file: versions are added, loaded, drained, unloaded.

Instance i of a group is version i+1 of its model (deployment.py), each version a copy of
version 1 (`version_policy: all`). When an edit raises a group's `num_instances`, the missing
version directories are copied and the model is loaded again through the in-process API
(`pb_utils.load_model`, explicit model control): Triton loads the new versions, and, measured
with 2.51, also reloads the model's existing versions in the background, which keep serving
until their replacements are ready. Only then do the new instances join the routers. When an
edit lowers it, the routers stop sending to the removed instances at once; each is unloaded
(its directory removed, the model loaded again) only when it holds nothing: no request in
flight and, for a context instance, no KV still waiting for its generation instance's pull.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from python_backend_utils.orchestration.deployment import Deployment
from python_backend_utils.orchestration.routing import Worker

logger = logging.getLogger(__name__)

GROUP_FIELDS = ("context_servers", "generation_servers")
_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc")


class VersionError(RuntimeError):
    """A model version could not be added to the repository."""


def add_versions(model: Path, versions: range) -> list[int]:
    """Copy version 1 of the model to each of `versions` that does not exist; the ones copied."""
    first = model / "1"
    if not first.is_dir():
        raise VersionError(f"{first} is missing: every instance is a copy of version 1")
    added = []
    for version in versions:
        if not (model / str(version)).exists():
            shutil.copytree(first, model / str(version), ignore=_SKIP)
            added.append(version)
    return added


def remove_versions_above(model: Path, count: int) -> None:
    for version in sorted(int(p.name) for p in model.iterdir() if p.is_dir() and p.name.isdigit()):
        if version > count:
            shutil.rmtree(model / str(version))


class LocalWorkers:
    """The versions of `context` and `generation` this server runs, kept to the deployment's counts.

    `grow` runs before a new deployment is applied (new instances must be ready before a router
    picks them); `retire_idle` runs after every membership round and unloads removed instances
    once `holds_requests(worker)` says they hold nothing."""

    def __init__(self, repository: Path, deployment: Deployment, load_model: Callable[[str], None]) -> None:
        self.repository = repository
        self._load_model = load_model
        self.loaded = {group.model_name: group.num_instances for group in _groups(deployment)}
        self.retiring: set[Worker] = set()

    def grow(self, deployment: Deployment) -> Deployment:
        """Load the versions `deployment` adds; the deployment to apply, with a group whose new
        versions failed to load kept at the versions it has (the failure is logged)."""
        for field_name in GROUP_FIELDS:
            group = getattr(deployment, field_name)
            model, want = group.model_name, group.num_instances
            have = self.loaded.get(model, 0)
            if want < have:
                self.retiring |= {Worker(model, version) for version in range(want + 1, have + 1)}
                logger.info("%s versions %d-%d leave rotation; each is unloaded once it holds nothing",
                            model, want + 1, have)
            elif want > have:
                self.retiring -= {Worker(model, version) for version in range(have + 1, want + 1)}
                if not self._load(model, want):
                    deployment = dataclasses.replace(deployment, **{field_name: dataclasses.replace(
                        group, num_instances=have)})
                    continue
            self.loaded[model] = want
        return deployment

    def retire_idle(self, holds_requests: Callable[[Worker], bool]) -> None:
        """Unload the removed instances that hold nothing any more."""
        idle = {t for t in self.retiring if not holds_requests(t)}
        for model in sorted({t.model_name for t in idle}):
            try:
                for worker in sorted((t for t in idle if t.model_name == model), key=lambda t: t.version):
                    shutil.rmtree(self.repository / model / str(worker.version), ignore_errors=True)
                self._load_model(model)  # the versions whose directories are gone are unloaded
            except Exception:  # noqa: BLE001 - e.g. not in explicit mode: they stay loaded, out of rotation
                logger.exception("could not unload the removed instances of %s (needs "
                                 "--model-control-mode=explicit); they stay loaded, out of rotation", model)
            else:
                logger.info("%s: unloaded the drained instances %s", model,
                            [t.version for t in idle if t.model_name == model])
            self.retiring -= {t for t in idle if t.model_name == model}

    def _load(self, model: str, count: int) -> bool:
        directory = self.repository / model
        try:
            added = add_versions(directory, range(2, count + 1))
        except (OSError, VersionError) as error:
            logger.error("cannot add instances of %s: %s; keeping %d", model, error, self.loaded.get(model, 0))
            return False
        if not added:  # instances still draining, back in rotation: loaded all along
            return True
        logger.info("loading %s versions %s (new instances)", model, added)
        try:
            self._load_model(model)
        except Exception:  # noqa: BLE001 - the server refused: the new instances never join
            logger.exception("could not load the new instances of %s (loading needs "
                             "--model-control-mode=explicit and a writable repository)", model)
            for version in added:
                shutil.rmtree(directory / str(version), ignore_errors=True)
            return False
        return True


def _groups(deployment: Deployment):
    return [getattr(deployment, name) for name in GROUP_FIELDS]
