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
  log-sum-exp that split launches (decode, and extend over a long prefix) exchange is base 2
  too.
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
MIN_PREFIX_SPLIT_LEN = 256  # the shortest prefix chunk of a split extend (extend_attention)

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
    Mid_O,
    Mid_LSE,
    qk_scale,
    num_splits,
    min_split_len,
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
    stride_mot,
    stride_moh,
    stride_mos,
    stride_mlt,
    stride_mlh,
    GROUP: tl.constexpr,
    HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    FINAL: tl.constexpr,
):
    """Program ``(b, g, m * num_splits + split)``: new tokens ``m * BLOCK_T ...`` of request
    ``b`` for query heads ``g * HEADS ...`` (``HEADS`` divides ``GROUP``: they share one KV
    head), over chunk ``split`` of the cached prefix. The tile's ``BLOCK_M`` rows are
    (token, head) pairs, token-major (``BLOCK_T * HEADS <= BLOCK_M``), so with ``HEADS =
    GROUP`` a key block is loaded once for its whole query group.

    Online softmax in two phases: (1) the program's chunk of the cached prefix, gathered
    from the pool through the request's slot list, with no causal mask (every new token sees
    all of it); (2) split 0 only: the new tokens' own keys/values read contiguously from
    ``K``/``V`` with the causal mask, stopping at the block's diagonal. Request ``b`` splits
    its prefix into ``min(num_splits, cdiv(prefix_len, min_split_len))`` chunks (at least
    one) of whole ``BLOCK_N`` blocks. ``FINAL`` (``num_splits == 1``): the program writes
    ``Out``. Otherwise it writes its normalized partial output to ``Mid_O[row, h, split]``
    and its base-2 log-sum-exp to ``Mid_LSE[row, h, split]`` (``-inf`` and no ``Mid_O``
    for an empty chunk); ``_merge_splits_kernel`` combines them. Split 0 is never empty
    (a row sees at least its own token).
    """
    b = tl.program_id(0)
    first_head = tl.program_id(1) * HEADS
    mblk = tl.program_id(2) // num_splits
    split = tl.program_id(2) % num_splits
    kvh = first_head // GROUP

    q_start = tl.load(qo_indptr + b)
    ext_len = tl.load(qo_indptr + b + 1) - q_start
    if mblk * BLOCK_T >= ext_len:
        return
    prefix_len = tl.load(prefix_lens + b)
    kv_start = tl.load(kv_indptr + b)

    r = tl.arange(0, BLOCK_M)
    offs_m = mblk * BLOCK_T + r // HEADS  # the row's new token (its index in the request)
    h = first_head + r % HEADS  # the row's query head
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = (r < BLOCK_T * HEADS) & (offs_m < ext_len)
    mask_d = offs_d < HEAD_DIM
    rows = (q_start + offs_m).to(tl.int64)

    splits_b = tl.maximum(tl.minimum(num_splits, tl.cdiv(prefix_len, min_split_len)), 1)
    split_len = tl.cdiv(tl.cdiv(prefix_len, splits_b), BLOCK_N) * BLOCK_N
    lo = tl.minimum(split * split_len, prefix_len)
    hi = tl.minimum(lo + split_len, prefix_len)
    if not FINAL:  # noqa: SIM102 (a compile-time branch)
        if (split > 0) & (lo >= hi):  # an empty chunk: weight 0 in the merge
            ml_ptrs = Mid_LSE + rows * stride_mlt + h * stride_mlh + split
            tl.store(ml_ptrs, tl.full([BLOCK_M], float("-inf"), tl.float32), mask=mask_m)
            return

    q_ptrs = Q + rows[:, None] * stride_qt + h[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(DOT_DTYPE)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # (1) this program's chunk of the cached prefix, through the slot list
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
        v_ptrs = V_buf + slots[:, None] * stride_vbs + kvh * stride_vbh + offs_d[None, :]
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0).to(DOT_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=PRECISION)
        m_i = m_new

    # (2) split 0: the new tokens, causal; keys past this block's last row are never needed
    end = tl.where(split == 0, tl.minimum(ext_len, (mblk + 1) * BLOCK_T), 0)
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

    # Split 0 saw each row's own token: l_i > 0 there. Other chunks are non-empty here.
    out = acc / l_i[:, None]
    o_mask = mask_m[:, None] & mask_d[None, :]
    if FINAL:
        o_ptrs = Out + rows[:, None] * stride_ot + h[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=o_mask)
    else:
        mo_ptrs = Mid_O + rows[:, None] * stride_mot + h[:, None] * stride_moh + split * stride_mos
        tl.store(mo_ptrs + offs_d[None, :], out, mask=o_mask)
        lse = m_i + tl.log2(l_i)
        tl.store(Mid_LSE + rows * stride_mlt + h * stride_mlh + split, lse, mask=mask_m)


