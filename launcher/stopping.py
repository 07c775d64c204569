"""The launcher's stop signals: recorded, never raised where they land.

SIGTERM, SIGINT (Ctrl-C) and SIGHUP (the terminal closed) only record that a stop was asked. The
launcher's long waits (a start, the supervisor's watch) poll `check()`, which unwinds them with
Stopped, and the one stop path then runs to its end whatever arrives meanwhile: a handler that
raised (sys.exit, KeyboardInterrupt) could land inside that clean-up: a second SIGTERM (`make`
passes its own on to the launcher) cut `frontend.stop()` or `server.stop()` short.
"""

from __future__ import annotations

import signal
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
POLL_INTERVAL_S = 0.25  # how soon a wait notices a stop signal


def never_stop() -> None:
    """The `check_stop` of a start that nothing interrupts (the tests' servers)."""


class Stopped(Exception):
    """A stop signal arrived: unwinds a wait to the stop path."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StopSignals:
    """Installs the recording handlers; `signum` is the first stop signal, None before one came."""

    def __init__(self) -> None:
        self.signum: int | None = None
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._record)

    def _record(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum

    def check(self) -> None:
        """Raises Stopped once a stop signal came."""
        if self.signum is not None:
            raise Stopped(self.signum)

    def sleep(self, seconds: float) -> None:
        """time.sleep that a stop signal cuts short (with Stopped)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.check()
            time.sleep(min(left, POLL_INTERVAL_S))
        self.check()
