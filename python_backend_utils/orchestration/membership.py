"""Who is in rotation: the workers a deployment names, edits of its file, and remote health.

Membership follows the deployment file, which the orchestrator re-reads when it changes (a
bad edit is logged and the last good deployment stays). Remote instances are asked for
readiness periodically (`is_server_ready` and `is_model_ready` over gRPC); a run of failed checks,
or a request that could not reach the server, takes one out of rotation, and one passed check
puts it back. Instances on this server are not checked: they live and die with it, and a
failed call to one already costs a retry.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import tritonclient.grpc as grpcclient

from python_backend_utils.orchestration.deployment import Deployment, DeploymentError, WorkerGroup
from python_backend_utils.orchestration.routing import Worker

logger = logging.getLogger(__name__)


def group_workers(group: WorkerGroup) -> list[Worker]:
    """Local versions 1..num_instances, then one worker per url, in the file's order."""
    local = [Worker(group.model_name, version) for version in range(1, group.num_instances + 1)]
    remote = [Worker(group.model_name, address.version, address.endpoint) for address in group.remote]
    return local + remote


@dataclass(frozen=True)
class MembershipChange:
    added: tuple[Worker, ...]
    removed: tuple[Worker, ...]

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


def diff_workers(old: list[Worker], new: list[Worker]) -> MembershipChange:
    return MembershipChange(tuple(t for t in new if t not in old), tuple(t for t in old if t not in new))


class DeploymentWatcher:
    """Re-reads the deployment file when it is replaced or its modification time or size changes,
    and applies it when its content did change."""

    def __init__(self, path: str | Path, current: Deployment) -> None:
        self.path = Path(path)
        self.current = current
        self._stamp = self._stat()
        self._digest = self._read_digest()

    def poll(self) -> Deployment | None:
        """The new deployment after a valid edit; None when nothing changed or the edit is invalid."""
        stamp = self._stat()
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        try:
            text = self.path.read_text()
        except OSError as error:
            logger.error("deployment file %s unreadable (%s); keeping the running deployment", self.path, error)
            return None
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest == self._digest:
            return None
        self._digest = digest
        try:
            deployment = Deployment.from_text(text)
        except DeploymentError as error:
            logger.error("deployment file %s: %s; keeping the running deployment", self.path, error)
            return None
        self.current = deployment
        return deployment

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            stat = os.stat(self.path)  # follows links: a replaced worker (a ConfigMap update) is seen too
        except OSError:
            return None
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def _read_digest(self) -> str | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return None


class HealthTracker:
    """Consecutive failed checks per worker; reports when a worker's health flips."""

    def __init__(self, failures_to_fail: int) -> None:
        self.failures_to_fail = failures_to_fail
        self._failures: dict[Worker, int] = {}
        self.unhealthy: set[Worker] = set()
        self._lock = threading.Lock()

    def record(self, worker: Worker, ok: bool) -> bool | None:
        """The worker's new health when this result flips it, else None."""
        with self._lock:
            if ok:
                self._failures[worker] = 0
                if worker in self.unhealthy:
                    self.unhealthy.discard(worker)
                    return True
                return None
            self._failures[worker] = self._failures.get(worker, 0) + 1
            if worker not in self.unhealthy and self._failures[worker] >= self.failures_to_fail:
                self.unhealthy.add(worker)
                return False
            return None

    def unreachable(self, worker: Worker) -> bool:
        """A request could not reach the worker: out of rotation now. True when that is news."""
        with self._lock:
            self._failures[worker] = max(self._failures.get(worker, 0), self.failures_to_fail)
            if worker in self.unhealthy:
                return False
            self.unhealthy.add(worker)
            return True

    def keep_only(self, workers: list[Worker]) -> None:
        """Forget workers no longer checked: one that comes back starts healthy, like a new one."""
        with self._lock:
            for worker in [t for t in self._failures if t not in workers]:
                del self._failures[worker]
            self.unhealthy &= set(workers)


