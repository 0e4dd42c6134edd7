"""A ReAct agent replaying recorded multi-step traces (the SGLang paper's agent workload).

Each program answers one question about the bundled encyclopedia
(``examples/data/encyclopedia.txt``): at every step the model writes a thought and an
action, then the recorded observation of that step is appended whatever the model wrote,
so every system does the same work.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from benchmarks.programs.session import Session
from benchmarks.programs.workloads import Item, Outputs, Workload, cap

DATA = Path(__file__).resolve().parents[3] / "examples" / "data" / "encyclopedia.txt"
INSTRUCTION = (
    "Answer the question by interleaving Thought, Action and Observation steps. Actions are "
    "search[topic], calculate[expression] and finish[answer].\n\n"
    "Question: How long does the Tarn Ferry crossing take?\n"
    "Thought 1: I need facts about the Tarn Ferry.\nAction 1: search[Tarn Ferry]\n"
    "Observation 1: The Tarn Ferry carries passengers across Lake Tarn. A ticket costs 12 "
    "crowns per person and the crossing takes 35 minutes.\n"
    "Thought 2: The crossing takes 35 minutes.\nAction 2: finish[35 minutes]\n\n"
)
# (question, the topic searched at each step; "=value" is a recorded calculate result)
TRACES = [
    ("How many steps lead to the top of the hill where the observatory stands?",
     ["Varda Observatory", "Crane Hill"]),
    ("How long is the river that flows through Varda?", ["Varda", "River Vey"]),
    ("How much do two large glass lanterns cost in pennies?",
     ["Glass lanterns", "Crown", "=9000"]),
    ("How many hours does the night train to the northernmost town take?",
     ["Holm", "Northern Express"]),
    ("How high are the waterfalls on the river of Varda?", ["River Vey", "Silver Falls"]),
    ("When was the bridge of Varda completed, and how long is it?", ["Varda", "Lumen Bridge"]),
    ("How deep is the lake crossed by the ferry?", ["Tarn Ferry", "Lake Tarn"]),
    ("How many inhabitants does the town at the end of the night train have?",
     ["Northern Express", "Holm", "=4200"]),
]  # fmt: skip
MAX_THOUGHT = 32
MAX_ACTION = 16


@functools.cache
def _entries() -> dict[str, str]:
    lines = [line for line in DATA.read_text().splitlines() if line.strip()]
    return dict(line.split(": ", 1) for line in lines)


def observation(topic: str) -> str:
    """The recorded observation of one step: an encyclopedia entry, or "=value" recorded from
    a calculate action."""
    return topic[1:] if topic.startswith("=") else _entries()[topic]


def items(size: str) -> list[Item]:
    traces = TRACES if size == "full" else TRACES[:1]
    return [
        {"question": q, "observations": [observation(t) for t in topics], "cap": cap(size)}
        for q, topics in traces
    ]


@functools.cache
def program() -> Any:
    import sgl_dsl as sgl

    @sgl.function
    def react(s, question, observations, cap):
        s += INSTRUCTION + "Question: " + question + "\n"
        for i, obs in enumerate(observations, 1):
            s += f"Thought {i}:" + sgl.gen(
                f"thought_{i}", max_tokens=min(MAX_THOUGHT, cap), stop="\n"
            )
            s += f"\nAction {i}:" + sgl.gen(
                f"action_{i}", max_tokens=min(MAX_ACTION, cap), stop="\n"
            )
            s += f"\nObservation {i}: {obs}\n"
        return [s[f"action_{i}"] for i in range(1, len(observations) + 1)]

    return react


def outputs(state: Any) -> Outputs:
    return {"actions": state.ret_value}


def script(session: Session, item: Item) -> Outputs:
    session.append(INSTRUCTION + "Question: " + item["question"] + "\n")
    actions = []
    for i, obs in enumerate(item["observations"], 1):
        session.append(f"Thought {i}:")
        session.gen(max_tokens=min(MAX_THOUGHT, item["cap"]), stop=["\n"])
        session.append(f"\nAction {i}:")
        actions.append(session.gen(max_tokens=min(MAX_ACTION, item["cap"]), stop=["\n"]))
        session.append(f"\nObservation {i}: {obs}\n")
    return {"actions": actions}


def check(item: Item, out: Outputs) -> str | None:
    if len(out["actions"]) != len(item["observations"]):
        return f"{len(out['actions'])} actions for {len(item['observations'])} steps"
    return None


WORKLOAD = Workload(
    name="react",
    shape="agent replaying 2-3 step traces (thought + action gens per step)",
    items=items,
    program=program,
    outputs=outputs,
    script=script,
    check=check,
)
