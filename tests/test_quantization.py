"""Weight-only quantization (``EngineConfig.quantization``): packing, kernels, the engine.

The reference for a quantized model is the same model with every packed matrix replaced by
its ``dequantize()``d float32 matrix (what the packed values stand for): the remaining
difference is that the kernels quantize activations to int8 per block of 32, as llama.cpp
does. The kernels themselves are checked exactly against that arithmetic.
"""

from __future__ import annotations

import gc
import json
import weakref
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
import torch
import torch.nn.functional as F

from backend import cpu_ops
from backend.config import EngineConfig
from backend.engine import Engine
from backend.model_loader import load_model, resolve_model_dir
from backend.models.llama import CausalLM
from backend.quantization import (
    BF16_GEMM,
    BF16_GEMM_MIN_ROWS,
    GROUP_SIZE,
    QGEMM_MIN_ROWS,
    Int4Weight,
    Int8Weight,
    QuantizedLinear,
    QuantizedWeight,
    linear,
    quantize_int4,
    quantize_int8,
    quantize_model,
    quantize_weight,
)

SCHEMES = ("int4", "int8")
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "<|im_start|>user\nList three colors.<|im_end|>\n<|im_start|>assistant\n",
    "Water boils at",
    "The theory of relativity",
]
NEW_TOKENS = 32
# Teacher-forced on the quantized engine's own greedy outputs, the dequantized reference
# (float32 weights and activations) picks the same token at >= 90% of the positions, and
# where it does not, the token the quantized engine chose is within 1 nat of the
# reference's best (measured: int4 94.8% and 0.49 nats, int8 99%; the kernels' int8
# activations, as llama.cpp's, cost a few points; a wrong scale or zero convention gives
# gaps of several nats and ~0% agreement).
MIN_TOP1_AGREEMENT = 0.90
MAX_LOGPROB_GAP = 1.0
KERNELS = cpu_ops.quant_kernels()[1]  # those this CPU runs: each is checked


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def dequantize_model(model: CausalLM) -> None:
    """Replace, in place, every packed matrix by the float32 matrix it stands for."""

    def plain(weight: QuantizedWeight | torch.Tensor) -> torch.Tensor:
        return weight.dequantize() if isinstance(weight, QuantizedWeight) else weight

    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.qkv_weight is not None and mlp.gate_up_weight is not None
        attn.qkv_weight = plain(attn.qkv_weight)
        mlp.gate_up_weight = plain(mlp.gate_up_weight)
        for module in (attn.o_proj, mlp.down_proj):
            module.weight = plain(module.weight)
    model.lm_head.weight = plain(model.lm_head.weight)


