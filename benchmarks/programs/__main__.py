"""``python -m benchmarks.programs``: run every available system, one process at a time.

Prints the markdown tables, writes ``benchmarks/results/programs.json`` and
``benchmarks/results/programs.png``. ``--size tiny`` is the smoke-test size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from benchmarks.programs.measure import select_workloads
from benchmarks.programs.report import attach_checks, plot, same_precision, speedups, tables
from benchmarks.programs.systems import ROOT, all_systems, run_system

RESULTS = ROOT / "benchmarks" / "results"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=["full", "tiny"], default="full")
    parser.add_argument("--only", nargs="*", default=[], help="workload names")
    parser.add_argument("--systems", nargs="*", default=[], help="system names")
    parser.add_argument("--json", type=Path, default=RESULTS / "programs.json")
    parser.add_argument("--png", type=Path, default=RESULTS / "programs.png")
    parser.add_argument(
        "--reuse", type=Path, help="a previous JSON: keep its results of systems not run now"
    )
    args = parser.parse_args()

    workloads = select_workloads(args.only)
    systems = [s for s in all_systems() if not args.systems or s.name in args.systems]
    raw, notes = {}, []
    if args.reuse:
        previous = json.loads(args.reuse.read_text())
        names = {s.name for s in systems}
        raw = {k: v for k, v in previous["systems"].items() if k not in names}
        notes += [n for n in previous["notes"] if "died" not in n]
        notes.append(f"reused from {args.reuse.name} (an earlier run): {', '.join(raw)}")
        systems = [s for s in all_systems() if s.name in raw or s in systems]
    for system in systems:
        if system.name in raw:
            continue
        if (why := system.available()) is not None:
            notes.append(f"{system.name} skipped: {why}")
            continue
        print(f"== {system.name}", file=sys.stderr, flush=True)
        raw[system.name] = run_system(system, args.size, [w.name for w in workloads])
    peers = [s.name for s in systems if not s.ours and s.name in raw]
    notes += [f"{name} died: {run['died']}" for name, run in raw.items() if "died" in run]
    attach_checks(raw, workloads, args.size)

    machine = f"{cpu_model()}, {os.cpu_count()} cores, 1 thread per system, one at a time"
    versions = {name: run.get("version", "?") for name, run in raw.items()}
    print(f"\nMachine: {machine}; model SmolLM2-135M-Instruct (float32; ours-int4: int4 "
          "linears, int8 output projection; llama.cpp: Q4_1 GGUF, llama.cpp-f32: the same "
          "weights dequantized), greedy\n")  # fmt: skip
    print("Versions: " + "; ".join(f"{k}: {v}" for k, v in versions.items()) + "\n")
    print(tables(raw, workloads, peers))
    for note in notes:
        print(f"\nNote: {note}")
    summary = {w.name: speedups(raw, peers, w.name) for w in workloads}
    paired = {w.name: same_precision(raw, w.name) for w in workloads}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(
        {"machine": machine, "size": args.size, "versions": versions, "notes": notes,
         "speedups": summary, "same_precision": paired, "systems": raw}, indent=1))  # fmt: skip
    plot(raw, workloads, peers, args.png)
    print(f"\nwrote {args.json} and {args.png}", file=sys.stderr)


if __name__ == "__main__":
    main()
