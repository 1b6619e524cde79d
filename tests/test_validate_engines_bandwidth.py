"""`validate engines` predicts each run on the memory bandwidth that run measured (no model load, no timing).

Closed forms: a purely memory-bound decode's tokens/s is proportional to the bandwidth; an engine step
call_s + bytes / BW becomes call_s + (T1 - call_s) / scale when only the bandwidth scales."""

from __future__ import annotations

import json
import math

import pytest

from dovetail_jax.config import SMOLLM2_135M
from simulator.engines import resolve_engine
from simulator.errors import ConfigError
from simulator.hardware import load_profile, parse_profile
from simulator.schedules import SimOptions, simulate
from simulator.validate import check_engines, main, run_read_gbs
from simulator.workload import Workload

HW = load_profile("host-2core-shared")
PROMPTS = [{"prompt_tokens": 10, "target": {"tokens": 100}}, {"prompt_tokens": 30, "target": {"tokens": 50}}]


def test_scaled_profile_fields() -> None:
    s = HW.with_memory_bandwidth(0.5)
    assert s.cpu.mem_bw == HW.cpu.mem_bw * 0.5 and s.cpu.bw == HW.cpu.bw * 0.5
    assert s.gpu.mem_bw == HW.gpu.mem_bw * 0.5  # the stand-in device reads the same DRAM (shares_cpu)
    assert (s.cpu.peak_flops, s.cpu.bw_eff, s.cpu.dispatch_s, s.link) == (HW.cpu.peak_flops, HW.cpu.bw_eff,
                                                                           HW.cpu.dispatch_s, HW.link)
    assert "x 0.5" in s.sources["cpu.mem_bw"] and "x 0.5" not in HW.sources["cpu.mem_bw"]  # hw itself unchanged
    assert HW.cpu.mem_bw == load_profile("host-2core-shared").cpu.mem_bw
    gpu_box = load_profile("desktop-13900k-4090")
    g = gpu_box.with_memory_bandwidth(2.0)
    assert g.cpu.mem_bw == gpu_box.cpu.mem_bw * 2 and g.gpu == gpu_box.gpu  # a real GPU's memory is its own


@pytest.mark.parametrize("scale", [0, -1.0, math.nan, math.inf, True, "2"])
def test_bad_scale(scale) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match="memory bandwidth scale must be a positive finite number"):
        HW.with_memory_bandwidth(scale)


def test_memory_bound_decode_scales_with_bandwidth() -> None:
    """Profile costs with no dispatch and near-infinite compute: time is bytes / bandwidth, tokens/s x scale."""
    raw = HW.to_json()
    raw["cpu"]["dispatch_s"] = 1e-15
    raw["cpu"]["peak_flops"] = 1e20
    hw = parse_profile(raw, "memory-bound")
    wl = Workload(SMOLLM2_135M, prompt_len=20, new_tokens=64, kv_slots=256)
    base = simulate("target-cpu", hw, wl, opts=SimOptions()).tokens_per_s
    for scale in (0.25, 0.5, 1.7):
        got = simulate("target-cpu", hw.with_memory_bandwidth(scale), wl, opts=SimOptions()).tokens_per_s
        assert got == pytest.approx(base * scale, rel=1e-9)


def test_engine_step_closed_form() -> None:
    """llama.cpp's decode (memory-bound below the reference bandwidth): 1/tok_s = call_s + (1/tok_s(1) - call_s)/s."""
    call_s = resolve_engine("llama.cpp").call_s
    wl = Workload(SMOLLM2_135M, prompt_len=20, new_tokens=75, cpu_engine="llama.cpp")
    t1 = 1 / simulate("target-cpu", HW, wl, opts=SimOptions()).tokens_per_s
    for scale in (0.25, 0.5, 0.8):
        got = 1 / simulate("target-cpu", HW.with_memory_bandwidth(scale), wl, opts=SimOptions()).tokens_per_s
        assert got == pytest.approx(call_s + (t1 - call_s) / scale, rel=1e-9)


