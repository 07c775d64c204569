"""A Python-backend stub ends when its tritonserver is gone.

Triton 2.51's stub checks on its parent only from its health thread, which can block on a
shared-memory mutex that a killed server held: stubs of a server killed with SIGKILL (the
launcher's last resort, or the kernel's when the launcher itself died) were seen alive minutes
later, parented to init, each holding its /dev/shm region. Every model's `initialize` calls
`exit_with_server()`: a thread waits on the server's pidfd (no polling) and, once the server
has exited, removes the stub's own shared-memory regions and ends the stub.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
SERVER_GONE_EXIT_STATUS = 70  # EX_SOFTWARE
_watching = threading.Lock()


def stub_shm_region(cmdline: bytes) -> str:
    """The stub's shared-memory region: Triton 2.51 starts it as
    `triton_python_backend_stub <model.py> <region name> <size> <growth> <server pid> ...`."""
    return cmdline.split(b"\0")[2].decode()


def exit_with_server() -> None:
    """Watch the parent (the tritonserver that started this stub) from a daemon thread; a second
    call in the same stub does nothing."""
    if not _watching.acquire(blocking=False):
        return
    server_pid = os.getppid()
    try:
        pidfd = os.pidfd_open(server_pid)
    except ProcessLookupError:
        pidfd = None
    if pidfd is None or os.getppid() != server_pid:  # gone before the watch began
        _server_gone(server_pid)
    threading.Thread(target=_wait_for_exit, args=(pidfd, server_pid), name="server-watch", daemon=True).start()


def _wait_for_exit(pidfd: int, server_pid: int) -> None:
    poller = select.poll()  # not select(): a stub may hold more than FD_SETSIZE descriptors
    poller.register(pidfd, select.POLLIN)  # ready once the process has exited, reaped or not
    poller.poll()
    _server_gone(server_pid)


def _server_gone(server_pid: int) -> None:
    region = stub_shm_region(Path("/proc/self/cmdline").read_bytes())  # the stub's sys.argv is ['']
    logger.error("tritonserver (pid %d) is gone: this stub removes its shared memory %s and exits", server_pid, region)
    for path in SHM_DIR.glob(f"{region}*"):
        with contextlib.suppress(OSError):
            path.unlink()
    os._exit(SERVER_GONE_EXIT_STATUS)
