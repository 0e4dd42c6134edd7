"""Decoder-only transformer of the Llama family, Mistral, Qwen2/2.5 and Qwen3.

One ``CausalLM`` driven by config flags:
- Llama / SmolLM / Mistral: optional ``attention_bias`` (q, k, v, o) and ``mlp_bias``;
- Qwen2: bias on q, k, v (not o);
- Qwen3: per-head RMSNorm on q and k before RoPE, ``attention_bias`` flag, explicit head_dim.

Parameter names equal the Hugging Face checkpoint names, so weights load by name. The model
works on a ragged batch (``ForwardBatch``): all new tokens of all requests are one flat
sequence ``[T, hidden]``; attention (and the KV pool) is delegated to ``batch.attn_backend``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from backend.forward_batch import ForwardBatch, ForwardMode
from backend.fused_ops import add_rms_norm_, rms_norm_reference, rope, silu_and_mul
from backend.gemv import gemv, gemv_applies
from backend.quantization import linear  # F.linear, or a quantized weight's kernel
from backend.skinny_gemm import skinny_gemm, skinny_gemm_applies

rms_norm = rms_norm_reference

logger = logging.getLogger(__name__)


class RMSNorm(nn.Module):
    """RMSNorm as in HF Llama: normalize in float32, cast back, then scale by ``weight``."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_tables(
    config: PretrainedConfig, head_dim: int, max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 tables ``cos`` and ``sin_signed`` of shape ``[max_len, head_dim]``.

    ``cos`` is HF's ``cat(freqs, freqs).cos() * attention_scaling``; ``sin_signed`` is the
    matching sin with its first half negated, so that RoPE in the rotate-half convention is
    ``x * cos + roll(x, head_dim / 2) * sin_signed``. Frequencies come from transformers'
    ``ROPE_INIT_FUNCTIONS`` (linear, llama3, yarn, dynamic, ...), computed exactly as
    transformers initialises them.
    """
    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", "default")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported by this model family")
    if rope_type == "longrope":
        raise ValueError("rope_type 'longrope' (sequence-length dependent) is not supported")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        inv_freq = 1.0 / (base**exponents)
        scaling = 1.0
    else:
        if rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"Unknown rope_type {rope_type!r}")
        # "dynamic" at init equals its value for any length up to max_position_embeddings,
        # which is as far as this model ever runs.
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    inv_freq = inv_freq.float()
    freqs = torch.arange(max_len, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos() * scaling
    sin = emb.sin() * scaling
    half = head_dim // 2
    sin_signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
    return cos, sin_signed


class Rotary:
    """RoPE for one forward pass: the model's tables and the batch's positions, applied by
    ``fused_ops.rope`` (Triton on CUDA, native C on the CPU)."""

    def __init__(self, cos: torch.Tensor, sin_signed: torch.Tensor, positions: torch.Tensor):
        self.positions, self.cos, self.sin_signed = positions, cos, sin_signed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` ``[T, heads, D]`` (last dim contiguous) into a new contiguous tensor."""
        return rope(x, self.positions, self.cos, self.sin_signed)


