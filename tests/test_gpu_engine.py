"""The engine on a CUDA GPU: CUDA graphs, GPU sampling and masks, memory sizing, bf16.

Skipped without CUDA. Tiny random checkpoints (``tests/tiny_models.py``) are compared with
transformers on the same GPU, so no embedded model is needed: where its package is not
installed, ``SGL_DSL_TOKENIZER_DIR`` names a folder with SmolLM2's tokenizer files.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tiny_models import write_tiny_model

from backend.attention import triton_kernels as tk
from backend.engine import Engine
from backend.prefill_graph_runner import LONG_CONTEXT_CHUNK, prefix_splits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far away,",
    "def fibonacci(n):",
    "1, 2, 3, 4,",
    "A list of fruits:\n-",
    " ".join(f"item {i}," for i in range(60)),
]
GREEDY = {"temperature": 0, "max_new_tokens": 24}
WORDS = ("red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "rain", "snow", "sea", "sky")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer_dir = os.environ.get("SGL_DSL_TOKENIZER_DIR")
    root = tmp_path_factory.mktemp("gpu")
    return write_tiny_model(root / "llama", "llama", tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="module")
def reference(tiny_dir: Path) -> list[list[int]]:
    """transformers' greedy continuations of PROMPTS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    return transformers_greedy(tiny_dir, [tok.encode(p) for p in PROMPTS])


