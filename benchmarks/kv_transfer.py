"""Benchmark: pull bandwidth and latency between two processes, next to memcpy and a TCP socket.

    python -m benchmarks.kv_transfer [--sizes-mb 1,4,16,64,256,1024] [--repeats 5]

A context process publishes requests from its pool and serves a plain TCP socket; a generation
process pulls them into its own pool (the default model's layout: SmolLM2-135M, fp32, 16-token
blocks), copies the same bytes locally (glibc's memcpy, one thread; and "split", the pull's own
copy: shared among two threads as with the default copy_threads=2, bypassing the caches), and
receives them over the socket, all in the same run, interleaved.

Pulls: "shared" is the same-host path (the receiver reads the sender's shared pool), into blocks
[0, n) ("contiguous") or into shuffled blocks ("scattered", one copy per block). "ucx" is the path
used across hosts, forced here with use_shared_memory=False. Both processes run with
UCX_PROTO_INFO=y; the protocol table UCX printed is summarised at the end.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing as mp
import os
import re
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time

import numpy as np

LAYOUT = dict(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16, dtype="float32")


def _redirect_output(path: str) -> None:
    """UCX prints its protocol table from C: capture the process's stdout and stderr fds."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)


def _aligned(nbytes: int) -> np.ndarray:
    raw = np.ones(nbytes + 4096, dtype=np.uint8)  # ones: every page touched before timing
    offset = (-raw.ctypes.data) % 4096
    return raw[offset:offset + nbytes]


def _context_main(conn, log_path: str, num_blocks: int) -> None:
    _redirect_output(log_path)
    import torch

    from kv_transfer import KVLayout, TransferAgent, TransferConfig, allocate_kv_pool

    layout = KVLayout(**LAYOUT)
    pool = allocate_kv_pool(layout, num_blocks)
    pool.copy_(torch.arange(pool.numel(), dtype=torch.float32).view(pool.shape))
    agent = TransferAgent(pool, layout, TransferConfig(name="bench-context"))
    server = socket.create_server(("127.0.0.1", 0))
    conn.send(server.getsockname()[1])
    sock, _ = server.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload = memoryview(pool.reshape(-1).view(torch.uint8).numpy())

    def serve_socket() -> None:  # each request: 8 bytes of size, answered with that many bytes
        while len(header := sock.recv(8, socket.MSG_WAITALL)) == 8:
            sock.sendall(payload[:struct.unpack("<Q", header)[0]])

    threading.Thread(target=serve_socket, daemon=True).start()
    while (command := conn.recv())[0] == "publish":
        _, request_id, blocks, tokens = command
        conn.send(agent.publish(request_id, blocks, tokens).to_bytes())
    sock.close()
    agent.close()


def _generation_main(conn, log_path: str, num_blocks: int, port: int) -> None:
    _redirect_output(log_path)
    from kv_transfer import KVHandle, KVLayout, TransferAgent, TransferConfig, allocate_kv_pool
    from kv_transfer.conversion import parallel_copy

    layout = KVLayout(**LAYOUT)
    agents = {
        "shared": TransferAgent(allocate_kv_pool(layout, num_blocks), layout, TransferConfig(name="bench-generation")),
        "ucx": TransferAgent(allocate_kv_pool(layout, num_blocks), layout,
                             TransferConfig(name="bench-generation-ucx", use_shared_memory=False)),
    }
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    tcp_buffer = _aligned(num_blocks * layout.bytes_per_block)
    copy_src, copy_dst = _aligned(tcp_buffer.nbytes), _aligned(tcp_buffer.nbytes)
    copy_helper = concurrent.futures.ThreadPoolExecutor(1)
    while True:
        command = conn.recv()
        if command[0] == "pull":
            _, path, handle_bytes, dest = command
            start = time.perf_counter()
            result = agents[path].pull(KVHandle.from_bytes(handle_bytes), dest).result(120)
            conn.send((time.perf_counter() - start, result.bytes_received))
        elif command[0] == "memcpy":
            nbytes = command[1]
            start = time.perf_counter()
            np.copyto(copy_dst[:nbytes], copy_src[:nbytes])
            conn.send(time.perf_counter() - start)
        elif command[0] == "memcpy_split":
            nbytes = command[1]
            start = time.perf_counter()
            parallel_copy(copy_dst[:nbytes], copy_src[:nbytes], copy_helper, 1)
            conn.send(time.perf_counter() - start)
        elif command[0] == "tcp":
            nbytes = command[1]
            view = memoryview(tcp_buffer)[:nbytes]
            start = time.perf_counter()
            sock.sendall(struct.pack("<Q", nbytes))
            received = 0
            while received < nbytes:
                received += sock.recv_into(view[received:])
            conn.send(time.perf_counter() - start)
        else:
            break
    sock.close()
    for agent in agents.values():
        agent.close()


