"""Faults against the real server and engine: each followed by a good request and the KV
idle invariant. A compile that fails or overruns, the context limit, a stop string never
met, retraction under KV pressure, a cache flush during traffic, pathological constraints
bounded in time and memory. (SIGTERM during traffic: tests/test_reliability_load.py.)"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from server_util import assert_kv_idle, sse_json

from backend.engine import Engine
from backend.server import ServerThread

CONTEXT = 512
COMPILE_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    """A small KV pool (retraction comes quickly), a short context and compile limit."""
    eng = Engine(
        max_total_tokens=560,
        context_length=CONTEXT,
        constraint_compile_timeout=COMPILE_TIMEOUT_S,
        num_threads=1,
    )
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def url(engine: Engine) -> Iterator[str]:
    with ServerThread(engine) as srv:
        yield srv.url


@pytest.fixture(autouse=True)
def still_serving(url: str) -> Iterator[None]:
    """After every test: a good request works and the idle KV invariant holds."""
    yield
    assert generate(url, "Hello", max_new_tokens=2).status_code == 200
    assert_kv_idle(url)


def generate(url: str, text: str | list[str], **params: object) -> requests.Response:
    body = {"text": text, "sampling_params": {"temperature": 0, **params}}
    return requests.post(url + "/generate", json=body, timeout=300)


def error_message(r: requests.Response, status: int = 400) -> str:
    assert r.status_code == status, r.text
    return r.json()["error"]["message"]


def rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024


# ---------------------------------------------------------------------- faults


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"regex": "(unclosed"}, "invalid constraint"),
        ({"regex": r"(a)\1"}, "invalid constraint"),
        ({"json_schema": '{"type": "object", "minContains": 2}'}, "minContains"),
        ({"json_schema": '{"type": "strnig"}'}, "strnig"),
    ],
)
def test_constraint_that_fails_to_compile(url: str, params: dict, needle: str) -> None:
    assert needle in error_message(generate(url, "Hi", max_new_tokens=4, **params))


def test_tokenizer_without_token_bytes_fails_only_constrained_requests() -> None:
    """A tokenizer whose decoder gives no token bytes (a GGUF tokenizer from another
    transformers version once did, and the engine thread died): a constrained request
    finishes with an abort naming the decoder; plain requests still run; no KV leaks."""
    from tokenizers import decoders

    with Engine(max_total_tokens=560, context_length=CONTEXT, num_threads=1) as eng:
        eng.tokenizer.backend_tokenizer.decoder = decoders.WordPiece()
        params = {"temperature": 0, "max_new_tokens": 4}
        [handle] = eng.submit("Year:", {**params, "regex": "[0-9]{4}"})
        out = handle.result(timeout=60)  # lost with the engine thread before: TimeoutError
        reason = out["meta_info"]["finish_reason"]
        assert reason["type"] == "abort" and "WordPiece" in reason["message"], reason
        plain = eng.generate("Hello", params)
        assert plain["meta_info"]["finish_reason"]["type"] == "length"
        eng.wait_idle()
        eng.check_kv_invariant()


def test_compile_timeout_frees_the_compiler(url: str) -> None:
    """A constraint too big to compile in time fails with a 400 in about the time limit,
    other requests run meanwhile, and the compiler is free again right after."""
    huge = json.dumps({"enum": [f"value number {i}" for i in range(400_000)]})
    with ThreadPoolExecutor(1) as pool:
        start = time.monotonic()
        slow = pool.submit(generate, url, "Pick:", max_new_tokens=4, json_schema=huge)
        assert generate(url, "Meanwhile", max_new_tokens=2).status_code == 200
        message = error_message(slow.result())
    assert "invalid constraint" in message and ("time" in message), message
    assert time.monotonic() - start < COMPILE_TIMEOUT_S + 20
    start = time.monotonic()
    r = generate(url, "Year:", max_new_tokens=6, regex="[0-9]{4}")
    assert r.status_code == 200 and re.fullmatch("[0-9]{4}", r.json()["text"])
    assert time.monotonic() - start < 10


def test_context_limit(url: str, engine: Engine) -> None:
    too_long = "word " * CONTEXT
    assert "context length" in error_message(generate(url, too_long, max_new_tokens=1))
    message = error_message(generate(url, "word " * 400, max_new_tokens=200))
    assert str(CONTEXT) in message and "200" in message
    # a chat request without max_tokens runs into the end of the context
    for units in range(CONTEXT // 4, 0, -4):  # a prompt ending about 24 tokens before it
        messages = [{"role": "user", "content": "Count: " + "1 2 3 " * units}]
        prompt = engine.apply_chat_template(messages, True)
        if len(engine.tokenizer.encode(prompt, add_special_tokens=False)) <= CONTEXT - 24:
            break
    body = {"model": "x", "messages": messages, "ignore_eos": True, "temperature": 0}
    r = requests.post(url + "/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["total_tokens"] == CONTEXT


@pytest.mark.parametrize("stage", ["extend", "decode_logits"])
def test_a_failing_forward_pass_fails_only_its_step(
    url: str, engine: Engine, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    """An exception inside a forward pass (prefill or decode) fails that step's requests with
    an internal error naming it, frees all their KV (also a prefill chunk that was never
    computed, and never twice the slots that requests of one pass share) and drops the
    cached prefixes, which may hold half-written KV; the engine keeps serving (checked
    after every test) and a cached prompt is recomputed."""
    runner = engine.scheduler.runner
    original = getattr(runner, stage)
    calls = 0

    def fail_once(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected fault")
        return original(*args, **kwargs)

    prompt = "Tell me a short story about a lighthouse keeper and his cat."
    generate(url, prompt, max_new_tokens=2)  # now cached
    monkeypatch.setattr(runner, stage, fail_once)
    # after the cached prompt, " Chapter" is uncached and shared: computed once in the pass
    batch = [prompt + f" Chapter {n}." for n in ("one", "two", "three")]
    r = generate(url, batch, max_new_tokens=4, ignore_eos=True)
    assert r.status_code == 500 and "injected fault" in r.json()["error"]["message"], r.text
    assert engine.get_stats()["kv_slots"]["evictable"] == 0
    engine.check_kv_invariant()  # also: no slot freed twice
    again = generate(url, prompt, max_new_tokens=4).json()
    assert again["meta_info"]["cached_tokens"] == 0


def test_a_failing_queued_operation_leaves_the_engine_serving(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception in an operation the engine thread runs between steps (here an abort)
    goes through the same recovery as a failed step (requests in flight fail with an
    internal error, tested above) instead of killing the thread: later requests run."""

    raised = threading.Event()

    def abort(rid: str, message: str = "aborted") -> bool:
        raised.set()
        raise RuntimeError("injected fault")

    monkeypatch.setattr(engine.scheduler, "abort", abort)
    engine.abort("some-request")
    assert raised.wait(60)
    monkeypatch.undo()
    [handle] = engine.submit("Hello", {"temperature": 0, "max_new_tokens": 2})
    out = handle.result(timeout=60)  # a dead engine thread: TimeoutError
    assert out["meta_info"]["finish_reason"]["type"] == "length"
    engine.check_kv_invariant()


