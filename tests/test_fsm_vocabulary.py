"""Token bytes of real and in-memory tokenizers, the token trie, and the native mask walk
(checked against a pure-Python reference on random DFAs and vocabularies)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from fsm import TokenGuide, Vocabulary, _native, compile_json_schema, compile_regex
from fsm.token_trie import DEAD, GROW, LOOP_CACHE_SIZE, LoopInfo, TokenTrie, walk_bytes

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "café naïve Ωμέγα façade — “quotes” and ß",
    "中文测试：你好，世界！日本語のテキスト。한국어",
    "emoji 🎉🎉 party 🧑‍🚀 astronaut, flag 🇫🇷, thumbs 👍🏽",
    '{"key": "va\\"lue\\n", "n": [1, -2.5e+10, true, null], "u": "\\u00e9\\ud83d\\ude00"}',
    "  leading spaces,\ttabs\n\nand   runs    of     spaces\r\n\t\t end  ",
    "digits 0123456789 and 3.14159, 1e-9",
]


# --- The real embedded tokenizer (byte-level BPE) -------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_round_trip(tok, vocab: Vocabulary, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    assert vocab.encode_bytes(ids) == text.encode()


def test_byte_level_specials_and_eos(tok, vocab: Vocabulary) -> None:
    assert vocab.size == len(tok) == len(vocab.token_bytes)
    special = set(tok.all_special_ids) | {
        i for i, t in tok.added_tokens_decoder.items() if t.special
    }
    assert special
    assert all(vocab.token_bytes[i] is None for i in special)
    assert sum(b is None for b in vocab.token_bytes) == len(special)
    assert vocab.eos_token_ids == {tok.eos_token_id}
    assert Vocabulary.from_tokenizer(tok, eos_token_ids=[0, 2]).eos_token_ids == {0, 2}
    with pytest.raises(ValueError):
        vocab.encode_bytes([tok.eos_token_id])


def test_byte_level_tokens_match_decode(tok) -> None:
    """Every token whose bytes are valid UTF-8 decodes alone to exactly those bytes, added
    non-special tokens included (they go through the ByteLevel decoder too). The decoder is
    pinned to plain ByteLevel: transformers versions differ in what they build from the GGUF
    (the layered layout is tested below)."""
    tok = copy.deepcopy(tok)
    tok.backend_tokenizer.decoder = decoders.ByteLevel()
    tok.add_tokens(["ĠĠzz", "é x", "<think>", AddedToken("<tool>", special=True)])
    vocab = Vocabulary.from_tokenizer(tok)
    assert vocab.token_bytes[-4:-1] == [b"  zz", "é x".encode(), b"<think>"]
    assert vocab.token_bytes[-1] is None
    checked = 0
    for i, b in enumerate(vocab.token_bytes):
        if b is None:
            continue
        try:
            text = b.decode()
        except UnicodeDecodeError:
            continue  # a piece of a multi-byte character
        assert tok.backend_tokenizer.decode([i], skip_special_tokens=False) == text, i
        checked += 1
    assert checked > 0.9 * vocab.size


def test_byte_level_after_gguf_llama3_steps(tok, vocab: Vocabulary) -> None:
    """transformers gives Llama-3-style tokenizers read from GGUF the decoder ByteFallback,
    Fuse, Replace("▁", " "), ByteLevel (seen on the GPU machine's transformers with the
    embedded GGUF): the same token bytes as plain ByteLevel for this vocabulary."""
    tok = copy.deepcopy(tok)
    tok.backend_tokenizer.decoder = decoders.Sequence(
        [
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Replace("▁", " "),
            decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    assert Vocabulary.from_tokenizer(tok).token_bytes == vocab.token_bytes
    # Tokens the steps before ByteLevel act on. Fuse joins the text before ByteLevel, so a
    # token outside the GPT-2 table would switch the whole text to UTF-8: not per token.
    added = {"<0x41>": b"A", "<0x0A>": None, "<0xC3>": None, "a▁b": None, "xyz": b"xyz"}
    tok.add_tokens(list(added))
    layered = Vocabulary.from_tokenizer(tok)
    prefix = tok.encode(" hello", add_special_tokens=False)
    for text, expected in added.items():
        token_id = tok.convert_tokens_to_ids(text)
        assert layered.token_bytes[token_id] == expected, text
        if expected is not None:  # inside a longer text, as the detokenizer decodes it
            decoded = tok.backend_tokenizer.decode([*prefix, token_id]).encode()
            assert decoded == layered.encode_bytes([*prefix, token_id]), text


# --- An in-memory SentencePiece-style tokenizer (Metaspace, <0xNN> byte fallback) ----------

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, a small corpus for a tiny sentencepiece style tokenizer",
    "words start with a meta symbol and unknown characters fall back to bytes",
] * 10


def _sentencepiece_tokenizer(decoder_style: str) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    trainer = trainers.BpeTrainer(
        vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    spec = json.loads(tok.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    if decoder_style == "metaspace":
        tok.decoder = decoders.Sequence(
            [decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="never")]
        )
    else:  # the Llama-2 layout
        tok.decoder = decoders.Sequence(
            [
                decoders.Replace("▁", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.add_tokens(["<think>"])
    return fast


@pytest.fixture(scope="module", params=["metaspace", "llama"])
def sp_tok(request) -> PreTrainedTokenizerFast:
    return _sentencepiece_tokenizer(request.param)


def test_sentencepiece_round_trip(sp_tok) -> None:
    vocab = Vocabulary.from_tokenizer(sp_tok)
    for text in [*TEXTS, "a <think> tag"]:
        ids = sp_tok.encode(text, add_special_tokens=False)
        assert vocab.encode_bytes(ids) == text.encode(), text


def test_sentencepiece_token_bytes(sp_tok) -> None:
    vocab = Vocabulary.from_tokenizer(sp_tok)
    ids = sp_tok.convert_tokens_to_ids(["<0x41>", "<0xE6>", "▁the", "<think>"])
    assert [vocab.token_bytes[i] for i in ids] == [b"A", b"\xe6", b" the", b"<think>"]
    assert all(vocab.token_bytes[i] is None for i in sp_tok.all_special_ids)
    assert vocab.eos_token_ids == {sp_tok.convert_tokens_to_ids("</s>")}


def test_unsupported_decoder_is_refused() -> None:
    tok = _sentencepiece_tokenizer("metaspace")
    tok.backend_tokenizer.decoder = decoders.WordPiece()
    with pytest.raises(ValueError, match="WordPiece"):
        Vocabulary.from_tokenizer(tok)


# --- The trie and the native walk against a pure-Python reference --------------------------


def reference_walk(table: np.ndarray, start: int, data: bytes) -> int:
    state = start
    for b in data:
        state = int(table[state, b])
        if state < 0:
            return DEAD
    return state


def reference_mask(table: np.ndarray, start: int, token_bytes: list[bytes | None]) -> set[int]:
    return {t for t, b in enumerate(token_bytes) if b and reference_walk(table, start, b) != DEAD}


def mask_ids(mask: np.ndarray, size: int) -> set[int]:
    bits = np.unpackbits(mask.view(np.uint8), bitorder="little")
    assert not bits[size:].any()
    return {int(t) for t in np.flatnonzero(bits)}


class LazyDfa:
    """A caller of the native walk: the rows of ``full`` are copied in by ``expand`` on
    demand into a table that starts with ``cap`` garbage rows and doubles when asked to."""

    def __init__(self, full: np.ndarray, cap: int, refuse_once: bool) -> None:
        self.full = full
        self.table = np.full((cap, 256), -7, dtype=np.int32)
        self.ready = np.zeros(cap, dtype=np.uint8)
        self.refuse_once = refuse_once
        self.expanded: list[int] = []

    def expand(self, q: int) -> bool:
        if self.refuse_once:
            self.refuse_once = False
            return False
        assert not self.ready[q]
        self.table[q] = self.full[q]
        self.ready[q] = 1
        self.expanded.append(q)
        return True

    def grow(self) -> None:
        cap = 2 * len(self.ready)
        table = np.full((cap, 256), -7, dtype=np.int32)
        ready = np.zeros(cap, dtype=np.uint8)
        table[: len(self.table)] = self.table
        ready[: len(self.ready)] = self.ready
        self.table, self.ready = table, ready

    def fill_mask(
        self, trie: TokenTrie, start: int, loop: LoopInfo | None = None
    ) -> tuple[np.ndarray, int]:
        """The mask from ``start``, and how many calls it took."""
        mask = trie.new_mask()
        mask[:] = 0xDEADBEEF  # overwritten, never merged
        calls = 1
        while not trie.fill_mask(self.table, self.ready, start, self.expand, mask, loop):
            self.grow()
            calls += 1
        return mask, calls

    def walk(self, start: int, data: bytes) -> int:
        while (state := walk_bytes(self.table, self.ready, start, data, self.expand)) == GROW:
            self.grow()
        return state


ALPHABET = b"ab\x00\xff"


@st.composite
def dfas(draw) -> np.ndarray:
    """A table over ALPHABET (other bytes dead) with 1-6 states, some rows all dead, with
    self-loops drawn often (for the self-loop skip)."""
    n = draw(st.integers(1, 6))
    table = np.full((n, 256), -1, dtype=np.int32)
    for q in range(n):
        if draw(st.booleans()) or q == 0:
            for b in ALPHABET:
                table[q, b] = draw(st.one_of(st.just(q), st.integers(-1, n - 1)))
    return table


token_lists = st.lists(
    st.one_of(st.none(), st.binary(max_size=0), st.sampled_from([b"a", b"ab", b"ba", b"\xff"])),
    max_size=8,
).flatmap(
    lambda pool: st.lists(
        st.one_of(
            st.sampled_from(pool or [None]),
            st.lists(st.sampled_from(list(ALPHABET)), min_size=1, max_size=5).map(bytes),
        ),
        min_size=1,
        max_size=40,
    )
)


def check_trie_layout(trie: TokenTrie, token_bytes: list[bytes | None]) -> None:
    """Rebuild the token strings from the preorder arrays and check the subtree ends."""
    depths = trie.node_depth.tolist()
    path: list[int] = []
    found: dict[bytes, list[int]] = {}
    for i, d in enumerate(depths):
        path[d - 1 :] = [int(trie.node_byte[i])]
        later = [j for j in range(i + 1, len(depths)) if depths[j] <= d]
        assert trie.node_skip[i] == (later[0] if later else len(depths))
        t = int(trie.node_token[i])
        while t >= 0:
            found.setdefault(bytes(path), []).append(t)
            t = int(trie.token_alias[t])
    expected: dict[bytes, list[int]] = {}
    for t, b in enumerate(token_bytes):
        if b:
            expected.setdefault(b, []).append(t)
    assert found == expected
    assert trie.max_depth == max((len(b) for b in expected), default=0)


def check_loop_info(trie: TokenTrie, token_bytes: list[bytes | None], loops: set[int]) -> None:
    """`TokenTrie.loop_info` against its definition, node by node and token by token."""
    info = trie.loop_info(np.isin(np.arange(256), list(loops)), min_nodes=0)
    if info is None:  # no node to skip
        assert not loops & set(trie.node_byte[trie.node_depth == 1].tolist())
        return
    assert not info.mask.flags.writeable and not info.covered.flags.writeable
    in_loop = {t for t, b in enumerate(token_bytes) if b and set(b) <= loops}
    assert mask_ids(info.mask, len(token_bytes)) == in_loop
    depths = trie.node_depth.tolist()
    path: list[int] = []
    for i, d in enumerate(depths):
        path[d - 1 :] = [int(trie.node_byte[i])]
        subtree = trie.node_byte[i : trie.node_skip[i]].tolist()
        assert info.covered[i] == (set(path) <= loops and set(subtree) <= loops)


@settings(max_examples=150, deadline=None)
@given(
    table=dfas(),
    token_bytes=token_lists,
    cap=st.integers(1, 8),
    refuse_once=st.booleans(),
    data=st.lists(st.binary(max_size=6), max_size=4),
    loop_subset=st.sets(st.sampled_from(list(ALPHABET))),
)
def test_native_walk_matches_reference(
    table: np.ndarray,
    token_bytes: list[bytes | None],
    cap: int,
    refuse_once: bool,
    data: list[bytes],
    loop_subset: set[int],
) -> None:
    """Each start state three ways: a plain walk, with all its self-loop bytes and with some
    of them (any subset is allowed); each on a fresh table that fills lazily and grows on
    demand (``refuse_once``: the first expand asks for growth)."""
    trie = TokenTrie.from_token_bytes(token_bytes)
    check_trie_layout(trie, token_bytes)
    for start in range(len(table)):
        expected = reference_mask(table, start, token_bytes)
        loops = table[start] == start
        some_loops = loops & np.isin(np.arange(256), list(loop_subset))
        for loop in (None, *(trie.loop_info(ls, min_nodes=0) for ls in (loops, some_loops))):
            dfa = LazyDfa(table, cap, refuse_once)
            mask, calls = dfa.fill_mask(trie, start, loop)
            assert mask_ids(mask, len(token_bytes)) == expected
            assert calls > 1 or not (refuse_once and trie.num_nodes)
        check_loop_info(trie, token_bytes, set(np.flatnonzero(loops).tolist()))
        for chunk in data:
            assert dfa.walk(start, chunk) == reference_walk(table, start, chunk)


def test_loop_info_cache() -> None:
    """One `LoopInfo` per byte set, kept for the `LOOP_CACHE_SIZE` most recently used, and
    None when the subtrees it could skip are too small."""
    trie = TokenTrie.from_token_bytes([bytes([b, b]) for b in range(LOOP_CACHE_SIZE + 1)])
    sets = [np.arange(256) == b for b in range(LOOP_CACHE_SIZE + 1)]
    first = trie.loop_info(sets[0], min_nodes=2)
    assert first is not None and trie.loop_info(sets[0].copy(), min_nodes=2) is first
    assert trie.loop_info(sets[0], min_nodes=3) is None  # the subtree of b"\0" has 2 nodes
    assert trie.loop_info(sets[0]) is None  # LOOP_MIN_NODES
    assert trie.loop_info(np.zeros(256, dtype=bool), min_nodes=0) is None
    assert trie.loop_info(np.arange(256) == 255, min_nodes=0) is None  # no such root child
    for loops in sets[1:]:
        trie.loop_info(loops, min_nodes=0)
    last = trie.loop_info(sets[-1], min_nodes=0)
    assert last is not None and trie.loop_info(sets[-1], min_nodes=0) is last
    assert trie.loop_info(sets[0], min_nodes=0) is not first  # evicted, rebuilt
    assert mask_ids(last.mask, trie.size) == {LOOP_CACHE_SIZE}
    with pytest.raises(ValueError, match="self_loops"):
        trie.loop_info(np.ones(255, dtype=bool))


def test_loop_skip_walks_only_paths_leaving_the_loop() -> None:
    """From a state looping on b"a", the subtree of b"aa..." is never walked: a malformed
    node there (a bad token id) goes unnoticed, while the plain walk trips on it."""
    trie = TokenTrie.from_token_bytes([b"a", b"aa", b"aaa", b"ab", b"b", b"ba"])
    bad_token = trie.node_token.copy()
    bad_token[2] = 99  # the node of b"aaa"
    table = np.full((2, 256), -1, dtype=np.int32)
    table[0, ord("a")] = 0
    table[0, ord("b")] = 1
    table[1, ord("a")] = 0
    ready = np.ones(2, dtype=np.uint8)
    info = trie.loop_info(table[0] == 0, min_nodes=0)
    assert info is not None and info.covered.tolist() == [0, 1, 1, 0, 0, 0]
    args = [table, ready, trie.node_byte, trie.node_depth, trie.node_skip, bad_token]
    mask = trie.new_mask()

    def never(q: int) -> bool:
        pytest.fail(f"expand({q})")

    assert _native.fill_mask(*args, trie.token_alias, 0, never, mask, info.mask, info.covered)
    assert mask_ids(mask, 6) == {0, 1, 2, 3, 4, 5}
    with pytest.raises(ValueError, match="token id out of range"):
        _native.fill_mask(*args, trie.token_alias, 0, never, mask, None, None)


def test_native_walk_expands_lazily() -> None:
    """Only the states whose children are visited are expanded, each once."""
    table = np.full((4, 256), -1, dtype=np.int32)
    table[0, ord("a")] = 1
    table[1, ord("b")] = 2
    table[0, ord("c")] = 3
    dfa = LazyDfa(table, cap=4, refuse_once=False)
    trie = TokenTrie.from_token_bytes([b"a", b"ab", b"c", b"abx", b"c"])
    mask, _ = dfa.fill_mask(trie, 0)
    assert mask_ids(mask, 5) == {0, 1, 2, 4}
    assert dfa.expanded == [0, 1, 2]  # state 3 is a leaf's state: never expanded
    dfa.fill_mask(trie, 0)
    assert dfa.expanded == [0, 1, 2]


def test_native_walk_errors() -> None:
    trie = TokenTrie.from_token_bytes([b"a", b"ab"])
    table = np.zeros((2, 256), dtype=np.int32)
    ready = np.zeros(2, dtype=np.uint8)

    def boom(q: int) -> bool:
        raise KeyError(q)

    with pytest.raises(KeyError):
        trie.fill_mask(table, ready, 0, boom, trie.new_mask())
    with pytest.raises(KeyError):
        walk_bytes(table, ready, 0, b"a", boom)
    with pytest.raises(RuntimeError):
        trie.fill_mask(table, ready, 0, lambda q: True, trie.new_mask())
    ready[:] = 1
    ok = (table, ready, 0, lambda q: False, trie.new_mask())
    assert trie.fill_mask(*ok)
    bad_args = [
        (table.astype(np.float32), *ok[1:]),
        (table[:, :128].copy(), *ok[1:]),
        (table, ready[:1], *ok[2:]),
        (table, ready.astype(np.int32), *ok[2:]),
        (table, ready, -1, *ok[3:]),
        (*ok[:4], np.zeros(2, dtype=np.uint32)),
        (*ok[:4], np.zeros(1, dtype=np.uint64)),
    ]
    for args in bad_args:
        with pytest.raises(ValueError):
            trie.fill_mask(*args)
    with pytest.raises(ValueError, match="shape"):
        walk_bytes(table.reshape(-1), ready, 0, b"a", ok[3])
    readonly = trie.new_mask()
    readonly.flags.writeable = False
    with pytest.raises((ValueError, BufferError)):
        trie.fill_mask(*ok[:4], readonly)
    assert walk_bytes(table, ready, 5, b"", ok[3]) == 5
    assert walk_bytes(table, ready, 5, b"a", ok[3]) == GROW
    info = trie.loop_info(np.ones(256, dtype=bool), min_nodes=0)
    assert info is not None
    native_args = (table, ready, trie.node_byte, trie.node_depth, trie.node_skip, trie.node_token)
    tail = (trie.token_alias, 0, ok[3], trie.new_mask())
    assert _native.fill_mask(*native_args, *tail, info.mask, info.covered)
    bad_loops = [
        (info.mask[:-1], info.covered),
        (info.mask, info.covered[:-1]),
        (info.mask.view(np.uint8), info.covered),
        (info.mask, info.covered.astype(np.int32)),
    ]
    for loops in bad_loops:
        with pytest.raises(ValueError, match="loop_"):
            _native.fill_mask(*native_args, *tail, *loops)
    with pytest.raises(TypeError, match="both be None"):
        _native.fill_mask(*native_args, *tail, info.mask, None)


def test_native_walk_on_real_vocabulary(vocab: Vocabulary) -> None:
    trie, token_bytes = vocab.trie, vocab.token_bytes
    digits = np.full((1, 256), -1, dtype=np.int32)
    digits[0, ord("0") : ord("9") + 1] = 0
    expected = {t for t, b in enumerate(token_bytes) if b and b.isdigit()}
    for loop in (None, trie.loop_info(digits[0] == 0, min_nodes=0)):
        dfa = LazyDfa(digits, cap=1, refuse_once=True)
        mask, _ = dfa.fill_mask(trie, 0, loop)
        assert expected and mask_ids(mask, vocab.size) == expected
    assert dfa.walk(0, b"2024") == 0 and dfa.walk(0, b"20x") == DEAD

    anything = np.zeros((1, 256), dtype=np.int32)
    everything = trie.loop_info(anything[0] == 0)
    assert everything is not None and everything.covered.all()  # the walk skips every node
    for loop in (None, everything):
        mask, _ = LazyDfa(anything, cap=1, refuse_once=False).fill_mask(trie, 0, loop)
        assert mask_ids(mask, vocab.size) == {t for t, b in enumerate(token_bytes) if b}

    # [a-z]+ then one space: a few states, filled lazily.
    words = np.full((3, 256), -1, dtype=np.int32)
    words[0:2, ord("a") : ord("z") + 1] = 1
    words[1, ord(" ")] = 2
    mask, _ = LazyDfa(words, cap=1, refuse_once=False).fill_mask(trie, 0)
    assert mask_ids(mask, vocab.size) == reference_mask(words, 0, token_bytes)


def brute_force_mask(guide: TokenGuide, state: int) -> np.ndarray:
    """The mask of `state` from one `guide.walk` per token (EOS where the state accepts)."""
    vocab = guide.vocab
    bits = np.zeros((vocab.size + 31) // 32 * 32, dtype=bool)
    for t, b in enumerate(vocab.token_bytes):
        bits[t] = bool(b) and guide.walk(state, b) != DEAD
    bits[list(vocab.eos_token_ids)] = guide.is_accepting(state)
    return np.packbits(bits, bitorder="little").view("<u4").astype(np.uint32)


@pytest.mark.parametrize(
    ("constraint", "prefixes"),
    [
        (
            {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
            # inside the string (self-loops on most of ASCII), after an escape, inside a UTF-8
            # character, after the string
            {b'{"a":"ab': True, b'{"a":"ab\\': False, b'{"a":"\xc3': False, b'{"a":"x"': False},
        ),
        ("[0-9]+(\\.[0-9]+)?", {b"12": False, b"12.": False, b"12.5": False}),
        ("[a-z ]+,[^,]*", {b"ab": True, b"ab,": True, b"ab,\xe2\x80": False}),
    ],
)
def test_guide_masks_match_brute_force(
    vocab: Vocabulary, constraint: dict | str, prefixes: dict[bytes, bool]
) -> None:
    """Masks of a real guide (lazy DFA) equal one walk per token, with the self-loop skip
    where ``prefixes`` says its state loops on enough of the trie (see `LOOP_MIN_NODES`)."""
    if isinstance(constraint, str):
        guide = compile_regex(constraint, vocab)
    else:
        guide = compile_json_schema(constraint, vocab)
    for prefix, skips in prefixes.items():
        state = guide.walk(guide.initial_state, prefix)
        assert state != DEAD, prefix
        mask = guide.allowed_mask(state)
        assert not mask.flags.writeable
        np.testing.assert_array_equal(mask, brute_force_mask(guide, state), err_msg=str(prefix))
        loop = vocab.trie.loop_info(guide.dfa.row(state) == state)
        assert (loop is not None) == skips, prefix
