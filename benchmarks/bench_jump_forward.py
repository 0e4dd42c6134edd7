"""Jump-forward benchmark on CPU: JSON extraction with jump-forward on vs off, in one run.

Six extraction schemas (person, invoice, event, product, support ticket, flight booking), each
paired with a short unstructured text, asked as a chat prompt ("Extract ... as JSON") of the
embedded SmolLM2-135M-Instruct, greedy, compact JSON. Each (mode, threads) cell runs in a fresh
subprocess: warm-up (one unconstrained and one unrelated constrained request), flush the radix
cache, then every request alone (cache flushed before each; median latency of --repeats), then
all requests as one batch. Outputs must parse and validate against their schema.

    .venv/bin/python benchmarks/bench_jump_forward.py [--threads 1 2] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MAX_NEW_TOKENS = 256
MODES = ("off", "on")  # jump-forward disabled / enabled
TARGET_DECODE_RATIO = 2.0
TARGET_LATENCY_RATIO = 1.5

NAME = {"type": "string", "maxLength": 40}
# Money as fixed-point strings: a JSON number's fraction is unbounded (a greedy 135M model can
# run "1.000..." up to max_new_tokens), so amounts use a bounded pattern, as many APIs do.
MONEY = {"type": "string", "pattern": "^[0-9]{1,7}\\.[0-9]{2}$"}
CASES: list[dict[str, Any]] = [
    {
        "name": "person",
        "what": "the person's name, age, email and city",
        "text": (
            "Hi all, quick intro: our new hire is Maria Gonzalez. She turned 34 last month, "
            "moved over from our Madrid office, and you can reach her at "
            "maria.gonzalez@example.com for anything onboarding-related."
        ),
        "schema": {
            "type": "object",
            "properties": {
                "name": NAME,
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                "email": {"type": "string", "format": "email", "maxLength": 60},
                "city": {"enum": ["Madrid", "Berlin", "Paris", "London", "New York", "Tokyo"]},
            },
            "required": ["name", "age", "email", "city"],
        },
    },
    {
        "name": "invoice",
        "what": "the invoice number, customer, currency, line items and total",
        "text": (
            "Invoice INV-2047 for Northwind Traders. Items: 3 wireless keyboards at 45.50 each "
            "and 2 USB-C docking stations at 120.00 each. All amounts in EUR; total due 376.50 "
            "within 30 days."
        ),
        "schema": {
            "type": "object",
            "properties": {
                "invoice_number": {"type": "string", "pattern": "^INV-[0-9]{4}$"},
                "customer": NAME,
                "currency": {"enum": ["USD", "EUR", "GBP"]},
                "line_items": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 4,
                    "items": {
                        "type": "object",
                        "properties": {
                            "description": {"type": "string", "maxLength": 30},
                            "quantity": {"type": "integer", "minimum": 1, "maximum": 1000},
                            "unit_price": MONEY,
                        },
                        "required": ["description", "quantity", "unit_price"],
                    },
                },
                "total": MONEY,
            },
            "required": ["invoice_number", "customer", "currency", "line_items", "total"],
        },
    },
    {
        "name": "event",
        "what": "the event's title, date, start and end time, venue and capacity",
        "text": (
            "Join us for the Spring Robotics Meetup on 2025-04-12! Doors open at 18:30 and we "
            "wrap up around 21:00. We're at the Innovation Hub, 5th floor; there is room for "
            "about 80 people, so register early."
        ),
        "schema": {
            "type": "object",
            "properties": {
                "title": NAME,
                "date": {"type": "string", "format": "date"},
                "start_time": {"type": "string", "pattern": "^([01][0-9]|2[0-3]):[0-5][0-9]$"},
                "end_time": {"type": "string", "pattern": "^([01][0-9]|2[0-3]):[0-5][0-9]$"},
                "venue": NAME,
                "capacity": {"type": "integer", "minimum": 1, "maximum": 100000},
            },
            "required": ["title", "date", "start_time", "end_time", "venue", "capacity"],
        },
    },
    {
        "name": "product",
        "what": "the product's name, brand, price, stock status and specifications",
        "text": (
            "The Aurora X2 laptop by Lumen ships with a 14-inch display, 512 GB of storage and "
            "16 GB of RAM, in a silver finish. It sells for 1299.99 and is currently in stock "
            "at our online store."
        ),
        "schema": {
            "type": "object",
            "properties": {
                "name": NAME,
                "brand": NAME,
                "price": MONEY,
                "in_stock": {"type": "boolean"},
                "specs": {
                    "type": "object",
                    "properties": {
                        "screen_inches": {"type": "integer", "minimum": 5, "maximum": 40},
                        "storage_gb": {"type": "integer", "minimum": 1, "maximum": 16384},
                        "ram_gb": {"type": "integer", "minimum": 1, "maximum": 1024},
                        "color": {"enum": ["black", "silver", "white", "blue", "red"]},
                    },
                    "required": ["screen_inches", "storage_gb", "ram_gb", "color"],
                },
            },
            "required": ["name", "brand", "price", "in_stock", "specs"],
        },
    },
    {
        "name": "ticket",
        "what": "a support ticket with customer, priority, category, summary and tags",
        "text": (
            "From: Tom Becker. URGENT - I was charged twice for my March subscription and my "
            "account is now locked, so I can't log in to download my invoices. Please fix the "
            "double charge and unlock my account as soon as possible."
        ),
        "schema": {
            "type": "object",
            "properties": {
                "customer": NAME,
                "priority": {"enum": ["low", "medium", "high", "urgent"]},
                "category": {"enum": ["billing", "technical", "account", "shipping"]},
                "summary": {"type": "string", "maxLength": 80},
                "tags": {
                    "type": "array",
                    "maxItems": 4,
                    "items": {"type": "string", "maxLength": 20},
                },
                "requires_refund": {"type": "boolean"},
            },
            "required": ["customer", "priority", "category", "summary", "tags", "requires_refund"],
        },
    },
    {
        "name": "flight",
        "what": "the flight booking: passenger, airports, date, cabin class and bags",
        "text": (
            "Booking confirmed for passenger Aiko Tanaka: flight from SFO to NRT departing on "
            "2025-07-03, business class, with 2 checked bags included."
        ),
        "schema": {
            "type": "object",
            "properties": {
                "passenger": NAME,
                "origin": {"type": "string", "pattern": "^[A-Z]{3}$"},
                "destination": {"type": "string", "pattern": "^[A-Z]{3}$"},
                "departure_date": {"type": "string", "format": "date"},
                "cabin": {"enum": ["economy", "premium_economy", "business", "first"]},
                "checked_bags": {"type": "integer", "minimum": 0, "maximum": 10},
            },
            "required": [
                "passenger",
                "origin",
                "destination",
                "departure_date",
                "cabin",
                "checked_bags",
            ],
        },
    },
]
WARMUP_SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["colour", "count"],
}


def prompt_text(case: dict[str, Any]) -> str:
    """The user message of one extraction request."""
    return f"Extract {case['what']} from the text below as JSON.\n\nText: {case['text']}"


def validate(text: str, schema: dict[str, Any]) -> str | None:
    """None if ``text`` parses and validates (formats included), else the error."""
    import jsonschema

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return f"not JSON: {e}"
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    errors = list(
        jsonschema.Draft202012Validator(schema, format_checker=checker).iter_errors(value)
    )
    return "; ".join(e.message for e in errors) or None


# ---- worker (one per subprocess) -----------------------------------------------------------


def run_mode(mode: str, threads: int, repeats: int, num_cases: int) -> dict[str, Any]:
    """Warm up, then time each extraction alone and all of them as one batch."""
    from backend.engine import Engine

    engine = Engine(
        disable_regex_jump_forward=mode == "off", num_threads=threads, max_total_tokens=8192
    )

    def chat(content: str) -> str:
        return engine.apply_chat_template([{"role": "user", "content": content}])

    def counters() -> tuple[int, int, int]:
        stats = engine.get_stats()
        steps = stats["forward_steps"]
        return steps["decode"], steps["prefill"], stats["jump_forward_tokens"]

    def flush() -> None:
        engine.wait_idle()
        if not engine.flush_cache():
            raise RuntimeError("flush_cache refused while idle")

    engine.generate(chat("Say hello."), {"temperature": 0.0, "max_new_tokens": 8})
    engine.generate(
        chat("Pick a colour and a count as JSON."),
        {"json_schema": WARMUP_SCHEMA, "temperature": 0.0, "max_new_tokens": 32},
    )
    flush()

    cases = CASES[:num_cases]
    prompts = [chat(prompt_text(c)) for c in cases]
    params = [
        {"json_schema": c["schema"], "temperature": 0.0, "max_new_tokens": MAX_NEW_TOKENS}
        for c in cases
    ]
    requests = []
    for case, prompt, p in zip(cases, prompts, params):
        latencies = []
        for _ in range(repeats):
            flush()
            before = counters()
            start = time.perf_counter()
            out = engine.generate(prompt, p)
            latencies.append(time.perf_counter() - start)
            after = counters()
        decode, prefill, jumped = (a - b for a, b in zip(after, before))
        requests.append(
            {
                "name": case["name"],
                "text": out["text"],
                "finish_reason": out["meta_info"]["finish_reason"],
                "completion_tokens": out["meta_info"]["completion_tokens"],
                "decode_steps": decode,
                "prefill_steps": prefill,
                "jump_forward_tokens": jumped,
                "latency_s": statistics.median(latencies),
                "latencies_s": latencies,
            }
        )

    flush()
    before = counters()
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    seconds = time.perf_counter() - start
    decode, prefill, jumped = (a - b for a, b in zip(counters(), before))
    engine.shutdown()
    return {
        "requests": requests,
        "batch": {
            "seconds": seconds,
            "decode_steps": decode,
            "prefill_steps": prefill,
            "jump_forward_tokens": jumped,
            "completion_tokens": sum(o["meta_info"]["completion_tokens"] for o in outs),
            "texts": [o["text"] for o in outs],
        },
    }


def run_cell(mode: str, threads: int, repeats: int, num_cases: int) -> dict[str, Any]:
    """Run one mode in a fresh subprocess pinned to ``threads`` threads."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--worker", mode, str(threads), str(repeats), str(num_cases)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"jump-forward {mode} ({threads}t) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- report --------------------------------------------------------------------------------


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (or 'unknown')."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def ratio(off: float, on: float) -> float:
    return off / on if on else float("inf")


