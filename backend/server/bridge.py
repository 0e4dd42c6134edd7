"""Awaiting engine requests from asyncio without blocking the event loop.

Contract:
- :class:`RequestGroup` wraps the handles of one HTTP request. Each handle's listener (run on
  the engine thread) only schedules ``Event.set`` on the loop with ``call_soon_threadsafe``;
  the handle's state is applied with ``poll()`` on the loop.
- ``async with RequestGroup(...)``: on any exit (error, client disconnect = task cancelled,
  normal end) every unfinished request is aborted with ``engine.abort(rid)`` so its KV slots
  are freed. While inside, the group is in ``registry`` (the server's set of groups in
  flight, which it aborts when it shuts down).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from backend.engine import Engine, RequestHandle


class RequestGroup:
    """The engine requests behind one HTTP request, observed from the event loop."""

    def __init__(
        self,
        engine: Engine,
        handles: list[RequestHandle],
        registry: set[RequestGroup] | None = None,
    ) -> None:
        self.engine = engine
        self.handles = handles
        self._registry = registry
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        self._seen = [(0, 0, False)] * len(handles)
        for handle in handles:
            handle.set_listener(self._wake)

    def _wake(self) -> None:  # engine thread: never block, never raise
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            self._loop.call_soon_threadsafe(self._event.set)

    @property
    def done(self) -> bool:
        return all(h.finished for h in self.handles)

    def _poll(self, i: int) -> bool:
        h = self.handles[i]
        h.poll()
        now = (len(h.text), len(h.output_ids), h.finished)
        changed = now != self._seen[i]
        self._seen[i] = now
        return changed

    async def updates(self) -> AsyncIterator[list[int]]:
        """Yield the indices of the handles that changed (text, tokens or finished), after
        each wake-up, until every handle has finished."""
        while not self.done:
            await self._event.wait()
            self._event.clear()
            changed = [i for i in range(len(self.handles)) if self._poll(i)]
            if changed:
                yield changed

    async def wait(
        self, check: Callable[[RequestHandle], None] | None = None
    ) -> list[dict[str, Any]]:
        """Wait for every request; ``check(handle)`` runs on each finished handle and may
        raise to stop early (the others are then aborted on exit). Returns the responses."""
        async for changed in self.updates():
            if check is not None:
                for i in changed:
                    if self.handles[i].finished:
                        check(self.handles[i])
        return [h.response() for h in self.handles]

    def abort_unfinished(self) -> None:
        for handle in self.handles:
            if not handle.finished:
                self.engine.abort(handle.rid)

    async def __aenter__(self) -> RequestGroup:
        if self._registry is not None:
            self._registry.add(self)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._registry is not None:
            self._registry.discard(self)
        self.abort_unfinished()
