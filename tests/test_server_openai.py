"""The OpenAI-compatible HTTP API against the real engine, through the real ``openai`` package."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator

import jsonschema
import openai
import pytest
import requests
from server_util import assert_kv_idle, raw_post, read_until

from backend.engine import Engine
from backend.server import ServerThread

CHAT = [{"role": "user", "content": "Name a colour."}]
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[ServerThread]:
    srv = ServerThread(engine)
    yield srv
    assert_kv_idle(srv.url)
    srv.stop()


@pytest.fixture(scope="module")
def url(server: ServerThread) -> str:
    return server.url


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client: openai.OpenAI, **kw):
    kw.setdefault("messages", CHAT)
    kw.setdefault("max_tokens", 8)
    return client.chat.completions.create(model="any-name", **kw)


def complete(client: openai.OpenAI, **kw):
    kw.setdefault("prompt", "The capital of France is")
    kw.setdefault("max_tokens", 8)
    return client.completions.create(model="any-name", **kw)


# ---------------------------------------------------------------------- basics


def test_models(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct"]
    assert client.models.retrieve("SmolLM2-135M-Instruct").id == "SmolLM2-135M-Instruct"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-17")


def test_completion_equals_engine(client: openai.OpenAI, engine: Engine) -> None:
    out = complete(client, temperature=0)
    want = engine.generate("The capital of France is", {"temperature": 0, "max_new_tokens": 8})
    assert out.object == "text_completion" and out.model == "SmolLM2-135M-Instruct"
    assert out.choices[0].text == want["text"]
    assert out.choices[0].finish_reason in ("stop", "length")
    n_prompt = len(engine.tokenizer.encode("The capital of France is"))
    assert out.usage.prompt_tokens == n_prompt
    assert out.usage.completion_tokens == want["meta_info"]["completion_tokens"]
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_completion_prompt_forms(client: openai.OpenAI, engine: Engine) -> None:
    ids = engine.tokenizer.encode("Hello there")
    by_ids = complete(client, prompt=ids, temperature=0, max_tokens=4)
    by_text = complete(client, prompt="Hello there", temperature=0, max_tokens=4)
    assert by_ids.choices[0].text == by_text.choices[0].text
    batch = complete(client, prompt=["Hello there", "1, 2,"], temperature=0, max_tokens=4)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == by_text.choices[0].text
    echo = complete(client, prompt="Hello there", temperature=0, max_tokens=4, echo=True)
    assert echo.choices[0].text == "Hello there" + by_text.choices[0].text


def test_chat_equals_engine(client: openai.OpenAI, engine: Engine) -> None:
    out = chat(client, temperature=0)
    prompt = engine.apply_chat_template(CHAT)
    want = engine.generate(prompt, {"temperature": 0, "max_new_tokens": 8})
    assert out.object == "chat.completion"
    msg = out.choices[0].message
    assert msg.role == "assistant" and msg.content == want["text"]
    assert out.usage.prompt_tokens == len(engine.tokenizer.encode(prompt))
    # list-of-parts content and max_completion_tokens mean the same
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name a colour."}]}]
    same = chat(client, messages=parts, temperature=0, max_tokens=None, max_completion_tokens=8)
    assert same.choices[0].message.content == want["text"]


def test_chat_stream_equals_non_stream(client: openai.OpenAI) -> None:
    full = chat(client, temperature=0, max_tokens=12)
    chunks = list(chat(client, temperature=0, max_tokens=12, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1


def test_stream_include_usage(client: openai.OpenAI) -> None:
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    chunks = list(complete(client, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens > 0


def test_completion_stream_equals_non_stream(client: openai.OpenAI) -> None:
    full = complete(client, temperature=0, max_tokens=12)
    chunks = list(complete(client, temperature=0, max_tokens=12, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_n_samples(client: openai.OpenAI) -> None:
    out = chat(client, n=2, max_tokens=4)
    assert [c.index for c in out.choices] == [0, 1]
    out = complete(client, n=2, max_tokens=4, prompt=["a", "b"])
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    chunks = list(chat(client, n=2, max_tokens=4, stream=True))
    finished = {c.choices[0].index for c in chunks if c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_stop(client: openai.OpenAI) -> None:
    out = complete(client, prompt="1, 2, 3,", temperature=0, max_tokens=16, stop=[","])
    assert "," not in out.choices[0].text and out.choices[0].finish_reason == "stop"


def test_seed_reproducible(client: openai.OpenAI) -> None:
    a = chat(client, temperature=1.0, seed=1234, max_tokens=8)
    b = chat(client, temperature=1.0, seed=1234, max_tokens=8)
    assert a.choices[0].message.content == b.choices[0].message.content


# ---------------------------------------------------------------------- logprobs


def test_completion_logprobs(client: openai.OpenAI) -> None:
    out = complete(client, temperature=0, max_tokens=4, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 2 <= len(top) <= 3 and top[token] == logprob
    chunks = list(complete(client, temperature=0, max_tokens=4, logprobs=2, stream=True))
    pieces = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert [t for p in pieces for t in p.tokens] == lp.tokens
    assert [o for p in pieces for o in p.text_offset] == lp.text_offset
    zero = complete(client, temperature=0, max_tokens=2, logprobs=0).choices[0].logprobs
    assert [list(t) for t in zero.top_logprobs] == [[t] for t in zero.tokens]
    echo = complete(client, prompt="Hi there", max_tokens=1, logprobs=1, echo=True)
    lp = echo.choices[0].logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens) == echo.choices[0].text


def test_chat_logprobs(client: openai.OpenAI) -> None:
    out = chat(client, temperature=0, max_tokens=4, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == 4
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert bytes(item.bytes).decode(errors="replace") == item.token or "\ufffd" in item.token
        assert item.top_logprobs[0].logprob == item.logprob  # greedy
    plain = chat(client, temperature=0, max_tokens=4, logprobs=True).choices[0].logprobs
    assert [i.token for i in plain.content] == [i.token for i in content]
    assert all(i.top_logprobs == [] for i in plain.content)
    chunks = list(chat(client, temperature=0, max_tokens=4, logprobs=True, stream=True))
    streamed = [i.token for c in chunks if c.choices and c.choices[0].logprobs for i in
                c.choices[0].logprobs.content]  # fmt: skip
    assert streamed == [i.token for i in content]


# ---------------------------------------------------------------------- constraints


def test_response_format_json_schema(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    out = chat(client, temperature=0, max_tokens=40, response_format=fmt)
    jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)


def test_response_format_json_object(client: openai.OpenAI) -> None:
    out = chat(
        client,
        messages=[{"role": "user", "content": "Describe a cat as JSON."}],
        temperature=0,
        max_tokens=40,
        response_format={"type": "json_object"},
        extra_body={"ignore_eos": False},
    )
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(out.choices[0].message.content), dict)
    else:
        assert out.choices[0].message.content.startswith("{")


def test_extra_body_regex_and_json_schema(client: openai.OpenAI) -> None:
    out = complete(client, prompt="Year:", max_tokens=8, extra_body={"regex": "[0-9]{4}"})
    assert re.fullmatch("[0-9]{4}", out.choices[0].text)
    out = chat(client, max_tokens=40, temperature=0, extra_body={"json_schema": SCHEMA})
    jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)


# ---------------------------------------------------------------------- errors


def test_errors_raise_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="invalid constraint"):
        chat(client, extra_body={"json_schema": {"type": "object", "properties": 5}})
    with pytest.raises(openai.BadRequestError, match="invalid constraint"):
        chat(client, stream=True, extra_body={"regex": "(unclosed"})
    with pytest.raises(openai.BadRequestError, match="context length"):
        complete(client, prompt="hello " * 9000)
    with pytest.raises(openai.BadRequestError, match="max_tokens") as info:
        complete(client, max_tokens=100_000)
    assert info.value.param == "max_tokens" and "context length" in info.value.message
    with pytest.raises(openai.BadRequestError, match="max_completion_tokens"):
        chat(client, max_tokens=None, max_completion_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        chat(client, temperature="hot")
    with pytest.raises(openai.BadRequestError, match="'foo'"):
        chat(client, extra_body={"foo": 1})
    with pytest.raises(openai.BadRequestError, match="text-only"):
        image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
        chat(client, messages=[{"role": "user", "content": [image]}])
    assert chat(client, max_tokens=1).choices[0].message.content is not None


def test_authentication_error(engine: Engine) -> None:
    with ServerThread(engine, api_key="sesame") as srv:
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="sesame", max_retries=0)
        assert good.models.list().data[0].id == "SmolLM2-135M-Instruct"


LONG = "hello " * 9000
C, K = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]
BAD = [
    (C, b"{bad", "malformed JSON"),
    (C, {"prompt": "hi"}, "model"),
    (C, {"model": "m", "prompt": 5}, "prompt"),
    (C, {"model": "m", "prompt": "hi", "n": 0}, "n must be"),
    (C, {"model": "m", "prompt": "hi", "max_tokens": -1}, "max_tokens"),
    (C, {"model": "m", "prompt": "hi", "max_tokens": 9000}, "context length"),
    (C, {"model": "m", "prompt": LONG}, "context length"),
    (C, {"model": "m", "prompt": "hi", "logprobs": 50}, "logprobs"),
    (C, {"model": "m", "prompt": "hi", "suffix": "x"}, "suffix"),
    (C, {"model": "m", "prompt": "hi", "logit_bias": {"1": 5}}, "logit_bias"),
    (C, {"model": "m", "prompt": "hi", "top_p": 2}, "top_p"),
    (C, {"model": "m", "prompt": "hi", "regex": "("}, "invalid constraint"),
    (C, {"model": "m", "prompt": "hi", "stream_options": {"include_usage": True}}, "stream"),
    (K, {"model": "m", "messages": "hi"}, "messages"),
    (K, {"model": "m", "messages": []}, "messages"),
    (K, {"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    (K, {"model": "m", "messages": [{"role": "user"}]}, "content"),
    (K, {"model": "m", "messages": [{"role": ["user"], "content": "hi"}]}, "role"),
    (K, {"model": "m", "messages": [{"role": "user", "content": [{"type": "x"}]}]}, "'x'"),
    (K, {"model": "m", "messages": MSG, "top_logprobs": 2}, "top_logprobs"),
    (K, {"model": "m", "messages": MSG, "logprobs": 3}, "logprobs"),
    (K, {"model": "m", "messages": MSG, "response_format": {"type": "xml"}}, "response_format"),
    (K, {"model": "m", "messages": MSG, "tools": [{"type": "function"}]}, "tools"),
    (K, {"model": "m", "messages": MSG, "frequency_penalty": 5}, "frequency_penalty"),
    (K, {"model": 7, "messages": MSG}, "model must be a string"),
    (K, {"model": "m", "messages": MSG, "stop": [1]}, "stop"),
    (K, {"model": "m", "messages": MSG, "seed": "x"}, "seed"),
]


@pytest.mark.parametrize(("path", "body", "needle"), BAD, ids=range(len(BAD)))
def test_bad_openai_input(url: str, client: openai.OpenAI, path: str, body, needle: str) -> None:
    if isinstance(body, bytes):
        r = requests.post(url + path, data=body, timeout=60)
    else:
        r = requests.post(url + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and needle in error["message"]
    assert complete(client, max_tokens=1).choices[0].text is not None


# ---------------------------------------------------------------------- robustness


def test_disconnect_mid_stream_frees_slots(url: str) -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "Write an endless story."}],
        "stream": True,
        "max_tokens": 4000,
        "ignore_eos": True,
        "n": 2,
    }
    sock = raw_post(url, K, body)
    assert b"data:" in read_until(sock, b"\n\n", limit=1 << 16)
    sock.close()
    assert_kv_idle(url)


def test_concurrent_clients(client: openai.OpenAI) -> None:
    texts: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        out = complete(client, prompt=f"Fact {i}:", max_tokens=4)
        with lock:
            texts.append(out.choices[0].text)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(texts) == 16
