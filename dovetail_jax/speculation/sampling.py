"""One logits processor used everywhere (target-only sampling, tree acceptance, bonus tokens).

Order follows Hugging Face's `generate`: temperature, then top-k, then top-p. Temperature, top-k and
top-p are traced scalars, so changing them does not recompile; greedy is a separate static path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CANDIDATES = 1024  # top-k/top-p look at the largest logits first: a top_k of 49,152 costs 0.3 ms here, a sort 9 ms


def processed_log_probs(
    logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, *, filtered: bool = True,
    candidates: int = CANDIDATES,
) -> jax.Array:
    """Log-probabilities `[..., V]` of the distribution tokens are sampled from (temperature > 0).

    top_k <= 0 disables top-k (ties at the k-th value are kept, as HF does); top_p >= 1 disables top-p.
    Top-p keeps the smallest prefix of tokens, by descending probability, whose mass reaches top_p
    (always at least the most likely token). `filtered=False` (static) skips top-k/top-p altogether,
    saving the search when the caller knows top_k == 0 and top_p == 1.

    The thresholds come from the `candidates` largest logits (`lax.top_k`) whenever they hold every kept token
    (top_k <= candidates, or the candidates' mass reaches top_p), else from a full sort (`lax.cond`: only the
    branch taken runs); both give the same thresholds.
    """
    x = logits.astype(jnp.float32) / temperature
    if not filtered:
        return jax.nn.log_softmax(x, axis=-1)
    n = min(candidates, x.shape[-1])
    top = jax.lax.top_k(x, n)[0]  # [..., n] descending
    kept, covered = _thresholds(x, top, top_k, top_p)
    thresh = jax.lax.cond(jnp.all(covered), lambda: kept,
                          lambda: _thresholds(x, jnp.sort(x, axis=-1)[..., ::-1], top_k, top_p)[0])
    return jax.nn.log_softmax(jnp.where(x < thresh, -jnp.inf, x), axis=-1)


def _thresholds(x: jax.Array, srt: jax.Array, top_k: jax.Array, top_p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The smallest logit top-k and top-p keep `[..., 1]`, from the largest logits `srt [..., n]` (descending;
    n = V is a full sort), and whether those n logits hold every kept token `[..., 1]`."""
    v, n = x.shape[-1], srt.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    kth_at = jnp.broadcast_to(jnp.minimum(k, n) - 1, srt.shape[:-1] + (1,)).astype(jnp.int32)
    kth = jnp.where(k <= n, jnp.take_along_axis(srt, kth_at, axis=-1), -jnp.inf)  # beyond n: no top-k cut here
    lse = jax.nn.logsumexp(jnp.where(x < kth, -jnp.inf, x), axis=-1, keepdims=True)  # over every top-k token
    srt = jnp.where(srt < kth, -jnp.inf, srt)
    p_sorted = jnp.exp(srt - lse)
    mass_before = jnp.cumsum(p_sorted, axis=-1) - p_sorted
    keep_sorted = (mass_before < top_p) | (jnp.arange(n) == 0)
    # the smallest kept logit value is the threshold in the unsorted order; top_p >= 1 cuts nothing (as HF: no
    # tail token lost to a cumulative sum that rounds up to 1); top-k's cut applies on top
    by_p = jnp.min(jnp.where(keep_sorted, srt, jnp.inf), axis=-1, keepdims=True)
    thresh = jnp.maximum(jnp.where(top_p >= 1.0, -jnp.inf, by_p), kth)
    # the n logits decide alone when top-k cuts inside them, or when there is no top-k cut at all and top-p cuts
    # nothing or inside them (a top-k cut between n and V would change the normalisation: sort then)
    mass = jnp.sum(p_sorted, axis=-1, keepdims=True)
    covered = (k <= n) | ((k >= v) & ((top_p >= 1.0) | (mass >= top_p)))
    return thresh, covered


def processed_probs(
    logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, *, filtered: bool = True,
    candidates: int = CANDIDATES,
) -> jax.Array:
    return jnp.exp(processed_log_probs(logits, temperature, top_k, top_p, filtered=filtered, candidates=candidates))


def sample(key: jax.Array, logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Draw token ids `[...]` from the processed distribution of `logits [..., V]`."""
    return jax.random.categorical(key, processed_log_probs(logits, temperature, top_k, top_p), axis=-1)


def greedy(logits: jax.Array) -> jax.Array:
    """The argmax `[...]` of `logits [..., V]` (ties: the lowest index, as `jnp.argmax`), as a top-1: XLA CPU runs
    argmax as a variadic reduce, measured 0.26 vs 0.06 ms over SmolLM2's 49,152 logits, 0.53 vs 0.29 for six
    rows (a decode step's and a verification's)."""
    return jax.lax.top_k(logits, 1)[1][..., 0].astype(jnp.int32)
