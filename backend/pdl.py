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

Kernels take a ``USE_PDL`` constexpr and call `pdl_enter` where their dependent part begins;
their launch passes ``**options(device)``.
"""

from __future__ import annotations

import functools

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
    if device.type == "cuda" and _pdl_on(device.index or torch.cuda.current_device()):
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}


@functools.cache
def _pdl_on(device_index: int) -> bool:
    return _TRITON_HAS_PDL and torch.cuda.get_device_capability(device_index) >= (9, 0)


if triton is not None:

    @triton.jit
    def pdl_enter(USE_PDL: tl.constexpr):
        """Wait for the predecessor kernel, then let the successor launch (module doc)."""
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()