def _protocols(log_text: str) -> list[str]:
    """The rows of UCX's table for host-memory tagged sends: size range, protocol, transport."""
    rows, in_table = [], False
    for line in log_text.splitlines():
        if "tagged message by ucp_tag_send* from host memory" in line:
            in_table = True
            continue
        if in_table:
            cells = [c.strip() for c in line.split("|")[1:-1]]
            if len(cells) == 3 and re.match(r"^\d", cells[0]):
                rows.append(f"{cells[0]:>12}  {cells[1]:<45} {cells[2]}")
            elif rows and not line.rstrip().endswith("+"):
                in_table = False
    return list(dict.fromkeys(rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", default="1,4,16,64,256,1024")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    sizes = [int(float(s) * (1 << 20)) for s in args.sizes_mb.split(",")]

    block_bytes = LAYOUT["num_layers"] * 2 * LAYOUT["block_size"] * LAYOUT["num_kv_heads"] * LAYOUT["head_dim"] * 4
    num_blocks = -(-max(sizes) // block_bytes)
    os.environ["UCX_PROTO_INFO"] = "y"
    ctx = mp.get_context("spawn")
    logs = [tempfile.NamedTemporaryFile(prefix=f"kv_bench_{role}_", suffix=".log", delete=False).name
            for role in ("context", "generation")]
    context_conn, child = ctx.Pipe()
    context = ctx.Process(target=_context_main, args=(child, logs[0], num_blocks), daemon=True)
    context.start()
    if not context_conn.poll(120):
        sys.exit(f"context process did not start; see {logs[0]}")
    port = context_conn.recv()
    generation_conn, child = ctx.Pipe()
    generation = ctx.Process(target=_generation_main, args=(child, logs[1], num_blocks, port), daemon=True)
    generation.start()
    rng = np.random.default_rng(0)

    def median_gbps(samples: list[float], nbytes: int) -> tuple[float, float]:
        t = statistics.median(samples)
        return nbytes / t / 1e9, t * 1e3

    print(f"layout {LAYOUT}, {block_bytes} bytes per block; median of {args.repeats} runs, GB/s (latency ms)\n")
    columns = ("shared contiguous", "shared scattered", "ucx (tcp)", "memcpy", "memcpy split", "TCP socket")
    print(f"{'MB':>8} | " + " | ".join(f"{c:>17}" for c in columns) + " | shared/memcpy | shared/split | shared/TCP")
    print("-" * 172)
    try:
        for size in sizes:
            blocks = -(-size // block_bytes)
            tokens = blocks * LAYOUT["block_size"]
            nbytes = blocks * block_bytes
            scattered = rng.permutation(num_blocks)[:blocks].tolist()
            samples: dict[str, list[float]] = {c: [] for c in columns}
            for rep in range(args.repeats + 1):  # interleaved, so that all see the same machine; run 0 warms up
                for column, path, dest in (("shared contiguous", "shared", list(range(blocks))),
                                           ("shared scattered", "shared", scattered),
                                           ("ucx (tcp)", "ucx", list(range(blocks)))):
                    context_conn.send(("publish", f"{column}-{size}-{rep}", list(range(blocks)), tokens))
                    generation_conn.send(("pull", path, context_conn.recv(), dest))
                    seconds, received = generation_conn.recv()
                    assert received == nbytes, (received, nbytes)
                    samples[column].append(seconds)
                for column, command in (("memcpy", "memcpy"), ("memcpy split", "memcpy_split"), ("TCP socket", "tcp")):
                    generation_conn.send((command, nbytes))
                    samples[column].append(generation_conn.recv())
            cells, gbps = [], {}
            for column in columns:
                gbps[column], ms = median_gbps(samples[column][1:], nbytes)
                cells.append(f"{gbps[column]:>7.2f} ({ms:>7.2f})")
            best_shared = gbps["shared contiguous"]
            print(f"{nbytes / 1e6:>8.1f} | " + " | ".join(f"{c:>17}" for c in cells) +
                  f" | {best_shared / gbps['memcpy']:>13.0%} | {best_shared / gbps['memcpy split']:>12.0%}"
                  f" | {best_shared / gbps['TCP socket']:>9.1f}x", flush=True)
    finally:
        for conn in (context_conn, generation_conn):
            conn.send(("stop",))
        for process in (context, generation):
            process.join(30)
            if process.is_alive():
                process.kill()
    print("\nUCX protocols for tagged sends from host memory (UCX_PROTO_INFO=y, as printed by the processes;")
    print("the shared path uses UCX for its control messages only):")
    for path in logs:
        with open(path, errors="replace") as f:
            for row in _protocols(f.read()):
                print("  " + row)
            break  # both processes print the same table
    print(f"\nfull UCX output: {logs[0]}, {logs[1]}")


if __name__ == "__main__":
    main()
