"""Decode-step linear layers: cuBLAS (``F.linear``) vs the Triton GEMV (``backend/gemv.py``).

Llama-3-8B's five matrices (bf16) at 1-16 rows. Each figure is microseconds per product and
the weight bytes read per second (a GEMV at few rows reads each weight once; activations are
negligible), next to the device's copy bandwidth. Timing: one CUDA graph holds one product
per copy of the matrix over ~2 GB of copies (so a product does not find its weights in L2
from the previous one, as in a decode step), replayed and timed with CUDA events. Usage:
``python benchmarks/bench_gemv.py [--rows 1,2,4,8,16]`` (CUDA only).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from bench_gpu import copy_bandwidth
from tune_decode_attention import time_graph

from backend.gemv import GEMV_MAX_ROWS, gemv

SHAPES = {
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "lm_head": (128256, 4096),
}


def time_both(rows: int, n: int, k: int) -> tuple[float, float]:
    """Microseconds per ``[rows, k] x [n, k]^T`` product: cuBLAS, then the GEMV."""
    copies = min(8, max(2, int(2e9 // (n * k * 2))))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    t_cublas = time_graph(lambda i: F.linear(x, weights[i]), copies)
    t_gemv = time_graph(lambda i: gemv(x, weights[i]), copies)
    return t_cublas, t_gemv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,4,8,16")
    args = parser.parse_args()
    copy = copy_bandwidth()
    print(
        f"{torch.cuda.get_device_name()}: copy {copy / 1e12:.2f} TB/s; "
        f"the engine takes the GEMV up to {GEMV_MAX_ROWS} rows"
    )
    print(f"{'rows':>4} {'matrix':8} {'cuBLAS us':>9} {'TB/s':>5} {'GEMV us':>8} {'TB/s':>5}")
    for rows in (int(r) for r in args.rows.split(",")):
        for name, (n, k) in SHAPES.items():
            t_cublas, t_gemv = time_both(rows, n, k)
            torch.cuda.empty_cache()
            gb = n * k * 2 / 1e9
            print(
                f"{rows:4d} {name:8} {t_cublas:9.1f} {gb / t_cublas * 1e3:5.2f} {t_gemv:8.1f} "
                f"{gb / t_gemv * 1e3:5.2f}  {t_cublas / t_gemv:.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
