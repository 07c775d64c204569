"""Free TCP ports for servers started by tests and benchmarks, and the address a local client uses."""

from __future__ import annotations

import socket


def free_ports(count: int) -> list[int]:
    """`count` distinct ports nothing listens on now (another process could still take one first).

    They are held open together while chosen: ports picked one at a time can repeat, and a
    tritonserver given the same port for HTTP and gRPC refuses to start."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_server_ports() -> dict[str, int]:
    """`http_port`, `grpc_port` and `metrics_port` for a TritonServer, all distinct."""
    http, grpc, metrics = free_ports(3)
    return {"http_port": http, "grpc_port": grpc, "metrics_port": metrics}


def connect_host(bind_host: str) -> str:
    """Where a local client reaches a server bound to `bind_host` (all interfaces: the loopback)."""
    return "localhost" if bind_host in ("", "0.0.0.0", "::") else bind_host
