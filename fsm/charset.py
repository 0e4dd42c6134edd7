"""Sets of Unicode code points and their encodings as byte-level terms.

A `CharSet` is a sorted tuple of disjoint, non-adjacent inclusive code-point ranges.
`utf8_term` turns one into the union of UTF-8 byte-range sequences (surrogates excluded);
`json_string_term` turns one into the bytes a JSON string body uses for those characters,
with the escapes `json.dumps(..., ensure_ascii=False)` writes, so one decoded character has
exactly one encoding and languages over decoded strings map one-to-one onto JSON text.
"""

from __future__ import annotations

from fsm.terms import EMPTY, TermStore

CharSet = tuple[tuple[int, int], ...]

MAX_CODE_POINT = 0x10FFFF
ANY_CHAR: CharSet = ((0, MAX_CODE_POINT),)
_SURROGATES = (0xD800, 0xDFFF)
_UTF8_LIMITS = (0x7F, 0x7FF, 0xFFFF, MAX_CODE_POINT)
_SHORT_ESCAPES = {0x22: b'\\"', 0x5C: b"\\\\", 0x08: b"\\b", 0x0C: b"\\f", 0x0A: b"\\n",
                  0x0D: b"\\r", 0x09: b"\\t"}  # fmt: skip
_JSON_SPECIAL: CharSet = ((0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C))


def normalize(ranges: list[tuple[int, int]] | tuple[tuple[int, int], ...]) -> CharSet:
    """Sort and merge overlapping or adjacent ranges."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return tuple(out)


def negate(chars: CharSet) -> CharSet:
    out = []
    nxt = 0
    for lo, hi in chars:
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= MAX_CODE_POINT:
        out.append((nxt, MAX_CODE_POINT))
    return tuple(out)


def union(*sets: CharSet) -> CharSet:
    return normalize([r for s in sets for r in s])


def subtract(a: CharSet, b: CharSet) -> CharSet:
    return intersect(a, negate(b))


def intersect(a: CharSet, b: CharSet) -> CharSet:
    out = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo = max(a[i][0], b[j][0])
        hi = min(a[i][1], b[j][1])
        if lo <= hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return tuple(out)


def contains(chars: CharSet, cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in chars)


def utf8_term(store: TermStore, chars: CharSet) -> int:
    """The UTF-8 encodings of the characters in `chars` (surrogates have none)."""
    seqs = []
    for lo, hi in subtract(chars, (_SURROGATES,)):
        for seq in _utf8_sequences(lo, hi):
            seqs.append(store.seq(*(store.byte_range(a, b) for a, b in seq)))
    return store.alt(*seqs) if seqs else EMPTY


def json_string_term(store: TermStore, chars: CharSet) -> int:
    """The JSON-string-body encodings of the characters in `chars` (canonical escapes)."""
    plain = utf8_term(store, subtract(chars, _JSON_SPECIAL))
    escapes = [store.literal(_escape(cp)) for cp in _code_points(intersect(chars, _JSON_SPECIAL))]
    return store.alt(plain, *escapes)


def _escape(cp: int) -> bytes:
    return _SHORT_ESCAPES.get(cp) or b"\\u%04x" % cp


def _code_points(chars: CharSet) -> list[int]:
    return [cp for lo, hi in chars for cp in range(lo, hi + 1)]


def _utf8_sequences(lo: int, hi: int) -> list[list[tuple[int, int]]]:
    """Split [lo, hi] into ranges whose UTF-8 encodings are products of byte ranges."""
    for limit in _UTF8_LIMITS:
        if lo <= limit < hi:
            return _utf8_sequences(lo, limit) + _utf8_sequences(limit + 1, hi)
    if hi <= 0x7F:
        return [[(lo, hi)]]
    nbytes = len(chr(lo).encode("utf-8", "surrogatepass"))
    for i in range(1, nbytes):
        m = (1 << (6 * i)) - 1
        if lo & ~m != hi & ~m:
            if lo & m:
                return _utf8_sequences(lo, lo | m) + _utf8_sequences((lo | m) + 1, hi)
            if hi & m != m:
                return _utf8_sequences(lo, (hi & ~m) - 1) + _utf8_sequences(hi & ~m, hi)
    a = chr(lo).encode("utf-8", "surrogatepass")
    b = chr(hi).encode("utf-8", "surrogatepass")
    return [list(zip(a, b))]
