"""The LLM engine: one class for the three request types (context and generation, context only, generation only)."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from python_backend_utils.engine.block_manager import BlockManager
from python_backend_utils.engine.config import EngineConfig
from python_backend_utils.engine.grammar import Grammars, apply_grammar_masks
from python_backend_utils.engine.kv_pool import KVPool, ModelShape
from python_backend_utils.engine.outputs import RequestOutput
from python_backend_utils.engine.paged_causal_lm import Chunk, PagedCausalLM
from python_backend_utils.engine.parallel import ParallelModel, RankGroupError
from python_backend_utils.engine.sampler import apply_bad_words, apply_penalties, sample, seeded_uniforms
from python_backend_utils.engine.sampling_params import SamplingParams
from python_backend_utils.engine.scheduler import ScheduledChunk, Scheduler
from python_backend_utils.engine.sequence import RequestType, Sequence, StartPull, Status
from python_backend_utils.environment import resolve_model_dir
from python_backend_utils.errors import CapacityError, InvalidRequestError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    num_blocks: int
    num_free_blocks: int
    num_waiting: int
    num_running: int
    num_awaiting_kv: int
    num_kv_held: int
    preemptions: int
    kv_pull_fallbacks: int
    prefix_cache_hit_tokens: int


# Allocates the KV pool tensor: (model shape, num_blocks, block_size, dtype, device) -> tensor of
# KVPool's shape. The default is torch.zeros; a KV transfer module may want memory of its own.
PoolAllocator = Callable[[ModelShape, int, int, torch.dtype, str], torch.Tensor]


class LLMEngine:
    def __init__(self, config: EngineConfig, allocate_pool: PoolAllocator | None = None,
                 cores: frozenset[int] | None = None) -> None:
        """`cores`: the instance's CPU cores, dealt out to its parallel ranks (None: unpinned)."""
        torch.set_num_threads(config.num_threads)
        self.config = config
        model_dir = str(resolve_model_dir(config.model_dir))
        self.model = (ParallelModel(config, model_dir, cores) if config.world_size > 1
                      else PagedCausalLM(config, model_dir))
        shape = self.model.shape
        self.max_model_len = self.model.max_model_len
        self.vocab_size = shape.vocab_size
        self.grammars = Grammars(model_dir, shape.vocab_size, self.model.eos_token_ids)
        num_blocks = config.num_kv_blocks or config.kv_cache_memory_bytes // KVPool.bytes_per_block(
            shape, config.block_size, config.kv_torch_dtype
        )
        if num_blocks < 1:
            raise CapacityError("kv_cache_memory_bytes is too small for a single KV block")
        self.pool = KVPool(shape, num_blocks, config.block_size, config.kv_torch_dtype, config.device, allocate_pool)
        if isinstance(self.model, ParallelModel):
            self.model.allocate_pools(num_blocks)
        self.block_manager = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self._sequences: dict[str, Sequence] = {}
        # Blocks of requests that ended while a pull still wrote into them: freed once it is done.
        self._pull_held: list[tuple[Future, list[int]]] = []
        self.last_step_num_tokens = 0
        self._prefix_hit_tokens = 0

    # ----------------------------------------------------------------- requests
    def add_request(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams,
        request_type: RequestType = RequestType.CONTEXT_AND_GENERATION,
    ) -> None:
        """Queue a request that is prefilled here (aggregated, or context-only)."""
        if request_type is RequestType.GENERATION_ONLY:
            raise ValueError("use add_generation_request for generation-only requests")
        self._admit(Sequence(request_id, list(prompt_ids), len(prompt_ids), self._with_defaults(params), request_type))

    def add_generation_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        first_token: int,
        params: SamplingParams,
        start_pull: StartPull,
    ) -> None:
        """Queue a request whose prompt KV comes from a context instance.

        `start_pull(block_ids)` is called once this request has blocks; the future it returns is
        done when the KV is in place (or failed, and then the prompt is recomputed here). Until it
        is done those blocks go to no other request, even if this one ends. The first token was
        already produced by the context instance and is not emitted again.
        """
        seq = Sequence(
            request_id,
            [*prompt_ids, first_token],
            len(prompt_ids),
            self._with_defaults(params),
            RequestType.GENERATION_ONLY,
            start_pull=start_pull,
        )
        seq.num_emitted = 1
        seq.output_log_probs.append(0.0)  # the first token's, reported by the context instance
        seq.output_top_log_probs.append([])
        self._admit(seq)

    def release_kv(self, request_id: str) -> None:
        """A context-only request's KV was pulled (or will never be): free its blocks."""
        seq = self._sequences.pop(request_id, None)
        if seq is not None and seq.status is Status.KV_HELD:
            self.block_manager.free(seq.block_table)

    def abort(self, request_id: str) -> None:
        """End a request and free its blocks; a held KV is left to release_kv (a peer may be reading it)."""
        seq = self._sequences.get(request_id)
        if seq is None or seq.status is Status.KV_HELD:
            return
        del self._sequences[request_id]
        self.scheduler.remove(seq)
        self._free_blocks(seq)
        seq.status = Status.FINISHED

    def close(self) -> None:
        """Stop the parallel ranks this engine started (nothing to do for a single process)."""
        if isinstance(self.model, ParallelModel):
            self.model.close()

    def has_unfinished(self) -> bool:
        """True while a request runs or waits, or a pull of an ended one still holds blocks."""
        return bool(self._pull_held) or any(s.status is not Status.KV_HELD for s in self._sequences.values())

    def stats(self) -> EngineStats:
        held = sum(1 for s in self._sequences.values() if s.status is Status.KV_HELD)
        return EngineStats(
            num_blocks=self.block_manager.num_blocks,
            num_free_blocks=self.block_manager.num_free,
            num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running),
            num_awaiting_kv=len(self.scheduler.awaiting_kv),
            num_kv_held=held,
            preemptions=self.scheduler.stats.preemptions,
            kv_pull_fallbacks=self.scheduler.stats.kv_pull_fallbacks,
            prefix_cache_hit_tokens=self._prefix_hit_tokens,
        )

    # ----------------------------------------------------------------- the step
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        self._free_finished_pulls()
        scheduled = self.scheduler.schedule()
        self.last_step_num_tokens = sum(item.num_tokens for item in scheduled)
        if not scheduled:
            return []
        chunks = [
            Chunk(
                token_ids=item.seq.token_ids[item.seq.num_computed : item.seq.num_computed + item.num_tokens],
                start=item.seq.num_computed,
                block_table=item.seq.block_table,
                sample=item.completes,
                all_logits=(item.seq.params.prompt_log_probs
                            and item.seq.request_type is not RequestType.GENERATION_ONLY
                            and item.seq.num_computed < item.seq.num_prompt_tokens - 1),
            )
            for item in scheduled
        ]
        try:
            logits = self.model.forward(chunks, self.pool)
        except RankGroupError:  # not this step's fault: no step can run until the instance is reloaded
            raise
        except Exception as error:  # noqa: BLE001 - the step's requests fail, the others go on
            logger.exception("engine step failed; failing its %d requests", len(scheduled))
            self.block_manager.forget_hashes()  # what the step wrote is not trusted
            return [self._fail(item.seq, error) for item in scheduled]
        sampling = [item for item in scheduled if item.completes]
        for item in scheduled:
            if item.seq.num_computed == item.seq.num_cached_tokens and item.seq.num_cached_tokens:
                self._prefix_hit_tokens += item.seq.num_cached_tokens
            item.seq.num_computed += item.num_tokens
            if item.seq.request_type is not RequestType.GENERATION_ONLY:
                self.block_manager.register_full_blocks(
                    item.seq.block_table, item.seq.token_ids, item.seq.num_computed, item.seq.block_hash_chain
                )
        if any(chunk.all_logits for chunk in chunks):
            logits = self._take_prompt_log_probs(scheduled, chunks, logits)
        return self._sample_and_finish(sampling, logits) if sampling else []

    def _take_prompt_log_probs(self, scheduled: list[ScheduledChunk], chunks: list[Chunk],
                               logits: torch.Tensor) -> torch.Tensor:
        """Record the prompt log-probabilities of the all_logits chunks; return the sampling rows' logits."""
        sampling_rows, at = [], 0
        for item, chunk in zip(scheduled, chunks):
            rows = len(chunk.token_ids) if chunk.all_logits else int(chunk.sample)
            if chunk.all_logits:
                self._record_prompt_log_probs(item.seq, chunk.start, logits[at : at + rows])
            if chunk.sample:
                sampling_rows.append(at + rows - 1)
            at += rows
        return logits[sampling_rows]

    @staticmethod
    def _record_prompt_log_probs(seq: Sequence, start: int, logits: torch.Tensor) -> None:
        """Row j's logits predict prompt token start + j + 1 (a recomputed prompt overwrites its entries)."""
        count = min(len(logits), seq.num_prompt_tokens - 1 - start)
        log_probs = torch.log_softmax(logits[:count].float(), dim=-1)
        targets = torch.tensor(seq.token_ids[start + 1 : start + 1 + count], device=log_probs.device)
        chosen = log_probs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
        top = log_probs.topk(seq.params.top_logprobs, dim=-1)
        alternatives = [list(zip(ids, values)) for ids, values in zip(top.indices.tolist(), top.values.tolist())]
        seq.prompt_log_probs[start : start + count] = list(zip(chosen, alternatives))

    def _sample_and_finish(self, sampling: list[ScheduledChunk], logits: torch.Tensor) -> list[RequestOutput]:
        """One token for each sequence; a request whose own settings or processing fail ends alone."""
        seqs = [item.seq for item in sampling]
        params = [s.params for s in seqs]
        logits = logits.float()
        failed: dict[int, Exception] = {}
        if any(p.bad_words for p in params):
            for row in apply_bad_words(logits, [s.token_ids for s in seqs], [p.bad_words for p in params]):
                failed[row] = InvalidRequestError(
                    f"bad_words ban every token of the vocabulary after {seqs[row].num_output_tokens} "
                    "generated tokens: ban fewer words")
        apply_penalties(logits, [s.token_ids for s in seqs], [s.num_prompt_tokens for s in seqs], params)
        # min_tokens: the end id cannot be drawn until the answer is long enough (unless a grammar
        # decides: a complete grammar allows nothing but the end id).
        for row, seq in enumerate(seqs):
            if seq.num_output_tokens < seq.params.min_tokens and seq.params.end_id is not None and seq.grammar is None:
                logits[row, seq.params.end_id] = float("-inf")
        apply_grammar_masks(logits, [s.grammar for s in seqs])
        picked = sample(logits, params, seeded_uniforms([s.seed for s in seqs], [s.num_output_tokens for s in seqs]))
        top_ids, top_log_probs = picked.top_ids.tolist(), picked.top_log_probs.tolist()
        outputs = []
        for row, (seq, token, log_prob) in enumerate(zip(seqs, picked.tokens.tolist(), picked.log_probs.tolist())):
            if row in failed:
                outputs.append(self._fail(seq, failed[row]))
                continue
            top = list(zip(top_ids[row], top_log_probs[row]))[: seq.params.top_logprobs]
            try:
                outputs.append(self._append(seq, token, log_prob, top))
            except Exception as error:  # noqa: BLE001 - this request fails, its batch goes on
                logger.exception("request %s failed after its step", seq.request_id)
                outputs.append(self._fail(seq, error))
        return outputs

    def _append(self, seq: Sequence, token: int, log_prob: float, top: list[tuple[int, float]]) -> RequestOutput:
        if seq.grammar is not None:
            seq.grammar.advance(token)
        seq.token_ids.append(token)
        seq.output_log_probs.append(log_prob)
        seq.output_top_log_probs.append(top)
        reason = self._finish_reason(seq, token)
        if reason is None and seq.request_type is not RequestType.CONTEXT_ONLY:
            return self._emit(seq, finished=False)
        return self._finish(seq, reason)

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.params
        if seq.grammar is not None and seq.grammar.terminated:
            return "stop"
        if seq.num_output_tokens < params.min_tokens:
            return None
        if not params.ignore_eos and params.end_id is not None and token == params.end_id:
            return "stop"
        output = seq.output_ids
        if any(output[-len(word):] == list(word) for word in params.stop_words):
            return "stop"
        if seq.num_output_tokens >= params.max_tokens:
            return "length"
        return None

    def _emit(self, seq: Sequence, finished: bool, reason: str | None = None) -> RequestOutput:
        new = seq.output_ids[seq.num_emitted :]
        new_log_probs = seq.output_log_probs[seq.num_emitted :] if seq.params.return_log_probs else []
        new_top = seq.output_top_log_probs[seq.num_emitted :] if seq.params.top_logprobs else []
        ends_itself = not seq.params.ignore_eos or seq.grammar is not None
        if reason == "stop" and new and ends_itself and new[-1] == seq.params.end_id:
            new, new_log_probs, new_top = new[:-1], new_log_probs[:-1], new_top[:-1]
        prompt_log_probs = seq.prompt_log_probs if seq.num_emitted == 0 else []
        seq.num_emitted = seq.num_output_tokens
        return RequestOutput(
            seq.request_id,
            new,
            new_log_probs,
            finished,
            reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            top_log_probs=new_top,
            prompt_log_probs=prompt_log_probs,
        )

    def _finish(self, seq: Sequence, reason: str | None) -> RequestOutput:
        self.scheduler.remove(seq)
        output = self._emit(seq, finished=True, reason=reason)
        if seq.request_type is RequestType.CONTEXT_ONLY and reason is None:
            seq.status = Status.KV_HELD
            output.kv_block_ids = list(seq.block_table)
            return output
        self._free_blocks(seq)
        seq.status = Status.FINISHED
        self._sequences.pop(seq.request_id, None)
        return output

    def _fail(self, seq: Sequence, error: Exception) -> RequestOutput:
        """End one request with `error` (its blocks freed); the loop hands the error to its client."""
        self.abort(seq.request_id)
        return RequestOutput(seq.request_id, [], [], True, "error", num_prompt_tokens=seq.num_prompt_tokens,
                             error=error)

    # ----------------------------------------------------------------- helpers
    def _free_blocks(self, seq: Sequence) -> None:
        """Free a sequence's blocks, or hold them aside while its pull may still write into them."""
        if seq.kv_pull is not None and not seq.kv_pull.done():
            self._pull_held.append((seq.kv_pull, list(seq.block_table)))
            seq.block_table.clear()
        elif seq.block_table:
            self.block_manager.free(seq.block_table)

    def _free_finished_pulls(self) -> None:
        held, self._pull_held = self._pull_held, []
        for pull, block_table in held:
            if pull.done():
                self.block_manager.free(block_table)
            else:
                self._pull_held.append((pull, block_table))

    def _admit(self, seq: Sequence) -> None:
        if seq.request_id in self._sequences:
            raise InvalidRequestError(f"request id {seq.request_id!r} is already in use")
        seq.params.validate(seq.num_prompt_tokens, self.max_model_len, self.vocab_size)
        needed = self.block_manager.blocks_for(seq.num_prompt_tokens + seq.params.max_tokens)
        if needed > self.block_manager.num_blocks:
            raise CapacityError(
                f"the request needs up to {needed} KV blocks and this instance has {self.block_manager.num_blocks}: "
                "lower max_tokens or the prompt length, or raise kv_cache_memory_bytes"
            )
        if seq.params.guided_decoding is not None:
            # On a generation instance the first token came from the context instance: the
            # grammar is rebuilt here and advanced over it.
            seq.grammar = self.grammars.matcher(seq.params.guided_decoding, seq.params.end_id)
            for token in seq.output_ids:
                seq.grammar.advance(token)
        if not seq.params.greedy:
            seq.seed = seq.params.seed if seq.params.seed is not None else int.from_bytes(os.urandom(8), "little")
        self._sequences[seq.request_id] = seq
        self.scheduler.add(seq)

    def _with_defaults(self, params: SamplingParams) -> SamplingParams:
        if params.end_id is None and self.model.eos_token_ids:
            return dataclasses.replace(params, end_id=self.model.eos_token_ids[0])
        return params
