"""Continuous batching over the KV pool and the radix cache.

Each ``step()`` runs one forward pass: a prefill batch when waiting work can be admitted
(chunked to ``chunked_prefill_size`` tokens), otherwise one decode step for every running
request. Requests join and leave the running batch between steps.

KV accounting invariant (``kv_accounting``): every pool slot is exactly one of free,
in the radix cache (evictable when unlocked, protected when locked by a request), or owned
by one request (computed but not yet handed to the cache). When idle, nothing is locked
or owned, so ``free + evictable == total``.
"""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass

import torch

from backend.config import EngineConfig
from backend.constrained import Constraints
from backend.kv_pool import KVPool, ReqToTokenTable
from backend.lending import PassLenders, common_prefix_len
from backend.model_runner import ModelRunner
from backend.output_processor import OutputProcessor
from backend.radix_cache import RadixCache
from backend.request import Req, ReqStatus
from backend.sampler import to_device

logger = logging.getLogger(__name__)

INPUT_LOGPROB_ROWS_PER_PASS = 2048
"""At most this many prompt tokens of requests that want input logprobs per prefill pass:
their logits (``[rows, vocab]`` in float32, plus a log-softmax) are materialized at once,
2 GB for a 128k vocabulary at 2,048 rows, whatever ``chunked_prefill_size`` is."""


@dataclass
class InflightDecode:
    """A launched decode step whose sampled ids the host has not committed yet.

    With overlap, the forward pass of step N + 1 is launched from ``ids_device`` of step N,
    then step N is committed while the GPU runs N + 1, then N + 1 is masked and sampled.
    Meanwhile each request of N + 1 holds a KV slot for a token the host has not recorded
    (``num_kv == len(fill_ids)`` once it is); a request that turns out to have finished at
    step N, or whose tail jump-forward re-tokenized, gives that slot back like any other
    (the GPU writes it before any later launch can reuse it: one stream orders them).
    """

    reqs: list[Req]
    ids_device: torch.Tensor  # [B] sampled ids
    ids_host: torch.Tensor  # [B] pinned, filled by an asynchronous copy
    ready: torch.cuda.Event  # recorded after that copy


