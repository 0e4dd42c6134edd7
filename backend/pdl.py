"""Programmatic dependent launch (PDL, Hopper and later) for the decode step's Triton kernels.

A batch-1 decode step is ~300 launches of a few to 76 microseconds in a CUDA graph. Between
two of them the GPU drains the first grid, then launches and ramps up the second. With PDL,
a kernel launched with ``launch_pdl`` may be scheduled once every program of its predecessor
has called ``gdc_launch_dependents``; it calls ``gdc_wait`` -- which returns once the
predecessor has completed and its writes are visible -- before it touches anything the
predecessor may write or read. Until then it may only read constant data (the GEMV loads its
first weight chunk). Every kernel here waits before it signals, so a kernel that completes
has waited for its predecessor, and ordering stays transitive along the stream; kernels
launched without PDL (cuBLAS, torch) run after their predecessor completes, as always.

Kernels take a ``USE_PDL`` constexpr and call `pdl_enter` where their dependent part begins,
in every program (no program may return before it); their launch passes
``**options(device)``. `SGL_DSL_PDL=0` in the environment turns PDL off (read once per
device). Weights may be read before the wait because nothing writes them while the engine
runs; an in-place weight update would have to synchronize first.

Users: the GEMV, the skinny GEMM, residual-add + RMSNorm, SiLU-and-multiply and the two
decode-attention kernels -- at batch 1 every launch of a layer, at 2-32 rows every product
too -- and the merge after a split extend.
Measured on an H100 (`benchmarks/bench_gpu.py`, PDL on vs off, one machine): Llama-3-8B
batch-1 decode 178.5 -> 181.2 tok/s, the SmolLM2-135M shape 1,346-1,350 -> 1,617-1,641; at
64 x 512 7,855 -> 7,956 (within run-to-run spread while those steps were mostly cuBLAS,
which does not take part; the skinny GEMM then gained 5-7%, see its module).
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: never on
    triton = None

try:
    from triton.backends.nvidia.compiler import CUDAOptions
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    _TRITON_HAS_PDL = "launch_pdl" in CUDAOptions.__dataclass_fields__
except ImportError:  # a triton without grid dependency control
    _TRITON_HAS_PDL = False


def options(device: torch.device) -> dict[str, bool]:
    """Launch keywords for a kernel with a ``USE_PDL`` constexpr running on ``device``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if _pdl_on(index):
            return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}


@functools.cache
def _pdl_on(device_index: int) -> bool:
    """PDL on NVIDIA GPUs of compute capability 9.0+ (not ROCm), unless `SGL_DSL_PDL=0`."""
    return (
        _TRITON_HAS_PDL
        and os.environ.get("SGL_DSL_PDL", "1") != "0"
        and torch.version.hip is None
        and torch.cuda.get_device_capability(device_index) >= (9, 0)
    )


if _TRITON_HAS_PDL:

    @triton.jit
    def pdl_enter(USE_PDL: tl.constexpr):
        """Wait for the predecessor kernel, then let the successor launch (module doc)."""
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()

elif triton is not None:

    @triton.jit
    def pdl_enter(USE_PDL: tl.constexpr):
        """Nothing: this triton has no grid dependency control (``options`` never sets it)."""
        pass
