"""`fsm.compile_regex` against Python's `re`: random regexes at the term and token levels,
the supported constructs, clear errors for the unsupported ones, and token masks.

Reference semantics: `re.fullmatch(pattern, s, re.ASCII)`. `re.ASCII` because `fsm` reads
`\\d \\w \\s` as ASCII classes (as ECMA-262 does); no `re.DOTALL` because `fsm`'s `.` excludes
`\\n` like Python's default. Case-insensitive matching is left out of the random grammar:
`re.ASCII` would also restrict `(?i)` to ASCII letters, while `fsm` folds Unicode case.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fsm import DEAD, ConstraintError, TokenGuide, Vocabulary, compile_regex
from fsm.regex import regex_term
from fsm.terms import EMPTY, TermStore

FLAGS = re.ASCII
# Characters of the random strings: ASCII letters, digits, space, newline, punctuation and
# multi-byte UTF-8 (2, 3 and 4 bytes).
POOL = "abcxyzAZ09_- .\n\t\"'é中🎉ßΩ"
LITERALS = 'abcxyzAZ09_- ."é中🎉ßΩ'
META = set(".^$*+?{}[]\\|()")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def token_of(vocab: Vocabulary) -> dict[bytes, int]:
    """Bytes to the lowest token id that contributes exactly them."""
    out: dict[bytes, int] = {}
    for tid, data in enumerate(vocab.token_bytes):
        if data is not None and data not in out:
            out[data] = tid
    # single-byte tokens for the bytes of the random strings (byte-level BPE has them)
    assert all(bytes([b]) in out for c in POOL for b in c.encode())
    return out


# --------------------------------------------------------------------------- helpers


def term_accepts(store: TermStore, term: int, data: bytes) -> bool:
    """Membership by derivatives over the bytes."""
    for b in data:
        term = store.derive(term, b)
        if term == EMPTY:
            return False
    return store.nullable(term)


def mask_has(mask: np.ndarray, token_id: int) -> bool:
    return bool((int(mask[token_id >> 5]) >> (token_id & 31)) & 1)


def token_accepts(guide: TokenGuide, ids: list[int]) -> bool:
    """Walk `ids` through the masks; checks mask/advance and EOS/accepting agreement."""
    (eos,) = guide.vocab.eos_token_ids
    state = guide.initial_state
    for t in ids:
        mask = guide.allowed_mask(state)
        assert mask_has(mask, eos) == guide.is_accepting(state)
        nxt = guide.advance(state, t)
        assert mask_has(mask, t) == (nxt != DEAD), (state, t)
        if nxt == DEAD:
            return False
        state = nxt
    accepting = guide.is_accepting(state)
    assert mask_has(guide.allowed_mask(state), eos) == accepting
    assert guide.advance(state, eos) == (state if accepting else DEAD)
    return accepting


def random_split(data: bytes, token_of: dict[bytes, int], rnd: random.Random) -> list[int]:
    """A random tokenization of `data` into vocabulary tokens (may split UTF-8 characters)."""
    ids = []
    i = 0
    while i < len(data):
        lengths = [n for n in range(1, min(16, len(data) - i) + 1) if data[i : i + n] in token_of]
        n = rnd.choice(lengths)
        ids.append(token_of[data[i : i + n]])
        i += n
    return ids


def tokenizations(text: str, tok, token_of: dict[bytes, int], seed: int) -> list[list[int]]:
    """The tokenizer's own encoding, per-character encodings, single bytes, a random split."""
    data = text.encode()
    return [
        tok.encode(text, add_special_tokens=False),
        [t for ch in text for t in tok.encode(ch, add_special_tokens=False)],
        [token_of[bytes([b])] for b in data],
        random_split(data, token_of, random.Random(seed)),
    ]


def fullmatch(pattern: str, text: str) -> bool:
    return re.fullmatch(pattern, text, FLAGS) is not None


# --------------------------------------------------------------------------- random regexes


@dataclass(frozen=True)
class Node:
    """A regex with a sampler of (usually) matching strings."""

    src: str
    sample: Callable[[random.Random], str]
    atomic: bool = True  # can take a quantifier without a group


def _escape(c: str, in_class: bool = False) -> str:
    special = META | {"-", "^", "]"} if in_class else META
    if c == "\n":
        return "\\n"
    return "\\" + c if c in special else c


def _class_sampler(src: str) -> Callable[[random.Random], str]:
    members = [c for c in POOL if fullmatch(src, c)]
    return lambda rnd: rnd.choice(members) if members else ""


def literal_nodes() -> st.SearchStrategy[Node]:
    return st.sampled_from(LITERALS).map(lambda c: Node(_escape(c), lambda rnd, c=c: c))


