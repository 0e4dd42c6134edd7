"""Launch configurations of the skinny GEMM (``backend/skinny_gemm.py``) against cuBLAS.

For each batch (``--rows``) and each of Llama-3-8B's decode-step products (bf16), times every
configuration of a grid and prints the fastest few next to cuBLAS and the engine's default,
as microseconds and weight bytes read per second; then a decode step's sum (32 layers' four
products and the lm_head) for cuBLAS, the default and the per-shape best. The MLP's gate/up
product is timed fused with ``silu(gate) * up`` (cuBLAS: the product, then the activation
kernel). Timing as ``benchmarks/bench_gemv.py`` (graph-replayed over ~2 GB of weight copies).
Usage: ``python benchmarks/tune_skinny_gemm.py [--rows 16,64,128]
[--grid block_n=64 stages=3,4] [--top 3]`` (CUDA only).
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
from bench_gemv import SHAPES, operands
from bench_gpu import copy_bandwidth
from tune_decode_attention import time_graph

from backend import fused_ops
from backend.skinny_gemm import SkinnyConfig, default_config, skinny_gemm

GRID = {
    "block_n": (64, 128),
    "block_k": (64, 128, 256),
    "stages": (3, 4, 6),
    "warps": (4,),
    "split_k": (1, 2, 4, 8),
}


def time_config(x: torch.Tensor, weights: list[torch.Tensor], silu: bool, config) -> float:
    """Microseconds per product with ``config`` (a `SkinnyConfig`, or "cublas")."""
    if config == "cublas":
        if silu:
            return time_graph(
                lambda i: fused_ops.silu_and_mul(F.linear(x, weights[i])), len(weights)
            )
        return time_graph(lambda i: F.linear(x, weights[i]), len(weights))
    return time_graph(
        lambda i: skinny_gemm(x, weights[i], silu_and_mul=silu, config=config), len(weights)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="16,64,128")
    parser.add_argument("--grid", nargs="*", default=[], help="narrow the grid: e.g. stages=3,4")
    parser.add_argument("--top", type=int, default=3, help="fastest configurations printed")
    args = parser.parse_args()
    grid = dict(GRID)
    for item in args.grid:
        key, values = item.split("=")
        grid[key] = tuple(int(v) for v in values.split(","))
    copy = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy {copy / 1e12:.2f} TB/s")
    for rows in (int(r) for r in args.rows.split(",")):
        block_m = default_config(rows).block_m
        steps = {"cublas": 0.0, "default": 0.0, "best": 0.0}
        for name, (n, k) in SHAPES.items():
            weights, x = operands(rows, n, k)
            silu = name == "gate_up"
            gb = n * k * 2 / 1e9
            t_cublas = time_config(x, weights, silu, "cublas")
            t_default = time_config(x, weights, silu, default_config(rows, silu))
            timed = []
            for values in itertools.product(*grid.values()):
                config = SkinnyConfig(block_m, **dict(zip(grid, values)))
                try:
                    timed.append((time_config(x, weights, silu, config), config))
                except Exception as error:  # e.g. out of shared memory
                    print(f"  skipped {config}: {type(error).__name__}")
            timed.sort(key=lambda pair: pair[0])
            per_step = 1 if name == "lm_head" else 32
            steps["cublas"] += t_cublas * per_step
            steps["default"] += t_default * per_step
            steps["best"] += min(timed[0][0], t_default) * per_step
            print(
                f"{rows:4d} rows {name:8} cuBLAS {t_cublas:7.1f} us "
                f"({gb / t_cublas * 1e3:.2f} TB/s)"
                f"  default {t_default:7.1f} ({gb / t_default * 1e3:.2f})",
                flush=True,
            )
            for us, config in timed[: args.top]:
                print(f"     {us:7.1f} us ({gb / us * 1e3:.2f} TB/s) {config}", flush=True)
            del weights, x
            torch.cuda.empty_cache()
        roofline = sum(
            n * k * 2 / copy * 1e6 * (1 if name == "lm_head" else 32)
            for name, (n, k) in SHAPES.items()
        )
        print(
            f"{rows:4d} rows step: cuBLAS {steps['cublas'] / 1e3:.2f} ms, default "
            f"{steps['default'] / 1e3:.2f}, per-shape best {steps['best'] / 1e3:.2f} "
            f"(weights at copy bandwidth {roofline / 1e3:.2f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
