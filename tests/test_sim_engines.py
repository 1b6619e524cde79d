"""CPU engines (--cpu-engine), named acceptance profiles and the tau-only tuner, against closed forms."""

from __future__ import annotations

import json

import pytest
from dovetail_helpers import analysis_script

from dovetail_jax.config import LLAMA2_7B, SMOLLM2_135M, DraftConfig, TreeConfig
from simulator import cli
from simulator.acceptance import (
    MixtureAcceptance,
    PositionalAcceptance,
    ProfileAcceptance,
    TauAcceptance,
    default_profile,
    list_profiles,
)
from simulator.costs import RooflineCosts
from simulator.engines import ENGINES_FILE, engine_names, resolve_engine
from simulator.errors import ConfigError
from simulator.hardware import PRESET_DIR, default_engine, list_presets, load_profile, parse_profile
from simulator.schedules import SimOptions, simulate
from simulator.tune import tune
from simulator.workload import DTYPE_BYTES, Workload


def _fast_cpu_profile(bw: float = 100e9) -> object:
    """A preset with an enormous FLOP rate, so a decode step is bandwidth + overhead only."""
    raw = json.loads((PRESET_DIR / "desktop-13900k-4090.json").read_text())
    raw["cpu"]["peak_flops"] = 1e18
    raw["cpu"]["mem_bw"] = bw
    raw["cpu"]["bw_eff"] = 1.0
    return parse_profile(raw)


def test_engine_file_loads_with_a_source_for_every_number() -> None:
    raw = json.loads(ENGINES_FILE.read_text())
    assert engine_names()[0] == "profile" and {"dovetail-jax", "hf-torch", "llama.cpp"} <= set(engine_names())
    for name, e in raw["engines"].items():
        for k in ("stream_frac", "gemm_frac", "n_half", "call_s", "layer_s", "kv_bytes"):
            assert e[k]["source"], (name, k)
        for dt, d in e["dtypes"].items():
            assert d["source"], (name, dt)
    assert resolve_engine("profile") is None and resolve_engine(None) is None
    with pytest.raises(ConfigError, match="unknown cpu engine 'nope'; choose from profile"):
        resolve_engine("nope")


@pytest.mark.parametrize("engine,dtype", [("hf-torch", "q4_0"), ("dovetail-jax", "int8"), ("llama.cpp", "int8")])
def test_engine_refuses_a_dtype_it_has_no_path_for(engine: str, dtype: str) -> None:
    with pytest.raises(ConfigError, match=f"no real path for target dtype '{dtype}'"):
        Workload(LLAMA2_7B, target_dtype=dtype, cpu_engine=engine)


def test_decode_step_is_weight_bytes_over_engine_bandwidth() -> None:
    """FLOPs free: one token costs call_s + layers x layer_s + (weights + KV) / (BW x stream_frac x scale)."""
    hw = _fast_cpu_profile(bw=100e9)
    for engine, dtype in (("llama.cpp", "q4_0"), ("llama.cpp", "q8_0"), ("hf-torch", "f32"), ("hf-torch", "int8")):
        eng = resolve_engine(engine)
        path = eng.path(dtype)
        wl = Workload(LLAMA2_7B, target_dtype=dtype, cpu_engine=engine)
        m = LLAMA2_7B
        weights = (m.num_layers * m.layer_params + m.vocab_size * m.hidden_size) * path.bytes_per_weight
        kv = m.num_layers * 2 * m.kv_size * (100 + 1) * eng.kv_bytes
        bw = min(100e9 * eng.stream_frac, 100e9)
        want = eng.call_s + m.num_layers * eng.layer_s + weights / (bw * path.stream_scale) + kv / bw
        assert RooflineCosts(hw, wl).target_cpu(1, 100) == pytest.approx(want, rel=1e-9), (engine, dtype)


def test_quantised_weights_are_read_not_costed_as_f32() -> None:
    """Same engine, bandwidth-bound: the time ratio of two formats is their bytes ratio over their streaming."""
    hw = _fast_cpu_profile(bw=50e9)
    lc = resolve_engine("llama.cpp")

    def t(dtype: str) -> float:
        return RooflineCosts(hw, Workload(LLAMA2_7B, target_dtype=dtype, cpu_engine="llama.cpp")).target_cpu(1, 0)

    q4, q8 = lc.path("q4_0"), lc.path("q8_0")
    ratio = (DTYPE_BYTES["q8_0"] / q8.stream_scale) / (DTYPE_BYTES["q4_0"] / q4.stream_scale)
    assert (t("q8_0") - lc.call_s) / (t("q4_0") - lc.call_s) == pytest.approx(ratio, rel=0.01)  # KV is ~0.3% here


