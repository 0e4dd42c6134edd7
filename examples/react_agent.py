"""A ReAct agent: the model thinks, picks a tool, and reads the tool's observation, in a loop.

python examples/react_agent.py

Tools (run by host Python between generation steps):
- ``search``: keyword search over a small local encyclopedia, ``examples/data/encyclopedia.txt``
  (one paragraph per line, about a fictional region, so the model cannot know the answers);
- ``calculate``: arithmetic with a safe evaluator built on ``ast`` (numbers, + - * / //
  %, parentheses; nothing else is ever evaluated).

One step of the loop is: ``Thought:`` (free text to the end of the line), ``Action:`` (a
``select`` among search / calculate / finish), ``Action Input:`` (a ``gen`` whose regex the
host builds for the chosen action, see ``input_regex``), then the program runs the tool and
appends ``Observation: ...``. It ends at ``finish`` or after ``MAX_STEPS`` steps.

Worked examples in the prompt show the tiny model the format, and the constraints make every
action and input well-formed and grounded (only known topics are searched, only numbers
that were read are computed with). The answers are still those of a 135M-parameter model:
some questions are answered right, others not; the trace shows why.
"""

from __future__ import annotations

import ast
import operator
import re
from pathlib import Path

import sgl_dsl as sgl

DATA = Path(__file__).parent / "data" / "encyclopedia.txt"
MAX_STEPS = 6

# ---- tool 1: a safe calculator -------------------------------------------------------------

_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.operand))
    raise ValueError(f"unsupported expression: {ast.dump(node)[:40]}")


