"""Tree-of-thought, fork 3 x depth 3: propose three next steps, judge each, keep one.

At every level the state forks three ways; fork ``j`` proposes a step as "idea j" (greedy,
so the prompts differ rather than the sampling), then judges it with a yes/no ``select`` in
a new user turn. The first candidate judged "yes" (else the first) joins the plan.
"""

from __future__ import annotations

import functools
from typing import Any

from benchmarks.programs.chatml import END, begin, turn
from benchmarks.programs.session import Session
from benchmarks.programs.workloads import Item, Outputs, Workload, cap

WIDTH = 3
DEPTH = 3
MAX_STEP = 24
SYSTEM = "You are a careful planner. You write plans as short numbered steps."
JUDGE = "Is that a sensible next step of this plan? Answer yes or no."
TASKS = [
    "Plan a picnic in the park for four friends.",
    "Plan how to prepare for a job interview.",
    "Plan a weekend trip to the mountains.",
    "Plan how to learn to play the guitar.",
]


def items(size: str) -> list[Item]:
    return [{"task": t, "cap": cap(size)} for t in (TASKS if size == "full" else TASKS[:1])]


def _request(task: str) -> str:
    return f"{task} Write a plan of {DEPTH} steps, one per line."


def _keep(candidates: list[tuple[str, str]]) -> int:
    """Index of the first candidate judged "yes", else 0."""
    return next((j for j, (_, verdict) in enumerate(candidates) if verdict == "yes"), 0)


@functools.cache
def program() -> Any:
    import sgl_dsl as sgl

    @sgl.function
    def tree_of_thought(s, task, cap):
        s += sgl.system(SYSTEM) + sgl.user(_request(task)) + sgl.assistant_begin()
        plan = []
        for level in range(1, DEPTH + 1):
            s += f"Step {level}"
            forks = s.fork(WIDTH)
            forks += lambda j: f" (idea {j + 1}):"
            forks += sgl.gen("step", max_tokens=min(MAX_STEP, cap), stop="\n")
            forks += sgl.assistant_end() + sgl.user(JUDGE)
            forks += sgl.assistant(sgl.select("verdict", choices=["yes", "no"]))
            candidates = [(f["step"], f["verdict"]) for f in forks]
            forks.join()
            keep = _keep(candidates)
            plan.append(candidates[keep][0])
            s += f" (idea {keep + 1}):{candidates[keep][0]}\n"
        s += sgl.assistant_end()
        return plan

    return tree_of_thought


def outputs(state: Any) -> Outputs:
    return {"plan": state.ret_value}


def script(session: Session, item: Item) -> Outputs:
    session.append(turn("system", SYSTEM) + turn("user", _request(item["task"])))
    session.append(begin("assistant"))
    plan = []
    for level in range(1, DEPTH + 1):
        session.append(f"Step {level}")
        candidates = []
        for j, fork in enumerate(session.fork(WIDTH)):
            fork.append(f" (idea {j + 1}):")
            step = fork.gen(max_tokens=min(MAX_STEP, item["cap"]), stop=["\n", END])
            fork.append(END + "\n" + turn("user", JUDGE) + begin("assistant"))
            candidates.append((step, fork.select(["yes", "no"])))
        keep = _keep(candidates)
        plan.append(candidates[keep][0])
        session.append(f" (idea {keep + 1}):{candidates[keep][0]}\n")
    session.append(END + "\n")
    return {"plan": plan}


def check(item: Item, out: Outputs) -> str | None:
    empty = [i for i, step in enumerate(out["plan"]) if not step.strip()]
    return f"empty steps {empty}" if empty else None


WORKLOAD = Workload(
    name="tot",
    shape="fork 3 x depth 3, gen + yes/no select per branch",
    items=items,
    program=program,
    outputs=outputs,
    script=script,
    check=check,
    needs=frozenset({"select"}),
)
