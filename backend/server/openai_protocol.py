"""OpenAI request bodies (``/v1/completions``, ``/v1/chat/completions``) -> engine calls.

Contract:
- :func:`parse_completion` / :func:`parse_chat` validate a body and return an
  :class:`OpenAIRequest` whose prompts still have to be tokenized (:func:`prepare`).
- Field names follow OpenAI; the vLLM/SGLang extensions ``regex``, ``json_schema``,
  ``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``, ``min_tokens``,
  ``stop_token_ids``, ``stop_regex``, ``skip_special_tokens``,
  ``spaces_between_special_tokens`` and ``no_stop_trim`` are accepted in the body (the
  ``openai`` package sends them through ``extra_body``). Unknown fields are a 400 naming
  them (as OpenAI does); OpenAI features this text-only server lacks (tools, logit_bias,
  images, audio, suffix, ...) are a 400 when set, and ignored when null/empty.
- ``model`` must be a string; any value is accepted and the served name is echoed back.
- Defaults: completions ``max_tokens`` 16 (OpenAI's); chat without ``max_tokens`` /
  ``max_completion_tokens`` may use the whole remaining context.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import Any

from backend.engine import Engine
from backend.sampling_params import SamplingParams
from backend.server.errors import bad_request
from backend.server.protocol import (
    MAX_N,
    EngineCall,
    expect_bool,
    expect_int,
    is_int,
    json_type,
    reject_unknown,
    token_id_lists,
)

MAX_TOP_LOGPROBS = 20

# OpenAI name -> SamplingParams name, for the fields passed through as they are.
_SAMPLING_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "n": "n",
    "seed": "seed",
    "stop": "stop",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "ignore_eos": "ignore_eos",
    "min_tokens": "min_new_tokens",
    "stop_token_ids": "stop_token_ids",
    "stop_regex": "stop_regex",
    "skip_special_tokens": "skip_special_tokens",
    "spaces_between_special_tokens": "spaces_between_special_tokens",
    "no_stop_trim": "no_stop_trim",
    "regex": "regex",
    "json_schema": "json_schema",
}
_COMMON = (
    "model",
    "max_tokens",
    "stream",
    "stream_options",
    "logprobs",
    "response_format",
    "user",
    "logit_bias",
    *_SAMPLING_FIELDS,
)
COMPLETION_FIELDS = (*_COMMON, "prompt", "echo", "suffix", "best_of")
CHAT_FIELDS = (
    *_COMMON,
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "add_generation_prompt",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "metadata",
    "store",
    "service_tier",
    "reasoning_effort",
    "modalities",
    "audio",
    "prediction",
    "web_search_options",
)
# Accepted only when null / empty / the default (what this server always does).
_REFUSED_IF_SET = {
    "logit_bias": "logit_bias is not supported",
    "suffix": "suffix (insertion) is not supported",
    "tools": "tools / function calling are not supported",
    "functions": "tools / function calling are not supported",
    "audio": "audio output is not supported (text-only model)",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_ROLES.update(tool="tool")


@dataclass
class OpenAIRequest:
    """A validated OpenAI request; ``call.token_lists`` is filled by :func:`prepare`."""

    chat: bool
    call: EngineCall
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None  # top-k per token, None when no logprobs were asked for
    max_tokens_name: str
    max_tokens_given: bool
    echo: bool = False
    texts: list[str] | None = None  # prompts to tokenize (None when given as token ids)
    messages: list[dict[str, str]] | None = None
    add_generation_prompt: bool = True
    prompt_texts: list[str] = field(default_factory=list)  # for echo

    @property
    def num_prompts(self) -> int:
        return len(self.call.token_lists)


def _check_refused(body: dict[str, Any]) -> None:
    for name, why in _REFUSED_IF_SET.items():
        if body.get(name) not in (None, [], {}, ""):
            raise bad_request(why, name, code="unsupported_parameter")
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        raise bad_request("best_of is not supported (other than best_of == n)", "best_of")
    choice = body.get("tool_choice") or body.get("function_call")
    if choice not in (None, "none"):
        raise bad_request("tools / function calling are not supported", "tool_choice")
    modalities = body.get("modalities")
    if modalities not in (None, ["text"]):
        raise bad_request("only the 'text' modality is supported", "modalities")


def _response_format(value: Any) -> Any:
    """The JSON schema ``response_format`` asks for (a dict), or None."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise bad_request(
            'response_format must be an object with a "type": text, json_object or json_schema',
            "response_format",
        )
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise bad_request(
                "response_format.json_schema must be an object with a 'schema'",
                "response_format.json_schema",
            )
        schema = spec.get("schema", spec.get("schema_"))
        if schema is None:
            return {"type": "object"}
        if not isinstance(schema, (dict, bool)):
            raise bad_request(
                f"response_format.json_schema.schema must be an object, got {json_type(schema)}",
                "response_format.json_schema.schema",
            )
        return schema
    raise bad_request(
        f"response_format.type must be text, json_object or json_schema, got {kind!r}",
        "response_format.type",
    )


