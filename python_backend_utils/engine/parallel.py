"""Tensor and pipeline parallelism: one engine split over a group of processes, one per rank.

The leader (rank 0) is the process the engine runs in: it schedules, samples, and starts and
stops the other ranks itself. Every step it sends each rank the step's chunks over a pipe, and
each rank runs its part of the model (engine/sharding.py) over its own KV pool, which holds only
its heads or its layers. Tensor-parallel ranks sum their partial outputs with one all-reduce after
the attention and one after the MLP; pipeline stages pass the step's hidden states on, the last
back to the leader. Collectives go through torch.distributed: gloo on a CPU, NCCL on CUDA; on a
CPU the all-reduces that fit a slot go through shared memory instead (engine/shm_all_reduce.py).

Only the leader computes logits: the LM head stays whole on rank 0, which spares a gather of
[batch, vocab / ranks] logits every step. Its cost is bandwidth: with the default model at TP2 a
decode step streams 85.8M parameters on rank 0 (2 of 3 KV heads' attention, half the MLP, the
28.3M-parameter head) and 48.7M on rank 1, so batch-1 decode gains at most 134.5 / 85.8 = 1.57x
over one process; split by vocab, rank 0 would stream 71.7M (1.88x). Splitting it is the next step
once a gather is cheaper than 14M parameters' read.

A rank dies with its leader: it reads EOF on its pipe, its collectives fail, and a watchdog
thread sees its parent go.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from python_backend_utils.engine.config import EngineConfig
from python_backend_utils.engine.kv_pool import KVPool
from python_backend_utils.engine.paged_causal_lm import Chunk, PagedCausalLM
from python_backend_utils.engine.sharding import shard_for, split_cores
from python_backend_utils.engine.shm_all_reduce import (
    PeerLostError,
    SharedMemoryAllReduce,
    create_region,
    shared_memory_available,
    slot_bytes,
)

# How long a collective may wait for the slowest rank: a layer of a long prefill on a loaded machine.
COLLECTIVE_TIMEOUT = timedelta(seconds=300)
# How long the leader waits for every rank to load its weights and join.
JOIN_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 10.0
WATCHDOG_PERIOD_S = 1.0


class RankGroupError(RuntimeError):
    """A rank of a parallel group is gone: the group cannot run a step until it is reloaded."""


def _process_group(store: dist.Store, rank: int, size: int, device: str) -> dist.ProcessGroup:
    """A process group of its own (not torch's global one), so several engines may share a process."""
    if torch.device(device).type == "cuda":
        return dist.ProcessGroupNCCL(store, rank, size)
    options = dist.ProcessGroupGloo._Options()
    options._timeout = COLLECTIVE_TIMEOUT
    options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    return dist.ProcessGroupGloo(store, rank, size, options)


def rank_device(device: str, rank: int) -> str:
    """Rank r of a CUDA group runs on GPU r; on a CPU every rank shares the device name."""
    return f"cuda:{rank}" if torch.device(device).type == "cuda" else device


class AllReduce:
    """Sums a tensor over the group in place, through shared memory when it fits a slot (a CPU group),
    else the process group; counts the time spent, for the all-reduce's share of a step."""

    def __init__(self, group: dist.ProcessGroup, shared: SharedMemoryAllReduce | None = None) -> None:
        self.group = group
        self.shared = shared
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        tensor = tensor.contiguous()
        try:
            if self.shared is not None and self.shared.fits(tensor):
                self.shared(tensor)
            else:
                self.group.allreduce([tensor]).wait()
        except (RuntimeError, PeerLostError) as error:  # a peer died or timed out: the collective cannot complete
            raise RankGroupError(f"a rank of the tensor-parallel group failed mid-step ({error}): "
                                 "reload the model instance") from error
        self.seconds += time.perf_counter() - started
        self.calls += 1
        return tensor


class StagePipe:
    """A pipeline stage's link to its neighbours: hidden states in from rank - 1, out to rank + 1 (the last
    stage's back to the leader)."""

    def __init__(self, group: dist.ProcessGroup, rank: int, size: int, hidden_size: int, dtype: torch.dtype,
                 device: str) -> None:
        self.group = group
        self.previous, self.next = (rank - 1) % size, (rank + 1) % size
        self.hidden_size, self.dtype, self.device = hidden_size, dtype, device

    def receive(self, num_tokens: int) -> torch.Tensor:
        hidden = torch.empty(num_tokens, self.hidden_size, dtype=self.dtype, device=self.device)
        try:
            self.group.recv([hidden], self.previous, 0).wait()
        except RuntimeError as error:
            raise RankGroupError(f"pipeline stage {self.previous} failed mid-step ({error}): "
                                 "reload the model instance") from error
        return hidden

    def send(self, hidden: torch.Tensor) -> None:
        try:
            self.group.send([hidden.to(self.dtype).contiguous()], self.next, 0).wait()
        except RuntimeError as error:
            raise RankGroupError(f"pipeline stage {self.next} failed mid-step ({error}): "
                                 "reload the model instance") from error


def connect(model: PagedCausalLM, group: dist.ProcessGroup, device: str,
            shared: SharedMemoryAllReduce | None = None) -> None:
    """Give a rank's model its collectives: all-reduces for a tensor-parallel rank, a pipe for a stage."""
    if model.shard.splits_heads:
        model.all_reduce = AllReduce(group, shared)
    else:
        model.stages = StagePipe(group, model.shard.rank, model.shard.size, model.shape.hidden_size, model.dtype,
                                 device)


def _pin(cores: frozenset[int] | None) -> None:
    if cores is not None:
        for thread_id in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(thread_id), cores)
            except ProcessLookupError:
                continue


