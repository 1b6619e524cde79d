"""The LLaMA building blocks as small pure functions (shared by the target and the draft).

Shapes: B batch, T new tokens, S cache slots, N query heads, K kv heads, D head dim, H hidden, F MLP width.
Weights are stored `[out, in]` (torch's Linear layout) and applied by `linear`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = jnp.finfo(jnp.float32).min


def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x [..., in]` times `w [out, in]` -> `[..., out]`, contracting the last axes (no transpose copy)."""
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())))


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in float32, as HF LLaMA computes it."""
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(var + eps) * weight


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables `[B, T, D/2]` for integer positions `[B, T]` (HF's inverse-frequency formula)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on `[B, T, heads, D]` (pairs (i, i + D/2), HF's convention)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """Grouped-query attention.

    q `[B, T, N, D]`, k/v `[B, S, K, D]`, allowed `[B, T, S]` bool  ->  `[B, T, N*D]`.
    """
    b, t, n, d = q.shape
    kh = k.shape[2]
    q = q.reshape(b, t, kh, n // kh, d) * (d**-0.5)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k)
    scores = jnp.where(allowed[:, None, None, :, :], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, n * d)


def swiglu(x: jax.Array, w_gate_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """SwiGLU MLP with gate and up fused in one `[2F, H]` matmul."""
    gate, up = jnp.split(linear(x, w_gate_up), 2, axis=-1)
    return linear(jax.nn.silu(gate) * up, w_down)


def attention_mask(start: jax.Array, tree_mask: jax.Array, num_slots: int, batch: int) -> jax.Array:
    """Which cache slots each new token may attend to: `[B, T, S]`.

    Slots `< start` hold the committed prefix (always visible). The T new tokens occupy slots
    `start .. start+T-1` and see each other through `tree_mask [T, T]` (causal for prefill, the
    ancestor mask for tree verification). Slots beyond are stale and never visible.
    """
    t = tree_mask.shape[-1]
    slots = jnp.arange(num_slots)
    prefix = jnp.broadcast_to(slots[None, :] < start, (t, num_slots))
    block = jax.lax.dynamic_update_slice(jnp.zeros((t, num_slots), bool), tree_mask, (0, start))
    return jnp.broadcast_to(prefix | block, (batch, t, num_slots))
