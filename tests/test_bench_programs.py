"""Smoke test of the program benchmarks (benchmarks/programs/): every workload runs on our
engine at the tiny size (every generation capped at a few tokens), and every workload's
peer script runs on a scripted session, so neither can rot. Peers themselves are skipped."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.programs.ours import run_workload
from benchmarks.programs.report import attach_checks, speedups, tables
from benchmarks.programs.session import Session
from benchmarks.programs.workloads import all_workloads

WORKLOADS = all_workloads()


class ScriptedSession:
    """A peer stand-in: gen returns digits (or "{}" for JSON), select the first choice."""

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def append(self, text: str) -> None:
        assert isinstance(text, str)

    def gen(
        self,
        max_tokens: int,
        stop: list[str] | None = None,
        regex: str | None = None,
        json_schema: dict[str, Any] | None = None,
    ) -> str:
        assert max_tokens > 0
        self.calls.append("json" if json_schema else "regex" if regex else "gen")
        return "{}" if json_schema else "7"

    def select(self, choices: list[str]) -> str:
        self.calls.append("select")
        return choices[0]

    def fork(self, n: int) -> list[Session]:
        return [ScriptedSession(self.calls) for _ in range(n)]


@pytest.mark.parametrize("workload", WORKLOADS, ids=lambda w: w.name)
def test_peer_script_uses_declared_features(workload) -> None:
    calls: list[str] = []
    for item in workload.items("tiny"):
        assert isinstance(workload.script(ScriptedSession(calls), item), dict)
    used = set(calls) - {"gen"}
    assert used == set(workload.needs)


def test_every_workload_runs_on_our_engine(idle_engine) -> None:
    raw: dict[str, Any] = {"ours": {"results": {}}}
    for workload in WORKLOADS:
        result = run_workload(idle_engine, workload, "tiny")
        assert result["latency_s"] > 0 and result["throughput"] > 0
        assert 0.0 <= result["cache_hit_rate"] <= 1.0
        assert len(result["outputs"]) == len(workload.items("tiny"))
        raw["ours"]["results"][workload.name] = result
    attach_checks(raw, WORKLOADS, "tiny")
    mmlu = raw["ours"]["results"]["mmlu"]
    assert mmlu["valid"] == "4/4" and mmlu["same_as_ours"] == "2/2"
    assert raw["ours"]["results"]["json"]["valid"] == "2/2"
    raw["peer"] = {"results": {"mmlu": {"latency_s": 1.0, "throughput": 1.0, "outputs": []}}}
    assert speedups(raw, ["peer"], "mmlu")["latency_best_peer"] == "peer"
    assert "| mmlu |" in tables(raw, WORKLOADS, ["peer"])
