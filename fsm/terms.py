"""Byte-level regular terms with Brzozowski derivatives: the automaton core of `fsm`.

A `TermStore` hash-conses terms over bytes, built from byte sets, concatenation, union,
intersection, complement and bounded repetition. Every term is an `int` id into the store;
equal terms (up to the simplifications of the smart constructors) get the same id.

The derivative of a term by a byte is the term for the rest of its language after that byte,
so the lazy DFA of a term is: state = term, transition = derivative, accepting = nullable.
Intersection and complement cost nothing extra here, which is why JSON-schema features such
as `allOf`, `oneOf`, `not`, `pattern` combined with `maxLength`, or "any key except the
declared ones" compile exactly instead of being approximated.

Contracts:
- Terms are immutable; ids are stable for the store's life. One store is not thread-safe:
  use it from one thread at a time (stores share their table of derivative classes, which
  only the native code holding the GIL touches).
- Concatenations are kept associated to the right and `alt` left-factors members with a
  common head, so equal languages built in different orders may get one id more often; ids
  are an implementation detail beyond that.
- `row(t)` returns one (byte mask, successor) pair per derivative class.
- A term without intersection or complement denotes the empty language iff it is `EMPTY`
  (the constructors propagate emptiness); `is_empty` decides the general case by search.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from fsm import _native

EMPTY = 0  # the empty language
EPS = 1  # the language {""}

K_EMPTY, K_EPS, K_BYTES, K_CONCAT, K_ALT, K_AND, K_NOT, K_REPEAT = range(8)
"""Term kinds, as `TermStore.kind` returns them."""

# Derivatives recurse along the structure of a term (nesting, runs of optional items);
# large schemas nest deeper than CPython's default limit of 1000 frames. Threads that
# compile or walk big terms are started with `STACK_BYTES` of stack (see `big_stack`).
RECURSION_LIMIT = 10_000
STACK_BYTES = 256 << 20
sys.setrecursionlimit(max(sys.getrecursionlimit(), RECURSION_LIMIT))


@contextmanager
def big_stack() -> Iterator[None]:
    """Threads created inside get a stack deep enough for `RECURSION_LIMIT` frames."""
    old = threading.stack_size(STACK_BYTES)
    try:
        yield
    finally:
        threading.stack_size(old)


class TermStore(_native.TermStore):
    """Interned terms and their cached nullability, derivative classes and derivatives.

    The core (interning, the smart constructors, derivatives, emptiness) is native
    (`fsm/_terms.h`); this class adds the conveniences built on it. Native methods:

    - ``byteset(mask)``: the one-byte strings whose byte ``b`` has bit ``b`` set in ``mask``;
    - ``concat(a, b)``; ``alt(*items)``: union (flattens, drops EMPTY, merges byte sets,
      absorbs EPS into nullable peers); ``and_(*items)``: intersection (flattens, drops the
      universal term, intersects byte sets); ``not_(a)``: complement with respect to all byte
      strings; ``repeat(a, lo, hi)``: ``a{lo,hi}``, ``hi=None`` unbounded;
    - ``nullable(t)``: whether the empty string is in the language (an accepting state);
    - ``classes(t)``: a partition of the 256 bytes (as bit masks) on which the derivative of
      ``t`` is constant; ``derive(t, byte)``; ``row(t)``: ``t``'s transitions as (byte mask,
      successor) pairs, one per derivative class (``rows_computed`` counts them);
    - ``is_empty(t, budget=20000)``: whether ``t`` denotes the empty language. Exact for terms
      without intersection or complement. Otherwise decided by parts where possible (a
      concatenation is empty iff a part is; an infinite language minus finitely many strings
      never is), else by a search over the derivatives for an accepting term, visiting at most
      ``budget`` terms; a search that runs out of budget answers "not empty" (the caller must
      tolerate a dead end);
    - ``safe(t, mask, utf8)``: a proved bound n such that every string of the slice (the
      bytes of ``mask`` as one-byte characters, with ``utf8`` also every multi-byte UTF-8
      character; ``mask`` then ASCII) of at most n characters leads from ``t`` to a non-empty
      derivative: an int, None for every length, -1 when nothing is proved (which does not
      mean false). Proved by structure (repetitions of a class holding the slice, unions,
      concatenations, an infinite language minus finitely many strings), cached per term;
    - ``run(t, mask)``: a proved bound n such that every string of the bytes of ``mask`` longer
      than n leads from ``t`` to the empty derivative (the strings over the set that stay live
      are at most n long), or None when none is proved within a budget of terms visited; by
      structure (a byte set bounds runs by 1, a concatenation by its head's bound plus its
      tail's, unions by their largest member bound, intersections by the smallest, X{lo,hi} by
      hi times X's);
    - ``kind(t)``, ``args(t)``: the constructor (``K_*``) and fields of a term;
    - ``anything``: every byte string; ``len(store)``: the number of terms.

    Derivatives recurse along the structure of a term; deeper than ``RECURSION_LIMIT`` levels
    they raise RecursionError.
    """

    def __init__(self) -> None:
        super().__init__(max_depth=RECURSION_LIMIT)

    def byte_range(self, lo: int, hi: int) -> int:
        return self.byteset(((1 << (hi + 1)) - 1) ^ ((1 << lo) - 1))

    def literal(self, data: bytes) -> int:
        return self.seq(*(self.byteset(1 << b) for b in data))

    def seq(self, *items: int) -> int:
        """Concatenation of `items`, nested to the right."""
        out = EPS
        for item in reversed(items):
            out = self.concat(item, out)
        return out

    def optional(self, a: int) -> int:
        return self.alt(a, EPS)

    def star(self, a: int) -> int:
        return self.repeat(a, 0, None)

    def describe(self, t: int, limit: int = 200) -> str:
        """A regex-like rendering of `t` for error messages and debugging, cut at `limit`."""
        out: list[str] = []
        size = 0

        def put(text: str) -> None:
            nonlocal size
            out.append(text)
            size += len(text)

        def render(t: int) -> None:
            if size > limit:
                return
            kind, args = self.kind(t), self.args(t)
            if kind == K_EMPTY:
                put("∅")
            elif kind == K_EPS:
                put("ε")
            elif kind == K_BYTES:
                bits = [b for b in range(256) if (args[0] >> b) & 1]
                if len(bits) == 1:
                    put(_show_byte(bits[0]))
                else:
                    more = "…]" if len(bits) > 8 else "]"
                    put("[" + "".join(_show_byte(b) for b in bits[:8]) + more)
            elif kind == K_CONCAT:
                render(args[0])
                render(args[1])
            elif kind in (K_ALT, K_AND):
                put("(")
                for i, u in enumerate(args):
                    if i:
                        put("|" if kind == K_ALT else "&")
                    render(u)
                put(")")
            elif kind == K_NOT:
                put("~(")
                render(args[0])
                put(")")
            else:
                inner, lo, hi = args
                put("(")
                render(inner)
                put(f"){{{lo},{'' if hi is None else hi}}}")

        render(t)
        text = "".join(out)
        return text if len(text) <= limit else text[: limit - 3] + "..."


def _show_byte(b: int) -> str:
    c = chr(b)
    return c if 0x20 < b < 0x7F and c not in "()[]|&~.*+?{}\\" else f"\\x{b:02x}"
