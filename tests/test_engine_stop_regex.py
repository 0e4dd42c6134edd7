"""``stop_regex``: validation, the matcher, and the engine on the embedded model (greedy)."""

from __future__ import annotations

import random
import re

import pytest

from backend.engine import Engine
from backend.sampling_params import SamplingParams
from backend.stop_strings import StopMatch, StopStringMatcher

PROMPT = "Once upon a time, in a land far away,"
GREEDY = {"temperature": 0, "max_new_tokens": 40}


@pytest.fixture(scope="module")
def full(engine: Engine) -> dict:
    """The unconstrained greedy output for ``PROMPT``."""
    res = engine.generate(PROMPT, GREEDY)
    assert res["meta_info"]["finish_reason"]["type"] == "length"
    return res


def word_before(text: str, mark: str) -> str:
    """A regex for the word just before the first ``mark``, and the mark (from the output)."""
    word = text[: text.index(mark)].split()[-1]
    assert len(word) >= 2
    return rf"\b{re.escape(word[0])}\w*{re.escape(word[-1])}{re.escape(mark)}"


def check_stopped(res: dict, full: dict, text: str, pattern: str) -> None:
    assert res["text"] == text
    assert res["meta_info"]["finish_reason"] == {"type": "stop", "matched": pattern}
    n = len(res["output_ids"])
    assert 0 < n < len(full["output_ids"]) and res["output_ids"] == full["output_ids"][:n]


# ---------------------------------------------------------------- SamplingParams


def test_params_normalize_stop_regex() -> None:
    assert SamplingParams().stop_regex == []
    assert SamplingParams(stop_regex=None).stop_regex == []
    assert SamplingParams(stop_regex=r"\d+").stop_regex == [r"\d+"]
    assert SamplingParams(stop_regex=("a", "b+")).stop_regex == ["a", "b+"]
    p = SamplingParams.from_dict({"stop_regex": r"\n\n", "stop": "END"})
    assert p.stop_regex == [r"\n\n"] and p.stop == ["END"]
    d = p.to_dict()
    assert d["stop_regex"] == [r"\n\n"]
    d["stop_regex"].append("x")
    assert p.stop_regex == [r"\n\n"] and SamplingParams.from_dict(p.to_dict()) == p
    p.stop_regex = "y"  # type: ignore[assignment]
    p.validate()
    assert p.stop_regex == ["y"]


@pytest.mark.parametrize(
    ("value", "shown"),
    [("(unclosed", "'(unclosed'"), (["ok", "[a-"], "'[a-'"), ("a{99999999999}", "99999999999")],
)
def test_params_reject_invalid_regex(value: object, shown: str) -> None:
    with pytest.raises(ValueError) as err:
        SamplingParams.from_dict({"stop_regex": value})
    assert "stop_regex" in str(err.value) and shown in str(err.value), str(err.value)


@pytest.mark.parametrize("value", [[1], 5, ["a", None], b"x", {"a": 1}, "", ["a", ""]])
def test_params_reject_non_strings(value: object) -> None:
    with pytest.raises(ValueError, match="stop_regex"):
        SamplingParams(stop_regex=value)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the matcher


def test_matcher_earliest_match_and_ties() -> None:
    m = StopStringMatcher(["END"], [r"\d+", r"x+y"])
    assert m and StopStringMatcher([], ["a"]) and not StopStringMatcher([])
    assert m.match("ab 12 END", 3) == StopMatch(3, 5, r"\d+")  # regexes search all the text
    assert m.match("ab END 1", 3) == StopMatch(3, 6, "END")
    assert m.match("ab END 12", 1) == StopMatch(7, 9, r"\d+")  # strings: only new ones
    assert m.match("xxy 1", 1) == StopMatch(0, 3, "x+y")
    assert m.match("abc", 1) is None and m.match("12", 0) is None
    # the same start: the match that ends first; then strings before regexes
    assert StopStringMatcher([], ["ab+", "a"]).match("abb", 1) == StopMatch(0, 1, "a")
    assert StopStringMatcher(["ab"], ["a."]).match("ab", 1) == StopMatch(0, 2, "ab")


def test_matcher_regex_holdback() -> None:
    m = StopStringMatcher([], [r"ab+c"])
    assert m.holdback("") == 0 and m.holdback("xyz") == 0
    assert m.holdback("xxa") == 1 and m.holdback("xxabbb") == 4
    assert StopStringMatcher([], [r"foo(?=bar)"]).holdback("a foob") == 4  # lookahead pending
    assert StopStringMatcher([], [r"x.*y"]).holdback("a x and more") == 10  # unbounded
    # a full match (before min_new_tokens) is held back, and so is an earlier partial one
    assert StopStringMatcher([], [r"abc|b"]).holdback("zab") == 2
    both = StopStringMatcher(["ab"], [r"q.*b"])
    assert both.holdback("xq a") == 3 and both.holdback("x a") == 1  # the longer one wins


