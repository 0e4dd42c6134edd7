"""The guides' token masks (`TokenTrie.state_mask`: slice skips, slice proofs, exact length
bounds, lazy DFA rows) against the plain trie walk, the slice proofs (`TermStore.safe`) and
run bounds (`TermStore.run`) against derivatives, the term normal forms that let derivatives
reuse terms, and the UTF-8 slices of `TokenTrie.loop_info` against their definition."""

from __future__ import annotations

import codecs
import itertools
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fsm_json_schema import jsb_data
from test_fsm_regex import POOL, regex_nodes

from fsm import (
    DEAD,
    ConstraintError,
    TokenGuide,
    Vocabulary,
    _native,
    compile_json_schema,
    compile_regex,
)
from fsm.regex import regex_term
from fsm.terms import EMPTY, TermStore
from fsm.token_trie import TokenTrie

JSB_PER_SUBSET = 4
MULTIBYTE = "é中🎉"  # 2, 3 and 4 bytes


class PlainWalk:
    """The reference mask: `TokenTrie.fill_mask` without skips over a numpy copy of the rows
    of a guide's DFA, copied in on demand by ``expand``."""

    def __init__(self, guide: TokenGuide) -> None:
        self.guide = guide
        self.table = np.full((16, 256), DEAD, dtype=np.int32)
        self.ready = np.zeros(16, dtype=np.uint8)

    def expand(self, q: int) -> bool:
        if q >= len(self.ready):
            return False
        self.table[q] = self.guide.dfa.row(q)
        self.ready[q] = 1
        return True

    def mask(self, state: int) -> np.ndarray:
        trie = self.guide.vocab.trie
        mask = trie.new_mask()
        while not trie.fill_mask(self.table, self.ready, state, self.expand, mask):
            cap = 2 * len(self.ready)
            self.table = np.concatenate([self.table, np.full_like(self.table, DEAD)])
            self.ready = np.concatenate([self.ready, np.zeros(cap // 2, dtype=np.uint8)])
        if self.guide.is_accepting(state):
            for eos in self.guide.vocab.eos_token_ids:
                mask[eos >> 5] |= np.uint32(1 << (eos & 31))
        return mask


def check_states(guide: TokenGuide, states: list[int]) -> int:
    """Assert the guide's mask of each of ``states`` (first visits included) equals the plain
    walk's; return how many were checked."""
    plain = PlainWalk(guide)
    for state in states:
        np.testing.assert_array_equal(guide.allowed_mask(state), plain.mask(state), str(state))
    return len(states)


def visited_states(guide: TokenGuide, ids: list[int]) -> list[int]:
    """The states a walk of ``ids`` goes through, in order, until it is refused."""
    out, state = [], guide.initial_state
    for t in ids:
        out.append(state)
        state = guide.advance(state, t)
        if state == DEAD:
            break
    return out


# --------------------------------------------------------------------------- guides


def test_masks_match_plain_walk_on_jsb(tok, vocab: Vocabulary) -> None:
    """Every state met walking the valid and invalid instances of a JSONSchemaBench sample
    (each state's mask is computed when first met, as in generation)."""
    checked = 0
    for case in jsb_data.sample(per_subset=JSB_PER_SUBSET):
        try:
            guide = compile_json_schema(case.schema, vocab)
        except ConstraintError:
            continue
        states: list[int] = []
        for instance in [*case.valid, *case.invalid]:
            ids = tok.encode(jsb_data.serialize(instance, case.schema), add_special_tokens=False)
            states += [s for s in visited_states(guide, ids) if s not in states]
        checked += check_states(guide, states)
    assert checked > 2000


def small_vocabulary(rnd: random.Random) -> Vocabulary:
    """Random tokens over the regex test characters, fragments of UTF-8 characters included,
    with a trie that walks with slices wherever it can skip a single node."""
    pieces = [c.encode() for c in POOL] + [b"\xc3", b"\xe4\xb8", b"\xf0\x9f\x8e", b"\x80"]
    tokens = {b"".join(rnd.choices(pieces, k=rnd.randint(1, 4))) for _ in range(150)}
    token_bytes: list[bytes | None] = [bytes([b]) for b in range(256)] + sorted(tokens)
    vocab = Vocabulary([*token_bytes, None], eos_token_ids=[len(token_bytes)])
    vocab.trie = TokenTrie.from_token_bytes(vocab.token_bytes, loop_min_nodes=1)
    return vocab


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(node=regex_nodes(), seed=st.integers(0, 2**32 - 1))
def test_masks_match_plain_walk_on_random_regexes(node, seed: int) -> None:
    """The states of random regexes, reached by random tokens, over a random vocabulary."""
    rnd = random.Random(seed)
    vocab = small_vocabulary(rnd)
    try:
        guide = compile_regex(node.src, vocab)
    except ConstraintError:  # matches no string
        return
    states = [guide.initial_state]
    while len(states) < 12:
        allowed = guide.allowed_token_ids(states[-1])
        allowed = allowed[~np.isin(allowed, list(vocab.eos_token_ids))]
        if not len(allowed):
            break
        nxt = guide.advance(states[-1], int(rnd.choice(allowed)))
        assert nxt != DEAD
        states.append(nxt)
    check_states(guide, list(dict.fromkeys(states)))


def test_masks_outlive_their_guide(vocab: Vocabulary) -> None:
    """Mask buffers come from the native pool, which reuses the blocks of dropped guides: a
    mask still referenced keeps its block, so later guides never write over it."""
    guide = compile_json_schema({"type": "object", "properties": {"a": {"type": "string"}}}, vocab)
    masks = [guide.allowed_mask(guide.walk(guide.initial_state, p)) for p in (b"", b'{"a":"x')]
    kept = [m.copy() for m in masks]
    del guide
    for schema in ({"type": "integer"}, {"type": "array", "items": {"type": "boolean"}}):
        other = compile_json_schema(schema, vocab)
        for state in range(other.num_states):
            other.allowed_mask(state)
    for mask, copy in zip(masks, kept):
        assert not mask.flags.writeable
        np.testing.assert_array_equal(mask, copy)


def test_mask_block_views_keep_it() -> None:
    """A `MaskBlock` goes back to the pool only when no array views it any more."""
    block = np.frombuffer(_native.MaskBlock(4096 * 3 + 4), dtype=np.uint32)
    view = block[1024:]
    del block
    view[:] = 7
    fresh = np.frombuffer(_native.MaskBlock(4096 * 3 + 4), dtype=np.uint32)
    fresh[:] = 0
    assert (view == 7).all()


# --------------------------------------------------------------------------- slice proofs


def slice_strings(ascii_bytes: list[int], utf8: bool, length: int) -> list[bytes]:
    chars = [bytes([b]) for b in ascii_bytes] + ([c.encode() for c in MULTIBYTE] if utf8 else [])
    return [b"".join(p) for n in range(length + 1) for p in itertools.product(chars, repeat=n)]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    node=regex_nodes(),
    ascii_bytes=st.sets(st.sampled_from(sorted({ord(c) for c in POOL if c.isascii()})), min_size=1),
    utf8=st.booleans(),
)
def test_safe_is_sound(node, ascii_bytes: set[int], utf8: bool) -> None:
    """What `TermStore.safe` proves holds: the derivative by each string of the slice, up to
    the proved length (at most 3 characters here), is not empty."""
    store = TermStore()
    term = regex_term(store, node.src)
    mask = sum(1 << b for b in ascii_bytes)
    proved = store.safe(term, mask, utf8)
    if proved == -1:
        return
    for data in slice_strings(sorted(ascii_bytes), utf8, 3 if proved is None else min(proved, 3)):
        t = term
        for b in data:
            t = store.derive(t, b)
        assert t != EMPTY and not store.is_empty(t), (node.src, data, proved)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    node=regex_nodes(),
    slices=st.lists(
        st.tuples(
            st.sets(st.sampled_from(sorted({ord(c) for c in POOL if c.isascii()})), min_size=1),
            st.booleans(),
        ),
        min_size=2,
        max_size=6,
    ),
)
def test_safe_is_sound_when_slices_alternate(node, slices: list[tuple[set[int], bool]]) -> None:
    """`TermStore.safe` caches its results (and whether a repetition's item takes each
    character of the slice whole) per term and slice slot: one store asked several slices in
    turn, each twice (a store keeps four slots, then starts over), proves only what holds."""
    store = TermStore()
    term = regex_term(store, node.src)
    for ascii_bytes, utf8 in slices + slices:
        proved = store.safe(term, sum(1 << b for b in ascii_bytes), utf8)
        if proved == -1:
            continue
        for data in slice_strings(
            sorted(ascii_bytes), utf8, 2 if proved is None else min(proved, 2)
        ):
            t = term
            for b in data:
                t = store.derive(t, b)
            assert t != EMPTY and not store.is_empty(t), (node.src, data, proved)


def test_safe_cache_keeps_slices_apart() -> None:
    """[a-z]* holds every string of [a-z], not of [a-z!]: the second answer must not reuse
    the first slice's cached `completes_on` for the item [a-z]."""
    store = TermStore()
    term = store.star(store.byte_range(ord("a"), ord("z")))
    letters = sum(1 << b for b in range(ord("a"), ord("z") + 1))
    assert store.safe(term, letters, False) is None
    assert store.safe(term, letters | 1 << ord("!"), False) == 0
    assert store.safe(term, letters, True) == 0
    assert store.safe(term, letters, False) is None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    node=regex_nodes(),
    ascii_bytes=st.sets(st.sampled_from(sorted({ord(c) for c in POOL if c.isascii()})), min_size=1),
)
def test_run_is_sound(node, ascii_bytes: set[int]) -> None:
    """What `TermStore.run` bounds holds: every string over the byte set one byte longer than
    the bound (up to 4 bytes here; longer ones extend those) derives to the empty language."""
    store = TermStore()
    term = regex_term(store, node.src)
    bound = store.run(term, sum(1 << b for b in ascii_bytes))
    if bound is None or bound >= 4:
        return
    for data in itertools.product(sorted(ascii_bytes), repeat=bound + 1):
        t = term
        for b in data:
            t = store.derive(t, b)
        assert t == EMPTY or store.is_empty(t), (node.src, bytes(data), bound)


