"""The language on the real embedded model: every primitive, run/run_batch/streaming/async,
fork/join, constraints, select against transformers' log-likelihoods, errors, trace/compile.

Programs are written exactly as SGLang programs are (``import sgl_dsl as sgl``)."""

from __future__ import annotations

import asyncio
import json
import re
import threading

import jsonschema
import pydantic
import pytest
import torch

import sgl_dsl as sgl
from backend.server.runner import ServerThread
from sgl_dsl.reasoning import split_reasoning

FEW_SHOT = (
    "Answer each question with one word.\n"
    "Q: What color is the sky on a clear day?\nA: Blue\n"
    "Q: What is frozen water called?\nA: Ice\n"
    "Q: What animal says moo?\nA: Cow\n"
    "Q: What do bees make?\nA: Honey\n"
)


@pytest.fixture(scope="module", params=["engine", "runtime_endpoint"])
def backend(request, engine):
    """Each program runs on the in-process engine and, through our HTTP server on the same
    engine, on the SGLang-native ``RuntimeEndpoint``."""
    if request.param == "engine":
        yield engine
        return
    with ServerThread(engine) as server:
        endpoint = sgl.RuntimeEndpoint(server.url)
        yield endpoint
        endpoint.shutdown()


@pytest.fixture(autouse=True)
def default_backend(backend):
    sgl.set_default_backend(backend)
    yield
    sgl.global_config.default_backend = None


@pytest.fixture(autouse=True)
def kv_invariant(idle_engine):
    """Every test leaves the engine idle with the KV accounting invariant intact."""
    yield


@sgl.function
def few_shot_qa(s, question):
    s += FEW_SHOT
    s += "Q: " + question + "\nA:"
    s += sgl.gen("answer", max_tokens=8, stop="\n", temperature=0)


@sgl.function
def chat(s, q1, q2):
    s += sgl.system("You are a terse assistant.")
    s += sgl.user(q1)
    s += sgl.assistant(sgl.gen("a1", max_tokens=16, temperature=0))
    with s.user():
        s += q2
    with s.assistant():
        s += sgl.gen("a2", max_tokens=16, temperature=0)


def _greedy(engine, prompt: str, **params) -> str:
    params = {"temperature": 0, "max_new_tokens": 8, **params}
    return engine.generate(prompt, params)["text"]


def test_run_matches_the_engine_on_the_same_prompt(engine):
    state = few_shot_qa.run(question="What is the opposite of hot?")
    answer = state["answer"]
    assert answer == _greedy(engine, FEW_SHOT + "Q: What is the opposite of hot?\nA:", stop="\n")
    assert state.text().endswith(answer)
    meta = state.get_meta_info("answer")
    assert meta["prompt_tokens"] > 50 and meta["completion_tokens"] >= 1


def test_run_batch_shares_the_prefix_through_the_cache(engine):
    engine.flush_cache()
    questions = ["What is the opposite of hot?", "What color is grass?", "What do cows drink?"]
    states = few_shot_qa.run_batch([{"question": q} for q in questions], progress_bar=True)
    assert [s["answer"] for s in states] == [
        few_shot_qa.run(question=q)["answer"] for q in questions
    ]
    prefix_tokens = len(engine.tokenizer.encode(FEW_SHOT))
    cached = [s.get_meta_info("answer")["cached_tokens"] for s in states]
    assert all(c >= prefix_tokens - 1 for c in cached), cached
    positional = few_shot_qa.run_batch([[q] for q in questions[:2]])
    assert [s["answer"] for s in positional] == [s["answer"] for s in states[:2]]
    streamed = list(few_shot_qa.run_batch([[q] for q in questions], generator_style=True))
    assert [s["answer"] for s in streamed] == [s["answer"] for s in states]


def test_roles_produce_the_models_own_chat_template(engine):
    state = chat.run(q1="Name a color.", q2="Name another one.")
    messages = state.messages()
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[1]["content"] == "Name a color."
    assert state.text() == engine.apply_chat_template(messages, add_generation_prompt=False)
    assert state["a1"] and state["a2"] and "<|im_end|>" not in state["a1"]


def test_default_system_prompt_is_inserted_like_the_template(engine):
    @sgl.function
    def one_turn(s):
        s += sgl.user_begin() + "Hi" + sgl.user_end()
        s += sgl.assistant_begin() + sgl.gen("a", max_tokens=4, temperature=0) + sgl.assistant_end()

    state = one_turn.run()
    assert state.messages()[0]["role"] == "system"
    assert state.text() == engine.apply_chat_template(state.messages(), add_generation_prompt=False)


