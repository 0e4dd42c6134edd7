"""Multi-turn chat: four user turns, each answered by the model (short or long answers)."""

from __future__ import annotations

import functools
from typing import Any

from benchmarks.programs.chatml import END, begin, turn
from benchmarks.programs.session import Session
from benchmarks.programs.workloads import Item, Outputs, Workload, cap

SYSTEM = "You are a friendly assistant."
CONVERSATIONS = [
    ["I have eggs, spinach and cheese. What could I cook for breakfast?",
     "How long does that take to make?", "Can I make it without cheese?",
     "What drink would go well with it?"],
    ["I want to start running. How should I begin?", "How often should I run each week?",
     "What shoes do I need?", "How do I avoid getting injured?"],
    ["What is a good first houseplant?", "How often should I water it?",
     "Where in the room should it go?", "Why are its leaves turning yellow?"],
    ["How do I write a polite email asking for a deadline extension?",
     "How long should the email be?", "Should I explain why I need more time?",
     "When is the best time to send it?"],
]  # fmt: skip


def _items(size: str) -> list[Item]:
    return [
        {"turns": c, "cap": cap(size)}
        for c in (CONVERSATIONS if size == "full" else CONVERSATIONS[:1])
    ]


def _workload(name: str, max_tokens: int) -> Workload:
    @functools.cache
    def program() -> Any:
        import sgl_dsl as sgl

        @sgl.function
        def chat(s, turns, cap):
            s += sgl.system(SYSTEM)
            for i, message in enumerate(turns):
                s += sgl.user(message)
                s += sgl.assistant(sgl.gen(f"answer_{i}", max_tokens=min(max_tokens, cap)))
            return [s[f"answer_{i}"] for i in range(len(turns))]

        return chat

    def script(session: Session, item: Item) -> Outputs:
        session.append(turn("system", SYSTEM))
        answers = []
        for message in item["turns"]:
            session.append(turn("user", message) + begin("assistant"))
            answers.append(session.gen(max_tokens=min(max_tokens, item["cap"]), stop=[END]))
            session.append(END + "\n")
        return {"answers": answers}

    def check(item: Item, out: Outputs) -> str | None:
        empty = [i for i, a in enumerate(out["answers"]) if not a.strip()]
        return f"empty answers {empty}" if empty else None

    return Workload(
        name=name,
        shape=f"4 turns, answers up to {max_tokens} tokens",
        items=_items,
        program=program,
        outputs=lambda state: {"answers": state.ret_value},
        script=script,
        check=check,
    )


SHORT = _workload("chat-short", 16)
LONG = _workload("chat-long", 96)
