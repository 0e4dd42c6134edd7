"""The CPU engine's native kernels (``backend/_cpu_ops.c``) with torch-tensor signatures.

The layer ops (`add_rms_norm_`, `silu_and_mul`, `rope`) have the contracts of their torch
references in ``backend/fused_ops.py``, except that they return the input's dtype where a
reference would promote a bfloat16 input with float32 tables or weights to float32.
`decode_attention` has the contract of the KV write plus sdpa in
``backend/attention/torch_backend.py``; `qmatmul`, `qgemm` and `dequantize` serve the packed
matrices of ``backend/quantization.py``. They return new tensors (``add_rms_norm_`` also
updates the residual in place) and accept CPU tensors of float32 or bfloat16 whose last dim
is contiguous: `supports` says whether a tensor qualifies, and callers fall back to the
torch references otherwise. Shapes, dtypes and strides are checked here; the C code range-checks
the indices that address memory (slots, positions) and raises ``ValueError``.

Why: see the C source's header (per-op overhead dominates a small model's decode step).
"""

from __future__ import annotations

import torch

from backend import _cpu_ops as _native

_CODES = {torch.float32: 0, torch.bfloat16: 1}


def supports(t: torch.Tensor) -> bool:
    """Whether ``t`` can be given to these functions: CPU, float32/bfloat16, last dim
    contiguous."""
    return t.dtype in _CODES and t.device.type == "cpu" and t.stride(-1) == 1


