"""Shared fixtures: one engine on the embedded model and its transformers twin."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_ARCHS, write_tiny_model

from backend.engine import Engine
from backend.model_loader import load_tokenizer, resolve_model_dir
from fsm import Vocabulary


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    eng = Engine(max_total_tokens=16384, chunked_prefill_size=1024)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def hf_model(engine: Engine):
    """transformers' own model on the same weights (the engine's cached safetensors)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=torch.float32)
    return model.eval()


@pytest.fixture
def idle_engine(engine: Engine) -> Iterator[Engine]:
    """The shared engine, with the KV accounting invariant checked after the test."""
    yield engine
    engine.wait_idle()
    acc = engine.check_kv_invariant()
    assert acc["protected"] == 0 and acc["owned_by_requests"] == 0
    assert acc["free"] + acc["evictable"] == acc["total"]


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random-weight checkpoints of every supported architecture, one folder each."""
    resolve_model_dir(None)  # the tokenizer they share comes from the embedded model's cache
    root = tmp_path_factory.mktemp("tiny")
    for arch in TINY_ARCHS:
        write_tiny_model(root / arch, arch)
    return root


@pytest.fixture(scope="session")
def tok():
    """The embedded model's tokenizer."""
    return load_tokenizer(resolve_model_dir(None))


@pytest.fixture(scope="session")
def vocab(tok) -> Vocabulary:
    """The constrained decoder's view of the embedded tokenizer."""
    return Vocabulary.from_tokenizer(tok)