@dataclass(frozen=True)
class ExtendConfig:
    """Launch parameters of the extend kernel: ``heads`` query heads of one KV head share a
    program's ``block_m`` rows (so ``block_m // heads`` new tokens per program), keys come
    ``block_n`` at a time."""

    heads: int
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    @property
    def block_t(self) -> int:
        return self.block_m // self.heads


@functools.lru_cache(maxsize=1024)  # called per layer: the host time of eager passes
def extend_config(
    batch_size: int,
    max_extend_len: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    heads_per_program: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> ExtendConfig:
    """The extend launch's parameters; those given override the defaults.

    Under the interpreter: 16 x 16 tiles. On CUDA (``benchmarks/tune_extend_attention.py``,
    H100, Llama-3-8B heads): a program takes the whole GQA group (keys loaded once per
    group), tiles of 64 or 128 rows (fewer when the longest request has fewer), 64 keys,
    4 warps, and 3 pipeline stages at 64 rows (2 at 128). 128 rows only when the grid still
    has two programs per SM with them: a request's 64 new tokens after a 1,000-token prefix
    took 15.0 us per layer at 64 rows against 24.3 at 128; 64 requests' 32 tokens after
    2,000 took 266 us at 128 rows against 402 (each program re-reads its prefix); 8 x
    1,000 new tokens 314 us (209 TFLOP/s) against 375 for the earlier 1-head, 8-warp,
    1-stage tile. float32 or head dims over 128 take 64 x 32 tiles (shared memory).
    """
    group = num_heads // num_kv_heads
    interpreted = is_interpreted() or device.type != "cuda"
    wide = not interpreted and (head_dim > 128 or dtype == torch.float32)
    max_m = 16 if interpreted else 64 if wide else 128
    heads = heads_per_program or (group if group <= (block_m or max_m) else 1)
    if group % heads:
        raise ValueError(f"heads_per_program {heads} does not divide the group size {group}")
    if block_m is None:
        block_m = min(max_m, max(16, triton.next_power_of_2(max_extend_len * heads)))
        programs = batch_size * triton.cdiv(max_extend_len, block_m // heads) * num_heads // heads
        if block_m == 128 and programs < 2 * _num_sms(device):
            block_m = 64
    if block_m < heads:
        raise ValueError(f"block_m {block_m} holds no token of {heads} heads")
    if interpreted:
        n, warps, stages = 16, 4, 1
    elif wide:
        n, warps, stages = 32, 4, 1
    else:
        n, warps, stages = 64, 4, 3 if block_m <= 64 else 2
    return ExtendConfig(heads, block_m, block_n or n, num_warps or warps, num_stages or stages)


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
    num_splits: int = 1,
    min_split_len: int = MIN_PREFIX_SPLIT_LEN,
    mid_o: torch.Tensor | None = None,
    mid_lse: torch.Tensor | None = None,
    heads_per_program: int | None = None,
) -> None:
    """Write into ``o`` ``[T, H, D]`` the attention of the new tokens of a ragged batch.

    ``q`` ``[T, H, D]``, ``k``/``v`` ``[T, Hkv, D]`` are the new tokens (requests
    concatenated, delimited by ``qo_indptr`` ``[B + 1]``); each request's cached prefix is
    the first ``prefix_lens[b]`` slots of its slot list (``kv_indptr``/``kv_indices``) in
    ``k_buf``/``v_buf``. ``max_extend_len`` bounds ``qo_indptr`` differences (host value,
    sizes the grid). The pool part of each slot list past the prefix is not read, so the new
    tokens need not be in the pool yet.

    ``num_splits > 1`` splits each request's prefix into up to that many chunks of at
    least ``min_split_len`` tokens, read by separate programs and merged by a second
    launch (a short extend over a long cached context then fills the GPU); ``mid_o`` /
    ``mid_lse`` (``split_partial_buffers``, at least ``T`` rows and ``num_splits``
    splits) are allocated when not given. Rows of ``o`` past ``qo_indptr[B]`` may be
    overwritten.

    Launch parameters left ``None`` come from ``extend_config``.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    batch_size = qo_indptr.numel() - 1
    if num_tokens == 0 or batch_size == 0 or max_extend_len == 0:
        return
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if num_splits < 1 or min_split_len < 1:
        raise ValueError(f"num_splits ({num_splits}) and min_split_len must be >= 1")
    _check_last_dim_contiguous(q, k, v, o, k_buf, v_buf)
    config = extend_config(
        batch_size,
        max_extend_len,
        num_heads,
        num_kv_heads,
        head_dim,
        q.dtype,
        q.device,
        heads_per_program=heads_per_program,
        block_m=block_m,
        block_n=block_n,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    scale = (sm_scale if sm_scale is not None else head_dim**-0.5) * LOG2E
    final = num_splits == 1
    if final:
        mid_o, mid_lse = o.unsqueeze(2), o  # placeholders, never read or written
    elif mid_o is None or mid_lse is None:
        mid_o, mid_lse = split_partial_buffers(
            num_tokens, num_heads, head_dim, num_splits, q.device
        )
    if (
        mid_o.shape[0] < num_tokens
        or mid_o.shape[2] < num_splits
        or mid_o.stride(-1) != 1
        or mid_lse.shape[0] < num_tokens
        or mid_lse.shape[2] < num_splits
    ):
        raise ValueError("mid_o/mid_lse have fewer rows or splits than needed")
    heads, block_t = config.heads, config.block_t
    grid = (batch_size, num_heads // heads, triton.cdiv(max_extend_len, block_t) * num_splits)
    if grid[2] > 65535:  # CUDA's limit on the grid's third dimension
        raise ValueError(f"{max_extend_len} new tokens in {num_splits} splits: chunk the prefill")
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
        mid_o,
        mid_lse,
        scale,
        num_splits,
        min_split_len,
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
        mid_o.stride(0),
        mid_o.stride(1),
        mid_o.stride(2),
        mid_lse.stride(0),
        mid_lse.stride(1),
        GROUP=num_heads // num_kv_heads,
        HEADS=heads,
        HEAD_DIM=head_dim,
        BLOCK_D=_block_d(head_dim),
        BLOCK_M=config.block_m,
        BLOCK_T=block_t,
        BLOCK_N=config.block_n,
        DOT_DTYPE=_dot_dtype(q.dtype),
        PRECISION=_precision(q.dtype),
        FINAL=final,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if not final:
        _merge_splits(mid_o, mid_lse, o, num_tokens, num_splits)


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
def _merge_splits_kernel(
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
    """Program ``(b, h)``: merge row ``b``'s ``num_splits`` partial outputs for head ``h``
    (``Mid_O`` ``[rows, H, S, D]``, ``Mid_LSE`` ``[rows, H, S]``) by their log-sum-exp.

    Split 0 is never empty, so the running maximum is finite after it; empty splits
    (``lse = -inf``) are skipped, so their ``Mid_O`` need not be written. Used by the
    decode kernels (a row per request) and the split extend kernel (a row per new token).
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
        if lse > float("-inf"):
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
    CUDA (``benchmarks/tune_decode_attention.py``, H100, random slots, L2-cold, the best of
    the grid in two runs): one to four programs per SM take 64 keys on 2 warps (batch 64 x
    512-640: bf16 55.8-56.0 us with 3 stages against 58.7-59.4 with 2; float8 37.0 with 2
    stages against 40.1-40.5 with 3 or 4), more take 128 keys on 4 warps (batch 256 x
    100-2,048: bf16 366-379 us, 2.85 TB/s, with 2 stages; float8 232-234 us, 2.31 TB/s,
    with 3 against 242 with 2), as does a single request."""
    if is_interpreted() or device.type != "cuda":
        return 16, 4, 2
    fp8 = kv_dtype.itemsize == 1
    if _num_sms(device) <= programs <= 4 * _num_sms(device):
        return 64, 2, 2 if fp8 else 3
    return 128, 4, 3 if fp8 else 2


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(
    programs: int,
    max_len: int,
    num_sms: int,
    max_splits: int = 16,
    min_split_len: int = 256,
    occupancy: int = 2,
) -> int:
    """Splits of a split attention launch of ``programs`` programs per split (decode:
    requests x KV heads; extend: query blocks x head groups) over contexts of up to
    ``max_len`` tokens: enough programs for ``occupancy`` per SM, never more than
    ``max_splits`` nor chunks shorter than ``min_split_len`` tokens. (Extend takes one per
    SM: 16 requests' 16 tokens after 1,000 cached, 128 programs, took 42.7 us per layer
    unsplit on an H100 against 46.1 in 2 splits.)"""
    by_len = triton.cdiv(max(max_len, 1), min_split_len)
    by_occupancy = triton.cdiv(occupancy * num_sms, max(programs, 1))
    return max(1, min(max_splits, by_len, by_occupancy))


def split_partial_buffers(
    rows: int, num_heads: int, head_dim: int, num_splits: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 scratch of split attention: ``(mid_o [rows, H, S, D], mid_lse [rows, H, S])``,
    a row per request for ``decode_attention``, per new token for ``extend_attention``;
    can be reused by every layer of one forward pass."""
    mid_o = torch.empty((rows, num_heads, num_splits, head_dim), dtype=torch.float32, device=device)
    mid_lse = torch.empty((rows, num_heads, num_splits), dtype=torch.float32, device=device)
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
    grid, then ``_merge_splits_kernel`` on ``(B, H)``; with one split the first launch
    writes ``o`` and is the only one. Every request needs at least one slot.
    ``mid_o``/``mid_lse`` (from ``split_partial_buffers`` with at least ``num_splits``
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
        mid_o, mid_lse = split_partial_buffers(
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
    _merge_splits(mid_o, mid_lse, o, batch_size, num_splits)


def _merge_splits(
    mid_o: torch.Tensor, mid_lse: torch.Tensor, o: torch.Tensor, rows: int, num_splits: int
) -> None:
    """``o[:rows]`` from the partial outputs of ``num_splits`` splits (one launch)."""
    head_dim = o.shape[-1]
    _merge_splits_kernel[(rows, o.shape[1])](
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
        BLOCK_D=_block_d(head_dim),
        **pdl.options(o.device),
    )


def _check_last_dim_contiguous(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError(f"expected a contiguous last dimension, got strides {t.stride()}")


__all__ = [
    "LOG2E",
    "MIN_PREFIX_SPLIT_LEN",
    "DecodeRope",
    "ExtendConfig",
    "choose_num_splits",
    "decode_attention",
    "default_decode_config",
    "extend_attention",
    "extend_config",
    "is_interpreted",
    "split_partial_buffers",
    "store_kv",
]
