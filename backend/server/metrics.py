"""``GET /metrics``: the engine's counters and gauges in Prometheus' text format (0.0.4).

Contract:
- Counters (``_total``): requests, prompt tokens, generated tokens, cached prompt tokens
  (from ``Engine.get_stats()``, monotonic since the engine started), and HTTP requests by
  method, route and status (kept by the server).
- Gauges: cache hit rate, running / waiting requests, KV slots used / free / evictable /
  total.
- Every sample carries ``model_name="<served name>"``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import Any

from aiohttp import web

from backend.server.state import STATE, ServerState

PREFIX = "sgl_dsl_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_COUNTERS = (
    ("requests_total", "requests", "Requests the engine finished."),
    ("prompt_tokens_total", "prompt_tokens", "Prompt tokens of finished requests."),
    ("generation_tokens_total", "generated_tokens", "Tokens generated."),
    ("cached_tokens_total", "cached_tokens", "Prompt tokens served from the prefix cache."),
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: Mapping[str, Any]) -> str:
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    return "{" + inner + "}"


def _metric(
    name: str, kind: str, help_text: str, samples: Iterable[tuple[Mapping[str, Any], float]]
) -> list[str]:
    lines = [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} {kind}"]
    lines += [f"{PREFIX}{name}{_labels(labels)} {float(value)!r}" for labels, value in samples]
    return lines


def render(state: ServerState, stats: Mapping[str, Any]) -> str:
    """The exposition text for ``stats`` (``Engine.get_stats()``) and the HTTP counters."""
    model = {"model_name": state.served_model_name}
    lines: list[str] = []
    for name, key, help_text in _COUNTERS:
        lines += _metric(name, "counter", help_text, [(model, stats[key])])
    kv = stats["kv_slots"]
    gauges = (
        (
            "cache_hit_rate",
            "Share of prompt tokens served from the prefix cache.",
            stats["cache_hit_rate"],
        ),
        ("num_running_reqs", "Requests being prefilled or decoded.", stats["running"]),
        ("num_queue_reqs", "Requests waiting to be scheduled.", stats["waiting"]),
        (
            "kv_slots_used",
            "KV cache slots in use (cached or held by requests).",
            stats["kv_slots_used"],
        ),
        ("kv_slots_free", "Free KV cache slots.", kv["free"]),
        (
            "kv_slots_evictable",
            "KV cache slots holding evictable cached prefixes.",
            kv["evictable"],
        ),
        ("kv_slots_total", "KV cache slots in the pool.", kv["total"]),
    )
    for name, help_text, value in gauges:
        lines += _metric(name, "gauge", help_text, [(model, value)])
    http = [
        ({**model, "method": m, "route": r, "status": s}, count)
        for (m, r, s), count in sorted(state.http_requests.items())
    ]
    lines += _metric("http_requests_total", "counter", "HTTP requests answered.", http)
    return "\n".join(lines) + "\n"


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    stats = await asyncio.get_running_loop().run_in_executor(None, state.engine.get_stats)
    return web.Response(body=render(state, stats).encode(), headers={"Content-Type": CONTENT_TYPE})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/metrics", metrics)