CLASS_ESCAPES = ["\\d", "\\w", "\\s", "\\D", "\\W", "\\S"]
RANGES = ["a-c", "x-z", "0-5", "A-Z", "à-ÿ", "一-龥", "α-ω", "😀-🙏", "\\x20-\\x2f"]


@st.composite
def class_nodes(draw) -> Node:
    items = draw(
        st.lists(
            st.one_of(
                st.sampled_from(LITERALS).map(lambda c: _escape(c, in_class=True)),
                st.sampled_from(RANGES),
                st.sampled_from(CLASS_ESCAPES),
            ),
            min_size=1,
            max_size=4,
        )
    )
    negated = draw(st.booleans())
    src = "[" + ("^" if negated else "") + "".join(items) + "]"
    return Node(src, _class_sampler(src))


def shorthand_nodes() -> st.SearchStrategy[Node]:
    return st.sampled_from([".", *CLASS_ESCAPES]).map(lambda s: Node(s, _class_sampler(s)))


def _concat(nodes: list[Node]) -> Node:
    return Node(
        "".join(n.src if n.atomic or len(nodes) == 1 else f"(?:{n.src})" for n in nodes),
        lambda rnd: "".join(n.sample(rnd) for n in nodes),
        atomic=len(nodes) == 1 and nodes[0].atomic,
    )


def _alternate(nodes: list[Node]) -> Node:
    return Node("|".join(n.src for n in nodes), lambda rnd: rnd.choice(nodes).sample(rnd), False)


def _group(node: Node, capturing: bool) -> Node:
    return Node(("(" if capturing else "(?:") + node.src + ")", node.sample)


@st.composite
def _quantify(draw, node: Node) -> Node:
    lo, hi, text = draw(
        st.sampled_from(
            [
                (0, None, "*"),
                (1, None, "+"),
                (0, 1, "?"),
                (2, 2, "{2}"),
                (0, 2, "{0,2}"),
                (1, 3, "{1,3}"),
                (2, None, "{2,}"),
                (0, 0, "{0}"),
            ]
        )
    )
    lazy = "?" if draw(st.booleans()) else ""
    inner = node.src if node.atomic else f"(?:{node.src})"

    def sample(rnd: random.Random) -> str:
        n = rnd.randint(lo, 3 if hi is None else hi)
        return "".join(node.sample(rnd) for _ in range(n))

    return Node(inner + text + lazy, sample, False)


def regex_nodes() -> st.SearchStrategy[Node]:
    base = st.one_of(literal_nodes(), literal_nodes(), class_nodes(), shorthand_nodes())

    def extend(children: st.SearchStrategy[Node]) -> st.SearchStrategy[Node]:
        return st.one_of(
            st.lists(children, min_size=2, max_size=3).map(_concat),
            st.lists(children, min_size=2, max_size=3).map(_alternate),
            st.tuples(children, st.booleans()).map(lambda a: _group(*a)),
            children.flatmap(_quantify),
        )

    return st.recursive(base, extend, max_leaves=6)


@st.composite
def regex_and_strings(draw) -> tuple[str, list[str], int]:
    node = draw(regex_nodes())
    seed = draw(st.integers(0, 2**32 - 1))
    rnd = random.Random(seed)
    strings = {node.sample(rnd) for _ in range(3)}
    for s in list(strings):  # one-character mutations of the samples
        chars = list(s)
        i = rnd.randrange(len(chars) + 1)
        op = rnd.choice(["insert", "delete", "replace"])
        if op == "insert" or not chars:
            chars.insert(i, rnd.choice(POOL))
        elif op == "delete":
            del chars[min(i, len(chars) - 1)]
        else:
            chars[min(i, len(chars) - 1)] = rnd.choice(POOL)
        strings.add("".join(chars))
    strings.update(draw(st.lists(st.text(alphabet=POOL, max_size=6), max_size=2)))
    re.compile(node.src, FLAGS)  # the generator only writes valid Python regexes
    return node.src, sorted(s for s in strings if len(s) <= 16), seed


# --------------------------------------------------------------------------- property tests


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=regex_and_strings())
def test_term_level_matches_python_re(case: tuple[str, list[str], int]) -> None:
    """Derivatives over UTF-8 bytes accept exactly what `re.fullmatch` matches."""
    pattern, strings, _ = case
    store = TermStore()
    term = regex_term(store, pattern)
    for s in strings:
        assert term_accepts(store, term, s.encode()) == fullmatch(pattern, s), (pattern, s)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=regex_and_strings())
def test_token_level_matches_python_re(tok, vocab, token_of, case) -> None:
    """Token masks accept the tokenizations of exactly the strings `re.fullmatch` matches,
    whichever way the string is split into tokens (including inside UTF-8 characters)."""
    pattern, strings, seed = case
    try:
        guide = compile_regex(pattern, vocab)
    except ConstraintError as e:
        assert "matches no string" in str(e)
        assert not any(fullmatch(pattern, s) for s in strings)
        return
    for s in strings:
        expected = fullmatch(pattern, s)
        for ids in tokenizations(s, tok, token_of, seed):
            assert vocab.encode_bytes(ids) == s.encode()
            assert token_accepts(guide, ids) == expected, (pattern, s, ids)


