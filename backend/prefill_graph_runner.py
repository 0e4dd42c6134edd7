"""Small prefill passes replayed from CUDA graphs.

A prefill pass of a few dozen tokens per request -- a program's ``gen`` after a cached
prefix (or a batch of programs' gens), a short prompt, a chunk of one -- launches about
ten kernels per layer, and on a GPU launching them from Python takes longer than running
them (Llama-3-8B on an H100: ~13 ms of launches for ~5 ms of GPU work).
`PrefillGraphRunner` captures at start-up one graph per token count in ``token_sizes``,
each running the model's forward pass (hidden states, not logits: the scheduler picks the
rows it needs) over static device buffers for up to ``max_requests`` requests:

- ``input_ids``, ``positions``, ``out_cache_loc`` ``[max_tokens]``, ``qo_indptr`` and
  ``kv_indptr`` ``[max_requests + 1]``, ``prefix_lens`` ``[max_requests]`` and
  ``kv_indices`` (``kv_capacity`` slots: the requests' slot lists together) are slices of
  one int64 device buffer, filled for each pass by one host-to-device copy from a pinned
  twin;
- the extend kernel's grid is fixed per graph: ``min(max_requests, tokens)`` requests (a
  request adds at least one token) of up to the graph's token count each, times
  ``prefix_splits(tokens)`` chunks of each cached prefix (the kernel uses fewer for
  prefixes shorter than that many ``MIN_PREFIX_SPLIT_LEN`` chunks); programs past a
  request's new tokens or its prefix's chunks return at once.

`run` pads a pass of ``R`` requests and ``T`` new tokens to the next captured token count:
padding tokens are token 0 at position 0 written to the scratch slot 0 of the KV pool
(never handed out) and belong to no request (``qo_indptr`` ends at ``T``), padding requests
have no tokens and no slots; rows are independent in every other kernel of the pass, so
padding cannot disturb real requests (the padding tokens' attention rows are never
computed -- a split prefix's merge may fill them from unwritten scratch -- so what they
store in slot 0 is arbitrary, as is everything read from slot 0). It returns the first
``T`` rows of the graph's static hidden states, valid until the next `run`. The kernels
are the eager pass's, except that trailing one-token requests (which an eager pass sends
to the decode kernels) take the extend kernel, so results equal the eager pass's up to
summation order.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
import torch

from backend.attention.triton_backend import TritonAttentionBackend, TritonAttnMetadata
from backend.cuda_graph_runner import StaticInputs, capture_graphs
from backend.forward_batch import ForwardBatch, ForwardMode
from backend.models.llama import CausalLM

MAX_REQUESTS = 64  # requests of one graph-replayed pass
LONG_CONTEXT_CHUNK = 1024  # cached tokens per prefix chunk for a one-token request (can_run)
SLOTS_PER_REQUEST = 8192  # kv_indices holds max_requests times this (or one context)


def prefix_splits(tokens: int) -> int:
    """Cached-prefix chunks of the graph of ``tokens`` new tokens: 16 up to 64 tokens (one
    request's 16-token extend after 8,000 cached tokens took 25.6 us per layer on an H100
    in 16 chunks, 34.1 in 8), fewer above (more query blocks fill the GPU; the float32
    split scratch stays at 1,024 rows' worth of one split), one from 1,024 tokens."""
    return max(1, min(16, 1024 // tokens))


def prefill_capture_sizes(max_tokens: int) -> list[int]:
    """Token counts to capture: powers of two from 16 below ``max_tokens``, then it."""
    sizes = [16]
    while sizes[-1] * 2 < max_tokens:
        sizes.append(sizes[-1] * 2)
    return sorted({*(s for s in sizes if s < max_tokens), max_tokens})


class PrefillGraphRunner:
    """Captured prefill graphs over one model, KV pool and Triton attention backend."""

    def __init__(
        self,
        model: CausalLM,
        attn_backend: TritonAttentionBackend,
        max_context_len: int,
        token_sizes: Sequence[int],
        max_requests: int = MAX_REQUESTS,
    ) -> None:
        if not token_sizes:
            raise ValueError("token_sizes must not be empty")
        self.model = model
        self.attn_backend = attn_backend
        self.device = attn_backend.device
        self.sizes = sorted(set(token_sizes))
        self.max_tokens = self.sizes[-1]
        self.max_requests = max_requests
        self.kv_capacity = max(max_context_len, max_requests * SLOTS_PER_REQUEST)
        mt, mr = self.max_tokens, max_requests
        # Offsets of the static inputs in the one int64 buffer.
        self._ids, self._pos, self._loc = 0, mt, 2 * mt
        self._qo = 3 * mt
        self._kv = self._qo + mr + 1
        self._prefix = self._kv + mr + 1
        self._indices = self._prefix + mr
        size = self._indices + self.kv_capacity
        self._inputs = StaticInputs(size, self.device, twins=1)  # passes are not overlapped
        self._batches = {t: self._batch(t) for t in self.sizes}
        self._capture_all()
        self.replays = 0  # passes run from a graph

    def can_run(self, prefix_lens: Sequence[int], extend_lens: Sequence[int]) -> bool:
        """Whether a pass adding ``extend_lens[i]`` tokens to request ``i`` after
        ``prefix_lens[i]`` replays a graph: at most ``max_requests`` requests, no more than
        tokens, the largest captured token count and ``kv_capacity`` slots in all. One-token
        requests (a fully cached prompt, a fork's first ``gen``, a mixed pass's running
        requests) take the extend kernel here, where an eager pass gives trailing ones the
        decode kernels, split over long contexts: so a one-token request's context may span
        at most ``LONG_CONTEXT_CHUNK`` tokens per prefix chunk of the graph."""
        tokens = sum(extend_lens)
        requests = len(extend_lens)
        if not (0 < requests <= min(self.max_requests, tokens) and tokens <= self.max_tokens):
            return False
        size = self.sizes[bisect.bisect_left(self.sizes, tokens)]
        longest = LONG_CONTEXT_CHUNK * self._splits(size)
        return sum(prefix_lens) + tokens <= self.kv_capacity and all(
            p <= longest for p, n in zip(prefix_lens, extend_lens) if n == 1
        )

    def run(
        self,
        table: torch.Tensor,
        rows: Sequence[int],
        prefix_lens: Sequence[int],
        extend_lens: Sequence[int],
        ids: Sequence[int],
    ) -> torch.Tensor:
        """Hidden states ``[sum(extend_lens), hidden]`` of one prefill pass.

        ``table`` is the host ``ReqToTokenTable`` tensor: row ``rows[i]`` lists the slots
        of request ``i``'s ``prefix_lens[i]`` cached and ``extend_lens[i]`` new tokens;
        ``ids`` are the new tokens of all requests, concatenated.
        """
        r, t = len(rows), len(ids)
        size = self.sizes[bisect.bisect_left(self.sizes, t)]
        host = self._inputs.host()
        table_np = table.numpy()
        prefix = np.asarray(prefix_lens, dtype=np.int64)
        extend = np.asarray(extend_lens, dtype=np.int64)
        host[self._ids : self._ids + t] = ids
        host[self._ids + t : self._ids + size] = 0
        qo = host[self._qo : self._qo + self.max_requests + 1]
        qo[0] = 0
        np.cumsum(extend, out=qo[1 : r + 1])
        qo[r + 1 :] = t
        kv = host[self._kv : self._kv + self.max_requests + 1]
        kv[0] = 0
        np.cumsum(prefix + extend, out=kv[1 : r + 1])
        kv[r + 1 :] = kv[r]
        host[self._prefix : self._prefix + r] = prefix
        host[self._prefix + r : self._prefix + self.max_requests] = 0
        positions = host[self._pos : self._pos + size]
        locs = host[self._loc : self._loc + size]
        start = self._indices
        for i, (row, p, n) in enumerate(zip(rows, prefix_lens, extend_lens)):
            slots = table_np[row, : p + n]
            host[start : start + p + n] = slots
            start += p + n
            positions[qo[i] : qo[i + 1]] = np.arange(p, p + n)
            locs[qo[i] : qo[i + 1]] = slots[p:]
        positions[t:] = 0
        locs[t:] = 0
        self._inputs.upload(start)
        self._graphs[size].replay()
        self.replays += 1
        return self._hidden[size][:t]

    # ---- capture ----------------------------------------------------------------------

    def _batch(self, tokens: int) -> ForwardBatch:
        """A ForwardBatch over the static buffers, with its attention metadata preset."""
        buf = self._inputs.device_buf
        mr = min(self.max_requests, tokens)  # requests that can have tokens in the pass
        batch = ForwardBatch(
            mode=ForwardMode.EXTEND,
            input_ids=buf[self._ids : self._ids + tokens],
            positions=buf[self._pos : self._pos + tokens],
            out_cache_loc=buf[self._loc : self._loc + tokens],
            prefix_lens=[0] * mr,
            extend_lens=[0] * mr,
            kv_slots=[],
            attn_backend=self.attn_backend,
        )
        batch.attn_metadata = TritonAttnMetadata(
            kv_indptr=buf[self._kv : self._kv + mr + 1],
            kv_indices=buf[self._indices :],
            qo_indptr=buf[self._qo : self._qo + mr + 1],
            prefix_lens=buf[self._prefix : self._prefix + mr],
            max_extend_len=tokens,
            num_kv_splits=self._splits(tokens),
        )
        return batch

    def _splits(self, tokens: int) -> int:
        """The graph's prefix chunks: the backend's fixed count, else ``prefix_splits``."""
        return self.attn_backend.num_extend_splits or prefix_splits(tokens)

    def _forward(self, tokens: int) -> torch.Tensor:
        return self.model(self._batches[tokens])

    @torch.inference_mode()
    def _capture_all(self) -> None:
        # Dummy pass: every request empty, every token 0 at position 0 written to slot 0.
        self._inputs.device_buf.zero_()
        self._graphs, self._hidden = capture_graphs(self.sizes, self.device, self._forward)