def test_run_read_gbs() -> None:
    assert run_read_gbs({"memory_read_gbs": 31.5}, "f") == 31.5  # bench target: one number
    assert run_read_gbs({"memory_read_gbs": {"start": 18, "end": 22}}, "f") == 20.0  # bench dovetail: the mean
    assert run_read_gbs({"memory_read_gbs": {"start": 30.0, "end": None}}, "f") == 30.0  # a partial file
    assert run_read_gbs({"cpu": "x"}, "f") is None and run_read_gbs(None, "f") is None  # older files
    # bench dovetail's in-run probes (every few prompts) win over start/end: their median
    m = {"memory_read_gbs": {"start": 40.0, "end": 40.0}}
    ps = [{"memory_read_gbs": 10.0}, {}, {"memory_read_gbs": 30.0}, {"memory_read_gbs": None},
          {"memory_read_gbs": 20.0}]
    assert run_read_gbs(m, "f", ps) == 20.0
    assert run_read_gbs(m, "f", [{}, {"memory_read_gbs": None}]) == 40.0  # no probe among these prompts
    with pytest.raises(ConfigError, match="a prompt's memory_read_gbs"):
        run_read_gbs(m, "f", [{"memory_read_gbs": "fast"}])


def test_each_dataset_is_scaled_by_its_own_probes(tmp_path) -> None:
    f = _results(tmp_path, {"cpu": "x", "memory_read_gbs": {"start": 40.0, "end": 40.0}})
    bd = json.loads(f.read_text())
    bd["prompts"]["mtbench"] = [{**p, "memory_read_gbs": g} for p, g in zip(PROMPTS, (8.0, 12.0), strict=False)]
    f.write_text(json.dumps(bd))
    rows = {r["name"]: r for r in check_engines(HW, SMOLLM2_135M, results=tmp_path, held_out=f)["rows"]}
    assert rows["target-llama.cpp-mtbench"]["run_read_gbs"] == 10.0
    assert rows["target-llama.cpp-mtbench"]["bandwidth_scale"] == 0.25


def _results(tmp_path, held_machine: dict | None):  # noqa: ANN202
    bt = {"prompt": {"tokens": 20}, "max_new_tokens": 64, "machine": {"memory_read_gbs": 40.0},
          "engines": {"llama_cpp_f32": {"decode_tok_s": 80.0}, "dovetail_jax": {"decode_tok_s": 70.0,
                                                                                "cache_slots": 256}}}
    (tmp_path / "bench_target.json").write_text(json.dumps(bt))
    bd = {"results": {"mtbench": {"target": {"decode_tok_s": 40.0}, "llama_cpp_f32": {"decode_tok_s": 50.0}}},
          "prompts": {"mtbench": PROMPTS}}
    if held_machine is not None:
        bd["machine"] = held_machine
    f = tmp_path / "held.json"
    f.write_text(json.dumps(bd))
    return f


