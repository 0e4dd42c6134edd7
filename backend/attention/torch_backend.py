"""CPU attention over the token-granular KV pool with ``scaled_dot_product_attention``.

EXTEND: per request, the queries of its new tokens attend to its cached prefix (gathered from
the pool) and causally to its new tokens; without a prefix the new keys are used directly
with ``is_causal``. DECODE on the CPU: the native kernel (``cpu_ops.decode_attention``) stores
the new K/V and attends over each request's slots in place, without gathering them — one
call per layer, single-threaded, so it is taken when torch runs one thread or the step is
small; otherwise one batched sdpa over a padded ``[B, Lmax]`` gather of each request's slots
with a key-padding mask, both built once per forward pass. Softmax scale is
``1 / sqrt(head_dim)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from backend import cpu_ops
from backend.attention.base import Rotary, rotate_then_forward
from backend.forward_batch import ForwardBatch, ForwardMode
from backend.kv_pool import KVPool

# With several torch threads, DECODE steps reading more KV tokens than this (summed over the
# batch) take the multi-threaded sdpa path instead of the single-threaded native kernel.
NATIVE_DECODE_MAX_KV_TOKENS = 8192


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
class _DecodeGroup:
    """Requests ``req_idx`` decoded together. When ``shared_slots`` is set, all of them
    start with those same slots (a prefix shared through the radix cache): attention over
    it is computed once for the whole group and merged with each request's own suffix."""

    req_idx: torch.Tensor | None  # [G] rows of the batch; None means all rows, in order
    shared_slots: torch.Tensor | None  # [Lp] slots common to every request of the group
    suffix_len: int  # padded length of the per-request suffixes
    suffix_slots: torch.Tensor  # [G * suffix_len] slots, padded with the scratch slot 0
    mask: torch.Tensor | None  # [G, 1, 1, suffix_len] bool (True = attend); None if no padding


@dataclass
class _DecodeMetadata:
    groups: list[_DecodeGroup]


@dataclass
class _NativeDecodeMetadata:
    """Slots ``[B, Lmax]`` (each row padded after its length) and lengths ``[B]``, int64."""

    slots: torch.Tensor
    lens: torch.Tensor


class TorchAttentionBackend:
    """``AttentionBackend`` for CPU tensors (works on any device torch's sdpa supports)."""

    def __init__(self, pool: KVPool) -> None:
        if pool.k_buffers[0].dtype.itemsize == 1:
            raise ValueError(
                f"the torch attention backend cannot read a {pool.k_buffers[0].dtype} KV cache; "
                "use the Triton backend (CUDA) or kv_cache_dtype='auto'"
            )
        self.pool = pool

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        """Precompute index tensors and masks once per forward pass."""
        device = self.pool.device
        if batch.mode == ForwardMode.DECODE:
            slots = [s.to(device=device, dtype=torch.int64) for s in batch.kv_slots]
            if self.decodes_natively(slots):
                batch.attn_metadata = _NativeDecodeMetadata(*padded_slots(slots))
            else:
                batch.attn_metadata = _DecodeMetadata(_decode_groups(slots))
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
        meta = batch.attn_metadata
        if isinstance(meta, _NativeDecodeMetadata):
            return cpu_ops.decode_attention(
                q, k, v, k_buf, v_buf, batch.out_cache_loc, meta.slots, meta.lens
            )
        k_buf.index_copy_(0, batch.out_cache_loc, k)
        v_buf.index_copy_(0, batch.out_cache_loc, v)
        if isinstance(meta, _DecodeMetadata):
            return self._decode(q, k_buf, v_buf, meta)
        return self._extend(q, k, v, k_buf, v_buf, meta)

    def forward_qkv(
        self, qkv: torch.Tensor, num_heads: int, rotary: Rotary, layer_id: int, batch: ForwardBatch
    ) -> torch.Tensor:
        """RoPE, then ``forward`` (``AttentionBackend``)."""
        return rotate_then_forward(self, qkv, num_heads, rotary, layer_id, batch)

    def decodes_natively(self, slots: list[torch.Tensor]) -> bool:
        """Whether a DECODE step over these slot lists runs the native kernel (see the
        module docstring)."""
        if not cpu_ops.supports(self.pool.k_buffers[0]):
            return False
        return torch.get_num_threads() == 1 or sum(map(len, slots)) <= NATIVE_DECODE_MAX_KV_TOKENS

    @staticmethod
    def _decode(
        q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, meta: _DecodeMetadata
    ) -> torch.Tensor:
        if len(meta.groups) == 1 and meta.groups[0].req_idx is None:
            return _decode_group(q, k_buf, v_buf, meta.groups[0])
        out = q.new_empty(q.shape)
        for group in meta.groups:
            out[group.req_idx] = _decode_group(q[group.req_idx], k_buf, v_buf, group)
        return out

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


