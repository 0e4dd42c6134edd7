"""Whole decode steps of a CPU model in one native call (``backend/_cpu_decoder.h``).

The per-op path (``CausalLM.forward`` over ``backend/cpu_ops.py`` kernels) spends about a
third of a small model's decode step in Python between kernels. ``NativeDecoder`` runs the
same kernels, in the same order, in one call per step, so its logits equal the per-op path's.

It applies to CPU models whose decoder matrices and output projection are all packed
(``Engine(quantization=...)``) or all float32 (with fused q/k/v and gate/up), float32
embeddings and norms, SiLU MLPs, no q/k norm, and a float32 or bfloat16 KV pool;
`unsupported_reason` names what rules a model out. A float32 model's steps take it only
where its matrix kernel beats torch's GEMM (`takes`). The decoder holds the model's and the
pool's tensors: it is valid as long as they are not replaced.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from backend import _cpu_ops as _native
from backend import cpu_ops
from backend.kv_pool import KVPool
from backend.models.llama import CausalLM
from backend.quantization import Int4Weight, Int8Weight, float_gemv_applies

_KV_CODES = {torch.float32: 0, torch.bfloat16: 1}
_F32_MATRIX = 32  # QF32 in backend/_cpu_decoder.h


def unsupported_reason(model: CausalLM, pool: KVPool) -> str | None:
    """Why ``model`` cannot run through a NativeDecoder, or None when it can."""
    embed = model.model.embed_tokens.weight
    if embed.device.type != "cpu" or embed.dtype != torch.float32:
        return "the embeddings are not float32 on the CPU"
    if pool.k_buffers[0].dtype not in _KV_CODES:
        return f"the KV pool is {pool.k_buffers[0].dtype}"
    matrices = [model.lm_head.weight]
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.qk_norm:
            return "q/k norms are not supported"
        if mlp.act_fn is not F.silu:
            return "the MLP activation is not SiLU"
        matrices += [attn.qkv_weight, attn.o_proj.weight, mlp.gate_up_weight, mlp.down_proj.weight]
    if not (all(map(_packed, matrices)) or all(map(_float32, matrices))):
        return "the matrices are neither all packed nor all fused float32"
    return None


def _packed(weight: object) -> bool:
    return isinstance(weight, Int4Weight | Int8Weight)


def _float32(weight: object) -> bool:
    return (
        isinstance(weight, torch.Tensor)
        and weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and weight.is_contiguous()
    )


class NativeDecoder:
    """Decode steps of ``model`` (see the module docstring) over ``pool``."""

    def __init__(self, model: CausalLM, pool: KVPool) -> None:
        reason = unsupported_reason(model, pool)
        if reason is not None:
            raise ValueError(f"no native decoder for this model: {reason}")
        config = model.config
        self.vocab_size = model.vocab_size
        self._keep: list[torch.Tensor] = []  # every tensor the capsule points into
        cos, sin = model.rope_cos, model.rope_sin
        dims = (
            model.num_layers,
            config.hidden_size,
            model.num_heads,
            model.num_kv_heads,
            model.head_dim,
            config.intermediate_size,
            model.vocab_size,
            pool.k_buffers[0].shape[0],
            min(cos.shape[0], sin.shape[0]),
            cos.stride(0),
            float(config.rms_norm_eps),
            _KV_CODES[pool.k_buffers[0].dtype],
        )
        tensors = tuple(
            self._address(t)
            for t in (model.model.embed_tokens.weight, model.model.norm.weight, cos, sin)
        )
        layers = tuple(
            self._layer(layer, pool.k_buffers[i], pool.v_buffers[i])
            for i, layer in enumerate(model.model.layers)
        )
        head = model.lm_head
        self._decoder = _native.decoder_new(dims, tensors, self._matrix(head.weight, None), layers)
        self.float_matrices = _float32(head.weight)

    def takes(self, batch: int) -> bool:
        """Whether a decode step of ``batch`` requests should run here: always for packed
        matrices, where the float32 GEMV is the per-op path's too for float32 ones
        (``quantization.float_gemv_applies``: above, torch's GEMM is faster)."""
        return not self.float_matrices or float_gemv_applies(batch)

    def logits(
        self,
        input_ids: Sequence[int],
        positions: Sequence[int],
        out_cache_loc: torch.Tensor,
        slots: torch.Tensor,
        lens: torch.Tensor,
    ) -> torch.Tensor:
        """Float32 logits ``[B, vocab]`` of one decode step: request ``b`` feeds
        ``input_ids[b]`` at ``positions[b]``, writes its K/V to ``out_cache_loc[b]`` and
        attends over row ``b`` of ``slots`` ``[B, Lmax]`` up to ``lens[b]`` (int64,
        contiguous). Out-of-range values raise ``ValueError`` before anything is written."""
        batch = len(input_ids)
        ids = torch.tensor(input_ids, dtype=torch.int64)
        pos = torch.tensor(positions, dtype=torch.int64)
        for name, t in (("out_cache_loc", out_cache_loc), ("slots", slots), ("lens", lens)):
            if t.dtype != torch.int64 or not t.is_contiguous() or t.shape[0] != batch:
                raise ValueError(f"{name} must be a contiguous int64 tensor, one row per request")
        logits = torch.empty((batch, self.vocab_size), dtype=torch.float32)
        _native.decode_step(
            self._decoder,
            ids.data_ptr(),
            pos.data_ptr(),
            out_cache_loc.data_ptr(),
            slots.data_ptr(),
            slots.shape[1],
            lens.data_ptr(),
            batch,
            logits.data_ptr(),
        )
        return logits

    def _address(self, t: torch.Tensor) -> int:
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError("the native decoder needs contiguous float32 embeddings and norms")
        self._keep.append(t)
        return t.data_ptr()

    def _matrix(self, weight: object, bias: torch.Tensor | None) -> tuple[int, ...]:
        if isinstance(weight, Int4Weight):
            kind, values, scales = cpu_ops.Q4, weight.packed, weight.dm
        elif isinstance(weight, Int8Weight):
            kind, values, scales = cpu_ops.Q8, weight.values, weight.scales
        elif _float32(weight):
            assert isinstance(weight, torch.Tensor)
            kind, values, scales = _F32_MATRIX, weight, weight  # scales unused
        else:
            raise ValueError(f"not a packed or float32 matrix: {type(weight).__name__}")
        self._keep += [values, scales]
        n, k = weight.shape
        bias_address = 0 if bias is None else self._address(bias)
        return (kind, values.data_ptr(), scales.data_ptr(), n, k, bias_address)

    def _layer(
        self, layer: torch.nn.Module, k_buf: torch.Tensor, v_buf: torch.Tensor
    ) -> tuple[object, ...]:
        attn, mlp = layer.self_attn, layer.mlp
        self._keep += [k_buf, v_buf]
        return (
            self._matrix(attn.qkv_weight, attn.qkv_bias),
            self._matrix(attn.o_proj.weight, attn.o_proj.bias),
            self._matrix(mlp.gate_up_weight, mlp.gate_up_bias),
            self._matrix(mlp.down_proj.weight, mlp.down_proj.bias),
            self._address(layer.input_layernorm.weight),
            self._address(layer.post_attention_layernorm.weight),
            k_buf.data_ptr(),
            v_buf.data_ptr(),
        )
