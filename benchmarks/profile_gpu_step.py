"""Where a decode step's GPU time goes, by kernel family, at large batches (CUDA only).

For each (batch, context) the prompts are prefilled once (so the profiled run's prefill is
one token per request, from the radix cache); the next run of ``--new`` tokens (that
extend pass, then decode steps: ``--new`` forward passes) is profiled with
``torch.profiler`` and the kernel time per pass is summed by family (GEMMs: cuBLAS and
the skinny GEMM; decode attention, extend attention, GEMV, norms, activation, RoPE, KV
writes, the rest),
beside the step's roofline: the weights and the KV it reads at the measured copy
bandwidth, and its linear FLOPs at the measured matmul throughput. The model is the
Llama-3-8B shape of ``bench_gpu.py`` with random weights. Programmatic dependent launch is
off (``SGL_DSL_PDL=0``) unless ``--pdl``: with it a kernel starts while its predecessor
runs and the profiler's duration includes that wait, so families double-count. Usage::

    python benchmarks/profile_gpu_step.py --tokenizer DIR [--kv-cache-dtype fp8_e4m3]
        [--cases 256x600,128x1000] [--new 24] [--pdl]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from bench_gpu import LLAMA3_8B, Bench, copy_bandwidth, matmul_throughput, model_dir
from torch.profiler import ProfilerActivity, profile

from backend.engine import Engine

FAMILIES = (  # (family, substrings of the kernel name, lower case); the first match wins
    ("decode_attn", ("_decode_partial", "_merge_splits")),
    ("extend_attn", ("_extend_kernel",)),
    ("gemv", ("gemv",)),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_")),
    ("norm", ("norm",)),
    ("activation", ("silu",)),
    ("rope", ("rope",)),
    ("kv_write", ("kv_write",)),
)


def family(kernel: str) -> str:
    name = kernel.lower()
    return next((f for f, keys in FAMILIES if any(k in name for k in keys)), "other")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--cases", default="256x600,192x800,128x1000,64x1100,16x1200")
    parser.add_argument("--new", type=int, default=24, help="new tokens per profiled run")
    parser.add_argument("--pdl", action="store_true", help="keep dependent launch on")
    args = parser.parse_args()
    if not args.pdl:
        os.environ["SGL_DSL_PDL"] = "0"  # read when the engine's first kernel launches
    bandwidth, flops = copy_bandwidth(), matmul_throughput()
    root = Path(tempfile.mkdtemp())
    engine = Engine(
        str(model_dir(LLAMA3_8B, args.tokenizer, root, "llama3-8b")),
        device="cuda",
        load_format="dummy",
        max_running_requests=256,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    bench = Bench(engine, bandwidth, flops)
    step_flops = 2 * (bench.layer_params + bench.head_params)  # per request
    print(
        f"# {torch.cuda.get_device_name()}, KV {args.kv_cache_dtype}; copy "
        f"{bandwidth / 1e12:.2f} TB/s, matmul {flops / 1e12:.0f} TFLOP/s; us per forward pass"
    )
    for case in args.cases.split(","):
        batch, context = (int(x) for x in case.split("x"))
        prompts = bench.prompts([context] * batch)
        params = {"temperature": 0, "ignore_eos": True, "max_new_tokens": args.new}
        engine.flush_cache()
        engine.generate(input_ids=prompts, sampling_params=params)  # caches the prompts, warms
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine.generate(input_ids=prompts, sampling_params=params)
        times: dict[str, float] = defaultdict(float)
        for event in prof.key_averages():
            times[family(event.key)] += event.self_device_time_total / args.new
        read = bench.weight_bytes + batch * (context + args.new / 2) * bench.kv_bytes_per_token
        compute = batch * step_flops / flops
        print(
            f"batch {batch} x context {context}: kernels {sum(times.values()):.0f} us; roofline: "
            f"bytes {read / bandwidth * 1e6:.0f} us, FLOPs {compute * 1e6:.0f} us"
        )
        ranked = sorted(times.items(), key=lambda item: -item[1])
        print("    " + ", ".join(f"{name} {us:.0f}" for name, us in ranked))
    engine.shutdown()


if __name__ == "__main__":
    main()
