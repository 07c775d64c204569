"""Continuous batching: which tokens of which sequences the next step computes.

Every step carries the decode token of each running sequence plus as many prompt tokens as
the budget allows, so requests join and leave the batch between steps and a new prompt never
waits for the batch to drain. A prompt longer than the budget is prefilled in chunks.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass

from python_backend_utils.engine.block_manager import BlockManager
from python_backend_utils.engine.sequence import RequestType, Sequence, Status


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    num_tokens: int

    @property
    def completes(self) -> bool:
        return self.seq.num_computed + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerStats:
    preemptions: int = 0
    kv_pull_fallbacks: int = 0


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.awaiting_kv: list[Sequence] = []
        self.stats = SchedulerStats()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        for queue in (self.waiting, self.running, self.awaiting_kv):
            if seq in queue:
                queue.remove(seq)

    def schedule(self) -> list[ScheduledChunk]:
        self._collect_arrived_kv()
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or budget == 0:
                continue
            if seq.num_computed == seq.num_tokens - 1 and not self._make_room(seq):
                continue
            count = min(seq.num_tokens - seq.num_computed, budget)
            chunks.append(ScheduledChunk(seq, count))
            budget -= count
        while self.waiting and budget > 0 and self._active() < self.max_num_seqs:
            seq = self.waiting[0]
            # Prompt log-probabilities need every prompt token's logits: nothing of it may come from the cache.
            reuse = seq.request_type is not RequestType.GENERATION_ONLY and not seq.params.prompt_log_probs
            if not self.block_manager.can_allocate(seq.token_ids, reuse_prefix=reuse):
                break
            self.waiting.popleft()
            seq.block_table, seq.num_cached_tokens = self.block_manager.allocate(seq.token_ids, reuse_prefix=reuse)
            seq.num_computed = seq.num_cached_tokens
            if seq.start_pull is not None:
                seq.kv_pull, seq.start_pull = self._start_pull(seq), None
                seq.status = Status.AWAITING_KV
                self.awaiting_kv.append(seq)
                continue
            seq.status = Status.RUNNING
            self.running.append(seq)
            count = min(seq.num_tokens - seq.num_computed, budget)
            chunks.append(ScheduledChunk(seq, count))
            budget -= count
        return chunks

    def _active(self) -> int:
        return len(self.running) + len(self.awaiting_kv)

    @staticmethod
    def _start_pull(seq: Sequence) -> Future:
        try:
            return seq.start_pull(list(seq.block_table))
        except Exception as error:  # noqa: BLE001 - no pull started: the prompt is recomputed here
            failed: Future = Future()
            failed.set_exception(error)
            return failed

    def _collect_arrived_kv(self) -> None:
        for seq in list(self.awaiting_kv):
            if not seq.kv_pull.done():
                continue
            if seq.kv_pull.exception() is None:  # the pulled KV covers the prompt: only the first token's is left
                seq.num_computed = seq.num_prompt_tokens
            else:
                # Whatever broke the pull, the prompt is recomputed here. The first token is kept,
                # so the sequence continues exactly where the context instance left it.
                seq.num_computed = 0
                self.stats.kv_pull_fallbacks += 1
            self.awaiting_kv.remove(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)

    def _make_room(self, seq: Sequence) -> bool:
        """Get a slot for seq's next token, preempting the newest sequences if blocks run out.

        Running sequences are visited oldest first, so the newest was not scheduled yet this step.
        """
        while not self.block_manager.append_slot(seq.block_table, seq.num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free its blocks and requeue it first; its tokens so far are recomputed when it returns."""
        self.block_manager.free(seq.block_table)
        seq.block_hash_chain.clear()
        seq.num_computed = 0
        seq.num_cached_tokens = 0
        seq.status = Status.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.stats.preemptions += 1
