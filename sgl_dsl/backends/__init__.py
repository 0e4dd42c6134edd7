"""Backends: the in-process engine, SGLang-native HTTP servers, OpenAI-compatible servers."""

from __future__ import annotations

from typing import Any

from sgl_dsl.backends.base import BaseBackend


def as_backend(obj: Any) -> BaseBackend:
    """The backend behind ``obj``: a backend, an in-process ``Engine`` (wrapped once and
    remembered on it), or anything with an ``.endpoint`` (a ``Runtime``)."""
    if isinstance(obj, BaseBackend):
        return obj
    if hasattr(obj, "endpoint"):
        return as_backend(obj.endpoint)
    from backend.engine import Engine

    if isinstance(obj, Engine):
        wrapped = getattr(obj, "_sgl_backend", None)
        if wrapped is None:
            from sgl_dsl.backends.local import LocalBackend

            wrapped = obj._sgl_backend = LocalBackend(obj)
        return wrapped
    raise TypeError(f"not a backend: {type(obj).__name__}")


__all__ = ["BaseBackend", "as_backend"]
