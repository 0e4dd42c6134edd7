"""Our model + torch attention backend against transformers, and the model loader.

Every logits comparison runs our ``CausalLM`` over hand-built ``ForwardBatch`` objects (KV in
a ``KVPool`` at shuffled, non-contiguous slots) and transformers' model on the full
sequences, in float32.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tiny_models import TINY_ARCHS

from backend.attention.torch_backend import MIN_SHARED_PREFIX, TorchAttentionBackend
from backend.forward_batch import ForwardBatch, ForwardMode
from backend.kv_pool import KVPool
from backend.model_loader import (
    SUPPORTED_MODEL_TYPES,
    embedded_gguf_path,
    load_model,
    load_tokenizer,
    resolve_model_dir,
)
from backend.models.llama import CausalLM

# Float32 through 30 layers with other GEMM kernels (oneDNN, our GEMV) than transformers'
# (MKL): logits agree to a few 1e-4, and the greedy tokens exactly.
ATOL = 1e-3
RTOL = 1e-4
MODELS = ("smollm", *TINY_ARCHS)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a small shared CPU, multi-threaded GEMMs slow down badly as
    soon as other processes compete for the cores (measured 3x on 2 cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    return resolve_model_dir(None)


@dataclass
class Pair:
    name: str
    ours: CausalLM
    hf: transformers.PreTrainedModel


@pytest.fixture(scope="module", params=MODELS)
def pair(request: pytest.FixtureRequest, smol_dir: Path, tiny_root: Path) -> Iterator[Pair]:
    name = request.param
    model_dir = smol_dir if name == "smollm" else tiny_root / name
    ours = load_model(model_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    yield Pair(name, ours, hf.eval())


def hf_logits(hf: transformers.PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=ids[None]).logits[0].float()


class Runner:
    """Drives our model over hand-built batches; slots come from a shuffled pool order."""

    def __init__(self, model: CausalLM, num_slots: int = 512, seed: int = 0) -> None:
        self.model = model
        self.pool = KVPool(
            num_slots, model.num_layers, model.num_kv_heads, model.head_dim, torch.float32
        )
        self.backend = TorchAttentionBackend(self.pool)
        slots = self.pool.alloc(num_slots)
        assert slots is not None
        order = torch.randperm(num_slots, generator=torch.Generator().manual_seed(seed))
        self._free = slots[order].tolist()

    def take(self, n: int) -> torch.Tensor:
        taken, self._free = self._free[:n], self._free[n:]
        return torch.tensor(taken, dtype=torch.int64)

    def forward(
        self,
        mode: ForwardMode,
        new_tokens: list[torch.Tensor],
        kv_slots: list[torch.Tensor],
    ) -> torch.Tensor:
        """Run one batch; ``kv_slots[i]`` already holds the slots of the new tokens too."""
        extend_lens = [int(t.numel()) for t in new_tokens]
        prefix_lens = [int(s.numel()) - e for s, e in zip(kv_slots, extend_lens, strict=True)]
        batch = ForwardBatch(
            mode=mode,
            input_ids=torch.cat(new_tokens),
            positions=torch.cat(
                [torch.arange(p, p + e) for p, e in zip(prefix_lens, extend_lens, strict=True)]
            ),
            out_cache_loc=torch.cat([s[p:] for s, p in zip(kv_slots, prefix_lens, strict=True)]),
            prefix_lens=prefix_lens,
            extend_lens=extend_lens,
            kv_slots=kv_slots,
            attn_backend=self.backend,
        )
        hidden = self.model.forward(batch)
        assert hidden.shape == (sum(extend_lens), self.model.config.hidden_size)
        return self.model.compute_logits(hidden)


def random_ids(lengths: list[int], vocab: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.dtype == torch.float32
    diff = (ours - ref).abs().max().item()
    assert torch.allclose(ours, ref, atol=ATOL, rtol=RTOL), f"{what}: max abs diff {diff:.3g}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1)), f"{what}: greedy tokens differ"


def test_extend_batch_matches_transformers(pair: Pair) -> None:
    """(a) Several prompts of different lengths in one EXTEND forward."""
    runner = Runner(pair.ours)
    prompts = random_ids([5, 17, 1, 30, 9], pair.ours.vocab_size, seed=1)
    slots = [runner.take(len(p)) for p in prompts]
    logits = runner.forward(ForwardMode.EXTEND, prompts, slots)
    ref = torch.cat([hf_logits(pair.hf, p) for p in prompts])
    assert_close(logits, ref, f"{pair.name} batched extend")


def test_chunked_prefill_matches_transformers(pair: Pair) -> None:
    """(b) A prompt prefilled in two chunks, the second over its cached prefix in the pool,
    batched with a fresh prompt and with another request that continues a prefix."""
    runner = Runner(pair.ours, seed=2)
    long, other, fresh = random_ids([41, 12, 8], pair.ours.vocab_size, seed=2)
    split, other_split = 23, 5
    long_slots, other_slots = runner.take(len(long)), runner.take(len(other))
    first = runner.forward(
        ForwardMode.EXTEND,
        [long[:split], other[:other_split]],
        [long_slots[:split], other_slots[:other_split]],
    )
    fresh_slots = runner.take(len(fresh))
    second = runner.forward(
        ForwardMode.EXTEND,
        [long[split:], fresh, other[other_split:]],
        [long_slots, fresh_slots, other_slots],
    )
    ref_long, ref_other = hf_logits(pair.hf, long), hf_logits(pair.hf, other)
    assert_close(first, torch.cat([ref_long[:split], ref_other[:other_split]]), "first chunk")
    ref = torch.cat([ref_long[split:], hf_logits(pair.hf, fresh), ref_other[other_split:]])
    assert_close(second, ref, f"{pair.name} second chunk over cached prefix")


def test_decode_matches_transformers(pair: Pair) -> None:
    """(c) DECODE steps for a batch of requests of different lengths, KV read from the pool."""
    runner = Runner(pair.ours, seed=3)
    steps = 6
    seqs = random_ids([7, 19, 12], pair.ours.vocab_size, seed=3)
    prompt_lens = [len(s) - steps for s in seqs]
    slots = [runner.take(n) for n in prompt_lens]
    runner.forward(
        ForwardMode.EXTEND, [s[:n] for s, n in zip(seqs, prompt_lens, strict=True)], slots
    )
    refs = [hf_logits(pair.hf, s) for s in seqs]
    for step in range(steps):
        slots = [torch.cat([s, runner.take(1)]) for s in slots]
        pos = [n + step for n in prompt_lens]
        tokens = [s[p : p + 1] for s, p in zip(seqs, pos, strict=True)]
        logits = runner.forward(ForwardMode.DECODE, tokens, slots)
        ref = torch.stack([r[p] for r, p in zip(refs, pos, strict=True)])
        assert_close(logits, ref, f"{pair.name} decode step {step}")


def test_decode_single_request_and_equal_lengths(pair: Pair) -> None:
    """Batch-1 decode and a decode batch without padding (equal lengths) take no mask."""
    runner = Runner(pair.ours, seed=4)
    seqs = random_ids([10, 10], pair.ours.vocab_size, seed=4)
    ref = [hf_logits(pair.hf, s) for s in seqs]
    slots = [runner.take(9), runner.take(9)]
    runner.forward(ForwardMode.EXTEND, [s[:9] for s in seqs], slots)
    slots = [torch.cat([s, runner.take(1)]) for s in slots]
    both = runner.forward(ForwardMode.DECODE, [s[9:] for s in seqs], slots)
    assert_close(both, torch.stack([r[9] for r in ref]), "equal-length decode")
    one = runner.forward(ForwardMode.DECODE, [seqs[0][9:]], slots[:1])  # recompute in place
    assert_close(one, ref[0][9:], "batch-1 decode")


def test_decode_over_shared_prefix_matches_transformers(pair: Pair) -> None:
    """Requests whose KV starts with the same slots (a radix-cache prefix) take the
    shared-prefix decode path; a request with its own copy of the prefix does not."""
    runner = Runner(pair.ours, seed=5)
    prefix = random_ids([MIN_SHARED_PREFIX + 9], pair.ours.vocab_size, seed=5)[0]
    tails = random_ids([3, 1, 6, 2], pair.ours.vocab_size, seed=6)
    seqs = [torch.cat([prefix, t]) for t in tails]
    prefix_slots = runner.take(len(prefix))
    runner.forward(ForwardMode.EXTEND, [prefix], [prefix_slots])
    slots = [torch.cat([prefix_slots, runner.take(len(t))]) for t in tails[:3]]
    own = runner.take(len(seqs[3]))  # the last request holds a private copy of the prefix
    runner.forward(
        ForwardMode.EXTEND,
        [t[:-1] for t in tails[:3]] + [seqs[3][:-1]],
        [s[:-1] for s in slots] + [own[:-1]],
    )
    slots.append(own)
    logits = runner.forward(ForwardMode.DECODE, [s[-1:] for s in seqs], slots)
    ref = torch.stack([hf_logits(pair.hf, s)[-1] for s in seqs])
    assert_close(logits, ref, f"{pair.name} shared-prefix decode")


def test_embedded_model_resolves_to_cache(smol_dir: Path) -> None:
    start = time.perf_counter()
    again = resolve_model_dir(None)
    assert time.perf_counter() - start < 1.0
    assert again == smol_dir
    assert str(smol_dir.name).startswith(embedded_gguf_path().stem)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (smol_dir / name).is_file(), name
    config = json.loads((smol_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert "chat_template" in json.loads((smol_dir / "tokenizer_config.json").read_text())
    assert resolve_model_dir(embedded_gguf_path()) == smol_dir
    tokenizer = load_tokenizer(smol_dir)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nHi<|im_end|>" in text and len(tokenizer) == 49152


def test_embedded_weights_equal_gguf_dequantized(smol_dir: Path) -> None:
    """Our loaded weights equal what transformers dequantizes from the GGUF itself."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    ours = load_model(smol_dir)
    config = transformers.AutoConfig.from_pretrained(smol_dir)
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    gguf = load_gguf_checkpoint(str(embedded_gguf_path()), True, skeleton)["tensors"]
    state = ours.state_dict()
    assert set(gguf) == set(state) - {"lm_head.weight"}
    for name, tensor in gguf.items():
        assert torch.allclose(state[name], tensor.float(), atol=0, rtol=0), name
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_model_attributes(smol_dir: Path) -> None:
    model = load_model(smol_dir)
    assert (model.num_layers, model.num_kv_heads, model.head_dim) == (30, 3, 64)
    assert (model.vocab_size, model.max_context_len) == (49152, 8192)
    assert all(not p.requires_grad for p in model.parameters())


def test_unknown_model_type_is_rejected(tmp_path: Path) -> None:
    transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path)
    save_file({"wte.weight": torch.zeros(4, 16)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="gpt2") as info:
        load_model(resolve_model_dir(tmp_path))
    assert all(t in str(info.value) for t in SUPPORTED_MODEL_TYPES)


def test_folder_without_weights_is_rejected(tmp_path: Path, tiny_root: Path) -> None:
    shutil.copyfile(tiny_root / "llama" / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        resolve_model_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        resolve_model_dir(empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_dir(tmp_path / "missing")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="gguf"):
        resolve_model_dir(tmp_path / "weights.bin")


def test_missing_and_unexpected_tensors_are_rejected(tmp_path: Path, tiny_root: Path) -> None:
    src = tiny_root / "qwen3"
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(src / name, tmp_path / name)
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.1.self_attn.q_norm.weight"]
    tensors["model.layers.1.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match=r"q_norm\.weight.*extra\.weight"):
        load_model(tmp_path)


def test_load_casts_dtype(tiny_root: Path) -> None:
    model = load_model(tiny_root / "qwen2", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.rope_cos.dtype == torch.bfloat16
    assert model.lm_head.weight is model.model.embed_tokens.weight
