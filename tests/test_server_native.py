"""The SGLang-native HTTP API against the real engine, with real HTTP clients (no mocks)."""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from collections.abc import Iterator

import jsonschema
import pytest
import requests
from server_util import assert_kv_idle, raw_post, read_until, sse_json, wait_idle

from backend.engine import Engine
from backend.server import ServerThread

GREEDY = {"temperature": 0, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[ServerThread]:
    srv = ServerThread(engine)
    yield srv
    assert_kv_idle(srv.url)
    srv.stop()


@pytest.fixture(scope="module")
def url(server: ServerThread) -> str:
    return server.url


def post(url: str, body: dict, path: str = "/generate", **kw) -> requests.Response:
    return requests.post(url + path, json=body, timeout=120, **kw)


def ok_request(url: str) -> None:
    """A normal request still succeeds (the server survived whatever came before)."""
    r = post(url, {"text": "Hello", "sampling_params": {"max_new_tokens": 1}})
    assert r.status_code == 200, r.text
    assert r.json()["meta_info"]["completion_tokens"] == 1


# ---------------------------------------------------------------------- /generate


def test_generate_single_equals_engine(url: str, engine: Engine) -> None:
    r = post(url, {"text": "The capital of France is", "sampling_params": GREEDY})
    assert r.status_code == 200
    out = r.json()
    want = engine.generate("The capital of France is", GREEDY)
    assert out["text"] == want["text"] and out["output_ids"] == want["output_ids"]
    meta = out["meta_info"]
    assert meta["finish_reason"]["type"] in ("length", "stop")
    assert meta["prompt_tokens"] == len(engine.tokenizer.encode("The capital of France is"))
    assert meta["completion_tokens"] == len(out["output_ids"])
    assert {"id", "cached_tokens", "e2e_latency"} <= set(meta)


def test_generate_batched_text_and_input_ids(url: str, engine: Engine) -> None:
    prompts = ["Once upon a time,", "1, 2, 3,"]
    want = [engine.generate(p, GREEDY) for p in prompts]
    r = post(url, {"text": prompts, "sampling_params": GREEDY})
    assert r.status_code == 200
    got = r.json()
    assert isinstance(got, list) and len(got) == 2
    assert [g["output_ids"] for g in got] == [w["output_ids"] for w in want]

    ids = [engine.tokenizer.encode(p) for p in prompts]
    single = post(url, {"input_ids": ids[0], "sampling_params": GREEDY}).json()
    assert isinstance(single, dict) and single["output_ids"] == want[0]["output_ids"]
    batch = post(url, {"input_ids": ids, "sampling_params": [GREEDY, GREEDY]}).json()
    assert [b["text"] for b in batch] == [w["text"] for w in want]


def test_generate_n_samples(url: str) -> None:
    body = {"text": "My favourite colour is", "sampling_params": {"n": 3, "max_new_tokens": 4}}
    got = post(url, {**body, "rid": "nsample"}).json()
    assert isinstance(got, list) and len(got) == 3
    assert [g["meta_info"]["id"] for g in got] == ["nsample-0", "nsample-1", "nsample-2"]
    assert all(g["meta_info"]["completion_tokens"] <= 4 for g in got)


def test_prefill_only_caches_the_prompt(url: str) -> None:
    prompt = "A long shared preamble about caching prefixes in a radix tree: " * 3
    r = post(url, {"text": prompt, "sampling_params": {"max_new_tokens": 0}})
    assert r.status_code == 200
    out = r.json()
    assert out["text"] == "" and out["output_ids"] == []
    assert out["meta_info"]["completion_tokens"] == 0
    again = post(url, {"text": prompt + " Next", "sampling_params": {"max_new_tokens": 1}})
    meta = again.json()["meta_info"]
    assert meta["cached_tokens"] >= meta["prompt_tokens"] - 3


def test_stream_cumulative_equals_non_streamed(url: str) -> None:
    body = {"text": "Count: 1, 2, 3,", "sampling_params": {"temperature": 0, "max_new_tokens": 12}}
    full = post(url, body).json()
    with post(url, {**body, "stream": True}, stream=True) as r:
        assert r.status_code == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events, done = sse_json(r)
    assert done and len(events) > 1
    texts = [e["text"] for e in events]
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))
    assert texts[-1] == full["text"]
    assert events[-1]["output_ids"] == full["output_ids"]
    assert events[-1]["meta_info"]["finish_reason"] == full["meta_info"]["finish_reason"]
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-1])


