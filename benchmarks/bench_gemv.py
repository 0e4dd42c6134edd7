"""Decode GEMV on the GPU: ``backend.gemv`` against cuBLAS (``F.linear``), per matrix and per layer.

Shapes are Llama-3-8B's (qkv 6144x4096, o 4096x4096, gate_up 28672x4096, down 4096x14336,
lm_head 128256x4096), bf16, random values. Every timing replays a CUDA graph over enough
distinct copies of the weights that none is served from L2, as in a real decode step.

1. Per matrix and row count: cuBLAS, then ``backend.gemv`` at each block configuration;
   achieved bandwidth = weight bytes / time, against the measured copy bandwidth.
2. Per layer (32 layers' worth of weights, a decode step without attention): the engine's
   op sequence with cuBLAS and separate fused-op kernels, the same with ``gemv``, and
   ``gemv`` with RMSNorm and SiLU-and-multiply folded into its loads.

Usage (on a GPU): ``python benchmarks/bench_gemv.py [--rows 1,4] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from backend import gemv as G
from backend.fused_ops import add_rms_norm_, silu_and_mul

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, VOCAB, LAYERS = 4096, 14336, 32, 8, 128, 128256, 32
SHAPES = {
    "qkv": ((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN),
    "o": (HIDDEN, HEADS * HEAD_DIM),
    "gate_up": (2 * INTER, HIDDEN),
    "down": (HIDDEN, INTER),
    "lm_head": (VOCAB, HIDDEN),
}
CONFIGS = [
    (bn, bk, warps, stages)
    for bn, bk, warps, stages in itertools.product(
        (2, 4, 8, 16), (256, 512, 1024), (4, 8), (1, 2, 3)
    )
]


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / (graph_time(lambda: dst.copy_(src)) * 1e-3)


def graph_time(fn: Callable[[], object], replays: int = 20, repeats: int = 7) -> float:
    """Median milliseconds of one ``fn()``, captured in a CUDA graph and replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / replays)
    return statistics.median(times)