def add_rms_norm_(
    delta: torch.Tensor | None,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``residual += delta`` (when given), then RMSNorm(residual) ``[rows, dim]`` in
    ``out_dtype`` (default: the residual's), as ``fused_ops.add_rms_norm_``."""
    rows, dim = residual.shape
    if weight.shape != (dim,) or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous [{dim}] tensor, got {tuple(weight.shape)}")
    out = torch.empty((rows, dim), dtype=out_dtype or residual.dtype)
    if delta is not None and delta.shape != residual.shape:
        raise ValueError(f"delta {tuple(delta.shape)} != residual {tuple(residual.shape)}")
    _native.add_rms_norm(
        residual.data_ptr(),
        _CODES[residual.dtype],
        residual.stride(0),
        0 if delta is None else delta.data_ptr(),
        0 if delta is None else _CODES[delta.dtype],
        0 if delta is None else delta.stride(0),
        weight.data_ptr(),
        _CODES[weight.dtype],
        out.data_ptr(),
        _CODES[out.dtype],
        dim,
        rows,
        dim,
        eps,
    )
    return out


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` ``[rows, inter]`` for ``gate_up = cat(gate, up)``."""
    rows, width = gate_up.shape
    if width % 2:
        raise ValueError(f"gate_up must have an even width, got {width}")
    inter = width // 2
    out = torch.empty((rows, inter), dtype=gate_up.dtype)
    code = _CODES[gate_up.dtype]
    _native.silu_and_mul(
        gate_up.data_ptr(), code, gate_up.stride(0), out.data_ptr(), code, inter, rows, inter
    )
    return out


def rope(
    x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor
) -> torch.Tensor:
    """Rotate-half RoPE of ``x`` ``[T, heads, D]`` into a new contiguous tensor; ``positions``
    int64 ``[T]``, tables float32 ``[max_len, D]`` (rows contiguous)."""
    tokens, heads, dim = x.shape
    if dim % 2:
        raise ValueError(f"RoPE needs an even head dim, got {dim}")
    if positions.dtype != torch.int64 or positions.shape != (tokens,):
        raise ValueError(f"positions must be an int64 [{tokens}] tensor")
    positions = positions.contiguous()
    tables_ok = cos.dtype == sin_signed.dtype == torch.float32 and cos.stride(-1) == 1
    if not tables_ok or cos.stride() != sin_signed.stride() or cos.shape[-1] != dim:
        raise ValueError(f"the RoPE tables must be float32 [max_len, {dim}], rows contiguous")
    out = torch.empty((tokens, heads, dim), dtype=x.dtype)
    code = _CODES[x.dtype]
    _native.rope(
        x.data_ptr(),
        code,
        x.stride(0),
        x.stride(1),
        tokens,
        heads,
        dim,
        positions.data_ptr(),
        cos.data_ptr(),
        sin_signed.data_ptr(),
        cos.stride(0),
        min(cos.shape[0], sin_signed.shape[0]),
        out.data_ptr(),
        code,
    )
    return out


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    out_cache_loc: torch.Tensor,
    slots: torch.Tensor,
    lens: torch.Tensor,
) -> torch.Tensor:
    """Store ``k``/``v`` ``[B, Hkv, D]`` at ``out_cache_loc`` ``[B]`` of the pool buffers
    ``[slots, Hkv, D]``, then attend with ``q`` ``[B, H, D]`` over each request's slots:
    row ``b`` of ``slots`` ``[B, Lmax]`` (int64, contiguous) padded after ``lens[b]``.
    Softmax scale ``1 / sqrt(D)``; GQA maps query head ``h`` to KV head ``h // (H / Hkv)``.
    Returns ``[B, H, D]`` in ``q``'s dtype. A length outside ``[1, Lmax]`` or a slot outside
    the pool raises ``ValueError`` before anything is written."""
    batch, heads, dim = q.shape
    kv_heads = k.shape[1]
    if k.dtype != v.dtype:
        raise ValueError(f"k ({k.dtype}) and v ({v.dtype}) must have one dtype")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[0] != batch or t.shape[2] != dim or t.stride(1) != dim or t.stride(2) != 1:
            raise ValueError(f"{name} must be [B, heads, D] with contiguous heads")
    if k_buf.dtype != v_buf.dtype or not (k_buf.is_contiguous() and v_buf.is_contiguous()):
        raise ValueError("the pool's K and V buffers must be contiguous and of one dtype")
    if k_buf.shape[1:] != (kv_heads, dim) or heads % kv_heads:
        raise ValueError(f"pool heads {tuple(k_buf.shape[1:])} do not match k {tuple(k.shape)}")
    for name, t in (("out_cache_loc", out_cache_loc), ("slots", slots), ("lens", lens)):
        if t.dtype != torch.int64 or not t.is_contiguous() or t.shape[0] != batch:
            raise ValueError(f"{name} must be a contiguous int64 tensor with one row per request")
    out = torch.empty((batch, heads, dim), dtype=q.dtype)
    _native.decode_attention(
        q.data_ptr(),
        _CODES[q.dtype],
        q.stride(0),
        k.data_ptr(),
        v.data_ptr(),
        _CODES[k.dtype],
        k.stride(0),
        v.stride(0),
        k_buf.data_ptr(),
        v_buf.data_ptr(),
        _CODES[k_buf.dtype],
        min(k_buf.shape[0], v_buf.shape[0]),
        out_cache_loc.data_ptr(),
        slots.data_ptr(),
        slots.shape[1],
        lens.data_ptr(),
        batch,
        heads,
        kv_heads,
        dim,
        dim**-0.5,
        out.data_ptr(),
        _CODES[q.dtype],
    )
    return out


Q4, Q8 = 4, 8  # kinds of packed matrices (backend/_cpu_quant.h)


def qmatmul(
    kind: int, weights: torch.Tensor, scales: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """``x @ W.T`` ``[rows, N]`` in ``x``'s dtype for a packed matrix ``W``: ``Q4`` (``weights``
    uint8 codes ``[N, K / 2]``, ``scales`` bfloat16 ``[N, K / 32, 2]``) or ``Q8`` (int8 values
    ``[N, K]``, bfloat16 scales ``[N]``), both contiguous; ``x`` ``[rows, K]`` (last dim
    contiguous) is quantized to int8 per block of 32 (``backend/_cpu_quant.h``)."""
    rows, k = x.shape
    n = _check_operands(kind, weights, scales, x)
    out = torch.empty((rows, n), dtype=x.dtype)
    code = _CODES[x.dtype]
    _native.qmatmul(
        kind,
        weights.data_ptr(),
        scales.data_ptr(),
        n,
        k,
        x.data_ptr(),
        code,
        x.stride(0),
        rows,
        out.data_ptr(),
        code,
        n,
    )
    return out


def fmatmul(
    weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ weight.T + bias`` ``[rows, N]`` in ``x``'s dtype for a contiguous float32
    ``weight`` ``[N, K]`` (``bias`` float32 ``[N]``): the decode-step GEMV of float32 models
    (``backend/_cpu_float.h``; a row's result does not depend on the other rows)."""
    rows, k = x.shape
    if weight.dtype != torch.float32 or weight.dim() != 2 or not weight.is_contiguous():
        raise ValueError("weight must be a contiguous float32 matrix")
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"x {tuple(x.shape)} does not match weight {tuple(weight.shape)}")
    if bias is not None and (
        bias.dtype != torch.float32 or bias.shape != (n,) or not bias.is_contiguous()
    ):
        raise ValueError(f"bias must be a contiguous float32 [{n}] tensor")
    out = torch.empty((rows, n), dtype=x.dtype)
    _native.fmatmul(
        weight.data_ptr(),
        n,
        k,
        0 if bias is None else bias.data_ptr(),
        x.data_ptr(),
        _CODES[x.dtype],
        x.stride(0),
        rows,
        out.data_ptr(),
        _CODES[x.dtype],
        n,
    )
    return out


def qgemm(
    kind: int, weights: torch.Tensor, scales: torch.Tensor, x: torch.Tensor
) -> torch.Tensor | None:
    """`qmatmul`'s product by the register-tiled integer GEMM for many rows (AVX-512 VNNI:
    the same int8 activations and exact integer dots, another float summation order; a
    row's result does not depend on the other rows), or ``None`` where the active kernels
    (`quant_kernels`) have no such GEMM."""
    rows, k = x.shape
    n = _check_operands(kind, weights, scales, x)
    out = torch.empty((rows, n), dtype=x.dtype)
    code = _CODES[x.dtype]
    args = (weights.data_ptr(), scales.data_ptr(), n, k, x.data_ptr(), code, x.stride(0), rows)
    return out if _native.qgemm(kind, *args, out.data_ptr(), code, n) else None


def dequantize(
    kind: int, weights: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The packed matrix (as `qmatmul` takes it) as bfloat16 ``[N, K]``, written into ``out``
    (contiguous bfloat16 ``[N, K]``) when given."""
    n = _check_packed(kind, weights, scales)
    k = weights.shape[1] * (2 if kind == Q4 else 1)
    if out is None:
        out = torch.empty((n, k), dtype=torch.bfloat16)
    elif out.dtype != torch.bfloat16 or out.shape != (n, k) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous bfloat16 [{n}, {k}] tensor")
    _native.dequantize(kind, weights.data_ptr(), scales.data_ptr(), n, k, out.data_ptr())
    return out


def _check_operands(kind: int, weights: torch.Tensor, scales: torch.Tensor, x: torch.Tensor) -> int:
    """Rows of a well-formed packed matrix that ``x`` ``[rows, K]`` matches; ``ValueError``
    otherwise."""
    n = _check_packed(kind, weights, scales)
    if weights.shape[1] * (2 if kind == Q4 else 1) != x.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} does not match a packed {n}-row matrix")
    return n


def _check_packed(kind: int, weights: torch.Tensor, scales: torch.Tensor) -> int:
    """Rows of a well-formed packed matrix; ``ValueError`` otherwise."""
    n, width = weights.shape
    groups = width * 2 // 32 if kind == Q4 else width // 32
    expected = {Q4: (torch.uint8, (n, groups, 2)), Q8: (torch.int8, (n,))}.get(kind)
    if expected is None:
        raise ValueError(f"kind must be Q4 or Q8, got {kind}")
    dtype, scales_shape = expected
    if weights.dtype != dtype or scales.dtype != torch.bfloat16 or scales.shape != scales_shape:
        raise ValueError(f"a q{kind} matrix is {dtype} weights and bfloat16 {scales_shape} scales")
    if not (weights.is_contiguous() and scales.is_contiguous()):
        raise ValueError("packed weights and scales must be contiguous")
    return n


def quant_kernels(name: str | None = None) -> tuple[str, tuple[str, ...]]:
    """The active q4/q8 kernels (``"portable"``, ``"avx2"``, ``"avx-vnni"``, ``"avx512-vnni"``:
    the last adds `qgemm`) and those this CPU runs, best last; ``name`` makes one active
    first (``"best"``: the default). For tests and benchmarks."""
    return _native.quant_kernels(name)
