"""Timing of one system on a list of workloads; the shared result shape.

Every system reports, per workload: ``latency_s`` (mean seconds per program, programs run
one at a time), ``throughput`` (programs per second at the system's highest parallelism),
``outputs`` (per program, for the checks) and optional extra fields. Peers run programs
one after another, so their throughput is ``n / sum(latencies)``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from benchmarks.programs.session import Session
from benchmarks.programs.workloads import Workload, all_workloads

Result = dict[str, Any]


class Unsupported(Exception):
    """The peer cannot express a feature the workload needs (it is skipped)."""


def select_workloads(names: list[str] | None) -> list[Workload]:
    """The named workloads (all when ``names`` is empty), in table order."""
    chosen = [w for w in all_workloads() if not names or w.name in names]
    unknown = set(names or []) - {w.name for w in chosen}
    if unknown:
        raise SystemExit(f"unknown workloads: {sorted(unknown)}")
    return chosen


def run_sequential(workload: Workload, size: str, new_session: Callable[[], Session]) -> Result:
    """Run every item of ``workload`` on a fresh session, one at a time."""
    latencies, outputs = [], []
    for item in workload.items(size):
        start = time.perf_counter()
        outputs.append(workload.script(new_session(), item))
        latencies.append(time.perf_counter() - start)
    total = sum(latencies)
    return {"latency_s": total / len(latencies), "throughput": len(latencies) / total,
            "outputs": outputs}  # fmt: skip


def peer_main(
    name: str, features: set[str], setup: Callable[[], Callable[[], Session]], version: str
) -> None:
    """The command line of a peer worker: ``SIZE [WORKLOAD ...]``; prints one JSON line
    per workload as it finishes (``emit``), so a crash loses only the workload it hit.

    ``setup()`` loads the model (and warms it up) and returns the session factory.
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    size, names = sys.argv[1], sys.argv[2:]
    new_session = setup()
    for workload in select_workloads(names):
        missing = workload.needs - features
        if missing:
            emit(name, version, workload.name, {"skipped": f"no {', '.join(sorted(missing))}"})
            continue
        try:
            result = run_sequential(workload, size, new_session)
        except Unsupported as e:
            result = {"skipped": str(e)}
        except Exception as e:  # a peer failing one workload must not hide the others
            traceback.print_exc()
            result = {"failed": f"{type(e).__name__}: {e}"[:300]}
        emit(name, version, workload.name, result)


def emit(system: str, version: str, workload: str, result: Result) -> None:
    """Print one workload's result as a JSON line (and a summary on stderr)."""
    print(f"  {system} {workload}: {summary(result)}", file=sys.stderr, flush=True)
    line = {"system": system, "version": version, "workload": workload, "result": result}
    print(json.dumps(line), flush=True)


def summary(result: Result) -> str:
    """One line for progress logs."""
    if "throughput" not in result:
        return str(result)
    latency = f"latency {result['latency_s']:.3f}s, " if "latency_s" in result else ""
    return f"{latency}{result['throughput']:.2f} programs/s"
