"""Incremental detokenization: turn a growing stream of output token ids into stable text.

Contract (``IncrementalDetokenizer``), with ``D(ids)`` meaning ``tokenizer.decode(ids,
skip_special_tokens=..., clean_up_tokenization_spaces=False)`` and ``out`` all pushed ids:
- ``"".join(push results) + flush()`` equals ``D(ctx + out)[len(D(ctx)):]``, where ``ctx`` is
  the last few ``prompt_ids`` (skipped special tokens and trailing ``<0xNN>`` byte tokens
  dropped; no context at all if ``D(ctx)`` ends in U+FFFD). Without ``prompt_ids`` that is
  exactly ``D(out)``; for byte-level BPE it is ``D(out)`` in any case; for sentencepiece-style
  tokenizers it keeps the leading space of the first output word, which ``D(out)`` alone
  strips (the output continues the prompt).
- ``push`` never returns text that ends inside a multi-byte character: a trailing U+FFFD is
  held back until later tokens decide it (lossy UTF-8 decoding, as byte-level BPE does), and
  with byte-fallback vocabularies (``<0xNN>`` tokens, decoded as one group that turns into
  U+FFFDs if any byte is invalid) a trailing run of byte tokens is held back until a
  non-byte token closes it. So valid text never streams a U+FFFD.
- The work per ``push`` is bounded: text is decoded over a window of a few context tokens
  plus the tokens not yet settled, never over the whole output. A window that exceeds
  ``max_window`` unsettled tokens (a run of more than ``max_window`` byte-fallback tokens,
  or invalid byte soup) is settled by force at a whole-character boundary; exact for lossy
  UTF-8 decoders, an approximation for a byte-fallback group that later turns invalid.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Sequence
from typing import Any

_REPLACEMENT = "\ufffd"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")

# Per-tokenizer facts that are costly to compute (they scan the vocabulary).
_TOKENIZER_INFO: weakref.WeakKeyDictionary[Any, tuple[frozenset[int], frozenset[int]]] = (
    weakref.WeakKeyDictionary()
)


def _special_ids(tokenizer: Any) -> frozenset[int]:
    """Ids that ``decode(..., skip_special_tokens=True)`` drops."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # The fast backend skips every added token flagged special, listed or not.
        added = backend.get_added_tokens_decoder()
        return frozenset(int(i) for i, tok in added.items() if tok.special)
    return frozenset(int(i) for i in getattr(tokenizer, "all_special_ids", ()) or ())


def _byte_fallback_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of ``<0xNN>`` byte tokens (sentencepiece byte fallback), if the vocabulary has any."""
    vocab = tokenizer.get_vocab()
    return frozenset(int(i) for tok, i in vocab.items() if _BYTE_TOKEN.fullmatch(tok))


def _rust_decoder(tokenizer: Any) -> Any:
    """The Rust ``tokenizers.Tokenizer.decode`` where the transformers wrapper's ``decode``
    (with ``clean_up_tokenization_spaces=False``) is exactly that call, else None.

    The wrapper costs ~3x the decode itself (argument conversion per call), which adds up
    to milliseconds per step for a large decode batch."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    if isinstance(tokenizer, TokenizersBackend) and (
        type(tokenizer)._decode is TokenizersBackend._decode
    ):
        return tokenizer._tokenizer.decode
    return None


def _tokenizer_info(tokenizer: Any) -> tuple[frozenset[int], frozenset[int]]:
    try:
        cached = _TOKENIZER_INFO.get(tokenizer)
    except TypeError:  # not weak-referenceable or not hashable
        return _special_ids(tokenizer), _byte_fallback_ids(tokenizer)
    if cached is None:
        cached = (_special_ids(tokenizer), _byte_fallback_ids(tokenizer))
        _TOKENIZER_INFO[tokenizer] = cached
    return cached


