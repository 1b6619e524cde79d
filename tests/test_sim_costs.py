"""Roofline costs on known shapes, PCIe arithmetic, measured and calibrated predictors."""

from __future__ import annotations

import pytest

from dovetail_jax.config import LLAMA2_7B, SMOLLM2_135M, DraftConfig, TreeConfig
from simulator.costs import MeasuredCosts, RooflineCosts, ScaledCosts, roofline_seconds
from simulator.hardware import CpuSpec, load_profile, pcie_bandwidth
from simulator.workload import Workload


def _cpu(bw: float = 50e9, flops: float = 1e15, n_half: float = 1e-9, dispatch: float = 0.0) -> CpuSpec:
    return CpuSpec("test", 2, flops, bw, 1.0, 1.0, n_half, dispatch, 64e9)


def test_smollm2_f32_weight_bytes() -> None:
    wl = Workload(SMOLLM2_135M, target_dtype="f32")
    # 134,515,008 parameters in the GGUF file (tied head counted once)
    assert SMOLLM2_135M.num_params == 134_515_008
    assert wl.target_weight_bytes() == 4 * 134_515_008


def test_llama2_7b_sizes() -> None:
    wl = Workload(LLAMA2_7B, DraftConfig(5), target_dtype="f32", draft_dtype="f16")
    assert LLAMA2_7B.num_params == pytest.approx(6.74e9, rel=0.01)
    assert wl.target_weight_bytes() / 1e9 == pytest.approx(27.0, rel=0.01)  # dovetail-method.md §1
    # 5-layer DGF draft: 5 x 202.4M + 67.1M + 2 x 131M parameters (method §3.2) in fp16
    assert wl.draft_params() == pytest.approx(5 * 202.4e6 + 67.1e6 + 2 * 131e6, rel=0.01)


def test_gemv_at_known_bandwidth() -> None:
    # 1 GB read at 10 GB/s = 0.1 s, negligible FLOPs, plus one 1 ms dispatch
    assert roofline_seconds(_cpu(bw=10e9, dispatch=1e-3), 1e9, 2e3, 1) == pytest.approx(0.101)


def test_compute_bound_and_n_half() -> None:
    dev = _cpu(bw=1e15, flops=1e12, n_half=8)
    # 1e12 FLOP at 1e12 FLOP/s x 8 / (8 + 8) = 2 s
    assert roofline_seconds(dev, 1.0, 1e12, 8) == pytest.approx(2.0)


def test_target_decode_is_weight_read() -> None:
    hw = load_profile("host-2core-shared")
    hw = hw.__class__(hw.name, _cpu(bw=50e9), hw.gpu, hw.link)
    wl = Workload(SMOLLM2_135M, prompt_len=8, new_tokens=8)
    t = RooflineCosts(hw, wl).target_cpu(1, 0)
    # all layers + tied head (the embedding table is the head) + 30 layers of 1-token KV; the final norm's
    # 576 weights are below the model's resolution
    nbytes = 4 * (SMOLLM2_135M.num_params - 576) + 30 * 2 * 192 * 4
    assert t == pytest.approx(nbytes / 50e9, rel=1e-6)


def test_pcie_rates() -> None:
    assert pcie_bandwidth(3, 16) == pytest.approx(15.754e9, rel=1e-3)
    assert pcie_bandwidth(4, 16) == pytest.approx(31.508e9, rel=1e-3)
    assert pcie_bandwidth(3, 8) == pytest.approx(7.877e9, rel=1e-3)
    assert pcie_bandwidth(2, 16) == pytest.approx(8e9)


def test_link_seconds() -> None:
    hw = load_profile("paper-server1-4214r-2080super")
    link = hw.link
    assert link.seconds(0) == link.latency_s
    assert link.seconds(1e9) == pytest.approx(link.latency_s + 1e9 / (15.754e9 * link.efficiency), rel=1e-3)


def test_measured_table_interpolates_and_falls_back() -> None:
    hw = load_profile("host-2core-shared")
    wl = Workload(SMOLLM2_135M, DraftConfig(1), TreeConfig(4, 3, 8))
    roof = RooflineCosts(hw, wl)
    table = {"ops": {"target_forward": [{"n": 1, "ctx": 128, "s": 0.010}, {"n": 8, "ctx": 128, "s": 0.017},
                                        {"n": 1, "ctx": 512, "s": 0.012}, {"n": 8, "ctx": 512, "s": 0.021}],
                     "host_tree": [{"s": 0.002}]}}
    m = MeasuredCosts(table, roof, SMOLLM2_135M.num_layers)
    assert m.target_cpu(4, 128) == pytest.approx(0.013)
    assert m.target_cpu(1, 320) == pytest.approx(0.011)  # halfway between the context groups
    assert m.target_cpu(16, 128) == pytest.approx(0.025)  # linear extrapolation past n = 8
    assert m.host_tree() == 0.002
    assert m.draft_pass(4, 128) == roof.draft_pass(4, 128)  # not measured: roofline
    half = m.target_cpu(1, 128, layers=15, head=False)
    assert 0 < half < 0.010


def test_scaled_costs_interpolate_in_log_n() -> None:
    hw = load_profile("host-2core-shared")
    wl = Workload(SMOLLM2_135M)
    base = RooflineCosts(hw, wl)
    s = ScaledCosts(base, [(1, 2.0), (16, 4.0)], draft=3.0)
    assert s.target_cpu(1, 100) == pytest.approx(2 * base.target_cpu(1, 100))
    assert s.target_factor(4) == pytest.approx(3.0)  # log2 4 is halfway between log2 1 and log2 16
    assert s.target_factor(64) == 4.0
    assert s.draft_pass(4, 10) == pytest.approx(3 * base.draft_pass(4, 10))
