"""Constrained-decoder benchmark on JSONSchemaBench: ours vs outlines-core, xgrammar, llguidance.

On a fixed sample of schemas per subset (benchmarks/jsb_data.py), every decoder compiles each
schema under a time limit, then walks the token ids of each valid and invalid instance (its
serialization, tokenized with the embedded SmolLM2 tokenizer, followed by EOS). Reported per
subset and over all subsets, per decoder, side by side:

- compiled: share of schemas compiled within the time limit;
- coverage: valid instances accepted / all valid instances (a schema that fails to compile
  accepts none of its instances);
- invalid acc.: invalid instances accepted / all invalid instances;
- compile ms p50/p90: over successful compiles;
- mask µs p50/p99: time of the mask computation per token, over the positions walked for the
  valid instances.

Each decoder runs in its own worker process (spawn) that handles one schema at a time, and only
one worker is busy at any moment. A worker that passes the compile limit or crashes is killed
and restarted; the schema counts as not compiled. Settings of each decoder: benchmarks/fsm_peers.py.

    .venv/bin/python benchmarks/bench_fsm.py [--per-subset 50] [--subsets A B] [--peers A B]
        [--timeout 10] [--json benchmarks/results/fsm.json] [--explain]

``--explain`` also lists, per decoder, every valid instance it rejected and why: the compile
error of its schema (grouped by message), or the token where its walk stopped, in context.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import multiprocessing as mp
import os
import platform
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import jsb_data
import numpy as np
from fsm_peers import PEERS, Peer, make_peer

SETUP_TIMEOUT_S = 300.0  # worker start: imports, tokenizer, vocabulary, warm-up
WALK_TIMEOUT_S = 120.0  # all walks of one schema (guards against a hung matcher)
WARMUP_SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}
WARMUP_TEXT = '{"a":1}'
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "fsm.json"
PACKAGES = {
    "ours": "sgl-dsl",
    "outlines-core": "outlines_core",
    "xgrammar": "xgrammar",
    "llguidance": "llguidance",
}

SERIALIZATION = f"{jsb_data.serialize.__module__}.{jsb_data.serialize.__qualname__}"
Job = tuple[dict[str, Any], list[list[int]], list[list[int]]]


# ---- worker process -------------------------------------------------------------------------


def _load_tokenizer() -> Any:
    from backend.model_loader import load_tokenizer, resolve_model_dir

    return load_tokenizer(resolve_model_dir(None))


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:500]


def _worker(peer_name: str, conn: Connection) -> None:
    """Set up one decoder, then compile and walk each job received until ``None``."""
    try:
        tokenizer = _load_tokenizer()
        peer = make_peer(peer_name, tokenizer)
        warmup_ids = tokenizer.encode(WARMUP_TEXT, add_special_tokens=False)
        peer.walk(peer.compile(WARMUP_SCHEMA), [*warmup_ids, tokenizer.eos_token_id])
    except Exception as error:
        conn.send(("unavailable", _describe(error)))
        return
    conn.send(("ready", None))
    while (job := conn.recv()) is not None:
        schema, valid_ids, invalid_ids = job
        start = time.perf_counter_ns()
        try:
            compiled = peer.compile(schema)
        except Exception as error:
            conn.send(("error", _describe(error)))
            continue
        conn.send(("compiled", (time.perf_counter_ns() - start) * 1e-6))
        conn.send(("walked", *_walk_all(peer, compiled, valid_ids, invalid_ids)))


def _walk_all(
    peer: Peer, compiled: Any, valid_ids: list[list[int]], invalid_ids: list[list[int]]
) -> tuple[list[bool], list[bool], np.ndarray, str | None, list[int | None]]:
    """Walk every instance: valid and invalid acceptance, mask times of the valid walks, the
    first error raised by a walk (such a walk counts as rejected), and per valid instance the
    index of the token its walk stopped at (None if accepted or the walk raised)."""
    times: list[float] = []
    errors: list[str] = []
    stops: list[int | None] = []

    def accepts(ids: list[int], timed: bool) -> bool:
        try:
            ok, seconds = peer.walk(compiled, ids)
        except Exception as error:
            errors.append(_describe(error))
            stops.append(None)
            return False
        if timed:
            times.extend(seconds)
        stops.append(None if ok else len(seconds) - 1)
        return ok

    valid_ok = [accepts(ids, timed=True) for ids in valid_ids]
    valid_stops = stops[: len(valid_ids)]
    invalid_ok = [accepts(ids, timed=False) for ids in invalid_ids]
    return valid_ok, invalid_ok, np.asarray(times), errors[0] if errors else None, valid_stops


# ---- main process ---------------------------------------------------------------------------


class PeerProcess:
    """The worker process of one decoder, restarted after a timeout or a crash."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.unavailable: str | None = None
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_worker, args=(self.name, child), daemon=True)
        self._proc.start()
        child.close()
        reply = self._receive(SETUP_TIMEOUT_S)
        if reply is None or reply[0] != "ready":
            self.unavailable = reply[1] if reply else "worker did not start"
            self.stop()

    def _receive(self, timeout: float) -> tuple | None:
        try:
            if self._conn.poll(timeout):
                return self._conn.recv()
        except (EOFError, OSError):
            pass
        return None

    def _fail(self, stage: str, timeout: float) -> str:
        """Kill the worker and start a fresh one; return why ``stage`` failed."""
        reason = (
            f"{stage} timeout ({timeout:g} s)"
            if self._proc.is_alive()
            else f"worker died in {stage} (exit code {self._proc.exitcode})"
        )
        self._proc.kill()
        self._proc.join()
        self.restarts += 1
        self._start()
        if self.unavailable:
            raise RuntimeError(f"{self.name}: worker restart failed: {self.unavailable}")
        return reason

    def run(self, job: Job, timeout: float) -> dict[str, Any]:
        """Compile and walk one schema; a record with the outcome and the mask times."""
        n_valid, n_invalid = len(job[1]), len(job[2])
        record: dict[str, Any] = {
            "compiled": False,
            "compile_timeout": False,
            "error": None,
            "compile_ms": None,
            "valid_accepted": [False] * n_valid,
            "invalid_accepted": [False] * n_invalid,
            "walk_error": None,
            "valid_stops": [None] * n_valid,
            "mask_s": np.empty(0),
        }
        self._conn.send(job)
        reply = self._receive(timeout)
        if reply is None:
            record["compile_timeout"] = self._proc.is_alive()
            record["error"] = self._fail("compile", timeout)
            return record
        if reply[0] == "error":
            record["error"] = reply[1]
            return record
        record["compiled"], record["compile_ms"] = True, reply[1]
        reply = self._receive(WALK_TIMEOUT_S)
        if reply is None:
            record["walk_error"] = self._fail("walk", WALK_TIMEOUT_S)
            return record
        _, record["valid_accepted"], record["invalid_accepted"], record["mask_s"], error, stops = (
            reply
        )
        record["walk_error"], record["valid_stops"] = error, stops
        return record

    def stop(self) -> None:
        """Ask the worker to exit (kill it if it does not)."""
        if self._proc.is_alive():
            with contextlib.suppress(OSError):
                self._conn.send(None)
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()


