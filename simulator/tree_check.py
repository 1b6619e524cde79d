"""Predict a measured tree sweep (`dovetail bench dovetail`) on a profile and say whether `--tune` picks its best.

    python -m simulator.validate trees --bench analysis/results/bench_tree_sweep_int8.json \
        --profile host-2core-intel-xeon --out analysis/results/sim_tree_sweep_intel.json

Each configuration of the bench is priced twice on the profile with our CPU engine, no calibration: with its own
measured accept histogram (the cost model alone is tested) and with the shipped acceptance profile of its draft
and dataset (what a user who runs `--tune` gets). Speedups are over the same profile's target-only decode, as the
bench measures them (one run, round-robin). `--tune` over the measured trees with the profile must pick the
bench's fastest configuration, or one measured within `TIE` of it (the bench's own noise between trees).
Configurations with prompt lookup (`tree.lookup` > 0) are priced from their own histogram and share of cycles
with a chain, and by the profile where it was fitted with lookup (`ProfileAcceptance.chains`; else not at all).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from dovetail_jax.config import DraftConfig, ModelConfig, TreeConfig
from dovetail_jax.plan import cache_slots
from simulator.acceptance import AcceptanceModel, HistogramAcceptance, ProfileAcceptance, default_profile
from simulator.errors import ConfigError
from simulator.hardware import HardwareProfile
from simulator.schedules import SimOptions, simulate
from simulator.workload import Workload, resolve_model

ROOT = Path(__file__).resolve().parents[1]  # checkpoint paths in bench JSON are relative to the repository
TIE = 0.025  # trees measured within 2.5% of the best are tied: round-robin reruns move them by as much
_DTYPES = {"int8": "int8", "bfloat16": "bf16", "bf16": "bf16", "float32": "f32", "f32": "f32"}


def draft_dtypes(cfg: dict[str, Any]) -> tuple[str, str]:
    """(matrices, head) dtypes of a bench configuration's draft. Runs record `draft_weight_dtype` and
    `draft_head_dtype`; earlier ones say `draft_weights` ("stored" = the checkpoint's bf16, else the int8 default),
    and runs from before int8 drafts (no `draft_weights` at all) ran the checkpoint's bf16."""
    if cfg.get("draft_weight_dtype"):
        w = cfg["draft_weight_dtype"]
    elif "draft_weights" in cfg:
        w = "bf16" if cfg["draft_weights"] == "stored" else "int8"
    else:
        w = "bf16"
    h = cfg.get("draft_head_dtype") or cfg.get("draft_head") or w
    for x in (w, h):
        if x not in _DTYPES:
            raise ConfigError(f"configuration {cfg.get('name')!r}: unknown draft dtype {x!r}")
    return _DTYPES[w], _DTYPES[h]


def _draft_dtype(cfg: dict[str, Any]) -> str:
    """The one dtype the simulator prices the draft in: its matrices' (most of its bytes)."""
    return draft_dtypes(cfg)[0]


def draft_feature_layers(cfg: dict[str, Any], root: Path = ROOT) -> tuple[int, ...] | None:
    """The target blocks a bench configuration's draft reads (() = the final-norm feature): recorded by runs
    since 2026-12-06 (`draft_feature_layers`), else read from its checkpoint's card; None when neither says (an
    older run of a checkpoint removed since). A random or standalone draft reads the final-norm feature."""
    if "draft_feature_layers" in cfg:
        return tuple(int(i) for i in cfg["draft_feature_layers"] or ())
    src = cfg.get("draft")
    if not src or src in ("random", "self") or cfg.get("random_draft"):
        return ()
    card = Path(root) / src / "card.json"
    if not card.is_file():
        return None
    try:
        return tuple(int(i) for i in json.loads(card.read_text())["draft"].get("feature_layers") or ())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"configuration {cfg.get('name')!r}: unreadable draft card {str(card)!r}: {e}") from None


def bench_draft(cfg: dict[str, Any], model: ModelConfig, feature_layers: tuple[int, ...] = ()) -> DraftConfig:
    """The simulator's DraftConfig of a bench configuration (layers, fusion, head rows as run, blocks read)."""
    vocab = cfg.get("draft_vocab")
    return DraftConfig(int(cfg.get("draft_layers") or 1), fusion=cfg.get("draft_fusion") or "dgf",
                       draft_vocab_size=int(vocab) if vocab and int(vocab) != model.vocab_size else None,
                       feature_layers=feature_layers)


