"""Acceptance models: how many draft tokens a verification accepts, as a distribution per tree shape.

A single mean hides what matters (the cap at the tree depth, and which outcomes a pipelined draft can guess), so
every model yields the full distribution of a (accepted draft tokens, 0..cap) for a given tree, plus the
probabilities of the outcomes a speculative next tree can cover. Sources: per-depth rates, a tau, a Sequoia-style
positional vector (tree-aware), or measured runs of the decoding loop.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from dovetail_jax.config import TreeConfig
from simulator.errors import ConfigError
from simulator.workload import MAX_GUESSES

PROFILES_FILE = Path(__file__).parent / "data" / "acceptance_profiles.json"


@dataclass(frozen=True)
class Outcomes:
    """Distribution of one verification's result for a given tree.

    p_a[j] = P(a = j). Sampling classes (cls_*) refine it for the pipelined schedule: class c has probability
    cls_p[c], accepts cls_a[c] tokens and is covered by the speculative tree of rank cls_rank[c] (-1: by none).
    With prompt lookup (`tree.lookup` = L), `chain_p` is the share of cycles whose verification carries the
    chain (T + L tokens instead of T) and `p_a` runs up to max_accepted + L.
    """

    p_a: np.ndarray
    cls_p: np.ndarray
    cls_a: np.ndarray
    cls_rank: np.ndarray
    chain_p: float = 0.0

    @property
    def tau(self) -> float:
        """Expected tokens per cycle: accepted drafts + the bonus token."""
        return float(np.dot(np.arange(len(self.p_a)) + 1, self.p_a))

    @property
    def cap(self) -> int:
        return len(self.p_a) - 1

    def hit_probability(self, m: int) -> float:
        """P(the outcome is covered by one of the first m speculative trees)."""
        return float(self.cls_p[(self.cls_rank >= 0) & (self.cls_rank < m)].sum())

    def cdf(self) -> np.ndarray:
        c = np.cumsum(self.cls_p)
        return c / c[-1]

    def sample(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(accepted drafts a, speculative-tree rank) of n cycles. Common random numbers: the same seed gives the
        same uniforms for every configuration (less noisy sweeps)."""
        u = np.random.default_rng(seed).random(n)
        cls = np.searchsorted(self.cdf(), u, side="right")
        cls = np.minimum(cls, len(self.cls_p) - 1)
        return self.cls_a[cls], self.cls_rank[cls]


def _build_outcomes(p_a: np.ndarray, guesses: list[tuple[float, int]], chain_p: float = 0.0) -> Outcomes:
    p_a = np.clip(np.asarray(p_a, dtype=float), 0.0, None)
    p_a = p_a / p_a.sum()
    guesses = sorted((g for g in guesses if g[0] > 0), key=lambda g: -g[0])[:MAX_GUESSES]
    rest = p_a.copy()
    cls_p, cls_a, cls_rank = [], [], []
    for r, (p, a) in enumerate(guesses):
        p = min(p, rest[a])
        rest[a] -= p
        cls_p.append(p), cls_a.append(a), cls_rank.append(r)
    for a, p in enumerate(rest):
        cls_p.append(max(p, 0.0)), cls_a.append(a), cls_rank.append(-1)
    return Outcomes(p_a, np.array(cls_p), np.array(cls_a, dtype=np.int64), np.array(cls_rank, dtype=np.int64),
                    chain_p)


def _check_rates(name: str, rates: Sequence[float]) -> list[float]:
    if len(rates) == 0:
        raise ConfigError(f"{name}: at least one value is needed")
    out = []
    for r in rates:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or not 0.0 <= r <= 1.0:
            raise ConfigError(f"{name}: acceptance rates must be numbers in [0, 1], got {r!r}")
        out.append(float(r))
    return out


