"""GPU attention over the token-granular KV pool with our Triton kernels.

Same contract as ``TorchAttentionBackend`` (``backend/attention/base.py``). Per forward
pass, ``init_forward_metadata`` flattens the requests' slot lists into
``kv_indptr``/``kv_indices`` (one concatenation on the device) and, for DECODE, picks the
number of KV splits; the first layer allocates the float32 split scratch that every layer
reuses (in EXTEND it first picks how many chunks the cached prefixes split into, which
needs the number of query heads: a short extend over a long cached context then runs
chunks in parallel and merges them, as decode does). Per
layer, ``forward`` writes the new K/V with one kernel, then runs the extend kernel or the
decode kernels (``backend/attention/triton_kernels.py``); an extend pass whose last
requests add one token each (a mixed pass's running requests) runs the decode kernels for
those. In DECODE, ``forward_qkv`` folds RoPE and the KV write into the first decode kernel.

Decode steps can also run from CUDA graphs (``backend/cuda_graph_runner.py``), which
preset the metadata over static buffers. Not here: the torch backend's shared-prefix
grouping in decode.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch

from backend.attention import triton_kernels as tk
from backend.attention.base import Rotary, rotate_then_forward
from backend.forward_batch import ForwardBatch, ForwardMode
from backend.kv_pool import KVPool


@dataclass
class TritonAttnMetadata:
    """Index tensors of one forward pass (all on the pool's device)."""

    # (int32 from init_forward_metadata; int64 views of a static buffer in CUDA graphs)
    kv_indptr: torch.Tensor  # [B + 1] offsets of each request's slots in kv_indices
    kv_indices: torch.Tensor  # [sum(seq_lens)] int64 slots, prefix then new tokens
    # EXTEND (over the first B - decode_tail requests)
    qo_indptr: torch.Tensor | None = None  # [B + 1] offsets of the new tokens
    prefix_lens: torch.Tensor | None = None  # [B]
    max_extend_len: int = 0
    extend_lens: tuple[int, ...] = ()  # host values, with max_prefix_len: size the split
    max_prefix_len: int = 0
    # the trailing one-token requests' DECODE metadata (their attention is a decode step's)
    decode_tail: TritonAttnMetadata | None = None
    # Splits over the KV (DECODE: each request's slots; EXTEND: each cached prefix; 0: the
    # first layer chooses, when the number of query heads is known) and their float32
    # scratch, allocated by the first layer and reused by the others.
    num_kv_splits: int = 1
    mid_o: torch.Tensor | None = None  # [B or T, H, S, D]
    mid_lse: torch.Tensor | None = None  # [B or T, H, S]

    @property
    def num_requests(self) -> int:
        return self.kv_indptr.numel() - 1


class TritonAttentionBackend:
    """``AttentionBackend`` running Triton kernels (CUDA; CPU under ``TRITON_INTERPRET=1``).

    ``num_kv_splits`` fixes the decode split count and ``num_extend_splits`` the extend
    kernel's split of the cached prefixes (tests, CUDA graphs); by default each is chosen
    per pass (``triton_kernels.choose_num_splits``) from the programs of one split and the
    longest context (decode) or cached prefix (extend); prefix chunks are at least
    ``min_prefix_split_len`` tokens.
    Block sizes default per device (``triton_kernels.extend_config`` /
    ``default_decode_config``) and can be overridden.
    """

    def __init__(
        self,
        pool: KVPool,
        *,
        num_kv_splits: int | None = None,
        num_extend_splits: int | None = None,
        min_prefix_split_len: int = tk.MIN_PREFIX_SPLIT_LEN,
        max_kv_splits: int = 16,
        extend_block_m: int | None = None,
        extend_block_n: int | None = None,
        decode_block_n: int | None = None,
    ) -> None:
        self.pool = pool
        self.device = pool.device
        self.num_kv_heads = int(pool.k_buffers[0].shape[1])
        self.head_dim = int(pool.k_buffers[0].shape[2])
        self.num_kv_splits = num_kv_splits
        self.num_extend_splits = num_extend_splits
        self.min_prefix_split_len = min_prefix_split_len
        self.max_kv_splits = max_kv_splits
        self.extend_block_m = extend_block_m
        self.extend_block_n = extend_block_n
        self.decode_block_n = decode_block_n
        self.num_sms = (
            torch.cuda.get_device_properties(self.device).multi_processor_count
            if self.device.type == "cuda"
            else 1
        )

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        """Flatten the slot lists; for DECODE choose the number of splits."""
        device = self.device
        seq_lens = batch.seq_lens
        kv_indptr = _indptr(seq_lens, device)
        if batch.kv_slots:  # one concatenation where the slots are, one copy to the device
            kv_indices = torch.cat(batch.kv_slots).to(device=device, dtype=torch.int64)
        else:
            kv_indices = torch.zeros(1, dtype=torch.int64, device=device)
        if batch.mode == ForwardMode.EXTEND:
            tail = _one_token_tail(batch.extend_lens)
            head = batch.extend_lens[: batch.batch_size - tail]
            batch.attn_metadata = TritonAttnMetadata(
                kv_indptr=kv_indptr,
                kv_indices=kv_indices,
                qo_indptr=_indptr(head, device),
                prefix_lens=torch.tensor(
                    batch.prefix_lens[: len(head)], dtype=torch.int32, device=device
                ),
                max_extend_len=max(head, default=0),
                extend_lens=tuple(head),
                max_prefix_len=max(batch.prefix_lens[: len(head)], default=0),
                num_kv_splits=self.num_extend_splits or 0,
            )
            if tail:  # kv_indptr's tail as its own tensor: a view would change the pointer
                # alignment Triton specializes on from pass to pass (a compilation each)
                batch.attn_metadata.decode_tail = TritonAttnMetadata(
                    kv_indptr=kv_indptr[len(head) :].clone(),
                    kv_indices=kv_indices,
                    num_kv_splits=self._splits(seq_lens[len(head) :]),
                )
            return
        splits = self._splits(seq_lens)
        # The split scratch is allocated by the first layer (the pool does not know the
        # number of query heads) and reused by the others.
        batch.attn_metadata = TritonAttnMetadata(
            kv_indptr=kv_indptr, kv_indices=kv_indices, num_kv_splits=splits
        )

    def _splits(self, seq_lens: list[int]) -> int:
        return self.num_kv_splits or tk.choose_num_splits(
            len(seq_lens) * self.num_kv_heads,
            max(seq_lens, default=1),
            self.num_sms,
            max_splits=self.max_kv_splits,
        )

    def _extend_scratch(self, q: torch.Tensor, meta: TritonAttnMetadata) -> None:
        """At a pass's first layer: choose the prefix split (programs per split: the
        requests' query blocks x head groups) and allocate its scratch."""
        if meta.num_kv_splits == 0:
            num_heads = q.shape[1]
            config = tk.extend_config(
                len(meta.extend_lens),
                meta.max_extend_len,
                num_heads,
                self.num_kv_heads,
                q.shape[2],
                q.dtype,
                q.device,
                block_m=self.extend_block_m,
            )
            blocks = sum(-(-n // config.block_t) for n in meta.extend_lens)
            meta.num_kv_splits = tk.choose_num_splits(
                blocks * (num_heads // config.heads),
                meta.max_prefix_len,
                self.num_sms,
                max_splits=self.max_kv_splits,
                min_split_len=self.min_prefix_split_len,
                occupancy=1,
            )
        if meta.num_kv_splits > 1 and meta.mid_o is None:
            meta.mid_o, meta.mid_lse = tk.split_partial_buffers(
                q.shape[0], q.shape[1], q.shape[2], meta.num_kv_splits, q.device
            )

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_id: int,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        """Store ``k``/``v`` at ``batch.out_cache_loc``; return attention ``[T, H, D]``."""
        meta: TritonAttnMetadata = batch.attn_metadata
        k_buf = self.pool.k_buffers[layer_id]
        v_buf = self.pool.v_buffers[layer_id]
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        tk.store_kv(k_buf, v_buf, batch.out_cache_loc, k, v)
        if batch.mode == ForwardMode.DECODE:
            return self._decode(q, layer_id, meta)
        out = torch.empty_like(q)
        assert meta.qo_indptr is not None and meta.prefix_lens is not None
        tail = meta.decode_tail
        head = q.shape[0] - (tail.num_requests if tail else 0)  # tokens for the extend kernel
        if head:
            self._extend_scratch(q, meta)
            tk.extend_attention(
                q[:head],
                k[:head],
                v[:head],
                out[:head],
                k_buf,
                v_buf,
                meta.qo_indptr,
                meta.kv_indptr,
                meta.kv_indices,
                meta.prefix_lens,
                meta.max_extend_len,
                block_m=self.extend_block_m,
                block_n=self.extend_block_n,
                num_splits=meta.num_kv_splits,
                min_split_len=self.min_prefix_split_len,
                mid_o=meta.mid_o,
                mid_lse=meta.mid_lse,
            )
        if tail:  # their new K/V is in the pool now, as a decode step expects
            self._decode(q[head:], layer_id, tail, out=out[head:])
        return out

    def forward_qkv(
        self, qkv: torch.Tensor, num_heads: int, rotary: Rotary, layer_id: int, batch: ForwardBatch
    ) -> torch.Tensor:
        """``AttentionBackend.forward_qkv``: in DECODE, RoPE and the KV write run inside the
        first decode kernel (``triton_kernels.DecodeRope``); otherwise RoPE, then ``forward``."""
        if batch.mode != ForwardMode.DECODE or qkv.stride(-1) != 1:
            return rotate_then_forward(self, qkv, num_heads, rotary, layer_id, batch)
        num_kv_heads = (qkv.shape[1] - num_heads) // 2
        rope = tk.DecodeRope(
            k=qkv[:, num_heads : num_heads + num_kv_heads],
            v=qkv[:, num_heads + num_kv_heads :],
            loc=batch.out_cache_loc,
            positions=rotary.positions,
            cos=rotary.cos,
            sin_signed=rotary.sin_signed,
        )
        return self._decode(qkv[:, :num_heads], layer_id, batch.attn_metadata, rope)

    def _decode(
        self,
        q: torch.Tensor,
        layer_id: int,
        meta: TritonAttnMetadata,
        rope: tk.DecodeRope | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The decode kernels over layer ``layer_id``'s pool (``rope``: q and the new K/V
        still to rotate and store); writes and returns ``out`` (a new ``[B, H, D]`` tensor
        when not given)."""
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if meta.mid_o is None:
            meta.mid_o, meta.mid_lse = tk.split_partial_buffers(
                q.shape[0], q.shape[1], q.shape[2], meta.num_kv_splits, q.device
            )
        tk.decode_attention(
            q,
            self.pool.k_buffers[layer_id],
            self.pool.v_buffers[layer_id],
            out,
            meta.kv_indptr,
            meta.kv_indices,
            meta.num_kv_splits,
            mid_o=meta.mid_o,
            mid_lse=meta.mid_lse,
            block_n=self.decode_block_n,
            rope=rope,
        )
        return out


def _one_token_tail(extend_lens: list[int]) -> int:
    """How many requests at the end of an extend batch add one token each (a mixed pass's
    decoding requests): their attention is a decode step's, and the decode kernels read
    each KV head once for its whole query group where the extend kernel reads it per head."""
    tail = 0
    for n in reversed(extend_lens):
        if n != 1:
            break
        tail += 1
    return tail


def _indptr(lengths: list[int], device: torch.device) -> torch.Tensor:
    """``[0, l0, l0 + l1, ...]`` as int32 on ``device`` (built on the host: lengths are host
    values, so no device synchronization)."""
    return torch.tensor([0, *accumulate(lengths)], dtype=torch.int32, device=device)
