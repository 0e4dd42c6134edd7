"""Few-shot question answering over a shared prefix, and what the radix cache saves.

python examples/few_shot_qa.py

Twelve questions are answered by one program run with ``run_batch``. Every prompt starts
with the same few-shot block, so the engine's radix cache computes that prefix once and
every other program reuses it (``cached_tokens`` in each answer's meta info). The same batch
is then timed three ways: from a flushed cache (the prefix is computed once), again with the
cache warm (every prompt is cached but for the tail), and on a second engine with the
radix cache disabled (every program recomputes the whole prefix).
"""

from __future__ import annotations

import time

import sgl_dsl as sgl

# The shared prefix: an instruction and a handful of worked examples. Plain text (no chat
# roles) works well for few-shot prompting: the model continues the "Q: / A:" pattern.
FEW_SHOT = """Answer each question with a short factual answer of a few words.

Q: What is the capital of France?
A: Paris

Q: How many legs does a spider have?
A: Eight

Q: What gas do plants absorb from the air?
A: Carbon dioxide

Q: Who wrote the play Romeo and Juliet?
A: William Shakespeare

Q: What is the largest ocean on Earth?
A: The Pacific Ocean

Q: What is the boiling point of water at sea level in Celsius?
A: 100 degrees

Q: Which planet is known as the Red Planet?
A: Mars

Q: What is the chemical symbol for gold?
A: Au

"""

QUESTIONS = [
    "What is the capital of Italy?",
    "How many days are there in a week?",
    "What is the largest planet in the solar system?",
    "Which animal is known as the king of the jungle?",
    "What colour is the sky on a clear day?",
    "How many continents are there?",
    "What is the freezing point of water in Celsius?",
    "What is the capital of Japan?",
    "Which organ pumps blood through the body?",
    "What is the tallest mountain in the world?",
    "How many sides does a triangle have?",
    "What language is mainly spoken in Brazil?",
]


@sgl.function
def few_shot_qa(s, question):
    s += FEW_SHOT + "Q: " + question + "\nA:"
    # stop at the end of the line: the model would otherwise go on with the next "Q:"
    s += sgl.gen("answer", max_tokens=16, stop="\n")


def run(engine: sgl.Engine) -> tuple[list[sgl.ProgramState], float]:
    """Run the whole batch on ``engine``; returns the states and the wall time."""
    start = time.perf_counter()
    states = few_shot_qa.run_batch(
        [{"question": q} for q in QUESTIONS], backend=engine, temperature=0
    )
    return states, time.perf_counter() - start


def main() -> None:
    engine = sgl.Engine()  # the embedded SmolLM2-135M-Instruct, radix cache on

    engine.flush_cache()
    states, cold = run(engine)
    print(f"{'question':<50} {'answer':<24} cached/prompt tokens")
    for question, state in zip(QUESTIONS, states):
        meta = state.get_meta_info("answer")
        tokens = f"{meta['cached_tokens']}/{meta['prompt_tokens']}"
        print(f"{question:<50} {state['answer'].strip():<24} {tokens}")
    stats = engine.get_stats()
    print(
        f"\nprefix cache: hit rate {stats['cache_hit_rate']:.0%} "
        f"({stats['cached_tokens']} of {stats['prompt_tokens']} prompt tokens reused)"
    )

    _, warm = run(engine)  # the same batch again: now every prompt is in the cache
    answers = [s["answer"] for s in states]
    engine.shutdown()

    # A second engine without the radix cache: each program prefills its whole prompt.
    no_cache_engine = sgl.Engine(disable_radix_cache=True)
    no_cache_states, no_cache = run(no_cache_engine)
    same = answers == [s["answer"] for s in no_cache_states]
    no_cache_engine.shutdown()

    print("\ntiming of the batch of", len(QUESTIONS), "programs:")
    print(f"  radix cache, flushed before : {cold:6.2f} s")
    print(f"  radix cache, warm           : {warm:6.2f} s")
    print(f"  radix cache disabled        : {no_cache:6.2f} s ({no_cache / cold:.1f}x slower)")
    print("  same answers without the cache:", same)


if __name__ == "__main__":
    main()
