"""Request parsing and validation shared by the routes, and the native ``/generate`` body.

Contract:
- :func:`read_json_object` returns the request body as a dict or raises :class:`APIError`
  (400 malformed / not an object, 413 over the size limit).
- The ``expect_*`` helpers check one field's JSON type and raise a 400 naming the field.
- :class:`EngineCall` is a fully validated batch of prompts (token ids) with per-prompt
  :class:`SamplingParams`; :meth:`EngineCall.submit` hands it to the engine (never blocks).
  Every prompt is checked against the context length: ``len(prompt) < context_length`` and
  ``len(prompt) + max_new_tokens <= context_length`` (a 400 naming both otherwise).
- :func:`parse_generate` turns a native ``/generate`` body into a :class:`GenerateRequest`:
  unknown top-level fields and unknown sampling parameters are 400s naming them.
"""

from __future__ import annotations

import asyncio
import json
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from backend.engine import Engine, RequestHandle
from backend.sampling_params import SamplingParams
from backend.server.errors import APIError, bad_request
from backend.server.state import STATE

# ---------------------------------------------------------------------- body and field types


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object; 400 when empty, malformed or not an object; 413 when over
    the application's ``client_max_size``."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[STATE].max_request_bytes
        raise APIError(
            413, f"the request body is over the limit of {limit} bytes", code="body_too_large"
        ) from None
    if not raw.strip():
        raise bad_request("the request body is empty; send a JSON object")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise bad_request(f"malformed JSON in the request body: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {json_type(body)}")
    return body