def test_run_bounds_strings_of_json(vocab: Vocabulary) -> None:
    """The bound the exact masks rely on: a string with maxLength (the characters left, as
    `safe` proves), none for a free string, none past the closing quote."""
    schema = {
        "type": "object",
        "properties": {"m": {"type": "string", "maxLength": 5}, "s": {"type": "string"}},
        "required": ["m", "s"],
    }
    guide = compile_json_schema(schema, vocab)
    letters = sum(1 << b for b in range(ord("a"), ord("z") + 1))

    def run_after(prefix: bytes) -> int | None:
        state = guide.walk(guide.initial_state, prefix)
        return guide.dfa.store.run(guide.dfa.term_of(state), letters)

    assert run_after(b'{"m":"') == 5
    assert run_after(b'{"m":"xy') == 3
    assert run_after(b'{"m":"xy","s":"') is None


@pytest.mark.parametrize(
    "string",
    [
        {"type": "string", "maxLength": 7},
        {"type": "string", "minLength": 2, "maxLength": 12},
        {"type": "string", "pattern": "^[0-9a-f]{8}-[0-9a-f]{4}$"},
        {"type": "string", "format": "uuid"},
        {"type": "string", "pattern": "^[a-z]{2,5}$"},
    ],
)
def test_masks_match_plain_walk_in_bounded_strings(tok, vocab: Vocabulary, string: dict) -> None:
    """Every state inside strings whose runs of a slice are bounded (length-bounded proofs,
    exact where `run` meets the proved length), reached byte by byte, on the real vocabulary."""
    guide = compile_json_schema({"type": "array", "items": string}, vocab)
    texts = ['["0123abcd-0123"]', '["abcdefghijkl"]', '["12345678-1234-1234-1234-123456789abc"]']
    states = []
    for text in texts:
        state = guide.initial_state
        for b in text.encode():
            if state == DEAD:
                break
            states.append(state)
            state = guide.walk(state, bytes([b]))
    assert check_states(guide, list(dict.fromkeys(states))) >= 5


