"""Start and stop one tritonserver process serving our model repository.

The server runs in its own process group, with a shared-memory prefix of its own for the
Python stubs, so that a failed or finished server can be cleaned up completely (its stubs and
its /dev/shm regions) without touching anything else on the machine. It dies with the process
that started it (launcher/children.py), and its stubs with it (triton_glue/server_watch.py).

The stubs get the deployment key that authenticates context_phase_params through
TRITON_DISAGG_KV_KEY_FILE: the caller's, when set (a deployment across hosts shares one key file),
else a random key made once per launcher process, so servers started side by side share it.

The server and its stubs run with umask 077: the Python backend's /dev/shm regions carry every
prompt and answer, and with the usual umask (022) any local user could read them.

Two protections against clients, both missing from Triton 2.51's defaults:
- The model-repository API (load, unload, index) answers only requests that carry
  ADMIN_HEADER with a random key made per server and never published, so no client can unload
  `ensemble` or load a model from uploaded files. The orchestrator's stub recovery reloads
  models through the in-process API (`pb_utils.load_model`), which this does not restrict.
- The server runs with a thread stack of THREAD_STACK_BYTES instead of the usual 8 MiB. Triton
  2.51's HTTP library (libevhtp) parses an `application/x-www-form-urlencoded` body (curl's
  `-d` default) into two stack buffers the size of the body, so with 8 MiB stacks any body over
  about 4.19 MB crashes the whole server (SIGSEGV). With 64 MiB the limit is about 33 MB, far
  above any real request, which Triton then answers and our models refuse by size; 2.51 has no
  body-size flag, and beyond that limit the supervisor (launcher/supervisor.py) restarts it.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import resource
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from launcher.children import Termination, kill_group, spawn
from launcher.ports import connect_host
from launcher.runtime import TritonRuntime, find_runtime
from launcher.stopping import never_stop
from python_backend_utils.environment import DEVICE_ENV, KEY_FILE_ENV, MODEL_DIR_ENV
from python_backend_utils.orchestration.remote import MIN_PING_INTERVAL_MS
from python_backend_utils.serving.context_params import MIN_KEY_BYTES

DEFAULT_MODEL_REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"
SHM_DIR = Path("/dev/shm")
ADMIN_HEADER = "triton-disagg-admin-key"
THREAD_STACK_BYTES = 64 << 20
SERVER_UMASK = 0o077
START_ATTEMPTS = 2  # a start fails now and then (seen: a lock exception during model load)


class ServerStartError(RuntimeError):
    """tritonserver did not become ready."""


@functools.cache
def session_key_file() -> Path:
    """A random deployment key, readable by this user only, removed when this process exits."""
    directory = Path(tempfile.mkdtemp(prefix="triton-disagg-key-"))  # mode 0700
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    path = directory / "kv.key"
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as key_file:
        key_file.write(secrets.token_hex(MIN_KEY_BYTES))
    return path


def server_shell(command: list[str], stack_bytes: int) -> list[str]:
    """`command` run through sh with umask SERVER_UMASK and the stack limit raised to `stack_bytes`
    (or the hard limit, if lower): glibc sizes every thread's stack from it, and the process keeps
    the pid `exec` gives it."""
    _, hard = resource.getrlimit(resource.RLIMIT_STACK)
    kib = (stack_bytes if hard == resource.RLIM_INFINITY else min(stack_bytes, hard)) // 1024
    return ["/bin/sh", "-c", f'umask {SERVER_UMASK:03o} && ulimit -s {kib} && exec "$@"', "tritonserver", *command]


@dataclass(frozen=True)
class ServerUrls:
    http: str  # host:port, the form tritonclient takes
    grpc: str
    metrics: str


class TritonServer:
    """A tritonserver child process; use as a context manager or call start() and stop()."""

    def __init__(
        self,
        model_repository: Path = DEFAULT_MODEL_REPOSITORY,
        *,
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        host: str = "0.0.0.0",
        models: Sequence[str] = (),
        model_dir: str | None = None,
        device: str | None = None,
        log_file: Path | None = None,
        ready_timeout_s: float = 300.0,
        stop_timeout_s: float = 30.0,
        check_stop: Callable[[], None] = never_stop,
    ) -> None:
        """`models` empty loads every model in the repository; otherwise only those (and what
        they depend on) in explicit model-control mode. `log_file` None leaves the server's
        output on ours. `check_stop` is called between readiness polls: what it raises
        (launcher.stopping.Stopped) abandons the start, and stop() then cleans up."""
        self.model_repository = Path(model_repository).resolve()
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.host = host  # the address all three ports bind to
        self.models = tuple(models)
        self.model_dir = model_dir
        self.device = device
        self.log_file = log_file
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.check_stop = check_stop
        self._process: subprocess.Popen | None = None
        self._termination: Termination | None = None
        self._shm_prefix = ""
        self.admin_key = secrets.token_urlsafe(32)  # the value of ADMIN_HEADER for the repository API

    @property
    def urls(self) -> ServerUrls:
        host = connect_host(self.host)
        return ServerUrls(
            http=f"{host}:{self.http_port}",
            grpc=f"{host}:{self.grpc_port}",
            metrics=f"{host}:{self.metrics_port}",
        )

    @property
    def pid(self) -> int | None:
        """The tritonserver process, which also leads the process group of its stubs."""
        return self._process.pid if self._process is not None else None

    @property
    def exit_status(self) -> int | None:
        """tritonserver's exit status once it has exited (negative: killed by that signal)."""
        return self._process.returncode if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Launch and wait until ready; a failed start is cleaned up and tried once more."""
        runtime = find_runtime()
        failures = []
        for _ in range(START_ATTEMPTS):
            self.check_stop()
            self._launch(runtime)
            try:
                self._wait_until_ready()
                return
            except ServerStartError as error:
                failures.append(str(error))
                self._kill()
        raise ServerStartError("tritonserver failed to start:\n" + "\n".join(failures))

    def restart(self) -> None:
        """Clean up what is left of an exited server (its stubs, its shared memory) and start anew."""
        self._kill()
        self.start()

    def wait(self, timeout_s: float | None = None) -> int | None:
        """Block until the server exits (at most `timeout_s`); its exit status, None if still running."""
        assert self._process is not None, "start() first"
        try:
            return self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def terminate(self) -> None:
        """SIGTERM, once: Triton unloads the models and stops the stubs. stop() waits for it."""
        if self._termination is not None:
            self._termination.terminate()

    def stop(self) -> None:
        """terminate(), then SIGKILL the group `stop_timeout_s` after it and remove the /dev/shm regions."""
        if self._termination is None:
            return
        self._termination.wait_out()
        self._kill()

    def command(self, runtime: TritonRuntime, shm_prefix: str) -> list[str]:
        command = [
            str(runtime.executable),
            f"--model-repository={self.model_repository}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            f"--metrics-address={self.host}",
            "--disable-auto-complete-config",
            f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
            # <api>:<header>=<value>; 2.51's --help says "<apis>,<key>=<value>", which it refuses
            f"--http-restricted-api=model-repository:{ADMIN_HEADER}={self.admin_key}",
            f"--grpc-restricted-protocol=model-repository:{ADMIN_HEADER}={self.admin_key}",
            # Orchestrators on other servers ping their streams here (remote.KEEPALIVE).
            f"--grpc-http2-min-recv-ping-interval-without-data={MIN_PING_INTERVAL_MS}",
        ]
        if runtime.backend_directory is not None:
            command.append(f"--backend-directory={runtime.backend_directory}")
        if self.device != "cuda":
            command += [
                "--allow-gpu-metrics=false",
                "--pinned-memory-pool-byte-size=0",
                "--cuda-memory-pool-byte-size=0:0",
            ]
        if self.models:
            command.append("--model-control-mode=explicit")
            command += [f"--load-model={name}" for name in self.models]
        return command

    def _launch(self, runtime: TritonRuntime) -> None:
        # Unique per attempt, so a stub left over from a failed attempt never shares a region.
        self._shm_prefix = f"triton_disagg_{os.getpid()}_{secrets.token_hex(4)}_"
        env = runtime.environment(dict(os.environ))
        if not env.get(KEY_FILE_ENV):
            env[KEY_FILE_ENV] = str(session_key_file())
        if self.model_dir:
            env[MODEL_DIR_ENV] = str(Path(self.model_dir).expanduser().resolve())
        if self.device:
            env[DEVICE_ENV] = self.device
        output = None
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            output = open(self.log_file, "ab")
        try:
            self._process = spawn(
                server_shell(self.command(runtime, self._shm_prefix), THREAD_STACK_BYTES),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT if output else None,
            )
            self._termination = Termination(self._process, self.stop_timeout_s)
        finally:
            if output is not None:
                output.close()

    def _wait_until_ready(self) -> None:
        """Ready models, and the metrics port listening too: Triton opens it a moment after the others."""
        assert self._process is not None
        pending = [f"http://{self.urls.http}/v2/health/ready", f"http://{self.urls.metrics}/metrics"]
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            self.check_stop()
            status = self._process.poll()
            if status is not None:
                raise ServerStartError(f"tritonserver exited with status {status}{self._log_hint()}")
            try:
                with urllib.request.urlopen(pending[0], timeout=2) as response:
                    if response.status == 200:
                        pending.pop(0)
                        if not pending:
                            return
                        continue
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        raise ServerStartError(f"tritonserver not ready after {self.ready_timeout_s:.0f} s{self._log_hint()}")

    def _log_hint(self) -> str:
        """The log's error lines (Triton prefixes them with E and the date), else its last lines."""
        if self.log_file is None:
            return " (its log is above)"
        lines = self.log_file.read_text(errors="replace").splitlines()
        errors = [line for line in lines if re.match(r"E\d{4} |error: ", line)]
        return f"; from {self.log_file}:\n" + "\n".join(errors[-10:] or lines[-20:])

    def _kill(self) -> None:
        """SIGKILL whatever is left of the server's process group and remove its /dev/shm regions."""
        if self._process is not None:
            kill_group(self._process)
        for region in SHM_DIR.glob(f"{self._shm_prefix}*") if self._shm_prefix else ():
            region.unlink(missing_ok=True)
