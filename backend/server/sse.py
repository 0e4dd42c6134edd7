"""Server-sent events: ``data: <json>\\n\\n`` frames, ending with ``data: [DONE]\\n\\n``.

Contract:
- :class:`EventStream` prepares the HTTP response lazily, on the first :meth:`send`, so a
  handler can still answer an ordinary JSON error (e.g. a 400 for an invalid constraint)
  until the first event is due; :attr:`started` says whether headers went out.
- Each event is written with one ``write`` (clients that read whole chunks see whole events).
- A client that went away makes ``send`` raise ``ConnectionResetError``; the caller lets it
  propagate out of its ``RequestGroup`` so the engine requests are aborted.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

DONE = b"data: [DONE]\n\n"


def encode_event(payload: Any) -> bytes:
    """One SSE frame holding ``payload`` as JSON."""
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


class EventStream:
    """An SSE response to one request."""

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.response: web.StreamResponse | None = None

    @property
    def started(self) -> bool:
        return self.response is not None

    async def _open(self) -> web.StreamResponse:
        if self.response is None:
            response = web.StreamResponse(
                status=200,
                headers={
                    "Content-Type": "text/event-stream; charset=utf-8",
                    "Cache-Control": "no-cache",
                    "X-Accel-Buffering": "no",
                },
            )
            await response.prepare(self._request)
            self.response = response
        return self.response

    async def send(self, payload: Any) -> None:
        response = await self._open()
        await response.write(encode_event(payload))

    def abandoned(self) -> web.StreamResponse:
        """What a handler returns once the client has gone (nothing more is sent)."""
        return self.response if self.response is not None else web.Response(status=204)

    async def finish(self) -> web.StreamResponse:
        """Write ``[DONE]`` and end the body."""
        response = await self._open()
        await response.write(DONE)
        await response.write_eof()
        return response
