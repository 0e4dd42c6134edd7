"""A compiled constraint over one vocabulary: token masks, transitions and forced text.

`TokenGuide` follows generation token by token. Its states are the states of a `LazyDFA`
over bytes; a token is allowed in a state when its whole byte string leads to a live state
(one from which acceptance is still reachable), and an end-of-sequence token only where the
state accepts. Masks are computed on first visit by one native call (`TokenTrie.state_mask`:
a trie walk that skips what a slice proof covers) and cached per state, so a revisited state
costs a dictionary lookup and the caller copies the cached words.

Mask buffers are rows of blocks allocated `MASK_BLOCK` at a time (the first block with the
guide): one allocation per block instead of one per state, and none on the first visits right
after compilation. The blocks come from the native buffer pool (`_native.MaskBlock`: memory
already mapped and touched, reused once every mask of a dropped guide is gone), so writing a
new mask causes no page faults.

Thread safety: one lock guards the lazy parts, so a guide may be shared between threads.
"""

from __future__ import annotations

import threading

import numpy as np

from fsm import _native
from fsm.dfa import DEAD, LazyDFA
from fsm.vocabulary import Vocabulary

MASK_BLOCK = 64
"""Masks allocated at once when a guide's block of mask buffers runs out."""
FIRST_MASK_BLOCK = 16
"""Masks allocated with the guide."""


class TokenGuide:
    """Token-level view of a byte DFA (see the module docstring)."""

    def __init__(self, dfa: LazyDFA, vocab: Vocabulary) -> None:
        self.dfa = dfa
        self.vocab = vocab
        self.initial_state = dfa.start
        self._masks: dict[int, np.ndarray] = {}
        self._eos = np.array(sorted(vocab.eos_token_ids), dtype=np.int64)
        self._lock = threading.Lock()
        self._block = self._new_block(FIRST_MASK_BLOCK)
        self._block_used = 0

    def allowed_mask(self, state: int) -> np.ndarray:
        """Packed allowed-token bits for `state`: `uint32[ceil(vocab.size / 32)]`, read-only."""
        mask = self._masks.get(state)
        if mask is None:
            with self._lock:
                mask = self._masks.get(state)
                if mask is None:
                    mask = self._masks[state] = self._compute_mask(state)
        return mask

    def _compute_mask(self, state: int) -> np.ndarray:
        """The read-only mask of `state` (see `allowed_mask`); the caller holds the lock."""
        if self._block_used == len(self._block):
            self._block, self._block_used = self._new_block(MASK_BLOCK), 0
        mask = self._block[self._block_used]
        self.vocab.trie.state_mask(self.dfa.rows, state, mask, self._eos)
        self._block_used += 1
        mask.setflags(write=False)
        return mask

    def _new_block(self, rows: int) -> np.ndarray:
        """Uninitialized buffers for ``rows`` masks (`state_mask` writes every word)."""
        words = (self.vocab.size + 31) // 32
        block = _native.MaskBlock(rows * words * 4)
        return np.frombuffer(block, dtype=np.uint32).reshape(rows, words)

    def allowed_token_ids(self, state: int) -> np.ndarray:
        """The allowed token ids of `state`, ascending."""
        bits = np.unpackbits(self.allowed_mask(state).view(np.uint8), bitorder="little")
        return np.flatnonzero(bits[: self.vocab.size])

    def advance(self, state: int, token_id: int) -> int:
        """The state after `token_id`, or DEAD if the token is not allowed in `state`.

        An end-of-sequence token keeps an accepting state (generation ends there).
        """
        if state == DEAD:
            return DEAD
        if token_id in self.vocab.eos_token_ids:
            return state if self.dfa.is_accepting(state) else DEAD
        data = self.vocab.token_bytes[token_id] if 0 <= token_id < self.vocab.size else None
        if not data:
            return DEAD
        return self.walk(state, data)

    def walk(self, state: int, data: bytes) -> int:
        """The state after the bytes `data`, or DEAD."""
        with self._lock:
            return self.dfa.walk(state, data)

    def is_accepting(self, state: int) -> bool:
        return self.dfa.is_accepting(state)

    def is_terminal(self, state: int) -> bool:
        """Accepting with no way to continue: generation must end here."""
        with self._lock:
            return self.dfa.is_accepting(state) and not (self.dfa.row(state) != DEAD).any()

    def forced_bytes(self, state: int) -> bytes:
        """The bytes that must come next (jump-forward), cut at a UTF-8 character boundary."""
        with self._lock:
            forced = self.dfa.forced_bytes(state)
        end = len(forced)
        while end and not _is_complete_utf8(forced[:end]):
            end -= 1
        return forced[:end]

    @property
    def num_states(self) -> int:
        return self.dfa.num_states

    @property
    def num_masks(self) -> int:
        return len(self._masks)


def _is_complete_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
