"""Where each piece of a program state's text came from, for displays.

Contract: ``StreamExecutor.spans`` lists, in order of creation, the ranges ``[start, end)`` of
``text_`` that a ``gen`` or ``select`` produced and the content range of every finished role
turn; ranges index the text at the time they were recorded (``separate_reasoning`` may
shorten the text afterwards; renderers clip).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Span:
    kind: str  # "gen", "select" or "role"
    start: int
    end: int
    name: str | None = None  # the variable, or the role
    detail: dict[str, Any] = field(default_factory=dict)  # select: choices and scores
