"""SamplingParams validation and the batched sampler."""

from __future__ import annotations

import math

import pytest
import torch

from backend.sampler import RequestSampling, apply_penalties, sample
from backend.sampling_params import SamplingParams

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# ---------------------------------------------------------------- SamplingParams


def test_defaults_match_sglang() -> None:
    p = SamplingParams()
    assert p.to_dict() == {
        "max_new_tokens": 128,
        "min_new_tokens": 0,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": -1,
        "min_p": 0.0,
        "frequency_penalty": 0.0,
        "presence_penalty": 0.0,
        "repetition_penalty": 1.0,
        "stop": [],
        "stop_regex": [],
        "stop_token_ids": [],
        "ignore_eos": False,
        "skip_special_tokens": True,
        "spaces_between_special_tokens": True,
        "no_stop_trim": False,
        "seed": None,
        "n": 1,
        "regex": None,
        "json_schema": None,
    }
    assert not p.is_greedy and not p.uses_penalties


def test_normalization() -> None:
    p = SamplingParams(stop="###", stop_token_ids=None, top_k=0, temperature=1, seed=None)
    assert p.stop == ["###"] and p.stop_token_ids == [] and p.top_k == -1
    assert isinstance(p.temperature, float)
    p = SamplingParams(stop=("a", "b"), stop_token_ids=(3, 4))
    assert p.stop == ["a", "b"] and p.stop_token_ids == [3, 4]
    assert SamplingParams(stop=None).stop == []
    assert SamplingParams(max_new_tokens=0).max_new_tokens == 0  # prefill-only requests


def test_is_greedy() -> None:
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(top_k=1).is_greedy
    assert not SamplingParams(temperature=0.7, top_k=2).is_greedy


def test_from_dict_and_round_trip() -> None:
    assert SamplingParams.from_dict(None) == SamplingParams()
    p = SamplingParams.from_dict(
        {"temperature": 0.5, "stop": "x", "sampling_seed": 7, "top_p": None}
    )
    assert p.temperature == 0.5 and p.stop == ["x"] and p.seed == 7 and p.top_p == 1.0
    assert SamplingParams.from_dict(p.to_dict()) == p
    assert SamplingParams.from_dict({"seed": 3, "sampling_seed": 3}).seed == 3
    with pytest.raises(ValueError, match="seed"):
        SamplingParams.from_dict({"seed": 3, "sampling_seed": 4})


def test_from_dict_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(ValueError) as err:
        SamplingParams.from_dict({"temperature": 0.5, "top_q": 0.9})
    msg = str(err.value)
    assert "'top_q'" in msg
    for name in ("max_new_tokens", "temperature", "top_p", "stop_token_ids", "sampling_seed"):
        assert name in msg


def test_to_dict_returns_copies() -> None:
    p = SamplingParams(stop=["a"])
    d = p.to_dict()
    d["stop"].append("b")
    assert p.stop == ["a"]


