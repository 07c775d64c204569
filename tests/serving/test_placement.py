"""Core sets per engine instance: parsing, which instance gets which set, and pinning itself."""

from __future__ import annotations

import json
import os
import threading

import pytest

from python_backend_utils.engine.config import ConfigError
from python_backend_utils.serving.placement import cores_for, instance_index, parse_core_sets, pin_instance


def test_core_sets_are_parsed_in_instance_order():
    assert parse_core_sets("") == []
    assert parse_core_sets("0;1") == [{0}, {1}]
    assert parse_core_sets(" 0-2,5 ; 3-4 ") == [{0, 1, 2, 5}, {3, 4}]


@pytest.mark.parametrize("text", ["a", "1-", "3-1", "-1"])
def test_bad_core_sets_name_the_bad_part(text):
    with pytest.raises(ConfigError, match="cpu_cores="):
        parse_core_sets(text)


def test_instances_are_counted_across_versions_then_within_the_group():
    assert instance_index(1, "context_0_0", 1) == 0
    assert instance_index(3, "context_0_0", 1) == 2
    assert instance_index(1, "aggregated_0_1", 2) == 1
    assert instance_index(2, "aggregated_0_1", 2) == 3


def test_each_instance_needs_its_own_available_cores():
    available = sorted(os.sched_getaffinity(0))
    sets = [frozenset({available[0]})]
    assert cores_for([], 5) is None
    assert cores_for(sets, 0) == {available[0]}
    with pytest.raises(ConfigError, match="give one per instance"):
        cores_for(sets, 1)
    with pytest.raises(ConfigError, match="not available here"):
        cores_for([frozenset({max(available) + 1000})], 0)


def test_pinning_moves_every_thread_of_the_process():
    """Run in a child process: pinning the test runner itself would slow the rest of the suite."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            started = threading.Event()
            worker = threading.Thread(target=started.wait, daemon=True)
            worker.start()
            core = sorted(os.sched_getaffinity(0))[-1]
            config = {"parameters": {"cpu_cores": {"string_value": f"{core}"}}, "instance_group": [{"count": 1}]}
            pinned = pin_instance({"model_config": json.dumps(config), "model_version": "1",
                                   "model_instance_name": "context_0_0"})
            later = threading.Thread(target=lambda: None)
            later.start()
            seen = {frozenset(os.sched_getaffinity(int(tid))) for tid in os.listdir("/proc/self/task")}
            os.write(write, json.dumps([sorted(pinned), [sorted(s) for s in seen]]).encode())
        finally:
            os._exit(0)
    os.close(write)
    pinned, seen = json.loads(os.read(read, 4096))
    os.waitpid(child, 0)
    assert seen == [pinned] and len(pinned) == 1
