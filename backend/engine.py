"""The in-process engine API: ``Engine.generate`` / ``stream`` / ``abort`` / ``flush_cache``.

Any number of threads may call the engine at once. Calls validate and tokenize on the
caller's thread, then hand requests to the engine thread, which owns the scheduler, the
KV pool and the radix cache; results come back through per-request queues.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import queue
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import numpy as np
import torch

from backend.attention.base import create_attention_backend
from backend.config import EngineConfig
from backend.constrained import Constraints
from backend.kv_pool import KVPool, ReqToTokenTable, kv_cache_dtype, kv_pool_capacity
from backend.model_loader import load_model, load_tokenizer, resolve_model_dir
from backend.model_runner import ModelRunner
from backend.native_decoder import NativeDecoder, unsupported_reason
from backend.output_processor import OutputProcessor
from backend.radix_cache import RadixCache
from backend.request import Req, ReqUpdate
from backend.sampling_params import SamplingParams
from backend.scheduler import Scheduler
from fsm.terms import big_stack

logger = logging.getLogger(__name__)
T = TypeVar("T")
_LIVE_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()


@atexit.register
def _shutdown_live_engines() -> None:
    """Stop engines still running at interpreter exit (their threads must not outlive it)."""
    for engine in list(_LIVE_ENGINES):
        engine.shutdown()


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class RequestHandle:
    """The caller's side of one request: iterate for updates, or wait for the result."""

    def __init__(self, engine: Engine, req: Req, return_text_in_logprobs: bool) -> None:
        self.rid = req.rid
        self._engine = engine
        self._req = req
        self._updates: queue.SimpleQueue[ReqUpdate] = queue.SimpleQueue()
        self._text_in_logprobs = return_text_in_logprobs
        self._created = time.monotonic()
        self._finished_at: float | None = None
        self.text = ""
        self.output_ids: list[int] = []
        self._logprobs: list[float] = []
        self._top: list[Any] = []
        self.finished = False
        self._final: ReqUpdate | None = None
        self._listener: Callable[[], None] | None = None

    def _push(self, update: ReqUpdate) -> None:  # called on the engine thread
        if update.final:
            self._finished_at = time.monotonic()
        self._updates.put(update)
        listener = self._listener
        if listener is not None:
            listener()

    def set_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after every update (on the engine thread: it must not block);
        called once right away so that updates that arrived earlier are not missed."""
        self._listener = listener
        listener()

    def poll(self) -> str:
        """Apply every update that has arrived, without blocking; returns the new text."""
        pieces = []
        while not self.finished:
            try:
                pieces.append(self._apply(self._updates.get_nowait()))
            except queue.Empty:
                break
        return "".join(pieces)

    def _apply(self, update: ReqUpdate) -> str:
        self.text += update.text_delta
        self.output_ids += update.token_ids
        self._logprobs += update.token_logprobs
        self._top += update.top_logprobs
        if update.final:
            self.finished, self._final = True, update
        return update.text_delta

    def deltas(self) -> Iterator[str]:
        """Yield each new piece of text until the request finishes."""
        while not self.finished:
            delta = self._apply(self._updates.get())
            if delta or self.finished:
                yield delta

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """Block until the request finishes; SGLang's response dict."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            left = None if deadline is None else max(deadline - time.monotonic(), 0)
            try:
                self._apply(self._updates.get(timeout=left))
            except queue.Empty:
                raise TimeoutError(f"request {self.rid} did not finish in {timeout} s") from None
        return self.response()

    def response(self) -> dict[str, Any]:
        """The response so far (final once ``finished``)."""
        meta: dict[str, Any] = {
            "id": self.rid,
            "finish_reason": self._final.finish_reason if self._final else None,
            "prompt_tokens": len(self._req.input_ids),
            "completion_tokens": len(self.output_ids),
            "cached_tokens": self._final.meta["cached_tokens"]
            if self._final and self._final.meta
            else 0,
            "e2e_latency": (self._finished_at or time.monotonic()) - self._created,
        }
        if self._req.return_logprob:
            fmt = self._engine._logprob_triples
            meta["output_token_logprobs"] = fmt(
                self._logprobs, self.output_ids, self._text_in_logprobs
            )
            meta["output_top_logprobs"] = [
                fmt(*zip(*t), self._text_in_logprobs) if t else [] for t in self._top
            ]
            final_meta = self._final.meta if self._final and self._final.meta else {}
            in_lp = final_meta.get("input_token_logprobs", [])
            start = max(self._req.logprob_start_len, 0)
            meta["input_token_logprobs"] = fmt(
                in_lp, self._req.input_ids[start : start + len(in_lp)], self._text_in_logprobs
            )
            meta["input_top_logprobs"] = [
                fmt(*zip(*t), self._text_in_logprobs) if t else None
                for t in final_meta.get("input_top_logprobs", [])
            ]
        return {"text": self.text, "output_ids": list(self.output_ids), "meta_info": meta}


