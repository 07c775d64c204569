"""A Llama-family decoder that reads and writes a paged KV pool.

transformers loads the checkpoint (so any Llama/Mistral/Qwen2/Qwen3 directory works, and its
rotary tables are the reference's); the forward pass is ours: fused QKV and gate/up projections,
one flat batch of tokens from many sequences per step, and attention over KV gathered from blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from python_backend_utils.context_window import default_window, supported_window
from python_backend_utils.engine import cpu_kernels
from python_backend_utils.engine.config import ConfigError, EngineConfig
from python_backend_utils.engine.kv_pool import KVPool, ModelShape
from python_backend_utils.engine.linear import DenseLinear, Int8Linear, make_linear
from python_backend_utils.engine.sharding import Shard, model_shards
from python_backend_utils.errors import InvalidRequestError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class StageLink(Protocol):
    """A pipeline stage's hidden states: in from the previous stage, out to the next (engine/parallel.py)."""

    def receive(self, num_tokens: int) -> torch.Tensor: ...

    def send(self, hidden: torch.Tensor) -> None: ...


class UnsupportedModelError(ValueError):
    """The checkpoint is not a Llama-family decoder this runner implements."""


@dataclass(frozen=True)
class Chunk:
    """`length` tokens of one sequence, starting at position `start`, processed in this step."""

    token_ids: list[int]
    start: int
    block_table: list[int]
    sample: bool  # the chunk ends at the sequence's last token: its logits pick the next token
    all_logits: bool = False  # every token's logits, not only the last's (prompt log-probabilities)


@dataclass
class _Layer:
    input_norm: torch.Tensor
    qkv: DenseLinear | Int8Linear
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o_proj: DenseLinear | Int8Linear
    post_norm: torch.Tensor
    gate_up: DenseLinear | Int8Linear
    down: DenseLinear | Int8Linear