def test_stop_string_never_met(url: str) -> None:
    params = {"max_new_tokens": 12, "ignore_eos": True, "stop": ["QQZZQQ"], "stop_regex": ["@@@"]}
    out = generate(url, "Tell me about cats.", **params).json()
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 12}
    assert out["meta_info"]["completion_tokens"] == 12
    body = {"text": "Tell me about cats.", "stream": True}
    body["sampling_params"] = {"temperature": 0, **params}
    with requests.post(url + "/generate", json=body, stream=True, timeout=300) as r:
        events, done = sse_json(r)
    assert done and events[-1]["text"] == out["text"]


def test_retraction_under_kv_pressure(url: str) -> None:
    """Five 90-token prompts with 30 new tokens each need 600 KV slots of 560 (admission
    reserves only part of the new tokens): one is retracted and resumed, and every output
    equals the one it gets alone (greedy)."""
    prompts = [[1000 + (i * 997 + j * 31) % 40000 for j in range(90)] for i in range(5)]
    params = {"temperature": 0, "max_new_tokens": 30, "ignore_eos": True}

    def run(ids: list[int]) -> requests.Response:
        body = {"input_ids": ids, "sampling_params": params}
        return requests.post(url + "/generate", json=body, timeout=300)

    alone = run(prompts[0]).json()
    before = requests.get(url + "/server_info", timeout=30).json()["retractions"]
    with ThreadPoolExecutor(len(prompts)) as pool:
        outs = list(pool.map(run, prompts))
    after = requests.get(url + "/server_info", timeout=30).json()["retractions"]
    assert after > before
    for r in outs:
        assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 30
    assert outs[0].json()["output_ids"] == alone["output_ids"]


