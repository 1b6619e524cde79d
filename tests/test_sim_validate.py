"""The validation pipeline end to end on synthetic runs made by a known cost model (so errors must vanish)."""

from __future__ import annotations

import math

import pytest

from dovetail_jax.config import SMOLLM2_135M, DraftConfig, TreeConfig
from simulator.acceptance import HistogramAcceptance, PositionalAcceptance
from simulator.costs import RooflineCosts, ScaledCosts
from simulator.errors import ConfigError
from simulator.hardware import load_profile
from simulator.schedules import SimOptions, simulate
from simulator.validate import calibrate, check, verified_widths
from simulator.workload import PAPER_TREE, Workload

HW = load_profile("host-2core-shared")
TRUE_ACC = PositionalAcceptance([0.55, 0.2, 0.1, 0.05], 0.95)


def truth(h, w):  # noqa: ANN001, ANN201 - the "real machine": roofline off by known factors
    return ScaledCosts(RooflineCosts(h, w), [(1, 1.3), (32, 1.6)], draft=2.0, host=3.0, transfer=1.5, accept=3.0)


def fake_run(name: str, tree: TreeConfig | None, new: int = 128, prompt: int = 16) -> dict:
    wl = Workload(SMOLLM2_135M, DraftConfig(1), tree or PAPER_TREE, "f32", "f32", prompt, new, kv_slots=256)
    base = {"name": name, "prompt_tokens": prompt, "new_tokens": new, "cache_slots": 256}
    if tree is None:
        p = simulate("target-cpu", HW, wl, cost_factory=truth)
        return base | {"mode": "target", "decode_s": p.sim_time_s, "decode_steps": p.tokens,
                       "tokens_per_s": p.tokens_per_s}
    p = simulate("dovetail", HW, wl, TRUE_ACC, opts=SimOptions(cycles=20_000, seed=7), cost_factory=truth)
    sp = {k: v * p.tokens for k, v in p.split_s_per_token.items()}
    hist = list(TRUE_ACC.outcomes(tree).p_a * p.cycles)
    return base | {"mode": "dovetail", "tree": {"top_k": tree.top_k, "depth": tree.depth,
                                                "total_tokens": tree.total_tokens},
                   "draft_layers": 1, "cycles": p.cycles, "accept_hist": hist, "tau": p.tau,
                   "decode_s": p.sim_time_s, "tokens_per_s": p.tokens_per_s,
                   "time_s": {"verify": sp["verify"], "draft": sp["draft"], "transfer": sp["transfer"],
                              "host": sp["host"] + sp["accept"]}}


def test_calibrated_simulator_recovers_synthetic_runs() -> None:
    runs = [fake_run("t-64", None, 64), fake_run("t-200", None, 200), fake_run("d-4-3-8", TreeConfig(4, 3, 8)),
            fake_run("d-8-4-16", TreeConfig(8, 4, 16)), fake_run("d-4-5-12", TreeConfig(4, 5, 12)),
            fake_run("d-2-2-4", TreeConfig(2, 2, 4)), fake_run("d-6-6-24", TreeConfig(6, 6, 24))]
    rep = check(runs, HW, SMOLLM2_135M, None, ["t-64", "d-4-3-8", "d-8-4-16"])
    s = rep["summary"]
    assert s["validated"] == 4 and s["dovetail_runs_validated"] == 3
    assert s["factors"]["draft"] == pytest.approx(2.0, rel=0.1)
    assert s["max_abs_error"] < 0.05, rep["rows"]


def lookup_run(name: str, tree: TreeConfig, chain_share: float) -> dict:
    """A dovetail run with prompt-lookup chains in `chain_share` of its cycles, timed by `truth`."""
    counts = [30.0, 25.0, 15.0, 10.0, 8.0] + [3.0] * tree.lookup  # a = 0 .. max_accepted + L
    acc = HistogramAcceptance(tree, counts, chain_share=chain_share)
    wl = Workload(SMOLLM2_135M, DraftConfig(1), tree, "f32", "f32", 16, 128, kv_slots=256)
    p = simulate("dovetail", HW, wl, acc, opts=SimOptions(cycles=20_000, seed=7), cost_factory=truth)
    sp = {k: v * p.tokens for k, v in p.split_s_per_token.items()}
    return {"name": name, "prompt_tokens": 16, "new_tokens": 128, "cache_slots": 256, "mode": "dovetail",
            "tree": {"top_k": tree.top_k, "depth": tree.depth, "total_tokens": tree.total_tokens,
                     "lookup": tree.lookup},
            "lookup": {"cycles": chain_share * p.cycles}, "draft_layers": 1, "cycles": p.cycles,
            "accept_hist": [c / sum(counts) * p.cycles for c in counts], "tau": p.tau, "decode_s": p.sim_time_s,
            "tokens_per_s": p.tokens_per_s, "time_s": {"verify": sp["verify"], "draft": sp["draft"],
                                                       "transfer": sp["transfer"], "host": sp["host"] + sp["accept"]}}


