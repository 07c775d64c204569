"""Local instances follow the deployment: versions copied and loaded before they join, removed
ones unloaded only once they hold nothing."""

from __future__ import annotations

import pytest

from python_backend_utils.orchestration.deployment import Deployment
from python_backend_utils.orchestration.local_workers import LocalWorkers
from python_backend_utils.orchestration.routing import Worker


def deployment(context: int, generation: int = 1) -> Deployment:
    return Deployment.from_dict({"context_servers": {"num_instances": context},
                                 "generation_servers": {"num_instances": generation}})


@pytest.fixture()
def repository(tmp_path):
    for model in ("context", "generation"):
        (tmp_path / model / "1").mkdir(parents=True)
        (tmp_path / model / "1" / "model.py").write_text("# engine\n")
    return tmp_path


def test_growing_copies_version_1_and_loads_before_it_joins(repository):
    loads = []
    instances = LocalWorkers(repository, deployment(1), loads.append)
    applied = instances.grow(deployment(3))
    assert (repository / "context" / "3" / "model.py").read_text() == "# engine\n"
    assert loads == ["context"] and applied.context_servers.num_instances == 3


def test_shrinking_unloads_only_once_drained_and_regrowing_cancels(repository):
    loads, busy = [], {Worker("context", 3)}
    instances = LocalWorkers(repository, deployment(1), loads.append)
    instances.grow(deployment(3))
    instances.grow(deployment(1))
    instances.retire_idle(lambda worker: worker in busy)
    assert not (repository / "context" / "2").exists() and (repository / "context" / "3").exists()
    assert loads == ["context", "context"]
    instances.grow(deployment(3))  # 3 still loaded, 2 copied and loaded again
    assert instances.retiring == set() and (repository / "context" / "2").exists() and len(loads) == 3
    instances.grow(deployment(2))
    busy.clear()
    instances.retire_idle(lambda worker: False)
    assert not (repository / "context" / "3").exists() and instances.retiring == set()


def test_a_failed_load_keeps_the_old_count(repository):
    def refuse(model: str) -> None:
        raise RuntimeError("explicit model control is off")

    instances = LocalWorkers(repository, deployment(1), refuse)
    applied = instances.grow(deployment(2, 2))
    assert (applied.context_servers.num_instances, applied.generation_servers.num_instances) == (1, 1)
    assert not (repository / "context" / "2").exists() and instances.loaded == {"context": 1, "generation": 1}
