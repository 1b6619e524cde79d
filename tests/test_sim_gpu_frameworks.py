"""GPU frameworks (--gpu-framework): eager host calls overlapped with the GPU roofline, against closed forms."""

from __future__ import annotations

import json

import pytest
from dovetail_helpers import analysis_script

from dovetail_jax.config import LLAMA2_7B, DraftConfig, TreeConfig
from simulator import cli
from simulator.costs import RooflineCosts
from simulator.engines import GPU_FRAMEWORKS_FILE, gpu_framework_names, resolve_gpu_framework
from simulator.errors import ConfigError
from simulator.hardware import PRESET_DIR, HardwareProfile, parse_profile
from simulator.workload import Workload

EAGER = "torch-eager"
EAGLE = DraftConfig(num_layers=1, fusion="eagle")


def _gpu(bw: float, flops: float = 1e18, layer_s: float = 0.0) -> HardwareProfile:
    """A preset whose GPU has the given bandwidth, a negligible launch cost and (by default) no FLOP limit."""
    raw = json.loads((PRESET_DIR / "desktop-13900k-4090.json").read_text())
    raw["gpu"].update(mem_bw=bw, bw_eff=1.0, peak_flops=flops, flops_eff=1.0, launch_s=1e-12, layer_s=layer_s)
    return parse_profile(raw)


def test_framework_file_has_a_source_for_every_number() -> None:
    raw = json.loads(GPU_FRAMEWORKS_FILE.read_text())["frameworks"]
    assert set(gpu_framework_names()) == {EAGER, "cuda-graph"}
    for name, fw in raw.items():
        numbers = [v for k, v in fw.items() if k not in ("description", "drafts")]
        numbers += [v for d in fw["drafts"].values() for v in d.values()]
        for v in numbers:
            assert isinstance(v, dict) and len(v["source"]) > 10, (name, v)
    assert resolve_gpu_framework("cuda-graph").call_s == 0.0
    with pytest.raises(ConfigError, match="unknown gpu framework"):
        Workload(LLAMA2_7B, gpu_framework="nope")


def test_eager_call_time_is_the_gpt_fast_measurement_over_its_counted_calls() -> None:
    """25.5 tok/s eager LLaMA-7B (32 blocks x 80 calls + 28 per token, counted in gpt-fast) -> s per call."""
    assert resolve_gpu_framework(EAGER).call_s == pytest.approx(1 / 25.5 / (32 * 80 + 28), rel=0.01)


def test_eager_step_is_the_slower_of_host_calls_and_gpu() -> None:
    fw = resolve_gpu_framework(EAGER)
    wl, plain = Workload(LLAMA2_7B, gpu_framework=EAGER), Workload(LLAMA2_7B)
    layers = LLAMA2_7B.num_layers
    fast = RooflineCosts(_gpu(1e15), wl)  # weights in microseconds: the host's calls are the step
    assert fast.target_gpu(1, 256, layers, head=True) == pytest.approx(
        fw.call_s * (layers * fw.calls_per_layer + fw.calls_per_step))
    slow_hw = _gpu(1e11)  # weights in ~0.13 s: the GPU is the step, the calls hide behind it
    # ... plus the unfused attention's score traffic: heads x 1 row x (256 + 1) keys per layer
    scores = layers * LLAMA2_7B.num_heads * 1 * 257 * fw.attn_score_bytes
    assert RooflineCosts(slow_hw, wl).target_gpu(1, 256, layers, head=True) == pytest.approx(
        RooflineCosts(slow_hw, plain).target_gpu(1, 256, layers, head=True) + scores / slow_hw.gpu.bw)


def test_framework_replaces_the_profiles_per_layer_dispatch() -> None:
    with_layer_s, without = _gpu(1e11, layer_s=2e-4), _gpu(1e11)
    graph = RooflineCosts(with_layer_s, Workload(LLAMA2_7B, EAGLE, gpu_framework="cuda-graph"))
    plain = RooflineCosts(without, Workload(LLAMA2_7B, EAGLE))
    assert graph.target_gpu(4, 100, 10) == pytest.approx(plain.target_gpu(4, 100, 10))
    assert graph.draft_pass(4, 100) == pytest.approx(plain.draft_pass(4, 100))
    assert graph.draft_tree_host("eagle2") == 0.0


def test_tree_verify_adds_the_trees_own_calls_and_stays_weight_bound() -> None:
    fw = resolve_gpu_framework(EAGER)
    layers = LLAMA2_7B.num_layers
    fast = RooflineCosts(_gpu(1e15), Workload(LLAMA2_7B, gpu_framework=EAGER))
    assert fast.target_gpu_tree(60, 256) - fast.target_gpu(1, 256, layers, head=True) == pytest.approx(
        fw.call_s * (fw.calls_per_tree_verify - fw.calls_per_step))
    # A100-like (2 TB/s, 312 TFLOP/s), no framework: 60 rows of fp16 7B cost at most 10% more than one row
    a100 = RooflineCosts(_gpu(2.0e12, 312e12), Workload(LLAMA2_7B))
    assert a100.target_gpu_tree(60, 256) < 1.10 * a100.target_gpu(1, 256, layers, head=True)


