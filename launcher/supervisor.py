"""Keep tritonserver serving: restart it when it dies, with backoff, and count the restarts.

One bad request can still kill Triton 2.51 (see THREAD_STACK_BYTES in launcher/server.py), and
so can the OOM killer; without this the launcher exited with the server and nothing answered
until a person restarted it. Now a crash costs the seconds the server takes to start again.
A server whose orchestrator stub died is restarted too: Triton 2.51 neither restarts the stub of a
decoupled model nor ends the requests it held, so the ensemble would hang until then.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from launcher.server import TritonServer
from launcher.stopping import POLL_INTERVAL_S, StopSignals
from python_backend_utils.triton_glue.stub_recovery import stub_pids

ORCHESTRATOR_MODEL = "disaggregated_serving_bls"
# How often the orchestrator's stub is looked for in /proc; missing at two looks in a row, it is lost
# (one look could fall between the stubs of a reload).
STUB_CHECK_INTERVAL_S = 2.0


@dataclass(frozen=True)
class RestartPolicy:
    first_delay_s: float = 1.0  # the wait before the first restart, doubled after each one
    max_delay_s: float = 30.0
    stable_after_s: float = 60.0  # a server that ran this long starts the backoff over


class OrchestratorWatch:
    """Whether the orchestrator's stub is gone from a server that loads it (`expected`) or was seen
    running it. A server without one (aggregated, a context or generation server) never loses it."""

    def __init__(self, repository: Path, expected: bool,
                 find: Callable[[Path, str, int], list[int]] = stub_pids) -> None:
        self.repository = repository
        self.expected = expected
        self._find = find
        self._next_check = 0.0
        self.reset()

    def reset(self) -> None:
        """A server just (re)started: its stub is there if it was to be."""
        self._seen = self.expected
        self._missing = 0

    def lost(self) -> str | None:
        now = time.monotonic()
        if now < self._next_check:
            return None
        self._next_check = now + STUB_CHECK_INTERVAL_S
        if self._find(self.repository, ORCHESTRATOR_MODEL, 1):
            self._seen, self._missing = True, 0
            return None
        if self._seen:
            self._missing += 1
        return "the orchestrator's stub process is gone" if self._missing >= 2 else None


def log_to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Supervisor:
    """Waits on a started server and restarts it each time it exits with a failure status, until a
    stop signal (which `run` raises as launcher.stopping.Stopped)."""

    def __init__(self, server: TritonServer, stop_signals: StopSignals, policy: RestartPolicy = RestartPolicy(),
                 log: Callable[[str], None] = log_to_stderr, watch: OrchestratorWatch | None = None) -> None:
        self.server = server
        self.stop_signals = stop_signals
        self.watch = watch
        self.policy = policy
        self.log = log
        self.restarts = 0

    def run(self) -> int:
        """Returns once the server exits cleanly (0); a restart that fails to start raises
        ServerStartError, since then something other than one request is wrong."""
        delay = self.policy.first_delay_s
        while True:
            started = time.monotonic()
            outcome = self._wait_for_exit()
            if outcome == 0:
                self.log("disagg-serve: tritonserver exited with status 0")
                return 0
            if time.monotonic() - started >= self.policy.stable_after_s:
                delay = self.policy.first_delay_s
            self.restarts += 1
            what = f"tritonserver exited with status {outcome}" if isinstance(outcome, int) else (
                f"{outcome}: tritonserver stopped")
            self.log(f"disagg-serve: {what}; restarting in {delay:.0f} s "
                     f"(disagg_launcher_restarts_total {self.restarts})")
            self.stop_signals.sleep(delay)
            self.server.restart()
            if self.watch is not None:
                self.watch.reset()
            self.log(f"disagg-serve: tritonserver is ready again (disagg_launcher_restarts_total {self.restarts})")
            delay = min(2 * delay, self.policy.max_delay_s)

    def _wait_for_exit(self) -> int | str:
        """The server's exit status, or why it was stopped though it ran (to be restarted)."""
        while self.server.running:  # a few wake-ups a second: Popen.wait(timeout) polls every 50 ms
            self.stop_signals.sleep(POLL_INTERVAL_S)
            reason = self.watch.lost() if self.watch is not None else None
            if reason is not None:
                self.server.stop()
                return reason
        return self.server.wait()