def test_check_engines_scales_each_run_to_its_own_bandwidth(tmp_path) -> None:
    f = _results(tmp_path, {"cpu": "x", "memory_read_gbs": {"start": 18.0, "end": 22.0}})
    rep = check_engines(HW, SMOLLM2_135M, results=tmp_path, held_out=f)
    rows = {r["name"]: r for r in rep["rows"]}
    for r in rows.values():
        assert r["error"] == pytest.approx(r["predicted_tokens_per_s"] / r["measured_tokens_per_s"] - 1)
        assert r["error_unscaled"] == pytest.approx(r["predicted_unscaled_tokens_per_s"] / r["measured_tokens_per_s"]
                                                    - 1)
    cal = rows["target-llama.cpp-fib"]
    assert cal["bandwidth_scale"] == 1.0 and cal["predicted_tokens_per_s"] == cal["predicted_unscaled_tokens_per_s"]
    lc = rows["target-llama.cpp-mtbench"]
    assert lc["run_read_gbs"] == 20.0 and lc["bandwidth_scaled"] and lc["bandwidth_scale"] == 0.5
    call_s = resolve_engine("llama.cpp").call_s
    assert 1 / lc["predicted_tokens_per_s"] == pytest.approx(
        call_s + (1 / lc["predicted_unscaled_tokens_per_s"] - call_s) / 0.5, rel=1e-9)
    ours = rows["target-dovetail-jax-mtbench"]
    assert ours["bandwidth_scale"] == 0.5 and ours["predicted_tokens_per_s"] < ours["predicted_unscaled_tokens_per_s"]
    s = rep["summary"]
    held = [lc, ours]
    assert s["headline"] == "bandwidth-scaled" and s["held_out"] == 2
    b = s["bandwidth_scaling"]
    assert b["enabled"] and b["reference_read_gbs"] == 40.0 and b["held_out_scaled"] == 2
    assert s["median_abs_error"] == pytest.approx(sum(abs(r["error"]) for r in held) / 2)
    assert s["max_abs_error_unscaled"] == max(abs(r["error_unscaled"]) for r in held)

    # --no-bandwidth-scaling: every prediction is the unscaled one (today's numbers), the run bandwidth is kept
    off = check_engines(HW, SMOLLM2_135M, results=tmp_path, held_out=f, bandwidth_scaling=False)
    for r, o in zip(rep["rows"], off["rows"], strict=True):
        assert o["predicted_tokens_per_s"] == o["predicted_unscaled_tokens_per_s"]
        assert o["predicted_tokens_per_s"] == r["predicted_unscaled_tokens_per_s"]
        assert not o["bandwidth_scaled"] and o["bandwidth_scale"] is None and o["run_read_gbs"] == r["run_read_gbs"]
    assert off["summary"]["median_abs_error"] == s["median_abs_error_unscaled"]
    assert off["summary"]["headline"].startswith("unscaled")


def test_run_without_bandwidth_is_predicted_unscaled(tmp_path) -> None:
    f = _results(tmp_path, {"cpu": "x", "load_average_1m": {"start": 1.0, "end": 2.0}})  # an older bench file
    rep = check_engines(HW, SMOLLM2_135M, results=tmp_path, held_out=f)
    held = [r for r in rep["rows"] if r["split"] == "held-out"]
    assert len(held) == 2 and rep["summary"]["bandwidth_scaling"]["held_out_scaled"] == 0
    for r in held:
        assert r["run_read_gbs"] is None and r["bandwidth_scaled"] is False and r["bandwidth_scale"] is None
        assert r["predicted_tokens_per_s"] == r["predicted_unscaled_tokens_per_s"]
    assert rep["summary"]["median_abs_error"] == rep["summary"]["median_abs_error_unscaled"]


@pytest.mark.parametrize("value", ["fast", -3.0, {"start": 0, "end": 20.0}, [20.0], True])
def test_bad_bandwidth_field_is_one_clear_error(tmp_path, value) -> None:  # noqa: ANN001
    f = _results(tmp_path, {"memory_read_gbs": value})
    with pytest.raises(ConfigError, match=r"held\.json: machine\.memory_read_gbs must be a positive number of GB/s"):
        check_engines(HW, SMOLLM2_135M, results=tmp_path, held_out=f)


def test_bad_reference_file_is_one_clear_error(tmp_path) -> None:
    f = _results(tmp_path, None)
    (tmp_path / "bench_target.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"bench_target\.json: not a readable `dovetail bench target` result"):
        check_engines(HW, SMOLLM2_135M, results=tmp_path, held_out=f)


def test_cli_flag_and_bad_file(tmp_path, capsys) -> None:
    f = _results(tmp_path, {"memory_read_gbs": {"start": 18.0, "end": 22.0}})
    out = tmp_path / "eng.json"
    assert main(["engines", "--held-out", str(f), "--out", str(out), "--no-bandwidth-scaling"]) == 0
    rep = json.loads(out.read_text())
    assert not rep["summary"]["bandwidth_scaling"]["enabled"]
    assert all(r["predicted_tokens_per_s"] == r["predicted_unscaled_tokens_per_s"] for r in rep["rows"])
    assert "unscaled (--no-bandwidth-scaling) median |error|" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"machine": {"memory_read_gbs": "fast"}, "results": {}, "prompts": {}}))
    assert main(["engines", "--held-out", str(bad), "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "machine.memory_read_gbs must be a positive number" in err[0]
    assert not (tmp_path / "x.json").exists()
