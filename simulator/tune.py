"""Sweeps over a grid of configurations and the auto-tuner (best configuration within a VRAM budget).

A configuration that is invalid (tree larger than its pool) or does not fit is kept in the results with its
reason, so a sweep reports *why* a corner of the grid is empty instead of silently dropping it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from dovetail_jax.config import TreeConfig
from simulator.acceptance import AcceptanceModel
from simulator.errors import ConfigError
from simulator.hardware import HardwareProfile
from simulator.schedules import SCHEDULES, CostFactory, SimOptions, simulate
from simulator.workload import Workload

GiB = 2 ** 30
# key -> parser; tree / draft / placement / machine knobs a sweep can vary
GRID_KEYS: dict[str, type] = {
    "top_k": int, "depth": int, "total_tokens": int, "lookup": int, "draft_layers": int, "draft_vocab": int,
    "ngl": int,
    "schedule": str, "pcie_gen": int, "lanes": int, "link_gbps": float, "vram_gb": float, "prompt_len": int,
    "new_tokens": int, "spec_trees": int,
}
DEFAULT_TUNE_GRID: dict[str, list[Any]] = {
    "top_k": [2, 4, 6, 8, 10],
    "depth": [2, 3, 4, 5, 6, 7, 8],
    "total_tokens": [4, 6, 8, 10, 12, 16, 20, 24, 32, 48, 60],
    "schedule": ["dovetail", "dovetail-pipelined"],
}
# prompt-lookup chain lengths the tuner adds when the acceptance model prices chains on any tree (a profile
# fitted with lookup); 0 = none
TUNE_LOOKUP = [0, 4, 6, 8, 12]


def _values(key: str, text: str) -> list[Any]:
    conv = GRID_KEYS[key]
    out: list[Any] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if ":" in part and conv is int:  # inclusive range a:b or a:b:step
            bits = part.split(":")
            try:
                lo, hi, step = int(bits[0]), int(bits[1]), int(bits[2]) if len(bits) > 2 else 1
            except ValueError:
                raise ConfigError(f"sweep {key}: bad range {part!r} (use a:b or a:b:step)") from None
            if step <= 0:
                raise ConfigError(f"sweep {key}: range step must be positive in {part!r}")
            out.extend(range(lo, hi + 1, step))
            continue
        try:
            out.append(conv(part))
        except ValueError:
            raise ConfigError(f"sweep {key}: {part!r} is not a valid {conv.__name__}") from None
    return out


def parse_grid(items: Iterable[str]) -> dict[str, list[Any]]:
    """`["total_tokens=4,8,16", "depth=3:7", "schedule=dovetail,dovetail-pipelined"]` -> grid dict."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"sweep item {item!r} must look like key=v1,v2 (keys: {', '.join(GRID_KEYS)})")
        key, text = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in GRID_KEYS:
            raise ConfigError(f"unknown sweep key {key!r}; known: {', '.join(GRID_KEYS)}")
        vals = _values(key, text)
        if not vals:
            raise ConfigError(f"sweep key {key!r} has no values: the sweep would be empty")
        if key == "schedule":
            bad = [v for v in vals if v not in SCHEDULES]
            if bad:
                raise ConfigError(f"unknown schedule(s) {bad} in sweep; choose from {', '.join(SCHEDULES)}")
        grid[key] = vals
    if not grid:
        raise ConfigError("empty sweep: give at least one key=v1,v2 item")
    return grid


def expand(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    combos = [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*(grid[k] for k in keys))]
    if not combos:
        raise ConfigError("empty sweep: the grid has no configurations")
    return combos


def apply_point(hw: HardwareProfile, wl: Workload, opts: SimOptions, point: dict[str, Any], schedule: str
                ) -> tuple[HardwareProfile, Workload, SimOptions, str]:
    """The (machine, workload, options, schedule) of one grid point."""
    tr, dr = wl.tree, wl.draft
    tree = TreeConfig(point.get("top_k", tr.top_k), point.get("depth", tr.depth),
                      point.get("total_tokens", tr.total_tokens), lookup=point.get("lookup", tr.lookup))
    draft = replace(dr, num_layers=point.get("draft_layers", dr.num_layers),
                    draft_vocab_size=point.get("draft_vocab", dr.draft_vocab_size))
    wl = wl.replace(tree=tree, draft=draft, prompt_len=point.get("prompt_len", wl.prompt_len),
                    new_tokens=point.get("new_tokens", wl.new_tokens))
    if "pcie_gen" in point or "lanes" in point:
        hw = hw.with_link(gen=point.get("pcie_gen"), lanes=point.get("lanes"))
    if "link_gbps" in point:
        hw = hw.with_link(bandwidth=point["link_gbps"] * 1e9)
    if "vram_gb" in point:
        hw = hw.with_vram(point["vram_gb"] * GiB)
    if "ngl" in point or "spec_trees" in point:
        opts = replace(opts, ngl=point.get("ngl", opts.ngl), spec_trees=point.get("spec_trees", opts.spec_trees))
    return hw, wl, opts, point.get("schedule", schedule)


