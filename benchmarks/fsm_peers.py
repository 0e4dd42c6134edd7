"""Constrained decoders behind one protocol, for benchmarks/bench_fsm.py.

Every adapter is built from a Hugging Face tokenizer (vocabulary setup is not timed) and offers
``compile(schema) -> compiled`` (raises on an unsupported or invalid schema) and
``walk(compiled, token_ids) -> (accepted, mask_seconds)``. ``token_ids`` is the tokenized
serialization followed by EOS. A walk computes the token mask at each position (timed with
``time.perf_counter_ns`` around exactly the library's mask call, nothing else), checks the
position's token bit, then feeds the token; it stops at the first rejected token. It is accepted
when every token, the final EOS included, was allowed.

Settings (all: compact JSON, no whitespace outside strings, properties in declared order):

* ``outlines-core``: ``build_regex_from_schema(json, whitespace_pattern="")`` (default
  ``max_recursion_depth=3``), ``Index(regex, Vocabulary)``; mask: ``Guide.write_mask_into``.
  The regex fixes declared property order.
* ``xgrammar``: ``GrammarCompiler(max_threads=1, cache_enabled=False)``,
  ``compile_json_schema(any_whitespace=False, separators=(",", ":"), strict_mode=True,
  any_order=False)``; strict mode (the default) forbids properties/items the schema does not
  declare, as if ``additionalProperties``/``unevaluatedItems`` were false. Mask:
  ``GrammarMatcher.fill_next_token_bitmask``.
* ``llguidance``: ``grammar_from_json_schema`` with overrides ``whitespace_flexible=False``,
  ``item_separator=","``, ``key_separator=":"`` (``lenient`` and ``coerce_one_of`` at their
  default false), ``LLMatcher(log_level=0)``, default parser limits. It keeps declared property
  order and, unlike xgrammar's strict mode, allows undeclared properties when the schema does.
  Mask: ``llguidance.numpy.fill_next_token_bitmask``. Its lexer is built lazily, so part of its
  compile work shows up in the first masks.
* ``ours``: ``fsm.compile_json_schema(schema, Vocabulary.from_tokenizer(tok))``; mask:
  ``guide.allowed_mask(state)``.
"""

from __future__ import annotations

import json
import time
from typing import Any, Protocol

import numpy as np


class Peer(Protocol):
    """A constrained decoder under test."""

    name: str

    def compile(self, schema: dict[str, Any]) -> object:
        """Compile ``schema``; raise if it is unsupported or invalid."""
        ...

    def walk(self, compiled: Any, token_ids: list[int]) -> tuple[bool, list[float]]:
        """Whether ``token_ids`` (ending with EOS) is accepted, and the per-token mask times (s)."""
        ...


def _allowed(mask: np.ndarray, token_id: int) -> bool:
    """Whether bit ``token_id`` is set in a packed 32-bit mask (signed or unsigned, 1-D)."""
    return bool((int(mask[token_id >> 5]) >> (token_id & 31)) & 1)


