"""What every route shares: the engine, the served model's name and the server's options.

Contract: one :class:`ServerState` per application, stored under :data:`STATE`
(``request.app[STATE]``); created by :func:`backend.server.app.create_app`.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from backend.engine import Engine

DEFAULT_MAX_REQUEST_BYTES = 32 * 2**20
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass
class ServerState:
    """Shared, loop-owned state of one server (only touched on the event loop)."""

    engine: Engine
    served_model_name: str
    api_key: str | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    started_at: float = field(default_factory=time.time)
    # (method, route, status) -> count, for /metrics
    http_requests: Counter[tuple[str, str, int]] = field(default_factory=Counter)
    # the RequestGroups in flight (aborted when the server shuts down)
    active: set[Any] = field(default_factory=set)


def default_model_name(engine: Engine) -> str:
    """The model path the engine was given, or the embedded model's name."""
    if engine.config.model:
        return str(engine.config.model)
    return EMBEDDED_MODEL_NAME


def model_path(engine: Engine) -> str:
    """What ``/get_model_info`` reports as ``model_path``."""
    return str(engine.config.model) if engine.config.model else str(Path(engine.model_dir))


STATE: web.AppKey[ServerState] = web.AppKey("sgl_dsl_state", ServerState)
