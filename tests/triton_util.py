"""Running Triton kernel tests on CPU under Triton's interpreter.

``TRITON_INTERPRET=1`` only takes effect if set before ``triton`` is first imported in the
process; under pytest, conftest's imports (transformers -> torch's compiler) import it first.
A kernel test module therefore calls :func:`prepare` before importing triton, and when its
kernels still cannot run in-process, :func:`rerun_interpreted` runs the module again in a
subprocess with the variable set (one test that carries all the others' results).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
"""Where the kernel tests' tensors live: the GPU, or the CPU under the interpreter."""


def prepare() -> None:
    """Ask for the interpreter when there is no GPU and triton is not imported yet."""
    if not CUDA and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"


def runs_here(module_is_interpreted: bool) -> bool:
    """Whether kernels can run in this process: on CUDA, or with triton fully interpreted."""
    import triton.language as tl

    return CUDA or (module_is_interpreted and type(tl.zeros).__name__ == "InterpretedFunction")


def skip_unless_here(request: pytest.FixtureRequest, here: bool) -> None:
    if not here and request.node.name != "test_interpreter_subprocess":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run by the subprocess")


def rerun_interpreted(test_file: str, here: bool, noconftest: bool, timeout: float) -> None:
    """Run ``test_file`` again in a process with the interpreter on; fail if anything fails."""
    if here:
        pytest.skip("the kernels run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", test_file, "-q", "-p", "no:cacheprovider", "-rfEs"]
    if noconftest:
        cmd.append("--noconftest")
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert " passed" in output and "failed" not in output, output[-6000:]


def randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Seeded standard normal values times ``scale``, drawn on the CPU, on `DEVICE`."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)


def assert_rounded_once(
    ours: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
) -> None:
    """``ours`` is the exact product rounded once to its dtype: within half a unit in the last
    place of the float64 result (a whole unit under the interpreter, whose casts truncate),
    plus float32 summation noise."""
    ref = x.double() @ w.double().T
    if bias is not None:
        ref += bias.double()
    mantissa_bits = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[ours.dtype]
    exponent = torch.floor(torch.log2(ref.abs().clamp_min(1e-30)))
    ulp = torch.exp2(exponent - mantissa_bits)
    noise = 1e-6 * (x.double().abs() @ w.double().abs().T)
    bound = ulp * (0.5 if CUDA else 1.0) + noise
    assert ours.shape == ref.shape and ours.dtype == x.dtype
    assert ((ours.double() - ref).abs() <= bound).all(), ((ours.double() - ref).abs() / ulp).max()
