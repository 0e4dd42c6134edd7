"""The registry of workloads: each module defines one ``Workload``.

A workload is deterministic data (``items``), its sgl_dsl program (built lazily, so this
package imports without sgl_dsl), the same program as a ``script`` over a peer ``Session``,
and a ``check`` of one item's outputs. Modules import only the standard library at top level.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from benchmarks.programs.session import Session

Item = dict[str, Any]
Outputs = dict[str, Any]
TINY_CAP = 4  # the "tiny" size caps every generation at this many tokens (smoke tests)


def cap(size: str) -> int:
    """The per-generation token cap of ``size`` (items carry it as ``item["cap"]``)."""
    return TINY_CAP if size == "tiny" else 1 << 20


@dataclass(frozen=True)
class Workload:
    """One benchmark workload.

    ``items(size)`` gives the programs' arguments (``size`` is "full" or "tiny"; every
    ``gen`` limit is capped by the item's ``cap``);
    ``program()`` returns the sgl_dsl function; ``outputs(state)`` reads a finished state;
    ``script(session, item)`` runs the same program on a peer and returns the same keys;
    ``check(item, outputs)`` is None when the outputs are well-formed, else the problem.
    ``needs`` lists the Session features beyond plain ``gen`` (``select``, ``regex``,
    ``json``); a peer lacking one skips the workload.
    """

    name: str
    shape: str
    items: Callable[[str], list[Item]]
    program: Callable[[], Any]
    outputs: Callable[[Any], Outputs]
    script: Callable[[Session, Item], Outputs]
    check: Callable[[Item, Outputs], str | None]
    needs: frozenset[str] = field(default_factory=frozenset)
    constrained: bool = False  # jump-forward on/off is measured


def all_workloads() -> list[Workload]:
    """Every workload, in table order."""
    from benchmarks.programs.workloads import (
        chat,
        hellaswag,
        json_extract,
        mmlu,
        react,
        self_consistency,
        sot,
        tot,
    )

    return [
        mmlu.WORKLOAD,
        hellaswag.WORKLOAD,
        react.WORKLOAD,
        tot.WORKLOAD,
        sot.WORKLOAD,
        chat.SHORT,
        chat.LONG,
        json_extract.WORKLOAD,
        self_consistency.WORKLOAD,
    ]
