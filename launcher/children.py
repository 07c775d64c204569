"""Start the launcher's children so that none outlives it.

Each child runs in a session of its own, so a Ctrl-C at the terminal reaches the launcher alone,
which then stops its children in order (launcher/stopping.py). Each also gets PR_SET_PDEATHSIG =
SIGKILL before it execs: should the launcher itself die without its clean-up (kill -9, the OOM
killer, a container runtime giving up), the kernel kills its children at once, and the stubs of a
killed tritonserver end themselves (python_backend_utils/triton_glue/server_watch.py).

Linux sends that signal when the *thread* that forked the child ends, not its process, and servers
are started from short-lived threads too (a ThreadPoolExecutor in the tests). So every child is
forked by one thread that lives as long as the launcher.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future

PR_SET_PDEATHSIG = 1
ORPHANED_EXIT_STATUS = 70  # EX_SOFTWARE: the launcher died while this child was being forked
GROUP_EXIT_TIMEOUT_S = 5.0

_libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the child between fork and exec only calls it


def _die_with(parent_pid: int) -> None:
    """Runs in the child between fork and exec."""
    if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the launcher died before the prctl: no signal would ever come
        os._exit(ORPHANED_EXIT_STATUS)


class _Forker:
    """The one thread that forks every child, started on first use."""

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def popen(self, command: Sequence[str], kwargs: dict) -> subprocess.Popen:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="child-forker", daemon=True)
                self._thread.start()
        result: Future = Future()
        self._requests.put((result, command, kwargs))
        return result.result()

    def _serve(self) -> None:
        while True:
            result, command, kwargs = self._requests.get()
            try:
                die_with_us = functools.partial(_die_with, os.getpid())
                result.set_result(subprocess.Popen(command, preexec_fn=die_with_us, **kwargs))
            except BaseException as error:  # noqa: BLE001 - handed to the caller, who raises it
                result.set_exception(error)


_forker = _Forker()


def spawn(command: Sequence[str], **popen_kwargs) -> subprocess.Popen:
    """subprocess.Popen(command, **popen_kwargs) in a new session, killed when this process dies."""
    return _forker.popen(command, {**popen_kwargs, "start_new_session": True})


class Termination:
    """A child's graceful stop, whatever arrives in between: SIGTERM once, then a wait of what is
    left of `grace_s` since it; the caller kills the group after (kill_group)."""

    def __init__(self, process: subprocess.Popen, grace_s: float) -> None:
        self.process, self.grace_s = process, grace_s
        self._sent_at: float | None = None

    def terminate(self) -> None:
        if self.process.poll() is None and self._sent_at is None:
            self.process.send_signal(signal.SIGTERM)
            self._sent_at = time.monotonic()

    def wait_out(self) -> None:
        """terminate(), then wait until the child exits or its grace time since the SIGTERM is up."""
        self.terminate()
        if self._sent_at is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(max(0.0, self._sent_at + self.grace_s - time.monotonic()))


def kill_group(process: subprocess.Popen, timeout_s: float = GROUP_EXIT_TIMEOUT_S) -> None:
    """SIGKILL a child's process group, reap the child, and wait (at most `timeout_s`) until no
    member of its group lives: the launcher exits only once its children are gone, so whoever
    starts it again finds the ports free."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            # The group's orphans are reaped by init in moments, or here where the launcher is
            # init (a container's first process): only this group's, so no other Popen loses its child.
            os.waitpid(-process.pid, os.WNOHANG)
        except ChildProcessError:
            pass
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)
