"""Prefix sharing within a prefill pass, under stress (the embedded model, no mocks).

Randomized rounds of requests built from a few shared stems (duplicates, prompts that are
prefixes of others, shared runs that start cached or uncached) mixing greedy generation,
prefill-only scoring with input logprobs, regex / JSON-schema constraints (jump-forward on),
aborts at random steps, small prefill chunks and a KV pool small enough to retract. A probe
on the scheduler checks, around every pass and after every step, who owns each KV slot:
a borrower's slots are another batch member's new slots for the same tokens, no live row
points at a free slot, a request's tree-owned slots are the radix cache's for its tokens
and its own slots belong to nobody else, and `check_invariant` holds. After each round the
engine must hold nothing, and a sample of requests must get what they get alone.

Then targeted cases: a pass with borrowers that fails at each stage (each slot freed once),
equal tokens after a different cached prefix (not borrowed), and requests that jumped
forward in a pool with no slot for their forced text (they keep their KV and progress).
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from backend.engine import Engine
from backend.request import Req
from backend.scheduler import Scheduler

STEMS = [
    "You are a careful assistant. Answer in one short sentence. Facts: the sky is blue, "
    "grass is green and the capital of France is Paris.",
    "def add(a, b):\n    return a + b\n\n\n# Unit tests for add",
    "Scene: A man kneels next to a flat bicycle tyre. He",
    "Q: Name three fruits.\nA:",
    "Once upon a time, in a land far away, there lived an old lighthouse keeper and his "
    "cat. Every night he climbed the hundred steps to light the lamp, and every morning "
    "the cat waited for him at the bottom of the stairs with a fish it had caught.",
]
WORDS = [
    *("apple", "banana", "river", "stone", "cloud", "seven", "bright", "quietly", "under"),
    *("over", "table", "lamp", "green", "runs", "sings", "quickly", "Paris", "tyre", "wheel"),
    *("forest", "ocean", "north", "south", "ten", "twenty"),
]
REGEX = r"Answer: (yes|no)\. Reason: [a-z]{1,8}\."
SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {
            "city": {"enum": ["Paris", "London", "Tokyo"]},
            "n": {"type": "integer", "minimum": 0, "maximum": 99},
        },
        "required": ["city", "n"],
    }
)
MAX_PROMPT = 72  # with 40 new tokens, within the smallest pool
KINDS = ["greedy", "greedy", "score", "hint", "greedy_lp", "regex", "json", "abort"]
CONFIGS = {
    # small chunks: lenders and borrowers are cut, continue as the chunked request
    "chunked": {"max_total_tokens": 2000, "chunked_prefill_size": 40},
    # a pool that the batch overflows: admission waits, requests are retracted
    # (admission reserves nothing for new tokens, so decoding runs out of slots)
    "tiny_pool": {
        "max_total_tokens": 112,
        "chunked_prefill_size": 64,
        "init_new_token_ratio": 0.0,
        "min_new_token_ratio": 0.0,
    },
    # few rows: admission stops at max_running_requests
    "few_rows": {"max_total_tokens": 1200, "chunked_prefill_size": 64, "max_running_requests": 3},
    "no_cache": {"max_total_tokens": 1200, "chunked_prefill_size": 32, "disable_radix_cache": True},
    # prefill passes also decode the running requests (one token each)
    "mixed": {"max_total_tokens": 600, "chunked_prefill_size": 48, "enable_mixed_chunk": True},
}


# ---- the probe --------------------------------------------------------------------------


def _tree_path_slots(sched: Scheduler, tokens: list[int]) -> list[int]:
    """The radix cache's slots for the longest cached prefix of ``tokens``, read without
    touching the tree (``match_prefix`` splits edges and updates access times)."""
    node, i, out = sched.cache.root, 0, []
    while i < len(tokens):
        child = node.children.get(tokens[i])
        if child is None:
            break
        key = child.key
        m = 0
        while m < len(key) and i + m < len(tokens) and key[m] == tokens[i + m]:
            m += 1
        out += child.value[:m].tolist()
        if m < len(key):
            break
        i, node = i + m, child
    return out


def _tree_slots(sched: Scheduler) -> set[int]:
    slots: set[int] = set()
    stack = list(sched.cache.root.children.values())
    while stack:
        node = stack.pop()
        slots.update(node.value.tolist())
        stack.extend(node.children.values())
    return slots


def check_ownership(sched: Scheduler) -> None:
    """Between steps: every live slot has exactly one owner, and none of them is free."""
    sched.check_invariant()
    assert not sched.prefilling, "a pass left requests in `prefilling`"
    free = set(sched.pool.free_slots())
    tree = _tree_slots(sched)
    assert not free & tree, "a slot is both free and in the radix cache"
    holders = [*sched.running, *sched.extending] + ([sched.chunked] if sched.chunked else [])
    assert len({id(r) for r in holders}) == len(holders), "a request is in two queues"
    rows = sched.table.table.shape[0] - 1
    assert sched.table.num_free_rows + len(holders) == rows, "a request holds KV in no queue"
    owned: set[int] = set()
    for req in holders:
        assert req.row is not None and req.borrowed_slots == 0 and req.pending_slots == 0
        assert 0 <= req.num_tree_owned <= req.num_kv <= len(req.fill_ids)
        row = sched.table.table[req.row, : req.num_kv].tolist()
        assert not free.intersection(row), f"{req.rid} points at free slots"
        if not sched.cache.disable:
            cached = _tree_path_slots(sched, req.fill_ids[: req.num_tree_owned])
            assert row[: req.num_tree_owned] == cached, f"{req.rid}: tree-owned slots differ"
            if req.num_tree_owned:
                assert req.last_node is not None and req.last_node.lock_ref > 0
        mine = row[req.num_tree_owned :]
        assert len(set(mine)) == len(mine) and not tree.intersection(mine)
        assert not owned.intersection(mine), f"{req.rid} owns another request's slots"
        owned.update(mine)
    for req in [*sched.waiting, *sched.compiling]:
        assert req.row is None and req.num_kv == 0 and req.last_node is None


def check_batch(sched: Scheduler, batch: list[tuple[Req, int]]) -> int:
    """Before a pass: what each request reads and writes; returns the number of borrowers.

    A request reads its cached prefix, then the slots it borrows: each must be written in
    this pass by an earlier batch member, at the same position, after the same tokens."""
    free = set(sched.pool.free_slots())
    table = sched.table.table
    writers: dict[int, tuple[int, int]] = {}  # new slot -> (batch index, position)
    borrowers = 0
    for i, (req, chunk) in enumerate(batch):
        assert req.pending_slots == chunk > 0
        p, k = req.num_kv, req.borrowed_slots
        row = table[req.row, : p + k + chunk].tolist()
        assert not free.intersection(row), f"{req.rid} reads or writes free slots"
        for pos in range(p + k, p + k + chunk):
            assert row[pos] not in writers, "two requests write one slot"
            writers[row[pos]] = (i, pos)
        if not k:
            continue
        borrowers += 1
        assert not sched.cache.disable
        assert p + k < len(req.fill_ids) and p + k <= sched._prefix_limit(req)
        for pos in range(p, p + k):
            assert row[pos] in writers, f"{req.rid} borrows a slot no batch member writes"
            w, w_pos = writers[row[pos]]
            assert w < i and w_pos == pos, f"{req.rid} borrows a slot of another position"
            lender = batch[w][0]
            assert lender.fill_ids[: pos + 1] == req.fill_ids[: pos + 1], f"{req.rid}: tokens"
    assert not _tree_slots(sched).intersection(writers), "a pass writes slots of the cache"
    return borrowers


@dataclass
class Probe:
    """Wraps the scheduler's step and prefill pass with the checks above (engine thread)."""

    engine: Engine
    errors: list[str] = field(default_factory=list)
    steps: int = 0
    borrowers: int = 0
    aborts_at: dict[int, list[str]] = field(default_factory=dict)

    def install(self) -> None:
        sched = self.engine.scheduler
        step, run_prefill = sched.step, sched._run_prefill

        def checked_step() -> None:
            try:
                step()
            except Exception as exc:
                self.errors.append(f"step {self.steps} raised {exc!r}")
                raise
            self.steps += 1
            try:
                check_ownership(sched)
            except AssertionError as exc:
                self.errors.append(f"after step {self.steps}: {exc}")
            for rid in self.aborts_at.pop(self.steps, []):
                self.engine.abort(rid)  # runs before the next step

        def checked_prefill(batch: list[tuple[Req, int]], mixed: bool) -> None:
            try:
                self.borrowers += check_batch(sched, batch)
            except AssertionError as exc:
                self.errors.append(f"before pass at step {self.steps}: {exc}")
            run_prefill(batch, mixed)

        sched.step = checked_step  # type: ignore[method-assign]
        sched._run_prefill = checked_prefill  # type: ignore[method-assign]

    def uninstall(self) -> None:
        for name in ("step", "_run_prefill"):
            self.engine.scheduler.__dict__.pop(name, None)


