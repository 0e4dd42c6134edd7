"""Turn the systems' raw results into checks, markdown tables and a speedup plot.

Speedups compare ours (radix cache and jump-forward on) with the best peer on each
workload: latency ``best peer s / ours s`` and throughput ``ours / best peer``; above 1
means ours is faster. Peers run programs one at a time, so their throughput is the
inverse of their mean latency. The same-precision pairs (``SAME_PRECISION``) set each of
our configurations against the peer that runs the same weights: float32 against
llama.cpp-f32, ``ours-int4`` against llama.cpp on its Q4_1 file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.programs.workloads import Workload

Raw = dict[str, dict[str, Any]]  # system -> {"version", "results": {workload -> result}}
SHOWN = ("ours-bf16", "ours-int4")  # our other configurations: columns, not "ours"
SAME_PRECISION = (("ours", "llama.cpp-f32"), ("ours-int4", "llama.cpp"))


def attach_checks(raw: Raw, workloads: list[Workload], size: str) -> None:
    """Add ``valid`` (well-formed outputs / programs) and ``same_as_ours`` to each result."""
    ours = raw.get("ours", {}).get("results", {})
    for run in raw.values():
        for w in workloads:
            result = run.get("results", {}).get(w.name)
            if not result or "outputs" not in result:
                continue
            items = w.items(size)
            outputs = result["outputs"] + result.get("batch_outputs", [])
            errors = [e for item, out in zip(items * 2, outputs) if (e := w.check(item, out))]
            result["valid"] = f"{len(outputs) - len(errors)}/{len(outputs)}"
            result["errors"] = errors[:3]
            if w.name in ours and "outputs" in ours[w.name]:
                same = sum(a == b for a, b in zip(result["outputs"], ours[w.name]["outputs"]))
                result["same_as_ours"] = f"{same}/{len(items)}"


def _get(raw: Raw, system: str, workload: str) -> dict[str, Any]:
    return raw.get(system, {}).get("results", {}).get(workload, {})


def _cell(result: dict[str, Any], key: str, fmt: str) -> str:
    if key in result:
        return format(result[key], fmt)
    return "skip" if "skipped" in result else ("fail" if "failed" in result else "–")


def pair_speedup(raw: Raw, ours_name: str, peer: str, workload: str) -> dict[str, float]:
    """``ours_name``'s latency and throughput speedups over one ``peer`` (>1: ours faster)."""
    ours, other = _get(raw, ours_name, workload), _get(raw, peer, workload)
    if "latency_s" not in ours or "latency_s" not in other:
        return {}
    return {
        "latency_speedup": other["latency_s"] / ours["latency_s"],
        "throughput_speedup": ours["throughput"] / other["throughput"],
    }


def same_precision(raw: Raw, workload: str) -> dict[str, dict[str, float]]:
    """``pair_speedup`` of every ``SAME_PRECISION`` pair that was measured."""
    pairs = {f"{a} vs {b}": pair_speedup(raw, a, b, workload) for a, b in SAME_PRECISION}
    return {name: s for name, s in pairs.items() if s}


def speedups(raw: Raw, peers: list[str], workload: str, ours_name: str = "ours") -> dict[str, Any]:
    """Best peer (by latency and by throughput) and ``ours_name``'s speedup over it."""
    ours = _get(raw, ours_name, workload)
    measured = [(p, _get(raw, p, workload)) for p in peers]
    measured = [(p, r) for p, r in measured if "latency_s" in r]
    if "latency_s" not in ours or not measured:
        return {}
    lat_peer, lat = min(measured, key=lambda pr: pr[1]["latency_s"])
    thr_peer, thr = max(measured, key=lambda pr: pr[1]["throughput"])
    return {
        "latency_best_peer": lat_peer,
        "latency_speedup": lat["latency_s"] / ours["latency_s"],
        "throughput_best_peer": thr_peer,
        "throughput_speedup": ours["throughput"] / thr["throughput"],
    }


