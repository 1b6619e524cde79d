"""`dovetail simulate | profile-hw | plot`: argument parsing only; the work lives in the simulator modules.

`register(subparsers)` plugs these into the project CLI; imports stay light until a command runs (no JAX,
no matplotlib at registration). `python -m simulator.cli ...` works on its own too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dovetail_jax.argtypes import (
    INT_LIMIT,
    feature_layers,
    input_file,
    input_path,
    int_range,
    nonneg_int,
    output_dir,
    output_file,
    positive_float,
    positive_int,
    seed_int,
)
from simulator.errors import ConfigError

RESULTS = Path(__file__).resolve().parent.parent / "analysis" / "results"


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what}: expected comma-separated numbers, got {text!r}") from None


def build_acceptance(args: argparse.Namespace) -> Any:
    """The acceptance model chosen on the command line (None when none was given)."""
    from simulator import acceptance as A

    given = [n for n in ("tau", "alpha", "rank_probs", "runs", "acceptance_profile")
             if getattr(args, n, None) is not None]
    if len(given) > 1:
        flags = ", ".join("--" + g.replace("_", "-") for g in given)
        raise ConfigError(f"give one acceptance model, not {flags}")
    if args.tau is not None:
        return A.TauAcceptance(args.tau)
    if args.alpha is not None:
        return A.ChainAcceptance(_floats(args.alpha, "--alpha"))
    if args.rank_probs is not None:
        decay = 1.0 if args.depth_decay is None else args.depth_decay
        return A.PositionalAcceptance(_floats(args.rank_probs, "--rank-probs"), decay)
    if args.runs is not None:
        return A.RunsAcceptance(A.load_runs(args.runs), draft_layers=args.draft_layers)
    if getattr(args, "acceptance_profile", None) is not None:
        return A.ProfileAcceptance(args.acceptance_profile)
    return None


GiB = 2**30


@contextlib.contextmanager
def _text_file(flag: str, path: Any) -> Iterator[None]:
    """A JSON input that is not even text (a binary file given by mistake) is named by its flag."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise ConfigError(f"{flag} {path}: not a JSON text file ({e.reason} at byte {e.start})") from None


def _bytes(flag: str, value: float, unit: float) -> float:
    """A what-if size given in GB/s or GiB as bytes; a value too large to be one is named by its flag (the profile
    would otherwise refuse an infinite field in bytes)."""
    if not math.isfinite(value * unit):
        raise ConfigError(f"{flag} {value:g} is too large to be a real machine's")
    return value * unit


def check_combinations(args: argparse.Namespace) -> None:
    """Options that only apply with another are refused alone: silently ignoring one would make the result look
    like a what-if it is not."""
    pairs = [("depth_decay", "rank_probs", "--depth-decay only applies with --rank-probs"),
             ("vram_budget", "tune", "--vram-budget only applies with --tune (for one machine use --vram-gb)"),
             ]
    for opt, needs, msg in pairs:
        if getattr(args, opt, None) is not None and not getattr(args, needs, None):
            raise ConfigError(msg)
    if getattr(args, "calibrate", None) is not None and not (args.validate or getattr(args, "calibrated_by", None)):
        raise ConfigError("--calibrate only applies with --validate or --calibrated-by")
    if args.validate and getattr(args, "calibrated_by", None):
        raise ConfigError("--validate calibrates on its own runs: drop --calibrated-by")