def _python() -> str:
    """This interpreter, also inside Triton's stub (whose executable is the stub, not Python)."""
    if os.path.basename(sys.executable).startswith("python"):
        return sys.executable
    return os.path.join(sys.prefix, "bin", "python3")


class RankGroup:
    """The leader's side: starts ranks 1..size-1, sends them each step, stops them."""

    def __init__(self, config: EngineConfig, model_dir: str, cores: frozenset[int] | None = None,
                 all_reduce_slot: int | None = None) -> None:
        """`all_reduce_slot`: bytes of a shared-memory all-reduce slot, for a tensor-parallel CPU group."""
        self.size = config.world_size
        self.all_reduce_slot = all_reduce_slot
        self.all_reduce_region = create_region(self.size, all_reduce_slot) if all_reduce_slot else None
        rank_cores = split_cores(cores, self.size)
        _pin(rank_cores[0])
        self.store = dist.TCPStore("127.0.0.1", 0, self.size, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=JOIN_TIMEOUT_S))
        self._processes: list[subprocess.Popen] = []
        self._pipes: list[Connection] = []
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        settings = json.dumps(dataclasses.asdict(config))
        try:
            for rank in range(1, self.size):
                read_end, write_end = os.pipe()
                command = [_python(), "-m", __name__, "--rank", str(rank), "--port", str(self.store.port),
                           "--model-dir", model_dir, "--config", settings, "--pipe", str(read_end),
                           "--parent", str(os.getpid())]
                if rank_cores[rank] is not None:
                    command += ["--cores", ",".join(map(str, sorted(rank_cores[rank])))]
                passed = (read_end,)
                if self.all_reduce_region is not None:
                    command += ["--all-reduce-region", str(self.all_reduce_region),
                                "--all-reduce-slot", str(all_reduce_slot)]
                    passed += (self.all_reduce_region,)
                self._processes.append(subprocess.Popen(command, pass_fds=passed, env=environment,
                                                        stdin=subprocess.DEVNULL))
                os.close(read_end)
                self._pipes.append(Connection(write_end, readable=False))
        except BaseException:
            self.close()
            raise

    def join(self, device: str) -> dist.ProcessGroup:
        """Wait for every rank to load its weights and connect; the leader loads its own meanwhile."""
        try:
            return _process_group(self.store, 0, self.size, device)
        except Exception as error:
            self.close()
            raise RankGroupError(f"the parallel ranks did not join ({error}); their errors are in the "
                                 "log above") from error

    def shared_all_reduce(self) -> SharedMemoryAllReduce | None:
        """The leader's side of the shared-memory all-reduce (None: the process group does them all)."""
        if self.all_reduce_region is None:
            return None
        return SharedMemoryAllReduce(self.all_reduce_region, 0, self.size, self.all_reduce_slot,
                                     peers_alive=self.alive, timeout_s=COLLECTIVE_TIMEOUT.total_seconds())

    def alive(self) -> bool:
        return all(process.poll() is None for process in self._processes)

    def send(self, message: tuple) -> None:
        for rank, (process, pipe) in enumerate(zip(self._processes, self._pipes), start=1):
            if process.poll() is not None:
                raise RankGroupError(f"rank {rank} of the parallel group exited (code {process.returncode}):"
                                     " reload the model instance")
            try:
                pipe.send(message)
            except OSError as error:
                raise RankGroupError(f"rank {rank} of the parallel group is unreachable ({error}): "
                                     "reload the model instance") from error

    def close(self) -> None:
        """Ask the ranks to stop; kill those that do not within STOP_TIMEOUT_S. Calling it twice is harmless."""
        for pipe in self._pipes:
            try:
                pipe.send(("stop",))
            except OSError:
                pass
            pipe.close()
        self._pipes = []
        if self.all_reduce_region is not None:
            os.close(self.all_reduce_region)  # a mapping of it (shared_all_reduce) stays valid
            self.all_reduce_region = None
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in self._processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._processes = []


