"""Tree acceptance: greedy against a plain-Python walk; sampling is lossless, checked exactly by enumerating
every decision of the rejection walk and statistically by sampling `accept_sampling` (with injected bugs)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dovetail_jax.speculation import accept, sampling

# --------------------------------------------------------------------------------------------------- trees


def py_path(parents: np.ndarray, i: int) -> list[int]:
    out = [i]
    while parents[out[-1]] >= 0:
        out.append(int(parents[out[-1]]))
    return out[::-1]


def random_tree(rng: np.random.Generator, t: int, v: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, parents): parents[j] uniform among earlier nodes with a free token; siblings distinct."""
    parents, tokens = [-1], [int(rng.integers(v))]
    used: dict[int, set[int]] = {}
    for _ in range(1, t):
        open_ = [i for i in range(len(parents)) if len(used.get(i, ())) < v]
        p = int(rng.choice(open_))
        free = sorted(set(range(v)) - used.get(p, set()))
        tok = int(rng.choice(free))
        used.setdefault(p, set()).add(tok)
        parents.append(p)
        tokens.append(tok)
    return np.array(tokens, np.int32), np.array(parents, np.int32)


def chain(rng: np.random.Generator, t: int, v: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.integers(0, v, t).astype(np.int32), np.arange(-1, t - 1, dtype=np.int32)


def tight_width(parents: np.ndarray) -> int:
    return max(len(py_path(parents, i)) for i in range(len(parents)))


# -------------------------------------------------------------------------------------------------- greedy


def py_greedy(tokens: np.ndarray, parents: np.ndarray, logits: np.ndarray) -> tuple[int, int]:
    """(node, bonus): from the root, follow the child whose token is the current node's argmax."""
    cur = 0
    while True:
        g = int(np.argmax(logits[cur]))
        nxt = [j for j in range(len(tokens)) if parents[j] == cur and tokens[j] == g]
        if not nxt:
            return cur, g
        cur = nxt[0]


def matching_logits(rng: np.random.Generator, tokens: np.ndarray, parents: np.ndarray, v: int) -> np.ndarray:
    """Random logits where, at most nodes with children, some child's token is the argmax."""
    logits = rng.standard_normal((len(tokens), v)).astype(np.float32)
    for i in range(len(tokens)):
        kids = np.flatnonzero(parents == i)
        if kids.size and rng.random() < 0.7:
            logits[i, tokens[rng.choice(kids)]] = logits[i].max() + 1.0
    return logits


_greedy = jax.jit(accept.accept_greedy, static_argnames="width")


def check_greedy(tokens: np.ndarray, parents: np.ndarray, logits: np.ndarray, width: int) -> accept.Acceptance:
    out = jax.device_get(_greedy(jnp.asarray(tokens), jnp.asarray(parents), jnp.asarray(logits), width=width))
    node, bonus = py_greedy(tokens, parents, logits)
    walk = py_path(parents, node)
    assert (int(out.node), int(out.bonus), int(out.num_accepted)) == (node, bonus, len(walk) - 1)
    np.testing.assert_array_equal(out.path, walk + [node] * (width - len(walk)))
    return out


def test_greedy_matches_python_walk():
    rng = np.random.default_rng(0)
    depths = []
    for _ in range(300):
        t, v = int(rng.choice([1, 4, 9, 16])), int(rng.choice([3, 5]))
        tokens, parents = random_tree(rng, t, v) if rng.random() < 0.75 else chain(rng, t, v)
        out = check_greedy(tokens, parents, matching_logits(rng, tokens, parents, v), width=t)
        depths.append(int(out.num_accepted))
    assert np.mean(depths) > 1 and max(depths) >= 5  # the walks really go deep


def test_greedy_single_node_and_ties():
    rng = np.random.default_rng(1)
    check_greedy(np.array([3], np.int32), np.array([-1], np.int32), rng.standard_normal((1, 6)), width=1)
    # all-equal logits: argmax is token 0 everywhere
    tokens, parents = np.array([5, 1, 0, 2, 0, 0], np.int32), np.array([-1, 0, 0, 0, 2, 4], np.int32)
    out = check_greedy(tokens, parents, np.zeros((6, 4), np.float32), width=4)
    assert int(out.node) == 5 and int(out.bonus) == 0


# ------------------------------------------------------------------------- sampling: exact enumeration


class Target:
    """A consistent random target over K-token continuations: one processed distribution per prefix.

    Prefixes of length m are numbered offset[m] + (base-V value), so all prefixes of one length are in the
    C order of a `[V] * m` array and the K-token joint is built by repeated outer products.
    """

    def __init__(self, rng: np.random.Generator, v: int, k: int, t: float, top_k: int, top_p: float,
                 scale: float = 1.5):
        self.v, self.k = v, k
        self.offset = np.concatenate([[0], np.cumsum(v ** np.arange(k))])
        self.logits = (rng.standard_normal((int(self.offset[-1]), v)) * scale).astype(np.float32)
        self.settings = (jnp.float32(t), jnp.int32(top_k), jnp.float32(top_p))
        self.probs = np.asarray(_processed(jnp.asarray(self.logits), *self.settings), np.float64)
        joint = np.ones(())
        for m in range(k):
            rows = self.probs[self.offset[m] : self.offset[m + 1]]  # [V^m, V]
            joint = (joint.reshape(-1, 1) * rows).reshape((v,) * (m + 1))
        self.joint = joint  # [V] * K

    def index(self, prefix: tuple[int, ...] | list[int]) -> int:
        return int(self.offset[len(prefix)] + sum(int(x) * self.v ** (len(prefix) - 1 - i)
                                                  for i, x in enumerate(prefix)))

    def tree_logits(self, tokens: np.ndarray, parents: np.ndarray) -> np.ndarray:
        """Row i: the target's logits after the drafted tokens on root..i (the root's own token excluded)."""
        return np.stack([self.logits[self.index([tokens[j] for j in py_path(parents, i)[1:]])]
                         for i in range(len(tokens))])

    def completed(self, outcomes: dict[tuple[int, ...], float]) -> np.ndarray:
        """K-token joint when each emitted sequence s (prob q) is continued by sampling the target."""
        out = np.zeros_like(self.joint)
        for s, q in outcomes.items():
            block = self.joint[s]
            mass = block.sum()
            out[s] += q * (block / mass if mass > 0 else np.full_like(block, 1 / block.size))
        return out


_processed = jax.jit(sampling.processed_probs)
_walk = jax.jit(accept.rejection_walk)


def enumerate_walk(walk: Callable, tokens: np.ndarray, parents: np.ndarray, probs: np.ndarray
                   ) -> list[tuple[int, np.ndarray, float]]:
    """Every complete accept/reject pattern of the walk: (node, residual, probability).

    Uniform 0 forces an accept (if p > 0), 1 a reject; a pattern's probability is the product of p or 1 - p
    over its tried nodes, which the walk reports. Branch on the first tried node not yet decided.
    """
    t = len(tokens)
    args = (jnp.asarray(tokens), jnp.asarray(parents), jnp.asarray(probs))

    def dfs(decided: dict[int, bool]) -> list[tuple[int, np.ndarray, float]]:
        u = np.ones(t, np.float32)
        u[[j for j, a in decided.items() if a]] = 0.0
        node, residual, trial_p, tried = jax.device_get(walk(*args, jnp.asarray(u)))
        prob = 1.0
        for j in np.flatnonzero(tried):  # index order = trial order
            if j not in decided:
                return dfs({**decided, j: True}) + dfs({**decided, j: False})
            prob *= float(trial_p[j]) if decided[j] else 1.0 - float(trial_p[j])
            if prob == 0.0:
                return []
        return [(int(node), np.asarray(residual, np.float64), prob)]

    return dfs({})


def emitted_distribution(patterns: list[tuple[int, np.ndarray, float]], tokens: np.ndarray, parents: np.ndarray
                         ) -> dict[tuple[int, ...], float]:
    """Distribution of the emitted sequence: accepted draft tokens then the bonus drawn from the residual
    (normalised here, as `jax.random.categorical` does, so only the walk's decisions and support matter)."""
    out: dict[tuple[int, ...], float] = {}
    for node, residual, prob in patterns:
        drafted = tuple(int(tokens[j]) for j in py_path(parents, node)[1:])
        residual = residual / residual.sum()
        for b in np.flatnonzero(residual > 0):
            out[(*drafted, int(b))] = out.get((*drafted, int(b)), 0.0) + prob * residual[b]
    return out


def exact_error(target: Target, tokens: np.ndarray, parents: np.ndarray, walk: Callable = _walk) -> float:
    """Largest |difference| between the completed outcome distribution and the target, over the K-token
    joint and all its prefix marginals."""
    probs = np.asarray(_processed(jnp.asarray(target.tree_logits(tokens, parents)), *target.settings))
    emitted = emitted_distribution(enumerate_walk(walk, tokens, parents, probs), tokens, parents)
    assert abs(sum(emitted.values()) - 1.0) < 1e-6
    diff = target.completed(emitted) - target.joint
    return max(np.abs(diff.sum(axis=tuple(range(m, target.k)))).max() for m in range(1, target.k + 1))


SETTINGS = [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.7, 0, 1.0), (1.0, 2, 1.0), (1.0, 0, 0.7), (0.8, 3, 0.9),
            (1.0, 1, 1.0), (1.0, 0, 0.05)]


