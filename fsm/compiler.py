"""Compiling constraints to `TokenGuide`s: direct functions and a cached background compiler.

Compilation proper (parse, translate to a term, make the start state) is fast and bounded by
a deadline; the DFA and the token masks are then built lazily while generation visits them.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from fsm.dfa import DEAD, LazyDFA
from fsm.errors import ConstraintError
from fsm.guide import TokenGuide
from fsm.json_schema import Options, schema_term
from fsm.regex import regex_term
from fsm.terms import TermStore, big_stack
from fsm.vocabulary import Vocabulary

CONSTRAINT_KINDS = ("regex", "json_schema")


def compile_regex(pattern: str, vocab: Vocabulary) -> TokenGuide:
    """Guide whose complete outputs are exactly the strings `re.fullmatch(pattern)` accepts
    (Python syntax; see `fsm.regex` for the supported subset)."""
    if not isinstance(pattern, str):
        raise ConstraintError(f"regex must be a string, not {type(pattern).__name__}")
    store = TermStore()
    return _guide(store, regex_term(store, pattern), vocab, f"regex {pattern!r:.80}")


def compile_json_schema(
    schema: dict | bool | str,
    vocab: Vocabulary,
    *,
    whitespace_pattern: str | None = None,
    extra_properties: bool = True,
    timeout_s: float | None = None,
) -> TokenGuide:
    """Guide whose complete outputs are JSON texts valid against `schema` (see
    `fsm.json_schema`); `whitespace_pattern` allows whitespace between tokens;
    `extra_properties=False` leaves out undeclared keys the schema does not ask for."""
    deadline = time.monotonic() + timeout_s if timeout_s is not None else float("inf")
    options = Options(
        whitespace=whitespace_pattern, extra_properties=extra_properties, deadline=deadline
    )
    store = TermStore()
    term = schema_term(store, schema, options)
    return _guide(store, term, vocab, "json_schema")


def _guide(store: TermStore, term: int, vocab: Vocabulary, what: str) -> TokenGuide:
    dfa = LazyDFA(store, term)
    if dfa.start == DEAD:
        raise ConstraintError(f"{what} matches no string")
    return TokenGuide(dfa, vocab)


class GuideCompiler:
    """Compiles constraints on a worker thread, caching the results by constraint (LRU).

    `submit` returns at once with a future; failures (`ConstraintError`, a timeout) are
    cached too, so a bad schema sent again fails again without recompiling.
    """

    def __init__(
        self,
        vocab: Vocabulary,
        *,
        whitespace_pattern: str | None = None,
        extra_properties: bool = True,
        cache_size: int = 64,
        timeout_s: float = 10.0,
    ) -> None:
        self.vocab = vocab
        self.whitespace_pattern = whitespace_pattern
        self.extra_properties = extra_properties
        self.timeout_s = timeout_s
        self._cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], Future[TokenGuide]] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fsm-compile")
        with big_stack():  # start the worker now, with a deep stack
            self._pool.submit(lambda: None).result()

    def submit(self, kind: str, source: Any) -> Future[TokenGuide]:
        """Compile (or reuse) the guide for a `regex` or `json_schema` constraint."""
        key = (kind, source if isinstance(source, str) else json.dumps(source))
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            future = self._pool.submit(self._compile, kind, source)
            self._cache[key] = future
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return future

    def _compile(self, kind: str, source: Any) -> TokenGuide:
        if kind == "regex":
            return compile_regex(source, self.vocab)
        if kind == "json_schema":
            return compile_json_schema(
                source,
                self.vocab,
                whitespace_pattern=self.whitespace_pattern,
                extra_properties=self.extra_properties,
                timeout_s=self.timeout_s,
            )
        raise ConstraintError(
            f"unknown constraint kind {kind!r}; expected one of {CONSTRAINT_KINDS}"
        )

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
