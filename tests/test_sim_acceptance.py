"""Acceptance models against closed forms, and the simulated tau against the analytic one."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dovetail_jax.config import SMOLLM2_135M, DraftConfig, TreeConfig
from simulator.acceptance import (
    ChainAcceptance,
    HistogramAcceptance,
    LookupChains,
    PositionalAcceptance,
    ProfileAcceptance,
    RunsAcceptance,
    TauAcceptance,
    chain_tau,
    fit_lookup,
    load_runs,
    parse_run,
)
from simulator.errors import ConfigError
from simulator.hardware import load_profile
from simulator.schedules import SimOptions, simulate
from simulator.workload import Workload


def chain_tree(gamma: int) -> TreeConfig:
    """A chain of gamma drafts: top_k 1, gamma levels below the root."""
    return TreeConfig(1, max(gamma - 1, 1), gamma + 1)


@given(alpha=st.floats(0.0, 0.99), gamma=st.integers(1, 9))
@settings(max_examples=60, deadline=None)
def test_chain_closed_form(alpha: float, gamma: int) -> None:
    expected = (1 - alpha ** (gamma + 1)) / (1 - alpha)
    assert chain_tau(alpha, gamma) == pytest.approx(expected)
    assert ChainAcceptance([alpha]).outcomes(chain_tree(gamma)).tau == pytest.approx(expected)
    assert PositionalAcceptance([alpha]).outcomes(chain_tree(gamma)).tau == pytest.approx(expected)


@given(tau=st.floats(1.0, 7.9))
@settings(max_examples=30, deadline=None)
def test_tau_model_reproduces_tau(tau: float) -> None:
    out = TauAcceptance(tau).outcomes(TreeConfig(10, 7, 16))
    assert out.tau == pytest.approx(tau, abs=1e-6)
    assert out.p_a.min() >= 0 and out.p_a.sum() == pytest.approx(1.0)


def test_per_depth_rates() -> None:
    out = ChainAcceptance([0.8, 0.5]).outcomes(TreeConfig(4, 3, 8))  # cap 4, the last rate repeats
    ge = [1, 0.8, 0.4, 0.2, 0.1]
    assert out.tau == pytest.approx(sum(ge))
    assert out.p_a == pytest.approx([0.2, 0.4, 0.2, 0.1, 0.1])


def test_positional_tree_is_eagle2_shaped() -> None:
    acc = PositionalAcceptance([0.6, 0.2, 0.1], 0.9)
    s, depth, parent, _ = acc.tree_nodes(TreeConfig(10, 5, 30))
    assert len(s) == 29
    for i, p in enumerate(parent):
        if p >= 0:
            assert p < i and depth[i] == depth[p] + 1 and s[i] <= s[p]
        else:
            assert depth[i] == 1
    taus = [acc.outcomes(TreeConfig(10, 5, t)).tau for t in (2, 4, 8, 16, 32, 60)]
    assert all(b >= a for a, b in zip(taus, taus[1:], strict=False))  # a bigger tree never accepts less


def test_hit_probabilities_are_consistent() -> None:
    out = PositionalAcceptance([0.6, 0.2, 0.1], 0.9).outcomes(TreeConfig(4, 3, 8))
    assert out.cls_p.sum() == pytest.approx(1.0)
    for a in range(out.cap + 1):
        assert out.cls_p[out.cls_a == a].sum() == pytest.approx(out.p_a[a])
    hits = [out.hit_probability(m) for m in range(0, 5)]
    assert hits[0] == 0 and all(b >= a for a, b in zip(hits, hits[1:], strict=False)) and hits[-1] < 1


def test_simulated_tau_converges_to_analytic() -> None:
    acc = PositionalAcceptance([0.55, 0.2, 0.1, 0.05], 0.95)
    wl = Workload(SMOLLM2_135M, DraftConfig(1), TreeConfig(4, 4, 10), draft_dtype="f32")
    out = acc.outcomes(wl.tree)
    n = 40_000
    p = simulate("dovetail", load_profile("host-2core-shared"), wl, acc, opts=SimOptions(cycles=n, seed=3))
    sd = math.sqrt(float(np.dot((np.arange(out.cap + 1) + 1 - out.tau) ** 2, out.p_a)))
    assert abs(p.tau - out.tau) < 4 * sd / math.sqrt(n)
    assert p.tau_model == pytest.approx(out.tau)


@pytest.mark.parametrize("bad", [[-0.1], [1.2], [float("nan")], []])
def test_rates_outside_unit_interval(bad: list[float]) -> None:
    with pytest.raises(ConfigError):
        ChainAcceptance(bad)


def test_bad_tau_and_rank_probs() -> None:
    with pytest.raises(ConfigError, match="impossible"):
        TauAcceptance(9.0).outcomes(TreeConfig(10, 4, 7))
    with pytest.raises(ConfigError, match=">= 1"):
        TauAcceptance(0.5)
    with pytest.raises(ConfigError, match="sum to <= 1"):
        PositionalAcceptance([0.7, 0.5])


def _run(tree: tuple[int, int, int], hist: list[int], **extra: object) -> dict:
    k, d, t = tree
    n = sum(hist)
    tau = sum((a + 1) * c for a, c in enumerate(hist)) / n
    return {"mode": "dovetail", "tree": {"top_k": k, "depth": d, "total_tokens": t}, "accept_hist": hist,
            "tau": tau, "cycles": n, **extra}


def test_runs_loader_and_fit(tmp_path) -> None:  # noqa: ANN001
    runs = [_run((4, 3, 8), [30, 40, 20, 8, 2]), _run((8, 4, 16), [20, 35, 25, 12, 6, 2])]
    f = tmp_path / "runs.json"
    f.write_text(json.dumps({"runs": runs}))
    acc = RunsAcceptance(load_runs(f))
    same = acc.outcomes(TreeConfig(4, 3, 8))
    assert same.p_a == pytest.approx(np.array([30, 40, 20, 8, 2]) / 100)
    other = acc.outcomes(TreeConfig(6, 4, 12))  # not measured: the fitted positional model
    assert 1.5 < other.tau < 3.5 and acc.tree_aware


def test_hist_indexed_by_tokens_is_shifted() -> None:
    r = _run((4, 3, 8), [30, 40, 20, 8, 2])
    r["accept_hist"] = [0] + r["accept_hist"]  # index = tokens per cycle (a + 1)
    assert list(parse_run(r).hist) == [30, 40, 20, 8, 2]


def test_run_without_acceptance_data() -> None:
    with pytest.raises(ConfigError, match="no accept_hist"):
        parse_run({"mode": "dovetail", "tokens_per_s": 3.0})


# --- prompt lookup: priced from runs of the same tree and chain only ------------------------------------------

def _lookup_run(hist: list[int], chained: int, lookup: int = 6) -> dict:
    """A `dovetail generate --mode dovetail --json` record of the default tree with a lookup chain."""
    return {"tree": {"top_k": 4, "depth": 3, "total_tokens": 6, "lookup": lookup}, "cycles": sum(hist),
            "accept_hist": hist, "tau": float(np.dot(np.arange(len(hist)) + 1, hist) / sum(hist)),
            "lookup": {"cycles": chained, "tokens": 10}}


def test_runs_with_lookup_price_their_own_tree_and_chain_share() -> None:
    a = parse_run(_lookup_run([10, 10, 10, 5, 5, 0, 0, 0, 0, 0, 10], 20))
    b = parse_run(_lookup_run([0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0))
    assert a.tree == TreeConfig(4, 3, 6, lookup=6) and a.chain_share == pytest.approx(20 / 50)
    out = RunsAcceptance([a, b]).outcomes(a.tree)
    assert out.cap == 10 and out.chain_p == pytest.approx(20 / 60)  # pooled over the runs' cycles
    hist = np.array([10, 20, 10, 5, 5, 0, 0, 0, 0, 0, 10], float)
    assert out.tau == pytest.approx(float(np.dot(np.arange(11) + 1, hist) / hist.sum()))
    with pytest.raises(ConfigError, match="every measured run used prompt lookup"):
        RunsAcceptance([a, b]).outcomes(TreeConfig(4, 3, 6))  # nothing to fit the drafted tree to
    with pytest.raises(ConfigError, match="measured runs of the same tree"):
        RunsAcceptance([a]).outcomes(TreeConfig(4, 3, 6, lookup=4))  # another chain length


def test_lookup_runs_stay_out_of_the_tree_fit_and_fitted_models_refuse_chains() -> None:
    plain = parse_run({"tree": {"top_k": 4, "depth": 3, "total_tokens": 6}, "accept_hist": [40, 30, 20, 10, 5]})
    chained = parse_run(_lookup_run([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 99], 99))
    both = RunsAcceptance([plain, chained]).outcomes(TreeConfig(4, 4, 8))
    alone = RunsAcceptance([plain]).outcomes(TreeConfig(4, 4, 8))
    assert both.tau == pytest.approx(alone.tau)  # the chain's 11-token cycles did not inflate the fit
    for model in (TauAcceptance(2.5), ChainAcceptance([0.7])):
        with pytest.raises(ConfigError, match="prompt lookup"):
            model.outcomes(TreeConfig(4, 3, 6, lookup=6))
    with pytest.raises(ConfigError, match="lookup.cycles"):
        parse_run({**_lookup_run([1, 1], 1), "lookup": None})


def _enumerated_chain(p_tree: list[float], lookup: int, share: float, first: float, cont: float) -> np.ndarray:
    """P(a = k) by enumeration: t drafted tokens accepted, a chain present or not, m = 0..199 chain tokens agreeing
    (P(m >= j) = first * cont^(j-1)) and the tail m >= 200 (longer than any t + L here, so it gives t + L); a chain
    hangs below the accepted node when m > t and gives min(m, t + L)."""
    cap = len(p_tree) - 1
    assert cap + lookup < 200
    p = np.zeros(cap + lookup + 1)
    surv = [1.0] + [first * cont ** (j - 1) for j in range(1, 201)]
    for t, pt in enumerate(p_tree):
        p[t] += pt * (1 - share)
        for m in range(200):
            pm = surv[m] - surv[m + 1]
            p[max(t, min(m, t + lookup))] += pt * share * pm
        p[t + lookup] += pt * share * surv[200]
    return p


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.01, 1.0), min_size=1, max_size=6), st.integers(1, 12), st.floats(0.0, 1.0),
       st.floats(0.0, 1.0), st.floats(0.0, 0.99))
def test_lookup_chains_match_enumeration(w: list[float], lookup: int, share: float, first: float,
                                         cont: float) -> None:
    p_tree = list(np.asarray(w) / sum(w))
    got = LookupChains(share, first, cont).p_accept(np.asarray(p_tree), lookup)
    assert got.shape == (len(p_tree) + lookup,) and got.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(got, _enumerated_chain(p_tree, lookup, share, first, cont), atol=1e-9)


def test_lookup_chains_limits() -> None:
    p_tree = np.array([0.4, 0.3, 0.2, 0.1])
    tau = float(np.dot(np.arange(4) + 1, p_tree))
    for chains in (LookupChains(0.0, 0.9, 0.9), LookupChains(0.7, 0.0, 0.9)):  # no chain, or never agrees
        out = chains.p_accept(p_tree, 5)
        np.testing.assert_allclose(out[:4], p_tree)
        np.testing.assert_allclose(out[4:], 0)
    # a chain in every cycle that always agrees: every cycle accepts t + L
    np.testing.assert_allclose(LookupChains(1.0, 1.0, 1.0).p_accept(p_tree, 5), np.r_[0, 0, 0, 0, 0, p_tree])
    # the mean grows with the chain length and the share
    taus = [float(np.dot(np.arange(4 + L) + 1, LookupChains(0.4, 0.6, 0.9).p_accept(p_tree, L))) for L in (1, 4, 8)]
    assert tau < taus[0] < taus[1] < taus[2]
    with pytest.raises(ConfigError, match="chain share"):
        LookupChains(1.5, 0.5, 0.5)


def test_fit_lookup_recovers_the_chain_rates_from_an_exact_histogram() -> None:
    tree, plain = TreeConfig(4, 3, 6, lookup=6), [0.3, 0.3, 0.2, 0.12, 0.08]
    truth = LookupChains(0.35, 0.65, 0.85)
    hist = list(truth.p_accept(np.asarray(plain), 6) * 1e6)
    run = parse_run({"tree": {"top_k": 4, "depth": 3, "total_tokens": 6, "lookup": 6}, "accept_hist": hist,
                     "cycles": 1e6, "lookup": {"cycles": 0.35e6, "tokens": 1}})
    got = fit_lookup(HistogramAcceptance(TreeConfig(4, 3, 6), plain), [run])
    assert got.chain_share == pytest.approx(0.35)
    assert got.match_first == pytest.approx(0.65, abs=2e-3) and got.match_continue == pytest.approx(0.85, abs=2e-3)
    assert RunsAcceptance([run]).outcomes(tree).tau == pytest.approx(
        got.outcomes(HistogramAcceptance(TreeConfig(4, 3, 6), plain).outcomes(TreeConfig(4, 3, 6)), 6).tau,
        rel=1e-4)
    with pytest.raises(ConfigError, match="runs with prompt lookup"):
        fit_lookup(TauAcceptance(2.0), [parse_run({"tree": {"top_k": 4, "depth": 3, "total_tokens": 6},
                                                   "accept_hist": plain})])


def test_default_profile_prices_a_chain_on_any_tree() -> None:
    """The shipped default draft's profiles carry `LookupChains` fitted to its full-set run with lookup 6: any
    tree and chain length is priced, the drafted tree exactly as without lookup."""
    for name in ("smollm2-dgf1", "smollm2-dgf1-humaneval", "smollm2-dgf1-mtbench"):
        prof = ProfileAcceptance(name)
        assert prof.prices_lookup and prof.chains is not None and "lookup chains" in prof.describe()
        for tree in (TreeConfig(4, 3, 6), TreeConfig(10, 7, 16)):
            plain = prof.outcomes(tree)
            for L in (2, 6, 12):
                out = prof.outcomes(TreeConfig(tree.top_k, tree.depth, tree.total_tokens, lookup=L))
                assert out.cap == plain.cap + L and out.chain_p == prof.chains.chain_share
                np.testing.assert_allclose(out.p_a, prof.chains.p_accept(plain.p_a, L))
                assert out.tau > plain.tau
    # a profile without a lookup fit still refuses a chain
    with pytest.raises(ConfigError, match="prompt lookup"):
        ProfileAcceptance("smollm2-eagle1").outcomes(TreeConfig(4, 3, 6, lookup=6))