def matrix(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Weight-like values, with an offset group and a constant group (d = 0) in row 0."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    w[0, :GROUP_SIZE] += 0.3
    w[1, :GROUP_SIZE] = 0.0123
    return w


def int8_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x8, dx and sx ``[rows, K / 32, ...]`` as the kernels quantize activations."""
    groups = x.float().view(x.shape[0], -1, GROUP_SIZE)
    amax = groups.abs().amax(-1, keepdim=True)
    # a true division (``127 / amax`` is 127 * reciprocal(amax) in torch, rounded twice)
    inverse = torch.where(amax > 0, torch.full_like(amax, 127) / amax, torch.zeros_like(amax))
    return torch.round(groups * inverse), amax / 127, groups.sum(-1)


def kernel_reference(x: torch.Tensor, packed: QuantizedWeight) -> torch.Tensor:
    """What the kernels compute, in float64: exact integer dots per group, scaled."""
    x8, dx, sx = (t.double() for t in int8_activations(x))
    n, k = packed.shape
    if isinstance(packed, Int4Weight):
        q = packed.codes().view(n, k // GROUP_SIZE, GROUP_SIZE).double()
        d, m = packed.dm.double().unbind(-1)
        dots = torch.einsum("rjg,njg->rnj", x8, q)
        return (dots * d * dx[..., 0][:, None]).sum(-1) + sx @ m.T
    v = packed.values.view(n, k // GROUP_SIZE, GROUP_SIZE).double()
    dots = torch.einsum("rjg,njg->rnj", x8, v)
    return (dots * dx[..., 0][:, None]).sum(-1) * packed.scales.double()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(params=KERNELS)
def kernels(request: pytest.FixtureRequest) -> Iterator[str]:
    cpu_ops.quant_kernels(request.param)
    yield request.param
    cpu_ops.quant_kernels("best")


# ---- packing and kernels -------------------------------------------------------------------


def test_int4_round_trip_is_q4_1() -> None:
    """Every value within half a step (plus the bfloat16 rounding of d and m) of its group's
    Q4_1 grid; 4-bit codes; a constant group decodes exactly to its bfloat16 value."""
    w = matrix(64, 128)
    packed = quantize_int4(w)
    q = packed.codes()
    assert q.shape == w.shape and int(q.min()) >= 0 and int(q.max()) <= 15
    groups = w.view(64, -1, GROUP_SIZE)
    d = (groups.amax(-1) - groups.amin(-1)) / 15
    err = (packed.dequantize() - w).view(64, -1, GROUP_SIZE).abs().amax(-1)
    slack = 15 * d * 2**-8 + groups.amin(-1).abs() * 2**-8
    assert bool((err <= d / 2 + slack + 1e-7).all()), float((err / d.clamp(min=1e-9)).max())
    assert torch.equal(packed.dequantize()[1, :GROUP_SIZE], w[1, :GROUP_SIZE].bfloat16().float())
    # dequantize() is exactly q * d + m of the stored bfloat16 parameters.
    d_stored, m_stored = packed.dm.float().unbind(-1)
    manual = q.view(64, -1, GROUP_SIZE) * d_stored[..., None] + m_stored[..., None]
    assert torch.equal(manual.view(64, 128), packed.dequantize())
    assert packed.nbytes == 64 * 128 // 2 + 64 * (128 // GROUP_SIZE) * 2 * 2


def test_int8_round_trip() -> None:
    w = matrix(48, 96)
    packed = quantize_int8(w)
    assert packed.values.dtype == torch.int8 and int(packed.values.abs().max()) <= 127
    step = packed.scales.float()[:, None]
    assert bool(((packed.dequantize() - w).abs() <= step / 2 + 1e-7).all())
    assert torch.equal(packed.dequantize(), packed.values.float() * step)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [192, 256])  # 6 or 8 groups: with and without a 2-group tail
def test_kernel_is_exact(kernels: str, scheme: str, rows: int, dtype: torch.dtype, k: int) -> None:
    """Every kernel (AVX-VNNI, AVX2, portable C: those this CPU runs) computes the int8
    activation arithmetic exactly (up to float summation order), for a row count that is
    not a multiple of the kernels' 4-row tiles; bias and 3-D inputs too."""
    w = matrix(98, k, seed=rows)
    packed = quantize_int4(w) if scheme == "int4" else quantize_int8(w)
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(rows, k, generator=gen) * torch.rand(rows, k, generator=gen) * 3).to(dtype)
    x[0, :GROUP_SIZE] = 0  # an all-zero group: dx = 0
    bias = torch.randn(98, generator=gen)
    out = linear(x, packed, bias.to(dtype))
    assert out.dtype == dtype and out.shape == (rows, 98)
    ref = kernel_reference(x, packed) + bias.double()
    tol = 2**-7 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))
    # the activations' rounding to int8 is all that separates it from the float product
    plain = F.linear(x.float(), packed.dequantize(), bias).double()
    assert float((out.double() - plain).abs().max()) <= 0.02 * float(plain.abs().max())
    x3 = x.reshape(1, rows, -1)
    torch.testing.assert_close(linear(x3, packed, bias.to(dtype)), out.reshape(1, rows, 98))
    strided = x.t().contiguous().t()  # not contiguous along K: linear copies
    torch.testing.assert_close(linear(strided, packed, bias.to(dtype)), out)


GEMM = "avx512-vnni"  # the kernels with the integer GEMM (cpu_ops.qgemm)
# (N, K): 48 = a 32-column panel and a 16-column one; 98 = 96 + 2 columns through the
# row-by-row kernel; K = 64 is one pair of q4 groups; the model's shapes.
GEMM_SHAPES = [(48, 64), (98, 192), (960, 576), (576, 1536)]