@pytest.mark.parametrize("t,top_k,top_p", SETTINGS)
def test_walk_is_lossless_exactly(t, top_k, top_p):
    rng = np.random.default_rng([round(t * 10), top_k, round(top_p * 100)])
    for _ in range(8):
        n, v = int(rng.integers(1, 7)), int(rng.integers(3, 6))
        tokens, parents = random_tree(rng, n, v) if rng.random() < 0.8 else chain(rng, n, v)
        target = Target(rng, v, tight_width(parents) + 1, t, top_k, top_p)
        assert exact_error(target, tokens, parents) < 1e-6, (tokens, parents)


def test_walk_is_lossless_special_trees():
    rng = np.random.default_rng(7)
    cases = [
        (np.array([2], np.int32), np.array([-1], np.int32)),  # no draft: the bonus alone
        (np.array([0, 1, 1, 0, 2, 1], np.int32), np.arange(-1, 5, dtype=np.int32)),  # a chain
        (np.array([0, 1, 1, 2, 0, 0], np.int32), np.array([-1, 0, 0, 0, 1, 2], np.int32)),  # duplicate siblings
        (np.array([0, 2, 0, 1, 2, 2], np.int32), np.array([-1, 0, 0, 1, 1, 3], np.int32)),  # every token used
    ]
    for tokens, parents in cases:
        for setting in [(1.0, 0, 1.0), (0.7, 2, 0.9), (1.0, 1, 1.0)]:
            target = Target(rng, 3, tight_width(parents) + 1, *setting)
            assert exact_error(target, tokens, parents) < 1e-6, (tokens, parents, setting)