def _mask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def _byte_level_decoder() -> dict[str, int]:
    """Map GPT-2 byte-level token characters back to byte values.

    Printable bytes stand for themselves; the others are shifted to code points 256 and up,
    in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    decoder = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            decoder[chr(256 + extra)] = b
            extra += 1
    return decoder


def byte_level_token_bytes(tokenizer: Any) -> dict[bytes, list[int]]:
    """Token bytes -> ids for a byte-level BPE tokenizer, special tokens left out."""
    decoder = _byte_level_decoder()
    special = set(tokenizer.all_special_ids)
    special.update(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
    table: dict[bytes, list[int]] = {}
    for text, token_id in tokenizer.get_vocab().items():
        if token_id in special:
            continue
        if not all(c in decoder for c in text):
            raise ValueError(f"Token {text!r} is not byte-level BPE")
        table.setdefault(bytes(decoder[c] for c in text), []).append(token_id)
    return table


class OutlinesCorePeer:
    """outlines-core: schema -> regex -> token index (DFA over the vocabulary)."""

    name = "outlines-core"

    def __init__(self, tokenizer: Any) -> None:
        import outlines_core

        self._oc = outlines_core
        self._eos = tokenizer.eos_token_id
        self._vocab = outlines_core.Vocabulary(self._eos, byte_level_token_bytes(tokenizer))
        self._mask = np.zeros(_mask_words(len(tokenizer)), dtype=np.int32)

    def compile(self, schema: dict[str, Any]) -> object:
        regex = self._oc.json_schema.build_regex_from_schema(
            json.dumps(schema), whitespace_pattern=""
        )
        return self._oc.Index(regex, self._vocab)

    def walk(self, compiled: Any, token_ids: list[int]) -> tuple[bool, list[float]]:
        guide = self._oc.Guide(compiled)
        mask, ptr, words = self._mask, self._mask.ctypes.data, self._mask.size
        times: list[float] = []
        for token_id in token_ids:
            start = time.perf_counter_ns()
            guide.write_mask_into(ptr, words, 4)
            times.append((time.perf_counter_ns() - start) * 1e-9)
            if not _allowed(mask, token_id):
                return False, times
            if token_id == self._eos:
                return guide.is_finished(), times
            guide.advance(token_id, return_tokens=False)
        return False, times


class XGrammarPeer:
    """xgrammar: schema -> grammar with an adaptive token mask cache, Earley matcher."""

    name = "xgrammar"

    def __init__(self, tokenizer: Any) -> None:
        import xgrammar

        self._xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=len(tokenizer), stop_token_ids=[tokenizer.eos_token_id]
        )
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self._bitmask = np.zeros((1, _mask_words(info.vocab_size)), dtype=np.int32)

    def compile(self, schema: dict[str, Any]) -> object:
        return self._compiler.compile_json_schema(
            json.dumps(schema),
            any_whitespace=False,
            separators=(",", ":"),
            strict_mode=True,
            any_order=False,
        )

    def walk(self, compiled: Any, token_ids: list[int]) -> tuple[bool, list[float]]:
        matcher = self._xgr.GrammarMatcher(compiled)
        bitmask, row = self._bitmask, self._bitmask[0]
        times: list[float] = []
        for token_id in token_ids:
            start = time.perf_counter_ns()
            matcher.fill_next_token_bitmask(bitmask)
            times.append((time.perf_counter_ns() - start) * 1e-9)
            if not _allowed(row, token_id) or not matcher.accept_token(token_id):
                return False, times
        return matcher.is_terminated(), times


class LLGuidancePeer:
    """llguidance: schema -> lexer + Earley grammar, masks computed lazily per step."""

    name = "llguidance"

    def __init__(self, tokenizer: Any) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.numpy

        self._llg = llguidance
        self._fill = llguidance.numpy.fill_next_token_bitmask
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, eos_token=tokenizer.eos_token_id)
        self._bitmask = llguidance.numpy.allocate_token_bitmask(1, self._tokenizer.vocab_size)

    def compile(self, schema: dict[str, Any]) -> object:
        matcher_cls = self._llg.LLMatcher
        grammar = matcher_cls.grammar_from_json_schema(
            schema,
            overrides={"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"},
        )
        matcher = matcher_cls(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def walk(self, compiled: Any, token_ids: list[int]) -> tuple[bool, list[float]]:
        matcher = compiled.deep_copy()
        bitmask, row, fill = self._bitmask, self._bitmask[0], self._fill
        times: list[float] = []
        for token_id in token_ids:
            start = time.perf_counter_ns()
            fill(matcher, bitmask)
            times.append((time.perf_counter_ns() - start) * 1e-9)
            if not _allowed(row, token_id) or not matcher.consume_token(token_id):
                return False, times
        return not matcher.is_error(), times


class OursPeer:
    """This project's decoder (``fsm``): schema -> token-level automaton."""

    name = "ours"

    def __init__(self, tokenizer: Any) -> None:
        from fsm import Vocabulary, compile_json_schema

        self._compile = compile_json_schema
        self._eos = tokenizer.eos_token_id
        self._vocab = Vocabulary.from_tokenizer(tokenizer)

    def compile(self, schema: dict[str, Any]) -> object:
        return self._compile(schema, self._vocab)

    def walk(self, compiled: Any, token_ids: list[int]) -> tuple[bool, list[float]]:
        guide = compiled
        state = guide.initial_state
        times: list[float] = []
        for token_id in token_ids:
            start = time.perf_counter_ns()
            mask = guide.allowed_mask(state)
            times.append((time.perf_counter_ns() - start) * 1e-9)
            if not _allowed(mask, token_id):
                return False, times
            if token_id == self._eos:
                return guide.is_accepting(state), times
            state = guide.advance(state, token_id)
            if state < 0:
                return False, times
        return False, times


PEERS: dict[str, type] = {
    cls.name: cls for cls in (OursPeer, OutlinesCorePeer, XGrammarPeer, LLGuidancePeer)
}


def make_peer(name: str, tokenizer: Any) -> Peer:
    """Build the adapter ``name`` (raises ImportError when its package is missing)."""
    return PEERS[name](tokenizer)
