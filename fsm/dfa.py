"""A lazily built byte DFA over the terms of a `TermStore`.

States are dense ids (0, 1, ...) standing for terms; `DEAD` (-1) is the empty language, and
so is any term with no accepting continuation, so a live state can always still reach
acceptance. The transition table is a numpy `int32[capacity, 256]` whose rows are computed
on demand by `expand`; `row_ready[q]` tells which rows are valid. The native token walker
reads the table directly and calls `expand` for rows it lacks; `expand` never reallocates
the arrays (it returns False when the capacity is too small, and the caller calls `grow`).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from fsm.terms import TermStore

DEAD = -1


class LazyDFA:
    """Deterministic automaton of a term, materialized one state (row) at a time."""

    def __init__(self, store: TermStore, term: int, capacity: int = 64) -> None:
        self.store = store
        self._terms: list[int] = []
        self._ids: dict[int, int] = {}
        self.table = np.full((capacity, 256), DEAD, dtype=np.int32)
        self.row_ready = np.zeros(capacity, dtype=np.uint8)
        self._forced: dict[int, bytes] = {}
        self.start = self.state_of(term)

    @property
    def num_states(self) -> int:
        return len(self._terms)

    def state_of(self, term: int) -> int:
        """The state id of `term` (DEAD when its language is empty)."""
        sid = self._ids.get(term)
        if sid is None:
            if self.store.is_empty(term):
                return DEAD
            sid = self._ids[term] = len(self._terms)
            self._terms.append(term)
        return sid

    def term_of(self, state: int) -> int:
        return self._terms[state]

    def is_accepting(self, state: int) -> bool:
        return state != DEAD and self.store.nullable(self._terms[state])

    def expand(self, state: int) -> bool:
        """Fill row `state`; False when the arrays must grow first (the row is left unset)."""
        if state >= len(self.row_ready):
            return False
        if self.row_ready[state]:
            return True
        row = self.table[state]
        for mask, succ in self.store.row(self._terms[state]):
            target = self.state_of(succ)
            if target != DEAD:
                row[_mask_to_bytes(mask)] = target
        self.row_ready[state] = 1
        return True

    def grow(self) -> None:
        """Double the capacity (at least enough for every known state)."""
        cap = max(2 * len(self.row_ready), len(self._terms) + 1)
        table = np.full((cap, 256), DEAD, dtype=np.int32)
        table[: len(self.table)] = self.table
        ready = np.zeros(cap, dtype=np.uint8)
        ready[: len(self.row_ready)] = self.row_ready
        self.table, self.row_ready = table, ready

    def row(self, state: int) -> np.ndarray:
        """Row `state` of the table, computed if needed."""
        while not self.expand(state):
            self.grow()
        return self.table[state]

    def step(self, state: int, byte: int) -> int:
        return int(self.row(state)[byte])

    def walk(self, state: int, data: bytes) -> int:
        for b in data:
            if state == DEAD:
                break
            state = self.step(state, b)
        return state

    def forced_bytes(self, state: int, limit: int = 256) -> bytes:
        """The bytes every continuation of `state` must start with (empty if none is forced).

        Stops at an accepting state, where ending is one more option.
        """
        cached = self._forced.get(state)
        if cached is not None:
            return cached
        out = bytearray()
        q = state
        while len(out) < limit and not self.is_accepting(q):
            live = np.flatnonzero(self.row(q) != DEAD)
            if len(live) != 1:
                break
            out.append(int(live[0]))
            q = self.step(q, int(live[0]))
        forced = self._forced[state] = bytes(out)
        return forced


@lru_cache(maxsize=1 << 14)
def _mask_to_bytes(mask: int) -> np.ndarray:
    """The bytes set in the 256-bit integer `mask`, ascending (read-only; cached, as the
    derivative classes of a grammar repeat from state to state)."""
    words = np.frombuffer(mask.to_bytes(32, "little"), dtype=np.uint8)
    out = np.flatnonzero(np.unpackbits(words, bitorder="little"))
    out.setflags(write=False)
    return out
