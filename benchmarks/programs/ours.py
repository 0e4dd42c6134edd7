"""Our system: the sgl_dsl programs on the in-process engine, one engine per configuration.

``python -m benchmarks.programs.ours CONFIG SIZE [workload ...]`` prints a JSON line per
workload (``measure.emit``).
Configurations: ``ours`` (radix cache and jump-forward on), ``ours-no-radix`` (throughput
only), ``ours-no-jf`` (constrained workloads only), ``ours-bf16`` (weights cast to
bfloat16: half the bytes per decode step; outputs may differ from float32) and
``ours-int4`` (``quantization="int4"``: Q4_1-style int4 decoder linears and an int8 output
projection, llama.cpp's Q4_1 file's precision; outputs may differ from float32). Per workload:
flush the cache, run every program alone (latency), flush, run them all with ``run_batch``
(throughput, cache hit rate).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from benchmarks.programs.measure import Result, emit, select_workloads
from benchmarks.programs.workloads import Workload

CONFIGS: dict[str, dict[str, Any]] = {
    "ours": {},
    "ours-no-radix": {"disable_radix_cache": True},
    "ours-no-jf": {"disable_regex_jump_forward": True},
    "ours-bf16": {"dtype": "bfloat16"},  # not the same weights: a diagnostic column
    "ours-int4": {"quantization": "int4"},  # against llama.cpp's Q4_1: same precision
}


def _counters(engine: Any) -> tuple[int, int, int]:
    stats = engine.get_stats()
    return stats["prompt_tokens"], stats["cached_tokens"], stats["generated_tokens"]


def _flush(engine: Any) -> None:
    engine.wait_idle()
    if not engine.flush_cache():
        raise RuntimeError("flush_cache refused while idle")


def run_workload(engine: Any, workload: Workload, size: str, latency: bool = True) -> Result:
    """Latency (programs one at a time; skipped unless ``latency``) then throughput (one
    ``run_batch``) on ``engine``."""
    program, items = workload.program(), workload.items(size)
    _flush(engine)
    latencies, outputs = [], []
    for item in items if latency else []:
        start = time.perf_counter()
        state = program.run(**item, backend=engine, temperature=0)
        state.sync()
        latencies.append(time.perf_counter() - start)
        if state.error() is not None:
            raise RuntimeError(f"{workload.name}: {state.error()!r}")
        outputs.append(workload.outputs(state))
    _flush(engine)
    before = _counters(engine)
    start = time.perf_counter()
    states = program.run_batch(items, backend=engine, temperature=0, num_threads=len(items))
    seconds = time.perf_counter() - start
    prompt, cached, generated = (a - b for a, b in zip(_counters(engine), before))
    errors = [s.error() for s in states if s.error() is not None]
    if errors:
        raise RuntimeError(f"{workload.name}: {errors[0]!r}")
    batch_outputs = [workload.outputs(s) for s in states]
    return {
        **({"latency_s": sum(latencies) / len(latencies)} if latency else {}),
        "throughput": len(items) / seconds,
        "cache_hit_rate": cached / prompt if prompt else 0.0,
        "prompt_tokens": prompt,
        "generated_tokens": generated,
        "outputs": outputs if latency else batch_outputs,
        "batch_outputs": batch_outputs,
    }


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    import sgl_dsl as sgl

    config, size, names = sys.argv[1], sys.argv[2], sys.argv[3:]
    torch.set_num_threads(1)
    engine = sgl.Engine(num_threads=1, **CONFIGS[config])
    engine.generate("Warm up.", {"temperature": 0, "max_new_tokens": 4})
    for workload in select_workloads(names):
        if config == "ours-no-jf" and not workload.constrained:
            continue
        result = run_workload(engine, workload, size, latency=config != "ours-no-radix")
        emit(config, "sgl-dsl (this repo)", workload.name, result)
    engine.shutdown()


if __name__ == "__main__":
    main()
