"""The aiohttp application: routes, middleware (errors, API key, body size) and lifecycle.

Contract:
- :func:`create_app` builds an application serving one :class:`Engine`; it does not own
  the engine (whoever created the engine shuts it down).
- Every error is JSON: :class:`APIError`, aiohttp's HTTP errors (404, 405, 413) and
  unexpected exceptions (500, logged) are rendered in OpenAI's shape under ``/v1/`` and in
  the native shape elsewhere. Bad input is never a 500.
- With ``api_key`` set, every route but ``/health`` needs ``Authorization: Bearer <key>``
  (or ``X-API-Key: <key>``); otherwise 401.
- Bodies over ``max_request_bytes`` are refused with 413 (before reading them when the
  ``Content-Length`` says so).
- Run it with :func:`backend.server.runner.start` (``handler_cancellation=True``), so a
  client that disconnects cancels its handler and aborts its engine requests; on shutdown
  every request in flight is aborted.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from backend.engine import Engine
from backend.server import metrics, native, openai_api
from backend.server.errors import APIError
from backend.server.state import (
    DEFAULT_MAX_REQUEST_BYTES,
    STATE,
    ServerState,
    default_model_name,
)

logger = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN_PATHS = frozenset({"/health"})


def is_openai_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def _render(request: web.Request, err: APIError) -> web.Response:
    body = err.openai_body() if is_openai_path(request.path) else err.native_body()
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return web.json_response(body, status=err.status, headers=headers)


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> APIError:
    if isinstance(exc, web.HTTPNotFound):
        return APIError(404, f"no route for {request.method} {request.path}", code="not_found")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return APIError(
            405,
            f"method {request.method} is not allowed on {request.path}; allowed: {allowed}",
            code="method_not_allowed",
        )
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        limit = request.app[STATE].max_request_bytes
        return APIError(413, f"the request body is over the limit of {limit} bytes")
    return APIError(exc.status, exc.reason or exc.text or "HTTP error")


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every error as JSON and count the answered requests for ``/metrics``."""
    try:
        response = await handler(request)
    except APIError as err:
        response = _render(request, err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _render(request, _from_http_exception(request, exc))
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:
        logger.exception("unexpected error in %s %s", request.method, request.path)
        response = _render(request, APIError(500, f"internal server error: {exc!r}"))
    route = request.match_info.route.resource
    name = route.canonical if route is not None else "unmatched"
    request.app[STATE].http_requests[(request.method, name, response.status)] += 1
    return response


def _presented_key(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("X-API-Key") or request.headers.get("api-key")


@web.middleware
async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The API key (when one is set), then the body size limit."""
    state = request.app[STATE]
    if state.api_key is not None and request.path not in OPEN_PATHS:
        key = _presented_key(request)
        if key is None:
            raise APIError(
                401,
                "missing API key: send it as 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )
        given = key.encode("utf-8", "backslashreplace")
        if not hmac.compare_digest(given, state.api_key.encode("utf-8", "backslashreplace")):
            raise APIError(401, "invalid API key", code="invalid_api_key")
    length = request.content_length
    if length is not None and length > state.max_request_bytes:
        raise APIError(
            413,
            f"the request body has {length} bytes; the limit is {state.max_request_bytes}",
            code="body_too_large",
        )
    return await handler(request)


async def _abort_in_flight(app: web.Application) -> None:
    """On shutdown: abort every engine request still in flight, so that their handlers end
    (streams get their final event) instead of running into the shutdown timeout."""
    for group in list(app[STATE].active):
        group.abort_unfinished()


def create_app(
    engine: Engine,
    api_key: str | None = None,
    *,
    served_model_name: str | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> web.Application:
    """An application serving ``engine`` on the native and the OpenAI routes.

    ``served_model_name`` (default: the model path, or "SmolLM2-135M-Instruct" for the
    embedded model) is what ``/v1/models`` lists and responses report.
    """
    if max_request_bytes <= 0:
        raise ValueError(f"max_request_bytes must be positive, got {max_request_bytes}")
    if api_key is not None and not api_key:
        raise ValueError("api_key must not be empty (pass None for no key)")
    app = web.Application(
        middlewares=[error_middleware, guard_middleware], client_max_size=max_request_bytes
    )
    app[STATE] = ServerState(
        engine=engine,
        served_model_name=served_model_name or default_model_name(engine),
        api_key=api_key,
        max_request_bytes=max_request_bytes,
    )
    app.on_shutdown.append(_abort_in_flight)
    native.add_routes(app)
    openai_api.add_routes(app)
    metrics.add_routes(app)
    return app
