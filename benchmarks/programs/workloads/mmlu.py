"""MMLU-style few-shot multiple choice: a 5-shot prefix per subject, one new token.

Questions are generated deterministically (seeded) from four synthetic subjects; every
program is ``prefix(subject) + question + "Answer:"`` followed by a one-token ``gen``.
"""

from __future__ import annotations

import functools
import random
from typing import Any

from benchmarks.programs.session import Session
from benchmarks.programs.workloads import Item, Outputs, Workload

LETTERS = "ABCD"
SUBJECTS = ("arithmetic", "time conversion", "comparison", "geometry")
SHOTS = 5


def _question(subject: str, rng: random.Random) -> tuple[str, list[str], int]:
    """(question, four options, index of the right one) for ``subject``."""
    if subject == "arithmetic":
        a, b = rng.randint(12, 99), rng.randint(12, 99)
        text, right = f"What is {a} + {b}?", a + b
    elif subject == "time conversion":
        h = rng.randint(2, 12)
        text, right = f"How many minutes are there in {h} hours?", 60 * h
    elif subject == "comparison":
        nums = rng.sample(range(100, 999), 4)
        return "Which number is the largest?", [str(n) for n in nums], nums.index(max(nums))
    else:
        side = rng.randint(3, 15)
        text, right = f"What is the perimeter of a square with sides of {side} cm?", 4 * side
    options = {right}
    while len(options) < 4:
        options.add(right + rng.choice([-10, -2, -1, 1, 2, 10, 20]))
    shuffled = sorted(options, key=lambda _: rng.random())
    return text, [str(o) for o in shuffled], shuffled.index(right)


def _format(text: str, options: list[str]) -> str:
    lines = [text] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
    return "\n".join(lines) + "\nAnswer:"


@functools.cache
def prefix(subject: str) -> str:
    """The subject's instruction and five worked examples."""
    rng = random.Random(f"shots-{subject}")
    shots = []
    for _ in range(SHOTS):
        text, options, right = _question(subject, rng)
        shots.append(f"{_format(text, options)} {LETTERS[right]}\n\n")
    head = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    return head + "".join(shots)


def items(size: str) -> list[Item]:
    subjects, per_subject = (SUBJECTS, 8) if size == "full" else (SUBJECTS[:1], 2)
    out = []
    for subject in subjects:
        rng = random.Random(f"questions-{subject}")
        for _ in range(per_subject):
            text, options, right = _question(subject, rng)
            out.append({"subject": subject, "question": _format(text, options), "right": right})
    return out


@functools.cache
def program() -> Any:
    import sgl_dsl as sgl

    @sgl.function
    def mmlu(s, subject, question, right):
        s += prefix(subject) + question
        s += sgl.gen("answer", max_tokens=1)

    return mmlu


def outputs(state: Any) -> Outputs:
    return {"answer": state["answer"]}


def script(session: Session, item: Item) -> Outputs:
    session.append(prefix(item["subject"]) + item["question"])
    return {"answer": session.gen(max_tokens=1)}


def check(item: Item, out: Outputs) -> str | None:
    letter = out["answer"].strip()
    return None if letter in LETTERS else f"not a letter: {out['answer']!r}"


WORKLOAD = Workload(
    name="mmlu",
    shape="5-shot prefix per subject, 1 new token",
    items=items,
    program=program,
    outputs=outputs,
    script=script,
    check=check,
)