class Attention(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads: int = config.num_attention_heads
        self.num_kv_heads: int = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim: int = _head_dim(config)
        hidden = config.hidden_size
        model_type = config.model_type
        bias = bool(getattr(config, "attention_bias", False))
        qkv_bias = bias or model_type == "qwen2"
        o_bias = bias and model_type != "qwen2"
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=o_bias)
        self.qk_norm = model_type == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qkv_weight: torch.Tensor | None = None  # set by fuse()
        self.qkv_bias: torch.Tensor | None = None

    def fuse(self) -> None:
        """Concatenate the q, k and v projections into one matrix (one GEMM per layer);
        nothing when already fused."""
        if self.qkv_weight is None:
            projs = (self.q_proj, self.k_proj, self.v_proj)
            self.qkv_weight, self.qkv_bias = _fuse_linears(projs)

    def _project_qkv(
        self, x: torch.Tensor, rotary: Rotary, prefill: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``[T, H, D]``, k and v ``[T, Hkv, D]``, RoPE applied to q and k (unfused
        projections, or q/k norms between the projection and RoPE)."""
        t, heads, kv_heads = x.shape[0], self.num_heads, self.num_kv_heads
        if self.qkv_weight is None:
            q, k, v = (
                F.linear(x, p.weight, p.bias) for p in (self.q_proj, self.k_proj, self.v_proj)
            )
        else:
            qkv = linear(x, self.qkv_weight, self.qkv_bias, prefill)
            q, k, v = qkv.view(t, heads + 2 * kv_heads, -1).split([heads, kv_heads, kv_heads], 1)
        q, k, v = q.view(t, heads, -1), k.view(t, kv_heads, -1), v.view(t, kv_heads, -1)
        if self.qk_norm:
            q = rms_norm(q, self.q_norm.weight, self.q_norm.eps)
            k = rms_norm(k, self.k_norm.weight, self.k_norm.eps)
        return rotary(q), rotary(k), v

    def forward(self, x: torch.Tensor, rotary: Rotary, batch: ForwardBatch) -> torch.Tensor:
        t = x.shape[0]
        prefill = batch.mode == ForwardMode.EXTEND
        if self.qkv_weight is not None and not self.qk_norm:  # RoPE left to the backend
            qkv = linear(x, self.qkv_weight, self.qkv_bias, prefill)
            qkv = qkv.view(t, self.num_heads + 2 * self.num_kv_heads, -1)
            out = batch.attn_backend.forward_qkv(qkv, self.num_heads, rotary, self.layer_id, batch)
        else:
            q, k, v = self._project_qkv(x, rotary, prefill)
            out = batch.attn_backend.forward(q, k, v, self.layer_id, batch)
        return linear(out.reshape(t, -1), self.o_proj.weight, self.o_proj.bias, prefill)


class MLP(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        hidden, inter = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)
        self.act_fn = _activation(getattr(config, "hidden_act", "silu"))
        self.gate_up_weight: torch.Tensor | None = None  # set by fuse()
        self.gate_up_bias: torch.Tensor | None = None

    def fuse(self) -> None:
        """Concatenate the gate and up projections into one matrix (one GEMM); nothing when
        already fused."""
        if self.gate_up_weight is None:
            projs = (self.gate_proj, self.up_proj)
            self.gate_up_weight, self.gate_up_bias = _fuse_linears(projs)

    def forward(self, x: torch.Tensor, prefill: bool = False) -> torch.Tensor:
        if self.gate_up_weight is None:
            gate = self.act_fn(F.linear(x, self.gate_proj.weight, self.gate_proj.bias))
            gate = gate.mul_(F.linear(x, self.up_proj.weight, self.up_proj.bias))
        elif self.act_fn is F.silu and gemv_applies(x, self.gate_up_weight, self.gate_up_bias):
            gate = gemv(x, self.gate_up_weight, self.gate_up_bias, silu_and_mul=True)
        elif self.act_fn is F.silu and skinny_gemm_applies(
            x, self.gate_up_weight, self.gate_up_bias
        ):
            gate = skinny_gemm(x, self.gate_up_weight, self.gate_up_bias, silu_and_mul=True)
        elif self.act_fn is F.silu:
            gate = silu_and_mul(linear(x, self.gate_up_weight, self.gate_up_bias, prefill))
        else:
            gate, up = linear(x, self.gate_up_weight, self.gate_up_bias, prefill).chunk(2, -1)
            gate = self.act_fn(gate).mul_(up)
        return linear(gate, self.down_proj.weight, self.down_proj.bias, prefill)


class DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_id: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_id)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,
        x: torch.Tensor,
        rotary: Rotary,
        batch: ForwardBatch,
        next_norm: RMSNorm,
    ) -> torch.Tensor:
        """One pre-norm block. ``x`` is ``hidden`` after this layer's input norm; ``hidden``
        (the residual stream) is updated in place; returns the updated ``hidden`` after
        ``next_norm`` (the next layer's input norm, or the final norm), so that every
        residual add is fused with the norm that follows it."""
        attn = self.self_attn.forward(x, rotary, batch)
        norm = self.post_attention_layernorm
        x = add_rms_norm_(attn, hidden, norm.weight, norm.eps)
        mlp = self.mlp.forward(x, batch.mode == ForwardMode.EXTEND)
        return add_rms_norm_(mlp, hidden, next_norm.weight, next_norm.eps)


class Model(nn.Module):
    """Embeddings, decoder layers and final norm (HF's ``model.`` prefix)."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    """Llama / Mistral / Qwen2 / Qwen3 causal LM over a ragged ``ForwardBatch``.

    Attributes the engine reads: ``num_layers``, ``num_kv_heads``, ``head_dim``,
    ``vocab_size``, ``max_context_len`` (``max_position_embeddings``, capped at the sliding
    window when one is configured, so that sliding never takes effect).
    """

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight
        self.num_layers: int = config.num_hidden_layers
        self.num_heads: int = config.num_attention_heads
        self.num_kv_heads: int = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim: int = _head_dim(config)
        self.vocab_size: int = config.vocab_size
        self.max_context_len: int = _max_context_len(config)
        # The tables are real data even when the parameters are built on the meta device.
        with torch.device("cpu"):
            cos, sin_signed = rope_tables(config, self.head_dim, self.max_context_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin_signed, persistent=False)

    def fuse_projections(self) -> None:
        """Fuse q/k/v and gate/up into one GEMM each (GPU: fewer, larger matrix products).

        Outputs equal the unfused model's up to the GEMM's summation order."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    @torch.no_grad()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Hidden states ``[T, hidden]`` after the final norm, one row per new token.

        Calls ``batch.attn_backend.init_forward_metadata(batch)`` when the caller has not.
        """
        if batch.attn_metadata is None:
            batch.attn_backend.init_forward_metadata(batch)
        rotary = Rotary(self.rope_cos, self.rope_sin, batch.positions)
        hidden = F.embedding(batch.input_ids, self.model.embed_tokens.weight)
        layers = self.model.layers
        norm = layers[0].input_layernorm
        x = add_rms_norm_(None, hidden, norm.weight, norm.eps)
        for i, layer in enumerate(layers):
            next_norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.model.norm
            x = layer.forward(hidden, x, rotary, batch, next_norm)
        return x

    @torch.no_grad()
    def compute_logits(self, hidden: torch.Tensor, prefill: bool = False) -> torch.Tensor:
        """Float32 logits ``[N, vocab]`` for the rows of ``hidden`` the caller selected
        (``prefill``: rows of a prefill pass, see ``quantization.linear``)."""
        return linear(hidden, self.lm_head.weight, None, prefill).float()


def _fuse_linears(projs: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weights (and biases, if any) of ``projs`` concatenated along the output dim; each
    projection's parameters become views of the result, so no memory is added."""
    fused: list[torch.Tensor | None] = []
    for name in ("weight", "bias"):
        parts = [getattr(proj, name) for proj in projs]
        if parts[0] is None:
            fused.append(None)
            continue
        whole, start = torch.cat(parts), 0
        for proj, part in zip(projs, parts):
            view = whole[start : start + part.shape[0]]
            setattr(proj, name, nn.Parameter(view, requires_grad=False))
            start += part.shape[0]
        fused.append(whole)
    weight, bias = fused
    assert weight is not None
    return weight, bias


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The MLP activation; common ones without importing ``transformers.activations`` (slow)."""
    if name in ("silu", "swish"):
        return F.silu
    if name == "gelu":
        return F.gelu
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return partial(F.gelu, approximate="tanh")
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def _head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _max_context_len(config: PretrainedConfig) -> int:
    max_len = int(getattr(config, "max_position_embeddings", 2048))
    window = getattr(config, "sliding_window", None)
    if config.model_type in ("qwen2", "qwen3"):
        layer_types = getattr(config, "layer_types", None) or []
        if "sliding_attention" not in layer_types:
            window = None
    if window is not None and window < max_len:
        logger.info(
            "Capping the context at the sliding window (%d < %d tokens): attention over the "
            "full context is then exact",
            window,
            max_len,
        )
        max_len = int(window)
    return max_len
