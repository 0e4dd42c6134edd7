"""The members of a JSON object as a term, with exact bounds on their number.

Declared pairs come in declared order (optional ones may be skipped), then any number of
undeclared pairs, commas between. `minProperties`/`maxProperties` bound the total: the term
counts the members written so far, one copy of the remaining sequence per count that still
matters (counts past `lo` are merged when there is no upper bound), so it stays exact at a
size of about (pairs + 1) x (bound + 1) terms.
"""

from __future__ import annotations

from fsm.errors import ConstraintError
from fsm.terms import EMPTY, EPS, TermStore

MAX_COUNT_STATES = 1 << 14
"""Refuse bounds that would need more (pair, count) combinations than this."""


def members_term(
    store: TermStore,
    pairs: list[tuple[int, bool]],
    extra: int,
    comma: int,
    lo: int = 0,
    hi: int | None = None,
) -> int:
    """Term for the members between the braces: `pairs` are ('"key":value' term, required)
    in order, `extra` is one undeclared pair (EMPTY if none is allowed); between `lo` and
    `hi` (None: unbounded) members in all. Raises ConstraintError when the bounds are too
    large to count."""
    s = store
    cap = lo if hi is None else hi
    if (len(pairs) + 1) * (cap + 1) > MAX_COUNT_STATES:
        raise ConstraintError(f"property count bounds {lo}..{hi} are too large to enforce")

    def clamp(used: int) -> int:
        return min(used, lo) if hi is None else used

    def extras(used: int, first: bool) -> int:
        need = max(lo - used, 0)
        room = None if hi is None else hi - used
        if extra == EMPTY or room == 0:
            return EPS if need == 0 else EMPTY
        if not first:
            return s.repeat(s.seq(comma, extra), need, room)
        rest = s.repeat(s.seq(comma, extra), max(need - 1, 0), None if room is None else room - 1)
        some = s.seq(extra, rest)
        return s.optional(some) if need == 0 else some

    counts = range(cap + 1)
    # after[used][first]: the members still to come, `used` written so far (clamped).
    after = {(u, f): extras(u, f) for u in counts for f in (True, False)}
    for pair, required in reversed(pairs):
        nxt = {}
        for u in counts:
            for first in (True, False):
                more = clamp(u + 1)
                take = EMPTY
                if hi is None or u < hi:
                    take = s.seq(EPS if first else comma, pair, after[more, False])
                nxt[u, first] = take if required else s.alt(take, after[u, first])
        after = nxt
    return after[0, True]
