"""How ``select`` picks among choices from their token log-probabilities.

Contract: a method receives, per choice, the log-probabilities of the choice's own tokens given
the prompt (``input_token_logprobs[i]`` = list of ``(logprob, token_id, token_text)``; every
logprob is a float: backends never pass ``None``) and returns a :class:`ChoicesDecision`.
Zero log-probabilities are real values and are never dropped.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

TokenLogprobs = Sequence[Sequence[Any]]  # [(logprob, token_id, text), ...]


@dataclass
class ChoicesDecision:
    decision: str
    meta_info: dict[str, Any] | None = None


def _values(tokens: TokenLogprobs) -> list[float]:
    return [float(t[0]) for t in tokens]


def mean_logprob(tokens: TokenLogprobs) -> float:
    """Mean token log-probability; an empty choice (no tokens) scores 0.0 (probability 1)."""
    values = _values(tokens)
    return sum(values) / len(values) if values else 0.0


class ChoicesSamplingMethod(ABC):
    @property
    def requires_unconditional_logprobs(self) -> bool:
        return False

    @abstractmethod
    def __call__(
        self,
        *,
        choices: list[str],
        normalized_prompt_logprobs: list[float],
        input_token_logprobs: list[TokenLogprobs],
        output_token_logprobs: list[TokenLogprobs],
        unconditional_token_logprobs: list[TokenLogprobs] | None = None,
    ) -> ChoicesDecision: ...


def _argmax(scores: Sequence[float]) -> int:
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


class TokenLengthNormalized(ChoicesSamplingMethod):
    """The choice with the highest mean token log-probability (SGLang's default)."""

    def __call__(
        self,
        *,
        choices,
        normalized_prompt_logprobs,
        input_token_logprobs,
        output_token_logprobs,
        unconditional_token_logprobs=None,
    ):
        return ChoicesDecision(
            choices[_argmax(normalized_prompt_logprobs)],
            {
                "normalized_prompt_logprobs": normalized_prompt_logprobs,
                "input_token_logprobs": input_token_logprobs,
                "output_token_logprobs": output_token_logprobs,
            },
        )


class GreedyTokenSelection(ChoicesSamplingMethod):
    """Token by token, keep the choices whose next token is most likely.

    A choice shorter than the current position is padded with its own mean log-probability,
    so a prefix of a longer choice competes on its average.
    """

    def __call__(
        self,
        *,
        choices,
        normalized_prompt_logprobs,
        input_token_logprobs,
        output_token_logprobs,
        unconditional_token_logprobs=None,
    ):
        rows = [_values(t) for t in input_token_logprobs]
        width = max((len(r) for r in rows), default=0)
        matrix = [
            r + [mean_logprob(t)] * (width - len(r)) for r, t in zip(rows, input_token_logprobs)
        ]
        remaining = list(range(len(choices)))
        for col in range(width):
            best = max(matrix[i][col] for i in remaining)
            remaining = [i for i in remaining if matrix[i][col] == best]
            if len(remaining) == 1:
                break
        return ChoicesDecision(
            choices[remaining[0]],
            {
                "normalized_prompt_logprobs": normalized_prompt_logprobs,
                "input_token_logprobs": input_token_logprobs,
                "output_token_logprobs": output_token_logprobs,
                "greedy_logprob_matrix": matrix,
            },
        )


class UnconditionalLikelihoodNormalized(ChoicesSamplingMethod):
    """The choice with the highest mean of log p(token | prompt) - log p(token | no prompt)."""

    @property
    def requires_unconditional_logprobs(self) -> bool:
        return True

    def __call__(
        self,
        *,
        choices,
        normalized_prompt_logprobs,
        input_token_logprobs,
        output_token_logprobs,
        unconditional_token_logprobs=None,
    ):
        if unconditional_token_logprobs is None:
            raise ValueError("unconditional_likelihood_normalized needs unconditional logprobs")
        scores = []
        for cond, uncond in zip(input_token_logprobs, unconditional_token_logprobs):
            diffs = [a - b for a, b in zip(_values(cond), _values(uncond))]
            scores.append(sum(diffs) / len(diffs) if diffs else 0.0)
        return ChoicesDecision(
            choices[_argmax(scores)],
            {
                "normalized_prompt_logprobs": normalized_prompt_logprobs,
                "input_token_logprobs": input_token_logprobs,
                "output_token_logprobs": output_token_logprobs,
                "unconditional_token_logprobs": unconditional_token_logprobs,
                "normalized_unconditional_prompt_logprobs": scores,
            },
        )


token_length_normalized = TokenLengthNormalized()
greedy_token_selection = GreedyTokenSelection()
unconditional_likelihood_normalized = UnconditionalLikelihoodNormalized()
