"""Triton GEMV for decode steps of a few rows, with the op before it fused into its loads.

A decode step at batch 1-8 reads every weight once per step; the products are bound by
memory bandwidth, and at small batches the element-wise kernels between them cost launches
as much as time. ``gemv(x, weight)`` computes ``x @ weight.T`` for ``x`` ``[M, K]`` with
``M <= MAX_ROWS``: one program owns ``BLOCK_N`` output columns and streams their weight rows
along ``K`` (16-byte loads, no split-K, so no reduction launch), multiplying in float32 and
rounding once. Two prologues fold the op that produced ``x`` into the loads:

- ``gemv_add_rms_norm(delta, residual, norm_weight, eps, weight)`` returns
  ``(RMSNorm(residual + delta) @ weight.T, residual + delta)``: every program recomputes
  the row's statistics (the row is a few KB, read from L2), program 0 writes the new
  residual to a fresh tensor (others read the old one, so it cannot be in place);
- ``gemv_silu_and_mul(gate_up, weight)`` returns ``(silu(gate) * up) @ weight.T``.

Each prologue rounds where ``backend.fused_ops`` rounds (to the activations' dtype after the
add, after the normalization, after the weight; after SiLU and after the product), so the
fused products equal the unfused ones up to the order of the statistics' sum. CUDA only (the
engine falls back to cuBLAS and the separate kernels elsewhere); the kernels also run under
``TRITON_INTERPRET=1`` for the tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 8


def gemv_config(n: int, k: int, rows: int) -> tuple[int, int, int, int]:
    """``(BLOCK_N, BLOCK_K, num_warps, num_stages)`` for an ``[n, k]`` weight at ``rows``."""
    block_k = 512 if rows <= 2 else 256
    block_n = 4 if n <= 8192 else 8
    return block_n, min(block_k, triton.next_power_of_2(k)), 4, 2


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """``x @ weight.T + bias`` for ``x`` ``[M, K]`` (``M <= MAX_ROWS``), ``weight`` ``[N, K]``,
    both with a contiguous last dim; the result ``[M, N]`` is in ``x``'s dtype."""
    return _launch(0, x, weight, bias, config=config)


def gemv_add_rms_norm(
    delta: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: tuple[int, int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(RMSNorm(residual + delta) @ weight.T + bias, residual + delta)`` (module doc);
    ``delta`` and ``residual`` ``[M, K]``; the new residual is a new tensor."""
    new_residual = torch.empty_like(residual)
    out = _launch(1, delta, weight, bias, residual, new_residual, norm_weight, eps, config=config)
    return out, new_residual


def gemv_silu_and_mul(
    gate_up: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """``(silu(gate) * up) @ weight.T + bias`` for ``gate_up`` ``[M, 2K]`` = ``cat(gate, up)``."""
    return _launch(2, gate_up, weight, bias, config=config)


def _launch(
    prologue: int,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None = None,
    new_residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    rows = x.shape[0]
    n, k = weight.shape
    if rows > MAX_ROWS:
        raise ValueError(f"gemv takes at most {MAX_ROWS} rows, got {rows}")
    width = 2 * k if prologue == 2 else k
    if x.shape[1] != width:
        raise ValueError(f"x has {x.shape[1]} columns, the weight needs {width}")
    for t in (x, weight, residual, new_residual):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"expected a contiguous last dimension, got strides {t.stride()}")
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    block_n, block_k, warps, stages = config or gemv_config(n, k, rows)
    res = residual if residual is not None else x
    new_res = new_residual if new_residual is not None else out
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x,
        weight,
        out,
        bias if bias is not None else out,
        res,
        new_res,
        norm_weight if norm_weight is not None else weight,
        rows,
        n,
        k,
        eps,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        res.stride(0),
        new_res.stride(0),
        PROLOGUE=prologue,
        HAS_BIAS=bias is not None,
        BLOCK_M=max(1, triton.next_power_of_2(rows)),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=warps,
        num_stages=stages,
    )
    return out


@triton.jit
def _gemv_kernel(
    X,
    W,
    Y,
    Bias,
    Residual,
    NewResidual,
    NormW,
    M,
    N,
    K,
    eps,
    stride_xm,
    stride_wn,
    stride_ym,
    stride_rm,
    stride_nm,
    PROLOGUE: tl.constexpr,  # 0: x as given; 1: RMSNorm(residual + x); 2: silu(x1) * x2
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program ``p``: columns ``p * BLOCK_N ...`` of ``Y`` for all ``M`` rows."""
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    dtype = Y.dtype.element_ty
    inv = tl.zeros([BLOCK_M], tl.float32)
    if PROLOGUE == 1:  # the row statistics of residual + delta; program 0 stores that sum
        squares = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            mask = mask_m[:, None] & (kk < K)[None, :]
            r = tl.load(Residual + offs_m[:, None] * stride_rm + kk[None, :], mask=mask, other=0.0)
            d = tl.load(X + offs_m[:, None] * stride_xm + kk[None, :], mask=mask, other=0.0)
            s = (r.to(tl.float32) + d.to(tl.float32)).to(dtype)
            if pid == 0:
                tl.store(NewResidual + offs_m[:, None] * stride_nm + kk[None, :], s, mask=mask)
            sf = s.to(tl.float32)
            squares += tl.sum(sf * sf, axis=1)
        inv = 1.0 / tl.sqrt(squares / K + eps)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        w = tl.load(
            W + offs_n[:, None].to(tl.int64) * stride_wn + kk[None, :],
            mask=mask_n[:, None] & mask_k[None, :],
            other=0.0,
        ).to(tl.float32)
        mask = mask_m[:, None] & mask_k[None, :]
        x_ptrs = X + offs_m[:, None] * stride_xm + kk[None, :]
        if PROLOGUE == 0:
            x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        elif PROLOGUE == 1:
            r = tl.load(Residual + offs_m[:, None] * stride_rm + kk[None, :], mask=mask, other=0.0)
            d = tl.load(x_ptrs, mask=mask, other=0.0)
            s = (r.to(tl.float32) + d.to(tl.float32)).to(dtype).to(tl.float32)
            normed = (s * inv[:, None]).to(dtype).to(tl.float32)
            nw = tl.load(NormW + kk, mask=mask_k, other=0.0).to(tl.float32)
            x = (nw[None, :] * normed).to(dtype).to(tl.float32)
        else:
            gate = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
            up = tl.load(x_ptrs + K, mask=mask, other=0.0).to(tl.float32)
            act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
            x = (act * up).to(dtype).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(dtype), mask=mask_m[:, None] & mask_n[None, :])
