"""What one forward pass computes: the batch layout shared by the model and attention.

A batch is ragged: the new tokens of every request are concatenated into one flat
sequence of ``T`` tokens. Request ``i`` contributes ``extend_lens[i]`` new tokens that
attend to its ``prefix_lens[i]`` cached tokens and causally to each other.
``kv_slots[i]`` lists the pool slots of all ``prefix_lens[i] + extend_lens[i]`` tokens of
request ``i`` in order; the new tokens' keys and values are written to ``out_cache_loc``
(the tail of each ``kv_slots[i]``) before attention reads them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from backend.attention.base import AttentionBackend


class ForwardMode(enum.Enum):
    EXTEND = "extend"  # prefill of new tokens (any count per request) over a cached prefix
    DECODE = "decode"  # exactly one new token per request


@dataclass
class ForwardBatch:
    mode: ForwardMode
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    out_cache_loc: torch.Tensor  # [T] int64 pool slots of the new tokens
    prefix_lens: list[int]  # [B]
    extend_lens: list[int]  # [B]
    kv_slots: list[torch.Tensor]  # [B] each [prefix_len + extend_len] int64
    attn_backend: AttentionBackend
    attn_metadata: Any = field(default=None)  # filled by attn_backend.init_forward_metadata

    @property
    def batch_size(self) -> int:
        return len(self.extend_lens)

    @property
    def seq_lens(self) -> list[int]:
        return [p + e for p, e in zip(self.prefix_lens, self.extend_lens)]