# Below this many shared tokens, a separate pass over the shared prefix costs more than the
# copies it saves.
MIN_SHARED_PREFIX = 32


def padded_slots(slots: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The slot lists as int64 ``[B, Lmax]`` (rows padded with 0) and their lengths ``[B]``."""
    lens = torch.tensor([len(s) for s in slots], dtype=torch.int64)
    if len(slots) == 1 and slots[0].is_contiguous() and slots[0].dtype == torch.int64:
        return slots[0].view(1, -1), lens
    return pad_sequence(slots, batch_first=True, padding_value=0).to(torch.int64), lens


def _decode_groups(slots: list[torch.Tensor]) -> list[_DecodeGroup]:
    """Group decode requests by the KV prefix they share (same leading slot indices)."""
    by_first: dict[int, list[int]] = {}
    for i, s in enumerate(slots):
        by_first.setdefault(int(s[0]), []).append(i)
    groups: list[tuple[list[int], int]] = []
    loners: list[int] = []
    for members in by_first.values():
        shared = _common_prefix_len([slots[i] for i in members]) if len(members) > 1 else 0
        if shared >= MIN_SHARED_PREFIX:
            groups.append((members, shared))
        else:
            loners += members
    if loners:
        groups.append((sorted(loners), 0))
    everyone = len(groups) == 1
    return [_make_group(slots, members, shared, everyone) for members, shared in groups]


def _common_prefix_len(seqs: list[torch.Tensor]) -> int:
    n = min(int(s.numel()) for s in seqs)
    stacked = torch.stack([s[:n] for s in seqs])
    differs = (stacked != stacked[0]).any(0).nonzero()
    return int(differs[0]) if differs.numel() else n


def _make_group(
    slots: list[torch.Tensor], members: list[int], shared: int, everyone: bool
) -> _DecodeGroup:
    suffixes = [slots[i][shared:] for i in members]
    lens = [int(s.numel()) for s in suffixes]
    max_len = max(lens)
    padded = pad_sequence(suffixes, batch_first=True, padding_value=0)
    mask = None
    if min(lens) != max_len:
        lens_t = torch.tensor(lens, dtype=torch.int64, device=padded.device)
        mask = torch.arange(max_len, device=padded.device)[None, :] < lens_t[:, None]
        mask = mask.view(len(lens), 1, 1, max_len)
    return _DecodeGroup(
        req_idx=None if everyone else torch.tensor(members, device=padded.device),
        shared_slots=slots[members[0]][:shared] if shared else None,
        suffix_len=max_len,
        suffix_slots=padded.view(-1),
        mask=mask,
    )


def _decode_group(
    q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, group: _DecodeGroup
) -> torch.Tensor:
    """Attention ``[G, H, D]`` for one query per request of ``group``."""
    g, num_heads, head_dim = q.shape
    num_kv = k_buf.shape[1]
    shape = (g, group.suffix_len, num_kv, head_dim)
    keys = k_buf.index_select(0, group.suffix_slots).view(shape).transpose(1, 2)
    values = v_buf.index_select(0, group.suffix_slots).view(shape).transpose(1, 2)
    # GQA without copies: the query heads of one KV head act as that head's query rows.
    queries = q.view(g, num_kv, num_heads // num_kv, head_dim)
    if group.shared_slots is None:
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=group.mask)
        return out.reshape(g, num_heads, head_dim)
    scale = head_dim**-0.5
    # suffix part, per request: [G, Hkv, rep, Ls]
    scores = torch.matmul(queries, keys.transpose(-1, -2)).mul_(scale)
    if group.mask is not None:
        scores.masked_fill_(~group.mask, float("-inf"))
    lse_suffix = torch.logsumexp(scores, dim=-1, keepdim=True)
    out_suffix = torch.matmul(torch.exp(scores - lse_suffix), values)
    # shared part, once for the whole group: [Hkv, G * rep, Lp]
    rows = queries.permute(1, 0, 2, 3).reshape(num_kv, -1, head_dim)
    shared_k = k_buf.index_select(0, group.shared_slots).permute(1, 2, 0)  # [Hkv, D, Lp]
    shared_v = v_buf.index_select(0, group.shared_slots).transpose(0, 1)  # [Hkv, Lp, D]
    scores_p = torch.matmul(rows, shared_k).mul_(scale)
    lse_p = torch.logsumexp(scores_p, dim=-1, keepdim=True)
    out_p = torch.matmul(torch.exp(scores_p - lse_p), shared_v)
    out_p = out_p.view(num_kv, g, -1, head_dim).transpose(0, 1)
    lse_p = lse_p.view(num_kv, g, -1, 1).transpose(0, 1)
    # merge the two softmax pieces by their log-sum-exp weights
    lse = torch.logaddexp(lse_p, lse_suffix)
    out = out_p * torch.exp(lse_p - lse) + out_suffix * torch.exp(lse_suffix - lse)
    return out.reshape(g, num_heads, head_dim)
