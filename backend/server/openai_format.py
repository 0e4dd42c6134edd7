"""OpenAI response shapes built from engine responses (``RequestHandle.response()``).

Contract:
- Completions logprobs: ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``
  where ``text_offset[j]`` indexes into the choice's ``text`` (which starts with the prompt
  under ``echo``) and each ``top_logprobs`` entry maps token text -> logprob for the top-k
  plus the sampled token (OpenAI's "up to logprobs + 1 entries").
- Chat logprobs: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}],
  "refusal": None}``; ``bytes`` are the token's raw UTF-8 bytes (a token may hold part of
  a character).
- Logprobs that are ``-inf`` (tokens a constraint forbids) are reported as ``-9999.0``, as
  OpenAI does, so every body is strict JSON.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

from backend.engine import Engine

Triple = Sequence[Any]  # (logprob, token_id, token_text)
FLOOR = -9999.0


def finite(logprob: float | None) -> float | None:
    if logprob is None:
        return None
    return logprob if math.isfinite(logprob) else FLOOR


def finish_reason(reason: dict[str, Any] | None) -> str | None:
    """The engine's finish reason as OpenAI's string."""
    if not reason:
        return None
    kind = reason.get("type")
    return kind if kind in ("stop", "length") else "abort"


class TokenBytes:
    """Raw bytes of each token id, built once per tokenizer (call :meth:`load` off the
    event loop first; :meth:`get` falls back to the UTF-8 of the token's text)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._table: list[bytes | None] | None = None
        self._lock = threading.Lock()

    def load(self) -> None:
        with self._lock:
            if self._table is None:
                from fsm import Vocabulary

                try:
                    vocab = Vocabulary.from_tokenizer(self._engine.tokenizer)
                    self._table = vocab.token_bytes
                except ValueError:  # not a fast tokenizer: use the texts
                    self._table = []

    def get(self, token_id: int, text: str) -> list[int]:
        table = self._table or []
        raw = table[token_id] if 0 <= token_id < len(table) else None
        return list(raw if raw is not None else (text or "").encode())


def _padded(tops: Sequence[Any], count: int) -> list[Any]:
    """The top-k lists, one per token (the engine sends none when k == 0)."""
    return [*tops, *([None] * (count - len(tops)))]


def completion_logprobs(
    tokens: Sequence[Triple],
    tops: Sequence[Sequence[Triple] | None],
    text_start: int = 0,
) -> dict[str, Any]:
    """OpenAI's legacy ``logprobs`` object for ``tokens`` (with their top-k lists)."""
    out: dict[str, Any] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    offset = text_start
    for (lp, _tid, text), top in zip(tokens, _padded(tops, len(tokens))):
        text = text or ""
        out["tokens"].append(text)
        out["token_logprobs"].append(finite(lp))
        if lp is None:
            out["top_logprobs"].append(None)
        else:
            entry = {t or "": finite(v) for v, _i, t in top or []}
            entry.setdefault(text, finite(lp))
            out["top_logprobs"].append(entry)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(
    tokens: Sequence[Triple], tops: Sequence[Sequence[Triple]], token_bytes: TokenBytes
) -> list[dict[str, Any]]:
    """The ``content`` list of a chat choice's ``logprobs``."""
    content = []
    for (lp, tid, text), top in zip(tokens, _padded(tops, len(tokens))):
        content.append(
            {
                "token": text or "",
                "logprob": finite(lp),
                "bytes": token_bytes.get(tid, text),
                "top_logprobs": [
                    {"token": t or "", "logprob": finite(v), "bytes": token_bytes.get(i, t)}
                    for v, i, t in top or []
                ],
            }
        )
    return content


def usage(
    prompt_lens: Sequence[int], responses: Sequence[dict[str, Any]], n: int
) -> dict[str, Any]:
    """``usage``: each prompt counted once however many samples (``n``) it had."""
    completion = sum(r["meta_info"]["completion_tokens"] for r in responses)
    cached = sum(
        responses[p * n]["meta_info"].get("cached_tokens", 0)
        for p in range(len(prompt_lens))
        if p * n < len(responses)
    )
    prompt = sum(prompt_lens)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
