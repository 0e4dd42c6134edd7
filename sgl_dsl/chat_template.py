"""Chat templates: the text a conversation's roles are wrapped in.

A template is a prefix and a suffix per role, derived from a Hugging Face tokenizer's Jinja
``chat_template`` (:func:`chat_template_from_tokenizer`) or picked by name for remote backends
(:func:`get_chat_template`, :func:`get_chat_template_by_model_path`; names as SGLang's).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")


@dataclass
class ChatTemplate:
    """Role prefixes and suffixes of one chat format.

    Contract: for a conversation, prepend ``{"role": "system", "content":
    default_system_prompt}`` when it does not start with a system message and
    ``default_system_prompt`` is not None; then concatenating ``prefix + content + suffix`` for
    each message, with ``(prefix, suffix) = get_prefix_and_suffix(role, messages_before_it)``,
    reproduces the prompt the template describes (:meth:`get_prompt` does exactly that). The
    generation prompt for an assistant reply is the assistant prefix. ``stop_str`` lists the
    end-of-turn strings a generation inside a role should stop at.
    """

    name: str
    default_system_prompt: str | None
    role_prefix_and_suffix: dict[str, tuple[str, str]]
    stop_str: list[str] = field(default_factory=list)
    image_token: str = "<image>"
    start_text: str = ""
    """Emitted once, before the first message (e.g. a BOS token)."""
    system_inside_first_user: bool = False
    """Llama-2 style: a leading system message opens the first ``[INST]`` block."""

    def get_prefix_and_suffix(self, role: str, hist_messages: list[dict]) -> tuple[str, str]:
        """The (prefix, suffix) around a message of ``role`` after ``hist_messages``.

        Raises ValueError for a role the template does not know.
        """
        if role not in self.role_prefix_and_suffix:
            known = ", ".join(self.role_prefix_and_suffix)
            raise ValueError(f"chat template {self.name!r} has no role {role!r} (known: {known})")
        prefix, suffix = self.role_prefix_and_suffix[role]
        if self.system_inside_first_user:
            if role == "system" and not hist_messages:
                prefix = self.role_prefix_and_suffix["user"][0] + prefix
            elif role == "user" and [m["role"] for m in hist_messages] == ["system"]:
                prefix = ""
        if not hist_messages:
            prefix = self.start_text + prefix
        return prefix, suffix

    def get_prompt(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The prompt for ``messages`` (dicts with "role" and "content") under the contract."""
        messages = list(messages)
        if self.default_system_prompt is not None and (
            not messages or messages[0]["role"] != "system"
        ):
            messages.insert(0, {"role": "system", "content": self.default_system_prompt})
        parts = []
        for i, message in enumerate(messages):
            prefix, suffix = self.get_prefix_and_suffix(message["role"], messages[:i])
            parts.append(f"{prefix}{message['content']}{suffix}")
        if add_generation_prompt:
            parts.append(self.get_prefix_and_suffix("assistant", messages)[0])
        return "".join(parts)


# ---------------------------------------------------------------- derivation from a tokenizer

_MARK = {k: f"SGLDSLMARK{k}Q" for k in ("S", "S2", "U1", "A1", "U2")}


def _msgs(*keys: str) -> list[dict[str, str]]:
    role = {"S": "system", "U": "user", "A": "assistant"}
    return [{"role": role[k[0]], "content": _MARK[k]} for k in keys]


class _NotExpressible(Exception):
    pass


def _split(text: str, keys: tuple[str, ...]) -> list[str]:
    """``text`` cut at the sentinels of ``keys`` (in order): len(keys) + 1 pieces."""
    pieces = []
    for k in keys:
        head, sep, text = text.partition(_MARK[k])
        if not sep:
            raise _NotExpressible(f"the content {_MARK[k]!r} does not appear verbatim")
        pieces.append(head)
    return [*pieces, text]


def _cut_end(s: str, end: str, what: str) -> str:
    if not s.endswith(end):
        raise _NotExpressible(f"{what}: {s!r} does not end with {end!r}")
    return s[: len(s) - len(end)]


def _cut_start(s: str, start: str, what: str) -> str:
    if not s.startswith(start):
        raise _NotExpressible(f"{what}: {s!r} does not start with {start!r}")
    return s[len(start) :]


