"""The Dovetail loop on tiny random targets: greedy output equals target-only decoding, sampling follows the
target's distribution (and an injected verifier bug is caught), statistics and byte counts add up, bad input
is refused."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dovetail_helpers import random_draft, self_draft, tiny_target
from scipy import stats as sps

from dovetail_jax import devices
from dovetail_jax.config import DraftConfig, SamplingConfig, TreeConfig
from dovetail_jax.decode import dovetail as DV
from dovetail_jax.decode import programs, target_only
from dovetail_jax.errors import ConfigError
from dovetail_jax.model.cache import init_cache
from dovetail_jax.model.target import causal_mask, forward
from dovetail_jax.speculation import accept as accept_lib
from dovetail_jax.speculation import sampling

TREES = [TreeConfig(1, 4, 5), TreeConfig(3, 2, 6), TreeConfig(10, 4, 7), TreeConfig(10, 7, 16), TreeConfig(1, 1, 1)]


@pytest.fixture(scope="module")
def tiny():
    return tiny_target(vocab=96, seed=3, scale=0.5)


@pytest.mark.parametrize("tree", TREES, ids=lambda t: f"{t.top_k}-{t.depth}-{t.total_tokens}")
def test_greedy_equals_target_only(tiny, tree):
    cfg, params = tiny
    drafts = [random_draft(cfg, params, DraftConfig(1, "dgf")), self_draft(cfg, params),
              random_draft(cfg, params, DraftConfig(2, "eagle", draft_vocab_size=48), seed=1)]
    rng = np.random.default_rng(0)
    longest = 0
    for i in range(4):
        prompt = rng.integers(0, cfg.vocab_size, size=int(rng.integers(3, 17))).tolist()  # one prompt bucket
        ref, _ = target_only.generate(params, cfg, prompt, 48, ignore_eos=True)
        for d in drafts:
            out, st = DV.generate(params, cfg, d, prompt, 48, tree, ignore_eos=True)
            assert out == ref, f"draft {d.source}, prompt {i}: first divergence at " \
                               f"{next(j for j, (a, b) in enumerate(zip(out, ref, strict=False)) if a != b)}"
            hist = st.acceptance.hist
            assert sum(n * (k + 1) for k, n in enumerate(hist)) >= len(out) - 1
            if d.source == "self":
                longest = max(longest, max(k for k, n in enumerate(hist) if n))
    # the self-draft really gets long paths accepted
    assert longest >= min(tree.max_accepted, 4)


def test_eos_stops_like_target_only(tiny):
    cfg, params = tiny
    prompt = [5, 17, 3, 44]
    ref, _ = target_only.generate(params, cfg, prompt, 40, ignore_eos=True)
    eos = ref[9]  # a token that occurs: generation must stop at its first occurrence, inclusive
    want, st_ref = target_only.generate(params, cfg, prompt, 40, eos_ids=(eos,))
    got, st = DV.generate(params, cfg, self_draft(cfg, params), prompt, 40, TreeConfig(2, 4, 8), eos_ids=(eos,))
    assert got == want and st.stop_reason == st_ref.stop_reason == "eos"
    got, st = DV.generate(params, cfg, self_draft(cfg, params), prompt, 13, TreeConfig(1, 6, 7), ignore_eos=True)
    assert got == ref[:13] and st.stop_reason == "length"


def test_statistics_and_bytes(tiny):
    cfg, params = tiny
    tree = TreeConfig(3, 3, 8)
    d = self_draft(cfg, params)
    prompt = list(range(10))
    out, st = DV.generate(params, cfg, d, prompt, 30, tree, ignore_eos=True)
    x = st.to_dict()  # the JSON record
    hist = x["accept_hist"]
    assert len(hist) == tree.width and x["cycles"] == sum(hist)
    assert x["tau"] == pytest.approx(sum((k + 1) * n for k, n in enumerate(hist)) / x["cycles"])
    h, w = cfg.hidden_size, tree.width
    bucket = x["prompt_bucket"]
    # prefill: features [1, P, H] f32 + ids [1, P] + count; each cycle after the first: [1, W, H] + [1, W] + count
    per_cycle = w * h * 4 + w * 4 + 4
    drafted_cycles = x["transfers_to_draft"] - 1
    assert x["prefill_bytes_to_draft"] == bucket * h * 4 + bucket * 4 + 4
    assert x["bytes_to_draft"] == x["prefill_bytes_to_draft"] + drafted_cycles * per_cycle
    # back: tokens [T] + parents [T] int32, once per tree
    assert x["bytes_to_target"] == x["transfers_to_target"] * 2 * tree.total_tokens * 4
    assert x["transfers_to_target"] == drafted_cycles + 1
    assert drafted_cycles in (x["cycles"] - 1, x["cycles"])
    assert set(x["time_s"]) == {"draft", "verify", "transfer", "host"}
    assert sum(x["time_s"].values()) <= st.decode_s + 1e-3
    assert x["depth_accept_rates"] and all(0 <= r <= 1 for r in x["depth_accept_rates"])
    # placement: the draft (weights, embedding and head copies) on the accelerator, the target on the CPU
    acc, cpu = devices.accelerator_device(), devices.target_device()
    assert acc != cpu  # the package made a second host device
    assert all(leaf.devices() == {acc} for leaf in jax.tree.leaves((d.params, d.shared)))
    assert all(leaf.devices() == {cpu} for leaf in jax.tree.leaves(params))


def test_bad_requests_are_refused(tiny):
    cfg, params = tiny
    d = random_draft(cfg, params, DraftConfig(1, "dgf", draft_vocab_size=8))
    with pytest.raises(ConfigError, match="exceeds the model's context"):
        DV.generate(params, cfg, d, [1] * 410, 100, TreeConfig(2, 3, 5))  # 410 + 100 + 5 > 512
    with pytest.raises(ConfigError, match="vocabulary of 8"):
        DV.generate(params, cfg, d, [1, 2], 4, TreeConfig(10, 1, 3))
    for bad in ({"top_k": 0}, {"depth": 0}, {"total_tokens": 0}, {"top_k": 2, "depth": 1, "total_tokens": 9}):
        with pytest.raises(ValueError):
            TreeConfig(**{"top_k": 2, "depth": 2, "total_tokens": 4, **bad})


# --- sampling: the distribution of the first tokens ----------------------------------------------------------

N_FIRST = 3  # tokens whose joint distribution is tested (the second and third come from tree verification)
ALPHA = 1e-3  # significance level: a correct verifier fails with probability 1e-3


def exact_joint(cfg, params, prompt, s: SamplingConfig) -> dict[tuple[int, ...], float]:
    """The target's probability of every N_FIRST-token continuation, by enumeration over full forwards."""
    cache = init_cache(cfg, 64, device=devices.target_device())

    @jax.jit
    def next_probs(ids):
        logits, _, _ = forward(params, cfg, ids[None], jnp.arange(ids.shape[0])[None], causal_mask(ids.shape[0]),
                               cache, "last", ids.shape[0] - 1, empty_cache=True)
        return sampling.processed_probs(logits[0], jnp.float32(s.temperature), jnp.int32(s.top_k),
                                        jnp.float32(s.top_p))

    out: dict[tuple[int, ...], float] = {}

    def walk(prefix: tuple[int, ...], p: float) -> None:
        if len(prefix) == N_FIRST:
            out[prefix] = p
            return
        probs = np.asarray(next_probs(jnp.asarray(prompt + list(prefix), jnp.int32)), np.float64)
        for t in np.flatnonzero(probs > 0):
            walk(prefix + (int(t),), p * probs[t])

    walk((), 1.0)
    return out


