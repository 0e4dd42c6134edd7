"""The documentation's snippets run: every ```python block of each page, in order, in one
namespace, in a fresh interpreter (the pages create their own engine). A page without
python blocks (other fences, e.g. ```text or ```bash, are not run) is skipped."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [
    "README.md",
    "docs/language.md",
    "docs/constrained_decoding.md",
    "docs/architecture.md",
    "docs/engine.md",
    "docs/server.md",
]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


@pytest.mark.parametrize("page", PAGES)
def test_doc_snippets_run(page: str, tmp_path: Path) -> None:
    blocks = python_blocks(ROOT / page)
    if not blocks:
        pytest.skip(f"{page} has no python snippets")
    script = tmp_path / "snippets.py"
    script.write_text("\n\n".join(blocks))
    done = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
