"""The engine on the embedded model against transformers, end to end (no mocks)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from tiny_models import TINY_ARCHS

from backend.engine import Engine
from backend.lending import common_prefix_len

PREFIX = (
    "You are a careful assistant. Answer every question in one short sentence. "
    "Here are some facts: the sky is blue, grass is green, water boils at 100 degrees "
    "Celsius at sea level, and the capital of France is Paris. "
)
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far away,",
    "def fibonacci(n):",
    PREFIX + "Question: what colour is the sky?",
    PREFIX + "Question: what colour is grass? Answer:",
    "1, 2, 3, 4,",
    "Translate to French: I like apples.",
    "A list of fruits:\n-",
]


def hf_greedy(hf_model, engine: Engine, ids: list[int], max_new_tokens: int) -> list[int]:
    out = hf_model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=sorted(engine.eos_token_ids),
        pad_token_id=sorted(engine.eos_token_ids)[0],
    )
    return out[0, len(ids) :].tolist()


@pytest.fixture(scope="module")
def reference(hf_model, engine: Engine) -> list[list[int]]:
    return [hf_greedy(hf_model, engine, engine.tokenizer.encode(p), 32) for p in PROMPTS]


GREEDY = {"temperature": 0, "max_new_tokens": 32}


def test_greedy_matches_transformers_batched_then_cached(idle_engine: Engine, reference) -> None:
    idle_engine.flush_cache()
    first = idle_engine.generate(PROMPTS, GREEDY)
    assert [r["output_ids"] for r in first] == reference
    # the shared PREFIX was computed once: the second of the two prompts found it cached
    assert max(r["meta_info"]["cached_tokens"] for r in first) > 20
    again = idle_engine.generate(PROMPTS, GREEDY)
    assert [r["output_ids"] for r in again] == reference
    for r in again:
        assert r["meta_info"]["cached_tokens"] == r["meta_info"]["prompt_tokens"] - 1
    assert again[0]["text"] == idle_engine.tokenizer.decode(reference[0], skip_special_tokens=True)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_random_checkpoints_greedy_match_transformers(tiny_root, arch: str) -> None:
    """Loading and generation for each architecture, through the engine, mixed lengths."""
    from transformers import AutoModelForCausalLM

    folder = tiny_root / arch
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with Engine(str(folder), max_total_tokens=2048, chunked_prefill_size=48) as eng:
        expected = [hf_greedy(hf, eng, eng.tokenizer.encode(p), 32) for p in PROMPTS]
        out = eng.generate(PROMPTS, GREEDY)
        assert [r["output_ids"] for r in out] == expected
        again = eng.generate(PROMPTS, GREEDY)  # now over cached prefixes
        assert [r["output_ids"] for r in again] == expected
        assert all(r["meta_info"]["cached_tokens"] > 0 for r in again)
        eng.wait_idle()
        eng.check_kv_invariant()


def test_chunked_prefill_small_budget_matches(reference) -> None:
    with Engine(max_total_tokens=4096, chunked_prefill_size=7) as eng:
        out = eng.generate(PROMPTS, GREEDY)
        assert [r["output_ids"] for r in out] == reference
        assert eng.get_stats()["forward_steps"]["prefill"] > len(PROMPTS)
        eng.wait_idle()
        eng.check_kv_invariant()


@pytest.mark.parametrize(
    "options",
    [
        {"max_total_tokens": 4096, "chunked_prefill_size": 12},
        {"max_total_tokens": 160, "chunked_prefill_size": 64},
    ],
    ids=["chunks", "retractions"],
)
def test_mixed_chunk_decodes_running_requests_inside_prefill_passes(reference, options) -> None:
    """With ``enable_mixed_chunk`` the requests whose prompts are done decode inside the
    passes that prefill the others (and, with 160 slots, through retractions): the same
    greedy outputs as transformers, no KV leaked."""
    with Engine(enable_mixed_chunk=True, **options) as eng:
        out = eng.generate(PROMPTS, GREEDY)
        assert [r["output_ids"] for r in out] == reference
        steps = eng.get_stats()["forward_steps"]
        assert 0 < steps["mixed"] < steps["prefill"]
        eng.wait_idle()
        acc = eng.check_kv_invariant()
        assert acc["free"] + acc["evictable"] == acc["total"]


def test_tiny_kv_pool_forces_retraction(reference) -> None:
    # 8 requests of ~10-50 prompt tokens + 32 outputs each do not fit in 160 slots at once
    with Engine(max_total_tokens=160, chunked_prefill_size=64) as eng:
        out = eng.generate(PROMPTS, {**GREEDY, "ignore_eos": False})
        assert [r["output_ids"] for r in out] == reference
        assert eng.get_stats()["retractions"] > 0
        eng.wait_idle()
        acc = eng.check_kv_invariant()
        assert acc["free"] + acc["evictable"] == 160


def test_output_and_input_logprobs_match_transformers(idle_engine: Engine, hf_model) -> None:
    prompt = PROMPTS[3]
    res = idle_engine.generate(
        prompt,
        {"temperature": 0, "max_new_tokens": 8},
        return_logprob=True,
        logprob_start_len=0,
        top_logprobs_num=3,
    )
    meta = res["meta_info"]
    ids = idle_engine.tokenizer.encode(prompt) + res["output_ids"]
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)
    n_in = meta["prompt_tokens"]
    out_lp = [lp for lp, _, _ in meta["output_token_logprobs"]]
    expected_out = [ref[n_in - 1 + i, t].item() for i, t in enumerate(res["output_ids"])]
    assert out_lp == pytest.approx(expected_out, abs=1e-4)
    in_lp = meta["input_token_logprobs"]
    assert len(in_lp) == n_in and in_lp[0][0] is None
    expected_in = [ref[i - 1, ids[i]].item() for i in range(1, n_in)]
    assert [lp for lp, _, _ in in_lp[1:]] == pytest.approx(expected_in, abs=1e-4)
    assert [tok for _, tok, _ in in_lp] == ids[:n_in]
    top = meta["output_top_logprobs"][0]
    assert len(top) == 3 and top[0][1] == res["output_ids"][0]
    assert top[0][2] == idle_engine.tokenizer.decode([top[0][1]])


def test_input_logprob_rows_per_prefill_pass_are_capped(
    idle_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prompt that wants input logprobs is prefilled in passes of at most
    ``INPUT_LOGPROB_ROWS_PER_PASS`` tokens (its logits are materialized at once), whatever
    the chunk size; the logprobs equal those of one uncapped pass."""
    from backend import scheduler

    prompt, params = PREFIX + "Question: what colour is the sky?", {**GREEDY, "max_new_tokens": 2}
    kw = {"return_logprob": True, "logprob_start_len": 0}
    idle_engine.flush_cache()
    uncapped = idle_engine.generate(prompt, params, **kw)["meta_info"]["input_token_logprobs"]
    monkeypatch.setattr(scheduler, "INPUT_LOGPROB_ROWS_PER_PASS", 16)
    with Engine(max_total_tokens=4096, chunked_prefill_size=1024) as eng:
        res = eng.generate(prompt, params, **kw)
        n_in = res["meta_info"]["prompt_tokens"]
        assert eng.get_stats()["forward_steps"]["prefill"] == -(-n_in // 16)
        capped = res["meta_info"]["input_token_logprobs"]
        assert [t for _, t, _ in capped] == [t for _, t, _ in uncapped]
        assert [lp for lp, _, _ in capped[1:]] == pytest.approx(
            [lp for lp, _, _ in uncapped[1:]], abs=1e-4
        )
        plain = eng.generate(prompt, params)  # no logprobs: one pass over the cached prefix
        assert plain["output_ids"] == res["output_ids"]


def test_input_logprobs_from_a_start_position_after_cached_prefix(
    idle_engine: Engine, hf_model
) -> None:
    prompt = PREFIX + "Question: is water wet?"
    idle_engine.generate(prompt, {"max_new_tokens": 0})  # cache the whole prompt
    ids = idle_engine.tokenizer.encode(prompt)
    start = len(ids) - 5
    res = idle_engine.generate(
        prompt, {"max_new_tokens": 0}, return_logprob=True, logprob_start_len=start
    )
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)
    got = res["meta_info"]["input_token_logprobs"]
    assert [t for _, t, _ in got] == ids[start:]
    assert [lp for lp, _, _ in got] == pytest.approx(
        [ref[i - 1, ids[i]].item() for i in range(start, len(ids))], abs=1e-4
    )
    assert res["text"] == "" and res["output_ids"] == []