def _as_lists(input_ids: Any) -> Any:
    """A numpy array or tensor of ids (one prompt or a 2-D batch) as nested lists."""
    return input_ids.tolist() if hasattr(input_ids, "tolist") else input_ids


def _is_token_id(value: Any) -> bool:
    """Whether ``value`` is one token id (so ``input_ids`` holding it is one prompt)."""
    return isinstance(value, (int, np.integer))


class Engine:
    """A local inference engine. ``Engine()`` serves the embedded SmolLM2-135M-Instruct.

    Options are the fields of :class:`backend.config.EngineConfig`.
    """

    def __init__(self, model: str | None = None, **options: Any) -> None:
        self.config = config = EngineConfig.from_kwargs(model=model, **options)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        device = torch.device(config.device)
        dtype = _DTYPES.get(config.dtype) or (
            torch.bfloat16 if device.type == "cuda" else torch.float32
        )
        kv_dtype = kv_cache_dtype(config.kv_cache_dtype, dtype, device)
        self.model_dir = resolve_model_dir(model, require_weights=config.load_format != "dummy")
        self.tokenizer = load_tokenizer(self.model_dir)
        self.model = load_model(
            self.model_dir,
            dtype=dtype,
            device=device,
            load_format=config.load_format,
            quantization=config.quantization,
        )
        if device.type == "cuda" or dtype == torch.float32:  # fewer GEMMs; native decode
            self.model.fuse_projections()
        self.context_len = min(
            config.context_length or self.model.max_context_len, self.model.max_context_len
        )
        self.eos_token_ids = self._eos_ids()

        num_slots = config.max_total_tokens or kv_pool_capacity(
            self.model, kv_dtype, device, config
        )
        self.config = config = dataclasses.replace(config, max_total_tokens=num_slots)
        self.pool = KVPool(
            num_slots,
            self.model.num_layers,
            self.model.num_kv_heads,
            self.model.head_dim,
            kv_dtype,
            device,
        )
        # The request table is host bookkeeping; a pass carries the slots it needs.
        table = ReqToTokenTable(config.max_running_requests, self.context_len, "cpu")
        self.cache = RadixCache(self.pool.free, disable=config.disable_radix_cache)
        attn_backend = create_attention_backend(self.pool)
        runner = ModelRunner(
            self.model,
            table,
            attn_backend,
            self.pool,
            cuda_graph_sizes=self._cuda_graph_sizes(attn_backend),
            native_decoder=self._native_decoder(),
            prefill_graph_sizes=self._prefill_graph_sizes(attn_backend),
        )
        self._outputs = OutputProcessor(
            self.tokenizer,
            self.eos_token_ids,
            self.model.vocab_size,
            self.context_len,
            device,
        )
        self.constraints = Constraints(
            self.tokenizer,
            self.eos_token_ids,
            whitespace_pattern=config.constrained_json_whitespace_pattern,
            extra_properties=config.constrained_json_extra_properties,
            timeout_s=config.constraint_compile_timeout,
            cache_size=config.constraint_cache_size,
        )
        self.scheduler = Scheduler(
            config,
            runner,
            self.pool,
            table,
            self.cache,
            self._outputs,
            self.context_len,
            self.constraints,
        )

        self._inbox: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="sgl-dsl-engine", daemon=True)
        self._closed = False
        _LIVE_ENGINES.add(self)
        with big_stack():  # constrained decoding walks deep terms on this thread
            self._thread.start()
        logger.info(
            "engine ready: %s, %d KV slots (%.0f MiB), context %d",
            self.model_dir.name,
            config.max_total_tokens,
            config.max_total_tokens * self.pool.bytes_per_slot() / 2**20,
            self.context_len,
        )

    # ---- public API -------------------------------------------------------------------

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict[str, Any] | SamplingParams | list[Any] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool | list[bool] = False,
        logprob_start_len: int | list[int] | None = None,
        top_logprobs_num: int | list[int] | None = None,
        return_text_in_logprobs: bool = True,
        rid: str | list[str] | None = None,
        stream: bool = False,
    ) -> dict[str, Any] | list[dict[str, Any]] | Iterator[dict[str, Any]]:
        """Generate for one prompt (returns a dict) or a batch (returns a list of dicts).

        ``stream=True`` returns an iterator of cumulative responses for a single prompt.
        A prompt whose sampling params have ``n > 1`` yields ``n`` samples (a list).
        """
        if stream:
            self._check_single_stream(prompt, input_ids, sampling_params)
        handles, single = self._submit(
            prompt,
            sampling_params,
            input_ids,
            return_logprob,
            logprob_start_len,
            top_logprobs_num,
            return_text_in_logprobs,
            rid,
            stream,
        )
        if stream:
            return self._stream_cumulative(handles[0])
        results = [h.result() for h in handles]
        return results[0] if single else results

    def stream(
        self,
        prompt: str | None = None,
        sampling_params: Any = None,
        *,
        incremental: bool = False,
        **kwargs: Any,
    ) -> Iterator[dict[str, Any]]:
        """Stream one request: each item is the response so far (``incremental=True``: the
        ``text`` field holds only the new piece)."""
        self._check_single_stream(prompt, kwargs.get("input_ids"), sampling_params)
        handles, _ = self._submit(prompt, sampling_params, stream=True, **kwargs)
        if not incremental:
            return self._stream_cumulative(handles[0])
        return self._stream_incremental(handles[0])

    def submit(
        self, prompt: str | None = None, sampling_params: Any = None, **kwargs: Any
    ) -> list[RequestHandle]:
        """Queue requests without waiting; returns their handles."""
        return self._submit(prompt, sampling_params, **kwargs)[0]

    def abort(self, rid: str) -> None:
        """Abort a request by id (no effect if it already finished)."""
        self._inbox.put(lambda: self.scheduler.abort(rid))

    def flush_cache(self) -> bool:
        """Drop every cached prefix. Returns False (and does nothing) while requests run."""

        def flush() -> bool:
            if self.scheduler.has_work():
                return False
            self.cache.reset()  # the counters stay monotonic (Prometheus counters)
            return True

        return self._call(flush)

    def get_stats(self) -> dict[str, Any]:
        def stats() -> dict[str, Any]:
            s = self._outputs.stats
            acc = self.scheduler.kv_accounting()
            return {
                "requests": s.requests,
                "prompt_tokens": s.prompt_tokens,
                "cached_tokens": s.cached_tokens,
                "generated_tokens": s.generated_tokens,
                "cache_hit_rate": s.cache_hit_rate,
                "kv_slots": acc,
                "kv_slots_used": acc["total"] - acc["free"],
                "running": len(self.scheduler.running),
                "waiting": len(self.scheduler.waiting),
                "retractions": self.scheduler.num_retractions,
                "forward_steps": dict(self.scheduler.forward_steps),
                "jump_forward_tokens": self.scheduler.jump_forward_tokens,
            }

        return self._call(stats)

    def check_kv_invariant(self) -> dict[str, int]:
        """Assert free + evictable + protected + request-owned == total (raises AssertionError)."""
        return self._call(self.scheduler.check_invariant)

    def wait_idle(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self._call(self.scheduler.has_work):
            if time.monotonic() > deadline:
                raise TimeoutError("engine still busy")
            time.sleep(0.005)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            self._inbox.put(None)
            self._thread.join(timeout=30)
            self.constraints.shutdown()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- request construction -------------------------------------------------------------

    def _submit(
        self,
        prompt: Any = None,
        sampling_params: Any = None,
        input_ids: Any = None,
        return_logprob: Any = False,
        logprob_start_len: Any = None,
        top_logprobs_num: Any = None,
        return_text_in_logprobs: bool = True,
        rid: Any = None,
        stream: bool = False,
    ) -> tuple[list[RequestHandle], bool]:
        if self._closed:
            raise RuntimeError("the engine has been shut down")
        if (prompt is None) == (input_ids is None):
            raise ValueError("pass exactly one of prompt and input_ids")
        if prompt is not None:
            single = isinstance(prompt, str)
            prompts = [prompt] if single else list(prompt)
            if not all(isinstance(p, str) for p in prompts):
                raise TypeError("prompt must be a string or a list of strings")
            token_lists = [self.tokenizer.encode(p) for p in prompts]
        else:
            input_ids = _as_lists(input_ids)
            single = not input_ids or _is_token_id(input_ids[0])
            token_lists = [list(input_ids)] if single else [list(x) for x in input_ids]
        n = len(token_lists)

        def per_item(value: Any, name: str) -> list[Any]:
            if isinstance(value, list):
                if len(value) != n:
                    raise ValueError(f"{name} has {len(value)} entries for {n} prompts")
                return value
            return [value] * n

        if isinstance(sampling_params, list):
            params = [self._params(p) for p in per_item(sampling_params, "sampling_params")]
        else:  # one validated object for every prompt (~30 us per build from a dict)
            params = [self._params(sampling_params)] * n
        logprob_flags = per_item(return_logprob, "return_logprob")
        starts = per_item(logprob_start_len, "logprob_start_len")
        tops = per_item(top_logprobs_num, "top_logprobs_num")
        rids = per_item(rid, "rid") if rid is not None else [None] * n
        reqs: list[Req] = []
        for i, ids in enumerate(token_lists):
            ids = self._checked_ids(ids)
            copies = params[i].n
            if copies > 1:
                single = False
            for c in range(copies):
                p = params[i]
                if copies > 1:
                    p = SamplingParams.from_dict(
                        {**p.to_dict(), "n": 1, "seed": None if p.seed is None else p.seed + c}
                    )
                req_id = rids[i] or uuid.uuid4().hex
                if copies > 1:
                    req_id = f"{req_id}-{c}"
                reqs.append(
                    Req(
                        rid=req_id,
                        input_ids=ids,
                        params=p,
                        sink=lambda u: None,
                        stream=stream,
                        return_logprob=bool(logprob_flags[i]),
                        logprob_start_len=-1 if starts[i] is None else int(starts[i]),
                        top_logprobs_num=int(tops[i] or 0),
                    )
                )
        handles = []
        for req in reqs:
            handle = RequestHandle(self, req, return_text_in_logprobs)
            req.sink = handle._push
            handles.append(handle)
        self._inbox.put(lambda: [self.scheduler.add(r) for r in reqs])
        return handles, single

    @staticmethod
    def _check_single_stream(prompt: Any, input_ids: Any, sampling_params: Any) -> None:
        """A stream is one request: refuse batches and n > 1 before anything is queued."""
        input_ids = _as_lists(input_ids)
        batched = isinstance(prompt, list) or bool(input_ids and not _is_token_id(input_ids[0]))
        n = getattr(sampling_params, "n", None)
        if isinstance(sampling_params, dict):
            n = sampling_params.get("n", 1)
        if batched or isinstance(sampling_params, list) or n not in (None, 1):
            raise ValueError("streaming takes a single prompt with n=1")

    def _params(self, value: Any) -> SamplingParams:
        if isinstance(value, SamplingParams):
            value.validate()
            return value
        if value is None or isinstance(value, dict):
            return SamplingParams.from_dict(value)
        raise TypeError(
            f"sampling_params must be a dict or SamplingParams, got {type(value).__name__}"
        )

    def _checked_ids(self, ids: list[Any]) -> list[int]:
        """``ids`` as Python ints, once they are checked to be token ids (in one numpy pass:
        a Python loop took ~1 us per token, 0.1-0.2 ms per 1,000-token prompt) that fit the
        context and the pool."""
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.model.vocab_size
        try:
            array = np.asarray(ids)
        except (ValueError, TypeError, OverflowError):  # ragged or unconvertible items
            array = None
        if (
            array is None
            or array.ndim != 1
            or array.dtype.kind not in "iu"
            or array.min() < 0
            or array.max() >= vocab
        ):
            raise ValueError(f"input_ids must be integers in [0, {vocab})")
        if len(ids) >= self.context_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; the context length is {self.context_len}"
            )
        pool_size = self.config.max_total_tokens
        if len(ids) >= pool_size:
            raise ValueError(f"the prompt has {len(ids)} tokens; the KV pool holds {pool_size}")
        return array.tolist()

    def _native_decoder(self) -> NativeDecoder | None:
        """One native call per decode step for the CPU models it supports."""
        if self.pool.device.type != "cpu":
            return None
        reason = unsupported_reason(self.model, self.pool)
        if reason is not None:
            logger.info("Decode steps run op by op: %s", reason)
            return None
        return NativeDecoder(self.model, self.pool)

    def _cuda_graph_sizes(self, attn_backend: object) -> list[int]:
        """Decode batch sizes to capture: none off CUDA, without Triton or when disabled."""
        if self.pool.device.type != "cuda" or self.config.disable_cuda_graph:
            return []
        if type(attn_backend).__name__ != "TritonAttentionBackend":
            return []
        from backend.cuda_graph_runner import capture_sizes

        return capture_sizes(min(self.config.cuda_graph_max_bs, self.config.max_running_requests))

    def _prefill_graph_sizes(self, attn_backend: object) -> list[int]:
        """Prefill token counts to capture (same conditions as `_cuda_graph_sizes`)."""
        config = self.config
        max_tokens = min(config.cuda_graph_max_prefill_tokens, config.chunked_prefill_size)
        if not self._cuda_graph_sizes(attn_backend) or max_tokens <= 0:
            return []
        from backend.prefill_graph_runner import prefill_capture_sizes

        return prefill_capture_sizes(max_tokens)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        gen_cfg = getattr(self.model, "generation_eos_token_ids", None)
        for value in (self.tokenizer.eos_token_id, gen_cfg):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple, set)):
                ids.update(int(v) for v in value)
        return ids

    def _logprob_triples(
        self, logprobs: Sequence[Any], ids: Sequence[int], with_text: bool
    ) -> list[tuple]:
        texts = [self.tokenizer.decode([i]) for i in ids] if with_text else [None] * len(ids)
        return list(zip(logprobs, ids, texts))

    # ---- engine thread ------------------------------------------------------------------

    def _stream_cumulative(self, handle: RequestHandle) -> Iterator[dict[str, Any]]:
        for _ in handle.deltas():
            yield handle.response()

    def _stream_incremental(self, handle: RequestHandle) -> Iterator[dict[str, Any]]:
        for delta in handle.deltas():
            out = handle.response()
            out["text"] = delta
            yield out

    def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the engine thread between steps and return its result."""
        if threading.current_thread() is self._thread:
            return fn()
        future: Future[T] = Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:  # delivered to the caller
                future.set_exception(exc)

        self._inbox.put(run)
        return future.result()

    def _loop(self) -> None:
        if self.config.num_threads:  # OpenMP thread counts are per calling thread
            torch.set_num_threads(self.config.num_threads)
        while True:
            block = not self.scheduler.has_work()
            try:
                while True:
                    fn = self._inbox.get(block=block)
                    if fn is None:  # shutdown: nobody may wait on a request forever
                        self._fail_all("the engine was shut down")
                        return
                    try:
                        fn()
                    except Exception as exc:  # a queued operation (add, abort) failed
                        self._recover("engine operation failed", exc)
                    block = False
            except queue.Empty:
                pass
            if self.scheduler.has_work():
                try:
                    self.scheduler.step()
                except Exception as exc:
                    self._recover("engine step failed", exc)

    def _recover(self, what: str, exc: Exception) -> None:
        """Keep serving after a failure on the engine thread: fail the requests in flight and
        drop every cached prefix (a failed pass may have left KV half-written in slots the
        requests handed to the cache; a failed operation may have left a request half
        removed), so that nothing waits forever and no slot stays held."""
        logger.exception(what)
        self._fail_all(f"internal error: {exc}")
        try:
            self.cache.reset()
        except RuntimeError:
            logger.exception("could not drop the cached prefixes")

    def _fail_all(self, message: str) -> None:
        sched = self.scheduler
        for req in sched.requests():
            try:
                sched.abort(req.rid, message)
            except Exception:
                logger.exception("could not abort %s cleanly", req.rid)
