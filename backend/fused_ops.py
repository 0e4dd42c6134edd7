"""Fused element-wise kernels of the decoder layer (Triton on CUDA, torch elsewhere).

A decode step of a small batch is bound by kernel count as much as by bandwidth: in torch,
an RMSNorm in bf16 is six kernels, RoPE on q and k ten, SiLU-and-multiply two. Here each is
one Triton launch, computing in float32 and rounding once:

- `add_rms_norm_(delta, residual, weight, eps)`: ``residual += delta`` (in place, rounded to
  the residual's dtype as torch's ``add_`` rounds), then returns
  ``weight * (residual / rms(residual))``, the normalized value rounded to the dtype before
  the weight multiplies it (HF's order). ``delta=None`` only normalizes.
- `silu_and_mul(gate_up)`: ``silu(gate) * up`` for ``gate_up = cat(gate, up)`` on the last dim.
- `rope(x, positions, cos, sin_signed)`: rotate-half RoPE of ``x`` ``[T, heads, D]`` into a
  new contiguous tensor, with the model's ``[max_len, D]`` tables.

Each function takes the Triton path for CUDA tensors when Triton imports, the native C path
(``backend/cpu_ops.py``) for CPU tensors of float32 or bfloat16, and otherwise the torch
reference, which the tests compare both against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from backend import cpu_ops, pdl

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch reference only
    triton = None


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / sqrt(mean(x^2) + eps))`` over the last dim, statistics in float32."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_reference(
    x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor
) -> torch.Tensor:
    """``x * cos + roll(x, D / 2) * sin_signed`` with the tables' rows at ``positions``."""
    c = cos.index_select(0, positions).unsqueeze(1)
    s = sin_signed.index_select(0, positions).unsqueeze(1)
    return torch.addcmul(x * c, x.roll(x.shape[-1] // 2, -1), s)


def _use_triton(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda


def _use_native(*tensors: torch.Tensor | None) -> bool:
    return all(t is None or cpu_ops.supports(t) for t in tensors)


def add_rms_norm_(
    delta: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """``residual += delta`` in place (when given); return RMSNorm(residual) (module doc)."""
    if _use_triton(residual):
        return add_rms_norm_triton_(delta, residual, weight, eps)
    if _use_native(residual, weight, delta) and residual.is_contiguous():
        return cpu_ops.add_rms_norm_(delta, residual, weight, eps)
    if delta is not None:
        residual.add_(delta)
    return rms_norm_reference(residual, weight, eps)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` where ``gate_up`` is ``[T, 2 * I]`` = ``cat(gate, up)``."""
    if _use_triton(gate_up):
        return silu_and_mul_triton(gate_up)
    if _use_native(gate_up):
        return cpu_ops.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, -1)
    return F.silu(gate).mul_(up)


def rope(
    x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor
) -> torch.Tensor:
    """RoPE of ``x`` ``[T, heads, D]`` (last dim contiguous) as a new contiguous tensor."""
    if _use_triton(x):
        return rope_triton(x, positions, cos, sin_signed)
    if _use_native(x) and cos.dtype == sin_signed.dtype == torch.float32:
        return cpu_ops.rope(x, positions, cos, sin_signed)
    return rope_reference(x, positions, cos, sin_signed)


# ---- Triton launchers (any device Triton runs on: CUDA, or CPU under TRITON_INTERPRET=1) ----


def add_rms_norm_triton_(
    delta: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """`add_rms_norm_` in one launch; rows of ``residual`` and ``delta`` contiguous."""
    rows, hidden = residual.shape
    out = torch.empty_like(residual)
    if rows == 0:
        return out
    has_delta = delta is not None
    source = delta if has_delta else residual
    _add_rms_norm_kernel[(rows,)](
        source,
        residual,
        weight,
        out,
        source.stride(0),
        residual.stride(0),
        out.stride(0),
        hidden,
        eps,
        HAS_DELTA=has_delta,
        BLOCK=triton.next_power_of_2(hidden),
        num_warps=4 if hidden <= 4096 else 8,
        **pdl.options(residual.device),
    )
    return out


def silu_and_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu_and_mul` in one launch; ``gate_up``'s last dim contiguous."""
    rows, width = gate_up.shape
    inter = width // 2
    out = torch.empty((rows, inter), dtype=gate_up.dtype, device=gate_up.device)
    if rows == 0:
        return out
    block = 1024
    _silu_and_mul_kernel[(rows, triton.cdiv(inter, block))](
        gate_up,
        out,
        gate_up.stride(0),
        out.stride(0),
        inter,
        BLOCK=block,
        **pdl.options(gate_up.device),
    )
    return out


def rope_triton(
    x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor
) -> torch.Tensor:
    """`rope` in one launch (tables contiguous)."""
    tokens, heads, dim = x.shape
    out = torch.empty((tokens, heads, dim), dtype=x.dtype, device=x.device)
    if tokens == 0:
        return out
    _rope_kernel[(tokens,)](
        x,
        out,
        positions,
        cos,
        sin_signed,
        x.stride(0),
        x.stride(1),
        cos.stride(0),
        heads,
        HALF=dim // 2,
        BLOCK_H=triton.next_power_of_2(heads),
        BLOCK_D=triton.next_power_of_2(dim // 2),
    )
    return out


if triton is not None:

    @triton.jit
    def _add_rms_norm_kernel(
        Delta,
        Residual,
        W,
        Out,
        stride_d,
        stride_r,
        stride_o,
        N,
        eps,
        HAS_DELTA: tl.constexpr,
        BLOCK: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        """One program per row: optional residual update, then the normalized row."""
        pdl.pdl_enter(USE_PDL)
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < N
        r_ptrs = Residual + row * stride_r + offs
        x = tl.load(r_ptrs, mask=mask, other=0.0)
        if HAS_DELTA:
            d = tl.load(Delta + row * stride_d + offs, mask=mask, other=0.0)
            x = (x.to(tl.float32) + d.to(tl.float32)).to(Residual.dtype.element_ty)
            tl.store(r_ptrs, x, mask=mask)
        xf = x.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / N + eps)
        normed = (xf * inv).to(Out.dtype.element_ty).to(tl.float32)
        w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(Out + row * stride_o + offs, (w * normed).to(Out.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_and_mul_kernel(
        GateUp, Out, stride_g, stride_o, INTER, BLOCK: tl.constexpr, USE_PDL: tl.constexpr
    ):
        """Program ``(row, block)``: ``BLOCK`` columns of ``silu(gate) * up``."""
        pdl.pdl_enter(USE_PDL)
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < INTER
        gate = tl.load(GateUp + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(GateUp + row * stride_g + INTER + offs, mask=mask, other=0.0)
        act = (gate / (1.0 + tl.exp(-gate))).to(Out.dtype.element_ty).to(tl.float32)
        out = act * up.to(tl.float32)
        tl.store(Out + row * stride_o + offs, out.to(Out.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(
        X,
        Out,
        Positions,
        Cos,
        SinSigned,
        stride_xt,
        stride_xh,
        stride_c,
        HEADS,
        HALF: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """One program per token, all heads: ``out1 = x1 c - x2 s``, ``out2 = x2 c + x1 s``
        for the halves ``x1``, ``x2`` (``s`` is the table's positive second half)."""
        t = tl.program_id(0)
        pos = tl.load(Positions + t)
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_h[:, None] < HEADS) & (offs_d[None, :] < HALF)
        c = tl.load(Cos + pos * stride_c + offs_d, mask=offs_d < HALF, other=0.0)
        s = tl.load(SinSigned + pos * stride_c + HALF + offs_d, mask=offs_d < HALF, other=0.0)
        c = c.to(tl.float32)[None, :]
        s = s.to(tl.float32)[None, :]
        base = X + t * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :]
        x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(base + HALF, mask=mask, other=0.0).to(tl.float32)
        out = Out + t * HEADS * 2 * HALF + offs_h[:, None] * 2 * HALF + offs_d[None, :]
        dtype = Out.dtype.element_ty
        tl.store(out, (x1 * c - x2 * s).to(dtype), mask=mask)
        tl.store(out + HALF, (x2 * c + x1 * s).to(dtype), mask=mask)


def is_interpreted() -> bool:
    """Whether the kernels of this module were built for Triton's CPU interpreter."""
    return triton is not None and type(_rope_kernel).__name__ == "InterpretedFunction"
