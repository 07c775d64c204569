"""`disagg-serve`'s placement of engine instances: cores of their own, one thread a core."""

from __future__ import annotations

import os

import pytest

from launcher.cli import parse_args, prepare_repository
from launcher.placement import cgroup_cpu_limit, instance_counts, split_cores
from launcher.repository import Setting, read_config, render_repository
from launcher.server import DEFAULT_MODEL_REPOSITORY
from python_backend_utils.serving.placement import parse_core_sets, threads_for

CORES = sorted(os.sched_getaffinity(0))


def cpu_cores(repository, model: str) -> str:
    return read_config(repository / model / "config.pbtxt").parameters["cpu_cores"].string_value


def test_two_cores_give_each_phase_a_core_or_the_aggregated_engine_both():
    assert split_cores([0, 1], {"context": 1, "generation": 1}).cores == {"context": [[0]], "generation": [[1]]}
    assert split_cores([0, 1], {"aggregated": 1}).cores == {"aggregated": [[0, 1]]}


def test_cores_left_over_go_to_the_first_instances():
    placement = split_cores([4, 5, 6, 7, 8], {"context": 2, "generation": 1})
    assert placement.cores == {"context": [[4, 5], [6, 7]], "generation": [[8]]}
    assert [s.value for s in placement.settings()] == ["4,5;6,7", "8"]
    assert [parse_core_sets(s.value) for s in placement.settings()] == [[{4, 5}, {6, 7}], [{8}]]


def test_more_instances_than_cores_pins_nothing():
    placement = split_cores([0, 1], {"context": 1, "generation": 1, "aggregated": 1})
    assert placement.cores == {} and placement.settings() == ()
    assert "3 instances on 2 cores" in placement.describe()


def test_instances_are_counted_from_versions_and_instance_groups(tmp_path):
    deployment = tmp_path / "deployment.yaml"
    deployment.write_text("context_servers:\n  num_instances: 2\ngeneration_servers:\n  num_instances: 1\n")
    repository = tmp_path / "repo"
    render_repository(DEFAULT_MODEL_REPOSITORY, repository, deployment,
                      (Setting("aggregated", "instance_count", "3"),))
    assert instance_counts(repository, ["context", "generation", "aggregated"]) == {
        "context": 2, "generation": 1, "aggregated": 3}
    assert instance_counts(repository, ["aggregated"]) == {"aggregated": 3}


def test_a_cpu_quota_is_read_from_the_cgroup(tmp_path):
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")
    assert cgroup_cpu_limit(cpu_max) == 1.5
    cpu_max.write_text("max 100000\n")
    assert cgroup_cpu_limit(cpu_max) is None
    assert cgroup_cpu_limit(tmp_path / "absent") is None


@pytest.mark.skipif(cgroup_cpu_limit() is not None, reason="a CPU quota here: nothing is pinned")
def test_the_launcher_pins_the_aggregated_engine_to_every_core(tmp_path):
    repository = prepare_repository(parse_args(["--mode", "aggregated"]), tmp_path / "repo")
    assert repository == tmp_path / "repo"
    assert parse_core_sets(cpu_cores(repository, "aggregated")) == [frozenset(CORES)]
    assert threads_for(frozenset(CORES)) == len(CORES)


@pytest.mark.skipif(len(CORES) < 2 or cgroup_cpu_limit() is not None, reason="needs 2 cores and no CPU quota")
def test_the_launcher_gives_context_and_generation_cores_of_their_own(tmp_path):
    repository = prepare_repository(parse_args(["--dtype", "float32"]), tmp_path / "repo")
    context, generation = (parse_core_sets(cpu_cores(repository, m)) for m in ("context", "generation"))
    assert len(context) == len(generation) == 1 and not context[0] & generation[0]
    assert context[0] | generation[0] == set(CORES)
    assert read_config(repository / "context" / "config.pbtxt").parameters["dtype"].string_value == "float32"


def test_cores_set_by_hand_and_the_role_modes_are_left_alone(tmp_path):
    repository = prepare_repository(parse_args(["--mode", "aggregated", "--set", "aggregated.cpu_cores="]),
                                    tmp_path / "by-hand")
    assert cpu_cores(repository, "aggregated") == ""
    assert prepare_repository(parse_args(["--mode", "context-server"]), tmp_path / "role") == DEFAULT_MODEL_REPOSITORY
    assert threads_for(None) == 1


def test_the_aggregated_preset_runs_one_instance_on_all_its_cores():
    from argparse import Namespace

    from benchmarks.presets import preset_settings

    two_cores = Namespace(preset="aggregated", workers=2, instances=1, pin=True)
    assert preset_settings(two_cores) == (["aggregated.instance_count=1", "aggregated.cpu_cores=0,1"], None, 2)
    one_a_core = Namespace(preset="aggregated", workers=2, instances=2, pin=True)
    assert preset_settings(one_a_core)[0] == ["aggregated.instance_count=2", "aggregated.cpu_cores=0;1"]