def build_inputs(args: argparse.Namespace) -> tuple[Any, Any, Any, Any, Any]:
    """(hardware, workload, acceptance, measured table, options) from parsed arguments."""
    from dovetail_jax.config import DraftConfig, TreeConfig, resolve_feature_layers
    from simulator.engines import PROFILE_ENGINE
    from simulator.hardware import default_engine, load_profile
    from simulator.schedules import SimOptions
    from simulator.workload import Workload, resolve_model

    check_combinations(args)
    with _text_file("--profile", args.profile):
        hw = load_profile(args.profile)
    if args.pcie_gen is not None or args.lanes is not None:
        hw = hw.with_link(gen=args.pcie_gen, lanes=args.lanes)
    if args.link_gbps is not None:
        hw = hw.with_link(bandwidth=_bytes("--link-gbps", args.link_gbps, 1e9))
    if args.vram_gb is not None:
        hw = hw.with_vram(_bytes("--vram-gb", args.vram_gb, GiB))
    if getattr(args, "vram_budget", None) is not None:
        _bytes("--vram-budget", args.vram_budget, GiB)
    model = resolve_model(args.model)
    if args.draft_layers > model.num_layers:
        raise ConfigError(f"--draft-layers {args.draft_layers}: a draft deeper than the target ({model.name}, "
                          f"{model.num_layers} layers) is not a draft")
    if args.draft_vocab is not None and args.draft_vocab > model.vocab_size:
        raise ConfigError(f"--draft-vocab {args.draft_vocab} exceeds {model.name}'s vocabulary of "
                          f"{model.vocab_size} tokens")
    if args.top_k > (args.draft_vocab or model.vocab_size):
        raise ConfigError(f"--top-k {args.top_k} exceeds the draft's vocabulary of "
                          f"{args.draft_vocab or model.vocab_size} tokens")
    fl = resolve_feature_layers(getattr(args, "feature_layers", "none"), model.num_layers)
    draft = DraftConfig(num_layers=args.draft_layers, fusion=args.draft_kind, draft_vocab_size=args.draft_vocab,
                        feature_layers=fl)
    draft.check_target(model)
    if args.draft_dtype is None:  # a calibration's runs drafted in f32: its factors are relative to that cost
        args.draft_dtype = "f32" if getattr(args, "calibrated_by", None) else "f16"
    engine = default_engine(hw) if args.cpu_engine == "auto" else args.cpu_engine
    lookup = getattr(args, "lookup", 0)
    wl = Workload(model, draft, TreeConfig(args.top_k, args.depth, args.total_tokens, lookup=lookup),
                  args.target_dtype, args.draft_dtype, args.prompt_len, args.new_tokens,
                  cpu_engine=None if engine == PROFILE_ENGINE else engine,
                  gpu_framework=None if args.gpu_framework == "profile" else args.gpu_framework)
    measured = None
    if args.measured:
        try:
            measured = json.loads(Path(args.measured).read_text())
        except (OSError, ValueError) as e:  # JSONDecodeError, UnicodeDecodeError
            raise ConfigError(f"cannot read measured timings {args.measured!r}: {e}") from None
    opts = SimOptions(cycles=args.cycles, seed=args.seed, ngl=args.ngl, spec_trees=args.spec_trees)
    with _text_file("--runs", args.runs):
        acc = build_acceptance(args)
    return hw, wl, acc, measured, opts


def build_calibration(args: argparse.Namespace, hw: Any, wl: Any, measured: Any) -> tuple[Any, Any]:
    """(cost factory, info) of `--calibrated-by RUNS`, or (None, None): the fitted factors `validate check` uses."""
    if getattr(args, "calibrated_by", None) is None:
        return None, None
    from simulator.validate import CALIBRATION_DTYPE, calibration_from_file

    for flag, dtype in (("--target-dtype", wl.target_dtype), ("--draft-dtype", wl.draft_dtype)):
        if dtype != CALIBRATION_DTYPE:
            raise ConfigError(f"--calibrated-by: the runs were measured with {CALIBRATION_DTYPE} target and draft; "
                              f"{flag} {dtype} is not what they calibrate")
    with _text_file("--calibrated-by", args.calibrated_by):
        return calibration_from_file(args.calibrated_by, hw, wl.model, measured, args.calibrate, wl.cpu_engine)


