"""outlines (``from_transformers``) on the same float32 weights: every gen is a fresh
generate on the whole prompt (plain strings, its chat template switched off); regex, JSON
and select (``Choice``) are constrained by its logits processors."""

from __future__ import annotations

from typing import Any

from benchmarks.programs.measure import peer_main
from benchmarks.programs.peers.hf import load, trim
from benchmarks.programs.session import Session


class OutlinesSession:
    def __init__(self, model: Any, text: str = "") -> None:
        self.model, self.text = model, text

    def append(self, text: str) -> None:
        self.text += text

    def _generate(self, output_type: Any, max_tokens: int, stop: list[str] | None) -> str:
        kwargs = {"stop_strings": stop, "tokenizer": self.model.hf_tokenizer} if stop else {}
        out = self.model(self.text, output_type, max_new_tokens=max_tokens, do_sample=False,
                         **kwargs)  # fmt: skip
        out = trim(out, stop)
        self.text += out
        return out

    def gen(
        self,
        max_tokens: int,
        stop: list[str] | None = None,
        regex: str | None = None,
        json_schema: dict[str, Any] | None = None,
    ) -> str:
        from outlines.types import JsonSchema, Regex

        output_type = None
        if json_schema is not None:
            output_type = JsonSchema(json_schema, whitespace_pattern="")  # compact, as ours
        elif regex is not None:
            output_type = Regex(regex)
        return self._generate(output_type, max_tokens, stop)

    def select(self, choices: list[str]) -> str:
        from outlines.types import Choice

        longest = max(len(self.model.hf_tokenizer(c).input_ids) for c in choices)
        return self._generate(Choice(choices), 4 * longest + 8, None)  # ends when complete

    def fork(self, n: int) -> list[Session]:
        return [OutlinesSession(self.model, self.text) for _ in range(n)]


def setup() -> Any:
    import outlines

    model = outlines.from_transformers(*load())
    model.type_adapter.has_chat_template = False  # prompts are already formatted text
    model("Warm up.", max_new_tokens=4, do_sample=False)
    return lambda: OutlinesSession(model)


if __name__ == "__main__":
    from importlib.metadata import version

    label = f"outlines {version('outlines')} (transformers {version('transformers')})"
    peer_main("outlines", {"select", "regex", "json"}, setup, label)
