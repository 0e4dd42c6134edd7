"""GPU benchmarks of the engine (issue 7): one table, every decode figure beside its roofline.

Models have random bf16 weights (``load_format="dummy"``; speed does not depend on the
values) in the shapes of Llama-3-8B and of the embedded SmolLM2-135M; token ids are random
and generation ignores EOS. The tokenizer (only used to detokenize and for the JSON-schema
workload) is SmolLM2's; ids it cannot decode are never sampled.

Workloads:
- ``batch1``: one request, 128-token prompt, 128 new tokens;
- ``batch64``: 64 x (512 in, 128 out);
- ``random256``: 256 requests, input and output lengths uniform in 100-1024;
- ``prefix``: 64 questions (32 tokens each) after one shared 2,000-token prefix, 32 new
  tokens, radix cache on vs off;
- ``json64``: batch 64, 128 new tokens, JSON schema constrained vs unconstrained;
- ``prefill``: a prefill pass of 1 x 16, 1 x 64, 1 x 256, 16 x 16 or 64 x 16 (requests x
  tokens) after a cached 1,000-token prefix, from a CUDA graph vs eager (also on the
  SmolLM2 shape with ``small``);
- ``longctx``: a prefill pass of 16 tokens after a cached 1,000 / 4,000 / 8,000-token
  context, from a CUDA graph vs eager, beside its bandwidth bound.

Bandwidth: a decode step reads every weight except the embedding table plus the KV of every
token in the batch; achieved = those bytes x steps / decode time, where decode time is the
run's time minus that of the same run with one new token (its prefill). The roofline is the
measured device-to-device copy bandwidth.

End-to-end bound (``e2e_bound_tok_s``): the output tokens over the time a run would take
with its prefill at the measured dense bf16 matmul throughput (linear and attention FLOPs;
or, when longer, each prefill pass reading the weights once at the copy bandwidth) and then
its decode steps at the copy bandwidth (the bytes above): prefill and decode in series, as
the engine runs them when the requests arrive together. Usage (on a GPU)::

    python benchmarks/bench_gpu.py --tokenizer DIR [--only batch1,batch64] [--json out.json]
        [--kv-cache-dtype fp8_e4m3] [--chunked-prefill-size N] [--enable-mixed-chunk]
        [--schedule-policy lof]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from backend.engine import Engine

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
SMOLLM2_135M = {
    **LLAMA3_8B,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
JSON_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "minLength": 600},
        "year": {"type": "integer"},
    },
    "required": ["title", "year"],
}


def model_dir(shape: dict[str, Any], tokenizer_dir: Path, root: Path, name: str) -> Path:
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(shape))
    for file in TOKENIZER_FILES:
        if (tokenizer_dir / file).is_file():
            shutil.copyfile(tokenizer_dir / file, out / file)
    return out


def best_seconds(work: Callable[[], object], runs: int = 12) -> float:
    """The fastest of ``runs`` runs of ``work`` on the GPU, timed with CUDA events."""
    best = float("inf")
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        work()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written), best of 12."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return nbytes / best_seconds(lambda: dst.copy_(src))


def matmul_throughput(n: int = 8192) -> float:
    """Dense bf16 ``n x n x n`` matmul throughput in FLOP/s, best of 12."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    return 2 * n**3 / best_seconds(lambda: torch.mm(a, b))


class Bench:
    """One engine and the byte and FLOP counts of its model."""

    def __init__(self, engine: Engine, bandwidth: float, flops: float) -> None:
        self.engine = engine
        self.bandwidth = bandwidth
        self.flops = flops
        model = engine.model
        # (fused q/k/v and gate/up are not parameters: the projections' weights view them)
        self.layer_params = sum(p.numel() for p in model.model.layers.parameters() if p.dim() == 2)
        self.head_params = model.lm_head.weight.numel()
        self.attn_width = model.num_heads * model.head_dim * model.num_layers
        embed = model.model.embed_tokens.weight
        self.weight_bytes = sum(
            p.numel() * p.element_size()
            for p in model.parameters()
            if p is not embed or model.lm_head.weight is embed
        )
        self.kv_bytes_per_token = engine.pool.bytes_per_slot()
        self.vocab = min(len(engine.tokenizer), model.vocab_size)
        self.rng = random.Random(0)
        if engine.config.enable_mixed_chunk:  # compile the kernels of a mixed pass untimed
            params = {"temperature": 0, "ignore_eos": True, "max_new_tokens": 64}
            running = engine.submit(
                input_ids=self.prompts([16]), sampling_params=params, stream=True
            )[0]
            while not (running.poll() or running.output_ids):  # decoding: later passes carry it
                time.sleep(0.001)
            engine.generate(input_ids=self.prompts([2048]), sampling_params=params)
            running.result(timeout=600)
            assert engine.get_stats()["forward_steps"]["mixed"] > 0

    def prefill_bound_s(self, in_lens: list[int]) -> float:
        """Seconds to prefill prompts of ``in_lens`` (uncached) at the matmul throughput or,
        when longer, one weight read per prefill pass at the copy bandwidth."""
        tokens = sum(in_lens)
        linear = 2 * self.layer_params * tokens + 2 * self.head_params * len(in_lens)
        causal_pairs = sum(n * (n + 1) // 2 for n in in_lens)  # (query, key) pairs
        attention = 4 * self.attn_width * causal_pairs  # q.k and p.v per pair, head and layer
        passes = -(-tokens // self.engine.config.chunked_prefill_size)
        return max((linear + attention) / self.flops, passes * self.weight_bytes / self.bandwidth)

    def prompts(self, lengths: list[int]) -> list[list[int]]:
        return [[self.rng.randrange(100, self.vocab) for _ in range(n)] for n in lengths]

    def timed(self, prompts: list[list[int]], params: list[dict[str, Any]]) -> tuple[float, list]:
        self.engine.flush_cache()
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = self.engine.generate(input_ids=prompts, sampling_params=params)
        return time.perf_counter() - start, out

    def decode_row(
        self, name: str, in_lens: list[int], out_lens: list[int], extra: dict | None = None
    ) -> dict[str, Any]:
        """Output tok/s of a batch, and the decode phase's bandwidth against the roofline."""
        prompts = self.prompts(in_lens)
        base = {"temperature": 0, "ignore_eos": True, **(extra or {})}
        params = [{**base, "max_new_tokens": n} for n in out_lens]
        prefill_only = [{**p, "max_new_tokens": 1} for p in params]
        # Warm-up: the first kernels of these shapes, and the eager prefill's (small passes
        # replay graphs, so the first call alone may not run the eager kernels).
        self.timed(prompts[:2], params[:2])
        self.timed(prompts, prefill_only)
        prefill_s, _ = self.timed(prompts, prefill_only)
        before = self.engine.get_stats()
        wall, out = self.timed(prompts, params)
        after = self.engine.get_stats()
        tokens = sum(len(o["output_ids"]) for o in out)
        decode_steps = after["forward_steps"]["decode"] - before["forward_steps"]["decode"]
        mixed_steps = after["forward_steps"]["mixed"] - before["forward_steps"]["mixed"]
        steps = max(out_lens) - 1
        decode_s = max(wall - prefill_s, 1e-9)
        # KV read per step: each running request's context at that step.
        kv_tokens = sum(sum(i + j for j in range(1, o)) for i, o in zip(in_lens, out_lens) if o > 1)
        moved = steps * self.weight_bytes + kv_tokens * self.kv_bytes_per_token
        achieved = moved / decode_s
        bound_s = self.prefill_bound_s(in_lens) + moved / self.bandwidth
        return {
            "workload": name,
            "requests": len(prompts),
            "output_tokens": tokens,
            "wall_s": round(wall, 3),
            "output_tok_s": round(tokens / wall, 1),
            "decode_s": round(decode_s, 3),
            "decode_tok_s": round((tokens - len(prompts)) / decode_s, 1),
            "decode_bw_TBps": round(achieved / 1e12, 3),
            "bw_fraction": round(achieved / self.bandwidth, 3),
            "e2e_bound_tok_s": round(tokens / bound_s, 1),
            "e2e_of_bound": round(bound_s / wall, 3),
            "decode_steps": decode_steps,
            "prefill_steps": after["forward_steps"]["prefill"] - before["forward_steps"]["prefill"],
            "mixed_steps": mixed_steps,  # prefill passes that also decoded the running requests
            "mean_decode_batch": round(
                (tokens - len(prompts)) / max(decode_steps + mixed_steps, 1), 1
            ),
            "retractions": after["retractions"] - before["retractions"],
        }


def run_batch1(b: Bench) -> list[dict]:
    row = b.decode_row("batch1 (128 in, 128 out)", [128], [128])
    row["roofline_tok_s"] = round(b.bandwidth / b.weight_bytes, 1)
    return [row]


def run_batch64(b: Bench) -> list[dict]:
    return [b.decode_row("batch64 (512 in, 128 out)", [512] * 64, [128] * 64)]


def run_random256(b: Bench) -> list[dict]:
    rng = random.Random(1)
    ins = [rng.randint(100, 1024) for _ in range(256)]
    outs = [rng.randint(100, 1024) for _ in range(256)]
    return [b.decode_row("random256 (100-1024 in/out)", ins, outs)]


def prefix_prompts(b: Bench) -> tuple[list[list[int]], list[dict[str, Any]]]:
    """64 questions of 32 tokens after one shared 2,000-token prefix, 32 new tokens each."""
    rng = random.Random(2)
    prefix = [rng.randrange(100, b.vocab) for _ in range(2000)]
    prompts = [prefix + [rng.randrange(100, b.vocab) for _ in range(32)] for _ in range(64)]
    return prompts, [{"temperature": 0, "ignore_eos": True, "max_new_tokens": 32}] * 64


def time_prefix(b: Bench) -> tuple[float, float]:
    """Seconds for the prefix workload on a cold cache, and the cache hit rate."""
    prompts, params = prefix_prompts(b)
    b.timed(prompts[:1], params[:1])  # warm-up
    before = b.engine.get_stats()
    seconds, _ = b.timed(prompts, params)
    after = b.engine.get_stats()
    prompt_tokens = after["prompt_tokens"] - before["prompt_tokens"]
    return seconds, (after["cached_tokens"] - before["cached_tokens"]) / prompt_tokens


def prefill_ms(
    b: Bench, prefix: list[int], batches: list[list[list[int]]], mode: str
) -> tuple[float, int]:
    """Median milliseconds of one call per batch of prompts (each ``prefix`` + new tokens,
    one output token) with ``prefix`` cached; the first batch is a warm-up. ``mode``:
    ``graph`` (prefill passes replay CUDA graphs where they can) or ``eager`` (graphs set
    aside). Returns the median and the number of passes replayed from graphs."""
    runner = b.engine.scheduler.runner
    graphs = runner.prefill_graphs
    params = {"temperature": 0, "ignore_eos": True, "max_new_tokens": 1}
    replays = graphs.replays if graphs else 0
    runner.prefill_graphs = graphs if mode == "graph" else None
    try:
        b.engine.flush_cache()
        b.engine.generate(input_ids=prefix, sampling_params=params)  # caches it
        times = []
        for batch in batches:
            torch.cuda.synchronize()
            start = time.perf_counter()
            b.engine.generate(input_ids=batch, sampling_params=params)
            times.append(time.perf_counter() - start)
    finally:
        runner.prefill_graphs = graphs
    times = sorted(times[1:])
    return times[len(times) // 2] * 1e3, (graphs.replays - replays if graphs else 0)


def run_short_prefill(b: Bench) -> list[dict]:
    """Latency of a prefill pass of ``n`` new tokens for each of ``r`` requests after a cached
    1,000-token prefix (``r`` programs' ``gen`` after appended text), one new token, median
    of 10: replayed from a CUDA graph against the same engine with its prefill graphs set
    aside (eager)."""
    if b.engine.scheduler.runner.prefill_graphs is None:
        return []
    prefix = b.prompts([1000])[0]
    rows = []
    for r, n in ((1, 16), (1, 64), (1, 256), (16, 16), (64, 16)):
        batches = [[prefix + s for s in b.prompts([n] * r)] for _ in range(11)]
        graph_ms, replays = prefill_ms(b, prefix, batches, "graph")
        eager_ms, _ = prefill_ms(b, prefix, batches, "eager")
        rows.append(
            {
                "workload": f"prefill {r} x {n} after a cached 1000",
                "graph_ms": round(graph_ms, 2),
                "eager_ms": round(eager_ms, 2),
                "speedup": round(eager_ms / graph_ms, 2),
                # passes replayed (the prefix's, then one per call: 12 when all were)
                "graph_passes": replays,
            }
        )
    return rows


def run_long_context(b: Bench) -> list[dict]:
    """One request's 16-token prefill after a cached 1,000 / 4,000 / 8,000-token context (a
    program's ``gen`` late in a long conversation), median of 10, from a graph and eagerly,
    beside the pass's bound: weights and the context's KV read once at the copy bandwidth.
    (The extend kernel's own figures, split over the prefix or not: ``tune_extend_attention``.)"""
    if b.engine.scheduler.runner.prefill_graphs is None:
        return []
    rows = []
    for context in (1000, 4000, 8000):
        prefix = b.prompts([context])[0]
        batches = [[prefix + b.prompts([16])[0]] for _ in range(11)]
        graph_ms, replays = prefill_ms(b, prefix, batches, "graph")
        eager_ms, _ = prefill_ms(b, prefix, batches, "eager")
        bound = (b.weight_bytes + context * b.kv_bytes_per_token) / b.bandwidth
        rows.append(
            {
                "workload": f"prefill 1 x 16 after a cached {context}",
                "graph_ms": round(graph_ms, 2),
                "eager_ms": round(eager_ms, 2),
                "speedup": round(eager_ms / graph_ms, 2),
                "graph_passes": replays,
                "bound_ms": round(bound * 1e3, 2),
            }
        )
    return rows


def run_json64(b: Bench) -> list[dict]:
    """Batch 64, 128 new tokens: a JSON schema against unconstrained generation. The schema's
    600-character minimum keeps every request decoding all 128 tokens, each one a masked
    decode step (jump-forward only appends the opening ``{"title":"``). Both are warmed up,
    then timed twice, interleaved (one slow pass of the host moved a single timing by 20%)."""
    prompts = b.prompts([256] * 64)
    free = [{"temperature": 0, "ignore_eos": True, "max_new_tokens": 128}] * 64
    constrained = [{"temperature": 0, "max_new_tokens": 128, "json_schema": JSON_SCHEMA}] * 64
    b.timed(prompts, constrained)  # compiles the schema, builds the masks it visits
    b.timed(prompts, free)
    prompts = b.prompts([256] * 64)  # measured on other prompts than the warm-ups
    free_s = cons_s = 0.0
    for _ in range(2):  # interleaved, so that a slow moment of the host hits both alike
        seconds, free_out = b.timed(prompts, free)
        free_s += seconds
        seconds, cons_out = b.timed(prompts, constrained)
        cons_s += seconds
    free_tok = 2 * sum(len(o["output_ids"]) for o in free_out)
    cons_tok = 2 * sum(len(o["output_ids"]) for o in cons_out)
    return [
        {
            "workload": "json64 (batch 64, 128 out)",
            "free_tok_s": round(free_tok / free_s, 1),
            "json_tok_s": round(cons_tok / cons_s, 1),
            "json_tokens": cons_tok,
            "overhead": round((free_tok / free_s) / (cons_tok / cons_s) - 1, 3),
        }
    ]


def print_table(rows: list[dict[str, Any]]) -> None:
    """The rows as one markdown table (a workload's missing fields are blank)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    print("\n| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")


def free_gpu_memory() -> None:
    """Give the memory of engines no longer referenced back to the device."""
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", type=Path, required=True, help="SmolLM2 tokenizer folder")
    parser.add_argument(
        "--only", default="batch1,batch64,random256,prefix,json64,prefill,longctx,small"
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto or fp8_e4m3")
    parser.add_argument("--chunked-prefill-size", type=int, default=None, help="engine default")
    parser.add_argument("--enable-mixed-chunk", action="store_true")
    parser.add_argument("--schedule-policy", default=None, help="lpm (default), fcfs or lof")
    args = parser.parse_args()
    only = set(args.only.split(","))
    device = torch.cuda.get_device_name()
    bandwidth, flops = copy_bandwidth(), matmul_throughput()
    print(
        f"# {device}; copy bandwidth {bandwidth / 1e12:.2f} TB/s; bf16 matmul "
        f"{flops / 1e12:.0f} TFLOP/s; torch {torch.__version__}"
    )
    root = Path(tempfile.mkdtemp())
    results: dict[str, Any] = {
        "device": device,
        "copy_bandwidth_TBps": bandwidth / 1e12,
        "matmul_TFLOPs": flops / 1e12,
    }
    big = model_dir(LLAMA3_8B, args.tokenizer, root, "llama3-8b")

    def make_engine(**options: Any) -> Engine:
        options.setdefault("max_running_requests", 256)
        options.setdefault("kv_cache_dtype", args.kv_cache_dtype)
        if args.chunked_prefill_size:
            options.setdefault("chunked_prefill_size", args.chunked_prefill_size)
        options.setdefault("enable_mixed_chunk", args.enable_mixed_chunk)
        if args.schedule_policy:
            options.setdefault("schedule_policy", args.schedule_policy)
        return Engine(str(big), device="cuda", load_format="dummy", **options)

    rows: list[dict] = []
    start = time.perf_counter()
    engine = make_engine()
    print(
        f"# Llama-3-8B-shaped engine ready in {time.perf_counter() - start:.1f} s, "
        f"{engine.config.max_total_tokens} KV slots"
    )
    bench = Bench(engine, bandwidth, flops)
    for name, fn in (
        ("batch1", run_batch1),
        ("batch64", run_batch64),
        ("random256", run_random256),
        ("json64", run_json64),
        ("prefill", run_short_prefill),
        ("longctx", run_long_context),
    ):
        if name in only:
            new_rows = fn(bench)
            rows += new_rows
            for row in new_rows:
                print(json.dumps(row), flush=True)
    if "prefix" in only:
        on_s, hit = time_prefix(bench)
    engine.shutdown()
    del bench, engine
    free_gpu_memory()
    if "prefix" in only:
        off = make_engine(disable_radix_cache=True)
        off_s, _ = time_prefix(Bench(off, bandwidth, flops))
        off.shutdown()
        del off
        free_gpu_memory()
        rows.append(
            {
                "workload": "prefix (64 q x 32 after a shared 2000, 32 out)",
                "radix_on_s": round(on_s, 3),
                "radix_off_s": round(off_s, 3),
                "speedup": round(off_s / on_s, 2),
                "cache_hit_rate_on": round(hit, 3),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    if "small" in only:
        small = Engine(
            str(model_dir(SMOLLM2_135M, args.tokenizer, root, "smollm2-135m")),
            device="cuda",
            load_format="dummy",
            kv_cache_dtype=args.kv_cache_dtype,
        )
        sb = Bench(small, bandwidth, flops)
        small_rows = run_batch1(sb) + run_batch64(sb)
        if "prefill" in only:
            small_rows += run_short_prefill(sb)
        for row in small_rows:
            row["workload"] = "SmolLM2-135M " + row["workload"]
            rows.append(row)
            print(json.dumps(row), flush=True)
        small.shutdown()
    for row in rows:
        if args.kv_cache_dtype != "auto":
            row["workload"] += f" [KV {args.kv_cache_dtype}]"
        if args.enable_mixed_chunk:
            row["workload"] += " [mixed chunk]"
    results["rows"] = rows
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
