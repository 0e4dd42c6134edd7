"""``@function`` programs: run one, run a batch, run asynchronously, bind, trace, compile.

Contract: the program body runs on the caller's thread (``run``), on a bounded pool of
``num_threads`` body threads (``run_batch``, streaming ``run``), or in a worker thread of the
caller's event loop (``run_async``). The body only queues expressions unless it reads a value;
all generation happens on the shared runtime loop, so concurrent programs batch in the engine.
"""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import tqdm

from sgl_dsl.backends import BaseBackend, as_backend
from sgl_dsl.global_config import global_config
from sgl_dsl.interpreter import StreamExecutor
from sgl_dsl.ir import SglRaise, SglSamplingParams
from sgl_dsl.runtime_loop import spawn
from sgl_dsl.state import ProgramState

if TYPE_CHECKING:
    from sgl_dsl.compiler import CompiledFunction
    from sgl_dsl.tracer import TracedProgram

_STREAM_BODIES = ThreadPoolExecutor(max_workers=32, thread_name_prefix="sgl-dsl-body")


def resolve_backend(backend: Any) -> BaseBackend:
    backend = backend or global_config.default_backend
    if backend is None:
        raise ValueError(
            "no backend: call sgl.set_default_backend(sgl.Engine()) or pass backend=..."
        )
    return as_backend(backend)


def sampling_defaults(
    max_new_tokens: int = 128,
    n: int = 1,
    stop: str | list[str] | None = None,
    stop_token_ids: list[int] | None = None,
    stop_regex: str | list[str] | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = -1,
    min_p: float = 0.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    ignore_eos: bool = False,
    return_logprob: bool | None = None,
    logprob_start_len: int | None = None,
    top_logprobs_num: int | None = None,
    return_text_in_logprobs: bool | None = None,
) -> SglSamplingParams:
    """The run-level sampling defaults that every ``gen`` of the program inherits."""
    return SglSamplingParams(
        max_new_tokens=max_new_tokens,
        n=n,
        stop=stop or [],
        stop_token_ids=stop_token_ids or [],
        stop_regex=stop_regex or [],
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        ignore_eos=ignore_eos,
        return_logprob=return_logprob,
        logprob_start_len=logprob_start_len,
        top_logprobs_num=top_logprobs_num,
        return_text_in_logprobs=return_text_in_logprobs,
    )


_SAMPLING_NAMES = tuple(inspect.signature(sampling_defaults).parameters)


def _split_sampling(kwargs: dict[str, Any]) -> tuple[dict[str, Any], SglSamplingParams]:
    """Separate sampling defaults from program arguments in ``run(**kwargs)``."""
    sampling = {k: kwargs.pop(k) for k in _SAMPLING_NAMES if k in kwargs}
    return kwargs, sampling_defaults(**sampling)