# --------------------------------------------------------------------------- supported syntax


def accepts(vocab: Vocabulary, pattern: str, text: str) -> bool:
    guide = compile_regex(pattern, vocab)
    state = guide.walk(guide.initial_state, text.encode())
    return state != DEAD and guide.is_accepting(state)


@pytest.mark.parametrize(
    ("pattern", "yes", "no"),
    [
        # anchors at the ends of top-level branches
        ("^abc$", ["abc"], ["", "abc\n", "xabc", "ab"]),
        (r"\Aab+\Z", ["ab", "abbb"], ["a", "abc"]),
        ("^a|b$", ["a", "b"], ["ab", ""]),
        ("(^a|b$)", ["a", "b"], ["ab"]),
        # top-level lookaheads become intersections
        (r"(?=.*\d).{3,}", ["ab1", "1ab", "a1b2"], ["abc", "a1", "", "ab\n1"]),
        (r"(?!abc).*", ["", "ab", "bcd", "xabc"], ["abc", "abcd"]),
        (r"(?=[a-z]{2,4})(?=.*x).{2,4}", ["ax", "xxxx"], ["x", "aX", "axxxx", "a1x"]),
        # lazy quantifiers match the same language as greedy ones
        ("a+?b", ["ab", "aaab"], ["b", "aba"]),
        (".*?x", ["x", "abcx"], ["xa", "a\nx"]),
        ("a{2,3}?", ["aa", "aaa"], ["a", "aaaa"]),
        # flags
        ("(?i)abc", ["abc", "AbC", "ABC"], ["abd"]),
        ("(?i)[a-c]+z", ["ABcZ", "abz"], ["dz"]),
        ("(?i)[^a]", ["b", "B"], ["a", "A"]),
        ("(?s)a.b", ["a\nb", "axb"], ["ab"]),
        ("a.b", ["axb", "aéb"], ["a\nb"]),
        # escapes
        (r"\x41\u00e9\U0001F389", ["Aé🎉"], ["A", "aé🎉"]),
        (r"[\x41-\x43]+", ["ABC", "A"], ["D", ""]),
        (r"\t\n\.\*\\", ["\t\n.*\\"], ["\t\n.*"]),
        (r"[\]\-]", ["]", "-"], ["\\", "a"]),
        (r"(?P<year>\d{4})-(?:\d\d)", ["2024-01"], ["2024-1"]),
        ("a{,2}", ["", "a", "aa"], ["aaa"]),
        ("a{", ["a{"], ["a"]),
        ("a|", ["", "a"], ["b", "aa"]),
        ("(|a)b", ["b", "ab"], ["a", "aab"]),
        ("", [""], ["a"]),
    ],
)
def test_supported_constructs(vocab, pattern: str, yes: list[str], no: list[str]) -> None:
    for s in yes:
        assert re.fullmatch(pattern, s), (pattern, s)  # the expectations agree with `re`
        assert accepts(vocab, pattern, s), (pattern, s)
    for s in no:
        assert not re.fullmatch(pattern, s), (pattern, s)
        assert not accepts(vocab, pattern, s), (pattern, s)


@pytest.mark.parametrize(
    ("pattern", "words"),
    [
        (r"(a)\1", "backreference"),
        (r"(?P<x>a)(?P=x)", "(?P"),
        (r"(?<=a)b", "lookbehind"),
        (r"(?<!a)b", "lookbehind"),
        (r"\bfoo", "word boundar"),
        (r"foo\B", "word boundar"),
        (r"a++", "possessive"),
        (r"a*+", "possessive"),
        (r"(ab", "missing ')'"),
        (r"ab)", "unbalanced ')'"),
        (r"[z-a]", "bad character range"),
        (r"a{3,1}", "bad repeat range"),
        (r"\p{L}", "Unicode property"),
        (r"\P{Lu}", "Unicode property"),
        (r"[abc", "unterminated character class"),
        (r"*a", "nothing to repeat"),
        (r"a^b", "anchors"),
        (r"a(?=b)*", "quantifier after an anchor or lookaround"),
        (r"(?:a(?=b))b", "lookahead"),
        (r"(?x)a b", "unsupported flag"),
        (r"\x4", "hexadecimal"),
        (r"a\q", "unknown escape"),
        ("abc\\", "backslash"),
        (r"[^\s\S]", "matches no string"),
    ],
)
def test_unsupported_constructs_raise(vocab, pattern: str, words: str) -> None:
    with pytest.raises(ConstraintError) as info:
        compile_regex(pattern, vocab)
    assert words in str(info.value), str(info.value)


