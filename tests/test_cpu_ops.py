"""The CPU engine's native ops (``backend/cpu_ops.py``) against their torch references, and
the native decoder (``backend/native_decoder.py``) against the per-op path on the real model.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig

from backend import cpu_ops
from backend.attention.torch_backend import NATIVE_DECODE_MAX_KV_TOKENS
from backend.engine import Engine
from backend.fused_ops import rms_norm_reference, rope_reference
from backend.models.llama import rope_tables
from backend.native_decoder import NativeDecoder, unsupported_reason

DTYPES = [torch.float32, torch.bfloat16]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def close(dtype: torch.dtype) -> dict[str, float]:
    """Float32: summation order only; bfloat16: one rounding of the output."""
    return (
        {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 1e-30}
    )


# ---- element-wise ops ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm_matches_torch(dtype: torch.dtype, with_delta: bool) -> None:
    residual = torch.randn(5, 100, generator=gen()).to(dtype)  # 100: not a multiple of 8
    delta = torch.randn(5, 100, generator=gen(1)).to(dtype) if with_delta else None
    weight = torch.randn(100, generator=gen(2)).to(dtype)
    expected_residual = residual.clone()
    if delta is not None:
        expected_residual.add_(delta)
    expected = rms_norm_reference(expected_residual, weight, 1e-5)
    out = cpu_ops.add_rms_norm_(delta, residual, weight, 1e-5)
    assert torch.equal(residual, expected_residual)  # the residual is updated in place
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected, **close(dtype))


def test_add_rms_norm_mixed_dtypes() -> None:
    """A bfloat16 delta into a float32 residual, the output in bfloat16."""
    residual = torch.randn(3, 64, generator=gen())
    delta = torch.randn(3, 64, generator=gen(1)).bfloat16()
    weight = torch.randn(64, generator=gen(2))
    expected = rms_norm_reference(residual + delta.float(), weight, 1e-6)
    out = cpu_ops.add_rms_norm_(delta, residual, weight, 1e-6, out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_torch(dtype: torch.dtype) -> None:
    gate_up = torch.randn(4, 2 * 37, generator=gen()).to(dtype) * 8  # 37: a scalar tail
    gate_up[0, 0], gate_up[0, 1] = -100.0, 100.0  # exp far out of range
    gate, up = gate_up.chunk(2, -1)
    torch.testing.assert_close(cpu_ops.silu_and_mul(gate_up), F.silu(gate) * up, **close(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 6])
def test_rope_of_a_strided_view_matches_torch(dtype: torch.dtype, head_dim: int) -> None:
    """q and k as neighbouring heads of a fused projection's output (rows strided)."""
    cos, sin = rope_tables(LlamaConfig(), head_dim, 512)
    qkv = torch.randn(4, 7 * head_dim, generator=gen()).to(dtype)
    x = qkv[:, : 5 * head_dim].view(4, 5, head_dim)
    positions = torch.tensor([0, 1, 300, 511])
    out = cpu_ops.rope(x, positions, cos, sin)
    assert out.is_contiguous() and out.dtype == dtype
    expected = rope_reference(x.float(), positions, cos, sin)
    torch.testing.assert_close(out.float(), expected, **close(dtype))
    with pytest.raises(ValueError, match="position outside"):
        cpu_ops.rope(x, torch.tensor([0, 1, 2, 512]), cos, sin)


def test_malformed_arguments_are_refused() -> None:
    """What would make the C code read out of bounds is refused by the wrappers."""
    cos, sin = rope_tables(LlamaConfig(), 64, 16)
    x = torch.randn(4, 2, 64)
    for args, message in [
        ((x, torch.arange(4), cos[:, :32], sin[:, :32]), "RoPE tables"),
        ((x, torch.arange(1), cos, sin), "positions"),
        ((torch.randn(4, 2, 5), torch.arange(4), cos, sin), "even head dim"),
    ]:
        with pytest.raises(ValueError, match=message):
            cpu_ops.rope(*args)
    with pytest.raises(ValueError, match="even width"):
        cpu_ops.silu_and_mul(torch.randn(2, 7))
    codes = torch.zeros(64, 32, dtype=torch.uint8)  # a q4 64 x 64 matrix
    good = torch.ones(64, 2, 2, dtype=torch.bfloat16)
    assert cpu_ops.qmatmul(cpu_ops.Q4, codes, good, torch.randn(1, 64)).shape == (1, 64)
    for scales in (good[:1], good.float(), good.transpose(0, 1).contiguous()):
        with pytest.raises(ValueError, match="bfloat16"):
            cpu_ops.qmatmul(cpu_ops.Q4, codes, scales, torch.randn(1, 64))
    with pytest.raises(ValueError, match="contiguous"):
        cpu_ops.dequantize(cpu_ops.Q4, codes.t().contiguous().t(), good)


