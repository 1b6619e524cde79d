"""Fit the simulator's CPU-engine parameters (simulator/data/cpu_engines.json) from this machine's forward benches.

    dovetail bench forward --out analysis/results/bench_forward.json     # our engine, per T (quiet machine)
    python analysis/torch_linear_dtype_bench.py                         # torch int8 / bf16 vs f32 (ratios)
    python analysis/fit_cpu_engines.py                                  # -> simulator/data/cpu_engines.json
    python analysis/fit_cpu_engines.py --machine intel-xeon-2core       # -> ..._intel_xeon_2core.json
    python analysis/fit_cpu_engines.py --machine amd-epyc-2core-2       # -> ..._amd_epyc_2core_2.json

`--machine` picks the measurements and the preset (MACHINES below): the AMD EPYC VM the shared file was fitted
on (the default), the Intel Xeon VM of 2026-12-02, or the AMD EPYC VM as measured on 2026-12-03, whose engines run
at other fractions of the same measured DRAM read rate (their presets name their own engines files).

Every engine is fitted against the `host-2core-shared` preset (this machine: achieved read bandwidth and fp32
peak) with the simulator's own forward formula (`simulator.costs.RooflineCosts._engine_forward`), from quiet
measurements only (a per-T bench of the peers, analysis/engine_forward_bench.py, is distorted 10-100x when other
work loads the 2 cores: llama.cpp's spinning threads collapse): our engine from its per-T forward bench; llama.cpp
from its quiet decode step and two quiet prompt prefills (bench_target.json, bench_dovetail.json) and its F16 /
Q4_1 decode rates; HF from its quiet decode step plus this machine's BLAS-class GEMM measurements. Each number's
`source` in the output says which. Least squares on log time, grid + coordinate refinement (no scipy needed).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dovetail_jax.config import SMOLLM2_135M
from simulator.engines import ENGINES_FILE, parse_engine
from simulator.hardware import load_profile
from simulator.workload import DTYPE_BYTES

RESULTS = Path(__file__).resolve().parent / "results"
L = SMOLLM2_135M.num_layers


@dataclass(frozen=True)
class Machine:
    """One machine's quiet measurements and the preset the engines are fitted against."""

    profile: str
    bench_target: str  # `dovetail bench target`: the three engines' decode step
    bench_forward: str  # `dovetail bench forward`: our forward per T
    prefill_bench: str  # a `dovetail bench dovetail` run: llama.cpp's prompt prefills
    llama_formats: bool  # F16 / Q4_1 decode rates known (peers-and-limits §8.1, AMD); else llama.cpp's per-T forwards
    torch_gemm_gflops: float | None  # BLAS-class f32 GEMM, 2 threads; None: not measured, AMD's fraction of peak
    out: Path


MACHINES = {
    "amd-epyc-2core": Machine("host-2core-shared", "bench_target.json", "bench_forward.json", "bench_dovetail.json",
                              True, 243.0, ENGINES_FILE),
    # llama-cpp-python 0.3.36 segfaults in decode on the F16 and Q4_1 GGUFs on this VM (F32 runs): its per-T F32
    # forwards (bench forward) stand in for the formats
    "intel-xeon-2core": Machine("host-2core-intel-xeon", "bench_target_intel.json", "bench_forward_rerun5.json",
                                "bench_dovetail_full_r4_fused.json", False, None,
                                ENGINES_FILE.parent / "cpu_engines_intel_xeon_2core.json"),
    # the AMD EPYC VM as measured on 2026-12-03: same lscpu as the first, other rates (its own quiet runs, round 7)
    "amd-epyc-2core-2": Machine("host-2core-amd-epyc-2", "bench_target_amd.json", "bench_forward_amd_r7.json",
                                "bench_dovetail_full_r7_amd.json", False, None,
                                ENGINES_FILE.parent / "cpu_engines_amd_epyc_2core_2.json"),
}


