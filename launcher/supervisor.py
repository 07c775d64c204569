"""Keep tritonserver serving: restart it when it dies, with backoff, and count the restarts.

One bad request can still kill Triton 2.51 (see THREAD_STACK_BYTES in launcher/server.py), and
so can the OOM killer; without this the launcher exited with the server and nothing answered
until a person restarted it. Now a crash costs the seconds the server takes to start again.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from launcher.server import TritonServer
from launcher.stopping import POLL_INTERVAL_S, StopSignals


@dataclass(frozen=True)
class RestartPolicy:
    first_delay_s: float = 1.0  # the wait before the first restart, doubled after each one
    max_delay_s: float = 30.0
    stable_after_s: float = 60.0  # a server that ran this long starts the backoff over


def log_to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Supervisor:
    """Waits on a started server and restarts it each time it exits with a failure status, until a
    stop signal (which `run` raises as launcher.stopping.Stopped)."""

    def __init__(self, server: TritonServer, stop_signals: StopSignals, policy: RestartPolicy = RestartPolicy(),
                 log: Callable[[str], None] = log_to_stderr) -> None:
        self.server = server
        self.stop_signals = stop_signals
        self.policy = policy
        self.log = log
        self.restarts = 0

    def run(self) -> int:
        """Returns once the server exits cleanly (0); a restart that fails to start raises
        ServerStartError, since then something other than one request is wrong."""
        delay = self.policy.first_delay_s
        while True:
            started = time.monotonic()
            status = self._wait_for_exit()
            if status == 0:
                self.log("disagg-serve: tritonserver exited with status 0")
                return 0
            if time.monotonic() - started >= self.policy.stable_after_s:
                delay = self.policy.first_delay_s
            self.restarts += 1
            self.log(f"disagg-serve: tritonserver exited with status {status}; restarting in {delay:.0f} s "
                     f"(disagg_launcher_restarts_total {self.restarts})")
            self.stop_signals.sleep(delay)
            self.server.restart()
            self.log(f"disagg-serve: tritonserver is ready again (disagg_launcher_restarts_total {self.restarts})")
            delay = min(2 * delay, self.policy.max_delay_s)

    def _wait_for_exit(self) -> int:
        while self.server.running:  # a few wake-ups a second: Popen.wait(timeout) polls every 50 ms
            self.stop_signals.sleep(POLL_INTERVAL_S)
        return self.server.wait()
