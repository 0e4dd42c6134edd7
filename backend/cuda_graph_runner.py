"""Decode steps replayed from CUDA graphs.

A decode step of a large model on a GPU launches a few hundred small kernels; launched one by
one from Python, they cost more than the GPU needs to run them at small batch sizes. At
start-up, `CudaGraphRunner` captures one graph per batch size in ``batch_sizes``, each
running the whole decode forward pass and the logits over static device buffers:

- ``input_ids``, ``positions``, ``out_cache_loc`` ``[max_bs]``, ``kv_indptr`` ``[max_bs + 1]``
  and ``kv_indices`` ``[max_bs * max_context_len]`` are slices of one int64 device buffer,
  filled for each step by a single host-to-device copy from a pinned twin;
- the attention metadata (number of KV splits, split scratch) is fixed per captured size.

`run` pads a batch of ``B`` requests to the next captured size: padding rows read token 0
at position 0 and attend to, and write, the scratch slot 0 of the KV pool (never handed
out), so they cannot disturb real requests. It returns the first ``B`` rows of the graph's
static logits, which stay valid until the next `run` (stream order: work the caller
enqueues after `run` reads them before the next replay overwrites them).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

import numpy as np
import torch

from backend.attention import triton_kernels as tk
from backend.attention.triton_backend import TritonAttentionBackend, TritonAttnMetadata
from backend.forward_batch import ForwardBatch, ForwardMode
from backend.models.llama import CausalLM

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128)
DEFAULT_BATCH_SIZES += tuple(range(160, 1025, 32))


def capture_sizes(max_bs: int) -> list[int]:
    """The default captured batch sizes up to ``max_bs`` (``max_bs`` itself included)."""
    sizes = [s for s in DEFAULT_BATCH_SIZES if s < max_bs]
    return [*sizes, max_bs]


class StaticInputs:
    """The int64 inputs of captured graphs: one device buffer (``device_buf``) filled from
    pinned host twins used in turn. `host` waits until its twin's previous copy has left
    and returns the twin as a numpy array to fill; `upload` copies the twin's first ``n``
    values to the device (stream-ordered before the next replay) and turns to the next twin.
    Two twins let the next step be packed while the last copy may still wait in the stream."""

    def __init__(self, size: int, device: torch.device, twins: int = 2) -> None:
        self.device_buf = torch.zeros(size, dtype=torch.int64, device=device)
        self._twins = [torch.zeros(size, dtype=torch.int64, pin_memory=True) for _ in range(twins)]
        self._copied: list[torch.cuda.Event | None] = [None] * twins
        self._turn = 0

    def host(self) -> np.ndarray:
        fence = self._copied[self._turn]
        if fence is not None:
            fence.synchronize()
        return self._twins[self._turn].numpy()

    def upload(self, n: int) -> None:
        self.device_buf[:n].copy_(self._twins[self._turn][:n], non_blocking=True)
        fence = self._copied[self._turn] = torch.cuda.Event()
        fence.record()
        self._turn = (self._turn + 1) % len(self._twins)


def capture_graphs(
    sizes: Sequence[int], device: torch.device, forward: Callable[[int], torch.Tensor]
) -> tuple[dict[int, torch.cuda.CUDAGraph], dict[int, torch.Tensor]]:
    """One graph per size, each recording ``forward(size)`` (which returns its static
    output); largest first, so that the smaller graphs reuse its memory pool. Each size runs
    twice eagerly on the capture stream first (Triton compiles, the allocator warms up).
    Returns the graphs and their outputs by size."""
    graphs: dict[int, torch.cuda.CUDAGraph] = {}
    outputs: dict[int, torch.Tensor] = {}
    pool = torch.cuda.graph_pool_handle()
    stream = torch.cuda.Stream(device)
    for size in sorted(sizes, reverse=True):
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                forward(size)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            outputs[size] = forward(size)
        graphs[size] = graph
    torch.cuda.synchronize(device)
    return graphs, outputs


class CudaGraphRunner:
    """Captured decode graphs over one model, KV pool and Triton attention backend."""

    def __init__(
        self,
        model: CausalLM,
        attn_backend: TritonAttentionBackend,
        max_context_len: int,
        batch_sizes: Sequence[int],
    ) -> None:
        if not batch_sizes:
            raise ValueError("batch_sizes must not be empty")
        self.model = model
        self.attn_backend = attn_backend
        self.device = attn_backend.device
        self.sizes = sorted(set(batch_sizes))
        self.max_bs = self.sizes[-1]
        self.max_context_len = max_context_len
        mb = self.max_bs
        # Offsets of the static inputs in the one int64 buffer.
        self._ids, self._pos, self._loc, self._indptr = 0, mb, 2 * mb, 3 * mb
        self._indices = 4 * mb + 1
        size = self._indices + mb * max_context_len
        # Two twins: with overlapped steps, step N + 1 is packed while N's copy may wait.
        self._inputs = StaticInputs(size, self.device, twins=2)
        self._batches = {bs: self._batch(bs) for bs in self.sizes}
        self._capture_all()

    def can_run(self, batch_size: int) -> bool:
        return 0 < batch_size <= self.max_bs

    def run(
        self,
        table: torch.Tensor,
        rows: Sequence[int],
        seq_lens: Sequence[int],
        last_tokens: Sequence[int] | torch.Tensor,
    ) -> torch.Tensor:
        """Float32 logits ``[B, vocab]`` of one decode step.

        ``table`` is the host ``ReqToTokenTable`` tensor: row ``rows[i]`` lists the slots of
        request ``i``'s ``seq_lens[i]`` tokens, the last being the slot of ``last_tokens[i]``.
        ``last_tokens`` may be a device tensor (the previous step's sampled ids, never seen
        by the host): it is copied into the graph's input on the device.
        """
        b = len(rows)
        bs = self.sizes[bisect.bisect_left(self.sizes, b)]
        host = self._inputs.host()
        lens = np.asarray(seq_lens, dtype=np.int64)
        table_np = table.numpy()
        on_device = isinstance(last_tokens, torch.Tensor)
        host[self._ids : self._ids + bs] = 0
        if not on_device:
            host[self._ids : self._ids + b] = last_tokens
        host[self._pos : self._pos + b] = lens - 1
        host[self._pos + b : self._pos + bs] = 0
        host[self._loc : self._loc + b] = table_np[np.asarray(rows), lens - 1]
        host[self._loc + b : self._loc + bs] = 0
        indptr = host[self._indptr : self._indptr + bs + 1]
        indptr[0] = 0
        np.cumsum(lens, out=indptr[1 : b + 1])
        total = int(indptr[b])
        indptr[b + 1 :] = total + np.arange(1, bs - b + 1)  # one scratch slot per padding row
        start = self._indices
        for row, n in zip(rows, seq_lens):
            host[start : start + n] = table_np[row, :n]
            start += n
        host[start : start + bs - b] = 0
        used = start + bs - b
        self._inputs.upload(used)
        if on_device:
            self._inputs.device_buf[self._ids : self._ids + b].copy_(last_tokens)
        self._graphs[bs].replay()
        return self._logits[bs][:b]

    # ---- capture ----------------------------------------------------------------------

    def _batch(self, bs: int) -> ForwardBatch:
        """A ForwardBatch over the static buffers, with its attention metadata preset."""
        buf = self._inputs.device_buf
        num_heads = self.model.num_heads
        splits = tk.choose_num_splits(
            bs * self.attn_backend.num_kv_heads,
            self.max_context_len,
            self.attn_backend.num_sms,
            max_splits=self.attn_backend.max_kv_splits,
        )
        mid_o, mid_lse = tk.split_partial_buffers(
            bs, num_heads, self.model.head_dim, splits, self.device
        )
        batch = ForwardBatch(
            mode=ForwardMode.DECODE,
            input_ids=buf[self._ids : self._ids + bs],
            positions=buf[self._pos : self._pos + bs],
            out_cache_loc=buf[self._loc : self._loc + bs],
            prefix_lens=[0] * bs,
            extend_lens=[1] * bs,
            kv_slots=[],
            attn_backend=self.attn_backend,
        )
        batch.attn_metadata = TritonAttnMetadata(
            kv_indptr=buf[self._indptr : self._indptr + bs + 1],
            kv_indices=buf[self._indices :],
            num_kv_splits=splits,
            mid_o=mid_o,
            mid_lse=mid_lse,
        )
        return batch

    def _forward(self, bs: int) -> torch.Tensor:
        return self.model.compute_logits(self.model(self._batches[bs]))

    @torch.inference_mode()
    def _capture_all(self) -> None:
        # Dummy step: every row reads token 0 at position 0 over the scratch slot 0.
        mb = self.max_bs
        buf = self._inputs.device_buf
        buf.zero_()
        buf[self._indptr : self._indptr + mb + 1] = torch.arange(mb + 1)
        self._graphs, self._logits = capture_graphs(self.sizes, self.device, self._forward)