def calculate(expression: str) -> str:
    """Evaluate arithmetic only: the parsed tree may contain numbers and operators, nothing
    else (no names, calls or attributes), so no code from the model is ever run."""
    try:
        value = _evaluate(ast.parse(expression.strip(), mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError) as exc:
        return f"error: {exc}"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(round(value, 4) if isinstance(value, float) else value)


# ---- tool 2: keyword search over the local encyclopedia ------------------------------------

_STOPWORDS = {"a", "an", "and", "the", "of", "in", "on", "at", "to", "is", "are", "was", "were"}
_STOPWORDS |= {"for", "with", "by", "from", "how", "what", "many", "much", "do", "does"}


def _words(text: str) -> set[str]:
    return {w.rstrip("s") for w in re.findall(r"[a-z0-9]+", text.lower())} - _STOPWORDS


class Encyclopedia:
    def __init__(self, path: Path) -> None:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        self.entries = [line.split(": ", 1) for line in lines]  # [title, text]

    def search(self, query: str) -> str:
        """The entry sharing the most words with the query (words of the title count
        double), or a message when nothing matches."""
        wanted = _words(query)

        def score(entry: list[str]) -> int:
            title, text = entry
            return 2 * len(wanted & _words(title)) + len(wanted & _words(text))

        best = max(self.entries, key=score)
        return f"{best[0]}: {best[1]}" if score(best) > 0 else "No entry found."


# ---- the agent -----------------------------------------------------------------------------

# Worked examples in the prompt (about entries the questions do not ask about) show the
# tiny model the format: a lookup then a calculation, and a two-lookup question.
PROMPT = """Answer the question by using tools. Each step has a Thought, an Action and an \
Action Input. Actions: search (look up a topic in the encyclopedia), calculate (evaluate an \
arithmetic expression), finish (give the final answer).

Question: How many years old was Varda University in 1900?
Thought: I need to find the year Varda University was founded.
Action: search
Action Input: Varda University
Observation: Varda University: Varda University was founded in 1650. It has 12000 students \
and its library holds 900000 books.
Thought: Varda University was founded in 1650, so in 1900 it was 1900 - 1650 years old.
Action: calculate
Action Input: 1900 - 1650
Observation: 250
Thought: I know the answer.
Action: finish
Action Input: 250 years

Question: How much do 5 large glass lanterns weigh together?
Thought: I need to find the weight of a large glass lantern.
Action: search
Action Input: Glass lanterns
Observation: Glass lanterns: The glass lanterns of Varda are blown by hand. A large lantern \
weighs 3 kilograms and sells for 45 crowns.
Thought: A large lantern weighs 3 kilograms, so 5 lanterns weigh 5 * 3 kilograms.
Action: calculate
Action Input: 5 * 3
Observation: 15
Thought: I know the answer.
Action: finish
Action Input: 15 kilograms

Question: How many years after the founding of Varda University was Mount Osk first climbed?
Thought: I need to find the year Varda University was founded.
Action: search
Action Input: Varda University
Observation: Varda University: Varda University was founded in 1650. It has 12000 students \
and its library holds 900000 books.
Thought: Varda University was founded in 1650. I need to find the year Mount Osk was first \
climbed.
Action: search
Action Input: Mount Osk
Observation: Mount Osk: Mount Osk is the highest peak of the Grey Mountains. It was first \
climbed in 1868 by a team of five climbers.
Thought: Mount Osk was first climbed in 1868 and the university was founded in 1650, so the \
answer is 1868 - 1650.
Action: calculate
Action Input: 1868 - 1650
Observation: 218
Thought: I know the answer.
Action: finish
Action Input: 218 years

"""


def alternation(options: list[str]) -> str:
    """A regex matching exactly one of ``options`` (longest first)."""
    return "(" + "|".join(re.escape(o) for o in sorted(options, key=len, reverse=True)) + ")"


def input_regex(action: str, titles: list[str], seen_text: str) -> str:
    """The constraint on an action's input, built by the host from what the agent knows.

    Each regex ends with the newline that ends the line (the stop string trims it):
    - search: one of the encyclopedia's topics not searched yet (an enum), so the tiny
      model cannot search for nonsense or repeat itself;
    - calculate: two to four numbers joined by operators, using only numbers that appear
      in the question or in an observation, so the arithmetic is grounded in what was read;
    - finish: one line of free text.
    """
    if action == "search":
        return alternation(titles) + r"\n"
    if action == "calculate":
        number = alternation(sorted(set(re.findall(r"\d+(?:\.\d+)?", seen_text))))
        return number + r"( [-+*/] " + number + r"){1,3}\n"
    return r"[^\n]{1,80}\n"


@sgl.function
def react_agent(s, question, encyclopedia):
    s += PROMPT + "Question: " + question + "\n"
    trace = []  # (thought, action, action input, observation)
    searched: list[str] = []
    seen_text = question
    for step in range(MAX_STEPS):
        s += "Thought:" + sgl.gen(f"thought_{step}", max_tokens=48, stop="\n") + "\n"
        # No answer before the first observation: the model knows nothing about Varda.
        actions = ["search", "calculate", "finish"] if trace else ["search", "calculate"]
        s += "Action: " + sgl.select(f"action_{step}", choices=actions) + "\n"
        action = s[f"action_{step}"]  # host Python waits for the choice and branches on it
        titles = [title for title, _ in encyclopedia.entries if title not in searched]
        regex = input_regex(action, titles, seen_text)
        s += "Action Input: " + sgl.gen(f"input_{step}", regex=regex, stop="\n", max_tokens=24)
        s += "\n"
        thought, action_input = s[f"thought_{step}"].strip(), s[f"input_{step}"].strip()
        if action == "finish":
            trace.append((thought, action, action_input, None))
            return {"answer": action_input, "trace": trace}
        if action == "search":
            searched.append(action_input)
            observation = encyclopedia.search(action_input)
        else:
            observation = calculate(action_input)
        seen_text += " " + observation
        trace.append((thought, action, action_input, observation))
        s += "Observation: " + observation + "\n"
    return {"answer": None, "trace": trace}


# (question, the number the answer should contain)
QUESTIONS = [
    ("How much do 4 people pay in total for tickets on the Tarn Ferry?", "48"),
    ("How long do 3 crossings with the Tarn Ferry take, in minutes?", "105"),
    ("How many years old was the Lumen Bridge in 2024?", "152"),
]


def main() -> None:
    encyclopedia = Encyclopedia(DATA)
    print(f"encyclopedia: {len(encyclopedia.entries)} entries; tools: search, calculate")
    print("search('ferry ticket') ->", encyclopedia.search("ferry ticket"))
    print("calculate('(1868 - 1650) * 2') ->", calculate("(1868 - 1650) * 2"))
    print("calculate('__import__(\"os\")') ->", calculate('__import__("os")'))
    print()

    engine = sgl.Engine()
    sgl.set_default_backend(engine)
    states = react_agent.run_batch(
        [{"question": q, "encyclopedia": encyclopedia} for q, _ in QUESTIONS], temperature=0
    )
    correct = 0
    for (question, expected), state in zip(QUESTIONS, states):
        result = state.ret_value
        print("Question:", question)
        for i, (thought, action, action_input, observation) in enumerate(result["trace"]):
            print(f"  step {i + 1}  Thought:     {thought}")
            print(f"          Action:      {action}({action_input!r})")
            if observation is not None:
                print(f"          Observation: {observation}")
        answer = result["answer"]
        if answer is None:
            print(f"Answer: none within {MAX_STEPS} steps (expected {expected})")
        else:
            ok = re.search(rf"\b{expected}\b", answer) is not None
            correct += ok
            print(f"Answer: {answer} (expected {expected}: {'right' if ok else 'wrong'})")
        print()
    print(f"{correct} of {len(QUESTIONS)} answers right")
    print(f"prefix cache hit rate: {engine.get_stats()['cache_hit_rate']:.0%}")
    engine.shutdown()


if __name__ == "__main__":
    main()
