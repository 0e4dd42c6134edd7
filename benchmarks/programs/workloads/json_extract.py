"""JSON extraction from a document with a JSON-schema constraint (jump-forward applies).

The six documents and schemas of ``benchmarks/bench_jump_forward.py`` (person, invoice,
event, product, support ticket, flight booking), asked as a chat turn; outputs must parse
and validate against their schema, formats included.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from benchmarks.bench_jump_forward import CASES, prompt_text, validate
from benchmarks.programs.chatml import END, begin, turn
from benchmarks.programs.session import Session
from benchmarks.programs.workloads import Item, Outputs, Workload

SYSTEM = "You extract facts from text and answer only with JSON."
MAX_TOKENS = 256


def items(size: str) -> list[Item]:
    cases = CASES if size == "full" else CASES[:1]
    return [{"case": c["name"], "prompt": prompt_text(c), "schema": c["schema"]} for c in cases]


@functools.cache
def program() -> Any:
    import sgl_dsl as sgl

    @sgl.function
    def extract(s, case, prompt, schema):
        s += sgl.system(SYSTEM) + sgl.user(prompt)
        s += sgl.assistant(sgl.gen("record", max_tokens=MAX_TOKENS, json_schema=json.dumps(schema)))

    return extract


def outputs(state: Any) -> Outputs:
    return {"record": state["record"]}


def script(session: Session, item: Item) -> Outputs:
    session.append(turn("system", SYSTEM) + turn("user", item["prompt"]) + begin("assistant"))
    record = session.gen(max_tokens=MAX_TOKENS, stop=[END], json_schema=item["schema"])
    session.append(END + "\n")
    return {"record": record}


def check(item: Item, out: Outputs) -> str | None:
    return validate(out["record"], item["schema"])


WORKLOAD = Workload(
    name="json",
    shape="JSON extraction from a document (6 schemas)",
    items=items,
    program=program,
    outputs=outputs,
    script=script,
    check=check,
    needs=frozenset({"json"}),
    constrained=True,
)
