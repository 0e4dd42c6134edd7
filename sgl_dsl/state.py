"""What a program sees as ``s``: :class:`ProgramState`, and the result of ``s.fork(n)``.

Contract: appending (``s += ...``, role blocks, ``var_scope``, ``fork``) never blocks; reading
(``s["x"]``, ``text()``, ``messages()``, ``error()``, ``sync()``) waits for the stream to get
there. ``await state`` (or :meth:`ProgramState.wait`) waits without blocking an event loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sgl_dsl import display
from sgl_dsl.interpreter import StreamExecutor
from sgl_dsl.ir import (
    SglConcateAndAppend,
    SglExpr,
    SglExprList,
    SglJoinGather,
    SglRoleBegin,
    SglRoleEnd,
    SglVarScopeBegin,
    SglVarScopeEnd,
    as_expr,
)


class ProgramState:
    """The state of a running program: its text, messages and variables."""

    def __init__(self, stream_executor: StreamExecutor) -> None:
        self.stream_executor = stream_executor
        self.ret_value: Any = None

    # ---- appending -------------------------------------------------------------------------

    def __iadd__(self, other: SglExpr | str) -> ProgramState:
        if other is None:
            raise ValueError("tried to append None to a program state")
        self.stream_executor.submit(other)
        return self

    def _role(self, name: str, expr: SglExpr | str | None) -> Any:
        if expr is not None:
            role_expr = SglExprList([SglRoleBegin(name), as_expr(expr), SglRoleEnd(name)])
            self.stream_executor.submit(role_expr)
            return role_expr

        @contextmanager
        def scope() -> Iterator[None]:
            self.stream_executor.submit(SglRoleBegin(name))
            yield
            self.stream_executor.submit(SglRoleEnd(name))

        return scope()

    def system(self, expr: SglExpr | str | None = None) -> Any:
        return self._role("system", expr)

    def user(self, expr: SglExpr | str | None = None) -> Any:
        return self._role("user", expr)

    def assistant(self, expr: SglExpr | str | None = None) -> Any:
        return self._role("assistant", expr)

    @contextmanager
    def var_scope(self, name: str) -> Iterator[None]:
        """Everything appended inside the block becomes the variable ``name``."""
        self.stream_executor.submit(SglVarScopeBegin(name))
        yield
        self.stream_executor.submit(SglVarScopeEnd(name))

    def fork(self, size: int = 1, position_ids_offset: Any = None) -> ProgramStateGroup:
        children = self.stream_executor.fork(size)
        return ProgramStateGroup([ProgramState(c) for c in children], self)

    @contextmanager
    def copy(self, position_ids_offset: Any = None) -> Iterator[ProgramState]:
        group = self.fork(1)
        try:
            yield group[0]
        finally:
            group.join()

    # ---- reading ---------------------------------------------------------------------------

    def __getitem__(self, name: str) -> Any:
        return self.stream_executor.get_var(name)

    def __setitem__(self, name: str, value: Any) -> None:
        self.stream_executor.set_var(name, value)

    def __contains__(self, name: str) -> bool:
        return name in self.stream_executor.variables

    def get_var(self, name: str) -> Any:
        return self.stream_executor.get_var(name)

    def set_var(self, name: str, value: Any) -> None:
        self.stream_executor.set_var(name, value)

    def get_meta_info(self, name: str) -> Any:
        return self.stream_executor.get_meta_info(name)

    def text(self) -> str:
        return self.stream_executor.text()

    def messages(self) -> list[dict[str, Any]]:
        return self.stream_executor.messages()

    def sync(self) -> None:
        self.stream_executor.sync()

    def error(self) -> BaseException | None:
        return self.stream_executor.error()

    async def wait(self) -> ProgramState:
        """Wait (asynchronously) until every submitted expression has run."""
        await self.stream_executor.sync_async()
        return self

    def __await__(self) -> Any:
        return self.wait().__await__()

    # ---- streaming -------------------------------------------------------------------------

    def _progress(self, var_name: str | None) -> tuple[str, bool]:
        exe = self.stream_executor
        if var_name is None:
            return exe.text_, exe.is_finished
        value = exe.variables.get(var_name, "")
        done = exe.is_finished or (var_name in exe.variables and exe._var_ready(var_name))
        return (value if isinstance(value, str) else ""), done

    def _has_news(self, var_name: str | None, sent: int) -> bool:
        text, done = self._progress(var_name)
        return len(text) > sent or done

    def text_iter(self, var_name: str | None = None) -> Iterator[str]:
        """Yield new text as it is produced (of the whole state, or of one variable)."""
        sent = 0
        while True:
            self.stream_executor.changed.wait_until(
                lambda sent=sent: self._has_news(var_name, sent)
            )
            text, done = self._progress(var_name)
            if len(text) > sent:
                yield text[sent:]
                sent = len(text)
            elif done:
                return

    async def text_async_iter(
        self, var_name: str | None = None, return_meta_data: bool = False
    ) -> AsyncIterator[Any]:
        """Like :meth:`text_iter`, without blocking the event loop; with ``return_meta_data``
        each item is ``(new_text, meta_info of var_name)``."""
        exe, sent = self.stream_executor, 0
        while True:
            await exe.changed.wait_until_async(lambda sent=sent: self._has_news(var_name, sent))
            text, done = self._progress(var_name)
            if len(text) > sent:
                piece, sent = text[sent:], len(text)
                yield (
                    (piece, exe.meta_info.get(var_name) if var_name else None)
                    if (return_meta_data)
                    else piece
                )
            elif done:
                return

    # ---- display ---------------------------------------------------------------------------

    def __repr__(self) -> str:
        self.sync()
        return display.state_text(self.stream_executor)

    def _repr_html_(self) -> str:
        """Jupyter's view: role turns, generated spans labelled, forks side by side."""
        self.sync()
        return display.program_state_html(self.stream_executor)

    def live(self, interval: float = 0.1) -> ProgramState:
        """In a notebook, show this (streaming) state in one display updated until it ends."""
        display.live(self.stream_executor, interval)
        return self

    async def live_async(self, interval: float = 0.1) -> ProgramState:
        """:meth:`live` without blocking the notebook's event loop."""
        await display.live_async(self.stream_executor, interval)
        return self

    def __del__(self) -> None:
        exe = getattr(self, "stream_executor", None)
        if exe is not None:
            exe.end()


