"""Triton attention kernels and backend against a float32 torch reference.

With CUDA the compiled kernels run on the GPU, and ``TestGPUEngine`` compares the engine on
CUDA (Triton backend) with the CPU engine. Without CUDA the kernels run on CPU under
Triton's interpreter, which must be switched on (``TRITON_INTERPRET=1``) before ``triton``
is first imported in the process: ``triton.jit`` decides at decoration time, also for
``triton.language``'s own helpers (``tl.zeros``, ``tl.sum``...). Under pytest, torch's
``_dynamo`` (imported by transformers from conftest) has usually imported triton already,
so this module then runs itself in a subprocess with the variable set
(``test_interpreter_subprocess``); run it directly with
``TRITON_INTERPRET=1 pytest tests/test_triton_attention.py`` to skip that hop. Interpreter
sizes are tiny and blocks are 16. The module is skipped when ``triton`` is not importable.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import accumulate
from pathlib import Path

import pytest
import torch
import triton_util

triton_util.prepare()
CUDA = triton_util.CUDA

triton = pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[gpu]')")

from backend.attention import triton_kernels as tk  # noqa: E402
from backend.attention.base import create_attention_backend  # noqa: E402
from backend.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from backend.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from backend.forward_batch import ForwardBatch, ForwardMode  # noqa: E402
from backend.kv_pool import KVPool  # noqa: E402

RUN_HERE = triton_util.runs_here(tk.is_interpreted())


@pytest.fixture(autouse=True)
def kernels_here(request: pytest.FixtureRequest) -> None:
    triton_util.skip_unless_here(request, RUN_HERE)


def test_interpreter_subprocess() -> None:
    """Without CUDA, run this module again in a process where the interpreter is on."""
    triton_util.rerun_interpreted(__file__, RUN_HERE, noconftest=False, timeout=900)


DEVICE = triton_util.DEVICE
HEAD_DIM = 16
NUM_SLOTS = 400
# (atol, rtol) against the float32 reference computed from the same rounded inputs.
TOLERANCE = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (3e-3, 3e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class Pool:
    """One layer of a pool filled with random values, and requests at shuffled slots."""

    def __init__(self, num_kv_heads: int, dtype: torch.dtype, seed: int = 0, head_dim: int = 16):
        self.gen = torch.Generator().manual_seed(seed)
        shape = (NUM_SLOTS + 1, num_kv_heads, head_dim)
        self.k_buf = self.randn(*shape).to(dtype)
        self.v_buf = self.randn(*shape).to(dtype)
        self.order = torch.randperm(NUM_SLOTS, generator=self.gen) + 1
        self.used = 0

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen).to(DEVICE)

    def take(self, n: int) -> torch.Tensor:
        slots = self.order[self.used : self.used + n]
        self.used += n
        return slots.to(DEVICE)


def indptr(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *accumulate(lengths)], dtype=torch.int32, device=DEVICE)


def reference(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, first_pos: int
) -> torch.Tensor:
    """Float32 softmax attention: query ``i`` (at position ``first_pos + i``) over keys
    ``0..first_pos + i``; ``q`` ``[n, H, D]``, ``keys``/``values`` ``[L, Hkv, D]``."""
    group = q.shape[1] // keys.shape[1]
    k = keys.float().repeat_interleave(group, 1)
    v = values.float().repeat_interleave(group, 1)
    scores = torch.einsum("thd,shd->hts", q.float(), k) * q.shape[-1] ** -0.5
    rows = torch.arange(q.shape[0], device=q.device)[:, None] + first_pos
    allowed = torch.arange(k.shape[0], device=q.device)[None, :] <= rows
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hts,shd->thd", scores.softmax(-1), v)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------


def test_kernels_run_where_expected() -> None:
    assert tk.is_interpreted() != CUDA


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_store_kv_writes_only_the_given_slots(dtype: torch.dtype) -> None:
    pool = Pool(num_kv_heads=3, dtype=dtype, head_dim=24)
    before_k, before_v = pool.k_buf.clone(), pool.v_buf.clone()
    loc = pool.take(7)
    k = pool.randn(7, 3, 24).to(dtype)
    v = pool.randn(7, 3, 24).to(dtype)
    tk.store_kv(pool.k_buf, pool.v_buf, loc, k, v)
    assert torch.equal(pool.k_buf[loc], k) and torch.equal(pool.v_buf[loc], v)
    others = torch.ones(NUM_SLOTS + 1, dtype=torch.bool, device=DEVICE)
    others[loc] = False
    assert torch.equal(pool.k_buf[others], before_k[others])
    assert torch.equal(pool.v_buf[others], before_v[others])


def test_store_kv_casts_and_accepts_strided_rows() -> None:
    pool = Pool(num_kv_heads=2, dtype=torch.bfloat16)
    loc = pool.take(5)
    kv = pool.randn(5, 2, 2 * HEAD_DIM)  # float32, k and v interleaved in one tensor
    k, v = kv[..., :HEAD_DIM], kv[..., HEAD_DIM:]
    with pytest.raises(ValueError, match="contiguous"):
        tk.store_kv(pool.k_buf, pool.v_buf, loc, k.transpose(1, 2), v)
    tk.store_kv(pool.k_buf, pool.v_buf, loc, k, v)
    # The interpreter truncates float32 to bfloat16 (the GPU rounds to nearest even).
    rtol = 0.0 if CUDA else 2.0**-7
    for buf, src in ((pool.k_buf, k), (pool.v_buf, v)):
        torch.testing.assert_close(buf[loc], src.to(torch.bfloat16), atol=0.0, rtol=rtol)


def run_extend(
    prefix_lens: list[int],
    extend_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    dtype: torch.dtype,
    head_dim: int = HEAD_DIM,
    block_m: int = 16,
    block_n: int = 16,
    kv_dtype: torch.dtype | None = None,
    num_splits: int = 1,
    min_split_len: int = 16,
    heads_per_program: int | None = None,
) -> None:
    """Extend attention of one ragged batch against the per-request reference (``kv_dtype``:
    the pool's dtype when it is not ``dtype``; ``num_splits``: chunks of each prefix)."""
    pool = Pool(num_kv_heads, dtype, seed=sum(prefix_lens) + len(extend_lens), head_dim=head_dim)
    if kv_dtype is not None:
        pool.k_buf, pool.v_buf = pool.k_buf.to(kv_dtype), pool.v_buf.to(kv_dtype)
    slots = [pool.take(p + e) for p, e in zip(prefix_lens, extend_lens)]
    total = sum(extend_lens)
    q = pool.randn(total, num_heads, head_dim).to(dtype)
    k = pool.randn(total, num_kv_heads, head_dim).to(dtype)
    v = pool.randn(total, num_kv_heads, head_dim).to(dtype)
    out = torch.full_like(q, float("nan"))
    qo_indptr = indptr(extend_lens)
    # NaN scratch: what the kernels do not write (empty chunks' outputs) must not be read
    mid_o, mid_lse = tk.split_partial_buffers(total, num_heads, head_dim, num_splits, DEVICE)
    mid_o.fill_(float("nan"))
    mid_lse.fill_(float("nan"))
    tk.extend_attention(
        q,
        k,
        v,
        out,
        pool.k_buf,
        pool.v_buf,
        qo_indptr,
        indptr([p + e for p, e in zip(prefix_lens, extend_lens)]),
        torch.cat(slots),
        torch.tensor(prefix_lens, dtype=torch.int32, device=DEVICE),
        max(extend_lens),
        block_m=block_m,
        block_n=block_n,
        num_splits=num_splits,
        min_split_len=min_split_len,
        mid_o=mid_o,
        mid_lse=mid_lse,
        heads_per_program=heads_per_program,
    )
    for i, (p, s) in enumerate(zip(prefix_lens, slots)):
        lo, hi = int(qo_indptr[i]), int(qo_indptr[i + 1])
        # new keys come from k, not the pool
        keys = torch.cat([pool.k_buf[s[:p]].float(), k[lo:hi].float()])
        values = torch.cat([pool.v_buf[s[:p]].float(), v[lo:hi].float()])
        assert_close(out[lo:hi], reference(q[lo:hi], keys, values, p), dtype)


@pytest.mark.parametrize("group", [1, 4], ids=["mha", "gqa4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extend_ragged_batch(dtype: torch.dtype, group: int) -> None:
    """Prefix 0, 1, odd, longer than a block (37 > 16), a request spanning several query
    blocks (17 new tokens) and a request with no new tokens, in one launch; a program takes
    the whole query group (4 tokens x 4 heads in 16 rows for GQA)."""
    run_extend([0, 1, 7, 37, 3], [5, 17, 3, 1, 0], num_heads=2 * group, num_kv_heads=2, dtype=dtype)


@pytest.mark.parametrize("heads_per_program", [1, 2])
def test_extend_fewer_heads_per_program_than_the_group(heads_per_program: int) -> None:
    run_extend([0, 7, 37], [17, 3, 9], 8, 2, torch.float32, heads_per_program=heads_per_program)
    with pytest.raises(ValueError, match="does not divide"):
        run_extend([0], [3], 8, 2, torch.float32, heads_per_program=3)


@pytest.mark.parametrize("num_splits", [2, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extend_split_prefix(dtype: torch.dtype, num_splits: int) -> None:
    """Prefixes read in chunks and merged: no prefix, one token, shorter than a chunk
    (empty chunks), a ragged last chunk, and new tokens spanning two query blocks."""
    run_extend(
        [0, 1, 17, 70, 33],
        [5, 17, 3, 1, 20],
        num_heads=4,
        num_kv_heads=2,
        dtype=dtype,
        num_splits=num_splits,
    )


def test_extend_split_prefix_respects_the_minimum_chunk() -> None:
    """Chunks of at least 48 tokens: 100 cached tokens take 3 of 4 chunks, 40 take one."""
    run_extend([100, 40], [3, 6], 2, 1, torch.float32, num_splits=4, min_split_len=48)


def test_extend_single_long_request_without_prefix() -> None:
    run_extend([0], [40], num_heads=4, num_kv_heads=1, dtype=torch.float32)


def test_extend_head_dim_not_a_power_of_two_and_rectangular_blocks() -> None:
    """Also a group of 3 (10 tokens x 3 heads in 32 rows, 2 rows idle)."""
    run_extend([19, 0], [21, 2], 6, 2, torch.float32, head_dim=24, block_m=32, block_n=16)
    run_extend([33], [9], 2, 2, torch.float16, block_m=16, block_n=32)


def run_decode(
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    dtype: torch.dtype,
    num_splits: int,
    block_n: int = 16,
    q_gain: float = 1.0,
) -> None:
    pool = Pool(num_kv_heads, dtype, seed=len(seq_lens) + num_splits)
    slots = [pool.take(n) for n in seq_lens]
    q = (pool.randn(len(seq_lens), num_heads, HEAD_DIM) * q_gain).to(dtype)
    out = torch.full_like(q, float("nan"))
    tk.decode_attention(
        q,
        pool.k_buf,
        pool.v_buf,
        out,
        indptr(seq_lens),
        torch.cat(slots),
        num_splits,
        block_n=block_n,
    )
    for i, (n, s) in enumerate(zip(seq_lens, slots)):
        ref = reference(q[i : i + 1], pool.k_buf[s], pool.v_buf[s], n - 1)
        assert_close(out[i : i + 1], ref, dtype)


@pytest.mark.parametrize("num_splits", [1, 3, 8])
@pytest.mark.parametrize("group", [1, 4], ids=["mha", "gqa4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_split_k(dtype: torch.dtype, group: int, num_splits: int) -> None:
    """Lengths 1 (later splits empty), 16 (one block), 33 and 70 (several splits, one
    partial block each, and an empty last split with 3 splits of 32)."""
    run_decode([1, 16, 33, 70], 2 * group, 2, dtype, num_splits)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_peaked_softmax_from_large_queries(dtype: torch.dtype) -> None:
    """|q| around 10-40 (peaked attention): the scores keep the query's precision (the
    softmax scale is applied in float32, not folded into a rounded query)."""
    run_decode([7, 70], 8, 2, dtype, num_splits=2, q_gain=12.0)


def test_decode_gqa_group_not_a_power_of_two() -> None:
    run_decode([5, 40], num_heads=9, num_kv_heads=3, dtype=torch.float32, num_splits=2)


@pytest.mark.parametrize(
    ("group", "num_splits", "head_dim"), [(1, 1, 16), (4, 3, 16), (3, 8, 24), (4, 8, 24)]
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_with_rope_equals_rope_store_then_decode(
    dtype: torch.dtype, group: int, num_splits: int, head_dim: int
) -> None:
    """``decode_attention(rope=...)`` (RoPE, KV write and attention in the first launch)
    gives the output and pool of ``fused_ops.rope`` + ``store_kv`` + plain decode. Lengths
    1, 16, 17, 32, 33, 64 and 70 put the new token alone in, first in or last in its chunk
    (blocks of 16), 8 splits leave late ones empty; two CUDA-graph padding rows (slot 0 at
    position 0, identical inputs) write the same slot; q/k/v are views of one fused
    projection, as the model passes them."""
    from backend.fused_ops import rope_reference

    seq_lens, num_kv_heads, padding = [1, 16, 17, 32, 33, 64, 70], 2, 2
    num_heads = group * num_kv_heads
    pool = Pool(num_kv_heads, dtype, seed=7 + num_splits, head_dim=head_dim)
    slots = [pool.take(n) for n in seq_lens] + [
        torch.zeros(1, dtype=torch.int64, device=DEVICE)
    ] * padding
    loc = torch.stack([s[-1] for s in slots])
    positions = torch.tensor([n - 1 for n in seq_lens] + [0] * padding, device=DEVICE)
    qkv = pool.randn(len(slots), num_heads + 2 * num_kv_heads, head_dim).to(dtype)
    qkv[-padding:] = qkv[-1]
    angles = torch.rand(80, head_dim // 2, generator=pool.gen) * 6
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(DEVICE)
    sin_signed = torch.cat([-angles.sin(), angles.sin()], -1).to(DEVICE)
    q_raw, k_raw = qkv[:, :num_heads], qkv[:, num_heads : num_heads + num_kv_heads]
    v = qkv[:, num_heads + num_kv_heads :]
    k_buf, v_buf = pool.k_buf.clone(), pool.v_buf.clone()
    q = rope_reference(q_raw.float(), positions, cos, sin_signed).to(dtype)
    k = rope_reference(k_raw.float(), positions, cos, sin_signed).to(dtype)
    tk.store_kv(k_buf, v_buf, loc, k, v.contiguous())
    expected = torch.empty_like(q)
    kv = (indptr([len(s) for s in slots]), torch.cat(slots), num_splits)
    tk.decode_attention(q, k_buf, v_buf, expected, *kv, block_n=16)
    out = torch.full_like(q, float("nan"))
    before = pool.k_buf.clone()
    rope = tk.DecodeRope(k_raw, v, loc, positions, cos, sin_signed)
    tk.decode_attention(q_raw, pool.k_buf, pool.v_buf, out, *kv, block_n=16, rope=rope)
    assert_close(out, expected.float(), dtype)
    atol, rtol = TOLERANCE[dtype]  # the kernel's rotation may round one ulp apart from torch's
    torch.testing.assert_close(pool.k_buf.float(), k_buf.float(), atol=atol, rtol=rtol)
    assert torch.equal(pool.v_buf, v_buf)
    changed = (pool.k_buf != before).flatten(1).any(1).nonzero().flatten()
    assert set(changed.tolist()) == set(loc.tolist())


@pytest.mark.skipif(not CUDA, reason="float8 needs a GPU (the interpreter has no float8)")
def test_fp8_kv_cache_extend_reads_the_float8_prefix() -> None:
    """Extend over float8 prefixes (0, 1, odd, several blocks) with bf16 new tokens."""
    run_extend([0, 1, 37, 70], [5, 17, 3, 20], 8, 2, torch.bfloat16, kv_dtype=torch.float8_e4m3fn)


@pytest.mark.skipif(not CUDA, reason="float8 needs a GPU (the interpreter has no float8)")
@pytest.mark.parametrize(
    ("num_splits", "block_n"), [(3, 16), (1, None)], ids=["3-splits", "1-split-default-blocks"]
)
@pytest.mark.parametrize("head_dim", [16, 24, 128])
@pytest.mark.parametrize("with_rope", [False, True], ids=["rotated", "rope-in-kernel"])
def test_fp8_kv_cache_store_and_decode(
    with_rope: bool, head_dim: int, num_splits: int, block_n: int | None
) -> None:
    """A float8 e4m3 pool: ``store_kv`` (and the RoPE decode kernel's own write) round like
    torch's cast; decode over the float8 pool (values read as 32-bit words, masked past
    head_dim 24 in a block of 32; split partials, or one split writing the output with the
    device's default launch configuration) matches the float32 reference computed on the
    dequantized pool within bf16's tolerance."""
    from backend.fused_ops import rope_reference

    seq_lens, num_heads, num_kv_heads = [1, 17, 70, 300], 8, 2
    pool = Pool(num_kv_heads, torch.bfloat16, seed=11, head_dim=head_dim)
    pool.k_buf = pool.k_buf.to(torch.float8_e4m3fn)
    pool.v_buf = pool.v_buf.to(torch.float8_e4m3fn)
    assert tk._e4m3_words_ok(pool.v_buf)
    slots = [pool.take(n) for n in seq_lens]
    loc = torch.stack([s[-1] for s in slots])
    positions = torch.tensor([n - 1 for n in seq_lens], device=DEVICE)
    qkv = pool.randn(len(seq_lens), num_heads + 2 * num_kv_heads, head_dim).to(torch.bfloat16)
    q, k = qkv[:, :num_heads], qkv[:, num_heads : num_heads + num_kv_heads]
    v = qkv[:, num_heads + num_kv_heads :]
    angles = torch.rand(400, head_dim // 2, generator=pool.gen) * 6
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(DEVICE)
    sin_signed = torch.cat([-angles.sin(), angles.sin()], -1).to(DEVICE)
    k_rot = rope_reference(k.float(), positions, cos, sin_signed).to(torch.bfloat16)
    q_rot = rope_reference(q.float(), positions, cos, sin_signed).to(torch.bfloat16)
    out = torch.full_like(q_rot, float("nan"))
    kv = (indptr(seq_lens), torch.cat(slots), num_splits)
    if with_rope:
        rope = tk.DecodeRope(k, v, loc, positions, cos, sin_signed)
        tk.decode_attention(q, pool.k_buf, pool.v_buf, out, *kv, block_n=block_n, rope=rope)
        # the same kernel on a bf16 pool stores the key float8 rounds from: bit-exact
        k_bf16, v_bf16 = pool.k_buf.to(torch.bfloat16), pool.v_buf.to(torch.bfloat16)
        tk.decode_attention(q, k_bf16, v_bf16, torch.empty_like(out), *kv, rope=rope)
        assert torch.equal(pool.k_buf[loc].float(), k_bf16[loc].to(torch.float8_e4m3fn).float())
    else:
        tk.store_kv(pool.k_buf, pool.v_buf, loc, k_rot, v.contiguous())
        tk.decode_attention(q_rot, pool.k_buf, pool.v_buf, out, *kv, block_n=block_n)
    stored_k, expected_k = pool.k_buf[loc].float(), k_rot.to(torch.float8_e4m3fn).float()
    if with_rope:  # the kernel's float32 rotation may round one bf16 ulp apart from torch's
        torch.testing.assert_close(stored_k, expected_k, atol=1e-3, rtol=0.13)
    else:
        assert torch.equal(stored_k, expected_k)
    assert torch.equal(
        pool.v_buf[loc].view(torch.uint8), v.to(torch.float8_e4m3fn).view(torch.uint8)
    )
    for i, (n, s) in enumerate(zip(seq_lens, slots)):
        ref = reference(q_rot[i : i + 1], pool.k_buf[s].float(), pool.v_buf[s].float(), n - 1)
        assert_close(out[i : i + 1], ref, torch.bfloat16)


@pytest.mark.skipif(not CUDA, reason="float8 needs a GPU (the interpreter has no float8)")
def test_fp8_values_read_as_words_or_bytes_agree() -> None:
    """A float8 value buffer the word loads may not read (here: a view at an odd byte
    offset) takes Triton's own conversion; both paths give the same output."""
    seq_lens, num_heads, num_kv_heads, head_dim = [5, 64, 129], 8, 2, 32
    pool = Pool(num_kv_heads, torch.bfloat16, seed=5, head_dim=head_dim)
    k_buf = pool.k_buf.to(torch.float8_e4m3fn)
    padded = torch.empty(pool.v_buf.numel() + 1, dtype=torch.float8_e4m3fn, device=DEVICE)
    odd = padded[1:].view(pool.v_buf.shape)  # same values, address not a multiple of 4
    odd.copy_(pool.v_buf.to(torch.float8_e4m3fn))
    aligned = odd.clone()
    assert tk._e4m3_words_ok(aligned) and not tk._e4m3_words_ok(odd)
    slots = torch.cat([pool.take(n) for n in seq_lens])
    q = pool.randn(len(seq_lens), num_heads, head_dim).to(torch.bfloat16)
    outs = []
    for v_buf in (aligned, odd):
        outs.append(torch.empty_like(q))
        tk.decode_attention(q, k_buf, v_buf, outs[-1], indptr(seq_lens), slots, 2, block_n=16)
    torch.testing.assert_close(outs[0], outs[1], atol=2e-3, rtol=2e-2)


def test_choose_num_splits() -> None:
    assert tk.choose_num_splits(8, 100, num_sms=132) == 1  # short: one split
    assert tk.choose_num_splits(8, 4096, num_sms=132) == 16  # long, few programs
    assert tk.choose_num_splits(64 * 8, 4096, num_sms=132) == 1  # programs fill the GPU
    assert tk.choose_num_splits(4 * 8, 4096, num_sms=132) == 9
    assert tk.choose_num_splits(8, 4096, num_sms=132, max_splits=4) == 4
    assert tk.choose_num_splits(8, 4096, num_sms=132, min_split_len=1024) == 4
    assert tk.choose_num_splits(4 * 8, 4096, num_sms=132, occupancy=1) == 5


# ---------------------------------------------------------------------------------------------
# backend: same ForwardBatch through the Triton and torch backends
# ---------------------------------------------------------------------------------------------


def make_pool(num_layers: int, num_kv_heads: int) -> KVPool:
    pool = KVPool(NUM_SLOTS, num_layers, num_kv_heads, HEAD_DIM, torch.float32, DEVICE)
    gen = torch.Generator().manual_seed(1)
    for buf in pool.k_buffers + pool.v_buffers:
        buf.copy_(torch.randn(buf.shape, generator=gen))
    return pool


def twin_pools(num_layers: int, num_kv_heads: int) -> tuple[KVPool, KVPool]:
    a = make_pool(num_layers, num_kv_heads)
    b = make_pool(num_layers, num_kv_heads)
    return a, b


def forward_both(
    mode: ForwardMode,
    prefix_lens: list[int],
    extend_lens: list[int],
    slots: list[torch.Tensor],
    pools: tuple[KVPool, KVPool],
    num_heads: int,
    seed: int,
    triton_backend: TritonAttentionBackend,
) -> None:
    """Run every layer of one batch through both backends and compare outputs and pools."""
    torch_backend = TorchAttentionBackend(pools[1])
    total = sum(extend_lens)
    out_cache_loc = torch.cat([s[p:] for s, p in zip(slots, prefix_lens)])
    batches = [
        ForwardBatch(
            mode=mode,
            input_ids=torch.zeros(total, dtype=torch.int64, device=DEVICE),
            positions=torch.zeros(total, dtype=torch.int64, device=DEVICE),
            out_cache_loc=out_cache_loc,
            prefix_lens=prefix_lens,
            extend_lens=extend_lens,
            kv_slots=slots,
            attn_backend=backend,
        )
        for backend in (triton_backend, torch_backend)
    ]
    for batch in batches:
        batch.attn_backend.init_forward_metadata(batch)
    gen = torch.Generator().manual_seed(seed)
    num_kv_heads = pools[0].k_buffers[0].shape[1]
    for layer in range(len(pools[0].k_buffers)):
        q = torch.randn(total, num_heads, HEAD_DIM, generator=gen).to(DEVICE)
        k = torch.randn(total, num_kv_heads, HEAD_DIM, generator=gen).to(DEVICE)
        v = torch.randn(total, num_kv_heads, HEAD_DIM, generator=gen).to(DEVICE)
        ours = batches[0].attn_backend.forward(q, k, v, layer, batches[0])
        theirs = batches[1].attn_backend.forward(q, k, v, layer, batches[1])
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    for a, b in zip(
        pools[0].k_buffers + pools[0].v_buffers, pools[1].k_buffers + pools[1].v_buffers
    ):
        assert torch.equal(a, b)


def test_backend_extend_then_decode_matches_torch_backend() -> None:
    """Two layers, GQA 2; decode includes a group sharing a 40-slot prefix (the torch
    backend's shared-prefix path) next to unrelated requests."""
    pools = twin_pools(num_layers=2, num_kv_heads=2)
    backend = TritonAttentionBackend(
        pools[0], num_kv_splits=3, num_extend_splits=3, min_prefix_split_len=16
    )
    order = torch.randperm(NUM_SLOTS, generator=torch.Generator().manual_seed(2)) + 1
    order = order.to(DEVICE)
    # extend: prompts of 40 (fresh), 6 + 3 and 34 + 2 over cached prefixes (34: in 3 chunks),
    # then 1 after 20 cached (a decode tail)
    prefix_lens, extend_lens = [0, 6, 34, 20], [40, 3, 2, 1]
    slots, used = [], 0
    for p, e in zip(prefix_lens, extend_lens):
        slots.append(order[used : used + p + e])
        used += p + e
    forward_both(ForwardMode.EXTEND, prefix_lens, extend_lens, slots, pools, 4, 3, backend)
    # decode: two forks of the first request (shared 40 slots), and the other two requests
    decode_slots = [
        torch.cat([slots[0], order[used : used + 1]]),
        torch.cat([slots[0], order[used + 1 : used + 3]]),
        torch.cat([slots[1], order[used + 3 : used + 4]]),
        torch.cat([slots[2], order[used + 4 : used + 5]]),
    ]
    seq_lens = [int(s.numel()) for s in decode_slots]
    forward_both(
        ForwardMode.DECODE, [n - 1 for n in seq_lens], [1] * 4, decode_slots, pools, 4, 4, backend
    )


@pytest.mark.parametrize(
    ("prefix_lens", "extend_lens", "tail"),
    [([0, 6, 34, 12, 0], [40, 3, 1, 1, 1], 3), ([20, 0], [1, 1], 2), ([5, 9], [1, 7], 0)],
    ids=["prefill-then-decoding", "all-one-token", "one-token-first"],
)
def test_backend_mixed_extend_takes_the_decode_kernels_for_one_token_tail(
    prefix_lens: list[int], extend_lens: list[int], tail: int
) -> None:
    """A mixed pass (prompt chunks, then running requests adding one token each): the
    trailing one-token requests go through the decode kernels, the others through the
    extend kernel; outputs and pool equal the torch backend's."""
    pools = twin_pools(num_layers=2, num_kv_heads=2)
    backend = TritonAttentionBackend(pools[0])
    order = torch.randperm(NUM_SLOTS, generator=torch.Generator().manual_seed(5)) + 1
    order = order.to(DEVICE)
    slots, used = [], 0
    for p, e in zip(prefix_lens, extend_lens):
        slots.append(order[used : used + p + e])
        used += p + e
    spy = backend.init_forward_metadata
    tails = []

    def record(batch: ForwardBatch) -> None:
        spy(batch)
        decode_tail = batch.attn_metadata.decode_tail
        tails.append(decode_tail.num_requests if decode_tail else 0)

    backend.init_forward_metadata = record  # type: ignore[method-assign]
    forward_both(ForwardMode.EXTEND, prefix_lens, extend_lens, slots, pools, 4, 6, backend)
    assert tails == [tail]


def test_create_attention_backend_selection() -> None:
    cpu_pool = KVPool(4, 1, 1, HEAD_DIM, torch.float32)
    assert isinstance(create_attention_backend(cpu_pool), TorchAttentionBackend)
    assert isinstance(create_attention_backend(cpu_pool, "triton"), TritonAttentionBackend)
    with pytest.raises(ValueError, match="attention backend"):
        create_attention_backend(cpu_pool, "flash")
    if CUDA:
        gpu_pool = KVPool(4, 1, 1, HEAD_DIM, torch.float32, "cuda")
        assert isinstance(create_attention_backend(gpu_pool), TritonAttentionBackend)
        assert isinstance(create_attention_backend(gpu_pool, "torch"), TorchAttentionBackend)


# ---------------------------------------------------------------------------------------------
# engine, end to end
# ---------------------------------------------------------------------------------------------

TINY_PROMPTS = ["The capital of France is", "The capital of France is Paris and", "1, 2, 3,"]


@pytest.mark.skipif(CUDA, reason="the CPU-interpreter engine run; TestGPUEngine covers CUDA")
def test_engine_tiny_model_with_interpreted_triton_matches_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole engine on a tiny random Llama (3 layers, GQA 2): Triton kernels under the
    interpreter give the torch backend's greedy tokens, including over a cached prefix."""
    from tiny_models import write_tiny_model

    from backend import engine as engine_module
    from backend.engine import Engine

    folder = write_tiny_model(tmp_path / "llama", "llama")
    params = {"temperature": 0, "max_new_tokens": 6}
    with Engine(str(folder), max_total_tokens=512, chunked_prefill_size=8) as eng:
        expected = [r["output_ids"] for r in eng.generate(TINY_PROMPTS, params)]

    def select(pool: KVPool, name: str = "auto") -> object:
        return create_attention_backend(pool, "triton")

    monkeypatch.setattr(engine_module, "create_attention_backend", select)
    with Engine(str(folder), max_total_tokens=512, chunked_prefill_size=8) as eng:
        assert isinstance(eng.scheduler.runner.attn_backend, TritonAttentionBackend)
        first = eng.generate(TINY_PROMPTS, params)
        assert [r["output_ids"] for r in first] == expected
        eng.wait_idle()
        eng.check_kv_invariant()


def runner_hidden_states(
    model: torch.nn.Module, backend_name: str, dtype: torch.dtype
) -> list[torch.Tensor]:
    """Hidden states of a prefill in two chunks (the second over a cached prefix) and three
    decode steps, for three requests, through ``ModelRunner`` with one attention backend."""
    from backend.kv_pool import ReqToTokenTable
    from backend.model_runner import ModelRunner

    pool = KVPool(1024, model.num_layers, model.num_kv_heads, model.head_dim, dtype, DEVICE)
    table = ReqToTokenTable(4, 512, DEVICE)
    runner = ModelRunner(model, table, create_attention_backend(pool, backend_name))
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (150, 9, 70)]
    rows = [1, 2, 3]
    for row, prompt in zip(rows, prompts):
        table.table[row, : len(prompt) + 3] = pool.alloc(len(prompt) + 3).to(DEVICE)
    split = [min(64, len(p) - 1) for p in prompts]
    outs = [runner.extend(rows, [0, 0, 0], [p[:c] for p, c in zip(prompts, split)])]
    outs.append(runner.extend(rows, split, [p[c:] for p, c in zip(prompts, split)]))
    seq_lens = [len(p) for p in prompts]
    for step in range(3):
        seq_lens = [n + 1 for n in seq_lens]
        outs.append(runner.decode(rows, seq_lens, [7 + step, 8 + step, 9 + step]))
    return outs


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("fused", [False, True], ids=["separate-qkv", "fused-qkv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_model_runner_on_cuda_triton_matches_torch(dtype: torch.dtype, fused: bool) -> None:
    """A random 2-layer Llama shaped like SmolLM2's attention (9 query heads, 3 KV heads,
    head dim 64) on the GPU: the Triton backend's hidden states match torch sdpa's; with
    fused projections, decode steps rotate and store K/V inside the decode kernel."""
    from transformers import LlamaConfig

    from backend.models.llama import CausalLM

    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=576,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    model = CausalLM(config).to(device=DEVICE, dtype=dtype).eval()
    if fused:
        model.fuse_projections()
    ours = runner_hidden_states(model, "triton", dtype)
    theirs = runner_hidden_states(model, "torch", dtype)
    atol, rtol = (2e-4, 2e-4) if dtype == torch.float32 else (1e-1, 5e-2)  # bf16: ~3 ulp
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


GPU_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far away,",
    "def fibonacci(n):",
    "You are a careful assistant. Answer in one short sentence. The sky is blue, grass is "
    "green, water boils at 100 degrees Celsius at sea level. Question: what colour is grass?",
    "You are a careful assistant. Answer in one short sentence. The sky is blue, grass is "
    "green, water boils at 100 degrees Celsius at sea level. Question: where does water boil?",
    "A list of fruits:\n-",
    " ".join(f"item {i}," for i in range(120)),  # ~480 tokens: several blocks and splits
]
GPU_GREEDY = {"temperature": 0, "max_new_tokens": 32}


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
class TestGPUEngine:
    """The engine on CUDA with the Triton backend against the CPU engine (torch backend)."""

    @pytest.fixture(scope="class")
    def cpu_reference(self) -> list[list[int]]:
        from backend.engine import Engine

        with Engine(max_total_tokens=8192) as eng:
            return [r["output_ids"] for r in eng.generate(GPU_PROMPTS, GPU_GREEDY)]

    @pytest.mark.parametrize("chunked_prefill_size", [2048, 7])
    def test_float32_greedy_matches_cpu(
        self, cpu_reference: list[list[int]], chunked_prefill_size: int
    ) -> None:
        from backend.engine import Engine

        with Engine(
            device="cuda",
            dtype="float32",
            max_total_tokens=8192,
            chunked_prefill_size=chunked_prefill_size,
        ) as eng:
            assert isinstance(eng.scheduler.runner.attn_backend, TritonAttentionBackend)
            first = eng.generate(GPU_PROMPTS, GPU_GREEDY)
            assert [r["output_ids"] for r in first] == cpu_reference
            again = eng.generate(GPU_PROMPTS, GPU_GREEDY)  # over cached prefixes
            assert [r["output_ids"] for r in again] == cpu_reference
            eng.wait_idle()
            eng.check_kv_invariant()

    def test_bfloat16_first_tokens_match_torch_backend(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """bf16 (the CUDA default): each prompt's first token (from the prefill) agrees with
        the torch backend on the same GPU, and decoding runs to the end."""
        from backend import engine as engine_module
        from backend.engine import Engine

        with Engine(device="cuda", max_total_tokens=8192) as eng:
            assert isinstance(eng.scheduler.runner.attn_backend, TritonAttentionBackend)
            ours = eng.generate(GPU_PROMPTS, {**GPU_GREEDY, "ignore_eos": True})
            eng.wait_idle()
            eng.check_kv_invariant()

        def torch_backend(pool: KVPool, name: str = "auto") -> TorchAttentionBackend:
            return TorchAttentionBackend(pool)

        monkeypatch.setattr(engine_module, "create_attention_backend", torch_backend)
        with Engine(device="cuda", max_total_tokens=8192) as eng:
            theirs = eng.generate(GPU_PROMPTS, {"temperature": 0, "max_new_tokens": 1})
        assert [r["output_ids"][:1] for r in ours] == [r["output_ids"] for r in theirs]
        assert all(len(r["output_ids"]) == GPU_GREEDY["max_new_tokens"] for r in ours)
