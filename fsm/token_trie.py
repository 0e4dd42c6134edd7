"""A trie over token byte strings, laid out flat for the native mask walk.

Nodes are stored in DFS preorder with the root excluded; children are ordered by byte. Node
``i`` consumes byte ``node_byte[i]`` at depth ``node_depth[i]`` (1 for children of the root),
its subtree is ``i .. node_skip[i] - 1``, and ``node_token[i]`` is the smallest token id whose
bytes end exactly at node ``i`` (or -1). Further tokens with the same bytes are chained by
``token_alias`` (each link points to a larger id; -1 ends the chain). Tokens whose bytes are
``None`` or empty are not in the trie, so they never enter a mask.

The walk itself lives in the C extension ``fsm._native``; `TokenTrie.fill_mask` and
`walk_bytes` are its typed entry points. Both read a DFA transition table that the caller
fills lazily: ``table`` is a C-contiguous ``int32[cap, 256]`` (``table[q, b]`` is the next
state, or -1 for a dead transition) and row ``q`` is valid only once ``row_ready[q] != 0``
(``uint8[cap]``). When the walk needs a row that is not ready it calls ``expand(q)``, which
must fill ``table[q]``, set ``row_ready[q]`` and return True, or return False (touching
nothing) when the table must first grow to a larger capacity. The walk also stops for growth
when it needs the row of a state ``q >= cap``. ``expand`` may write into the arrays while the
walk holds them, but must never resize them in place.

Self-loops: when the start state ``q`` loops on a set L of bytes (``table[q, b] == q``), every
token made only of bytes in L stays in ``q`` and is allowed. `TokenTrie.loop_info` gives
(and caches per L) the mask of those tokens and which subtrees hold nothing else; with it,
`TokenTrie.fill_mask` starts from that mask and skips those subtrees, so a state that allows
most of the vocabulary (inside a free string, say) only visits the nodes on paths that leave
L.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
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
"""How many self-loop byte sets a `TokenTrie` keeps the `LoopInfo` of (least recently used
out first)."""
LOOP_MIN_NODES = 4096
"""`TokenTrie.loop_info` gives None below this bound on the nodes the skip could save."""


class LoopInfo(NamedTuple):
    """The trie seen from a state that loops on the byte set L (read-only arrays)."""

    mask: np.ndarray
    """``uint32[ceil(size / 32)]``: the tokens whose bytes all lie in L."""
    covered: np.ndarray
    """``uint8[N]``: 1 where all tokens of the node's subtree are in `mask`: the bytes on the
    path to the node and in its subtree (the node included) all lie in L."""


@dataclass(frozen=True, eq=False)
class TokenTrie:
    """Flat preorder trie over the token byte strings of one vocabulary (see module doc).

    Built by `from_token_bytes`, whose arrays are read-only. Thread-safe: the lazily built
    `LoopInfo` cache has its own lock.
    """

    node_byte: np.ndarray  # uint8[N]
    node_depth: np.ndarray  # int32[N]
    node_skip: np.ndarray  # int32[N]
    node_token: np.ndarray  # int32[N]
    token_alias: np.ndarray  # int32[size]
    max_depth: int
    _loop_cache: OrderedDict[bytes, LoopInfo] = field(
        default_factory=OrderedDict, init=False, repr=False
    )
    _loop_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @classmethod
    def from_token_bytes(cls, token_bytes: Sequence[bytes | None]) -> TokenTrie:
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
        return cls._from_sorted_unique(strings, firsts, np.array(alias, dtype=np.int32))

    @classmethod
    def _from_sorted_unique(
        cls, strings: list[bytes], firsts: list[int], alias: np.ndarray
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

        ``loop``, from this trie's `loop_info`, must be that of a byte set whose bytes all
        loop on ``start_state`` (``table[start_state, b] == start_state`` once the row is
        filled), not necessarily all such bytes: the walk then starts from ``loop.mask`` and
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
            *(loop or (None, None)),
        )

    def loop_info(self, self_loops: np.ndarray, min_nodes: int = LOOP_MIN_NODES) -> LoopInfo | None:
        """The `LoopInfo` of the byte set ``self_loops`` (``bool[256]``, indexed by byte).

        None when the subtrees of the root's children on those bytes hold fewer than
        ``max(min_nodes, 1)`` nodes: the skip saves at most that many node visits, and
        building the info costs about a walk of the whole trie. Cached per byte set (the
        `LOOP_CACHE_SIZE` most recently used).
        """
        loops = np.asarray(self_loops, dtype=bool)
        if loops.shape != (256,):
            raise ValueError(f"self_loops: expected shape (256,), got {loops.shape}")
        if self._root_sizes @ loops < max(min_nodes, 1):
            return None
        key = np.packbits(loops).tobytes()  # 32 bytes, bit b set iff byte b loops
        with self._loop_lock:
            info = self._loop_cache.get(key)
            if info is not None:
                self._loop_cache.move_to_end(key)
                return info
        info = self._build_loop_info(loops)
        with self._loop_lock:
            self._loop_cache[key] = info
            while len(self._loop_cache) > LOOP_CACHE_SIZE:
                self._loop_cache.popitem(last=False)
        return info

    @cached_property
    def _root_sizes(self) -> np.ndarray:
        """``int64[256]``: the number of nodes in the subtree of the root's child on each byte."""
        roots = np.flatnonzero(self.node_depth == 1)
        sizes = np.zeros(256, dtype=np.int64)
        sizes[self.node_byte[roots]] = self.node_skip[roots] - roots
        return sizes

    def _build_loop_info(self, loops: np.ndarray) -> LoopInfo:
        """`LoopInfo` of the byte set ``loops``: O(N + size), vectorized over the preorder."""
        n, skip = self.num_nodes, self.node_skip
        outside = np.take(~loops, self.node_byte)  # the node's own byte is not in L
        # A node's path stays in L iff no ancestor-or-self is outside: count, per node, the
        # subtrees of outside nodes containing it (+1 at the node, -1 at its subtree end).
        starts = np.flatnonzero(outside)
        nesting = np.bincount(starts, minlength=n + 1) - np.bincount(skip[starts], minlength=n + 1)
        on_loop = np.cumsum(nesting[:n]) == 0
        # The subtree i .. skip[i] - 1 has an outside node iff the outside count grows over it.
        before = np.concatenate(([0], np.cumsum(outside, dtype=np.int32)))
        covered = (on_loop & (np.take(before, skip) == before[:n])).view(np.uint8)
        # The tokens of on-loop nodes; nodes without one (-1) set the extra last bit.
        bits = np.zeros((self.size + 31) // 32 * 32 + 1, dtype=bool)
        bits[self.node_token[on_loop]] = True
        bits = bits[:-1]
        tokens = np.flatnonzero(bits[: self.size] & (self.token_alias >= 0))
        while len(tokens):  # follow the alias chains one link at a time
            tokens = self.token_alias[tokens]
            bits[tokens] = True
            tokens = tokens[self.token_alias[tokens] >= 0]
        mask = np.packbits(bits, bitorder="little").view("<u4").astype(np.uint32)
        mask.setflags(write=False)
        covered.setflags(write=False)
        return LoopInfo(mask, covered)


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
