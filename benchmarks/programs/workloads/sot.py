"""Skeleton-of-thought: an outline of three points, then one fork per point expands it."""

from __future__ import annotations

import functools
from typing import Any

from benchmarks.programs.chatml import END, begin, turn
from benchmarks.programs.session import Session
from benchmarks.programs.workloads import Item, Outputs, Workload, cap

POINTS = 3
MAX_POINT = 12
MAX_EXPANSION = 48
SYSTEM = "You are a helpful assistant who gives short, practical advice."
OUTLINE = f" Give an outline of {POINTS} short points, one per line."
QUESTIONS = [
    "What are the benefits of regular exercise?",
    "How can I make my home more energy efficient?",
    "How do I keep houseplants healthy?",
    "How can I sleep better?",
]


def items(size: str) -> list[Item]:
    return [
        {"question": q, "cap": cap(size)} for q in (QUESTIONS if size == "full" else QUESTIONS[:1])
    ]


def _expand(i: int, point: str) -> str:
    return f"Expand point {i + 1} ({point.strip()}) in one or two sentences."


@functools.cache
def program() -> Any:
    import sgl_dsl as sgl

    @sgl.function
    def skeleton_of_thought(s, question, cap):
        s += sgl.system(SYSTEM) + sgl.user(question + OUTLINE)
        with s.assistant():
            for i in range(POINTS):
                s += (
                    f"{i + 1}."
                    + sgl.gen(f"point_{i}", max_tokens=min(MAX_POINT, cap), stop="\n")
                    + "\n"
                )
        forks = s.fork(POINTS)
        forks += lambda i: sgl.user(_expand(i, s[f"point_{i}"]))
        forks += sgl.assistant(sgl.gen("expansion", max_tokens=min(MAX_EXPANSION, cap)))
        forks.join()

    return skeleton_of_thought


def outputs(state: Any) -> Outputs:
    points = [state[f"point_{i}"] for i in range(POINTS)]
    return {"points": points, "expansions": state["expansion"]}


def script(session: Session, item: Item) -> Outputs:
    session.append(turn("system", SYSTEM) + turn("user", item["question"] + OUTLINE))
    session.append(begin("assistant"))
    points = []
    for i in range(POINTS):
        session.append(f"{i + 1}.")
        points.append(session.gen(max_tokens=min(MAX_POINT, item["cap"]), stop=["\n", END]))
        session.append("\n")
    session.append(END + "\n")
    expansions = []
    for i, fork in enumerate(session.fork(POINTS)):
        fork.append(turn("user", _expand(i, points[i])) + begin("assistant"))
        expansions.append(fork.gen(max_tokens=min(MAX_EXPANSION, item["cap"]), stop=[END]))
        fork.append(END + "\n")
    return {"points": points, "expansions": expansions}


def check(item: Item, out: Outputs) -> str | None:
    if len(out["expansions"]) != POINTS or not all(e.strip() for e in out["expansions"]):
        return f"expansions missing: {out['expansions']!r}"
    return None


WORKLOAD = Workload(
    name="sot",
    shape="outline of 3 points, fork per point to expand",
    items=items,
    program=program,
    outputs=outputs,
    script=script,
    check=check,
)
