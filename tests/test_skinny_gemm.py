"""The Triton GEMM of small decode batches (``backend/skinny_gemm.py``) against float64.

On CUDA the compiled kernel runs on the GPU and ``quantization.linear`` and the model's MLP
are checked to route small batches to it; without CUDA the kernel runs on CPU under
Triton's interpreter (in a subprocess when triton was imported first, see
``tests/triton_util.py``).
"""

from __future__ import annotations

import pytest
import torch
import triton_util

triton_util.prepare()
CUDA = triton_util.CUDA

triton = pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[gpu]')")

from backend import fused_ops  # noqa: E402
from backend.skinny_gemm import (  # noqa: E402
    LAUNCH_MAX_ROWS,
    SKINNY_LARGE_MATRIX_BYTES,
    SKINNY_MAX_ROWS,
    SKINNY_SMALL_MATRIX_MAX_ROWS,
    SkinnyConfig,
    _counters,
    _sm_count,
    default_split_k,
    skinny_gemm,
    skinny_gemm_applies,
)

RUN_HERE = triton_util.runs_here(fused_ops.is_interpreted())
DEVICE = triton_util.DEVICE
randn = triton_util.randn
assert_rounded_once = triton_util.assert_rounded_once


@pytest.fixture(autouse=True)
def kernels_here(request: pytest.FixtureRequest) -> None:
    triton_util.skip_unless_here(request, RUN_HERE)


def test_interpreter_subprocess() -> None:
    """Without CUDA, run this module again in a process where the interpreter is on."""
    triton_util.rerun_interpreted(__file__, RUN_HERE, noconftest=True, timeout=600)


def _counters_are_zero() -> bool:
    """The counters the kernel used (`_counters` resolves "cuda" to the current device)."""
    return not bool(_counters(torch.device(DEVICE)).any())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows", [2, 7, 33])
@pytest.mark.parametrize(("out_features", "in_features"), [(64, 128), (100, 200), (130, 520)])
@pytest.mark.parametrize("split_k", [1, 3])
def test_skinny_gemm_matches_float64(
    dtype: torch.dtype, rows: int, out_features: int, in_features: int, split_k: int
) -> None:
    """Features at, between and beyond whole 64-row tiles and 64-wide K chunks, one program
    per tile or up to three along K (two for two-chunk and four-chunk K: no empty split; the
    last partial chunk masked)."""
    x = randn(rows, in_features, dtype=dtype, seed=1)
    w = randn(out_features, in_features, dtype=dtype, seed=2) / in_features**0.5
    config = SkinnyConfig(
        block_m=max(16, triton.next_power_of_2(rows)), block_k=64, stages=2, split_k=split_k
    )
    assert_rounded_once(skinny_gemm(x, w, config=config), x, w)
    assert _counters_are_zero()


def test_skinny_gemm_adds_the_bias_before_rounding() -> None:
    x = randn(5, 192, dtype=torch.bfloat16, seed=3)
    w = randn(80, 192, dtype=torch.bfloat16, seed=4) / 14
    bias = randn(80, dtype=torch.bfloat16, seed=5) * 3
    for split_k in (1, 2):
        config = SkinnyConfig(block_m=16, block_k=64, stages=2, split_k=split_k)
        assert_rounded_once(skinny_gemm(x, w, bias, config=config), x, w, bias)


def test_skinny_gemm_on_views_of_fused_matrices() -> None:
    """``x`` a column slice of a wider activation (row stride > K), the weight a row block of a
    fused matrix (non-zero offset): as the model passes them."""
    wide = randn(3, 300, dtype=torch.bfloat16, seed=6)
    x = wide[:, 50:178]
    fused = randn(160, 128, dtype=torch.bfloat16, seed=7) / 11
    w = fused[16:96]
    assert x.stride(0) == 300 and w.storage_offset() == 16 * 128
    assert_rounded_once(skinny_gemm(x, w, config=SkinnyConfig(16, block_k=64, stages=2)), x, w)


