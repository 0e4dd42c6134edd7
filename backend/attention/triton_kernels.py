"""Triton kernels over the token-granular KV pool: KV write, extend (prefill) and decode.

Data layout (the contract of every launcher below):

- The pool of one layer is ``k_buf`` / ``v_buf`` ``[num_slots + 1, num_kv_heads, head_dim]``;
  a token's keys and values live at its slot index (slot 0 is scratch).
- Request ``b``'s slots are ``kv_indices[kv_indptr[b] : kv_indptr[b + 1]]`` (all its
  tokens in order: cached prefix first, then the new ones); ``kv_indptr`` ``[B + 1]``,
  ``qo_indptr`` ``[B + 1]`` and ``prefix_lens`` ``[B]`` are int32 (the CUDA-graph runners
  pass int64 views of their one static buffer: both work), ``kv_indices`` int64 (offsets
  inside the kernels are computed in int64), all on the pool's device.
- EXTEND: request ``b``'s new tokens are rows ``qo_indptr[b] : qo_indptr[b + 1]`` of the
  flat ``q`` ``[T, H, D]`` / ``k``, ``v`` ``[T, Hkv, D]``; they sit after
  ``prefix_lens[b]`` cached tokens, so new token ``i`` has position ``prefix_lens[b] + i``
  and attends to the whole prefix plus new tokens ``0..i``.
- DECODE: ``q`` is ``[B, H, D]``, one query per request, attending to all
  ``kv_indptr[b + 1] - kv_indptr[b]`` slots of its request (its own token included: the
  KV write runs first).
- GQA: ``H`` is a multiple of ``Hkv``; query head ``h`` reads KV head ``h // (H // Hkv)``.
- Softmax scale ``sm_scale`` (the engine passes ``1 / sqrt(head_dim)``). Scores are kept in
  base-2 units inside the kernels (``exp2`` with the scale multiplied by ``log2(e)``); the
  log-sum-exp the decode kernels exchange is base 2 too.
- Dtypes: float16, bfloat16 and float32. Matmuls (``tl.dot``) take the pool dtype and
  accumulate in float32; softmax statistics are float32; outputs are cast to ``o``'s dtype.
  float32 inputs use IEEE float32 dots (no TF32), which is what the float32 tests compare.

Under ``TRITON_INTERPRET=1`` (CPU tests) bfloat16 values are stored as raw ``uint16`` by the
interpreter and arithmetic on them is wrong, so the launchers then compute in float32
(``_dot_dtype``), and the interpreter truncates float32 to bfloat16 where the GPU rounds to
nearest; float16 and float32 run the exact GPU code path.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from backend import pdl

LOG2E = 1.4426950408889634

_TL_DTYPES: dict[torch.dtype, tl.dtype] = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
}


def is_interpreted() -> bool:
    """Whether the kernels of this module were built for Triton's CPU interpreter."""
    return type(_kv_write_kernel).__name__ == "InterpretedFunction"


def _dot_dtype(dtype: torch.dtype) -> tl.dtype:
    if dtype not in _TL_DTYPES:
        raise TypeError(f"unsupported attention dtype {dtype}; use float16, bfloat16 or float32")
    if dtype == torch.bfloat16 and is_interpreted():
        return tl.float32
    return _TL_DTYPES[dtype]


def _decode_dot_dtype(q_dtype: torch.dtype, kv_dtype: torch.dtype) -> tl.dtype:
    """The decode kernel's dot dtype: float16 over a float8 cache, whose loads then convert
    with one instruction per two values (float8 -> bfloat16 takes several per value: batch
    64 x 512-640 on an H100 took 50.9 us against 41.0); else ``_dot_dtype``."""
    _dot_dtype(q_dtype)  # validates q_dtype
    if kv_dtype.itemsize == 1:
        return tl.float16
    return _dot_dtype(q_dtype)


def _e4m3_words_ok(buf: torch.Tensor) -> bool:
    """Whether ``_load_e4m3_rows_as_f16`` may read ``buf`` [slots, heads, D] as 32-bit words."""
    return (
        buf.dtype == torch.float8_e4m3fn
        and buf.shape[-1] % 4 == 0
        and buf.stride(0) % 4 == 0
        and buf.stride(1) % 4 == 0
        and buf.data_ptr() % 4 == 0
    )


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