def chi2_pvalue(counts: dict[tuple[int, ...], int], probs: dict[tuple[int, ...], float], n: int) -> float:
    """Pearson chi-square; cells with expected count < 5 are pooled into one."""
    assert set(counts) <= set(probs), f"impossible outcomes sampled: {set(counts) - set(probs)}"
    obs, exp, pool_o, pool_e = [], [], 0, 0.0
    for key, p in probs.items():
        if n * p >= 5:
            obs.append(counts.get(key, 0))
            exp.append(n * p)
        else:
            pool_o += counts.get(key, 0)
            pool_e += n * p
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    obs_a, exp_a = np.asarray(obs, float), np.asarray(exp, float)
    stat = float(((obs_a - exp_a) ** 2 / exp_a).sum())
    return float(sps.chi2.sf(stat, len(obs) - 1))


def sample_first(cfg, params, draft, prompt, tree, s: SamplingConfig, n: int) -> dict[tuple[int, ...], int]:
    counts: dict[tuple[int, ...], int] = {}
    for seed in range(n):
        out, _ = DV.generate(params, cfg, draft, prompt, N_FIRST, tree,
                             SamplingConfig(s.temperature, s.top_p, s.top_k, seed=seed), ignore_eos=True)
        counts[tuple(out)] = counts.get(tuple(out), 0) + 1
    return counts


