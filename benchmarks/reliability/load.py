"""Rounds of load against a server, with the checks after each, and SIGTERM under traffic.

Contract: `run_round` runs one round of jobs, then checks that the server is healthy, that
the KV accounting is back at the idle invariant, and reads the server's memory when it is a
`ServerProcess`; `run_load` runs several rounds (a fresh job mix per round). A round
`passed` when no job failed, the server is healthy and the invariant holds.
`sigterm_during_traffic` sends SIGTERM to a server with requests in flight and reports how
each ended: every one must end (complete, aborted, or its connection closed) within the
timeout, and the process must exit 0.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp

from .client import run_jobs
from .mix import make_jobs
from .server import ServerProcess, healthy, kv_idle, kv_problem


@dataclass
class RoundReport:
    """One round: counts, time, health, KV invariant and server memory (MiB, or None)."""

    round: int
    requests: int
    concurrency: int
    ok: int
    aborted: int
    disconnected: int
    failed: int
    wall_s: float
    healthy: bool
    kv_problem: str | None
    rss_mb: float | None = None
    hwm_mb: float | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failed and self.healthy and self.kv_problem is None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "req_per_s": self.requests / self.wall_s, "passed": self.passed}


def run_round(
    url: str, number: int, requests: int, concurrency: int, server: ServerProcess | None = None
) -> RoundReport:
    """Round `number` (its job mix is seeded by it); see the module docstring."""
    result = run_jobs(url, make_jobs(requests, seed=number), concurrency)
    ok = healthy(url)
    problem = kv_problem(kv_idle(url))
    memory = server.memory_mb() if server is not None else {}
    return RoundReport(
        round=number,
        requests=result.requests,
        concurrency=concurrency,
        ok=result.ok,
        aborted=result.aborted,
        disconnected=result.disconnected,
        failed=result.failed,
        wall_s=result.wall_s,
        healthy=ok,
        kv_problem=problem,
        rss_mb=memory.get("rss_mb"),
        hwm_mb=memory.get("hwm_mb"),
        failures=result.failures[:20],
    )


def run_load(
    url: str,
    requests: int,
    concurrency: int,
    rounds: int,
    server: ServerProcess | None = None,
    log: Any = None,
) -> list[RoundReport]:
    """`rounds` rounds of `requests` jobs; `log(report)` after each when given."""
    reports = []
    for number in range(1, rounds + 1):
        reports.append(run_round(url, number, requests, concurrency, server))
        if log is not None:
            log(reports[-1])
    return reports


def rss_growth_mb(reports: list[RoundReport]) -> float | None:
    """Resident memory after the last round minus after the first (warm-up) round."""
    if len(reports) < 2 or reports[0].rss_mb is None or reports[-1].rss_mb is None:
        return None
    return reports[-1].rss_mb - reports[0].rss_mb


def format_table(reports: list[RoundReport]) -> str:
    rows = [
        "round  requests  clients    ok  aborted  disconn  failed  wall s  req/s"
        "  RSS MiB  peak MiB  kv"
    ]
    for r in reports:
        rss = f"{r.rss_mb:8.0f}" if r.rss_mb is not None else "       -"
        hwm = f"{r.hwm_mb:9.0f}" if r.hwm_mb is not None else "        -"
        rows.append(
            f"{r.round:5d}  {r.requests:8d}  {r.concurrency:7d}  {r.ok:4d}  {r.aborted:7d}  "
            f"{r.disconnected:7d}  {r.failed:6d}  {r.wall_s:6.1f}  {r.requests / r.wall_s:5.1f}"
            f"  {rss} {hwm}  {'ok' if r.kv_problem is None else 'LEAK'}"
        )
    return "\n".join(rows)


async def _in_flight(session: aiohttp.ClientSession, url: str, i: int) -> str:
    """One request during shutdown: how it ended (complete, aborted, closed)."""
    params = {"max_new_tokens": 48, "ignore_eos": True, "temperature": 0}
    body = {"text": f"Tell story number {i}.", "sampling_params": params, "stream": i % 2 == 0}
    try:
        async with session.post(url + "/generate", json=body) as resp:
            if resp.status != 200:
                return f"HTTP {resp.status}"
            if not body["stream"]:
                reason = (await resp.json())["meta_info"]["finish_reason"]["type"]
                return "complete" if reason == "length" else reason
            last = b""
            async for line in resp.content:
                last = line.strip() or last
            return "complete" if last == b"data: [DONE]" else "closed"
    except (aiohttp.ClientError, ConnectionError):
        return "closed"


async def _sigterm(server: ServerProcess, clients: int, timeout_s: float) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        tasks = [asyncio.create_task(_in_flight(session, server.url, i)) for i in range(clients)]
        while True:  # wait until the engine is busy with them
            async with session.get(server.url + "/server_info") as resp:
                if (await resp.json())["running"] > 0:
                    break
            await asyncio.sleep(0.05)
        server.proc.terminate()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    ends = [o if isinstance(o, str) else f"{type(o).__name__}" for o in outcomes]
    return {"clients": clients, "outcomes": {e: ends.count(e) for e in sorted(set(ends))}}


def sigterm_during_traffic(
    server: ServerProcess, clients: int = 16, timeout_s: float = 60.0
) -> dict[str, Any]:
    """SIGTERM with `clients` requests in flight (half streamed); how they ended, the exit
    code, and `passed` (every request ended as complete/abort/closed, exit code 0)."""
    report = asyncio.run(_sigterm(server, clients, timeout_s))
    # One SIGTERM only: a second one during the shutdown would be a second request to stop.
    report["exit_code"] = server.wait_exit(timeout_s)
    clean = {"complete", "abort", "closed"}
    report["passed"] = report["exit_code"] == 0 and set(report["outcomes"]) <= clean
    return report
