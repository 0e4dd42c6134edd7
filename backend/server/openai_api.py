"""OpenAI-compatible routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Contract:
- Bodies are shaped exactly like OpenAI's, so the ``openai`` package parses them; errors use
  OpenAI's error body (rendered by the middleware from :class:`APIError`).
- Choices are prompt-major: choice ``i`` is sample ``i % n`` of prompt ``i // n``.
- Streaming: ``data: <chunk>`` events, a chat choice's first chunk carries
  ``{"role": "assistant", "content": ""}``, each choice ends with a chunk holding its
  ``finish_reason``; ``stream_options.include_usage`` adds ``"usage": null`` to every chunk
  and a last chunk with empty ``choices`` and the usage; then ``data: [DONE]``. An error
  known before the first event (e.g. an invalid constraint) is an ordinary HTTP error; a
  later one is sent as a ``data: {"error": ...}`` event.
- A client that disconnects aborts its requests (see :class:`RequestGroup`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from aiohttp import web

from backend.engine import RequestHandle
from backend.server.bridge import RequestGroup
from backend.server.errors import APIError, error_for_abort
from backend.server.openai_format import (
    TokenBytes,
    chat_logprobs,
    completion_logprobs,
    finish_reason,
    usage,
)
from backend.server.openai_protocol import OpenAIRequest, parse_chat, parse_completion, prepare
from backend.server.protocol import read_json_object
from backend.server.sse import EventStream
from backend.server.state import STATE, ServerState, model_path

TOKEN_BYTES: web.AppKey[TokenBytes] = web.AppKey("sgl_dsl_token_bytes", TokenBytes)


def _raise_on_abort(handle: RequestHandle) -> None:
    err = error_for_abort(handle.response()["meta_info"]["finish_reason"])
    if err is not None:
        raise err


class _Reply:
    """Builds the response bodies of one OpenAI request."""

    def __init__(self, request: web.Request, req: OpenAIRequest) -> None:
        self.state: ServerState = request.app[STATE]
        self.token_bytes = request.app[TOKEN_BYTES]
        self.req = req
        prefix = "chatcmpl-" if req.chat else "cmpl-"
        self.id = prefix + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if req.chat else "text_completion"

    def envelope(self, chunk: bool = False) -> dict[str, Any]:
        kind = self.object + (".chunk" if chunk and self.req.chat else "")
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.state.served_model_name,
            "system_fingerprint": None,
        }

    def usage(self, responses: list[dict[str, Any]]) -> dict[str, Any]:
        lens = [len(ids) for ids in self.req.call.token_lists]
        return usage(lens, responses, self.req.n)

    def logprobs(
        self, meta: dict[str, Any], start: int, first: bool, text_start: int = 0
    ) -> dict[str, Any] | None:
        """Logprobs of the output tokens from ``start`` on (plus the prompt's, for a
        completion's first piece under ``echo``); a completion's ``text_offset`` counts
        from ``text_start`` (the length of the choice's text sent before)."""
        if self.req.logprobs is None:
            return None
        tokens = meta["output_token_logprobs"][start:]
        tops = meta["output_top_logprobs"][start:]
        if self.req.chat:
            return {"content": chat_logprobs(tokens, tops, self.token_bytes), "refusal": None}
        if first and self.req.echo:
            tokens = meta["input_token_logprobs"] + tokens
            tops = meta["input_top_logprobs"] + tops
        return completion_logprobs(tokens, tops, text_start)

    def echo_text(self, i: int) -> str:
        return self.req.prompt_texts[i // self.req.n] if self.req.echo else ""

    def body(self, responses: list[dict[str, Any]]) -> dict[str, Any]:
        choices = []
        for i, r in enumerate(responses):
            meta = r["meta_info"]
            reason = finish_reason(meta["finish_reason"])
            logprobs = self.logprobs(meta, 0, True)
            if self.req.chat:
                message = {"role": "assistant", "content": r["text"], "refusal": None}
                choices.append(
                    {"index": i, "message": message, "logprobs": logprobs, "finish_reason": reason}
                )
            else:
                text = self.echo_text(i) + r["text"]
                choices.append(
                    {"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}
                )
        return {**self.envelope(), "choices": choices, "usage": self.usage(responses)}

    def chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        out = {**self.envelope(chunk=True), "choices": choices}
        if self.req.include_usage:
            out["usage"] = None
        return out

    def piece(
        self, i: int, text: str | None, logprobs: Any, reason: str | None, role: bool = False
    ) -> dict[str, Any]:
        if not self.req.chat:
            return {"index": i, "text": text or "", "logprobs": logprobs, "finish_reason": reason}
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        return {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}


async def _serve(request: web.Request, req: OpenAIRequest) -> web.StreamResponse:
    engine = request.app[STATE].engine
    await prepare(req, engine)
    reply = _Reply(request, req)
    if req.logprobs is not None and req.chat:
        await asyncio.get_running_loop().run_in_executor(None, reply.token_bytes.load)
    handles = req.call.submit(engine)
    async with RequestGroup(engine, handles, request.app[STATE].active) as group:
        if req.stream:
            return await _stream(request, reply, group)
        responses = await group.wait(check=_raise_on_abort)
    return web.json_response(reply.body(responses))


async def _stream(request: web.Request, reply: _Reply, group: RequestGroup) -> web.StreamResponse:
    stream = EventStream(request)
    count = len(group.handles)
    sent_text, sent_tokens = [0] * count, [0] * count
    opened = [False] * count
    try:
        async for changed in group.updates():
            for i in changed:
                h = group.handles[i]
                response = h.response() if h.finished or reply.req.logprobs is not None else None
                if h.finished:
                    assert response is not None
                    err = error_for_abort(response["meta_info"]["finish_reason"])
                    if err is not None:
                        raise err
                before = sent_text[i] + len(reply.echo_text(i)) if opened[i] else 0
                delta, sent_text[i] = h.text[sent_text[i] :], len(h.text)
                logprobs = None
                if response is not None and len(h.output_ids) > sent_tokens[i]:
                    meta = response["meta_info"]
                    logprobs = reply.logprobs(meta, sent_tokens[i], False, before)
                    sent_tokens[i] = len(h.output_ids)
                reason = (
                    finish_reason(response["meta_info"]["finish_reason"]) if h.finished else None
                )
                pieces = []
                if reply.req.chat:
                    if not opened[i]:
                        pieces.append(reply.piece(i, "", None, None, role=True))
                    if delta or logprobs:
                        pieces.append(reply.piece(i, delta, logprobs, None))
                    if reason:
                        pieces.append(reply.piece(i, None, None, reason))
                else:
                    if not opened[i]:
                        delta = reply.echo_text(i) + delta
                    if delta or logprobs or reason:
                        pieces.append(reply.piece(i, delta, logprobs, reason))
                opened[i] = True
                for piece in pieces:
                    await stream.send(reply.chunk([piece]))
        if reply.req.include_usage:
            responses = [h.response() for h in group.handles]
            await stream.send(
                {**reply.envelope(chunk=True), "choices": [], "usage": reply.usage(responses)}
            )
    except APIError as err:
        if not stream.started:
            raise
        await stream.send(err.openai_body())
    except ConnectionResetError:
        group.abort_unfinished()
        return stream.abandoned()
    return await stream.finish()


async def completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await read_json_object(request)
    return await _serve(request, parse_completion(body, state.engine))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await read_json_object(request)
    return await _serve(request, parse_chat(body, state.engine))


def _model_card(state: ServerState) -> dict[str, Any]:
    return {
        "id": state.served_model_name,
        "object": "model",
        "created": int(state.started_at),
        "owned_by": "sgl-dsl",
        "root": model_path(state.engine),
        "max_model_len": state.engine.context_len,
    }


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response({"object": "list", "data": [_model_card(state)]})


async def get_model(request: web.Request) -> web.Response:
    state = request.app[STATE]
    name = request.match_info["model"]
    if name != state.served_model_name:
        raise APIError(
            404, f"the model {name!r} does not exist", param="model", code="model_not_found"
        )
    return web.json_response(_model_card(state))


def add_routes(app: web.Application) -> None:
    """Register the OpenAI routes (needs ``app[STATE]``)."""
    app[TOKEN_BYTES] = TokenBytes(app[STATE].engine)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
