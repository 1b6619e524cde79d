"""The logits processor against Hugging Face's warpers, and the sampler's empirical distribution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dovetail_jax.speculation import sampling

torch = pytest.importorskip("torch")
lp = pytest.importorskip("transformers.generation.logits_process")

SETTINGS = [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.9), (0.8, 10, 0.5), (2.0, 3, 0.95),
            (1.0, 1, 1.0), (0.5, 0, 0.05)]


def hf_probs(logits: np.ndarray, t: float, k: int, p: float) -> np.ndarray:
    x = torch.tensor(logits)
    procs = [lp.TemperatureLogitsWarper(t)]
    if k > 0:
        procs.append(lp.TopKLogitsWarper(k))
    if p < 1.0:
        procs.append(lp.TopPLogitsWarper(p))
    for proc in procs:
        x = proc(None, x)
    return torch.softmax(x, dim=-1).numpy()


@pytest.mark.parametrize("t,k,p", SETTINGS)
def test_processed_probs_match_hf(t, k, p):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((6, 50)) * 3).astype(np.float32)
    ours = np.asarray(sampling.processed_probs(jnp.asarray(logits), jnp.float32(t), jnp.int32(k), jnp.float32(p)))
    np.testing.assert_allclose(ours, hf_probs(logits, t, k, p), atol=1e-6)
    np.testing.assert_allclose(ours.sum(-1), 1.0, atol=1e-5)


def test_top_k_larger_than_vocab_is_no_op():
    logits = jnp.asarray(np.random.default_rng(1).standard_normal((2, 7)), jnp.float32)
    a = sampling.processed_probs(logits, jnp.float32(1.0), jnp.int32(100), jnp.float32(1.0))
    np.testing.assert_allclose(np.asarray(a), np.asarray(jax.nn.softmax(logits, -1)), atol=1e-6)


def test_sample_follows_processed_distribution():
    """Chi-square-free check: 40k draws, every probability within 5 standard errors."""
    logits = jnp.asarray([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], jnp.float32)
    t, k, p = jnp.float32(0.9), jnp.int32(4), jnp.float32(0.9)
    probs = np.asarray(sampling.processed_probs(logits, t, k, p))
    n = 40_000
    keys = jax.random.split(jax.random.key(0), n)
    draws = np.asarray(jax.vmap(lambda kk: sampling.sample(kk, logits, t, k, p))(keys))
    freq = np.bincount(draws, minlength=6) / n
    se = np.sqrt(probs * (1 - probs) / n) + 1e-12
    assert np.all(np.abs(freq - probs) <= 5 * se + 1e-9), (freq, probs)
    assert freq[probs == 0].sum() == 0


def test_greedy_is_argmax():
    logits = jnp.asarray([[0.1, 3.0, -1.0], [5.0, 4.0, 4.9]])
    assert np.asarray(sampling.greedy(logits)).tolist() == [1, 0]


@pytest.mark.parametrize("seed", range(4))
def test_greedy_breaks_ties_as_numpy_argmax(seed):
    # greedy is a top-1 (faster on XLA CPU than argmax): with many exact ties, infinities and a NaN it must still
    # pick numpy's first maximum, or verification and target-only decoding could disagree on a tie
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 2, size=(7, 49152)).astype(np.float32)
    x[1] = -np.inf
    x[2, rng.integers(0, 49152, 5)] = np.inf
    x[3, 12345] = np.nan
    x[4, :] = 0.0
    got = np.asarray(jax.jit(sampling.greedy)(jnp.asarray(x)))
    assert got.dtype == np.int32 and got.tolist() == np.argmax(x, -1).tolist()


@pytest.mark.parametrize("candidates", [1, 2, 5, 12])
@pytest.mark.parametrize("t,k,p", SETTINGS)
def test_thresholds_from_the_largest_logits_match_hf(t, k, p, candidates):
    """Few candidates: top-k/top-p decide from them when they hold every kept token, else from a full sort; both
    must give HF's distribution. Peaked rows (scale 6) let small candidate sets reach top_p."""
    rng = np.random.default_rng(candidates)
    logits = (rng.standard_normal((8, 50)) * np.array([0.5, 1, 2, 3, 4, 6, 8, 12])[:, None]).astype(np.float32)
    x = jnp.asarray(logits / t)
    n = min(candidates, 50)
    _, covered = sampling._thresholds(x, jax.lax.top_k(x, n)[0], jnp.int32(k), jnp.float32(p))
    ours = sampling.processed_probs(jnp.asarray(logits), jnp.float32(t), jnp.int32(k), jnp.float32(p),
                                    candidates=candidates)
    np.testing.assert_allclose(np.asarray(ours), hf_probs(logits, t, k, p), atol=1e-6)
    # and row by row, so that rows the candidates cover take the fast branch alone
    for i in range(len(logits)):
        row = sampling.processed_probs(jnp.asarray(logits[i:i + 1]), jnp.float32(t), jnp.int32(k), jnp.float32(p),
                                       candidates=candidates)
        np.testing.assert_allclose(np.asarray(row), hf_probs(logits[i:i + 1], t, k, p), atol=1e-6)


def test_both_branches_of_the_threshold_search_are_exercised():
    """The cases above cover rows decided by the candidates and rows that need the sort."""
    seen = set()
    for c in (1, 2, 5, 12):
        for t, k, p in SETTINGS:
            if k == 0 and p == 1.0:
                continue
            rng = np.random.default_rng(c)
            logits = (rng.standard_normal((8, 50)) * np.array([0.5, 1, 2, 3, 4, 6, 8, 12])[:, None])
            x = jnp.asarray((logits / t).astype(np.float32))
            _, cov = sampling._thresholds(x, jax.lax.top_k(x, c)[0], jnp.int32(k), jnp.float32(p))
            seen |= set(np.asarray(cov).ravel().tolist())
    assert seen == {True, False}
