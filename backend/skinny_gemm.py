"""Linear layers of small decode batches on CUDA: a weight-streaming Triton GEMM.

At 2-64 rows a decode step's products still read every weight once and do few flops per
byte (Llama-3-8B at 64 rows: ~1.2 ms of matmul against ~5 ms of weight reads per step), so
each is a memory read that should run at copy bandwidth. cuBLAS reaches 71-94% of it on an
H100 at 16-64 rows, and takes no part in programmatic dependent launch (``backend/pdl.py``):
each of a step's 129 cuBLAS products (4 per layer, the lm_head) waits for its predecessor to
drain before its programs start loading weights.

This kernel computes ``out^T = W x^T`` ("swap AB"): a program owns ``BLOCK_N`` (64 or 128)
weight rows -- a multiple of the tensor cores' 64-row side -- against all of ``x``'s rows
padded to ``BLOCK_M`` (16-128), and streams its weight rows in ``BLOCK_K`` chunks through a
multi-stage pipeline. Its first chunk is loaded before `pdl.pdl_enter` (weights are constant
during a step), so it overlaps the predecessor's tail. A long K over too few tiles to fill
the GPU is split (`default_split_k`): each of ``split_k`` programs of a tile writes a float32
partial, and the last to finish (an atomic counter per tile, reset by that program for the
next launch) sums the partials in split order, so results are deterministic. The counters
are one array per device: split launches must not run concurrently on two streams (the
engine runs its forward passes on one). Like the GEMV it can fuse the MLP's
``silu(gate) * up`` (``silu_and_mul=True``).

Measured on an H100 (``benchmarks/tune_skinny_gemm.py``, graph-timed, L2-cold): a decode
step's products at 16 rows 5.50 ms against cuBLAS's 5.69 (weights at copy bandwidth: 5.04),
the lm_head at 3.01 TB/s against 2.79; at 64 rows 5.79 against 5.86, but the two small
matrices (qkv, o: 50 and 34 MB) 3-4% slower than cuBLAS, and at 128 rows all slower: every
program rereads ``x`` from L2, as many bytes as its weights at 64 rows and twice as many at
128. So the engine takes it up to 64 rows for matrices of 64 MiB or more and up to 32 rows
for the others (`skinny_gemm_applies`). In the engine the dependent launches count for more
than the kernel times: Llama-3-8B 64 x (512 in, 128 out) decode 7,796 / 7,836 tok/s with
cuBLAS against 8,331 / 8,243 with this kernel (``benchmarks/bench_gpu.py``, interleaved runs
with ``SGL_DSL_SKINNY_GEMM=0`` / ``1``); the 256-sequence workload 8,235 / 8,224 against
8,339 / 8,311 end to end. Taking it for every product up to 64 rows measured the same as
this rule (8,244 and 8,313); up to 128 rows lost 2% on the 256-sequence workload.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from backend import pdl

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs never call into this module
    triton = None

SKINNY_MIN_ROWS = 2
SKINNY_MAX_ROWS = 64
"""Rows ``x`` may have for the engine to take `skinny_gemm` (`skinny_gemm_applies`)."""
SKINNY_SMALL_MATRIX_MAX_ROWS = 32
"""Rows up to which the engine takes it for matrices under ``SKINNY_LARGE_MATRIX_BYTES``."""
SKINNY_LARGE_MATRIX_BYTES = 64 << 20
LAUNCH_MAX_ROWS = 128
"""Rows one launch takes (``BLOCK_M`` up to 128); `skinny_gemm` slices larger inputs."""

_SHARED_BYTES = 160 * 1024
"""Shared memory the default configurations' pipeline stages may take (H100: 227 KB)."""
_MAX_TILES = 1 << 16
"""Size of each device's tile counter array: the most tiles of a split matrix."""


@dataclass(frozen=True)
class SkinnyConfig:
    """A launch configuration: ``block_m`` padded rows (a power of two >= 16), ``block_n``
    weight rows per program (64 or 128: the tensor cores' side), ``block_k`` features per
    pipeline stage, ``stages`` stages, ``warps`` warps, and ``split_k`` programs per tile
    along K (None: `default_split_k`)."""

    block_m: int
    block_n: int = 64
    block_k: int = 128
    stages: int = 4
    warps: int = 4
    split_k: int | None = None


