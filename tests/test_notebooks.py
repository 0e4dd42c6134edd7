"""Every notebook under examples/notebooks runs top to bottom in a real Jupyter kernel."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted(
    (Path(__file__).resolve().parent.parent / "examples" / "notebooks").glob("*.ipynb")
)


def outputs(nb: nbformat.NotebookNode, kind: str) -> list[dict]:
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
            if o.output_type == kind]  # fmt: skip


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    assert not outputs(nb, "error")
    html = [o for o in outputs(nb, "display_data") + outputs(nb, "execute_result")
            if "text/html" in o.get("data", {})]  # fmt: skip
    assert html, "no rich output"
    if path.name == "agent_workflow.ipynb":
        live = [o for o in html if "sgl-state" in o["data"]["text/html"]]
        assert live and all("running" not in o["data"]["text/html"] for o in live)
        assert any("<svg" in o["data"]["text/html"] for o in html)  # the graph
    if path.name == "json_extraction.ipynb":
        assert any("image/png" in o.get("data", {}) for o in outputs(nb, "display_data"))