def test_nan_activations_stay_nan() -> None:
    """A NaN in an activation group makes the products NaN, as a float product would."""
    x = torch.randn(2, 64)
    x[0, 5] = float("nan")
    for kind, weights, scales in [
        (cpu_ops.Q4, torch.full((8, 32), 0x35, dtype=torch.uint8), torch.ones(8, 2, 2)),
        (cpu_ops.Q8, torch.ones(8, 64, dtype=torch.int8), torch.ones(8)),
    ]:
        out = cpu_ops.qmatmul(kind, weights, scales.bfloat16(), x)
        assert bool(out[0].isnan().all()) and bool(out[1].isfinite().all())


def test_non_finite_activations_propagate_through_the_gemm_as_through_qmatmul() -> None:
    """The integer GEMM (where the CPU has it) turns NaN and inf activations into the same
    non-finite outputs as the row-by-row kernel (a group with an inf: NaN, its dot being
    0 * inf), the other rows staying finite."""
    x = torch.randn(6, 64, generator=gen())
    x[0, 5], x[2, 40], x[3, 1], x[3, 2] = float("nan"), float("inf"), float("inf"), -float("inf")
    x[1, 10], x[4, 63] = float("inf"), -float("inf")
    codes = torch.randint(0, 256, (48, 32), dtype=torch.uint8, generator=gen())
    values = torch.randint(-127, 128, (48, 64), dtype=torch.int8, generator=gen())
    for kind, weights, scales in [
        (cpu_ops.Q4, codes, torch.rand(48, 2, 2, generator=gen()) - 0.5),
        (cpu_ops.Q8, values, torch.rand(48, generator=gen())),
    ]:
        parts = (kind, weights, scales.bfloat16())
        gemm, rows = cpu_ops.qgemm(*parts, x), cpu_ops.qmatmul(*parts, x)
        if gemm is None:
            pytest.skip("no integer GEMM on this CPU")
        assert bool(rows[:5].isnan().all()) and bool(rows[5].isfinite().all())
        assert torch.equal(gemm.isnan(), rows.isnan()) and torch.equal(gemm.isinf(), rows.isinf())
        scale = float(rows[5].abs().max())
        torch.testing.assert_close(gemm[5], rows[5], rtol=1e-5, atol=1e-5 * scale)


# ---- decode attention ----------------------------------------------------------------------


