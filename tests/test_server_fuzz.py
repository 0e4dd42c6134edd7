"""Hypothesis-generated request bodies against the real server: whatever the body, the
answer is never a 5xx, every error is JSON naming the problem, and the server keeps
serving with its KV accounting back at the idle invariant.

Bodies mix plausible values of the real fields (so that many requests are valid and reach
the engine) with arbitrary JSON, unknown keys, NaN / infinities and raw bytes. The engine
has a 128-token context, so any valid request is short."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_util import assert_kv_idle

from backend.engine import Engine
from backend.server import ServerThread

FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
texts = st.text(max_size=24)
VALID_REGEXES = ["[0-9]{2}", "(yes|no)", "a*b?", ".{0,3}", "[A-Z][a-z]{0,3}"]
BAD_REGEXES = ["(", "[", "x{3,1}", "(a)\\1", "(?P<n>a)(?P=n)"]
SCHEMAS = [
    {"type": "integer"},
    {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]},
    {"enum": ["x", 1, None]},
    {"type": "array", "items": {"type": "string", "maxLength": 2}, "maxItems": 2},
    True,
]
BAD_SCHEMAS = [{"type": "strin"}, {"anyOf": []}, False, {"$ref": "#/nope"}, "{not json"]
# Valid values of the sampling parameters (and of the constraints).
SAMPLING: dict[str, st.SearchStrategy[Any]] = {
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.05, 1),
    "top_k": st.sampled_from([-1, 1, 5, 50]),
    "min_p": st.floats(0, 1),
    "frequency_penalty": st.floats(-2, 2),
    "presence_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2),
    "stop": texts | st.lists(texts.filter(bool), max_size=3),
    "stop_regex": st.lists(st.sampled_from(VALID_REGEXES), max_size=2),
    "stop_token_ids": st.lists(st.integers(0, 49_151), max_size=3),
    "ignore_eos": st.booleans(),
    "seed": st.integers(0, 2**63),
    "n": st.integers(1, 2),
    "regex": st.sampled_from(VALID_REGEXES),
    "json_schema": st.sampled_from(SCHEMAS).map(json.dumps),
}


def some_of(fields: dict[str, st.SearchStrategy[Any]], at_most: int = 3) -> st.SearchStrategy:
    """A dict of up to `at_most` of `fields`, each with a value from its strategy."""
    names = st.lists(st.sampled_from(sorted(fields)), max_size=at_most, unique=True)
    return names.flatmap(lambda chosen: st.fixed_dictionaries({n: fields[n] for n in chosen}))


def mutations(body: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """`body` itself, or with one field (top-level or inside a nested object) replaced by
    any JSON value, deleted, or an unknown field added."""
    paths = [(k,) for k in body] + [
        (k, j) for k, v in body.items() if isinstance(v, dict) for j in v
    ]

    def replace(path: tuple[str, ...], value: Any) -> dict[str, Any]:
        if len(path) == 1:
            return {**body, path[0]: value}
        return {**body, path[0]: {**body[path[0]], path[1]: value}}

    def delete(path: tuple[str, ...]) -> dict[str, Any]:
        if len(path) == 1:
            return {k: v for k, v in body.items() if k != path[0]}
        return {**body, path[0]: {k: v for k, v in body[path[0]].items() if k != path[1]}}

    variants = [st.just(body), st.just(body)]
    if paths:
        where = st.sampled_from(paths)
        variants += [st.builds(replace, where, json_values), where.map(delete)]
        variants += [st.builds(replace, where, st.sampled_from(BAD_REGEXES + BAD_SCHEMAS))]
    variants.append(
        st.builds(replace, st.text(min_size=1, max_size=8).map(lambda k: (k,)), json_values)
    )
    return st.one_of(variants)


sampling_params = st.fixed_dictionaries({"max_new_tokens": st.integers(0, 4)}).flatmap(
    lambda base: some_of(SAMPLING).map(lambda more: {**base, **more})
)
prompt = st.one_of(
    texts.map(lambda t: {"text": "Hi " + t}),
    st.lists(texts, min_size=1, max_size=3).map(lambda ts: {"text": ["Q: " + t for t in ts]}),
    st.lists(st.integers(1, 49_151), min_size=1, max_size=8).map(lambda ids: {"input_ids": ids}),
)
GENERATE_OPTIONS = {
    "stream": st.booleans(),
    "return_logprob": st.booleans(),
    "logprob_start_len": st.integers(-1, 3),
    "top_logprobs_num": st.integers(0, 3),
    "return_text_in_logprobs": st.booleans(),
    "rid": texts.filter(bool),
}
generate_bodies = st.builds(
    lambda p, sp, more: {**p, "sampling_params": sp, **more},
    prompt,
    sampling_params,
    some_of(GENERATE_OPTIONS),
).flatmap(mutations)

message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "developer"]), "content": texts}
)
CHAT_OPTIONS = {
    **{k: v for k, v in SAMPLING.items() if k not in ("json_schema", "n")},
    "n": st.integers(1, 2),
    "stream": st.booleans(),
    "stream_options": st.just({"include_usage": True}),
    "logprobs": st.booleans(),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}])
    | st.sampled_from(SCHEMAS[:2]).map(
        lambda s: {"type": "json_schema", "json_schema": {"name": "s", "schema": s}}
    ),
    "add_generation_prompt": st.booleans(),
    "user": texts,
}
chat_bodies = st.builds(
    lambda msgs, max_tokens, more: {
        "model": "x",
        "messages": msgs,
        "max_tokens": max_tokens,
        **more,
    },
    st.lists(message, min_size=1, max_size=3),
    st.integers(0, 4),
    some_of(CHAT_OPTIONS),
).flatmap(mutations)


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    engine = Engine(
        context_length=128,
        max_total_tokens=4096,
        constraint_compile_timeout=2.0,
        num_threads=1,
    )
    with ServerThread(engine) as srv:
        yield srv.url
        assert requests.get(srv.url + "/health", timeout=30).status_code == 200
        assert_kv_idle(srv.url)
    engine.shutdown()


STATUSES: Counter[int] = Counter()  # of the structured bodies, to show they reach the engine


def send(url: str, path: str, data: bytes) -> int:
    """POST ``data``; the answer must not be a 5xx, and an error must name its problem.
    Returns the status."""
    r = requests.post(url + path, data=data, timeout=120)
    assert r.status_code < 500, (path, data[:500], r.text[:500])
    if r.status_code >= 400:
        message = r.json()["error"]["message"]
        assert isinstance(message, str) and len(message) > 5, r.text
    else:
        assert r.content, data[:500]
    return r.status_code


def encode(body: Any) -> bytes:
    return json.dumps(body, allow_nan=True).encode()


@FUZZ
@given(body=generate_bodies)
def test_fuzz_generate(url: str, body: dict[str, Any]) -> None:
    STATUSES[send(url, "/generate", encode(body))] += 1


@FUZZ
@given(body=chat_bodies)
def test_fuzz_chat_completions(url: str, body: dict[str, Any]) -> None:
    STATUSES[send(url, "/v1/chat/completions", encode(body))] += 1


@settings(FUZZ, max_examples=40)
@given(data=st.binary(max_size=64) | json_values.map(encode))
def test_fuzz_raw_bodies(url: str, data: bytes) -> None:
    for path in ("/generate", "/v1/chat/completions", "/v1/completions"):
        send(url, path, data)


def test_server_alive_and_idle_after_fuzzing(url: str) -> None:
    """Also: a good share of the generated bodies were valid (the fuzzing reached the
    engine, not only the validation)."""
    total = sum(STATUSES.values())
    assert total >= 100 and STATUSES[200] >= total // 5, STATUSES
    body = {"text": "Hello", "sampling_params": {"max_new_tokens": 2, "temperature": 0}}
    r = requests.post(url + "/generate", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 2
    assert not math.isnan(requests.get(url + "/server_info", timeout=30).json()["cache_hit_rate"])
    assert_kv_idle(url)