class ParallelModel:
    """The leader's model: rank 0's part, which sends every step to the other ranks before running it."""

    def __init__(self, config: EngineConfig, model_dir: str, cores: frozenset[int] | None = None) -> None:
        text_config = _text_config(model_dir)
        shard = shard_for(text_config, config, 0)  # a bad split fails before any rank starts
        slot = (slot_bytes(config.max_num_batched_tokens, text_config.hidden_size)
                if shard.splits_heads and shared_memory_available(config.device) else None)
        self.ranks = RankGroup(config, model_dir, cores, all_reduce_slot=slot)
        try:
            self.local = PagedCausalLM(config, model_dir, shard=shard)
            connect(self.local, self.ranks.join(config.device), config.device, self.ranks.shared_all_reduce())
        except BaseException:
            self.ranks.close()
            raise

    def __getattr__(self, name: str):
        return getattr(self.local, name)

    def allocate_pools(self, num_blocks: int) -> None:
        """Every other rank allocates a pool of `num_blocks` blocks for its own KV heads."""
        self.ranks.send(("pool", num_blocks))

    def forward(self, chunks: list[Chunk], pool: KVPool) -> torch.Tensor:
        self.ranks.send(("step", chunks))
        return self.local.forward(chunks, pool)

    def close(self) -> None:
        self.ranks.close()


def _watch_parent(parent: int) -> None:
    """Exit as soon as the leader is gone, whatever this rank is doing."""
    while os.getppid() == parent:
        time.sleep(WATCHDOG_PERIOD_S)
    os._exit(1)


def serve_rank(rank: int, port: int, model_dir: str, config: EngineConfig, pipe: Connection,
               cores: frozenset[int] | None, all_reduce: tuple[int, int] | None = None) -> None:
    """A rank other than the leader: load its part, join the group, then run each step it is sent.
    `all_reduce`: the leader's shared-memory all-reduce region (file descriptor) and slot bytes."""
    _pin(cores)
    torch.set_num_threads(config.num_threads)
    device = rank_device(config.device, rank)
    config = dataclasses.replace(config, device=device)
    model = PagedCausalLM(config, model_dir, shard=shard_for(_text_config(model_dir), config, rank))
    store = dist.TCPStore("127.0.0.1", port, config.world_size, is_master=False,
                          timeout=timedelta(seconds=JOIN_TIMEOUT_S))
    # A rank waits on the others as long as its leader lives (its watchdog ends it with the leader),
    # and the leader, which watches every rank, fails the group when one dies.
    shared = (SharedMemoryAllReduce(all_reduce[0], rank, config.world_size, all_reduce[1], peers_alive=lambda: True,
                                    timeout_s=COLLECTIVE_TIMEOUT.total_seconds()) if all_reduce else None)
    connect(model, _process_group(store, rank, config.world_size, device), device, shared)
    pool = None
    with torch.inference_mode():
        while True:
            try:
                message = pipe.recv()
            except EOFError:
                return
            if message[0] == "stop":
                return
            if message[0] == "pool":
                pool = KVPool(model.shape, message[1], config.block_size, config.kv_torch_dtype, device)
            else:
                model.forward(message[1], pool)


def _text_config(model_dir: str):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def main() -> None:
    parser = argparse.ArgumentParser(description="One rank of a parallel engine (started by its leader).")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--config", required=True, help="the leader's EngineConfig as JSON")
    parser.add_argument("--pipe", type=int, required=True, help="file descriptor the leader sends steps on")
    parser.add_argument("--parent", type=int, required=True, help="the leader's process id")
    parser.add_argument("--cores", default="", help="cores to run on, comma-separated")
    parser.add_argument("--all-reduce-region", type=int, help="file descriptor of the shared-memory all-reduce")
    parser.add_argument("--all-reduce-slot", type=int, help="bytes of one of its slots")
    args = parser.parse_args()
    threading.Thread(target=_watch_parent, args=(args.parent,), daemon=True, name="leader-watchdog").start()
    if os.getppid() != args.parent:
        sys.exit(1)
    logging.basicConfig(level=logging.INFO, format=f"rank {args.rank}: %(levelname)s %(message)s")
    cores = frozenset(int(core) for core in args.cores.split(",")) if args.cores else None
    all_reduce = (args.all_reduce_region, args.all_reduce_slot) if args.all_reduce_region is not None else None
    serve_rank(args.rank, args.port, args.model_dir, EngineConfig(**json.loads(args.config)),
               Connection(args.pipe, writable=False), cores, all_reduce)
    # Nothing is left to clean up, and the interpreter's teardown (torch, the process group) took
    # a second: the leader's close waits for it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