def test_eagle2_tree_assembly_grows_with_its_tokens_eagle1_does_not() -> None:
    fw = resolve_gpu_framework(EAGER)
    hw = _gpu(1e15)

    def host(kind: str, t: int) -> float:
        return RooflineCosts(hw, Workload(LLAMA2_7B, EAGLE, TreeConfig(10, 5, t), gpu_framework=EAGER)
                             ).draft_tree_host(kind)

    assert host("eagle2", 60) - host("eagle2", 26) == pytest.approx(fw.call_s * 3 * 34)
    assert host("eagle1", 60) == pytest.approx(host("eagle1", 26))
    with pytest.raises(ConfigError, match="no tree assembly"):
        host("medusa", 26)


def test_host_bound_speedup_is_tau_times_the_ratio_of_counted_calls() -> None:
    """On a GPU too fast to matter, an EAGLE-2 row's speedup = tau x calls(decode step) / calls(cycle)."""
    mod = analysis_script("compare_published")
    mod.GPUS["fast"] = {"peak_flops": 1e18, "mem_bw": 1e16, "vram": 80 * 2 ** 30, "gen": 4, "lanes": 16}
    row = {"id": "x", "hardware": {"gpu": "fast"}, "model": "llama2-7b", "engine": "EAGLE-2 (PyTorch eager)",
           "kind": "gpu-speculative", "tree": [10, 5, 60], "tau": 4.0, "split": "held-out"}
    k, d, t, layers = 10, 5, 60, 32
    step = layers * 77 + 40
    cycle = layers * 77 + 75 + (d + 1) * 92 + (d + 1) * 18 + 12 + 35 + 3 * (t - 1)
    assert k == row["tree"][0]
    assert mod.predict(row)["predicted"] == pytest.approx(4.0 * step / cycle, rel=1e-6)


def test_cli_gpu_framework_error_is_one_line(capsys) -> None:  # noqa: ANN001
    rc = cli.main(["simulate", "--gpu-framework", "nope", "--tau", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err


def test_decode_loops_count_their_own_calls_and_attention() -> None:
    """A named decode loop (the code a baseline ran) prices a decode step with its own counts: HF generate's SDPA
    layers (fused: no score traffic), Sequoia's eager layers (unfused); other phases keep EAGLE's counts."""
    fw = resolve_gpu_framework(EAGER)
    layers = LLAMA2_7B.num_layers
    hf, seq = fw.loop("hf-generate"), fw.loop("sequoia")
    assert hf.calls_per_layer < fw.calls_per_layer and hf.attn_score_bytes == 0
    assert seq.attn_score_bytes == fw.attn_score_bytes
    for name, loop in (("hf-generate", hf), ("sequoia", seq)):
        wl = Workload(LLAMA2_7B, gpu_framework=EAGER, decode_loop=name)
        fast = RooflineCosts(_gpu(1e15), wl)
        assert fast.target_gpu(1, 256, layers, head=True) == pytest.approx(
            fw.call_s * (layers * loop.calls_per_layer + loop.calls_per_step))
        assert fast.target_gpu(4, 256, 10) == pytest.approx(fw.call_s * 10 * fw.calls_per_layer)  # not a step
    slow_hw = _gpu(1e11)  # GPU-bound: HF's step is the plain roofline, without EAGLE's score bytes
    assert RooflineCosts(slow_hw, Workload(LLAMA2_7B, gpu_framework=EAGER, decode_loop="hf-generate")).target_gpu(
        1, 256, layers, head=True) == pytest.approx(RooflineCosts(slow_hw, Workload(LLAMA2_7B)).target_gpu(
            1, 256, layers, head=True))
    with pytest.raises(ConfigError, match="no decode loop"):
        Workload(LLAMA2_7B, gpu_framework=EAGER, decode_loop="vllm")
    with pytest.raises(ConfigError, match="needs a gpu framework"):
        Workload(LLAMA2_7B, decode_loop="hf-generate")


def test_spec_bench_speedup_is_against_hf_generate_layers() -> None:
    """A Spec-Bench row on a host-bound GPU: tau x calls(HF generate step) / calls(EAGLE-2 cycle)."""
    mod = analysis_script("compare_published")
    mod.GPUS["fast"] = {"peak_flops": 1e18, "mem_bw": 1e16, "vram": 80 * 2 ** 30, "gen": 4, "lanes": 16}
    fw = resolve_gpu_framework(EAGER)
    row = {"id": "x", "source": "specbench", "hardware": {"gpu": "fast"}, "model": "llama2-7b",
           "engine": "EAGLE-2 (PyTorch eager)", "kind": "gpu-speculative", "tree": [10, 5, 60], "tau": 4.0,
           "split": "held-out"}
    d, t, layers = 5, 60, 32
    hf = fw.loop("hf-generate")
    step = layers * hf.calls_per_layer + hf.calls_per_step
    cycle = layers * 77 + 75 + (d + 1) * 92 + (d + 1) * 18 + 12 + 35 + 3 * (t - 1)
    assert mod.predict(row)["predicted"] == pytest.approx(4.0 * step / cycle, rel=1e-6)