def _workload(model: ModelConfig, cfg: dict[str, Any], tree: TreeConfig | None, prompt: int, new: int) -> Workload:
    draft = bench_draft(cfg, model, draft_feature_layers(cfg) or ())
    t = 0 if tree is None else tree.total_tokens + tree.lookup
    slots = cache_slots(prompt + new + t, model.max_position_embeddings)  # our loop attends over all its slots
    return Workload(model, draft, tree or TreeConfig(), "f32", _draft_dtype(cfg), prompt, new, kv_slots=slots,
                    cpu_engine="dovetail-jax")


def _tps(hw: HardwareProfile, wl: Workload, acc: AcceptanceModel | None, opts: SimOptions) -> float:
    return simulate("dovetail" if acc is not None else "target-cpu", hw, wl, acc, opts=opts).tokens_per_s


def check_trees(hw: HardwareProfile, model_key: str, bench: Path, profile: str | None = None,
                cycles: int = 3000) -> dict[str, Any]:
    """Rows per (dataset, configuration) and a summary per dataset; see the module docstring. `profile` is the
    acceptance profile's base name (default: the model's default draft's); `<profile>-<dataset>` is used where
    it exists."""
    model = resolve_model(model_key)
    base = profile or default_profile(model_key)
    if not base:
        raise ConfigError(f"no default acceptance profile for {model_key!r}: pass one")
    try:
        d = json.loads(Path(bench).read_text())
        cfgs = {c["name"]: c for c in d["configs"]}
        results, prompts = d["results"], d["prompts"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{bench}: not a readable `dovetail bench dovetail` result ({e})") from None
    opts = SimOptions(cycles=cycles)
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for ds, res in results.items():
        ps = prompts[ds]
        prompt = round(statistics.mean(p["prompt_tokens"] for p in ps))
        new = round(statistics.mean(p["target"]["tokens"] for p in ps))
        name = f"{base}-{ds}"
        try:
            prof = ProfileAcceptance(name)
        except ConfigError:
            prof = ProfileAcceptance(base)
        measured_target = float(res["target"]["decode_tok_s"])
        ds_rows = []
        for cname, r in res["configs"].items():
            cfg = cfgs[cname]
            tree = TreeConfig(**cfg["tree"])
            wl = _workload(model, cfg, tree, prompt, new)
            target = _tps(hw, _workload(model, cfg, None, prompt, new), None, opts)
            share = (r.get("lookup") or {}).get("share_of_cycles", 0.0) if tree.lookup else None
            own = _tps(hw, wl, HistogramAcceptance(tree, r["accept_hist"], share), opts)
            prof_tps = _tps(hw, wl, prof, opts) if not tree.lookup or prof.prices_lookup else None
            row = {"dataset": ds, "config": cname, "tree": cfg["tree"], "draft_dtype": _draft_dtype(cfg),
                   "draft": cfg.get("draft_source") or cfg.get("draft"),
                   "prompt_tokens": prompt, "new_tokens": new, "measured_tau": r["tau"],
                   "measured_speedup": r["speedup"], "measured_tokens_per_s": r["decode_tok_s"],
                   "measured_target_tokens_per_s": measured_target, "predicted_target_tokens_per_s": target,
                   "predicted_speedup_own_hist": own / target,
                   "predicted_speedup_profile": prof_tps / target if prof_tps is not None else None,
                   "profile": prof.name if prof_tps is not None else None,
                   "profile_tau": prof.outcomes(tree).tau if prof_tps is not None else None}
            row["predicted_tokens_per_s_own_hist"] = own
            row["error_tokens_per_s_own_hist"] = own / r["decode_tok_s"] - 1  # absolute: the hour's speed too
            row["error_own_hist"] = row["predicted_speedup_own_hist"] / r["speedup"] - 1
            if tree.lookup:
                row["chain_share"] = share
            row["error_profile"] = (row["predicted_speedup_profile"] / r["speedup"] - 1 if prof_tps is not None
                                    else None)
            ds_rows.append(row)
        summary[ds] = _summary(ds_rows, measured_target)
        rows += ds_rows
    return {"bench": str(bench), "profile": hw.name, "model": model.name, "tie": TIE, "cycles": cycles,
            "summary": summary, "rows": rows}


def _summary(ds_rows: list[dict[str, Any]], measured_target: float) -> dict[str, Any]:
    """One dataset's errors, and whether `--tune` (with the profile, or with the own histograms) picks the
    measured best tree. Lookup configurations have a profile prediction only from a profile fitted with lookup;
    the tune questions are asked of the configurations the profile predicts, and not at all when it predicts none."""
    plain = [x for x in ds_rows if x["predicted_speedup_profile"] is not None]
    # --tune ranks the trees of one draft: a bench that compares drafts has no tree pick to check
    one_draft = bool(plain) and len({(x["draft"], x["draft_dtype"]) for x in plain}) == 1
    best = max(plain or ds_rows, key=lambda x: x["measured_speedup"])
    tied = [x["config"] for x in plain or ds_rows if x["measured_speedup"] >= best["measured_speedup"] * (1 - TIE)]
    pick = max(plain, key=lambda x: x["predicted_speedup_profile"]) if plain else None
    pick_own = max(plain, key=lambda x: x["predicted_speedup_own_hist"]) if plain else None
    prof_err = [abs(x["error_profile"]) for x in plain]
    return {
        "configs": len(ds_rows), "profile": plain[0]["profile"] if plain else None, "one_draft": one_draft,
        "measured_best": best["config"], "measured_within_tie": tied,
        "tune_pick_profile": pick["config"] if one_draft and pick else None,
        "tune_pick_own_hist": pick_own["config"] if one_draft and pick_own else None,
        "pick_agrees": pick["config"] in tied if one_draft and pick else None,
        "pick_own_hist_agrees": pick_own["config"] in tied if one_draft and pick_own else None,
        "median_abs_error_own_hist": float(np.median([abs(x["error_own_hist"]) for x in ds_rows])),
        "max_abs_error_own_hist": float(max(abs(x["error_own_hist"]) for x in ds_rows)),
        "median_abs_error_profile": float(np.median(prof_err)) if prof_err else None,
        "max_abs_error_profile": float(max(prof_err)) if prof_err else None,
        "target_error": ds_rows[0]["predicted_target_tokens_per_s"] / measured_target - 1,
    }


def format_trees_report(rep: dict[str, Any]) -> str:
    lines = [f"{'dataset':<10} {'configuration':<36} {'measured':>8} {'own hist':>15} {'profile':>15}"]
    for r in rep["rows"]:
        prof = (f"{r['predicted_speedup_profile']:>6.3f}x {r['error_profile']:>+6.1%}"
                if r["predicted_speedup_profile"] is not None else f"{'(lookup)':>15}")
        lines.append(f"{r['dataset']:<10} {r['config'][:36]:<36} {r['measured_speedup']:>7.3f}x "
                     f"{r['predicted_speedup_own_hist']:>6.3f}x {r['error_own_hist']:>+6.1%} {prof}")
    for ds, s in rep["summary"].items():
        if s["one_draft"]:
            pick = (f"--tune with {s['profile']} picks {s['tune_pick_profile']} "
                    f"({'agrees' if s['pick_agrees'] else 'does NOT agree'})")
        elif s["profile"] is None:
            pick = "no --tune check (the profile prices no configuration: lookup chains without a lookup fit)"
        else:
            pick = "no --tune check (the configurations differ in draft; --tune ranks the trees of one draft)"
        prof = (f", profile median {s['median_abs_error_profile']:.1%} max {s['max_abs_error_profile']:.1%}"
                if s["median_abs_error_profile"] is not None else "")
        lines.append(f"{ds}: measured best {s['measured_best']} (tied within {rep['tie']:.1%}: "
                     f"{', '.join(s['measured_within_tie'])}); {pick}; speedup "
                     f"|error| own hist median {s['median_abs_error_own_hist']:.1%} max "
                     f"{s['max_abs_error_own_hist']:.1%}{prof}; target-only {s['target_error']:+.1%}")
    return "\n".join(lines)
