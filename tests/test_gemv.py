"""The Triton GEMV of decode steps (``backend/gemv.py``) against a float64 reference.

On CUDA the compiled kernel runs on the GPU and ``quantization.linear`` is checked to route
one-row products to it; without CUDA the kernel runs on CPU under Triton's interpreter
(in a subprocess when triton was imported first, see ``tests/triton_util.py``).
"""

from __future__ import annotations

import pytest
import torch
import triton_util

triton_util.prepare()
CUDA = triton_util.CUDA

triton = pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[gpu]')")

from backend import fused_ops  # noqa: E402
from backend.gemv import GEMV_MAX_ROWS, gemv, gemv_applies  # noqa: E402
from backend.quantization import linear  # noqa: E402

RUN_HERE = triton_util.runs_here(fused_ops.is_interpreted())
DEVICE = triton_util.DEVICE
randn = triton_util.randn
assert_rounded_once = triton_util.assert_rounded_once


@pytest.fixture(autouse=True)
def kernels_here(request: pytest.FixtureRequest) -> None:
    triton_util.skip_unless_here(request, RUN_HERE)


def test_interpreter_subprocess() -> None:
    """Without CUDA, run this module again in a process where the interpreter is on."""
    triton_util.rerun_interpreted(__file__, RUN_HERE, noconftest=True, timeout=300)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize(("out_features", "in_features"), [(40, 96), (24, 1500), (7, 2048)])
def test_gemv_matches_float64(dtype: torch.dtype, rows: int, out_features: int, in_features: int):
    """In-features below, between and at multiples of the kernel's 1,024-wide K chunk."""
    x = randn(rows, in_features, dtype=dtype, seed=1)
    w = randn(out_features, in_features, dtype=dtype, seed=2) / in_features**0.5
    assert_rounded_once(gemv(x, w), x, w)


def test_gemv_adds_the_bias_before_rounding() -> None:
    x = randn(2, 200, dtype=torch.bfloat16, seed=3)
    w = randn(16, 200, dtype=torch.bfloat16, seed=4) / 14
    bias = randn(16, dtype=torch.bfloat16, seed=5) * 3
    assert_rounded_once(gemv(x, w, bias), x, w, bias)


def test_gemv_on_views_of_fused_matrices() -> None:
    """``x`` a column slice of a wider activation (row stride > K), the weight a row block of a
    fused matrix (non-zero offset): as the model passes them."""
    wide = randn(3, 300, dtype=torch.bfloat16, seed=6)
    x = wide[:, 50:178]
    fused = randn(48, 128, dtype=torch.bfloat16, seed=7) / 11
    w = fused[16:40]
    assert x.stride(0) == 300 and w.storage_offset() == 16 * 128
    assert_rounded_once(gemv(x, w), x, w)


def test_gemv_rows_do_not_depend_on_each_other() -> None:
    """Each row is summed in the same order whatever the number of rows (bitwise)."""
    x = randn(5, 1100, dtype=torch.bfloat16, seed=8)
    w = randn(33, 1100, dtype=torch.bfloat16, seed=9) / 33
    together = gemv(x, w)
    for row in range(x.shape[0]):
        assert torch.equal(gemv(x[row : row + 1], w), together[row : row + 1])


def test_gemv_rejects_mismatched_features() -> None:
    x = randn(1, 64, dtype=torch.bfloat16, seed=10)
    with pytest.raises(ValueError, match="x has 64 features, weight takes 65"):
        gemv(x, randn(8, 65, dtype=torch.bfloat16, seed=11))


def test_gemv_applies_only_to_one_row_of_float_cuda_tensors() -> None:
    w = torch.zeros(8, 64, dtype=torch.bfloat16)
    assert not gemv_applies(torch.zeros(1, 64, dtype=torch.bfloat16), w, None)  # CPU
    if not CUDA:
        return
    w = w.cuda()
    one = torch.zeros(1, 64, dtype=torch.bfloat16, device="cuda")
    assert gemv_applies(one, w, None)
    assert gemv_applies(one, w, torch.zeros(8, dtype=torch.bfloat16, device="cuda"))
    assert not gemv_applies(torch.zeros(GEMV_MAX_ROWS + 1, 64, **_bf16_cuda()), w, None)
    assert gemv_applies(one.float(), w.float(), None)
    assert not gemv_applies(one.double(), w.double(), None)
    assert not gemv_applies(one, w.half(), None)
    assert not gemv_applies(one, w.T.contiguous().T, None)  # columns not contiguous
    assert not gemv_applies(one, w, torch.zeros(8, dtype=torch.float32, device="cuda"))


