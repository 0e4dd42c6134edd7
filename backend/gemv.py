"""Linear layers of one-row decode steps on CUDA: a Triton GEMV.

A decode step at batch 1 streams every weight once and does two flops per byte, so each
linear layer is a pure memory read. On an H100, cuBLAS reads the Llama-3-8B matrices at
2.11-2.87 TB/s at one row (the 4,096 x 4,096 o projection at 2.11); this kernel reads them at
2.72-3.18 TB/s (`benchmarks/bench_gemv.py`, graph-timed, L2-cold; batch-1 decode 164.5 ->
177.3 tok/s). One program computes one output: it streams its weight row in ``BLOCK_K``
chunks (contiguous loads, the next chunk loaded before the current one is multiplied),
multiplies them by the input row (read from L2) and sums in float32. With one program per
output feature (4,096 to 128,256 in an 8B model) every SM holds many programs and keeps
enough loads in flight to saturate HBM, with no split-K reduction pass.

The MLP's gate/up product fuses ``silu(gate) * up`` (``silu_and_mul=True``): a program
streams a gate row and its up row together and writes only the activation, one launch fewer
per layer.

More rows reread each weight row once per row (from L2) and lose to a GEMM that reuses
weight tiles across rows: at 2 rows the kernel measured 0.91-1.10x cuBLAS, at 4 rows
0.55-0.68x, so the engine takes it at one row only (``GEMV_MAX_ROWS``); `gemv` itself is
correct for any number of rows.
"""

from __future__ import annotations

import torch

from backend import pdl

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs never call into this module
    triton = None

GEMV_MAX_ROWS = 1
"""Most rows ``x`` may have for the engine to take `gemv` (see the module doc)."""

_BLOCK_K = 1024
_NUM_WARPS = 4


def gemv_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the engine takes `gemv` for ``F.linear(x, weight, bias)``: a CUDA ``x``
    ``[M, K]`` with ``M <= GEMV_MAX_ROWS`` of bfloat16, float16 or float32, a ``weight``
    ``[N, K]`` of the same dtype with contiguous rows, and a bias (if any) of that dtype."""
    return (
        triton is not None
        and x.is_cuda
        and x.dim() == 2
        and 0 < x.shape[0] <= GEMV_MAX_ROWS
        and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and weight.dtype == x.dtype
        and weight.dim() == 2
        and weight.stride(1) == 1
        and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous()))
    )


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    silu_and_mul: bool = False,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` in ``x.dtype``, accumulated in float32 and rounded once,
    for tensors as `gemv_applies` describes but any number of rows.

    With ``silu_and_mul``, ``weight`` is ``cat(gate, up)`` (``[2 I, K]``) and the result is
    ``fused_ops.silu_and_mul`` of that product, ``[M, I]``, bit for bit: one program computes
    a gate and its up feature together, so the ``[M, 2 I]`` product is never written."""
    rows, in_features = x.shape
    out_features = weight.shape[0]
    if weight.shape[1] != in_features:
        raise ValueError(f"gemv: x has {in_features} features, weight takes {weight.shape[1]}")
    if silu_and_mul:
        if out_features % 2:
            raise ValueError(f"gemv: silu_and_mul needs cat(gate, up), got {out_features} rows")
        out_features //= 2
    if rows * out_features >= 2**31:
        raise ValueError(f"gemv: {rows} x {out_features} outputs exceed its int32 grid")
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    _gemv_kernel[(rows * out_features,)](
        x,
        weight,
        bias if bias is not None else weight,
        out,
        rows,
        in_features,
        out_features,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        SILU_AND_MUL=silu_and_mul,
        BLOCK_K=min(_BLOCK_K, triton.next_power_of_2(in_features)),
        num_warps=_NUM_WARPS,
        **pdl.options(x.device),
    )
    return out


if triton is not None:

    @triton.jit
    def _gemv_kernel(
        x_ptr,
        w_ptr,
        b_ptr,
        out_ptr,
        M,
        K,
        N,
        stride_xm,
        stride_wn,
        stride_om,
        HAS_BIAS: tl.constexpr,
        SILU_AND_MUL: tl.constexpr,
        BLOCK_K: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        """Program ``n * M + m``: ``out[m, n] = sum_k x[m, k] * w[n, k] (+ b[n])``; with
        ``SILU_AND_MUL``, ``out[m, n] = silu(gate) * up`` for gate that sum and up the same
        over row ``N + n`` (each rounded to the output dtype first, as in two kernels).

        The loop loads the next weight chunk before it multiplies the current one; the first
        chunk is loaded before `pdl.pdl_enter` (weights are constant during a step)."""
        pid = tl.program_id(0)
        m = pid % M
        n = pid // M
        w_row = w_ptr + n.to(tl.int64) * stride_wn
        up_row = w_row + N * stride_wn
        x_row = x_ptr + m.to(tl.int64) * stride_xm
        cols = tl.arange(0, BLOCK_K)
        w = tl.load(w_row + cols, mask=cols < K, other=0.0)
        w_up = w
        if SILU_AND_MUL:
            w_up = tl.load(up_row + cols, mask=cols < K, other=0.0)
        pdl.pdl_enter(USE_PDL)
        acc = tl.zeros([BLOCK_K], tl.float32)
        acc_up = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
            acc += w.to(tl.float32) * x
            if SILU_AND_MUL:
                acc_up += w_up.to(tl.float32) * x
            following = k0 + BLOCK_K + cols  # all masked (no traffic) after the last chunk
            w = tl.load(w_row + following, mask=following < K, other=0.0)
            if SILU_AND_MUL:
                w_up = tl.load(up_row + following, mask=following < K, other=0.0)
        out = tl.sum(acc, 0)
        if HAS_BIAS:
            out += tl.load(b_ptr + n).to(tl.float32)
        if SILU_AND_MUL:
            up = tl.sum(acc_up, 0)
            if HAS_BIAS:
                up += tl.load(b_ptr + N + n).to(tl.float32)
            dtype = out_ptr.dtype.element_ty
            gate = out.to(dtype).to(tl.float32)
            act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
            out = act * up.to(dtype).to(tl.float32)
        tl.store(out_ptr + m.to(tl.int64) * stride_om + n, out.to(out_ptr.dtype.element_ty))
