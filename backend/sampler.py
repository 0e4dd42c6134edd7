"""Batched token sampling over a ``[B, V]`` float32 logits tensor (CPU or GPU).

Processing order, per row ``i`` of the batch (``states[i]`` holds the request's parameters):

1. repetition penalty (HF/vLLM semantics) over the prompt and output tokens seen so far:
   a positive logit is divided by the penalty, a negative one multiplied by it;
2. frequency and presence penalties (OpenAI semantics) over the output tokens:
   ``logit -= frequency_penalty * count + presence_penalty * (count > 0)``;
3. banned ids (:meth:`RequestSampling.banned_token_ids`) set to ``-inf``;
4. greedy rows (``SamplingParams.is_greedy``) take the argmax of the processed logits;
5. other rows: divide by the temperature, top-k (ties at the k-th value are kept), top-p (keep
   the smallest set of most likely tokens whose probability reaches ``top_p``, at least one),
   min-p (drop tokens whose probability is below ``min_p`` times the largest), then draw one
   token (see below).

Each sampling row draws ``V`` exponential variates per step and picks ``argmax(p / q)`` (an
exact draw from ``p``). A seeded request draws from its own ``torch.Generator``, so it
reproduces its tokens whatever else is in the batch; unseeded rows share one batched draw
from torch's default generator of the device (one launch, however many rows). The input
logits are modified only when the caller allows it (``inplace=True``: the engine's logits
are scratch). Work that no row needs is skipped: a batch of plain greedy rows
is one ``argmax``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from backend.sampling_params import SamplingParams

# Temperatures below this are clamped before dividing, so that logits stay finite.
_MIN_TEMPERATURE = 1e-6


class RequestSampling:
    """Per-request sampling state, created when a request is admitted.

    Holds the request's parameters, its EOS ids, its own ``torch.Generator`` seeded with
    ``params.seed`` (None without a seed) and, only when penalties are
    in use, ``[V]`` tensors on ``device``: the tokens seen (prompt and output, for the
    repetition penalty) and the output-token counts (for frequency/presence penalties).
    Call :meth:`observe` with every token appended to the output.
    """

    def __init__(
        self,
        params: SamplingParams,
        prompt_ids: Sequence[int],
        eos_token_ids: Iterable[int],
        vocab_size: int,
        device: torch.device | str = "cpu",
    ) -> None:
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        self.params = params
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.eos_token_ids = sorted({int(t) for t in eos_token_ids if 0 <= int(t) < vocab_size})
        self._stop_ids = sorted({t for t in params.stop_token_ids if t < vocab_size})
        self._banned_early = sorted(set(self.eos_token_ids) | set(self._stop_ids))
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator(device=self.device)
            self.generator.manual_seed(params.seed & 0xFFFF_FFFF_FFFF_FFFF)

        self.seen: torch.Tensor | None = None
        self.output_counts: torch.Tensor | None = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=self.device)
            ids = [t for t in prompt_ids if 0 <= t < vocab_size]
            if ids:
                self.seen[torch.tensor(ids, dtype=torch.int64, device=self.device)] = True
        if params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
            self.output_counts = torch.zeros(vocab_size, dtype=torch.float32, device=self.device)

    def observe(self, token_id: int) -> None:
        """Record a token appended to the output (updates the penalty state, if any)."""
        if not 0 <= token_id < self.vocab_size:
            return
        if self.seen is not None:
            self.seen[token_id] = True
        if self.output_counts is not None:
            self.output_counts[token_id] += 1.0

    def banned_token_ids(self, num_output_tokens: int) -> list[int]:
        """Token ids that must not be sampled as output token number ``num_output_tokens + 1``.

        While ``num_output_tokens < min_new_tokens``: the EOS ids and ``stop_token_ids``.
        Otherwise: the EOS ids when ``ignore_eos`` (generation runs to ``max_new_tokens``),
        else nothing.
        """
        if num_output_tokens < self.params.min_new_tokens:
            return list(self._banned_early)
        if self.params.ignore_eos:
            return list(self.eos_token_ids)
        return []


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.tensor(values)`` on ``device`` without making the host wait: on CUDA through
    pinned memory and an asynchronous copy (a copy from pageable memory would block until
    the GPU has run everything queued before it, the forward pass included)."""
    tensor = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    return to_device(rows, torch.int64, device)


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return to_device(values, torch.float32, device).unsqueeze(1)


def apply_penalties(
    logits: torch.Tensor, states: Sequence[RequestSampling], rows: list[int]
) -> None:
    """Apply repetition, then frequency/presence penalties, in place, to ``logits[rows]``."""
    device = logits.device
    rep_rows = [i for i in rows if states[i].seen is not None]
    if rep_rows:
        idx = _index(rep_rows, device)
        sub = logits.index_select(0, idx)
        seen = torch.stack([t for i in rep_rows if (t := states[i].seen) is not None])
        seen = seen.to(device)
        penalty = _column([states[i].params.repetition_penalty for i in rep_rows], device)
        penalized = torch.where(sub > 0, sub / penalty, sub * penalty)
        logits.index_copy_(0, idx, torch.where(seen, penalized, sub))
    freq_rows = [i for i in rows if states[i].output_counts is not None]
    if freq_rows:
        idx = _index(freq_rows, device)
        counts = torch.stack([t for i in freq_rows if (t := states[i].output_counts) is not None])
        counts = counts.to(device)
        freq = _column([states[i].params.frequency_penalty for i in freq_rows], device)
        presence = _column([states[i].params.presence_penalty for i in freq_rows], device)
        delta = counts * freq + (counts > 0).to(torch.float32) * presence
        logits.index_copy_(0, idx, logits.index_select(0, idx) - delta)