class ForkGroup:
    """The states of ``s.fork(n)``: index them, or ``forks += x`` to append to each (``x``
    an expression, a list with one value per fork, or a function of the fork's index)."""

    def __init__(self, states: list[Any], src_state: Any) -> None:
        self.states = states
        self.src_state = src_state

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.states)

    def __getitem__(self, i: int) -> Any:
        return self.states[i]

    def __setitem__(self, i: int, value: Any) -> None:
        if value is not self.states[i]:
            raise ValueError("assign a fork only to itself (forks[i] += ...)")

    def __iadd__(self, other: SglExpr | str | Callable[[int], Any] | Sequence[Any]) -> ForkGroup:
        if isinstance(other, (list, tuple)):
            if len(other) != len(self.states):
                raise ValueError(f"{len(other)} values for {len(self.states)} forks")
            for state, value in zip(self.states, other):
                state += value
        elif callable(other) and not isinstance(other, SglExpr):
            for i, state in enumerate(self.states):
                state += other(i)
        else:
            for state in self.states:
                state += other
        return self


class ProgramStateGroup(ForkGroup):
    """The forks of a running program."""

    def join(self, mode: str = "gather_variable") -> None:
        """Wait for the forks and merge them into the source state.

        ``gather_variable``: every variable a fork created becomes a list (one value per fork)
        in the source state. ``concate_and_append``: the forks' new text is appended to the
        source state, in fork order (works on every backend).
        """
        if mode == "gather_variable":
            names: set[str] = set()
            for state in self.states:
                state.sync()
                names |= state.stream_executor.variables.keys()
            self.src_state += SglJoinGather(self.states, sorted(names))
        elif mode == "concate_and_append":
            self.src_state += SglConcateAndAppend(self.states)
        else:
            raise ValueError(
                f"invalid join mode {mode!r}: use gather_variable or concate_and_append"
            )
        for state in self.states:
            state.stream_executor.end()
