"""The protocol a peer implements to run a workload's script: text in, greedy text out.

A ``Session`` holds the text of one program's prompt so far. ``gen`` and ``select`` append
their result to the session and return it; ``fork`` returns independent copies (peers run
them one after another). Every peer decodes greedily with the same prompts and limits.
"""

from __future__ import annotations

from typing import Any, Protocol


class Session(Protocol):
    """One program's state on a peer."""

    def append(self, text: str) -> None:
        """Append literal prompt text."""

    def gen(
        self,
        max_tokens: int,
        stop: list[str] | None = None,
        regex: str | None = None,
        json_schema: dict[str, Any] | None = None,
    ) -> str:
        """Greedy-generate up to ``max_tokens`` (stop strings trimmed), append, return it."""

    def select(self, choices: list[str]) -> str:
        """Choose one of ``choices`` (the peer's own method), append, return it."""

    def fork(self, n: int) -> list[Session]:
        """``n`` copies of this session; the parent is unchanged by their appends."""
