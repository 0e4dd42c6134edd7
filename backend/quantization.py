"""Weight-only quantized linear layers for the CPU engine (``EngineConfig.quantization``).

Contract:
- ``quantize_int4(w)`` / ``quantize_int8(w)`` pack a float weight ``[N, K]``;
  ``QuantizedWeight.dequantize()`` is the float32 matrix the kernel actually multiplies by
  (bfloat16 scales included), so a float model holding those matrices is the exact reference.
- int4 is llama.cpp's Q4_1: asymmetric, groups of 32 along K; per group ``d = (max - min) / 15``
  and ``m = min``, value ``q * d + m`` with ``q`` in ``[0, 15]``. Kernel: torch's
  ``_weight_int4pack_mm_for_cpu``, which computes ``(q - 8) * scale + zero``; so ``scale = d``,
  ``zero = m + 8 d``, both stored as bfloat16 and ``q`` rounded against the stored values.
- int8: symmetric per output channel, ``scale = max|w| / 127`` (bfloat16); kernel
  ``_weight_int8pack_mm``.
- Shapes the kernels cannot take fall back, per matrix (logged): int4 needs ``N % 16 == 0``
  and ``K % 32 == 0``, else int8; int8 needs ``K % 16 == 0`` (torch's kernel crashes on
  other K), else the matrix stays float. Nothing is padded.
- ``QuantizedWeight.linear(x, bias)`` runs the kernel on bfloat16 activations (the float32
  variants of these kernels are 10-30x slower) and returns ``x.dtype``; ``bias`` stays float.
- ``linear(x, weight, bias)`` is the model's one hook: ``F.linear`` for a float weight.
- ``quantize_model(model, scheme)`` fuses a loaded ``CausalLM``'s projections, then replaces
  in place every decoder linear (``"int4"`` or ``"int8"``) and the output projection (int8
  for both, as llama.cpp's Q4 files keep it 8-bit); the float matrices they replace are
  freed. Embeddings (also a tied embedding) and norms stay float. CPU only.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from backend.models.llama import CausalLM

logger = logging.getLogger(__name__)

SCHEMES: tuple[str, ...] = ("int4", "int8")
GROUP_SIZE = 32
_INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default
_INT8_MM = torch.ops.aten._weight_int8pack_mm.default


class QuantizedWeight(ABC):
    """A packed ``[out_features, in_features]`` matrix and its kernel."""

    out_features: int
    in_features: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W.T + bias`` for ``x`` ``[..., in_features]``, in ``x.dtype``."""
        if x.dim() != 2:
            out = self.linear(x.reshape(-1, self.in_features), bias)
            return out.view(*x.shape[:-1], self.out_features)
        out = self._mm(x.to(torch.bfloat16).contiguous()).to(x.dtype)
        return out if bias is None else out.add_(bias)

    @abstractmethod
    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        """The kernel: ``x`` ``[M, in_features]`` bfloat16, contiguous."""

    @abstractmethod
    def dequantize(self) -> torch.Tensor:
        """The float32 matrix this weight stands for."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes read per use of the weight (packed values and scales)."""


class Int4Weight(QuantizedWeight):
    """Q4_1 groups of 32 in torch's CPU int4 layout (see the module docstring)."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, n: int, k: int):
        self.packed = packed  # uint8 [N, K / 2], opaque layout
        self.scales_and_zeros = scales_and_zeros  # bfloat16 [K / 32, N, 2]
        self.out_features, self.in_features = n, k

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        return _INT4_MM(x, self.packed, GROUP_SIZE, self.scales_and_zeros)

    def codes(self) -> torch.Tensor:
        """The 4-bit values ``q`` ``[N, K]`` (int64), read back through the kernel itself
        (scale 1, zero 8, identity activations), so the packed layout never matters here."""
        unit = torch.empty_like(self.scales_and_zeros)
        unit[..., 0], unit[..., 1] = 1.0, 8.0
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        q = _INT4_MM(eye, self.packed, GROUP_SIZE, unit)
        return q.t().round().long()

    def dequantize(self) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        q = self.codes().view(n, k // GROUP_SIZE, GROUP_SIZE).float()
        scale, zero = self.scales_and_zeros.float().permute(1, 0, 2).unbind(-1)
        return ((q - 8) * scale[..., None] + zero[..., None]).view(n, k)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales_and_zeros.nbytes


class Int8Weight(QuantizedWeight):
    """Symmetric int8 with one bfloat16 scale per output channel."""

    def __init__(self, values: torch.Tensor, scales: torch.Tensor) -> None:
        self.values = values  # int8 [N, K]
        self.scales = scales  # bfloat16 [N]
        self.out_features, self.in_features = values.shape

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        return _INT8_MM(x, self.values, self.scales)

    def dequantize(self) -> torch.Tensor:
        return self.values.float() * self.scales.float()[:, None]

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.scales.nbytes


def int4_supported(n: int, k: int) -> bool:
    return n % 16 == 0 and k % GROUP_SIZE == 0


def int8_supported(n: int, k: int) -> bool:
    return k % 16 == 0


def quantize_int4(weight: torch.Tensor) -> Int4Weight:
    """Q4_1 quantization of a float ``[N, K]`` matrix (``int4_supported`` must hold)."""
    n, k = weight.shape
    if not int4_supported(n, k):
        raise ValueError(f"int4 needs N % 16 == 0 and K % 32 == 0, got a {n}x{k} matrix")
    groups = weight.detach().float().reshape(n, k // GROUP_SIZE, GROUP_SIZE)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    d = (high - low) / 15
    scale = d.to(torch.bfloat16).float()
    zero = (low + 8 * d).to(torch.bfloat16).float()
    # A constant group gets scale 0: every q then decodes to ``zero`` (q = 8 is stored).
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    q = torch.round((groups - zero) * inverse + 8).clamp_(0, 15).to(torch.int32).view(n, k)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    scales_and_zeros = torch.cat((scale, zero), -1).permute(1, 0, 2).to(torch.bfloat16)
    return Int4Weight(packed, scales_and_zeros.contiguous(), n, k)


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """Symmetric per-channel int8 of a float ``[N, K]`` matrix (``int8_supported`` must hold)."""
    n, k = weight.shape
    if not int8_supported(n, k):
        raise ValueError(f"int8 needs K % 16 == 0, got a {n}x{k} matrix")
    w = weight.detach().float()
    scale = (w.abs().amax(1) / 127).to(torch.bfloat16).float()
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    values = torch.round(w * inverse[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Weight(values, scale.to(torch.bfloat16))


def quantize_weight(weight: torch.Tensor, scheme: str) -> QuantizedWeight | torch.Tensor:
    """``weight`` in ``scheme``, or the fallback its shape allows (see the module docstring)."""
    n, k = weight.shape
    if scheme == "int4" and int4_supported(n, k):
        return quantize_int4(weight)
    if int8_supported(n, k):
        if scheme == "int4":
            logger.info("int4 cannot take a %dx%d matrix: it is int8", n, k)
        return quantize_int8(weight)
    logger.warning("int8 cannot take a %dx%d matrix (K %% 16 != 0): it stays float", n, k)
    return weight


def linear(
    x: torch.Tensor, weight: QuantizedWeight | torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; a ``QuantizedWeight`` runs its own kernel."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight, bias)
    return weight.linear(x, bias)


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
