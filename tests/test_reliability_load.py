"""The load test's short CI variant: `benchmarks/load_test.py`'s code, 2 rounds of 100
mixed requests from 16 clients against `python -m sgl_dsl serve` in a subprocess, then
SIGTERM with requests in flight. (The full run: see docs/reliability.md.)"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from reliability.load import rss_growth_mb, run_load, sigterm_during_traffic
from reliability.mix import UNCHECKED, make_jobs
from reliability.server import ServerProcess

REQUESTS, CLIENTS, ROUNDS = 100, 16, 2


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with ServerProcess(["--num-threads", "2", "--max-total-tokens", "8192"]) as srv:
        yield srv


def test_mix_covers_every_kind() -> None:
    jobs = make_jobs(REQUESTS, seed=1)
    kinds = {job.kind for job in jobs}
    assert {"plain", "regex", "json", "stream", "select", "chat", "chat_stream"} <= kinds
    assert set(UNCHECKED) <= kinds
    aborted = sum(job.kind == "abort" for job in make_jobs(1000, seed=1))
    assert 70 <= aborted <= 130  # about 10%


def test_mixed_load_rounds(server: ServerProcess) -> None:
    reports = run_load(server.url, REQUESTS, CLIENTS, ROUNDS, server)
    for r in reports:
        assert r.failed == 0, r.failures
        assert r.ok + r.aborted + r.disconnected == r.requests == REQUESTS
        assert r.aborted > 0 and r.disconnected > 0
        assert r.healthy and r.kv_problem is None, r.kv_problem
    growth = rss_growth_mb(reports)
    assert growth is not None and growth < 64, [r.rss_mb for r in reports]


def test_sigterm_during_traffic(server: ServerProcess) -> None:
    """Last in this module: it stops the server."""
    report = sigterm_during_traffic(server, clients=8)
    assert report["passed"], report
    assert sum(report["outcomes"].values()) == 8