def predict(hw: Any, eng: dict[str, float], path: dict[str, float], t: int, ctx: int, kv_bytes: float,
            head_rows: int | None = None) -> float:
    """The simulator's engine forward (`RooflineCosts._engine_forward`); head_rows = rows through the LM head."""
    m = SMOLLM2_135M
    h, v, lp = m.hidden_size, m.vocab_size, m.layer_params
    hr = t if head_rows is None else head_rows
    wbytes = (m.num_layers * lp + v * h) * path["bytes_per_weight"]
    kvbytes = m.num_layers * 2 * m.kv_size * (ctx + t) * kv_bytes
    macs = m.num_layers * (t * lp + 2 * t * (ctx + t) * m.q_size) + hr * v * h
    bw = min(hw.cpu.mem_bw * hw.cpu.bw_eff * eng["stream_frac"], hw.cpu.mem_bw)
    rate = hw.cpu.peak_flops * eng["gemm_frac"] * t / (t + eng["n_half"])
    return eng["call_s"] + m.num_layers * eng["layer_s"] + max(
        wbytes / (bw * path["stream_scale"]) + kvbytes / bw, 2 * macs * path["mac_cost"] / rate)


Point = tuple[int, int, int, float]  # tokens, context, LM-head rows, seconds


def _minimise(model: Any, pts: list[Point], grids: dict[str, list[float]],
              bounds: dict[str, tuple[float, float]], w1: float = 1.0) -> dict[str, float]:
    """Least squares on log time of model(params, tokens, context, head rows) over the points; single-token
    points weigh w1 (a decode step is the op a prediction uses most: T = 1 runs a GEMV path of its own)."""
    return _minimise_loss(lambda p: sum((w1 if t == 1 else 1.0) * (math.log(model(p, t, c, hr)) - math.log(sec)) ** 2
                                        for t, c, hr, sec in pts), grids, bounds)


def _minimise_loss(loss: Any, grids: dict[str, list[float]], bounds: dict[str, tuple[float, float]]
                   ) -> dict[str, float]:
    """Grid, then coordinate refinement (no scipy needed)."""
    keys = list(grids)
    best = min((dict(zip(keys, c, strict=True)) for c in itertools.product(*grids.values())), key=loss)
    step = {k: 0.25 for k in keys}
    for _ in range(300):
        improved = False
        for k in keys:
            for sgn in (-1, 1):
                cand = dict(best)
                cand[k] = min(max(best[k] * (1 + sgn * step[k]), bounds[k][0]), bounds[k][1])
                if loss(cand) < loss(best) - 1e-12:
                    best, improved = cand, True
        if not improved:
            step = {k: x / 2 for k, x in step.items()}
            if max(step.values()) < 1e-4:
                break
    return best


def _solve_scale(f: Any, target: float) -> float:
    """x > 0 with f(x) = target for f decreasing in x (bisection in log space)."""
    lo, hi = 1e-3, 1e3
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if f(mid) > target else (lo, mid)
    return math.sqrt(lo * hi)


def _json(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / name).read_text())


def _mf(section: str) -> str:
    return f"shared/reference/machine-facts.md {section}"


