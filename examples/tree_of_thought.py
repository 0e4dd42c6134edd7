"""Tree-of-thought: propose several next steps, let the model judge them, keep the best.

python examples/tree_of_thought.py

The program builds a plan step by step. At each level of the tree it

1. forks the state ``WIDTH`` ways and samples one candidate next step in each fork
   (temperature 0.7, so the candidates differ; they share the plan so far through the
   radix cache and are decoded in one batch);
2. asks, inside each fork, whether that step is a good next step, with a ``select`` over
   "yes" / "no": the score of a candidate is log p(yes) - log p(no), read from
   ``get_meta_info`` (a continuous score, so ties are rare);
3. picks the best candidate in host Python and appends it to the main state. The forks,
   with their judging turns, are discarded.

This repeats to ``DEPTH`` steps. Sampling makes each run different; the printed tree shows
every candidate with its score and marks the one kept.
"""

from __future__ import annotations

import time

import sgl_dsl as sgl

WIDTH = 3  # candidates per level
DEPTH = 3  # levels (steps of the plan)
STEP = r"[A-Z][^\n]{10,120}\n"  # a step is one line of prose; the newline ends it

TASKS = [
    "Plan a picnic in the park for four friends.",
    "Plan how to prepare for a job interview.",
]


@sgl.function
def tree_of_thought(s, task):
    s += sgl.system("You are a careful planner. You write plans as short numbered steps.")
    s += sgl.user(task + f" Write a plan of {DEPTH} steps, one per line.")
    s += sgl.assistant_begin()
    tree = []  # for printing: one list of (candidate, score) per level
    for level in range(DEPTH):
        s += f"Step {level + 1}: "
        forks = s.fork(WIDTH)
        # 1. propose: each fork samples its own candidate for this step
        forks += sgl.gen("step", regex=STEP, stop="\n", max_tokens=40, temperature=0.7, top_p=0.9)
        # 2. judge: leave the assistant turn (in the fork only) and ask about the step
        forks += sgl.assistant_end()
        forks += sgl.user(f"Is step {level + 1} a sensible next step of this plan? Yes or no.")
        forks += sgl.assistant(sgl.select("verdict", choices=["yes", "no"]))
        candidates = []
        for fork in forks:
            yes, no = fork.get_meta_info("verdict")["normalized_prompt_logprobs"]
            candidates.append((fork["step"].strip(), yes - no))
        forks.join()
        # 3. keep the best candidate: host Python decides what the main state continues with
        best = max(candidates, key=lambda c: c[1])
        tree.append((candidates, best[0]))
        s += best[0] + "\n"
    s += sgl.assistant_end()
    return tree


def main() -> None:
    engine = sgl.Engine()
    sgl.set_default_backend(engine)

    start = time.perf_counter()
    states = tree_of_thought.run_batch([{"task": t} for t in TASKS])
    elapsed = time.perf_counter() - start

    for task, state in zip(TASKS, states):
        print("Task:", task)
        for level, (candidates, kept) in enumerate(state.ret_value):
            print(f"  level {level + 1}:")
            for text, score in candidates:
                mark = "*" if text == kept else " "
                print(f"    {mark} [{score:+6.2f}] {text}")
        print("Final plan:")
        print(state.messages()[-1]["content"].strip())
        print()

    n = len(TASKS) * WIDTH * DEPTH
    print(f"{n} candidates generated and judged in {elapsed:.1f} s (* = kept)")
    engine.shutdown()


if __name__ == "__main__":
    main()
