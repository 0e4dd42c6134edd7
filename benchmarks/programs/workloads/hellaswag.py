"""HellaSwag-style select: a shared few-shot prefix, a context, four candidate endings.

Contexts are built from a bundled list of activities: the right ending is the activity's
own, the three wrong ones are other activities' endings (chosen deterministically).
"""

from __future__ import annotations

import functools
import random
from typing import Any

from benchmarks.programs.session import Session
from benchmarks.programs.workloads import Item, Outputs, Workload

# (context, the ending that follows it)
ACTIVITIES = [
    (
        "A woman fills a pot with water and puts it on the stove. She",
        " waits for the water to boil and adds the pasta.",
    ),
    (
        "A man kneels next to a flat bicycle tyre. He",
        " removes the wheel and patches the inner tube.",
    ),
    ("A girl opens her sketchbook at the park. She", " starts drawing the ducks on the pond."),
    ("A chef slices onions on a wooden board. He", " sweeps them into a hot pan with butter."),
    (
        "Two friends carry a tent to a clearing. They",
        " unfold it and hammer the pegs into the ground.",
    ),
    ("A boy ties the laces of his running shoes. He", " jogs off down the path along the river."),
    (
        "A gardener kneels by an empty flower bed. She",
        " digs small holes and plants the tulip bulbs.",
    ),
    ("A mechanic lifts the hood of a car. He", " checks the oil level with the dipstick."),
    ("A teacher hands out exam papers. The students", " turn them over and begin to write."),
    ("A man spreads paint on a roller. He", " rolls it evenly across the bedroom wall."),
    (
        "A woman pours batter into a hot waffle iron. She",
        " closes the lid and waits for it to turn golden.",
    ),
    (
        "A swimmer steps onto the starting block. She",
        " dives into the pool when the whistle sounds.",
    ),
    (
        "A man puts a fresh sheet of paper in the typewriter. He",
        " begins typing the first line of his letter.",
    ),
    (
        "A child holds a string attached to a kite. She",
        " runs across the field until it lifts into the air.",
    ),
    ("A baker takes a tray of bread out of the oven. He", " sets the loaves on a rack to cool."),
    (
        "A woman unrolls a yoga mat in the living room. She",
        " stretches her arms and begins the first pose.",
    ),
    (
        "A fisherman baits his hook at the end of the pier. He",
        " casts the line far out into the water.",
    ),
]
SHOTS = 3
INSTRUCTION = "Pick the most sensible continuation of each scene.\n\n"


def _endings(index: int) -> tuple[list[str], int]:
    """Four endings for activity ``index`` (its own among them) and the right one's index."""
    rng = random.Random(f"hellaswag-{index}")
    others = [ending for i, (_, ending) in enumerate(ACTIVITIES) if i != index]
    endings = [*rng.sample(others, 3), ACTIVITIES[index][1]]
    rng.shuffle(endings)
    return endings, endings.index(ACTIVITIES[index][1])


@functools.cache
def prefix() -> str:
    """The instruction and ``SHOTS`` solved scenes (the first activities)."""
    shots = [f"Scene: {ctx}{ending}\n\n" for ctx, ending in ACTIVITIES[:SHOTS]]
    return INSTRUCTION + "".join(shots)


def items(size: str) -> list[Item]:
    count = len(ACTIVITIES) - SHOTS if size == "full" else 2
    out = []
    for index in range(SHOTS, SHOTS + count):
        endings, right = _endings(index)
        out.append({"context": ACTIVITIES[index][0], "endings": endings, "right": right})
    return out


@functools.cache
def program() -> Any:
    import sgl_dsl as sgl

    @sgl.function
    def hellaswag(s, context, endings, right):
        s += prefix() + "Scene: " + context
        s += sgl.select("ending", choices=endings)

    return hellaswag


def outputs(state: Any) -> Outputs:
    return {"ending": state["ending"]}


def script(session: Session, item: Item) -> Outputs:
    session.append(prefix() + "Scene: " + item["context"])
    return {"ending": session.select(item["endings"])}


def check(item: Item, out: Outputs) -> str | None:
    return None if out["ending"] in item["endings"] else f"not a choice: {out['ending']!r}"


WORKLOAD = Workload(
    name="hellaswag",
    shape="shared few-shot prefix, select among 4 endings",
    items=items,
    program=program,
    outputs=outputs,
    script=script,
    check=check,
    needs=frozenset({"select"}),
)