def json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, numbers.Integral):
        return "an integer"
    if isinstance(value, numbers.Real):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def expect_bool(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be a boolean, got {json_type(value)}", name)
    return value


def expect_int(
    body: Mapping[str, Any],
    name: str,
    default: int | None,
    lo: int | None = None,
    hi: int | None = None,
) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not is_int(value):
        raise bad_request(f"{name} must be an integer, got {json_type(value)}", name)
    if lo is not None and value < lo:
        raise bad_request(f"{name} must be >= {lo}, got {value}", name)
    if hi is not None and value > hi:
        raise bad_request(f"{name} must be <= {hi}, got {value}", name)
    return value


def expect_str(body: Mapping[str, Any], name: str, default: str | None) -> str | None:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise bad_request(f"{name} must be a string, got {json_type(value)}", name)
    return value


def reject_unknown(body: Mapping[str, Any], known: Sequence[str], where: str) -> None:
    unknown = [k for k in body if k not in known]
    if unknown:
        names = ", ".join(repr(k) for k in unknown)
        raise bad_request(
            f"unknown field(s) {names} in {where}; valid fields: {', '.join(known)}",
            unknown[0],
        )


def sampling_params(value: Any, name: str = "sampling_params") -> SamplingParams:
    """A ``SamplingParams`` from a JSON object (or null); 400 naming a bad or unknown key."""
    if value is not None and not isinstance(value, dict):
        raise bad_request(f"{name} must be an object, got {json_type(value)}", name)
    try:
        return SamplingParams.from_dict(value)
    except (ValueError, TypeError) as exc:
        raise bad_request(f"{name}: {exc}", name) from None


# ---------------------------------------------------------------------- engine calls

MAX_N = 128  # samples per prompt
MAX_REQUESTS = 4096  # engine requests (prompts x n) per HTTP request
MAX_TOP_LOGPROBS = 100  # top_logprobs_num on the native route


@dataclass
class EngineCall:
    """Validated prompts and options, one entry per prompt (``n`` copies are the engine's)."""

    token_lists: list[list[int]]
    params: list[SamplingParams]
    return_logprob: list[bool]
    logprob_start_len: list[int | None]
    top_logprobs_num: list[int]
    return_text_in_logprobs: bool = True
    rids: list[str | None] | None = None
    stream: bool = False  # the engine sends an update per step (else only the final one)

    def check_context(self, engine: Engine, max_tokens_name: str = "max_new_tokens") -> None:
        """400 when a prompt is empty, over the context length, or leaves no room for
        ``max_new_tokens`` (named ``max_tokens_name`` in the message); when ``n`` is over
        :data:`MAX_N` or the call makes more than :data:`MAX_REQUESTS` engine requests."""
        for params in self.params:
            if params.n > MAX_N:
                raise bad_request(f"n must be <= {MAX_N}, got {params.n}", "n")
        total = sum(p.n for p in self.params)
        if total > MAX_REQUESTS:
            raise bad_request(
                f"this call makes {total} requests (prompts x n); the limit is {MAX_REQUESTS}"
            )
        ctx = engine.context_len
        for ids, params in zip(self.token_lists, self.params):
            n = len(ids)
            if n == 0:
                raise bad_request("the prompt is empty")
            if n >= ctx:
                raise bad_request(
                    f"the prompt has {n} tokens, but the model's context length is {ctx}",
                    code="context_length_exceeded",
                )
            want = params.max_new_tokens
            if n + want > ctx:
                raise bad_request(
                    f"the prompt has {n} tokens and {max_tokens_name} is {want}: {n + want} "
                    f"tokens in all, over the model's context length of {ctx}",
                    max_tokens_name,
                    code="context_length_exceeded",
                )

    def submit(self, engine: Engine) -> list[RequestHandle]:
        """Queue every request (prompt-major, ``n`` copies next to each other)."""
        try:
            return engine.submit(
                input_ids=self.token_lists,
                sampling_params=self.params,
                return_logprob=self.return_logprob,
                logprob_start_len=self.logprob_start_len,
                top_logprobs_num=self.top_logprobs_num,
                return_text_in_logprobs=self.return_text_in_logprobs,
                rid=self.rids,
                stream=self.stream,
            )
        except (ValueError, TypeError) as exc:
            raise bad_request(str(exc)) from None
        except RuntimeError as exc:  # the engine has been shut down
            raise APIError(503, str(exc)) from None


async def tokenize(
    engine: Engine, texts: list[str], add_special_tokens: bool = True
) -> list[list[int]]:
    """Token ids of each text, encoded off the event loop (as ``Engine.generate`` does)."""

    def encode() -> list[list[int]]:
        return [
            list(engine.tokenizer.encode(t, add_special_tokens=add_special_tokens)) for t in texts
        ]

    return await asyncio.get_running_loop().run_in_executor(None, encode)


def token_id_lists(value: Any, name: str) -> tuple[list[list[int]], bool]:
    """``list[int]`` (single) or ``list[list[int]]`` (batch) -> (lists, single)."""
    if not isinstance(value, list):
        raise bad_request(f"{name} must be a list of integers or of lists of integers", name)
    if not value or all(is_int(t) for t in value):
        return [list(value)], True
    if all(isinstance(x, list) and all(is_int(t) for t in x) for x in value):
        return [list(x) for x in value], False
    raise bad_request(f"{name} must be a list of integers or of lists of integers", name)


# ---------------------------------------------------------------------- native /generate

GENERATE_FIELDS = (
    "text",
    "input_ids",
    "sampling_params",
    "return_logprob",
    "logprob_start_len",
    "top_logprobs_num",
    "return_text_in_logprobs",
    "rid",
    "stream",
)
# SGLang fields this server accepts only when they are null / false / empty.
_UNSUPPORTED_IF_SET = (
    "image_data",
    "video_data",
    "audio_data",
    "input_embeds",
    "lora_path",
    "lora_id",
    "session_id",
    "custom_logit_processor",
    "return_hidden_states",
    "modalities",
    "bootstrap_host",
    "bootstrap_port",
    "bootstrap_room",
    "data_parallel_rank",
)
_IGNORED = ("log_metrics", "stream_options", "priority")


@dataclass
class GenerateRequest:
    """A parsed ``/generate`` body."""

    call: EngineCall
    single: bool  # one prompt with n == 1: answer a dict, else a list
    stream: bool
    texts: list[str] | None = None  # set when the prompts came as text (to be tokenized)


def _per_prompt(value: Any, count: int, name: str) -> list[Any]:
    if isinstance(value, list):
        if len(value) != count:
            raise bad_request(f"{name} has {len(value)} entries for {count} prompt(s)", name)
        return value
    return [value] * count


def parse_generate(body: dict[str, Any], engine: Engine) -> GenerateRequest:
    """Validate a native ``/generate`` body (token ids of text prompts are filled in later by
    :func:`tokenize`)."""
    reject_unknown(body, (*GENERATE_FIELDS, *_UNSUPPORTED_IF_SET, *_IGNORED), "/generate")
    for name in _UNSUPPORTED_IF_SET:
        if body.get(name) not in (None, False, [], {}, ""):
            raise bad_request(f"{name} is not supported by this server (text-only model)", name)

    text, input_ids = body.get("text"), body.get("input_ids")
    if (text is None) == (input_ids is None):
        raise bad_request("give exactly one of text and input_ids", "text")
    texts: list[str] | None = None
    if text is not None:
        if isinstance(text, str):
            texts, single = [text], True
        elif isinstance(text, list) and text and all(isinstance(t, str) for t in text):
            texts, single = list(text), False
        else:
            raise bad_request("text must be a string or a non-empty list of strings", "text")
        token_lists: list[list[int]] = [[] for _ in texts]
    else:
        token_lists, single = token_id_lists(input_ids, "input_ids")
        vocab = engine.model.vocab_size
        for ids in token_lists:
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise bad_request(f"input_ids: token id {bad} is not in [0, {vocab})", "input_ids")
    count = len(token_lists)

    raw_params = body.get("sampling_params")
    if isinstance(raw_params, list):
        raw = _per_prompt(raw_params, count, "sampling_params")
        params = [sampling_params(p, f"sampling_params[{i}]") for i, p in enumerate(raw)]
    else:
        params = [sampling_params(raw_params)] * count

    flags = _per_prompt(body.get("return_logprob"), count, "return_logprob")
    starts = _per_prompt(body.get("logprob_start_len"), count, "logprob_start_len")
    tops = _per_prompt(body.get("top_logprobs_num"), count, "top_logprobs_num")
    for i in range(count):
        flags[i] = expect_bool({"return_logprob": flags[i]}, "return_logprob", False)
        starts[i] = expect_int({"logprob_start_len": starts[i]}, "logprob_start_len", None, -1)
        tops[i] = expect_int(
            {"top_logprobs_num": tops[i]}, "top_logprobs_num", 0, 0, MAX_TOP_LOGPROBS
        )

    rid = body.get("rid")
    rids: list[str | None] | None = None
    if rid is not None:
        rids = _per_prompt(rid, count, "rid")
        if not all(isinstance(r, str) and r for r in rids):
            raise bad_request("rid must be a non-empty string or a list of them", "rid")

    stream = expect_bool(body, "stream", False)
    copies = sum(min(p.n, 2) for p in params)  # (the size of n is checked later)
    if stream and (count != 1 or copies != 1):
        raise bad_request("stream=true takes a single prompt with n=1", "stream")
    call = EngineCall(
        token_lists=token_lists,
        params=params,
        return_logprob=flags,
        logprob_start_len=starts,
        top_logprobs_num=tops,
        return_text_in_logprobs=expect_bool(body, "return_text_in_logprobs", False),
        rids=rids,
        stream=stream,
    )
    return GenerateRequest(call, single and copies == 1, stream, texts)