def test_verified_widths_mix_the_chained_cycles() -> None:
    assert verified_widths(TreeConfig(4, 3, 6), None) == [(6, 1.0)]
    assert verified_widths(TreeConfig(4, 3, 6, lookup=6), 0.0) == [(6, 1.0)]
    assert verified_widths(TreeConfig(4, 3, 6, lookup=6), 0.25) == [(6, 0.75), (12, 0.25)]


def test_calibration_prices_a_lookup_run_at_its_verified_widths() -> None:
    """Half the cycles verify 6 + 26 tokens: the run's verify time is a mix of widths 6 and 32, so the fitted
    target factor at the mean width (19) and the accept/host factor must be the truth's, not inflated by
    pricing every cycle at width 6."""
    run = lookup_run("d-lookup", TreeConfig(4, 3, 6, lookup=26), 0.5)
    factors, _ = calibrate([run], HW, SMOLLM2_135M, None)
    (n, f), = factors["target"]
    assert n == 19
    assert f == pytest.approx(1.3 + 0.3 * math.log2(19) / 5, rel=0.02)
    assert factors["host"] == pytest.approx(3.0, rel=0.05)


def test_check_refuses_unusable_splits() -> None:
    runs = [fake_run("t-64", None, 64), fake_run("d-4-3-8", TreeConfig(4, 3, 8))]
    with pytest.raises(ConfigError, match="not in the runs"):
        check(runs, HW, SMOLLM2_135M, None, ["nope"])
    with pytest.raises(ConfigError, match="nothing is left"):
        check(runs, HW, SMOLLM2_135M, None, ["t-64", "d-4-3-8"])
    with pytest.raises(ConfigError, match="no acceptance model"):
        check(runs, HW, SMOLLM2_135M, None, ["t-64"], acceptance="calibration")
    with pytest.raises(ConfigError, match="'own' or 'calibration'"):
        check(runs, HW, SMOLLM2_135M, None, ["t-64"], acceptance="mine")
    # with its own acceptance a dovetail run is predicted from a target-only calibration (draft factor 1)
    assert check(runs, HW, SMOLLM2_135M, None, ["t-64"])["summary"]["validated"] == 1


def test_collect_refuses_two_configurations_under_one_name(tmp_path) -> None:
    """Runs are kept per name: a duplicate would pool two configurations' repeats; nothing runs, nothing is written."""
    from simulator.validate import collect

    out = tmp_path / "runs.json"
    same = {"name": "x", "prompt": "p", "max_new_tokens": 4, "args": []}
    with pytest.raises(ConfigError, match="'x' appears 2 times"):
        collect([same, {**same, "args": ["--mode", "dovetail"]}], out, repeats=1)
    assert not out.exists()


def test_engines_take_their_held_out_rows_from_a_named_bench_file(tmp_path) -> None:
    """`validate engines --held-out FILE`: the target-only and llama.cpp rates of that bench run are the held-out rows
    (prompt and answer lengths averaged over its prompts); a file that is not such a result is one clear error."""
    import json

    from simulator.validate import engine_rows

    prompts = [{"prompt_tokens": 10, "target": {"tokens": 100}}, {"prompt_tokens": 30, "target": {"tokens": 50}}]
    bench = {"results": {"mtbench": {"target": {"decode_tok_s": 40.0}, "llama_cpp_f32": {"decode_tok_s": 50.0}}},
             "prompts": {"mtbench": prompts}}
    f = tmp_path / "b.json"
    f.write_text(json.dumps(bench))
    held = [r for r in engine_rows(held_out=f) if r["split"] == "held-out"]
    assert [(r["engine"], r["measured_tokens_per_s"], r["prompt_tokens"], r["new_tokens"]) for r in held] == [
        ("dovetail-jax", 40.0, 20, 75), ("llama.cpp", 50.0, 20, 75)]
    assert all("b.json (mtbench, 2 prompts" in r["source"] for r in held)
    bad = tmp_path / "bad.json"
    bad.write_text('{"rows": []}')
    with pytest.raises(ConfigError, match="not a readable `dovetail bench dovetail` result"):
        engine_rows(held_out=bad)