class PagedCausalLM:
    """The whole model, or one parallel rank's part of it (`shard`, engine/sharding.py). A tensor-parallel
    rank holds some heads and MLP channels: `all_reduce` sums the ranks' attention and MLP outputs. A
    pipeline stage holds some layers: `stages` brings its input from the previous stage and takes its
    output to the next (the leader, stage 0, gets the last stage's back for the logits)."""

    def __init__(self, config: EngineConfig, model_dir: str, shard: Shard | None = None) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        hf_config = AutoConfig.from_pretrained(model_dir)
        if hf_config.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"{model_dir} is a {hf_config.model_type!r} model; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype
        self.quantization = config.weight_quantization
        if self.quantization and self.device.type != "cpu":
            raise ConfigError(f"weight_quantization={self.quantization} is a CPU mode; on {self.device.type} "
                              "leave it empty")
        hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype)
        text_config = hf_model.config
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        self.shard = shard or model_shards(text_config.num_hidden_layers, text_config.num_attention_heads,
                                           text_config.num_key_value_heads, text_config.intermediate_size)[0]
        self.all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.stages: StageLink | None = None
        self.shape = ModelShape(
            num_layers=self.shard.layers[1] - self.shard.layers[0],
            num_heads=self.shard.heads[1] - self.shard.heads[0],
            num_kv_heads=self.shard.kv_heads[1] - self.shard.kv_heads[0],
            head_dim=head_dim,
            hidden_size=text_config.hidden_size,
            vocab_size=text_config.vocab_size,
            max_position_embeddings=text_config.max_position_embeddings,
        )
        self.eps = text_config.rms_norm_eps
        self.eos_token_ids = _eos_ids(hf_model.generation_config.eos_token_id or text_config.eos_token_id)
        self._load_weights(hf_model)
        # The fused decode step runs every layer in one call: no room for the ranks' all-reduces.
        self._decode_table = None if self.shard.splits_heads else self._fused_decode_table()
        self.max_model_len = self._max_model_len(config.max_model_len, text_config.to_dict())
        self.cos, self.sin = self._rotary_tables(hf_model, self.max_model_len)
        del hf_model

    @staticmethod
    def _max_model_len(configured: int, model_config: dict) -> int:
        limit = supported_window(model_config)
        if configured:
            if configured > limit:
                raise InvalidRequestError(f"max_model_len={configured} exceeds what the model supports ({limit})")
            return configured
        return default_window(model_config)

    def _load_weights(self, hf_model) -> None:
        def take(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.detach().to(self.device, self.dtype).contiguous()

        def linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> DenseLinear | Int8Linear:
            return make_linear(take(weight), take(bias), self.quantization)

        head_dim = self.shape.head_dim
        heads = slice(self.shard.heads[0] * head_dim, self.shard.heads[1] * head_dim)
        kv_heads = slice(self.shard.kv_heads[0] * head_dim, self.shard.kv_heads[1] * head_dim)
        channels = slice(*self.shard.intermediate)

        def rows(tensor: torch.Tensor | None, part: slice) -> torch.Tensor | None:
            return None if tensor is None else tensor[part]

        body = hf_model.model
        self.final_norm = take(body.norm.weight)
        self.lm_head = linear(hf_model.lm_head.weight)
        tied = body.embed_tokens.weight.data_ptr() == hf_model.lm_head.weight.data_ptr()
        # A tied LM head is the embedding: packed, it is looked up in its panels rather than kept twice.
        self.embed = None if tied and isinstance(self.lm_head, DenseLinear) else take(body.embed_tokens.weight)
        self.layers = []
        for layer in body.layers[slice(*self.shard.layers)]:
            attn, mlp = layer.self_attn, layer.mlp
            parts = ((attn.q_proj, heads), (attn.k_proj, kv_heads), (attn.v_proj, kv_heads))
            biases = [rows(p.bias, part) for p, part in parts]
            self.layers.append(
                _Layer(
                    input_norm=take(layer.input_layernorm.weight),
                    qkv=linear(torch.cat([p.weight[part] for p, part in parts]),
                               torch.cat(biases) if biases[0] is not None else None),
                    q_norm=take(attn.q_norm.weight) if hasattr(attn, "q_norm") else None,
                    k_norm=take(attn.k_norm.weight) if hasattr(attn, "k_norm") else None,
                    o_proj=linear(attn.o_proj.weight[:, heads]),
                    post_norm=take(layer.post_attention_layernorm.weight),
                    gate_up=linear(torch.cat([mlp.gate_proj.weight[channels], mlp.up_proj.weight[channels]])),
                    down=linear(mlp.down_proj.weight[:, channels]),
                )
            )

    def _fused_decode_table(self) -> torch.Tensor | None:
        """The layers as cpu_kernels.decode_layers reads them, when it applies: fp32 or bf16 on a CPU, every
        weight packed. The norms and biases it reads are fp32 (copies, for a bf16 model, kept alive here)."""
        linears = [m for layer in self.layers for m in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)]
        if self.dtype not in (torch.float32, torch.bfloat16) or not all(m.packed for m in linears) \
                or self.shape.head_dim % 16:
            return None

        def scale(linear: DenseLinear | Int8Linear) -> torch.Tensor | None:
            return linear.scale if isinstance(linear, Int8Linear) else None

        def fp32(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.float().contiguous()

        self._decode_norms = [{name: fp32(getattr(layer, name)) for name in ("input_norm", "post_norm", "q_norm",
                                                                              "k_norm")} for layer in self.layers]
        self._decode_weight_dtype = linears[0].weight.dtype
        return cpu_kernels.layer_table([
            {**norms, "qkv": layer.qkv.weight, "qkv_scale": scale(layer.qkv), "qkv_bias": layer.qkv.bias,
             "o": layer.o_proj.weight, "o_scale": scale(layer.o_proj), "gate_up": layer.gate_up.weight,
             "gate_up_scale": scale(layer.gate_up), "down": layer.down.weight, "down_scale": scale(layer.down)}
            for layer, norms in zip(self.layers, self._decode_norms)])

    def weight_bytes(self) -> int:
        """What one step reads of the matrices: every layer's and the LM head's."""
        linears = [self.lm_head] + [m for layer in self.layers for m in (layer.qkv, layer.o_proj, layer.gate_up,
                                                                         layer.down)]
        return sum(m.nbytes() for m in linears)

    def _rotary_tables(self, hf_model, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(length).unsqueeze(0)
        probe = torch.zeros(1, dtype=torch.float32)
        cos, sin = hf_model.model.rotary_emb(probe, positions)
        return cos[0].to(self.device, self.dtype), sin[0].to(self.device, self.dtype)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def forward(self, chunks: list[Chunk], pool: KVPool) -> torch.Tensor:
        """Run one step over the chunks; write their KV into `pool`; return logits of the sampling chunks'
        last tokens (of every token of an all_logits chunk), in chunk order."""
        shape = self.shape
        plan = _StepPlan(chunks, pool, self.device, shape.head_dim)
        if self.shard.layers[0] > 0:
            hidden = self.stages.receive(plan.num_tokens)
        else:
            hidden = (self.lm_head.weight_rows(plan.input_ids) if self.embed is None
                      else F.embedding(plan.input_ids, self.embed))
        if (self._decode_table is not None and plan.only_decode and plan.in_place
                and cpu_kernels.decode_layers_applies(plan.num_tokens)):
            # Decode only (one new token per sequence): every layer in one C call, same arithmetic (in
            # fp32 between the products for a bf16 model).
            state = hidden.float().contiguous()
            cpu_kernels.decode_layers(
                self._decode_table, self._decode_weight_dtype, state,
                self.cos[plan.positions].float().contiguous(), self.sin[plan.positions].float().contiguous(),
                plan.write_rows, pool.tensor, plan.decode_tables, plan.decode_lengths, shape.num_heads,
                shape.num_kv_heads, shape.head_dim, self.layers[0].gate_up.out_features // 2, pool.block_size,
                self.eps)
            return self._output(state.to(self.dtype), plan)
        cos, sin = self.cos[plan.positions].unsqueeze(1), self.sin[plan.positions].unsqueeze(1)
        q_width, kv_width = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
        for index, layer in enumerate(self.layers):
            residual = hidden
            qkv = layer.qkv(self._norm(hidden, layer.input_norm))
            v = qkv[:, q_width + kv_width :].view(-1, shape.num_kv_heads, shape.head_dim)
            if layer.q_norm is None:  # one rotation for the query and key heads together: half the small ops
                qk = self._rotate(qkv[:, : q_width + kv_width].view(-1, shape.num_heads + shape.num_kv_heads,
                                                                    shape.head_dim), cos, sin)
                q, k = qk[:, : shape.num_heads], qk[:, shape.num_heads :]
            else:
                q = self._norm(qkv[:, :q_width].view(-1, shape.num_heads, shape.head_dim), layer.q_norm)
                k = self._norm(qkv[:, q_width : q_width + kv_width].view(-1, shape.num_kv_heads, shape.head_dim),
                               layer.k_norm)
                q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            key_rows = plan.write_rows + 2 * index * pool.block_size
            value_rows = key_rows + pool.block_size
            pool.rows.index_copy_(0, key_rows, k.reshape(-1, kv_width).to(pool.rows.dtype))
            pool.rows.index_copy_(0, value_rows, v.reshape(-1, kv_width).to(pool.rows.dtype))
            attended = plan.attend(q, k, v, pool, index, self.dtype)
            hidden = residual + self._summed(layer.o_proj(attended))
            residual = hidden
            gate, up = layer.gate_up(self._norm(hidden, layer.post_norm)).chunk(2, dim=-1)
            hidden = residual + self._summed(layer.down(F.silu(gate) * up))
        return self._output(hidden, plan)

    def _output(self, hidden: torch.Tensor, plan: _StepPlan) -> torch.Tensor | None:
        """The logits, on the leader; on another rank nothing (a pipeline stage passes its hidden states on)."""
        if self.stages is not None:
            self.stages.send(hidden)
            if not self.shard.is_leader:
                return None
            hidden = self.stages.receive(plan.num_tokens)
        return self._logits(hidden, plan) if self.shard.is_leader else None

    def _summed(self, partial: torch.Tensor) -> torch.Tensor:
        """The whole layer's output from this rank's part of it (itself when the model is whole)."""
        return partial if self.all_reduce is None else self.all_reduce(partial)

    def _logits(self, hidden: torch.Tensor, plan: _StepPlan) -> torch.Tensor:
        last = self._norm(hidden[plan.sample_rows], self.final_norm)
        if last.shape[0] == 1 or not isinstance(self.lm_head, DenseLinear) or self.lm_head.packed:
            return self.lm_head(last)
        # With MKL, for several rows the vocabulary-major product is faster than F.linear's, which
        # packs the whole vocabulary-row matrix for a handful of rows (benchmarks/RESULTS.md).
        return torch.mm(self.lm_head.weight, last.t()).t()


class _StepPlan:
    """Indices for one step, computed once and shared by every layer.

    Single-token chunks (decode) attend together: on the CPU with the C kernel, reading their KV
    in the pool's blocks (`cpu_kernels`); otherwise over KV gathered into a padded batch. Longer
    chunks (prefill) attend one by one, over their own new K/V when nothing precedes them.
    """

    def __init__(self, chunks: list[Chunk], pool: KVPool, device: torch.device, head_dim: int) -> None:
        ids, positions, rows, sample_rows = [], [], [], []
        self.decode_tokens: list[int] = []
        self.in_place = cpu_kernels.decode_attention_applies(pool.tensor, head_dim)
        decode_contexts: list[torch.Tensor] = []
        decode_chunks: list[Chunk] = []
        self.prefills: list[tuple[int, int, int, torch.Tensor | None]] = []
        offset = 0
        for chunk in chunks:
            length = len(chunk.token_ids)
            chunk_positions = torch.arange(chunk.start, chunk.start + length)
            ids.extend(chunk.token_ids)
            positions.append(chunk_positions)
            rows.append(pool.base_rows(chunk.block_table, chunk_positions))
            if length == 1:
                self.decode_tokens.append(offset)
                decode_chunks.append(chunk)
                if not self.in_place:
                    decode_contexts.append(pool.base_rows(chunk.block_table, torch.arange(chunk.start + 1)))
            else:
                context_rows = None
                if chunk.start > 0:
                    context_rows = pool.base_rows(chunk.block_table, torch.arange(chunk.start + length))
                self.prefills.append((offset, length, chunk.start, context_rows))
            if chunk.all_logits:
                sample_rows.extend(range(offset, offset + length))
            elif chunk.sample:
                sample_rows.append(offset + length - 1)
            offset += length
        self.input_ids = torch.tensor(ids, dtype=torch.long, device=device)
        self.positions = torch.cat(positions).to(device)
        self.write_rows = torch.cat(rows).to(device)
        self.sample_rows = torch.tensor(sample_rows, dtype=torch.long, device=device)
        self.num_tokens = offset
        self.only_decode = len(self.decode_tokens) == offset  # then token i is decode token i
        if decode_chunks:
            self.decode_index = torch.tensor(self.decode_tokens, dtype=torch.long, device=device)
        if decode_chunks and self.in_place:
            width = max(len(c.block_table) for c in decode_chunks)
            self.decode_tables = torch.tensor([c.block_table + [0] * (width - len(c.block_table))
                                               for c in decode_chunks], dtype=torch.int32)
            self.decode_lengths = torch.tensor([c.start + 1 for c in decode_chunks], dtype=torch.int32)
        elif decode_contexts:
            longest = max(len(c) for c in decode_contexts)
            padded = torch.zeros(len(decode_contexts), longest, dtype=torch.long)
            mask = torch.zeros(len(decode_contexts), 1, 1, longest, dtype=torch.bool)
            for row, context in enumerate(decode_contexts):
                padded[row, : len(context)] = context
                mask[row, 0, 0, : len(context)] = True
            self.decode_rows = padded.to(device)
            self.decode_mask = None if bool(mask.all()) else mask.to(device)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pool: KVPool, layer: int, dtype: torch.dtype
    ) -> torch.Tensor:
        num_heads, head_dim = q.shape[1], q.shape[2]
        kv_heads = k.shape[1]
        only_decode = self.only_decode
        out = None if only_decode and self.in_place else torch.empty(
            self.num_tokens, num_heads * head_dim, dtype=q.dtype, device=q.device)
        key_offset, value_offset = 2 * layer * pool.block_size, (2 * layer + 1) * pool.block_size
        if self.decode_tokens and self.in_place:
            result = cpu_kernels.decode_attention(q if only_decode else q[self.decode_index], pool.tensor,
                                                  self.decode_tables, self.decode_lengths, layer, kv_heads,
                                                  pool.block_size)
            result = result.view(len(self.decode_tokens), num_heads * head_dim).to(q.dtype)
            if only_decode:
                return result
            out[self.decode_index] = result
        elif self.decode_tokens:
            batch, longest = self.decode_rows.shape
            keys = pool.rows[self.decode_rows + key_offset].to(dtype).view(batch, longest, kv_heads, head_dim)
            values = pool.rows[self.decode_rows + value_offset].to(dtype).view(batch, longest, kv_heads, head_dim)
            queries = q[self.decode_index].unsqueeze(2)  # [batch, heads, 1, dim]
            result = F.scaled_dot_product_attention(
                queries, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=self.decode_mask, enable_gqa=True
            )
            out[self.decode_index] = result.reshape(batch, num_heads * head_dim)
        for offset, length, start, context_rows in self.prefills:
            queries = q[offset : offset + length].transpose(0, 1).unsqueeze(0)
            if context_rows is None:
                keys, values = k[offset : offset + length], v[offset : offset + length]
                mask, causal = None, True
            else:
                keys = pool.rows[context_rows + key_offset].to(dtype).view(-1, kv_heads, head_dim)
                values = pool.rows[context_rows + value_offset].to(dtype).view(-1, kv_heads, head_dim)
                query_positions = torch.arange(start, start + length, device=q.device).unsqueeze(1)
                mask = torch.arange(start + length, device=q.device).unsqueeze(0) <= query_positions
                causal = False
            result = F.scaled_dot_product_attention(
                queries,
                keys.transpose(0, 1).unsqueeze(0),
                values.transpose(0, 1).unsqueeze(0),
                attn_mask=mask,
                is_causal=causal,
                enable_gqa=True,
            )
            out[offset : offset + length] = result[0].transpose(0, 1).reshape(length, num_heads * head_dim)
        return out


def _eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)
