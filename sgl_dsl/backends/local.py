"""The in-process engine (``backend.engine.Engine``) as a program backend.

Contract: every request is submitted to the engine without blocking and awaited on the runtime
loop through the request handle's listener, so any number of program states share one thread.
Prompts are the state's text; the engine's radix cache shares prefixes between states.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from sgl_dsl.backends.base import BaseBackend
from sgl_dsl.chat_template import chat_template_from_tokenizer, get_chat_template_by_model_path
from sgl_dsl.choices import ChoicesDecision, ChoicesSamplingMethod, mean_logprob

if TYPE_CHECKING:
    from backend.engine import Engine, RequestHandle
    from sgl_dsl.interpreter import StreamExecutor
    from sgl_dsl.ir import SglSamplingParams

logger = logging.getLogger(__name__)
_EMBEDDED_NAME = "SmolLM2-135M-Instruct"


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


async def _updates(handle: RequestHandle) -> AsyncIterator[str]:
    """Yield each piece of new text as the engine produces it, until the request finishes."""
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    handle.set_listener(lambda: loop.call_soon_threadsafe(wake.set))
    while True:
        piece = handle.poll()
        if piece:
            yield piece
        if handle.finished:
            return
        await wake.wait()
        wake.clear()


async def _result(handle: RequestHandle) -> dict[str, Any]:
    async for _ in _updates(handle):
        pass
    return _checked(handle.response())


def _checked(response: dict[str, Any]) -> dict[str, Any]:
    reason = response["meta_info"].get("finish_reason") or {}
    if reason.get("type") == "abort":
        raise ValueError(f"the request was aborted: {reason.get('message', 'no reason given')}")
    return response


class LocalBackend(BaseBackend):
    """Programs on the in-process engine; ``set_default_backend(Engine())`` wraps one."""

    support_concate_and_append = False

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self.engine = engine
        try:
            self.chat_template = chat_template_from_tokenizer(engine.tokenizer)
        except ValueError as e:  # e.g. templates that trim message contents (Llama 3)
            self.chat_template = get_chat_template_by_model_path(self.get_model_name())
            logger.warning("%s; using the named template %r", e, self.chat_template.name)

    def get_model_name(self) -> str:
        return self.engine.config.model or _EMBEDDED_NAME

    def _submit(
        self, s: StreamExecutor, params: SglSamplingParams, stream: bool = False
    ) -> list[RequestHandle]:
        request = params.request_kwargs()
        if params.return_text_in_logprobs is not None:
            request["return_text_in_logprobs"] = params.return_text_in_logprobs
        return self.engine.submit(s.text_, params.to_srt_kwargs(), stream=stream, **request)

    async def generate(
        self, s: StreamExecutor, sampling_params: SglSamplingParams
    ) -> tuple[str | list[str], dict[str, Any] | list[dict[str, Any]]]:
        handles = self._submit(s, sampling_params)
        results = await asyncio.gather(*(_result(h) for h in handles))
        if (sampling_params.n or 1) == 1:
            return results[0]["text"], results[0]["meta_info"]
        return [r["text"] for r in results], [r["meta_info"] for r in results]

    async def generate_stream(
        self, s: StreamExecutor, sampling_params: SglSamplingParams
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        (handle,) = self._submit(s, sampling_params, stream=True)
        async for piece in _updates(handle):
            yield piece, handle.response()["meta_info"]
        _checked(handle.response())

    async def select(
        self,
        s: StreamExecutor,
        choices: list[str],
        temperature: float,
        choices_method: ChoicesSamplingMethod,
    ) -> ChoicesDecision:
        if temperature > 1e-5:
            raise ValueError("select picks deterministically: its temperature must be 0")
        encode = self.engine.tokenizer.encode
        prefix = encode(s.text_)
        full = [encode(s.text_ + c) for c in choices]
        # Score each choice's tokens from where its tokenization leaves the prompt's (a merge
        # across the boundary re-scores the merged token); position 0 has no context.
        starts = [max(_common_prefix(prefix, ids), 1) for ids in full]
        scored = await self._input_logprobs(full, starts)
        normalized = [mean_logprob(t) for t in scored]
        unconditional = None
        if choices_method.requires_unconditional_logprobs:
            unconditional = await self._unconditional([ids[st:] for ids, st in zip(full, starts)])
        return choices_method(
            choices=choices,
            normalized_prompt_logprobs=normalized,
            input_token_logprobs=scored,
            output_token_logprobs=[[] for _ in choices],
            unconditional_token_logprobs=unconditional,
        )

    async def _input_logprobs(self, ids: list[list[int]], starts: list[int]) -> list[list[Any]]:
        """Input-token logprobs from ``starts[i]`` on, for all prompts in one batched request."""
        wanted = [i for i, (x, st) in enumerate(zip(ids, starts)) if st < len(x)]
        out: list[list[Any]] = [[] for _ in ids]
        if not wanted:
            return out
        handles = self.engine.submit(
            input_ids=[ids[i] for i in wanted],
            sampling_params={"max_new_tokens": 0},
            return_logprob=True,
            logprob_start_len=[starts[i] for i in wanted],
        )
        results = await asyncio.gather(*(_result(h) for h in handles))
        for i, r in zip(wanted, results):
            out[i] = [list(t) for t in r["meta_info"]["input_token_logprobs"]]
        return out

    async def _unconditional(self, token_lists: list[list[int]]) -> list[list[Any]]:
        """Logprobs of each choice's tokens without the prompt: after the BOS token where the
        tokenizer has one, else the first token counts as log 1 = 0.0."""
        bos = self.engine.tokenizer.bos_token_id
        prompts = [([bos] if bos is not None else []) + t for t in token_lists]
        scored = await self._input_logprobs(prompts, [1] * len(prompts))
        if bos is None:
            for tokens, row in zip(token_lists, scored):
                if tokens:
                    row.insert(0, [0.0, tokens[0], None])
        return scored

    async def _prefill(self, text: str) -> None:
        if text:
            (handle,) = self.engine.submit(text, {"max_new_tokens": 0})
            await _result(handle)

    async def commit_lazy_operations(self, s: StreamExecutor) -> None:
        await self._prefill(s.text_)

    async def cache_prefix(self, prefix: str) -> None:
        await self._prefill(prefix)

    def flush_cache(self) -> bool:
        return self.engine.flush_cache()

    def get_server_info(self) -> dict[str, Any]:
        return {"model_path": self.get_model_name(), **self.engine.get_stats()}

    def shutdown(self) -> None:
        self.engine.shutdown()
