"""A compiled program: its traced request graph, executed for whole batches at once.

Contract:
- ``run_batch`` prefills the graph's constant prefix once, then instantiates the graph for
  every batch item (arguments substituted, data edges rebound to that item's streams) and
  submits all of it before waiting for anything. Streams run as dataflow: a node starts as
  soon as its stream reaches it and the values it reads exist, so sibling requests of all
  items reach the backend together and are batched there.
- Execution uses the interpreter's executors, so results equal ``run``/``run_batch`` of the
  original program (token for token under greedy decoding).
- No Python of the program body runs at execution time (it ran once, while tracing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sgl_dsl.function import SglFunction, _finish_in_order, resolve_backend, sampling_defaults
from sgl_dsl.global_config import global_config
from sgl_dsl.interpreter import StreamExecutor
from sgl_dsl.ir import (
    SglArgument,
    SglConcateAndAppend,
    SglConstantText,
    SglExpr,
    SglExprList,
    SglJoinGather,
    SglSamplingParams,
    SglVariable,
)
from sgl_dsl.runtime_loop import spawn
from sgl_dsl.state import ProgramState
from sgl_dsl.tracer import ForkNode, JoinNode, TracedProgram, TracedStream, constant_prefix

if TYPE_CHECKING:
    from sgl_dsl.backends.base import BaseBackend


class CompiledFunction:
    """``program.compile()``: run or run_batch the traced graph."""

    def __init__(self, function: SglFunction, traced: TracedProgram) -> None:
        self.function = function
        self.traced = traced

    def print_graph(self) -> str:
        return self.traced.print_graph()

    def _repr_html_(self) -> str:
        return self.traced._repr_html_()

    def run(self, *args: Any, backend: Any = None, **kwargs: Any) -> ProgramState:
        names = self.function.arg_names
        if len(args) > len(names):
            raise TypeError(f"{self.function.__name__} takes {len(names)} arguments")
        sampling = {k: kwargs.pop(k) for k in list(kwargs) if k not in names}
        return self.run_batch([{**dict(zip(names, args)), **kwargs}], backend=backend, **sampling)[
            0
        ]

    def run_batch(
        self,
        batch_kwargs: list[Any],
        *,
        backend: Any = None,
        progress_bar: bool = False,
        **sampling: Any,
    ) -> list[ProgramState]:
        items = self.function._batch_kwargs(batch_kwargs)
        resolved = resolve_backend(backend)
        defaults = sampling_defaults(**sampling)
        prefix = constant_prefix(self.function, resolved)
        if prefix and len(prefix) >= global_config.min_precache_chars and len(items) > 1:
            spawn(resolved.cache_prefix(prefix)).result()
        states = [self._instantiate(item, resolved, defaults) for item in items]
        return list(_finish_in_order(states, progress_bar))

    def _instantiate(
        self, kwargs: dict[str, Any], backend: BaseBackend, defaults: SglSamplingParams
    ) -> ProgramState:
        missing = [
            n
            for n, v in self.traced.arguments.items()
            if isinstance(v, SglArgument) and n not in kwargs
        ]
        if missing:
            raise TypeError(f"{self.function.__name__} is missing arguments {missing}")
        root = StreamExecutor(backend, kwargs, defaults.clone())
        bound = _Binding(kwargs, {self.traced.root.index: root})
        bound.submit_stream(self.traced.root, root)
        return ProgramState(root)


class _Binding:
    """One batch item's instance of the graph: traced streams -> live executors."""

    def __init__(self, kwargs: dict[str, Any], executors: dict[int, StreamExecutor]) -> None:
        self.kwargs = kwargs
        self.executors = executors

    def submit_stream(self, stream: TracedStream, exe: StreamExecutor) -> None:
        for node in stream.nodes:
            if isinstance(node, ForkNode):
                children = exe.fork(len(node.children))
                self.executors.update((t.index, c) for t, c in zip(node.children, children))
                for traced, child in zip(node.children, children):
                    self.submit_stream(traced, child)
            elif isinstance(node, JoinNode):
                kids = [self.executors[c.index] for c in node.children]
                exe.submit(SglJoinGather(kids, node.names))
            else:
                exe.submit(self.bind(node))
        exe.end()

    def bind(self, expr: SglExpr) -> SglExpr:
        """``expr`` with arguments substituted and stream references made live."""
        if isinstance(expr, SglArgument):
            return SglConstantText(str(self.kwargs[expr.name]))
        if isinstance(expr, SglExprList):
            return SglExprList([self.bind(e) for e in expr.expr_list])
        if isinstance(expr, SglVariable) and isinstance(expr.source, TracedStream):
            return SglVariable(expr.name, self.executors[expr.source.index])
        if isinstance(expr, SglConcateAndAppend):
            return SglConcateAndAppend(
                [self.executors[s.index] if isinstance(s, TracedStream) else s for s in expr.states]
            )
        return expr
