"""Inter-token latency of a streaming request while long prompts are prefilled, with
``enable_mixed_chunk`` off and on, side by side in one run.

One request streams 96 new tokens; after its 8th token, 4 prompts of ~1,500 tokens arrive
(prefilled in ``--chunk``-token passes). Without mixing, the streaming request waits for
every prefill pass; with mixing, each pass also decodes it. Prints the streaming request's
largest and median gap between tokens, and the wall time of the whole run. Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_mixed_chunk.py [--device cuda]
        [--chunk 256]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

from backend.engine import Engine

STORY = "The river bends past the mill, where the old keeper counts the boats at dusk. "


def run(mixed: bool, device: str, chunk: int, model: str | None) -> dict[str, float]:
    with Engine(model, device=device, chunked_prefill_size=chunk, enable_mixed_chunk=mixed) as eng:
        long_prompts = [f"Story {i}: " + STORY * 90 for i in range(4)]
        eng.generate("warm-up", {"max_new_tokens": 4})
        start = time.perf_counter()
        handle = eng.submit(
            "Count slowly:", {"max_new_tokens": 96, "temperature": 0, "ignore_eos": True},
            stream=True,
        )[0]  # fmt: skip
        stamps = []
        background = None
        for _ in handle.deltas():
            stamps.append(time.perf_counter())
            if len(stamps) == 8:
                background = eng.submit(long_prompts, {"max_new_tokens": 1})
        assert background is not None
        for h in background:
            h.result(timeout=600)
        wall = time.perf_counter() - start
        gaps = [b - a for a, b in itertools.pairwise(stamps)]
        steps = eng.get_stats()["forward_steps"]
    return {
        "max_gap_ms": max(gaps) * 1e3,
        "median_gap_ms": statistics.median(gaps) * 1e3,
        "wall_s": wall,
        "mixed_passes": steps["mixed"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    args = parser.parse_args()
    print(f"# device {args.device}, prefill chunk {args.chunk}")
    print("| mixed chunk | max gap ms | median gap ms | wall s | mixed passes |")
    print("|---|---|---|---|---|")
    for mixed in (False, True):
        r = run(mixed, args.device, args.chunk, args.model)
        print(
            f"| {'on' if mixed else 'off'} | {r['max_gap_ms']:.0f} | {r['median_gap_ms']:.1f} "
            f"| {r['wall_s']:.2f} | {r['mixed_passes']} |"
        )


if __name__ == "__main__":
    main()
