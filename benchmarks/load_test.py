"""Load test of the HTTP server: rounds of mixed requests from many concurrent clients.

Each round sends `--requests` requests from `--clients` concurrent aiohttp clients: plain,
regex and JSON-schema `/generate`, streamed `/generate`, select-style scoring (prefill-only
with logprobs over 3 choices), OpenAI chat (plain and streamed); about 10% are aborted by
their client mid-stream and 3% reset their connection without reading. Every other answer
is checked (regex full match, jsonschema validation, finish reasons, stream shape). After
each round: `/health` and `/health_generate`, the KV idle invariant from `/server_info`,
and the server's resident memory (VmRSS / VmHWM of the server process). Finally SIGTERM is
sent with requests in flight. Exit code 0 only when every check passed.

    .venv/bin/python benchmarks/load_test.py [--requests 1000] [--clients 64] [--rounds 3]
    .venv/bin/python benchmarks/load_test.py --url http://127.0.0.1:30000  # a running server

The summary goes to stdout and, as JSON, to benchmarks/results/load_test.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from reliability.load import (
    RoundReport,
    format_table,
    rss_growth_mb,
    run_load,
    sigterm_during_traffic,
)
from reliability.server import ServerProcess

RESULTS = Path(__file__).resolve().parent / "results" / "load_test.json"
# RSS may grow by this much between the first and the last round (allocator noise).
RSS_GROWTH_LIMIT_MB = 64.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests per round")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--url", help="target this server instead of starting one")
    parser.add_argument("--num-threads", type=int, default=2, help="engine threads")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()

    def log(report: RoundReport) -> None:
        print(format_table([report]).splitlines()[-1], flush=True)
        for failure in report.failures[:5]:
            print("   ", failure, flush=True)

    server = None
    if args.url is None:
        server = ServerProcess(["--num-threads", str(args.num_threads)])
    url = args.url or server.url
    try:
        print(f"{args.rounds} rounds x {args.requests} requests, {args.clients} clients -> {url}")
        print(format_table([]), flush=True)
        start = time.perf_counter()
        reports = run_load(url, args.requests, args.clients, args.rounds, server, log=log)
        total_s = time.perf_counter() - start
        sigterm = sigterm_during_traffic(server) if server is not None else None
    finally:
        if server is not None:
            server.kill()
    growth = rss_growth_mb(reports)
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "requests_total": sum(r.requests for r in reports),
        "clients": args.clients,
        "rounds": [r.as_dict() for r in reports],
        "failed_total": sum(r.failed for r in reports),
        "aborted_total": sum(r.aborted for r in reports),
        "disconnected_total": sum(r.disconnected for r in reports),
        "kv_leaks": sum(r.kv_problem is not None for r in reports),
        "rss_growth_mb": growth,
        "max_rss_mb": max((r.hwm_mb or 0.0) for r in reports) or None,
        "wall_s": total_s,
        "sigterm": sigterm,
    }
    passed = all(r.passed for r in reports) and (growth is None or growth <= RSS_GROWTH_LIMIT_MB)
    passed = passed and (sigterm is None or sigterm["passed"])
    summary["passed"] = passed
    print(format_table(reports))
    print(
        f"total: {summary['requests_total']} requests, {summary['failed_total']} failed, "
        f"{summary['aborted_total']} aborted, {summary['disconnected_total']} disconnected, "
        f"{summary['kv_leaks']} KV leaks, RSS growth {growth} MiB, {total_s:.0f} s"
    )
    if sigterm is not None:
        print(f"SIGTERM in traffic: {sigterm}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print("PASSED" if passed else "FAILED")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
