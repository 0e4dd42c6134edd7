"""The real ``sglang`` frontend package (0.5.10.post1) against our server: SGLang programs,
unchanged, through ``sglang.RuntimeEndpoint``."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import sglang
from server_util import assert_kv_idle

from backend.server.runner import ServerThread

FEW_SHOT = (
    "Answer each question with one word.\n"
    "Q: What color is the sky on a clear day?\nA: Blue\n"
    "Q: What is frozen water called?\nA: Ice\n"
    "Q: What animal says moo?\nA: Cow\n"
)
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(engine) as srv:
        yield srv
        assert_kv_idle(srv.url)


@pytest.fixture(scope="module")
def endpoint(server):
    backend = sglang.RuntimeEndpoint(server.url)
    sglang.set_default_backend(backend)
    return backend


@sglang.function
def few_shot(s, question):
    s += FEW_SHOT + "Q: " + question + "\nA:"
    s += sglang.gen("answer", max_tokens=6, stop="\n", temperature=0)


def test_run_batch_matches_the_engine(engine, endpoint):
    questions = ["What do bees make?", "What is the opposite of hot?", "What color is grass?"]
    states = few_shot.run_batch([{"question": q} for q in questions])
    for q, state in zip(questions, states):
        prompt = FEW_SHOT + "Q: " + q + "\nA:"
        expected = engine.generate(prompt, {"temperature": 0, "max_new_tokens": 6, "stop": "\n"})
        assert state["answer"] == expected["text"]
    assert states[-1].get_meta_info("answer")["cached_tokens"] > 0


def test_select_regex_and_json_schema(endpoint):
    @sglang.function
    def structured(s):
        s += "Is fire hot? Answer:"
        s += sglang.select("hot", choices=[" yes", " no", " maybe"])
        s += "\nA date: " + sglang.gen("date", regex=r"20[0-9]{2}-[01][0-9]-[0-3][0-9]")
        s += "\nBob is 41. As JSON: "
        s += sglang.gen("person", json_schema=json.dumps(SCHEMA), max_tokens=40, temperature=0)

    state = structured.run()
    assert state["hot"] in (" yes", " no", " maybe")
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", state["date"])
    jsonschema.validate(json.loads(state["person"]), SCHEMA)


def test_fork_join_and_streaming(endpoint):
    @sglang.function
    def tips(s):
        s += "Two tips for sleeping well.\n"
        forks = s.fork(2)
        for i, f in enumerate(forks):
            f += f"Tip {i + 1}:" + sglang.gen("tip", max_tokens=8, stop="\n", temperature=0)
        forks.join()

    state = tips.run()
    assert len(state["tip"]) == 2 and all(isinstance(t, str) for t in state["tip"])

    streamed = few_shot.run(question="What do cows drink?", stream=True)
    text = "".join(streamed.text_iter())
    assert text == few_shot.run(question="What do cows drink?").text()
