"""Classify short texts with ``select``, comparing the three ways of choosing.

python examples/classification.py

``select`` never samples free text: it scores every choice as a continuation of the prompt
(all choices in one batched, prefill-only request on the cached prompt) and appends the
winner. How the per-token log-probabilities become a decision is the ``choices_method``:

- ``sgl.token_length_normalized`` (default): the highest *mean* token log-probability, so
  long labels are not penalised for having more tokens;
- ``sgl.greedy_token_selection``: token by token, keep the choices whose next token is the
  most likely (like greedy decoding restricted to the choices);
- ``sgl.unconditional_likelihood_normalized``: mean of log p(token | prompt) minus
  log p(token | no prompt), which discounts labels that are likely whatever the text says.

The scores behind each decision are in ``state.get_meta_info(name)``.
"""

from __future__ import annotations

import sgl_dsl as sgl

LABELS = ["sports", "politics", "science", "business", "food and cooking"]

# A few labelled examples make a much better classifier out of a tiny model than an
# instruction alone; they are the same for every program, so the radix cache computes
# them once.
EXAMPLES = [
    ("Tennis star wins her fifth title at the open.", "sports"),
    ("The president met foreign leaders to discuss a trade treaty.", "politics"),
    ("Researchers sequenced the genome of an ancient plant.", "science"),
    ("The bank reported record earnings this quarter.", "business"),
    ("A chef shares his secret for the perfect pancake batter.", "food and cooking"),
]
FEW_SHOT = (
    "Classify each headline by topic ("
    + ", ".join(LABELS)
    + ").\n\n"
    + "".join(f"Headline: {text}\nTopic: {label}\n\n" for text, label in EXAMPLES)
)

# (headline, expected topic)
HEADLINES = [
    ("The home team won the championship final with a goal in the last minute.", "sports"),
    ("Parliament passed the new tax law after a long debate between the parties.", "politics"),
    ("Astronomers discovered a new planet orbiting a nearby star.", "science"),
    ("Shares of the car maker fell after its quarterly profits dropped.", "business"),
    ("This easy recipe for tomato soup needs only onions, garlic and fresh tomatoes.",
     "food and cooking"),
    ("The striker signed a three-year contract with the club for a record fee.", "sports"),
]  # fmt: skip

METHODS = {
    "token_length_normalized": sgl.token_length_normalized,
    "greedy_token_selection": sgl.greedy_token_selection,
    "unconditional_likelihood_normalized": sgl.unconditional_likelihood_normalized,
}


@sgl.function
def classify(s, text, method):
    s += FEW_SHOT + "Headline: " + text + "\nTopic: "
    s += sgl.select("topic", choices=LABELS, choices_method=method)


def scores_of(meta: dict, method: str) -> list[float]:
    """The per-choice score that the method compared (see the module docstring)."""
    if method == "unconditional_likelihood_normalized":
        return meta["normalized_unconditional_prompt_logprobs"]
    if method == "greedy_token_selection":
        return [row[0] for row in meta["greedy_logprob_matrix"]]  # the first token's logprob
    return meta["normalized_prompt_logprobs"]


def main() -> None:
    engine = sgl.Engine()
    sgl.set_default_backend(engine)

    # one program per (headline, method); all run together and share the cached prefix
    batch = [{"text": t, "method": m} for t, _ in HEADLINES for m in METHODS.values()]
    states = classify.run_batch(batch)

    correct = dict.fromkeys(METHODS, 0)
    header = "".join(f"{label[:12]:>13}" for label in LABELS)
    for i, (text, expected) in enumerate(HEADLINES):
        print(f"{text}  [expected: {expected}]")
        print(f"  {'method':<36}{'decision':<18}{header}")
        for j, method in enumerate(METHODS):
            state = states[i * len(METHODS) + j]
            scores = scores_of(state.get_meta_info("topic"), method)
            cells = "".join(f"{x:13.3f}" for x in scores)
            print(f"  {method:<36}{state['topic']:<18}{cells}")
            correct[method] += state["topic"] == expected
        print()

    for method, n in correct.items():
        print(f"accuracy {method:<36} {n}/{len(HEADLINES)}")
    # Why the methods can disagree: "food and cooking" has three tokens, and its last two
    # are easy to predict once "food" is chosen, which lifts its mean log-probability.
    lengths = {label: len(engine.tokenizer.encode(" " + label)) for label in LABELS}
    print("tokens per label:", lengths)
    print("prefix cache hit rate:", f"{engine.get_stats()['cache_hit_rate']:.0%}")
    engine.shutdown()


if __name__ == "__main__":
    main()
