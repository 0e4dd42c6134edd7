"""Demo: generate from a few prompts on the embedded SmolLM2-135M-Instruct with the engine API,
then show what the radix cache saved. Run with `make demo`."""

from __future__ import annotations

import logging
import time

from backend.engine import Engine

SYSTEM = (
    "You are a concise assistant. Facts you may use: Paris is the capital of France, "
    "the Nile is the longest river in Africa, and water freezes at 0 degrees Celsius."
)
QUESTIONS = [
    "What is the capital of France?",
    "Which river is the longest in Africa?",
    "At what temperature does water freeze?",
    "Name a primary colour.",
]


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    engine = Engine()
    prompts = [
        engine.apply_chat_template(
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
        )
        for q in QUESTIONS
    ]
    params = {"temperature": 0, "max_new_tokens": 48}

    start = time.perf_counter()
    results = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    for question, res in zip(QUESTIONS, results):
        meta = res["meta_info"]
        print(f"Q: {question}\nA: {res['text'].strip()}")
        print(
            f"   ({meta['prompt_tokens']} prompt tokens, {meta['cached_tokens']} from cache, "
            f"{meta['completion_tokens']} generated)\n"
        )
    print(f"batch of {len(prompts)} in {elapsed:.2f} s")

    print("streaming: ", end="", flush=True)
    for chunk in engine.stream(prompts[0], params, incremental=True):
        print(chunk["text"], end="", flush=True)
    print()

    stats = engine.get_stats()
    kv = stats["kv_slots"]
    print(
        f"\nradix cache: hit rate {stats['cache_hit_rate']:.0%} "
        f"({stats['cached_tokens']} of {stats['prompt_tokens']} prompt tokens reused), "
        f"KV slots: {kv['evictable']} cached, {kv['free']} free of {kv['total']}"
    )
    engine.check_kv_invariant()
    engine.shutdown()


if __name__ == "__main__":
    main()