def test_non_string_pattern_raises(vocab) -> None:
    with pytest.raises(ConstraintError, match="must be a string"):
        compile_regex(123, vocab)  # type: ignore[arg-type]


# ---------------------------------------------- bugs found in review, and known limits


@pytest.mark.parametrize(("pattern", "text"), [(r"\x41}", "A}"), (r"[\x41}]", "}")])
def test_brace_after_hex_escape(vocab, pattern: str, text: str) -> None:
    assert re.fullmatch(pattern, text)
    assert accepts(vocab, pattern, text)


def test_octal_escape(vocab) -> None:
    assert re.fullmatch(r"\012", "\n")
    assert accepts(vocab, r"\012", "\n")


@pytest.mark.parametrize(("pattern", "text"), [("a{²}", "a{²}"), ("a{١}", "a{١}")])
def test_non_ascii_digits_in_braces_are_literal(vocab, pattern: str, text: str) -> None:
    assert re.fullmatch(pattern, text)
    assert accepts(vocab, pattern, text)


@pytest.mark.xfail(
    strict=True, reason="fsm limitation: (?i) uses str.lower/upper, not re's folding"
)
@pytest.mark.parametrize(
    ("pattern", "text"), [("(?i)k", "\u212a"), ("(?i)s", "\u017f"), ("(?i)\u00b5", "\u03bc")]
)
def test_case_folding_like_python(vocab, pattern: str, text: str) -> None:
    assert re.fullmatch(pattern, text)
    assert accepts(vocab, pattern, text)


# --------------------------------------------------------------------------- masks


def test_start_mask_matches_brute_force(vocab) -> None:
    """Allowed tokens at the start are exactly those whose bytes extend to a match."""
    guide = compile_regex("[0-9]{3}-[a-z]+", vocab)
    prefix = re.compile(r"[0-9]{0,3}|[0-9]{3}-[a-z]*")  # viable prefixes, written by hand
    by_walk, by_re = [], []
    for tid, data in enumerate(vocab.token_bytes):
        if data is None:
            continue
        if guide.walk(guide.initial_state, data) != DEAD:
            by_walk.append(tid)
        try:
            text = data.decode()
        except UnicodeDecodeError:
            continue
        if prefix.fullmatch(text, 0) and text:
            by_re.append(tid)
    allowed = guide.allowed_token_ids(guide.initial_state).tolist()
    assert allowed == by_walk == by_re
    assert len(allowed) >= 10  # at least the ten digits
    assert not guide.is_accepting(guide.initial_state)


def test_mask_after_prefix_and_eos(vocab) -> None:
    guide = compile_regex("[0-9]{3}-[a-z]+", vocab)
    (eos,) = vocab.eos_token_ids
    for text, accepting in [("1", False), ("123", False), ("123-", False), ("123-ab", True)]:
        state = guide.walk(guide.initial_state, text.encode())
        assert state != DEAD
        assert guide.is_accepting(state) == accepting
        allowed = set(guide.allowed_token_ids(state).tolist())
        expected = {
            tid
            for tid, data in enumerate(vocab.token_bytes)
            if data is not None and guide.walk(state, data) != DEAD
        }
        assert allowed - {eos} == expected
        assert (eos in allowed) == accepting
        assert guide.advance(state, eos) == (state if accepting else DEAD)
    assert guide.walk(guide.initial_state, b"12a") == DEAD


def test_forced_bytes(vocab) -> None:
    guide = compile_regex("abc(d|e)", vocab)
    assert guide.forced_bytes(guide.initial_state) == b"abc"
    state = guide.walk(guide.initial_state, b"abc")
    assert guide.forced_bytes(state) == b""
    assert guide.forced_bytes(guide.walk(guide.initial_state, b"a")) == b"bc"
    # forced text stops at an accepting state, where ending is also possible
    guide = compile_regex("ab(cd)?", vocab)
    assert guide.forced_bytes(guide.initial_state) == b"ab"
    # multi-byte characters are forced whole, and never cut inside
    guide = compile_regex("中文(a|b)", vocab)
    assert guide.forced_bytes(guide.initial_state) == "中文".encode()
    guide = compile_regex("[éè]x", vocab)  # both start with 0xC3
    assert guide.forced_bytes(guide.initial_state) == b""


def test_terminal_states(vocab) -> None:
    guide = compile_regex("abc", vocab)
    end = guide.walk(guide.initial_state, b"abc")
    assert guide.is_accepting(end) and guide.is_terminal(end)
    assert guide.allowed_token_ids(end).tolist() == sorted(vocab.eos_token_ids)
    guide = compile_regex("abc+", vocab)
    end = guide.walk(guide.initial_state, b"abc")
    assert guide.is_accepting(end) and not guide.is_terminal(end)
    assert not guide.is_terminal(guide.initial_state)
