"""Sweep the Triton decode-attention kernel's launch parameters on a GPU.

For a few batch/context mixes (Llama-3-8B heads: 32 query, 8 KV, head dim 128), times every
(block_n, num_warps, num_stages, splits) and prints the fastest, their achieved bandwidth
(K and V bytes read / time) and the engine's choice (``default_decode_config`` and the split
count CUDA graphs use: ``choose_num_splits`` at the model's 8,192-token context).

Timing: one CUDA graph holds one launch per layer over ``--layers`` separate caches (several
GB, so a launch does not find its keys in L2 from the previous one, as in the engine); the
graph is replayed and timed with CUDA events (``triton.testing.do_bench`` on one cache gave
L2-warm and, at batch 1, erratic figures). Slots are a random permutation of the pool, or
with ``--contiguous`` one run per request (as a fresh engine allocates prompts). Usage:
``python benchmarks/tune_decode_attention.py [--contiguous] [--kv-dtype float8_e4m3fn]
[--grid warps=4 stages=2,3] [--cases 1,3]`` (CUDA only).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import random
from collections.abc import Callable

import torch
import triton

from backend.attention import triton_kernels as tk

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
CASES = ((1, 2048, 2048), (64, 512, 640), (128, 300, 1500), (256, 100, 2048))
GRAPH_CONTEXT = 8192
GRID = {
    "block_n": (32, 64, 128),
    "warps": (2, 4, 8),
    "stages": (2, 3, 4),
    "splits": (1, 2, 4, 8),
}


def time_graph(launch: Callable[[int], None], layers: int, replays: int = 10) -> float:
    """Microseconds per launch of ``launch(layer)`` for every layer, captured in one graph."""
    for layer in range(layers):  # compile and warm up outside the capture
        launch(layer)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in range(layers):
            launch(layer)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contiguous", action="store_true")
    parser.add_argument("--kv-dtype", default="bfloat16", help="bfloat16 or float8_e4m3fn")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--grid", nargs="*", default=[], help="narrow the grid: e.g. splits=1,2")
    parser.add_argument("--cases", default="", help="indices into CASES, e.g. 1,3")
    parser.add_argument("--top", type=int, default=7, help="runners-up printed per case")
    args = parser.parse_args()
    grid = dict(GRID)
    for item in args.grid:
        key, values = item.split("=")
        grid[key] = tuple(int(x) for x in values.split(","))
    cases = [CASES[int(i)] for i in args.cases.split(",")] if args.cases else CASES
    device = torch.device("cuda")
    kv_dtype = getattr(torch, args.kv_dtype)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    rng = random.Random(0)
    print(f"# {torch.cuda.get_device_name()}, KV {kv_dtype}, {args.layers} layers per graph")
    for batch, lo, hi in cases:
        lens = [rng.randint(lo, hi) for _ in range(batch)]
        total = sum(lens)
        indptr = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)
        pool = total + 1  # slot 0 is the engine's scratch slot
        caches = [
            (
                torch.randn(pool, KV_HEADS, HEAD_DIM, device=device).to(kv_dtype),
                torch.randn(pool, KV_HEADS, HEAD_DIM, device=device).to(kv_dtype),
            )
            for _ in range(args.layers)
        ]
        if args.contiguous:
            slots = torch.arange(1, pool, device=device)
        else:
            slots = torch.randperm(pool - 1, device=device) + 1
        q = torch.randn(batch, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
        out = torch.empty_like(q)
        nbytes = total * KV_HEADS * HEAD_DIM * 2 * kv_dtype.itemsize
        mid_o, mid_lse = tk.split_partial_buffers(
            batch, HEADS, HEAD_DIM, max(grid["splits"]), device
        )
        timings = []
        for block_n, warps, stages, splits in itertools.product(*grid.values()):
            run = functools.partial(
                tk.decode_attention, q, o=out, kv_indptr=indptr, kv_indices=slots,
                num_splits=splits, mid_o=mid_o, mid_lse=mid_lse, block_n=block_n,
                num_warps=warps, num_stages=stages,
            )  # fmt: skip

            def launch(layer: int, run=run, caches=caches) -> None:
                run(k_buf=caches[layer][0], v_buf=caches[layer][1])

            try:
                us = time_graph(launch, args.layers)
            except triton.runtime.errors.OutOfResources:  # too much shared memory
                continue
            timings.append((us, block_n, warps, stages, splits))
        timings.sort()
        splits = tk.choose_num_splits(batch * KV_HEADS, GRAPH_CONTEXT, sms)
        key = (*tk.default_decode_config(device, kv_dtype, batch * KV_HEADS), splits)
        default = next((t for t in timings if t[1:] == key), None)
        default_text = (
            f"{default[0]:.1f} us ({nbytes / default[0] / 1e6:.2f} TB/s)"
            if default
            else "not in the grid"
        )
        print(f"batch {batch}, context {lo}-{hi}: default {key}: {default_text}")
        for us, bn, warps, stages, s in timings[: args.top + 1]:
            print(
                f"    {us:.1f} us ({nbytes / us / 1e6:.2f} TB/s) block_n={bn} warps={warps} "
                f"stages={stages} splits={s}"
            )
        del caches
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
