"""llama-cpp-python on the GGUF in ``$BENCH_GGUF`` (the embedded Q4_1 file, or its float32
rewrite): one ``Llama`` whose KV cache keeps the previous prompt, so each call evaluates
only the tokens after the longest common prefix. Greedy (top_k 1, temperature 0, no
penalties); regex and JSON through GBNF grammars; select scores each choice's mean token
log-probability by evaluating its tokens after the cached prompt."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from benchmarks.programs.measure import Unsupported, peer_main
from benchmarks.programs.session import Session
from benchmarks.programs.workloads.self_consistency import NUMBER

GRAMMARS = {NUMBER: "root ::= [0-9]{1,5}"}  # the regexes the workloads use, as GBNF
GREEDY = {"temperature": 0.0, "top_k": 1, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0}


def _common(a: Any, b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


class LlamaSession:
    def __init__(self, llm: Any, text: str = "") -> None:
        self.llm, self.text = llm, text

    def append(self, text: str) -> None:
        self.text += text

    def gen(
        self,
        max_tokens: int,
        stop: list[str] | None = None,
        regex: str | None = None,
        json_schema: dict[str, Any] | None = None,
    ) -> str:
        from llama_cpp import LlamaGrammar
        from llama_cpp.llama_grammar import json_schema_to_gbnf

        grammar = None
        if json_schema is not None:
            # llama-cpp-python 0.3.36 writes a pattern's "\." as the GBNF literal "\.", an
            # invalid escape that crashes sampling (SIGSEGV); a plain "." is what it means
            gbnf = json_schema_to_gbnf(json.dumps(json_schema)).replace('"\\."', '"."')
            grammar = LlamaGrammar.from_string(gbnf, verbose=False)
        elif regex is not None:
            if regex not in GRAMMARS:
                raise Unsupported(f"no GBNF for {regex}")
            grammar = LlamaGrammar.from_string(GRAMMARS[regex], verbose=False)
        out = self.llm.create_completion(
            self.text, max_tokens=max_tokens, stop=stop or [], grammar=grammar, **GREEDY
        )["choices"][0]["text"]
        self.text += out
        return out

    def _tokens(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=True)

    def _logprob(self, token: int) -> float:
        """log p(token) from the logits of the last evaluated position."""
        import numpy as np

        n_vocab = self.llm.n_vocab()
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
        top = float(logits.max())
        return float(logits[token]) - top - math.log(float(np.exp(logits - top).sum()))

    def select(self, choices: list[str]) -> str:
        llm, prompt = self.llm, self._tokens(self.text)
        scores = []
        for choice in choices:
            seq = self._tokens(self.text + choice)
            start = max(1, min(_common(seq, prompt), len(seq) - 1))
            keep = min(_common(llm.input_ids[: llm.n_tokens], seq[:start]), start - 1)
            llm.n_tokens = keep  # eval() drops the KV cache past n_tokens
            llm.eval(seq[keep:start])
            total = 0.0
            for t in range(start, len(seq)):
                total += self._logprob(seq[t])
                if t + 1 < len(seq):
                    llm.eval([seq[t]])
            scores.append(total / (len(seq) - start))
        llm._requires_eval = True  # the next completion re-evaluates its last prompt token
        choice = choices[max(range(len(choices)), key=scores.__getitem__)]
        self.text += choice
        return choice

    def fork(self, n: int) -> list[Session]:
        return [LlamaSession(self.llm, self.text) for _ in range(n)]


def setup() -> Any:
    from llama_cpp import Llama

    llm = Llama(os.environ["BENCH_GGUF"], n_ctx=4096, n_batch=512, n_threads=1,
                n_threads_batch=1, verbose=False)  # fmt: skip
    llm.create_completion("Warm up.", max_tokens=4, **GREEDY)
    return lambda: LlamaSession(llm)


if __name__ == "__main__":
    import llama_cpp

    name = os.environ.get("BENCH_SYSTEM_NAME", "llama.cpp")
    label = (
        f"llama-cpp-python {llama_cpp.__version__} ({os.path.basename(os.environ['BENCH_GGUF'])})"
    )
    peer_main(name, {"select", "regex", "json"}, setup, label)
