"""Who is in rotation: the targets a deployment names, edits of its file, and remote health.

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

from python_backend_utils.orchestration.deployment import Deployment, DeploymentError, ServerGroup
from python_backend_utils.orchestration.routing import Target

logger = logging.getLogger(__name__)


def group_targets(group: ServerGroup) -> list[Target]:
    """Local versions 1..num_instances, then one target per url, in the file's order."""
    local = [Target(group.model_name, version) for version in range(1, group.num_instances + 1)]
    remote = [Target(group.model_name, address.version, address.endpoint) for address in group.remote]
    return local + remote


@dataclass(frozen=True)
class MembershipChange:
    added: tuple[Target, ...]
    removed: tuple[Target, ...]

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


def diff_targets(old: list[Target], new: list[Target]) -> MembershipChange:
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
            stat = os.stat(self.path)  # follows links: a replaced target (a ConfigMap update) is seen too
        except OSError:
            return None
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def _read_digest(self) -> str | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return None


class HealthTracker:
    """Consecutive failed checks per target; reports when a target's health flips."""

    def __init__(self, failures_to_fail: int) -> None:
        self.failures_to_fail = failures_to_fail
        self._failures: dict[Target, int] = {}
        self.unhealthy: set[Target] = set()
        self._lock = threading.Lock()

    def record(self, target: Target, ok: bool) -> bool | None:
        """The target's new health when this result flips it, else None."""
        with self._lock:
            if ok:
                self._failures[target] = 0
                if target in self.unhealthy:
                    self.unhealthy.discard(target)
                    return True
                return None
            self._failures[target] = self._failures.get(target, 0) + 1
            if target not in self.unhealthy and self._failures[target] >= self.failures_to_fail:
                self.unhealthy.add(target)
                return False
            return None

    def unreachable(self, target: Target) -> bool:
        """A request could not reach the target: out of rotation now. True when that is news."""
        with self._lock:
            self._failures[target] = max(self._failures.get(target, 0), self.failures_to_fail)
            if target in self.unhealthy:
                return False
            self.unhealthy.add(target)
            return True

    def keep_only(self, targets: list[Target]) -> None:
        """Forget targets no longer checked: one that comes back starts healthy, like a new one."""
        with self._lock:
            for target in [t for t in self._failures if t not in targets]:
                del self._failures[target]
            self.unhealthy &= set(targets)


def probe(client, target: Target, timeout_s: float) -> bool:
    """Is the server ready and is the target's model version ready on it?"""
    try:
        return bool(client.is_server_ready(client_timeout=timeout_s)) and bool(
            client.is_model_ready(target.model_name, str(target.version), client_timeout=timeout_s)
        )
    except Exception:  # noqa: BLE001 - unreachable, refused, timed out: all mean not ready
        return False


class MembershipMonitor:
    """A background thread: watches the deployment file and checks remote targets' health.

    `on_deployment(deployment)` applies a new deployment; `on_health(target, healthy)` moves a
    target in or out of rotation; `on_tick()` runs after every round (metrics). The checks use
    synchronous gRPC clients of their own (one per server), off the request path's event loop.
    """

    def __init__(
        self,
        deployment: Deployment,
        path: str | Path | None,
        remote_targets: Callable[[], list[Target]],
        on_deployment: Callable[[Deployment], None],
        on_health: Callable[[Target, bool], None],
        on_tick: Callable[[], None],
        client_factory: Callable[[str], object] | None = None,
    ) -> None:
        self.deployment = deployment
        self.watcher = DeploymentWatcher(path, deployment) if path is not None else None
        self.health = HealthTracker(deployment.health_check_failures)
        self._remote_targets = remote_targets
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

    def unreachable(self, target: Target) -> None:
        """Called by the request path when a target could not be reached."""
        if self.health.unreachable(target):
            logger.warning("%s unreachable: out of rotation until a health check passes", target)
            self._on_health(target, False)

    def check_health(self) -> None:
        """One round of checks over every remote target in rotation or draining."""
        targets = self._remote_targets()
        self.health.keep_only(targets)
        for url in [u for u in self._clients if u not in {t.url for t in targets}]:
            _close(self._clients.pop(url))
        clients = {t: self._client(t.url) for t in targets}
        timeout = self.deployment.health_check_timeout_s
        results = self._probes.map(lambda t: (t, probe(clients[t], t, timeout)), targets)
        for target, ok in results:
            flipped = self.health.record(target, ok)
            if flipped is not None:
                logger.warning("%s is %s", target, "healthy again: back in rotation" if flipped
                               else "not ready: out of rotation")
                self._on_health(target, flipped)

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
