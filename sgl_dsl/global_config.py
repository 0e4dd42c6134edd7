"""Process-wide settings of the language (SGLang's ``global_config``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class GlobalConfig:
    default_backend: Any = None
    verbosity: int = 0
    # Before a run_batch of more than one program, trace it and prefill its constant prefix once.
    enable_precache_with_tracing: bool = True
    # Shorter constant prefixes are not worth a separate prefill request.
    min_precache_chars: int = 64


global_config = GlobalConfig()
