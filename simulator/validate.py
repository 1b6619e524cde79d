"""Validation against real runs: collect `dovetail generate --json` runs, calibrate on some, predict the rest.

    python -m simulator.validate collect --out analysis/results/sim_runs.json
    python -m simulator.validate check --runs analysis/results/sim_runs.json --profile hw_profile.json \
        [--measured op_timings.json] [--calibrate t-fib-64,dt-k4-d3-t8]

Calibration turns the calibration runs' measured per-phase times into factors on the cost model (target forward
per token count, draft, host, transfer) and their accept histograms into the acceptance model; every other run
is then predicted from its configuration alone and compared with its measured decode tokens/s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dovetail_jax.config import DraftConfig, ModelConfig, TreeConfig
from dovetail_jax.plan import cache_slots
from simulator.acceptance import AcceptanceModel, RunsAcceptance, parse_run
from simulator.costs import CostModel, ScaledCosts, feature_bytes, tree_bytes
from simulator.errors import ConfigError
from simulator.files import write_json
from simulator.hardware import HardwareProfile, load_profile
from simulator.schedules import SimOptions, make_costs, simulate
from simulator.workload import PAPER_TREE, Workload, resolve_model

RESULTS = Path(__file__).resolve().parent.parent / "analysis" / "results"
GOAL_MEDIAN, GOAL_MAX = 0.10, 0.20
LONG_PROMPT = ("Explain, step by step and with examples, how a hash table works: hashing, buckets, collisions, "
               "open addressing versus chaining, load factor and resizing, and the cost of each operation. ") * 4

# name, prompt, max_new_tokens, extra CLI args. Dovetail-mode flags follow the planned `--mode dovetail`; edit
# them here (or pass --configs FILE with the same fields) once that mode's options are final.
def _dt(name: str, top_k: int, depth: int, total: int, *draft: str) -> dict[str, Any]:
    return {"name": name, "prompt": "def fibonacci(n):", "max_new_tokens": 128,
            "args": ["--mode", "dovetail", "--tree-top-k", str(top_k), "--depth", str(depth), "--total-tokens",
                     str(total), *draft]}


V8K = ("--draft-vocab", "8192")
DEFAULT_CONFIGS: list[dict[str, Any]] = [
    {"name": "t-fib-64", "prompt": "def fibonacci(n):", "max_new_tokens": 64, "args": []},
    {"name": "t-fib-200", "prompt": "def fibonacci(n):", "max_new_tokens": 200, "args": []},
    {"name": "t-fib-400", "prompt": "def fibonacci(n):", "max_new_tokens": 400, "args": []},
    {"name": "t-long-64", "prompt": LONG_PROMPT, "max_new_tokens": 64, "args": []},
    {"name": "t-long-200", "prompt": LONG_PROMPT, "max_new_tokens": 200, "args": []},
    {"name": "t-sort-120", "prompt": "def quicksort(items):", "max_new_tokens": 120, "args": []},
    # random drafts (tau = 1: the cost model alone), 1-3 layers, reduced or full vocabulary
    _dt("dt-r1-k4-d3-t8", 4, 3, 8, *V8K),
    _dt("dt-r1-k10-d4-t7", 10, 4, 7, *V8K),
    _dt("dt-r2-k4-d5-t12", 4, 5, 12, "--draft-layers", "2", *V8K),
    _dt("dt-r3-k2-d2-t4", 2, 2, 4, "--draft-layers", "3", *V8K),
    # `--draft-layers 1` asks for a random draft (full vocabulary): without a draft flag `generate` now loads
    # the shipped draft (the kernel-era collection ran this name with it, as its record's draft says)
    _dt("dt-r1full-k8-d4-t16", 8, 4, 16, "--draft-layers", "1"),
    # the target as its own draft: long accepted paths (tau 4-5), a 30-layer full-vocabulary draft
    _dt("dt-self-k1-d4-t5", 1, 4, 5, "--draft", "self"),
    _dt("dt-self-k4-d3-t8", 4, 3, 8, "--draft", "self"),
]
DEFAULT_CALIBRATION = ("t-fib-64", "dt-r1-k4-d3-t8", "dt-self-k4-d3-t8")
CALIBRATION_DTYPE = "f32"  # what our loop runs target and draft in (`run_workload`)


def kv_slots(prompt: int, new: int, tree: int, limit: int) -> int:
    """Cache slots our decoding loop preallocates for prompt + new + tree tokens (`dovetail_jax.plan`)."""
    return cache_slots(prompt + new + tree, limit)


# ---------------------------------------------------------------------------------------------------------------
# collect


def collect(configs: list[dict[str, Any]], out: Path, repeats: int = 3) -> list[dict[str, Any]]:
    """Run each configuration with `dovetail generate --json --ignore-eos`, round-robin `repeats` times.

    Round-robin and best-of-N because the machine may be shared: a burst of other work then hits one repeat of
    every configuration rather than all repeats of one, and the fastest repeat is the least disturbed.
    """
    names = [c.get("name") for c in configs]
    dup = sorted({n for n in names if names.count(n) > 1}, key=str)
    if dup:  # runs are kept per name: two configurations under one name would pool their repeats
        raise ConfigError(f"configuration names must be unique; {dup[0]!r} appears {names.count(dup[0])} times")
    best: dict[str, dict[str, Any]] = {}
    failed: set[str] = set()
    for _ in range(repeats):
        for c in configs:
            if c["name"] in failed:
                continue
            cmd = [sys.executable, "-m", "dovetail_jax.cli", "generate", "--prompt", c["prompt"], "--max-new-tokens",
                   str(c["max_new_tokens"]), "--ignore-eos", "--json", *c.get("args", [])]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                print(f"[collect] {c['name']}: failed ({p.stderr.strip().splitlines()[-1:] or p.returncode})",
                      file=sys.stderr)
                failed.add(c["name"])
                continue
            res = json.loads(p.stdout.strip().splitlines()[-1])
            res["load_average"] = os.getloadavg()[0]
            print(f"[collect] {c['name']}: {res['tokens_per_s']:.2f} tok/s (load {res['load_average']:.1f})",
                  file=sys.stderr)
            if c["name"] not in best or res["tokens_per_s"] > best[c["name"]]["tokens_per_s"]:
                res.pop("text", None)
                res.pop("token_ids", None)
                best[c["name"]] = {"name": c["name"], "config": {k: v for k, v in c.items() if k != "prompt"}, **res}
    runs = [best[c["name"]] for c in configs if c["name"] in best]
    # written whole at the end: an interrupted collection leaves the runs file that was there byte-identical
    write_json(out, {"runs": runs, "repeats": repeats, "selection": "fastest repeat (round-robin)"})
    return runs


# ---------------------------------------------------------------------------------------------------------------
# calibrate and check


def _is_dovetail(run: dict[str, Any]) -> bool:
    return str(run.get("mode", "target")).startswith("dovetail")


def run_workload(run: dict[str, Any], model: ModelConfig, cpu_engine: str | None = None) -> Workload:
    """The workload a run executed (our loop: f32 target, f32 draft on the second host device)."""
    prompt, new = int(run["prompt_tokens"]), int(run["new_tokens"])
    stats = parse_run(run, run.get("name", "run")) if _is_dovetail(run) else None
    tree = stats.tree if stats is not None and stats.tree is not None else PAPER_TREE
    layers = stats.draft_layers if stats is not None and stats.draft_layers else 1
    slots = int(run.get("cache_slots") or kv_slots(prompt, new, tree.total_tokens if stats else 0,
                                                   model.max_position_embeddings))
    d = run.get("draft") if isinstance(run.get("draft"), dict) else {}
    vocab = d.get("vocab")
    vocab = int(vocab) if vocab and int(vocab) != model.vocab_size else None
    kind = d.get("fusion", "dgf") if d.get("fusion") in ("dgf", "eagle", "none") else "dgf"
    draft = DraftConfig(num_layers=layers, fusion=kind, draft_vocab_size=vocab)
    return Workload(model, draft, tree, CALIBRATION_DTYPE, CALIBRATION_DTYPE, prompt, new, kv_slots=slots,
                    cpu_engine=cpu_engine)


def _phase(run: dict[str, Any], name: str) -> float:
    t = run.get("time_s") or {}
    return float(t.get(name, 0.0))


def verified_widths(tree: TreeConfig, chain_share: float | None) -> list[tuple[int, float]]:
    """(tokens verified, share of cycles) of a run: with prompt lookup the cycles that graft a chain verify
    T + L tokens and scan that width in the accept step, the others T, so a run's verify and accept time is
    priced as that mix (and its target factor is keyed at the mean width)."""
    q = float(chain_share or 0.0)
    if not tree.lookup or q <= 0.0:
        return [(tree.total_tokens, 1.0)]
    return [(tree.total_tokens, 1.0 - q), (tree.total_tokens + tree.lookup, q)]


def calibrate(cal_runs: list[dict[str, Any]], hw: HardwareProfile, model: ModelConfig,
              measured: dict[str, Any] | None, cpu_engine: str | None = None
              ) -> tuple[dict[str, Any], AcceptanceModel | None]:
    """Calibration factors (measured / predicted per phase) and the acceptance model from calibration runs."""
    target_pts: dict[int, list[float]] = {}
    draft, host, transfer = [], [], []
    for r in cal_runs:
        wl = run_workload(r, model, cpu_engine)
        base = make_costs(hw, wl, measured)
        span = wl.kv_slots or wl.prompt_len
        if not _is_dovetail(r):
            per_tok = float(r["decode_s"]) / max(int(r.get("decode_steps") or r["new_tokens"]), 1)
            target_pts.setdefault(1, []).append(per_tok / base.target_cpu(1, span))
            continue
        cycles = max(int(r["cycles"]), 1)
        stats = parse_run(r, r.get("name", "run"))
        tr = wl.tree
        p = np.asarray(stats.hist if stats.hist is not None else [1.0], float)
        p = p / p.sum()
        mean_rows = float(np.dot(np.arange(len(p)) + 1, p))
        widths = verified_widths(tr, stats.chain_share)
        pred_verify = sum(w * base.target_cpu(n, span) for n, w in widths)
        target_pts.setdefault(round(sum(w * n for n, w in widths)), []).append(
            _phase(r, "verify") / cycles / pred_verify)
        pred_draft = (base.draft_pass(round(mean_rows), span) + tr.depth * base.draft_pass(tr.top_k, span)
                      + base.draft_head(1) + tr.depth * base.draft_head(tr.top_k))
        draft.append(_phase(r, "draft") / cycles / pred_draft)
        pred_x = base.h2d(feature_bytes(wl, round(mean_rows))) + base.d2h(tree_bytes(wl))
        transfer.append(max(_phase(r, "transfer"), 1e-9) / cycles / pred_x)
        residual = float(r["decode_s"]) - sum(_phase(r, k) for k in ("verify", "draft", "transfer", "host"))
        pred_host = base.host_tree() + sum(w * float(np.dot(p, [base.accept(n, a) for a in range(len(p))]))
                                           for n, w in widths)
        host.append(max(_phase(r, "host") + max(residual, 0.0), 1e-9) / cycles / pred_host)
    factors = {"target": sorted((n, statistics.median(v)) for n, v in target_pts.items()),
               "draft": statistics.median(draft) if draft else 1.0,
               "host": statistics.median(host) if host else 1.0,
               "transfer": statistics.median(transfer) if transfer else 1.0}
    dt = [parse_run(r, r.get("name", "run")) for r in cal_runs if _is_dovetail(r)]
    return factors, (RunsAcceptance(dt) if dt else None)


def scaled_factory(factors: dict[str, Any], measured: dict[str, Any] | None
                   ) -> Callable[[HardwareProfile, Workload], CostModel]:
    """The cost factory of calibrated `factors` (from `calibrate`): the base predictor times the fitted factors."""

    def factory(h: HardwareProfile, w: Workload) -> CostModel:
        # the runs' "host" phase holds the accept step and the tree bookkeeping: one factor for both
        return ScaledCosts(make_costs(h, w, measured), factors["target"], factors["draft"], factors["host"],
                           factors["transfer"], accept=factors["host"])

    return factory


def check(runs: list[dict[str, Any]], hw: HardwareProfile, model: ModelConfig, measured: dict[str, Any] | None,
          calibration: list[str], cycles: int = 4000, acceptance: str = "own", cpu_engine: str | None = None
          ) -> dict[str, Any]:
    """Calibrate costs on the `calibration` runs and predict the others' tokens/s.

    `acceptance`: "own" feeds each held-out run's own accept histogram to the simulator (the question is then
    "what speed does this acceptance give on this hardware?": acceptance is an input, time is predicted);
    "calibration" pools the calibration runs' histograms (right only when the drafts and trees match).
    """
    if acceptance not in ("own", "calibration"):
        raise ConfigError(f"acceptance must be 'own' or 'calibration', got {acceptance!r}")
    names = [r.get("name", f"run{i}") for i, r in enumerate(runs)]
    for i, r in enumerate(runs):
        r.setdefault("name", names[i])
    unknown = set(calibration) - set(names)
    if unknown:
        raise ConfigError(f"calibration runs {sorted(unknown)} are not in the runs file ({', '.join(names)})")
    cal = [r for r in runs if r["name"] in calibration]
    held = [r for r in runs if r["name"] not in calibration]
    if not cal:
        raise ConfigError("no calibration run: name at least one with --calibrate")
    if not held:
        raise ConfigError("every run is used for calibration: nothing is left to validate")
    factors, acc = calibrate(cal, hw, model, measured, cpu_engine)
    factory = scaled_factory(factors, measured)

    rows = []
    for r in held:
        wl = run_workload(r, model, cpu_engine)
        if _is_dovetail(r):
            acc_r = RunsAcceptance([parse_run(r, r["name"])]) if acceptance == "own" else acc
            if acc_r is None:
                raise ConfigError(f"{r['name']} is a dovetail run but no dovetail run was used for "
                                  f"calibration, so there is no acceptance model")
            p = simulate("dovetail", hw, wl, acc_r, opts=SimOptions(cycles=cycles), cost_factory=factory)
        else:
            p = simulate("target-cpu", hw, wl, opts=SimOptions(), cost_factory=factory)
        meas = float(r["tokens_per_s"])
        rows.append({"name": r["name"], "mode": r.get("mode", "target"), "prompt_tokens": wl.prompt_len,
                     "new_tokens": wl.new_tokens, "tree": [wl.tree.top_k, wl.tree.depth, wl.tree.total_tokens]
                     if _is_dovetail(r) else None, "draft": r.get("draft") if _is_dovetail(r) else None,
                     "tau": r.get("tau"), "predicted_tokens_per_s": p.tokens_per_s,
                     "measured_tokens_per_s": meas, "error": p.tokens_per_s / meas - 1})
    errs = [abs(x["error"]) for x in rows]
    summary = {"profile": hw.name, "model": model.name, "calibration": calibration, "validated": len(rows),
               "acceptance": acceptance, "cpu_engine": cpu_engine or "profile",
               "median_abs_error": statistics.median(errs), "max_abs_error": max(errs),
               "goal": {"median": GOAL_MEDIAN, "max": GOAL_MAX},
               "meets_goal": statistics.median(errs) <= GOAL_MEDIAN and max(errs) <= GOAL_MAX,
               "dovetail_runs_validated": sum(1 for x in rows if x["mode"] != "target"),
               "factors": {"target": factors["target"], "draft": factors["draft"], "host": factors["host"],
                           "transfer": factors["transfer"]}}
    return {"summary": summary, "rows": rows}


def format_report(rep: dict[str, Any]) -> str:
    s = rep["summary"]
    lines = [f"validation on {s['profile']} ({s['model']}), calibrated on {', '.join(s['calibration'])}:",
             f"{'run':<16} {'mode':<9} {'prompt':>6} {'new':>5} {'predicted':>10} {'measured':>10} {'error':>7}"]
    for r in rep["rows"]:
        lines.append(f"{r['name']:<16} {r['mode']:<9} {r['prompt_tokens']:>6} {r['new_tokens']:>5} "
                     f"{r['predicted_tokens_per_s']:>10.2f} {r['measured_tokens_per_s']:>10.2f} {r['error']:>+7.1%}")
    lines.append(f"median |error| {s['median_abs_error']:.1%}, max {s['max_abs_error']:.1%} "
                 f"(goal {GOAL_MEDIAN:.0%} / {GOAL_MAX:.0%}: {'met' if s['meets_goal'] else 'NOT met'}); "
                 f"{s['dovetail_runs_validated']} dovetail run(s) among {s['validated']}")
    return "\n".join(lines)


def _load_runs_file(path: str | Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read runs {str(path)!r}: {e}") from None
    runs = data["runs"] if isinstance(data, dict) and "runs" in data else data
    if not isinstance(runs, list) or not runs:
        raise ConfigError(f"{path}: expected a non-empty list of runs")
    return runs


def validate_file(path: str | Path, hw: HardwareProfile, model: ModelConfig, measured: dict[str, Any] | None,
                  calibrate: str | None = None, out: str | Path | None = None,
                  acceptance: str = "own", cpu_engine: str | None = None) -> dict[str, Any]:
    """`dovetail simulate --validate RUNS`: check, write JSON, and return the report with its text."""
    runs = _load_runs_file(path)
    names = {r.get("name") for r in runs}
    cal = calibrate.split(",") if calibrate else [n for n in DEFAULT_CALIBRATION if n in names]
    rep = check(runs, hw, model, measured, cal, acceptance=acceptance, cpu_engine=cpu_engine)
    if out:
        write_json(out, rep)
    rep["text"] = format_report(rep)
    return rep


def _check_runs_match(runs: list[dict[str, Any]], hw: HardwareProfile, model: ModelConfig, path: str) -> None:
    """Refuse runs that did not run `model` on `hw`'s kind of machine: their factors would calibrate another engine.

    A run names its model ("default" = the shipped SmolLM2-135M) and its devices; a draft on a host device
    (cpu:N) needs a profile whose accelerator is a host device too."""
    from dovetail_jax.config import KNOWN_MODELS, SMOLLM2_135M

    known = {k.lower(): v for k, v in KNOWN_MODELS.items()} | {v.name.lower(): v for v in KNOWN_MODELS.values()}
    for r in runs:
        name = r.get("name", "run")
        ran = r.get("model")
        ran_cfg = SMOLLM2_135M if ran == "default" else known.get(str(ran).lower())
        if ran_cfg is not None and ran_cfg != model:  # a model given by file path cannot be told apart: accepted
            raise ConfigError(f"--calibrated-by {path}: run {name!r} ran {ran_cfg.name}, not {model.name} "
                              f"(--model): its calibration does not apply")
        dev = (r.get("devices") or {}).get("draft") if isinstance(r.get("devices"), dict) else None
        if _is_dovetail(r) and isinstance(dev, str) and dev.startswith("cpu") and not hw.gpu.shares_cpu:
            raise ConfigError(f"--calibrated-by {path}: run {name!r} drafted on host device {dev}, but profile "
                              f"{hw.name} has a real accelerator: its calibration does not apply")


def calibration_from_file(path: str | Path, hw: HardwareProfile, model: ModelConfig,
                          measured: dict[str, Any] | None, calibrate_names: str | None = None,
                          cpu_engine: str | None = None) -> tuple[Callable[[HardwareProfile, Workload], CostModel],
                                                                  dict[str, Any]]:
    """`dovetail simulate --calibrated-by RUNS`: the cost factory `check` would fit on the same calibration runs.

    Returns (factory, info) where info holds the runs file, the calibration names and the factors. The same
    `calibrate` as `check`, so simulate's predictions are those `python -m simulator.validate check` validated.
    """
    runs = _load_runs_file(path)
    names = [r.get("name", f"run{i}") for i, r in enumerate(runs)]
    if calibrate_names:
        cal = [n.strip() for n in calibrate_names.split(",") if n.strip()]
    else:
        cal = [n for n in DEFAULT_CALIBRATION if n in names]
        if not cal:
            raise ConfigError(f"--calibrated-by {path}: none of the default calibration runs "
                              f"({', '.join(DEFAULT_CALIBRATION)}) is in the file; name some with --calibrate "
                              f"(runs: {', '.join(map(str, names))})")
    unknown = sorted(set(cal) - set(names))
    if unknown:
        raise ConfigError(f"--calibrated-by {path}: calibration runs {unknown} are not in the file "
                          f"(runs: {', '.join(map(str, names))})")
    chosen = [r for n, r in zip(names, runs, strict=True) if n in cal]
    _check_runs_match(chosen, hw, model, str(path))
    try:
        factors, _ = calibrate(chosen, hw, model, measured, cpu_engine)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise ConfigError(f"--calibrated-by {path}: a calibration run lacks a measured field ({e!r})") from None
    return scaled_factory(factors, measured), {"runs": str(path), "calibration": cal, "factors": factors}


# ---------------------------------------------------------------------------------------------------------------
# engines: the same machine, three engines (--cpu-engine), target-only decode


REFERENCE_BENCH = "bench_target.json"  # the calibration run whose read bandwidth the engines' fit corresponds to


def _check_gbs(vals: list[Any], where: str, what: str, shown: Any = None) -> list[float]:
    for x in vals:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0:
            raise ConfigError(f"{where}: {what}, got {x if shown is None else shown!r}")
    return [float(x) for x in vals]


def run_read_gbs(machine: Any, where: str, prompts: Sequence[Any] = ()) -> float | None:
    """The read bandwidth (GB/s) a bench run measured. `bench dovetail` probes briefly after every few prompts
    (a prompt record's `memory_read_gbs`): the median of those of `prompts`, when any, is the bandwidth of that
    stretch of the run. Otherwise the run's `machine.memory_read_gbs`: a number (`bench target`, once before the
    engines run) or {start, end} (`bench dovetail` before the first prompt and after the last: their mean, or
    the one present in a partial file). None when the run recorded none (older files)."""
    inside = [p["memory_read_gbs"] for p in prompts if isinstance(p, dict) and p.get("memory_read_gbs") is not None]
    if inside:
        return statistics.median(_check_gbs(inside, where, "a prompt's memory_read_gbs must be a positive number "
                                                            "of GB/s"))
    v = machine.get("memory_read_gbs") if isinstance(machine, dict) else None
    vals = [v.get("start"), v.get("end")] if isinstance(v, dict) else [v]
    vals = _check_gbs([x for x in vals if x is not None], where, "machine.memory_read_gbs must be a positive "
                      'number of GB/s or {"start": GB/s, "end": GB/s}', v)
    return float(statistics.mean(vals)) if vals else None


def engine_rows(results: Path = RESULTS, held_out: Path | None = None,
                reference: Path | None = None) -> list[dict[str, Any]]:
    """Measured target-only decode tok/s per engine on this machine (bench_target.json, bench_dovetail.json).

    The engines' parameters (simulator/data/cpu_engines.json, analysis/fit_cpu_engines.py) used bench_target's
    decode rates ("calibration" rows here); bench_dovetail's decode rates on chat prompts were not used
    ("held-out"); `held_out` names another `bench dovetail` result to take them from. Each row carries the read
    bandwidth its run measured (`run_read_gbs`, None when that run recorded none). `reference` names another `bench
    target` result for the calibration rows (the one a preset's own engines file was fitted on)."""
    rows: list[dict[str, Any]] = []
    path = Path(reference) if reference else results / REFERENCE_BENCH
    try:
        bt = json.loads(path.read_text())
        prompt, new = int(bt["prompt"]["tokens"]), int(bt["max_new_tokens"])
        bt_engines = dict(bt["engines"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not a readable `dovetail bench target` result ({e})") from None
    bt_gbs = run_read_gbs(bt.get("machine"), str(path))
    for key, engine in (("hf_transformers", "hf-torch"), ("dovetail_jax", "dovetail-jax"),
                        ("llama_cpp_f32", "llama.cpp")):
        e = bt_engines.get(key)
        if e and e.get("decode_tok_s"):
            rows.append({"name": f"target-{engine}-fib", "engine": engine, "prompt_tokens": prompt,
                         "new_tokens": new, "measured_tokens_per_s": float(e["decode_tok_s"]),
                         "cache_slots": e.get("cache_slots"), "source": path.name,
                         "split": "calibration", "run_read_gbs": bt_gbs})
    held_out = held_out or results / "bench_dovetail.json"
    try:
        bd = json.loads(Path(held_out).read_text())
        bd["results"], bd["prompts"]  # noqa: B018 - the keys a bench dovetail result has
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{held_out}: not a readable `dovetail bench dovetail` result ({e})") from None
    run_read_gbs(bd.get("machine"), str(held_out))  # a bad field is an error even if no row would use it
    for ds, res in bd["results"].items():
        ps = bd["prompts"][ds]
        bd_gbs = run_read_gbs(bd.get("machine"), str(held_out), ps)  # this dataset's stretch of the run
        prompt = round(statistics.mean(p["prompt_tokens"] for p in ps))
        new = round(statistics.mean(p["target"]["tokens"] for p in ps))
        for key, engine in (("target", "dovetail-jax"), ("llama_cpp_f32", "llama.cpp")):
            if key in res and res[key]:
                rows.append({"name": f"target-{engine}-{ds}", "engine": engine, "prompt_tokens": prompt,
                             "new_tokens": new, "measured_tokens_per_s": float(res[key]["decode_tok_s"]),
                             "cache_slots": None, "source": f"{Path(held_out).name} ({ds}, {len(ps)} prompts, chat)",
                             "split": "held-out", "run_read_gbs": bd_gbs})
    return rows


def _engine_tokens_per_s(hw: HardwareProfile, model: ModelConfig, r: dict[str, Any]) -> float:
    """Predicted target-only decode tok/s of an engine row on `hw` (no calibration: the engine's fitted numbers)."""
    slots = None
    if r["engine"] == "dovetail-jax":  # our loop attends over its whole preallocated cache
        slots = r["cache_slots"] or kv_slots(r["prompt_tokens"], r["new_tokens"], 0, model.max_position_embeddings)
    wl = Workload(model, prompt_len=r["prompt_tokens"], new_tokens=r["new_tokens"], kv_slots=slots,
                  cpu_engine=r["engine"])
    return simulate("target-cpu", hw, wl, opts=SimOptions()).tokens_per_s


def check_engines(hw: HardwareProfile, model: ModelConfig, results: Path = RESULTS,
                  held_out: Path | None = None, bandwidth_scaling: bool = True,
                  reference: Path | None = None) -> dict[str, Any]:
    """Predict each engine's measured target-only decode from the profile + `--cpu-engine` (no calibration).

    With `bandwidth_scaling`, each row is predicted on the profile with its memory bandwidth scaled by (the read
    bandwidth measured in that row's own run) / (the reference bandwidth), so a run from a slow-DRAM hour is
    predicted on the machine it had. The reference is bench_target.json's `machine.memory_read_gbs`: the engines
    were fitted against the profile (analysis/fit_cpu_engines.py) on a mix of runs, and bench_target's decode
    steps are the one measurement all three fits share (hf-torch's only point, llama.cpp's F32 decode,
    dovetail-jax's 4x-weighted decode point); the others (dovetail-jax's per-T forwards in bench_forward.json,
    llama.cpp's F16 / Q4_1 decodes from another session and prompt prefills from bench_dovetail.json) recorded
    no bandwidth, so the reference is exact for the shared decode points only. Rows whose run recorded no
    bandwidth (or all rows, if the reference file has none) are predicted unscaled (`bandwidth_scaled` false).
    Both errors are reported; the scaled one is the headline (`median_abs_error`, `meets_goal`)."""
    rows = engine_rows(results, held_out, reference)
    ref_name = Path(reference).name if reference else REFERENCE_BENCH
    ref = next((r["run_read_gbs"] for r in rows if r["split"] == "calibration"), None)
    out = []
    for r in rows:
        unscaled = _engine_tokens_per_s(hw, model, r)
        scale = r["run_read_gbs"] / ref if bandwidth_scaling and ref and r["run_read_gbs"] else None
        pred = unscaled if scale is None else _engine_tokens_per_s(hw.with_memory_bandwidth(scale), model, r)
        meas = r["measured_tokens_per_s"]
        out.append({**r, "bandwidth_scaled": scale is not None, "bandwidth_scale": scale,
                    "predicted_tokens_per_s": pred, "predicted_unscaled_tokens_per_s": unscaled,
                    "error": pred / meas - 1, "error_unscaled": unscaled / meas - 1})
    held = [x for x in out if x["split"] == "held-out"]
    if not held:
        raise ConfigError(f"{held_out or results / 'bench_dovetail.json'}: no target-only or llama.cpp decode "
                          f"rate to validate")
    errs = [abs(x["error"]) for x in held]
    errs_un = [abs(x["error_unscaled"]) for x in held]
    summary = {"profile": hw.name, "cpu_engines": hw.cpu_engines or "cpu_engines.json", "model": model.name,
               "rows": len(out), "held_out": len(errs),
               "headline": "bandwidth-scaled" if bandwidth_scaling else "unscaled (--no-bandwidth-scaling)",
               "median_abs_error": statistics.median(errs), "max_abs_error": max(errs),
               "median_abs_error_unscaled": statistics.median(errs_un), "max_abs_error_unscaled": max(errs_un),
               "bandwidth_scaling": {"enabled": bandwidth_scaling, "reference_read_gbs": ref,
                                     "reference": f"{ref_name} machine.memory_read_gbs (jnp.sum read)",
                                     "held_out_scaled": sum(x["bandwidth_scaled"] for x in held)},
               "goal": {"median": GOAL_MEDIAN, "max": GOAL_MAX},
               "meets_goal": statistics.median(errs) <= GOAL_MEDIAN and max(errs) <= GOAL_MAX}
    return {"summary": summary, "rows": out}


def format_engines_report(rep: dict[str, Any]) -> str:
    s = rep["summary"]
    lines = [f"{'run':<30} {'engine':<13} {'split':<11} {'GB/s':>5} {'scale':>5} {'predicted':>9} {'measured':>8} "
             f"{'error':>7} {'unscaled':>8}"]
    for r in rep["rows"]:
        gbs = "-" if r["run_read_gbs"] is None else f"{r['run_read_gbs']:.1f}"
        scale = "-" if r["bandwidth_scale"] is None else f"{r['bandwidth_scale']:.2f}"
        lines.append(f"{r['name']:<30} {r['engine']:<13} {r['split']:<11} {gbs:>5} {scale:>5} "
                     f"{r['predicted_tokens_per_s']:>9.2f} {r['measured_tokens_per_s']:>8.2f} {r['error']:>+7.1%} "
                     f"{r['error_unscaled']:>+8.1%}")
    b = s["bandwidth_scaling"]
    ref = "none recorded" if b["reference_read_gbs"] is None else f"{b['reference_read_gbs']:.1f} GB/s"
    ref += f" in {b['reference'].split()[0]}, engines {s.get('cpu_engines', 'cpu_engines.json')}"
    lines.append(f"held-out ({s['held_out']} rows, {b['held_out_scaled']} bandwidth-scaled; reference {ref}): "
                 f"{s['headline']} median |error| {s['median_abs_error']:.1%}, max {s['max_abs_error']:.1%} "
                 f"(goal {GOAL_MEDIAN:.0%} / {GOAL_MAX:.0%}: {'met' if s['meets_goal'] else 'NOT met'})"
                 + (f"; unscaled median {s['median_abs_error_unscaled']:.1%}, max {s['max_abs_error_unscaled']:.1%}"
                    if b["enabled"] else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from dovetail_jax.errors import DovetailError

    ap = argparse.ArgumentParser(prog="python -m simulator.validate")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="run dovetail generate for each configuration")
    c.add_argument("--out", default=str(RESULTS / "sim_runs.json"))
    c.add_argument("--configs", help="JSON list of {name, prompt, max_new_tokens, args}")
    c.add_argument("--only", help="comma-separated config names")
    c.add_argument("--repeats", type=int, default=3)
    k = sub.add_parser("check", help="calibrate on some runs and predict the others")
    k.add_argument("--runs", default=str(RESULTS / "sim_runs.json"))
    k.add_argument("--profile", default="host-2core-shared")
    k.add_argument("--model", default="smollm2-135m")
    k.add_argument("--measured", help="op timings JSON from profile-hw --ops")
    k.add_argument("--calibrate", help=f"comma-separated run names (default: {','.join(DEFAULT_CALIBRATION)})")
    k.add_argument("--out", default=str(RESULTS / "sim_validation.json"))
    k.add_argument("--cpu-engine", default="profile",
                   help="cost the target with this engine (simulator/data/cpu_engines.json) instead of the "
                        "profile's own efficiencies (default: profile, i.e. a profile-hw measurement)")
    k.add_argument("--acceptance", choices=("own", "calibration"), default="own",
                   help="own: each held-out run's measured accept histogram drives its prediction (default); "
                        "calibration: the calibration runs' pooled histograms")
    e = sub.add_parser("engines", help="predict HF, llama.cpp and our target-only decode via --cpu-engine")
    e.add_argument("--profile", default="host-2core-shared")
    e.add_argument("--model", default="smollm2-135m")
    e.add_argument("--out", default=str(RESULTS / "sim_validation_engines.json"))
    e.add_argument("--held-out", default=None, metavar="FILE",
                   help="a `dovetail bench dovetail` result whose target-only and llama.cpp decode rates are the "
                        "held-out rows (default: analysis/results/bench_dovetail.json)")
    e.add_argument("--reference", default=None, metavar="FILE",
                   help="the `dovetail bench target` result the profile's engines were fitted on: its decode rates "
                        "are the calibration rows and its read bandwidth the scaling reference (default: "
                        f"analysis/results/{REFERENCE_BENCH})")
    e.add_argument("--no-bandwidth-scaling", action="store_true",
                   help="predict every row on the profile as it is, not scaled to the read bandwidth its run "
                        "measured (machine.memory_read_gbs)")
    t = sub.add_parser("trees", help="predict a measured tree sweep (bench dovetail) and check --tune's pick")
    t.add_argument("--bench", required=True, metavar="FILE", help="a `dovetail bench dovetail` result")
    t.add_argument("--profile", default="host-2core-intel-xeon", help="the machine the bench ran on")
    t.add_argument("--model", default="smollm2-135m")
    t.add_argument("--acceptance-profile", default=None, metavar="NAME",
                   help="base name of the shipped acceptance profile (default: the model's default draft's); "
                        "NAME-<dataset> is used where it exists")
    t.add_argument("--out", default=None, help="write the JSON report here")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "trees":
            from simulator.tree_check import check_trees, format_trees_report

            rep = check_trees(load_profile(args.profile), args.model, Path(args.bench), args.acceptance_profile)
            if args.out:
                write_json(args.out, rep)
            print(format_trees_report(rep))
            return 0
        if args.cmd == "engines":
            rep = check_engines(load_profile(args.profile), resolve_model(args.model),
                                held_out=Path(args.held_out) if args.held_out else None,
                                bandwidth_scaling=not args.no_bandwidth_scaling,
                                reference=Path(args.reference) if args.reference else None)
            write_json(args.out, rep)
            print(format_engines_report(rep))
            return 0
        if args.cmd == "collect":
            configs = json.loads(Path(args.configs).read_text()) if args.configs else DEFAULT_CONFIGS
            if args.only:
                keep = set(args.only.split(","))
                configs = [x for x in configs if x["name"] in keep]
            collect(configs, Path(args.out), args.repeats)
            return 0
        measured = json.loads(Path(args.measured).read_text()) if args.measured else None
        rep = validate_file(args.runs, load_profile(args.profile), resolve_model(args.model), measured,
                            args.calibrate, args.out, args.acceptance,
                            None if args.cpu_engine == "profile" else args.cpu_engine)
        print(rep["text"])
        return 0
    except DovetailError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the files are written whole or not at all: nothing to clean up
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
