"""Bad input gives one clear message; presets load with a source for every value; outputs stay finite."""

from __future__ import annotations

import argparse
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dovetail_jax.config import LLAMA2_7B, LLAMA2_13B, SMOLLM2_135M, DraftConfig, TreeConfig
from dovetail_jax.errors import DovetailError
from simulator import cli
from simulator.acceptance import PositionalAcceptance
from simulator.errors import ConfigError, DoesNotFitError
from simulator.hardware import PRESET_DIR, list_presets, load_profile, parse_profile
from simulator.schedules import SCHEDULES, SimOptions, compare, simulate
from simulator.tune import expand, parse_grid, sweep, tune
from simulator.workload import Workload

ACC = PositionalAcceptance([0.6, 0.15, 0.08, 0.04, 0.02], 0.95)
REQUIRED = {"cpu": ["name", "cores", "peak_flops", "mem_bw", "flops_eff", "bw_eff", "n_half", "dispatch_s",
                    "ram_bytes"],
            "gpu": ["name", "peak_flops", "mem_bw", "vram_bytes", "flops_eff", "bw_eff", "n_half", "launch_s"],
            "link": ["gen", "lanes", "efficiency", "latency_s"]}


def _raw(name: str = "paper-server1-4214r-2080super") -> dict:
    return json.loads((PRESET_DIR / f"{name}.json").read_text())


def test_presets_include_the_papers_machines_and_cite_sources() -> None:
    names = list_presets()
    for must in ("paper-server1-4214r-2080super", "paper-server2-4310-3090", "paper-laptop-9300h-1050m"):
        assert must in names
    for n in names:
        p = load_profile(n)
        for sect, keys in REQUIRED.items():
            for k in keys:
                assert p.sources.get(f"{sect}.{k}"), f"{n}: {sect}.{k} has no source"
    laptop = load_profile("paper-laptop-9300h-1050m")
    assert (laptop.link.gen, laptop.link.lanes) == (3, 8)
    assert laptop.gpu.vram_bytes == 4 * 2 ** 30


@pytest.mark.parametrize("sect,key", [("cpu", "mem_bw"), ("gpu", "vram_bytes"), ("link", "latency_s")])
def test_missing_field(sect: str, key: str) -> None:
    raw = _raw()
    del raw[sect][key]
    with pytest.raises(ConfigError, match=f"missing field {sect}.{key}"):
        parse_profile(raw, "x")


@pytest.mark.parametrize("value", [0, -1.0, "fast", None, float("inf")])
def test_non_positive_field(value: object) -> None:
    raw = _raw()
    raw["cpu"]["peak_flops"] = value
    with pytest.raises(ConfigError, match="cpu.peak_flops"):
        parse_profile(raw, "x")


def test_efficiency_above_one_and_bad_link() -> None:
    raw = _raw()
    raw["gpu"]["bw_eff"] = 1.5
    with pytest.raises(ConfigError, match="fraction"):
        parse_profile(raw, "x")
    raw = _raw()
    raw["link"]["lanes"] = 3
    with pytest.raises(ConfigError, match="lanes"):
        parse_profile(raw, "x")


def test_unknown_profile() -> None:
    with pytest.raises(ConfigError, match="presets"):
        load_profile("no-such-machine")


def test_profile_round_trips() -> None:
    p = load_profile("desktop-7700x-4060")
    assert parse_profile(p.to_json(), "rt") == p


def test_model_that_does_not_fit() -> None:
    hw = load_profile("desktop-7700x-4060")
    with pytest.raises(DoesNotFitError, match="VRAM"):
        simulate("gpu-only", hw, Workload(LLAMA2_13B))
    with pytest.raises(DoesNotFitError, match="host RAM"):
        simulate("dovetail", load_profile("paper-laptop-9300h-1050m"), Workload(LLAMA2_13B), ACC)
    # compare reports it as a line instead of failing the whole comparison
    res = compare(hw, Workload(LLAMA2_13B, target_dtype="int8"), ACC, opts=SimOptions(cycles=200))
    assert any(isinstance(r, str) and "gpu-only" in r for r in res)


