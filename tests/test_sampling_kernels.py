"""The Triton grammar-bitmask kernel against the CPU masking of ``Constraints.mask_logits``.

With CUDA the compiled kernel runs on the GPU (and the CUDA-only tests check the engine's
path). Without CUDA it runs on CPU under Triton's interpreter, which must be switched on
(``TRITON_INTERPRET=1``) before ``triton`` is first imported in the process; as in
``tests/test_triton_attention.py``, when pytest has imported triton already this module runs
itself in a subprocess with the variable set (``test_interpreter_subprocess``). The module is
skipped when ``triton`` is not importable.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import triton_util

triton_util.prepare()
CUDA = triton_util.CUDA

triton = pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[gpu]')")

from backend import sampling_kernels as sk  # noqa: E402
from backend.constrained import Constraints  # noqa: E402
from fsm import Vocabulary, compile_regex  # noqa: E402

RUN_HERE = triton_util.runs_here(sk.is_interpreted())


@pytest.fixture(autouse=True)
def kernels_here(request: pytest.FixtureRequest) -> None:
    triton_util.skip_unless_here(request, RUN_HERE)


def test_interpreter_subprocess() -> None:
    """Without CUDA, run this module again in a process where the interpreter is on."""
    triton_util.rerun_interpreted(__file__, RUN_HERE, noconftest=True, timeout=300)


DEVICE = triton_util.DEVICE
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


class FakeGuide:
    """Stands for a ``TokenGuide``: state ``k`` allows the bits of ``masks[k]``."""

    def __init__(self, masks: np.ndarray) -> None:
        self.masks = masks

    def allowed_mask(self, state: int) -> np.ndarray:
        return self.masks[state]


def constraints() -> Constraints:
    return Constraints(
        None, set(), whitespace_pattern=None, extra_properties=False, timeout_s=1.0, cache_size=1
    )


def fake_reqs(masks: np.ndarray, masked_rows: list[int], batch: int) -> list[SimpleNamespace]:
    """``batch`` requests; ``masked_rows[k]`` is constrained by ``masks[k]``, others are not."""
    guide = FakeGuide(masks)
    reqs = [SimpleNamespace(guide=None, fsm_state=0) for _ in range(batch)]
    for k, row in enumerate(masked_rows):
        reqs[row].guide, reqs[row].fsm_state = guide, k
    return reqs


def random_masks(rows: int, vocab: int, seed: int, width: int | None = None) -> np.ndarray:
    """``[rows, width]`` uint32 packed masks (``width`` defaults to ``ceil(vocab / 32)``):
    row 0 random, 1 all allowed, 2 only the last (EOS-like) token, 3 random with the last
    token allowed, 4+ random sparse (about one token in 8). Bits past ``vocab`` are set at
    random too (padding the kernel must ignore)."""
    gen = np.random.default_rng(seed)
    width = width or -(-vocab // 32)
    masks = gen.integers(0, 2**32, size=(rows, width), dtype=np.uint32)
    last = vocab - 1
    for k in range(rows):
        if k == 1:
            masks[k] = 0xFFFF_FFFF
        elif k == 2:
            masks[k] = 0
            masks[k, last >> 5] = np.uint32(1 << (last & 31))
        elif k == 3:
            masks[k, last >> 5] |= np.uint32(1 << (last & 31))
        elif k >= 4:
            for _ in range(2):
                masks[k] &= gen.integers(0, 2**32, size=width, dtype=np.uint32)
    return masks


def random_logits(batch: int, vocab: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, vocab, generator=gen) * 4).to(dtype)


def cpu_reference(logits: torch.Tensor, masks: np.ndarray, masked_rows: list[int]) -> torch.Tensor:
    """The existing CPU path: ``Constraints.mask_logits`` on a CPU copy."""
    out = logits.cpu().clone()
    constraints().mask_logits(fake_reqs(masks, masked_rows, logits.shape[0]), out)
    return out


def run_kernel(
    logits: torch.Tensor,
    masks: np.ndarray,
    masked_rows: list[int] | None,
    index_dtype: torch.dtype = torch.int32,
    block_v: int | None = None,
) -> torch.Tensor:
    out = logits.to(DEVICE).clone()
    bitmask = torch.from_numpy(masks.view(np.int32)).to(DEVICE)
    rows = None
    if masked_rows is not None:
        rows = torch.tensor(masked_rows, dtype=index_dtype, device=DEVICE)
    sk.apply_token_bitmask_(out, bitmask, rows, block_v=block_v)
    return out.cpu()


def test_kernel_runs_where_expected() -> None:
    assert sk.is_interpreted() != CUDA


# (batch, vocab, logits rows with a mask, in mask order); vocabs are not multiples of 32 or
# of the 64-token interpreter block, except 256 (whole words and blocks).
CASES = [
    (1, 100, [0]),
    (1, 33, []),
    (6, 203, [4, 0, 2, 5, 1]),  # row 3 unconstrained
    (7, 256, [6, 3, 0, 1, 5]),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("batch", "vocab", "masked_rows"), CASES)
def test_kernel_matches_cpu_masking(
    dtype: torch.dtype, batch: int, vocab: int, masked_rows: list[int]
) -> None:
    logits = random_logits(batch, vocab, dtype, seed=vocab + batch)
    masks = random_masks(len(masked_rows), vocab, seed=vocab)
    expected = cpu_reference(logits, masks, masked_rows)
    for index_dtype in (torch.int32, torch.int64):
        out = run_kernel(logits, masks, masked_rows, index_dtype)
        assert out.dtype == dtype
        assert torch.equal(out, expected)
    # the rows not in the list are untouched; the cases cover the special masks
    for row in set(range(batch)) - set(masked_rows):
        assert torch.equal(out[row], logits[row])
    if len(masked_rows) >= 3:
        assert torch.equal(out[masked_rows[1]], logits[masked_rows[1]])  # all allowed
        only_last = out[masked_rows[2]]
        assert torch.isinf(only_last[:-1]).all() and only_last[-1] == logits[masked_rows[2], -1]


@pytest.mark.parametrize("block_v", [32, 128])
def test_kernel_block_sizes_and_default_rows(block_v: int) -> None:
    batch, vocab = 3, 161
    logits = random_logits(batch, vocab, torch.float32, seed=3)
    masks = random_masks(batch, vocab, seed=4)
    expected = cpu_reference(logits, masks, list(range(batch)))
    assert torch.equal(run_kernel(logits, masks, None, block_v=block_v), expected)


def test_mask_narrower_or_wider_than_logits() -> None:
    """A model vocabulary padded past the tokenizer's: tokens past the mask become -inf
    (as on CPU); a mask wider than the logits has its extra words ignored."""
    batch, vocab = 3, 150
    logits = random_logits(batch, vocab, torch.float32, seed=5)
    narrow = random_masks(2, 70, seed=6)  # 3 words: tokens 96.. are past the mask
    expected = cpu_reference(logits, narrow, [2, 0])
    out = run_kernel(logits, narrow, [2, 0])
    assert torch.equal(out, expected)
    assert torch.isinf(out[[2, 0], 96:]).all()
    wide = random_masks(2, vocab, seed=7, width=9)  # 288 bits for 150 tokens
    assert torch.equal(run_kernel(logits, wide, [1, 2]), cpu_reference(logits, wide, [1, 2]))


def test_strided_logits_and_empty_rows() -> None:
    """Logits whose vocabulary dim is not contiguous; an empty row list changes nothing."""
    batch, vocab = 4, 75
    base = random_logits(vocab, batch, torch.float32, seed=8).to(DEVICE)
    logits = base.t()  # [batch, vocab], strides (1, batch)
    masks = random_masks(2, vocab, seed=9)
    expected = cpu_reference(logits, masks, [3, 1])
    rows = torch.tensor([3, 1], dtype=torch.int64, device=DEVICE)
    sk.apply_token_bitmask_(logits, torch.from_numpy(masks.view(np.int32)).to(DEVICE), rows)
    assert torch.equal(base.t().cpu(), expected)
    before = base.clone()
    empty = torch.empty(0, 3, dtype=torch.int32, device=DEVICE)
    sk.apply_token_bitmask_(logits, empty, torch.empty(0, dtype=torch.int32, device=DEVICE))
    assert torch.equal(base, before)


def test_real_guide_bit_order() -> None:
    """Masks straight from ``TokenGuide.allowed_mask`` (uint32, as fsm packs them): a
    70-token vocabulary whose last id is EOS, allowed only once the regex can end."""
    singles = [bytes([c]) for c in b"abcdefghijklmnopqrstuvwxyz0123456789"]
    pairs = [a + b for a in (b"a", b"b", b"c", b"1") for b in (b"a", b"b", b"c", b"1", b"2")]
    token_bytes = [*singles, *pairs, b"--", b"-", b"x1", b" ", *[None] * 9, None]
    vocab = Vocabulary(token_bytes, eos_token_ids=[len(token_bytes) - 1])
    assert vocab.size == 70
    guide = compile_regex(r"[ab]+1?", vocab)
    states = [guide.initial_state, guide.advance(guide.initial_state, 0)]  # "" then "a"
    states.append(guide.advance(states[1], vocab.token_bytes.index(b"b1")))  # "ab1"
    assert guide.is_accepting(states[1]) and guide.is_accepting(states[2])
    reqs = [SimpleNamespace(guide=guide, fsm_state=s) for s in states]
    reqs.insert(1, SimpleNamespace(guide=None, fsm_state=0))
    logits = random_logits(len(reqs), vocab.size, torch.float32, seed=10)
    expected = logits.clone()
    constraints().mask_logits(reqs, expected)
    masks = np.stack([guide.allowed_mask(s) for s in states])
    out = logits.to(DEVICE).clone()
    rows = torch.tensor([0, 2, 3], device=DEVICE)
    sk.apply_token_bitmask_(out, torch.from_numpy(masks).to(DEVICE), rows)  # uint32 tensor
    assert torch.equal(out.cpu(), expected)
    for row, state in zip([0, 2, 3], states):
        finite = torch.isfinite(out[row]).nonzero().flatten().cpu().numpy()
        assert finite.tolist() == guide.allowed_token_ids(state).tolist()
    assert torch.isinf(out[0, -1]) and torch.isfinite(out[2, -1])  # EOS once accepting


def test_argument_checks() -> None:
    logits = torch.zeros(2, 40, device=DEVICE)
    bitmask = torch.zeros(2, 2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(TypeError, match="bitmask must be int32"):
        sk.apply_token_bitmask_(logits, bitmask.long())
    with pytest.raises(TypeError, match="logits dtype"):
        sk.apply_token_bitmask_(logits.double(), bitmask)
    with pytest.raises(ValueError, match="one row per logits row"):
        sk.apply_token_bitmask_(logits, bitmask[:1])
    with pytest.raises(ValueError, match="rows must be"):
        sk.apply_token_bitmask_(logits, bitmask, torch.zeros(3, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="block_v"):
        sk.apply_token_bitmask_(logits, bitmask, block_v=48)


# ---------------------------------------------------------------------------------------------
# CUDA: the engine's path
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mask_logits_on_cuda_uses_kernel_and_matches_cpu(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Constraints.mask_logits`` on CUDA logits: one kernel call, same result as on CPU."""
    calls = []
    kernel = sk.apply_token_bitmask_

    def spy(*args: object, **kwargs: object) -> None:
        calls.append(args)
        kernel(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sk, "apply_token_bitmask_", spy)
    batch, vocab, masked_rows = 9, 50_000, [8, 2, 0, 5, 6, 1]
    logits = random_logits(batch, vocab, dtype, seed=11)
    masks = random_masks(len(masked_rows), 49_999, seed=12)  # narrower: padded model vocab
    out = logits.to(DEVICE)
    constraints().mask_logits(fake_reqs(masks, masked_rows, batch), out)
    assert len(calls) == 1
    assert torch.equal(out.cpu(), cpu_reference(logits, masks, masked_rows))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_engine_constrained_on_cuda_kernel_matches_torch_masking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine on CUDA (a tiny random Llama, float32): constrained requests mask through
    the kernel, batched with an unconstrained one, and generate exactly what the torch
    masking (the CPU code run on the GPU) generates."""
    from tiny_models import write_tiny_model

    from backend import constrained
    from backend.engine import Engine

    folder = write_tiny_model(tmp_path / "llama", "llama")
    patterns = [r"[0-9]{4}-[0-9]{2}-[0-9]{2}", r"(yes|no), because [a-z ]{5,40}\.", r"(Paris|Rome)"]
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    params: list[dict] = [{"regex": p, "temperature": 0, "max_new_tokens": 48} for p in patterns]
    params.append({"json_schema": schema, "temperature": 0, "max_new_tokens": 48})
    params.append({"temperature": 0, "max_new_tokens": 8})  # an unconstrained row
    prompts = ["Answer: "] * len(params)

    def run() -> list[dict]:
        with Engine(str(folder), device="cuda", dtype="float32", max_total_tokens=4096) as eng:
            return eng.generate(prompts, params)  # one batch

    calls = []
    kernel = sk.apply_token_bitmask_

    def spy(*args: object, **kwargs: object) -> None:
        calls.append(args)
        kernel(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sk, "apply_token_bitmask_", spy)
    ours = run()
    assert calls
    calls.clear()
    monkeypatch.setattr(constrained, "_mask_logits_cuda", lambda *args: False)
    theirs = run()
    assert not calls
    assert [r["output_ids"] for r in ours] == [r["output_ids"] for r in theirs]
    for pattern, out in zip(patterns, ours):
        if out["meta_info"]["finish_reason"]["type"] == "stop":
            assert re.fullmatch(pattern, out["text"]), (pattern, out["text"])