@pytest.fixture(scope="module")
def small_vocab():
    return tiny_target(vocab=6, seed=11, scale=0.6)


@pytest.mark.parametrize("s", [SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.7, top_k=4, top_p=0.9)],
                         ids=["t1", "t0.7-k4-p0.9"])
def test_sampling_matches_target_distribution(small_vocab, s):
    cfg, params = small_vocab
    prompt = [1, 4, 2, 0, 3]
    probs = exact_joint(cfg, params, prompt, s)
    assert math.isclose(sum(probs.values()), 1.0, abs_tol=1e-5)
    tree = TreeConfig(2, 2, 6)  # siblings, so rejections and residuals are exercised
    counts = sample_first(cfg, params, random_draft(cfg, params, DraftConfig(1, "dgf"), seed=2), prompt, tree, s,
                          1500)
    assert chi2_pvalue(counts, probs, 1500) > ALPHA


@pytest.mark.parametrize("s", [SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.7, top_k=4, top_p=0.9)],
                         ids=["t1-unfiltered", "t0.7-k4-p0.9"])
def test_target_only_sampling_matches_target_distribution(small_vocab, s):
    """The baseline samples the same distribution, on its static path without a vocabulary sort (no top-k/top-p)
    as with one: speedups under sampling are over an honest target-only."""
    cfg, params = small_vocab
    prompt = [1, 4, 2, 0, 3]
    assert s.filtered == (s.top_k > 0)
    probs = exact_joint(cfg, params, prompt, s)
    counts: dict[tuple[int, ...], int] = {}
    for seed in range(1500):
        out, _ = target_only.generate(params, cfg, prompt, N_FIRST,
                                      SamplingConfig(s.temperature, s.top_p, s.top_k, seed=seed), ignore_eos=True)
        counts[tuple(out)] = counts.get(tuple(out), 0) + 1
    assert chi2_pvalue(counts, probs, 1500) > ALPHA


def test_injected_verifier_bug_is_caught(small_vocab, monkeypatch):
    """The same test with the rejected token left in the residual (no zeroing) must fail."""
    cfg, params = small_vocab
    prompt = [1, 4, 2, 0, 3]
    s = SamplingConfig(temperature=1.0)
    probs = exact_joint(cfg, params, prompt, s)

    def buggy_reject(p, x):
        return p / p.sum()  # forgets to zero the rejected token: it can then be emitted again

    monkeypatch.setattr(accept_lib, "_reject", buggy_reject)
    programs.clear()  # re-trace the verify step with the patched helper
    try:
        tree = TreeConfig(2, 2, 6)
        counts = sample_first(cfg, params, random_draft(cfg, params, DraftConfig(1, "dgf"), seed=2), prompt, tree,
                              s, 1500)
    finally:
        programs.clear()
    assert chi2_pvalue(counts, probs, 1500) < ALPHA


def test_exact_joint_is_complete(small_vocab):
    cfg, params = small_vocab
    probs = exact_joint(cfg, params, [1, 2], SamplingConfig(temperature=1.0))
    assert len(probs) == cfg.vocab_size ** N_FIRST
    assert set(probs) == set(itertools.product(range(cfg.vocab_size), repeat=N_FIRST))