def test_flush_during_traffic(url: str) -> None:
    """A flush while requests run is refused with a 400; the requests are unharmed."""
    refused = []

    def flush_until_done(stop: threading.Event) -> None:
        while not stop.is_set():
            r = requests.post(url + "/flush_cache", timeout=30)
            if r.status_code == 400:
                refused.append(r.json()["error"]["message"])
            time.sleep(0.1)

    prompts = [f"Story {i}:" for i in range(4)]
    params = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
    batch = requests.post(url + "/generate", json={"text": prompts, "sampling_params": params})
    want = [out["text"] for out in batch.json()]
    stop = threading.Event()
    flusher = threading.Thread(target=flush_until_done, args=(stop,))
    flusher.start()
    with ThreadPoolExecutor(4) as pool:
        got = list(
            pool.map(lambda p: generate(url, p, max_new_tokens=24, ignore_eos=True), prompts)
        )
    stop.set()
    flusher.join()
    assert [r.json()["text"] for r in got] == want
    assert refused and all("running" in m for m in refused)
    assert_kv_idle(url)
    assert requests.post(url + "/flush_cache", timeout=30).status_code == 200


# ---------------------------------------------------------------------- pathological constraints


def nested(depth: int, keyword: str) -> str:
    """A JSON-schema text with `keyword` nested `depth` deep (built as text: too deep for
    `json.dumps`)."""
    schema = '{"type": "string"}'
    for _ in range(depth):
        schema = f'{{"{keyword}": [{schema}, {{"type": "integer"}}]}}'
    return schema


PATHOLOGICAL_ERRORS = [
    ("anyOf-200", {"json_schema": nested(200, "anyOf")}, "too many anyOf"),
    ("oneOf-200", {"json_schema": nested(200, "oneOf")}, "oneOf"),
    ("anyOf-5000", {"json_schema": nested(5000, "anyOf")}, "nested too deeply"),
    ("items-3000", {"json_schema": '{"items": ' * 3000 + "{}" + "}" * 3000}, "nested too deeply"),
    ("enum-1e6", {"json_schema": json.dumps({"enum": list(range(1_000_000))})}, "time"),
    ("regex-depth", {"regex": "(" * 5000 + "a" + ")" * 5000}, "invalid constraint"),
]


@pytest.mark.parametrize(
    ("params", "needle"),
    [c[1:] for c in PATHOLOGICAL_ERRORS],
    ids=[c[0] for c in PATHOLOGICAL_ERRORS],
)
def test_pathological_constraint_fails_clearly(url: str, params: dict, needle: str) -> None:
    start, rss = time.monotonic(), rss_mb()
    message = error_message(generate(url, "Answer:", max_new_tokens=8, **params))
    assert message.startswith("invalid constraint") and needle in message, message
    assert time.monotonic() - start < COMPILE_TIMEOUT_S + 15
    assert rss_mb() - rss < 500


@pytest.mark.parametrize(
    ("regex", "alphabet"),
    [(r"[ab]*a[ab]{20}", "ab"), (r".*a.{16}", None), (r"(a{1000}){1000}", "a")],
    ids=["exponential-dfa", "exponential-dot", "huge-repeat"],
)
def test_pathological_regex_is_bounded(url: str, regex: str, alphabet: str | None) -> None:
    """Regexes whose full DFA is exponential (or huge) are built lazily: generation is
    bounded by the visited states, and others are served meanwhile."""
    start, rss = time.monotonic(), rss_mb()
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(generate, url, "Answer:", max_new_tokens=12, regex=regex)
        assert generate(url, "Meanwhile", max_new_tokens=2).status_code == 200
        r = slow.result()
    assert r.status_code == 200, r.text
    text = r.json()["text"]
    assert alphabet is None or set(text) <= set(alphabet)
    assert time.monotonic() - start < 60 and rss_mb() - rss < 500


@pytest.mark.parametrize("pattern", [r"(a+)+b", r"(\s*\w+)*$", r"(x|y+)*z"])
def test_catastrophic_stop_regex_is_refused(url: str, pattern: str) -> None:
    """Stop regexes are searched with `re` on the engine thread: a backtracking bomb would
    stall every request, so it is refused up front with a 400 naming it."""
    message = error_message(generate(url, "aaaa", max_new_tokens=4, stop_regex=[pattern]))
    assert "stop_regex" in message and "exponential" in message, message


def test_recursive_ref_schema(url: str) -> None:
    schema = {
        "$defs": {"node": {"type": "object", "properties": {"child": {"$ref": "#/$defs/node"}}}},
        "$ref": "#/$defs/node",
    }
    r = generate(url, "A tree:", max_new_tokens=24, json_schema=json.dumps(schema))
    assert r.status_code == 200, r.text
    out = r.json()
    if out["meta_info"]["finish_reason"]["type"] == "stop":
        import jsonschema

        jsonschema.validate(json.loads(out["text"]), schema)
