"""Helpers shared by the Hugging Face based peers: loading, greedy decoding, choice scoring."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def load() -> tuple[Any, Any]:
    """(model, tokenizer) of ``$BENCH_MODEL_DIR`` in float32, torch on one thread.

    The folder is written by transformers 5; on transformers 4 (the guidance and outlines
    environments) the tokenizer is built from ``tokenizer.json`` and the rope base is moved
    from ``rope_parameters`` to ``rope_theta``, which 4.x reads (else it defaults to 1e4).
    """
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    model_dir = Path(os.environ["BENCH_MODEL_DIR"])
    config = AutoConfig.from_pretrained(model_dir)
    modern = int(transformers.__version__.split(".")[0]) >= 5
    if modern:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    else:
        special = json.loads((model_dir / "tokenizer_config.json").read_text())
        keys = ("bos_token", "eos_token", "pad_token", "unk_token", "chat_template")
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_file=str(model_dir / "tokenizer.json"),
            model_input_names=["input_ids", "attention_mask"],
            **{k: special[k] for k in keys},
        )
        config.rope_theta = config.rope_parameters["rope_theta"]
    dtype = "dtype" if modern else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, **{dtype: torch.float32})
    return model.eval(), tokenizer


def trim(text: str, stop: list[str] | None) -> str:
    """``text`` cut at the first occurrence of any stop string."""
    cut = min((i for s in stop or [] if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def greedy(model: Any, tokenizer: Any, prompt: str, max_tokens: int, stop: list[str] | None) -> str:
    """Plain ``model.generate``: greedy, stop strings and EOS end it, stop strings trimmed."""
    import torch

    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    kwargs = {"stop_strings": stop, "tokenizer": tokenizer} if stop else {}
    with torch.inference_mode():
        out = model.generate(
            **enc,
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
            **kwargs,
        )
    text = tokenizer.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True)
    return trim(text, stop)


def best_choice(model: Any, tokenizer: Any, prompt: str, choices: list[str]) -> int:
    """Index of the choice with the highest mean token log-probability after ``prompt``
    (sgl_dsl's default ``token_length_normalized``), all choices in one padded forward."""
    import torch

    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    seqs = [tokenizer(prompt + c, add_special_tokens=False).input_ids for c in choices]
    starts = []
    for seq in seqs:
        k = next((i for i, (a, b) in enumerate(zip(seq, prompt_ids)) if a != b), len(prompt_ids))
        starts.append(max(1, min(k, len(seq) - 1)))
    width = max(map(len, seqs))
    pad = tokenizer.eos_token_id
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.inference_mode():
        logprobs = model(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
    scores = []
    for row, (seq, start) in enumerate(zip(seqs, starts)):
        picked = [logprobs[row, t - 1, seq[t]].item() for t in range(start, len(seq))]
        scores.append(sum(picked) / len(picked))
    return max(range(len(choices)), key=scores.__getitem__)
