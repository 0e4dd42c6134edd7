"""Engine benchmark on CPU: our engine vs transformers, side by side in one run.

Workloads (embedded SmolLM2-135M-Instruct, float32, greedy):
- W5: 16 questions sharing a ~600-token 5-shot prefix, 16 new tokens each.
- decode: one stream, a short prompt, 64 new tokens.
Every (system, workload, threads) cell runs in a fresh subprocess with torch pinned to that
many threads, after a warm-up, so cells do not share caches or thread pools.

    .venv/bin/python benchmarks/bench_engine.py [--threads 1 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

NEW_TOKENS_W5 = 16
NEW_TOKENS_DECODE = 64
COUNTRIES = ["Alvania", "Borduria", "Carpania", "Drovia", "Estrel"]
RIVERS = ["Ilm", "Varna", "Sauk", "Teller", "Mossa"]


def five_shot_prefix() -> str:
    """A deterministic ~600-token few-shot prefix (5 worked examples)."""
    shots = []
    for i, (country, river) in enumerate(zip(COUNTRIES, RIVERS)):
        shots.append(
            f"Passage: {country} is a small mountain country whose capital lies on the river "
            f"{river}. Its population is about {3 + i} million people, most of whom live in "
            f"the valleys. The main exports of {country} are timber, cheese, wool and precision "
            f"instruments, and its parliament meets in the old town hall every spring. Visitors "
            f"come for the lakes, the wooden churches and the long summer festivals.\n"
            f"Question: On which river does the capital of {country} lie?\n"
            f"Answer: The capital of {country} lies on the river {river}.\n\n"
        )
    return "Read each passage and answer the question in one sentence.\n\n" + "".join(shots)


def w5_prompts() -> list[str]:
    """16 short questions after the shared 5-shot prefix."""
    topics = ["timber", "cheese", "wool", "lakes", "churches", "valleys", "festivals", "rivers"]
    prefix = five_shot_prefix()
    return [
        prefix + f"Question: Is Region {i} known for {topics[i % 8]}?\nAnswer:" for i in range(16)
    ]


DECODE_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


# ---- workers (one per subprocess) ----------------------------------------------------------


def run_ours(workload: str, threads: int, radix: bool) -> dict:
    from backend.engine import Engine

    engine = Engine(num_threads=threads, disable_radix_cache=not radix, max_total_tokens=16384)
    engine.generate("warm up", {"max_new_tokens": 4})
    engine.flush_cache()
    if workload == "w5":
        prompts = w5_prompts()
        params = {"temperature": 0, "max_new_tokens": NEW_TOKENS_W5, "ignore_eos": True}
        start = time.perf_counter()
        out = engine.generate(prompts, params)
        seconds = time.perf_counter() - start
        stats = engine.get_stats()
        result = {
            "seconds": seconds,
            "prompt_tokens": sum(r["meta_info"]["prompt_tokens"] for r in out),
            "cache_hit_rate": stats["cache_hit_rate"],
            "kv_slots_used": stats["kv_slots_used"],
        }
    else:
        params = {"temperature": 0, "max_new_tokens": NEW_TOKENS_DECODE, "ignore_eos": True}
        start = time.perf_counter()
        out = engine.generate(DECODE_PROMPT, params)
        seconds = time.perf_counter() - start
        result = {"seconds": seconds, "tok_per_s": NEW_TOKENS_DECODE / seconds}
    engine.shutdown()
    return result


def run_transformers(workload: str, threads: int, batched: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from backend.model_loader import resolve_model_dir

    torch.set_num_threads(threads)
    model_dir = resolve_model_dir(None)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pad = tok.eos_token_id

    def generate(prompts: list[str], new: int) -> None:
        enc = tok(prompts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            model.generate(
                **enc, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=pad
            )

    generate(["warm up"], 4)
    start = time.perf_counter()
    if workload == "w5":
        prompts = w5_prompts()
        if batched:
            generate(prompts, NEW_TOKENS_W5)
        else:
            for p in prompts:
                generate([p], NEW_TOKENS_W5)
        return {"seconds": time.perf_counter() - start}
    generate([DECODE_PROMPT], NEW_TOKENS_DECODE)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tok_per_s": NEW_TOKENS_DECODE / seconds}


WORKERS = {
    "ours-radix": lambda w, t: run_ours(w, t, radix=True),
    "ours-no-radix": lambda w, t: run_ours(w, t, radix=False),
    "transformers-batched": lambda w, t: run_transformers(w, t, batched=True),
    "transformers-sequential": lambda w, t: run_transformers(w, t, batched=False),
}
CELLS = [
    ("w5", "ours-radix"),
    ("w5", "ours-no-radix"),
    ("w5", "transformers-batched"),
    ("w5", "transformers-sequential"),
    ("decode", "ours-radix"),
    ("decode", "transformers-batched"),
]


def run_cell(workload: str, system: str, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--worker", system, workload, str(threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{system} {workload} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--json", type=Path, default=Path(__file__).parent / "results" / "engine.json"
    )
    parser.add_argument(
        "--worker", nargs=3, metavar=("SYSTEM", "WORKLOAD", "THREADS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        system, workload, threads = args.worker
        print(json.dumps(WORKERS[system](workload, int(threads))))
        return

    results: dict[str, dict] = {}
    for threads in args.threads:
        for workload, system in CELLS:
            key = f"{workload}/{system}/{threads}t"
            results[key] = run_cell(workload, system, threads)
            print(f"  {key}: {results[key]}", file=sys.stderr, flush=True)

    print(
        f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"model SmolLM2-135M-Instruct float32, greedy\n"
    )
    print("| workload | system | threads | seconds | tok/s | vs transformers batched |")
    print("|---|---|---|---|---|---|")
    for threads in args.threads:
        for workload, system in CELLS:
            r = results[f"{workload}/{system}/{threads}t"]
            base = results[f"{workload}/transformers-batched/{threads}t"]["seconds"]
            tps = f"{r['tok_per_s']:.1f}" if "tok_per_s" in r else ""
            ratio = base / r["seconds"]
            print(
                f"| {workload} | {system} | {threads} | {r['seconds']:.2f} | {tps} | {ratio:.2f}x |"
            )
    for threads in args.threads:
        r = results[f"w5/ours-radix/{threads}t"]
        print(
            f"\nW5 ({threads} thread(s)): prefix-cache hit rate {r['cache_hit_rate']:.1%}, "
            f"{r['prompt_tokens']} prompt tokens, {r['kv_slots_used']} KV slots in use afterwards"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