def test_sweep_inputs() -> None:
    with pytest.raises(ConfigError, match="empty"):
        parse_grid([])
    with pytest.raises(ConfigError, match="no values"):
        parse_grid(["depth="])
    with pytest.raises(ConfigError, match="unknown sweep key"):
        parse_grid(["width=3"])
    with pytest.raises(ConfigError, match="empty"):
        expand({"depth": []})
    assert parse_grid(["depth=2:4", "top_k=4,8"]) == {"depth": [2, 3, 4], "top_k": [4, 8]}


def test_sweep_keeps_infeasible_points_with_reason() -> None:
    hw = load_profile("paper-server1-4214r-2080super")
    wl = Workload(LLAMA2_7B, DraftConfig(5))
    rows = sweep(hw, wl, ACC, {"total_tokens": [8, 16, 999]}, opts=SimOptions(cycles=200))
    assert [r["feasible"] for r in rows] == [True, True, False]
    assert "pool" in rows[2]["reason"]


def test_tune_respects_vram_budget() -> None:
    hw = load_profile("paper-server1-4214r-2080super")
    wl = Workload(LLAMA2_7B, DraftConfig(5))
    grid = {"total_tokens": [6, 16], "draft_layers": [1, 5], "ngl": [0, 4]}
    res = tune(hw, wl, ACC, vram_budget_gb=2.0, grid=grid, opts=SimOptions(cycles=300))
    assert res["best"]["vram_gib"] <= 2.0 and res["best"]["draft_layers"] == 1
    with pytest.raises(ConfigError, match="no configuration"):
        tune(hw, wl, ACC, vram_budget_gb=0.1, grid=grid, opts=SimOptions(cycles=100))


@given(preset=st.sampled_from(list_presets()), sched=st.sampled_from(list(SCHEDULES)),
       t=st.integers(2, 60), depth=st.integers(1, 8), k=st.integers(1, 10))
@settings(max_examples=40, deadline=None)
def test_outputs_are_finite_and_positive(preset: str, sched: str, t: int, depth: int, k: int) -> None:
    hw = load_profile(preset)
    try:
        wl = Workload(SMOLLM2_135M, DraftConfig(2), TreeConfig(k, depth, t), prompt_len=32, new_tokens=64)
        p = simulate(sched, hw, wl, ACC, opts=SimOptions(cycles=300))
    except ConfigError:
        return  # a clear refusal is fine (tree larger than its pool, does not fit)
    assert math.isfinite(p.tokens_per_s) and p.tokens_per_s > 0
    assert all(math.isfinite(v) and v >= 0 for v in p.split_s_per_token.values())
    assert all(0 <= u <= 1 + 1e-9 for u in p.utilisation.values())


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:  # noqa: ANN001
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_errors_are_one_line(capsys, tmp_path) -> None:  # noqa: ANN001
    bad = _raw()
    del bad["cpu"]["cores"]
    f = tmp_path / "p.json"
    f.write_text(json.dumps(bad))
    cases = [["simulate", "--profile", str(f), "--tau", "2"],
             ["simulate", "--alpha", "0.5,1.5"],
             ["simulate", "--sweep"],
             ["simulate", "--model", "llama2-13b", "--schedule", "gpu-only", "--profile", "desktop-7700x-4060"],
             ["simulate", "--schedule", "dovetail"],
             ["simulate", "--tau", "2", "--alpha", "0.5"]]
    for argv in cases:
        rc, out, err = _cli(argv, capsys)
        assert rc == 2, argv
        assert err.startswith("error: ") and err.count("\n") == 1, (argv, err)