def _fmt_pred(p: Any) -> str:
    split = ", ".join(f"{k} {v * 1e3:.2f}" for k, v in p.split_s_per_token.items())
    util = ", ".join(f"{k} {v:.0%}" for k, v in p.utilisation.items())
    sp = f"  x{p.speedup:.2f}" if p.speedup is not None else ""
    lines = [f"{p.schedule:<19} {p.tokens_per_s:10.3f} tok/s{sp}  tau {p.tau:.2f}  VRAM {p.vram_bytes / 2**30:.2f} GiB"
             f"  host {p.host_bytes / 2**30:.2f} GiB  prefill {p.prefill_s:.3f} s",
             f"{'':<19} ms/token: {split}",
             f"{'':<19} utilisation: {util}"]
    lines += [f"{'':<19} note: {n}" for n in p.notes]
    return "\n".join(lines)


def cmd_simulate(args: argparse.Namespace) -> int:
    from simulator import schedules as S
    from simulator import tune as T

    hw, wl, acc, measured, opts = build_inputs(args)
    factory, calib = build_calibration(args, hw, wl, measured)
    if calib is not None and not args.json:
        f = calib["factors"]
        print(f"calibrated by {calib['runs']} on {', '.join(calib['calibration'])}: target "
              + ", ".join(f"n={n} x{x:.2f}" for n, x in f["target"])
              + f"; draft x{f['draft']:.2f}, host x{f['host']:.2f}, transfer x{f['transfer']:.2f}")
    if args.validate:
        from simulator.validate import validate_file

        with _text_file("--validate", args.validate):
            report = validate_file(args.validate, hw, wl.model, measured, calibrate=args.calibrate)
        _write(RESULTS / "sim_validation.json" if args.out is None else args.out,  # the same JSON, atomically
               {k: v for k, v in report.items() if k != "text"})
        print(json.dumps(report["summary"], indent=1) if args.json else report["text"])
        return 0
    if args.tune:
        if acc is None:
            from simulator.acceptance import ProfileAcceptance, default_profile

            name = default_profile(args.model)
            if name is None:
                raise ConfigError(f"--tune needs an acceptance model: no shipped profile for {args.model!r}; pass "
                                  "--acceptance-profile, --rank-probs, --runs, --alpha or --tau")
            acc = ProfileAcceptance(name)
        grid = T.parse_grid(args.sweep) if args.sweep else None
        res = T.tune(hw, wl, acc, args.vram_budget, grid, opts, measured, cost_factory=factory)
        if calib is not None:
            res["calibration"] = calib
        _write(args.out, res)
        if args.json:
            print(json.dumps(res, indent=1))
        else:
            b = res["best"]
            keys = [k for k in ("schedule", "top_k", "depth", "total_tokens", "lookup", "draft_layers", "ngl")
                    if k in b]
            print(f"best of {res['feasible']}/{res['evaluated']} feasible configurations on {hw.name} "
                  f"(VRAM budget {res['vram_budget_gib']:.2f} GiB):")
            for r in res["top"]:
                print("  " + "  ".join(f"{k}={r[k]}" for k in keys) + f"  -> {r['tokens_per_s']:.3f} tok/s "
                      f"x{r['speedup']:.2f}  tau {r['tau']:.2f}  VRAM {r['vram_gib']:.2f} GiB")
            print(f"acceptance: {res['acceptance']}")
            for n in res["notes"]:
                print("note: " + n)
        return 0
    if args.sweep is not None:
        if not args.sweep:
            raise ConfigError("empty sweep: give at least one key=v1,v2 item after --sweep")
        grid = T.parse_grid(args.sweep)
        rows = T.sweep(hw, wl, acc, grid, args.schedule if args.schedule != "all" else "dovetail", opts, measured,
                       factory)
        _write(args.out, {"profile": hw.name, "model": wl.model.name, "rows": rows,
                          **({"calibration": calib} if calib else {})})
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            keys = list(grid)
            for r in rows:
                head = "  ".join(f"{k}={r[k]}" for k in keys)
                print(f"{head}  -> {r['tokens_per_s']:.3f} tok/s x{r['speedup']:.2f}" if r["feasible"]
                      else f"{head}  -> {r['reason']}")
        return 0
    if args.schedule == "all":
        results = S.compare(hw, wl, acc, measured, opts, cost_factory=factory)
    else:
        p = S.simulate(args.schedule, hw, wl, acc, measured, opts, factory)
        base = S.simulate("target-cpu", hw, wl, None, measured, opts, factory)
        p.speedup = p.tokens_per_s / base.tokens_per_s
        results = [p]
    payload = [r if isinstance(r, str) else r.to_json() for r in results]
    _write(args.out, {"profile": hw.name, "model": wl.model.name, "results": payload,
                      **({"calibration": calib} if calib else {})})
    if args.json:
        print(json.dumps(payload, indent=1))
    else:
        print(f"{hw.name}: {wl.model.name} ({wl.target_dtype}, engine {wl.cpu_engine or 'profile'}) on the CPU; "
              f"draft {wl.draft.fusion} "
              f"{wl.draft_layers} layer(s) ({wl.draft_dtype}); tree top_k={wl.tree.top_k} depth={wl.tree.depth} "
              f"total_tokens={wl.tree.total_tokens}"
              + (f" + lookup {wl.tree.lookup}" if wl.tree.lookup else "")
              + f"; prompt {wl.prompt_len}, {wl.new_tokens} new tokens")
        if acc is not None:
            print(f"acceptance: {acc.describe()}")
        for r in results:
            print(r if isinstance(r, str) else _fmt_pred(r))
    return 0


