"""Model implementations, keyed by the ``model_type`` of a Hugging Face ``config.json``."""

from __future__ import annotations

from backend.models.llama import CausalLM

MODEL_REGISTRY: dict[str, type[CausalLM]] = {
    "llama": CausalLM,
    "mistral": CausalLM,
    "qwen2": CausalLM,
    "qwen3": CausalLM,
}

__all__ = ["MODEL_REGISTRY", "CausalLM"]