def chat_template_from_tokenizer(tokenizer: Any) -> ChatTemplate:
    """Derive a :class:`ChatTemplate` from ``tokenizer.chat_template`` (Jinja).

    Conversations whose contents are sentinel strings are rendered with
    ``apply_chat_template(..., tokenize=False)`` and cut at the sentinels. Detected: per-role
    prefix/suffix, text emitted once at the start (``start_text``, folded into the first
    message's prefix), a default system message the template inserts when the conversation does
    not start with one, the assistant prefix (= what ``add_generation_prompt=True`` appends) and
    ``stop_str`` (the assistant suffix without trailing whitespace, plus the eos token when it
    differs). If rendering a system message raises (templates that refuse the system role), the
    system role gets the user role's prefix and suffix. The result is checked by re-rendering
    real conversations both ways; a template that is not expressible as role prefixes/suffixes
    (it rewrites, trims or reorders content, ...) raises ValueError. A tokenizer without a chat
    template gets the "default" named template.
    """
    if not getattr(tokenizer, "chat_template", None):
        return get_chat_template("default")
    name = str(getattr(tokenizer, "name_or_path", "") or "tokenizer")

    def render(messages: list[dict[str, str]], gen: bool = False) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    try:
        template = _derive(tokenizer, name, render)
        _verify(template, render)
    except _NotExpressible as e:
        raise ValueError(
            f"the chat template of {name!r} is not expressible as role prefixes/suffixes: {e}"
        ) from None
    return template


def _derive(tokenizer: Any, name: str, render: Any) -> ChatTemplate:
    try:
        with_system = render(_msgs("S", "U1", "A1", "U2"))
    except Exception:
        with_system = None  # the template refuses a system role
    try:
        base = render(_msgs("U1", "A1", "U2"))
        base_gen = render(_msgs("U1", "A1", "U2"), gen=True)
        ends_with_assistant = render(_msgs("U1", "A1"))
    except Exception as e:
        raise _NotExpressible(f"rendering a user/assistant conversation failed: {e}") from e

    q0, q1, q2, user_suffix = _split(base, ("U1", "A1", "U2"))
    asst_prefix = _cut_start(base_gen, base, "generation prompt")
    if q1 != user_suffix + asst_prefix:
        raise _NotExpressible(
            f"text between user and assistant {q1!r} is not the user suffix {user_suffix!r} "
            f"followed by the generation prompt {asst_prefix!r}"
        )
    asst_suffix = _split(ends_with_assistant, ("U1", "A1"))[2]
    user_prefix = _cut_start(q2, asst_suffix, "text between assistant and user")
    head = _cut_end(q0, user_prefix, "text before the first user message")

    default_system: str | None = None
    if with_system is None:
        start, system = head, (user_prefix, user_suffix)
    else:
        p0, p1 = _split(with_system, ("S", "U1", "A1", "U2"))[:2]
        sys_suffix = _cut_end(p1, user_prefix, "text between system and user")
        if p0.startswith(head):  # nothing inserted without a system message
            start = head
        else:  # head = start + system prefix + default system prompt + system suffix
            rest = _cut_start(head, p0, "inserted default system message")
            default_system = _cut_end(rest, sys_suffix, "inserted default system message")
            start = _start_before_system(render, p0, asst_suffix)
        system = (p0[len(start) :], sys_suffix)

    stop = [asst_suffix.rstrip()] if asst_suffix.strip() else []
    eos = getattr(tokenizer, "eos_token", None)
    if isinstance(eos, str) and eos and eos not in stop:
        stop.append(eos)
    return ChatTemplate(
        name=name,
        default_system_prompt=default_system,
        role_prefix_and_suffix={
            "system": system,
            "user": (user_prefix, user_suffix),
            "assistant": (asst_prefix, asst_suffix),
        },
        stop_str=stop,
        start_text=start,
    )


def _start_before_system(render: Any, p0: str, asst_suffix: str) -> str:
    """Split ``p0`` = start + system prefix via a system message after an assistant one.

    Only cosmetic (with a default system message the first message is always a system one), so
    a template that refuses a later system message gets start "".
    """
    try:
        mid = _split(render(_msgs("U1", "A1", "S2", "U2")), ("U1", "A1", "S2", "U2"))[2]
        sys_prefix = _cut_start(mid, asst_suffix, "text before a later system message")
        return _cut_end(p0, sys_prefix, "text before the first system message")
    except Exception:
        return ""


def _verify(template: ChatTemplate, render: Any) -> None:
    """Real contents (padded with whitespace, mixed case) rendered both ways must agree."""
    s, u1, a1, u2 = " Be Brief. \n", "\n Hi there!  ", " Hello, how can I help?\n", "What is 2+2? "
    no_system = [("user", u1), ("assistant", a1), ("user", u2)]
    for conv in (no_system, [("system", s), *no_system]):
        messages = [{"role": r, "content": c} for r, c in conv]
        for gen in (False, True):
            try:
                want = render(messages, gen)
            except Exception as e:
                if conv is no_system:
                    raise _NotExpressible(f"rendering {messages!r} failed: {e}") from e
                continue  # a template that refuses system messages: nothing to compare with
            got = template.get_prompt(messages, gen)
            if want != got:
                raise _NotExpressible(f"Jinja renders {want!r} but prefixes/suffixes give {got!r}")


# ---------------------------------------------------------------- named templates

_CHATML = {r: (f"<|im_start|>{r}\n", "<|im_end|>\n") for r in ROLES}
_LLAMA3 = {r: (f"<|start_header_id|>{r}<|end_header_id|>\n\n", "<|eot_id|>") for r in ROLES}
_DS_EOS = "<｜end▁of▁sentence｜>"


