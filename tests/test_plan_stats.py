"""The JAX-free planning and statistics modules: power-of-two sizes against brute force, acceptance statistics
against per-cycle counts, and the JSON record's keys."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from dovetail_jax import plan
from dovetail_jax.config import ModelConfig, TreeConfig
from dovetail_jax.errors import ConfigError
from dovetail_jax.stats import (
    Acceptance,
    DovetailStats,
    DraftInfo,
    GenerationStats,
    PhaseTimes,
    PrefillTimes,
    Transfers,
)

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, max_position_embeddings=512)


def smallest_pow2(n: int, minimum: int) -> int:
    p = 1
    while p < n or p < minimum:
        p *= 2
    return p


def test_pow2_at_least_matches_brute_force():
    for n in range(1, 700):
        for minimum in (1, 16, 64, 128):
            assert plan.pow2_at_least(n, minimum) == smallest_pow2(n, minimum)


def test_generation_sizes():
    assert plan.plan_sizes(CFG, 5, 20) == (16, 128)
    assert plan.plan_sizes(CFG, 17, 200) == (32, 256)
    bucket, slots = plan.plan_sizes(CFG, 300, 200)  # 500 rounds up to 512 = the context
    assert (bucket, slots) == (512, 512)
    tree = TreeConfig(2, 3, 5)
    assert plan.plan_dovetail(CFG, tree, 10, 118) == plan.plan_sizes(CFG, 10, 118 + tree.width)
    for prompt, new in ((0, 4), (4, 0), (500, 13)):
        with pytest.raises(ConfigError):
            plan.plan_sizes(CFG, prompt, new)
    with pytest.raises(ConfigError, match="longest path"):
        plan.plan_dovetail(CFG, tree, 500, 10)


def test_other_callers_sizes():
    assert plan.batch_sizes(20, 100) == (32, 256)
    assert plan.cache_slots(129) == 256 and plan.cache_slots(129, limit=200) == 200
    assert plan.train_length(3) == 64 and plan.train_length(65) == 128
    rng = np.random.default_rng(0)
    lengths = sorted(int(x) for x in rng.integers(1, 600, size=200))
    k = 0
    while k < len(lengths):
        t, rows = plan.feature_batch(lengths, k, 4096)
        # brute force: the smallest power of two >= 64 whose batch of 4096 // t rows holds its longest row
        want = next(p for p in (64 * 2 ** i for i in range(8))
                    if lengths[min(k + max(1, 4096 // p), len(lengths)) - 1] <= p)
        assert (t, rows) == (want, max(1, 4096 // want))
        assert max(lengths[k:k + rows]) <= t
        k += rows


def per_cycle_reference(counts: list[int], width: int) -> tuple[float, list[float | None]]:
    """tau and the depth acceptance rates straight from per-cycle committed counts."""
    tau = sum(counts) / len(counts)
    rates: list[float | None] = []
    for d in range(width - 1):
        reached = [c for c in counts if c - 1 >= d]
        rates.append(sum(1 for c in reached if c - 1 >= d + 1) / len(reached) if reached else None)
    return tau, rates


def test_acceptance_against_per_cycle_counts():
    rng = np.random.default_rng(1)
    runs = [[int(c) for c in rng.integers(1, 4, size=int(rng.integers(1, 30)))] for _ in range(5)]
    width = 6
    accs = [Acceptance(tuple(np.bincount(np.asarray(r) - 1, minlength=width).tolist())) for r in runs]
    for r, a in zip(runs, accs, strict=True):
        tau, rates = per_cycle_reference(r, width)
        assert a.cycles == len(r) and a.committed == sum(r)
        assert a.tau == pytest.approx(tau) and a.depth_accept_rates == pytest.approx(rates)
    pooled = Acceptance.pool(accs)
    tau, rates = per_cycle_reference([c for r in runs for c in r], width)
    assert pooled.tau == pytest.approx(tau) and pooled.depth_accept_rates == pytest.approx(rates)
    assert Acceptance.from_dict(pooled.to_dict()) == pooled
    assert Acceptance.pool([Acceptance((1, 2)), Acceptance((0, 0, 3))]).hist == (1, 2, 3)
    assert Acceptance(()).tau is None and Acceptance.pool([]).cycles == 0


def test_json_record_keys():
    base = dict(prompt_tokens=5, new_tokens=9, stop_reason="length", compile_s=1.0, prefill_s=0.1, decode_s=0.4,
                decode_steps=8, cache_slots=128, prompt_bucket=16)
    target = GenerationStats(mode="target", **base).to_dict()
    assert list(target) == ["mode", "prompt_tokens", "new_tokens", "stop_reason", "compile_s", "prefill_s",
                            "decode_s", "decode_steps", "tokens_per_s", "cache_slots", "prompt_bucket"]
    assert target["tokens_per_s"] == pytest.approx(20.0)
    x = DovetailStats(TreeConfig(2, 2, 4), DraftInfo(1, "dgf", 32, "random (seed 0)", "random"),
                      Transfers(100, 40, 3, 3, 60), PhaseTimes(0.2, 0.1, 0.05, 0.01), PrefillTimes(0.05, 0.01, 0.02))
    d = GenerationStats(mode="dovetail", **base, acceptance=Acceptance((1, 0, 3)), dovetail=x).to_dict()
    assert list(d) == ["mode", "prompt_tokens", "new_tokens", "stop_reason", "compile_s", "prefill_s", "decode_s",
                       "decode_steps", "tokens_per_s", "cycles", "tau", "accept_hist", "depth_accept_rates",
                       "bytes_to_draft", "bytes_to_target", "transfers_to_draft", "transfers_to_target",
                       "prefill_bytes_to_draft", "time_s", "prefill_time_s", "tree", "draft", "cache_slots",
                       "prompt_bucket"]
    assert d["tau"] == pytest.approx(10 / 4) and d["accept_hist"] == [1, 0, 3]
    assert d["depth_accept_rates"] == pytest.approx([0.75, 1.0])
    assert d["draft"] == {"n_layers": 1, "fusion": "dgf", "vocab": 32, "source": "random (seed 0)"}
    assert d["tree"] == {"top_k": 2, "depth": 2, "total_tokens": 4, "lookup": 0}
    assert list(d["time_s"]) == ["verify", "draft", "transfer", "host"]
    assert x.draft.is_random
    empty = GenerationStats(mode="dovetail", **base, acceptance=Acceptance((0, 0, 0)), dovetail=x).to_dict()
    assert empty["tau"] == 0.0 and empty["depth_accept_rates"] == [0.0, 0.0]  # one run: 0 where undefined


def test_plan_stats_paths_import_without_jax():
    code = ("import sys; import dovetail_jax.plan, dovetail_jax.stats, dovetail_jax.paths, dovetail_jax.model; "
            "assert 'jax' not in sys.modules, 'JAX imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
