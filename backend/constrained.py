"""Constrained decoding in the engine: compiling, masking logits, and jump-forward text.

`Constraints` connects requests that carry `regex` / `json_schema` to `fsm`:
- `submit` starts compiling a request's constraint on the compiler's worker thread;
  `collect` hands back the requests whose compilation finished (or failed, or timed out);
- `mask_logits` sets the logits of disallowed tokens to -inf for constrained rows;
- `jump_tokens` turns the forced text of a request's state into tokens, re-tokenizing the
  boundary with the last output tokens so that the model sees the tokens it would produce.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from backend.request import Req
from fsm import ConstraintError, GuideCompiler, Vocabulary

# How many already generated tokens the jump-forward boundary may re-tokenize.
_RETOKENIZE_TAIL = 2


def _mask_logits_cuda(rows: list[int], masks: list[np.ndarray], logits: torch.Tensor) -> bool:
    """`mask_logits` on a CUDA tensor with one Triton launch; False when Triton is missing.

    The packed masks and the row indices travel in one pinned buffer and one host-to-device
    copy (the caching host allocator keeps the buffer until that copy is done).
    """
    try:
        from backend.sampling_kernels import apply_token_bitmask_
    except ImportError:
        return False
    num_rows, num_words = len(rows), masks[0].shape[0]
    size = num_rows * (num_words + 1)
    host = torch.empty(size, dtype=torch.int32, pin_memory=True)
    view = host.numpy()
    np.stack(masks, out=view[: num_rows * num_words].reshape(num_rows, num_words).view(np.uint32))
    view[num_rows * num_words :] = rows
    device = host.to(logits.device, non_blocking=True)
    bitmask = device[: num_rows * num_words].view(num_rows, num_words)
    apply_token_bitmask_(logits, bitmask, device[num_rows * num_words :])
    return True


class Constraints:
    """Per-engine constraint machinery; the vocabulary is built on first use."""

    def __init__(
        self,
        tokenizer: Any,
        eos_token_ids: set[int],
        *,
        whitespace_pattern: str | None,
        extra_properties: bool,
        timeout_s: float,
        cache_size: int,
    ) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.whitespace_pattern = whitespace_pattern
        self.extra_properties = extra_properties
        self.timeout_s = timeout_s
        self.cache_size = cache_size
        self._compiler: GuideCompiler | None = None
        self._shifts = torch.arange(32, dtype=torch.int32)

    @property
    def compiler(self) -> GuideCompiler:
        if self._compiler is None:
            vocab = Vocabulary.from_tokenizer(self.tokenizer, self.eos_token_ids)
            self._compiler = GuideCompiler(
                vocab,
                whitespace_pattern=self.whitespace_pattern,
                extra_properties=self.extra_properties,
                cache_size=self.cache_size,
                timeout_s=self.timeout_s,
            )
        return self._compiler

    @property
    def vocab(self) -> Vocabulary:
        return self.compiler.vocab

    def submit(self, req: Req) -> None:
        kind, source = req.params.constraint  # type: ignore[misc]
        req.compile_job = self.compiler.submit(kind, source)
        req.compile_deadline = time.monotonic() + self.timeout_s + 1.0

    def collect(self, reqs: list[Req]) -> list[tuple[Req, str | None]]:
        """The requests among `reqs` whose compilation ended, with an error message or None.

        A finished request gets `guide` and its initial `fsm_state`.
        """
        done = []
        now = time.monotonic()
        for req in reqs:
            job = req.compile_job
            assert job is not None
            if not job.done():
                if now > req.compile_deadline:
                    message = f"compilation timed out after {self.timeout_s} s (too complex)"
                    done.append((req, f"invalid constraint: {message}"))
                continue
            try:
                guide = job.result()
            except ConstraintError as e:
                done.append((req, f"invalid constraint: {e}"))
                continue
            except RecursionError:
                kind = req.params.constraint[0]  # type: ignore[index]
                done.append((req, f"invalid constraint: the {kind} is nested too deeply"))
                continue
            except Exception as e:  # a compiler bug must not take the engine down
                done.append((req, f"constraint compilation failed: {type(e).__name__}: {e}"))
                continue
            req.guide, req.fsm_state = guide, guide.initial_state
            done.append((req, None))
        return done

    @torch.inference_mode()
    def mask_logits(self, reqs: list[Req], logits: torch.Tensor) -> None:
        """In place: -inf for the tokens each constrained request may not produce next."""
        rows = [i for i, r in enumerate(reqs) if r.guide is not None]
        if not rows:
            return
        masks = [reqs[i].guide.allowed_mask(reqs[i].fsm_state) for i in rows]  # type: ignore[union-attr]
        if logits.is_cuda and _mask_logits_cuda(rows, masks, logits):
            return
        packed = np.stack(masks)
        words = torch.from_numpy(packed.view(np.int32)).to(logits.device)
        bits = (words.unsqueeze(-1) >> self._shifts.to(logits.device)) & 1
        allowed = bits.reshape(len(rows), -1).bool()
        vocab = logits.shape[1]
        if allowed.shape[1] < vocab:
            allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]))
        index = torch.tensor(rows, device=logits.device)
        sub = logits.index_select(0, index).masked_fill_(~allowed[:, :vocab], float("-inf"))
        logits.index_copy_(0, index, sub)

    def jump_tokens(self, req: Req, forced: bytes) -> tuple[int, list[int]] | None:
        """`(keep, ids)`: replace `output_ids[keep:]` by `ids`, whose bytes are those of the
        replaced tokens followed by `forced`. None when no exact tokenization was found.

        Only tokens not yet streamed and not yet in the radix cache are re-tokenized.
        """
        vocab = self.vocab
        out = req.output_ids
        first = max(
            len(out) - _RETOKENIZE_TAIL,
            req.sent_tokens,
            req.num_tree_owned - len(req.input_ids),
            0,
        )
        for keep in range(first, len(out) + 1):
            tail = out[keep:]
            if any(vocab.token_bytes[t] is None for t in tail):
                continue
            data = vocab.encode_bytes(tail) + forced
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                continue
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            known = ids and all(vocab.token_bytes[t] is not None for t in ids)
            if known and vocab.encode_bytes(ids) == data:
                return keep, ids
        return None

    def shutdown(self) -> None:
        if self._compiler is not None:
            self._compiler.shutdown()
