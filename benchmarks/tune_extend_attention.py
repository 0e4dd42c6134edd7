"""Sweep the Triton extend-attention kernel's launch parameters on a GPU.

For prefill passes shaped like the engine's (Llama-3-8B heads: 32 query, 8 KV, head dim
128, bf16): short extends after long cached prefixes (a program's ``gen``), and long
prompts without a prefix (a batch's prefill). Times every (heads per program, block_m,
block_n, num_warps, num_stages, prefix splits) and prints the best beside the engine's
defaults (``extend_config``, the split ``TritonAttentionBackend`` chooses), with
the achieved bandwidth (the prefixes' K and V read once / time) and matmul throughput
(q.k and p.v FLOPs of the causal pairs / time). Timing as in ``tune_decode_attention.py``:
one launch per layer over ``--layers`` separate caches in one CUDA graph. Usage:
``python benchmarks/tune_extend_attention.py [--grid warps=4 stages=1,2] [--top N]`` (CUDA
only).
"""

from __future__ import annotations

import argparse
import functools
import itertools

import torch
import triton
from tune_decode_attention import time_graph

from backend.attention import triton_kernels as tk

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
GROUP = HEADS // KV_HEADS
# (requests, prefix, new tokens per request)
CASES = ((1, 8000, 16), (1, 4000, 16), (1, 1000, 64), (16, 1000, 16), (64, 2000, 32), (8, 0, 1000))
GRID = {
    "heads": (1, GROUP),
    "block_m": (32, 64, 128),
    "block_n": (64, 128),
    "warps": (4, 8),
    "stages": (1, 2),
    "splits": (1, 2, 4, 8, 16, 32),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument(
        "--grid", nargs="*", default=[], help="narrow the grid: e.g. warps=4 splits=1,8"
    )
    parser.add_argument("--top", type=int, default=6, help="configurations printed per case")
    args = parser.parse_args()
    grid = dict(GRID)
    for item in args.grid:
        key, values = item.split("=")
        grid[key] = tuple(int(x) for x in values.split(","))
    device = torch.device("cuda")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    dtype = torch.bfloat16
    print(f"# {torch.cuda.get_device_name()}, {args.layers} layers per graph")
    for batch, prefix, new in CASES:
        prefix_lens = [prefix] * batch
        total = batch * (prefix + new)
        pool = total + 1
        caches = [
            (
                torch.randn(pool, KV_HEADS, HEAD_DIM, device=device, dtype=dtype),
                torch.randn(pool, KV_HEADS, HEAD_DIM, device=device, dtype=dtype),
            )
            for _ in range(args.layers)
        ]
        slots = torch.randperm(pool - 1, device=device) + 1
        rows = batch * new
        q = torch.randn(rows, HEADS, HEAD_DIM, device=device, dtype=dtype)
        k = torch.randn(rows, KV_HEADS, HEAD_DIM, device=device, dtype=dtype)
        v = torch.randn_like(k)
        out = torch.empty_like(q)
        qo = torch.arange(0, rows + 1, new, dtype=torch.int32, device=device)
        kv = torch.arange(0, total + 1, prefix + new, dtype=torch.int32, device=device)
        plens = torch.tensor(prefix_lens, dtype=torch.int32, device=device)
        mid_o, mid_lse = tk.split_partial_buffers(rows, HEADS, HEAD_DIM, 32, device)
        nbytes = batch * prefix * KV_HEADS * HEAD_DIM * 2 * dtype.itemsize
        pairs = batch * (new * prefix + new * (new + 1) // 2)
        flops = 4 * pairs * HEADS * HEAD_DIM
        timings = []
        for heads, block_m, block_n, warps, stages, splits in itertools.product(*grid.values()):
            if splits > 1 and prefix < splits * tk.MIN_PREFIX_SPLIT_LEN // 2:
                continue
            run = functools.partial(
                tk.extend_attention, q, k, v, out, qo_indptr=qo, kv_indptr=kv,
                kv_indices=slots, prefix_lens=plens, max_extend_len=new, block_m=block_m,
                block_n=block_n, num_warps=warps, num_stages=stages, num_splits=splits,
                mid_o=mid_o, mid_lse=mid_lse, heads_per_program=heads,
            )  # fmt: skip

            def launch(layer: int, run=run, caches=caches) -> None:
                run(k_buf=caches[layer][0], v_buf=caches[layer][1])

            try:
                us = time_graph(launch, args.layers)
            except triton.runtime.errors.OutOfResources:
                continue
            timings.append((us, heads, block_m, block_n, warps, stages, splits))
        timings.sort()
        c = tk.extend_config(batch, new, HEADS, KV_HEADS, HEAD_DIM, dtype, device)
        blocks = batch * -(-new // c.block_t) * (HEADS // c.heads)
        splits = tk.choose_num_splits(
            blocks, prefix, sms, min_split_len=tk.MIN_PREFIX_SPLIT_LEN, occupancy=1
        )
        default = (c.heads, c.block_m, c.block_n, c.num_warps, c.num_stages, splits)
        found = next((t for t in timings if t[1:] == default), None)

        def text(t: tuple, nbytes: int = nbytes, flops: int = flops) -> str:
            us = t[0]
            bw = f"{nbytes / us / 1e6:.2f} TB/s, " if nbytes else ""
            return (
                f"{us:.1f} us ({bw}{flops / us / 1e6:.0f} TFLOP/s) heads={t[1]} "
                f"block_m={t[2]} block_n={t[3]} warps={t[4]} stages={t[5]} splits={t[6]}"
            )

        print(f"{batch} x {new} after {prefix}: best {text(timings[0])}")
        print(f"    default {default}: " + (text(found) if found else "not in the grid"))
        for t in timings[1 : args.top]:
            print("    " + text(t))
        del caches
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