def _write(out: str | Path | None, data: Any) -> None:
    """Write the result JSON whole or not at all (a temporary file and a rename: an interrupted or failed run
    leaves an existing file byte-identical)."""
    if out is not None:
        from simulator.files import write_json

        write_json(out, data)


OPS_OUT = Path("op_timings.json")  # profile-hw --ops-out default


def cmd_profile_hw(args: argparse.Namespace) -> int:
    from simulator.profile import ProfileOptions, run

    if args.ops is None and (args.ops_out is not None or args.draft_layers is not None or args.top_k is not None):
        raise ConfigError("--ops-out, --draft-layers and --top-k only apply with --ops MODEL")
    if args.ops is not None:  # an unknown model is named now, not after the minute of measuring
        from simulator.workload import resolve_model

        model = resolve_model(args.ops)
        if args.draft_layers is not None and args.draft_layers > model.num_layers:
            raise ConfigError(f"--draft-layers {args.draft_layers}: {model.name} has only {model.num_layers} layers")
        if args.ops_out is None:  # the default, checked like a given path
            try:
                args.ops_out = output_file(str(OPS_OUT))
            except argparse.ArgumentTypeError as e:
                raise ConfigError(f"--ops-out: {e}") from None
    return run(ProfileOptions(out=args.out, quick=args.quick, ops=args.ops, ops_out=args.ops_out or OPS_OUT,
                              draft_layers=args.draft_layers or 1, top_k=args.top_k or 10))


def cmd_plot(args: argparse.Namespace) -> int:
    from simulator.plots import main as plots_main

    return plots_main(args)