def hold(engine: Engine) -> threading.Event:
    """Park the engine thread between steps until the event is set: whatever is submitted
    meanwhile reaches the scheduler at once (one pass, when it fits)."""
    gate = threading.Event()
    engine._inbox.put(lambda: gate.wait(30))
    return gate


# ---- requests ---------------------------------------------------------------------------


@dataclass
class Spec:
    kind: str
    ids: list[int]
    params: dict[str, Any]
    extra: dict[str, Any]
    abort_step: int | None = None  # abort this many steps after the round starts (0: at once)


def _suffix(rng: random.Random, encode, n_words: int) -> list[int]:
    return encode("".join(" " + rng.choice(WORDS) for _ in range(n_words)))


def make_round(rng: random.Random, stems: list[list[int]], encode, n: int) -> list[Spec]:
    """``n`` requests over shared stems: cut anywhere, extended by random words, duplicated,
    a prefix of an earlier one, or an earlier one and more."""
    specs: list[Spec] = []
    for _ in range(n):
        shape = rng.random()
        if specs and shape < 0.2:  # a duplicate of an earlier prompt
            ids = list(rng.choice(specs).ids)
        elif specs and shape < 0.35:  # a prefix of an earlier prompt
            base = rng.choice(specs).ids
            ids = base[: rng.randint(max(2, len(base) // 3), len(base))]
        elif specs and shape < 0.5:  # an earlier prompt and more (longer than a chunk)
            ids = rng.choice(specs).ids + rng.choice(stems) + _suffix(rng, encode, 3)
        else:
            stem = rng.choice(stems)
            cut = rng.choice([len(stem), len(stem), rng.randint(3, len(stem))])
            ids = stem[:cut] + _suffix(rng, encode, rng.randint(0, 6))
        kind = rng.choice(KINDS)
        ids = ids[: 60 if kind in ("regex", "json") else MAX_PROMPT]
        greedy = {"temperature": 0, "max_new_tokens": rng.randint(1, 24), "ignore_eos": True}
        extra: dict[str, Any] = {}
        abort_step = None
        if kind == "greedy":
            params = greedy
        elif kind == "greedy_lp":
            params = greedy
            extra = {"return_logprob": True, "logprob_start_len": rng.randint(0, len(ids) - 1)}
        elif kind == "score":
            params = {"max_new_tokens": 0}
            extra = {"return_logprob": True, "logprob_start_len": rng.randint(0, len(ids) - 1)}
        elif kind == "hint":
            params = {"max_new_tokens": 0}
        elif kind == "regex":
            params = {"temperature": 0, "max_new_tokens": 24, "regex": REGEX}
        elif kind == "json":
            params = {"temperature": 0, "max_new_tokens": 24, "json_schema": SCHEMA}
        else:  # abort: streamed, aborted before admission or after some steps
            params = {**greedy, "max_new_tokens": 40}
            abort_step = rng.choice([0, 1, 2, 3, 5, 8, 13])
        specs.append(Spec(kind, ids, params, extra, abort_step))
    return specs


def submit_round(engine: Engine, probe: Probe, specs: list[Spec]) -> list:
    gate = hold(engine)
    try:
        handles = []
        for spec in specs:
            stream = spec.abort_step is not None
            handles += engine.submit(
                input_ids=spec.ids, sampling_params=spec.params, stream=stream, **spec.extra
            )
        for spec, handle in zip(specs, handles):
            if spec.abort_step == 0:
                engine.abort(handle.rid)  # queued behind the submission: before admission
            elif spec.abort_step is not None:
                probe.aborts_at.setdefault(probe.steps + spec.abort_step, []).append(handle.rid)
    finally:
        gate.set()
    results = []
    for spec, handle in zip(specs, handles):
        if spec.abort_step is not None:
            "".join(handle.deltas())  # the streamed text, up to the abort
        results.append(handle.result(timeout=120))
    return results


def run_alone(engine: Engine, spec: Spec) -> dict:
    assert engine.flush_cache()
    return engine.generate(input_ids=spec.ids, sampling_params=spec.params, **spec.extra)


def _lps(meta: dict, key: str) -> list[float | None]:
    return [lp for lp, _, _ in meta[key]]


def check_same_as_alone(spec: Spec, got: dict, alone: dict) -> None:
    meta, ref = got["meta_info"], alone["meta_info"]
    assert meta["finish_reason"]["type"] != "abort"
    if spec.kind == "abort":  # aborted after it finished: unharmed
        assert got["output_ids"] == alone["output_ids"]
        return
    assert got["output_ids"] == alone["output_ids"], spec
    assert got["text"] == alone["text"]
    assert meta["finish_reason"] == ref["finish_reason"]
    if spec.extra.get("return_logprob"):
        for key in ("input_token_logprobs", "output_token_logprobs"):
            a, b = _lps(meta, key), _lps(ref, key)
            assert len(a) == len(b) and [x is None for x in a] == [x is None for x in b]
            pairs = [(x, y) for x, y in zip(a, b) if x is not None]
            assert [x for x, _ in pairs] == pytest.approx([y for _, y in pairs], abs=1e-4), key


# ---- tests ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def probed(request: pytest.FixtureRequest) -> Iterator[tuple[str, Engine, Probe]]:
    options = {"num_threads": 1, "dedupe_min_shared_tokens": 8, **CONFIGS[request.param]}
    with Engine(**options) as engine:
        probe = Probe(engine)
        probe.install()
        yield request.param, engine, probe
        probe.uninstall()


@pytest.mark.parametrize(
    ("probed", "seed"),
    [
        ("chunked", 0),
        ("chunked", 1),
        ("tiny_pool", 0),
        ("tiny_pool", 1),
        ("few_rows", 0),
        ("no_cache", 0),
        ("mixed", 0),
        ("mixed", 1),
    ],
    indirect=["probed"],
)
def test_randomized_rounds_keep_kv_ownership_and_outputs(
    probed: tuple[str, Engine, Probe], seed: int
) -> None:
    name, engine, probe = probed
    rng = random.Random(f"{name}-{seed}")
    stems = [engine.tokenizer.encode(s) for s in STEMS]
    borrowers_before = probe.borrowers
    for _ in range(3):
        if rng.random() < 0.5:
            assert engine.flush_cache()  # the stems start uncached: computed within the pass
        specs = make_round(rng, stems, engine.tokenizer.encode, rng.randint(5, 10))
        results = submit_round(engine, probe, specs)
        engine.wait_idle()
        assert not probe.errors, probe.errors[:3]
        acc = engine.check_kv_invariant()
        assert acc["protected"] == 0 and acc["owned_by_requests"] == 0
        assert acc["free"] + acc["evictable"] == acc["total"]
        for spec, res in zip(specs, results):
            reason = res["meta_info"]["finish_reason"]
            assert "internal error" not in str(reason), reason
            if spec.kind != "abort":
                assert reason["type"] != "abort", (spec, reason)
        finished = [
            (s, r)
            for s, r in zip(specs, results)
            if r["meta_info"]["finish_reason"]["type"] != "abort"
        ]
        for spec, res in rng.sample(finished, min(2, len(finished))):
            check_same_as_alone(spec, res, run_alone(engine, spec))
        assert not probe.errors, probe.errors[:3]
    if not engine.config.disable_radix_cache:
        assert probe.borrowers > borrowers_before  # the rounds did exercise borrowing
    if engine.config.enable_mixed_chunk:
        assert engine.get_stats()["forward_steps"]["mixed"] > 0


@pytest.fixture(scope="module")
def fault_engine() -> Iterator[tuple[Engine, Probe]]:
    with Engine(num_threads=1, max_total_tokens=1200, chunked_prefill_size=256) as engine:
        probe = Probe(engine)
        probe.install()
        yield engine, probe
        probe.uninstall()


@pytest.mark.parametrize(
    "stage", ["extend", "logits", "cache_lender", "cache_borrower", "release", "emit"]
)
def test_a_pass_with_borrowers_that_fails_frees_each_slot_once(
    fault_engine: tuple[Engine, Probe], monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    """A prefill pass in which requests borrow fails at ``stage`` (before the forward pass,
    after it, while the lender or a borrower hands its KV to the cache, while a prefill-only
    request is released, while sampling): every request of the round fails with the internal
    error, each slot is freed once (a borrower's borrowed slots are the lender's), nothing
    stays locked (the cache is dropped), and the same round then runs as it does alone."""
    engine, probe = fault_engine
    sched, runner = engine.scheduler, engine.scheduler.runner
    stem = engine.tokenizer.encode(STEMS[0])
    specs = [
        Spec("greedy", stem + engine.tokenizer.encode(" Why?"), {"max_new_tokens": 3}, {}),
        Spec("hint", stem + engine.tokenizer.encode(" How?"), {"max_new_tokens": 0}, {}),
        Spec("greedy", list(stem), {"temperature": 0, "max_new_tokens": 3}, {}),
        Spec(
            "score", stem, {"max_new_tokens": 0}, {"return_logprob": True, "logprob_start_len": 9}
        ),
    ]
    for spec in specs:
        spec.params.setdefault("temperature", 0)
    armed = {"on": False, "calls": 0}

    def fault(name: str, original, nth: int = 1):
        def wrapper(*args, **kwargs):
            if armed["on"]:
                armed["calls"] += 1
                if armed["calls"] == nth:
                    armed["on"] = False
                    raise RuntimeError(f"injected fault in {name}")
            return original(*args, **kwargs)

        return wrapper

    targets = {
        "extend": (runner, "extend", 1),
        "logits": (runner, "logits", 1),
        "cache_lender": (sched, "_cache_unfinished", 1),
        "cache_borrower": (sched, "_cache_unfinished", 2),
        "release": (sched, "_release", 1),
        "emit": (sched, "_emit", 1),
    }
    owner, name, nth = targets[stage]
    monkeypatch.setattr(owner, name, fault(name, getattr(owner, name), nth))
    run_prefill = sched._run_prefill

    def arm_when_borrowing(batch: list[tuple[Req, int]], mixed: bool) -> None:
        armed["on"] = sum(1 for req, _ in batch if req.borrowed_slots) >= 2
        run_prefill(batch, mixed)

    monkeypatch.setattr(sched, "_run_prefill", arm_when_borrowing)
    assert engine.flush_cache()
    results = submit_round(engine, probe, specs)
    engine.wait_idle()
    assert armed["calls"] == nth and not armed["on"]
    failed = 0
    for spec, res in zip(specs, results):
        reason = res["meta_info"]["finish_reason"]
        if "injected fault" in reason.get("message", ""):
            failed += 1
        else:  # a prefill-only request the pass finished before the fault
            assert spec.params["max_new_tokens"] == 0 and reason["type"] == "length", reason
    assert failed >= 2
    assert [e for e in probe.errors if "injected fault" not in e] == []
    probe.errors.clear()
    acc = engine.check_kv_invariant()
    assert acc["free"] == acc["total"]  # the cache was dropped, nothing leaked
    monkeypatch.undo()
    again = submit_round(engine, probe, specs)
    engine.wait_idle()
    assert not probe.errors, probe.errors[:3]
    for spec, res in zip(specs, again):
        check_same_as_alone(spec, res, run_alone(engine, spec))


@pytest.mark.parametrize("pool", [64, 80])
def test_requests_that_jumped_forward_keep_their_kv_when_the_pool_is_full(pool: int) -> None:
    """Eight JSON requests (jump-forward on) in a pool that admission does not reserve for:
    forced text to prefill finds no free slot. An extending request then keeps its place and
    its KV (it was dropped from every queue: it never finished and its KV leaked), and when
    nothing runs that a decode step could retract, one extending request is retracted so
    that the others can go on (they waited on each other's slots forever)."""
    options = {"init_new_token_ratio": 0.0, "min_new_token_ratio": 0.0}
    with Engine(num_threads=1, max_total_tokens=pool, chunked_prefill_size=64, **options) as engine:
        probe = Probe(engine)
        probe.install()
        prompts = [
            f"Person {i}: a short JSON record of someone living in a city." for i in range(8)
        ]
        params = {"temperature": 0, "max_new_tokens": 30, "json_schema": SCHEMA}
        handles = engine.submit(prompts, params)
        try:
            results = [h.result(timeout=30) for h in handles]
        except TimeoutError:
            pytest.fail(f"requests never finish; {probe.errors[:3]}")
        engine.wait_idle()
        assert not probe.errors, probe.errors[:3]
        assert engine.get_stats()["retractions"] > 0
        acc = engine.check_kv_invariant()
        assert acc["free"] + acc["evictable"] == acc["total"]
        for prompt, res in zip(prompts[:2], results):
            assert res["meta_info"]["finish_reason"]["type"] == "stop"
            assert engine.flush_cache()
            assert engine.generate(prompt, params)["output_ids"] == res["output_ids"]


def test_equal_tokens_after_a_different_cached_prefix_are_not_borrowed(
    fault_engine: tuple[Engine, Probe],
) -> None:
    """Two requests whose prompts differ in a cached prefix of the same length and then go
    on alike: at the same positions, the same tokens, but their KV differs (it depends on
    everything before), so neither borrows the other's; each gets what it gets alone."""
    engine, probe = fault_engine
    encode = engine.tokenizer.encode
    first, second = encode(STEMS[0]), encode(STEMS[2])
    n = min(len(first), len(second))
    tail = encode(" and then, slowly, the old wheel began to turn again")
    specs = []
    for stem in (first, second, first):
        ids = stem[:n] + tail
        specs.append(Spec("greedy", ids, {"temperature": 0, "max_new_tokens": 4}, {}))
    score = {"return_logprob": True, "logprob_start_len": n + 2}
    specs.append(Spec("score", second[:n] + tail, {"max_new_tokens": 0}, score))
    assert engine.flush_cache()
    engine.generate(input_ids=[first[:n], second[:n]], sampling_params={"max_new_tokens": 0})
    borrowers = probe.borrowers
    results = submit_round(engine, probe, specs)
    engine.wait_idle()
    assert not probe.errors, probe.errors[:3]
    assert probe.borrowers == borrowers + 2  # the third from the first, the fourth from the second
    for spec, res in zip(specs, results):
        check_same_as_alone(spec, res, run_alone(engine, spec))


def test_fill_slice_and_len_match_fill_ids() -> None:
    """The scheduler reads ranges of a request's tokens without copying the whole prompt."""
    from backend.sampling_params import SamplingParams

    req = Req(rid="r", input_ids=[1, 2, 3, 4, 5], params=SamplingParams(), sink=lambda u: None)
    for outputs in ([], [6, 7]):
        req.output_ids = list(outputs)
        fill = req.fill_ids
        assert req.fill_len == len(fill)
        for start in range(len(fill) + 1):
            for end in range(start, len(fill) + 1):
                assert req.fill_slice(start, end) == fill[start:end]