def test_prefill_only_request_is_a_cache_hint(idle_engine: Engine) -> None:
    idle_engine.flush_cache()
    prompt = PREFIX + "Question: name a fruit."
    hint = idle_engine.generate(prompt, {"max_new_tokens": 0})
    assert hint["output_ids"] == [] and hint["meta_info"]["finish_reason"]["type"] == "length"
    res = idle_engine.generate(prompt, {"max_new_tokens": 4, "temperature": 0})
    assert res["meta_info"]["cached_tokens"] == res["meta_info"]["prompt_tokens"] - 1


def test_in_batch_dedupe_computes_shared_prefix_once(idle_engine: Engine) -> None:
    idle_engine.flush_cache()
    before = idle_engine.get_stats()
    prompts = [PREFIX * 3 + f"Question {i}: what is {i} plus {i}?" for i in range(6)]
    out = idle_engine.generate(prompts, {"max_new_tokens": 2, "temperature": 0})
    prefix_tokens = len(idle_engine.tokenizer.encode(PREFIX * 3))
    cached = sorted(r["meta_info"]["cached_tokens"] for r in out)
    assert cached[0] == 0 and all(c >= prefix_tokens - 2 for c in cached[1:])
    after = idle_engine.get_stats()  # counters are monotonic: flush_cache does not reset them
    assert after["cached_tokens"] - before["cached_tokens"] == sum(cached)
    hits = sum(cached) / (after["prompt_tokens"] - before["prompt_tokens"])
    assert hits > 0.7


