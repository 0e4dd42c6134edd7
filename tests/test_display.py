"""The Jupyter and terminal views of program states and of traced graphs."""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser

import pytest

import sgl_dsl as sgl


@pytest.fixture(scope="module", autouse=True)
def default_backend(engine):
    sgl.set_default_backend(engine)
    yield
    sgl.global_config.default_backend = None


class _Collect(HTMLParser):
    """Well-formedness check plus the classes and texts seen."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.classes: list[str] = []
        self.titles: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.classes += (a.get("class") or "").split()
        if a.get("title"):
            self.titles.append(a["title"])
        self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (self.stack, tag)
        self.stack.pop()


@sgl.function
def chat_with_forks(s, q):
    s += sgl.user(q)
    s += sgl.assistant(sgl.gen("answer", max_tokens=8, temperature=0))
    s += sgl.user("Yes or no?")
    s += sgl.assistant(sgl.select("yn", choices=["yes", "no"]))
    forks = s.fork(2)
    forks += lambda i: sgl.user("Idea " + str(i + 1))
    forks += sgl.assistant(sgl.gen("idea", max_tokens=4, temperature=0))
    forks.join()


def parse(markup: str) -> _Collect:
    collect = _Collect()
    collect.feed(markup)
    assert not collect.stack, collect.stack
    return collect


def test_state_html_shows_roles_spans_choices_and_forks():
    state = chat_with_forks.run(q="Hi <there> & co")
    markup = state._repr_html_()
    seen = parse(markup)
    assert seen.classes.count("sgl-turn") >= 5  # system, user, assistant, user, assistant
    assert {"sgl-user", "sgl-assistant", "sgl-gen", "sgl-select", "sgl-forks"} <= set(seen.classes)
    assert "Hi &lt;there&gt; &amp; co" in markup  # escaped
    assert "<|im_start|>" not in markup  # template markup hidden
    assert markup.count('class="sgl-state"') == 3  # the state and its two forks
    select_tip = next(t for t in seen.titles if t.startswith("select"))
    for choice, score in zip(
        ["yes", "no"], state.get_meta_info("yn")["normalized_prompt_logprobs"]
    ):
        assert f"'{choice}': {score:.3f}" in select_tip
    assert re.search(r'class="sgl-gen"[^>]*>' + re.escape(html.escape(state["answer"])), markup)


def test_plain_repr_is_readable():
    state = chat_with_forks.run(q="Hello")
    text = repr(state)
    assert text.startswith("ProgramState(finished, variables: ")
    assert "answer" in text.splitlines()[0] and "[user] Hello" in text


def test_errors_and_running_states_render():
    @sgl.function
    def broken(s):
        s += "x" + sgl.gen("y", json_schema={"type": "integer", "minimum": "no"}, max_tokens=3)

    state = broken.run()
    assert "sgl-error" in state._repr_html_() and "minimum" in state._repr_html_()
    assert repr(state).startswith("ProgramState(error")


def test_traced_graph_renders_as_svg():
    traced = chat_with_forks.trace()
    svg = traced._repr_html_()
    parse(svg)
    assert svg.startswith("<svg") and svg.count("<rect") == sum(
        len(s.nodes) for s in traced.streams
    )
    compiled = chat_with_forks.compile()
    assert compiled._repr_html_() == svg

    @sgl.function
    def reads_fork(s):
        s += "Q:"
        forks = s.fork(2)
        forks += sgl.gen("x", max_tokens=2)
        s += "A:" + forks[1]["x"]

    assert 'stroke-dasharray="4,3"' in reads_fork.trace()._repr_html_()  # the data edge
