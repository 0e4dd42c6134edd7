"""The attention interface every implementation (torch on CPU, Triton on GPU) provides."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from backend.forward_batch import ForwardBatch

if TYPE_CHECKING:
    from backend.kv_pool import KVPool


class AttentionBackend(Protocol):
    """Paged attention over the token-granular KV pool.

    ``init_forward_metadata`` runs once per forward pass and stores whatever the
    implementation precomputes (index tensors, masks) in ``batch.attn_metadata``.
    ``forward`` runs once per layer: it writes ``k``/``v`` of the new tokens to the pool at
    ``batch.out_cache_loc`` and returns the attention output for the new tokens. It writes
    the K/V of all of the pass's new tokens before any request attends, so a request's
    prefix may include slots that another request of the same EXTEND pass writes (the
    scheduler lets requests borrow a shared prefix within a pass).
    Shapes: ``q`` is ``[T, num_heads, head_dim]``, ``k``/``v`` are
    ``[T, num_kv_heads, head_dim]``, the result is ``[T, num_heads, head_dim]``.

    ``forward_qkv`` is ``forward`` for q and k not yet rotated: ``qkv`` is
    ``[T, num_heads + 2 * num_kv_heads, head_dim]`` (q heads, then k, then v, as the fused
    projection lays them out) and ``rotary`` rotates q and k; an implementation may fold
    RoPE into its own kernels (``rotate_then_forward`` is the plain composition).
    """

    def init_forward_metadata(self, batch: ForwardBatch) -> None: ...

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_id: int,
        batch: ForwardBatch,
    ) -> torch.Tensor: ...

    def forward_qkv(
        self, qkv: torch.Tensor, num_heads: int, rotary: Rotary, layer_id: int, batch: ForwardBatch
    ) -> torch.Tensor: ...


class Rotary(Protocol):
    """RoPE of one forward pass (``backend.models.llama.Rotary``): the model's float32
    ``cos`` / ``sin_signed`` tables ``[max_len, head_dim]``, the pass's ``positions`` ``[T]``,
    and the call that rotates ``x`` ``[T, heads, head_dim]`` into a new contiguous tensor."""

    positions: torch.Tensor
    cos: torch.Tensor
    sin_signed: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def rotate_then_forward(
    backend: AttentionBackend,
    qkv: torch.Tensor,
    num_heads: int,
    rotary: Rotary,
    layer_id: int,
    batch: ForwardBatch,
) -> torch.Tensor:
    """``forward_qkv`` as RoPE (one call for q and k, neighbouring heads) then ``forward``."""
    num_kv_heads = (qkv.shape[1] - num_heads) // 2
    q, k = rotary(qkv[:, : num_heads + num_kv_heads]).split([num_heads, num_kv_heads], 1)
    return backend.forward(q, k, qkv[:, num_heads + num_kv_heads :], layer_id, batch)


def create_attention_backend(pool: KVPool, name: str = "auto") -> AttentionBackend:
    """The attention implementation for ``pool``'s device.

    ``"auto"``: Triton kernels when the pool is on CUDA, torch otherwise; ``"torch"`` or
    ``"triton"`` force one (Triton off CUDA needs ``TRITON_INTERPRET=1``, for tests).
    """
    if name == "auto":
        name = "triton" if pool.device.type == "cuda" else "torch"
    if name == "torch":
        from backend.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend(pool)
    if name == "triton":
        from backend.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend(pool)
    raise ValueError(f"attention backend must be 'auto', 'torch' or 'triton', got {name!r}")