def gemm_case(scheme: str, rows: int, n: int, k: int) -> tuple[QuantizedWeight, torch.Tensor]:
    """A packed matrix and activations of a wide dynamic range, an all-zero group in row 0."""
    w = matrix(n, k, seed=rows)
    packed = quantize_int4(w) if scheme == "int4" else quantize_int8(w)
    x = torch.randn(rows, k, generator=gen(rows)) * torch.rand(rows, k, generator=gen(1)) * 3
    x[0, :GROUP_SIZE] = 0
    return packed, x


def assert_gemm_exact(out: torch.Tensor, x: torch.Tensor, packed: QuantizedWeight) -> None:
    """The int8 activation arithmetic up to float32 summation order (and the rounding of a
    bfloat16 output)."""
    ref = kernel_reference(x, packed)
    tol = 2**-8 if out.dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("rows", [1, 15, 16, 17, 53, 80, 257])
@pytest.mark.parametrize(("n", "k"), GEMM_SHAPES)
def test_integer_gemm_is_exact(kernels: str, scheme: str, rows: int, n: int, k: int) -> None:
    """With avx512-vnni kernels, qgemm computes the int8 activation arithmetic exactly (up to
    float summation order) for row counts around its 4-row tiles and columns around its
    16-column strips, and a row's result does not depend on the other rows; other kernels
    have no GEMM (None)."""
    packed, x = gemm_case(scheme, rows, n, k)
    out = cpu_ops.qgemm(*packed.packed_parts, x)
    if kernels != GEMM:
        assert out is None
        return
    assert out is not None and out.shape == (rows, n) and out.dtype == torch.float32
    assert_gemm_exact(out, x, packed)
    last = cpu_ops.qgemm(*packed.packed_parts, x[-1:])
    assert last is not None and torch.equal(last, out[-1:])
    half = cpu_ops.qgemm(*packed.packed_parts, x.bfloat16())
    assert half is not None and half.dtype == torch.bfloat16
    assert_gemm_exact(half, x.bfloat16(), packed)


@pytest.mark.skipif(GEMM not in KERNELS, reason="no AVX-512 VNNI on this CPU")
def test_integer_gemm_of_the_output_projection() -> None:
    """The int8 [49152, 576] output projection of SmolLM2 (49152 = 1536 32-column panels)."""
    packed, x = gemm_case("int8", 17, 49152, 576)
    out = cpu_ops.qgemm(*packed.packed_parts, x)
    assert out is not None
    assert_gemm_exact(out, x, packed)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_prefill_rows_take_a_gemm(kernels: str, scheme: str) -> None:
    """In a prefill pass, from QGEMM_MIN_ROWS rows, the integer GEMM where the kernels have
    it; else, from BF16_GEMM_MIN_ROWS rows (with oneDNN bfloat16 GEMMs), the matrix
    dequantized natively to bfloat16 (exactly the rounded dequantize()) times bfloat16
    activations. Decode rows always take the row-by-row kernel, whatever their number."""
    w = matrix(40, 128)
    packed = quantize_int4(w) if scheme == "int4" else quantize_int8(w)
    assert torch.equal(packed.dequantize_bf16(), packed.dequantize().bfloat16())
    assert torch.equal(packed.dequantize_bf16(scratch=True), packed.dequantize().bfloat16())
    x = torch.randn(BF16_GEMM_MIN_ROWS, 128, generator=gen(3))
    bias = torch.randn(40, generator=gen(4))
    integer = kernel_reference(x, packed) + bias.double()
    prefill = linear(x, packed, bias, prefill=True)
    if kernels == GEMM:
        gemm = cpu_ops.qgemm(*packed.packed_parts, x)
        assert gemm is not None and torch.equal(prefill, gemm + bias)
        few = x[: QGEMM_MIN_ROWS - 1]
        torch.testing.assert_close(linear(few, packed, prefill=True), linear(few, packed))
    elif BF16_GEMM:
        expected = F.linear(x.bfloat16(), packed.dequantize().bfloat16()).float() + bias
        torch.testing.assert_close(prefill, expected, rtol=0, atol=0)
    else:
        torch.testing.assert_close(prefill.double(), integer, rtol=1e-5, atol=1e-5)
    decode = linear(x, packed, bias)
    torch.testing.assert_close(decode.double(), integer, rtol=1e-5, atol=1e-5)
    assert torch.equal(linear(x[:1], packed, bias), decode[:1])  # whatever the batch


