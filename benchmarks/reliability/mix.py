"""The request mix of the load test: deterministic, with how to check each answer.

Contract: `make_jobs(n, seed)` returns `n` jobs in a shuffled order fixed by `seed`; each
`Job` knows its route, body and `kind`. `check(job, status, body)` returns None when the
answer is correct for that kind, else a message saying what is wrong. Aborted and
disconnected jobs are never checked (their clients stop reading on purpose).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Any

import jsonschema

REGEXES = [r"[0-9]{4}-[0-9]{2}-[0-9]{2}", r"(yes|no|maybe)", r"[A-Z][a-z]{1,6}", r"#[0-9a-f]{6}"]
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Rome", "Oslo", "Lima"]},
        "rank": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
    },
    "required": ["city", "rank", "ok"],
}
PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "List three colours:",
    "Q: What is 12 + 7?\nA:",
    "Once upon a time, in a small village,",
    "Translate 'good morning' to Spanish:",
    "The best way to learn Python is",
    "Describe a cat in one sentence.",
]
CHOICES = [" yes", " no", " perhaps"]

# (kind, weight): about 10% of the jobs are aborted by their client mid-stream and 3%
# disconnect abruptly.
WEIGHTS = [
    ("plain", 24),
    ("regex", 14),
    ("json", 12),
    ("stream", 14),
    ("select", 10),
    ("chat", 10),
    ("chat_stream", 3),
    ("abort", 10),
    ("disconnect", 3),
]
UNCHECKED = ("abort", "disconnect")


@dataclass
class Job:
    """One request of the load: `path` and JSON `body`; `kind` says how to check it."""

    index: int
    kind: str
    path: str
    body: dict[str, Any]
    regex: str | None = None
    abort_after_events: int = 1


def _sampling(rng: random.Random, max_new: int) -> dict[str, Any]:
    params: dict[str, Any] = {"max_new_tokens": max_new, "temperature": 0.0}
    if rng.random() < 0.5:
        params.update(temperature=0.8, top_p=0.95, seed=rng.randrange(1 << 30))
    return params


def _job(i: int, kind: str, rng: random.Random) -> Job:
    prompt = rng.choice(PROMPTS) + (" " + str(rng.randrange(1000)) if rng.random() < 0.5 else "")
    if kind == "plain":
        return Job(i, kind, "/generate", {"text": prompt, "sampling_params": _sampling(rng, 8)})
    if kind == "regex":
        regex = rng.choice(REGEXES)
        params = {**_sampling(rng, 16), "regex": regex}
        return Job(i, kind, "/generate", {"text": prompt, "sampling_params": params}, regex)
    if kind == "json":
        params = {**_sampling(rng, 32), "json_schema": json.dumps(SCHEMA)}
        return Job(i, kind, "/generate", {"text": prompt + " As JSON:", "sampling_params": params})
    if kind in ("stream", "abort"):
        params = _sampling(rng, 8 if kind == "stream" else 64)
        if kind == "abort":
            params["ignore_eos"] = True
        body = {"text": prompt, "stream": True, "sampling_params": params}
        return Job(i, kind, "/generate", body, abort_after_events=rng.randint(1, 3))
    if kind == "select":
        body = {
            "text": [prompt + c for c in CHOICES],
            "sampling_params": {"max_new_tokens": 0},
            "return_logprob": True,
            "logprob_start_len": 0,
        }
        return Job(i, kind, "/generate", body)
    if kind in ("chat", "chat_stream"):
        body = {
            "model": "default",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 8,
            "temperature": 0,
            "stream": kind == "chat_stream",
        }
        return Job(i, kind, "/v1/chat/completions", body)
    if kind == "disconnect":
        params = {"max_new_tokens": 64, "ignore_eos": True}
        return Job(i, kind, "/generate", {"text": prompt, "sampling_params": params})
    raise ValueError(f"unknown job kind {kind!r}")


def make_jobs(n: int, seed: int = 0) -> list[Job]:
    """`n` jobs drawn by `WEIGHTS` (every kind at least once when `n` allows)."""
    rng = random.Random(seed)
    kinds = [k for k, _ in WEIGHTS][:n]
    kinds += rng.choices([k for k, _ in WEIGHTS], [w for _, w in WEIGHTS], k=n - len(kinds))
    rng.shuffle(kinds)
    return [_job(i, kind, rng) for i, kind in enumerate(kinds)]


def _finish(meta: dict[str, Any], max_new: int) -> str | None:
    reason = meta.get("finish_reason") or {}
    if reason.get("type") not in ("stop", "length"):
        return f"unexpected finish_reason {reason}"
    if meta["completion_tokens"] > max_new:
        return f"{meta['completion_tokens']} tokens for max_new_tokens {max_new}"
    return None


def _check_generate(job: Job, out: Any) -> str | None:
    params = job.body["sampling_params"]
    if job.kind == "select":
        if not isinstance(out, list) or len(out) != len(CHOICES):
            return f"select: expected {len(CHOICES)} answers"
        for r in out:
            logprobs = r["meta_info"]["input_token_logprobs"]
            if r["output_ids"] or len(logprobs) != r["meta_info"]["prompt_tokens"]:
                return "select: wrong prefill-only answer"
            if not all(lp is not None and lp <= 0 for lp, _, _ in logprobs[1:]):
                return "select: bad input logprobs"
        return None
    problem = _finish(out["meta_info"], params["max_new_tokens"])
    if problem or job.kind == "plain":
        return problem
    finish = out["meta_info"]["finish_reason"]["type"]
    if job.kind == "regex" and (finish != "stop" or not re.fullmatch(job.regex or "", out["text"])):
        return f"regex {job.regex!r}: {out['text']!r} ({finish})"
    if job.kind == "json":
        if finish != "stop":
            return f"json: cut short: {out['text']!r}"
        try:
            jsonschema.validate(json.loads(out["text"]), SCHEMA)
        except (ValueError, jsonschema.ValidationError) as exc:
            return f"json: {out['text']!r}: {exc}"
    return None


def check(job: Job, status: int, out: Any) -> str | None:
    """None if `out` (the JSON answer; for a native stream its last event) is right for
    `job`, whose kind is not chat_stream (the client checks those streams itself)."""
    if status != 200:
        return f"HTTP {status}: {str(out)[:200]}"
    if job.kind == "chat":
        choice = out["choices"][0]
        if not isinstance(choice["message"]["content"], str):
            return "chat: no content"
        if choice["finish_reason"] not in ("stop", "length"):
            return f"chat: finish_reason {choice['finish_reason']}"
        return None
    return _check_generate(job, out)