def default_config(rows: int, silu_and_mul: bool = False) -> SkinnyConfig:
    """The configuration the engine launches for ``rows`` rows (``silu_and_mul``: the fused
    gate/up product, whose stages hold two weight tiles)."""
    block_m = max(16, triton.next_power_of_2(rows))
    block_n, block_k = 64, 128
    stage_bytes = ((2 if silu_and_mul else 1) * block_n + block_m) * block_k * 2
    stages = max(2, min(6, _SHARED_BYTES // stage_bytes))
    return SkinnyConfig(block_m, block_n, block_k, stages)


def skinny_gemm_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the engine takes `skinny_gemm` for ``F.linear(x, weight, bias)``: a CUDA ``x``
    ``[M, K]`` of bfloat16 or float16, a ``weight`` ``[N, K]`` of the same dtype with
    contiguous rows, a bias (if any) of that dtype, and ``SKINNY_MIN_ROWS <= M <=
    SKINNY_MAX_ROWS`` -- at most ``SKINNY_SMALL_MATRIX_MAX_ROWS`` for a weight under
    ``SKINNY_LARGE_MATRIX_BYTES``: there cuBLAS was faster at 64 rows on an H100 (see the
    module doc). `SGL_DSL_SKINNY_GEMM=0` in the environment turns it off (cuBLAS then)."""
    return (
        triton is not None
        and _enabled()
        and x.is_cuda
        and x.dim() == 2
        and x.dtype in (torch.bfloat16, torch.float16)
        and isinstance(weight, torch.Tensor)
        and weight.dtype == x.dtype
        and weight.dim() == 2
        and weight.stride(1) == 1
        and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous()))
        and SKINNY_MIN_ROWS <= x.shape[0] <= _max_rows(weight)
    )


def _max_rows(weight: torch.Tensor) -> int:
    large = weight.numel() * weight.element_size() >= SKINNY_LARGE_MATRIX_BYTES
    return SKINNY_MAX_ROWS if large else SKINNY_SMALL_MATRIX_MAX_ROWS


def skinny_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    silu_and_mul: bool = False,
    config: SkinnyConfig | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` in ``x.dtype``, accumulated in float32 and rounded once,
    for any number of rows (``LAUNCH_MAX_ROWS`` at most per launch; more are done in slices).

    With ``silu_and_mul``, ``weight`` is ``cat(gate, up)`` (``[2 I, K]``) and the result is
    ``silu(gate) * up`` (``[M, I]``), each product rounded to ``x.dtype`` first as in
    ``fused_ops.silu_and_mul``. ``config`` overrides `default_config` (for tuning); results
    depend on it only through float32 summation order."""
    rows, in_features = x.shape
    out_features = weight.shape[0]
    if x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != x.dtype:
        raise ValueError(f"skinny_gemm: takes bfloat16 or float16, got {x.dtype} x {weight.dtype}")
    if weight.stride(1) != 1 or (bias is not None and not bias.is_contiguous()):
        raise ValueError("skinny_gemm: the weight's rows and the bias must be contiguous")
    if weight.shape[1] != in_features:
        raise ValueError(
            f"skinny_gemm: x has {in_features} features, weight takes {weight.shape[1]}"
        )
    if silu_and_mul:
        if out_features % 2:
            raise ValueError(
                f"skinny_gemm: silu_and_mul needs cat(gate, up), got {out_features} rows"
            )
        out_features //= 2
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    for start in range(0, rows, LAUNCH_MAX_ROWS):
        stop = min(rows, start + LAUNCH_MAX_ROWS)
        _launch(x[start:stop], weight, bias, out[start:stop], silu_and_mul, config)
    return out


def default_split_k(tiles: int, in_features: int, sm_count: int) -> int:
    """Two programs per tile along K for a long K (8,192 features or more) whose tiles do not
    fill the GPU, else one: on an H100 at 16-64 rows, the 4,096 x 14,336 down projection
    (64 tiles) ran 2-4% faster split in two, and the 64-96 tiles of K = 4,096 products ran
    slower split (the partials' round trip and the shorter pipeline cost more)."""
    return 2 if in_features >= 8192 and tiles < sm_count else 1


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    silu_and_mul: bool,
    config: SkinnyConfig | None,
) -> None:
    rows, in_features = x.shape
    out_features = out.shape[1]
    config = config or default_config(rows, silu_and_mul)
    block_m, block_n, block_k = config.block_m, config.block_n, config.block_k
    if block_m < rows:
        raise ValueError(f"skinny_gemm: block_m {block_m} < {rows} rows")
    tiles = triton.cdiv(out_features, block_n)
    split_k = config.split_k
    if split_k is None:
        split_k = default_split_k(tiles, in_features, _sm_count(x.device))
    chunks = triton.cdiv(in_features, block_k)
    split_k = max(1, min(split_k, chunks))
    k_per_split = triton.cdiv(chunks, split_k) * block_k
    split_k = triton.cdiv(in_features, k_per_split)  # no empty split
    if split_k > 1:
        if tiles > _MAX_TILES:
            raise ValueError(f"skinny_gemm: {tiles} tiles exceed the counter array")
        parts = 2 if silu_and_mul else 1
        partials = torch.empty(
            split_k * tiles * parts * block_n * block_m, dtype=torch.float32, device=x.device
        )
        counters = _counters(x.device)
    else:
        partials = counters = out  # never read
    _skinny_gemm_kernel[(tiles, split_k)](
        x,
        weight,
        bias if bias is not None else weight,
        out,
        partials,
        counters,
        rows,
        out_features,
        in_features,
        k_per_split,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        SILU_AND_MUL=silu_and_mul,
        SPLIT=split_k > 1,
        DOT_DTYPE=_dot_dtype(x.dtype),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=config.warps,
        num_stages=config.stages,
        **pdl.options(x.device),
    )


@functools.cache
def _enabled() -> bool:
    return os.environ.get("SGL_DSL_SKINNY_GEMM", "1") != "0"


def _dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """The tiles' dtype in products: ``dtype``, or float32 for bfloat16 under Triton's CPU
    interpreter (which stores bfloat16 as raw ``uint16`` and multiplies it wrongly)."""
    if dtype == torch.float16:
        return tl.float16
    interpreted = type(_skinny_gemm_kernel).__name__ == "InterpretedFunction"
    return tl.float32 if interpreted else tl.bfloat16


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter: as a small GPU, so that small test matrices split
    return torch.cuda.get_device_properties(device).multi_processor_count


def _counters(device: torch.device) -> torch.Tensor:
    """Each device's per-tile arrival counters: zero between launches (the last program of a
    tile resets its own). Created on first use, which must not be inside a CUDA graph
    capture (the zero fill would only be recorded)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _counters_on(device)


@functools.cache
def _counters_on(device: torch.device) -> torch.Tensor:
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("skinny_gemm: run a split product once before capturing a graph")
    return torch.zeros(_MAX_TILES, dtype=torch.int32, device=device)


if triton is not None:

    @triton.jit
    def _skinny_gemm_kernel(
        x_ptr,
        w_ptr,
        b_ptr,
        out_ptr,
        partials_ptr,
        counters_ptr,
        M,
        N,
        K,
        K_PER_SPLIT,
        stride_xm,
        stride_wn,
        stride_om,
        HAS_BIAS: tl.constexpr,
        SILU_AND_MUL: tl.constexpr,
        SPLIT: tl.constexpr,
        DOT_DTYPE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        """Program ``(t, s)``: output features ``[t * BLOCK_N, (t + 1) * BLOCK_N)`` of every
        row over the K range ``[s * K_PER_SPLIT, (s + 1) * K_PER_SPLIT)``; with ``SPLIT``, the
        last program of tile ``t`` to arrive sums all splits' partials and writes the tile."""
        tile = tl.program_id(0)
        split = tl.program_id(1)
        feats = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = tl.arange(0, BLOCK_M)
        ks = tl.arange(0, BLOCK_K)
        k_lo = split * K_PER_SPLIT
        k_hi = tl.minimum(K, k_lo + K_PER_SPLIT)
        w_rows = w_ptr + feats.to(tl.int64)[:, None] * stride_wn
        up_rows = w_rows + N.to(tl.int64) * stride_wn
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
        feat_ok = feats[:, None] < N
        row_ok = rows[:, None] < M

        k_ok = (k_lo + ks)[None, :] < k_hi
        w = tl.load(w_rows + (k_lo + ks)[None, :], mask=feat_ok & k_ok, other=0.0)
        w_up = w
        if SILU_AND_MUL:
            w_up = tl.load(up_rows + (k_lo + ks)[None, :], mask=feat_ok & k_ok, other=0.0)
        pdl.pdl_enter(USE_PDL)
        x = tl.load(x_rows + (k_lo + ks)[None, :], mask=row_ok & k_ok, other=0.0)
        acc = tl.dot(w.to(DOT_DTYPE), tl.trans(x.to(DOT_DTYPE)))
        acc_up = acc
        if SILU_AND_MUL:
            acc_up = tl.dot(w_up.to(DOT_DTYPE), tl.trans(x.to(DOT_DTYPE)))
        for k0 in range(k_lo + BLOCK_K, k_hi, BLOCK_K):
            k_ok = (k0 + ks)[None, :] < k_hi
            w = tl.load(w_rows + (k0 + ks)[None, :], mask=feat_ok & k_ok, other=0.0)
            x = tl.load(x_rows + (k0 + ks)[None, :], mask=row_ok & k_ok, other=0.0)
            acc = tl.dot(w.to(DOT_DTYPE), tl.trans(x.to(DOT_DTYPE)), acc)
            if SILU_AND_MUL:
                w_up = tl.load(up_rows + (k0 + ks)[None, :], mask=feat_ok & k_ok, other=0.0)
                acc_up = tl.dot(w_up.to(DOT_DTYPE), tl.trans(x.to(DOT_DTYPE)), acc_up)

        last = split == 0  # the only split without SPLIT
        if SPLIT:
            acc, acc_up, last = _sum_splits(
                acc, acc_up, partials_ptr, counters_ptr, tile, split, SILU_AND_MUL, BLOCK_M
            )
        # Rows to store: all, or none from a program that did not arrive last.
        rows_to_store = M * last.to(tl.int32)
        _write_tile(
            out_ptr,
            b_ptr,
            acc,
            acc_up,
            feats,
            N,
            rows_to_store,
            stride_om,
            HAS_BIAS,
            SILU_AND_MUL,
            BLOCK_M,
        )

    @triton.jit
    def _sum_splits(
        acc,
        acc_up,
        partials_ptr,
        counters_ptr,
        tile,
        split,
        SILU_AND_MUL: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        """Write this program's partials, count its arrival at ``tile``, and return whether
        it arrived last -- then with the sum of every split's partials, in split order, and
        the tile's counter reset for the next launch."""
        # Partials of a tile are contiguous per split: [split][gate/up][BLOCK_N][BLOCK_M].
        block_n: tl.constexpr = acc.shape[0]
        parts: tl.constexpr = 2 if SILU_AND_MUL else 1
        tile_size: tl.constexpr = block_n * BLOCK_M
        cell = tl.arange(0, block_n)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
        stride_split = tl.num_programs(0).to(tl.int64) * parts * tile_size
        first = partials_ptr + tile.to(tl.int64) * parts * tile_size
        tl.store(first + split * stride_split + cell, acc)
        if SILU_AND_MUL:
            tl.store(first + split * stride_split + tile_size + cell, acc_up)
        tl.debug_barrier()  # every thread's partial is written before the arrival
        arrived = tl.atomic_add(counters_ptr + tile, 1, sem="acq_rel", scope="gpu")
        last = arrived == tl.num_programs(1) - 1
        if last:
            acc = tl.load(first + cell, cache_modifier=".cg")
            if SILU_AND_MUL:
                acc_up = tl.load(first + tile_size + cell, cache_modifier=".cg")
            for s in range(1, tl.num_programs(1)):
                acc += tl.load(first + s * stride_split + cell, cache_modifier=".cg")
                if SILU_AND_MUL:
                    acc_up += tl.load(
                        first + s * stride_split + tile_size + cell, cache_modifier=".cg"
                    )
            tl.atomic_xchg(counters_ptr + tile, 0, sem="relaxed", scope="gpu")
        return acc, acc_up, last

    @triton.jit
    def _write_tile(
        out_ptr,
        b_ptr,
        acc,
        acc_up,
        feats,
        N,
        rows_to_store,
        stride_om,
        HAS_BIAS: tl.constexpr,
        SILU_AND_MUL: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        """Store ``acc`` (``[BLOCK_N, BLOCK_M]``, transposed) plus the bias into ``out``'s
        first ``rows_to_store`` rows; with ``SILU_AND_MUL``, ``silu(acc) * acc_up``, each
        rounded to the output dtype first."""
        dtype = out_ptr.dtype.element_ty
        if HAS_BIAS:
            acc += tl.load(b_ptr + feats, mask=feats < N, other=0.0).to(tl.float32)[:, None]
        if SILU_AND_MUL:
            if HAS_BIAS:
                up_bias = tl.load(b_ptr + N + feats, mask=feats < N, other=0.0)
                acc_up += up_bias.to(tl.float32)[:, None]
            gate = acc.to(dtype).to(tl.float32)
            act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
            acc = act * acc_up.to(dtype).to(tl.float32)
        rows = tl.arange(0, BLOCK_M)
        where = out_ptr + rows.to(tl.int64)[None, :] * stride_om + feats[:, None]
        tl.store(where, acc.to(dtype), mask=(feats[:, None] < N) & (rows[None, :] < rows_to_store))