def test_other_activation_dtypes_go_through_float32() -> None:
    packed = quantize_int4(matrix(16, 64))
    x = torch.randn(3, 64)
    out = linear(x.half(), packed)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, linear(x.half().float(), packed).half())


def test_shapes_the_formats_cannot_take_fall_back() -> None:
    """int4 needs K % 64 == 0, int8 K % 32 == 0: otherwise int8, then float. Any N."""
    assert isinstance(quantize_weight(matrix(40, 64), "int4"), Int4Weight)
    assert isinstance(quantize_weight(matrix(64, 96), "int4"), Int8Weight)  # K % 64
    w = matrix(64, 40)  # K % 32
    assert quantize_weight(w, "int4") is w and quantize_weight(w, "int8") is w
    with pytest.raises(ValueError, match="int4 needs"):
        quantize_int4(matrix(40, 96))
    with pytest.raises(ValueError, match="int8 needs"):
        quantize_int8(w)
    with pytest.raises(ValueError, match="does not match"):
        packed = quantize_int8(matrix(8, 64))
        cpu_ops.qmatmul(cpu_ops.Q8, packed.values, packed.scales, w[:2])


def test_unknown_kernels_are_refused() -> None:
    with pytest.raises(ValueError, match="no avx-512 kernels"):
        cpu_ops.quant_kernels("avx-512")
    assert cpu_ops.quant_kernels()[0] == KERNELS[-1]


# ---- models ---------------------------------------------------------------------------------


def test_float_matrices_are_freed() -> None:
    """After quantize_model no float copy of a linear is left (the fused matrices and the
    per-projection views into them are all gone); the tied embedding stays float."""
    model = load_model(resolve_model_dir(None))
    model.fuse_projections()
    layer = model.model.layers[0]
    refs = [
        weakref.ref(t)
        for t in (
            layer.self_attn.qkv_weight,
            layer.self_attn.q_proj.weight,
            layer.mlp.gate_up_weight,
            layer.mlp.down_proj.weight,
        )
    ]
    embed = model.model.embed_tokens.weight
    quantize_model(model, "int4")
    gc.collect()
    assert all(r() is None for r in refs)
    assert layer.self_attn.q_proj is None and layer.mlp.up_proj is None
    assert isinstance(layer.self_attn.qkv_weight, Int4Weight)
    assert isinstance(layer.mlp.down_proj, QuantizedLinear)
    assert isinstance(model.lm_head.weight, Int8Weight)  # 8-bit output projection
    assert model.model.embed_tokens.weight is embed and embed.dtype == torch.float32
    float_params = sum(p.numel() for p in model.parameters())
    assert float_params < embed.numel() * 1.01  # embedding, norms: nothing else


@pytest.mark.parametrize("scheme", SCHEMES)
def test_dummy_weights_with_biases(tiny_root: Path, scheme: str) -> None:
    """load_format="dummy" on the tiny Llama (biases on every projection, untied head)."""
    with Engine(
        str(tiny_root / "llama"), load_format="dummy", quantization=scheme, max_total_tokens=512
    ) as eng:
        assert isinstance(eng.model.model.layers[0].self_attn.qkv_weight, QuantizedWeight)
        assert eng.model.model.layers[0].self_attn.qkv_bias is not None
        out = eng.generate("Hello", {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True})
        assert len(out["output_ids"]) == 8
        check_idle(eng)


# ---- the engine on the embedded model ------------------------------------------------------


def check_idle(eng: Engine) -> None:
    eng.wait_idle()
    acc = eng.check_kv_invariant()
    assert acc["protected"] == 0 and acc["owned_by_requests"] == 0
    assert acc["free"] + acc["evictable"] == acc["total"]


