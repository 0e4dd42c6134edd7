"""Engine options added for the GPU path that also work (and are tested) on the CPU:
random (dummy) weights, padded vocabularies, fused projections, KV pool sizing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_config, write_tiny_model

from backend.config import EngineConfig
from backend.engine import Engine
from backend.kv_pool import CPU_DEFAULT_SLOTS
from backend.model_loader import load_model
from backend.models.llama import Rotary


def padded_vocab_dir(tiny_root: Path, tmp_path: Path, extra: int) -> Path:
    """A config-only model folder: the tiny Llama with ``extra`` embedding rows past the
    tokenizer's vocabulary (as some checkpoints pad theirs)."""
    out = tmp_path / "padded"
    out.mkdir()
    config = tiny_config("llama").to_dict()
    config["vocab_size"] += extra
    (out / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_root / "llama" / name).is_file():
            shutil.copyfile(tiny_root / "llama" / name, out / name)
    return out


def test_dummy_weights_and_padded_vocab_ids_are_never_sampled(
    tiny_root: Path, tmp_path: Path
) -> None:
    """Random weights give near-uniform logits, so without the ban ~5% of the sampled
    tokens would be padding ids (1,600 draws: missing them all has probability e^-10)."""
    extra = 320
    folder = padded_vocab_dir(tiny_root, tmp_path, extra)
    with Engine(str(folder), load_format="dummy", max_total_tokens=4096) as eng:
        assert eng.model.vocab_size == len(eng.tokenizer) + extra
        params = {"temperature": 1.0, "max_new_tokens": 200, "ignore_eos": True}
        out = eng.generate(["a", "b", "c", "d", "e", "f", "g", "h"], params)
        ids = [t for r in out for t in r["output_ids"]]
        assert len(ids) == 1600
        assert max(ids) < len(eng.tokenizer)
        eng.wait_idle()
        eng.check_kv_invariant()


def test_dummy_load_ignores_checkpoint_weights(tiny_root: Path) -> None:
    real = load_model(tiny_root / "llama")
    dummy = load_model(tiny_root / "llama", load_format="dummy")
    w_real, w_dummy = real.lm_head.weight, dummy.lm_head.weight
    assert w_real.shape == w_dummy.shape and not torch.equal(w_real, w_dummy)
    assert float(w_dummy.abs().max()) <= 0.05
    assert torch.equal(dummy.model.norm.weight, torch.ones_like(dummy.model.norm.weight))
    with pytest.raises(ValueError, match="load_format"):
        load_model(tiny_root / "llama", load_format="npz")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_fused_projections_compute_the_same(tmp_path: Path, tiny_root: Path, arch: str) -> None:
    """q/k/v and gate/up fused into one GEMM each: same outputs (biases and RoPE included),
    and the separate weights become views of the fused ones (no extra memory)."""
    folder = tiny_root / arch if (tiny_root / arch).is_dir() else write_tiny_model(tmp_path, arch)
    plain, fused = load_model(folder), load_model(folder)
    fused.fuse_projections()
    x = torch.randn(7, plain.config.hidden_size, generator=torch.Generator().manual_seed(0))
    rotary = Rotary(plain.rope_cos, plain.rope_sin, torch.arange(3, 10))
    for a, b in zip(plain.model.layers, fused.model.layers):
        # fused: one RoPE call over the neighbouring q and k heads (but for Qwen3's q/k norms)
        for p, q in zip(a.self_attn._project_qkv(x, rotary), b.self_attn._project_qkv(x, rotary)):
            torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.mlp(x), b.mlp(x), atol=1e-5, rtol=1e-5)
        attn = b.self_attn
        assert attn.q_proj.weight.data_ptr() == attn.qkv_weight.data_ptr()
        assert b.mlp.up_proj.weight.untyped_storage().data_ptr() == (
            b.mlp.gate_up_weight.untyped_storage().data_ptr()
        )


def test_kv_pool_size_defaults_on_cpu(tiny_root: Path) -> None:
    with Engine(str(tiny_root / "llama")) as eng:
        assert eng.config.max_total_tokens == CPU_DEFAULT_SLOTS == eng.pool.num_slots
        assert eng.scheduler.runner.graphs is None


def test_prefill_chunk_defaults_per_device() -> None:
    assert EngineConfig().chunked_prefill_size == 2048
    assert EngineConfig(device="cuda").chunked_prefill_size == 8192
    assert EngineConfig(device="cuda:1", chunked_prefill_size=512).chunked_prefill_size == 512
    with pytest.raises(ValueError, match="chunked_prefill_size"):
        EngineConfig(chunked_prefill_size=0)


def test_prefill_graph_token_counts() -> None:
    from backend.prefill_graph_runner import prefill_capture_sizes

    assert prefill_capture_sizes(512) == [16, 32, 64, 128, 256, 512]
    assert prefill_capture_sizes(100) == [16, 32, 64, 100]
    assert prefill_capture_sizes(8) == [8]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mem_fraction_static": 1.5}, "mem_fraction_static"),
        ({"mem_fraction_static": 0}, "mem_fraction_static"),
        ({"load_format": "pt"}, "load_format"),
        ({"max_total_tokens": 0}, "max_total_tokens"),
        ({"cuda_graph_max_bs": -1}, "cuda_graph_max_bs"),
        ({"cuda_graph_max_prefill_tokens": -1}, "cuda_graph_max_prefill_tokens"),
        ({"cuda_graph_max_prefill_tokens": 1.5}, "cuda_graph_max_prefill_tokens"),
        ({"kv_cache_dtype": "fp8", "device": "cuda"}, "kv_cache_dtype must be one of"),
        ({"kv_cache_dtype": "fp8_e4m3"}, "needs a CUDA device"),
    ],
)
def test_bad_gpu_options_are_rejected(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig(**options)


def test_fp8_kv_cache_needs_compute_capability_8_9(monkeypatch: pytest.MonkeyPatch) -> None:
    """Float8 KV is refused before any kernel compiles on GPUs Triton has no float8 for."""
    from backend.kv_pool import kv_cache_dtype

    cuda = torch.device("cuda")
    assert kv_cache_dtype("auto", torch.bfloat16, cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match=r"compute capability 8.9 or newer.*A100 is 8.0"):
        kv_cache_dtype("fp8_e4m3", torch.bfloat16, cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert kv_cache_dtype("fp8_e4m3", torch.bfloat16, cuda) == torch.float8_e4m3fn
