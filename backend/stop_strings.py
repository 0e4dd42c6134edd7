"""Stop-string matching on incrementally growing output text.

Contract: the caller appends newly detokenized text to ``text`` and calls
``find(text, num_new_chars)``; only stop strings that *end* inside the new characters are
searched (earlier ones were found by earlier calls), but a match may start in earlier text,
so a stop string split across token or chunk boundaries is found. ``holdback(text)`` says how
many trailing characters must not be streamed yet because they may begin a stop string.
Costs depend on the stop strings' lengths and ``num_new_chars``, never on ``len(text)``.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Finds the stop strings of one request in its output text."""

    def __init__(self, stop: Sequence[str]) -> None:
        if isinstance(stop, str):
            stop = [stop]
        self.stop: tuple[str, ...] = tuple(dict.fromkeys(stop))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(stop)!r}")
        self.max_len = max((len(s) for s in self.stop), default=0)

    def __bool__(self) -> bool:
        return bool(self.stop)

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
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
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