def test_logprob_triples(url: str, engine: Engine) -> None:
    prompt = "Q: 2+2?\nA:"
    body = {
        "text": prompt,
        "sampling_params": {"temperature": 0, "max_new_tokens": 3},
        "return_logprob": True,
        "logprob_start_len": 0,
        "top_logprobs_num": 2,
        "return_text_in_logprobs": True,
    }
    meta = post(url, body).json()["meta_info"]
    n_prompt = len(engine.tokenizer.encode(prompt))
    inp, out = meta["input_token_logprobs"], meta["output_token_logprobs"]
    assert len(inp) == n_prompt and inp[0][0] is None
    assert all(isinstance(t[0], float) and t[0] <= 0 for t in inp[1:])
    assert len(out) == meta["completion_tokens"] == 3
    for lp, tid, text in out:
        assert lp <= 0 and isinstance(tid, int) and text == engine.tokenizer.decode([tid])
    tops = meta["output_top_logprobs"]
    assert len(tops) == 3 and all(len(t) == 2 for t in tops)
    assert tops[0][0][1] == out[0][1]  # greedy: the top token is the one taken
    # without return_text_in_logprobs, the text slot is null (SGLang's default)
    plain = post(url, {**body, "return_text_in_logprobs": False}).json()["meta_info"]
    assert plain["output_token_logprobs"][0][2] is None


def test_regex_and_json_schema(url: str) -> None:
    r = post(url, {"text": "Date:", "sampling_params": {"regex": r"[0-9]{4}-[0-9]{2}", **GREEDY}})
    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}", r.json()["text"])
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    params = {"json_schema": json.dumps(schema), "temperature": 0, "max_new_tokens": 40}
    out = post(url, {"text": "A person as JSON:", "sampling_params": params}).json()
    assert out["meta_info"]["finish_reason"]["type"] == "stop"
    jsonschema.validate(json.loads(out["text"]), schema)


def test_stop_regex(url: str) -> None:
    params = {"temperature": 0, "max_new_tokens": 16, "stop_regex": [r"[0-9]"]}
    out = post(url, {"text": "Count: 1, 2, 3,", "sampling_params": params}).json()
    assert not re.search(r"[0-9]", out["text"])
    reason = out["meta_info"]["finish_reason"]
    assert reason["type"] == "stop" and reason["matched"] == "[0-9]"


def test_runtime_endpoint_select_flow(url: str) -> None:
    """The requests ``RuntimeEndpoint.select`` sends, and the fields it reads."""
    s = "The answer is"
    cached = post(url, {"text": s, "sampling_params": {"max_new_tokens": 0}}).json()
    start = max(cached["meta_info"]["prompt_tokens"] - 2, 0)
    body = {
        "text": [s + " yes", s + " no"],
        "sampling_params": {"max_new_tokens": 0, "temperature": 0},
        "return_logprob": True,
        "return_text_in_logprobs": True,
        "logprob_start_len": start,
    }
    obj = post(url, body).json()
    assert len(obj) == 2
    for r in obj:
        inp = r["meta_info"]["input_token_logprobs"]
        assert isinstance(inp[0][-1], str) and r["meta_info"]["output_token_logprobs"] == []
    ids = [[t[1] for t in r["meta_info"]["input_token_logprobs"]] for r in obj]
    uncond = {"input_ids": ids, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True}
    assert len(post(url, uncond).json()) == 2


def test_runtime_endpoint_generate_bodies(url: str) -> None:
    """``RuntimeEndpoint.generate`` / ``generate_stream``: every SglSamplingParams field sent
    with its default, read back the way that client reads it."""
    params = {
        "skip_special_tokens": True,
        "spaces_between_special_tokens": True,
        "max_new_tokens": 6,
        "min_new_tokens": 0,
        "n": 1,
        "stop": [],
        "stop_token_ids": [],
        "stop_regex": [],
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": -1,
        "min_p": 0.0,
        "frequency_penalty": 0.0,
        "presence_penalty": 0.0,
        "ignore_eos": False,
        "regex": None,
        "json_schema": None,
    }
    body = {"text": "Paris is", "sampling_params": params}
    obj = post(url, body).json()
    with post(url, {**body, "stream": True}, stream=True) as r:
        pos, text = 0, ""
        for chunk in r.iter_lines(decode_unicode=False):
            chunk = chunk.decode("utf-8")
            if chunk and chunk.startswith("data:"):
                if chunk == "data: [DONE]":
                    break
                data = json.loads(chunk[5:].strip("\n"))
                text += data["text"][pos:]
                pos += len(data["text"][pos:])
    assert text == obj["text"] and obj["meta_info"]["completion_tokens"] > 0