@pytest.fixture(scope="module", params=SCHEMES)
def quantized(request: pytest.FixtureRequest) -> Iterator[Engine]:
    with Engine(quantization=request.param, max_total_tokens=2048) as eng:
        yield eng


def test_greedy_outputs_match_the_dequantized_reference(quantized: Engine) -> None:
    """The quantized engine's greedy continuations, scored (teacher-forced) by a reference
    engine holding the dequantized float32 weights: the reference's top-1 is the chosen
    token almost everywhere, and never far from it."""
    params = {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
    outs = quantized.generate(PROMPTS, params)
    assert outs[0]["text"].startswith(" Paris")
    gaps: list[float] = []
    with Engine(quantization=quantized.config.quantization, max_total_tokens=2048) as ref:
        dequantize_model(ref.model)
        ref.scheduler.runner.native_decoder = None  # it holds the packed matrices
        for prompt, out in zip(PROMPTS, outs):
            ids = ref.tokenizer(prompt)["input_ids"]
            scored = ref.generate(
                input_ids=ids + out["output_ids"],
                sampling_params={"max_new_tokens": 0},
                return_logprob=True,
                logprob_start_len=len(ids),
                top_logprobs_num=1,
                return_text_in_logprobs=False,
            )
            meta = scored["meta_info"]
            chosen = [lp for lp, _, *_ in meta["input_token_logprobs"]]
            best = [top[0][0] for top in meta["input_top_logprobs"]]
            assert len(chosen) == len(best) == NEW_TOKENS
            gaps += [b - c for b, c in zip(best, chosen)]
        check_idle(ref)
    agreement = sum(g <= 1e-6 for g in gaps) / len(gaps)
    assert agreement >= MIN_TOP1_AGREEMENT, (agreement, max(gaps))
    assert max(gaps) <= MAX_LOGPROB_GAP, max(gaps)
    check_idle(quantized)


def test_constrained_json(quantized: Engine) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "city": {"enum": ["Paris", "London", "Tokyo"]},
        },
        "required": ["name", "age", "city"],
    }
    prompt = quantized.apply_chat_template(
        [{"role": "user", "content": "Describe a person as JSON with name, age and city."}]
    )
    out = quantized.generate(
        prompt, {"json_schema": schema, "temperature": 0, "max_new_tokens": 64}
    )
    assert out["meta_info"]["finish_reason"]["type"] == "stop", out
    jsonschema.validate(json.loads(out["text"]), schema)
    check_idle(quantized)


# ---- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"quantization": "int3"}, r"quantization must be None, 'int4' or 'int8'"),
        ({"quantization": "fp8"}, r"quantization must be None, 'int4' or 'int8'"),
        ({"quantization": "int4", "device": "cuda"}, "CPU feature"),
        ({"quantization": "int8", "device": "cuda:1"}, "CPU feature"),
    ],
)
def test_bad_options_are_rejected(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig(**options)
    assert EngineConfig(quantization="int4").quantization == "int4"
    assert EngineConfig().quantization is None


def test_cli_and_runtime_flags_carry_the_option() -> None:
    """``sgl-dsl serve --quantization int4`` (generated from EngineConfig), which is also
    what ``sgl.Runtime(quantization="int4")`` passes."""
    from sgl_dsl.cli import build_parser
    from sgl_dsl.runtime import _flags

    assert _flags({"quantization": "int4"}) == ["--quantization", "int4"]
    args = build_parser().parse_args(["serve", *_flags({"quantization": "int4"})])
    assert args.quantization == "int4" and "quantization" in args.engine_fields


def test_load_model_rejects_bad_quantization(tiny_root: Path) -> None:
    with pytest.raises(ValueError, match="quantization must be"):
        load_model(tiny_root / "llama", quantization="int2")
    with pytest.raises(ValueError, match="CPU feature"):
        load_model(tiny_root / "llama", device="meta", quantization="int4")
    with pytest.raises(ValueError, match="quantization must be one of"):
        quantize_model(load_model(tiny_root / "llama"), "nf4")
