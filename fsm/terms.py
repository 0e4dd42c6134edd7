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
  use it from one thread at a time.
- `row(t)` returns 256 successor ids; bytes in one derivative class share a successor.
- A term without intersection or complement denotes the empty language iff it is `EMPTY`
  (the constructors propagate emptiness); `is_empty` decides the general case by search.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

EMPTY = 0  # the empty language
EPS = 1  # the language {""}
ALL_BYTES = (1 << 256) - 1

_K_EMPTY, _K_EPS, _K_BYTES, _K_CONCAT, _K_ALT, _K_AND, _K_NOT, _K_REPEAT = range(8)

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


class TermStore:
    """Interned terms and their cached nullability, derivative classes and derivatives."""

    def __init__(self) -> None:
        self._kind: list[int] = [_K_EMPTY, _K_EPS]
        self._args: list[tuple] = [(), ()]
        self._nullable: list[bool] = [False, True]
        self._boolean: list[bool] = [False, False]  # contains an intersection or complement
        self._intern: dict[tuple, int] = {}
        self._classes: dict[int, tuple[int, ...]] = {}
        self._deriv: dict[int, int] = {}
        self._empty: dict[int, bool] = {}
        self._infinite: dict[int, bool] = {}
        self.anything = self.not_(EMPTY)  # every byte string

    def __len__(self) -> int:
        return len(self._kind)

    # ----------------------------------------------------------------- construction

    def _make(self, key: tuple, kind: int, args: tuple, nullable: bool, boolean: bool) -> int:
        tid = self._intern.get(key)
        if tid is None:
            tid = len(self._kind)
            self._kind.append(kind)
            self._args.append(args)
            self._nullable.append(nullable)
            self._boolean.append(boolean)
            self._intern[key] = tid
        return tid

    def byteset(self, mask: int) -> int:
        """The one-byte strings whose byte `b` has bit `b` set in `mask`."""
        if mask == 0:
            return EMPTY
        return self._make((_K_BYTES, mask), _K_BYTES, (mask,), False, False)

    def byte_range(self, lo: int, hi: int) -> int:
        return self.byteset(((1 << (hi + 1)) - 1) ^ ((1 << lo) - 1))

    def literal(self, data: bytes) -> int:
        return self.seq(*(self.byteset(1 << b) for b in data))

    def concat(self, a: int, b: int) -> int:
        if a == EMPTY or b == EMPTY:
            return EMPTY
        if a == EPS:
            return b
        if b == EPS:
            return a
        return self._make(
            (_K_CONCAT, a, b),
            _K_CONCAT,
            (a, b),
            self._nullable[a] and self._nullable[b],
            self._boolean[a] or self._boolean[b],
        )

    def seq(self, *items: int) -> int:
        """Concatenation of `items`, nested to the right."""
        out = EPS
        for item in reversed(items):
            out = self.concat(item, out)
        return out

    def alt(self, *items: int) -> int:
        """Union. Flattens, drops EMPTY, merges byte sets, absorbs EPS into nullable peers."""
        members: set[int] = set()
        mask = 0
        kind = self._kind
        for t in items:
            k = kind[t]
            if k == _K_ALT:
                for u in self._args[t]:
                    if kind[u] == _K_BYTES:
                        mask |= self._args[u][0]
                    else:
                        members.add(u)
            elif k == _K_BYTES:
                mask |= self._args[t][0]
            elif t != EMPTY:
                members.add(t)
        if self.anything in members:
            return self.anything
        if mask:
            members.add(self.byteset(mask))
        if EPS in members and any(self._nullable[u] for u in members if u != EPS):
            members.discard(EPS)
        if not members:
            return EMPTY
        if len(members) == 1:
            return next(iter(members))
        args = tuple(sorted(members))
        return self._make(
            (_K_ALT, *args),
            _K_ALT,
            args,
            any(self._nullable[u] for u in args),
            any(self._boolean[u] for u in args),
        )

    def and_(self, *items: int) -> int:
        """Intersection. Flattens, drops the universal term, intersects byte sets."""
        members: set[int] = set()
        mask = ALL_BYTES
        has_bytes = False
        kind = self._kind
        for t in items:
            for u in self._args[t] if kind[t] == _K_AND else (t,):
                if u == EMPTY:
                    return EMPTY
                if kind[u] == _K_BYTES:
                    mask &= self._args[u][0]
                    has_bytes = True
                elif u != self.anything:
                    members.add(u)
        if has_bytes:
            if not mask:
                return EMPTY
            members.add(self.byteset(mask))
        if EPS in members:
            return EPS if all(self._nullable[u] for u in members) else EMPTY
        if not members:
            return self.anything
        if len(members) == 1:
            return next(iter(members))
        args = tuple(sorted(members))
        return self._make((_K_AND, *args), _K_AND, args, all(self._nullable[u] for u in args), True)

    def not_(self, a: int) -> int:
        """Complement with respect to all byte strings."""
        if self._kind[a] == _K_NOT:
            return self._args[a][0]
        return self._make((_K_NOT, a), _K_NOT, (a,), not self._nullable[a], True)

    def repeat(self, a: int, lo: int, hi: int | None) -> int:
        """`a{lo,hi}`; `hi=None` is unbounded."""
        if hi is not None and hi < lo:
            return EMPTY
        if hi == 0 or a == EPS:
            return EPS
        if a == EMPTY:
            return EPS if lo == 0 else EMPTY
        if self._nullable[a]:
            lo = 0
        if lo == 1 and hi == 1:
            return a
        return self._make(
            (_K_REPEAT, a, lo, hi),
            _K_REPEAT,
            (a, lo, hi),
            lo == 0 or self._nullable[a],
            self._boolean[a],
        )

    def optional(self, a: int) -> int:
        return self.alt(a, EPS)

    def star(self, a: int) -> int:
        return self.repeat(a, 0, None)

    # ----------------------------------------------------------------- semantics

    def nullable(self, t: int) -> bool:
        """Whether the empty string is in the language of `t` (an accepting state)."""
        return self._nullable[t]

    def classes(self, t: int) -> tuple[int, ...]:
        """A partition of the 256 bytes (as bit masks) on which `t`'s derivative is constant."""
        cached = self._classes.get(t)
        if cached is not None:
            return cached
        kind = self._kind[t]
        args = self._args[t]
        if kind == _K_BYTES:
            mask = args[0]
            out = (mask, ALL_BYTES ^ mask) if mask != ALL_BYTES else (ALL_BYTES,)
        elif kind == _K_CONCAT:
            out = self.classes(args[0])
            if self._nullable[args[0]]:
                out = _refine(out, self.classes(args[1]))
        elif kind in (_K_ALT, _K_AND):
            out = (ALL_BYTES,)
            for u in args:
                out = _refine(out, self.classes(u))
        elif kind in (_K_NOT, _K_REPEAT):
            out = self.classes(args[0])
        else:
            out = (ALL_BYTES,)
        self._classes[t] = out
        return out

    def derive(self, t: int, byte: int) -> int:
        """The derivative of `t` by `byte`."""
        key = (t << 8) | byte
        cached = self._deriv.get(key)
        if cached is not None:
            return cached
        kind = self._kind[t]
        args = self._args[t]
        if kind == _K_BYTES:
            out = EPS if (args[0] >> byte) & 1 else EMPTY
        elif kind == _K_CONCAT:
            head, tail = args
            out = self.concat(self.derive(head, byte), tail)
            if self._nullable[head]:
                out = self.alt(out, self.derive(tail, byte))
        elif kind == _K_ALT:
            out = self.alt(*(self.derive(u, byte) for u in args))
        elif kind == _K_AND:
            out = self.and_(*(self.derive(u, byte) for u in args))
        elif kind == _K_NOT:
            out = self.not_(self.derive(args[0], byte))
        elif kind == _K_REPEAT:
            inner, lo, hi = args
            rest = self.repeat(inner, max(lo - 1, 0), None if hi is None else hi - 1)
            out = self.concat(self.derive(inner, byte), rest)
        else:
            out = EMPTY
        self._deriv[key] = out
        return out

    def row(self, t: int) -> list[tuple[int, int]]:
        """`t`'s transitions as (byte mask, successor) pairs, one per derivative class."""
        return [(mask, self.derive(t, (mask & -mask).bit_length() - 1)) for mask in self.classes(t)]

    def is_empty(self, t: int, budget: int = 20_000) -> bool:
        """Whether `t` denotes the empty language.

        Exact for terms without intersection or complement. Otherwise a search over the
        derivatives for an accepting term, visiting at most `budget` terms; a search that
        runs out of budget answers "not empty" (the caller must tolerate a dead end).
        """
        if t == EMPTY:
            return True
        if not self._boolean[t] or self._nullable[t]:
            return False
        cached = self._empty.get(t)
        if cached is not None:
            return cached
        kind, args = self._kind[t], self._args[t]
        if kind == _K_CONCAT:  # decide by parts: a search would run through the whole tail
            empty = self.is_empty(args[0], budget) or self.is_empty(args[1], budget)
        elif self._infinite_minus_finite(kind, args):
            empty = False
        elif kind == _K_ALT:
            empty = all(self.is_empty(u, budget) for u in args)
        elif kind == _K_REPEAT:
            empty = args[1] > 0 and self.is_empty(args[0], budget)
        else:
            empty = self._search_empty(t, budget)
        self._empty[t] = empty
        return empty

    def _infinite_minus_finite(self, kind: int, args: tuple) -> bool:
        """Whether an intersection or complement is an infinite language without finitely
        many strings (never empty): `X & ~Y1 & ~Y2...` or `~Y`, with X infinite and the Yi
        finite, none of them containing an intersection or complement."""
        if kind == _K_NOT:
            positives, negatives = [], [args[0]]
        elif kind == _K_AND:
            positives = [u for u in args if self._kind[u] != _K_NOT]
            negatives = [self._args[u][0] for u in args if self._kind[u] == _K_NOT]
            if len(positives) != 1 or self._boolean[positives[0]]:
                return False
            if not self._is_infinite(positives[0]):
                return False
        else:
            return False
        return all(not self._boolean[y] and not self._is_infinite(y) for y in negatives)

    def _is_infinite(self, t: int) -> bool:
        """Whether a term without intersection or complement has infinitely many strings."""
        cached = self._infinite.get(t)
        if cached is not None:
            return cached
        kind, args = self._kind[t], self._args[t]
        if kind in (_K_CONCAT, _K_ALT):  # parts are non-empty: EMPTY is never a part
            out = any(self._is_infinite(u) for u in args)
        elif kind == _K_REPEAT:
            out = args[2] is None or self._is_infinite(args[0])
        else:
            out = False
        self._infinite[t] = out
        return out

    def _search_empty(self, t: int, budget: int) -> bool:
        """Search the derivatives of an intersection or complement for an accepting term."""
        seen = {t}
        frontier = [t]
        empty = True
        while frontier and empty:
            u = frontier.pop()
            for _, v in self.row(u):
                if v in seen or v == EMPTY:
                    continue
                known = self._empty.get(v)
                if self._nullable[v] or not self._boolean[v] or known is False:
                    empty = False
                    break
                if known is None:
                    seen.add(v)
                    frontier.append(v)
            if len(seen) > budget:
                empty = False
        if empty:  # every term reached is empty too
            for u in seen:
                self._empty[u] = True
        return empty

    def describe(self, t: int, limit: int = 200) -> str:
        """A regex-like rendering of `t` for error messages and debugging."""
        out = self._describe(t)
        return out if len(out) <= limit else out[: limit - 3] + "..."

    def _describe(self, t: int) -> str:
        kind = self._kind[t]
        args = self._args[t]
        if kind == _K_EMPTY:
            return "∅"
        if kind == _K_EPS:
            return "ε"
        if kind == _K_BYTES:
            bits = [b for b in range(256) if (args[0] >> b) & 1]
            if len(bits) == 1:
                return _show_byte(bits[0])
            return "[" + "".join(_show_byte(b) for b in bits[:8]) + ("…]" if len(bits) > 8 else "]")
        if kind == _K_CONCAT:
            return self._describe(args[0]) + self._describe(args[1])
        if kind == _K_ALT:
            return "(" + "|".join(self._describe(u) for u in args) + ")"
        if kind == _K_AND:
            return "(" + "&".join(self._describe(u) for u in args) + ")"
        if kind == _K_NOT:
            return "~(" + self._describe(args[0]) + ")"
        inner, lo, hi = args
        return f"({self._describe(inner)}){{{lo},{'' if hi is None else hi}}}"


def _refine(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    if len(a) == 1:
        return b
    if len(b) == 1:
        return a
    return tuple(x & y for x in a for y in b if x & y)


def _show_byte(b: int) -> str:
    c = chr(b)
    return c if 0x20 < b < 0x7F and c not in "()[]|&~.*+?{}\\" else f"\\x{b:02x}"
