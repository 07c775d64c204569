"""Bringing back a model instance on this server whose Python-backend stub died.

Triton 2.51's Python backend never restarts the stub of a decoupled model (every engine model
here is one): its readiness stays green while each request to that instance fails with "Stub
process '...' is not healthy.", and a load request for a model whose files did not change does
nothing. Triton does reload, in the background, a model version whose directory changed, while
the model's other versions keep serving. With one version per instance (`launcher.repository`),
that restarts exactly the dead instance. Loading a model from a model needs Triton's explicit
model-control mode, which the launcher uses.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

# Triton's words for a request that reached an instance whose stub is gone or stopped answering.
DEAD_STUB_MESSAGES = ("is not healthy", "Failed to obtain the health mutex")


# The exit status of a stub that ends itself because its engine loop died (EX_SOFTWARE).
ENGINE_DEAD_EXIT_STATUS = 70
# How long a stub whose engine loop died lives on, so that the error responses of its requests leave first.
ENGINE_DEAD_GRACE_S = 1.0


def is_dead_stub_error(message: str) -> bool:
    return any(words in message for words in DEAD_STUB_MESSAGES)


def exit_stub(error: BaseException, grace_s: float = ENGINE_DEAD_GRACE_S) -> None:
    """An engine model's `on_death`: the stub exits, so the orchestrator sees a dead stub and
    reloads the instance (StubRecovery). Alive with a dead engine loop, Triton would report the
    model ready and StubWatch the stub running, while nothing served it."""
    logger.critical("the engine loop died (%r): this stub exits in %g s so that it is reloaded", error, grace_s)
    threading.Timer(grace_s, os._exit, args=(ENGINE_DEAD_EXIT_STATUS,)).start()


def stub_pids(repository: Path, model_name: str, version: int, proc: Path = Path("/proc")) -> list[int]:
    """The live processes (a frozen one counts, a zombie does not) running that model version's
    stub on this host, found by the model file their command line names."""
    model_file = f"{repository / model_name / str(version) / 'model.py'}".encode()
    return [int(entry.name) for entry in proc.iterdir()
            if entry.name.isdigit() and _is_live_stub(int(entry.name), model_file, proc)]


def _is_live_stub(pid: int, model_file: bytes, proc: Path) -> bool:
    try:
        cmdline = (proc / str(pid) / "cmdline").read_bytes()
        state = (proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return b"triton_python_backend_stub" in cmdline and model_file in cmdline and state != "Z"


def kill_stubs(repository: Path, model_name: str, version: int, timeout_s: float = 5.0) -> list[int]:
    """SIGKILL what lives of a stub Triton gave up on, before its instance is reloaded: Triton 2.51
    fails and frees the requests it had queued for a stub that stopped answering, and one that
    resumes reads that freed shared memory, crashes, and aborts tritonserver with it."""
    killed = []
    for pid in stub_pids(repository, model_name, version):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    deadline = time.monotonic() + timeout_s
    while killed and stub_pids(repository, model_name, version) and time.monotonic() < deadline:
        time.sleep(0.01)  # gone, or a zombie: dead before its replacement starts
    return killed


class StubWatch:
    """Whether a model version's stub process lives. Triton's own verdict is not enough: it also
    calls a frozen stub unhealthy, and a request to a stub killed at the wrong moment may end
    without an error. Asked at the end of every worker stream, so cheap: the stubs found by one
    /proc scan are remembered, and only their own entries are read until one of them is gone."""

    def __init__(self, repository: Path, proc: Path = Path("/proc")) -> None:
        self.repository = repository
        self.proc = proc
        self._pids: dict[tuple[str, int], list[int]] = {}

    def running(self, model_name: str, version: int) -> bool:
        key = (model_name, version)
        model_file = f"{self.repository / model_name / str(version) / 'model.py'}".encode()
        known = self._pids.get(key)
        if known and all(_is_live_stub(pid, model_file, self.proc) for pid in known):
            return True
        self._pids[key] = stub_pids(self.repository, model_name, version, self.proc)
        return bool(self._pids[key])


class StubRecovery:
    """Reloads a model version on a thread of its own (a load takes seconds), then calls
    `on_reloaded(model_name, version)`. Every request that ran on the dead stub reports it: one
    reload serves them all, and reports within `grace_s` after it finished are late ones."""

    def __init__(self, repository: Path, load_model: Callable[[str], None],
                 on_reloaded: Callable[[str, int], None], grace_s: float = 5.0) -> None:
        self._repository = repository
        self._load_model = load_model
        self._on_reloaded = on_reloaded
        self._grace_s = grace_s
        self._reloading: set[tuple[str, int]] = set()
        self._finished: dict[tuple[str, int], float] = {}
        self._lock = threading.Lock()
        self.reloads = 0
        self.failed_reloads = 0

    def stub_died(self, model_name: str, version: int) -> bool:
        """Start reloading that version unless it is reloading or just was; True if started."""
        key = (model_name, version)
        with self._lock:
            finished = self._finished.get(key)
            if key in self._reloading or (finished is not None and time.monotonic() - finished < self._grace_s):
                return False
            self._reloading.add(key)
        threading.Thread(target=self._reload, args=key, name=f"reload-{model_name}-{version}", daemon=True).start()
        return True

    def _reload(self, model_name: str, version: int) -> None:
        try:
            self._load(model_name, version)
        finally:
            with self._lock:
                self._reloading.discard((model_name, version))
                self._finished[(model_name, version)] = time.monotonic()

    def _load(self, model_name: str, version: int) -> None:
        killed = kill_stubs(self._repository, model_name, version)
        logger.warning("the stub of %s version %d was lost%s: reloading that version", model_name, version,
                       f" (killed its frozen process {killed})" if killed else "")
        try:
            os.utime(self._repository / model_name / str(version))  # what makes Triton reload it
            self._load_model(model_name)
        except Exception:  # noqa: BLE001 - e.g. not in explicit mode, or a read-only repository
            self.failed_reloads += 1
            logger.exception("could not reload %s version %d: restart the server to bring it back "
                             "(reloading needs --model-control-mode=explicit and a writable repository)",
                             model_name, version)
            return
        self.reloads += 1
        logger.warning("%s version %d reloaded", model_name, version)
        self._on_reloaded(model_name, version)
