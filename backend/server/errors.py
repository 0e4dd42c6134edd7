"""HTTP errors of the server and their two JSON shapes.

Contract:
- Handlers raise :class:`APIError` for anything the client did wrong (or a refused
  feature); the error middleware in :mod:`backend.server.app` renders it.
- Native (SGLang) routes answer ``{"error": {"message", "type", "param", "code": <status>}}``.
- OpenAI routes (``/v1/...``) answer OpenAI's shape ``{"error": {"message", "type", "param",
  "code"}}`` where ``code`` is a string or null, so the ``openai`` package raises the
  exception class of the status (400 -> ``BadRequestError``, 401 -> ``AuthenticationError``).
"""

from __future__ import annotations

from typing import Any

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error answered as JSON with HTTP ``status``; ``message`` names the problem."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")

    def native_body(self) -> dict[str, Any]:
        """SGLang-style body: the HTTP status as ``code``."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.status,
            }
        }

    def openai_body(self) -> dict[str, Any]:
        """OpenAI's error body: ``code`` is a short string or null."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 naming the problem (and the offending field in ``param``)."""
    return APIError(400, message, param=param, code=code)


def is_constraint_error(finish_reason: dict[str, Any] | None) -> bool:
    """True for the engine's asynchronous "invalid constraint: ..." abort of a request."""
    return (
        isinstance(finish_reason, dict)
        and finish_reason.get("type") == "abort"
        and str(finish_reason.get("message", "")).startswith("invalid constraint")
    )


def error_for_abort(finish_reason: dict[str, Any] | None) -> APIError | None:
    """The HTTP error a request's abort stands for: 400 for an invalid constraint, 500 for an
    engine or constraint-compiler failure; None for other finishes (including an abort
    asked for by a client)."""
    if not isinstance(finish_reason, dict) or finish_reason.get("type") != "abort":
        return None
    message = str(finish_reason.get("message", "aborted"))
    if is_constraint_error(finish_reason):
        return bad_request(message, code="invalid_constraint")
    if message.startswith(("internal error", "constraint compilation failed")):
        return APIError(500, message)
    return None
