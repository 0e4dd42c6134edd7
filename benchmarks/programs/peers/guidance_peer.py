"""guidance (``models.Transformers``) on the same float32 weights: its stateful ``lm``
objects are the sessions (a fork keeps a reference); it reuses the KV cache of the longest
common prefix with the previous call; select and regex are grammar-constrained."""

from __future__ import annotations

from typing import Any

from benchmarks.programs.measure import peer_main
from benchmarks.programs.peers.hf import load
from benchmarks.programs.session import Session


class GuidanceSession:
    def __init__(self, lm: Any) -> None:
        self.lm = lm

    def append(self, text: str) -> None:
        self.lm += text

    def gen(
        self,
        max_tokens: int,
        stop: list[str] | None = None,
        regex: str | None = None,
        json_schema: dict[str, Any] | None = None,
    ) -> str:
        import guidance

        if json_schema is not None:
            # compact separators, as sgl_dsl writes JSON
            self.lm += guidance.json("out", schema=json_schema, max_tokens=max_tokens,
                                     separators=(",", ":"))  # fmt: skip
        else:
            self.lm += guidance.gen("out", max_tokens=max_tokens, stop=stop, regex=regex)
        return self.lm["out"]

    def select(self, choices: list[str]) -> str:
        import guidance

        self.lm += guidance.select(choices, name="out")
        return self.lm["out"]

    def fork(self, n: int) -> list[Session]:
        return [GuidanceSession(self.lm) for _ in range(n)]


def setup() -> Any:
    from guidance import gen, models

    model, tokenizer = load()
    base = models.Transformers(model, tokenizer, echo=False)
    warm = base + "Warm up." + gen("w", max_tokens=4)
    warm["w"]
    return lambda: GuidanceSession(base)


if __name__ == "__main__":
    import guidance
    import transformers

    version = f"guidance {guidance.__version__} (transformers {transformers.__version__})"
    peer_main("guidance", {"select", "regex", "json"}, setup, version)