class AcceptanceModel(ABC):
    """Maps a tree shape to the distribution of its verification outcome (cached per tree)."""

    def outcomes(self, tree: TreeConfig) -> Outcomes:
        if tree.lookup and not self.prices_lookup:
            raise ConfigError(f"{self.describe()}: prompt lookup (a chain of {tree.lookup}) is priced only from "
                              "measured runs of the same tree and chain length (--runs) or by an acceptance "
                              "profile fitted with lookup (a `lookup` entry in simulator/data/"
                              "acceptance_profiles.json)")
        return self._cached(tree)

    prices_lookup = False  # whether it knows how often a lookup chain is verified and what it adds

    @lru_cache(maxsize=512)  # noqa: B019 - models are few and long-lived
    def _cached(self, tree: TreeConfig) -> Outcomes:
        return self._outcomes(tree)

    @abstractmethod
    def _outcomes(self, tree: TreeConfig) -> Outcomes: ...

    @abstractmethod
    def describe(self) -> str: ...

    @property
    def tree_aware(self) -> bool:
        """Whether the width of the tree changes acceptance (False: only the depth cap does)."""
        return False


@dataclass(frozen=True)
class LookupChains:
    """How prompt-lookup chains (`TreeConfig.lookup`) add to any drafted tree, fitted once per draft and dataset.

    A chain is grafted in a share `chain_share` of cycles (the context's last tokens occurred earlier: a property of
    the text, not of the tree). Its tokens agree with the target's m times in a row, P(m >= 1) = `match_first`
    and P(m >= j + 1 | m >= j) = `match_continue`. If the drafted tree accepts t tokens and m > t, the chain's
    first t tokens spell the accepted path (they agree with the target), so it hangs below the accepted node and
    the cycle accepts min(m, t + L); else it accepts t. m is drawn apart from t: a correlation (the draft also
    copies well where the text repeats) is left to the fit of the two rates.
    """

    chain_share: float
    match_first: float
    match_continue: float

    def __post_init__(self) -> None:
        _check_rates("prompt-lookup chain share and match rates",
                     [self.chain_share, self.match_first, self.match_continue])

    def p_accept(self, p_tree: np.ndarray, lookup: int) -> np.ndarray:
        """P(a = k), k = 0 .. cap + lookup, of a cycle whose drafted tree alone gives `p_tree` (k = 0 .. cap)."""
        cap = len(p_tree) - 1
        surv = np.ones(cap + lookup + 2)  # surv[j] = P(m >= j)
        surv[1:] = self.match_first * self.match_continue ** np.arange(cap + lookup + 1)
        q, p = self.chain_share, np.zeros(cap + lookup + 1)
        for t, pt in enumerate(p_tree):
            p[t] += pt * (1 - q + q * (1 - surv[t + 1]))
            p[t + 1:t + lookup] += pt * q * (surv[t + 1:t + lookup] - surv[t + 2:t + lookup + 1])
            p[t + lookup] += pt * q * surv[t + lookup]
        return p

    def outcomes(self, plain: Outcomes, lookup: int) -> Outcomes:
        """The drafted tree's outcomes with a chain of `lookup` tokens; the pipelined guesses are the tree's,
        kept for the cycles without a chain."""
        guesses = [((1 - self.chain_share) * float(p), int(a))
                   for p, a, r in zip(plain.cls_p, plain.cls_a, plain.cls_rank, strict=True) if r >= 0]
        return _build_outcomes(self.p_accept(plain.p_a, lookup), guesses, self.chain_share)

    def describe(self) -> str:
        return (f"lookup chains in {self.chain_share:.0%} of cycles, first token agrees {self.match_first:.2f}, "
                f"each next {self.match_continue:.2f}")


class ChainAcceptance(AcceptanceModel):
    """Per-depth conditional rates along the accepted path: P(a >= j | a >= j-1) = alphas[j-1] (last one repeats).

    Only the depth cap of the tree matters. The pipelined guess covers only a fully accepted path whose bonus is the
    draft's top-1 (probability alpha of the next depth); a rejected top-1 leaves the bonus unknown.
    """

    def __init__(self, alphas: Sequence[float]) -> None:
        self.alphas = _check_rates("per-depth acceptance", alphas)

    def rate(self, j: int) -> float:
        return self.alphas[min(j, len(self.alphas)) - 1]

    def _outcomes(self, tree: TreeConfig) -> Outcomes:
        cap = tree.max_accepted
        ge = np.ones(cap + 2)
        for j in range(1, cap + 1):
            ge[j] = ge[j - 1] * self.rate(j)
        ge[cap + 1] = 0.0
        p_a = ge[:-1] - ge[1:]
        return _build_outcomes(p_a, [(p_a[cap] * self.rate(cap + 1), cap)])

    def describe(self) -> str:
        return "per-depth rates " + ", ".join(f"{a:.3g}" for a in self.alphas)


