"""SGLang-native routes: ``/generate``, model and server info, cache, health, abort.

Contract (what ``sglang.lang.backend.runtime_endpoint.RuntimeEndpoint`` relies on):
- ``POST /generate`` answers ``RequestHandle.response()`` (``{"text", "output_ids",
  "meta_info"}``) for one prompt with ``n == 1``, else a list (prompt-major, ``n`` samples
  of a prompt next to each other). ``stream: true`` answers SSE events holding the
  cumulative response, then ``data: [DONE]``.
- An invalid regex / JSON schema (found asynchronously by the engine) is a 400 with the
  engine's "invalid constraint: ..." message; in a stream that already started, an error
  event. An engine failure is a 500. An abort asked for through ``/abort_request`` is
  answered normally, with ``finish_reason`` ``{"type": "abort", ...}``.
- Calls that wait on the engine thread (stats, flush) run in the default executor.
"""

from __future__ import annotations

import asyncio
import dataclasses
from importlib import metadata
from typing import Any

from aiohttp import web

from backend.engine import RequestHandle
from backend.sampling_params import SamplingParams
from backend.server.bridge import RequestGroup
from backend.server.errors import APIError, bad_request, error_for_abort
from backend.server.protocol import (
    EngineCall,
    parse_generate,
    read_json_object,
    tokenize,
)
from backend.server.sse import EventStream
from backend.server.state import STATE, model_path

HEALTH_PROMPT = "Hello"
HEALTH_TIMEOUT_S = 60.0


def version() -> str:
    try:
        return metadata.version("sgl-dsl")
    except metadata.PackageNotFoundError:
        return "0.0.0"


async def in_executor(fn: Any, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def _raise_on_abort(handle: RequestHandle) -> None:
    err = error_for_abort(handle.response()["meta_info"]["finish_reason"])
    if err is not None:
        raise err


async def generate(request: web.Request) -> web.StreamResponse:
    engine = request.app[STATE].engine
    body = await read_json_object(request)
    req = parse_generate(body, engine)
    if req.texts is not None:
        req.call.token_lists = await tokenize(engine, req.texts)
    req.call.check_context(engine)
    handles = req.call.submit(engine)
    async with RequestGroup(engine, handles, request.app[STATE].active) as group:
        if req.stream:
            return await _stream(request, group)
        responses = await group.wait(check=_raise_on_abort)
    return web.json_response(responses[0] if req.single else responses)


async def _stream(request: web.Request, group: RequestGroup) -> web.StreamResponse:
    stream = EventStream(request)
    handle = group.handles[0]
    try:
        async for _ in group.updates():
            response = handle.response()
            err = error_for_abort(response["meta_info"]["finish_reason"])
            if err is not None:
                raise err
            await stream.send(response)
    except APIError as err:
        if not stream.started:
            raise
        await stream.send(err.native_body())
    except ConnectionResetError:  # the client went away: abort now, answer nobody
        group.abort_unfinished()
        return stream.abandoned()
    return await stream.finish()


async def model_info(request: web.Request) -> web.Response:
    engine = request.app[STATE].engine
    template = getattr(engine.tokenizer, "chat_template", None)
    path = model_path(engine)
    return web.json_response(
        {
            "model_path": path,
            "tokenizer_path": path,
            "served_model_name": request.app[STATE].served_model_name,
            "is_generation": True,
            "chat_template": template if isinstance(template, str) else None,
            "context_length": engine.context_len,
            "vocab_size": engine.model.vocab_size,
            "eos_token_ids": sorted(engine.eos_token_ids),
            "bos_token": getattr(engine.tokenizer, "bos_token", None),
            "bos_token_id": getattr(engine.tokenizer, "bos_token_id", None),
            "eos_token": getattr(engine.tokenizer, "eos_token", None),
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "preferred_sampling_params": None,
            "weight_version": "default",
        }
    )


async def server_info(request: web.Request) -> web.Response:
    state = request.app[STATE]
    engine = state.engine
    stats = await in_executor(engine.get_stats)
    info: dict[str, Any] = dataclasses.asdict(engine.config)
    info.update(stats)
    info.update(
        version=version(),
        served_model_name=state.served_model_name,
        model_path=model_path(engine),
        context_length=engine.context_len,
        max_request_bytes=state.max_request_bytes,
        api_key_required=state.api_key is not None,
    )
    return web.json_response(info)


async def flush_cache(request: web.Request) -> web.Response:
    engine = request.app[STATE].engine
    if not await in_executor(engine.flush_cache):
        raise bad_request("cannot flush the cache while requests are running or waiting")
    return web.json_response({"success": True, "message": "Cache flushed."})


async def health(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def health_generate(request: web.Request) -> web.Response:
    """Generate one token; 200 if that works, 503 otherwise."""
    engine = request.app[STATE].engine
    try:
        ids = await tokenize(engine, [HEALTH_PROMPT])
        call = EngineCall(ids, [_one_token()], [False], [None], [0])
        async with RequestGroup(engine, call.submit(engine), request.app[STATE].active) as group:
            responses = await asyncio.wait_for(group.wait(), HEALTH_TIMEOUT_S)
        reason = responses[0]["meta_info"]["finish_reason"]
        if reason is None or reason.get("type") == "abort":
            raise RuntimeError(f"the test generation finished with {reason}")
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        raise APIError(503, f"the engine cannot generate: {type(exc).__name__}: {exc}") from None
    return web.Response(status=200)


def _one_token() -> SamplingParams:
    return SamplingParams(max_new_tokens=1, temperature=0.0)


async def abort_request(request: web.Request) -> web.Response:
    """``{"rid": "..."}``: abort that request (no effect if it already finished)."""
    engine = request.app[STATE].engine
    body = await read_json_object(request)
    rid = body.get("rid")
    if not isinstance(rid, str) or not rid:
        raise bad_request("rid must be a non-empty string", "rid")
    engine.abort(rid)
    return web.json_response({"success": True})


def add_routes(app: web.Application) -> None:
    """Register the native routes (needs ``app[STATE]``)."""
    r = app.router
    r.add_post("/generate", generate)
    for path in ("/get_model_info", "/model_info"):
        r.add_get(path, model_info)
    for path in ("/server_info", "/get_server_info"):
        r.add_get(path, server_info)
    r.add_route("POST", "/flush_cache", flush_cache)
    r.add_route("GET", "/flush_cache", flush_cache)
    r.add_get("/health", health)
    r.add_get("/health_generate", health_generate)
    r.add_post("/abort_request", abort_request)