INVALID = [
    ({"max_new_tokens": -1}, "max_new_tokens", "-1"),
    ({"max_new_tokens": 1.5}, "max_new_tokens", "1.5"),
    ({"max_new_tokens": 16.0}, "max_new_tokens", "16.0"),
    ({"max_new_tokens": True}, "max_new_tokens", "True"),
    ({"max_new_tokens": "16"}, "max_new_tokens", "'16'"),
    ({"min_new_tokens": -2}, "min_new_tokens", "-2"),
    ({"min_new_tokens": False}, "min_new_tokens", "False"),
    ({"min_new_tokens": 10, "max_new_tokens": 5}, "min_new_tokens", "10"),
    ({"temperature": -0.1}, "temperature", "-0.1"),
    ({"temperature": float("nan")}, "temperature", "nan"),
    ({"temperature": float("inf")}, "temperature", "inf"),
    ({"temperature": "hot"}, "temperature", "'hot'"),
    ({"temperature": True}, "temperature", "True"),
    ({"top_p": 0.0}, "top_p", "0.0"),
    ({"top_p": 1.5}, "top_p", "1.5"),
    ({"top_p": float("nan")}, "top_p", "nan"),
    ({"top_k": -2}, "top_k", "-2"),
    ({"top_k": 2.0}, "top_k", "2.0"),
    ({"top_k": True}, "top_k", "True"),
    ({"min_p": -0.1}, "min_p", "-0.1"),
    ({"min_p": 1.1}, "min_p", "1.1"),
    ({"frequency_penalty": 2.5}, "frequency_penalty", "2.5"),
    ({"frequency_penalty": -2.01}, "frequency_penalty", "-2.01"),
    ({"presence_penalty": -3}, "presence_penalty", "-3"),
    ({"presence_penalty": float("-inf")}, "presence_penalty", "-inf"),
    ({"repetition_penalty": 0.0}, "repetition_penalty", "0.0"),
    ({"repetition_penalty": -1.0}, "repetition_penalty", "-1.0"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty", "inf"),
    ({"stop": ["ok", ""]}, "stop", "''"),
    ({"stop": ""}, "stop", "''"),
    ({"stop": [1]}, "stop", "1"),
    ({"stop": 5}, "stop", "5"),
    ({"stop_token_ids": [1, -1]}, "stop_token_ids", "-1"),
    ({"stop_token_ids": [True]}, "stop_token_ids", "True"),
    ({"stop_token_ids": ["3"]}, "stop_token_ids", "'3'"),
    ({"stop_token_ids": 3}, "stop_token_ids", "3"),
    ({"n": 0}, "n", "0"),
    ({"n": True}, "n", "True"),
    ({"seed": 1.5}, "seed", "1.5"),
    ({"seed": True}, "seed", "True"),
    ({"ignore_eos": 1}, "ignore_eos", "1"),
    ({"skip_special_tokens": "yes"}, "skip_special_tokens", "'yes'"),
    ({"spaces_between_special_tokens": None}, "spaces_between_special_tokens", "None"),
    ({"no_stop_trim": 0}, "no_stop_trim", "0"),
]


@pytest.mark.parametrize(("kwargs", "name", "value"), INVALID)
def test_invalid_params_name_parameter_and_value(kwargs: dict, name: str, value: str) -> None:
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    assert name in str(err.value) and value in str(err.value), str(err.value)
    # from_dict reports the same error (None there means "default", so skip those).
    if None not in kwargs.values():
        with pytest.raises(ValueError, match=name):
            SamplingParams.from_dict(kwargs)


def test_validate_after_mutation() -> None:
    p = SamplingParams()
    p.top_p = 0.0
    with pytest.raises(ValueError, match="top_p"):
        p.validate()
    p.top_p = 0.5
    p.stop = "end"  # type: ignore[assignment]
    p.validate()
    assert p.stop == ["end"]


def test_boundary_values_are_valid() -> None:
    SamplingParams(
        temperature=0.0,
        top_p=1.0,
        top_k=1,
        min_p=1.0,
        frequency_penalty=-2.0,
        presence_penalty=2.0,
        repetition_penalty=1e-3,
        min_new_tokens=5,
        max_new_tokens=5,
        stop_token_ids=[0],
        seed=-5,
    )


# ---------------------------------------------------------------- sampler helpers

V = 32


def state(device: str = "cpu", prompt=(), eos=(V - 1,), vocab: int = V, **kw) -> RequestSampling:
    return RequestSampling(SamplingParams(**kw), prompt, eos, vocab, device=device)


def draw_many(logits_row: torch.Tensor, n: int, device: str = "cpu", **kw) -> torch.Tensor:
    """``n`` independent draws: one batch of ``n`` identical rows, each its own seeded state."""
    logits = logits_row.to(device).unsqueeze(0).expand(n, -1).contiguous()
    states = [state(device, vocab=logits.shape[1], seed=i, **kw) for i in range(n)]
    return sample(logits, states, [0] * n).cpu()


# ---------------------------------------------------------------- sampler


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_is_argmax_and_input_untouched(device: str) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, V, generator=g).to(device)
    before = logits.clone()
    states = [state(device, temperature=0.0) for _ in range(8)]
    out = sample(logits, states, [0] * 8)
    assert out.dtype == torch.int64 and out.device.type == device
    assert torch.equal(out, logits.argmax(dim=1))
    assert torch.equal(logits, before)
    states = [state(device, top_k=1, temperature=1.3) for _ in range(8)]
    assert torch.equal(sample(logits, states, [0] * 8), logits.argmax(dim=1))


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_over_bfloat16_logits(device: str) -> None:
    """Greedy rows over bf16 logits take their argmax; a ban (EOS before
    ``min_new_tokens``) still applies."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(8, V, generator=g).to(torch.bfloat16).to(device)
    logits[:, V - 1] = logits.max() + 1  # EOS is every row's maximum
    states = [state(device, temperature=0.0) for _ in range(8)]
    assert torch.equal(sample(logits, states, [0] * 8), logits.float().argmax(dim=1))
    banned = [state(device, temperature=0.0, min_new_tokens=2) for _ in range(8)]
    out = sample(logits, banned, [0] * 8)
    assert torch.equal(out, logits.float()[:, : V - 1].argmax(dim=1))


def test_tiny_top_p_is_argmax() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, V, generator=g)
    states = [state(top_p=1e-6, seed=i) for i in range(64)]
    assert torch.equal(sample(logits, states, [0] * 64), logits.argmax(dim=1))


def test_tiny_temperature_stays_finite() -> None:
    logits = torch.tensor([[50.0, 49.0, -50.0, 0.0]])
    assert sample(logits, [state(vocab=4, eos=(), temperature=1e-30, seed=0)], [0]).item() == 0


def probs_logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().to(torch.float32)


def test_top_k_keeps_exactly_k() -> None:
    logits = probs_logits([0.05, 0.3, 0.1, 0.2, 0.15, 0.2])
    got = set(draw_many(logits, 2000, eos=(), top_k=3).tolist())
    assert got == {1, 3, 5}


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_and_top_p_differ_per_row_in_one_batch(device: str) -> None:
    probs = [0.05, 0.3, 0.1, 0.25, 0.18, 0.12]
    logits = probs_logits(probs).repeat(1500, 1).to(device)
    kws = [dict(top_k=2), dict(top_k=4), dict(top_p=0.5), dict(top_k=-1), dict(top_p=0.7)]
    states = [state(device, vocab=6, eos=(), seed=i, **kws[i % 5]) for i in range(1500)]
    out = sample(logits, states, [0] * 1500).cpu()
    support = [set(out[i::5].tolist()) for i in range(5)]
    assert support == [{1, 3}, {1, 3, 4, 5}, {1, 3}, set(range(6)), {1, 3, 4}]


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    logits = probs_logits([0.05, 0.5, 0.15, 0.3])
    assert set(draw_many(logits, 2000, eos=(), top_p=0.75).tolist()) == {1, 3}
    assert set(draw_many(logits, 2000, eos=(), top_p=0.85).tolist()) == {1, 2, 3}
    assert set(draw_many(logits, 500, eos=(), top_p=0.5).tolist()) == {1}


def test_min_p_drops_relative_to_max() -> None:
    logits = probs_logits([0.05, 0.5, 0.15, 0.3])
    # threshold 0.3 * 0.5 = 0.15: 0.15 itself stays, 0.05 goes
    assert set(draw_many(logits, 2000, eos=(), min_p=0.3).tolist()) == {1, 2, 3}
    assert set(draw_many(logits, 2000, eos=(), min_p=0.5).tolist()) == {1, 3}


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("device", DEVICES)
def test_temperature_distribution(device: str) -> None:
    base = torch.tensor([2.0, 1.0, 0.0, -1.0])
    n = 8000
    for temperature in (0.5, 2.0):
        draws = draw_many(base, n, device, eos=(), temperature=temperature)
        counts = torch.bincount(draws, minlength=4).double()
        want = torch.softmax(base.double() / temperature, 0)
        untempered = torch.softmax(base.double(), 0)
        # df = 3: P(chi2 > 30) < 1e-5 under the right distribution; the wrong one is far off.
        assert chi2(counts, want) < 30.0, counts
        assert chi2(counts, untempered) > 300.0, counts


def test_combined_filters_distribution() -> None:
    """top_k then top_p then min_p, renormalized: the kept tokens keep their relative odds."""
    probs = [0.02, 0.4, 0.08, 0.25, 0.15, 0.1]
    draws = draw_many(probs_logits(probs), 8000, eos=(), top_k=5, top_p=0.85, min_p=0.3)
    counts = torch.bincount(draws, minlength=6).double()
    # top_k=5 drops 0.02; top_p=0.85 keeps 0.4, 0.25, 0.15, 0.1 (0.8 < 0.85 before 0.1);
    # min_p=0.3 drops < 0.12, i.e. 0.1 and 0.08.
    want = torch.tensor([0, 0.4, 0, 0.25, 0.15, 0], dtype=torch.float64)
    assert counts[[0, 2, 5]].sum() == 0
    assert chi2(counts[[1, 3, 4]], want[[1, 3, 4]] / want.sum()) < 30.0


@pytest.mark.parametrize("device", DEVICES)
def test_penalty_values_exact(device: str) -> None:
    logits = torch.tensor(
        [[2.0, -1.0, 0.5, 3.0, 0.0, 1.0], [2.0, -1.0, 0.5, 3.0, 0.0, 1.0]], device=device
    )
    s = state(
        device,
        prompt=[0, 1],
        vocab=6,
        repetition_penalty=2.0,
        frequency_penalty=0.5,
        presence_penalty=0.25,
    )
    plain = state(device, vocab=6)
    for t in (3, 3, 2):
        s.observe(t)
        plain.observe(t)
    assert plain.seen is None and plain.output_counts is None
    out = logits.clone()
    apply_penalties(out, [s, plain], [0])
    # repetition over prompt+output {0,1,2,3}: 2->1, -1->-2, 0.5->0.25, 3->1.5
    # frequency/presence over output {3: 2, 2: 1}: 3: 1.5-1-0.25, 2: 0.25-0.5-0.25
    expected = torch.tensor([1.0, -2.0, -0.5, 0.25, 0.0, 1.0], device=device)
    torch.testing.assert_close(out[0], expected, rtol=0, atol=1e-6)
    assert torch.equal(out[1], logits[1])


def test_penalty_each_kind_alone() -> None:
    row = torch.tensor([[1.0, -1.0, 2.0, 0.5]])
    cases = [
        (dict(repetition_penalty=0.5), [2.0, -0.5, 2.0, 0.5]),  # prompt 0,1 only
        (dict(frequency_penalty=-1.0), [1.0, -1.0, 2.0, 0.5]),  # no output yet
        (dict(presence_penalty=1.5), [1.0, -1.0, 2.0, 0.5]),
    ]
    for kw, want in cases:
        s = state(prompt=[0, 1], vocab=4, eos=(), **kw)
        out = row.clone()
        apply_penalties(out, [s], [0])
        torch.testing.assert_close(out[0], torch.tensor(want), rtol=0, atol=1e-6)
    s = state(vocab=4, eos=(), frequency_penalty=-1.0, presence_penalty=0.5)
    for t in (1, 1, 1, 3):
        s.observe(t)
    out = row.clone()
    apply_penalties(out, [s], [0])
    torch.testing.assert_close(out[0], torch.tensor([1.0, 1.5, 2.0, 1.0]), rtol=0, atol=1e-6)


def test_repetition_penalty_changes_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    s = state(vocab=4, eos=(), temperature=0.0, repetition_penalty=2.0)
    assert sample(logits, [s], [0]).item() == 0
    s.observe(0)  # 3.0 -> 1.5 < 2.0
    assert sample(logits, [s], [1]).item() == 1


def test_banned_ids_under_min_new_tokens() -> None:
    eos, stop_id = 5, 7
    logits = torch.zeros(1, 10)
    logits[0, eos] = 10.0
    logits[0, stop_id] = 9.0
    logits[0, 2] = 8.0
    s = state(vocab=10, eos=(eos,), temperature=0.0, min_new_tokens=3, stop_token_ids=[stop_id])
    assert s.banned_token_ids(0) == [eos, stop_id]
    for n in range(3):
        assert sample(logits, [s], [n]).item() == 2
    assert s.banned_token_ids(3) == []
    assert sample(logits, [s], [3]).item() == eos


def test_ignore_eos_always_bans_eos() -> None:
    logits = torch.zeros(1, 10)
    logits[0, 5] = 10.0
    logits[0, 7] = 9.0
    s = state(vocab=10, eos=(5, 6), temperature=0.0, ignore_eos=True, stop_token_ids=[7])
    assert s.banned_token_ids(100) == [5, 6]
    assert sample(logits, [s], [100]).item() == 7  # stop ids are not EOS: still allowed


def test_sampling_respects_bans() -> None:
    logits = torch.zeros(1, 4)
    logits[0, 3] = 20.0  # EOS would win almost surely
    draws = draw_many(logits[0], 500, eos=(3,), min_new_tokens=1)
    assert 3 not in draws.tolist() and set(draws.tolist()) == {0, 1, 2}


def seeded_run(
    rows: int, position: int, steps: int, seed_logits: int, device: str = "cpu"
) -> list[int]:
    """Tokens drawn for one seeded request at ``position`` in a batch of ``rows``."""
    g = torch.Generator().manual_seed(seed_logits)
    target = state(device, temperature=0.8, top_p=0.9, top_k=20, seed=1234)
    others = [
        state(device, temperature=[0.0, 1.0, 0.7][i % 3], top_p=[1.0, 0.5, 0.95][i % 3], seed=i)
        for i in range(rows - 1)
    ]
    states = [*others[:position], target, *others[position:]]
    mine = torch.Generator().manual_seed(99)
    tokens = []
    for step in range(steps):
        logits = torch.randn(rows, V, generator=g) * 3
        logits[position] = torch.randn(V, generator=mine) * 3
        out = sample(logits.to(device), states, [step] * rows).cpu()
        tokens.append(int(out[position]))
        for s, t in zip(states, out.tolist(), strict=True):
            s.observe(t)
    return tokens


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_reproducible_regardless_of_batch(device: str) -> None:
    alone = seeded_run(1, 0, 40, 0, device)
    assert seeded_run(1, 0, 40, 5, device) == alone  # other rows: none either way
    assert seeded_run(7, 3, 40, 1, device) == alone
    assert seeded_run(16, 15, 40, 2, device) == alone
    assert len(set(alone)) > 3  # it really samples


def test_unseeded_requests_differ() -> None:
    logits = torch.zeros(2, 1000)
    a, b = state(vocab=1000, eos=()), state(vocab=1000, eos=())
    seq_a, seq_b = [], []
    for _ in range(8):
        out = sample(logits, [a, b], [0, 0])
        seq_a.append(int(out[0]))
        seq_b.append(int(out[1]))
    assert seq_a != seq_b


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_batch(device: str) -> None:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(V, generator=g)
    logits = base.repeat(6, 1).to(device)
    order = base.argsort(descending=True).tolist()
    eos = order[0]
    assert base[eos] / 100 < base[order[1]]  # so the repetition penalty flips row 4
    states = [
        state(device, eos=(eos,), temperature=0.0),  # greedy
        state(device, eos=(eos,), temperature=0.0, min_new_tokens=2),  # greedy, EOS banned
        state(device, eos=(eos,), top_k=2, seed=1),
        state(device, eos=(eos,), top_p=1e-6, temperature=2.0, seed=2),
        state(device, eos=(eos,), temperature=0.0, repetition_penalty=100.0, prompt=[eos]),
        state(device, eos=(eos,), temperature=1.5, min_p=0.9, seed=4),
    ]
    for _ in range(20):
        out = sample(logits, states, [0] * 6).tolist()
        assert out[0] == eos
        assert out[1] == order[1]
        assert out[2] in order[:2]
        assert out[3] == eos
        assert out[4] == order[1]
        assert out[5] == eos or base[out[5]] - base[eos] >= 1.5 * math.log(0.9)


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="batch size"):
        sample(torch.zeros(2, V), [state()], [0, 0])
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        sample(torch.zeros(V), [state()], [0])
    assert sample(torch.zeros(0, V), [], []).numel() == 0
