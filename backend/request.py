"""A generation request as the scheduler sees it, and the updates it sends to its caller."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from backend.sampling_params import SamplingParams

if TYPE_CHECKING:
    from concurrent.futures import Future

    from backend.detokenizer import IncrementalDetokenizer
    from backend.radix_cache import TreeNode
    from backend.sampler import RequestSampling
    from backend.stop_strings import StopStringMatcher
    from fsm import TokenGuide

TopLogprobs = list[tuple[float, int]]


class ReqStatus(enum.Enum):
    COMPILING = "compiling"  # its constraint is being compiled (holds nothing)
    WAITING = "waiting"  # in the queue (new, or retracted with its outputs kept)
    PREFILLING = "prefilling"  # holds a table row; a chunked prefill is in progress
    RUNNING = "running"  # decoding
    FINISHED = "finished"


@dataclass
class ReqUpdate:
    """What changed since the previous update of one request (sent from the engine thread).

    ``text_delta`` never ends inside a UTF-8 character or inside text that may still turn
    out to be a stop string. ``final`` is set on the last update, which carries
    ``finish_reason`` and ``meta`` (token counts, input logprobs).
    """

    text_delta: str = ""
    token_ids: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[TopLogprobs] = field(default_factory=list)
    final: bool = False
    finish_reason: dict[str, Any] | None = None
    meta: dict[str, Any] | None = None


@dataclass(eq=False)
class Req:
    """One sequence being generated.

    KV bookkeeping: ``row`` is the request's row in the ReqToTokenTable while it holds KV;
    its first ``num_kv`` entries are computed token slots, of which the first
    ``num_tree_owned`` belong to the radix cache (locked through ``last_node``) and the rest
    are owned by this request alone. During a prefill pass, the next ``borrowed_slots``
    entries are slots that another request of the same pass (earlier in its batch) computes
    for the tokens they share, and the ``pending_slots`` after them are the slots of this
    request's chunk (both 0 outside a pass).
    """

    rid: str
    input_ids: list[int]
    params: SamplingParams
    sink: Callable[[ReqUpdate], None]
    stream: bool = False
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0

    output_ids: list[int] = field(default_factory=list)
    status: ReqStatus = ReqStatus.WAITING
    row: int | None = None
    num_kv: int = 0
    num_tree_owned: int = 0
    borrowed_slots: int = 0
    pending_slots: int = 0
    last_node: TreeNode | None = None
    cached_tokens: int = 0
    admitted_once: bool = False

    sampling: RequestSampling | None = None
    detokenizer: IncrementalDetokenizer | None = None
    stop_matcher: StopStringMatcher | None = None
    text: str = ""
    # Tokens not yet detokenized: a request that neither streams nor has stop strings or a
    # constraint gets its text once, when it finishes (see OutputProcessor.start).
    defer_text: bool = False
    deferred_ids: list[int] = field(default_factory=list)
    sent_text_len: int = 0
    sent_tokens: int = 0
    finish_reason: dict[str, Any] | None = None

    guide: TokenGuide | None = None  # the compiled regex / JSON-schema constraint
    fsm_state: int = 0  # the guide's state after the output so far
    compile_job: Future[TokenGuide] | None = None
    compile_deadline: float = 0.0

    output_token_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[TopLogprobs] = field(default_factory=list)
    input_token_logprobs: list[float | None] = field(default_factory=list)
    input_top_logprobs: list[TopLogprobs | None] = field(default_factory=list)
    input_logprobs_done: bool = False

    @property
    def fill_ids(self) -> list[int]:
        """Every token whose KV must exist before the next token is sampled (a new list:
        `fill_len` and `fill_slice` avoid copying the whole prompt)."""
        return self.input_ids + self.output_ids

    @property
    def fill_len(self) -> int:
        return len(self.input_ids) + len(self.output_ids)

    def fill_slice(self, start: int, end: int) -> list[int]:
        """``fill_ids[start:end]`` for ``0 <= start <= end``, copying only that range."""
        n = len(self.input_ids)
        if end <= n:
            return self.input_ids[start:end]
        if start >= n:
            return self.output_ids[start - n : end - n]
        return self.input_ids[start:] + self.output_ids[: end - n]

    @property
    def wants_input_logprobs(self) -> bool:
        return (
            self.return_logprob
            and not self.input_logprobs_done
            and 0 <= self.logprob_start_len < len(self.input_ids)
        )

    @property
    def remaining_new_tokens(self) -> int:
        return max(self.params.max_new_tokens - len(self.output_ids), 0)
