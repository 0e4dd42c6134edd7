"""sgl-dsl: structured-generation programs in Python, with a local inference engine.

``import sgl_dsl as sgl`` gives the names of ``import sglang as sgl`` (the frontend language).
"""

from sgl_dsl.api import (
    assistant,
    assistant_begin,
    assistant_end,
    flush_cache,
    function,
    gen,
    gen_int,
    gen_string,
    get_server_info,
    image,
    select,
    separate_reasoning,
    set_default_backend,
    system,
    system_begin,
    system_end,
    user,
    user_begin,
    user_end,
    video,
)
from sgl_dsl.backends.base import BaseBackend
from sgl_dsl.backends.openai import OpenAI
from sgl_dsl.backends.runtime_endpoint import RuntimeEndpoint
from sgl_dsl.choices import (
    greedy_token_selection,
    token_length_normalized,
    unconditional_likelihood_normalized,
)
from sgl_dsl.global_config import global_config
from sgl_dsl.runtime import Runtime
from sgl_dsl.state import ProgramState

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``sgl.Engine`` is imported on first use, so remote-only programs never load torch."""
    if name == "Engine":
        from backend.engine import Engine

        return Engine
    raise AttributeError(f"module 'sgl_dsl' has no attribute {name!r}")


__all__ = [
    "BaseBackend",
    "Engine",
    "OpenAI",
    "ProgramState",
    "Runtime",
    "RuntimeEndpoint",
    "__version__",
    "assistant",
    "assistant_begin",
    "assistant_end",
    "flush_cache",
    "function",
    "gen",
    "gen_int",
    "gen_string",
    "get_server_info",
    "global_config",
    "greedy_token_selection",
    "image",
    "select",
    "separate_reasoning",
    "set_default_backend",
    "system",
    "system_begin",
    "system_end",
    "token_length_normalized",
    "unconditional_likelihood_normalized",
    "user",
    "user_begin",
    "user_end",
    "video",
]
