"""Self-consistency: fork five attempts at a word problem, then vote on their answers.

Each attempt is prompted with a different approach (greedy decoding, so the prompts make
the attempts differ), reasons on one line and gives a number (regex-constrained).
"""

from __future__ import annotations

import functools
import random
from collections import Counter
from typing import Any

from benchmarks.programs.session import Session
from benchmarks.programs.workloads import Item, Outputs, Workload, cap

APPROACHES = ["add step by step", "multiply first", "check each number", "estimate first",
              "write the equation"]  # fmt: skip
NUMBER = r"[0-9]{1,5}"
MAX_REASONING = 32
MAX_ANSWER = 6
INSTRUCTION = (
    "Solve the problem. Reason in one line, then give the answer as a number.\n\n"
    "Problem: A box holds 6 pens. How many pens are in 4 boxes?\n"
    "Reasoning: 4 boxes of 6 pens is 4 * 6 = 24 pens.\nAnswer: 24\n\n"
)


def _problem(rng: random.Random) -> tuple[str, int]:
    a, b, c = rng.randint(2, 9), rng.randint(3, 12), rng.randint(1, 9)
    text = (
        f"A shop has {a} shelves with {b} books each, and {c} more books on the counter. "
        "How many books does the shop have?"
    )
    return text, a * b + c


def items(size: str) -> list[Item]:
    rng = random.Random("self-consistency")
    problems = [_problem(rng) for _ in range(4 if size == "full" else 1)]
    return [{"problem": text, "right": right, "cap": cap(size)} for text, right in problems]


def _vote(answers: list[str]) -> str:
    return Counter(answers).most_common(1)[0][0]


@functools.cache
def program() -> Any:
    import sgl_dsl as sgl

    @sgl.function
    def self_consistency(s, problem, right, cap):
        s += INSTRUCTION + "Problem: " + problem + "\n"
        forks = s.fork(len(APPROACHES))
        forks += lambda i: f"Reasoning ({APPROACHES[i]}):"
        forks += sgl.gen("reasoning", max_tokens=min(MAX_REASONING, cap), stop="\n")
        forks += "\nAnswer: " + sgl.gen("answer", max_tokens=MAX_ANSWER, regex=NUMBER)
        answers = [f["answer"] for f in forks]
        forks.join()
        return answers

    return self_consistency


def outputs(state: Any) -> Outputs:
    return {"answers": state.ret_value, "vote": _vote(state.ret_value)}


def script(session: Session, item: Item) -> Outputs:
    session.append(INSTRUCTION + "Problem: " + item["problem"] + "\n")
    answers = []
    for i, fork in enumerate(session.fork(len(APPROACHES))):
        fork.append(f"Reasoning ({APPROACHES[i]}):")
        fork.gen(max_tokens=min(MAX_REASONING, item["cap"]), stop=["\n"])
        fork.append("\nAnswer: ")
        answers.append(fork.gen(max_tokens=MAX_ANSWER, regex=NUMBER))
    return {"answers": answers, "vote": _vote(answers)}


def check(item: Item, out: Outputs) -> str | None:
    bad = [a for a in out["answers"] if not a.isdigit()]
    return f"non-numeric answers {bad}" if bad else None


WORKLOAD = Workload(
    name="self-consistency",
    shape="fork 5 attempts (gen + regex number), then vote",
    items=items,
    program=program,
    outputs=outputs,
    script=script,
    check=check,
    needs=frozenset({"regex"}),
    constrained=True,
)