def chain_tau(alpha: float, gamma: int) -> float:
    """Closed form E[tokens per cycle] of a chain of gamma drafts with i.i.d. acceptance alpha."""
    return float(gamma + 1) if alpha == 1.0 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


class TauAcceptance(AcceptanceModel):
    """A user's tau (mean tokens per cycle), turned into i.i.d. per-depth acceptance for each tree's depth cap."""

    def __init__(self, tau: float) -> None:
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau < 1:
            raise ConfigError(f"tau must be a number >= 1 (tokens per cycle incl. the bonus), got {tau!r}")
        self.tau = float(tau)

    def alpha_for(self, cap: int) -> float:
        if self.tau > cap + 1 + 1e-9:
            raise ConfigError(f"tau={self.tau:g} is impossible for a tree whose paths accept at most {cap} "
                              f"tokens (max tau {cap + 1})")
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if chain_tau(mid, cap) < self.tau else (lo, mid)
        return (lo + hi) / 2

    def _outcomes(self, tree: TreeConfig) -> Outcomes:
        return ChainAcceptance([self.alpha_for(tree.max_accepted)])._outcomes(tree)

    def describe(self) -> str:
        return f"tau {self.tau:g}"


class PositionalAcceptance(AcceptanceModel):
    """Sequoia-style: the target's next token is the draft's rank-r candidate with probability p[r] * decay^(d-1)
    at depth d. The tree is built the EAGLE-2 way (beam of top_k per level, top total_tokens-1 nodes by path
    probability), so wider and deeper trees accept more, with diminishing returns.
    """

    def __init__(self, p_rank: Sequence[float], decay: float = 1.0) -> None:
        p = sorted(_check_rates("rank acceptance probabilities", p_rank), reverse=True)
        if sum(p) > 1 + 1e-9:
            raise ConfigError(f"rank acceptance probabilities are exclusive events and must sum to <= 1, "
                              f"got {sum(p):.4g}")
        _check_rates("depth decay", [decay])
        self.p, self.decay = np.array(p), float(decay)

    def _p_at(self, depth: int, k: int) -> np.ndarray:
        out = np.zeros(k + 1)
        n = min(k + 1, len(self.p))
        out[:n] = self.p[:n] * self.decay ** (depth - 1)
        return out

    def tree_nodes(self, tree: TreeConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Selected nodes (EAGLE-2 beam + rerank): log path probability, depth, parent (-1 = root), rank."""
        k, d_max, n_sel = tree.top_k, tree.depth, tree.total_tokens - 1  # draft nodes verified
        with np.errstate(divide="ignore"):
            lp1 = np.log(self._p_at(1, k)[:k])
        score, depth, parent, rank = [lp1], [np.ones(k, int)], [np.full(k, -1)], [np.arange(k)]
        front = np.argsort(-lp1, kind="stable")[:k]  # pool indices of the frontier
        base, fscore, start = 0, lp1, k
        for i in range(1, d_max + 1):
            with np.errstate(divide="ignore"):
                lp = np.log(self._p_at(i + 1, k)[:k])
            cs = (fscore[front - base][:, None] + lp[None, :]).ravel()
            score.append(cs), depth.append(np.full(k * k, i + 1)), rank.append(np.tile(np.arange(k), k))
            parent.append(np.repeat(front, k))
            base, fscore = start, cs
            front = start + np.argsort(-cs, kind="stable")[:k]
            start += k * k
        s, dp, pa, rk = (np.concatenate(x) for x in (score, depth, parent, rank))
        order = np.sort(np.lexsort((np.arange(len(s)), -s))[:n_sel])
        sel_parent = np.where(pa[order] >= 0, np.searchsorted(order, pa[order]), -1)
        return s[order], dp[order], sel_parent, rk[order]

    def _outcomes(self, tree: TreeConfig) -> Outcomes:
        s, dp, pa, _ = self.tree_nodes(tree)
        pv = np.exp(s)
        cap = tree.max_accepted
        ge = np.zeros(cap + 2)
        ge[0] = 1.0
        np.add.at(ge, np.minimum(dp, cap + 1), pv)
        p_a = ge[:-1] - ge[1:]
        # children per node (index -1 = root) and their total acceptance mass
        n = len(pv)
        kids = np.bincount(pa + 1, minlength=n + 1)
        kid_mass = np.bincount(pa + 1, weights=pv, minlength=n + 1)
        guesses = []
        for v in range(-1, n):
            p_node = 1.0 if v < 0 else pv[v]
            d = 0 if v < 0 else int(dp[v])
            deepest = p_node - kid_mass[v + 1]
            c = int(kids[v + 1])
            nxt = self._p_at(d + 1, max(c + 1, tree.top_k))
            denom = 1.0 - nxt[:c].sum()
            q = nxt[c] / denom if denom > 1e-12 and c < len(nxt) else 0.0
            guesses.append((deepest * q, d))
        return _build_outcomes(p_a, guesses)

    def describe(self) -> str:
        return "rank probs " + ", ".join(f"{x:.3g}" for x in self.p) + f", depth decay {self.decay:g}"

    @property
    def tree_aware(self) -> bool:
        return True


class HistogramAcceptance(AcceptanceModel):
    """A measured distribution of a for one tree shape; other trees are refused (use a fitted model there)."""

    prices_lookup = True

    def __init__(self, tree: TreeConfig, counts: Sequence[float], chain_share: float | None = None) -> None:
        c = np.asarray(counts, dtype=float)
        if c.ndim != 1 or len(c) == 0 or (c < 0).any() or c.sum() <= 0 or not np.isfinite(c).all():
            raise ConfigError("accept histogram must be a non-empty list of counts >= 0 with a positive sum")
        if tree.lookup and chain_share is None:
            raise ConfigError(f"a histogram measured with prompt lookup ({tree.lookup}) needs its share of cycles "
                              "that verified a chain")
        q = float(chain_share or 0.0)
        if not 0.0 <= q <= 1.0 or (q > 0 and not tree.lookup):
            raise ConfigError(f"chain share must be in [0, 1] and needs a tree with lookup, got {q} for {tree}")
        self.tree, self.counts, self.chain_share = tree, c, q

    def _outcomes(self, tree: TreeConfig) -> Outcomes:
        if tree != self.tree:
            raise ConfigError(f"the measured accept histogram is for {self.tree}, not {tree}")
        p = np.zeros(tree.max_accepted + tree.lookup + 1)
        n = min(len(self.counts), len(p))
        p[:n] = self.counts[:n]
        p[-1] += self.counts[n:].sum()
        # guess: the full-path outcome with the next-depth rate measured at the last depth
        ge = np.cumsum(p[::-1])[::-1]
        last_rate = ge[-1] / ge[-2] if len(ge) > 1 and ge[-2] > 0 else 0.0
        return _build_outcomes(p, [(p[-1] / p.sum() * last_rate, len(p) - 1)], self.chain_share)

    def describe(self) -> str:
        chain = f" lookup={self.tree.lookup} (chain in {self.chain_share:.0%} of cycles)" if self.tree.lookup else ""
        return f"measured histogram for top_k={self.tree.top_k} depth={self.tree.depth} " \
               f"total_tokens={self.tree.total_tokens}{chain}"


# ---------------------------------------------------------------------------------------------------------------
# Measured runs of `dovetail generate --mode dovetail --json`


@dataclass(frozen=True)
class RunStats:
    """What the simulator needs from one measured run."""

    tree: TreeConfig | None  # with `lookup` when the run grafted prompt-lookup chains
    draft_layers: int | None
    hist: np.ndarray | None  # counts of a = 0, 1, ...
    depth_rates: list[float] | None
    tau: float | None
    raw: dict[str, Any]
    chain_share: float | None = None  # with lookup: share of cycles that verified a chain


def _get(d: dict[str, Any], *names: str) -> Any:
    for n in names:
        cur: Any = d
        for part in n.split("."):
            cur = cur.get(part) if isinstance(cur, dict) else None
        if cur is not None:
            return cur
    return None


def parse_run(d: dict[str, Any], where: str = "run") -> RunStats:
    """Read one run's JSON (keys of `dovetail generate --json`; tree/draft keys flat or nested)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: a run must be a JSON object")
    k, depth, total = (_get(d, f"tree.{x}", x) for x in ("top_k", "depth", "total_tokens"))
    lookup = int(_get(d, "tree.lookup") or 0)
    tree = TreeConfig(int(k), int(depth), int(total), lookup=lookup) if None not in (k, depth, total) else None
    chain_share = None
    if lookup:
        chained, cycles = _get(d, "lookup.cycles"), _get(d, "cycles")
        if chained is None or not cycles:
            raise ConfigError(f"{where}: a run with prompt lookup needs its cycles and lookup.cycles")
        chain_share = float(chained) / float(cycles)
    layers = _get(d, "draft.n_layers", "draft_layers", "draft.layers")
    tau = _get(d, "tau")
    hist = _get(d, "accept_hist")
    h = None
    if hist is not None:
        if isinstance(hist, dict):  # {"0": count, ...}
            hist = [hist.get(str(i), hist.get(i, 0)) for i in range(max(int(x) for x in hist) + 1)]
        h = np.asarray(hist, dtype=float)
        if h.ndim != 1 or (h < 0).any() or h.sum() <= 0:
            raise ConfigError(f"{where}: accept_hist must be a list of counts >= 0 with a positive sum")
        # index = a (accepted drafts) by convention; shift if it is clearly tokens per cycle (a + 1)
        if tau is not None and h[0] == 0:
            mean_idx = float(np.dot(np.arange(len(h)), h) / h.sum())
            if abs(mean_idx - float(tau)) < abs(mean_idx + 1 - float(tau)):
                h = h[1:]
    rates = _get(d, "depth_accept_rates", "per_depth_accept", "accept_rate_by_depth", "acceptance_by_depth")
    if rates is not None:
        rates = _check_rates(f"{where}: per-depth acceptance", rates)
    if h is None and rates is None and tau is None:
        raise ConfigError(f"{where}: no accept_hist, per-depth acceptance rates or tau in this run")
    return RunStats(tree, int(layers) if layers is not None else None, h, rates,
                    float(tau) if tau is not None else None, d, chain_share)


def load_runs(path: str | Path) -> list[RunStats]:
    """A JSON file holding one run object, a list of runs, or {"runs": [...]}; or a .jsonl of runs."""
    p = Path(path)
    try:
        text = p.read_text()
        if p.suffix == ".jsonl":
            data: Any = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read runs {str(path)!r}: {e}") from None
    if isinstance(data, dict) and "runs" in data:
        data = data["runs"]
    runs = data if isinstance(data, list) else [data]
    if not runs:
        raise ConfigError(f"{path}: no runs")
    return [parse_run(r, f"{path}[{i}]") for i, r in enumerate(runs)]


def _fittable(runs: Sequence[RunStats]) -> list[RunStats]:
    """Runs a tree-shape model can be fitted to: histogram and tree known, and no lookup chain (its tokens are
    not the drafted tree's)."""
    return [r for r in runs if r.tree is not None and r.hist is not None and not r.tree.lookup]


def _hist_loglik(p: np.ndarray, hist: np.ndarray) -> float:
    """Log-likelihood of a measured accept histogram under P(a = k) = p[k] (counts past the cap go to the cap)."""
    h = np.zeros(len(p))
    n = min(len(h), len(hist))
    h[:n] = hist[:n]
    h[-1] += hist[n:].sum()
    return float(np.dot(h, np.log(np.maximum(p, 1e-12))))


def _loglik(model: AcceptanceModel, runs: Sequence[RunStats]) -> float:
    ll = 0.0
    for r in runs:
        assert r.tree is not None and r.hist is not None
        ll += _hist_loglik(model.outcomes(r.tree).p_a, r.hist)
    return ll


def fit_positional(runs: Sequence[RunStats], k_max: int = 10) -> PositionalAcceptance:
    """Maximum-likelihood fit of p_r = p1 * rho^(r-1) (r = 1..k_max) and a depth decay to measured histograms.

    Three parameters transfer measured acceptance to tree shapes that were not run (the tuner's question).
    """
    usable = _fittable(runs)
    if not usable:
        raise ConfigError("fitting acceptance needs runs with accept_hist and their tree (top_k, depth, "
                          "total_tokens), without prompt lookup")
    k_max = max([k_max] + [r.tree.top_k for r in usable if r.tree is not None])

    def model(p1: float, rho: float, dec: float) -> PositionalAcceptance:
        ps = [p1 * rho ** i for i in range(k_max)]
        s = sum(ps)
        if s > 1:
            ps = [x / s for x in ps]
        return PositionalAcceptance(ps, dec)

    best = (-math.inf, 0.5, 0.3, 1.0)
    for p1 in np.linspace(0.05, 0.95, 19):
        for rho in np.linspace(0.05, 0.9, 10):
            for dec in (0.8, 0.9, 0.95, 1.0):
                ll = _loglik(model(p1, rho, dec), usable)
                if ll > best[0]:
                    best = (ll, p1, rho, dec)
    _, p1, rho, dec = best
    step = np.array([0.05, 0.09, 0.05])
    for _ in range(12):  # coordinate refinement
        improved = False
        for i in range(3):
            for sgn in (-1, 1):
                cand = [p1, rho, dec]
                cand[i] = float(np.clip(cand[i] + sgn * step[i], 1e-3, 1.0))
                ll = _loglik(model(*cand), usable)
                if ll > best[0] + 1e-12:
                    best, (p1, rho, dec), improved = (ll, *cand), cand, True
        if not improved:
            step /= 2
    return model(p1, rho, dec)


class MixtureAcceptance(AcceptanceModel):
    """Context-dependent acceptance (EAGLE-2's observation): a share w of contexts follows one positional model
    and 1 - w another, and each context's tree is built for its own model (a dynamic tree), so the outcome
    distribution of a tree shape is the weighted mix of the components' distributions.

    A single positional model cannot give wide trees deep accepted paths (its best total_tokens - 1 nodes are
    shallow), which the shipped drafts' runs show; a confident and an uncertain context class can.
    """

    def __init__(self, components: Sequence[PositionalAcceptance], weights: Sequence[float]) -> None:
        w = _check_rates("mixture weights", weights)
        if len(w) != len(components) or not components or abs(sum(w) - 1) > 1e-3:
            raise ConfigError("mixture weights must be one per component and sum to 1")
        self.components, self.weights = list(components), [x / sum(w) for x in w]  # rounding in stored profiles

    def _outcomes(self, tree: TreeConfig) -> Outcomes:
        outs = [c.outcomes(tree) for c in self.components]
        p_a = sum(w * o.p_a for w, o in zip(self.weights, outs, strict=True))
        # guesses: each component's speculative classes, weighted (ranked again by probability)
        guesses = [(w * float(p), int(a)) for w, o in zip(self.weights, outs, strict=True)
                   for p, a, r in zip(o.cls_p, o.cls_a, o.cls_rank, strict=True) if r >= 0]
        return _build_outcomes(np.asarray(p_a), guesses)

    def describe(self) -> str:
        return "mixture of " + "; ".join(f"{w:.2f} x ({c.describe()})" for w, c in
                                         zip(self.weights, self.components, strict=True))

    @property
    def tree_aware(self) -> bool:
        return True


def mixture_from(w: float, p_hi: float, p_lo: float, rho: float, decay: float, k_max: int = 10
                 ) -> MixtureAcceptance:
    """Two context classes with geometric rank profiles p_r = p1 * rho^(r-1) (normalised to sum <= 1)."""

    def comp(p1: float) -> PositionalAcceptance:
        ps = [p1 * rho ** i for i in range(k_max)]
        s = sum(ps)
        return PositionalAcceptance([x / s for x in ps] if s > 1 else ps, decay)

    return MixtureAcceptance([comp(p_hi), comp(p_lo)], [w, 1 - w])


def fit_mixture(runs: Sequence[RunStats], k_max: int = 10) -> MixtureAcceptance:
    """Maximum-likelihood fit of `mixture_from`'s five numbers to measured histograms (coordinate search)."""
    usable = _fittable(runs)
    if not usable:
        raise ConfigError("fitting acceptance needs runs with accept_hist and their tree, without prompt lookup")
    k_max = max([k_max] + [r.tree.top_k for r in usable if r.tree is not None])
    lo_b, hi_b = [0.01, 0.2, 0.0, 0.01, 0.3], [0.99, 0.999, 0.6, 0.9, 1.0]

    def ll(x: Sequence[float]) -> float:
        return _loglik(mixture_from(*x, k_max=k_max), usable)

    best_x, best = None, -math.inf
    for seed in ([0.3, 0.85, 0.3, 0.3, 0.9], [0.5, 0.7, 0.2, 0.2, 0.8], [0.2, 0.9, 0.35, 0.4, 0.95]):
        x, f = list(seed), ll(seed)
        step = [0.1, 0.05, 0.05, 0.1, 0.05]
        for _ in range(60):
            improved = False
            for i in range(5):
                for sgn in (-1, 1):
                    c = list(x)
                    c[i] = min(max(c[i] + sgn * step[i], lo_b[i]), hi_b[i])
                    fc = ll(c)
                    if fc > f + 1e-9:
                        x, f, improved = c, fc, True
            if not improved:
                step = [s / 2 for s in step]
                if max(step) < 2e-3:
                    break
        if f > best:
            best_x, best = x, f
    assert best_x is not None
    return mixture_from(*best_x, k_max=k_max)


def fit_lookup(base: AcceptanceModel, runs: Sequence[RunStats]) -> LookupChains:
    """Maximum-likelihood match rates of `LookupChains` on measured runs with prompt lookup, their drafted trees
    priced by `base`; the chain share is the runs' own (weighted by cycles)."""
    usable = [r for r in runs if r.tree is not None and r.tree.lookup and r.hist is not None]
    if not usable:
        raise ConfigError("fitting prompt-lookup chains needs runs with prompt lookup, their tree and accept_hist")
    weights = [float(r.hist.sum()) for r in usable if r.hist is not None]
    share = float(np.average([r.chain_share or 0.0 for r in usable], weights=weights))
    plain = [base.outcomes(TreeConfig(r.tree.top_k, r.tree.depth, r.tree.total_tokens)).p_a
             for r in usable if r.tree is not None]

    def ll(first: float, cont: float) -> float:
        total = 0.0
        for r, p_tree in zip(usable, plain, strict=True):
            assert r.tree is not None and r.hist is not None
            total += _hist_loglik(LookupChains(share, first, cont).p_accept(p_tree, r.tree.lookup), r.hist)
        return total

    grid = np.linspace(0.02, 0.98, 49)
    _, first, cont = max((ll(a, b), a, b) for a in grid for b in grid)
    step = 0.01
    while step > 1e-4:  # coordinate refinement
        cands = [(first + da, cont + db) for da, db in ((step, 0), (-step, 0), (0, step), (0, -step))]
        better = max(((ll(a, b), a, b) for a, b in cands if 0 < a < 1 and 0 < b < 1), default=None)
        if better is not None and better[0] > ll(first, cont) + 1e-12:
            _, first, cont = better
        else:
            step /= 2
    return LookupChains(share, float(first), float(cont))


class RunsAcceptance(AcceptanceModel):
    """Measured runs: the pooled histogram when the tree was measured, else a positional model fitted to them."""

    def __init__(self, runs: Sequence[RunStats], draft_layers: int | None = None) -> None:
        if not runs:
            raise ConfigError("no measured runs given")
        sel = [r for r in runs if draft_layers is None or r.draft_layers in (None, draft_layers)]
        self.runs = sel or list(runs)
        self._fit: AcceptanceModel | None = None

    prices_lookup = True  # for the trees (and chain lengths) it measured

    def _fallback(self) -> AcceptanceModel:
        """The model for trees that were not measured, from the runs without prompt lookup (a chain's tokens
        say nothing about another drafted tree)."""
        if self._fit is None:
            plain = [r for r in self.runs if r.tree is None or not r.tree.lookup]
            if not plain:
                raise ConfigError("every measured run used prompt lookup: only their own tree and chain length "
                                  f"can be priced ({sorted({str(r.tree) for r in self.runs})})")
            if _fittable(plain):
                self._fit = fit_positional(plain)
            else:
                rates = next((r.depth_rates for r in plain if r.depth_rates), None)
                if rates:
                    self._fit = ChainAcceptance(rates)
                else:
                    taus = [r.tau for r in plain if r.tau is not None]
                    self._fit = TauAcceptance(float(np.mean(taus)))
        return self._fit

    def _outcomes(self, tree: TreeConfig) -> Outcomes:
        same = [r for r in self.runs if r.tree == tree and r.hist is not None]
        if same:
            n = max(len(r.hist) for r in same if r.hist is not None)
            c = np.zeros(n)
            for r in same:
                assert r.hist is not None
                c[: len(r.hist)] += r.hist
            shares = [r.chain_share or 0.0 for r in same]
            weights = [float(r.hist.sum()) for r in same if r.hist is not None]
            share = float(np.average(shares, weights=weights)) if tree.lookup else None
            return HistogramAcceptance(tree, c, share)._outcomes(tree)
        if tree.lookup:
            measured = sorted({str(r.tree) for r in self.runs if r.tree is not None and r.tree.lookup})
            raise ConfigError(f"prompt lookup ({tree}) is priced only from measured runs of the same tree and chain "
                              f"length; these runs have {measured or 'no lookup'}")
        return self._fallback().outcomes(tree)

    def describe(self) -> str:
        try:
            other = self._fallback().describe()
        except ConfigError:
            other = "none (every run used prompt lookup)"
        return f"{len(self.runs)} measured run(s); other trees: {other}"

    @property
    def tree_aware(self) -> bool:
        try:
            return self._fallback().tree_aware
        except ConfigError:
            return False


# ---------------------------------------------------------------------------------------------------------------
# Named acceptance profiles (package data, fitted by analysis/fit_acceptance_profiles.py)


@lru_cache(maxsize=2)
def _profiles(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read acceptance profiles {path!r}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("profiles"), dict):
        raise ConfigError(f"{path}: expected a 'profiles' object")
    return data


def list_profiles() -> list[str]:
    return list(_profiles(str(PROFILES_FILE))["profiles"])


def default_profile(model_key: str) -> str | None:
    """The profile used for `model_key` when the user names none (None: no default for that model)."""
    return _profiles(str(PROFILES_FILE)).get("defaults", {}).get(model_key.lower())


class ProfileAcceptance(MixtureAcceptance):
    """A named, shipped acceptance model: one or more context classes (weight, rank probabilities, depth decay),
    each a tree-aware positional model, and for the drafts measured with prompt lookup its `LookupChains` (which
    price a chain of any length on any tree); `describe` says where its numbers come from."""

    def __init__(self, name: str) -> None:
        profiles = _profiles(str(PROFILES_FILE))["profiles"]
        if name not in profiles:
            raise ConfigError(f"unknown acceptance profile {name!r}; choose from {', '.join(profiles)}")
        p = profiles[name]
        comps = p.get("components")
        if not isinstance(comps, list) or not comps:
            raise ConfigError(f"acceptance profile {name!r} has no components")
        super().__init__([PositionalAcceptance(c["p_rank"], c["depth_decay"]) for c in comps],
                         [float(c["weight"]) for c in comps])
        self.name, self.info = name, p
        lk = p.get("lookup")
        self.chains = None if lk is None else LookupChains(float(lk["chain_share"]), float(lk["match_first"]),
                                                           float(lk["match_continue"]))
        self.prices_lookup = self.chains is not None

    def _outcomes(self, tree: TreeConfig) -> Outcomes:
        plain = super()._outcomes(TreeConfig(tree.top_k, tree.depth, tree.total_tokens))
        return self.chains.outcomes(plain, tree.lookup) if tree.lookup and self.chains else plain

    def describe(self) -> str:
        chains = f"; {self.chains.describe()}" if self.chains else ""
        return f"profile {self.name} ({self.info['description']}){chains}"