_BAN_COLUMNS: dict[tuple[torch.device, tuple[int, ...]], torch.Tensor] = {}


def _ban_columns(ids: list[int], device: torch.device) -> torch.Tensor:
    """The device tensor of ``ids``, made once per (device, ids) (a few distinct sets:
    EOS ids, stop ids), so that banning costs no host-to-device copy per step."""
    key = (device, tuple(ids))
    cols = _BAN_COLUMNS.get(key)
    if cols is None:
        if len(_BAN_COLUMNS) >= 64:
            _BAN_COLUMNS.clear()
        cols = _BAN_COLUMNS[key] = torch.tensor(ids, dtype=torch.int64, device=device)
    return cols


def _apply_bans(logits: torch.Tensor, banned: list[list[int]]) -> None:
    if all(ids == banned[0] for ids in banned):  # the usual case: one set for every row
        logits[:, _ban_columns(banned[0], logits.device)] = float("-inf")
        return
    rows = [i for i, ids in enumerate(banned) for _ in ids]
    cols = [t for ids in banned for t in ids]
    logits[_index(rows, logits.device), _index(cols, logits.device)] = float("-inf")


def _filter(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p on the rows of ``logits`` (one per ``params``)."""
    device = logits.device
    vocab = logits.shape[1]
    temps = [max(p.temperature, _MIN_TEMPERATURE) for p in params]
    if any(t != 1.0 for t in temps):
        logits = logits / _column(temps, device)

    top_ks = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
    if any(k < vocab for k in top_ks):
        kmax = max(k for k in top_ks if k < vocab)
        values = torch.topk(logits, kmax, dim=1).values
        k_idx = _index([min(k, kmax) - 1 for k in top_ks], device).unsqueeze(1)
        threshold = values.gather(1, k_idx)
        active = to_device([k < vocab for k in top_ks], torch.bool, device).unsqueeze(1)
        threshold = torch.where(active, threshold, torch.full_like(threshold, float("-inf")))
        logits = logits.masked_fill(logits < threshold, float("-inf"))

    top_ps = [p.top_p for p in params]
    if any(p < 1.0 for p in top_ps):
        sorted_logits, order = torch.sort(logits, dim=1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=1)
        mass_before = torch.cumsum(sorted_probs, dim=1) - sorted_probs
        remove = mass_before >= _column(top_ps, device)
        remove[:, 0] = False  # the most likely token always stays
        active = to_device([p < 1.0 for p in top_ps], torch.bool, device).unsqueeze(1)
        remove &= active
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))

    min_ps = [p.min_p for p in params]
    if any(m > 0.0 for m in min_ps):
        probs = torch.softmax(logits, dim=1)
        cutoff = probs.amax(dim=1, keepdim=True) * _column(min_ps, device)
        logits = logits.masked_fill(probs < cutoff, float("-inf"))
    return logits


def sample(
    logits: torch.Tensor,
    states: Sequence[RequestSampling],
    num_output_tokens: Sequence[int],
    inplace: bool = False,
) -> torch.Tensor:
    """Sample one token per row of ``logits`` ``[B, V]``; returns ``[B]`` int64 on its device.

    ``num_output_tokens[i]`` is how many tokens request ``i`` has generated so far (drives
    ``min_new_tokens``). See the module docstring for the processing order. ``inplace``:
    penalties and bans may be written into ``logits`` (saves a ``[B, V]`` copy).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    batch = logits.shape[0]
    if len(states) != batch or len(num_output_tokens) != batch:
        raise ValueError(
            f"batch size mismatch: logits {batch}, states {len(states)}, "
            f"num_output_tokens {len(num_output_tokens)}"
        )
    device = logits.device
    if batch == 0:
        return torch.empty(0, dtype=torch.int64, device=device)

    penalty_rows = [i for i, s in enumerate(states) if s.params.uses_penalties]
    for i in penalty_rows:
        if states[i].vocab_size != logits.shape[1]:
            raise ValueError(
                f"row {i}: RequestSampling vocab_size {states[i].vocab_size} != logits width "
                f"{logits.shape[1]}"
            )
    banned = [s.banned_token_ids(num_output_tokens[i]) for i, s in enumerate(states)]
    any_bans = any(banned)
    if logits.dtype != torch.float32 or ((penalty_rows or any_bans) and not inplace):
        logits = logits.to(torch.float32, copy=True)
        apply_penalties(logits, states, penalty_rows)
        if any_bans:
            _apply_bans(logits, banned)

    sample_rows = [i for i, s in enumerate(states) if not s.params.is_greedy]
    if not sample_rows:
        return torch.argmax(logits, dim=1)

    if len(sample_rows) == batch:
        sub = logits
        result = None
    else:
        sub = logits.index_select(0, _index(sample_rows, device))
        result = torch.argmax(logits, dim=1)

    probs = torch.softmax(_filter(sub, [states[i].params for i in sample_rows]), dim=1)
    noise = torch.empty_like(probs)
    seeded = [(j, g) for j, i in enumerate(sample_rows) if (g := states[i].generator) is not None]
    if len(seeded) < len(sample_rows):
        noise.exponential_()
    for j, generator in seeded:
        noise[j].exponential_(generator=generator)
    noise.clamp_min_(torch.finfo(torch.float32).tiny)  # a zero variate must not divide by 0
    drawn = torch.argmax(probs / noise, dim=1)

    if result is None:
        return drawn
    result.index_copy_(0, _index(sample_rows, device), drawn)
    return result
