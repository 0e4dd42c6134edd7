"""``OpenAI``: programs on any OpenAI-compatible server (vLLM, SGLang, llama.cpp, TGI, OpenAI).

Contract:
- Chat models get the state's messages; a ``gen`` must directly follow ``assistant`` begin
  unless API speculative execution is on (``@function(num_api_spec_tokens=N)``): then the
  assistant turn's fills and gens are matched against one completion of N tokens made at the
  turn's end, as SGLang does it (per program state here, so it works under ``run_batch``).
- Completion models get the state's text.
- Constraints travel as the fields these servers accept: ``regex`` (and ``dtype``) as the
  ``regex`` extra field, ``json_schema`` as ``response_format`` for chat and as the
  ``json_schema`` extra field for completions. ``select`` is a regex-constrained greedy
  generation over the choices (the servers give no prompt log-probabilities).
- ``token_usage`` counts prompt and completion tokens over all requests.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sgl_dsl.backends.base import BaseBackend
from sgl_dsl.chat_template import ChatTemplate, get_chat_template_by_model_path
from sgl_dsl.choices import ChoicesDecision, ChoicesSamplingMethod

if TYPE_CHECKING:
    from sgl_dsl.interpreter import StreamExecutor
    from sgl_dsl.ir import SglSamplingParams

_INSTRUCT_MODELS = ("gpt-3.5-turbo-instruct",)
_SPEC_TRIES = 3


@dataclass
class TokenUsage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, usage: Any) -> None:
        if usage is not None:
            self.prompt_tokens += usage.prompt_tokens or 0
            self.completion_tokens += usage.completion_tokens or 0

    def reset(self) -> None:
        self.prompt_tokens = self.completion_tokens = 0


@dataclass
class _Speculation:
    """An assistant turn under API speculative execution: fills and gens in order."""

    terms: list[dict[str, Any]] = field(default_factory=list)  # {"text", "stop", "name", "gen"}
    kwargs: dict[str, Any] = field(default_factory=dict)

    def match(self, completion: str) -> list[tuple[str, str | None]] | None:
        """Split ``completion`` along the terms; None if a fill does not appear where due."""
        out: list[tuple[str, str | None]] = []
        rest = completion
        for i, term in enumerate(self.terms):
            if not term["gen"]:
                if not rest.startswith(term["text"]):
                    return None
                out.append((term["text"], None))
                rest = rest[len(term["text"]) :]
                continue
            stops = [s for s in term["stop"] if s in rest]
            cut = min((rest.index(s) for s in stops), default=-1)
            if cut < 0 and i < len(self.terms) - 1:
                return None
            value = rest if cut < 0 else rest[:cut]
            out.append((value, term["name"]))
            rest = rest[len(value) :]
        return out


class OpenAI(BaseBackend):
    def __init__(
        self,
        model_name: str,
        is_chat_model: bool | None = None,
        chat_template: ChatTemplate | None = None,
        is_azure: bool = False,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        try:
            import openai
        except ImportError as e:
            raise ImportError("the OpenAI backend needs `pip install sgl-dsl[openai]`") from e
        client_cls = openai.AsyncAzureOpenAI if is_azure else openai.AsyncOpenAI
        self.client = client_cls(*args, **kwargs)
        self.model_name = model_name
        self.chat_template = chat_template or get_chat_template_by_model_path(model_name)
        self.is_chat_model = (
            is_chat_model if is_chat_model is not None else model_name not in _INSTRUCT_MODELS
        )
        self.chat_prefix = self.chat_template.role_prefix_and_suffix["assistant"][0]
        self.token_usage = TokenUsage()
        self._speculations: dict[str, _Speculation] = {}

    def get_model_name(self) -> str:
        return self.model_name

    # ---- request construction --------------------------------------------------------------

    def _kwargs(self, params: SglSamplingParams, stream: bool = False) -> dict[str, Any]:
        kwargs = {k: v for k, v in params.to_openai_kwargs().items() if v is not None}
        extra: dict[str, Any] = {}
        if params.top_k not in (None, -1, 0):
            extra["top_k"] = params.top_k
        for name, default in (("min_p", 0.0), ("ignore_eos", False), ("min_new_tokens", 0)):
            value = getattr(params, name)
            if value not in (None, default):
                extra["min_tokens" if name == "min_new_tokens" else name] = value
        if params.stop_token_ids:
            extra["stop_token_ids"] = list(params.stop_token_ids)
        if params.regex is not None:
            extra["regex"] = params.regex
        if params.json_schema is not None:
            if self.is_chat_model:
                kwargs["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "output", "schema": json.loads(params.json_schema)},
                }
            else:
                extra["json_schema"] = params.json_schema
        if params.return_logprob:
            top = params.top_logprobs_num or 0
            if self.is_chat_model:
                kwargs.update(logprobs=True, top_logprobs=top)
            else:
                kwargs["logprobs"] = max(top, 1)
        if stream:
            kwargs.update(stream=True, stream_options={"include_usage": True})
        if extra:
            kwargs["extra_body"] = extra
        return kwargs

    def _prompt(self, s: StreamExecutor) -> dict[str, Any]:
        if not self.is_chat_model:
            return {"prompt": s.text_}
        if not s.text_.endswith(self.chat_prefix):
            raise RuntimeError(
                "for chat models a gen must come right after assistant begin; "
                "or turn on API speculative execution: @function(num_api_spec_tokens=128)"
            )
        return {"messages": s.messages_}

    async def _create(self, prompt: dict[str, Any], kwargs: dict[str, Any]) -> Any:
        api = self.client.chat.completions if "messages" in prompt else self.client.completions
        return await api.create(model=self.model_name, **prompt, **kwargs)

    # ---- generation ------------------------------------------------------------------------

    async def generate(
        self, s: StreamExecutor, sampling_params: SglSamplingParams
    ) -> tuple[str | list[str], dict[str, Any] | list[dict[str, Any]]]:
        response = await self._create(self._prompt(s), self._kwargs(sampling_params))
        self.token_usage.add(response.usage)
        texts, metas = [], []
        for choice in response.choices:
            text = choice.message.content if self.is_chat_model else choice.text
            texts.append(text or "")
            metas.append(self._meta(response, choice))
        if (sampling_params.n or 1) == 1:
            return texts[0], metas[0]
        return texts, metas

    def _meta(self, response: Any, choice: Any) -> dict[str, Any]:
        usage = response.usage
        meta: dict[str, Any] = {
            "id": response.id,
            "finish_reason": choice.finish_reason,
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else None,
        }
        logprobs = getattr(choice, "logprobs", None)
        if logprobs is not None:
            if self.is_chat_model:
                items = logprobs.content or []
                meta["output_token_logprobs"] = [(t.logprob, None, t.token) for t in items]
                meta["output_top_logprobs"] = [
                    [(x.logprob, None, x.token) for x in t.top_logprobs or []] for t in items
                ]
            else:
                meta["output_token_logprobs"] = [
                    (lp, None, tok) for lp, tok in zip(logprobs.token_logprobs, logprobs.tokens)
                ]
        return meta

    async def generate_stream(
        self, s: StreamExecutor, sampling_params: SglSamplingParams
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        stream = await self._create(self._prompt(s), self._kwargs(sampling_params, stream=True))
        meta: dict[str, Any] = {}
        async for chunk in stream:
            if chunk.usage is not None:
                self.token_usage.add(chunk.usage)
                meta.update(prompt_tokens=chunk.usage.prompt_tokens,
                            completion_tokens=chunk.usage.completion_tokens)  # fmt: skip
            for choice in chunk.choices:
                piece = choice.delta.content if self.is_chat_model else choice.text
                if choice.finish_reason:
                    meta["finish_reason"] = choice.finish_reason
                if piece:
                    yield piece, dict(meta)

    async def select(
        self,
        s: StreamExecutor,
        choices: list[str],
        temperature: float,
        choices_method: ChoicesSamplingMethod,
    ) -> ChoicesDecision:
        from sgl_dsl.ir import SglSamplingParams

        pattern = "(" + "|".join(re.escape(c) for c in choices) + ")"
        params = SglSamplingParams(
            max_new_tokens=max(len(c) for c in choices) + 8, temperature=0.0, regex=pattern
        )
        text, meta = await self.generate(s, params)
        assert isinstance(text, str)
        if text not in choices:
            raise RuntimeError(
                f"the server ignored the regex constraint of select (it returned {text!r}); "
                "select on this backend needs a server that accepts a `regex` field"
            )
        return ChoicesDecision(text, {"method": "regex-constrained greedy decoding", **meta})

    # ---- API speculative execution ---------------------------------------------------------

    def _speculation(self, s: StreamExecutor) -> _Speculation:
        return self._speculations.setdefault(s.sid, _Speculation())

    def spec_fill(self, s: StreamExecutor, value: str) -> None:
        self._speculation(s).terms.append({"text": value, "stop": None, "name": None, "gen": False})

    def spec_gen(self, s: StreamExecutor, params: SglSamplingParams, name: str | None) -> None:
        spec = self._speculation(s)
        kwargs = self._kwargs(params)
        kwargs.pop("stop", None)
        kwargs["max_tokens"] = s.num_api_spec_tokens
        spec.kwargs = {**kwargs, **spec.kwargs}
        stops = [params.stop] if isinstance(params.stop, str) else list(params.stop or [])
        spec.terms.append({"text": "", "stop": stops, "name": name, "gen": True})

    async def role_end_generate(self, s: StreamExecutor) -> list[tuple[str, str | None]]:
        spec = self._speculations.pop(s.sid, None)
        if spec is None:
            return []
        if not any(t["gen"] for t in spec.terms):
            return [(t["text"], None) for t in spec.terms]
        matched = None
        for _ in range(_SPEC_TRIES):
            response = await self._create({"messages": s.messages_}, spec.kwargs)
            self.token_usage.add(response.usage)
            matched = spec.match(response.choices[0].message.content or "")
            if matched is not None:
                break
        if matched is None:
            raise RuntimeError(
                f"API speculative execution: {_SPEC_TRIES} completions did not follow the "
                "assistant turn's fixed text; raise num_api_spec_tokens or simplify the turn"
            )
        return matched
