"""A lazily built byte DFA over the terms of a `TermStore`.

States are dense ids (0, 1, ...) standing for terms; `DEAD` (-1) is the empty language, and
so is any term with no accepting continuation, so a live state can always still reach
acceptance. A state's row (its 256 successors) is computed one derivative class at a time,
when an entry of the class is first read. The automaton itself is native
(`fsm._native.DfaRows`, see `fsm/_dfa_rows.h`): the token masks (`TokenTrie.state_mask`) and
walks read its table and fill it without going through Python.
"""

from __future__ import annotations

import numpy as np

from fsm import _native
from fsm.terms import TermStore

DEAD = -1


class LazyDFA:
    """Deterministic automaton of a term, materialized one state (row) at a time."""

    def __init__(self, store: TermStore, term: int) -> None:
        self.store = store
        self.rows = _native.DfaRows(store)
        self._forced: dict[int, bytes] = {}
        self.start = self.rows.state_of(term)

    @property
    def num_states(self) -> int:
        return self.rows.num_states

    def state_of(self, term: int) -> int:
        """The state id of `term` (DEAD when its language is empty)."""
        return self.rows.state_of(term)

    def term_of(self, state: int) -> int:
        return self.rows.term_of(state)

    def is_accepting(self, state: int) -> bool:
        return state != DEAD and self.store.nullable(self.rows.term_of(state))

    def row(self, state: int) -> np.ndarray:
        """The successors of `state` by byte (``int32[256]``, read-only), computed if needed."""
        return np.frombuffer(self.rows.row(state), dtype=np.int32)

    def step(self, state: int, byte: int) -> int:
        return self.walk(state, bytes((byte,)))

    def walk(self, state: int, data: bytes) -> int:
        """The state after the bytes `data`, or DEAD."""
        return state if state == DEAD else self.rows.walk(state, data)

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