def test_masks_match_plain_walk_where_the_walk_verifies(vocab: Vocabulary) -> None:
    """A state whose successor loops on [a-z] without a proof (the walk presets the [a-z]
    tokens and verifies them), where `z` leads to a state that kills the rest of [a-z]: the
    tokens `za...` must be cleared, so the walk reads those children although they are not
    first bytes of their parent state. The other states checked use the first-byte skips."""
    guide = compile_regex(r"[a-y][a-z]*1|zq1|[0-9]{2}", vocab)
    start = guide.initial_state
    states = [start, guide.walk(start, b"z"), guide.walk(start, b"a"), guide.walk(start, b"0")]
    assert check_states(guide, states) == 4


def test_literal_derivatives_reuse_terms() -> None:
    """Keys followed by a shared rest: concatenations associate to the right and unions
    left-factor common heads, so walking a key prefix builds no term."""
    store = TermStore()
    rest = store.seq(store.literal(b":"), store.star(store.byte_range(0x30, 0x39)))
    keys = [b'"alpha"', b'"alps"', b'"beta"']
    term = store.alt(*(store.seq(store.literal(k), rest) for k in keys))
    size = len(store)
    t = term
    for b in b'"alp':
        t = store.derive(t, b)
    assert len(store) == size
    assert t == store.alt(
        store.seq(store.literal(b'ha"'), rest), store.seq(store.literal(b's"'), rest)
    )


