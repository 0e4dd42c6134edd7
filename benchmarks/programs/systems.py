"""The systems the benchmark compares and how to launch each one's worker process.

Each system runs as ``PYTHON -m MODULE ARGS... SIZE [WORKLOAD ...]`` from the repository
root with one thread, in its own environment: ours and plain transformers in ``.venv``,
guidance, outlines and llama-cpp-python in ``.venv-peers-*`` (``make peers``). A system
whose environment is missing is skipped with a note.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class System:
    """A worker command; ``ours`` marks our own configurations (not peers)."""

    name: str
    module: str
    args: tuple[str, ...] = ()
    venv: str = ".venv"
    ours: bool = False
    env: dict[str, str] = field(default_factory=dict)

    def python(self) -> Path:
        return ROOT / self.venv / "bin" / "python"

    def available(self) -> str | None:
        """None when the worker can run, else why not."""
        if not self.python().exists():
            return f"{self.venv} missing (make peers)"
        return None


def all_systems() -> list[System]:
    """Ours (five configurations) and the peers, in table order."""
    from benchmarks.programs.gguf_f32 import f32_gguf

    ours = "benchmarks.programs.ours"
    peers = "benchmarks.programs.peers."
    return [
        System("ours", ours, ("ours",), ours=True),
        System("ours-no-radix", ours, ("ours-no-radix",), ours=True),
        System("ours-no-jf", ours, ("ours-no-jf",), ours=True),
        System("ours-bf16", ours, ("ours-bf16",), ours=True),
        System("ours-int4", ours, ("ours-int4",), ours=True),
        System("transformers", peers + "transformers_peer"),
        System("guidance", peers + "guidance_peer", venv=".venv-peers-guidance"),
        System("outlines", peers + "outlines_peer", venv=".venv-peers-outlines"),
        System("llama.cpp", peers + "llama_cpp_peer", venv=".venv-peers-llama"),
        System(
            "llama.cpp-f32",
            peers + "llama_cpp_peer",
            venv=".venv-peers-llama",
            env={"BENCH_GGUF": str(f32_gguf()), "BENCH_SYSTEM_NAME": "llama.cpp-f32"},
        ),
    ]


def model_env() -> dict[str, str]:
    """Where the workers find the weights: the float32 folder and the Q4_1 GGUF."""
    from backend.model_loader import embedded_gguf_path, resolve_model_dir

    return {
        "BENCH_MODEL_DIR": str(resolve_model_dir(None)),
        "BENCH_GGUF": str(embedded_gguf_path()),
    }


def run_system(system: System, size: str, workloads: list[str]) -> dict[str, Any]:
    """Run one worker to completion (progress goes to stderr) and gather its results; a
    worker that dies keeps the workloads it finished and records ``died``."""
    env = {
        **os.environ,
        **model_env(),
        **system.env,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(ROOT),
    }
    cmd = [str(system.python()), "-m", system.module, *system.args, size, *workloads]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True,
                          check=False)  # fmt: skip
    run: dict[str, Any] = {"system": system.name, "results": {}}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            run["version"] = record["version"]
            run["results"][record["workload"]] = record["result"]
    if proc.returncode != 0:
        print(f"{system.name} died with exit code {proc.returncode}", file=sys.stderr)
        run["died"] = f"exit code {proc.returncode} after {sorted(run['results'])}"
    return run
