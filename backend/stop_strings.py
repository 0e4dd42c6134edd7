"""Stop-string matching on incrementally growing output text.

Contract: the caller appends newly detokenized text to ``text`` and calls
``find(text, num_new_chars)``; only stop strings that *end* inside the new characters are
searched (earlier ones were found by earlier calls), but a match may start in earlier text,
so a stop string split across token or chunk boundaries is found. ``holdback(text)`` says how
many trailing characters must not be streamed yet because they may begin a stop string.
Costs depend on the stop strings' lengths and ``num_new_chars``, never on ``len(text)``.

Stop regexes (``stop_regex``) are searched by ``match`` together with the stop strings. A
regex has no bounded window in general (lookarounds, ``.*``), so ``match`` runs ``re.search``
over the whole text on every call: O(len(text)) per step, O(n^2) per request, which is fine at
generation lengths. Any match counts, including one in text produced before
``min_new_tokens`` was reached (the request then stops, trimmed there, once it may stop).
``holdback`` keeps back the tail from the earliest position where a regex match could still
start (the ``regex`` package's partial matching; everything if that package cannot compile
the pattern), so streamed text is always a prefix of the final, trimmed text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple


class StopMatch(NamedTuple):
    """Where the output stops: ``text[start:end]`` matched the stop string or regex
    ``matched`` (the regex's pattern string)."""

    start: int
    end: int
    matched: str


def _partial_pattern(pattern: str) -> Any:
    """``pattern`` compiled by the ``regex`` package (for partial matching), or None."""
    try:
        import regex

        return regex.compile(pattern)
    except Exception:  # not installed, or a dialect difference: hold back everything
        return None


class StopStringMatcher:
    """Finds the stop strings of one request in its output text."""

    def __init__(self, stop: Sequence[str], stop_regex: Sequence[str] = ()) -> None:
        if isinstance(stop, str):
            stop = [stop]
        if isinstance(stop_regex, str):
            stop_regex = [stop_regex]
        self.stop: tuple[str, ...] = tuple(dict.fromkeys(stop))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(stop)!r}")
        self.max_len = max((len(s) for s in self.stop), default=0)
        self.regexes: tuple[tuple[str, re.Pattern[str], Any], ...] = tuple(
            (p, re.compile(p), _partial_pattern(p)) for p in dict.fromkeys(stop_regex)
        )

    def __bool__(self) -> bool:
        return bool(self.stop or self.regexes)

    def match(self, text: str, num_new_chars: int) -> StopMatch | None:
        """The earliest stop-string (see :meth:`find`) or stop-regex match, once new text came.

        Regexes are searched over all of ``text``. The match that starts first wins; on a tie
        the one that ends first, then stop strings before regexes, then in the given order.
        """
        if num_new_chars <= 0:
            return None
        found = self.find(text, num_new_chars)
        best = StopMatch(found[0], found[0] + len(found[1]), found[1]) if found else None
        for pattern, rx, _ in self.regexes:
            m = rx.search(text)
            if m and (best is None or (m.start(), m.end()) < (best.start, best.end)):
                best = StopMatch(m.start(), m.end(), pattern)
        return best

    def find(self, text: str, num_new_chars: int) -> tuple[int, str] | None:
        """Earliest ``(start, stop_string)`` of a stop string ending in the last new chars.

        Only matches whose end lies within the last ``num_new_chars`` characters of ``text``
        are reported. Among matches the one that starts first wins; on a tie, the shortest
        (the one that completes first). ``None`` when nothing matches.
        """
        if not self.stop or num_new_chars <= 0:
            return None
        new_start = len(text) - min(num_new_chars, len(text))
        best: tuple[int, str] | None = None
        for s in self.stop:
            lo = max(0, new_start - len(s) + 1)
            idx = text.find(s, lo)
            if idx < 0:
                continue
            if best is None or idx < best[0] or (idx == best[0] and len(s) < len(best[1])):
                best = (idx, s)
        return best

    def holdback(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string,
        or that starts where a stop-regex match starts or could still start."""
        best = max((self._regex_holdback(text, *r[1:]) for r in self.regexes), default=0)
        for s in self.stop:
            tail = text[len(text) - min(len(s) - 1, len(text)) :]
            first = s[0]
            pos = tail.find(first)
            while pos >= 0:
                k = len(tail) - pos
                if k <= best:
                    break
                if s.startswith(tail[pos:]):
                    best = k
                    break
                pos = tail.find(first, pos + 1)
        return best

    @staticmethod
    def _regex_holdback(text: str, rx: re.Pattern[str], partial: Any) -> int:
        """Characters from the earliest full (by ``rx``) or partial match to the end."""
        if partial is None:
            return len(text)
        m = rx.search(text)
        end = m.start() if m else len(text)
        # ``regex`` prefers a full match over an earlier partial one: look only before ``end``
        p = partial.search(text, 0, end, partial=True) if end else None
        return len(text) - (min(end, p.start()) if p else end)