# --------------------------------------------------------------------------------------------
# KV write
# --------------------------------------------------------------------------------------------


@triton.jit
def _kv_write_kernel(
    K,
    V,
    K_buf,
    V_buf,
    loc,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kbs,
    stride_kbh,
    stride_vbs,
    stride_vbh,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per new token: copy its ``[Hkv, D]`` keys and values to slot ``loc[t]``."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(loc + t).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
    src_k = K + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :]
    src_v = V + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :]
    dst_k = K_buf + slot * stride_kbs + offs_h[:, None] * stride_kbh + offs_d[None, :]
    dst_v = V_buf + slot * stride_vbs + offs_h[:, None] * stride_vbh + offs_d[None, :]
    tl.store(dst_k, tl.load(src_k, mask=mask).to(K_buf.dtype.element_ty), mask=mask)
    tl.store(dst_v, tl.load(src_v, mask=mask).to(V_buf.dtype.element_ty), mask=mask)


def store_kv(
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    loc: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    """``k_buf[loc] = k; v_buf[loc] = v`` in one launch.

    ``k``/``v`` ``[T, Hkv, D]`` (last dim contiguous), ``loc`` ``[T]`` integer slots (distinct,
    except that padding may repeat the scratch slot 0), buffers ``[S, Hkv, D]`` with a
    contiguous last dim; values are cast to the buffers' dtype.
    """
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _check_last_dim_contiguous(k, v, k_buf, v_buf)
    _kv_write_kernel[(num_tokens,)](
        k,
        v,
        k_buf,
        v_buf,
        loc,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_buf.stride(0),
        k_buf.stride(1),
        v_buf.stride(0),
        v_buf.stride(1),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )


# --------------------------------------------------------------------------------------------
# Extend (prefill over a cached prefix)
# --------------------------------------------------------------------------------------------


@triton.jit
def _extend_kernel(
    Q,
    K,
    V,
    Out,
    K_buf,
    V_buf,
    qo_indptr,
    kv_indptr,
    kv_indices,
    prefix_lens,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_kbs,
    stride_kbh,
    stride_vbs,
    stride_vbh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Program ``(b, h, m)``: query rows ``m * BLOCK_M ...`` of request ``b``, head ``h``.

    Online softmax in two phases: (1) the cached prefix, gathered from the pool through
    the request's slot list, with no causal mask (every new token sees all of it); (2) the
    new tokens' own keys/values read contiguously from ``K``/``V`` with the causal mask,
    stopping at the block's diagonal.
    """
    b = tl.program_id(0)
    h = tl.program_id(1)
    mblk = tl.program_id(2)
    kvh = h // GROUP

    q_start = tl.load(qo_indptr + b)
    ext_len = tl.load(qo_indptr + b + 1) - q_start
    if mblk * BLOCK_M >= ext_len:
        return
    prefix_len = tl.load(prefix_lens + b)
    kv_start = tl.load(kv_indptr + b)

    offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < ext_len
    mask_d = offs_d < HEAD_DIM
    rows = (q_start + offs_m).to(tl.int64)
    q_ptrs = Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(DOT_DTYPE)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # (1) cached prefix, through the slot list
    for start in range(0, prefix_len, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < prefix_len
        slots = tl.load(kv_indices + kv_start + offs_n, mask=mask_n, other=0).to(tl.int64)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k_ptrs = K_buf + slots[:, None] * stride_kbs + kvh * stride_kbh + offs_d[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0).to(DOT_DTYPE)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptrs = V_buf + slots[:, None] * stride_vbs + kvh * stride_vbh + offs_d[None, :]
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0).to(DOT_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=PRECISION)
        m_i = m_new

    # (2) the new tokens, causal; keys past this block's last row are never needed
    end = tl.minimum(ext_len, (mblk + 1) * BLOCK_M)
    for start in range(0, end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < ext_len
        kv_rows = (q_start + offs_n).to(tl.int64)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k_ptrs = K + kv_rows[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0).to(DOT_DTYPE)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        causal = (offs_n[None, :] <= offs_m[:, None]) & mask_n[None, :]
        s = tl.where(causal, s, float("-inf"))
        # Row i always has column 0 <= i in the first block, so m_new is finite from then on.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptrs = V + kv_rows[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :]
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0).to(DOT_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    o_ptrs = Out + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def default_extend_blocks(
    head_dim: int, dtype: torch.dtype, device: torch.device
) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` for the extend kernel.

    Tiny blocks under the interpreter (it runs every program in Python). On CUDA: 128 x 64
    tiles for 16-bit dtypes and head dims up to 128 (SGLang/LightLLM's Ampere/Hopper
    choice), halved for float32 or larger head dims so that the tiles fit in shared memory.
    One pipeline stage: the gathered prefix loads do not pipeline well (as in SGLang).
    """
    if is_interpreted() or device.type != "cuda":
        return 16, 16, 4, 1
    if head_dim <= 128 and dtype != torch.float32:
        return 128, 64, 4 if head_dim <= 64 else 8, 1
    return 64, 32, 4, 1


def extend_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    prefix_lens: torch.Tensor,
    max_extend_len: int,
    sm_scale: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> None:
    """Write into ``o`` ``[T, H, D]`` the attention of the new tokens of a ragged batch.

    ``q`` ``[T, H, D]``, ``k``/``v`` ``[T, Hkv, D]`` are the new tokens (requests
    concatenated, delimited by ``qo_indptr`` ``[B + 1]``); each request's cached prefix is
    the first ``prefix_lens[b]`` slots of its slot list (``kv_indptr``/``kv_indices``) in
    ``k_buf``/``v_buf``. ``max_extend_len`` bounds ``qo_indptr`` differences (host value,
    sizes the grid). The pool part of each slot list past the prefix is not read, so the new
    tokens need not be in the pool yet.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    batch_size = qo_indptr.numel() - 1
    if num_tokens == 0 or batch_size == 0 or max_extend_len == 0:
        return
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    _check_last_dim_contiguous(q, k, v, o, k_buf, v_buf)
    dm, dn, dw, ds = default_extend_blocks(head_dim, q.dtype, q.device)
    block_m, block_n = block_m or dm, block_n or dn
    num_warps, num_stages = num_warps or dw, num_stages or ds
    scale = (sm_scale if sm_scale is not None else head_dim**-0.5) * LOG2E
    grid = (batch_size, num_heads, triton.cdiv(max_extend_len, block_m))
    _extend_kernel[grid](
        q,
        k,
        v,
        o,
        k_buf,
        v_buf,
        qo_indptr,
        kv_indptr,
        kv_indices,
        prefix_lens,
        scale,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        o.stride(0),
        o.stride(1),
        k_buf.stride(0),
        k_buf.stride(1),
        v_buf.stride(0),
        v_buf.stride(1),
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_D=_block_d(head_dim),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        DOT_DTYPE=_dot_dtype(q.dtype),
        PRECISION=_precision(q.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )


# --------------------------------------------------------------------------------------------
# Decode (split-K / flash-decoding)
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_e4m3_rows_as_f16(
    Buf, slots, kvh, stride_s, stride_h, mask_n, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr
):
    """Rows ``Buf[slots, kvh, :HEAD_DIM]`` of a float8 e4m3 buffer as float16 ``[N, BLOCK_D]``
    (zeros where ``mask_n`` is False or past ``HEAD_DIM``). Loaded as 32-bit words and
    converted in registers by inline PTX (two values per ``cvt``) before the tile changes
    layout: converted by Triton (``.to``), the values became the dot's operand as float8
    and were read from shared memory one byte per instruction (the value operand of P @ V
    needs a transposed load, which ``ldmatrix`` has only for 16-bit data). Needs
    ``HEAD_DIM``, both strides and the buffer's address divisible by 4."""
    words = Buf.to(tl.pointer_type(tl.int32), bitcast=True)
    offs_w = tl.arange(0, BLOCK_D // 4)
    ptrs = words + (slots[:, None] * stride_s + kvh * stride_h) // 4 + offs_w[None, :]
    w = tl.load(ptrs, mask=mask_n[:, None] & (offs_w[None, :] < HEAD_DIM // 4), other=0)
    e0, e1, e2, e3 = tl.inline_asm_elementwise(
        "{ .reg .b16 lo, hi; .reg .b32 a, b; mov.b32 {lo, hi}, $4; "
        "cvt.rn.f16x2.e4m3x2 a, lo; cvt.rn.f16x2.e4m3x2 b, hi; "
        "mov.b32 {$0, $1}, a; mov.b32 {$2, $3}, b; }",
        "=h,=h,=h,=h,r",
        [w],
        dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
        is_pure=True,
        pack=1,
    )
    # join appends a minor axis: [n, w, j, i] holds e(2j + i), so rows flatten to e0..e3
    quads = tl.join(tl.join(e0, e2), tl.join(e1, e3))
    return tl.reshape(quads, (slots.shape[0], BLOCK_D))


@triton.jit
def _decode_partial_kernel(
    Q,
    K_buf,
    V_buf,
    Mid_O,
    Mid_LSE,
    kv_indptr,
    kv_indices,
    num_splits,
    q_scale,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_kbs,
    stride_kbh,
    stride_vbs,
    stride_vbh,
    stride_mob,
    stride_moh,
    stride_mos,
    stride_mlb,
    stride_mlh,
    K_new,
    V_new,
    Loc,
    Positions,
    Cos,
    SinSigned,
    stride_knt,
    stride_knh,
    stride_vnt,
    stride_vnh,
    stride_c,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    ROPE: tl.constexpr,
    V_AS_WORDS: tl.constexpr,
    FINAL: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Program ``(b, kvh, split)``: the ``GROUP`` query heads of KV head ``kvh`` over one
    contiguous chunk of request ``b``'s slots.

    The chunk length is ``ceil(seq_len / num_splits)`` rounded up to ``BLOCK_N``, so late
    splits of short requests can be empty; they store ``lse = -inf``. The query heads of
    one KV head are the rows of one ``tl.dot`` (padded to ``BLOCK_H`` >= 16), so each key
    and value is loaded once per KV head. Writes the normalized partial output
    ``Mid_O[b, h, split]`` and its base-2 log-sum-exp ``Mid_LSE[b, h, split]``; with
    ``FINAL`` (one split) ``Mid_O`` is the output itself and no LSE is written.

    With ``ROPE``, ``Q`` and ``K_new`` are not rotated yet: every program rotates its query
    heads at ``Positions[b]``, and the program whose chunk holds the request's last token
    (the new one) rotates that token's key, stores key and value at slot ``Loc[b]`` and
    takes them into its softmax from registers (its loop stops before that slot, so no
    program reads a slot this launch writes).
    """
    pdl.pdl_enter(USE_PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    kv_start = tl.load(kv_indptr + b)
    seq_len = tl.load(kv_indptr + b + 1) - kv_start
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    lo = split * split_len
    hi = tl.minimum(lo + split_len, seq_len)
    owns_new = (lo < seq_len) & (hi == seq_len)  # this chunk ends with the new token

    offs_g = tl.arange(0, BLOCK_H)
    mask_g = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q_ptrs = Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
    q_mask = mask_g[:, None] & mask_d[None, :]
    if ROPE:
        pos = tl.load(Positions + b)
        cos = tl.load(Cos + pos * stride_c + offs_d, mask=mask_d, other=0.0)
        sin = tl.load(SinSigned + pos * stride_c + offs_d, mask=mask_d, other=0.0)
        partner = (offs_d + HEAD_DIM // 2) % HEAD_DIM  # rotate-half: x[d +- D/2]
        q_raw = tl.load(q_ptrs, mask=q_mask, other=0.0).to(tl.float32)
        q_roll = tl.load(q_ptrs - offs_d[None, :] + partner[None, :], mask=q_mask, other=0.0)
        q_rot = q_raw * cos[None, :] + q_roll.to(tl.float32) * sin[None, :]
        q = q_rot.to(Q.dtype.element_ty).to(tl.float32)
        hi = tl.where(owns_new, hi - 1, hi)
    else:
        q = tl.load(q_ptrs, mask=q_mask, other=0.0).to(tl.float32)
    q = (q * q_scale).to(DOT_DTYPE)  # q_scale: a power of two (exact), see decode_attention

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        slots = tl.load(kv_indices + kv_start + offs_n, mask=mask_n, other=0).to(tl.int64)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k_ptrs = K_buf + slots[:, None] * stride_kbs + kvh * stride_kbh + offs_d[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0).to(DOT_DTYPE)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if V_AS_WORDS:  # float8 values: see _load_e4m3_rows_as_f16
            v = _load_e4m3_rows_as_f16(
                V_buf, slots, kvh, stride_vbs, stride_vbh, mask_n, HEAD_DIM, BLOCK_D
            )
        else:
            v_ptrs = V_buf + slots[:, None] * stride_vbs + kvh * stride_vbh + offs_d[None, :]
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0).to(DOT_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=PRECISION)
        m_i = m_new

    if ROPE:  # noqa: SIM102 (a compile-time branch: names below exist only with RoPE)
        if owns_new:
            k_ptrs = K_new + b * stride_knt + kvh * stride_knh
            k_raw = tl.load(k_ptrs + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            k_roll = tl.load(k_ptrs + partner, mask=mask_d, other=0.0).to(tl.float32)
            k_new = (k_raw * cos + k_roll * sin).to(K_new.dtype.element_ty)  # as RoPE rounds
            k_new = k_new.to(K_buf.dtype.element_ty)
            v_new = tl.load(V_new + b * stride_vnt + kvh * stride_vnh + offs_d, mask=mask_d)
            v_new = v_new.to(V_buf.dtype.element_ty)
            slot = tl.load(Loc + b).to(tl.int64)
            tl.store(K_buf + slot * stride_kbs + kvh * stride_kbh + offs_d, k_new, mask=mask_d)
            tl.store(V_buf + slot * stride_vbs + kvh * stride_vbh + offs_d, v_new, mask=mask_d)
            kf = k_new.to(DOT_DTYPE).to(tl.float32)
            s_new = tl.sum(q.to(tl.float32) * kf[None, :], 1) * qk_scale
            m_new = tl.maximum(m_i, s_new)
            alpha = tl.exp2(m_i - m_new)
            p_new = tl.exp2(s_new - m_new)
            l_i = l_i * alpha + p_new
            vf = v_new.to(DOT_DTYPE).to(tl.float32)
            acc = acc * alpha[:, None] + p_new[:, None] * vf[None, :]
            m_i = m_new

    nonempty = l_i > 0.0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    mo_ptrs = Mid_O + b * stride_mob + heads[:, None] * stride_moh + split * stride_mos
    out = out.to(Mid_O.dtype.element_ty)
    tl.store(mo_ptrs + offs_d[None, :], out, mask=mask_g[:, None] & mask_d[None, :])
    if not FINAL:
        tl.store(Mid_LSE + b * stride_mlb + heads * stride_mlh + split, lse, mask=mask_g)


@triton.jit
def _decode_reduce_kernel(
    Mid_O,
    Mid_LSE,
    Out,
    num_splits,
    stride_mob,
    stride_moh,
    stride_mos,
    stride_mlb,
    stride_mlh,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Program ``(b, h)``: merge the ``num_splits`` partial outputs by their log-sum-exp.

    Split 0 is never empty (``seq_len >= 1``), so the running maximum is finite after it
    and empty splits (``lse = -inf``) get weight 0.
    """
    pdl.pdl_enter(USE_PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mo_base = Mid_O + b * stride_mob + h * stride_moh
    ml_base = Mid_LSE + b * stride_mlb + h * stride_mlh
    m = tl.load(ml_base)
    denom = tl.full([1], 1.0, dtype=tl.float32)
    acc = tl.load(mo_base + offs_d, mask=mask_d, other=0.0)
    for split in range(1, num_splits):
        lse = tl.load(ml_base + split)
        part = tl.load(mo_base + split * stride_mos + offs_d, mask=mask_d, other=0.0)
        m_new = tl.maximum(m, lse)
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)
        acc = acc * alpha + part * w
        denom = denom * alpha + w
        m = m_new
    out = acc / denom
    tl.store(
        Out + b * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=mask_d
    )


def default_decode_config(
    device: torch.device, kv_dtype: torch.dtype, programs: int = 0
) -> tuple[int, int, int]:
    """``(block_n, num_warps, num_stages)`` of the decode kernel for ``programs`` (batch x
    KV heads) programs per split: keys per inner iteration 16 under the interpreter. On
    CUDA (``benchmarks/tune_decode_attention.py``, H100, random slots, L2-cold): one to four
    programs per SM take 64 keys on 2 warps (batch 64 x 512-640: bf16 59.5 us against 62.9
    for 128 keys on 4 warps; float8 40.4 against 45), more take 128 keys on 4 warps (batch
    256 x 100-2,048: bf16 391 us, 2.77 TB/s; float8 262 against 280-297 for 64 keys), as
    does a single request; float8 loads want more stages in flight (4 and 3 against 2)."""
    if is_interpreted() or device.type != "cuda":
        return 16, 4, 2
    fp8 = kv_dtype.itemsize == 1
    if _num_sms(device) <= programs <= 4 * _num_sms(device):
        return 64, 2, 4 if fp8 else 2
    return 128, 4, 3 if fp8 else 2


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_kv_splits(
    batch_size: int,
    num_kv_heads: int,
    max_seq_len: int,
    num_sms: int,
    max_splits: int = 16,
    min_split_len: int = 256,
) -> int:
    """Splits per request for decode: enough programs to fill ``2 * num_sms`` SMs' worth of
    work, never more than ``max_splits`` nor chunks shorter than ``min_split_len`` tokens."""
    by_len = triton.cdiv(max(max_seq_len, 1), min_split_len)
    by_occupancy = triton.cdiv(2 * num_sms, max(batch_size * num_kv_heads, 1))
    return max(1, min(max_splits, by_len, by_occupancy))


def decode_partial_buffers(
    batch_size: int, num_heads: int, head_dim: int, num_splits: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 scratch for ``decode_attention``: ``(mid_o [B, H, S, D], mid_lse [B, H, S])``;
    can be reused by every layer of one forward pass."""
    mid_o = torch.empty(
        (batch_size, num_heads, num_splits, head_dim), dtype=torch.float32, device=device
    )
    mid_lse = torch.empty((batch_size, num_heads, num_splits), dtype=torch.float32, device=device)
    return mid_o, mid_lse


@dataclass(frozen=True)
class DecodeRope:
    """What ``decode_attention`` needs to rotate q and k itself and write the new K/V: the
    new tokens' unrotated keys ``k`` and values ``v`` ``[B, Hkv, D]`` (last dim contiguous;
    views of the fused projection are fine), their slots ``loc`` and ``positions`` ``[B]``,
    and the model's ``cos`` / ``sin_signed`` tables ``[max_len, D]`` (``backend.fused_ops``'s
    rotate-half convention)."""

    k: torch.Tensor
    v: torch.Tensor
    loc: torch.Tensor
    positions: torch.Tensor
    cos: torch.Tensor
    sin_signed: torch.Tensor


def decode_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    o: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    num_splits: int,
    mid_o: torch.Tensor | None = None,
    mid_lse: torch.Tensor | None = None,
    sm_scale: float | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    rope: DecodeRope | None = None,
) -> None:
    """Write into ``o`` ``[B, H, D]`` the attention of one query per request over its slots.

    Flash-decoding in two launches: ``_decode_partial_kernel`` on a ``(B, Hkv, num_splits)``
    grid, then ``_decode_reduce_kernel`` on ``(B, H)``; with one split the first launch
    writes ``o`` and is the only one. Every request needs at least one slot.
    ``mid_o``/``mid_lse`` (from ``decode_partial_buffers`` with at least ``num_splits``
    splits; unused with one split) are allocated when not given. Launch parameters left ``None``
    come from ``default_decode_config``.

    With ``rope``, ``q`` is not rotated yet and the new tokens' K/V are not in the pool:
    the first launch rotates q and k at ``rope.positions`` and stores k and v at
    ``rope.loc`` (the last slot of each request), so RoPE, the KV write and attention take
    two launches instead of four; results equal those of ``fused_ops.rope`` + ``store_kv``
    + this function up to float32 summation order.
    """
    batch_size, num_heads, head_dim = q.shape
    num_kv_heads = k_buf.shape[1]
    if batch_size == 0:
        return
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    _check_last_dim_contiguous(q, o, k_buf, v_buf)
    if rope is not None:
        _check_last_dim_contiguous(rope.k, rope.v, rope.cos, rope.sin_signed)
        if head_dim % 2 or rope.cos.stride(0) != rope.sin_signed.stride(0):
            raise ValueError("RoPE needs an even head_dim and cos/sin tables of one layout")
    final = num_splits == 1  # the first launch writes o; no partial buffers, no reduction
    if final:
        mid_o, mid_lse = o.unsqueeze(2), o  # mid_lse: a placeholder, never written
    elif mid_o is None or mid_lse is None:
        mid_o, mid_lse = decode_partial_buffers(
            batch_size, num_heads, head_dim, num_splits, q.device
        )
    if mid_o.shape[2] < num_splits or mid_o.stride(-1) != 1:
        raise ValueError("mid_o has fewer splits than num_splits or a non-contiguous last dim")
    group = num_heads // num_kv_heads
    block_d = _block_d(head_dim)
    scale = (sm_scale if sm_scale is not None else head_dim**-0.5) * LOG2E
    dot_dtype = _decode_dot_dtype(q.dtype, k_buf.dtype)
    # A bf16/fp32 query cast to float16 is first scaled by the power of two nearest below
    # the softmax scale (exact; |q| up to ~5e5 then fits float16); the rest of the scale
    # multiplies the float32 scores. Other queries are cast as they are.
    q_scale = 2.0 ** math.floor(math.log2(scale)) if dot_dtype == tl.float16 else 1.0
    if q.dtype == torch.float16:
        q_scale = 1.0
    r = rope or DecodeRope(q, q, kv_indptr, kv_indptr, q, q)  # placeholders, never read
    default_n, default_warps, default_stages = default_decode_config(
        q.device, k_buf.dtype, batch_size * num_kv_heads
    )
    _decode_partial_kernel[(batch_size, num_kv_heads, num_splits)](
        q,
        k_buf,
        v_buf,
        mid_o,
        mid_lse,
        kv_indptr,
        kv_indices,
        num_splits,
        q_scale,
        scale / q_scale,
        q.stride(0),
        q.stride(1),
        k_buf.stride(0),
        k_buf.stride(1),
        v_buf.stride(0),
        v_buf.stride(1),
        mid_o.stride(0),
        mid_o.stride(1),
        mid_o.stride(2),
        mid_lse.stride(0),
        mid_lse.stride(1),
        r.k,
        r.v,
        r.loc,
        r.positions,
        r.cos,
        r.sin_signed,
        r.k.stride(0),
        r.k.stride(1),
        r.v.stride(0),
        r.v.stride(1),
        r.cos.stride(0),
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n or default_n,
        DOT_DTYPE=dot_dtype,
        PRECISION=_precision(q.dtype),
        ROPE=rope is not None,
        V_AS_WORDS=_e4m3_words_ok(v_buf),  # its dot dtype is float16
        FINAL=final,
        num_warps=num_warps or default_warps,
        num_stages=num_stages or default_stages,
        **pdl.options(q.device),
    )
    if final:
        return
    _decode_reduce_kernel[(batch_size, num_heads)](
        mid_o,
        mid_lse,
        o,
        num_splits,
        mid_o.stride(0),
        mid_o.stride(1),
        mid_o.stride(2),
        mid_lse.stride(0),
        mid_lse.stride(1),
        o.stride(0),
        o.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        **pdl.options(q.device),
    )


def _check_last_dim_contiguous(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError(f"expected a contiguous last dimension, got strides {t.stride()}")


__all__ = [
    "LOG2E",
    "DecodeRope",
    "choose_num_kv_splits",
    "decode_attention",
    "decode_partial_buffers",
    "default_decode_config",
    "default_extend_blocks",
    "extend_attention",
    "is_interpreted",
    "store_kv",
]
