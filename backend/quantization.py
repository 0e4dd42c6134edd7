"""Weight-only quantized linear layers for the CPU engine (``EngineConfig.quantization``).

Contract:
- ``quantize_int4(w)`` / ``quantize_int8(w)`` pack a float weight ``[N, K]``;
  ``QuantizedWeight.dequantize()`` is the float32 matrix the packed values stand for.
- int4 is llama.cpp's Q4_1: asymmetric, groups of 32 along K; per group ``d = (max - min) / 15``
  and ``m = min``, both stored as bfloat16; a value is ``q * d + m`` with ``q`` in ``[0, 15]``
  rounded against the stored ``d`` and ``m``. int8: symmetric per output channel,
  ``scale = max|w| / 127`` (bfloat16).
- The kernels are native (``backend/_cpu_quant.h`` through ``backend.cpu_ops``): like
  llama.cpp, they quantize the activations to int8 per block of 32 and take exact integer
  dot products, so a product differs from ``x @ dequantize().T`` only by the activations'
  rounding (about 1/254 of each value) and summation order. They take float32 or bfloat16
  activations and return that dtype; one thread. Decode steps always take the row-by-row
  integer kernel (``cpu_ops.qmatmul``), so a request's numerics do not depend on its batch.
  A prefill pass of ``QGEMM_MIN_ROWS`` rows or more takes the register-tiled integer GEMM
  (``cpu_ops.qgemm``: AVX-512 VNNI, the same arithmetic in another summation order) where
  the CPU has it; elsewhere, from ``BF16_GEMM_MIN_ROWS`` rows and where oneDNN has bfloat16
  GEMMs, the matrix is dequantized to bfloat16 into a buffer each thread keeps (the size of
  the largest matrix) and multiplied with the activations rounded to bfloat16.
- Shapes the formats cannot take fall back, per matrix (logged): int4 needs ``K % 64 == 0``,
  else int8; int8 needs ``K % 32 == 0``, else the matrix stays float. Nothing is padded.
- ``linear(x, weight, bias)`` is the model's one hook: ``F.linear`` for a float weight.
- ``quantize_model(model, scheme)`` fuses a loaded ``CausalLM``'s projections, then replaces
  in place every decoder linear (``"int4"`` or ``"int8"``) and the output projection (int8
  for both, as llama.cpp's Q4 files keep it 8-bit); the float matrices they replace are
  freed. Embeddings (also a tied embedding) and norms stay float. CPU only.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from backend import cpu_ops
from backend.gemv import gemv, gemv_applies
from backend.skinny_gemm import skinny_gemm, skinny_gemm_applies

if TYPE_CHECKING:
    from backend.models.llama import CausalLM

logger = logging.getLogger(__name__)

SCHEMES: tuple[str, ...] = ("int4", "int8")
GROUP_SIZE = 32
# From this many rows (prefill), the integer GEMM beats the row-by-row kernel (measured on
# Zen 5, one thread: q4 from 2 rows, q8 from ~3; 4-10x at 16 rows, and 1.5-3.6x faster than
# dequantization plus oneDNN's bfloat16 GEMM from 16 to 512 rows).
QGEMM_MIN_ROWS = 4
# Without the integer GEMM: from this many rows (prefill), a bfloat16 GEMM over the
# dequantized matrix beats the row-by-row kernel, whose cost grows with the rows (crossover
# measured at ~12-16 rows on an AVX-512 BF16 CPU); only where oneDNN has bfloat16 GEMMs.
BF16_GEMM_MIN_ROWS = 16


def _onednn_has_bf16() -> bool:
    try:  # a private probe: absent from some builds
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


BF16_GEMM = _onednn_has_bf16()


_scratch = threading.local()


def _bf16_scratch(n: int, k: int) -> torch.Tensor:
    """A bfloat16 ``[n, k]`` view of a buffer kept per thread and grown as needed (the
    largest matrix's size): a fresh allocation of tens of MB page-faults on every use."""
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < n * k:
        buffer = _scratch.buffer = torch.empty(n * k, dtype=torch.bfloat16)
    return buffer[: n * k].view(n, k)


class QuantizedWeight(ABC):
    """A packed ``[out_features, in_features]`` matrix and its kernel."""

    out_features: int
    in_features: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def linear(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, prefill: bool = False
    ) -> torch.Tensor:
        """``x @ W.T + bias`` for ``x`` ``[..., in_features]``, in ``x.dtype``. The row-by-row
        integer kernel, or with ``prefill`` the integer GEMM (from ``QGEMM_MIN_ROWS`` rows,
        where the CPU has it) or else the bfloat16 GEMM (from ``BF16_GEMM_MIN_ROWS`` rows);
        decode steps thus compute the same whatever their batch size."""
        if x.dim() != 2:
            out = self.linear(x.reshape(-1, self.in_features), bias, prefill)
            return out.view(*x.shape[:-1], self.out_features)
        if x.stride(-1) != 1:
            x = x.contiguous()
        if not cpu_ops.supports(x):  # another dtype: through float32
            return self.linear(x.float(), bias, prefill).to(x.dtype)
        rows = x.shape[0]
        out = None
        if prefill and rows >= QGEMM_MIN_ROWS:
            out = cpu_ops.qgemm(*self.packed_parts, x)  # None without the integer GEMM
        if out is None and prefill and BF16_GEMM and rows >= BF16_GEMM_MIN_ROWS:
            weight = self.dequantize_bf16(scratch=True)
            out = F.linear(x.to(torch.bfloat16), weight).to(x.dtype)
        if out is None:
            out = cpu_ops.qmatmul(*self.packed_parts, x)
        return out if bias is None else out.add_(bias)

    @property
    @abstractmethod
    def packed_parts(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """``(kind, weights, scales)`` as ``cpu_ops.qmatmul`` takes them."""

    def dequantize_bf16(self, scratch: bool = False) -> torch.Tensor:
        """The matrix as bfloat16, computed natively; with ``scratch``, into this thread's
        reusable buffer (valid until its next use: what the prefill GEMM needs)."""
        out = _bf16_scratch(*self.shape) if scratch else None
        return cpu_ops.dequantize(*self.packed_parts, out=out)

    @abstractmethod
    def dequantize(self) -> torch.Tensor:
        """The float32 matrix this weight stands for."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes read per use of the weight (packed values and scales)."""


class Int4Weight(QuantizedWeight):
    """Q4_1 groups of 32 in the native kernel's layout (``backend/_cpu_quant.h``): ``packed``
    uint8 ``[N, K / 2]`` (groups ``2p`` and ``2p + 1`` share 32 bytes, low and high nibbles)
    and ``dm`` bfloat16 ``[N, K / 32, 2]``, each group's ``(d, m)``."""

    def __init__(self, packed: torch.Tensor, dm: torch.Tensor) -> None:
        self.packed = packed
        self.dm = dm
        self.out_features, self.in_features = packed.shape[0], packed.shape[1] * 2

    @property
    def packed_parts(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        return cpu_ops.Q4, self.packed, self.dm

    def codes(self) -> torch.Tensor:
        """The 4-bit values ``q`` ``[N, K]`` (int64)."""
        n, k = self.shape
        pairs = self.packed.view(n, k // (2 * GROUP_SIZE), 1, GROUP_SIZE)
        return torch.cat((pairs & 15, pairs >> 4), 2).view(n, k).long()

    def dequantize(self) -> torch.Tensor:
        n, k = self.shape
        q = self.codes().view(n, k // GROUP_SIZE, GROUP_SIZE).float()
        d, m = self.dm.float().unbind(-1)
        return (q * d[..., None] + m[..., None]).view(n, k)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.dm.nbytes


class Int8Weight(QuantizedWeight):
    """Symmetric int8 with one bfloat16 scale per output channel."""

    def __init__(self, values: torch.Tensor, scales: torch.Tensor) -> None:
        self.values = values  # int8 [N, K]
        self.scales = scales  # bfloat16 [N]
        self.out_features, self.in_features = values.shape

    @property
    def packed_parts(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        return cpu_ops.Q8, self.values, self.scales

    def dequantize(self) -> torch.Tensor:
        return self.values.float() * self.scales.float()[:, None]

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.scales.nbytes


def int4_supported(n: int, k: int) -> bool:
    return k % (2 * GROUP_SIZE) == 0


def int8_supported(n: int, k: int) -> bool:
    return k % GROUP_SIZE == 0


def quantize_int4(weight: torch.Tensor) -> Int4Weight:
    """Q4_1 quantization of a float ``[N, K]`` matrix (``int4_supported`` must hold)."""
    n, k = weight.shape
    if not int4_supported(n, k):
        raise ValueError(f"int4 needs K % 64 == 0, got a {n}x{k} matrix")
    groups = weight.detach().float().reshape(n, k // GROUP_SIZE, GROUP_SIZE)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    d = ((high - low) / 15).to(torch.bfloat16).float()
    m = low.to(torch.bfloat16).float()
    # A constant group gets d = 0: every q is then 0 and decodes to m.
    inverse = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = torch.round((groups - m) * inverse).clamp_(0, 15).to(torch.uint8)
    pairs = q.view(n, k // (2 * GROUP_SIZE), 2, GROUP_SIZE)
    packed = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, k // 2)
    dm = torch.cat((d, m), -1).to(torch.bfloat16)
    return Int4Weight(packed.contiguous(), dm.contiguous())


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """Symmetric per-channel int8 of a float ``[N, K]`` matrix (``int8_supported`` must hold)."""
    n, k = weight.shape
    if not int8_supported(n, k):
        raise ValueError(f"int8 needs K % 32 == 0, got a {n}x{k} matrix")
    w = weight.detach().float()
    scale = (w.abs().amax(1) / 127).to(torch.bfloat16).float()
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    values = torch.round(w * inverse[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Weight(values.contiguous(), scale.to(torch.bfloat16))


def quantize_weight(weight: torch.Tensor, scheme: str) -> QuantizedWeight | torch.Tensor:
    """``weight`` in ``scheme``, or the fallback its shape allows (see the module docstring)."""
    n, k = weight.shape
    if scheme == "int4" and int4_supported(n, k):
        return quantize_int4(weight)
    if int8_supported(n, k):
        if scheme == "int4":
            logger.info("int4 cannot take a %dx%d matrix (K %% 64 != 0): it is int8", n, k)
        return quantize_int8(weight)
    logger.warning("int8 cannot take a %dx%d matrix (K %% 32 != 0): it stays float", n, k)
    return weight


# Decode steps of float32 CPU models with at most this many rows take the native GEMV
# (`cpu_ops.fmatmul`, single-threaded): it reads the weights at the core's load bandwidth,
# ~2x torch's GEMV, and is slower than torch's GEMM from about 16 rows.
FLOAT_GEMV_MAX_ROWS = 8


def _onednn_has_f32_linear() -> bool:
    """Whether oneDNN's linear (the op torch.compile's CPU backend calls) is here: on the AMD
    cores we measure it runs float32 GEMMs 2.1-2.3x faster than torch's MKL path."""
    try:  # a private op: absent from some builds
        return torch.backends.mkldnn.is_available() and callable(torch.ops.mkldnn._linear_pointwise)
    except (AttributeError, RuntimeError):
        return False


ONEDNN_F32_LINEAR = _onednn_has_f32_linear()


def float_gemv_applies(rows: int) -> bool:
    """Whether a decode step of ``rows`` rows with float32 CPU weights takes the native GEMV
    (only when torch runs one thread: it would use the others)."""
    return rows <= FLOAT_GEMV_MAX_ROWS and torch.get_num_threads() == 1


def linear(
    x: torch.Tensor,
    weight: QuantizedWeight | torch.Tensor,
    bias: torch.Tensor | None = None,
    prefill: bool = False,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; a ``QuantizedWeight`` runs its own kernel (``prefill``:
    ``x`` holds rows of a prefill pass, see ``QuantizedWeight.linear``). On CUDA, products of
    one row take the Triton GEMV (``backend/gemv.py``; any pass: its rows are independent),
    products of 2-64 rows the skinny GEMM (``backend/skinny_gemm.py``, which says which).
    Float32 on the CPU: decode steps of contiguous weights may take the native GEMV
    (``float_gemv_applies``), other products oneDNN's linear where the build has it
    (``ONEDNN_F32_LINEAR``)."""
    if isinstance(weight, QuantizedWeight):
        return weight.linear(x, bias, prefill)
    if gemv_applies(x, weight, bias):
        return gemv(x, weight, bias)
    if skinny_gemm_applies(x, weight, bias):
        return skinny_gemm(x, weight, bias)
    float32_cpu = (
        x.dim() == 2
        and x.dtype == weight.dtype == torch.float32
        and x.device.type == weight.device.type == "cpu"
        and (bias is None or bias.dtype == torch.float32)
    )
    if not float32_cpu:
        return F.linear(x, weight, bias)
    if not prefill and weight.is_contiguous() and float_gemv_applies(x.shape[0]):
        return cpu_ops.fmatmul(weight, x.contiguous() if x.stride(-1) != 1 else x, bias)
    if ONEDNN_F32_LINEAR:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class QuantizedLinear(nn.Module):
    """Stands in for an ``nn.Linear``: ``weight`` (maybe quantized) and ``bias``."""

    def __init__(self, weight: QuantizedWeight | torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        n, k = self.weight.shape
        return f"in_features={k}, out_features={n}, weight={type(self.weight).__name__}"


def quantize_model(model: CausalLM, scheme: str) -> None:
    """Quantize ``model`` (loaded, on the CPU) in place; see the module docstring."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantization must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if model.model.embed_tokens.weight.device.type != "cpu":
        raise ValueError("quantization is a CPU feature: the model must be on the CPU")
    if model.model.layers[0].self_attn.qkv_weight is None:
        model.fuse_projections()
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        # The separate projections are views of the fused float matrices: drop them too, so
        # that the float storage is freed once the fused matrix is replaced.
        for parent, names in (
            (attn, ("q_proj", "k_proj", "v_proj")),
            (mlp, ("gate_proj", "up_proj")),
        ):
            for name in names:
                setattr(parent, name, None)
        assert attn.qkv_weight is not None and mlp.gate_up_weight is not None
        attn.qkv_weight = quantize_weight(attn.qkv_weight, scheme)
        mlp.gate_up_weight = quantize_weight(mlp.gate_up_weight, scheme)
        for parent, name in ((attn, "o_proj"), (mlp, "down_proj")):
            old = getattr(parent, name)
            setattr(parent, name, QuantizedLinear(quantize_weight(old.weight, scheme), old.bias))
    head = model.lm_head
    model.lm_head = QuantizedLinear(quantize_weight(head.weight, "int8"), head.bias)
