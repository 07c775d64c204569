"""Out-of-band liveness of peer processes on the same host.

UCX's own peer error handling is off (it would force TCP), and then a dead peer can leave a
send hanging forever. Peers on this host (same boot and pid namespace) are checked through
/proc instead: that turns a killed peer into an error within one check interval. Peers elsewhere
are covered by the transfer timeouts.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a process, or None if there is no such process."""
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return None
    fields = text[text.rfind(")") + 2:].split()
    return fields[0], int(fields[19])


@functools.cache
def _identity_of(pid: int) -> ProcessIdentity:
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    stat = _stat(pid)
    return ProcessIdentity(_read("/proc/sys/kernel/random/boot_id"), namespace, pid, stat[1] if stat else 0)


@dataclass(frozen=True)
class ProcessIdentity:
    """Names a process so that a reused pid is not mistaken for the original."""

    boot_id: str
    pid_namespace: int
    pid: int
    start_ticks: int

    @staticmethod
    def current() -> ProcessIdentity:
        return _identity_of(os.getpid())  # keyed by pid so that a forked child gets its own

    def is_local(self) -> bool:
        here = ProcessIdentity.current()
        return bool(self.boot_id) and self.boot_id == here.boot_id and self.pid_namespace == here.pid_namespace

    def is_alive(self) -> bool | None:
        """True/False for a process on this host; None when it cannot be told from here."""
        if not self.is_local():
            return None
        stat = _stat(self.pid)
        return stat is not None and stat[0] not in ("Z", "X") and stat[1] == self.start_ticks
