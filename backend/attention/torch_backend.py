"""CPU attention over the token-granular KV pool with ``scaled_dot_product_attention``.

EXTEND: per request, the queries of its new tokens attend to its cached prefix (gathered from
the pool) and causally to its new tokens; without a prefix the new keys are used directly
with ``is_causal``. DECODE: one batched attention over a padded ``[B, Lmax]`` gather of each
request's slots with a key-padding mask, both built once per forward pass.
Softmax scale is ``1 / sqrt(head_dim)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from backend.forward_batch import ForwardBatch, ForwardMode
from backend.kv_pool import KVPool


@dataclass
class _Segment:
    """The new tokens ``[start, end)`` of one EXTEND request and what they attend to."""

    start: int
    end: int
    kv_slots: torch.Tensor | None  # all prefix + new slots; None when there is no prefix
    mask: torch.Tensor | None  # [extend_len, prefix_len + extend_len] bool; None if no prefix


@dataclass
class _ExtendMetadata:
    segments: list[_Segment]


@dataclass
class _DecodeMetadata:
    batch_size: int
    max_len: int
    flat_slots: torch.Tensor  # [B * Lmax] slots, padded with the scratch slot 0
    mask: torch.Tensor | None  # [B, 1, 1, Lmax] bool (True = attend); None if no padding


class TorchAttentionBackend:
    """``AttentionBackend`` for CPU tensors (works on any device torch's sdpa supports)."""

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        """Precompute index tensors and masks once per forward pass."""
        device = self.pool.device
        if batch.mode == ForwardMode.DECODE:
            slots = [s.to(device=device, dtype=torch.int64) for s in batch.kv_slots]
            lens = [int(s.numel()) for s in slots]
            max_len = max(lens)
            padded = pad_sequence(slots, batch_first=True, padding_value=0)
            mask = None
            if min(lens) != max_len:
                lens_t = torch.tensor(lens, dtype=torch.int64, device=device)
                mask = torch.arange(max_len, device=device)[None, :] < lens_t[:, None]
                mask = mask.view(len(lens), 1, 1, max_len)
            batch.attn_metadata = _DecodeMetadata(len(lens), max_len, padded.view(-1), mask)
            return
        segments: list[_Segment] = []
        start = 0
        lens = zip(batch.prefix_lens, batch.extend_lens, batch.kv_slots, strict=True)
        for prefix, extend, slots in lens:
            end = start + extend
            if extend == 0:
                continue
            if prefix == 0:
                segments.append(_Segment(start, end, None, None))
            else:
                rows = torch.arange(extend, device=device)[:, None] + prefix
                mask = torch.arange(prefix + extend, device=device)[None, :] <= rows
                segments.append(_Segment(start, end, slots.to(device, torch.int64), mask))
            start = end
        batch.attn_metadata = _ExtendMetadata(segments)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_id: int,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        """Store ``k``/``v`` at ``batch.out_cache_loc``; return attention ``[T, H, D]``."""
        k_buf = self.pool.k_buffers[layer_id]
        v_buf = self.pool.v_buffers[layer_id]
        k_buf.index_copy_(0, batch.out_cache_loc, k)
        v_buf.index_copy_(0, batch.out_cache_loc, v)
        meta = batch.attn_metadata
        if isinstance(meta, _DecodeMetadata):
            return self._decode(q, k_buf, v_buf, meta)
        return self._extend(q, k, v, k_buf, v_buf, meta)

    @staticmethod
    def _decode(
        q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, meta: _DecodeMetadata
    ) -> torch.Tensor:
        b, num_heads, head_dim = q.shape
        num_kv = k_buf.shape[1]
        shape = (b, meta.max_len, num_kv, head_dim)
        keys = k_buf.index_select(0, meta.flat_slots).view(shape).transpose(1, 2)
        values = v_buf.index_select(0, meta.flat_slots).view(shape).transpose(1, 2)
        # GQA without copies: the query heads of one KV head act as that head's query rows.
        queries = q.view(b, num_kv, num_heads // num_kv, head_dim)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=meta.mask)
        return out.reshape(b, num_heads, head_dim)

    @staticmethod
    def _extend(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_buf: torch.Tensor,
        v_buf: torch.Tensor,
        meta: _ExtendMetadata,
    ) -> torch.Tensor:
        gqa = q.shape[1] != k.shape[1]
        segments = meta.segments
        if len(segments) == 1 and segments[0].end - segments[0].start == q.shape[0]:
            return _attend_segment(q, k, v, k_buf, v_buf, segments[0], gqa)
        out = q.new_empty(q.shape)
        for seg in segments:
            out[seg.start : seg.end] = _attend_segment(q, k, v, k_buf, v_buf, seg, gqa)
        return out


def _attend_segment(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    seg: _Segment,
    gqa: bool,
) -> torch.Tensor:
    """Attention output ``[extend_len, H, D]`` of one EXTEND request.

    Inputs are given to sdpa as 4-D ``[1, heads, len, D]`` views: its fused CPU kernel takes
    those (3-D inputs fall back to a slower path).
    """
    queries = q[seg.start : seg.end].transpose(0, 1).unsqueeze(0)
    if seg.kv_slots is None:
        keys = k[seg.start : seg.end].transpose(0, 1).unsqueeze(0)
        values = v[seg.start : seg.end].transpose(0, 1).unsqueeze(0)
        res = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, enable_gqa=gqa)
    else:
        keys = k_buf.index_select(0, seg.kv_slots).transpose(0, 1).unsqueeze(0)
        values = v_buf.index_select(0, seg.kv_slots).transpose(0, 1).unsqueeze(0)
        res = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=seg.mask, enable_gqa=gqa
        )
    return res[0].transpose(0, 1)