# ---------------------------------------------------------------------- other routes


def test_model_info(url: str, engine: Engine) -> None:
    for path in ("/get_model_info", "/model_info"):
        info = requests.get(url + path, timeout=30).json()
        assert info["is_generation"] is True
        assert info["model_path"] and info["tokenizer_path"]
        assert info["chat_template"] == engine.tokenizer.chat_template
        assert info["context_length"] == engine.context_len


def test_server_info_and_flush(url: str, engine: Engine) -> None:
    for path in ("/server_info", "/get_server_info"):
        info = requests.get(url + path, timeout=30).json()
        assert info["max_total_tokens"] == engine.config.max_total_tokens
        assert {"kv_slots", "cache_hit_rate", "running", "waiting", "version"} <= set(info)
    wait_idle(url)
    r = requests.post(url + "/flush_cache", timeout=30)
    assert r.status_code == 200 and "flushed" in r.json()["message"].lower()
    assert requests.get(url + "/flush_cache", timeout=30).status_code == 200
    kv = requests.get(url + "/server_info", timeout=30).json()["kv_slots"]
    assert kv["free"] == kv["total"]


def test_flush_refused_while_running(url: str) -> None:
    body = {"text": "Tell me a long story.", "stream": True, "rid": "busy-flush"}
    body["sampling_params"] = {"max_new_tokens": 2000, "ignore_eos": True}
    with post(url, body, stream=True) as stream:
        lines = stream.iter_lines()
        next(lines)  # the first event came: the request is running
        r = requests.post(url + "/flush_cache", timeout=30)
        assert r.status_code == 400 and "running" in r.json()["error"]["message"]
        assert post(url, {"rid": "busy-flush"}, "/abort_request").status_code == 200
        events, done = sse_json(lines)
    assert done and events[-1]["meta_info"]["finish_reason"]["type"] == "abort"
    assert_kv_idle(url)