def test_default_engine_keeps_the_profiles_own_costs() -> None:
    """No engine = today's roofline from the profile's own efficiencies (what validation calibrates)."""
    hw = load_profile("host-2core-shared")
    wl = Workload(SMOLLM2_135M, prompt_len=8, new_tokens=8)
    assert wl.cpu_engine is None and RooflineCosts(hw, wl).engine is None
    c = hw.cpu
    nbytes = 4 * (SMOLLM2_135M.num_params - 576) + 30 * 2 * 192 * 4
    assert RooflineCosts(hw, wl).target_cpu(1, 0) == pytest.approx(
        c.dispatch_s + max(nbytes / (c.mem_bw * c.bw_eff), 2 * 134e6 / (c.peak_flops * c.flops_eff / (1 + c.n_half))),
        rel=0.01)
    measured = load_profile("analysis/results/hw_profile_this_machine.json")
    assert default_engine(measured) == "profile"
    assert all(default_engine(load_profile(p)) == "dovetail-jax" for p in list_presets())


def test_engines_rank_as_measured_on_this_machine() -> None:
    """SmolLM2-135M f32 on the 2-core preset: HF < ours < llama.cpp (26 / 73 / 86 tok/s measured)."""
    hw = load_profile("host-2core-shared")
    tps = {e: simulate("target-cpu", hw, Workload(SMOLLM2_135M, prompt_len=16, new_tokens=64, cpu_engine=e),
                       opts=SimOptions()).tokens_per_s for e in ("hf-torch", "dovetail-jax", "llama.cpp")}
    assert tps["hf-torch"] < tps["dovetail-jax"] < tps["llama.cpp"]


def test_cli_cpu_engine_errors_are_one_line(capsys) -> None:  # noqa: ANN001
    for argv in (["simulate", "--cpu-engine", "hf-torch", "--target-dtype", "q4_0", "--tau", "2"],
                 ["simulate", "--cpu-engine", "nope", "--tau", "2"],
                 ["simulate", "--acceptance-profile", "nope"]):
        rc = cli.main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, (argv, err)


# ---- acceptance ------------------------------------------------------------------------------------------------


def test_mixture_is_the_weighted_mix_of_its_components() -> None:
    a = PositionalAcceptance([0.8, 0.1], 0.95)
    b = PositionalAcceptance([0.3, 0.2, 0.1], 0.8)
    tree = TreeConfig(4, 3, 8)
    only_a = MixtureAcceptance([a, b], [1.0, 0.0]).outcomes(tree)
    assert only_a.p_a == pytest.approx(a.outcomes(tree).p_a)
    mix = MixtureAcceptance([a, b], [0.3, 0.7]).outcomes(tree)
    assert mix.tau == pytest.approx(0.3 * a.outcomes(tree).tau + 0.7 * b.outcomes(tree).tau)
    assert mix.p_a.sum() == pytest.approx(1.0) and mix.cls_p.sum() == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="sum to 1"):
        MixtureAcceptance([a, b], [0.5, 0.4])


def test_shipped_profiles_are_tree_aware_and_match_their_runs() -> None:
    names = list_profiles()
    assert "smollm2-dgf1" in names and default_profile("smollm2-135m") == "smollm2-dgf1"
    assert default_profile("llama2-7b") in names
    for n in names:
        acc = ProfileAcceptance(n)
        assert acc.tree_aware
        for c in acc.info["check"]:  # the profile reproduces the tau of every run it was fitted on
            assert acc.outcomes(TreeConfig(*c["tree"])).tau == pytest.approx(c["measured_tau"], rel=0.12), (n, c)
    # a wider tree accepts more than a chain of the same depth (what a tau cannot say)
    dgf1 = ProfileAcceptance("smollm2-dgf1")
    assert dgf1.outcomes(TreeConfig(10, 3, 12)).tau > dgf1.outcomes(TreeConfig(1, 3, 5)).tau


