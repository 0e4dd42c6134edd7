"""Tiny random-weight Hugging Face model folders for tests.

``write_tiny_model(dir, arch)`` writes ``config.json`` + ``model.safetensors`` with
transformers' own model classes (``save_pretrained``) and the SmolLM2 tokenizer copied from
the embedded model's cache folder (vocab 49152). Weights are seeded and drawn with a large
std so that logits are peaky and greedy decoding is not decided by float noise; norm weights
and biases are randomized too so that every parameter matters.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import transformers

from backend.model_loader import resolve_model_dir

TINY_ARCHS: tuple[str, ...] = ("llama", "qwen2", "qwen3", "mistral")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

_COMMON: dict[str, Any] = {
    "vocab_size": 49152,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.2,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}

_CONFIGS: dict[str, tuple[type[transformers.PretrainedConfig], dict[str, Any]]] = {
    # Llama 3 style RoPE scaling, bias on every attention projection and on the MLP, untied.
    "llama": (
        transformers.LlamaConfig,
        {
            "num_hidden_layers": 3,
            "attention_bias": True,
            "mlp_bias": True,
            "tie_word_embeddings": False,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    # q/k/v bias (built in), tied embeddings, YaRN RoPE (attention scaling != 1).
    "qwen2": (
        transformers.Qwen2Config,
        {
            "num_hidden_layers": 2,
            "tie_word_embeddings": True,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 128,
            },
        },
    ),
    # q/k norm, attention_bias, head_dim (32) != hidden / heads (16), untied.
    "qwen3": (
        transformers.Qwen3Config,
        {
            "num_hidden_layers": 3,
            "head_dim": 32,
            "attention_bias": True,
            "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        },
    ),
    # Linear RoPE scaling, a sliding window longer than any test context.
    "mistral": (
        transformers.MistralConfig,
        {
            "num_hidden_layers": 2,
            "sliding_window": 256,
            "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        },
    ),
}


def tiny_config(arch: str) -> transformers.PretrainedConfig:
    """The config of the tiny model for ``arch`` (one of ``TINY_ARCHS``)."""
    if arch not in _CONFIGS:
        raise ValueError(f"unknown tiny arch {arch!r}; expected one of {TINY_ARCHS}")
    cls, extra = _CONFIGS[arch]
    return cls(**_COMMON, **extra)


def write_tiny_model(
    directory: str | Path, arch: str, seed: int = 0, tokenizer_dir: str | Path | None = None
) -> Path:
    """Write a tiny random ``arch`` model folder into ``directory`` and return its path.

    The tokenizer files come from ``tokenizer_dir`` (default: the embedded model's folder).
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_config(arch)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
            elif name.endswith(".bias"):
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(out)
    tokenizer_src = Path(tokenizer_dir) if tokenizer_dir else resolve_model_dir(None)
    for name in _TOKENIZER_FILES:
        if (tokenizer_src / name).is_file():
            shutil.copyfile(tokenizer_src / name, out / name)
    return out