def test_health_and_metrics(url: str) -> None:
    assert requests.get(url + "/health", timeout=30).status_code == 200
    assert requests.get(url + "/health_generate", timeout=60).status_code == 200
    r = requests.get(url + "/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    text = r.text
    for name in (
        "requests_total",
        "prompt_tokens_total",
        "generation_tokens_total",
        "cached_tokens_total",
        "cache_hit_rate",
        "num_running_reqs",
        "num_queue_reqs",
        "kv_slots_used",
        "kv_slots_total",
    ):
        assert re.search(rf"^sgl_dsl_{name}\{{[^}}]*\}} [0-9.e+-]+$", text, re.M), name
    assert "# TYPE sgl_dsl_requests_total counter" in text
    assert 'route="/generate"' in text


# ---------------------------------------------------------------------- bad input

LONG = "hello " * 9000
BAD = [
    (b"{bad", 400, "malformed JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b"", 400, "empty"),
    (b"[" * 100000, 400, "malformed JSON"),
    ({"text": "hi", "foo": 1}, 400, "'foo'"),
    ({}, 400, "text and input_ids"),
    ({"text": "hi", "input_ids": [1]}, 400, "exactly one"),
    ({"text": 5}, 400, "text must be"),
    ({"text": []}, 400, "text must be"),
    ({"text": ""}, 400, "empty"),
    ({"input_ids": [1, "a"]}, 400, "input_ids"),
    ({"input_ids": [10**9]}, 400, "token id"),
    ({"input_ids": []}, 400, "empty"),
    ({"text": "hi", "sampling_params": "fast"}, 400, "sampling_params must be an object"),
    ({"text": "hi", "sampling_params": {"temperature": "hot"}}, 400, "temperature"),
    ({"text": "hi", "sampling_params": {"bogus": 1}}, 400, "'bogus'"),
    ({"text": "hi", "sampling_params": {"max_new_tokens": -1}}, 400, "max_new_tokens"),
    ({"text": "hi", "sampling_params": {"max_new_tokens": 9000}}, 400, "context length"),
    ({"text": "hi", "sampling_params": {"top_p": 0}}, 400, "top_p"),
    ({"text": "hi", "sampling_params": {"stop_regex": "("}}, 400, "stop_regex"),
    ({"text": "hi", "sampling_params": {"regex": "("}}, 400, "invalid constraint"),
    ({"text": "hi", "sampling_params": {"json_schema": "{no"}}, 400, "invalid constraint"),
    ({"text": "hi", "sampling_params": {"ebnf": "root ::= x"}}, 400, "EBNF"),
    ({"text": "hi", "sampling_params": [{}, {}]}, 400, "2 entries"),
    ({"text": ["a", "b"], "stream": True}, 400, "stream"),
    ({"text": "hi", "stream": "yes"}, 400, "stream must be a boolean"),
    ({"text": "hi", "return_logprob": 1}, 400, "return_logprob"),
    ({"text": "hi", "top_logprobs_num": -1}, 400, "top_logprobs_num"),
    ({"text": "hi", "image_data": "x.png"}, 400, "image_data"),
    ({"text": "hi", "rid": 5}, 400, "rid"),
    ({"text": "hi", "sampling_params": {"n": 10**30}}, 400, "n must be <="),
    ({"text": "hi", "top_logprobs_num": 10**6}, 400, "top_logprobs_num"),
    ({"text": LONG}, 400, "context length"),
]


@pytest.mark.parametrize(("body", "status", "needle"), BAD, ids=range(len(BAD)))
def test_bad_generate_input(url: str, body, status: int, needle: str) -> None:
    if isinstance(body, bytes):
        r = requests.post(url + "/generate", data=body, timeout=60)
    else:
        r = post(url, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["code"] == status
    ok_request(url)


def test_stream_with_invalid_constraint_is_a_400(url: str) -> None:
    body = {"text": "hi", "stream": True, "sampling_params": {"regex": "[a-"}}
    r = post(url, body)
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith("invalid constraint")


def test_unknown_route_and_method(url: str) -> None:
    r = requests.get(url + "/nope", timeout=30)
    assert r.status_code == 404 and "/nope" in r.json()["error"]["message"]
    r = requests.get(url + "/generate", timeout=30)
    assert r.status_code == 405 and "POST" in r.json()["error"]["message"]


def test_body_size_limit(engine: Engine) -> None:
    with ServerThread(engine, max_request_bytes=1000) as small:
        r = requests.post(small.url + "/generate", json={"text": "x" * 2000}, timeout=30)
        assert r.status_code == 413 and "1000" in r.json()["error"]["message"]
        ok_request(small.url)


def test_api_key(engine: Engine) -> None:
    with ServerThread(engine, api_key="sesame") as srv:
        assert requests.get(srv.url + "/health", timeout=30).status_code == 200
        r = requests.get(srv.url + "/get_model_info", timeout=30)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        bad = {"Authorization": "Bearer nope"}
        assert requests.get(srv.url + "/get_model_info", headers=bad, timeout=30).status_code == 401
        good = {"Authorization": "Bearer sesame"}
        body = {"text": "Hi", "sampling_params": {"max_new_tokens": 1}}
        assert post(srv.url, body, headers=good).status_code == 200
        assert post(srv.url, body, headers={"X-API-Key": "sesame"}).status_code == 200


# ---------------------------------------------------------------------- robustness


def test_disconnect_mid_stream_frees_slots(url: str) -> None:
    body = {
        "text": "Write an endless story.",
        "stream": True,
        "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True},
    }
    sock = raw_post(url, "/generate", body)
    assert b"data:" in read_until(sock, b"\n\n", limit=1 << 16)
    sock.close()
    assert_kv_idle(url)
    ok_request(url)


def test_disconnect_while_waiting_frees_slots(url: str) -> None:
    body = {"text": "Write an endless story.", "sampling_params": {"max_new_tokens": 4000}}
    body["sampling_params"]["ignore_eos"] = True
    sock = raw_post(url, "/generate", body)
    deadline = time.monotonic() + 30
    while requests.get(url + "/server_info", timeout=30).json()["running"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    sock.close()
    assert_kv_idle(url)


def test_concurrent_requests(url: str) -> None:
    results: list[int] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        r = post(url, {"text": f"Item {i}:", "sampling_params": {"max_new_tokens": 4}})
        with lock:
            results.append(r.status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [200] * 16
    assert_kv_idle(url)


def test_stop_with_a_request_in_flight(engine: Engine) -> None:
    srv = ServerThread(engine)
    body = {"text": "Go on forever.", "stream": True}
    body["sampling_params"] = {"max_new_tokens": 4000, "ignore_eos": True}
    sock = raw_post(srv.url, "/generate", body)
    assert b"data:" in read_until(sock, b"\n\n", limit=1 << 16)
    srv.stop()
    sock.close()
    engine.wait_idle(timeout=30)
    acc = engine.check_kv_invariant()
    assert acc["protected"] == 0 and acc["owned_by_requests"] == 0