SCENE = "Scene: A man kneels next to a flat bicycle tyre. He"  # shorter than the dedupe limit
ENDINGS = [
    " removes the wheel and patches the inner tube.",
    " starts drawing the ducks on the pond.",
    " checks the oil level with the dipstick.",
    " rolls it evenly across the bedroom wall.",
]


def _scene_requests(engine: Engine) -> tuple[list[list[int]], list[int]]:
    """Token ids of SCENE + each ending and where each ending's tokens start."""
    encode = engine.tokenizer.encode
    scene = encode(SCENE)
    ids = [encode(SCENE + e) for e in ENDINGS]
    starts = [common_prefix_len(scene, x) for x in ids]
    return ids, starts


def test_requests_sharing_an_uncached_prefix_compute_it_once_in_one_pass(
    idle_engine: Engine,
) -> None:
    """A select's choices share the scene: one request computes it, the others attend to its
    KV in the same pass (no second pass, as waiting for the cache would need); the
    logprobs and greedy outputs are those of each request alone."""
    ids, starts = _scene_requests(idle_engine)
    scoring = {"max_new_tokens": 0}
    greedy = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
    alone_scores, alone_outputs = [], []
    for x, st in zip(ids, starts):
        idle_engine.flush_cache()
        res = idle_engine.generate(
            input_ids=x, sampling_params=scoring, return_logprob=True, logprob_start_len=st
        )
        alone_scores.append([lp for lp, _, _ in res["meta_info"]["input_token_logprobs"]])
        idle_engine.flush_cache()
        alone_outputs.append(idle_engine.generate(input_ids=x, sampling_params=greedy))
    for params, extra in (
        (scoring, {"return_logprob": True, "logprob_start_len": starts}),
        (greedy, {}),
    ):
        idle_engine.flush_cache()
        before = idle_engine.get_stats()
        out = idle_engine.generate(input_ids=ids, sampling_params=params, **extra)
        after = idle_engine.get_stats()
        assert after["forward_steps"]["prefill"] - before["forward_steps"]["prefill"] == 1
        computed = (after["prompt_tokens"] - before["prompt_tokens"]) - (
            after["cached_tokens"] - before["cached_tokens"]
        )
        # the scene once, then per request what follows the shared part; a scoring request
        # also computes the scene's last token (its logits score the ending's first token)
        shared = min(starts)
        own = [len(x) - shared + (1 if extra else 0) for x in ids]
        assert computed == shared + sum(own) - (1 if extra else 0)
        if extra:
            got = [[lp for lp, _, _ in r["meta_info"]["input_token_logprobs"]] for r in out]
            for g, a in zip(got, alone_scores):
                assert g == pytest.approx(a, abs=1e-3)
        else:
            assert [r["output_ids"] for r in out] == [r["output_ids"] for r in alone_outputs]


