"""One logits processor used everywhere (target-only sampling, tree acceptance, bonus tokens).

Order follows Hugging Face's `generate`: temperature, then top-k, then top-p. Temperature, top-k and
top-p are traced scalars, so changing them does not recompile; greedy is a separate static path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def processed_log_probs(
    logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, *, filtered: bool = True
) -> jax.Array:
    """Log-probabilities `[..., V]` of the distribution tokens are sampled from (temperature > 0).

    top_k <= 0 disables top-k (ties at the k-th value are kept, as HF does); top_p >= 1 disables top-p.
    Top-p keeps the smallest prefix of tokens, by descending probability, whose mass reaches top_p
    (always at least the most likely token). `filtered=False` (static) skips top-k/top-p altogether,
    saving a `[..., V]` sort when the caller knows top_k == 0 and top_p == 1.
    """
    v = logits.shape[-1]
    x = logits.astype(jnp.float32) / temperature
    if not filtered:
        return jax.nn.log_softmax(x, axis=-1)
    srt = jnp.sort(x, axis=-1)[..., ::-1]  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    kth = jnp.take_along_axis(srt, jnp.broadcast_to(k - 1, srt.shape[:-1] + (1,)).astype(jnp.int32), axis=-1)
    x = jnp.where(x < kth, -jnp.inf, x)
    srt = jnp.where(srt < kth, -jnp.inf, srt)
    p_sorted = jax.nn.softmax(srt, axis=-1)
    mass_before = jnp.cumsum(p_sorted, axis=-1) - p_sorted
    keep_sorted = (mass_before < top_p) | (jnp.arange(v) == 0)
    # the smallest kept logit value is the threshold in the unsorted order
    thresh = jnp.min(jnp.where(keep_sorted, srt, jnp.inf), axis=-1, keepdims=True)
    x = jnp.where(x < thresh, -jnp.inf, x)
    return jax.nn.log_softmax(x, axis=-1)


def processed_probs(
    logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, *, filtered: bool = True
) -> jax.Array:
    return jnp.exp(processed_log_probs(logits, temperature, top_k, top_p, filtered=filtered))


def sample(key: jax.Array, logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Draw token ids `[...]` from the processed distribution of `logits [..., V]`."""
    return jax.random.categorical(key, processed_log_probs(logits, temperature, top_k, top_p), axis=-1)


def greedy(logits: jax.Array) -> jax.Array:
    """The argmax `[...]` of `logits [..., V]` (ties: the lowest index, as `jnp.argmax`), as a top-1: XLA CPU runs
    argmax as a variadic reduce, measured 0.26 vs 0.06 ms over SmolLM2's 49,152 logits, 0.53 vs 0.29 for six
    rows (a decode step's and a verification's)."""
    return jax.lax.top_k(logits, 1)[1][..., 0].astype(jnp.int32)
