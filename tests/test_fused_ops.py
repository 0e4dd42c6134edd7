"""The fused RMSNorm / SiLU-and-mul / RoPE kernels against their torch references.

On CUDA the compiled kernels run on the GPU; without it they run on CPU under Triton's
interpreter, in a subprocess when triton was imported before ``TRITON_INTERPRET=1`` could
be set (see ``tests/triton_util.py``). Skipped when ``triton`` is not importable.
"""

from __future__ import annotations

import pytest
import torch
import triton_util

triton_util.prepare()
CUDA = triton_util.CUDA

triton = pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[gpu]')")

from backend import fused_ops as fo  # noqa: E402
from backend.models.llama import rope_tables  # noqa: E402

RUN_HERE = triton_util.runs_here(fo.is_interpreted())
DEVICE = triton_util.DEVICE
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def kernels_here(request: pytest.FixtureRequest) -> None:
    triton_util.skip_unless_here(request, RUN_HERE)


def test_interpreter_subprocess() -> None:
    """Without CUDA, run this module again in a process where the interpreter is on."""
    triton_util.rerun_interpreted(__file__, RUN_HERE, noconftest=True, timeout=300)


def randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return triton_util.randn(*shape, dtype=dtype, seed=seed, scale=2.0)


def assert_close_in_dtype(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """float32: within float noise; bf16: within one or two units in the last place."""
    if ours.dtype == torch.float32:
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(ours.float(), ref.float(), atol=2e-2, rtol=1.6e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [64, 96, 576])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm_matches_torch(dtype: torch.dtype, hidden: int, with_delta: bool) -> None:
    rows = 5
    residual = randn(rows, hidden, dtype=dtype, seed=1)
    delta = randn(rows, hidden, dtype=dtype, seed=2) if with_delta else None
    weight = randn(hidden, dtype=dtype, seed=3)
    ref_residual = residual.clone()
    if delta is not None:
        ref_residual.add_(delta)
    expected = fo.rms_norm_reference(ref_residual, weight, 1e-5)
    ours = fo.add_rms_norm_triton_(delta, residual, weight, 1e-5)
    assert_close_in_dtype(residual, ref_residual)  # updated in place
    assert_close_in_dtype(ours, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("inter", [48, 1536, 1100])
def test_silu_and_mul_matches_torch(dtype: torch.dtype, inter: int) -> None:
    gate_up = randn(3, 2 * inter, dtype=dtype, seed=4)
    gate, up = gate_up.chunk(2, -1)
    expected = torch.nn.functional.silu(gate) * up
    assert_close_in_dtype(fo.silu_and_mul_triton(gate_up), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("heads", "head_dim"), [(4, 32), (9, 64), (3, 64)])
def test_rope_matches_torch_on_a_strided_view(dtype: torch.dtype, heads: int, head_dim: int):
    """x is a column slice of a wider projection output (as after the fused qkv GEMM)."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    cos, sin_signed = rope_tables(config, head_dim, 64)
    cos, sin_signed = cos.to(DEVICE, dtype), sin_signed.to(DEVICE, dtype)
    tokens = 6
    wide = randn(tokens, (heads + 2) * head_dim, dtype=dtype, seed=5)
    x = wide[:, : heads * head_dim].view(tokens, heads, head_dim)
    positions = torch.tensor([0, 1, 7, 63, 5, 5], device=DEVICE)
    ours = fo.rope_triton(x, positions, cos, sin_signed)
    assert ours.is_contiguous()
    expected = fo.rope_reference(x.float(), positions, cos.float(), sin_signed.float())
    assert_close_in_dtype(ours, expected.to(dtype))
