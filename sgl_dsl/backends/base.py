"""The interface every backend implements: the interpreter awaits these on the runtime loop.

Contract:
- Coroutine methods run on the runtime loop and must never block it: local work is cheap,
  network and engine waits are awaited.
- ``generate`` returns ``(text, meta_info)``, or lists of both when ``sampling_params.n > 1``.
- ``select`` returns a :class:`~sgl_dsl.choices.ChoicesDecision` from log-probabilities that
  contain no ``None``.
- Blocking helpers (``flush_cache``, ``get_server_info``) are called from user threads.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from sgl_dsl.chat_template import ChatTemplate, get_chat_template
from sgl_dsl.choices import ChoicesDecision, ChoicesSamplingMethod

if TYPE_CHECKING:
    from sgl_dsl.interpreter import StreamExecutor
    from sgl_dsl.ir import SglExpr, SglSamplingParams


class BaseBackend(ABC):
    is_chat_model = False
    support_concate_and_append = False

    def __init__(self) -> None:
        self.chat_template: ChatTemplate = get_chat_template("default")

    @abstractmethod
    def get_model_name(self) -> str:
        """The served model's name (for messages and for guessing a chat template)."""

    def get_chat_template(self) -> ChatTemplate:
        return self.chat_template

    @abstractmethod
    async def generate(
        self, s: StreamExecutor, sampling_params: SglSamplingParams
    ) -> tuple[str | list[str], dict[str, Any] | list[dict[str, Any]]]:
        """Generate after ``s.text_`` (or its messages); lists when ``n > 1``."""

    @abstractmethod
    def generate_stream(
        self, s: StreamExecutor, sampling_params: SglSamplingParams
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Yield ``(new_text, meta_info_so_far)`` as the generation proceeds."""

    @abstractmethod
    async def select(
        self,
        s: StreamExecutor,
        choices: list[str],
        temperature: float,
        choices_method: ChoicesSamplingMethod,
    ) -> ChoicesDecision:
        """Pick one of ``choices`` after ``s.text_``."""

    async def fill_image(self, s: StreamExecutor, expr: SglExpr) -> None:
        """Append an image or video to the state; text-only backends refuse."""
        raise ValueError(
            f"{self.get_model_name()} is a text-only model: "
            "image() and video() need a vision-language model"
        )

    async def commit_lazy_operations(self, s: StreamExecutor) -> None:  # noqa: B027 (optional hook)
        """Send the state's text as a prefill-only request so later requests hit the cache."""

    async def cache_prefix(self, prefix: str) -> None:  # noqa: B027 (optional hook)
        """Prefill ``prefix`` into the backend's prefix cache (no-op where there is none)."""

    async def role_end_generate(self, s: StreamExecutor) -> list[tuple[str, str | None]]:
        """Run the generations deferred to the end of an assistant turn (API speculative
        execution); returns the turn's pieces of text, each with the variable it fills."""
        return []

    def end_program(self, s: StreamExecutor) -> None:  # noqa: B027 (optional hook)
        """Called once a program has submitted its last expression."""

    def flush_cache(self) -> bool:
        return False

    def get_server_info(self) -> dict[str, Any]:
        return {}

    def shutdown(self) -> None:  # noqa: B027 (optional hook)
        """Release what the backend holds (threads, connections, subprocesses)."""
