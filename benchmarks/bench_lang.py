"""What the language and the server cost on top of the engine, side by side in one run.

The W5 workload (16 questions after a shared ~600-token 5-shot prefix, 16 new tokens,
greedy, embedded SmolLM2-135M-Instruct) run as:
- engine: one batched ``Engine.generate`` call (the floor);
- program: the same as an ``@sgl.function`` with ``run_batch`` on the in-process engine;
- compiled: that program's ``compile().run_batch``;
- endpoint: ``run_batch`` through ``RuntimeEndpoint`` to our HTTP server (same process);
- openai: ``run_batch`` through the ``OpenAI`` backend (completions) to the same server;
- fork: one program that forks 16 ways after the prefix (the prefix-hint path).
Each row flushes the cache first; outputs must equal the engine's. One torch thread.

    .venv/bin/python benchmarks/bench_lang.py [--repeat 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")

from bench_engine import NEW_TOKENS_W5, five_shot_prefix, w5_prompts

import sgl_dsl as sgl
from backend.server.runner import ServerThread

PREFIX = five_shot_prefix()
QUESTIONS = [p[len(PREFIX) :] for p in w5_prompts()]


@sgl.function
def w5(s, question):
    s += PREFIX + question
    s += sgl.gen("answer", max_tokens=NEW_TOKENS_W5, temperature=0)


@sgl.function
def w5_fork(s):
    s += PREFIX
    forks = s.fork(len(QUESTIONS))
    forks += QUESTIONS
    forks += sgl.gen("answer", max_tokens=NEW_TOKENS_W5, temperature=0)
    forks.join()


def timed(fn: Callable[[], list[str]], engine: sgl.Engine, repeat: int) -> tuple[float, list[str]]:
    times, out = [], []
    for _ in range(repeat):
        engine.flush_cache()
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()

    engine = sgl.Engine(num_threads=1)
    server = ServerThread(engine)
    endpoint = sgl.RuntimeEndpoint(server.url)
    openai = sgl.OpenAI(
        "SmolLM2-135M-Instruct", is_chat_model=False, base_url=server.url + "/v1", api_key="-"
    )
    batch = [{"question": q} for q in QUESTIONS]
    params = {"temperature": 0, "max_new_tokens": NEW_TOKENS_W5}
    compiled = w5.compile(backend=engine)

    def answers(states: list) -> list[str]:
        return [s["answer"] for s in states]

    rows: dict[str, Callable[[], list[str]]] = {
        "engine": lambda: [r["text"] for r in engine.generate(w5_prompts(), params)],
        "program": lambda: answers(w5.run_batch(batch, backend=engine)),
        "compiled": lambda: answers(compiled.run_batch(batch, backend=engine)),
        "endpoint": lambda: answers(w5.run_batch(batch, backend=endpoint)),
        "openai": lambda: answers(w5.run_batch(batch, backend=openai)),
        "fork": lambda: w5_fork.run(backend=engine)["answer"],
    }
    timed(rows["engine"], engine, 1)  # warm-up
    results = {}
    reference = None
    for name, fn in rows.items():
        seconds, out = timed(fn, engine, args.repeat)
        reference = reference or out
        results[name] = {"seconds": seconds, "same_output": out == reference}
    base = results["engine"]["seconds"]
    print(f"W5 (16 x ~600-token shared prefix, 16 new tokens), 1 thread, {platform.processor()}")
    print("| path | median s | vs engine | outputs equal |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['seconds']:.2f} | {r['seconds'] / base:.2f}x | {r['same_output']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    endpoint.shutdown()
    server.stop()
    engine.shutdown()


if __name__ == "__main__":
    main()
