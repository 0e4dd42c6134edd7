"""Runs a list of jobs against a server from `concurrency` aiohttp clients and checks them.

Contract: `run_jobs(url, jobs, concurrency)` sends every job once (real HTTP over loopback)
and returns a `RoundResult`: counts of ok / aborted / disconnected / failed jobs, the failure
messages, and the wall time. "abort" jobs close their stream after a few events;
"disconnect" jobs send the request on a raw socket and reset it without reading. A job
that raises, times out or answers wrongly is a failure; nothing is retried.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from .mix import Job, check

REQUEST_TIMEOUT_S = 600.0


@dataclass
class RoundResult:
    """What one round of jobs did."""

    requests: int = 0
    ok: int = 0
    aborted: int = 0
    disconnected: int = 0
    failures: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def failed(self) -> int:
        return len(self.failures)


async def _sse_events(resp: aiohttp.ClientResponse) -> Any:
    """Yield the decoded ``data:`` payloads of an SSE response ("[DONE]" as a string)."""
    async for raw in resp.content:
        line = raw.strip()
        if line.startswith(b"data:"):
            data = line[5:].strip().decode()
            yield data if data == "[DONE]" else json.loads(data)


async def _stream_generate(resp: aiohttp.ClientResponse) -> dict[str, Any] | str:
    """The last event of a native stream, or a message saying what is wrong with it."""
    events, done = [], False
    async for event in _sse_events(resp):
        if event == "[DONE]":
            done = True
            break
        events.append(event)
    texts = [e.get("text", "") for e in events]
    if not done or not events:
        return f"stream ended without [DONE] after {len(events)} events"
    if not all(b.startswith(a) for a, b in itertools.pairwise(texts)):
        return "stream: the cumulative text shrank"
    return events[-1]


async def _stream_chat(resp: aiohttp.ClientResponse) -> str | None:
    """None for a complete chat stream, else a message saying what is wrong with it."""
    finish, done = None, False
    async for event in _sse_events(resp):
        if event == "[DONE]":
            done = True
            break
        if "error" in event:
            return f"error event: {event['error']}"
        for choice in event["choices"]:
            finish = choice.get("finish_reason") or finish
    if done and finish in ("stop", "length"):
        return None
    return f"chat stream: done={done}, finish_reason={finish}"


async def _abort_mid_stream(session: aiohttp.ClientSession, url: str, job: Job) -> None:
    """Read `abort_after_events` events, then close the connection."""
    async with session.post(url + job.path, json=job.body) as resp:
        seen = 0
        async for raw in resp.content:
            if raw.startswith(b"data:"):
                seen += 1
                if seen >= job.abort_after_events:
                    break
        resp.close()


async def _disconnect(url: str, job: Job) -> None:
    """Send the request, wait a little, then reset the connection (SO_LINGER 0)."""
    parts = urlsplit(url)
    _, writer = await asyncio.open_connection(parts.hostname, parts.port)
    payload = json.dumps(job.body).encode()
    head = (
        f"POST {job.path} HTTP/1.1\r\nHost: {parts.hostname}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    writer.write(head.encode() + payload)
    await writer.drain()
    await asyncio.sleep(0.05 * (job.index % 5))
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def run_one(session: aiohttp.ClientSession, url: str, job: Job) -> tuple[str, str | None]:
    """(outcome, failure message or None); outcome is ok, aborted, disconnected or failed."""
    try:
        if job.kind == "abort":
            await _abort_mid_stream(session, url, job)
            return "aborted", None
        if job.kind == "disconnect":
            await _disconnect(url, job)
            return "disconnected", None
        async with session.post(url + job.path, json=job.body) as resp:
            if resp.status != 200:
                problem = check(job, resp.status, await resp.text())
            elif job.kind == "stream":
                out = await _stream_generate(resp)
                problem = out if isinstance(out, str) else check(job, 200, out)
            elif job.kind == "chat_stream":
                problem = await _stream_chat(resp)
            else:
                problem = check(job, 200, await resp.json())
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem is None:
        return "ok", None
    return "failed", f"job {job.index} ({job.kind}): {problem}"


async def run_jobs_async(url: str, jobs: list[Job], concurrency: int) -> RoundResult:
    result = RoundResult(requests=len(jobs))
    queue: asyncio.Queue[Job] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=concurrency)
    start = time.perf_counter()
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def worker() -> None:
            while not queue.empty():
                outcome, problem = await run_one(session, url, queue.get_nowait())
                if outcome == "failed":
                    result.failures.append(problem or "")
                else:
                    setattr(result, outcome, getattr(result, outcome) + 1)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.wall_s = time.perf_counter() - start
    return result


def run_jobs(url: str, jobs: list[Job], concurrency: int) -> RoundResult:
    """Run `jobs` from `concurrency` concurrent clients (see the module docstring)."""
    return asyncio.run(run_jobs_async(url, jobs, concurrency))
