"""Figure of a `dovetail bench dovetail` result: τ and speedup over target-only per configuration and dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dovetail_jax.bench.results import write_atomic


def plot(result: dict[str, Any], out: Path) -> list[Path]:
    """Write `out` (.png) and its .svg twin; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(result["results"])
    names = [c["name"] for c in result["configs"]]
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 1.3 * len(names) + 3), 4.2))
    width = 0.8 / max(1, len(datasets))
    for ax, key, label in ((axes[0], "tau", "τ (tokens per target forward)"),
                           (axes[1], "speedup", "speedup over target-only (decode tok/s)")):
        for j, ds in enumerate(datasets):
            vals = [result["results"][ds]["configs"][n].get(key) or 0.0 for n in names]
            xs = [i + (j - (len(datasets) - 1) / 2) * width for i in range(len(names))]
            bars = ax.bar(xs, vals, width, label=ds)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[0].legend(fontsize=8)
    s = result["settings"]
    fig.suptitle(f"Dovetail on {', '.join(datasets)} ({s['limit']} prompts each, ≤{s['max_new_tokens']} tokens, "
                 f"{'greedy' if s['greedy'] else 'sampling'}); same-run target-only baseline", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out.with_suffix(".png"), out.with_suffix(".svg")]
    for p in paths:  # each figure replaced whole: an interrupted run leaves the one that was there intact
        write_atomic(p, lambda tmp, fmt=p.suffix[1:]: fig.savefig(tmp, dpi=130, format=fmt))
    plt.close(fig)
    return paths
