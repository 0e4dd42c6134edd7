"""The language's ``OpenAI`` backend with the real ``openai`` package, against our own
OpenAI-compatible server on the embedded model (chat and completion modes)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

import sgl_dsl as sgl
from backend.server.runner import ServerThread

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(engine) as srv:
        yield srv


@pytest.fixture(scope="module")
def chat_backend(server):
    return sgl.OpenAI("SmolLM2-135M-Instruct", base_url=server.url + "/v1", api_key="none")


@pytest.fixture(scope="module")
def completion_backend(server):
    return sgl.OpenAI(
        "SmolLM2-135M-Instruct", is_chat_model=False, base_url=server.url + "/v1", api_key="none"
    )


@pytest.fixture(autouse=True)
def kv_invariant(idle_engine):
    yield


@sgl.function
def chat_program(s, question):
    s += sgl.system("You are terse.")
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=20))
    s += sgl.user("Is that correct? Answer yes or no.")
    s += sgl.assistant(sgl.select("verdict", choices=["yes", "no"]))
    s += sgl.user("Now the person Bob, 41, as JSON.")
    s += sgl.assistant(sgl.gen("person", json_schema=SCHEMA, max_tokens=40))
    s += sgl.user("A year:")
    s += sgl.assistant(sgl.gen("year", regex=r"(19|20)[0-9]{2}", max_tokens=6))


def test_chat_program_matches_the_local_engine(engine, chat_backend):
    remote = chat_program.run(question="What is 2+2?", temperature=0, backend=chat_backend)
    local = chat_program.run(question="What is 2+2?", temperature=0, backend=engine)
    assert remote.error() is None, remote.error()
    for name in ("answer", "verdict", "person", "year"):
        assert remote[name] == local[name], name
    jsonschema.validate(json.loads(remote["person"]), SCHEMA)
    assert re.fullmatch(r"(19|20)[0-9]{2}", remote["year"])
    assert remote.messages() == local.messages()
    assert chat_backend.token_usage.prompt_tokens > 0 < chat_backend.token_usage.completion_tokens


def test_chat_n_streaming_and_logprobs(chat_backend):
    @sgl.function
    def sampled(s):
        s += sgl.user("Name a fruit.")
        s += sgl.assistant(sgl.gen("fruit", max_tokens=8, n=3, temperature=1.0))

    state = sampled.run(backend=chat_backend)
    assert isinstance(state["fruit"], list) and len(state["fruit"]) == 3

    @sgl.function
    def story(s):
        s += sgl.user("Tell a short story.")
        s += sgl.assistant(sgl.gen("story", max_tokens=16, return_logprob=True))

    plain = story.run(backend=chat_backend, temperature=0)
    assert len(plain.get_meta_info("story")["output_token_logprobs"]) >= 1
    streamed = story.run(backend=chat_backend, temperature=0, stream=True)
    pieces = list(streamed.text_iter("story"))
    assert len(pieces) > 1 and "".join(pieces) == plain["story"]


def test_chat_gen_outside_assistant_needs_speculation(chat_backend):
    @sgl.function
    def loose(s):
        s += sgl.user("Hi")
        s += sgl.gen("x", max_tokens=4)

    error = loose.run(backend=chat_backend).error()
    assert isinstance(error, RuntimeError) and "num_api_spec_tokens" in str(error)


def test_api_speculative_execution_on_a_chat_model(chat_backend):
    """Two gens and a fill in one assistant turn cost one API call: the turn's completion is
    split at the first gen's stop, the fill must follow, the rest goes to the second gen."""

    @sgl.function
    def plain(s):
        s += sgl.user("Describe the sun in two sentences.")
        s += sgl.assistant(sgl.gen("whole", max_tokens=48))

    @sgl.function(num_api_spec_tokens=48)
    def speculative(s):
        s += sgl.user("Describe the sun in two sentences.")
        with s.assistant():
            s += sgl.gen("first", stop=".") + "." + sgl.gen("rest")

    whole = plain.run(backend=chat_backend, temperature=0)["whole"]
    calls = chat_backend.token_usage.prompt_tokens
    state = speculative.run(backend=chat_backend, temperature=0)
    assert state.error() is None, state.error()
    first, _, rest = whole.partition(".")
    assert (state["first"], state["rest"]) == (first, rest)
    assert state.messages()[-1]["content"] == whole.lstrip()
    one_call = chat_backend.token_usage.prompt_tokens - calls
    assert 0 < one_call < 2 * len(state.text())  # a single request's prompt


def test_completion_model_few_shot_and_speculation(engine, completion_backend):
    @sgl.function
    def few_shot(s, q):
        s += "Q: What is frozen water?\nA: Ice\nQ: " + q + "\nA:"
        s += sgl.gen("a", max_tokens=8, stop="\n")
        s += "\nQ: Is that right? A:" + sgl.select("ok", choices=[" yes", " no"])

    remote = few_shot.run(q="What do bees make?", temperature=0, backend=completion_backend)
    local = few_shot.run(q="What do bees make?", temperature=0, backend=engine)
    assert remote["a"] == local["a"]
    assert remote["ok"] in (" yes", " no")

    @sgl.function(num_api_spec_tokens=32)
    def spec(s):
        s += "A list of two animals:\n1."
        s += sgl.gen("first", stop="\n")
        s += "\n2."
        s += sgl.gen("second", stop="\n")

    state = spec.run(backend=completion_backend, temperature=0)
    assert state.error() is None, state.error()
    assert state.text() == "A list of two animals:\n1." + state["first"] + "\n2." + state["second"]


def test_server_errors_fail_only_the_program(chat_backend):
    @sgl.function
    def bad(s):
        s += sgl.user("JSON please")
        s += sgl.assistant(sgl.gen("j", json_schema={"type": "integer", "minimum": "x"}))

    error = bad.run(backend=chat_backend).error()
    assert error is not None and "minimum" in str(error)