def add_simulate_args(p: argparse.ArgumentParser) -> None:
    from simulator.schedules import SCHEDULES  # light: no numpy, no JAX
    from simulator.workload import MAX_GUESSES, PAPER_TREE

    g = p.add_argument_group("machine")
    g.add_argument("--profile", type=input_path, default="host-2core-shared",
                   help="preset name or profile JSON (dovetail profile-hw)")
    # every number is checked here (0 is an error, never "use the default"): a what-if must not silently be the base
    g.add_argument("--pcie-gen", type=positive_int, help="what-if: PCIe generation of the link")
    g.add_argument("--lanes", type=positive_int, help="what-if: PCIe lanes")
    g.add_argument("--link-gbps", type=positive_float, help="what-if: link bandwidth in GB/s (overrides gen/lanes)")
    g.add_argument("--vram-gb", type=positive_float, help="what-if: GPU memory in GiB")
    g = p.add_argument_group("model and draft")
    g.add_argument("--model", default="smollm2-135m", help="public config name (smollm2-135m, llama2-7b, ...)")
    g.add_argument("--target-dtype", default="f32",
                   help="target weights on the CPU: f32, bf16, f16, int8 (torch dynamic), q8_0, q4_0, q4_k, q4_k_m "
                        "(llama.cpp); the engine refuses a dtype it has no real path for")
    g.add_argument("--cpu-engine", default="auto",
                   help="what runs the target on the CPU: dovetail-jax, hf-torch, llama.cpp (simulator/data/"
                        "cpu_engines.json), or profile (the profile's own efficiency fields); auto = profile for a "
                        "`profile-hw` measurement, else dovetail-jax")
    g.add_argument("--gpu-framework", default="profile",
                   help="what runs on the GPU: torch-eager (host calls counted in the HF/EAGLE code x a measured "
                        "host time per call, overlapped with the GPU), cuda-graph (no per-op host work; "
                        "simulator/data/gpu_frameworks.json), or profile (only the profile's gpu.layer_s, which a "
                        "framework replaces)")
    g.add_argument("--draft-dtype", default=None,
                   help="draft (and GPU-resident target layers) dtype (f16; f32 with --calibrated-by)")
    g.add_argument("--draft-layers", type=positive_int, default=1)
    g.add_argument("--draft-vocab", type=positive_int, default=None, help="reduced draft-head vocabulary V'")
    g.add_argument("--draft-kind", default="dgf", choices=("dgf", "eagle", "none"),
                   help="draft fusion: dgf (Dovetail), eagle (EAGLE's fc), none (a standalone LLaMA draft)")
    g.add_argument("--feature-layers", type=feature_layers, default="none", metavar="L",
                   help="target features the draft reads: none (the final-norm feature, default), eagle3 (3 blocks: "
                        "3x the feature bytes to the draft, and their projection) or block indices like 2,15,27")
    g.add_argument("--top-k", type=positive_int, default=PAPER_TREE.top_k)
    g.add_argument("--depth", type=positive_int, default=PAPER_TREE.depth)
    g.add_argument("--total-tokens", type=positive_int, default=PAPER_TREE.total_tokens)
    g.add_argument("--lookup", type=nonneg_int, default=0, metavar="L",
                   help="prompt-lookup chain of L tokens (the library's default tree has 6; a chain cycle "
                        "verifies total_tokens + L): priced by --runs measured with that tree and chain, or by an "
                        "--acceptance-profile fitted with lookup (the smollm2-dgf1 ones: any tree and L)")
    g.add_argument("--prompt-len", type=positive_int, default=128)
    g.add_argument("--new-tokens", type=positive_int, default=256)
    g = p.add_argument_group("acceptance (one of)")
    g.add_argument("--tau", type=float, help="mean tokens per cycle incl. the bonus")
    g.add_argument("--alpha", help="per-depth acceptance rates, comma-separated (last one repeats)")
    g.add_argument("--rank-probs", help="P(target token = draft's rank-r candidate), comma-separated (tree-aware)")
    g.add_argument("--depth-decay", type=float, default=None,
                   help="with --rank-probs: factor per extra depth (default 1)")
    g.add_argument("--runs", type=input_file, help="JSON of measured `dovetail generate --json` runs (dovetail mode)")
    g.add_argument("--acceptance-profile", metavar="NAME",
                   help="a shipped tree-aware profile (simulator/data/acceptance_profiles.json), e.g. smollm2-dgf1, "
                        "eagle1-llama2-chat-7b-mtbench; --tune uses the model's default profile when none is given")
    g = p.add_argument_group("simulation")
    g.add_argument("--schedule", default="all", choices=("all", *SCHEDULES))
    g.add_argument("--measured", type=input_file,
                   help="JSON table of measured per-operation timings (profile-hw --ops)")
    g.add_argument("--ngl", type=int_range(-1, INT_LIMIT), default=-1,
                   help="target layers on the GPU (partial: -1 = max; dovetail: 0)")
    g.add_argument("--spec-trees", type=int_range(0, MAX_GUESSES), default=0,
                   help=f"pipelined: speculative trees per cycle, 0..{MAX_GUESSES} (0 = auto)")
    g.add_argument("--cycles", type=positive_int, default=2000)
    g.add_argument("--seed", type=seed_int, default=0)
    g.add_argument("--json", action="store_true", help="machine-readable output")
    g.add_argument("--out", type=output_file, help="also write the JSON result here (checked before simulating)")
    g = p.add_argument_group("exploration")
    g.add_argument("--sweep", nargs="*", metavar="KEY=V1,V2", help="grid, e.g. total_tokens=4,8,16 depth=3:7")
    g.add_argument("--tune", action="store_true", help="best configuration (grid: --sweep or a default tree grid)")
    g.add_argument("--vram-budget", type=positive_float,
                   help="--tune: GiB of VRAM the draft (and target layers) may use")
    g.add_argument("--validate", type=input_file,
                   help="runs JSON (simulator.validate collect): predict and compare tokens/s")
    g.add_argument("--calibrated-by", type=input_file, metavar="RUNS",
                   help="runs JSON measured on this profile's machine (simulator.validate collect): fit cost factors "
                        "(target per token count, draft, host, transfer) on its calibration runs, exactly as "
                        "`python -m simulator.validate check` does, and use them for every prediction (single, "
                        "--sweep, --tune); needs f32 target and draft")
    g.add_argument("--calibrate", metavar="NAMES",
                   help="with --validate or --calibrated-by: comma-separated run names used for calibration "
                        "(default: t-fib-64,dt-r1-k4-d3-t8,dt-self-k4-d3-t8)")


