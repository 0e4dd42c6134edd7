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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fsm import _native

Expand = Callable[[int], bool]
"""``expand(q)``: fill row ``q`` and mark it ready (True), or ask for a larger table (False)."""

DEAD = -1
"""`walk_bytes` result: a transition on the way was dead."""
GROW = -2
"""`walk_bytes` result: the table must grow (``expand`` returned False or a state >= cap)."""


@dataclass(frozen=True, eq=False)
class TokenTrie:
    """Flat preorder trie over the token byte strings of one vocabulary (see module doc).

    Built by `from_token_bytes`, whose arrays are read-only.
    """

    node_byte: np.ndarray  # uint8[N]
    node_depth: np.ndarray  # int32[N]
    node_skip: np.ndarray  # int32[N]
    node_token: np.ndarray  # int32[N]
    token_alias: np.ndarray  # int32[size]
    max_depth: int

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
    ) -> bool:
        """Set in ``mask_out`` exactly the tokens whose bytes lead from ``start_state`` to a
        live state; return False when the table must grow first (then call again).

        ``mask_out`` (``uint32[ceil(size / 32)]``, see `new_mask`) is zeroed first; on False
        its content is unspecified. Exceptions from ``expand`` propagate; buffers of the wrong
        size or item size raise ValueError.
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
        )


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