def transformers_greedy(tiny_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    """transformers' greedy continuations of token-id prompts on the GPU in float32."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).cuda().eval()
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device="cuda")
        gen = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=GREEDY["max_new_tokens"],
            do_sample=False,
            eos_token_id=2,
            pad_token_id=2,
        )
        out.append(gen[0, ids.shape[1] :].tolist())
    return out


def check_idle(engine: Engine) -> None:
    engine.wait_idle()
    acc = engine.check_kv_invariant()
    assert acc["protected"] == 0 and acc["owned_by_requests"] == 0


GRAPHS_UP_TO_4 = {
    "device": "cuda",
    "dtype": "float32",
    "max_total_tokens": 4096,
    "cuda_graph_max_bs": 4,
}
"""float32 on the GPU with CUDA graphs for batch sizes up to 4 (larger: eager)."""


@pytest.fixture(scope="module")
def graph_engine(tiny_dir: Path) -> Iterator[Engine]:
    with Engine(str(tiny_dir), chunked_prefill_size=64, **GRAPHS_UP_TO_4) as eng:
        yield eng


def test_cuda_graphs_were_captured(graph_engine: Engine) -> None:
    graphs = graph_engine.scheduler.runner.graphs
    assert graphs is not None and graphs.sizes == [1, 2, 4]


def test_greedy_matches_transformers_with_graphs_and_eager(
    graph_engine: Engine, reference: list[list[int]]
) -> None:
    """6 requests decode eagerly (over 4), then from graphs as they finish; one request
    alone and three (padded to 4) replay graphs only."""
    out = graph_engine.generate(PROMPTS, GREEDY)
    assert [r["output_ids"] for r in out] == reference
    alone = graph_engine.generate(PROMPTS[1], GREEDY)
    assert alone["output_ids"] == reference[1]
    three = graph_engine.generate(PROMPTS[2:5], GREEDY)
    assert [r["output_ids"] for r in three] == reference[2:5]
    check_idle(graph_engine)


def test_requests_borrowing_a_prefix_in_one_pass_decode_as_alone(graph_engine: Engine) -> None:
    """Requests sharing an uncached prefix run in one prefill pass, one computing it and the
    other attending to its fresh KV through the Triton extend kernel: the same greedy tokens
    as each prompt alone."""
    tok = graph_engine.tokenizer
    prefix = tok.encode(PROMPTS[1])
    prompts = [prefix + tok.encode(s, add_special_tokens=False) for s in (" a cat", " a dog")]
    graph_engine.flush_cache()
    before = graph_engine.get_stats()
    out = graph_engine.generate(input_ids=prompts, sampling_params=GREEDY)
    after = graph_engine.get_stats()
    assert after["forward_steps"]["prefill"] - before["forward_steps"]["prefill"] == 1
    assert after["cached_tokens"] - before["cached_tokens"] >= len(prefix)  # borrowed
    alone = []
    for p in prompts:
        graph_engine.flush_cache()
        alone.append(graph_engine.generate(input_ids=p, sampling_params=GREEDY)["output_ids"])
    assert [r["output_ids"] for r in out] == alone
    check_idle(graph_engine)


def prefill_script(eng: Engine) -> list[tuple[list[dict], int, int]]:
    """Calls covering every kind of prefill pass; per call its outputs, the number of prefill
    passes it ran and how many of them replayed a graph."""
    tok = eng.tokenizer
    stem = tok.encode(PROMPTS[1])
    calls = [
        [PROMPTS[0]],  # one short cold request
        PROMPTS[1:4],  # three cold requests
        PROMPTS[:5],  # four cached but for their last token (first: lpm), one cold (last)
        [stem + tok.encode(" a cat sat", add_special_tokens=False)],  # over the cached stem
        [PROMPTS[2]],  # fully cached: one new token
        [PROMPTS[5]],  # ~250 tokens: chunks of 64
        [stem + tok.encode(f" {w} {w}", add_special_tokens=False) for w in WORDS],  # 12 x 2+
    ]
    params = {**GREEDY, "max_new_tokens": 6}
    runner = eng.scheduler.runner.prefill_graphs
    eng.flush_cache()
    results = []
    for prompts in calls:
        before, replays = eng.get_stats()["forward_steps"]["prefill"], runner and runner.replays
        ids = [tok.encode(p) if isinstance(p, str) else p for p in prompts]
        out = eng.generate(input_ids=ids, sampling_params=params)
        passes = eng.get_stats()["forward_steps"]["prefill"] - before
        results.append((out, passes, (runner.replays - replays) if runner else 0))
    replays = runner and runner.replays
    scored = eng.generate(
        input_ids=tok.encode(PROMPTS[4]),
        sampling_params=params,
        return_logprob=True,
        logprob_start_len=0,
    )  # cached but for its last token: logprobs need every position computed, 1 pass
    results.append(([scored], 1, (runner.replays - replays) if runner else 0))
    check_idle(eng)
    return results


def test_prefill_passes_replay_graphs(graph_engine: Engine, tiny_dir: Path) -> None:
    """Prefill passes of at most 64 requests and 64 tokens (the chunk size), padded to 16,
    32 or 64 tokens, replay graphs, one-token requests included (which an eager pass gives
    the decode kernels). Greedy tokens and input logprobs equal those without prefill
    graphs."""
    runner = graph_engine.scheduler.runner.prefill_graphs
    assert runner is not None and runner.sizes == [16, 32, 64] and runner.max_requests == 64
    assert runner.can_run([9] * 32, [2] * 32) and runner.can_run([0, 0], [1, 63])
    assert runner.can_run([runner.kv_capacity - 64], [64])
    assert runner.can_run([0, 0], [5, 1]) and runner.can_run([7], [1])
    longest = LONG_CONTEXT_CHUNK * prefix_splits(16)  # a one-token request's context
    assert runner.can_run([longest], [1]) and runner.can_run([longest + 1], [2])
    assert not runner.can_run([longest + 1], [1])
    assert not runner.can_run([0], [65]) and not runner.can_run([], [])
    assert not runner.can_run([0, 0, 0], [2, 0, 0])  # more requests than tokens
    assert not runner.can_run([runner.kv_capacity - 63], [64])
    with Engine(str(tiny_dir), chunked_prefill_size=64, cuda_graph_max_prefill_tokens=0,
                **GRAPHS_UP_TO_4) as eager:  # fmt: skip
        assert eager.scheduler.runner.prefill_graphs is None
        expected = prefill_script(eager)
    got = prefill_script(graph_engine)
    replayed = [replays for _, _, replays in got]
    passes = [n for _, n, _ in got]
    assert replayed[:5] == passes[:5] == [1, 1, 1, 1, 1]  # graphs only
    long_prompt = len(graph_engine.tokenizer.encode(PROMPTS[5]))
    assert replayed[5] == passes[5] == -(-long_prompt // 64) >= 4  # chunks of 64 tokens
    assert replayed[6] == passes[6] == 1  # 12 requests over a cached stem: one pass
    assert replayed[7] == 1
    for (out, _, _), (want, _, _) in zip(got, expected):
        assert [r["output_ids"] for r in out] == [r["output_ids"] for r in want]
    lp = [x for x, _, _ in got[7][0][0]["meta_info"]["input_token_logprobs"][1:]]
    want_lp = [x for x, _, _ in expected[7][0][0]["meta_info"]["input_token_logprobs"][1:]]
    assert lp == pytest.approx(want_lp, abs=1e-4)


def test_short_extend_over_a_long_cached_prefix_matches_transformers(
    graph_engine: Engine, tiny_dir: Path
) -> None:
    """A few new tokens after ~440 cached ones (a program's gen over a long context): the
    extend kernel reads the cached prefix in chunks (here 2 of at least 256 tokens) and
    merges them, replayed from the 16-token graph and eagerly with prefill graphs off;
    greedy tokens equal transformers'."""
    tok = graph_engine.tokenizer
    stem = tok.encode(" ".join(f"item {i}," for i in range(90)))
    prompt = stem + tok.encode(" and the next", add_special_tokens=False)
    assert -(-len(stem) // tk.MIN_PREFIX_SPLIT_LEN) == 2 <= prefix_splits(16)
    want = transformers_greedy(tiny_dir, [prompt])[0]
    runner = graph_engine.scheduler.runner.prefill_graphs
    with Engine(str(tiny_dir), chunked_prefill_size=64, cuda_graph_max_prefill_tokens=0,
                **GRAPHS_UP_TO_4) as eager:  # fmt: skip
        for eng in (graph_engine, eager):
            eng.flush_cache()
            eng.generate(input_ids=stem, sampling_params={**GREEDY, "max_new_tokens": 1})
            before, replays = eng.get_stats(), runner.replays
            out = eng.generate(input_ids=prompt, sampling_params=GREEDY)
            after = eng.get_stats()
            assert after["forward_steps"]["prefill"] - before["forward_steps"]["prefill"] == 1
            assert after["cached_tokens"] - before["cached_tokens"] >= len(stem)
            assert runner.replays - replays == (1 if eng is graph_engine else 0)
            assert out["output_ids"] == want
            check_idle(eng)


def test_graphs_off_gives_the_same_tokens(tiny_dir: Path, reference: list[list[int]]) -> None:
    with Engine(
        str(tiny_dir),
        device="cuda",
        dtype="float32",
        max_total_tokens=4096,
        disable_cuda_graph=True,
    ) as eng:
        assert eng.scheduler.runner.graphs is None
        assert eng.scheduler.runner.prefill_graphs is None
        out = eng.generate(PROMPTS, GREEDY)
        assert [r["output_ids"] for r in out] == reference
        check_idle(eng)


def test_mixed_chunk_with_graphs_and_overlap_gives_the_same_tokens(
    tiny_dir: Path, reference: list[list[int]]
) -> None:
    """Prefill passes that also decode the running requests (8-token chunks, so prompts
    take several passes), between overlapped graph-replayed decode steps."""
    with Engine(
        str(tiny_dir), chunked_prefill_size=8, enable_mixed_chunk=True, **GRAPHS_UP_TO_4
    ) as eng:
        out = eng.generate(PROMPTS, GREEDY)
        assert [r["output_ids"] for r in out] == reference
        assert eng.get_stats()["forward_steps"]["mixed"] > 0
        check_idle(eng)


def test_seeded_sampling_on_gpu_is_reproducible_across_batches(graph_engine: Engine) -> None:
    params = {"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 16, "seed": 1234}
    alone = graph_engine.generate(PROMPTS[0], params)["output_ids"]
    mixed = graph_engine.generate(
        PROMPTS[:3], [params, {"temperature": 0.8, "max_new_tokens": 16}, {**params, "seed": 9}]
    )
    assert mixed[0]["output_ids"] == alone
    assert mixed[2]["output_ids"] != alone
    check_idle(graph_engine)


def test_json_schema_on_gpu_validates(graph_engine: Engine) -> None:
    """Masks applied by the Triton bitmask kernel to CUDA logits, sampled and greedy."""
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        },
        "required": ["name", "age", "tags"],
        "additionalProperties": False,
    }
    params = [
        {"json_schema": schema, "temperature": 0, "max_new_tokens": 96},
        {"json_schema": schema, "temperature": 1.0, "max_new_tokens": 96, "seed": 3},
        {"regex": r"[0-9]{3}-[a-z]{4}", "temperature": 1.0, "max_new_tokens": 16},
    ]
    out = graph_engine.generate(PROMPTS[:3], params)
    for r in out[:2]:
        assert r["meta_info"]["finish_reason"]["type"] == "stop", r
        value = json.loads(r["text"])
        assert set(value) == {"name", "age", "tags"}
        assert len(value["name"]) <= 12 and 0 <= value["age"] <= 120
        assert set(value["tags"]) <= {"a", "b", "c"} and len(value["tags"]) <= 3
    import re

    assert re.fullmatch(r"[0-9]{3}-[a-z]{4}", out[2]["text"])
    check_idle(graph_engine)


def test_bfloat16_default_runs_and_matches_first_tokens(
    tiny_dir: Path, reference: list[list[int]]
) -> None:
    """bf16 (the CUDA default) with graphs: the first token of each prompt (argmax of a
    well-separated distribution for this peaky model) agrees with float32 transformers."""
    with Engine(str(tiny_dir), device="cuda", max_total_tokens=4096) as eng:
        assert eng.model.lm_head.weight.dtype == torch.bfloat16
        out = eng.generate(PROMPTS, {**GREEDY, "ignore_eos": True})
        assert all(len(r["output_ids"]) == GREEDY["max_new_tokens"] for r in out)
        agree = sum(r["output_ids"][0] == ref[0] for r, ref in zip(out, reference))
        assert agree >= len(PROMPTS) - 1
        check_idle(eng)


def test_fp8_kv_cache_halves_slot_bytes_and_keeps_first_tokens(
    tiny_dir: Path, reference: list[list[int]]
) -> None:
    """``kv_cache_dtype="fp8_e4m3"``: the pool is float8 (half the bytes per slot of
    bf16), prefill attends to the new tokens' bf16 K/V (first tokens agree with
    transformers as bf16's do), decode reads the float8 cache; graphs, the eager path
    (batches past ``cuda_graph_max_bs``) and a cached prefix all run, with no slot leaked."""
    options = {"device": "cuda", "max_total_tokens": 4096, "cuda_graph_max_bs": 4}
    with Engine(str(tiny_dir), kv_cache_dtype="fp8_e4m3", **options) as eng:
        assert eng.pool.k_buffers[0].dtype == torch.float8_e4m3fn
        assert eng.pool.bytes_per_slot() * 2 == eng.model.num_layers * eng.model.num_kv_heads * (
            eng.model.head_dim * 2 * 2
        )
        out = eng.generate(PROMPTS, {**GREEDY, "ignore_eos": True})
        assert all(len(r["output_ids"]) == GREEDY["max_new_tokens"] for r in out)
        agree = sum(r["output_ids"][0] == ref[0] for r, ref in zip(out, reference))
        assert agree >= len(PROMPTS) - 1
        # cached prefixes: the prompt's last token now attends to the float8 prefix, not to
        # its own pass's bf16 K/V, so only the first tokens are compared
        again = eng.generate(PROMPTS, {**GREEDY, "ignore_eos": True})
        agree = sum(a["output_ids"][0] == r["output_ids"][0] for a, r in zip(again, out))
        assert agree >= len(PROMPTS) - 1
        assert eng.get_stats()["cache_hit_rate"] > 0
        check_idle(eng)


def test_kv_pool_sized_from_free_gpu_memory(tiny_dir: Path) -> None:
    free, total = torch.cuda.mem_get_info()
    with Engine(str(tiny_dir), device="cuda", mem_fraction_static=0.3) as eng:
        per_slot = eng.pool.bytes_per_slot()
        expected = (total * 0.3 - (total - free)) / per_slot
        # the weights and the engine's own buffers came out of the same budget
        assert 0.9 * expected < eng.config.max_total_tokens <= expected
        assert eng.generate(PROMPTS[0], GREEDY)["output_ids"]
    used_fraction = (total - free) / total
    with pytest.raises(ValueError, match="mem_fraction_static"):
        Engine(str(tiny_dir), device="cuda", mem_fraction_static=max(used_fraction / 2, 1e-3))


def test_dummy_weights_load_on_gpu(tiny_dir: Path) -> None:
    with Engine(str(tiny_dir), device="cuda", load_format="dummy", max_total_tokens=2048) as eng:
        assert eng.model.lm_head.weight.is_cuda
        out = eng.generate(PROMPTS[:2], {**GREEDY, "ignore_eos": True})
        assert all(len(r["output_ids"]) == GREEDY["max_new_tokens"] for r in out)
        check_idle(eng)


def test_overlapped_decode_equals_sequential(tiny_dir: Path) -> None:
    """Overlap (step N + 1 launched from step N's ids on the device) changes nothing:
    requests finishing at different steps (lengths, a stop string, EOS), constrained ones
    (masks, jump-forward, a terminal state), penalties and min_new_tokens, one streamed: the
    same tokens, text and finish reasons as without overlap; an abort mid-way frees all."""
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "n": {"type": "integer"}},
        "required": ["name", "n"],
    }
    params = [
        {"temperature": 0, "max_new_tokens": n, **extra}
        for n, extra in [
            (5, {}),
            (17, {}),
            (30, {"stop": ["e"]}),
            (40, {"ignore_eos": True}),
            (3, {}),
            (26, {"temperature": 0.9, "seed": 11}),
            (48, {"json_schema": json.dumps(schema)}),
            (24, {"regex": r"(ab|cd)[0-9]{2,6}-[a-z]+"}),
            (20, {"frequency_penalty": 0.8, "repetition_penalty": 1.3}),
            (12, {"min_new_tokens": 10, "temperature": 0.7, "seed": 5}),
        ]
    ]
    results = {}
    for overlap in (False, True):
        with Engine(
            str(tiny_dir),
            device="cuda",
            dtype="float32",
            max_total_tokens=4096,
            disable_overlap_schedule=not overlap,
        ) as eng:
            streamed = list(eng.stream(PROMPTS[0], params[3], incremental=True))
            prompts = (PROMPTS * 3)[: len(params)]
            out = eng.generate(prompts, params)
            long = {"max_new_tokens": 400, "ignore_eos": True}
            handle = eng.submit(PROMPTS[1], long, stream=True)[0]
            while len(handle.output_ids) < 3 and not handle.finished:
                handle.poll()
                time.sleep(0.001)
            eng.abort(handle.rid)
            aborted = handle.result(timeout=30)
            assert aborted["meta_info"]["finish_reason"]["type"] == "abort"
            check_idle(eng)
            results[overlap] = (
                [(r["output_ids"], r["text"], r["meta_info"]["finish_reason"]) for r in out],
                "".join(c["text"] for c in streamed),
            )
    assert results[True] == results[False]
