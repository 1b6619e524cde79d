"""A preset that names its own CPU-engines file (`cpu_engines`): engines fitted against it on its machine, used by
the cost model for that preset only; `validate engines --reference` takes the calibration rows and the bandwidth
reference from that machine's `bench target` (no model load, no timing)."""

from __future__ import annotations

import json
import shutil

import pytest

from dovetail_jax.config import SMOLLM2_135M
from simulator import engines as E
from simulator.costs import RooflineCosts
from simulator.errors import ConfigError
from simulator.hardware import load_profile, parse_profile
from simulator.schedules import SimOptions, simulate
from simulator.validate import RESULTS, check_engines, main
from simulator.workload import Workload

INTEL = load_profile("host-2core-intel-xeon")
AMD = load_profile("host-2core-shared")


def _decode_tok_s(hw, engine: str) -> float:  # noqa: ANN001
    wl = Workload(SMOLLM2_135M, prompt_len=6, new_tokens=128, cpu_engine=engine)
    return simulate("target-cpu", hw, wl, opts=SimOptions()).tokens_per_s


def test_preset_names_its_engines_and_the_costs_use_them() -> None:
    assert INTEL.cpu_engines == "cpu_engines_intel_xeon_2core.json" and AMD.cpu_engines == ""
    assert "fit_cpu_engines.py --machine intel-xeon-2core" in INTEL.sources["cpu_engines"]
    own = E.resolve_engine("llama.cpp", INTEL.cpu_engines)
    shared = E.resolve_engine("llama.cpp")
    assert own != shared
    wl = Workload(SMOLLM2_135M, prompt_len=6, new_tokens=128, cpu_engine="llama.cpp")
    assert RooflineCosts(INTEL, wl).engine == own and RooflineCosts(AMD, wl).engine == shared
    # the same preset without its own file would cost llama.cpp with the AMD fractions: another prediction
    bare = parse_profile({k: v for k, v in INTEL.to_json().items() if k != "cpu_engines"}, "bare")
    assert bare.cpu_engines == ""
    assert _decode_tok_s(bare, "llama.cpp") != pytest.approx(_decode_tok_s(INTEL, "llama.cpp"))
    assert parse_profile(INTEL.to_json(), "again").cpu_engines == INTEL.cpu_engines  # round-trips


def test_intel_engines_fitted_against_their_preset() -> None:
    raw = json.loads(E.engines_path(INTEL.cpu_engines).read_text())
    assert raw["profile"] == INTEL.name
    for name in ("dovetail-jax", "llama.cpp", "hf-torch"):
        assert E.resolve_engine(name, INTEL.cpu_engines).name == name
    # the calibration's own decode rate is reproduced: HF's per-layer overhead is solved from it exactly
    bt = json.loads((RESULTS / "bench_target_intel.json").read_text())
    assert _decode_tok_s(INTEL, "hf-torch") == pytest.approx(bt["engines"]["hf_transformers"]["decode_tok_s"],
                                                             rel=0.02)


@pytest.mark.parametrize("bad", ["../cpu_engines.json", "nope.json", 3])
def test_bad_engines_file_is_one_clear_error(bad) -> None:  # noqa: ANN001
    raw = {**INTEL.to_json(), "cpu_engines": bad}
    if not isinstance(bad, str) or "/" in bad:
        with pytest.raises(ConfigError, match="cpu_engines must be a file name in simulator/data"):
            parse_profile(raw, "x")
        return
    hw = parse_profile(raw, "x")  # a missing file is reported where the engines are first needed
    with pytest.raises(ConfigError, match="cpu engines file 'nope.json': not a file of"):
        _decode_tok_s(hw, "llama.cpp")


def test_reference_bench_gives_the_calibration_rows(tmp_path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    for f in ("bench_target_intel.json", "bench_dovetail_full_r4_llamacpp.json"):
        shutil.copy(RESULTS / f, results / f)
    rep = check_engines(INTEL, SMOLLM2_135M, results=results,
                        held_out=results / "bench_dovetail_full_r4_llamacpp.json",
                        reference=results / "bench_target_intel.json")
    cal = [r for r in rep["rows"] if r["split"] == "calibration"]
    bt = json.loads((results / "bench_target_intel.json").read_text())
    assert {r["source"] for r in cal} == {"bench_target_intel.json"} and len(cal) == 3
    assert rep["summary"]["bandwidth_scaling"]["reference_read_gbs"] == bt["machine"]["memory_read_gbs"]
    assert rep["summary"]["bandwidth_scaling"]["reference"].startswith("bench_target_intel.json")
    assert rep["summary"]["cpu_engines"] == INTEL.cpu_engines
    held = [r for r in rep["rows"] if r["split"] == "held-out"]
    assert len(held) == 4 and all(r["error"] == pytest.approx(r["predicted_tokens_per_s"] / r["measured_tokens_per_s"]
                                                              - 1) for r in held)
    # without --reference the calibration file is bench_target.json, absent here: one clear error
    with pytest.raises(ConfigError, match=r"bench_target\.json: not a readable `dovetail bench target` result"):
        check_engines(INTEL, SMOLLM2_135M, results=results, held_out=results / "bench_dovetail_full_r4_llamacpp.json")


def test_cli_reference(tmp_path, capsys) -> None:
    out = tmp_path / "v.json"
    assert main(["engines", "--profile", "host-2core-intel-xeon", "--reference",
                 str(RESULTS / "bench_target_intel.json"), "--held-out",
                 str(RESULTS / "bench_dovetail_full_r4_llamacpp.json"), "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["summary"]["profile"] == "host-2core-intel-xeon" and rep["summary"]["held_out"] == 4
    assert "bench_target_intel.json" in capsys.readouterr().out
    assert main(["engines", "--reference", str(tmp_path / "missing.json"), "--out", str(out)]) == 2


def test_second_amd_engines_fitted_against_their_preset() -> None:
    amd2 = load_profile("host-2core-amd-epyc-2")
    assert amd2.cpu_engines == "cpu_engines_amd_epyc_2core_2.json"
    assert "fit_cpu_engines.py --machine amd-epyc-2core-2" in amd2.sources["cpu_engines"]
    raw = json.loads(E.engines_path(amd2.cpu_engines).read_text())
    assert raw["profile"] == amd2.name
    bt = json.loads((RESULTS / "bench_target_amd.json").read_text())
    for name, key in (("hf-torch", "hf_transformers"), ("dovetail-jax", "dovetail_jax"),
                      ("llama.cpp", "llama_cpp_f32")):
        # the calibration decode rates: HF's exactly (its per-layer overhead is solved from it), the others fitted
        tol = 0.02 if name == "hf-torch" else 0.06
        assert _decode_tok_s(amd2, name) == pytest.approx(bt["engines"][key]["decode_tok_s"], rel=tol), name
    # the early AMD VM's shared engines would price this VM's llama.cpp ~1.7x too fast
    assert _decode_tok_s(AMD, "llama.cpp") > 1.5 * bt["engines"]["llama_cpp_f32"]["decode_tok_s"]
