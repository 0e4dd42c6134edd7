"""Sweep the Triton decode-attention kernel's launch parameters on a GPU.

For a few batch/context mixes (Llama-3-8B heads: 32 query, 8 KV, head dim 128, bf16), times
every (block_n, num_warps, num_stages, splits) with ``triton.testing.do_bench`` and prints
the best, its achieved bandwidth (K and V bytes read / time) and the engine's choice (the split
count CUDA graphs use: ``choose_num_kv_splits`` at the model's 8,192-token context). Slots are
a random permutation of the pool, or with ``--contiguous`` one run per request (as a fresh
engine allocates them). The defaults (``default_decode_config``, ``choose_num_kv_splits``)
come from this sweep. Usage: ``python benchmarks/tune_decode_attention.py [--contiguous]``
(CUDA only).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import random

import torch
import triton

from backend.attention import triton_kernels as tk

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
CASES = ((1, 256, 256), (1, 4096, 4096), (64, 512, 640), (160, 100, 2048), (256, 500, 1100))
GRAPH_CONTEXT = 8192


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contiguous", action="store_true")
    parser.add_argument("--kv-dtype", default="bfloat16", help="bfloat16 or float8_e4m3fn")
    args = parser.parse_args()
    device = torch.device("cuda")
    num_slots = 600_000
    kv_dtype = getattr(torch, args.kv_dtype)
    k_buf = torch.randn(num_slots, KV_HEADS, HEAD_DIM, device=device).to(kv_dtype)
    v_buf = torch.randn(num_slots, KV_HEADS, HEAD_DIM, device=device).to(kv_dtype)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    rng = random.Random(0)
    print(f"# {torch.cuda.get_device_name()}, KV {kv_dtype}")
    for batch, lo, hi in CASES:
        lens = [rng.randint(lo, hi) for _ in range(batch)]
        indptr = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)
        if args.contiguous:
            slots = torch.arange(1, sum(lens) + 1, device=device)
        else:
            slots = torch.randperm(num_slots - 1, device=device)[: sum(lens)] + 1
        q = torch.randn(batch, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
        out = torch.empty_like(q)
        nbytes = sum(lens) * KV_HEADS * HEAD_DIM * 2 * kv_dtype.itemsize
        timings = []
        for block_n, warps, stages, splits in itertools.product(
            (32, 64, 128, 256), (2, 4, 8), (1, 2, 3, 4), (1, 2, 3, 4, 8, 16)
        ):
            mid_o, mid_lse = tk.decode_partial_buffers(batch, HEADS, HEAD_DIM, splits, device)
            run = functools.partial(
                tk.decode_attention,
                q, k_buf, v_buf, out, indptr, slots, splits,
                mid_o=mid_o, mid_lse=mid_lse, block_n=block_n, num_warps=warps, num_stages=stages,
            )  # fmt: skip
            try:
                ms = triton.testing.do_bench(run, warmup=5, rep=20)
            except triton.runtime.errors.OutOfResources:  # too much shared memory
                continue
            timings.append((ms, block_n, warps, stages, splits))
        timings.sort()
        best = timings[0]
        splits = tk.choose_num_kv_splits(batch, KV_HEADS, GRAPH_CONTEXT, sms)
        default = next(
            t for t in timings
            if t[1:] == (*tk.default_decode_config(device, kv_dtype, batch * KV_HEADS), splits)
        )  # fmt: skip
        print(
            f"batch {batch}, context {lo}-{hi}: best {best[0] * 1e3:.1f} us "
            f"({nbytes / best[0] / 1e9:.2f} TB/s) block_n={best[1]} warps={best[2]} "
            f"stages={best[3]} splits={best[4]}; default {default[0] * 1e3:.1f} us "
            f"({nbytes / default[0] / 1e9:.2f} TB/s, splits={splits})"
        )
        for t in timings[1:6]:
            ms, bn, warps, stages, splits = t
            print(f"    {ms * 1e3:.1f} us block_n={bn} warps={warps} stages={stages} s={splits}")


if __name__ == "__main__":
    main()