def _sampling(body: dict[str, Any], max_tokens: int, max_name: str) -> SamplingParams:
    d: dict[str, Any] = {"max_new_tokens": max_tokens}
    for name, native in _SAMPLING_FIELDS.items():
        if body.get(name) is not None:
            d[native] = body[name]
    schema = _response_format(body.get("response_format"))
    if schema is not None:
        if d.get("regex") is not None or d.get("json_schema") is not None:
            raise bad_request(
                "give at most one of response_format (json), regex and json_schema",
                "response_format",
            )
        d["json_schema"] = schema
    try:
        return SamplingParams.from_dict(d)
    except (ValueError, TypeError) as exc:
        message = str(exc).replace("max_new_tokens", max_name)
        message = message.replace("min_new_tokens", "min_tokens")
        raise bad_request(message, _first_field(message, (*_SAMPLING_FIELDS, max_name))) from None


def _first_field(message: str, names: tuple[str, ...]) -> str | None:
    """The field name mentioned first in ``message`` (as a whole word), if any."""
    found = [(m.start(), n) for n in names if (m := re.search(rf"\b{n}\b", message))]
    return min(found)[1] if found else None


def _common(body: dict[str, Any], known: tuple[str, ...], where: str) -> tuple[bool, bool, int]:
    reject_unknown(body, known, where)
    _check_refused(body)
    model = body.get("model")
    if not isinstance(model, str):
        raise bad_request(f"model must be a string, got {json_type(model)}", "model")
    stream = expect_bool(body, "stream", False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad_request(
                "stream_options is only allowed when stream is true", "stream_options"
            )
        if not isinstance(options, dict):
            raise bad_request("stream_options must be an object", "stream_options")
        include_usage = expect_bool(options, "include_usage", False)
    n = expect_int(body, "n", 1, 1, MAX_N)
    assert n is not None
    return stream, include_usage, n


def parse_completion(body: dict[str, Any], engine: Engine) -> OpenAIRequest:
    """Validate a ``/v1/completions`` body."""
    stream, include_usage, n = _common(body, COMPLETION_FIELDS, "/v1/completions")
    prompt = body.get("prompt")
    texts: list[str] | None = None
    token_lists: list[list[int]]
    if isinstance(prompt, str):
        texts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        texts = list(prompt)
    elif isinstance(prompt, list) and prompt and (is_int(prompt[0]) or isinstance(prompt[0], list)):
        token_lists, _ = token_id_lists(prompt, "prompt")
    else:
        raise bad_request(
            "prompt must be a string, a list of strings, a list of token ids or a list of "
            "lists of token ids",
            "prompt",
        )
    if texts is not None:
        token_lists = [[] for _ in texts]
    vocab = engine.model.vocab_size
    for ids in token_lists:
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(f"prompt: token id {bad} is not in [0, {vocab})", "prompt")
    given = body.get("max_tokens") is not None
    max_tokens = expect_int(body, "max_tokens", 16, 0)
    assert max_tokens is not None
    logprobs = expect_int(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
    echo = expect_bool(body, "echo", False)
    if echo and stream and logprobs is not None:
        raise bad_request("echo with logprobs is not supported when streaming", "echo")
    params = _sampling(body, max_tokens, "max_tokens")
    count = len(token_lists)
    call = EngineCall(
        token_lists=token_lists,
        params=[params] * count,
        return_logprob=[logprobs is not None] * count,
        logprob_start_len=[0 if echo else None] * count,
        top_logprobs_num=[logprobs or 0] * count,
        stream=stream,
    )
    return OpenAIRequest(
        chat=False,
        call=call,
        n=n,
        stream=stream,
        include_usage=include_usage,
        logprobs=logprobs,
        max_tokens_name="max_tokens",
        max_tokens_given=given,
        echo=echo,
        texts=texts,
    )


def _message_text(content: Any, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(
            f"messages[{i}].content must be a string or a list of content parts",
            f"messages[{i}].content",
        )
    texts = []
    for j, part in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise bad_request(f'{where} must be an object with a "type"', where)
        kind = part["type"]
        if kind in ("text", "input_text", "refusal"):
            text = part.get("text", part.get("refusal"))
            if not isinstance(text, str):
                raise bad_request(f"{where}.text must be a string", where)
            texts.append(text)
        elif kind in ("image_url", "input_image", "image", "input_audio", "video_url", "file"):
            raise bad_request(
                f"{where}: content of type {kind!r} is not supported: the model is text-only",
                where,
                code="unsupported_content",
            )
        else:
            raise bad_request(f"{where}: unknown content part type {kind!r}", where)
    return "\n".join(texts)


def parse_messages(messages: Any) -> list[dict[str, str]]:
    """OpenAI messages -> ``[{"role", "content"}]`` with text content only."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list of message objects", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{i}] must be an object", f"messages[{i}]")
        role = message.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise bad_request(
                f"messages[{i}].role must be one of {', '.join(_ROLES)}, got {role!r}",
                f"messages[{i}].role",
            )
        if message.get("tool_calls"):
            raise bad_request("tool calls are not supported", f"messages[{i}].tool_calls")
        if message.get("content") is None and role != "assistant":
            raise bad_request(f"messages[{i}].content is missing", f"messages[{i}].content")
        out.append({"role": _ROLES[role], "content": _message_text(message.get("content"), i)})
    return out


def parse_chat(body: dict[str, Any], engine: Engine) -> OpenAIRequest:
    """Validate a ``/v1/chat/completions`` body."""
    stream, include_usage, n = _common(body, CHAT_FIELDS, "/v1/chat/completions")
    messages = parse_messages(body.get("messages"))
    name = (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )
    max_tokens = expect_int(body, name, None, 0)
    want_logprobs = body.get("logprobs")
    if want_logprobs is not None and not isinstance(want_logprobs, bool):
        raise bad_request(
            f"logprobs must be a boolean for chat completions, got {json_type(want_logprobs)}",
            "logprobs",
        )
    top = expect_int(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if top is not None and not want_logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
    logprobs = (top or 0) if want_logprobs else None
    # Without a max_tokens, the remaining context is filled in by prepare().
    params = _sampling(body, engine.context_len if max_tokens is None else max_tokens, name)
    call = EngineCall(
        token_lists=[[]],
        params=[params],
        return_logprob=[logprobs is not None],
        logprob_start_len=[None],
        top_logprobs_num=[logprobs or 0],
        stream=stream,
    )
    return OpenAIRequest(
        chat=True,
        call=call,
        n=n,
        stream=stream,
        include_usage=include_usage,
        logprobs=logprobs,
        max_tokens_name=name,
        max_tokens_given=max_tokens is not None,
        messages=messages,
        add_generation_prompt=expect_bool(body, "add_generation_prompt", True),
    )


async def prepare(req: OpenAIRequest, engine: Engine) -> None:
    """Render the chat template / tokenize (off the event loop), fill the default
    ``max_tokens`` of chat requests and check the context length."""

    def work() -> None:
        if req.messages is not None:
            try:
                text = engine.apply_chat_template(req.messages, req.add_generation_prompt)
            except Exception as exc:  # jinja errors, a model without a template
                raise bad_request(f"cannot apply the chat template: {exc}", "messages") from None
            ids = engine.tokenizer.encode(text, add_special_tokens=False)
            req.call.token_lists = [list(ids)]
        elif req.texts is not None:
            req.call.token_lists = [list(engine.tokenizer.encode(t)) for t in req.texts]
        if req.echo:
            if req.texts is not None:
                req.prompt_texts = list(req.texts)
            else:
                req.prompt_texts = [engine.tokenizer.decode(ids) for ids in req.call.token_lists]

    await asyncio.get_running_loop().run_in_executor(None, work)
    if req.chat and not req.max_tokens_given:
        room = engine.context_len - len(req.call.token_lists[0])
        if room > 0:
            params = req.call.params[0]
            params.max_new_tokens = room
            try:
                params.validate()
            except ValueError as exc:
                raise bad_request(str(exc).replace("min_new_tokens", "min_tokens")) from None
    req.call.check_context(engine, req.max_tokens_name)
