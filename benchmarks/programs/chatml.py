"""SmolLM2's chat template (ChatML) as plain text, for peers that take raw prompts.

``turn("user", "hi")`` equals what the model's Jinja template renders for that message, so
peers see exactly the prompt text that sgl_dsl's ``sgl.user(...)`` builds.
"""

from __future__ import annotations

END = "<|im_end|>"


def turn(role: str, content: str) -> str:
    """One complete message."""
    return f"<|im_start|>{role}\n{content}{END}\n"


def begin(role: str) -> str:
    """The opening of a message whose content is generated next."""
    return f"<|im_start|>{role}\n"
