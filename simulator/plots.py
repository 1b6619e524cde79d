"""Simulator figures: each one command (`dovetail plot NAME`), data in analysis/results/sim_NAME.json.

The data step and the drawing step are separate so a figure can be redrawn from its JSON without simulating,
and the JSON states the assumptions (acceptance model, dtypes) next to the numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dovetail_jax.config import LLAMA2_7B, DraftConfig, TreeConfig
from simulator.acceptance import PositionalAcceptance
from simulator.errors import ConfigError, DoesNotFitError
from simulator.files import write_atomic, write_json
from simulator.hardware import load_profile
from simulator.schedules import SimOptions, compare, max_gpu_layers, simulate
from simulator.workload import PAPER_TREE, Workload

RESULTS = Path(__file__).resolve().parent.parent / "analysis" / "results"
GiB = 2 ** 30
RANKS = [0.6, 0.15, 0.08, 0.04, 0.02]
DECAY = 0.95
ACC = PositionalAcceptance(RANKS, DECAY)
ACC_NOTE = (f"illustrative positional acceptance (rank probs {RANKS}, depth decay {DECAY}), not measured; "
            "rerun with your own numbers via `dovetail simulate --rank-probs/--runs`")
CPUS = ["paper-server1-4214r-2080super", "paper-server2-4310-3090", "paper-laptop-9300h-1050m", "desktop-7700x-4060",
        "desktop-13900k-4090", "legacy-server-e5-2690v4-p40"]
OPTS = SimOptions(cycles=3000)


def _wl(profile: str, **kw: Any) -> Workload:
    """LLaMA-2-7B, f32 target where it fits host RAM, int8 otherwise (as the paper's laptop)."""
    hw = load_profile(profile)
    wl = Workload(LLAMA2_7B, DraftConfig(5), PAPER_TREE, **kw)
    return wl if wl.host_bytes() <= hw.cpu.ram_bytes else wl.replace(target_dtype="int8")


def data_tree_size() -> dict[str, Any]:
    sizes = [2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 32, 48, 60]
    series = []
    for prof in CPUS:
        hw, wl = load_profile(prof), _wl(prof)
        base = simulate("target-cpu", hw, wl, opts=OPTS).tokens_per_s
        pts = []
        for t in sizes:
            p = simulate("dovetail", hw, wl.replace(tree=TreeConfig(10, 7, t)), ACC, opts=OPTS)
            pts.append({"total_tokens": t, "speedup": p.tokens_per_s / base, "tokens_per_s": p.tokens_per_s,
                        "tau": p.tau})
        series.append({"profile": prof, "cpu": hw.cpu.name, "target_dtype": wl.target_dtype,
                       "target_cpu_tokens_per_s": base, "points": pts})
    return {"figure": "speedup vs total_tokens", "model": LLAMA2_7B.name, "draft_layers": 5, "top_k": 10,
            "depth": 7, "acceptance": ACC_NOTE, "series": series}


def data_pcie() -> dict[str, Any]:
    bws = [0.5, 1, 2, 4, 8, 16, 32, 64]
    out = []
    for prof in ("paper-laptop-9300h-1050m", "paper-server1-4214r-2080super"):
        hw0 = load_profile(prof)
        wl = _wl(prof)
        series: dict[str, list[dict[str, float]]] = {}
        for bw in bws:
            hw = hw0.with_link(bandwidth=bw * 1e9 / hw0.link.efficiency)
            base = simulate("target-cpu", hw, wl, opts=OPTS).tokens_per_s
            for sched in ("dovetail", "dovetail-pipelined", "offload", "partial"):
                try:
                    p = simulate(sched, hw, wl, ACC, opts=OPTS)
                except DoesNotFitError:
                    continue
                series.setdefault(sched, []).append({"link_gbps": bw, "speedup": p.tokens_per_s / base})
        out.append({"profile": prof, "target_dtype": wl.target_dtype, "series": series})
    return {"figure": "speedup vs achieved link bandwidth", "model": LLAMA2_7B.name, "acceptance": ACC_NOTE,
            "machines": out}


def _acc_for_layers(n: int) -> PositionalAcceptance:
    """Illustrative: a deeper draft predicts its top-1 better (p1 = 0.5 + 0.03 n), the other ranks unchanged."""
    return PositionalAcceptance([0.5 + 0.03 * n] + RANKS[1:], DECAY)


def data_vram() -> dict[str, Any]:
    prof = "paper-server1-4214r-2080super"
    hw0 = load_profile(prof)
    wl = _wl(prof)
    budgets = [0.75, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24]
    base = simulate("target-cpu", hw0, wl, opts=OPTS).tokens_per_s
    rows = []
    for gb in budgets:
        hw = hw0.with_vram(gb * GiB + hw0.gpu.reserved_bytes)
        row: dict[str, Any] = {"vram_gib": gb}
        best: tuple[float, int] | None = None
        for n in range(1, 7):
            w = wl.replace(draft=DraftConfig(n))
            try:
                p = simulate("dovetail", hw, w, _acc_for_layers(n), opts=OPTS)
            except DoesNotFitError:
                continue
            if best is None or p.tokens_per_s > best[0]:
                best = (p.tokens_per_s, n)
        if best:
            row["dovetail"] = {"speedup": best[0] / base, "draft_layers": best[1]}
            w = wl.replace(draft=DraftConfig(best[1]))
            ngl = max_gpu_layers(hw, w, reserved=w.draft_vram_bytes())
            if ngl:
                p = simulate("dovetail", hw, w, _acc_for_layers(best[1]), opts=SimOptions(cycles=3000, ngl=ngl))
                row["dovetail+partial"] = {"speedup": p.tokens_per_s / base, "draft_layers": best[1], "ngl": ngl}
        for sched in ("partial", "offload"):
            try:
                p = simulate(sched, hw, wl, opts=OPTS)
                row[sched] = {"speedup": p.tokens_per_s / base, **p.config}
            except DoesNotFitError:
                pass
        rows.append(row)
    return {"figure": "speedup vs VRAM budget", "profile": prof, "model": LLAMA2_7B.name,
            "target_dtype": wl.target_dtype, "acceptance": "illustrative: rank-1 prob 0.5 + 0.03 x draft layers; "
            + ACC_NOTE, "rows": rows}


def data_split() -> dict[str, Any]:
    prof = "paper-server1-4214r-2080super"
    hw, wl = load_profile(prof), _wl(prof)
    bars = []
    for p in compare(hw, wl, ACC, opts=OPTS):
        if isinstance(p, str):
            bars.append({"schedule": p.split(":")[0], "infeasible": p})
        else:
            bars.append({"schedule": p.schedule, "tokens_per_s": p.tokens_per_s, "speedup": p.speedup,
                         "split_s_per_token": p.split_s_per_token})
    return {"figure": "time split per schedule", "profile": prof, "model": LLAMA2_7B.name, "acceptance": ACC_NOTE,
            "bars": bars}


DATA = {"tree-size": data_tree_size, "pcie": data_pcie, "vram": data_vram, "split": data_split}


def _save(fig: Any, out_dir: Path, name: str) -> list[Path]:
    """Each figure file is written whole or not at all (a temporary file beside it, then a rename): an interrupted
    or failed run leaves an existing figure byte-identical."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create --out-dir {out_dir}: {e.strerror or e}") from None
    paths = [out_dir / f"sim_{name}.png", out_dir / f"sim_{name}.svg"]
    for p in paths:
        write_atomic(p, lambda tmp, fmt=p.suffix[1:]: fig.savefig(tmp, dpi=130, bbox_inches="tight", format=fmt))
    return paths


def draw(name: str, data: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    if name == "tree-size":
        for s in data["series"]:
            ax.plot([p["total_tokens"] for p in s["points"]], [p["speedup"] for p in s["points"]], marker="o",
                    label=f"{s['cpu']} ({s['target_dtype']})")
        ax.set_xlabel("total_tokens (tree size verified per cycle)")
        ax.set_ylabel("speedup over target-only CPU")
        ax.set_xscale("log", base=2)
        ax.set_title(f"Dovetail, {data['model']}, 5-layer draft, depth {data['depth']}")
    elif name == "pcie":
        styles = {"paper-laptop-9300h-1050m": "-", "paper-server1-4214r-2080super": "--"}
        for m in data["machines"]:
            for sched, pts in m["series"].items():
                ax.plot([p["link_gbps"] for p in pts], [p["speedup"] for p in pts], styles.get(m["profile"], "-"),
                        marker="o", label=f"{sched} ({m['profile'].split('-')[1]})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("achieved CPU<->GPU bandwidth (GB/s)")
        ax.set_ylabel("speedup over target-only CPU")
        ax.set_title(f"{data['model']}: Dovetail vs offloading as the link changes")
    elif name == "vram":
        for key in ("dovetail", "dovetail+partial", "partial", "offload"):
            pts = [(r["vram_gib"], r[key]["speedup"]) for r in data["rows"] if key in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=key)
        for r in data["rows"]:
            if "dovetail" in r:
                ax.annotate(str(r["dovetail"]["draft_layers"]), (r["vram_gib"], r["dovetail"]["speedup"]),
                            textcoords="offset points", xytext=(0, 6), fontsize=7, ha="center")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("VRAM budget (GiB); labels: best draft layers")
        ax.set_ylabel("speedup over target-only CPU")
        ax.set_title(f"{data['model']} on {data['profile']}")
    elif name == "split":
        bars = [b for b in data["bars"] if "split_s_per_token" in b]
        cats = sorted({c for b in bars for c in b["split_s_per_token"]})
        bottom = [0.0] * len(bars)
        for c in cats:
            vals = [b["split_s_per_token"].get(c, 0.0) * 1e3 for b in bars]
            ax.bar([b["schedule"] for b in bars], vals, bottom=bottom, label=c)
            bottom = [x + y for x, y in zip(bottom, vals, strict=True)]
        ax.set_ylabel("resource-busy ms per generated token")
        ax.set_title(f"{data['model']} on {data['profile']} (overlap makes bars exceed wall time)")
        ax.tick_params(axis="x", rotation=25)
    elif name == "parity":
        rows = data["rows"]
        meas = [r["measured_tokens_per_s"] for r in rows]
        pred = [r["predicted_tokens_per_s"] for r in rows]
        lo, hi = min(meas + pred) * 0.8, max(meas + pred) * 1.2
        ax.plot([lo, hi], [lo, hi], "k-", lw=1, label="y = x")
        ax.fill_between([lo, hi], [lo * 0.9, hi * 0.9], [lo * 1.1, hi * 1.1], color="grey", alpha=0.2, label="±10%")
        for r in rows:
            ax.scatter(r["measured_tokens_per_s"], r["predicted_tokens_per_s"],
                       marker="o" if r["mode"] == "target" else "s")
            ax.annotate(r["name"], (r["measured_tokens_per_s"], r["predicted_tokens_per_s"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 2))
        s = data["summary"]
        ax.set_xlabel("measured tokens/s (dovetail generate)")
        ax.set_ylabel("simulated tokens/s")
        ax.set_title(f"median |error| {s['median_abs_error']:.1%}, max {s['max_abs_error']:.1%}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    paths = _save(fig, out_dir, name.replace("-", "_"))
    plt.close(fig)
    return paths


def _read_data(path: Path) -> dict[str, Any]:
    """A figure's data JSON, or a ConfigError saying how to rebuild it (a damaged file is not a traceback)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path} ({getattr(e, 'strerror', None) or e}); rebuild it with "
                          "--recompute") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a figure's data (expected a JSON object); rebuild it with --recompute")
    return data


def make(name: str, out_dir: Path, recompute: bool = False, data_dir: Path = RESULTS) -> list[Path]:
    """Compute (or reuse) the figure's JSON in `data_dir` and draw it into `out_dir`."""
    path = data_dir / ("sim_validation.json" if name == "parity" else f"sim_{name.replace('-', '_')}.json")
    if name == "parity":
        if not path.exists():
            raise ConfigError(f"{path} does not exist: run `python -m simulator.validate check` first")
    elif recompute or not path.exists():
        write_json(path, DATA[name]())
    data = _read_data(path)
    try:
        return draw(name, data, out_dir)
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as e:
        raise ConfigError(f"{path} is not valid data for the {name} figure ({type(e).__name__}: {e}); rebuild it "
                          "with --recompute") from None


def main(args: argparse.Namespace) -> int:
    names = ["tree-size", "pcie", "vram", "split", "parity"] if args.figure == "all" else [args.figure]
    for n in names:
        try:
            for p in make(n, Path(args.out_dir), args.recompute, Path(args.data_dir)):
                print(f"wrote {p}")
        except ConfigError as e:
            if args.figure != "all":
                raise
            print(f"skipped {n}: {e}")
    return 0
