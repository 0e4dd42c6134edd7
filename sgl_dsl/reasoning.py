"""Split a reasoning model's ``<think>...</think>`` block from its answer (``separate_reasoning``).

Contract: ``split_reasoning(text, model_type)`` returns ``(reasoning, answer)`` with both
stripped of surrounding whitespace; text without the markers is all answer, except for model
types whose template opens the think block itself (the text then starts inside it).
"""

from __future__ import annotations

# model type -> (start marker, end marker, the prompt already opened the block)
_MARKERS: dict[str | None, tuple[str, str, bool]] = {
    None: ("<think>", "</think>", False),
    "qwen3": ("<think>", "</think>", False),
    "qwen3-thinking": ("<think>", "</think>", True),
    "deepseek-r1": ("<think>", "</think>", True),
    "glm45": ("<think>", "</think>", False),
    "kimi": ("◁think▷", "◁/think▷", False),
}


def split_reasoning(text: str, model_type: str | None = None) -> tuple[str, str]:
    if model_type not in _MARKERS:
        known = ", ".join(sorted(k for k in _MARKERS if k))
        raise ValueError(f"unknown reasoning model_type {model_type!r}; known: {known}")
    start, end, opened = _MARKERS[model_type]
    head, found_start, rest = text.partition(start)
    if not found_start:
        if not opened or end not in text:
            return "", text.strip()
        rest, head = text, ""
    reasoning, found_end, answer = rest.partition(end)
    if not found_end:  # still thinking when generation stopped
        return reasoning.strip(), head.strip()
    return reasoning.strip(), (head + answer).strip()