def test_safe_proves_json_strings_and_keys(vocab: Vocabulary) -> None:
    """The shapes the masks rely on: a free string, a string with maxLength (bounded by the
    characters left), an undeclared key (any key but the declared ones)."""
    schema = {
        "type": "object",
        "properties": {"s": {"type": "string"}, "m": {"type": "string", "maxLength": 5}},
        "required": ["s", "m"],
    }
    guide = compile_json_schema(schema, vocab)
    content = sum(1 << b for b in range(0x20, 0x80) if b not in b'"\\')

    def safe_after(prefix: bytes) -> int | None:
        state = guide.walk(guide.initial_state, prefix)
        return guide.dfa.store.safe(guide.dfa.term_of(state), content, True)

    assert safe_after(b'{"s":"ab') is None
    assert safe_after(b'{"s":"ab","m":"x') == 4
    assert safe_after(b'{"s":"ab","m":"xyzzy') == 0
    assert safe_after(b'{"s":"ab","m":"x","') is None  # an undeclared key may follow


def test_safe_proves_keys_split_by_a_pattern(tok, vocab: Vocabulary) -> None:
    """Undeclared keys split by whether they match a pattern (complementary intersections, one
    value schema each) still take any string, and the masks there equal the plain walk's."""
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}},
        "patternProperties": {"^x-": {"type": "integer"}},
    }
    guide = compile_json_schema(schema, vocab)
    content = sum(1 << b for b in range(0x20, 0x80) if b not in b'"\\')
    store, start = guide.dfa.store, guide.walk(guide.initial_state, b'{"')
    assert store.safe(guide.dfa.term_of(start), content, True) is None
    states: list[int] = []
    for text in ['{"name":"a","x-y":1,"zz":[true]}', '{"x-":2,"nam":null}']:
        ids = tok.encode(text, add_special_tokens=False)
        states += visited_states(guide, ids)
        states += [guide.walk(guide.initial_state, text.encode()[:n]) for n in range(len(text))]
    assert check_states(guide, [s for s in dict.fromkeys(states) if s != DEAD]) > 20


# --------------------------------------------------------------------------- UTF-8 slices


def in_slice(data: bytes, byte_set: set[int], utf8: bool) -> bool:
    """Whether ``data`` starts a string of the slice: bytes of ``byte_set`` or, with ``utf8``,
    well-formed UTF-8 (but maybe for a cut last character) whose ASCII is from ``byte_set``."""
    if not utf8:
        return set(data) <= byte_set
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(data, final=False)
    except UnicodeDecodeError:
        return False
    return all(ord(c) >= 0x80 or ord(c) in byte_set for c in text)


@settings(max_examples=200, deadline=None)
@given(
    tokens=st.lists(st.binary(min_size=1, max_size=5), min_size=1, max_size=40),
    extra=st.lists(st.sampled_from([c.encode() for c in POOL]), max_size=10),
    byte_set=st.sets(st.integers(0, 0xFF), min_size=1, max_size=12),
    utf8=st.booleans(),
)
def test_loop_info_matches_definition(
    tokens: list[bytes], extra: list[bytes], byte_set: set[int], utf8: bool
) -> None:
    """A slice's tokens, covered nodes, and tokens per preorder range (aliases included)."""
    if utf8:
        byte_set = {b for b in byte_set if b < 0x80} or {ord("a")}
    token_bytes: list[bytes | None] = [*tokens, *extra, tokens[0]]  # an alias too
    trie = TokenTrie.from_token_bytes(token_bytes)
    info = trie.loop_info(np.isin(np.arange(256), sorted(byte_set)), min_nodes=0, utf8=utf8)
    if info is None:  # no root child on those bytes
        return
    members = {t for t, b in enumerate(token_bytes) if b and in_slice(b, byte_set, utf8)}
    bits = np.unpackbits(info.mask.view(np.uint8), bitorder="little")
    assert set(np.flatnonzero(bits).tolist()) == members
    path: list[int] = []
    for i, d in enumerate(trie.node_depth.tolist()):
        path[d - 1 :] = [int(trie.node_byte[i])]
        below = {t for t, b in enumerate(token_bytes) if b and b.startswith(bytes(path))}
        assert info.covered[i] == (below <= members), bytes(path)
        listed = info.tokens[info.starts[i] : info.starts[int(trie.node_skip[i])]].tolist()
        assert sorted(listed) == sorted(below & members)


def test_utf8_slice_needs_ascii(vocab: Vocabulary) -> None:
    with pytest.raises(ValueError, match="ASCII"):
        vocab.trie.loop_info(np.ones(256, dtype=bool), utf8=True)
