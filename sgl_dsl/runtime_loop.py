"""The one background event loop that runs every program stream, and a change notifier.

Contract:
- :func:`get_loop` starts (once per process) a daemon thread running an asyncio loop; every
  :class:`~sgl_dsl.interpreter.StreamExecutor` executes its expressions as tasks on it, so a
  thousand concurrent program states cost a thousand tasks, not a thousand threads.
- :class:`Notifier` wakes blocked threads and coroutines on *any* event loop (the runtime loop, a
  Jupyter loop) whenever the state it guards changes; waiters re-check a predicate, so spurious
  wake-ups are harmless and a change is never missed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")
_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def get_loop() -> asyncio.AbstractEventLoop:
    """The runtime loop, started on first use in a daemon thread named ``sgl-dsl-runtime``."""
    global _loop
    with _loop_lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            threading.Thread(target=run, name="sgl-dsl-runtime", daemon=True).start()
            ready.wait()
            _loop = loop
        return _loop


def in_runtime_thread() -> bool:
    """True when called from the runtime loop's own thread (blocking there would deadlock)."""
    try:
        return asyncio.get_running_loop() is _loop
    except RuntimeError:
        return False


def spawn(coro: Coroutine[Any, Any, T]) -> Future[T]:
    """Schedule ``coro`` on the runtime loop from any thread; returns a thread-safe future."""
    return asyncio.run_coroutine_threadsafe(coro, get_loop())


def call_soon(fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(*args)`` on the runtime loop as soon as possible (thread-safe)."""
    get_loop().call_soon_threadsafe(fn, *args)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Notifier:
    """Condition-variable style wake-ups for threads and coroutines alike."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def notify(self) -> None:
        """Wake every waiter; call after each change to the guarded state."""
        with self._cond:
            self._cond.notify_all()
            waiters, self._async_waiters = self._async_waiters, []
        for loop, fut in waiters:
            if not loop.is_closed():
                loop.call_soon_threadsafe(_wake, fut)

    def wait_until(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        """Block the calling thread until ``predicate()`` holds; False on timeout."""
        if in_runtime_thread() and not predicate():
            raise RuntimeError("blocking wait on the sgl-dsl runtime loop would deadlock")
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    async def wait_until_async(self, predicate: Callable[[], bool]) -> None:
        """Await (on the caller's running loop) until ``predicate()`` holds."""
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if predicate():
                    return
                fut: asyncio.Future[None] = loop.create_future()
                self._async_waiters.append((loop, fut))
            await fut
