"""Skeleton-of-thought: write an outline, then expand every point in parallel.

python examples/skeleton_of_thought.py

1. The model writes a short outline (three points, one ``gen`` each, stopped at the end of
   the line).
2. ``s.fork(3)`` makes three copies of the state; each copy asks for one point to be
   expanded. The copies share the whole conversation so far through the radix cache, and
   their generations are decoded together in one batch.
3. ``forks.join()`` gathers each fork's ``expansion`` into a list on the parent state, and
   the program assembles the final answer.

Two questions run with ``run_batch``, so six expansions are decoded side by side.
"""

from __future__ import annotations

import time

import sgl_dsl as sgl

NUM_POINTS = 3
# A point is a capitalized phrase on one line. A tiny model left alone tends to restart the
# numbering ("1. 1.") or run on; the regex keeps the skeleton terse. The newline is part of
# the pattern, so the model can end the point the way it wants to (a regex lets generation
# stop only where the pattern may end), and the stop string trims it from the value.
POINT = r"[A-Z][a-z ]{3,60}\n"
# An expansion is prose: one line that starts with a capital letter (not a new "1." list).
EXPANSION = r"[A-Z][^\n]+"
OUTLINE_REQUEST = f" Give an outline of {NUM_POINTS} different points, one per line."

QUESTIONS = [
    "What are the benefits of regular exercise?",
    "How can I make my home more energy efficient?",
]


@sgl.function
def skeleton_of_thought(s, question):
    s += sgl.system("You are a helpful assistant who gives short, practical advice.")
    # One worked example of the outline format (a "one-shot" turn) helps the tiny model
    # write distinct, short points.
    s += sgl.user("How can I save money?" + OUTLINE_REQUEST)
    s += sgl.assistant("1. Make a monthly budget\n2. Cook at home\n3. Cancel unused subscriptions")
    s += sgl.user(question + OUTLINE_REQUEST)
    # The skeleton: the program writes the numbers, the model writes each point.
    with s.assistant():
        for i in range(NUM_POINTS):
            point = sgl.gen(f"point_{i}", max_tokens=16, regex=POINT, stop="\n")
            s += f"{i + 1}. " + point + "\n"

    # Expand every point in parallel. The lambda gets the fork's index; reading
    # s[f"point_{i}"] waits for that point to exist.
    forks = s.fork(NUM_POINTS)
    forks += lambda i: sgl.user(
        f"Expand point {i + 1} ({s[f'point_{i}']}) in one or two sentences."
    )
    forks += sgl.assistant(sgl.gen("expansion", max_tokens=60, regex=EXPANSION))
    forks.join()  # s["expansion"] is now a list, one per point

    # Assemble the answer on the host and keep it in the state as a variable.
    s["answer"] = "\n".join(
        f"{i + 1}. {s[f'point_{i}']}: {text.strip()}" for i, text in enumerate(s["expansion"])
    )


def main() -> None:
    engine = sgl.Engine()
    sgl.set_default_backend(engine)

    start = time.perf_counter()
    states = skeleton_of_thought.run_batch([{"question": q} for q in QUESTIONS], temperature=0)
    elapsed = time.perf_counter() - start

    for question, state in zip(QUESTIONS, states):
        print("Question:", question)
        print("Outline :", [state[f"point_{i}"] for i in range(NUM_POINTS)])
        print("Answer  :")
        print(state["answer"])
        print()

    stats = engine.get_stats()
    print(
        f"{len(QUESTIONS)} programs, {len(QUESTIONS) * NUM_POINTS} parallel expansions "
        f"in {elapsed:.1f} s; prefix cache hit rate {stats['cache_hit_rate']:.0%}"
    )
    engine.shutdown()


if __name__ == "__main__":
    main()