def test_skinny_gemm_takes_more_rows_than_a_launch_in_slices() -> None:
    rows = LAUNCH_MAX_ROWS + 3
    x = randn(rows, 64, dtype=torch.bfloat16, seed=8)
    w = randn(64, 64, dtype=torch.bfloat16, seed=9) / 8
    assert_rounded_once(skinny_gemm(x, w), x, w)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("split_k", [1, 2])
def test_skinny_gemm_silu_and_mul_equals_the_two_kernels(with_bias: bool, split_k: int) -> None:
    """Fused gate/up product + activation == the product, then ``silu_and_mul``, bit for bit
    (the same split: float32 sums in the same order)."""
    x = randn(6, 256, dtype=torch.bfloat16, seed=16)
    gate_up = randn(2 * 72, 256, dtype=torch.bfloat16, seed=17) / 12
    bias = randn(2 * 72, dtype=torch.bfloat16, seed=18) if with_bias else None
    config = SkinnyConfig(block_m=16, block_k=64, stages=2, split_k=split_k)
    fused = skinny_gemm(x, gate_up, bias, silu_and_mul=True, config=config)
    assert fused.shape == (6, 72)
    product = skinny_gemm(x, gate_up, bias, config=config)
    assert torch.equal(fused, fused_ops.silu_and_mul_triton(product))
    assert _counters_are_zero()
    with pytest.raises(ValueError, match="silu_and_mul needs cat"):
        skinny_gemm(x, gate_up[:143], silu_and_mul=True)


