"""The public primitives: ``function``, ``gen``, ``select``, roles, and backend helpers.

Signatures and semantics follow ``sglang.lang.api``; ``json_schema`` also takes a dict or a
pydantic model class.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from sgl_dsl.backends import as_backend
from sgl_dsl.choices import ChoicesSamplingMethod, token_length_normalized
from sgl_dsl.function import SglFunction
from sgl_dsl.global_config import global_config
from sgl_dsl.ir import (
    SglExpr,
    SglExprList,
    SglGen,
    SglImage,
    SglRoleBegin,
    SglRoleEnd,
    SglSamplingParams,
    SglSelect,
    SglSeparateReasoning,
    SglVideo,
    as_expr,
    json_schema_text,
)


def function(func: Callable[..., Any] | None = None, num_api_spec_tokens: int | None = None) -> Any:
    """Decorate ``def program(s, ...)`` into a runnable :class:`SglFunction`."""
    if func is not None:
        return SglFunction(func, num_api_spec_tokens=num_api_spec_tokens)
    return lambda f: SglFunction(f, num_api_spec_tokens=num_api_spec_tokens)


def set_default_backend(backend: Any) -> None:
    global_config.default_backend = as_backend(backend)


def flush_cache(backend: Any = None) -> bool:
    backend = backend or global_config.default_backend
    return False if backend is None else as_backend(backend).flush_cache()


def get_server_info(backend: Any = None) -> dict[str, Any] | None:
    backend = backend or global_config.default_backend
    return None if backend is None else as_backend(backend).get_server_info()


def gen(
    name: str | None = None,
    max_tokens: int | None = None,
    min_tokens: int | None = None,
    n: int | None = None,
    stop: str | list[str] | None = None,
    stop_token_ids: list[int] | None = None,
    stop_regex: str | list[str] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    return_logprob: bool | None = None,
    logprob_start_len: int | None = None,
    top_logprobs_num: int | None = None,
    return_text_in_logprobs: bool | None = None,
    dtype: type | str | None = None,
    choices: list[str] | None = None,
    choices_method: ChoicesSamplingMethod | None = None,
    regex: str | None = None,
    json_schema: Any = None,
) -> SglExpr:
    """Generate into variable ``name``; with ``choices`` it is a :func:`select`.

    ``regex`` is checked here (``re.error`` names the problem); a schema the backend cannot
    compile fails only the program that uses it.
    """
    if choices:
        return SglSelect(
            name,
            list(choices),
            0.0 if temperature is None else temperature,
            choices_method or token_length_normalized,
        )
    if regex is not None:
        re.compile(regex)
    for pattern in [stop_regex] if isinstance(stop_regex, str) else stop_regex or []:
        re.compile(pattern)
    params = SglSamplingParams(
        max_new_tokens=max_tokens,
        min_new_tokens=min_tokens,
        n=n,
        stop=stop,  # type: ignore[arg-type]
        stop_token_ids=stop_token_ids,
        stop_regex=stop_regex,
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
        json_schema=json_schema_text(json_schema),
        dtype=dtype,
        regex=regex,
    )
    return SglGen(name, params)


def gen_int(
    name: str | None = None,
    max_tokens: int | None = None,
    n: int | None = None,
    stop: str | list[str] | None = None,
    stop_token_ids: list[int] | None = None,
    stop_regex: str | list[str] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    return_logprob: bool | None = None,
    logprob_start_len: int | None = None,
    top_logprobs_num: int | None = None,
    return_text_in_logprobs: bool | None = None,
) -> SglExpr:
    """``gen`` constrained to an integer (``dtype=int``)."""
    return gen(
        name,
        max_tokens,
        None,
        n,
        stop,
        stop_token_ids,
        stop_regex,
        temperature,
        top_p,
        top_k,
        min_p,
        frequency_penalty,
        presence_penalty,
        ignore_eos,
        return_logprob,
        logprob_start_len,
        top_logprobs_num,
        return_text_in_logprobs,
        dtype=int,
    )


def gen_string(
    name: str | None = None,
    max_tokens: int | None = None,
    n: int | None = None,
    stop: str | list[str] | None = None,
    stop_token_ids: list[int] | None = None,
    stop_regex: str | list[str] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    return_logprob: bool | None = None,
    logprob_start_len: int | None = None,
    top_logprobs_num: int | None = None,
    return_text_in_logprobs: bool | None = None,
) -> SglExpr:
    """``gen`` constrained to a double-quoted string (``dtype=str``)."""
    return gen(
        name,
        max_tokens,
        None,
        n,
        stop,
        stop_token_ids,
        stop_regex,
        temperature,
        top_p,
        top_k,
        min_p,
        frequency_penalty,
        presence_penalty,
        ignore_eos,
        return_logprob,
        logprob_start_len,
        top_logprobs_num,
        return_text_in_logprobs,
        dtype=str,
    )


def select(
    name: str | None = None,
    choices: list[str] | None = None,
    temperature: float = 0.0,
    choices_method: ChoicesSamplingMethod = token_length_normalized,
) -> SglExpr:
    """Append the most likely of ``choices`` (by ``choices_method``) and store it in ``name``."""
    if not choices:
        raise ValueError("select needs a non-empty list of choices")
    return SglSelect(name, list(choices), temperature, choices_method)


def image(expr: Any) -> SglExpr:
    return SglImage(expr)


def video(path: str, num_frames: int) -> SglExpr:
    return SglVideo(path, num_frames)


def _role(name: str, expr: SglExpr | str | None) -> SglExprList:
    inner = [] if expr is None else [as_expr(expr)]
    return SglExprList([SglRoleBegin(name), *inner, SglRoleEnd(name)])


def system(expr: SglExpr | str | None = None) -> SglExprList:
    return _role("system", expr)


def user(expr: SglExpr | str | None = None) -> SglExprList:
    return _role("user", expr)


def assistant(expr: SglExpr | str | None = None) -> SglExprList:
    return _role("assistant", expr)


def system_begin() -> SglExpr:
    return SglRoleBegin("system")


def system_end() -> SglExpr:
    return SglRoleEnd("system")


def user_begin() -> SglExpr:
    return SglRoleBegin("user")


def user_end() -> SglExpr:
    return SglRoleEnd("user")


def assistant_begin() -> SglExpr:
    return SglRoleBegin("assistant")


def assistant_end() -> SglExpr:
    return SglRoleEnd("assistant")


def separate_reasoning(expr: SglExpr | None = None, model_type: str | None = None) -> SglExpr:
    """Run ``expr`` then move its ``<think>`` part into ``<name>_reasoning_content``."""
    return SglExprList([e for e in (expr, SglSeparateReasoning(model_type, expr)) if e])
