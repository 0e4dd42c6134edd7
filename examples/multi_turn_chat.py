"""A multi-turn chat program, streamed as it is generated, and what its prompt looks like.

python examples/multi_turn_chat.py

- Roles: ``sgl.system(...)``, ``sgl.user(...)``, ``sgl.assistant(...)`` wrap one expression;
  ``with s.user(): ...`` makes a turn out of several appends (here: text that quotes the
  previous answer, read with ``s["..."]``).
- Every assistant ``gen`` stops at the model's end-of-turn string without being told.
- ``run(stream=True)`` returns at once; ``state.text_iter(name)`` yields each answer's text
  as it is decoded.
- ``state.messages()`` is the conversation as OpenAI-style messages, and ``state.text()``
  (the exact prompt the model saw) is the model's own chat template applied to them:
  ``engine.apply_chat_template(state.messages(), add_generation_prompt=False)``.
"""

from __future__ import annotations

import sgl_dsl as sgl

QUESTIONS = [
    "I have eggs, spinach and cheese. What could I cook for breakfast?",
    "How long does that take to make?",
]


@sgl.function
def cooking_chat(s, questions):
    s += sgl.system("You are a friendly cooking assistant. Answer in at most two sentences.")
    for i, question in enumerate(questions):
        s += sgl.user(question)
        s += sgl.assistant(sgl.gen(f"answer_{i}", max_tokens=48, temperature=0))
    # A turn built from several pieces: it quotes the first answer.
    with s.user():
        s += "You suggested: "
        s += '"' + s["answer_0"].strip() + '"\n'
        s += "Is that dish vegetarian? Answer yes or no."
    # select works in a chat turn too: the model's answer is one of the choices.
    s += sgl.assistant(sgl.select("vegetarian", choices=["yes", "no"]))


@sgl.function
def no_system_prompt(s):
    # Without a system turn, the template adds the model's default system prompt.
    s += sgl.user("Say hello in French.")
    s += sgl.assistant(sgl.gen("hello", max_tokens=12, temperature=0))


def main() -> None:
    engine = sgl.Engine()
    sgl.set_default_backend(engine)

    # Stream the conversation: print each answer as it is generated.
    state = cooking_chat.run(questions=QUESTIONS, stream=True)
    for i, question in enumerate(QUESTIONS):
        print("user     :", question)
        print("assistant: ", end="", flush=True)
        for piece in state.text_iter(f"answer_{i}"):
            print(piece, end="", flush=True)
        print()
    print("user     : (is it vegetarian?)")
    print("assistant:", state["vegetarian"])

    print("\n== state.messages() ==")
    for message in state.messages():
        print(f"{message['role']:>9}: {message['content']!r}")

    print("\n== state.text() is the chat template applied to the messages ==")
    template_text = engine.apply_chat_template(state.messages(), add_generation_prompt=False)
    print(state.text())
    print("state.text() == apply_chat_template(messages):", state.text() == template_text)
    assert state.text() == template_text

    other = no_system_prompt.run()
    roles = [m["role"] for m in other.messages()]
    same = other.text() == engine.apply_chat_template(other.messages(), add_generation_prompt=False)
    print("\nwithout a system turn, the roles are", roles, "and the text matches too:", same)
    print("default system prompt:", repr(other.messages()[0]["content"]))
    engine.shutdown()


if __name__ == "__main__":
    main()