def test_cli_simulate_json(capsys) -> None:  # noqa: ANN001
    rc, out, _ = _cli(["simulate", "--profile", "paper-server1-4214r-2080super", "--model", "llama2-7b",
                       "--draft-layers", "5", "--rank-probs", "0.6,0.15,0.08", "--schedule", "dovetail",
                       "--cycles", "300", "--json"], capsys)
    assert rc == 0
    data = json.loads(out)
    assert data[0]["schedule"] == "dovetail" and data[0]["tokens_per_s"] > 0 and data[0]["speedup"] > 0


def test_errors_are_dovetail_errors() -> None:
    assert issubclass(ConfigError, DovetailError)
    assert issubclass(DoesNotFitError, ConfigError) and issubclass(ConfigError, ValueError)


def test_simulator_applies_the_library_tree_and_draft_rules() -> None:
    """One set of rules: a tree or draft the library refuses, the simulator refuses with the same error."""
    for bad in ({"top_k": 0}, {"depth": 0}, {"total_tokens": 0}, {"top_k": 2, "depth": 1, "total_tokens": 9}):
        with pytest.raises(ConfigError):
            cli.build_inputs(cli_args(**{"top_k": 2, "depth": 2, "total_tokens": 4, **bad}))
    with pytest.raises(ConfigError, match="draft_vocab_size"):
        cli.build_inputs(cli_args(draft_vocab=0))
    _, wl, _, _, _ = cli.build_inputs(cli_args())
    assert (wl.tree.top_k, wl.tree.depth, wl.tree.total_tokens) == (10, 7, 16)  # the paper's server tree


def cli_args(**kw: object) -> argparse.Namespace:
    """`simulate` arguments with their defaults, `kw` overriding some."""
    parser = argparse.ArgumentParser()
    cli.add_simulate_args(parser)
    return argparse.Namespace(**{**vars(parser.parse_args([])), **kw})


def test_schedule_registry() -> None:
    """The registry is what the CLI offers and `compare` runs, in order; unknown names and missing acceptance
    models are refused; eagle2 runs its own head and tree (EAGLE-2's 10/5/60, fc fusion, 1 layer)."""
    names = ["target-cpu", "gpu-only", "offload", "partial", "dovetail", "dovetail-pipelined", "eagle2"]
    assert list(SCHEDULES) == names
    assert [n for n, s in SCHEDULES.items() if s.speculative] == names[4:]
    parser = argparse.ArgumentParser()
    cli.add_simulate_args(parser)
    action = next(a for a in parser._actions if a.dest == "schedule")
    assert list(action.choices) == ["all", *names]
    hw = load_profile("paper-server1-4214r-2080super")
    wl = Workload(LLAMA2_7B, DraftConfig(5))
    with pytest.raises(ConfigError, match="unknown schedule 'nope'; choose from target-cpu, gpu-only"):
        simulate("nope", hw, wl, ACC)
    with pytest.raises(ConfigError, match="needs an acceptance model"):
        simulate("dovetail", hw, wl, None)
    out = compare(hw, wl, ACC, opts=SimOptions(cycles=100))
    assert [p if isinstance(p, str) else p.schedule for p in out][:1] == ["target-cpu"]
    assert all(isinstance(p, str) or p.schedule == n for p, n in zip(out, names, strict=True))
    cfg = simulate("eagle2", hw, wl, ACC, opts=SimOptions(cycles=100)).config
    assert (cfg["top_k"], cfg["depth"], cfg["total_tokens"], cfg["draft_kind"], cfg["draft_layers"]) == (
        10, 5, 60, "eagle", 1)


def test_simulator_runs_without_jax() -> None:
    """Only simulator.profile may import JAX; registering the CLI must not pull in numpy or matplotlib either."""
    import subprocess
    import sys

    code = ("import sys, argparse; import simulator.cli as c; p = argparse.ArgumentParser(); "
            "c.register(p.add_subparsers()); light = not ({'jax', 'numpy', 'matplotlib'} & set(sys.modules)); "
            "import simulator.engine, simulator.schedules, simulator.tune, simulator.validate, simulator.bench; "
            "import simulator.plots; print(light, 'jax' in sys.modules, 'matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False", "False"]