@pytest.mark.parametrize("pattern", [r"ab+c", r"abc|b", r"(?<=a)bc", r"ab(?=cd)", r"\bab\b"])
def test_matcher_streamed_text_is_prefix_of_final(pattern: str) -> None:
    """Fed in random chunks, streamed text (all but the holdback) never passes the cut."""
    rng = random.Random(0)
    m = StopStringMatcher([], [pattern])
    for _ in range(300):
        text, streamed, found = "", "", None
        while found is None and len(text) < 12:
            new = "".join(rng.choice("abcd ") for _ in range(rng.randint(1, 3)))
            text += new
            found = m.match(text, len(new))
            if found is None:
                streamed = max(streamed, text[: len(text) - m.holdback(text)], key=len)
        final = text[: found.start] if found else text
        expected = re.search(pattern, text)
        assert (found is None) == (expected is None)
        assert final.startswith(streamed), (pattern, text, streamed)


# ---------------------------------------------------------------- the engine


def test_stop_regex_trims_at_match(idle_engine: Engine, full: dict) -> None:
    text = full["text"]
    pattern = word_before(text, ",")
    m = re.search(pattern, text)
    assert m is not None and m.start() > 0 and m.end() < len(text) - 10
    res = idle_engine.generate(PROMPT, {**GREEDY, "stop_regex": pattern})
    check_stopped(res, full, text[: m.start()], pattern)
    kept = idle_engine.generate(PROMPT, {**GREEDY, "stop_regex": [pattern], "no_stop_trim": True})
    check_stopped(kept, full, text[: m.end()], pattern)


def test_stop_regex_list_earliest_match_wins(idle_engine: Engine, full: dict) -> None:
    text = full["text"]
    patterns = [word_before(text, ","), word_before(text, ".")]
    starts = [re.search(p, text).start() for p in patterns]  # type: ignore[union-attr]
    assert starts[0] != starts[1]
    first = patterns[starts.index(min(starts))]
    res = idle_engine.generate(PROMPT, {**GREEDY, "stop_regex": patterns})
    check_stopped(res, full, text[: min(starts)], first)
    # a stop string later in the text does not matter; an earlier one wins
    later = text[max(starts) : max(starts) + 3]
    assert text.index(later) > min(starts)
    res = idle_engine.generate(PROMPT, {**GREEDY, "stop_regex": first, "stop": later})
    check_stopped(res, full, text[: min(starts)], first)
    earlier = text[2:5]
    assert text.index(earlier) < min(starts)
    res = idle_engine.generate(PROMPT, {**GREEDY, "stop_regex": first, "stop": earlier})
    check_stopped(res, full, text[: text.index(earlier)], earlier)


def test_stop_regex_streaming_matches_generate(idle_engine: Engine, full: dict) -> None:
    pattern = word_before(full["text"], ",")
    params = {**GREEDY, "stop_regex": pattern}
    expected = idle_engine.generate(PROMPT, params)
    pieces = list(idle_engine.stream(PROMPT, params, incremental=True))
    assert "".join(c["text"] for c in pieces) == expected["text"]
    assert pieces[-1]["meta_info"]["finish_reason"] == {"type": "stop", "matched": pattern}
    cumulative = [c["text"] for c in idle_engine.stream(PROMPT, params)]
    assert all(expected["text"].startswith(c) for c in cumulative)
    assert cumulative[-1] == expected["text"] and len(cumulative) > 2


def test_stop_regex_after_jump_forward(idle_engine: Engine) -> None:
    """Text forced by a constraint (jump-forward) is searched too."""
    params = {"temperature": 0, "max_new_tokens": 16, "regex": r"The answer is [0-9]+\."}
    res = idle_engine.generate("Question: what is 2 + 2?\n", {**params, "stop_regex": r"an+s"})
    assert res["text"] == "The "
    assert res["meta_info"]["finish_reason"] == {"type": "stop", "matched": r"an+s"}


def test_invalid_stop_regex_raises_and_engine_keeps_serving(
    idle_engine: Engine, full: dict
) -> None:
    with pytest.raises(ValueError, match=r"stop_regex.*'\(unclosed'"):
        idle_engine.generate(PROMPT, {**GREEDY, "stop_regex": ["ok", "(unclosed"]})
    with pytest.raises(ValueError, match="stop_regex"):
        idle_engine.generate(PROMPT, {**GREEDY, "stop_regex": [3]})
    assert idle_engine.generate(PROMPT, GREEDY)["output_ids"] == full["output_ids"]
    idle_engine.wait_idle()
    idle_engine.check_kv_invariant()
