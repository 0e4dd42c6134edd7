"""Regular expressions (Python `re` and ECMA-262 syntax) to byte-level terms.

`regex_term` parses a pattern into a small character-level syntax tree and translates it
into a `TermStore` term, encoding characters with a caller-given `encode` (plain UTF-8 for
`regex=` constraints, canonical JSON-string escapes for JSON-schema `pattern`).

Semantics:
- Full match (`re.fullmatch`) by default; `search=True` gives JSON-schema `pattern`
  semantics (the pattern may match anywhere unless anchored with `^` / `$`).
- `\\d`, `\\w`, `\\s` and `\\b`-free ASCII classes, as with `re.ASCII` and ECMA-262.
- `.` excludes line terminators (`\\n` for Python; `\\n \\r \\u2028 \\u2029` for ECMA)
  unless the `s` flag is set. Lazy quantifiers match the same language as greedy ones.
- Lookaheads `(?=...)` / `(?!...)` are exact when they sit in the top-level sequence of a
  branch (they become intersections); anchors are allowed at the ends of top-level
  branches. Backreferences, lookbehind, word boundaries, possessive quantifiers, Unicode
  property classes and other context-sensitive constructs raise `ConstraintError`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from fsm import charset as cs
from fsm.errors import ConstraintError
from fsm.terms import EPS, TermStore

Encoder = Callable[[TermStore, cs.CharSet], int]

_DIGIT: cs.CharSet = ((0x30, 0x39),)
_WORD: cs.CharSet = cs.normalize([(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)])
_SPACE: cs.CharSet = cs.normalize([(0x09, 0x0D), (0x20, 0x20)])
_CLASS_ESCAPES = {
    "d": _DIGIT,
    "D": cs.negate(_DIGIT),
    "w": _WORD,
    "W": cs.negate(_WORD),
    "s": _SPACE,
    "S": cs.negate(_SPACE),
}
_CHAR_ESCAPES = {"n": 0x0A, "t": 0x09, "r": 0x0D, "f": 0x0C, "v": 0x0B, "0": 0x00}
_LINE_TERMINATORS = {
    "python": ((0x0A, 0x0A),),
    "ecma": cs.normalize([(0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029)]),
}


@dataclass(frozen=True)
class Chars:
    chars: cs.CharSet


@dataclass(frozen=True)
class Seq:
    items: tuple


@dataclass(frozen=True)
class Alt:
    items: tuple


@dataclass(frozen=True)
class Repeat:
    item: object
    lo: int
    hi: int | None


@dataclass(frozen=True)
class Anchor:
    start: bool


@dataclass(frozen=True)
class Look:
    item: object
    negative: bool


def regex_term(
    store: TermStore,
    pattern: str,
    *,
    flavor: str = "python",
    search: bool = False,
    encode: Encoder = cs.utf8_term,
) -> int:
    """The term for the strings that `pattern` matches (see the module docstring)."""
    tree = _Parser(pattern, flavor).parse()
    return _Translator(store, encode, pattern).top(tree, search)


class _Parser:
    def __init__(self, pattern: str, flavor: str) -> None:
        if flavor not in _LINE_TERMINATORS:
            raise ValueError(f"unknown regex flavor {flavor!r}")
        self.src = pattern
        self.pos = 0
        self.flavor = flavor
        self.ignore_case = False
        self.dot_all = False

    def error(self, message: str) -> ConstraintError:
        return ConstraintError(f"regex {self.src!r}: {message} at position {self.pos}")

    def peek(self, n: int = 0) -> str:
        i = self.pos + n
        return self.src[i] if i < len(self.src) else ""

    def parse(self) -> object:
        self._leading_flags()
        node = self.alternation()
        if self.pos < len(self.src):
            raise self.error("unbalanced ')'")
        return node

    def _leading_flags(self) -> None:
        while self.src.startswith("(?", self.pos) and self.peek(2).isalpha():
            end = self.src.find(")", self.pos)
            flags = self.src[self.pos + 2 : end] if end > 0 else ""
            if not flags.isalpha():
                return
            self._set_flags(flags)
            self.pos = end + 1

    def _set_flags(self, flags: str) -> None:
        for f in flags:
            if f == "i":
                self.ignore_case = True
            elif f == "s":
                self.dot_all = True
            elif f not in "au":
                raise self.error(f"unsupported flag {f!r}")

    def alternation(self) -> object:
        branches = [self.sequence()]
        while self.peek() == "|":
            self.pos += 1
            branches.append(self.sequence())
        return branches[0] if len(branches) == 1 else Alt(tuple(branches))

    def sequence(self) -> object:
        items = []
        while self.peek() not in ("", "|", ")"):
            items.append(self.quantified(self.atom()))
        return items[0] if len(items) == 1 else Seq(tuple(items))

    def quantified(self, node: object) -> object:
        while True:
            c = self.peek()
            if c in ("*", "+", "?"):
                self.pos += 1
                lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
            elif c == "{" and (bounds := self._braces()) is not None:
                lo, hi = bounds
            else:
                return node
            if isinstance(node, (Anchor, Look)):
                raise self.error("quantifier after an anchor or lookaround")
            if self.peek() == "?":
                self.pos += 1  # lazy: same language
            elif self.peek() == "+":
                raise self.error("possessive quantifiers are not supported")
            node = Repeat(node, lo, hi)

    def _braces(self) -> tuple[int, int | None] | None:
        end = self.src.find("}", self.pos)
        if end < 0:
            return None
        body = self.src[self.pos + 1 : end]
        lo_s, comma, hi_s = body.partition(",")
        if not (_is_number(lo_s) or (lo_s == "" and comma and self.flavor == "python")):
            return None
        if hi_s and not _is_number(hi_s):
            return None
        lo = int(lo_s or 0)
        hi = int(hi_s) if hi_s else (None if comma else lo)
        if hi is not None and hi < lo:
            raise self.error(f"bad repeat range {{{body}}}")
        self.pos = end + 1
        return lo, hi

    def atom(self) -> object:
        c = self.peek()
        self.pos += 1
        if c == "(":
            return self.group()
        if c == "[":
            return Chars(self.char_class())
        if c == ".":
            return Chars(cs.ANY_CHAR if self.dot_all else cs.negate(_LINE_TERMINATORS[self.flavor]))
        if c == "^":
            return Anchor(start=True)
        if c == "$":
            return Anchor(start=False)
        if c == "\\":
            return self.escape()
        if c in ("*", "+", "?") or (c == "{" and self._is_quantifier_at(self.pos - 1)):
            self.pos -= 1
            raise self.error("nothing to repeat")
        return self.chars_of(ord(c))

    def _is_quantifier_at(self, i: int) -> bool:
        saved = self.pos
        self.pos = i
        try:
            return self._braces() is not None
        finally:
            self.pos = saved

    def chars_of(self, cp: int) -> Chars:
        return Chars(self.fold(((cp, cp),)))

    def fold(self, chars: cs.CharSet) -> cs.CharSet:
        """Add case variants when the `i` flag is set."""
        if not self.ignore_case:
            return chars
        extra = []
        for lo, hi in chars:
            for cp in range(lo, min(hi, lo + 4096) + 1):
                for v in (chr(cp).lower(), chr(cp).upper()):
                    if len(v) == 1:
                        extra.append((ord(v), ord(v)))
        return cs.union(chars, tuple(extra))

    def group(self) -> object:
        if self.peek() != "?":
            node = self.alternation()
        else:
            self.pos += 1
            c = self.peek()
            if c == ":":
                self.pos += 1
                node = self.alternation()
            elif c in ("=", "!"):
                self.pos += 1
                node = Look(self.alternation(), negative=c == "!")
            elif (c == "P" and self.peek(1) == "<") or (
                c == "<" and self.peek(1) not in ("=", "!")
            ):
                self.pos = self.src.index(">", self.pos) + 1 if ">" in self.src[self.pos :] else 0
                if not self.pos:
                    raise self.error("unterminated group name")
                node = self.alternation()
            elif c == "<":
                raise self.error("lookbehind is not supported")
            elif c == "#":
                self.pos = self.src.find(")", self.pos)
                if self.pos < 0:
                    raise self.error("unterminated comment")
                node = Seq(())
            else:
                raise self.error(f"unsupported group syntax '(?{c}'")
        if self.peek() != ")":
            raise self.error("missing ')'")
        self.pos += 1
        return node

    def char_class(self) -> cs.CharSet:
        negated = self.peek() == "^"
        if negated:
            self.pos += 1
        ranges: list[tuple[int, int]] = []
        first = True
        while True:
            c = self.peek()
            if c == "":
                raise self.error("unterminated character class")
            if c == "]" and not (first and self.flavor == "python"):
                self.pos += 1
                break
            first = False
            lo = self.class_atom()
            if isinstance(lo, tuple):
                ranges.extend(lo)
                continue
            if self.peek() == "-" and self.peek(1) not in ("]", ""):
                self.pos += 1
                hi = self.class_atom()
                if isinstance(hi, tuple):
                    raise self.error("bad character range")
                if hi < lo:
                    raise self.error(f"bad character range {chr(lo)}-{chr(hi)}")
                ranges.append((lo, hi))
            else:
                ranges.append((lo, lo))
        chars = self.fold(cs.normalize(ranges))
        return cs.negate(chars) if negated else chars

    def class_atom(self) -> int | cs.CharSet:
        """One class member: a code point, or a whole set for `\\d`-style escapes."""
        c = self.peek()
        self.pos += 1
        if c != "\\":
            return ord(c)
        e = self.peek()
        if e in _CLASS_ESCAPES:
            self.pos += 1
            return self.class_escape(e)
        if e == "b":
            self.pos += 1
            return 0x08
        return self.escaped_code_point()

    def class_escape(self, e: str) -> cs.CharSet:
        """`\\d \\w \\s` are ASCII. For ECMA patterns (validated by engines whose classes are
        Unicode), the negated `\\D \\W \\S` exclude every Unicode digit, word character and
        space, so that a match is a match under either reading."""
        if self.flavor == "ecma" and e in "DWS":
            return cs.negate(_unicode_class(e.lower()))
        return _CLASS_ESCAPES[e]

    def escape(self) -> object:
        e = self.peek()
        if e in _CLASS_ESCAPES:
            self.pos += 1
            return Chars(self.class_escape(e))
        if e == "A":
            self.pos += 1
            return Anchor(start=True)
        if (e == "Z" and self.flavor == "python") or e == "z":
            self.pos += 1
            return Anchor(start=False)
        if e in ("b", "B"):
            raise self.error("word boundaries are not supported")
        if e in "123456789" and e:
            raise self.error("backreferences are not supported")
        if e in ("p", "P"):
            raise self.error("Unicode property classes are not supported")
        if e == "k":
            raise self.error("named backreferences are not supported")
        return self.chars_of(self.escaped_code_point())

    def escaped_code_point(self) -> int:
        e = self.peek()
        if e == "":
            raise self.error("pattern ends with a backslash")
        self.pos += 1
        if e in _CHAR_ESCAPES:
            if e == "0" and self.flavor == "python":
                return self._octal()
            return _CHAR_ESCAPES[e]
        if e == "x":
            return self._hex_digits(2)
        if e == "u":
            if self.peek() == "{":
                end = self.src.find("}", self.pos)
                if end < 0:
                    raise self.error("unterminated \\u{...} escape")
                self.pos += 1
                cp = self._hex_digits(end - self.pos)
                self.pos += 1
                return cp
            return self._hex_digits(4)
        if e == "U" and self.flavor == "python":
            return self._hex_digits(8)
        if e == "c" and self.flavor == "ecma" and self.peek().isalpha():
            self.pos += 1
            return ord(self.src[self.pos - 1]) % 32
        if e == "a" and self.flavor == "python":
            return 0x07
        if e.isalnum():
            raise self.error(f"unknown escape '\\{e}'")
        return ord(e)

    def _hex_digits(self, n: int) -> int:
        text = self.src[self.pos : self.pos + n]
        if len(text) != n or not all(c in "0123456789abcdefABCDEF" for c in text):
            raise self.error("bad hexadecimal escape")
        self.pos += n
        if int(text, 16) > cs.MAX_CODE_POINT:
            raise self.error("hexadecimal escape beyond U+10FFFF")
        return int(text, 16)

    def _octal(self) -> int:
        """Python's `\\0oo`: up to two more octal digits after the zero."""
        text = "0"
        while len(text) < 3 and self.peek() in ("0", "1", "2", "3", "4", "5", "6", "7"):
            text += self.peek()
            self.pos += 1
        return int(text, 8)


