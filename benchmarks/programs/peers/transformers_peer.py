"""Plain transformers: every gen is a fresh ``model.generate`` on the whole prompt (no
prefix reuse between calls), select scores all choices in one forward; no constraints."""

from __future__ import annotations

from typing import Any

from benchmarks.programs.measure import Unsupported, peer_main
from benchmarks.programs.peers.hf import best_choice, greedy, load
from benchmarks.programs.session import Session


class HFSession:
    def __init__(self, model: Any, tokenizer: Any, text: str = "") -> None:
        self.model, self.tokenizer, self.text = model, tokenizer, text

    def append(self, text: str) -> None:
        self.text += text

    def gen(
        self,
        max_tokens: int,
        stop: list[str] | None = None,
        regex: str | None = None,
        json_schema: dict[str, Any] | None = None,
    ) -> str:
        if regex or json_schema:
            raise Unsupported("no constrained decoding")
        out = greedy(self.model, self.tokenizer, self.text, max_tokens, stop)
        self.text += out
        return out

    def select(self, choices: list[str]) -> str:
        choice = choices[best_choice(self.model, self.tokenizer, self.text, choices)]
        self.text += choice
        return choice

    def fork(self, n: int) -> list[Session]:
        return [HFSession(self.model, self.tokenizer, self.text) for _ in range(n)]


def setup() -> Any:
    model, tokenizer = load()
    greedy(model, tokenizer, "Warm up.", 4, None)
    return lambda: HFSession(model, tokenizer)


if __name__ == "__main__":
    import transformers

    peer_main("transformers", {"select"}, setup, f"transformers {transformers.__version__}")
