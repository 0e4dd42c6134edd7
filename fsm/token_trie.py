"""A trie over token byte strings, laid out flat for the native mask walk.

Nodes are stored in DFS preorder with the root excluded; children are ordered by byte. Node
``i`` consumes byte ``node_byte[i]`` at depth ``node_depth[i]`` (1 for children of the root),
its subtree is ``i .. node_skip[i] - 1``, and ``node_token[i]`` is the smallest token id whose
bytes end exactly at node ``i`` (or -1). Further tokens with the same bytes are chained by
``token_alias`` (each link points to a larger id; -1 ends the chain). Tokens whose bytes are
``None`` or empty are not in the trie, so they never enter a mask.

The walks live in the C extension ``fsm._native``. `TokenTrie.state_mask` is the one the
guides use: the mask of a state of a `LazyDFA` in one call (`fsm/_trie_masks.h`).
`TokenTrie.fill_mask` and `walk_bytes` are the plain walks over a caller's table, the
reference the tests compare `state_mask` with: ``table`` is a C-contiguous ``int32[cap,
256]`` (``table[q, b]`` is the next state, or -1 for a dead transition) and row ``q`` is
valid only once ``row_ready[q] != 0`` (``uint8[cap]``). When the walk needs a row that is not
ready it calls ``expand(q)``, which must fill ``table[q]``, set ``row_ready[q]`` and return
True, or return False (touching nothing) when the table must first grow to a larger capacity.
The walk also stops for growth when it needs the row of a state ``q >= cap``. ``expand`` may
write into the arrays while the walk holds them, but must never resize them in place.

Slices: a slice is a byte set L of one-byte characters, optionally with every well-formed
multi-byte UTF-8 character too; its tokens are the token strings that are prefixes of strings
of those characters. `TokenTrie.loop_info` gives (and caches per slice) their mask and which
subtrees hold nothing else. When every string of a slice is known to lead from a state to a
live state (the state loops on L, or its term proves it: `TermStore.safe`), the walk starts
from that mask and skips those subtrees, so a state that allows most of the vocabulary
(inside a string, or an object key that may be undeclared) only visits the nodes on paths
that leave the slice. `fill_mask` offers the case of a start state looping on L.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import NamedTuple

import numpy as np

from fsm import _native

Expand = Callable[[int], bool]
"""``expand(q)``: fill row ``q`` and mark it ready (True), or ask for a larger table (False)."""

DEAD = -1
"""`walk_bytes` result: a transition on the way was dead."""
GROW = -2
"""`walk_bytes` result: the table must grow (``expand`` returned False or a state >= cap)."""
LOOP_CACHE_SIZE = 32
"""How many slices a `TokenTrie` keeps the `LoopInfo` of (least recently used out first)."""
LOOP_MIN_NODES = 4096
"""`TokenTrie.loop_info` gives None below this bound on the nodes the skip could save."""


class LoopInfo(NamedTuple):
    """The trie seen through a slice (see the module docstring; read-only arrays)."""

    mask: np.ndarray
    """``uint32[ceil(size / 32)]``: the tokens of the slice (the L-tokens); for a plain byte
    set L, the tokens whose bytes all lie in L."""
    covered: np.ndarray
    """``uint8[N]``: 1 where all tokens of the node's subtree (the node included) are in
    `mask`; for a plain byte set, where the bytes on the path to the node and in its subtree
    all lie in L."""
    starts: np.ndarray
    """``int32[N + 1]``: the L-tokens of nodes ``i .. j - 1`` (preorder) are
    ``tokens[starts[i]:starts[j]]``."""
    tokens: np.ndarray
    """``int32``: the L-tokens (aliases included) ordered by the preorder of their nodes."""


@dataclass(frozen=True, eq=False)
class TokenTrie:
    """Flat preorder trie over the token byte strings of one vocabulary (see module doc).

    Built by `from_token_bytes`, whose arrays are read-only. Thread-safe (the native parts
    hold the GIL).
    """

    node_byte: np.ndarray  # uint8[N]
    node_depth: np.ndarray  # int32[N]
    node_skip: np.ndarray  # int32[N]
    node_token: np.ndarray  # int32[N]
    token_alias: np.ndarray  # int32[size]
    max_depth: int
    loop_min_nodes: int = LOOP_MIN_NODES
    """`state_mask` walks with a slice only where it can skip at least this many nodes."""
    _masks: _native.TrieMasks = field(init=False, repr=False)
    """The native side: the trie arrays, the `LoopInfo` cache, `state_mask`."""

    def __post_init__(self) -> None:
        arrays = (self.node_byte, self.node_depth, self.node_skip, self.node_token)
        masks = _native.TrieMasks(
            *arrays,
            self.token_alias,
            build=partial(_build_loop_info, *arrays, self.token_alias),
            cache_size=LOOP_CACHE_SIZE,
            min_nodes=self.loop_min_nodes,
        )
        object.__setattr__(self, "_masks", masks)

    @classmethod
    def from_token_bytes(
        cls, token_bytes: Sequence[bytes | None], loop_min_nodes: int = LOOP_MIN_NODES
    ) -> TokenTrie:
        """The trie of ``token_bytes`` (indexed by token id; None or b"" are left out)."""
        first: dict[bytes, int] = {}
        last: dict[bytes, int] = {}
        alias = [-1] * len(token_bytes)
        for t, b in enumerate(token_bytes):
            if b:
                prev = last.get(b)
                if prev is None:
                    first[b] = t
                else:
                    alias[prev] = t
                last[b] = t
        strings = sorted(first)
        firsts = [first[b] for b in strings]
        alias_array = np.array(alias, dtype=np.int32)
        return cls._from_sorted_unique(strings, firsts, alias_array, loop_min_nodes)

    @classmethod
    def _from_sorted_unique(
        cls, strings: list[bytes], firsts: list[int], alias: np.ndarray, loop_min_nodes: int
    ) -> TokenTrie:
        # In sorted order, string k adds one node per byte after its common prefix with
        # string k - 1, which yields the nodes in preorder.
        shared = [_common_prefix(a, b) for a, b in zip([b"", *strings], strings)]
        lengths = np.array([len(s) for s in strings], dtype=np.int32)
        shared_depth = np.array(shared, dtype=np.int32)
        added = lengths - shared_depth
        first_node = np.cumsum(added) - added
        n = int(added.sum())
        node_byte = np.frombuffer(
            b"".join(s[k:] for s, k in zip(strings, shared)), dtype=np.uint8
        ).copy()
        offset_in_run = np.arange(n, dtype=np.int32) - np.repeat(first_node, added)
        node_depth = (np.repeat(shared_depth, added) + offset_in_run + 1).astype(np.int32)
        node_token = np.full(n, -1, dtype=np.int32)
        node_token[first_node + added - 1] = firsts
        node_skip = _subtree_ends(node_depth.tolist())
        for array in (node_byte, node_depth, node_skip, node_token, alias):
            array.setflags(write=False)
        return cls(
            node_byte=node_byte,
            node_depth=node_depth,
            node_skip=node_skip,
            node_token=node_token,
            token_alias=alias,
            max_depth=int(lengths.max(initial=0)),
            loop_min_nodes=loop_min_nodes,
        )

    @property
    def size(self) -> int:
        """Vocabulary size: the number of bits of a mask."""
        return len(self.token_alias)

    @property
    def num_nodes(self) -> int:
        return len(self.node_byte)

    def new_mask(self) -> np.ndarray:
        """A zeroed ``uint32[ceil(size / 32)]`` mask buffer (bit ``t & 31`` of word ``t >> 5``)."""
        return np.zeros((self.size + 31) // 32, dtype=np.uint32)

    def fill_mask(
        self,
        table: np.ndarray,
        row_ready: np.ndarray,
        start_state: int,
        expand: Expand,
        mask_out: np.ndarray,
        loop: LoopInfo | None = None,
    ) -> bool:
        """Set in ``mask_out`` exactly the tokens whose bytes lead from ``start_state`` to a
        live state; return False when the table must grow first (then call again).

        ``loop``, from this trie's `loop_info` without ``utf8``, must be that of a byte set
        whose bytes all loop on ``start_state`` (``table[start_state, b] == start_state`` once
        the row is filled), not necessarily all such bytes: the walk then starts from
        ``loop.mask`` and
        skips the covered subtrees. ``mask_out`` (``uint32[ceil(size / 32)]``, see `new_mask`)
        is overwritten; on False its content is unspecified. Exceptions from ``expand``
        propagate; buffers of the wrong size or item size raise ValueError.
        """
        return _native.fill_mask(
            table,
            row_ready,
            self.node_byte,
            self.node_depth,
            self.node_skip,
            self.node_token,
            self.token_alias,
            start_state,
            expand,
            mask_out,
            *((loop.mask, loop.covered) if loop else (None, None)),
        )

    def loop_info(
        self, self_loops: np.ndarray, min_nodes: int = LOOP_MIN_NODES, utf8: bool = False
    ) -> LoopInfo | None:
        """The `LoopInfo` of the slice of the byte set ``self_loops`` (``bool[256]``, indexed
        by byte) and, with ``utf8``, of every well-formed multi-byte UTF-8 character (then the
        byte set must be ASCII): its tokens are the strings of those characters, followed with
        ``utf8`` by a proper prefix of one more multi-byte character.

        None when the subtrees of the root's children on those bytes hold fewer than
        ``max(min_nodes, 1)`` nodes: the skip saves at most that many node visits, and
        building the info costs about a walk of the whole trie. Cached per slice (the
        `LOOP_CACHE_SIZE` most recently used).
        """
        loops = np.asarray(self_loops, dtype=bool)
        if loops.shape != (256,):
            raise ValueError(f"self_loops: expected shape (256,), got {loops.shape}")
        if utf8 and loops[0x80:].any():
            raise ValueError("self_loops: a UTF-8 slice takes ASCII bytes only")
        if self._root_sizes @ loops < max(min_nodes, 1):
            return None
        return self._masks.loop_info(np.packbits(loops, bitorder="little").tobytes(), utf8)

    def state_mask(
        self, rows: _native.DfaRows, state: int, mask_out: np.ndarray, eos: np.ndarray
    ) -> None:
        """Set in ``mask_out`` exactly the tokens whose bytes lead from ``state`` of ``rows``
        (a `LazyDFA`'s automaton) to a live state, and the ``eos`` ids (``int64``) if the state
        accepts: the plain walk's mask (`fill_mask`), computed faster where many tokens are
        allowed (see the module docstring)."""
        self._masks.state_mask(rows, state, mask_out, eos)

    @cached_property
    def _root_sizes(self) -> np.ndarray:
        """``int64[256]``: the number of nodes in the subtree of the root's child on each byte."""
        roots = np.flatnonzero(self.node_depth == 1)
        sizes = np.zeros(256, dtype=np.int64)
        sizes[self.node_byte[roots]] = self.node_skip[roots] - roots
        return sizes


def _utf8_transitions(ascii_bytes: np.ndarray) -> np.ndarray:
    """``uint8[9, 256]``: a byte automaton of the prefixes of strings of the given ASCII bytes
    and of well-formed multi-byte UTF-8 characters. State 0: at a character boundary; 1-3:
    1-3 continuation bytes due; 4-7: after E0, ED, F0, F4 (restricted second byte); 8: not a
    prefix (absorbing)."""
    t = np.full((9, 256), 8, dtype=np.uint8)
    t[0, :0x80] = np.where(ascii_bytes[:0x80], 0, 8)
    t[0, 0xC2:0xE0] = 1
    t[0, 0xE1:0xF0] = 2
    t[0, [0xE0, 0xED, 0xF0, 0xF4]] = [4, 5, 6, 7]
    t[0, 0xF1:0xF4] = 3
    t[1:4, 0x80:0xC0] = [[0], [1], [2]]
    t[4, 0xA0:0xC0] = 1
    t[5, 0x80:0xA0] = 1
    t[6, 0x90:0xC0] = 2
    t[7, 0x80:0x90] = 2
    return t


def _slice_paths(
    node_byte: np.ndarray, node_depth: np.ndarray, node_skip: np.ndarray, key: bytes, utf8: bool
) -> np.ndarray:
    """``bool[N]``: whether the path to each node is a prefix of a string of the slice."""
    loops = np.unpackbits(np.frombuffer(key, dtype=np.uint8), bitorder="little").astype(bool)
    n = len(node_byte)
    if not utf8:
        # A path stays in L iff no ancestor-or-self has its byte outside: count, per node, the
        # subtrees of outside nodes containing it (+1 at the node, -1 at its subtree end).
        cuts = np.flatnonzero(np.take(~loops, node_byte))
        nesting = np.bincount(cuts, minlength=n + 1) - np.bincount(node_skip[cuts], minlength=n + 1)
        return np.cumsum(nesting[:n]) == 0
    transitions = _utf8_transitions(loops)
    state = np.zeros(n, dtype=np.uint8)
    above = np.zeros(0, dtype=np.int64)  # the nodes one level up, in preorder
    for depth in range(1, int(node_depth.max(initial=0)) + 1):
        level = np.flatnonzero(node_depth == depth)
        parent = np.zeros(len(level), dtype=np.uint8)
        if depth > 1:  # the parent is the last node one level up before the node
            parent = state[above[np.searchsorted(above, level) - 1]]
        state[level] = transitions[parent, node_byte[level]]
        above = level
    return state != 8


def _build_loop_info(
    node_byte: np.ndarray,
    node_depth: np.ndarray,
    node_skip: np.ndarray,
    node_token: np.ndarray,
    token_alias: np.ndarray,
    key: bytes,
    utf8: bool,
) -> LoopInfo:
    """`LoopInfo` of the slice of the byte set ``key`` (32 bytes, bit ``b`` = byte ``b``),
    with ``utf8`` of the multi-byte characters too (see `TokenTrie.loop_info`), over the trie
    of these arrays (see `TokenTrie`): vectorized over the preorder."""
    n, size = len(node_byte), len(token_alias)
    on = _slice_paths(node_byte, node_depth, node_skip, key, utf8)
    # Covered: no node off the slice in the subtree i .. skip[i] - 1 (i included).
    before = np.concatenate(([0], np.cumsum(~on, dtype=np.int32)))
    covered = (np.take(before, node_skip) == before[:n]).view(np.uint8)
    # The tokens of on-slice nodes with their alias chains, in preorder of their nodes.
    nodes = np.flatnonzero(on & (node_token >= 0))
    links = [(nodes, node_token[nodes])]
    while len(links[-1][0]):  # follow the alias chains one link at a time
        owners, previous = links[-1]
        alias = token_alias[previous]
        links.append((owners[alias >= 0], alias[alias >= 0]))
    owners = np.concatenate([o for o, _ in links])
    order = np.argsort(owners, kind="stable")
    tokens = np.concatenate([t for _, t in links])[order].astype(np.int32)
    starts = np.concatenate(([0], np.cumsum(np.bincount(owners, minlength=n)))).astype(np.int32)
    bits = np.zeros((size + 31) // 32 * 32, dtype=bool)
    bits[tokens] = True
    mask = np.packbits(bits, bitorder="little").view("<u4").astype(np.uint32)
    for array in (mask, covered, starts, tokens):
        array.setflags(write=False)
    return LoopInfo(mask, covered, starts, tokens)


def walk_bytes(
    table: np.ndarray, row_ready: np.ndarray, start_state: int, data: bytes, expand: Expand
) -> int:
    """The state reached from ``start_state`` by the bytes of ``data``; `DEAD` (-1) if a
    transition is dead, `GROW` (-2) if the table must grow first (then call again)."""
    return _native.walk_bytes(table, row_ready, start_state, data, expand)


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _subtree_ends(depths: list[int]) -> np.ndarray:
    """For each preorder node, the index of the next node at the same or a smaller depth."""
    skip = np.empty(len(depths), dtype=np.int32)
    open_nodes: list[int] = []
    for i, d in enumerate(depths):
        while open_nodes and depths[open_nodes[-1]] >= d:
            skip[open_nodes.pop()] = i
        open_nodes.append(i)
    skip[open_nodes] = len(depths)
    return skip