def _t(name: str, roles: dict[str, tuple[str, str]], *stop: str, **kw: Any) -> ChatTemplate:
    return ChatTemplate(name, kw.pop("default_system_prompt", None), roles, list(stop), **kw)


_TEMPLATES = [
    _t(
        "default",
        {"system": ("SYSTEM:", "\n"), "user": ("USER:", "\n"), "assistant": ("ASSISTANT:", "\n")},
    ),
    _t(
        "claude",
        {"system": ("", ""), "user": ("\n\nHuman: ", ""), "assistant": ("\n\nAssistant:", "")},
    ),
    _t("chatml", _CHATML, "<|im_end|>"),
    _t(
        "chatml-llava",
        _CHATML,
        "<|im_end|>",
        default_system_prompt="You are a helpful assistant.",
        image_token="<image>\n",
    ),
    _t("qwen", _CHATML, "<|im_end|>", default_system_prompt="You are a helpful assistant."),
    _t(
        "vicuna_v1.1",
        {"system": ("", " "), "user": ("USER:", " "), "assistant": ("ASSISTANT:", "</s>")},
        "</s>",
        default_system_prompt="A chat between a curious user and an artificial intelligence "
        "assistant. The assistant gives helpful, detailed, and polite answers to the user's "
        "questions.",
        image_token=" <image>\n",
    ),
    _t(
        "llama-2-chat",
        {
            "system": ("<<SYS>>\n", "\n<</SYS>>\n\n"),
            "user": ("[INST] ", " [/INST]"),
            "assistant": ("", " </s><s>"),
        },
        "</s>",
        system_inside_first_user=True,
    ),
    _t("llama-3-instruct", _LLAMA3, "<|eot_id|>", image_token="<|image|>"),
    _t(
        "mistral",
        {
            "system": ("[SYSTEM_PROMPT] ", " [/SYSTEM_PROMPT]"),
            "user": ("[INST] ", " [/INST]"),
            "assistant": ("", " </s><s>"),
        },
        "</s>",
        image_token="[IMG]",
    ),
    _t(
        "gemma-it",
        {
            "system": ("", ""),
            "user": ("<start_of_turn>user\n", "<end_of_turn>\n"),
            "assistant": ("<start_of_turn>model\n", "<end_of_turn>\n"),
        },
        "<end_of_turn>",
        image_token="<start_of_image>",
    ),
    _t(
        "deepseek-v3",
        {"system": ("", ""), "user": ("<｜User｜>", ""), "assistant": ("<｜Assistant｜>", _DS_EOS)},
        _DS_EOS,
    ),
]
CHAT_TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in _TEMPLATES}

# (groups of alternatives that must all occur in the lowercased path, template name); first wins
_PATH_RULES: list[tuple[tuple[tuple[str, ...], ...], str]] = [
    ((("deepseek-v3", "deepseek-r1"),), "deepseek-v3"),
    ((("vicuna",),), "vicuna_v1.1"),
    ((("llama-3", "llama3"), ("instruct",)), "llama-3-instruct"),
    ((("llama-2", "llama2"), ("chat",)), "llama-2-chat"),
    ((("qwen",),), "qwen"),
    ((("mistral", "mixtral"),), "mistral"),
    ((("gemma",), ("-it",)), "gemma-it"),
    ((("smollm",),), "chatml"),
]


def get_chat_template(name: str) -> ChatTemplate:
    """The named template; ValueError listing the known names for an unknown one."""
    try:
        return CHAT_TEMPLATES[name]
    except KeyError:
        known = ", ".join(sorted(CHAT_TEMPLATES))
        raise ValueError(f"unknown chat template {name!r}; known: {known}") from None


def get_chat_template_by_model_path(model_path: str) -> ChatTemplate:
    """The named template that a model path suggests (substring rules), else "default"."""
    path = model_path.lower()
    for groups, name in _PATH_RULES:
        if all(any(alt in path for alt in group) for group in groups):
            return CHAT_TEMPLATES[name]
    return CHAT_TEMPLATES["default"]


class JinjaChatRenderer:
    """Renders a chat template given as Jinja source, the way transformers does (a sandboxed
    environment with ``trim_blocks``/``lstrip_blocks``, ``raise_exception`` and ``tojson``), so a
    template fetched from a server can go through :func:`chat_template_from_tokenizer`."""

    def __init__(self, source: str, name: str, bos_token: str = "", eos_token: str = "") -> None:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ValueError(message)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent)
        env.globals["raise_exception"] = raise_exception
        self.chat_template = source
        self.name_or_path = name
        self.bos_token, self.eos_token = bos_token, eos_token
        self._template = env.from_string(source)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tokenize: bool = False,
        add_generation_prompt: bool = False,
    ) -> str:
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )
