"""The OpenAI frontend (`python -m openai_frontend`) as a child process of the launcher.

A process of its own, not a thread: its event loop and the GIL stay out of the launcher, and it
is stopped (SIGTERM, then SIGKILL of its process group) with the server it fronts, or killed by
the kernel should the launcher die first (launcher/children.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from launcher.children import Termination, kill_group, spawn
from launcher.ports import connect_host
from launcher.stopping import never_stop
from python_backend_utils.environment import API_KEY_ENV, resolve_model_dir

# The model the frontend calls, by the ensemble a deployment loads (the ensemble's middle step).
TARGETS = {"ensemble": "disaggregated_serving_bls", "ensemble_aggregated": "aggregated"}


class FrontendStartError(RuntimeError):
    """The OpenAI frontend exited or did not answer /health in time."""


def frontend_target(models: Sequence[str]) -> str | None:
    """The Triton model the frontend calls for a server that loads `models`; None: nothing to front."""
    return next((TARGETS[name] for name in TARGETS if name in models), None)


class OpenAIFrontend:
    def __init__(self, *, triton_grpc_url: str, triton_model: str, port: int, model_dir: str | None = None,
                 host: str = "0.0.0.0", log_file: Path | None = None, ready_timeout_s: float = 60.0,
                 stop_timeout_s: float = 10.0, served_model_name: str | None = None, api_key: str | None = None,
                 check_stop: Callable[[], None] = never_stop) -> None:
        """`served_model_name`: the `model` clients name; `api_key`: the Bearer token /v1 requires.
        `check_stop` is called between health polls: what it raises abandons the start, and stop()
        then cleans up."""
        self.port = port
        self.host = host
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.check_stop = check_stop
        self.log_file = log_file
        self.command = [sys.executable, "-m", "openai_frontend", "--triton-url", triton_grpc_url,
                        "--triton-model", triton_model, "--host", host, "--port", str(port)]
        self.model_dir = model_dir
        if model_dir:
            self.command += ["--model-dir", model_dir]
        self.served_model_name = served_model_name
        if served_model_name:
            self.command += ["--served-model-name", served_model_name]
        self.environment = {**os.environ, API_KEY_ENV: api_key or ""}
        self._process: subprocess.Popen | None = None
        self._termination: Termination | None = None

    @property
    def url(self) -> str:
        return f"http://{connect_host(self.host)}:{self.port}"

    @property
    def model_id(self) -> str:
        """The `model` requests name: the served name, else the checkpoint directory's name."""
        return self.served_model_name or resolve_model_dir(self.model_dir).name

    def start(self) -> None:
        output = open(self.log_file, "ab") if self.log_file is not None else None
        try:
            self._process = spawn(self.command, env=self.environment, stdin=subprocess.DEVNULL, stdout=output,
                                  stderr=subprocess.STDOUT if output else None)
            self._termination = Termination(self._process, self.stop_timeout_s)
        finally:
            if output is not None:
                output.close()
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            self.check_stop()
            if self._process.poll() is not None:
                raise FrontendStartError(f"the OpenAI frontend exited with status {self._process.returncode}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        self.stop()
        raise FrontendStartError(
            f"the OpenAI frontend did not answer {self.url}/health within {self.ready_timeout_s:.0f} s"
        )

    def terminate(self) -> None:
        """SIGTERM, once; stop() waits for it."""
        if self._termination is not None:
            self._termination.terminate()

    def stop(self) -> None:
        """terminate(), then SIGKILL the process group `stop_timeout_s` after it."""
        if self._termination is None:
            return
        self._termination.wait_out()
        kill_group(self._process)