BUGS = {  # replacements for accept._reject that each break losslessness
    "no_renormalise": lambda p, x: p.at[x].set(0.0),
    "no_zeroing": lambda p, x: p / p.sum(),
}


@pytest.mark.parametrize("bug", ["no_renormalise", "no_zeroing"])
def test_exact_check_catches_a_wrong_residual(bug, monkeypatch):
    target = Target(np.random.default_rng(3), 4, 5, 1.0, 0, 1.0, scale=1.0)
    tokens, parents = draft_like_tree(target)
    # fresh functions each time: jit caches traces per function, and a trace made before the patch would be reused
    assert exact_error(target, tokens, parents, jax.jit(lambda *a: accept.rejection_walk(*a))) < 1e-6
    monkeypatch.setattr(accept, "_reject", BUGS[bug])
    assert exact_error(target, tokens, parents, jax.jit(lambda *a: accept.rejection_walk(*a))) > 1e-2


# ------------------------------------------------------------------------------ sampling: statistical

STAT_SETTING = (0.8, 0, 0.95)
NUM_DRAWS = 20_000


def draft_like_tree(target: Target) -> tuple[np.ndarray, np.ndarray]:
    """Children are the target's most likely tokens (as a good draft proposes), so rejections matter."""
    tokens, parents = [0], [-1]
    for parent, fanout in [(0, 3), (1, 2), (2, 1), (4, 1)]:
        prefix = [tokens[j] for j in py_path(np.array(parents), parent)[1:]]
        ranked = np.argsort(-target.probs[target.index(prefix)], kind="stable")
        for tok in ranked[:fanout]:
            tokens.append(int(tok))
            parents.append(parent)
    return np.array(tokens, np.int32), np.array(parents, np.int32)