class _Translator:
    def __init__(self, store: TermStore, encode: Encoder, pattern: str) -> None:
        self.store = store
        self.encode = encode
        self.pattern = pattern
        self._chars: dict[cs.CharSet, int] = {}

    def error(self, message: str) -> ConstraintError:
        return ConstraintError(f"regex {self.pattern!r}: {message}")

    def chars(self, chars: cs.CharSet) -> int:
        term = self._chars.get(chars)
        if term is None:
            term = self._chars[chars] = self.encode(self.store, chars)
        return term

    def top(self, tree: object, search: bool) -> int:
        any_string = self.store.star(self.chars(cs.ANY_CHAR))
        return self.store.alt(*(self.branch(b, search, any_string) for b in _branches(tree)))

    def branch(self, node: object, search: bool, any_string: int) -> int:
        items = list(node.items) if isinstance(node, Seq) else [node]
        anchored_start = anchored_end = False
        while items and items[0] == Anchor(start=True):
            items.pop(0)
            anchored_start = True
        while items and items[-1] == Anchor(start=False):
            items.pop()
            anchored_end = True
        s = self.store
        rest = any_string if search and not anchored_end else EPS
        for item in reversed(items):
            if isinstance(item, Look):
                look = s.concat(self.term(item.item), any_string)
                rest = s.and_(s.not_(look) if item.negative else look, rest)
            else:
                rest = s.concat(self.term(item), rest)
        return s.concat(any_string, rest) if search and not anchored_start else rest

    def term(self, node: object) -> int:
        s = self.store
        if isinstance(node, Chars):
            return self.chars(node.chars)
        if isinstance(node, Seq):
            return s.seq(*(self.term(i) for i in node.items))
        if isinstance(node, Alt):
            return s.alt(*(self.term(i) for i in node.items))
        if isinstance(node, Repeat):
            return s.repeat(self.term(node.item), node.lo, node.hi)
        if isinstance(node, Anchor):
            raise self.error("anchors are supported only at the start or end of the pattern")
        raise self.error("lookaheads are supported only in the top-level sequence")


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()


@functools.cache
def _unicode_class(name: str) -> cs.CharSet:
    """Python `re`'s Unicode `\\d`, `\\w` or `\\s` (with ECMA-262's whitespace added to `s`)."""
    test = {"d": str.isdecimal, "w": lambda c: c.isalnum() or c == "_", "s": str.isspace}[name]
    ranges = [(cp, cp) for cp in range(cs.MAX_CODE_POINT + 1) if test(chr(cp))]
    if name == "s":
        ranges += [(0xFEFF, 0xFEFF), *_SPACE]
    return cs.normalize(ranges)


def _branches(node: object) -> list[object]:
    """Top-level alternatives, looking through groups that span a whole branch."""
    if isinstance(node, Alt):
        return [b for item in node.items for b in _branches(item)]
    if isinstance(node, Seq) and len(node.items) == 1:
        return _branches(node.items[0])
    return [node]
