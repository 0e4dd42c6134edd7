"""From logits to tokens to text: sampling, logprobs, detokenization, stop conditions, and the
updates each request's caller receives. Runs on the engine thread."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from backend.detokenizer import IncrementalDetokenizer
from backend.request import Req, ReqStatus, ReqUpdate, TopLogprobs
from backend.sampler import RequestSampling, sample
from backend.stop_strings import StopStringMatcher
from fsm.dfa import DEAD


@dataclass
class EngineStats:
    """Counters since start (or the last ``flush_cache``)."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    started_at: float = field(default_factory=time.monotonic)

    def record_admission(self, prompt_tokens: int, cached_tokens: int) -> None:
        self.requests += 1
        self.prompt_tokens += prompt_tokens
        self.cached_tokens += cached_tokens

    @property
    def cache_hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def _top_logprobs(logprobs: torch.Tensor, k: int) -> list[TopLogprobs]:
    values, ids = logprobs.topk(k, dim=-1)
    return [list(zip(v, i)) for v, i in zip(values.tolist(), ids.tolist())]


class OutputProcessor:
    """Turns logits into tokens, text and updates (see the module docstring).

    ``vocab_size`` is the model's output width; ids at or above ``len(tokenizer)`` (padding
    rows some checkpoints add to the embedding) are never sampled. Per-request sampling
    state (generators, penalty tensors) lives on ``device``, the logits' device.
    """

    def __init__(
        self,
        tokenizer: Any,
        eos_token_ids: Iterable[int],
        vocab_size: int,
        context_len: int,
        device: torch.device | str = "cpu",
    ):
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.vocab_size = vocab_size
        self.num_decodable = min(len(tokenizer), vocab_size)
        self.context_len = context_len
        self.device = torch.device(device)
        self.stats = EngineStats()

    def start(self, req: Req) -> None:
        """Create the per-request sampling, detokenizer and stop-string state."""
        p = req.params
        req.sampling = RequestSampling(
            p, req.input_ids, self.eos_token_ids, self.vocab_size, self.device
        )
        req.detokenizer = self._detokenizer(req, req.input_ids)
        stops = p.stop or p.stop_regex
        req.stop_matcher = StopStringMatcher(p.stop, p.stop_regex) if stops else None
        # Nobody reads the text before the end: detokenize once then, not per token.
        req.defer_text = not (req.stream or stops)

    def _detokenizer(self, req: Req, context_ids: list[int]) -> IncrementalDetokenizer:
        """A detokenizer for the text after `context_ids`."""
        p = req.params
        return IncrementalDetokenizer(
            self.tokenizer,
            context_ids,
            skip_special_tokens=p.skip_special_tokens,
            spaces_between_special_tokens=p.spaces_between_special_tokens,
        )

    def add_input_logprobs(self, req: Req, first_token: int, logits: torch.Tensor) -> None:
        """Logprobs of input tokens ``first_token ..`` from the logits of their predecessors."""
        if not req.input_token_logprobs and req.logprob_start_len == 0:
            req.input_token_logprobs.append(None)  # the first token has no context
            req.input_top_logprobs.append(None)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        ids = torch.tensor(
            req.input_ids[first_token : first_token + len(logits)], device=logits.device
        )
        req.input_token_logprobs.extend(logprobs.gather(1, ids[:, None]).squeeze(1).tolist())
        if req.top_logprobs_num:
            req.input_top_logprobs.extend(_top_logprobs(logprobs, req.top_logprobs_num))

    @torch.inference_mode()
    def process(self, reqs: list[Req], logits: torch.Tensor) -> list[Req]:
        """Sample one token per request, record it, and return the requests that finished.

        ``logits`` may be modified in place."""
        next_ids = self.sample(reqs, logits).tolist()
        want = [i for i, r in enumerate(reqs) if r.return_logprob]
        if want:
            logprobs = torch.log_softmax(logits[want].float(), dim=-1)
            picked = torch.tensor([next_ids[i] for i in want], device=logprobs.device)
            chosen = logprobs.gather(1, picked[:, None]).cpu()
            for j, i in enumerate(want):
                req = reqs[i]
                req.output_token_logprobs.append(float(chosen[j, 0]))
                if req.top_logprobs_num:
                    req.output_top_logprobs.extend(
                        _top_logprobs(logprobs[j : j + 1], req.top_logprobs_num)
                    )
        return self.commit(reqs, next_ids)

    @torch.inference_mode()
    def sample(self, reqs: list[Req], logits: torch.Tensor) -> torch.Tensor:
        """The next token of each request, as a tensor on the logits' device (no waiting
        for the device). ``logits`` may be modified."""
        if self.num_decodable < logits.shape[1]:
            logits[:, self.num_decodable :] = float("-inf")
        states = [r.sampling for r in reqs]
        counts = [len(r.output_ids) for r in reqs]
        return sample(logits, states, counts, inplace=True)  # type: ignore[arg-type]

    def commit(self, reqs: list[Req], next_ids: list[int]) -> list[Req]:
        """Record one sampled token per request; return the requests that finished."""
        finished = []
        for req, tok in zip(reqs, next_ids):
            self.stats.generated_tokens += 1
            reason = self._append(req, tok)
            if reason is not None:
                self.finish(req, reason)
                finished.append(req)
            elif req.stream:
                self.send(req)
        return finished

    def _append(self, req: Req, tok: int) -> dict[str, Any] | None:
        """Record ``tok``; return the finish reason if the request is done."""
        assert req.sampling is not None and req.detokenizer is not None
        p = req.params
        if req.guide is not None:
            req.fsm_state = req.guide.advance(req.fsm_state, tok)
            if req.fsm_state == DEAD:  # the mask left no token that continues the constraint
                return {"type": "abort", "message": "no token can continue the constraint"}
        req.output_ids.append(tok)
        req.sampling.observe(tok)
        n = len(req.output_ids)
        may_stop = n >= p.min_new_tokens
        if may_stop and (
            tok in p.stop_token_ids or (tok in self.eos_token_ids and not p.ignore_eos)
        ):
            self._flush_text(req)
            return {"type": "stop", "matched": tok}
        if req.defer_text:
            req.deferred_ids.append(tok)
            return self._constraint_or_length_end(req)
        new_text = req.detokenizer.push([tok])
        req.text += new_text
        if may_stop and req.stop_matcher is not None and new_text:
            reason = self._stop_match(req, len(new_text))
            if reason is not None:
                return reason
        return self._constraint_or_length_end(req)

    def _stop_match(self, req: Req, num_new_chars: int) -> dict[str, Any] | None:
        """Trim ``req.text`` at a stop string / stop regex match; return the finish reason."""
        assert req.stop_matcher is not None
        found = req.stop_matcher.match(req.text, num_new_chars)
        if found is None:
            return None
        req.text = req.text[: found.end if req.params.no_stop_trim else found.start]
        return {"type": "stop", "matched": found.matched}

    def _constraint_or_length_end(self, req: Req) -> dict[str, Any] | None:
        """Finish when the constraint cannot continue, or at the length limits."""
        assert req.detokenizer is not None
        n = len(req.output_ids)
        if req.guide is not None and req.guide.is_terminal(req.fsm_state):
            self._flush_text(req)
            return {"type": "stop", "matched": None}
        if n >= req.params.max_new_tokens or len(req.input_ids) + n >= self.context_len:
            self._flush_text(req)
            return {"type": "length", "length": n}
        return None

    @staticmethod
    def _flush_text(req: Req) -> None:
        """Append the rest of the output's text to ``req.text`` (deferred tokens included)."""
        assert req.detokenizer is not None
        if req.deferred_ids:
            req.text += req.detokenizer.push(req.deferred_ids)
            req.deferred_ids = []
        req.text += req.detokenizer.flush()

    def replace_tail(self, req: Req, keep: int, ids: list[int]) -> dict[str, Any] | None:
        """Jump-forward: replace ``output_ids[keep:]`` by ``ids`` (the same bytes followed by
        forced text), cut at the length limits; return the finish reason, if any.

        The replaced tokens were never streamed, so only new text is appended. Penalty
        counts observe the tokens beyond the replaced ones.
        """
        assert req.sampling is not None and req.detokenizer is not None
        before = len(req.output_ids)
        old_tail = req.output_ids[keep:]
        req.output_ids[keep:] = ids
        limit = min(req.params.max_new_tokens, self.context_len - len(req.input_ids))
        del req.output_ids[max(limit, before) :]
        for tok in req.output_ids[before:]:
            req.sampling.observe(tok)
        self.stats.generated_tokens += len(req.output_ids) - before
        self._flush_text(req)  # deferred tokens included
        old_text = req.text
        p = req.params
        req.detokenizer = self._detokenizer(req, req.input_ids + req.output_ids)

        def decode(tokens: list[int]) -> str:
            return self.tokenizer.decode(
                tokens,
                skip_special_tokens=p.skip_special_tokens,
                clean_up_tokenization_spaces=False,
            )

        new_len = len(decode(req.output_ids[keep:])) - len(decode(old_tail))
        req.text = old_text + decode(req.output_ids[keep:])[-new_len:] if new_len else old_text
        if req.stop_matcher is not None and new_len and len(req.output_ids) >= p.min_new_tokens:
            reason = self._stop_match(req, new_len)
            if reason is not None:
                return reason
        return self._constraint_or_length_end(req)

    def finish(self, req: Req, reason: dict[str, Any]) -> None:
        if req.deferred_ids:  # ended from outside (abort): the text so far
            self._flush_text(req)
        req.status = ReqStatus.FINISHED
        req.finish_reason = reason
        self.send(req)

    def send(self, req: Req) -> None:
        final = req.status is ReqStatus.FINISHED
        text_end = len(req.text)
        if not final and req.stop_matcher is not None:
            text_end -= req.stop_matcher.holdback(req.text)
        first, req.sent_tokens = req.sent_tokens, len(req.output_ids)
        update = ReqUpdate(
            text_delta=req.text[req.sent_text_len : text_end],
            token_ids=req.output_ids[first:],
            token_logprobs=req.output_token_logprobs[first:],
            top_logprobs=req.output_top_logprobs[first:],
            final=final,
        )
        req.sent_text_len = max(req.sent_text_len, text_end)
        if final:
            update.finish_reason = req.finish_reason
            update.meta = {
                "prompt_tokens": len(req.input_ids),
                "completion_tokens": len(req.output_ids),
                "cached_tokens": req.cached_tokens,
                "input_token_logprobs": req.input_token_logprobs,
                "input_top_logprobs": req.input_top_logprobs,
            }
        req.sink(update)