def report(threads: int, cell: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Print the tables of one thread count; return its summary (failures, diffs, ratios)."""
    off_reqs, on_reqs = cell["off"]["requests"], cell["on"]["requests"]
    failures: list[str] = []
    for mode in MODES:
        run = cell[mode]
        for case, req in zip(CASES, run["requests"]):
            if (error := validate(req["text"], case["schema"])) is not None:
                failures.append(f"{mode} {case['name']} (sequential): {error}: {req['text']!r}")
        for case, text in zip(CASES, run["batch"]["texts"]):
            if (error := validate(text, case["schema"])) is not None:
                failures.append(f"{mode} {case['name']} (batch): {error}: {text!r}")
    differ = [a["name"] for a, b in zip(off_reqs, on_reqs) if a["text"] != b["text"]]

    print(f"\n### {threads} thread(s): one request at a time (off = jump-forward disabled)\n")
    print(
        "| schema | decode steps off/on | decode ratio | prefill steps off/on | "
        "tokens off/on | jumped tokens | latency s off/on | latency ratio | same text |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    total = {mode: {"decode": 0, "prefill": 0, "tokens": 0, "latency": 0.0} for mode in MODES}
    for off, on in zip(off_reqs, on_reqs):
        for mode, req in (("off", off), ("on", on)):
            total[mode]["decode"] += req["decode_steps"]
            total[mode]["prefill"] += req["prefill_steps"]
            total[mode]["tokens"] += req["completion_tokens"]
            total[mode]["latency"] += req["latency_s"]
        print(
            f"| {off['name']} | {off['decode_steps']}/{on['decode_steps']} | "
            f"{ratio(off['decode_steps'], on['decode_steps']):.2f}x | "
            f"{off['prefill_steps']}/{on['prefill_steps']} | "
            f"{off['completion_tokens']}/{on['completion_tokens']} | "
            f"{on['jump_forward_tokens']} | {off['latency_s']:.2f}/{on['latency_s']:.2f} | "
            f"{ratio(off['latency_s'], on['latency_s']):.2f}x | "
            f"{'yes' if off['text'] == on['text'] else 'NO'} |"
        )
    t_off, t_on = total["off"], total["on"]
    decode_ratio = ratio(t_off["decode"], t_on["decode"])
    latency_ratio = ratio(t_off["latency"], t_on["latency"])
    print(
        f"| **total** | {t_off['decode']}/{t_on['decode']} | {decode_ratio:.2f}x | "
        f"{t_off['prefill']}/{t_on['prefill']} | {t_off['tokens']}/{t_on['tokens']} | "
        f"{sum(r['jump_forward_tokens'] for r in on_reqs)} | "
        f"{t_off['latency']:.2f}/{t_on['latency']:.2f} | {latency_ratio:.2f}x | "
        f"{len(off_reqs) - len(differ)}/{len(off_reqs)} |"
    )

    b_off, b_on = cell["off"]["batch"], cell["on"]["batch"]
    print(f"\n### {threads} thread(s): all {len(off_reqs)} requests as one batch\n")
    print("| mode | decode steps | prefill steps | tokens | jumped tokens | seconds |")
    print("|---|---|---|---|---|---|")
    for mode, b in (("off", b_off), ("on", b_on)):
        print(
            f"| {mode} | {b['decode_steps']} | {b['prefill_steps']} | {b['completion_tokens']} | "
            f"{b['jump_forward_tokens']} | {b['seconds']:.2f} |"
        )
    batch_decode_ratio = ratio(b_off["decode_steps"], b_on["decode_steps"])
    batch_latency_ratio = ratio(b_off["seconds"], b_on["seconds"])
    print(f"| off/on | {batch_decode_ratio:.2f}x | | | | {batch_latency_ratio:.2f}x |")

    decode_met = decode_ratio >= TARGET_DECODE_RATIO
    latency_met = latency_ratio >= TARGET_LATENCY_RATIO
    print(
        f"\nTargets ({threads} thread(s), sequential totals): decode steps off/on "
        f"{decode_ratio:.2f}x >= {TARGET_DECODE_RATIO}x: {'MET' if decode_met else 'NOT MET'}; "
        f"latency off/on {latency_ratio:.2f}x >= {TARGET_LATENCY_RATIO}x: "
        f"{'MET' if latency_met else 'NOT MET'}"
    )
    print(
        f"Outputs differing between jump-forward on and off: {len(differ)}/{len(off_reqs)}"
        + (f" ({', '.join(differ)})" if differ else "")
    )
    for failure in failures:
        print(f"!!! SCHEMA VALIDATION FAILED: {failure}")
    return {
        "decode_ratio": decode_ratio,
        "latency_ratio": latency_ratio,
        "batch_decode_ratio": batch_decode_ratio,
        "batch_latency_ratio": batch_latency_ratio,
        "decode_target_met": decode_met,
        "latency_target_met": latency_met,
        "differing_outputs": differ,
        "validation_failures": failures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per request")
    parser.add_argument("--quick", action="store_true", help="2 schemas, 1 repeat")
    parser.add_argument(
        "--json", type=Path, default=Path(__file__).parent / "results" / "jump_forward.json"
    )
    parser.add_argument(
        "--worker", nargs=4, metavar=("MODE", "THREADS", "REPEATS", "CASES"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        mode, threads, repeats, num_cases = args.worker
        print(json.dumps(run_mode(mode, int(threads), int(repeats), int(num_cases))))
        return

    repeats = 1 if args.quick else args.repeats
    num_cases = 2 if args.quick else len(CASES)
    cells: dict[int, dict[str, dict[str, Any]]] = {}
    for threads in args.threads:
        cells[threads] = {}
        for mode in MODES:
            cells[threads][mode] = run_cell(mode, threads, repeats, num_cases)
            print(f"  jump-forward {mode}, {threads}t: done", file=sys.stderr, flush=True)

    machine = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
    }
    print(
        f"\nMachine: {machine['cpu']}, {machine['cores']} cores "
        f"({machine['usable_cores']} usable); threads per cell: {args.threads}; "
        f"model SmolLM2-135M-Instruct float32, greedy, max_new_tokens={MAX_NEW_TOKENS}, "
        f"{num_cases} schemas, median latency of {repeats} run(s), cache flushed before each"
    )
    summary = {f"{t}t": report(t, cells[t]) for t in args.threads}
    failed = sum(len(s["validation_failures"]) for s in summary.values())
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "machine": machine,
                "config": {
                    "threads": args.threads,
                    "repeats": repeats,
                    "max_new_tokens": MAX_NEW_TOKENS,
                    "schemas": [c["name"] for c in CASES[:num_cases]],
                },
                "cells": {f"{t}t": cells[t] for t in args.threads},
                "summary": summary,
            },
            indent=2,
        )
    )
    if failed:
        sys.exit(f"{failed} output(s) failed schema validation (see above)")


if __name__ == "__main__":
    main()
