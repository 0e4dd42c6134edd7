"""Tracing: run a program on symbolic arguments and record its request graph.

Contract:
- The graph is a list of streams (the root, then one per fork child). Each stream is the
  ordered list of expressions appended to it (order edges). A fork is a node in its parent
  stream naming its children; a value read from another stream (``forks[i]["x"]``) is an
  :class:`~sgl_dsl.ir.SglVariable` whose source is that stream (a data edge).
- Arguments not given to ``trace`` are :class:`~sgl_dsl.ir.SglArgument` placeholders. Using a
  placeholder or a generated value in host Python (``if``, f-strings, ``str()``, ``len()``)
  raises ``TypeError``: such a program depends on values at run time and cannot be traced;
  ``run``/``run_batch`` still run it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

from sgl_dsl.ir import (
    SglArgument,
    SglConcateAndAppend,
    SglConstantText,
    SglExpr,
    SglExprList,
    SglRoleBegin,
    SglRoleEnd,
    SglVariable,
    SglVarScopeBegin,
    SglVarScopeEnd,
    as_expr,
    produced_names,
)
from sgl_dsl.state import ForkGroup

if TYPE_CHECKING:
    from sgl_dsl.backends.base import BaseBackend
    from sgl_dsl.function import SglFunction


def _untraceable(what: str) -> NoReturn:
    raise TypeError(
        f"{what} is only known at run time, so this program cannot be traced or compiled "
        "(run() and run_batch() still run it)"
    )


class SymbolicValue(SglVariable):
    """A generated value while tracing: appendable to a state, unusable in host Python."""

    def __bool__(self) -> bool:
        _untraceable(f"the value of {self.name!r}")

    def __eq__(self, other: object) -> bool:
        _untraceable(f"the value of {self.name!r}")

    __hash__ = SglExpr.__hash__

    def __str__(self) -> str:
        _untraceable(f"the value of {self.name!r}")

    def __format__(self, spec: str) -> str:
        _untraceable(f"the value of {self.name!r}")

    def __len__(self) -> int:
        _untraceable(f"the value of {self.name!r}")

    def __iter__(self) -> Iterator[Any]:
        _untraceable(f"the value of {self.name!r}")


class SymbolicArgument(SglArgument):
    """An argument not given to ``trace``; see :class:`SymbolicValue`."""

    def __bool__(self) -> bool:
        _untraceable(f"the argument {self.name!r}")

    def __str__(self) -> str:
        _untraceable(f"the argument {self.name!r}")

    def __len__(self) -> int:
        _untraceable(f"the argument {self.name!r}")

    def __iter__(self) -> Iterator[Any]:
        _untraceable(f"the argument {self.name!r}")


@dataclass
class ForkNode:
    """In a parent stream: the children start here as copies of it."""

    children: list[TracedStream]

    def __repr__(self) -> str:
        return f"Fork -> streams {[c.index for c in self.children]}"


@dataclass
class JoinNode:
    """In a parent stream: wait for ``children`` and gather the variables ``names``."""

    children: list[TracedStream]
    names: list[str]

    def __repr__(self) -> str:
        return f"Join(gather {self.names}) <- streams {[c.index for c in self.children]}"


@dataclass(eq=False)
class TracedStream:
    index: int
    parent: TracedStream | None = None
    nodes: list[Any] = field(default_factory=list)  # SglExpr | ForkNode | JoinNode

    def produced(self) -> list[str]:
        return [n for node in self.nodes if isinstance(node, SglExpr) for n in produced_names(node)]


@dataclass
class TracedProgram:
    """The request graph of one program; :meth:`print_graph` shows it."""

    function: SglFunction
    streams: list[TracedStream]
    arguments: dict[str, Any]

    @property
    def root(self) -> TracedStream:
        return self.streams[0]

    def edges(self) -> list[tuple[str, int, int]]:
        """``(kind, from_stream, to_stream)`` for fork, join and data edges."""
        out: list[tuple[str, int, int]] = []
        for stream in self.streams:
            for node in stream.nodes:
                if isinstance(node, ForkNode):
                    out += [("fork", stream.index, c.index) for c in node.children]
                elif isinstance(node, JoinNode):
                    out += [("join", c.index, stream.index) for c in node.children]
                elif isinstance(node, SglExpr):
                    out += [
                        ("data", src.index, stream.index)
                        for src in _expr_sources(node)
                        if src is not stream
                    ]
        return out

    def __repr__(self) -> str:
        nodes = sum(len(s.nodes) for s in self.streams)
        name, streams = self.function.__name__, len(self.streams)
        return f"TracedProgram({name}: {streams} streams, {nodes} nodes)"

    def _repr_html_(self) -> str:
        from sgl_dsl.display import graph_svg

        return graph_svg(self)

    def print_graph(self) -> str:
        lines = [f"program {self.function.__name__}({', '.join(self.function.arg_names)})"]
        for stream in self.streams:
            origin = (
                "root" if stream.parent is None else f"forked from stream {stream.parent.index}"
            )
            lines.append(f"stream {stream.index} ({origin})")
            lines += [f"  {describe_node(node)}" for node in stream.nodes]
        data = [e for e in self.edges() if e[0] == "data"]
        if data:
            lines.append("data edges: " + ", ".join(f"{a} -> {b}" for _, a, b in data))
        text = "\n".join(lines)
        print(text)
        return text


def _flatten(expr: SglExpr) -> list[SglExpr]:
    if isinstance(expr, SglExprList):
        return [x for e in expr.expr_list for x in _flatten(e)]
    return [expr]


def _expr_sources(expr: SglExpr) -> list[TracedStream]:
    return [
        e.source
        for e in _flatten(expr)
        if isinstance(e, SglVariable) and isinstance(e.source, TracedStream)
    ]


def node_sources(node: Any) -> list[TracedStream]:
    """The streams whose variables ``node`` reads (its data edges)."""
    return _expr_sources(node) if isinstance(node, SglExpr) else []


def describe_node(node: Any) -> str:
    if not isinstance(node, SglExpr):
        return repr(node)
    parts = []
    for e in _flatten(node):
        if isinstance(e, SglVariable) and isinstance(e.source, TracedStream):
            parts.append(f"Variable({e.name!r} of stream {e.source.index})")
        else:
            parts.append(repr(e))
    return " + ".join(parts)


class TracerProgramState:
    """Stands in for ``s`` while tracing: records instead of executing."""

    def __init__(self, tracer: _Tracer, stream: TracedStream) -> None:
        self._tracer = tracer
        self.stream = stream

    def __iadd__(self, other: SglExpr | str) -> TracerProgramState:
        if other is None:
            raise ValueError("tried to append None to a program state")
        self.stream.nodes.append(as_expr(other))
        return self

    def __getitem__(self, name: str) -> SymbolicValue:
        return SymbolicValue(name, self.stream)

    get_var = __getitem__

    def _role(self, name: str, expr: SglExpr | str | None) -> Any:
        if expr is not None:
            self += SglExprList([SglRoleBegin(name), as_expr(expr), SglRoleEnd(name)])
            return None

        @contextmanager
        def scope() -> Iterator[None]:
            self.stream.nodes.append(SglRoleBegin(name))
            yield
            self.stream.nodes.append(SglRoleEnd(name))

        return scope()

    def system(self, expr: SglExpr | str | None = None) -> Any:
        return self._role("system", expr)

    def user(self, expr: SglExpr | str | None = None) -> Any:
        return self._role("user", expr)

    def assistant(self, expr: SglExpr | str | None = None) -> Any:
        return self._role("assistant", expr)

    @contextmanager
    def var_scope(self, name: str) -> Iterator[None]:
        self.stream.nodes.append(SglVarScopeBegin(name))
        yield
        self.stream.nodes.append(SglVarScopeEnd(name))

    def fork(self, size: int = 1, position_ids_offset: Any = None) -> TracerStateGroup:
        children = [self._tracer.new_stream(self.stream) for _ in range(int(size))]
        self.stream.nodes.append(ForkNode(children))
        return TracerStateGroup([TracerProgramState(self._tracer, c) for c in children], self)

    @contextmanager
    def copy(self, position_ids_offset: Any = None) -> Iterator[TracerProgramState]:
        group = self.fork(1)
        yield group[0]
        group.join()

    def _read(self, what: str) -> NoReturn:
        _untraceable(f"the state's {what}")

    def text(self) -> str:
        self._read("text")

    def messages(self) -> list[dict[str, Any]]:
        self._read("messages")

    def get_meta_info(self, name: str) -> Any:
        self._read(f"meta info of {name!r}")

    def set_var(self, name: str, value: Any) -> None:
        self._read(f"variable {name!r}")

    def sync(self) -> None:
        """Nothing to wait for while tracing."""

    def error(self) -> None:
        return None


class TracerStateGroup(ForkGroup):
    """The forks of a program being traced."""

    def join(self, mode: str = "gather_variable") -> None:
        children = [s.stream for s in self.states]
        if mode == "gather_variable":
            names = sorted({n for c in children for n in c.produced()})
            self.src_state.stream.nodes.append(JoinNode(children, names))
        elif mode == "concate_and_append":
            self.src_state.stream.nodes.append(SglConcateAndAppend(children))
        else:
            raise ValueError(
                f"invalid join mode {mode!r}: use gather_variable or concate_and_append"
            )


class _Tracer:
    def __init__(self) -> None:
        self.streams: list[TracedStream] = []

    def new_stream(self, parent: TracedStream | None) -> TracedStream:
        stream = TracedStream(len(self.streams), parent)
        self.streams.append(stream)
        return stream


def trace_program(
    function: SglFunction, kwargs: dict[str, Any], backend: Any = None
) -> TracedProgram:
    """Trace ``function``: ``kwargs`` are concrete arguments, the rest become placeholders."""
    tracer = _Tracer()
    root = tracer.new_stream(None)
    arguments: dict[str, Any] = {}
    for name in function.arg_names:
        if name in kwargs:
            arguments[name] = kwargs[name]
        elif name in function.bind_arguments:
            arguments[name] = function.bind_arguments[name]
        else:
            arguments[name] = SymbolicArgument(name, None)
    function.func(TracerProgramState(tracer, root), **arguments)
    return TracedProgram(function, tracer.streams, arguments)


def _static_head(stream: TracedStream) -> list[SglExpr]:
    """The leading expressions whose text does not depend on arguments or generation."""
    head: list[SglExpr] = []
    for node in stream.nodes:
        if not isinstance(node, SglExpr):
            break
        for e in _flatten(node):
            if not isinstance(e, (SglConstantText, SglRoleBegin, SglRoleEnd)):
                return head
            head.append(e)
    return head


def constant_prefix(function: SglFunction, backend: BaseBackend) -> str:
    """The text every run of ``function`` starts with ("" if tracing fails or there is none)."""
    from sgl_dsl.interpreter import StreamExecutor
    from sgl_dsl.runtime_loop import spawn

    try:
        traced = trace_program(function, {})
    except Exception:  # untraceable programs simply get no pre-caching
        return ""
    head = _static_head(traced.root)
    if not head:
        return ""
    scratch = StreamExecutor(backend, {}, None)  # type: ignore[arg-type]
    spawn(_run_static(scratch, head)).result()
    return scratch.text_


async def _run_static(exe: Any, exprs: list[SglExpr]) -> None:
    for e in exprs:
        await exe._execute(e)
