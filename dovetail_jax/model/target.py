"""The target LLaMA forward: one pure function for prefill, single-token decode and tree verification.

`forward` runs T new tokens with arbitrary `positions` and a `[T, T]` mask among themselves on top of
the committed prefix in the cache; it returns logits and the final-norm hidden states (the features a
Dovetail draft reads) and the cache with the new entries written (but `length` unchanged: the caller
advances it, or commits a tree path). Layers are unrolled Python-side: on XLA CPU this measured faster
than a `lax.scan` over stacked layers, since each layer's weights and cache stay separate buffers.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from dovetail_jax.config import ModelConfig
from dovetail_jax.model import layers as L
from dovetail_jax.model.cache import KVCache, write
from dovetail_jax.model.params import LayerParams, TargetParams

LogitsMode = Literal["all", "last", "none"]


def decoder_layer(
    p: LayerParams,
    cfg: ModelConfig,
    x: jax.Array,  # [B, T, H]
    cos: jax.Array,
    sin: jax.Array,
    k_buf: jax.Array,  # [B, S, K, D]
    v_buf: jax.Array,
    start: jax.Array,
    allowed: jax.Array,  # [B, T, S]
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One pre-norm LLaMA block; writes this layer's new K/V into its cache buffers."""
    b, t, _ = x.shape
    h = L.rms_norm(x, p.attn_norm, cfg.rms_norm_eps)
    qkv = L.linear(h, p.wqkv)
    q, k, v = jnp.split(qkv, [cfg.q_size, cfg.q_size + cfg.kv_size], axis=-1)
    q = L.apply_rope(q.reshape(b, t, cfg.num_heads, cfg.head_dim), cos, sin)
    k = L.apply_rope(k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim), cos, sin)
    v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    k_buf = write(k_buf, k, start)
    v_buf = write(v_buf, v, start)
    x = x + L.linear(L.attention(q, k_buf, v_buf, allowed), p.wo)
    x = x + L.swiglu(L.rms_norm(x, p.mlp_norm, cfg.rms_norm_eps), p.w_gate_up, p.w_down)
    return x, k_buf, v_buf


def forward(
    params: TargetParams,
    cfg: ModelConfig,
    tokens: jax.Array,  # [B, T] int32
    positions: jax.Array,  # [B, T] int32 (RoPE positions)
    tree_mask: jax.Array,  # [T, T] bool: new token i may see new token j
    cache: KVCache,
    logits_mode: LogitsMode = "all",
    last_index: jax.Array | int = -1,
) -> tuple[jax.Array | None, jax.Array, KVCache]:
    """Returns (logits, hidden, cache).

    logits: `[B, T, V]` ("all"), `[B, V]` at `last_index` ("last") or None; hidden `[B, T, H]` after the
    final norm. The new K/V sit at slots `cache.length .. +T-1`; `cache.length` is not advanced.
    """
    start = cache.length
    b, _ = tokens.shape
    x = jnp.take(params.embed, tokens, axis=0)
    cos, sin = L.rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
    allowed = L.attention_mask(start, tree_mask, cache.num_slots, b)
    ks, vs = [], []
    for p, k_buf, v_buf in zip(params.layers, cache.k, cache.v, strict=True):
        x, k_buf, v_buf = decoder_layer(p, cfg, x, cos, sin, k_buf, v_buf, start, allowed)
        ks.append(k_buf)
        vs.append(v_buf)
    hidden = L.rms_norm(x, params.final_norm, cfg.rms_norm_eps)
    new_cache = KVCache(k=tuple(ks), v=tuple(vs), length=start)
    if logits_mode == "none":
        return None, hidden, new_cache
    head = params.head  # [V, H]
    if logits_mode == "last":
        h_last = jnp.take(hidden, jnp.asarray(last_index), axis=1)  # [B, H]
        return lm_head(h_last, head), hidden, new_cache
    return lm_head(hidden, head), hidden, new_cache


def lm_head(h: jax.Array, head: jax.Array) -> jax.Array:
    """`h [..., H]` x `head [V, H]` -> logits `[..., V]`."""
    return L.linear(h, head)


def causal_mask(t: int) -> jax.Array:
    return jnp.tril(jnp.ones((t, t), bool))
