"""Turns scheduled work into one ForwardBatch, runs the model, returns hidden states."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from backend.attention.base import AttentionBackend
from backend.attention.torch_backend import TorchAttentionBackend, padded_slots
from backend.forward_batch import ForwardBatch, ForwardMode
from backend.kv_pool import KVPool, ReqToTokenTable
from backend.models.llama import CausalLM

if TYPE_CHECKING:
    from backend.cuda_graph_runner import CudaGraphRunner
    from backend.native_decoder import NativeDecoder
    from backend.prefill_graph_runner import PrefillGraphRunner


class ModelRunner:
    """Runs forward passes for rows of the ReqToTokenTable.

    Before a call, the table row of every request must already list the slots of its
    prefix and of the new tokens (the scheduler allocates them). The table may live on the
    host while the model and the pool are on a GPU: the slots a pass needs travel with it.
    With ``cuda_graph_sizes`` (CUDA, Triton attention, host table), decode steps of up to
    the largest size replay captured graphs (``backend/cuda_graph_runner.py``); with
    ``prefill_graph_sizes``, so do prefill passes of up to the largest token count and
    ``prefill_graph_runner.MAX_REQUESTS`` requests (``backend/prefill_graph_runner.py``). With a
    ``native_decoder`` (CPU models it supports), decode steps that the attention backend
    would run natively and that it takes are one native call (``backend/native_decoder.py``).
    """

    def __init__(
        self,
        model: CausalLM,
        table: ReqToTokenTable,
        attn_backend: AttentionBackend,
        pool: KVPool | None = None,
        cuda_graph_sizes: Sequence[int] = (),
        native_decoder: NativeDecoder | None = None,
        prefill_graph_sizes: Sequence[int] = (),
    ) -> None:
        self.model = model
        self.table = table
        self.attn_backend = attn_backend
        self.native_decoder = native_decoder
        self.device = pool.device if pool is not None else table.table.device
        self.graphs: CudaGraphRunner | None = None
        self.prefill_graphs: PrefillGraphRunner | None = None
        if cuda_graph_sizes or prefill_graph_sizes:
            from backend.attention.triton_backend import TritonAttentionBackend
            from backend.cuda_graph_runner import CudaGraphRunner
            from backend.prefill_graph_runner import PrefillGraphRunner

            if not isinstance(attn_backend, TritonAttentionBackend):
                raise ValueError("CUDA graphs need the Triton attention backend")
            if table.table.device.type != "cpu":
                raise ValueError("CUDA graphs read the request table from the host")
            if cuda_graph_sizes:
                self.graphs = CudaGraphRunner(
                    model, attn_backend, table.table.shape[1], cuda_graph_sizes
                )
            if prefill_graph_sizes:
                self.prefill_graphs = PrefillGraphRunner(
                    model, attn_backend, table.table.shape[1], prefill_graph_sizes
                )

    @torch.inference_mode()
    def extend(
        self, rows: Sequence[int], prefix_lens: Sequence[int], new_tokens: Sequence[Sequence[int]]
    ) -> torch.Tensor:
        """Prefill ``new_tokens[i]`` of request row ``rows[i]`` after ``prefix_lens[i]`` cached
        tokens. Returns hidden states ``[sum(len(new_tokens)), hidden]``; from a prefill
        graph (when one takes the pass) they are valid until the next `extend`."""
        extend_lens = [len(t) for t in new_tokens]
        ids = [tok for toks in new_tokens for tok in toks]
        graphs = self.prefill_graphs
        if graphs is not None and graphs.can_run(prefix_lens, extend_lens):
            return graphs.run(self.table.table, rows, prefix_lens, extend_lens, ids)
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

    def uses_graph(self, batch_size: int) -> bool:
        """Whether a decode step of ``batch_size`` requests replays a CUDA graph."""
        return self.graphs is not None and self.graphs.can_run(batch_size)

    @torch.inference_mode()
    def decode_logits(
        self,
        rows: Sequence[int],
        seq_lens: Sequence[int],
        last_tokens: Sequence[int] | torch.Tensor,
    ) -> torch.Tensor:
        """`decode` followed by `logits`: float32 ``[B, vocab]``, from a CUDA graph when one
        was captured for the batch size (valid until the next decode step). With a graph,
        ``last_tokens`` may be a device tensor (ids the host has not seen)."""
        if self.graphs is not None and self.graphs.can_run(len(rows)):
            return self.graphs.run(self.table.table, rows, seq_lens, last_tokens)
        if isinstance(last_tokens, torch.Tensor):
            raise ValueError("device-side input ids need a captured CUDA graph")
        if self.native_decoder is not None and rows and self.native_decoder.takes(len(rows)):
            slots = [self.table.table[r, :n] for r, n in zip(rows, seq_lens)]
            if isinstance(self.attn_backend, TorchAttentionBackend) and (
                self.attn_backend.decodes_natively(slots)
            ):
                positions = [n - 1 for n in seq_lens]
                padded, lens = padded_slots(slots)
                return self.native_decoder.logits(
                    last_tokens, positions, self.table.table[list(rows), positions], padded, lens
                )
        return self.logits(self.decode(rows, seq_lens, last_tokens))

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
            input_ids=torch.tensor(ids, dtype=torch.int64).to(self.device, non_blocking=True),
            positions=positions.to(self.device, non_blocking=True),
            out_cache_loc=out_cache_loc.to(self.device, non_blocking=True),
            prefix_lens=list(prefix_lens),
            extend_lens=list(extend_lens),
            kv_slots=kv_slots,
            attn_backend=self.attn_backend,
        )
        self.attn_backend.init_forward_metadata(batch)
        return self.model(batch)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, prefill: bool = False) -> torch.Tensor:
        """Float32 logits ``[N, vocab]`` for the selected hidden rows (``prefill``: rows of a
        prefill pass)."""
        return self.model.compute_logits(hidden, prefill)
