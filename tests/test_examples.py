"""Run every example script (examples/*.py) as a subprocess and check that it works.

Each script runs on the embedded model with one thread, must exit 0 within the timeout, and
must print the markers listed below (structure, never exact model text). A new example is
picked up by the glob; without an entry in MARKERS only its exit status is checked.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
TIMEOUT_S = 300

# Lines (or fragments) that each script's output must contain.
MARKERS: dict[str, list[str]] = {
    "quickstart.py": ["summary :", "capital :", "facts   :", "cache_hit_rate"],
    "engine_demo.py": ["Q: What is the capital of France?", "radix cache: hit rate"],
    "few_shot_qa.py": [
        "cached/prompt tokens",
        "prefix cache: hit rate",
        "radix cache, flushed before",
        "radix cache disabled",
    ],
    "json_extraction.py": ["== people (dict schema", "record: {'name': ", "event : Event("],
    "regex_and_dtypes.py": [
        "  computers  ",
        "  urgent     ",
        "== part 2: stop_regex ==",
        "finish_reason = {'type': 'stop', 'matched': ",
    ],
    "classification.py": [
        "accuracy token_length_normalized",
        "accuracy greedy_token_selection",
        "accuracy unconditional_likelihood_normalized",
    ],
    "skeleton_of_thought.py": ["Outline :", "Answer  :", "parallel expansions"],
    "tree_of_thought.py": ["level 3:", "Final plan:", "candidates generated and judged"],
    "multi_turn_chat.py": [
        "== state.messages() ==",
        "state.text() == apply_chat_template(messages): True",
        "and the text matches too: True",
    ],
    "react_agent.py": ["Action:      search(", "Observation: ", "answers right"],
    "remote_backends.py": [
        "RuntimeEndpoint",
        "OpenAI completions token_usage: prompt_tokens=",
        "OpenAI chat token_usage: prompt_tokens=",
    ],
}


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_python(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=TIMEOUT_S,
    )


def test_examples_found() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"quickstart.py", "engine_demo.py", "react_agent.py"} <= names
    assert (ROOT / "examples" / "data" / "encyclopedia.txt").is_file()


def test_readme_lists_every_example() -> None:
    readme = (ROOT / "examples" / "README.md").read_text()
    missing = [p.name for p in EXAMPLES if f"`{p.name}`" not in readme]
    assert not missing, f"examples/README.md does not list {missing}"


def test_readme_snippet_runs(tmp_path: Path) -> None:
    readme = (ROOT / "examples" / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks
    script = tmp_path / "readme_snippet.py"
    script.write_text("\n\n".join(blocks))
    proc = run_python([str(script)])
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script: Path) -> None:
    proc = run_python([str(script)])
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{script.name} exited {proc.returncode}:\n{output[-4000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    for marker in MARKERS.get(script.name, []):
        assert marker in proc.stdout, f"{script.name}: {marker!r} not in:\n{proc.stdout[-4000:]}"