def tables(raw: Raw, workloads: list[Workload], peers: list[str]) -> str:
    """The markdown report: latency, throughput, and our ablations."""
    names = [w.name for w in workloads]
    lines = ["### Latency at parallelism 1 (mean s per program; lower is better)", ""]
    extra = [s for s in SHOWN if s in raw]  # shown; compared below (same precision)
    header = ["workload", "ours", *extra, *peers, "best peer", "ours vs best"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        s = speedups(raw, peers, name)
        systems = ["ours", *extra, *peers]
        cells = [_cell(_get(raw, sys_, name), "latency_s", ".3f") for sys_ in systems]
        best = [s.get("latency_best_peer", "–"), f"{s['latency_speedup']:.2f}x" if s else "–"]
        lines.append("| " + " | ".join([name, *cells, *best]) + " |")
    lines += ["", "### Throughput at high parallelism (programs/s; higher is better)", ""]
    header = ["workload", "ours", "ours no radix", *extra, *peers, "best peer", "ours vs best"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        s = speedups(raw, peers, name)
        systems = ["ours", "ours-no-radix", *extra, *peers]
        cells = [_cell(_get(raw, sys_, name), "throughput", ".2f") for sys_ in systems]
        best = [s.get("throughput_best_peer", "–"),
                f"{s['throughput_speedup']:.2f}x" if s else "–"]  # fmt: skip
        lines.append("| " + " | ".join([name, *cells, *best]) + " |")
    lines += ["", "### Ours: radix cache, jump-forward, cache hit rate, output checks", ""]
    header = ["workload", "programs", "radix on/off (thr)", "jump-forward on/off (lat)",
              "cache hit rate", "valid (ours)", "valid (peers)"]  # fmt: skip
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for w in workloads:
        ours, off = _get(raw, "ours", w.name), _get(raw, "ours-no-radix", w.name)
        nojf = _get(raw, "ours-no-jf", w.name)
        radix = f"{ours['throughput'] / off['throughput']:.2f}x" if "throughput" in off else "–"
        jf = f"{nojf['latency_s'] / ours['latency_s']:.2f}x" if "latency_s" in nojf else "–"
        hit = f"{ours['cache_hit_rate']:.0%}" if "cache_hit_rate" in ours else "–"
        peer_valid = ", ".join(
            f"{p} {_get(raw, p, w.name)['valid']}" for p in peers if "valid" in _get(raw, p, w.name)
        )
        n = len(ours.get("outputs", []))
        lines.append(
            f"| {w.name} | {n} | {radix} | {jf} | {hit} | {ours.get('valid', '–')} | {peer_valid} |"
        )
    pairs = [(a, b) for a, b in SAME_PRECISION if a in raw and b in raw]
    if pairs:
        lines += ["", "### Same precision (>1: ours faster)", ""]
        header = ["workload"]
        for a, b in pairs:
            header += [f"{a} vs {b} lat", f"{a} vs {b} thr"]
        header += ["ours-int4 vs best peer lat", "ours-int4 vs best peer thr", "ours-int4 valid"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name in names:
            cells = [name]
            for a, b in pairs:
                s = pair_speedup(raw, a, b, name)
                cells += [f"{s[k]:.2f}x" if s else "–" for k in speedup_keys()]
            best = speedups(raw, peers, name, "ours-int4")
            cells += [
                f"{best[k]:.2f}x ({best[k.split('_')[0] + '_best_peer']})" if best else "–"
                for k in speedup_keys()
            ]
            cells.append(_get(raw, "ours-int4", name).get("valid", "–"))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def speedup_keys() -> tuple[str, str]:
    return ("latency_speedup", "throughput_speedup")


def plot(raw: Raw, workloads: list[Workload], peers: list[str], path: Path) -> None:
    """Bar charts (log scale) of ours' speedup over the best peer per workload and, below,
    of ``ours-int4`` over llama.cpp on its Q4_1 file (same precision), when measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    panels = []
    rows = [(w.name, speedups(raw, peers, w.name)) for w in workloads]
    if rows := [(n, s) for n, s in rows if s]:
        title = "sgl-dsl (float32) vs the best of " + ", ".join(peers) + " (1 CPU thread)"
        panels.append((title, "ours / best peer", rows))
    rows = [(w.name, pair_speedup(raw, "ours-int4", "llama.cpp", w.name)) for w in workloads]
    if rows := [(n, s) for n, s in rows if s]:
        title = "same precision: ours-int4 vs llama.cpp on the Q4_1 GGUF (1 CPU thread)"
        panels.append((title, "ours-int4 / llama.cpp", rows))
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 4 * len(panels)), squeeze=False)
    for ax, (title, ylabel, rows) in zip(axes[:, 0], panels):
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [s["latency_speedup"] for _, s in rows], 0.4,
               label="latency (parallelism 1)")  # fmt: skip
        ax.bar([x + 0.2 for x in xs], [s["throughput_speedup"] for _, s in rows], 0.4,
               label="throughput (high parallelism)")  # fmt: skip
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis(FormatStrFormatter("%gx"))
        ax.set_xticks(list(xs), [n for n, _ in rows], rotation=30, ha="right")
        ax.set_ylabel(f"{ylabel} (>1: ours faster)")
        ax.set_title(title, fontsize=10)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
