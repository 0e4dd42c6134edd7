"""Decode-step linear layers: cuBLAS (``F.linear``) vs the Triton GEMV (``backend/gemv.py``).

Llama-3-8B's five matrices (bf16) at 1-16 rows. Each figure is microseconds per product and
the weight bytes read per second (a GEMV at few rows reads each weight once; activations are
negligible), next to the device's copy bandwidth. Timing: one CUDA graph holds one product
per copy of the matrix over ~2 GB of copies (so a product does not find its weights in L2
from the previous one, as in a decode step), replayed and timed with CUDA events. Usage:
``python benchmarks/bench_gemv.py [--rows 1,2,4,8,16] [--gemm-rows 64,128,256,384]`` (CUDA
only). ``--gemm-rows`` times cuBLAS alone at larger batches, each product against its
roofline (weights at the copy bandwidth or FLOPs at the matmul throughput, whichever is
longer), and a decode step's sum (32 layers' four products and the lm_head).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from bench_gpu import copy_bandwidth, matmul_throughput
from tune_decode_attention import time_graph

from backend.gemv import GEMV_MAX_ROWS, gemv

SHAPES = {
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "lm_head": (128256, 4096),
}


def operands(rows: int, n: int, k: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Copies of an ``[n, k]`` weight over ~2 GB (so that no product finds its weights in
    L2 from the previous one) and an input of ``rows`` rows."""
    copies = min(8, max(2, int(2e9 // (n * k * 2))))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    return weights, torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)


def time_both(rows: int, n: int, k: int) -> tuple[float, float]:
    """Microseconds per ``[rows, k] x [n, k]^T`` product: cuBLAS, then the GEMV."""
    weights, x = operands(rows, n, k)
    t_cublas = time_graph(lambda i: F.linear(x, weights[i]), len(weights))
    t_gemv = time_graph(lambda i: gemv(x, weights[i]), len(weights))
    return t_cublas, t_gemv


def time_cublas(rows: int, n: int, k: int) -> float:
    """Microseconds per cuBLAS ``[rows, k] x [n, k]^T`` product."""
    weights, x = operands(rows, n, k)
    return time_graph(lambda i: F.linear(x, weights[i]), len(weights))


def report_gemm_rows(rows_list: list[int], copy: float) -> None:
    flops = matmul_throughput()
    print(f"cuBLAS at larger batches (matmul {flops / 1e12:.0f} TFLOP/s): us (of roofline)")
    for rows in rows_list:
        cells, step, step_bound = [], 0.0, 0.0
        for name, (n, k) in SHAPES.items():
            us = time_cublas(rows, n, k)
            torch.cuda.empty_cache()
            bound = max(n * k * 2 / copy, 2 * rows * n * k / flops) * 1e6
            per_step = 1 if name == "lm_head" else 32
            step, step_bound = step + us * per_step, step_bound + bound * per_step
            cells.append(f"{name} {us:.1f} ({bound / us:.0%})")
        print(
            f"{rows:4d} rows: " + ", ".join(cells) + f"; step {step / 1e3:.2f} ms "
            f"(roofline {step_bound / 1e3:.2f})",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,4,8,16")
    parser.add_argument("--gemm-rows", default="", help="e.g. 64,128,256: cuBLAS alone")
    args = parser.parse_args()
    copy = copy_bandwidth()
    if args.gemm_rows:
        report_gemm_rows([int(r) for r in args.gemm_rows.split(",")], copy)
        return
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
