"""`dovetail simulate --calibrated-by RUNS`: the calibration `validate check` fits, applied to simulate/--sweep/--tune.

Runs are synthesised by a known "true" cost model (`test_sim_validate.truth`: the roofline off by known factors),
so a calibrated prediction must reproduce the truth while the raw profile must not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_sim_validate import HW, TRUE_ACC, fake_run, truth

from dovetail_jax.config import SMOLLM2_135M, DraftConfig, TreeConfig
from simulator import cli
from simulator.errors import ConfigError
from simulator.schedules import SimOptions, simulate
from simulator.validate import calibration_from_file
from simulator.workload import Workload

CAL = "t-64,d-4-3-8,d-8-4-16"


@pytest.fixture(scope="module")
def runs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = [fake_run("t-64", None, 64), fake_run("d-4-3-8", TreeConfig(4, 3, 8)),
            fake_run("d-8-4-16", TreeConfig(8, 4, 16))]
    path = tmp_path_factory.mktemp("cal") / "runs.json"
    path.write_text(json.dumps({"runs": runs}))
    return path


def _wl(tree: TreeConfig) -> Workload:  # what the CLI builds from the flags in _argv
    return Workload(SMOLLM2_135M, DraftConfig(1), tree, "f32", "f32", 16, 128)


def _true_speedup(tree: TreeConfig) -> float:
    o = SimOptions(cycles=4000)
    d = simulate("dovetail", HW, _wl(tree), TRUE_ACC, opts=o, cost_factory=truth).tokens_per_s
    return d / simulate("target-cpu", HW, _wl(tree), opts=o, cost_factory=truth).tokens_per_s


def _argv(runs: Path | None, *extra: str) -> list[str]:
    cal = ["--calibrated-by", str(runs), "--calibrate", CAL] if runs is not None else ["--draft-dtype", "f32"]
    return ["simulate", "--profile", "host-2core-shared", "--cpu-engine", "profile", "--prompt-len", "16",
            "--new-tokens", "128", "--rank-probs", "0.55,0.2,0.1,0.05", "--depth-decay", "0.95", "--cycles", "4000",
            "--schedule", "dovetail", "--json", *cal, *extra]


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> object:
    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_calibration_reproduces_the_true_costs_on_a_held_out_tree(runs_file: Path) -> None:
    factory, info = calibration_from_file(runs_file, HW, SMOLLM2_135M, None, CAL)
    assert info["calibration"] == CAL.split(",")
    assert info["factors"]["draft"] == pytest.approx(2.0, rel=0.1)
    wl, o = _wl(TreeConfig(6, 6, 24)), SimOptions(cycles=4000)
    true = simulate("dovetail", HW, wl, TRUE_ACC, opts=o, cost_factory=truth).tokens_per_s
    assert simulate("dovetail", HW, wl, TRUE_ACC, opts=o, cost_factory=factory).tokens_per_s == pytest.approx(
        true, rel=0.05)
    assert abs(simulate("dovetail", HW, wl, TRUE_ACC, opts=o).tokens_per_s / true - 1) > 0.1  # raw is off


def test_sweep_single_and_tune_all_use_the_calibration(runs_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trees = [TreeConfig(2, 2, 4), TreeConfig(4, 5, 12), TreeConfig(6, 6, 24)]
    grid = ["--sweep", "top_k=2,4,6", "depth=2,5,6", "total_tokens=4,12,24"]
    cal_rows = {(r["top_k"], r["depth"], r["total_tokens"]): r for r in _run_cli(_argv(runs_file, *grid), capsys)
                if r["feasible"]}
    raw_rows = {(r["top_k"], r["depth"], r["total_tokens"]): r for r in _run_cli(_argv(None, *grid), capsys)
                if r["feasible"]}
    raw_off = 0.0
    for t in trees:
        true = _true_speedup(t)
        key = (t.top_k, t.depth, t.total_tokens)
        assert cal_rows[key]["speedup"] == pytest.approx(true, rel=0.05), key
        raw_off = max(raw_off, abs(raw_rows[key]["speedup"] / true - 1))
    assert raw_off > 0.05  # the uncalibrated profile mispredicts at least one of them

    single = _run_cli(_argv(runs_file, "--top-k", "6", "--depth", "6", "--total-tokens", "24"), capsys)
    assert single[0]["speedup"] == pytest.approx(cal_rows[(6, 6, 24)]["speedup"], rel=0.02)

    tuned = _run_cli(_argv(runs_file, "--tune", *grid), capsys)
    best = tuned["best"]
    assert tuned["calibration"]["calibration"] == CAL.split(",")
    assert best["speedup"] == pytest.approx(max(r["speedup"] for r in cal_rows.values()), rel=0.02)
    assert best["speedup"] == pytest.approx(_true_speedup(TreeConfig(best["top_k"], best["depth"],
                                                                     best["total_tokens"])), rel=0.05)


def test_bad_calibration_inputs_give_one_clear_error(runs_file: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=r"calibration runs \['nope'\] are not in the file"):
        calibration_from_file(runs_file, HW, SMOLLM2_135M, None, "nope")
    with pytest.raises(ConfigError, match="none of the default calibration runs"):
        calibration_from_file(runs_file, HW, SMOLLM2_135M, None, None)
    from dovetail_jax.config import LLAMA2_7B

    other = tmp_path / "other.json"
    other.write_text(json.dumps({"runs": [{**json.loads(runs_file.read_text())["runs"][0], "model": "default"}]}))
    with pytest.raises(ConfigError, match="ran SmolLM2-135M-Instruct, not"):
        calibration_from_file(other, HW, LLAMA2_7B, None, "t-64")

    cases = [(_argv(tmp_path / "missing.json"), "cannot read runs"),
             (_argv(runs_file)[:-2] + ["--calibrate", "nope"], "not in the file"),
             (_argv(runs_file, "--draft-dtype", "f16"), "--draft-dtype f16 is not what they calibrate"),
             (["simulate", "--calibrate", "t-64", "--tau", "2"], "--calibrate only applies with --validate or"),
             (_argv(runs_file, "--validate", str(runs_file)), "drop --calibrated-by")]
    for argv, msg in cases:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("error") == 1, err