class IncrementalDetokenizer:
    """Streams the text of one request's output tokens; see the module docstring.

    ``text`` is everything returned so far by ``push`` and ``flush``. One instance per request;
    not thread-safe.
    """

    context_tokens: int = 4
    max_window: int = 32

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self._rust_decode = _rust_decoder(tokenizer)
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        special, self._byte_ids = _tokenizer_info(tokenizer)
        self._skipped: frozenset[int] = special if skip_special_tokens else frozenset()
        self.text = ""
        ctx = self._keep(prompt_ids[-64:])  # enough to find a few context tokens
        while ctx and ctx[-1] in self._byte_ids:  # the output starts its own byte group
            ctx.pop()
        ctx = ctx[-self.context_tokens :]
        ctx_text = self._decode(ctx) if ctx else ""
        if ctx_text.endswith(_REPLACEMENT):  # the prompt ends inside a character: no context
            ctx, ctx_text = [], ""
        # Window: self._ids[:self._ctx] is context whose text self._ctx_text is never emitted;
        # self._emitted chars of the text after it have been returned already.
        self._ids: list[int] = ctx
        self._ctx = len(ctx)
        self._ctx_text = ctx_text
        self._emitted = 0

    # ------------------------------------------------------------------ public API

    def push(self, token_ids: Sequence[int]) -> str:
        """Add output tokens; return the newly stable text (possibly ``""``)."""
        kept = self._keep(token_ids)
        if not kept:
            return ""
        self._ids.extend(kept)
        return self._advance(final=False)

    def flush(self) -> str:
        """Return everything not yet returned (may end with U+FFFD if cut mid-character)."""
        if len(self._ids) == self._ctx:
            return ""
        return self._advance(final=True)

    # ------------------------------------------------------------------ internals

    def _keep(self, token_ids: Sequence[int]) -> list[int]:
        skipped = self._skipped
        return [int(t) for t in token_ids if int(t) not in skipped]

    def _decode(self, ids: Sequence[int]) -> str:
        if self._rust_decode is not None:
            return self._rust_decode(list(ids), skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(
            list(ids),
            skip_special_tokens=self.skip_special_tokens,
            clean_up_tokenization_spaces=False,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
        )

    def _body(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (a prefix of the window) after the context text."""
        full = self._decode(ids)
        if full.startswith(self._ctx_text):
            return full[len(self._ctx_text) :]
        # Defensive: a decoder that rewrote the context; keep what still agrees.
        common = 0
        for a, b in zip(full, self._ctx_text, strict=False):
            if a != b:
                break
            common += 1
        return full[common:]

    def _trailing_byte_run(self) -> int:
        if not self._byte_ids:
            return 0
        run = 0
        for t in reversed(self._ids[self._ctx :]):
            if t not in self._byte_ids:
                break
            run += 1
        return run

    def _emit(self, body: str, end: int) -> str:
        if end <= self._emitted:
            return ""
        delta = body[self._emitted : end]
        self._emitted = end
        self.text += delta
        return delta

    def _advance(self, final: bool) -> str:
        ids = self._ids
        body = self._body(ids)
        if final:
            return self._settle(len(ids), body)

        run = self._trailing_byte_run()
        if run:
            # Byte-fallback bytes decode as one group (all U+FFFD if any byte is invalid), so
            # only the text before the run is settled; nothing when the run is all there is.
            out = ""
            boundary = len(ids) - run
            if boundary > self._ctx:
                settled = self._body(ids[:boundary])
                if body.startswith(settled):
                    out = self._emit(body, len(settled))
                    self._slide(boundary, settled)
        else:
            # Lossy UTF-8 decoding: only a trailing U+FFFD can still change.
            held = 1 if body.endswith(_REPLACEMENT) else 0
            out = self._emit(body, len(body) - held)
            if not held:
                self._slide(len(ids), body)

        if len(self._ids) - self._ctx > self.max_window:
            out += self._force_settle()
        return out

    def _slide(self, boundary: int, settled: str) -> None:
        """Make ``ids[:boundary]`` (whose body text ``settled`` is all emitted) context."""
        if len(settled) > self._emitted or boundary <= self._ctx:
            return
        # A forced boundary may split a byte-fallback group: the rest then starts a group of
        # its own, after the last tokens that precede the group.
        end = boundary
        while end > 0 and self._ids[end - 1] in self._byte_ids:
            end -= 1
        ctx = self._ids[max(0, end - self.context_tokens) : end]
        self._ctx_text = self._decode(ctx) if ctx else ""
        self._ids = ctx + self._ids[boundary:]
        self._ctx = len(ctx)
        self._emitted -= len(settled)

    def _force_settle(self) -> str:
        """Bound the window by settling a recent token boundary (one of the last 8).

        Preferred: a boundary whose text the window's text extends by at least one more
        character (its last character is then complete: exact for lossy UTF-8 decoding).
        Else, inside a long byte-fallback group: a boundary whose own text ends on a whole
        character. Else the whole window is settled as it decodes now.
        """
        ids = self._ids
        body = self._body(ids)
        emitted = body[: self._emitted]
        candidates = range(len(ids) - 1, max(self._ctx, len(ids) - 9), -1)
        prefixes = [(b, self._body(ids[:b])) for b in candidates]
        if not self._trailing_byte_run():  # byte groups are not prefix-stable: skip this
            for boundary, settled in prefixes:
                if body.startswith(settled) and len(body) > len(settled):
                    return self._settle(boundary, settled)
        for boundary, settled in prefixes:
            if settled.startswith(emitted) and not settled.endswith(_REPLACEMENT):
                return self._settle(boundary, settled)
        return self._settle(len(ids), body)

    def _settle(self, boundary: int, settled: str) -> str:
        """Emit ``settled`` (the body text of ``ids[:boundary]``) and slide to ``boundary``."""
        out = ""
        if len(settled) > self._emitted:
            out = settled[self._emitted :]
            self._emitted = len(settled)
            self.text += out
        self._slide(boundary, settled)
        return out