def fit(out: Path, mc: Machine = MACHINES["amd-epyc-2core"]) -> dict[str, Any]:
    PROFILE = mc.profile  # noqa: N806 - the preset's name, as in every source string below
    hw = load_profile(PROFILE)
    bt, bd, bf = _json(mc.bench_target), _json(mc.prefill_bench), _json(mc.bench_forward)
    f32 = {"bytes_per_weight": 4.0, "stream_scale": 1.0, "mac_cost": 1.0}
    ref = f"on the {PROFILE!r} preset (read {hw.cpu.mem_bw * hw.cpu.bw_eff / 1e9:.0f} GB/s, fp32 peak " \
          f"{hw.cpu.peak_flops / 1e9:.0f} GFLOP/s)"
    engines: dict[str, Any] = {}

    # --- dovetail-jax: our per-T forward (bench_forward.json, quiet machine), all four numbers fitted
    best: dict[int, float] = {}
    for r in bf["rows"]:
        best[r["tokens"]] = min(best.get(r["tokens"], math.inf), r["best_ms"] / 1e3)
    pts = [(t, 256, t, sec) for t, sec in sorted(best.items())]  # our loop attends over all 256 cache slots
    # + the quiet decode step of a whole generation loop (the op a prediction uses most), context 256 slots
    pts.append((1, 256, 1, 1.0 / bt["engines"]["dovetail_jax"]["decode_tok_s"]))

    def jax_model(p: dict[str, float], t: int, c: int, hr: int) -> float:
        return predict(hw, {**p, "layer_s": 0.0}, f32, t, c, 4.0, hr)

    pj = _minimise(jax_model, pts, {"stream_frac": [0.4, 0.7, 1.0], "gemm_frac": [0.1, 0.3, 0.6],
                                    "n_half": [1, 4, 16], "call_s": [1e-4, 1e-3, 3e-3]},
                   {"stream_frac": (0.05, 1.0), "gemm_frac": (0.01, 1.0), "n_half": (0.1, 256),
                    "call_s": (1e-6, 0.05)}, w1=4.0)
    dec_jax = bt["engines"]["dovetail_jax"]["decode_tok_s"]
    src = (f"fit to analysis/results/{mc.bench_forward} (f32, T = {min(best)}..{max(best)} at context 128 of 256 "
           f"slots) and the decode step of {mc.bench_target} ({dec_jax:.1f} tok/s), single-token points weighted 4x "
           f"{ref}")
    engines["dovetail-jax"] = {
        "description": "this project: XLA CPU, one jit per forward, f32 weights, the whole preallocated KV cache "
                       "attended (masked)",
        **{k: {"value": round(pj[k], 6), "source": src} for k in ("stream_frac", "gemm_frac", "n_half", "call_s")},
        "layer_s": {"value": 0.0, "source": "the whole forward is one jit call: no per-layer dispatch"},
        "kv_bytes": {"value": 4.0, "source": "f32 KV cache"},
        "dtypes": {"f32": {**f32, "source": "reference path"}},
        "not_offered": {"bf16": "bf16 weights are 3-5x slower than f32 on XLA CPU (" + _mf("§2.5") + ")"},
        "fit": {"points": pts, "predicted_s": [jax_model(pj, t, c, hr) for t, c, hr, _ in pts]}}

    # --- llama.cpp: quiet decode of the same weights in F32 / F16 / Q4_1 (one bandwidth, one per-token overhead)
    #     and two quiet prompt prefills (the GEMM rate); 2 threads
    lc = bt["engines"]["llama_cpp_f32"]
    ctx1 = int(bt["prompt"]["tokens"]) + 64
    npar = SMOLLM2_135M.num_params
    dec = [(4.0, 1.0 / lc["decode_tok_s"], f"F32 {lc['decode_tok_s']:.1f} tok/s ({mc.bench_target})")]
    if mc.llama_formats:
        dec += [(270885952 / npar, 1.0 / 111.5, "F16 111.5 tok/s (peers-and-limits.md §8.1)"),
                (98362432 / npar, 1.0 / 137.7, "Q4_1 137.7 tok/s (peers-and-limits.md §8.1)")]
    pts = [(1, ctx1, 1, sec) for _, sec, _ in dec]
    for ds in ("humaneval", "mtbench"):
        n = statistics.mean(p["prompt_tokens"] for p in bd["prompts"][ds])
        r = bd["results"][ds]["llama_cpp_f32"]
        pts.append((round(n), 0, 1, r["prefill_s"] / r["n_prompts"]))
    nbytes = [b for b, _, _ in dec] + [4.0, 4.0]
    if not mc.llama_formats:  # F32 forwards over T = 1..16 tokens at context 128, logits for all T
        lrows = bf["llama_cpp"]["rows"]
        pts += [(r["tokens"], int(bf["context"]), r["tokens"], r["best_ms"] / 1e3) for r in lrows]
        nbytes += [4.0] * len(lrows)

    def lc_model(p: dict[str, float], t: int, c: int, hr: int, nb: float = 4.0) -> float:
        return predict(hw, {**p, "layer_s": 0.0}, {**f32, "bytes_per_weight": nb}, t, c, 2.0, hr)

    def loss_points(p: dict[str, float]) -> float:
        return sum((math.log(lc_model(p, t, c, hr, nb)) - math.log(sec)) ** 2
                   for (t, c, hr, sec), nb in zip(pts, nbytes, strict=True))

    pl = _minimise_loss(loss_points, {"stream_frac": [0.5, 1.0, 1.5], "gemm_frac": [0.3, 0.6],
                                      "n_half": [0.5, 2, 8], "call_s": [1e-3, 5e-3]},
                        {"stream_frac": (0.05, 1.0), "gemm_frac": (0.01, 1.0), "n_half": (0.05, 64),
                         "call_s": (1e-6, 0.02)})
    n_pf = {ds: bd["results"][ds]["llama_cpp_f32"]["n_prompts"] for ds in ("humaneval", "mtbench")}
    prefills = (f"the mean prompt prefill of {n_pf['humaneval']} HumanEval / {n_pf['mtbench']} MT-bench prompts "
                f"({mc.prefill_bench})")
    if mc.llama_formats:
        src = ("fit to 5 quiet measurements of the same weights: decode of the F32, F16 and Q4_1 GGUFs (one "
               f"bandwidth, one per-token overhead: {'; '.join(d[2] for d in dec)}) and {prefills} {ref}")
        peers = "the formats' decode rates fit one streaming rate within the errors in 'fit' (F32/F16/Q4_1)"
    else:
        src = (f"fit to quiet F32 measurements: the decode step ({dec[0][2]}), forwards of T = 1..16 tokens at context "
               f"128 ({mc.bench_forward}) and {prefills} {ref}; llama-cpp-python 0.3.36 segfaults in decode on the "
               "F16 and Q4_1 GGUFs on this machine, so no second format separates the per-token overhead")
        peers = "not measured on this machine (F16 decode segfaults here)"
    no_mac = "mac_cost 1 (as F32): no multi-token measurement of this format on this machine"
    engines["llama.cpp"] = {
        "description": "llama.cpp (ggml CPU backend, llama-cpp-python 0.3.36, all cores): GGUF weights, F16 KV "
                       "cache, quantised dot products with Q8 activations; call_s includes llama-cpp-python's "
                       "per-token Python and sampling",
        **{k: {"value": round(pl[k], 6), "source": src} for k in ("stream_frac", "gemm_frac", "n_half", "call_s")},
        "layer_s": {"value": 0.0, "source": "one graph per forward: no per-layer dispatch"},
        "kv_bytes": {"value": 2.0, "source": "F16 KV cache (llama.cpp default)"},
        "dtypes": {
            "f32": {**f32, "source": "reference path"},
            **{dt: {"bytes_per_weight": round(DTYPE_BYTES[dt], 4), "stream_scale": 1.0, "mac_cost": 1.0,
                    "source": f"{peers}; {no_mac}" if dt == "f16" else
                    f"not measured here: streamed like the measured F32 / F16 / Q4_1 (one rate fits all three); "
                    f"{no_mac}"}
               for dt in ("f16", "bf16", "q8_0", "q5_0", "q4_0", "q4_k", "q4_k_m", "q4")}},
        "not_offered": {"int8": "llama.cpp has no 'int8' type: use q8_0"},
        "fit": {"points": pts, "bytes_per_weight": nbytes,
                "predicted_s": [lc_model(pl, t, c, hr, nb) for (t, c, hr, _), nb in zip(pts, nbytes, strict=True)]}}
    n_half_blas = 8.0

    # --- hf-torch: quiet decode (bench_target) gives the per-layer eager overhead; BLAS-class compute
    hf = bt["engines"]["hf_transformers"]
    t1 = 1.0 / hf["decode_tok_s"]
    amd_gemm_frac = 243.0 / load_profile(MACHINES["amd-epyc-2core"].profile).cpu.peak_flops * 1e9
    gemm_hf = amd_gemm_frac if mc.torch_gemm_gflops is None else mc.torch_gemm_gflops / hw.cpu.peak_flops * 1e9
    gemm_src = (f"BLAS-class f32 GEMM on this machine: {mc.torch_gemm_gflops:g} GFLOP/s at 2048^2, 2 threads "
                f"({_mf('§7.1')}) / the preset's peak" if mc.torch_gemm_gflops is not None else
                "not measured on this machine: the AMD VM's fraction of its peak (243 GFLOP/s at 2048^2, "
                f"{_mf('§7.1')}); decode predictions do not use it")
    base = {"stream_frac": pl["stream_frac"], "gemm_frac": gemm_hf, "n_half": n_half_blas, "call_s": 0.0,
            "layer_s": 0.0}
    layer_s = (t1 - predict(hw, base, f32, 1, ctx1, 4.0)) / L
    tl = _json("bench_torch_linear_dtypes.json")
    ratio = tl["ratio_to_f32_best"]
    lin = ("analysis/results/bench_torch_linear_dtypes.json: one 4096x11008 Linear out of cache, formats "
           "alternated; T=1 time {r:.2f}x f32 for {b:g}x the bytes (ratio measured under load: absolute times "
           "were not usable)")
    eng_hf = {**base, "layer_s": layer_s}
    engines["hf-torch"] = {
        "description": "HF transformers (PyTorch eager, oneDNN/MKL/fbgemm kernels): Python op dispatch in every "
                       "decoder layer; the Dovetail reference code's CPU path",
        "stream_frac": {"value": round(pl["stream_frac"], 6),
                        "source": "assumption, as llama.cpp's: HF's decode here is dominated by dispatch, so no quiet "
                                  "measurement separates its weight streaming; MKL/oneDNN GEMV is a streaming kernel"},
        "gemm_frac": {"value": round(gemm_hf, 6), "source": gemm_src},
        "n_half": {"value": n_half_blas, "source": f"BLAS-class small-M GEMM ({_mf('§7.2')})"},
        "call_s": {"value": 0.0, "source": "folded into layer_s"},
        "layer_s": {"value": round(layer_s, 6),
                    "source": f"decode 1/{hf['decode_tok_s']:.2f} s per token ({mc.bench_target}, quiet) minus the "
                              f"predicted weight read, over {L} layers: eager per-op dispatch"},
        "kv_bytes": {"value": 4.0, "source": "f32 KV cache"},
        "dtypes": {
            "f32": {**f32, "source": "reference path"},
            "int8": {"bytes_per_weight": 1.0, "stream_scale": round(0.25 / ratio["int8"]["1"], 4), "mac_cost": 1.0,
                     "source": lin.format(r=ratio["int8"]["1"], b=0.25) + "; torch.ao quantize_dynamic (fbgemm), the "
                               "Dovetail laptop's path; mac_cost not measured (1 = as f32)"},
            "bf16": {"bytes_per_weight": 2.0, "stream_scale": round(0.5 / ratio["bf16"]["1"], 4), "mac_cost": 1.0,
                     "source": lin.format(r=ratio["bf16"]["1"], b=0.5) + "; mac_cost not measured (1 = as f32)"}},
        "not_offered": {"q4_0": "no GGUF block formats in PyTorch eager", "q8_0": "use int8 (dynamic)"},
        "fit": {"points": [(1, ctx1, 1, t1)], "predicted_s": [predict(hw, eng_hf, f32, 1, ctx1, 4.0)]}}
    for name, e in engines.items():
        parse_engine(name, e)  # what the simulator will load must validate
    result = {"schema": "dovetail.sim.cpu_engines/1",
              "about": "Per-engine efficiency of a target forward on a CPU (see simulator/engines.py), fitted on the "
                       f"team's 2-core machine against the {PROFILE!r} preset by `python analysis/fit_cpu_engines.py` "
                       "from quiet measurements only; refit after an engine changes (e.g. faster f32 matmuls: rerun "
                       "`dovetail bench forward`, then this script). Transfer to other CPUs is checked, not fitted, "
                       "by analysis/compare_published.py.",
              "profile": PROFILE, "engines": engines}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--machine", choices=sorted(MACHINES), default="amd-epyc-2core",
                    help="whose measurements and preset (default: the AMD EPYC VM of the shared engines file)")
    ap.add_argument("--out", help="default: the machine's engines file under simulator/data")
    args = ap.parse_args(argv)
    mc = MACHINES[args.machine]
    res = fit(Path(args.out) if args.out else mc.out, mc)
    for n, e in res["engines"].items():
        errs = [p / pt[3] - 1 for pt, p in zip(e["fit"]["points"], e["fit"]["predicted_s"], strict=True)]
        print(f"{n:<13} stream {e['stream_frac']['value']:.3f} gemm {e['gemm_frac']['value']:.3f} n_half "
              f"{e['n_half']['value']:.2f} call {e['call_s']['value'] * 1e3:.2f} ms layer "
              f"{e['layer_s']['value'] * 1e3:.3f} ms; f32 fit errors " + " ".join(f"{x:+.0%}" for x in errs))
        print("   " + ", ".join(f"{dt} {d['stream_scale']:.2f}" for dt, d in e["dtypes"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