def encode_case(
    tokenizer: Any,
    case: jsb_data.Case,
    serialize: Callable[[Any, dict[str, Any]], str] = jsb_data.serialize,
) -> Job:
    """The job for one schema: token ids (+ EOS) of each valid and invalid instance."""
    eos = tokenizer.eos_token_id

    def ids(instance: Any) -> list[int]:
        text = serialize(instance, case.schema)
        return [*tokenizer.encode(text, add_special_tokens=False), eos]

    return case.schema, [ids(x) for x in case.valid], [ids(x) for x in case.invalid]


def _percentiles(values: np.ndarray, qs: tuple[int, int], scale: float) -> list[float | None]:
    if values.size == 0:
        return [None, None]
    return [float(v) * scale for v in np.percentile(values, qs)]


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate metrics of one decoder over ``records``."""
    n = len(records)
    compiled = sum(r["compiled"] for r in records)
    valid = [ok for r in records for ok in r["valid_accepted"]]
    invalid = [ok for r in records for ok in r["invalid_accepted"]]
    compile_ms = np.array([r["compile_ms"] for r in records if r["compiled"]])
    mask_s = np.concatenate([r["mask_s"] for r in records]) if records else np.empty(0)
    return {
        "schemas": n,
        "compiled": compiled,
        "compiled_pct": 100.0 * compiled / n if n else None,
        "valid": len(valid),
        "valid_accepted": sum(valid),
        "coverage_pct": 100.0 * sum(valid) / len(valid) if valid else None,
        "invalid": len(invalid),
        "invalid_accepted": sum(invalid),
        "compile_ms_p50_p90": _percentiles(compile_ms, (50, 90), 1.0),
        "mask_us_p50_p99": _percentiles(mask_s, (50, 99), 1e6),
        "mask_samples": int(mask_s.size),
        "compile_timeouts": sum(r["compile_timeout"] for r in records),
        "walk_errors": sum(r["walk_error"] is not None for r in records),
    }


def _cause(error: str) -> str:
    """A compile error without its location, so that equal causes group together."""
    return re.sub(r"^(\w+: )?json_schema at \S+: ", "", error)[:120]


def explain(
    tokenizer: Any, records: list[dict[str, Any]], jobs: dict[tuple[str, str], Job]
) -> None:
    """Print, per decoder, each rejected valid instance and why (see the module docstring),
    then the number of rejected instances per cause."""
    for peer in dict.fromkeys(r["peer"] for r in records):
        print(f"\nrejected valid instances, {peer}:")
        causes: Counter[str] = Counter()
        for r in records:
            if r["peer"] != peer:
                continue
            where = f"{r['subset']}/{r['unique_id']}"
            missed = [i for i, ok in enumerate(r["valid_accepted"]) if not ok]
            if missed and not r["compiled"]:
                causes[_cause(r["error"] or "compile failed")] += len(missed)
                print(f"  {where}: {len(missed)} not compiled: {r['error']}")
                continue
            for i in missed:
                stop = r["valid_stops"][i]
                if stop is None:
                    causes["walk raised"] += 1
                    print(f"  {where} #{i}: walk raised: {r['walk_error']}")
                    continue
                ids = jobs[r["subset"], r["unique_id"]][1][i]
                before = tokenizer.decode(ids[max(stop - 12, 0) : stop])
                token = tokenizer.decode(ids[stop : stop + 1])
                causes["rejected during the walk"] += 1
                print(f"  {where} #{i}: token {stop} refused: ...{before!r} >> {token!r}")
        for cause, n in causes.most_common():
            print(f"  {n:4d}  {cause}")


def machine_info() -> dict[str, Any]:
    """CPU model and count (from /proc/cpuinfo), OS and Python version."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = models[0] if models else model
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def _version(peer: str) -> str:
    try:
        return importlib.metadata.version(PACKAGES[peer])
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _fmt_pair(pair: list[float | None], digits: int) -> str:
    if pair[0] is None:
        return "-"
    return f"{pair[0]:.{digits}f} / {pair[1]:.{digits}f}"


