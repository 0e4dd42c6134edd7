"""backend.lending.PassLenders against a brute-force scan of every pass member."""

from __future__ import annotations

import random

import pytest

from backend.lending import PassLenders, shared_run
from backend.request import Req
from backend.sampling_params import SamplingParams


def member(ids: list[int], num_kv: int, pending: int, borrowed: int = 0, out: int = 0) -> Req:
    req = Req(rid="m", input_ids=ids, params=SamplingParams(), sink=lambda u: None)
    req.output_ids = [7] * out  # decoded tokens: fill_ids runs past the prompt
    req.num_kv, req.pending_slots, req.borrowed_slots = num_kv, pending, borrowed
    return req


def brute_force(members: list[Req], fill: list[int], start: int, cap: int) -> int:
    """The longest run any eligible member covers (the scan PassLenders replaces)."""
    best = 0
    for other in members:
        if other.borrowed_slots or other.num_kv > start:
            continue
        theirs = other.fill_ids
        end = min(cap, other.num_kv + other.pending_slots)
        if start >= len(theirs) or theirs[:start] != fill[:start]:
            continue
        best = max(best, shared_run(fill, theirs, start, end))
    return best


def test_finds_the_longest_run_among_members_that_compute_it() -> None:
    base = list(range(100, 140))
    lenders = PassLenders()
    short = member([*base[:20], 1, 2, 3], num_kv=10, pending=13)
    long = member([*base[:20], 1, 2, 3, 4, 5], num_kv=10, pending=15)
    borrower = member([*base[:20], 1, 2, 3, 4, 5, 6], num_kv=10, pending=5, borrowed=11)
    late = member([*base[:20], 1, 2, 3, 4, 5, 6], num_kv=21, pending=5)  # starts past 20
    for req in (short, long, borrower, late):
        lenders.add(req)
    fill = [*base[:20], 1, 2, 3, 4, 5, 6, 9]
    assert lenders.find(fill, 20, 26) == (long, 5)
    assert lenders.find(fill, 20, 22) == (short, 2)  # cap first; the earlier member wins ties
    other_prefix = [0, *base[1:20], 1, 2, 3, 4, 5, 6]
    assert lenders.find(other_prefix, 20, 26) == (None, 0)  # same token, different history


def test_members_added_after_a_search_are_indexed() -> None:
    lenders = PassLenders()
    fill = [5, 6, 7, 8, 9]
    assert lenders.find(fill, 2, 4) == (None, 0)
    late = member([5, 6, 7, 8], num_kv=2, pending=2)
    lenders.add(late)
    assert lenders.find(fill, 2, 4) == (late, 2)


@pytest.mark.parametrize("seed", range(20))
def test_random_passes_match_the_brute_force_scan(seed: int) -> None:
    rng = random.Random(seed)
    trunk = [rng.randrange(4) for _ in range(24)]
    lenders, members = PassLenders(), []
    for _ in range(rng.randrange(1, 30)):
        ids = trunk[: rng.randrange(0, 24)] + [
            rng.randrange(4) for _ in range(rng.randrange(1, 12))
        ]
        out = rng.choice((0, 0, 3))
        num_kv = rng.randrange(0, len(ids))
        pending = rng.randrange(1, len(ids) + out - num_kv + 1)
        req = member(ids, num_kv, pending, borrowed=rng.choice((0, 0, 0, 2)), out=out)
        # searches interleave with additions, as admissions do
        fill = trunk[: rng.randrange(0, 24)] + [rng.randrange(4) for _ in range(8)]
        start = rng.randrange(0, len(fill) - 1)
        cap = rng.randrange(start + 1, len(fill))
        lender, run = lenders.find(fill, start, cap)
        assert run == brute_force(members, fill, start, cap)
        if lender is not None:
            assert (
                lender in members and shared_run(fill, lender.fill_ids, start, start + run) == run
            )
        lenders.add(req)
        members.append(req)