def probe(client, worker: Worker, timeout_s: float) -> bool:
    """Is the server ready and is the worker's model version ready on it?"""
    try:
        return bool(client.is_server_ready(client_timeout=timeout_s)) and bool(
            client.is_model_ready(worker.model_name, str(worker.version), client_timeout=timeout_s)
        )
    except Exception:  # noqa: BLE001 - unreachable, refused, timed out: all mean not ready
        return False


class MembershipMonitor:
    """A background thread: watches the deployment file and checks remote workers' health.

    `on_deployment(deployment)` applies a new deployment; `on_health(worker, healthy)` moves a
    worker in or out of rotation; `on_tick()` runs after every round (metrics). The checks use
    synchronous gRPC clients of their own (one per server), off the request path's event loop.
    """

    def __init__(
        self,
        deployment: Deployment,
        path: str | Path | None,
        remote_workers: Callable[[], list[Worker]],
        on_deployment: Callable[[Deployment], None],
        on_health: Callable[[Worker, bool], None],
        on_tick: Callable[[], None],
        client_factory: Callable[[str], object] | None = None,
    ) -> None:
        self.deployment = deployment
        self.watcher = DeploymentWatcher(path, deployment) if path is not None else None
        self.health = HealthTracker(deployment.health_check_failures)
        self._remote_workers = remote_workers
        self._on_deployment = on_deployment
        self._on_health = on_health
        self._on_tick = on_tick
        self._client_factory = client_factory or _grpc_client
        self._clients: dict[str, object] = {}
        self._stop = threading.Event()
        self._probes = ThreadPoolExecutor(8, thread_name_prefix="health")
        self._thread = threading.Thread(target=self._run, name="membership", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout=self.deployment.health_check_timeout_s * 2 + 5)
        self._probes.shutdown(wait=False, cancel_futures=True)
        for client in self._clients.values():
            _close(client)
        self._clients.clear()

    def unreachable(self, worker: Worker) -> None:
        """Called by the request path when a worker could not be reached."""
        if self.health.unreachable(worker):
            logger.warning("%s unreachable: out of rotation until a health check passes", worker)
            self._on_health(worker, False)

    def check_health(self) -> None:
        """One round of checks over every remote worker in rotation or draining."""
        workers = self._remote_workers()
        self.health.keep_only(workers)
        for url in [u for u in self._clients if u not in {t.url for t in workers}]:
            _close(self._clients.pop(url))
        clients = {t: self._client(t.url) for t in workers}
        timeout = self.deployment.health_check_timeout_s
        results = self._probes.map(lambda t: (t, probe(clients[t], t, timeout)), workers)
        for worker, ok in results:
            flipped = self.health.record(worker, ok)
            if flipped is not None:
                logger.warning("%s is %s", worker, "healthy again: back in rotation" if flipped
                               else "not ready: out of rotation")
                self._on_health(worker, flipped)

    def poll_deployment(self) -> None:
        if self.watcher is None or not self.deployment.watch_interval_s:
            return
        deployment = self.watcher.poll()
        if deployment is None:
            return
        logger.info("deployment file %s changed: applying it", self.watcher.path)
        self.deployment = deployment
        self.health.failures_to_fail = deployment.health_check_failures
        self._on_deployment(deployment)

    def _run(self) -> None:
        next_check = 0.0
        while not self._stop.is_set():
            try:
                self.poll_deployment()
                now = time.monotonic()
                if now >= next_check:
                    self.check_health()
                    next_check = now + self.deployment.health_check_interval_s
                self._on_tick()
            except Exception:  # noqa: BLE001 - the monitor must outlive any one bad round
                logger.exception("membership round failed")
            watch = self.deployment.watch_interval_s or self.deployment.health_check_interval_s
            self._stop.wait(min(watch, max(0.05, next_check - time.monotonic())))

    def _client(self, url: str):
        if url not in self._clients:
            self._clients[url] = self._client_factory(url)
        return self._clients[url]


def _grpc_client(url: str) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(url)


def _close(client) -> None:
    try:
        client.close()
    except Exception:  # noqa: BLE001 - closing a channel to a dead server may complain; nothing to do
        logger.debug("closing a health-check client failed", exc_info=True)
