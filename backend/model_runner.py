"""Turns scheduled work into one ForwardBatch, runs the model, returns hidden states."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from backend.attention.base import AttentionBackend
from backend.forward_batch import ForwardBatch, ForwardMode
from backend.kv_pool import ReqToTokenTable
from backend.models.llama import CausalLM


class ModelRunner:
    """Runs forward passes for rows of the ReqToTokenTable.

    Before a call, the table row of every request must already list the slots of its
    prefix and of the new tokens (the scheduler allocates them).
    """

    def __init__(
        self, model: CausalLM, table: ReqToTokenTable, attn_backend: AttentionBackend
    ) -> None:
        self.model = model
        self.table = table
        self.attn_backend = attn_backend
        self.device = table.table.device

    @torch.inference_mode()
    def extend(
        self, rows: Sequence[int], prefix_lens: Sequence[int], new_tokens: Sequence[Sequence[int]]
    ) -> torch.Tensor:
        """Prefill ``new_tokens[i]`` of request row ``rows[i]`` after ``prefix_lens[i]`` cached
        tokens. Returns hidden states ``[sum(len(new_tokens)), hidden]``."""
        extend_lens = [len(t) for t in new_tokens]
        ids = [tok for toks in new_tokens for tok in toks]
        positions = torch.cat(
            [torch.arange(p, p + n, dtype=torch.int64) for p, n in zip(prefix_lens, extend_lens)]
        )
        kv_slots = [self.table.table[r, : p + n] for r, p, n in zip(rows, prefix_lens, extend_lens)]
        out_cache_loc = torch.cat([s[p:] for s, p in zip(kv_slots, prefix_lens)])
        return self._run(
            ForwardMode.EXTEND, ids, positions, out_cache_loc, prefix_lens, extend_lens, kv_slots
        )

    @torch.inference_mode()
    def decode(
        self, rows: Sequence[int], seq_lens: Sequence[int], last_tokens: Sequence[int]
    ) -> torch.Tensor:
        """One new token per request: ``last_tokens[i]`` at position ``seq_lens[i] - 1``."""
        prefix_lens = [n - 1 for n in seq_lens]
        kv_slots = [self.table.table[r, :n] for r, n in zip(rows, seq_lens)]
        positions = torch.tensor(prefix_lens, dtype=torch.int64)
        out_cache_loc = self.table.table[list(rows), prefix_lens] if rows else torch.empty(0)
        return self._run(
            ForwardMode.DECODE,
            list(last_tokens),
            positions,
            out_cache_loc,
            prefix_lens,
            [1] * len(rows),
            kv_slots,
        )

    def _run(
        self,
        mode: ForwardMode,
        ids: list[int],
        positions: torch.Tensor,
        out_cache_loc: torch.Tensor,
        prefix_lens: Sequence[int],
        extend_lens: Sequence[int],
        kv_slots: list[torch.Tensor],
    ) -> torch.Tensor:
        batch = ForwardBatch(
            mode=mode,
            input_ids=torch.tensor(ids, dtype=torch.int64, device=self.device),
            positions=positions.to(self.device),
            out_cache_loc=out_cache_loc.to(self.device),
            prefix_lens=list(prefix_lens),
            extend_lens=list(extend_lens),
            kv_slots=kv_slots,
            attn_backend=self.attn_backend,
        )
        self.attn_backend.init_forward_metadata(batch)
        return self.model(batch)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[N, vocab]`` for the selected hidden rows."""
        return self.model.compute_logits(hidden)