def weight_copies(n: int, k: int, min_bytes: int = 1 << 30) -> list[torch.Tensor]:
    count = max(2, -(-min_bytes // (n * k * 2)))
    return [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(count)]


def check(rows: int, config: tuple[int, int, int, int]) -> float:
    """Relative error of ``gemv`` against float64 on fresh random inputs."""
    x = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1000, 512, device="cuda", dtype=torch.bfloat16)
    out = G.gemv(x, w, config=config).double()
    ref = x.double() @ w.double().T
    return float((out - ref).norm() / ref.norm())


def sweep(rows_list: list[int], bandwidth: float) -> list[dict]:
    results = []
    for name, (n, k) in SHAPES.items():
        weights = weight_copies(n, k)
        nbytes = n * k * 2
        for rows in rows_list:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            ms = graph_time(lambda: [F.linear(x, w) for w in weights]) / len(weights)
            row = {"matrix": name, "rows": rows, "cublas_ms": ms, "cublas_tbs": nbytes / ms / 1e9}
            best = None
            for config in CONFIGS:
                bn, bk, warps, _ = config
                block_m = triton_rows(rows)
                if block_m * bn * bk > 64 * 32 * warps or bk > k:
                    continue
                try:
                    ms = graph_time(lambda: [G.gemv(x, w, config=config) for w in weights])
                except Exception as error:  # a configuration the compiler rejects
                    print(f"  {name} rows={rows} {config}: {type(error).__name__}")
                    continue
                ms /= len(weights)
                if best is None or ms < best[0]:
                    best = (ms, config)
            assert best is not None
            row.update(
                gemv_ms=best[0],
                gemv_tbs=nbytes / best[0] / 1e9,
                config=list(best[1]),
                speedup=row["cublas_ms"] / best[0],
                rel_err=check(rows, best[1]),
            )
            print(
                f"{name:8s} rows={rows}: cuBLAS {row['cublas_ms'] * 1e3:7.1f} us "
                f"{row['cublas_tbs']:.2f} TB/s | gemv {best[0] * 1e3:7.1f} us "
                f"{row['gemv_tbs']:.2f} TB/s {best[1]} | x{row['speedup']:.3f} "
                f"(copy {bandwidth / 1e12:.2f} TB/s)",
                flush=True,
            )
            results.append(row)
        del weights
        torch.cuda.empty_cache()
    return results


def triton_rows(rows: int) -> int:
    return 1 << max(0, (rows - 1).bit_length())


def layer_step(rows_list: list[int], configs: dict[tuple[str, int], list[int]]) -> list[dict]:
    """32 layers of norm, qkv, o, norm, gate_up, SiLU, down (no attention), three ways."""
    layers = [
        {
            name: torch.randn(*SHAPES[name], device="cuda", dtype=torch.bfloat16) * 0.02
            for name in ("qkv", "o", "gate_up", "down")
        }
        for _ in range(LAYERS)
    ]
    norm_w = torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16)
    nbytes = sum(w.numel() * 2 for layer in layers for w in layer.values())
    results = []
    for rows in rows_list:
        hidden = torch.randn(rows, HIDDEN, device="cuda", dtype=torch.bfloat16)

        def cfg(name: str) -> tuple[int, int, int, int] | None:
            found = configs.get((name, rows))
            return tuple(found) if found else None

        def separate(product: Callable) -> Callable[[], object]:
            def step() -> None:
                h = hidden.clone()
                x = add_rms_norm_(None, h, norm_w, 1e-5)
                for layer in layers:
                    qkv = product(x, layer["qkv"], "qkv")
                    attn = qkv[:, : HEADS * HEAD_DIM].contiguous()
                    o = product(attn, layer["o"], "o")
                    x = add_rms_norm_(o, h, norm_w, 1e-5)
                    act = silu_and_mul(product(x, layer["gate_up"], "gate_up"))
                    x = add_rms_norm_(product(act, layer["down"], "down"), h, norm_w, 1e-5)

            return step

        def fused() -> None:
            h = hidden.clone()
            delta = torch.zeros_like(h)
            for layer in layers:
                qkv, h = G.gemv_add_rms_norm(
                    delta, h, norm_w, 1e-5, layer["qkv"], config=cfg("qkv")
                )
                attn = qkv[:, : HEADS * HEAD_DIM].contiguous()
                o = G.gemv(attn, layer["o"], config=cfg("o"))
                gate_up, h = G.gemv_add_rms_norm(
                    o, h, norm_w, 1e-5, layer["gate_up"], config=cfg("gate_up")
                )
                delta = G.gemv_silu_and_mul(gate_up, layer["down"], config=cfg("down"))

        cublas = separate(lambda x, w, name: F.linear(x, w))
        triton_sep = separate(lambda x, w, name: G.gemv(x, w, config=cfg(name)))
        row = {"rows": rows, "weight_gb": nbytes / 1e9}
        for label, fn in (("cublas", cublas), ("gemv", triton_sep), ("gemv_fused", fused)):
            ms = graph_time(fn, replays=5, repeats=5)
            row[f"{label}_ms"] = ms
            row[f"{label}_tbs"] = nbytes / ms / 1e9
        print(
            f"layers rows={rows}: cuBLAS+ops {row['cublas_ms']:.3f} ms ({row['cublas_tbs']:.2f} TB/s)"
            f" | gemv+ops {row['gemv_ms']:.3f} ({row['gemv_tbs']:.2f}) | fused"
            f" {row['gemv_fused_ms']:.3f} ({row['gemv_fused_tbs']:.2f})",
            flush=True,
        )
        results.append(row)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,4")
    parser.add_argument("--layer-rows", default="1,2,4,8")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    rows_list = [int(r) for r in args.rows.split(",")]
    per_matrix = sweep(rows_list, bandwidth)
    configs = {(r["matrix"], r["rows"]): r["config"] for r in per_matrix}
    per_layer = layer_step([int(r) for r in args.layer_rows.split(",")], configs)
    if args.json:
        report = {
            "device": torch.cuda.get_device_name(),
            "copy_tbs": bandwidth / 1e12,
            "per_matrix": per_matrix,
            "per_layer": per_layer,
        }
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