def test_tune_with_tau_only_tunes_chain_depth_or_refuses() -> None:
    hw = load_profile("host-2core-shared")
    wl = Workload(SMOLLM2_135M, DraftConfig(1, draft_vocab_size=8192), prompt_len=32, new_tokens=64)
    res = tune(hw, wl, TauAcceptance(1.8), opts=SimOptions(cycles=200))
    assert all(r["top_k"] == 1 and r["total_tokens"] == r["depth"] + 2 for r in res["top"])
    assert "ignores tree width" in res["notes"][0]
    with pytest.raises(ConfigError, match="cannot rank top_k"):
        tune(hw, wl, TauAcceptance(1.8), grid={"top_k": [2, 4], "depth": [3]}, opts=SimOptions(cycles=100))


def test_tune_tries_lookup_chains_when_the_profile_prices_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default draft's profile prices prompt lookup, so the default grid gains chain lengths; a sweep point
    keeps the workload's draft (its feature layers too) and sets the chain."""
    from simulator import tune as T

    monkeypatch.setattr(T, "DEFAULT_TUNE_GRID", {"top_k": [4], "depth": [3], "total_tokens": [6],
                                                 "schedule": ["dovetail"]})
    hw = load_profile("host-2core-amd-epyc-2")
    draft = DraftConfig(1, draft_vocab_size=8192, feature_layers=(2, 15, 27))
    wl = Workload(SMOLLM2_135M, draft, prompt_len=128, new_tokens=128, draft_dtype="int8")
    prof = ProfileAcceptance("smollm2-dgf1-humaneval")
    res = tune(hw, wl, prof, opts=SimOptions(cycles=500))
    assert res["evaluated"] == len(T.TUNE_LOOKUP) and {r["lookup"] for r in res["top"]} <= set(T.TUNE_LOOKUP)
    assert res["best"]["lookup"] > 0 and "chain model" in res["notes"][0]  # on code, chains pay here
    plain = MixtureAcceptance(prof.components, prof.weights)  # the same classes without the lookup fit
    no_chain = tune(hw, wl, plain, opts=SimOptions(cycles=500))
    assert no_chain["evaluated"] == 1 and "lookup" not in no_chain["best"]
    _, point_wl, _, _ = T.apply_point(hw, wl, SimOptions(), {"lookup": 8, "depth": 4}, "dovetail")
    assert point_wl.tree == TreeConfig(wl.tree.top_k, 4, wl.tree.total_tokens, lookup=8)
    assert point_wl.draft.feature_layers == (2, 15, 27)


def test_tune_with_the_default_profile_picks_the_measured_best_tree() -> None:
    """The seven trees benched with the shipped round-4 draft on this machine (analysis/results/
    bench_tree_sweep_r4.json, decode tok/s): HumanEval 3/3/5 78.8, 4/3/6 78.7, 2/2/4 76.9 (within 2.5%), then
    4/4/8 72.8, 6/4/10 70.7, 5/3/8 69.3, 4/2/8 68.8; MT-bench 3/3/5 62.8, 2/2/4 62.4, 4/3/6 61.3 (within 2.5%),
    then 4/2/8 57.5, 5/3/8 57.3, 4/4/8 56.6, 6/4/10 54.1. The default profile of each set + our engine must pick
    one of the measured leading three and price the largest tree below every leader."""
    hw = load_profile("host-2core-shared")
    trees = ((3, 3, 5), (4, 3, 6), (2, 2, 4), (4, 4, 8), (6, 4, 10), (5, 3, 8), (4, 2, 8))
    for ds, prompt_len in (("humaneval", 150), ("mtbench", 65)):
        wl = Workload(SMOLLM2_135M, DraftConfig(1, draft_vocab_size=8192), prompt_len=prompt_len, new_tokens=128,
                      cpu_engine="dovetail-jax")
        acc = ProfileAcceptance(f"{default_profile('smollm2-135m')}-{ds}")
        tps = {}
        for k, d, t in trees:
            best = tune(hw, wl, acc, grid={"top_k": [k], "depth": [d], "total_tokens": [t], "schedule": ["dovetail"]},
                        opts=SimOptions(cycles=3000))["best"]
            tps[(k, d, t)] = best["tokens_per_s"]
        leaders = {(3, 3, 5), (4, 3, 6), (2, 2, 4)}
        assert max(tps, key=tps.get) in leaders, (ds, tps)
        assert all(tps[(6, 4, 10)] < tps[x] for x in leaders), (ds, tps)


