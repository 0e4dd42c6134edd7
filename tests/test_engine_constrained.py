"""Constrained generation end to end on the embedded model: regex, JSON schema, jump-forward."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from backend.engine import Engine
from fsm import Vocabulary, compile_json_schema

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import jsb_data

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Paris", "London", "Tokyo"]},
        "email": {"type": "string", "format": "email"},
    },
    "required": ["name", "age", "city"],
}
GREEDY = {"temperature": 0.0, "max_new_tokens": 96}


@pytest.fixture(scope="module")
def no_jump_engine() -> Iterator[Engine]:
    eng = Engine(max_total_tokens=8192, disable_regex_jump_forward=True)
    yield eng
    eng.shutdown()


def _prompt(engine: Engine, question: str) -> str:
    return engine.apply_chat_template([{"role": "user", "content": question}])


def _steps(engine: Engine) -> int:
    steps = engine.get_stats()["forward_steps"]
    return steps["prefill"] + steps["decode"]


def _check_json(out: dict, schema: dict) -> None:
    reason = out["meta_info"]["finish_reason"]
    if reason["type"] == "length":
        return  # cut short by max_new_tokens: not required to be complete
    assert reason["type"] == "stop", reason
    jsonschema.validate(json.loads(out["text"]), schema)


def test_regex_generation_matches(idle_engine: Engine) -> None:
    patterns = [
        r"[0-9]{4}-[0-9]{2}-[0-9]{2}",
        r"(yes|no), because [a-z ]{5,40}\.",
        r"\+?[0-9]{1,3} [0-9]{3} [0-9]{4}",
        r"(Paris|London|Tokyo)",
    ]
    for pattern in patterns:
        out = idle_engine.generate("Answer: ", {"regex": pattern, **GREEDY})
        assert out["meta_info"]["finish_reason"]["type"] == "stop", out
        assert re.fullmatch(pattern, out["text"]), (pattern, out["text"])


def test_json_schema_generation_validates(idle_engine: Engine) -> None:
    prompt = _prompt(idle_engine, "Describe a person as JSON with name, age, city and email.")
    out = idle_engine.generate(prompt, {"json_schema": PERSON, **GREEDY})
    assert out["meta_info"]["finish_reason"]["type"] == "stop"
    value = json.loads(out["text"])
    jsonschema.validate(value, PERSON)
    assert list(value)[:3] == ["name", "age", "city"]  # declared order


def test_sampled_batch_validates(idle_engine: Engine) -> None:
    prompt = _prompt(idle_engine, "Give me a person as JSON.")
    params = {"json_schema": json.dumps(PERSON), "temperature": 1.0, "max_new_tokens": 96}
    outs = idle_engine.generate([prompt] * 4, [{**params, "seed": s} for s in range(4)])
    for out in outs:
        _check_json(out, PERSON)


def test_benchmark_schemas_validate(idle_engine: Engine) -> None:
    """A sample of real schemas: every completed output validates."""
    vocab = Vocabulary.from_tokenizer(idle_engine.tokenizer)
    cases = [c for c in jsb_data.sample(3, ("Glaiveai2K", "Github_easy", "Kubernetes"))]
    prompts, params, schemas = [], [], []
    for case in cases:
        try:
            compile_json_schema(case.schema, vocab, extra_properties=False)
        except ValueError:
            continue
        prompts.append(_prompt(idle_engine, "Produce a JSON value for this schema."))
        params.append({"json_schema": case.schema, "temperature": 0.0, "max_new_tokens": 160})
        schemas.append(case.schema)
    assert len(schemas) >= 5
    for out, schema in zip(idle_engine.generate(prompts, params), schemas):
        _check_json(out, schema)


def test_jump_forward_saves_steps_and_agrees(idle_engine: Engine, no_jump_engine: Engine) -> None:
    prompt = _prompt(idle_engine, "Describe a person as JSON.")
    results = {}
    for name, eng in (("jump", idle_engine), ("plain", no_jump_engine)):
        eng.wait_idle()
        before = _steps(eng)
        out = eng.generate(prompt, {"json_schema": PERSON, **GREEDY})
        results[name] = (out, _steps(eng) - before)
        _check_json(out, PERSON)
    (jump_out, jump_steps), (plain_out, plain_steps) = results["jump"], results["plain"]
    assert jump_steps < plain_steps
    assert idle_engine.get_stats()["jump_forward_tokens"] > 0
    # Re-tokenized boundaries may change the path; greedy outputs normally agree.
    assert json.loads(jump_out["text"]).keys() == json.loads(plain_out["text"]).keys()


def test_fully_forced_regex_needs_no_decode(idle_engine: Engine) -> None:
    idle_engine.wait_idle()
    before = _steps(idle_engine)
    out = idle_engine.generate("Say it: ", {"regex": "The answer is 42\\.", **GREEDY})
    assert out["text"] == "The answer is 42."
    assert out["meta_info"]["finish_reason"]["type"] == "stop"
    assert _steps(idle_engine) == before  # jump-forward wrote everything


def test_length_cut_reports_length(idle_engine: Engine) -> None:
    out = idle_engine.generate("Count: ", {"regex": "[a-z]{50,60}", "max_new_tokens": 3})
    assert out["meta_info"]["finish_reason"]["type"] == "length"
    assert re.fullmatch("[a-z]*", out["text"])


def test_streaming_constrained_text(idle_engine: Engine) -> None:
    prompt = _prompt(idle_engine, "A person as JSON.")
    pieces = [
        chunk["text"]
        for chunk in idle_engine.stream(prompt, {"json_schema": PERSON, **GREEDY}, incremental=True)
    ]
    full = idle_engine.generate(prompt, {"json_schema": PERSON, **GREEDY})
    assert "".join(pieces) == full["text"]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"regex": "(ab"}, "missing ')'"),
        ({"regex": r"(a)\1"}, "backreferences"),
        ({"json_schema": "{not json"}, "not valid JSON"),
        ({"json_schema": {"type": "array", "uniqueItems": True}}, "uniqueItems"),
        ({"json_schema": {"$ref": "https://example.com/s.json"}}, "remote $ref"),
        ({"json_schema": {"type": "strnig"}}, "unknown type"),
    ],
)
def test_bad_constraint_fails_only_that_request(
    idle_engine: Engine, params: dict, message: str
) -> None:
    bad, good = idle_engine.generate(
        ["Hello", "Hello"], [{**params, "max_new_tokens": 8}, {"regex": "[0-9]+", **GREEDY}]
    )
    reason = bad["meta_info"]["finish_reason"]
    assert reason["type"] == "abort" and message in reason["message"], reason
    assert re.fullmatch("[0-9]+", good["text"])


def test_constraint_parameter_errors(idle_engine: Engine) -> None:
    with pytest.raises(ValueError, match="at most one"):
        idle_engine.generate("x", {"regex": "a", "json_schema": "{}"})
    with pytest.raises(ValueError, match="EBNF"):
        idle_engine.generate("x", {"ebnf": "root ::= 'a'"})
    with pytest.raises(ValueError, match="regex must be a string"):
        idle_engine.generate("x", {"regex": 5})


def test_abort_constrained_requests(idle_engine: Engine) -> None:
    """Abort while compiling and while generating; the KV invariant is checked after."""
    for started in (False, True):
        params = {"regex": "[a-z]{300}", "max_new_tokens": 300}
        (handle,) = idle_engine.submit("Go: ", params, stream=True)
        if started:
            next(handle.deltas())
        idle_engine.abort(handle.rid)
        out = handle.result(timeout=60)
        assert out["meta_info"]["finish_reason"]["type"] == "abort"
