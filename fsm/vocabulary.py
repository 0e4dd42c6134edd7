"""A tokenizer's vocabulary as the bytes each token adds to the decoded text.

Constraints are enforced on bytes, so every token id is mapped to the exact byte string it
contributes when it is decoded inside a longer text. The mapping follows the tokenizer's own
decoder (read from its ``tokenizers`` backend):

- byte-level BPE (GPT-2 style ``ByteLevel`` decoder): each character of a token stands for one
  byte through the GPT-2 byte-to-unicode table; a token with a character outside that table
  contributes its UTF-8 encoding, as the decoder does. Steps before a final ``ByteLevel``
  (byte fallback, replacements: transformers' layout for Llama-3-style GGUF tokenizers)
  apply first; where they make a token's bytes depend on its neighbours, it maps to None;
- SentencePiece style (``Metaspace`` / ``Replace`` decoders, optional ``ByteFallback``): the
  meta symbol (``▁``) becomes a space and ``<0xNN>`` tokens are the single byte 0xNN.
  ``Strip`` is ignored (it acts on the start of the whole decoded text), and so is ``Fuse``
  except before ``ByteLevel``.

Non-special added tokens go through the same decoder (their content is their token string);
special tokens, ids without a token, and tokens contributing no bytes map to None.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from fsm.token_trie import TokenTrie

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_WHOLE_TEXT_DECODERS = frozenset({"Fuse", "Strip"})  # only act on the whole decoded text


class Vocabulary:
    """Token bytes of one tokenizer, with their trie.

    ``size`` is the number of token ids (and of mask bits); ``token_bytes[t]`` is the bytes
    token ``t`` contributes to decoded text, or None when it can never appear inside
    constrained text; ``eos_token_ids`` are the ids that end a generation.
    """

    def __init__(self, token_bytes: Sequence[bytes | None], eos_token_ids: Iterable[int]) -> None:
        self.size: int = len(token_bytes)
        self.token_bytes: list[bytes | None] = list(token_bytes)
        self.eos_token_ids: frozenset[int] = frozenset(int(t) for t in eos_token_ids)
        self.trie: TokenTrie = TokenTrie.from_token_bytes(self.token_bytes)

    @classmethod
    def from_tokenizer(
        cls, tokenizer: PreTrainedTokenizerBase, eos_token_ids: Iterable[int] | None = None
    ) -> Vocabulary:
        """Build from a fast Hugging Face tokenizer; ``eos_token_ids`` defaults to the
        tokenizer's ``eos_token_id``. Raises ValueError for a decoder it cannot map exactly."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError("Vocabulary needs a fast tokenizer (with a `backend_tokenizer`).")
        to_bytes = _token_decoder(backend)
        strings: list[str | None] = [None] * len(tokenizer)
        for text, token_id in backend.get_vocab(with_added_tokens=False).items():
            if token_id < len(strings):
                strings[token_id] = text
        for token_id, added in tokenizer.added_tokens_decoder.items():
            if token_id < len(strings):
                strings[token_id] = None if added.special else added.content
        for token_id in tokenizer.all_special_ids:
            if token_id < len(strings):
                strings[token_id] = None
        token_bytes = [None if s is None else to_bytes(s) or None for s in strings]
        if eos_token_ids is None:
            eos = tokenizer.eos_token_id
            eos_token_ids = () if eos is None else (eos,)
        return cls(token_bytes, eos_token_ids)

    def encode_bytes(self, ids: Iterable[int]) -> bytes:
        """The concatenated bytes of ``ids``; raises ValueError on an id without bytes."""
        parts = []
        for t in ids:
            b = self.token_bytes[t]
            if b is None:
                raise ValueError(f"token {t} has no bytes (special or never in text)")
            parts.append(b)
        return b"".join(parts)


def _decoder_steps(spec: dict[str, Any]) -> list[dict[str, Any]]:
    if spec["type"] == "Sequence":
        return [step for sub in spec["decoders"] for step in _decoder_steps(sub)]
    return [spec]


def _token_decoder(backend: Any) -> Callable[[str], bytes | None]:
    """The function mapping one token string to its bytes (None: not defined per token),
    read from the backend's decoder.

    Per-token steps: ``<0xNN>`` byte fallback and string replacements (``Replace``,
    ``Metaspace``), then ``ByteLevel`` when it is the last step (the layout transformers
    gives Llama-3-style tokenizers read from GGUF: ``ByteFallback``, ``Fuse``,
    ``Replace("▁", " ")``, ``ByteLevel``; see `_steps_decoder` for what ByteLevel-last
    leaves undefined)."""
    if backend.decoder is None:
        raise ValueError("tokenizer has no decoder; its token bytes are unknown")
    all_steps = _decoder_steps(json.loads(backend.decoder.__getstate__()))
    steps = [step for step in all_steps if step["type"] not in _WHOLE_TEXT_DECODERS]
    kinds = sorted({step["type"] for step in steps})
    byte_level = bool(steps) and steps[-1]["type"] == "ByteLevel"
    fused = byte_level and any(step["type"] == "Fuse" for step in all_steps)
    replacements: list[tuple[str, str]] = []
    byte_fallback = False
    for step in steps[:-1] if byte_level else steps:
        if step["type"] == "Metaspace":
            replacements.append((step["replacement"], " "))
        elif step["type"] == "Replace" and "String" in step["pattern"]:
            replacements.append((step["pattern"]["String"], step["content"]))
        elif step["type"] == "ByteFallback":
            byte_fallback = True
        else:
            raise ValueError(f"unsupported tokenizer decoder step {step['type']!r} in {kinds}")
    return _steps_decoder(replacements, byte_fallback, byte_level, fused)


def _gpt2_byte_to_unicode() -> dict[int, str]:
    """GPT-2's table: printable Latin-1 bytes map to themselves, the others to U+0100 on."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(0x100 + k) for k, b in enumerate(others)})
    return table


def _steps_decoder(
    replacements: list[tuple[str, str]], byte_fallback: bool, byte_level: bool, fused: bool
) -> Callable[[str], bytes | None]:
    """Without ``byte_level``: ``<0xNN>`` is byte NN, other tokens their replaced UTF-8.

    With ``byte_level`` each character stands for one byte through the GPT-2 table, and a
    token with a character outside the table contributes its UTF-8, as the ByteLevel
    decoder does -- per token, unless a ``fused`` step joined the text first: then that
    fallback covers the whole text, so such tokens get None. Byte fallback before ByteLevel
    turns ``<0xNN>`` into the character U+00NN only for ASCII NN (higher bytes join their
    neighbours into one character first): NN >= 0x80 gets None."""
    # Translate each table character to the Latin-1 character of its byte; Latin-1
    # characters outside the table become U+FFFF so that Latin-1 encoding fails.
    translation = {ord(c): chr(b) for b, c in _gpt2_byte_to_unicode().items()}
    for b in range(256):
        translation.setdefault(b, "\uffff")

    def to_bytes(token: str) -> bytes | None:
        if byte_fallback and (m := _BYTE_TOKEN.fullmatch(token)):
            byte = int(m.group(1), 16)
            if not byte_level:
                return bytes([byte])
            if byte >= 0x80:
                return None
            token = chr(byte)
        for old, new in replacements:
            token = token.replace(old, new)
        if byte_level:
            try:
                return token.translate(translation).encode("latin-1")
            except UnicodeEncodeError:
                if fused:
                    return None
        return token.encode("utf-8")

    return to_bytes
