"""Reloading a model version whose stub died: what is touched, what is loaded, and how often."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading

from python_backend_utils.triton_glue.stub_recovery import (
    ENGINE_DEAD_EXIT_STATUS,
    StubRecovery,
    StubWatch,
    is_dead_stub_error,
    stub_pids,
)
from tests.engine.checkpoints import build_tiny_checkpoint
from tests.helpers import wait_until


def recovery_in(tmp_path, load_model=None, grace_s: float = 60.0):
    reloaded: list[tuple[str, int]] = []
    done = threading.Event()

    def on_reloaded(name: str, version: int) -> None:
        reloaded.append((name, version))
        done.set()

    loaded: list[str] = []
    recovery = StubRecovery(tmp_path, load_model or loaded.append, on_reloaded, grace_s)
    return recovery, loaded, reloaded, done


def test_triton_words_for_a_dead_stub_are_recognised():
    assert is_dead_stub_error("Stub process 'generation_0_0' is not healthy.")
    assert is_dead_stub_error("Failed to process the request(s) for model instance 'context_0_0', message: "
                              "Failed to obtain the health mutex.")
    assert not is_dead_stub_error("KV pull refused: the handle expired")


def test_the_dead_instances_version_is_marked_modified_then_its_model_loaded(tmp_path):
    version_dir = tmp_path / "generation" / "2"
    version_dir.mkdir(parents=True)
    os.utime(version_dir, (0, 0))
    recovery, loaded, reloaded, done = recovery_in(tmp_path)

    assert recovery.stub_died("generation", 2)
    assert done.wait(5)
    assert loaded == ["generation"]
    assert reloaded == [("generation", 2)]
    assert version_dir.stat().st_mtime > 0  # what makes Triton reload that version, and only it
    assert recovery.reloads == 1


def test_one_reload_answers_every_report_of_the_same_death(tmp_path):
    (tmp_path / "context" / "1").mkdir(parents=True)
    (tmp_path / "context" / "2").mkdir(parents=True)
    release = threading.Event()
    recovery, _, _, done = recovery_in(tmp_path, load_model=lambda name: release.wait(5))
    assert recovery.stub_died("context", 1)
    assert not recovery.stub_died("context", 1)  # reloading: every failing request reports it
    assert recovery.stub_died("context", 2)  # another instance is another reload
    release.set()
    assert done.wait(5)
    wait_until(lambda: recovery.reloads == 2, 5, 0.01)
    assert not recovery.stub_died("context", 1)  # a late report of the death just repaired


def test_a_stub_that_dies_again_later_is_reloaded_again(tmp_path):
    (tmp_path / "context" / "1").mkdir(parents=True)
    recovery, loaded, _, _ = recovery_in(tmp_path, grace_s=0.0)
    assert recovery.stub_died("context", 1)
    wait_until(lambda: recovery.reloads == 1, 5, 0.01)
    wait_until(lambda: recovery.stub_died("context", 1), 5, 0.01)  # once the first reload has ended
    wait_until(lambda: recovery.reloads == 2, 5, 0.01)
    assert loaded == ["context", "context"]


def test_a_failed_reload_is_counted_and_reports_nothing_back(tmp_path):
    (tmp_path / "context" / "1").mkdir(parents=True)
    failed = threading.Event()

    def load_model(name: str) -> None:
        failed.set()
        raise RuntimeError("explicit model control mode is required")

    recovery, _, reloaded, _ = recovery_in(tmp_path, load_model)
    assert recovery.stub_died("context", 1)
    assert failed.wait(5)
    wait_until(lambda: recovery.failed_reloads, 5, 0.01)
    assert recovery.failed_reloads == 1 and recovery.reloads == 0 and reloaded == []


def test_a_frozen_stub_is_killed_before_its_instance_is_reloaded(tmp_path):
    """Resumed, a stub Triton gave up on would read requests Triton freed and crash the server."""
    (tmp_path / "context" / "1").mkdir(parents=True)
    frozen = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "triton_python_backend_stub",
                               f"{tmp_path}/context/1/model.py"], start_new_session=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "triton_python_backend_stub",
                              f"{tmp_path}/context/2/model.py"], start_new_session=True)
    try:
        frozen.send_signal(signal.SIGSTOP)
        wait_until(lambda: stub_pids(tmp_path, "context", 1) == [frozen.pid], 10, 0.05)
        alive_at_load = []
        recovery, _, _, done = recovery_in(tmp_path, load_model=lambda name: alive_at_load.append(
            frozen.poll() is None or stub_pids(tmp_path, "context", 1) != []))
        assert recovery.stub_died("context", 1)
        assert done.wait(10)
        assert alive_at_load == [False]
        assert frozen.wait(5) == -signal.SIGKILL
        assert other.poll() is None  # another instance's stub is left alone
    finally:
        for process in (frozen, other):
            process.kill()
            process.wait()


def fake_process(proc, pid: int, cmdline: list[str], state: str = "S") -> None:
    entry = proc / str(pid)
    entry.mkdir(parents=True)
    (entry / "cmdline").write_bytes(b"\0".join(part.encode() for part in cmdline) + b"\0")
    (entry / "stat").write_text(f"{pid} (triton_python_b) {state} 1 1 1\n")


def test_a_stub_is_found_by_its_model_file_and_a_zombie_is_not_live(tmp_path):
    proc, repository = tmp_path / "proc", tmp_path / "repo"
    stub = "/opt/backends/python/triton_python_backend_stub"
    fake_process(proc, 10, [stub, f"{repository}/generation/1/model.py", "shm-region"], state="T")  # frozen
    fake_process(proc, 11, [stub, f"{repository}/context/1/model.py", "shm-region"], state="Z")
    fake_process(proc, 12, ["python", f"{repository}/context/2/model.py"])  # not a stub
    (proc / "self").mkdir()
    assert stub_pids(repository, "generation", 1, proc) == [10]
    assert stub_pids(repository, "generation", 2, proc) == []
    assert stub_pids(repository, "context", 1, proc) == []
    assert stub_pids(repository, "context", 2, proc) == []



def test_the_watch_sees_a_stub_die_and_its_replacement_start(tmp_path):
    proc, repository = tmp_path / "proc", tmp_path / "repo"
    stub = ["/opt/backends/python/triton_python_backend_stub", f"{repository}/generation/1/model.py"]
    watch = StubWatch(repository, proc)
    fake_process(proc, 10, stub)
    assert watch.running("generation", 1)
    (proc / "10" / "stat").write_text("10 (triton_python_b) Z 1 1 1\n")  # killed, not yet reaped
    assert not watch.running("generation", 1)
    shutil.rmtree(proc / "10")
    fake_process(proc, 10, ["bash"])  # its pid reused by another program
    assert not watch.running("generation", 1)
    fake_process(proc, 20, stub)  # the replacement
    assert watch.running("generation", 1)
    assert not watch.running("context", 1)


DYING_ENGINE = """
import sys, time
from python_backend_utils.engine.config import EngineConfig
from python_backend_utils.engine.engine import LLMEngine
from python_backend_utils.engine.loop import EngineLoop
from python_backend_utils.triton_glue.stub_recovery import exit_stub

loop = EngineLoop(LLMEngine(EngineConfig(model_dir=sys.argv[1], num_kv_blocks=16, block_size=16)), on_death=exit_stub)
loop.start()

def end_the_thread():
    raise SystemExit("what no `except Exception` catches")

loop.call_soon(end_the_thread)
time.sleep(60)
print("still alive with a dead engine loop")
"""


def test_a_stub_whose_engine_loop_died_exits_so_that_it_is_reloaded(tmp_path):
    checkpoint = build_tiny_checkpoint("llama", tmp_path / "tiny")
    ended = subprocess.run([sys.executable, "-c", DYING_ENGINE, str(checkpoint)], capture_output=True, text=True,
                           timeout=60)
    assert ended.returncode == ENGINE_DEAD_EXIT_STATUS, ended.stderr
    assert "still alive" not in ended.stdout
    assert "the engine loop died" in ended.stderr