def sdpa_reference(
    q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, slots: list[torch.Tensor]
) -> torch.Tensor:
    out = []
    for b, s in enumerate(slots):
        keys = k_buf[s].float().transpose(0, 1)
        values = v_buf[s].float().transpose(0, 1)
        heads, kv_heads = q.shape[1], keys.shape[0]
        query = q[b].float().view(kv_heads, heads // kv_heads, -1)
        out.append(F.scaled_dot_product_attention(query, keys, values).reshape(heads, -1))
    return torch.stack(out)


@pytest.mark.parametrize("kv_dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (9, 3), (8, 2)])
def test_decode_attention_matches_sdpa(kv_dtype: torch.dtype, heads: int, kv_heads: int) -> None:
    """New K/V stored exactly at their slots, then attention over each request's (padded,
    scattered) slots, lengths 1, odd and long; GQA groups of 1, 3 and 4."""
    dim, num_slots = 64, 600
    g = gen()
    k_buf = torch.randn(num_slots, kv_heads, dim, generator=g).to(kv_dtype)
    v_buf = torch.randn(num_slots, kv_heads, dim, generator=g).to(kv_dtype)
    lens = [1, 7, 513]
    perm = torch.randperm(num_slots - 1, generator=g) + 1
    slots, start = [], 0
    for n in lens:
        slots.append(perm[start : start + n])
        start += n
    q = torch.randn(3, heads, dim, generator=g)
    new_kv = torch.randn(3, 2 * kv_heads, dim, generator=g)  # k and v as one strided buffer
    k, v = new_kv[:, :kv_heads], new_kv[:, kv_heads:]
    loc = torch.stack([s[-1] for s in slots])
    padded = torch.nn.utils.rnn.pad_sequence(slots, batch_first=True)
    expected_k, expected_v = k_buf.clone(), v_buf.clone()
    expected_k[loc], expected_v[loc] = k.to(kv_dtype), v.to(kv_dtype)
    out = cpu_ops.decode_attention(q, k, v, k_buf, v_buf, loc, padded, torch.tensor(lens))
    assert torch.equal(k_buf, expected_k) and torch.equal(v_buf, expected_v)
    expected = sdpa_reference(q, expected_k, expected_v, slots)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_decode_attention_refuses_bad_indices_before_writing() -> None:
    k_buf, v_buf = torch.zeros(16, 2, 8), torch.zeros(16, 2, 8)
    q, k, v = torch.randn(1, 4, 8), torch.ones(1, 2, 8), torch.ones(1, 2, 8)
    slots = torch.tensor([[1, 2, 3]])
    for loc, row, lens, message in [
        (torch.tensor([16]), slots, torch.tensor([3]), "slot outside"),
        (torch.tensor([3]), torch.tensor([[1, -2, 3]]), torch.tensor([3]), "slot outside"),
        (torch.tensor([3]), slots, torch.tensor([4]), "length 4 outside"),
        (torch.tensor([3]), slots, torch.tensor([0]), "length 0 outside"),
    ]:
        with pytest.raises(ValueError, match=message):
            cpu_ops.decode_attention(q, k, v, k_buf, v_buf, loc, row, lens)
    assert not k_buf.any() and not v_buf.any()
    with pytest.raises(ValueError, match="int64"):
        cpu_ops.decode_attention(q, k, v, k_buf, v_buf, torch.tensor([3.0]), slots, slots[0])


# ---- float32 GEMV ---------------------------------------------------------------------------

KERNEL_LEVELS = cpu_ops.quant_kernels()[1]  # the float32 GEMV follows the active level


@pytest.fixture(params=KERNEL_LEVELS)
def kernels(request: pytest.FixtureRequest) -> Iterator[str]:
    cpu_ops.quant_kernels(request.param)
    yield request.param
    cpu_ops.quant_kernels("best")


@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize(("n", "k"), [(960, 576), (7, 13), (4, 8), (5, 1537), (6, 32)])
def test_fmatmul_matches_a_float64_reference(
    kernels: str, x_dtype: torch.dtype, n: int, k: int
) -> None:
    """Every row count (pairs and a last single row), short last weight tiles (n % 4), k % 8
    and k % 16 tails; the bias; bfloat16 activations are converted, the output is in their
    dtype."""
    weight = torch.randn(n, k, generator=gen(1))
    bias = torch.randn(n, generator=gen(2))
    x = torch.randn(9, k, generator=gen(3)).to(x_dtype)
    for rows in (1, 2, 3, 8, 9):
        for b in (None, bias):
            got = cpu_ops.fmatmul(weight, x[:rows], b)
            ref = x[:rows].double() @ weight.double().T + (0 if b is None else b.double())
            assert got.dtype == x_dtype
            torch.testing.assert_close(got.double(), ref.to(x_dtype).double(), **close(x_dtype))


def test_fmatmul_rows_do_not_depend_on_the_batch(kernels: str) -> None:
    """A row's result is bit-identical alone, first or second of a pair, or last and odd."""
    weight = torch.randn(37, 100, generator=gen(4))
    x = torch.randn(5, 100, generator=gen(5))
    together = cpu_ops.fmatmul(weight, x)
    for r in range(5):
        assert torch.equal(cpu_ops.fmatmul(weight, x[r : r + 1])[0], together[r])
    strided = torch.randn(5, 130, generator=gen(6))[:, :100]
    assert torch.equal(cpu_ops.fmatmul(weight, strided), cpu_ops.fmatmul(weight, strided.clone()))


def test_fmatmul_refuses_malformed_arguments() -> None:
    weight = torch.randn(8, 16)
    with pytest.raises(ValueError, match="does not match"):
        cpu_ops.fmatmul(weight, torch.randn(2, 15))
    with pytest.raises(ValueError, match="contiguous float32"):
        cpu_ops.fmatmul(weight.T, torch.randn(2, 8))
    with pytest.raises(ValueError, match="contiguous float32"):
        cpu_ops.fmatmul(weight.bfloat16(), torch.randn(2, 16))
    with pytest.raises(ValueError, match="bias"):
        cpu_ops.fmatmul(weight, torch.randn(2, 16), torch.randn(7))


# ---- the native decoder on the embedded model ----------------------------------------------


@pytest.fixture(scope="module", params=["int4", "int8", None])  # None: float32 matrices
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with Engine(quantization=request.param, max_total_tokens=2048) as eng:
        yield eng
    torch.set_num_threads(previous)


@pytest.mark.parametrize("batch", [3, 40])  # 40: past the prefill GEMM's row threshold
def test_native_step_equals_the_per_op_path(engine: Engine, batch: int) -> None:
    """Logits of one decode step of several requests (different lengths, scattered slots)
    are bit-identical through the native decoder and through the model op by op, and both
    write the same K/V (float32 matrices: the decoder takes 3 requests, not 40)."""
    runner = engine.scheduler.runner
    decoder = runner.native_decoder
    assert isinstance(decoder, NativeDecoder)
    assert decoder.takes(batch) == (engine.config.quantization is not None or batch == 3)
    engine.wait_idle()
    engine.flush_cache()
    table, pool = runner.table.table, engine.pool
    rows = list(range(1, batch + 1))
    lens = [[9, 1, 130][i] if i < 3 else 2 + i for i in range(batch)]
    slots = pool.alloc(sum(lens))
    assert slots is not None
    slots = slots[torch.randperm(len(slots), generator=gen())]  # scattered
    start = 0
    for row, n in zip(rows, lens):
        table[row, :n] = slots[start : start + n]
        start += n
    tokens = [(42 + 997 * i) % engine.model.vocab_size for i in range(batch)]
    try:
        kv = [buf.clone() for buf in pool.k_buffers + pool.v_buffers]
        runner.native_decoder = None
        per_op = runner.decode_logits(rows, lens, tokens)
        kv_per_op = [buf.clone() for buf in pool.k_buffers + pool.v_buffers]
        for buf, saved in zip(pool.k_buffers + pool.v_buffers, kv):
            buf.copy_(saved)
        runner.native_decoder = decoder
        native = runner.decode_logits(rows, lens, tokens)
        assert torch.equal(native, per_op)
        assert all(torch.equal(a, b) for a, b in zip(pool.k_buffers + pool.v_buffers, kv_per_op))
        with pytest.raises(ValueError, match="out of range"):
            decoder.logits(
                [engine.model.vocab_size], [0], slots[:1], slots[None, :1], torch.tensor([1])
            )
    finally:
        runner.native_decoder = decoder
        pool.free(slots)
    engine.check_kv_invariant()


def test_generation_is_the_same_without_the_native_decoder(engine: Engine) -> None:
    params = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
    prompts = ["The capital of France is", "def add(a, b):"]
    runner = engine.scheduler.runner
    native = engine.generate(prompts, params)
    decoder, runner.native_decoder = runner.native_decoder, None
    try:
        engine.flush_cache()
        per_op = engine.generate(prompts, params)
    finally:
        runner.native_decoder = decoder
    assert [o["output_ids"] for o in native] == [o["output_ids"] for o in per_op]
    engine.wait_idle()
    engine.check_kv_invariant()


def test_many_threads_and_long_steps_take_the_multithreaded_path(engine: Engine) -> None:
    backend = engine.scheduler.runner.attn_backend
    short = [torch.arange(100)]
    long = [torch.arange(NATIVE_DECODE_MAX_KV_TOKENS + 1)]
    assert backend.decodes_natively(short) and backend.decodes_natively(long)  # one thread
    torch.set_num_threads(2)
    try:
        assert backend.decodes_natively(short) and not backend.decodes_natively(long)
    finally:
        torch.set_num_threads(1)


def test_bfloat16_models_are_not_native() -> None:
    with Engine(max_total_tokens=256, dtype="bfloat16") as eng:
        assert eng.scheduler.runner.native_decoder is None
        assert (
            unsupported_reason(eng.model, eng.pool) == "the embeddings are not float32 on the CPU"
        )
        with pytest.raises(ValueError, match="no native decoder"):
            NativeDecoder(eng.model, eng.pool)


def test_float_matrices_must_all_be_fused_float32(engine: Engine) -> None:
    if engine.config.quantization is not None:
        pytest.skip("a float32 model's matrices")
    attn = engine.model.model.layers[0].self_attn
    fused, attn.qkv_weight = attn.qkv_weight, None  # an unfused layer
    try:
        reason = unsupported_reason(engine.model, engine.pool)
    finally:
        attn.qkv_weight = fused
    assert reason == "the matrices are neither all packed nor all fused float32"