# ---- presets, GPU framework overhead, the published sheet ----------------------------------------------------


def test_presets_state_sockets_and_no_bare_assumptions() -> None:
    for name in list_presets():
        raw = json.loads((PRESET_DIR / f"{name}.json").read_text())
        assert raw["sockets"]["value"] in (1, 2) and raw["sockets"]["source"], name
        for sect in ("cpu", "gpu", "link"):
            for key, v in raw[sect].items():
                if isinstance(v, dict):
                    assert not v["source"].lower().startswith("assumption"), (name, sect, key)
    two = load_profile("paper-server1-4214r-2080super")
    assert two.cpu.cores == 24  # the paper's "24 cores" are two 12-core Xeon Silver 4214R


def test_gpu_eager_dispatch_adds_per_layer() -> None:
    raw = json.loads((PRESET_DIR / "desktop-13900k-4090.json").read_text())
    raw["gpu"]["layer_s"] = 0.0
    base = parse_profile(raw)
    raw["gpu"]["layer_s"] = 2e-4
    eager = parse_profile(raw)
    wl = Workload(LLAMA2_7B, DraftConfig(3))
    a, b = RooflineCosts(base, wl), RooflineCosts(eager, wl)
    assert b.target_gpu(4, 100, 10) - a.target_gpu(4, 100, 10) == pytest.approx(10 * 2e-4)
    assert b.draft_pass(4, 100) - a.draft_pass(4, 100) == pytest.approx(3 * 2e-4)
    assert b.draft_head(4) == pytest.approx(a.draft_head(4))


def test_published_sheet_rows_have_sources_and_a_cpu_row_is_weight_bound() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "analysis"
    sheet = json.loads((root / "published_results.json").read_text())
    held = [r for r in sheet["rows"] if r["split"] == "held-out"]
    assert len(held) >= 12 and len({r["source"] for r in held}) >= 4
    for r in sheet["rows"]:
        assert r["source"] in sheet["sources"] and r["hardware"] and r["value"] > 0
        assert r["metric"] in ("tokens_per_s", "speedup") and r["engine"] and r["dtype"]
    mod = analysis_script("compare_published")
    row = next(r for r in sheet["rows"] if r["id"] == "lc34-13900k-7b-q4")
    lc = resolve_engine("llama.cpp")
    m = LLAMA2_7B
    bw = min(2 * 8 * 6400e6 * 0.75 * lc.stream_frac, 2 * 8 * 6400e6)
    weights = (m.num_layers * m.layer_params + m.vocab_size * m.hidden_size) * DTYPE_BYTES["q4_0"]
    step = lc.call_s + weights / bw  # + KV of <= 144 positions: < 1% here
    assert mod.predict(row)["predicted"] == pytest.approx(1 / step, rel=0.02)


def test_engine_validation_rows_are_split() -> None:
    from simulator.validate import check_engines

    rep = check_engines(load_profile("host-2core-shared"), SMOLLM2_135M)
    assert {r["split"] for r in rep["rows"]} == {"calibration", "held-out"}
    assert rep["summary"]["held_out"] == sum(r["split"] == "held-out" for r in rep["rows"]) >= 4


def test_default_profile_ranks_the_swept_trees_as_measured_fastest_first() -> None:
    """analysis/results/bench_tree_sweep.json: 4/3/6 was the fastest tree on HumanEval and MT-bench; the default
    draft's profile with our engine on this machine's preset must rank it first among the swept trees."""
    hw = load_profile("host-2core-shared")
    wl = Workload(SMOLLM2_135M, DraftConfig(1, draft_vocab_size=8192), prompt_len=100, new_tokens=128,
                  cpu_engine="dovetail-jax")
    acc = ProfileAcceptance(default_profile("smollm2-135m"))
    tps = {}
    for k, d, t in ((4, 3, 6), (4, 4, 8), (6, 5, 10), (10, 7, 16), (1, 4, 5)):
        tps[(k, d, t)] = tune(hw, wl, acc, grid={"top_k": [k], "depth": [d], "total_tokens": [t],
                                                 "schedule": ["dovetail"]}, opts=SimOptions(cycles=3000))["best"][
            "tokens_per_s"]
    assert max(tps, key=tps.get) == (4, 3, 6)
