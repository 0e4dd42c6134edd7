"""The attention interface every implementation (torch on CPU, Triton on GPU) provides."""

from __future__ import annotations

from typing import Protocol

import torch

from backend.forward_batch import ForwardBatch


class AttentionBackend(Protocol):
    """Paged attention over the token-granular KV pool.

    ``init_forward_metadata`` runs once per forward pass and stores whatever the
    implementation precomputes (index tensors, masks) in ``batch.attn_metadata``.
    ``forward`` runs once per layer: it writes ``k``/``v`` of the new tokens to the pool at
    ``batch.out_cache_loc`` and returns the attention output for the new tokens.
    Shapes: ``q`` is ``[T, num_heads, head_dim]``, ``k``/``v`` are
    ``[T, num_kv_heads, head_dim]``, the result is ``[T, num_heads, head_dim]``.
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