@pytest.mark.parametrize("silu_and_mul", [False, True])
def test_default_configuration_of_a_split_long_k(silu_and_mul: bool) -> None:
    """The engine's path: `default_config` and `default_split_k` at a K of 8,192 over fewer
    tiles than SMs (split in two), 40 rows (BLOCK_M 64)."""
    x = randn(40, 8192, dtype=torch.bfloat16, seed=30)
    w = randn(256, 8192, dtype=torch.bfloat16, seed=31) / 90
    out = skinny_gemm(x, w, silu_and_mul=silu_and_mul)
    tiles = (256 // 2 if silu_and_mul else 256) // 64
    assert default_split_k(tiles, 8192, _sm_count(x.device)) == 2
    if silu_and_mul:  # against the unfused product summed in the same order
        product = skinny_gemm(x, w, config=SkinnyConfig(64, split_k=2))
        assert torch.equal(out, fused_ops.silu_and_mul_triton(product))
    else:
        assert_rounded_once(out, x, w)
    assert _counters_are_zero()


def test_skinny_gemm_rejects_bad_shapes() -> None:
    x = randn(4, 64, dtype=torch.bfloat16, seed=10)
    with pytest.raises(ValueError, match="x has 64 features, weight takes 65"):
        skinny_gemm(x, randn(8, 65, dtype=torch.bfloat16, seed=11))
    with pytest.raises(ValueError, match="takes bfloat16 or float16, got torch"):
        skinny_gemm(x.float(), randn(8, 64, dtype=torch.float32, seed=14))
    with pytest.raises(ValueError, match="rows and the bias must be contiguous"):
        skinny_gemm(x, randn(64, 8, dtype=torch.bfloat16, seed=13).T)
    with pytest.raises(ValueError, match="block_m 16 < 17 rows"):
        skinny_gemm(randn(17, 64, dtype=torch.bfloat16, seed=12), x, config=SkinnyConfig(16))


def test_default_split_halves_long_k_of_few_tiles() -> None:
    assert default_split_k(tiles=64, in_features=14336, sm_count=132) == 2
    assert default_split_k(tiles=64, in_features=4096, sm_count=132) == 1
    assert default_split_k(tiles=2004, in_features=14336, sm_count=132) == 1


def test_skinny_gemm_applies_to_small_batches_of_half_cuda_tensors() -> None:
    w = torch.zeros(8, 64, dtype=torch.bfloat16)
    assert not skinny_gemm_applies(torch.zeros(4, 64, dtype=torch.bfloat16), w, None)  # CPU
    if not CUDA:
        return
    w = w.cuda()
    cuda_bf16 = {"dtype": torch.bfloat16, "device": "cuda"}
    four = torch.zeros(4, 64, **cuda_bf16)
    assert skinny_gemm_applies(four, w, None)
    assert skinny_gemm_applies(four, w, torch.zeros(8, **cuda_bf16))
    assert not skinny_gemm_applies(torch.zeros(1, 64, **cuda_bf16), w, None)  # the GEMV's
    small_most = SKINNY_SMALL_MATRIX_MAX_ROWS
    assert skinny_gemm_applies(torch.zeros(small_most, 64, **cuda_bf16), w, None)
    assert not skinny_gemm_applies(torch.zeros(small_most + 1, 64, **cuda_bf16), w, None)
    large = torch.empty(SKINNY_LARGE_MATRIX_BYTES // 2 // 64, 64, **cuda_bf16)
    assert skinny_gemm_applies(torch.zeros(SKINNY_MAX_ROWS, 64, **cuda_bf16), large, None)
    assert not skinny_gemm_applies(torch.zeros(SKINNY_MAX_ROWS + 1, 64, **cuda_bf16), large, None)
    assert not skinny_gemm_applies(torch.zeros(small_most + 1, 64, **cuda_bf16), large[1:], None)
    assert not skinny_gemm_applies(four.float(), w.float(), None)
    assert not skinny_gemm_applies(four, w.half(), None)
    assert not skinny_gemm_applies(four, w.T.contiguous().T, None)  # columns not contiguous


@pytest.mark.skipif(not CUDA, reason="routing applies to CUDA tensors")
def test_linear_routes_small_batches_to_the_skinny_gemm() -> None:
    from backend.quantization import linear

    w = randn(256, 512, dtype=torch.bfloat16, seed=12) / 22
    bias = randn(256, dtype=torch.bfloat16, seed=13)
    few = randn(SKINNY_SMALL_MATRIX_MAX_ROWS, 512, dtype=torch.bfloat16, seed=14)
    assert torch.equal(linear(few, w, bias), skinny_gemm(few, w, bias))
    many = randn(SKINNY_SMALL_MATRIX_MAX_ROWS + 1, 512, dtype=torch.bfloat16, seed=15)
    assert torch.equal(linear(many, w, bias), torch.nn.functional.linear(many, w, bias))


@pytest.mark.skipif(not CUDA, reason="routing applies to CUDA tensors")
def test_the_models_mlp_takes_the_fused_skinny_gemm() -> None:
    """A Llama MLP at 8 rows is the fused gate/up skinny GEMM, then the down one (bit for
    bit), and agrees with cuBLAS and a separate activation within rounding."""
    from transformers import LlamaConfig

    from backend.models.llama import MLP

    config = LlamaConfig(hidden_size=256, intermediate_size=512, hidden_act="silu")
    mlp = MLP(config).to(device="cuda", dtype=torch.bfloat16)
    mlp.fuse()
    x = randn(8, 256, dtype=torch.bfloat16, seed=50)
    ours = mlp(x)
    gate = skinny_gemm(x, mlp.gate_up_weight, silu_and_mul=True)
    assert torch.equal(ours, skinny_gemm(gate, mlp.down_proj.weight))
    cublas_gate = fused_ops.silu_and_mul_triton(torch.nn.functional.linear(x, mlp.gate_up_weight))
    reference = torch.nn.functional.linear(cublas_gate, mlp.down_proj.weight)
    torch.testing.assert_close(ours, reference, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs and dependent launches are CUDA features")
def test_split_products_replay_in_a_cuda_graph() -> None:
    """A chain of split products, each reading its predecessor's output, captured in a CUDA
    graph and replayed: every replay equals eager launches (counters reset, partials not
    read before they are written), with PDL on where the GPU has it."""
    layers = [randn(512, 512, dtype=torch.bfloat16, seed=20 + i) / 23 for i in range(6)]
    start = randn(24, 512, dtype=torch.bfloat16, seed=40)
    config = SkinnyConfig(block_m=32, block_k=64, stages=3, split_k=4)

    def chain(x: torch.Tensor) -> torch.Tensor:
        for w in layers:
            x = skinny_gemm(x, w, config=config)
        return x

    expected = chain(start)
    static = start.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(static)
    for _ in range(3):
        static.copy_(start)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expected)
    assert _counters_are_zero()