class SglFunction:
    """A program: ``def f(s, *args)`` decorated with ``@function``."""

    def __init__(
        self,
        func: Callable[..., Any],
        num_api_spec_tokens: int | None = None,
        bind_arguments: dict[str, Any] | None = None,
    ) -> None:
        self.func = func
        self.num_api_spec_tokens = num_api_spec_tokens
        self.bind_arguments = bind_arguments or {}
        spec = inspect.getfullargspec(func)
        if not spec.args or spec.args[0] != "s":
            raise TypeError(f'the first argument of {func.__name__} must be "s"')
        self.arg_names = spec.args[1:]
        self.arg_defaults = spec.defaults or ()
        self.__name__ = func.__name__
        self.__doc__ = func.__doc__

    def bind(self, **kwargs: Any) -> SglFunction:
        unknown = set(kwargs) - set(self.arg_names)
        if unknown:
            raise TypeError(f"{self.__name__} has no arguments {sorted(unknown)}")
        return SglFunction(self.func, self.num_api_spec_tokens, {**self.bind_arguments, **kwargs})

    # ---- running -------------------------------------------------------------------------

    def _new_state(
        self,
        backend: BaseBackend,
        kwargs: dict[str, Any],
        defaults: SglSamplingParams,
        stream: bool,
    ) -> ProgramState:
        exe = StreamExecutor(
            backend, kwargs, defaults, stream=stream, num_api_spec_tokens=self.num_api_spec_tokens
        )
        return ProgramState(exe)

    def _body(self, state: ProgramState, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
        exe = state.stream_executor
        try:
            state.ret_value = self.func(state, *args, **{**kwargs, **self.bind_arguments})
        except Exception as exc:
            exe.submit(SglRaise(exc))  # the state reports it; queued work before it still runs
            raise
        finally:
            exe.end()

    def run(
        self,
        *args: Any,
        stream: bool = False,
        backend: Any = None,
        use_thread: bool = True,
        **kwargs: Any,
    ) -> ProgramState:
        """Run the program; returns its state at once (reading a value waits for it).

        Sampling defaults (``max_new_tokens``, ``temperature``, ``stop`` ...) may be passed
        as keywords. ``stream=True`` runs the body in the background so that ``text_iter()``
        can be consumed while it runs.
        """
        kwargs, defaults = _split_sampling(kwargs)
        state = self._new_state(resolve_backend(backend), kwargs, defaults, stream)
        if stream:
            _STREAM_BODIES.submit(self._body, state, args, kwargs)
        else:
            self._body(state, args, kwargs)
        return state

    async def run_async(self, *args: Any, backend: Any = None, **kwargs: Any) -> ProgramState:
        """Run the program from a coroutine; returns the state once it has finished."""
        kwargs, defaults = _split_sampling(kwargs)
        state = self._new_state(resolve_backend(backend), kwargs, defaults, False)
        await asyncio.to_thread(self._body, state, args, kwargs)
        return await state.wait()

    def _batch_kwargs(self, batch: Sequence[Any]) -> list[dict[str, Any]]:
        if not isinstance(batch, (list, tuple)):
            raise TypeError("run_batch takes a list of argument dicts or argument lists")
        out = []
        required = len(self.arg_names) - len(self.arg_defaults)
        for item in batch:
            if isinstance(item, dict):
                out.append(dict(item))
            elif isinstance(item, (list, tuple)) and required <= len(item) <= len(self.arg_names):
                out.append(dict(zip(self.arg_names, item)))
            else:
                raise TypeError(
                    f"batch item {item!r} does not match the signature of {self.__name__}"
                )
        return out

    def run_batch(
        self,
        batch_kwargs: Sequence[Any],
        *,
        backend: Any = None,
        num_threads: str | int = "auto",
        progress_bar: bool = False,
        generator_style: bool = False,
        **sampling: Any,
    ) -> list[ProgramState] | Iterator[ProgramState]:
        """Run the program once per item; states are returned in input order.

        Program bodies run on up to ``num_threads`` threads; their generations all go to the
        runtime loop, so the backend sees them together. ``progress_bar`` counts finished
        programs; ``generator_style=True`` yields states as they finish, in order.
        """
        items = self._batch_kwargs(batch_kwargs)
        unknown = set(sampling) - set(_SAMPLING_NAMES)
        if unknown:
            raise TypeError(f"run_batch got unknown arguments {sorted(unknown)}")
        defaults = sampling_defaults(**sampling)
        resolved = resolve_backend(backend)
        if global_config.enable_precache_with_tracing and len(items) > 1:
            self.cache(resolved)
        if num_threads == "auto":
            num_threads = max(64, (os.cpu_count() or 1) * 16)
        workers = max(1, min(int(num_threads), len(items) or 1))
        states = self._start_batch(items, resolved, defaults, workers)
        finished = _finish_in_order(states, progress_bar)
        return finished if generator_style else list(finished)

    def _start_batch(
        self,
        items: list[dict[str, Any]],
        backend: BaseBackend,
        defaults: SglSamplingParams,
        workers: int,
    ) -> list[Future[ProgramState]]:
        pool = ThreadPoolExecutor(workers, thread_name_prefix="sgl-dsl-batch")

        def one(kwargs: dict[str, Any]) -> ProgramState:
            state = self._new_state(backend, kwargs, defaults.clone(), False)
            self._body(state, (), kwargs)
            return state

        futures = [pool.submit(one, kw) for kw in items]
        pool.shutdown(wait=False)
        return futures

    # ---- tracing and compiling ------------------------------------------------------------

    def trace(self, *, backend: Any = None, **kwargs: Any) -> TracedProgram:
        """Run the program on symbolic arguments (those not given) into a request graph."""
        from sgl_dsl.tracer import trace_program

        return trace_program(self, kwargs, backend)

    def cache(self, backend: Any = None) -> None:
        """Prefill the program's constant prefix (found by tracing) into the backend's cache."""
        from sgl_dsl.tracer import constant_prefix

        resolved = resolve_backend(backend)
        prefix = constant_prefix(self, resolved)
        if prefix and len(prefix) >= global_config.min_precache_chars:
            spawn(resolved.cache_prefix(prefix)).result()

    def compile(self, *, backend: Any = None) -> CompiledFunction:
        """Trace the program once and return a graph that runs whole batches."""
        from sgl_dsl.compiler import CompiledFunction

        return CompiledFunction(self, self.trace(backend=backend))

    def __call__(self, *args: Any, **kwargs: Any) -> ProgramState:
        return self.run(*args, **kwargs)


def _finish_in_order(
    items: Sequence[Future[ProgramState] | ProgramState], progress_bar: bool
) -> Iterator[ProgramState]:
    """Yield each state once it has finished, in order, counting them on a progress bar."""
    bar = tqdm.tqdm(total=len(items)) if progress_bar else None
    try:
        for item in items:
            state = item.result() if isinstance(item, Future) else item
            state.sync()
            if bar is not None:
                bar.update()
            yield state
    finally:
        if bar is not None:
            bar.close()