def test_request_added_mid_generation_joins_running_batch(idle_engine: Engine) -> None:
    long_handle = idle_engine.submit(
        PROMPTS[1], {"max_new_tokens": 200, "temperature": 0, "ignore_eos": True}, stream=True
    )[0]
    pieces = long_handle.deltas()
    for _ in range(3):
        next(pieces)
    short = idle_engine.generate(PROMPTS[0], GREEDY)
    assert not long_handle.finished  # the short one finished while the long one kept decoding
    rest = "".join(pieces)
    assert long_handle.finished and len(long_handle.output_ids) == 200 and rest
    solo = idle_engine.generate(PROMPTS[0], GREEDY)
    assert short["output_ids"] == solo["output_ids"]


@pytest.mark.parametrize(
    ("policy", "first_admitted"),
    [("fcfs", 0), ("lpm", 0), ("lof", 1)],  # lof: longest max_new_tokens, FCFS among equals
)
def test_schedule_policy_picks_the_first_request_to_admit(policy: str, first_admitted: int) -> None:
    """One request runs at a time and all four prompts are equal, so only the first one
    admitted computes the prompt: the others find it cached."""
    new_tokens = (2, 6, 6, 4)
    params = [{"max_new_tokens": n, "temperature": 0, "ignore_eos": True} for n in new_tokens]
    with Engine(max_total_tokens=2048, max_running_requests=1, schedule_policy=policy) as eng:
        out = eng.generate([PROMPTS[3]] * len(new_tokens), params)
        computed = [r["meta_info"]["cached_tokens"] == 0 for r in out]
        assert computed == [i == first_admitted for i in range(len(new_tokens))]
        assert [len(r["output_ids"]) for r in out] == list(new_tokens)
        eng.wait_idle()
        eng.check_kv_invariant()
    with pytest.raises(ValueError, match="schedule_policy must be 'lpm', 'fcfs' or 'lof'"):
        Engine(schedule_policy="longest")


def test_abort_running_and_waiting_requests_frees_everything(idle_engine: Engine) -> None:
    handles = idle_engine.submit(
        [PROMPTS[1], PROMPTS[2]],
        {"max_new_tokens": 2000, "temperature": 0, "ignore_eos": True},
        stream=True,
    )
    stream = handles[0].deltas()
    next(stream)
    for h in handles:
        idle_engine.abort(h.rid)
    results = [h.result(timeout=60) for h in handles]
    for r in results:
        assert r["meta_info"]["finish_reason"]["type"] == "abort"
        assert len(r["output_ids"]) < 2000
    idle_engine.abort("no-such-request")  # unknown ids are ignored


def test_concurrent_submission_from_32_threads(idle_engine: Engine, reference) -> None:
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results[i] = idle_engine.generate(PROMPTS[i % 8], GREEDY)["output_ids"]
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(results[i] == reference[i % 8] for i in range(32))