def _bf16_cuda() -> dict:
    return {"dtype": torch.bfloat16, "device": "cuda"}


@pytest.mark.skipif(not CUDA, reason="routing applies to CUDA tensors")
def test_linear_routes_few_rows_to_the_gemv_and_more_to_cublas() -> None:
    w = randn(256, 512, dtype=torch.bfloat16, seed=12) / 22
    bias = randn(256, dtype=torch.bfloat16, seed=13)
    few = randn(GEMV_MAX_ROWS, 512, dtype=torch.bfloat16, seed=14)
    assert torch.equal(linear(few, w, bias), gemv(few, w, bias))
    many = randn(GEMV_MAX_ROWS + 1, 512, dtype=torch.bfloat16, seed=15)
    assert torch.equal(linear(many, w, bias), torch.nn.functional.linear(many, w, bias))


@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_silu_and_mul_equals_the_two_kernels(with_bias: bool) -> None:
    """Fused gate/up product + activation == the product, then ``silu_and_mul``, bit for bit."""
    x = randn(3, 1300, dtype=torch.bfloat16, seed=16)
    gate_up = randn(2 * 24, 1300, dtype=torch.bfloat16, seed=17) / 12
    bias = randn(2 * 24, dtype=torch.bfloat16, seed=18) if with_bias else None
    fused = gemv(x, gate_up, bias, silu_and_mul=True)
    assert fused.shape == (3, 24)
    assert torch.equal(fused, fused_ops.silu_and_mul_triton(gemv(x, gate_up, bias)))
    with pytest.raises(ValueError, match="silu_and_mul needs cat"):
        gemv(x, gate_up[:47], silu_and_mul=True)


@pytest.mark.skipif(not CUDA, reason="programmatic dependent launch is a CUDA feature")
def test_dependent_launches_compute_what_ordered_launches_compute(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A chain in which every kernel reads its predecessor's output, launched with PDL (on
    Hopper: each program loads weights before it waits), eagerly and captured in a CUDA
    graph, equals the chain launched without PDL: a kernel that read before its predecessor
    finished would see stale values."""
    from backend import pdl

    if torch.cuda.get_device_capability() >= (9, 0):
        assert pdl.options(DEVICE)["USE_PDL"], "triton without launch_pdl on a Hopper GPU"
    hidden, inter = 1024, 2816
    norm_weight = randn(hidden, dtype=torch.bfloat16, seed=19)
    layers = [
        (
            randn(2 * inter, hidden, dtype=torch.bfloat16, seed=20 + i) / 32,
            randn(hidden, inter, dtype=torch.bfloat16, seed=40 + i) / 53,
        )
        for i in range(6)
    ]
    start = randn(1, hidden, dtype=torch.bfloat16, seed=60)

    def chain(residual: torch.Tensor) -> torch.Tensor:
        delta = None
        for gate_up, down in layers:
            x = fused_ops.add_rms_norm_(delta, residual, norm_weight, 1e-5)
            delta = gemv(gemv(x, gate_up, silu_and_mul=True), down)
        return fused_ops.add_rms_norm_(delta, residual, norm_weight, 1e-5)

    with monkeypatch.context() as patch:  # the switch users have
        patch.setenv("SGL_DSL_PDL", "0")
        pdl._pdl_on.cache_clear()
        assert not pdl.options(DEVICE)["USE_PDL"]
        expected = chain(start.clone())
    pdl._pdl_on.cache_clear()
    assert torch.equal(chain(start.clone()), expected)
    residual = start.clone()
    chain(residual.clone())  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(residual)
    for _ in range(3):
        residual.copy_(start)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expected)