def _transformers_choice_logprobs(hf_model, tok, prompt: str, choice: str, bos: bool = False):
    """log p(choice tokens | prompt), token by token, from a plain transformers forward."""
    prefix = tok.encode(prompt)
    full = tok.encode(prompt + choice)
    start = next((i for i, (a, b) in enumerate(zip(prefix, full)) if a != b), len(prefix))
    if bos:
        full, start = [tok.bos_token_id, *full[start:]], 1
    with torch.no_grad():
        logits = hf_model(torch.tensor([full])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [logprobs[i - 1, full[i]].item() for i in range(start, len(full))]


@pytest.mark.parametrize(
    "method",
    [
        sgl.token_length_normalized,
        sgl.greedy_token_selection,
        sgl.unconditional_likelihood_normalized,
    ],
)
def test_select_agrees_with_transformers_log_likelihoods(hf_model, tok, method):
    prompt = "The capital of France is"
    choices = [" Paris", " London", " a city in Europe", " Berlin"]

    @sgl.function
    def pick(s):
        s += prompt
        s += sgl.select("city", choices=choices, choices_method=method)

    state = pick.run()
    meta = state.get_meta_info("city")
    cond = [_transformers_choice_logprobs(hf_model, tok, prompt, c) for c in choices]
    means = [sum(x) / len(x) for x in cond]
    assert meta["normalized_prompt_logprobs"] == pytest.approx(means, abs=1e-3)
    if method is sgl.unconditional_likelihood_normalized:
        uncond = [
            _transformers_choice_logprobs(hf_model, tok, prompt, c, bos=True) for c in choices
        ]
        scores = [sum(a - b for a, b in zip(c, u)) / len(c) for c, u in zip(cond, uncond)]
        assert meta["normalized_unconditional_prompt_logprobs"] == pytest.approx(scores, abs=1e-3)
    elif method is sgl.greedy_token_selection:
        scores = means  # the greedy walk is checked below through its own matrix
        matrix = meta["greedy_logprob_matrix"]
        assert [row[: len(c)] for row, c in zip(matrix, cond)] == [
            pytest.approx(c, abs=1e-3) for c in cond
        ]
    else:
        scores = means
    if method is not sgl.greedy_token_selection:
        assert state["city"] == choices[max(range(len(choices)), key=lambda i: scores[i])]
    assert state.text() == prompt + state["city"]


def test_gen_with_choices_is_select_and_zero_logprobs_are_kept():
    @sgl.function
    def pick(s):
        s += "Is water wet? Answer yes or no:"
        s += sgl.gen("ans", choices=[" yes", " no"])

    meta = pick.run().get_meta_info("ans")
    assert len(meta["input_token_logprobs"]) == 2
    assert all(
        len(t) >= 1 and all(x[0] is not None for x in t) for t in meta["input_token_logprobs"]
    )


def test_dtype_shorthands_and_regex():
    @sgl.function
    def typed(s):
        s += "Two plus two equals "
        s += sgl.gen_int("i", max_tokens=6)
        s += "\nPi is about "
        s += sgl.gen("f", dtype=float, max_tokens=8)
        s += "\nIs the sun hot? "
        s += sgl.gen("b", dtype=bool, max_tokens=3)
        s += "\nA word in quotes: "
        s += sgl.gen_string("w", max_tokens=12)
        s += "\nAn IP address: "
        s += sgl.gen(
            "ip",
            regex=r"((25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(25[0-5]|2[0-4]\d|1?\d?\d)",
            max_tokens=20,
        )

    state = typed.run(temperature=0)
    assert re.fullmatch(r"[-+]?[0-9]+[ \n]*", state["i"]), state["i"]
    int(state["i"])
    float(state["f"])
    assert state["b"] in ("True", "False")
    assert re.fullmatch(r"\"[\w\d\s]*\"", state["w"]), state["w"]
    assert re.fullmatch(r"((25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(25[0-5]|2[0-4]\d|1?\d?\d)", state["ip"])


class Person(pydantic.BaseModel):
    name: str
    age: int


PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


@pytest.mark.parametrize("schema", [PERSON_SCHEMA, json.dumps(PERSON_SCHEMA), Person])
def test_json_schema_as_dict_string_and_pydantic(schema):
    @sgl.function
    def extract(s):
        s += "Alice is a 30 year old engineer. As JSON: "
        s += sgl.gen("json", json_schema=schema, max_tokens=48, temperature=0)

    value = json.loads(extract.run()["json"])
    jsonschema.validate(
        value, PERSON_SCHEMA if schema is not Person else Person.model_json_schema()
    )
    if schema is Person:
        Person.model_validate(value)


def test_tool_use_reads_a_value_mid_program_and_calls_python():
    calls = []

    def calculator(expression: str) -> str:
        calls.append(expression)
        return str(eval(expression, {"__builtins__": {}}))  # digits and operators only

    @sgl.function
    def tool_use(s):
        s += "Write an arithmetic expression that adds 17 and 25: "
        s += sgl.gen("expr", regex=r"[0-9]{1,3} ?\+ ?[0-9]{1,3}", max_tokens=10, temperature=0)
        result = calculator(s["expr"])
        s += "\nResult: " + result + "\nSo the answer is"
        s += sgl.gen("final", max_tokens=6, temperature=0)
        return result

    state = tool_use.run()
    assert calls == [state["expr"]]
    assert state.ret_value == str(eval(state["expr"]))
    assert "Result: " + state.ret_value in state.text()


def test_fork_join_gather_and_concatenate(engine):
    @sgl.function
    def tips(s, topic):
        s += "Give one tip about " + topic + ".\n"
        forks = s.fork(2)
        forks += lambda i: f"Tip {i + 1}:"
        forks += sgl.gen("tip", max_tokens=8, stop="\n", temperature=0)
        forks.join()
        s += "Tips gathered.\n"
        more = s.fork(2)
        more += [" First:", " Second:"]
        more += sgl.gen("extra", max_tokens=4, temperature=0)
        more.join("concate_and_append")

    state = tips.run(topic="sleep")
    base = "Give one tip about sleep.\n"
    assert state["tip"] == [_greedy(engine, base + f"Tip {i}:", stop="\n") for i in (1, 2)]
    text = state.text()
    assert text.startswith(base + "Tips gathered.\n First:")
    assert " Second:" in text and "Tip 1:" not in text
    assert state.get_meta_info("tip")[0]["completion_tokens"] >= 1


def test_copy_var_scope_and_ret_value():
    @sgl.function
    def scoped(s):
        s += "A: "
        with s.var_scope("span"):
            s += "one two"
        with s.copy() as c:
            c += " three"
            c += sgl.gen("x", max_tokens=2, temperature=0)
        return 42

    state = scoped.run()
    assert state["span"] == "one two" and state.ret_value == 42
    assert state.text() == "A: one two"
    assert len(state["x"]) == 1


def test_streaming_text_iter_and_async_iter_with_logprobs():
    @sgl.function
    def story(s):
        s += "Once upon a time"
        s += sgl.gen("story", max_tokens=16, temperature=0, return_logprob=True, top_logprobs_num=2)

    reference = story.run()
    state = story.run(stream=True)
    pieces = list(state.text_iter())
    assert len(pieces) > 2 and "".join(pieces) == reference.text()

    async def consume():
        st = story.run(stream=True)
        out = [item async for item in st.text_async_iter("story", return_meta_data=True)]
        return st, out

    st, items = asyncio.run(consume())
    assert "".join(p for p, _ in items) == reference["story"]
    final_meta = items[-1][1]
    assert len(final_meta["output_token_logprobs"]) == final_meta["completion_tokens"]
    assert all(len(t) == 2 for t in final_meta["output_top_logprobs"])
    assert st["story"] == reference["story"]


def test_min_tokens_stop_and_n(engine):
    @sgl.function
    def sampled(s):
        s += "List fruits:\n1."
        s += sgl.gen("short", max_tokens=12, stop="\n", temperature=0)
        s += "\n2."
        s += sgl.gen("long", min_tokens=6, max_tokens=6, stop=".", temperature=0, ignore_eos=True)
        s += "\n3."
        s += sgl.gen("until", max_tokens=16, stop_regex=r"[,.\n]", temperature=0)
        s += "\nMore:"
        s += sgl.gen("many", n=3, max_tokens=5, temperature=1.0)

    state = sampled.run()
    assert "\n" not in state["short"]
    assert state.get_meta_info("long")["completion_tokens"] == 6
    assert not re.search(r"[,.\n]", state["until"])
    reason = state.get_meta_info("until")["finish_reason"]
    assert reason in ({"type": "stop", "matched": r"[,.\n]"}, {"type": "length", "length": 16})
    assert isinstance(state["many"], list) and len(state["many"]) == 3
    assert len(state.get_meta_info("many")) == 3
    assert state.text().endswith("More:" + state["many"][0])


def test_invalid_regex_fails_at_construction():
    with pytest.raises(re.error):
        sgl.gen("x", regex="(unclosed")


def test_invalid_schema_fails_only_its_program():
    @sgl.function
    def maybe_bad(s, schema):
        s += "JSON: "
        s += sgl.gen("j", json_schema=schema, max_tokens=16, temperature=0)

    good = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    bad = {"type": "object", "properties": {"a": {"type": "integer", "minimum": "zero"}}}
    states = maybe_bad.run_batch([{"schema": good}, {"schema": bad}, {"schema": good}])
    assert states[0].error() is None and states[2].error() is None
    json.loads(states[0]["j"])
    assert isinstance(states[1].error(), ValueError) and "constraint" in str(states[1].error())
    with pytest.raises(RuntimeError, match="failed"):
        states[1]["j"]


def test_body_exception_is_raised_and_recorded():
    @sgl.function
    def broken(s):
        s += "x"
        raise KeyError("boom")

    with pytest.raises(KeyError):
        broken.run()


def test_image_on_a_text_only_model_is_a_clear_error():
    @sgl.function
    def look(s):
        s += sgl.user(sgl.image("cat.png") + "What is this?")

    error = look.run().error()
    assert isinstance(error, ValueError) and "text-only" in str(error)


def test_separate_reasoning():
    assert split_reasoning("<think>hmm</think> 42") == ("hmm", "42")
    assert split_reasoning("plain") == ("", "plain")
    assert split_reasoning("cut short", "deepseek-r1") == ("", "cut short")
    assert split_reasoning("why</think>yes", "deepseek-r1") == ("why", "yes")

    @sgl.function
    def think(s):
        s += "Say OK: <think>"
        s += sgl.separate_reasoning(
            sgl.gen("a", regex=r"Easy\.</think> OK", max_tokens=12), model_type="deepseek-r1"
        )

    state = think.run()
    assert state["a_reasoning_content"] == "Easy."
    assert state["a"] == "OK"
    assert state.text() == "Say OK: <think>OK"


def test_run_async_and_awaitable_states():
    async def main():
        states = await asyncio.gather(
            *(few_shot_qa.run_async(question=q) for q in ["What is 1+1?", "What is ice?"])
        )
        again = await few_shot_qa.run(question="What is 1+1?")
        return states, again

    states, again = asyncio.run(main())
    assert states[0]["answer"] == again["answer"]


def test_hundreds_of_states_share_threads():
    before = threading.active_count()
    peak = [before]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], threading.active_count())
            stop.wait(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    states = few_shot_qa.run_batch([{"question": f"What is {i}+1?"} for i in range(200)],
                                   num_threads=4, max_new_tokens=2)  # fmt: skip
    stop.set()
    watcher.join()
    assert all(s.error() is None for s in states)
    assert peak[0] - before <= 8, (before, peak[0])


def test_bind_server_info_and_flush_cache(engine):
    bound = few_shot_qa.bind(question="What is frozen water called?")
    assert bound.run()["answer"].strip() == "Ice"
    info = sgl.get_server_info()
    assert info["model_path"] and "cache_hit_rate" in info
    assert sgl.flush_cache() is True


@sgl.function
def skeleton(s, topic):
    s += "Write two short points about " + topic + ".\n"
    s += "Outline:"
    s += sgl.gen("outline", max_tokens=10, stop="\n", temperature=0)
    forks = s.fork(2)
    for i, f in enumerate(forks):
        f += "\nExpand point " + str(i + 1) + " of:" + s["outline"] + "\n"
        f += sgl.gen("detail", max_tokens=8, temperature=0)
    forks.join()
    s += "\nFirst detail:" + forks[0]["detail"]
    s += "\nSummary:" + sgl.gen("summary", max_tokens=6, temperature=0)


def test_trace_compile_equals_interpreter():
    traced = skeleton.trace()
    kinds = {e[0] for e in traced.edges()}
    assert {"fork", "join", "data"} <= kinds
    assert "stream 1 (forked from stream 0)" in traced.print_graph()
    compiled = skeleton.compile()
    topics = ["tea", "running", "rain"]
    expected = skeleton.run_batch([{"topic": t} for t in topics])
    got = compiled.run_batch([{"topic": t} for t in topics])
    for e, g in zip(expected, got):
        assert g.text() == e.text()
        assert g["detail"] == e["detail"] and g["summary"] == e["summary"]
    assert compiled.run(topic="tea")["summary"] == expected[0]["summary"]


def test_tracing_rejects_host_use_of_symbolic_values():
    @sgl.function
    def fstring(s, name):
        s += f"Hello {name}"

    with pytest.raises(TypeError, match="f-string"):
        fstring.trace()

    @sgl.function
    def branch(s):
        s += "Say yes:"
        s += sgl.gen("x", max_tokens=2)
        if s["x"] == "yes":
            s += "!"

    with pytest.raises(TypeError, match="cannot be traced"):
        branch.compile()
    assert branch.run().error() is None  # the interpreter still runs it


def test_a_template_that_trims_falls_back_to_the_named_template(engine):
    from sgl_dsl.backends.local import LocalBackend

    original = engine.tokenizer.chat_template
    engine.tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    try:
        backend = LocalBackend(engine)
    finally:
        engine.tokenizer.chat_template = original
    assert backend.chat_template.name == "chatml"  # chosen by the model's name (SmolLM2)
