"""Executes a program state's expressions, in order, as a task on the runtime loop.

Contract (one :class:`StreamExecutor` per program state, fork child or batch item):
- ``submit`` never blocks: it queues the expression and makes sure a drain task runs.
- Expressions of one stream execute strictly in submission order; different streams run
  concurrently, so their requests reach the backend together and are batched there.
- ``get_var(name)`` waits until every expression submitted so far that sets ``name`` has run.
- A failing expression records ``error_``, drops the rest of this stream's queue, releases every
  waiter, and fails the streams forked from it later in the queue. Other streams are unaffected.
- A forked child starts from a copy of its parent's state at the fork point; its queue waits for
  the parent to get there, so ``fork`` itself never blocks.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections import deque
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from sgl_dsl.ir import (
    SglCommitLazy,
    SglConcateAndAppend,
    SglConstantText,
    SglExpr,
    SglExprList,
    SglFork,
    SglGen,
    SglImage,
    SglJoinGather,
    SglRaise,
    SglRoleBegin,
    SglRoleEnd,
    SglSamplingParams,
    SglSelect,
    SglSeparateReasoning,
    SglVariable,
    SglVarScopeBegin,
    SglVarScopeEnd,
    SglVideo,
    as_expr,
    gen_names,
    produced_names,
    reasoning_name,
)
from sgl_dsl.reasoning import split_reasoning
from sgl_dsl.runtime_loop import Notifier, call_soon
from sgl_dsl.spans import Span

if TYPE_CHECKING:
    from sgl_dsl.backends.base import BaseBackend
    from sgl_dsl.chat_template import ChatTemplate

logger = logging.getLogger(__name__)


class StreamExecutor:
    """The state of one stream and the queue of expressions still to execute on it."""

    def __init__(
        self,
        backend: BaseBackend,
        arguments: dict[str, Any],
        default_sampling_para: SglSamplingParams,
        chat_template: ChatTemplate | None = None,
        stream: bool = False,
        num_api_spec_tokens: int | None = None,
        start: Future[None] | None = None,
    ) -> None:
        self.sid = uuid.uuid4().hex
        self.backend = backend
        self.arguments = arguments
        self.default_sampling_para = default_sampling_para
        self.chat_template = chat_template or backend.get_chat_template()
        self.stream = stream
        self.num_api_spec_tokens = num_api_spec_tokens

        self.text_ = ""
        self.messages_: list[dict[str, Any]] = []
        self.variables: dict[str, Any] = {}
        self.meta_info: dict[str, Any] = {}
        self.cur_role: str | None = None
        self.cur_role_begin_pos: int | None = None
        self.fork_start_text_pos: int | None = None
        self.images_: list[Any] = []
        self.error_: BaseException | None = None
        self.speculated_text = ""
        self.spans: list[Span] = []
        self.forks: list[tuple[int, list[StreamExecutor]]] = []  # (text position, children)

        self._start = start  # resolved when the parent reaches the fork point
        self._lock = threading.Lock()
        self._queue: deque[SglExpr] = deque()
        self._pending: dict[str, int] = {}  # variable name -> producers not yet executed
        self._submitted = 0
        self._done = 0
        self._draining = False
        self._ended = False
        self.changed = Notifier()

    # ---- user-thread side -----------------------------------------------------------------

    def submit(self, expr: SglExpr | str) -> None:
        expr = as_expr(expr)
        with self._lock:
            for name in produced_names(expr):
                self._pending[name] = self._pending.get(name, 0) + 1
            self._queue.append(expr)
            self._submitted += 1
            if self._draining:
                return
            self._draining = True
        call_soon(self._start_drain)

    def end(self) -> None:
        """The program will submit nothing more."""
        with self._lock:
            if self._ended:
                return
            self._ended = True
        self.backend.end_program(self)
        self.changed.notify()

    @property
    def is_finished(self) -> bool:
        return self._ended and self._done == self._submitted

    def _synced(self) -> bool:
        return self._done == self._submitted

    def sync(self, timeout: float | None = None) -> None:
        if not self.changed.wait_until(self._synced, timeout):
            raise TimeoutError(f"the program did not finish within {timeout} s")

    async def sync_async(self) -> None:
        await self.changed.wait_until_async(self._synced)

    def _var_ready(self, name: str) -> bool:
        return not self._pending.get(name)

    def get_var(self, name: str) -> Any:
        self.changed.wait_until(lambda: self._var_ready(name))
        return self._read_var(name)

    async def get_var_async(self, name: str) -> Any:
        await self.changed.wait_until_async(lambda: self._var_ready(name))
        return self._read_var(name)

    def _read_var(self, name: str) -> Any:
        if name not in self.variables:
            if self.error_ is not None:
                raise RuntimeError(
                    f"variable {name!r} was not produced: the program failed: {self.error_}"
                ) from self.error_
            raise KeyError(f"the program has no variable {name!r}")
        return self.variables[name]

    def set_var(self, name: str, value: Any) -> None:
        self.variables[name] = value
        self.changed.notify()

    def get_meta_info(self, name: str, timeout: float | None = None) -> Any:
        if not self.changed.wait_until(lambda: self._var_ready(name), timeout):
            raise TimeoutError(f"timed out waiting for {name!r}")
        return self.meta_info.get(name)

    def text(self) -> str:
        self.sync()
        return self.text_

    def messages(self) -> list[dict[str, Any]]:
        self.sync()
        return self.messages_

    def error(self) -> BaseException | None:
        self.sync()
        return self.error_

    def fork(self, size: int = 1) -> list[StreamExecutor]:
        """Children that start from this stream's state once it reaches this point."""
        size = int(size)
        if size < 1:
            raise ValueError(f"fork size must be at least 1, got {size}")
        children = [
            StreamExecutor(
                self.backend,
                self.arguments,
                self.default_sampling_para,
                self.chat_template,
                self.stream,
                self.num_api_spec_tokens,
                start=Future(),
            )
            for _ in range(size)
        ]
        self.submit(SglFork(children, hint=size > 1))
        return children

    # ---- runtime-loop side ------------------------------------------------------------------

    def _start_drain(self) -> None:
        asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        if self._start is not None:
            try:
                await asyncio.wrap_future(self._start)
            except Exception as exc:
                self._fail(exc)
            self._start = None
        while True:
            with self._lock:
                if not self._queue:
                    self._draining = False
                    break
                expr = self._queue.popleft()
            if self.error_ is None:
                try:
                    await self._execute(expr)
                except Exception as exc:
                    self._fail(exc)
            elif isinstance(expr, SglFork):
                self._fail_children(expr)
            with self._lock:
                for name in produced_names(expr):
                    self._pending[name] -= 1
                self._done += 1
            self.changed.notify()
        self.changed.notify()

    def _fail(self, exc: BaseException) -> None:
        logger.warning("program stream %s failed: %s", self.sid[:8], exc, exc_info=exc)
        self.error_ = exc
        self.changed.notify()

    def _fail_children(self, fork: SglFork) -> None:
        for child in fork.children:
            if child._start is not None and not child._start.done():
                child._start.set_exception(
                    RuntimeError(f"the parent program failed before the fork: {self.error_}")
                )

    async def _execute(self, expr: SglExpr) -> None:
        handler = _HANDLERS.get(type(expr))
        if handler is None:
            raise TypeError(f"unknown expression {expr!r}")
        await handler(self, expr)

    async def _exec_list(self, expr: SglExprList) -> None:
        for item in expr.expr_list:
            await self._execute(item)

    def _speculating_chat(self) -> bool:
        """Inside an assistant turn whose text the backend produces at the turn's end."""
        return (
            self.num_api_spec_tokens is not None
            and self.cur_role == "assistant"
            and self.backend.is_chat_model
        )

    async def _exec_text(self, expr: SglConstantText) -> None:
        if self._speculating_chat():
            self.backend.spec_fill(self, str(expr.value))  # type: ignore[attr-defined]
        else:
            self._fill(str(expr.value))

    def _fill(self, value: str) -> None:
        if self.speculated_text.startswith(value):
            self.speculated_text = self.speculated_text[len(value) :]
        else:
            self.speculated_text = ""
        self.text_ += value
        self.changed.notify()

    def _set(self, name: str | None, value: Any, meta: Any = None) -> None:
        if name is not None:
            self.variables[name] = value
            self.meta_info[name] = meta

    def resolve_sampling_params(self, params: SglSamplingParams) -> SglSamplingParams:
        return self.default_sampling_para.override(params, self.chat_template.stop_str)

    async def _exec_gen(self, expr: SglGen) -> None:
        params = self.resolve_sampling_params(expr.sampling_params)
        if self.num_api_spec_tokens is not None:
            await self._spec_gen(expr, params)
            return
        if not self.stream:
            comp, meta = await self.backend.generate(self, params)
            start = len(self.text_)
            self._fill(comp[0] if isinstance(comp, list) else comp)
            self.spans.append(Span("gen", start, len(self.text_), expr.name))
            self._set(expr.name, comp, meta)
            return
        if (params.n or 1) > 1:
            raise ValueError("stream=True does not support n > 1; run without streaming")
        self._set(expr.name, "", None)
        span = Span("gen", len(self.text_), len(self.text_), expr.name)
        self.spans.append(span)
        async for piece, meta in self.backend.generate_stream(self, params):
            self.text_ += piece
            span.end = len(self.text_)
            if expr.name is not None:
                self.variables[expr.name] += piece
                self.meta_info[expr.name] = meta
            self.changed.notify()

    async def _spec_gen(self, expr: SglGen, params: SglSamplingParams) -> None:
        """API speculative execution (SGLang semantics). Chat models: defer the gen to the
        end of the assistant turn. Completion models: generate ``num_api_spec_tokens`` once
        without stops and let the following gens and fills consume that text."""
        if self.stream:
            raise ValueError("streaming does not support API speculative execution")
        if self.backend.is_chat_model:
            if not self._speculating_chat():
                raise ValueError("with num_api_spec_tokens, gen must be inside an assistant turn")
            self.backend.spec_gen(self, params, expr.name)  # type: ignore[attr-defined]
            with self._lock:  # the value arrives when the turn ends
                if expr.name is not None:
                    self._pending[expr.name] = self._pending.get(expr.name, 0) + 1
            return
        assert self.num_api_spec_tokens is not None
        if not self.speculated_text:
            wide = params.clone()
            wide.max_new_tokens = max(wide.max_new_tokens or 0, self.num_api_spec_tokens)
            wide.stop = []
            text, _ = await self.backend.generate(self, wide)
            self.speculated_text = text if isinstance(text, str) else text[0]
        spec = self.speculated_text
        stops = [p for p in params.stop if p in spec]  # type: ignore[union-attr]
        cut = min(
            (spec.index(p) for p in stops), default=min(params.max_new_tokens or 0, len(spec))
        )
        comp, self.speculated_text = spec[:cut], spec[cut:]
        self.spans.append(Span("gen", len(self.text_), len(self.text_) + len(comp), expr.name))
        self.text_ += comp
        self._set(expr.name, comp, {})
        self.changed.notify()

    async def _exec_select(self, expr: SglSelect) -> None:
        if not expr.choices:
            raise ValueError("select needs at least one choice")
        decision = await self.backend.select(
            self, list(expr.choices), expr.temperature, expr.choices_method
        )
        self._set(expr.name, decision.decision, decision.meta_info)
        start = len(self.text_)
        self._fill(decision.decision)
        scores = (decision.meta_info or {}).get("normalized_prompt_logprobs")
        detail = {"choices": list(expr.choices), "scores": scores}
        self.spans.append(Span("select", start, len(self.text_), expr.name, detail))

    async def _exec_role_begin(self, expr: SglRoleBegin) -> None:
        if self.cur_role is not None:
            raise ValueError(f"role {expr.role!r} opened inside role {self.cur_role!r}")
        template = self.chat_template
        if not self.messages_ and expr.role != "system" and template.default_system_prompt:
            await self._exec_role_begin(SglRoleBegin("system"))
            self._fill(template.default_system_prompt)
            await self._exec_role_end(SglRoleEnd("system"))
        prefix, _ = template.get_prefix_and_suffix(expr.role, self.messages_)
        self.cur_role = expr.role
        self._fill(prefix)
        self.cur_role_begin_pos = len(self.text_)

    async def _exec_role_end(self, expr: SglRoleEnd) -> None:
        if self.cur_role != expr.role:
            raise ValueError(f"role {expr.role!r} ended while {self.cur_role!r} is open")
        if self._speculating_chat():
            for text, name in await self.backend.role_end_generate(self):
                if name is not None:
                    self.spans.append(
                        Span("gen", len(self.text_), len(self.text_) + len(text), name)
                    )
                self.text_ += text
                if name is not None:
                    self._set(name, text, {})
                    with self._lock:
                        self._pending[name] -= 1
        assert self.cur_role_begin_pos is not None
        content = self.text_[self.cur_role_begin_pos :].lstrip()
        self.spans.append(Span("role", self.cur_role_begin_pos, len(self.text_), expr.role))
        _, suffix = self.chat_template.get_prefix_and_suffix(expr.role, self.messages_)
        self._fill(suffix)
        self.messages_.append({"role": expr.role, "content": content})
        self.cur_role = None

    async def _exec_image(self, expr: SglImage | SglVideo) -> None:
        await self.backend.fill_image(self, expr)

    async def _exec_variable(self, expr: SglVariable) -> None:
        source = getattr(expr.source, "stream_executor", expr.source)
        value = (
            self.variables[expr.name] if source is self else await source.get_var_async(expr.name)
        )
        self._fill(str(value))

    async def _exec_scope_begin(self, expr: SglVarScopeBegin) -> None:
        self.variables[expr.name] = len(self.text_)

    async def _exec_scope_end(self, expr: SglVarScopeEnd) -> None:
        self.variables[expr.name] = self.text_[self.variables[expr.name] :]

    async def _exec_commit(self, expr: SglCommitLazy) -> None:
        await self.backend.commit_lazy_operations(self)

    async def _exec_fork(self, expr: SglFork) -> None:
        if expr.hint and self.text_:
            await self.backend.commit_lazy_operations(self)
        self.forks.append((len(self.text_), expr.children))
        for child in expr.children:
            child.spans = list(self.spans)
            child.text_ = self.text_
            child.messages_ = list(self.messages_)
            child.variables = dict(self.variables)
            child.meta_info = dict(self.meta_info)
            child.cur_role = self.cur_role
            child.cur_role_begin_pos = self.cur_role_begin_pos
            child.fork_start_text_pos = len(self.text_)
            child.images_ = list(self.images_)
            assert child._start is not None
            child._start.set_result(None)

    async def _exec_concat(self, expr: SglConcateAndAppend) -> None:
        pieces = []
        for state in expr.states:
            child: StreamExecutor = getattr(state, "stream_executor", state)
            await child.sync_async()
            if child.error_ is not None:
                raise RuntimeError(f"a joined fork failed: {child.error_}") from child.error_
            pieces.append(child.text_[child.fork_start_text_pos :])
        self._fill("".join(pieces))

    async def _exec_join_gather(self, expr: SglJoinGather) -> None:
        known = set(self.variables)
        for state in expr.children:
            child: StreamExecutor = getattr(state, "stream_executor", state)
            await child.sync_async()
            child.end()
            for name in expr.names:
                if name in child.variables and name not in known:
                    self.variables.setdefault(name, []).append(child.variables[name])
                    self.meta_info.setdefault(name, []).append(child.meta_info.get(name))

    async def _exec_raise(self, expr: SglRaise) -> None:
        raise expr.error

    async def _exec_separate_reasoning(self, expr: SglSeparateReasoning) -> None:
        for name in [n for n in gen_names(expr.expr) if n is not None]:
            value = self.variables.get(name)
            if not isinstance(value, str):
                continue
            reasoning, answer = split_reasoning(value, expr.model_type)
            self.variables[name] = answer
            self.variables[reasoning_name(name)] = reasoning
            if self.text_.endswith(value):
                self.text_ = self.text_[: len(self.text_) - len(value)] + answer


_HANDLERS: dict[type, Any] = {
    SglExprList: StreamExecutor._exec_list,
    SglConstantText: StreamExecutor._exec_text,
    SglGen: StreamExecutor._exec_gen,
    SglSelect: StreamExecutor._exec_select,
    SglRoleBegin: StreamExecutor._exec_role_begin,
    SglRoleEnd: StreamExecutor._exec_role_end,
    SglImage: StreamExecutor._exec_image,
    SglVideo: StreamExecutor._exec_image,
    SglVariable: StreamExecutor._exec_variable,
    SglVarScopeBegin: StreamExecutor._exec_scope_begin,
    SglVarScopeEnd: StreamExecutor._exec_scope_end,
    SglCommitLazy: StreamExecutor._exec_commit,
    SglFork: StreamExecutor._exec_fork,
    SglConcateAndAppend: StreamExecutor._exec_concat,
    SglSeparateReasoning: StreamExecutor._exec_separate_reasoning,
    SglJoinGather: StreamExecutor._exec_join_gather,
    SglRaise: StreamExecutor._exec_raise,
}
