"""Chat templates: derivation from real Jinja templates, and the named ones."""

from __future__ import annotations

import copy

import pytest

from sgl_dsl.chat_template import (
    CHAT_TEMPLATES,
    ChatTemplate,
    chat_template_from_tokenizer,
    get_chat_template,
    get_chat_template_by_model_path,
)

SYS = {"role": "system", "content": "You answer in one word."}
CONV = [
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": " And a fruit?\n"},
]

LLAMA3 = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = '<|begin_of_text|>' + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
MISTRAL = (
    "{{ '<s>' }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + '</s>' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)
QWEN2 = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _with_template(tok, template: str | None):
    t = copy.deepcopy(tok)
    t.chat_template = template
    return t


def _build(template: ChatTemplate, messages: list[dict], gen: bool = False) -> str:
    """The prompt from the prefixes/suffixes, as the ChatTemplate contract describes it."""
    messages = list(messages)
    if messages[0]["role"] != "system" and template.default_system_prompt is not None:
        messages.insert(0, {"role": "system", "content": template.default_system_prompt})
    out = ""
    for i, m in enumerate(messages):
        prefix, suffix = template.get_prefix_and_suffix(m["role"], messages[:i])
        out += prefix + m["content"] + suffix
    if gen:
        out += template.get_prefix_and_suffix("assistant", messages)[0]
    assert out == template.get_prompt(messages, add_generation_prompt=gen)
    return out


def _assert_reproduces(tok, template: ChatTemplate, messages: list[dict]) -> None:
    for gen in (False, True):
        want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert _build(template, messages, gen) == want


def test_embedded_tokenizer(tok):
    t = chat_template_from_tokenizer(tok)
    assert t.default_system_prompt == (
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    )
    assert t.role_prefix_and_suffix == get_chat_template("chatml").role_prefix_and_suffix
    assert t.start_text == ""  # although the tokenizer's bos_token is "<|im_start|>"
    assert "<|im_end|>" in t.stop_str
    for messages in ([SYS, *CONV], CONV, CONV[:1]):
        _assert_reproduces(tok, t, messages)
    with_gen = tok.apply_chat_template(CONV, tokenize=False, add_generation_prompt=True)
    without = tok.apply_chat_template(CONV, tokenize=False)
    assert with_gen == without + t.role_prefix_and_suffix["assistant"][0]
    assert t.role_prefix_and_suffix["assistant"][0] == "<|im_start|>assistant\n"


def test_llama3_style_bos_once(tok):
    t3 = _with_template(tok, LLAMA3)
    t = chat_template_from_tokenizer(t3)
    assert t.start_text == "<|begin_of_text|>"
    assert t.default_system_prompt is None
    header = "<|start_header_id|>user<|end_header_id|>\n\n"
    assert t.get_prefix_and_suffix("user", []) == ("<|begin_of_text|>" + header, "<|eot_id|>")
    assert t.get_prefix_and_suffix("user", [SYS]) == (header, "<|eot_id|>")
    assert t.stop_str == ["<|eot_id|>", tok.eos_token]
    for messages in ([SYS, *CONV], CONV):
        _assert_reproduces(t3, t, messages)


def test_mistral_style_refuses_system(tok):
    tm = _with_template(tok, MISTRAL)
    with pytest.raises(Exception, match=r"alternate|Only user and assistant"):
        tm.apply_chat_template([SYS, *CONV], tokenize=False)
    t = chat_template_from_tokenizer(tm)
    assert t.start_text == "<s>"
    assert t.role_prefix_and_suffix["system"] == t.role_prefix_and_suffix["user"]
    assert t.role_prefix_and_suffix["user"] == ("[INST] ", " [/INST]")
    assert t.role_prefix_and_suffix["assistant"] == ("", "</s>")
    assert t.stop_str == ["</s>", tok.eos_token]
    _assert_reproduces(tm, t, CONV)
    assert _build(t, [SYS, *CONV[:1]]) == (
        "<s>[INST] You answer in one word. [/INST][INST] Name a colour. [/INST]"
    )


def test_qwen2_style_default_system(tok):
    tq = _with_template(tok, QWEN2)
    t = chat_template_from_tokenizer(tq)
    assert t.default_system_prompt == "You are a helpful assistant."
    assert t.start_text == ""
    assert t.role_prefix_and_suffix == get_chat_template("qwen").role_prefix_and_suffix
    for messages in ([SYS, *CONV], CONV):
        _assert_reproduces(tq, t, messages)


@pytest.mark.parametrize(
    "template",
    [
        QWEN2.replace("message['content']", "message['content'] | upper"),
        QWEN2.replace("message['content']", "message['content'] | trim"),
        LLAMA3.replace("message['content']", "(message['content'] | trim)"),
        # the generation prompt differs from the assistant prefix inside a conversation
        QWEN2.replace(
            "'<|im_start|>assistant\n' }}{% endif %}",
            "'<|im_start|>assistant\n<think>' }}{% endif %}",
        ),
    ],
    ids=["upper", "trim", "llama3-trim", "think-gen-prompt"],
)
def test_not_expressible(tok, template):
    with pytest.raises(ValueError, match="not expressible as role prefixes/suffixes"):
        chat_template_from_tokenizer(_with_template(tok, template))


def test_no_chat_template_gives_default(tok):
    assert chat_template_from_tokenizer(_with_template(tok, None)).name == "default"


def test_named_templates():
    required = ["default", "chatml", "vicuna_v1.1", "llama-2-chat", "llama-3-instruct"]
    required += ["mistral", "qwen", "gemma-it", "claude", "deepseek-v3", "chatml-llava"]
    for name in required:
        t = get_chat_template(name)
        assert t.name == name and set(t.role_prefix_and_suffix) >= {"system", "user", "assistant"}
    assert set(required) <= set(CHAT_TEMPLATES)
    user = {"role": "user", "content": "Hi"}
    assert get_chat_template("qwen").get_prompt([user], add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    llama2 = get_chat_template("llama-2-chat")
    msgs = [{"role": "system", "content": "S"}, user, {"role": "assistant", "content": "Yo"}]
    assert llama2.get_prompt([*msgs, user]) == (
        "[INST] <<SYS>>\nS\n<</SYS>>\n\nHi [/INST]Yo </s><s>[INST] Hi [/INST]"
    )
    assert get_chat_template("chatml").stop_str == ["<|im_end|>"]
    assert get_chat_template("llama-3-instruct").stop_str == ["<|eot_id|>"]


def test_unknown_name_and_role():
    with pytest.raises(ValueError, match=r"unknown chat template 'nope'.*chatml.*qwen"):
        get_chat_template("nope")
    with pytest.raises(ValueError, match="'tool'"):
        get_chat_template("chatml").get_prefix_and_suffix("tool", [])


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("meta-llama/Meta-Llama-3-8B-Instruct", "llama-3-instruct"),
        ("/models/llama3-70b-instruct", "llama-3-instruct"),
        ("meta-llama/Llama-2-7b-chat-hf", "llama-2-chat"),
        ("Qwen/Qwen2-7B-Instruct", "qwen"),
        ("mistralai/Mixtral-8x7B-Instruct-v0.1", "mistral"),
        ("google/gemma-2-9b-it", "gemma-it"),
        ("lmsys/vicuna-7b-v1.5", "vicuna_v1.1"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "chatml"),
        ("deepseek-ai/DeepSeek-V3", "deepseek-v3"),
        ("google/gemma-2b", "default"),
        ("gpt2", "default"),
    ],
)
def test_by_model_path(path, name):
    assert get_chat_template_by_model_path(path).name == name


def test_bos_and_default_system(tok):
    """BOS once, then a system block always (the default one when none is given)."""
    tb = _with_template(tok, "{{ '<|begin_of_text|>' }}" + QWEN2.replace("a helpful", "an"))
    t = chat_template_from_tokenizer(tb)
    assert t.default_system_prompt == "You are an assistant."
    assert t.start_text == "<|begin_of_text|>"
    assert t.role_prefix_and_suffix["system"] == ("<|im_start|>system\n", "<|im_end|>\n")
    for messages in ([SYS, *CONV], CONV):
        _assert_reproduces(tb, t, messages)
