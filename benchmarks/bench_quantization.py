"""Weight-only quantization on CPU: float32, bfloat16, int8 and int4 side by side in one run.

Per configuration of our engine (embedded SmolLM2-135M-Instruct, greedy, each in a fresh
subprocess with one thread): decode ms/token (one stream, ``(t(65 tokens) - t(1 token)) /
64`` through ``Engine.generate``), prefill tokens/s (a ~600-token prompt, cache flushed),
the bytes of linear weights one decode step reads and the bandwidth that implies, resident
memory, and accuracy against float32 on a fixed text (teacher-forced: mean negative
log-likelihood and top-1 agreement). With ``.venv-peers-llama`` present, llama.cpp runs the
same two timings on the embedded Q4_1 GGUF and on its float32 rewrite. "int4, no integer
GEMM" is int4 with the best kernels short of ``avx512-vnni`` (prefill through dequantization
and oneDNN's bfloat16 GEMM): the A/B of the integer prefill GEMM (``cpu_ops.qgemm``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_quantization.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # benchmarks.*, bench_engine
DECODE_TOKENS = 64
REPEATS = 3  # best of: the machine is shared
DECODE_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
TEXT = (
    "The lighthouse stood at the end of a narrow spit of rock, and for forty years the same "
    "family had kept its lamp burning. Every evening the keeper climbed the one hundred and "
    "twelve steps, trimmed the wick, polished the great lens and wound the clockwork that "
    "turned it. Ships passing in the night saw its beam sweep across the water every ten "
    "seconds, and they knew where the reef lay. In winter the storms came from the north, "
    "throwing spray over the gallery and rattling the windows of the lantern room. The keeper "
    "wrote down the weather in a logbook three times a day: the wind, the state of the sea, "
    "the ships he had seen and any lights that had failed. When the first electric lamp was "
    "installed, the clockwork was kept in working order anyway, because the keeper did not "
    "trust a machine he could not repair with his own hands. Years later, when the light was "
    "automated and the family moved to the town, the logbooks were given to the museum, where "
    "they still show how much work it took to keep one small light shining."
)

# name -> Engine options (ours) or GGUF choice (llama.cpp)
OURS: dict[str, dict[str, Any]] = {
    "float32": {},
    "bfloat16": {"dtype": "bfloat16"},
    "int8": {"quantization": "int8"},
    "int4": {"quantization": "int4"},
    # the A/B of the integer prefill GEMM: the same kernels but the AVX-512 GEMM
    "int4, no integer GEMM": {"quantization": "int4", "integer_gemm": False},
    "int4 + bf16 activations": {"quantization": "int4", "dtype": "bfloat16"},
}
LLAMA_CPP = {"llama.cpp Q4_1": "q4_1", "llama.cpp f32": "f32"}


def prefill_text() -> str:
    from bench_engine import five_shot_prefix

    return five_shot_prefix()


def best(run: Any) -> float:
    return min(run() for _ in range(REPEATS))


def rss_mib() -> int:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) // 1024


# ---- workers ---------------------------------------------------------------------------------


def run_ours(name: str) -> dict[str, Any]:
    import torch

    from backend import cpu_ops
    from backend.engine import Engine
    from backend.quantization import QuantizedWeight

    options = dict(OURS[name])
    if not options.pop("integer_gemm", True):  # the best kernels without cpu_ops.qgemm
        cpu_ops.quant_kernels([k for k in cpu_ops.quant_kernels()[1] if k != "avx512-vnni"][-1])
    engine = Engine(num_threads=1, max_total_tokens=4096, **options)
    qkv = engine.model.model.layers[0].self_attn.qkv_weight
    if "quantization" in options and not isinstance(qkv, QuantizedWeight):
        raise RuntimeError("Engine ignored quantization= (the engine does not pass it on)")
    greedy = {"temperature": 0, "ignore_eos": True}
    engine.generate("Warm up.", {**greedy, "max_new_tokens": 8})

    def timed(prompt: str | None, ids: list[int] | None, new: int) -> float:
        engine.wait_idle()
        engine.flush_cache()
        start = time.perf_counter()
        engine.generate(prompt, {**greedy, "max_new_tokens": new}, input_ids=ids)
        return time.perf_counter() - start

    decode = (
        best(lambda: timed(DECODE_PROMPT, None, DECODE_TOKENS + 1))
        - best(lambda: timed(DECODE_PROMPT, None, 1))
    ) / DECODE_TOKENS
    prefill_ids = engine.tokenizer(prefill_text())["input_ids"]
    prefill = len(prefill_ids) / best(lambda: timed(None, prefill_ids, 1))

    text_ids = engine.tokenizer(TEXT)["input_ids"]
    scored = engine.generate(
        input_ids=text_ids,
        sampling_params={"max_new_tokens": 0},
        return_logprob=True,
        logprob_start_len=1,
        top_logprobs_num=1,
        return_text_in_logprobs=False,
    )["meta_info"]
    logprobs = [t[0] for t in scored["input_token_logprobs"]]
    nll = -sum(logprobs) / len(logprobs)
    top1 = [top[0][1] for top in scored["input_top_logprobs"]]
    greedy_ids = engine.generate(DECODE_PROMPT, {**greedy, "max_new_tokens": DECODE_TOKENS})
    engine.wait_idle()
    engine.check_kv_invariant()
    result = {
        "decode_ms": decode * 1e3,
        "prefill_tok_s": prefill,
        "prefill_tokens": len(prefill_ids),
        "weight_bytes": linear_weight_bytes(engine.model),
        "rss_mib": rss_mib(),
        "nll": nll,
        "top1": top1,
        "greedy_ids": greedy_ids["output_ids"],
        "torch": torch.__version__,
    }
    engine.shutdown()
    return result


def linear_weight_bytes(model: Any) -> int:
    """Bytes of the linear weights one decode step reads: every decoder matrix and the
    output projection (the embedding lookup reads one row; not counted). ``nbytes`` is the
    same for a float tensor and a ``QuantizedWeight`` (packed values and scales)."""
    total = model.lm_head.weight.nbytes
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = (
            [attn.qkv_weight]
            if attn.qkv_weight is not None
            else [p.weight for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
        )
        gate_up = (
            [mlp.gate_up_weight]
            if mlp.gate_up_weight is not None
            else [mlp.gate_proj.weight, mlp.up_proj.weight]
        )
        total += sum(w.nbytes for w in [*qkv, *gate_up, attn.o_proj.weight, mlp.down_proj.weight])
    return total


def run_llama_cpp(name: str) -> dict[str, Any]:
    from llama_cpp import Llama, __version__

    path = os.environ["BENCH_GGUF"] if LLAMA_CPP[name] == "q4_1" else os.environ["BENCH_GGUF_F32"]
    llm = Llama(model_path=path, n_ctx=2048, n_threads=1, n_threads_batch=1, verbose=False)
    eos = llm.token_eos()
    greedy = {"temperature": 0.0, "top_k": 1, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0}

    def timed(prompt: str, new: int) -> float:
        llm.reset()  # no prefix reuse
        start = time.perf_counter()
        llm.create_completion(prompt, max_tokens=new, logit_bias={eos: -1e9}, **greedy)
        return time.perf_counter() - start

    timed("Warm up.", 8)
    decode = (
        best(lambda: timed(DECODE_PROMPT, DECODE_TOKENS + 1))
        - best(lambda: timed(DECODE_PROMPT, 1))
    ) / DECODE_TOKENS
    text = prefill_text()
    n = len(llm.tokenize(text.encode(), add_bos=False))
    prefill = n / best(lambda: timed(text, 1))
    return {"decode_ms": decode * 1e3, "prefill_tok_s": prefill, "prefill_tokens": n,
            "file_bytes": Path(path).stat().st_size, "rss_mib": rss_mib(),
            "llama_cpp": __version__}  # fmt: skip


# ---- driver ----------------------------------------------------------------------------------


def run_worker(name: str) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}  # fmt: skip
    python = sys.executable
    if name in LLAMA_CPP:
        from backend.model_loader import embedded_gguf_path
        from benchmarks.programs.gguf_f32 import f32_gguf

        python = str(ROOT / ".venv-peers-llama" / "bin" / "python")
        env |= {"BENCH_GGUF": str(embedded_gguf_path()), "BENCH_GGUF_F32": str(f32_gguf())}
    cmd = [python, str(Path(__file__).resolve()), "--worker", name]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: dict[str, dict[str, Any]]) -> str:
    ref = results["float32"]
    lines = [
        "| weights | decode ms/token | vs float32 | prefill tok/s | linear weight MB/token "
        "| achieved GB/s | RSS MiB | NLL nats/token | top-1 = float32 | greedy = float32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if "weight_bytes" in r:
            mb = r["weight_bytes"] / 1e6
            gbs = f"{r['weight_bytes'] / (r['decode_ms'] * 1e-3) / 1e9:.1f}"
            agree = sum(a == b for a, b in zip(r["top1"], ref["top1"])) / len(ref["top1"])
            same = next(
                (i for i, (a, b) in enumerate(zip(r["greedy_ids"], ref["greedy_ids"])) if a != b),
                len(ref["greedy_ids"]),
            )
            acc = [f"{r['nll']:.3f}", f"{agree:.0%}", f"{same}/{len(ref['greedy_ids'])} tokens"]
            size = f"{mb:.0f}"
        else:
            size, gbs, acc = f"{r['file_bytes'] / 1e6:.0f} (file)", "", ["", "", ""]
        lines.append(
            f"| {name} | {r['decode_ms']:.1f} | {ref['decode_ms'] / r['decode_ms']:.2f}x "
            f"| {r['prefill_tok_s']:.0f} | {size} | {gbs} | {r['rss_mib']} | "
            + " | ".join(acc)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/quantization.json")
    parser.add_argument("--only", nargs="*", default=[], help="configuration names")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run = run_llama_cpp if args.worker in LLAMA_CPP else run_ours
        print(json.dumps(run(args.worker)))
        return
    names = [n for n in [*OURS, *LLAMA_CPP] if not args.only or n in args.only or n == "float32"]
    if not (ROOT / ".venv-peers-llama").exists():
        names = [n for n in names if n not in LLAMA_CPP]
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        results[name] = run_worker(name)
        print(f"  {name}: {results[name]['decode_ms']:.1f} ms/token", file=sys.stderr, flush=True)
    prefill = results["float32"]["prefill_tokens"]
    print(f"\nSmolLM2-135M-Instruct, 1 thread, {os.cpu_count()} cores; prefill {prefill} "
          f"tokens; decode {DECODE_TOKENS} tokens (best of {REPEATS})\n")  # fmt: skip
    print(table(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