def sweep(hw: HardwareProfile, wl: Workload, acc: AcceptanceModel | None, grid: dict[str, list[Any]],
          schedule: str = "dovetail", opts: SimOptions | None = None, measured: dict[str, Any] | None = None,
          cost_factory: CostFactory | None = None) -> list[dict[str, Any]]:
    """One row per grid point: the point, tokens/s, speedup over target-only on the same machine, or the reason.

    `cost_factory` (a calibration, `validate.calibration_from_file`) costs the point and its baseline alike."""
    opts = opts or SimOptions(cycles=1000)
    base_cache: dict[tuple[Any, ...], float] = {}
    rows = []
    for point in expand(grid):
        row: dict[str, Any] = dict(point)
        try:
            h, w, o, sched = apply_point(hw, wl, opts, point, schedule)
            key = (h.cpu, w.prompt_len, w.new_tokens, w.target_dtype, w.cpu_engine)
            if key not in base_cache:
                base_cache[key] = simulate("target-cpu", h, w, None, measured, o, cost_factory).tokens_per_s
            p = simulate(sched, h, w, acc, measured, o, cost_factory)
        except ConfigError as e:
            row.update(feasible=False, reason=str(e))
            rows.append(row)
            continue
        row.update(feasible=True, schedule=p.schedule, tokens_per_s=p.tokens_per_s,
                   speedup=p.tokens_per_s / base_cache[key], tau=p.tau, tau_model=p.tau_model,
                   vram_gib=p.vram_bytes / GiB, split_s_per_token=p.split_s_per_token)
        rows.append(row)
    return rows


def tune(hw: HardwareProfile, wl: Workload, acc: AcceptanceModel, vram_budget_gb: float | None = None,
         grid: dict[str, list[Any]] | None = None, opts: SimOptions | None = None,
         measured: dict[str, Any] | None = None, top: int = 5, cost_factory: CostFactory | None = None
         ) -> dict[str, Any]:
    """Best configuration (highest simulated tokens/s) among the grid points that fit the VRAM budget.

    A model that ignores tree width (`--tau`, `--alpha`) cannot rank top_k or total_tokens: every wider tree only
    costs more, so the grid is narrowed to chains (top_k 1, total_tokens depth + 2) over the depths, which is all
    such a model determines; a user grid that varies the width is refused. With a profile that prices prompt
    lookup (`ProfileAcceptance.chains`) the default grid also tries chain lengths (`TUNE_LOOKUP`).
    """
    if vram_budget_gb is not None:
        hw = hw.with_vram(vram_budget_gb * GiB)
    notes = []
    if not acc.tree_aware:
        width = [k for k in ("top_k", "total_tokens") if grid is not None and len(grid.get(k, [])) > 1]
        if width:
            raise ConfigError(f"the acceptance model ({acc.describe()}) ignores tree width, so it cannot rank "
                              f"{' and '.join(width)}: use --acceptance-profile or --rank-probs, or drop them from "
                              "the grid")
        if grid is None:
            grid = {k: v for k, v in DEFAULT_TUNE_GRID.items() if k not in ("top_k", "total_tokens")}
            notes.append(f"the acceptance model ({acc.describe()}) ignores tree width: tuned the depth of chains "
                         "only (top_k 1, total_tokens = depth + 2); pass --acceptance-profile for tree shapes")
            rows = []
            for d in grid["depth"]:
                rows += sweep(hw, wl, acc, {**grid, "depth": [d], "top_k": [1], "total_tokens": [d + 2]}, opts=opts,
                              measured=measured, cost_factory=cost_factory)
            return _best(rows, acc, hw, top, notes)
    if grid is None:
        grid = dict(DEFAULT_TUNE_GRID)
        if getattr(acc, "chains", None) is not None:  # prices a chain of any length on any tree
            grid["lookup"] = TUNE_LOOKUP
            notes.append("prompt-lookup chains (lookup) are priced by the profile's chain model, fitted with one "
                         "chain length: other lengths are extrapolated (checked in the README: optimistic for "
                         "long chains on short trees)")
    rows = sweep(hw, wl, acc, grid, opts=opts, measured=measured, cost_factory=cost_factory)
    return _best(rows, acc, hw, top, notes)


def _best(rows: list[dict[str, Any]], acc: AcceptanceModel, hw: HardwareProfile, top: int, notes: list[str]
          ) -> dict[str, Any]:
    ok = sorted((r for r in rows if r["feasible"]), key=lambda r: -r["tokens_per_s"])
    if not ok:
        reasons = sorted({r["reason"] for r in rows})
        raise ConfigError("no configuration of the grid fits: " + "; ".join(reasons[:3]))
    return {"best": ok[0], "top": ok[:top], "evaluated": len(rows), "feasible": len(ok), "notes": notes,
            "acceptance": acc.describe(), "vram_budget_gib": hw.gpu.mem_bytes / GiB}