def register(subparsers: Any) -> None:
    """Add `simulate`, `profile-hw` and `plot` to the project's argparse subparsers."""
    p = subparsers.add_parser("simulate", help="predict Dovetail and baseline speed on a hardware profile")
    add_simulate_args(p)
    p.set_defaults(func=cmd_simulate)

    p = subparsers.add_parser("profile-hw", help="measure this machine into a hardware profile JSON")
    # output paths are checked when parsed: a minute of measuring is never lost to an unwritable path
    p.add_argument("--out", type=output_file, default="hw_profile.json", help="profile JSON (hw_profile.json)")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (noisier)")
    p.add_argument("--ops", metavar="MODEL", help="also time target/draft ops at MODEL's shapes (synthetic weights)")
    p.add_argument("--ops-out", type=output_file, default=None, help="with --ops: timings JSON (op_timings.json)")
    p.add_argument("--draft-layers", type=positive_int, default=None, help="with --ops: draft layers timed (1)")
    p.add_argument("--top-k", type=int_range(1, 1024), default=None,
                   help="with --ops: tree top_k timed, 1..1024 (10)")
    p.set_defaults(func=cmd_profile_hw)

    p = subparsers.add_parser("plot", help="simulator figures (PNG + SVG) from analysis/results JSON")
    p.add_argument("figure", choices=("tree-size", "pcie", "vram", "split", "parity", "all"))
    p.add_argument("--recompute", action="store_true", help="recompute the figure's data JSON first")
    p.add_argument("--out-dir", type=output_dir, default=str(RESULTS.parent / "figures"),
                   help="where the PNG and SVG go (analysis/figures)")
    p.add_argument("--data-dir", type=output_dir, default=str(RESULTS),
                   help="where the figures' data JSON is read (and written by --recompute) (analysis/results)")
    p.set_defaults(func=cmd_plot)


def main(argv: list[str] | None = None) -> int:
    from dovetail_jax.errors import DovetailError

    parser = argparse.ArgumentParser(prog="python -m simulator.cli")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except DovetailError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