def print_table(title: str, summaries: dict[str, dict[str, Any]]) -> None:
    """Print one block of the result table: one line per decoder."""
    first = next(iter(summaries.values()))
    print(
        f"\n{title}: {first['schemas']} schemas, {first['valid']} valid and "
        f"{first['invalid']} invalid instances"
    )
    header = (
        f"  {'decoder':<14}{'compiled':>9}{'coverage':>20}{'invalid acc.':>14}"
        f"{'compile ms p50/p90':>22}{'mask µs p50/p99':>20}"
    )
    print(header)
    for name, s in summaries.items():
        coverage = f"{s['valid_accepted']}/{s['valid']} {s['coverage_pct'] or 0:5.1f}%"
        invalid = f"{s['invalid_accepted']}/{s['invalid']}"
        print(
            f"  {name:<14}{s['compiled_pct'] or 0:>8.1f}%{coverage:>20}{invalid:>14}"
            f"{_fmt_pair(s['compile_ms_p50_p90'], 1):>22}"
            f"{_fmt_pair(s['mask_us_p50_p99'], 1):>20}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-subset", type=int, default=50, help="schemas per subset")
    parser.add_argument("--subsets", nargs="+", choices=jsb_data.SUBSETS, default=jsb_data.SUBSETS)
    parser.add_argument("--peers", nargs="+", choices=list(PEERS), default=list(PEERS))
    parser.add_argument("--timeout", type=float, default=10.0, help="compile limit (s)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="results file")
    parser.add_argument("--explain", action="store_true", help="list rejected valid instances")
    args = parser.parse_args()

    machine = machine_info()
    print(
        f"machine: {machine['cpu_count']} CPUs ({machine['cpus_usable']} usable), "
        f"{machine['cpu_model']}; {machine['platform']}; Python {machine['python']}"
    )
    cases = list(jsb_data.sample(args.per_subset, args.subsets))
    tokenizer = _load_tokenizer()
    jobs = [encode_case(tokenizer, case) for case in cases]
    print(
        f"sample: {len(cases)} schemas ({args.per_subset} per subset max), "
        f"compile limit {args.timeout:g} s; serialization: {SERIALIZATION}"
    )

    workers: list[PeerProcess] = []
    notes: dict[str, str] = {}
    for name in args.peers:
        worker = PeerProcess(name)
        if worker.unavailable:
            notes[name] = worker.unavailable
            print(f"note: skipping {name}: {worker.unavailable}", file=sys.stderr)
        else:
            workers.append(worker)
    print("decoders: " + ", ".join(f"{w.name} {_version(w.name)}" for w in workers))

    records: list[dict[str, Any]] = []
    start = time.perf_counter()
    try:
        for i, (case, job) in enumerate(zip(cases, jobs)):
            for worker in workers:
                ident = {"subset": case.subset, "unique_id": case.unique_id, "peer": worker.name}
                records.append({**ident, **worker.run(job, args.timeout)})
            last = i + 1 == len(cases) or cases[i + 1].subset != case.subset
            if last:
                elapsed = time.perf_counter() - start
                print(f"[{elapsed:7.1f} s] {case.subset} done", file=sys.stderr)
    finally:
        for worker in workers:
            worker.stop()

    names = [w.name for w in workers]
    per_subset = {
        subset: {
            name: summarize([r for r in records if r["subset"] == subset and r["peer"] == name])
            for name in names
        }
        for subset in args.subsets
    }
    total = {name: summarize([r for r in records if r["peer"] == name]) for name in names}
    if names:
        for subset, summaries in per_subset.items():
            print_table(subset, summaries)
        print_table("TOTAL", total)
    for name, note in notes.items():
        print(f"note: {name} was skipped: {note}")
    if args.explain:
        explain(tokenizer, records, {(c.subset, c.unique_id): j for c, j in zip(cases, jobs)})

    result = {
        "machine": machine,
        "config": {
            "per_subset": args.per_subset,
            "subsets": list(args.subsets),
            "peers": names,
            "compile_timeout_s": args.timeout,
            "walk_timeout_s": WALK_TIMEOUT_S,
            "serialization": SERIALIZATION,
            "tokenizer": {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id},
        },
        "versions": {name: _version(name) for name in names},
        "skipped": notes,
        "restarts": {w.name: w.restarts for w in workers},
        "per_subset": per_subset,
        "total": total,
        "schemas": [{k: v for k, v in r.items() if k != "mask_s"} for r in records],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nresults: {args.json}")


if __name__ == "__main__":
    main()