class Scheduler:
    """Owns the queues and every request's KV. Runs on the engine thread only."""

    def __init__(
        self,
        config: EngineConfig,
        runner: ModelRunner,
        pool: KVPool,
        table: ReqToTokenTable,
        cache: RadixCache,
        outputs: OutputProcessor,
        context_len: int,
        constraints: Constraints,
    ) -> None:
        self.config = config
        self.runner = runner
        self.pool = pool
        self.table = table
        self.cache = cache
        self.outputs = outputs
        self.context_len = context_len
        self.constraints = constraints
        self.compiling: list[Req] = []  # waiting for their constraint to compile
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.chunked: Req | None = None
        self.extending: list[Req] = []  # jumped forward: hold a row, need a prefill
        # The batch of the prefill pass running now: out of every queue until the pass has
        # placed them, and still found (and failed) by `requests()` if the pass raises.
        self.prefilling: list[Req] = []
        self._lenders = PassLenders()  # the prefilling requests, searchable for a lender
        self.new_token_ratio = config.init_new_token_ratio
        self._ratio_decay = (
            config.init_new_token_ratio - config.min_new_token_ratio
        ) / config.new_token_ratio_decay_steps
        self.num_retractions = 0
        self.forward_steps = {"prefill": 0, "decode": 0, "mixed": 0}
        self.jump_forward_tokens = 0
        self.inflight: InflightDecode | None = None  # overlapped decode (GPU only)
        self._ids_staging: list[torch.Tensor] = []
        self._ids_turn = 0
        if runner.graphs is not None and not config.disable_overlap_schedule:
            self._ids_staging = [
                torch.empty(config.max_running_requests, dtype=torch.int64, pin_memory=True)
                for _ in range(2)
            ]

    # ---- queue operations -------------------------------------------------------------

    def add(self, req: Req) -> None:
        """Queue ``req``: to compile its constraint first, or to wait for a prefill. A
        constraint that cannot be submitted (say, a tokenizer whose token bytes are unknown)
        finishes the request with an abort naming the reason (HTTP 500 on the server)."""
        if req.params.constraint is None:
            self.waiting.append(req)
            return
        try:
            self.constraints.submit(req)
        except Exception as exc:  # the compiler could not be built: this request fails
            logger.error("constraint of %s not submitted: %s", req.rid, exc)
            message = f"constraint compilation failed: {exc}"
            self.outputs.finish(req, {"type": "abort", "message": message})
            return
        req.status = ReqStatus.COMPILING
        self.compiling.append(req)

    def has_work(self) -> bool:
        return bool(
            self.compiling
            or self.waiting
            or self.running
            or self.chunked
            or self.extending
            or self.inflight
        )

    def requests(self) -> list[Req]:
        """Every request the scheduler holds, wherever it is."""
        chunked = [self.chunked] if self.chunked else []
        held = [*self.compiling, *self.waiting, *chunked, *self.extending, *self.running]
        ids = {id(r) for r in held}
        return held + [r for r in self.prefilling if id(r) not in ids]

    def abort(self, rid: str, message: str = "aborted") -> bool:
        """Abort ``rid`` wherever it is; frees everything it holds. False if unknown."""
        self.drain()
        req = next((r for r in self.requests() if r.rid == rid), None)
        if req is None:
            return False
        self._remove(req)
        self._release(req)
        self.outputs.finish(req, {"type": "abort", "message": message})
        return True

    def _remove(self, req: Req) -> None:
        if self.chunked is req:
            self.chunked = None
        for queue in (self.compiling, self.waiting, self.extending, self.running, self.prefilling):
            if req in queue:
                queue.remove(req)

    def step(self) -> None:
        if self.compiling:
            self._collect_compiled()
        if self.inflight is not None and self._may_prefill():
            self.drain()  # a prefill pass changes the running set: commit first
        # _may_prefill first: a decode step should not pay for the prefill bookkeeping
        # (the reservation estimate walks every running request)
        if not (self._may_prefill() and self._prefill_step()) and (self.running or self.inflight):
            self._decode_step()
        elif self.compiling and not (self.waiting or self.running or self.extending):
            wait([r.compile_job for r in self.compiling], 0.005, FIRST_COMPLETED)  # type: ignore[misc]

    # ---- constraints ------------------------------------------------------------------

    def _collect_compiled(self) -> None:
        for req, error in self.constraints.collect(self.compiling):
            self.compiling.remove(req)
            if error is not None:
                self.outputs.finish(req, {"type": "abort", "message": error})
                continue
            req.status = ReqStatus.WAITING
            self.outputs.start(req)
            if (
                self.config.disable_regex_jump_forward
                or req.return_logprob
                or self._jump_forward(req) is None
            ):
                self.waiting.append(req)

    def _jump_forward(self, req: Req) -> dict | None:
        """Append the text the constraint forces next as tokens (re-tokenizing the boundary);
        return the finish reason if that ends the request. The caller queues it again."""
        guide = req.guide
        assert guide is not None
        forced = guide.forced_bytes(req.fsm_state)
        plan = self.constraints.jump_tokens(req, forced) if forced else None
        if plan is None:
            return None
        keep, ids = plan
        vocab = self.constraints.vocab
        old_tail = req.output_ids[keep:]
        before = len(req.output_ids)
        reason = self.outputs.replace_tail(req, keep, ids)
        applied = vocab.encode_bytes(req.output_ids[keep:])[len(vocab.encode_bytes(old_tail)) :]
        req.fsm_state = guide.walk(req.fsm_state, applied)
        if reason is None and guide.is_terminal(req.fsm_state):
            reason = {"type": "stop", "matched": None}
        self.jump_forward_tokens += len(req.output_ids) - before
        changed = len(req.input_ids) + keep + common_prefix_len(old_tail, ids)
        if req.row is not None and changed < req.num_kv:  # recompute re-tokenized positions
            self.pool.free(self.table.table[req.row, changed : req.num_kv].clone())
            req.num_kv = changed
        if reason is not None:
            self._release(req)
            self.outputs.finish(req, reason)
        elif req.stream:
            self.outputs.send(req)
        return reason

    # ---- prefill ----------------------------------------------------------------------

    def _prefix_limit(self, req: Req) -> int:
        """How much of ``fill_ids`` may come from the cache: the tokens whose logits are
        needed (the last one, input-logprob positions) must be computed."""
        fill_len = len(req.input_ids) + len(req.output_ids)
        limit = fill_len if req.params.max_new_tokens == 0 else fill_len - 1
        if req.wants_input_logprobs:
            limit = min(limit, max(req.logprob_start_len - 1, 0))
        return limit

    def _ordered_waiting(self) -> list[Req]:
        reqs = list(self.waiting)
        if self.config.schedule_policy == "lpm" and 1 < len(reqs) <= self.config.lpm_max_queue:
            lens = {
                id(r): len(self.cache.match_prefix(r.fill_slice(0, self._prefix_limit(r))).slots)
                for r in reqs
            }
            reqs.sort(key=lambda r: -lens[id(r)])
        elif self.config.schedule_policy == "lof":
            reqs.sort(key=lambda r: -r.remaining_new_tokens)  # stable: FCFS among equals
        return reqs

    def _reserved_tokens(self) -> int:
        """Slots the running requests are expected to still need (decaying estimate)."""
        total = 0
        for req in self.running:
            room = self.context_len - len(req.input_ids) - len(req.output_ids)
            total += min(req.remaining_new_tokens, room)
        return int(total * self.new_token_ratio)

    def _alloc(self, n: int) -> torch.Tensor | None:
        if self.pool.num_free < n:
            self.cache.evict(n - self.pool.num_free)
        return self.pool.alloc(n)

    def _prefill_step(self) -> bool:
        budget = self.config.chunked_prefill_size
        mixing = self.config.enable_mixed_chunk and 0 < len(self.running) < budget
        if mixing:
            budget -= len(self.running)  # one token each, added once the chunk is known
        available = self.pool.num_free + self.cache.evictable_size - self._reserved_tokens()
        logprob_rows = INPUT_LOGPROB_ROWS_PER_PASS
        batch: list[tuple[Req, int]] = []  # (request, number of new tokens this pass)
        admitted: list[Req] = []  # requests newly admitted this pass, in order
        self._lenders = PassLenders()
        candidates = ([self.chunked] if self.chunked else []) + self.extending
        candidates += self._ordered_waiting()
        for req in candidates:
            wants_rows = req.wants_input_logprobs
            cap = min(budget, logprob_rows) if wants_rows else budget
            if cap <= 0:
                break
            if req.row is None:
                chunk = self._admit(req, cap, available, admitted, nothing_else=not batch)
                if chunk is None:
                    if req.status is ReqStatus.FINISHED:
                        continue
                    break
                if chunk < 0:  # deferred: shares an uncached prefix with a batch member
                    continue
                admitted.append(req)
            else:
                chunk = min(req.fill_len - req.num_kv, cap)
                slots = self._alloc(chunk)
                if slots is None:  # it keeps its place (chunked or extending) and its KV
                    break
                if req in self.extending:
                    self.extending.remove(req)
                self.table.table[req.row, req.num_kv : req.num_kv + chunk] = slots
            batch.append((req, chunk))
            req.pending_slots = chunk
            self._join_pass(req)
            budget -= chunk
            available -= chunk
            if wants_rows:
                logprob_rows -= chunk
        if not batch:
            if self.extending and not self.running:
                # No slots for the next chunk of the requests holding KV, and no decode step
                # to retract one: retract an extending request, whose KV the others may evict.
                self._retract(min(self.extending, key=self._retract_order))
            return False
        self._run_prefill(batch, mixed=mixing and self._board_running(batch))
        return True

    def _board_running(self, batch: list[tuple[Req, int]]) -> bool:
        """Append every running request to a prefill ``batch`` with its one next token (a
        slot each); False (none appended) while a decode step is in flight or when the pool
        cannot give them all a slot now."""
        if self.inflight is not None:  # its requests' next tokens are not known yet
            return False
        reqs = list(self.running)
        slots = self._alloc(len(reqs))
        if slots is None:
            return False
        self.table.table[[r.row for r in reqs], [r.num_kv for r in reqs]] = slots
        for req in reqs:
            batch.append((req, 1))
            req.pending_slots = 1
            self._join_pass(req)
        return True

    def _join_pass(self, req: Req) -> None:
        """``req`` is in the prefill pass being built, its slots for the pass in place."""
        self.prefilling.append(req)
        self._lenders.add(req)

    def _admit(
        self, req: Req, budget: int, available: int, admitted: list[Req], nothing_else: bool
    ) -> int | None:
        """Give ``req`` a table row, its cached prefix, the slots it borrows from a request
        admitted earlier in this pass (``_lender``) and slots for its first chunk.

        Returns the chunk length, -1 when the request should wait for a batch member to
        compute a prefix they share beyond what it can borrow, or None when it cannot be
        admitted now.
        """
        if (
            len(self.running) + (self.chunked is not None) + len(admitted)
            >= self.config.max_running_requests
        ):
            return None
        fill = req.fill_ids
        limit = self._prefix_limit(req)
        match = self.cache.match_prefix(fill[:limit])
        prefix_len = len(match.slots)
        lender, borrowed = self._lender(fill, prefix_len, limit)
        need = prefix_len + borrowed + self.config.dedupe_min_shared_tokens
        if not self.cache.disable and admitted and len(fill) >= need:
            head = fill[:need]  # sharing this much uncached prefix with a batch member: wait
            if any(other.fill_slice(0, need) == head for other in admitted):
                return -1
        remaining = len(fill) - prefix_len - borrowed
        if remaining == 0:  # a fully cached prefill-only request: nothing to compute
            self.waiting.remove(req)
            self._count_cached(req, prefix_len)
            self.outputs.finish(req, {"type": "length", "length": 0})
            return None
        chunk = min(remaining, budget)
        expected = chunk
        if chunk == remaining:
            expected += int(
                min(req.remaining_new_tokens, self.context_len - len(fill)) * self.new_token_ratio
            )
        if expected > available and not (nothing_else and not self.running):
            return None
        self.cache.inc_lock_ref(match.last_node)
        slots = self._alloc(chunk)
        row = self.table.alloc_row()
        if slots is None or row is None:
            if slots is not None:
                self.pool.free(slots)
            if row is not None:
                self.table.free_row(row)
            self.cache.dec_lock_ref(match.last_node)
            return None
        self.waiting.remove(req)
        table = self.table.table
        table[row, :prefix_len] = match.slots
        computed = prefix_len + borrowed
        if lender is not None:
            assert lender.row is not None
            table[row, prefix_len:computed] = table[lender.row, prefix_len:computed]
        table[row, computed : computed + chunk] = slots
        req.row, req.num_kv, req.num_tree_owned, req.last_node = (
            row,
            prefix_len,
            prefix_len,
            match.last_node,
        )
        req.borrowed_slots = borrowed
        req.status = ReqStatus.PREFILLING
        self._count_cached(req, computed)
        if req.sampling is None:
            self.outputs.start(req)
        return chunk

    def _lender(self, fill: list[int], start: int, limit: int) -> tuple[Req | None, int]:
        """The batch member this pass whose new KV covers the longest run of ``fill`` from
        ``start`` (the cached prefix), and that run's length (``backend.lending``); the
        borrower keeps at least one token (and every position ``_prefix_limit`` leaves out
        of the cache) to compute."""
        cap = min(limit, len(fill) - 1)
        if self.cache.disable or start >= cap:
            return None, 0
        return self._lenders.find(fill, start, cap)

    def _count_cached(self, req: Req, prefix_len: int) -> None:
        if not req.admitted_once:
            req.admitted_once = True
            req.cached_tokens = min(prefix_len, len(req.input_ids))
            self.outputs.stats.record_admission(len(req.input_ids), req.cached_tokens)

    def _run_prefill(self, batch: list[tuple[Req, int]], mixed: bool) -> None:
        """One extend pass over ``batch``; with ``mixed``, running requests at its end (one
        token each, status RUNNING) sample their next token as a decode step would."""
        self.forward_steps["prefill"] += 1
        self.forward_steps["mixed"] += mixed
        self.chunked = None
        rows, prefix_lens, new_tokens = [], [], []
        for req, chunk in batch:
            start = req.num_kv + req.borrowed_slots
            rows.append(req.row)
            prefix_lens.append(start)
            new_tokens.append(req.fill_slice(start, start + chunk))
        hidden = self.runner.extend(rows, prefix_lens, new_tokens)

        # Pick the hidden rows whose logits are needed: input-logprob positions, then the
        # last position of every request whose prefill completes and which samples.
        picks: list[torch.Tensor] = []
        logprob_ranges: list[tuple[Req, int, int, int]] = []  # req, first token idx, count, offset
        samplers: list[Req] = []
        sample_rows: list[int] = []
        offset = 0
        for req, chunk in batch:
            start = req.num_kv + req.borrowed_slots
            if req.wants_input_logprobs:
                # logits at position p score token p + 1; token 0 has no logprob
                first_tok = max(req.logprob_start_len, start + 1)
                last_tok = min(start + chunk, len(req.input_ids) - 1)
                if first_tok <= last_tok:
                    logprob_ranges.append(
                        (req, first_tok, last_tok - first_tok + 1, sum(len(p) for p in picks))
                    )
                    picks.append(
                        torch.arange(offset + first_tok - 1 - start, offset + last_tok - start)
                    )
            completes = start + chunk == req.fill_len
            if completes and req.params.max_new_tokens > 0:
                samplers.append(req)
                sample_rows.append(offset + chunk - 1)
            offset += chunk
        num_logprob_rows = sum(len(p) for p in picks)
        if sample_rows:
            picks.append(torch.tensor(sample_rows, dtype=torch.int64))
        logits = self.runner.logits(hidden[torch.cat(picks)], prefill=True) if picks else None

        for req, first_tok, count, row_offset in logprob_ranges:
            self.outputs.add_input_logprobs(req, first_tok, logits[row_offset : row_offset + count])

        for req, chunk in batch:
            # A lender precedes its borrowers in the batch: the slots they borrowed are in the
            # cache by now (or were freed as duplicates, and `_cache_unfinished` remaps them).
            req.num_tree_owned += req.borrowed_slots
            req.num_kv += req.borrowed_slots + chunk
            req.borrowed_slots = req.pending_slots = 0
            if req.status is ReqStatus.RUNNING:  # a passenger: its new slot stays its own
                continue
            if req.wants_input_logprobs and req.num_kv >= len(req.input_ids):
                req.input_logprobs_done = True
            self._cache_unfinished(req)
            if req.num_kv < req.fill_len:
                self.chunked = req
            elif req.params.max_new_tokens == 0:
                self._release(req)
                self.outputs.finish(req, {"type": "length", "length": 0})
        if samplers:
            assert logits is not None
            self._emit(samplers, logits[num_logprob_rows:])
        self.prefilling = []
        self._lenders = PassLenders()

    # ---- decode -----------------------------------------------------------------------

    def _may_prefill(self) -> bool:
        """Whether `_prefill_step` could run a pass now (False: it certainly would not)."""
        room = len(self.running) < self.config.max_running_requests
        return bool(self.extending or self.chunked or (self.waiting and room))

    def _decode_step(self) -> None:
        """One decode step of every running request.

        Overlapped (see `InflightDecode`): while step N's ids are still on the device, the
        forward pass of step N + 1 is launched from them first; then step N is committed on
        the host (outputs, constraint states, jump-forward) while the GPU runs N + 1, and
        only then are step N + 1's masks applied and its tokens sampled."""
        prev = self.inflight
        if prev is not None:
            chained = {id(r) for r in prev.reqs}
            if any(id(r) not in chained for r in self.running):
                self.drain()  # a request joined outside the chain: restart from the host
            else:
                self.inflight = None
                launched = self._chain(prev)
                self._commit(prev)
                if launched is not None:
                    self.inflight = self._sample_async(*launched)
                return
        self._make_room_for_decode()
        if not self.running:
            return
        reqs = list(self.running)
        logits = self._launch_decode(reqs, [r.output_ids[-1] for r in reqs])
        if self._overlappable(reqs):
            self.inflight = self._sample_async(reqs, logits)
        else:
            self._emit(reqs, logits)

    def _launch_decode(
        self, reqs: list[Req], last_tokens: list[int] | torch.Tensor
    ) -> torch.Tensor:
        """Allocate one slot per request and launch the forward pass; returns the logits."""
        self.forward_steps["decode"] += 1
        slots = self._alloc(len(reqs))
        assert slots is not None, "decode slots were reserved by the caller"
        rows = [r.row for r in reqs]
        self.table.table[rows, [r.num_kv for r in reqs]] = slots  # one store for the batch
        for req in reqs:
            req.num_kv += 1
        logits = self.runner.decode_logits(rows, [r.num_kv for r in reqs], last_tokens)
        self.new_token_ratio = max(
            self.new_token_ratio - self._ratio_decay, self.config.min_new_token_ratio
        )
        return logits

    # ---- overlapped decode -------------------------------------------------------------

    def _overlappable(self, reqs: list[Req]) -> bool:
        """Whether the next step may be launched before this one's ids reach the host:
        overlap on, a CUDA graph for the batch, and no request wants logprobs (they are
        read from the logits when the token is recorded)."""
        return (
            not self.config.disable_overlap_schedule
            and self.runner.uses_graph(len(reqs))
            and not any(r.return_logprob for r in reqs)
        )

    def _sample_async(self, reqs: list[Req], logits: torch.Tensor) -> InflightDecode | None:
        """Mask and sample on the device and start copying the ids to the host (no waiting).

        Called once every earlier token is committed, so constraint states, penalties and
        ``min_new_tokens`` are current. Rows of requests that stopped meanwhile, or whose
        output changed under the launched pass (jump-forward), are dropped; None if no row
        is left."""
        keep = [
            i
            for i, r in enumerate(reqs)
            if r.status is ReqStatus.RUNNING and r.fill_len == r.num_kv
        ]
        if not keep:
            return None
        if len(keep) != len(reqs):
            logits = logits.index_select(0, to_device(keep, torch.int64, logits.device))
            reqs = [reqs[i] for i in keep]
        self.constraints.mask_logits(reqs, logits)
        ids = self.outputs.sample(reqs, logits)
        # Two pinned buffers in turn: step N's is read by its commit, which comes after
        # step N + 1 was launched (into the other buffer) and before step N + 2 is.
        self._ids_turn ^= 1
        host = self._ids_staging[self._ids_turn][: ids.shape[0]]
        host.copy_(ids, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return InflightDecode(reqs, ids, host, ready)

    def _chain(self, prev: InflightDecode) -> tuple[list[Req], torch.Tensor] | None:
        """Launch the forward pass after ``prev`` from its ids on the device, for the
        requests that cannot have finished by length; returns them and the logits, or None
        when that is not possible (then the next step starts from the host)."""
        keep = [
            i
            for i, r in enumerate(prev.reqs)
            if r.status is ReqStatus.RUNNING
            and len(r.output_ids) + 1 < r.params.max_new_tokens
            and len(r.input_ids) + len(r.output_ids) + 1 < self.context_len
        ]
        reqs = [prev.reqs[i] for i in keep]
        if (
            not reqs
            or self.pool.num_free + self.cache.evictable_size < len(reqs)
            or not self._overlappable(reqs)
        ):
            return None
        ids = prev.ids_device
        if len(reqs) != len(prev.reqs):
            ids = ids.index_select(0, to_device(keep, torch.int64, ids.device))
        return reqs, self._launch_decode(reqs, ids)

    def _commit(self, step: InflightDecode) -> None:
        """Wait for ``step``'s ids and record them like `_emit` does (requests finished
        meanwhile skip theirs); a pass launched since may be running."""
        step.ready.synchronize()
        ids = step.ids_host.tolist()
        live = [(r, t) for r, t in zip(step.reqs, ids) if r.status is ReqStatus.RUNNING]
        reqs = [r for r, _ in live]
        self._after_tokens(reqs, self.outputs.commit(reqs, [t for _, t in live]))

    def drain(self) -> None:
        """Commit the step in flight, if any: the host state is then complete."""
        if self.inflight is not None:
            step, self.inflight = self.inflight, None
            self._commit(step)

    def _make_room_for_decode(self) -> None:
        """Retract running requests (fewest outputs first) until one slot each is available."""
        while self.running and self.pool.num_free + self.cache.evictable_size < len(self.running):
            self._retract(min(self.running, key=self._retract_order))

    @staticmethod
    def _retract_order(req: Req) -> tuple[int, int]:
        return len(req.output_ids), -len(req.input_ids)

    def _retract(self, victim: Req) -> None:
        """Send a request that holds KV (running or extending) back to the front of the
        waiting queue: its KV goes to the cache, its outputs are kept."""
        self._remove(victim)
        self._release(victim)
        victim.status = ReqStatus.WAITING
        self.waiting.appendleft(victim)
        self.num_retractions += 1
        self.new_token_ratio = min(1.0, self.new_token_ratio + 0.2)
        logger.info(
            "KV pool full: retracted request %s (%d outputs kept)",
            victim.rid,
            len(victim.output_ids),
        )

    # ---- outputs and KV hand-back -----------------------------------------------------

    def _emit(self, reqs: list[Req], logits: torch.Tensor) -> None:
        self.constraints.mask_logits(reqs, logits)
        self._after_tokens(reqs, self.outputs.process(reqs, logits))

    def _after_tokens(self, reqs: list[Req], finished: list[Req]) -> None:
        """Once ``reqs`` each recorded a token: release the ``finished`` ones and jump the
        constrained ones forward where their constraint forces text."""
        for req in finished:
            if req in self.running:
                self.running.remove(req)
            self._release(req)
        jump = not self.config.disable_regex_jump_forward
        for req in reqs:
            if req.status is ReqStatus.FINISHED:
                continue
            if jump and req.guide is not None and not req.return_logprob:
                if req.status is ReqStatus.RUNNING:
                    self.running.remove(req)
                req.status = ReqStatus.PREFILLING
                if self._jump_forward(req) is not None:
                    continue
                if req.fill_len - req.num_kv > 1:  # forced tokens to prefill
                    self.extending.append(req)
                    continue
            if req.status is ReqStatus.PREFILLING:
                req.status = ReqStatus.RUNNING
                self.running.append(req)

    def _cache_unfinished(self, req: Req) -> None:
        """Hand the request's computed KV to the radix cache and lock it (so waiting
        requests that share the prefix reuse it while this one keeps running)."""
        if self.cache.disable:
            return
        tokens = self._insert_computed(req)
        match = self.cache.match_prefix(tokens)
        assert len(match.slots) == req.num_kv
        self.table.table[req.row, : req.num_kv] = match.slots
        self.cache.inc_lock_ref(match.last_node)
        if req.last_node is not None:
            self.cache.dec_lock_ref(req.last_node)
        req.last_node, req.num_tree_owned = match.last_node, req.num_kv

    def _insert_computed(self, req: Req) -> list[int]:
        """Insert the request's computed tokens into the cache; free the slots it computed for
        tokens that another request had cached meanwhile. Returns the inserted tokens."""
        tokens = req.fill_slice(0, req.num_kv)
        slots = self.table.table[req.row, : req.num_kv]
        present = self.cache.insert(tokens, slots)
        if present > req.num_tree_owned:
            self.pool.free(slots[req.num_tree_owned : present].clone())
        return tokens

    def _release(self, req: Req) -> None:
        """Give everything ``req`` holds back: computed KV to the cache (or the pool when the
        cache is disabled), its lock, its table row. Outputs are kept (for retraction)."""
        if req.row is None:
            return
        if req.pending_slots:  # a prefill pass failed: its chunk was never computed
            start = req.num_kv + req.borrowed_slots  # the borrowed slots are the lender's
            pending = self.table.table[req.row, start : start + req.pending_slots]
            self.pool.free(pending.clone())
            req.pending_slots = req.borrowed_slots = 0
        if self.cache.disable:
            self.pool.free(self.table.table[req.row, : req.num_kv].clone())
        else:
            self._insert_computed(req)
            if req.last_node is not None:
                self.cache.dec_lock_ref(req.last_node)
        self.table.free_row(req.row)
        req.row, req.num_kv, req.num_tree_owned, req.last_node = None, 0, 0, None

    # ---- accounting ---------------------------------------------------------------------

    def kv_accounting(self) -> dict[str, int]:
        holders = [*self.running, *self.extending] + ([self.chunked] if self.chunked else [])
        owned = sum(r.num_kv - r.num_tree_owned for r in holders)
        return {
            "total": self.pool.num_slots,
            "free": self.pool.num_free,
            "evictable": self.cache.evictable_size,
            "protected": self.cache.protected_size,
            "owned_by_requests": owned,
        }

    def check_invariant(self) -> dict[str, int]:
        """Assert the slot accounting (and, when idle, that nothing is locked or owned)."""
        self.cache.check_invariants()
        acc = self.kv_accounting()
        parts = acc["free"] + acc["evictable"] + acc["protected"] + acc["owned_by_requests"]
        if parts != acc["total"]:
            raise AssertionError(f"KV slots leaked or double-counted: {acc}")
        if not self.has_work() and (acc["protected"] or acc["owned_by_requests"]):
            raise AssertionError(f"idle engine still holds KV: {acc}")
        if self.pool.has_duplicate_free_slots():
            raise AssertionError("a slot is free twice")
        return acc
