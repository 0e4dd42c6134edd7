"""Sweep the Triton decode-attention kernel's launch parameters on a GPU.

For a few batch/context mixes (Llama-3-8B heads: 32 query, 8 KV, head dim 128, bf16), times
every (block_n, num_warps, num_stages, splits) with ``triton.testing.do_bench`` and prints
the best, its achieved bandwidth (K and V bytes read / time) and the current default. The
default ``default_decode_block_n`` comes from this sweep. Usage: ``python
benchmarks/tune_decode_attention.py`` (CUDA only).
"""

from __future__ import annotations

import functools
import itertools
import random

import torch
import triton

from backend.attention import triton_kernels as tk

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
CASES = ((1, 256, 256), (1, 4096, 4096), (64, 512, 640), (160, 100, 2048), (256, 500, 1100))


def main() -> None:
    device = torch.device("cuda")
    num_slots = 600_000
    k_buf = torch.randn(num_slots, KV_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
    v_buf = torch.randn_like(k_buf)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    rng = random.Random(0)
    print(f"# {torch.cuda.get_device_name()}")
    for batch, lo, hi in CASES:
        lens = [rng.randint(lo, hi) for _ in range(batch)]
        indptr = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)
        slots = torch.randperm(num_slots - 1, device=device)[: sum(lens)] + 1
        q = torch.randn(batch, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
        out = torch.empty_like(q)
        nbytes = sum(lens) * KV_HEADS * HEAD_DIM * 2 * 2
        timings = []
        for block_n, warps, stages, splits in itertools.product(
            (32, 64, 128), (4, 8), (2, 3, 4), (1, 2, 4, 8, 16)
        ):
            mid_o, mid_lse = tk.decode_partial_buffers(batch, HEADS, HEAD_DIM, splits, device)
            run = functools.partial(
                tk.decode_attention,
                q, k_buf, v_buf, out, indptr, slots, splits,
                mid_o=mid_o, mid_lse=mid_lse, block_n=block_n, num_warps=warps, num_stages=stages,
            )  # fmt: skip
            ms = triton.testing.do_bench(run, warmup=5, rep=20)
            timings.append((ms, block_n, warps, stages, splits))
        timings.sort()
        best = timings[0]
        splits = tk.choose_num_kv_splits(batch, KV_HEADS, max(lens), sms)
        default = next(
            t for t in timings
            if t[1:] == (tk.default_decode_block_n(device), 4, 2, splits)
        )  # fmt: skip
        print(
            f"batch {batch}, context {lo}-{hi}: best {best[0] * 1e3:.1f} us "
            f"({nbytes / best[0] / 1e9:.2f} TB/s) block_n={best[1]} warps={best[2]} "
            f"stages={best[3]} splits={best[4]}; default {default[0] * 1e3:.1f} us "
            f"({nbytes / default[0] / 1e9:.2f} TB/s)"
        )


if __name__ == "__main__":
    main()