def test_stop_string_spanning_tokens_is_cut_and_never_streamed(
    idle_engine: Engine, reference
) -> None:
    tok = idle_engine.tokenizer
    pieces = [tok.decode([t]) for t in reference[1]]
    # a stop string made of the end of one token and the start of the next
    k = next(
        i for i in range(3, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2
    )
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    full = tok.decode(reference[1])
    expected = full[: full.index(stop)]
    res = idle_engine.generate(PROMPTS[1], {**GREEDY, "stop": [stop]})
    assert res["text"] == expected
    assert res["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    streamed = list(idle_engine.stream(PROMPTS[1], {**GREEDY, "stop": stop}, incremental=True))
    assert "".join(c["text"] for c in streamed) == expected
    cumulative = [c["text"] for c in idle_engine.stream(PROMPTS[1], {**GREEDY, "stop": stop})]
    assert all(expected.startswith(c) for c in cumulative) and cumulative[-1] == expected


def test_stop_token_ids_and_min_new_tokens(idle_engine: Engine, reference) -> None:
    third = reference[0][2]
    res = idle_engine.generate(PROMPTS[0], {**GREEDY, "stop_token_ids": [third]})
    assert res["output_ids"] == reference[0][:3]
    assert res["meta_info"]["finish_reason"] == {"type": "stop", "matched": third}
    # PROMPTS[3] is answered briefly: EOS is banned until min_new_tokens
    short = idle_engine.generate(PROMPTS[3], GREEDY)
    assert short["meta_info"]["finish_reason"]["type"] == "stop"
    n = len(short["output_ids"])
    assert n < 10
    longer = idle_engine.generate(PROMPTS[3], {**GREEDY, "min_new_tokens": n + 5})
    assert len(longer["output_ids"]) >= n + 5
    assert longer["output_ids"][: n - 1] == short["output_ids"][: n - 1]


def test_seeded_sampling_is_reproducible(idle_engine: Engine) -> None:
    params = {"temperature": 1.0, "top_p": 0.95, "max_new_tokens": 24, "seed": 1234}
    alone = idle_engine.generate(PROMPTS[1], params)
    batch = idle_engine.generate([PROMPTS[2], PROMPTS[1], PROMPTS[5]], [params, params, params])
    assert batch[1]["output_ids"] == alone["output_ids"]
    other = idle_engine.generate(PROMPTS[1], {**params, "seed": 99})
    assert other["output_ids"] != alone["output_ids"]
    samples = idle_engine.generate(PROMPTS[1], {**params, "n": 3})
    assert len(samples) == 3 and len({tuple(s["output_ids"]) for s in samples}) > 1


def test_streaming_is_valid_utf8_and_adds_up(idle_engine: Engine) -> None:
    prompt = idle_engine.apply_chat_template(
        [{"role": "user", "content": "Write three emoji and a Japanese word."}]
    )
    chunks = list(
        idle_engine.stream(
            prompt, {"max_new_tokens": 40, "temperature": 0.8, "seed": 7}, incremental=True
        )
    )
    final = idle_engine.generate(prompt, {"max_new_tokens": 40, "temperature": 0.8, "seed": 7})
    assert "".join(c["text"] for c in chunks) == final["text"]
    assert all("\ufffd" not in c["text"] for c in chunks[:-1])
    assert chunks[-1]["meta_info"]["finish_reason"] is not None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": ""}, "empty"),
        ({"prompt": "hi", "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
        ({"prompt": "hi", "sampling_params": {"max_new_tokens": 2.5}}, "max_new_tokens"),
        ({"prompt": "hi", "sampling_params": {"top_p": 1.5}}, "top_p"),
        ({"prompt": "hi", "sampling_params": {"no_such_param": 1}}, "no_such_param"),
        ({"input_ids": [1] * 9000}, "context length"),
        ({"input_ids": [10**9]}, "input_ids"),
        ({"input_ids": [5, -1]}, "input_ids"),
        ({"input_ids": [5, 1.5]}, "input_ids"),
        ({"input_ids": [5, "a"]}, "input_ids"),
        ({"input_ids": [5, 2**70]}, "input_ids"),
        ({"input_ids": [[5, 6], [7, [8]]]}, "input_ids"),
    ],
)
def test_bad_input_fails_only_that_request(idle_engine: Engine, kwargs, message) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        idle_engine.generate(**kwargs)
    assert (
        idle_engine.generate("Hello", {"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2
    )


def test_input_ids_as_numpy_integers_arrays_and_tensors(idle_engine: Engine) -> None:
    ids = idle_engine.tokenizer.encode("The capital of France is")
    params = {"temperature": 0, "max_new_tokens": 4}
    want = idle_engine.generate(input_ids=ids, sampling_params=params)
    for as_numpy in (list(np.asarray(ids, dtype=np.int32)), np.asarray(ids), torch.tensor(ids)):
        got = idle_engine.generate(input_ids=as_numpy, sampling_params=params)
        assert got["output_ids"] == want["output_ids"]
        assert got["meta_info"]["prompt_tokens"] == len(ids)
    batch = idle_engine.generate(input_ids=np.asarray([ids, ids]), sampling_params=params)
    assert [r["output_ids"] for r in batch] == [want["output_ids"]] * 2


def test_shutdown_finishes_requests_in_flight_and_bad_streams_queue_nothing(idle_engine):
    with pytest.raises(ValueError, match="single prompt"):
        idle_engine.generate(["a", "b"], {"max_new_tokens": 4}, stream=True)
    with pytest.raises(ValueError, match="single prompt"):
        idle_engine.stream("a", {"max_new_tokens": 4, "n": 2})
    assert idle_engine.get_stats()["running"] == 0 == idle_engine.get_stats()["waiting"]

    own = Engine(max_total_tokens=2048, num_threads=1)
    (handle,) = own.submit("Tell me a long story.", {"max_new_tokens": 500, "ignore_eos": True})
    own.shutdown()
    out = handle.result(timeout=30)
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert "shut down" in out["meta_info"]["finish_reason"]["message"]