def first_two_chi2(seed: int) -> float:
    """p-value of the emitted first two tokens (continued by the target when only one is emitted)."""
    rng = np.random.default_rng(seed)
    target = Target(rng, 4, 4, *STAT_SETTING, scale=1.0)
    tokens, parents = draft_like_tree(target)
    args = (jnp.asarray(tokens), jnp.asarray(parents), jnp.asarray(target.tree_logits(tokens, parents)))
    settings = target.settings
    width = tight_width(parents)
    draw = jax.jit(jax.vmap(lambda key: accept.accept_sampling(key, *args, *settings, width)))
    out = jax.device_get(draw(jax.random.split(jax.random.key(seed), NUM_DRAWS)))
    a = out.num_accepted
    first = np.where(a >= 1, tokens[out.path[:, 1]], out.bonus)
    second = np.where(a >= 2, tokens[out.path[:, 2]], out.bonus)
    # a == 0: only the bonus was emitted; continue with the target after it
    cdf = np.cumsum(target.probs[target.offset[1] + first], axis=1)
    sampled = np.minimum((rng.random((NUM_DRAWS, 1)) > cdf).sum(axis=1), target.v - 1)
    second = np.where(a == 0, sampled, second)
    observed = np.bincount(first * target.v + second, minlength=target.v**2)
    expected = target.joint.sum(axis=(2, 3)).ravel()
    assert observed[expected == 0].sum() == 0, "emitted a pair the target never produces"
    keep = expected > 0
    return stats.chisquare(observed[keep], NUM_DRAWS * expected[keep] / expected[keep].sum()).pvalue


def test_accept_sampling_matches_target_statistically():
    assert first_two_chi2(seed=11) > 1e-3


@pytest.mark.parametrize("bug", ["no_renormalise", "no_zeroing"])
def test_statistical_check_catches_a_wrong_residual(bug, monkeypatch):
    monkeypatch.setattr(accept, "_reject", BUGS[bug])
    assert first_two_chi2(seed=11) < 1e-6


# -------------------------------------------------------------- the processor is used everywhere


@pytest.mark.parametrize("t,top_k,top_p", [(1.0, 1, 1.0), (0.5, 1, 0.9), (1.3, 0, 1e-3)])
def test_point_mass_processing_makes_sampling_greedy(t, top_k, top_p):
    """With a processor that keeps only the argmax, every bonus (after a rejection or at a leaf) is the argmax:
    sampling acceptance equals greedy acceptance for every key."""
    rng = np.random.default_rng(5)
    keys = jax.random.split(jax.random.key(0), 32)
    for _ in range(20):
        n, v = int(rng.choice([3, 8])), 4
        tokens, parents = random_tree(rng, n, v) if rng.random() < 0.5 else chain(rng, n, v)
        logits = jnp.asarray(matching_logits(rng, tokens, parents, v))
        tok, par = jnp.asarray(tokens), jnp.asarray(parents)
        greedy = jax.device_get(_greedy(tok, par, logits, width=n))
        sampled = jax.device_get(_sample_many(keys, tok, par, logits, jnp.float32(t), jnp.int32(top_k),
                                              jnp.float32(top_p), n))
        for field in ("node", "num_accepted", "bonus", "path"):
            got, want = getattr(sampled, field), getattr(greedy, field)
            np.testing.assert_array_equal(got, np.broadcast_to(want, got.shape), err_msg=field)


@functools.partial(jax.jit, static_argnames=("width", "filtered"))
def _sample_many(keys, tokens, parents, logits, temperature, top_k, top_p, width, filtered=True):
    def one(key):
        return accept.accept_sampling(key, tokens, parents, logits, temperature, top_k, top_p, width, filtered)

    return jax.vmap(one)(keys)


def test_unfiltered_path_equals_filtered_when_filters_are_off():
    rng = np.random.default_rng(9)
    tokens, parents = random_tree(rng, 8, 6)
    logits = jnp.asarray(rng.standard_normal((8, 6)) * 2, jnp.float32)
    t, k, p = jnp.float32(0.7), jnp.int32(0), jnp.float32(1.0)
    np.testing.assert_allclose(sampling.processed_probs(logits, t, k, p, filtered=False),
                               sampling.processed_probs(logits, t, k, p), atol=1e-7)
    keys = jax.random.split(jax.random.key(1), 256)
    args = (keys, jnp.asarray(tokens), jnp.asarray(parents), logits, t, k, p, tight_width(parents))
    a, b = _sample_many(*args, filtered=False), _sample_many(*args)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
