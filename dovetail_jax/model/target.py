"""The target LLaMA forward: one pure function for prefill, single-token decode and tree verification.

`forward` runs T new tokens with arbitrary `positions` and a `[T, T]` mask among themselves on top of
the committed prefix in the cache; it returns logits, the final-norm hidden states (the features a
Dovetail draft reads) and the new tokens' K/V, which the caller writes with `cache.append` (prefill,
decode) or `cache.commit_path` (the accepted path of a verified tree). Layers are unrolled Python-side:
on XLA CPU this measured faster than a `lax.scan` over stacked layers.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from dovetail_jax.config import ModelConfig
from dovetail_jax.model import layers as L
from dovetail_jax.model.cache import KVCache, KVUpdate
from dovetail_jax.model.params import LayerParams, TargetParams

LogitsMode = Literal["all", "last", "none"]


def decoder_layer(
    p: LayerParams,
    cfg: ModelConfig,
    x: jax.Array,  # [B, T, H]
    cos: jax.Array,
    sin: jax.Array,
    k_cache: jax.Array | None,  # [B, K, S, D]; None: no committed prefix
    v_cache: jax.Array | None,
    prefix_len: jax.Array,
    tree_mask: jax.Array,  # [T, T]
    in_out: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One pre-norm LLaMA block. Returns the new hidden state and this layer's new K and V `[B, T, K, D]`."""
    b, t, _ = x.shape
    h = L.rms_norm(x, p.attn_norm, cfg.rms_norm_eps)
    q, k, v = jnp.split(L.linear(h, p.wqkv, in_out), [cfg.q_size, cfg.q_size + cfg.kv_size], axis=-1)
    q = L.apply_rope(q.reshape(b, t, cfg.num_heads, cfg.head_dim), cos, sin)
    k = L.apply_rope(k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim), cos, sin)
    v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    x = x + L.linear(L.attention(q, k, v, k_cache, v_cache, prefix_len, tree_mask), p.wo, in_out)
    x = x + L.swiglu(L.rms_norm(x, p.mlp_norm, cfg.rms_norm_eps), p.w_gate_up, p.w_down, in_out)
    return x, k, v


def forward(
    params: TargetParams,
    cfg: ModelConfig,
    tokens: jax.Array,  # [B, T] int32
    positions: jax.Array,  # [B, T] int32 (RoPE positions)
    tree_mask: jax.Array,  # [T, T] bool: new token i may see new token j
    cache: KVCache,
    logits_mode: LogitsMode = "all",
    last_index: jax.Array | int = -1,
    empty_cache: bool = False,
) -> tuple[jax.Array | None, jax.Array, KVUpdate]:
    """Returns (logits, hidden, update); the cache is only read.

    logits: `[B, T, V]` ("all"), `[B, V]` at `last_index` ("last") or None; hidden `[B, T, H]` after the
    final norm; update: the T tokens' K/V, to be written by `cache.append` or `cache.commit_path`.
    `empty_cache=True` (static) promises `cache.length == 0`, so attention skips the cache entirely: a
    fresh prefill then costs O(T^2), not O(T * slots).
    """
    x = jnp.take(params.embed, tokens, axis=0)
    cos, sin = L.rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
    ks, vs = [], []
    for p, k_cache, v_cache in zip(params.layers, cache.k, cache.v, strict=True):
        if empty_cache:
            k_cache = v_cache = None
        x, k, v = decoder_layer(p, cfg, x, cos, sin, k_cache, v_cache, cache.length, tree_mask,
                                params.layout == "in_out")
        ks.append(k)
        vs.append(v)
    hidden = L.rms_norm(x, params.final_norm, cfg.rms_norm_eps)
    update = KVUpdate(k=tuple(ks), v=tuple(vs))
    if logits_mode == "none":
        return None, hidden, update
    if logits_mode == "last":
        h_last = jnp.take(hidden, jnp.asarray(last_index), axis=1)  # [B, H]
        return lm_head(h_last, params.head), hidden, update
    return lm_head(hidden, params.head), hidden, update


def lm_head(h: jax.Array, head: jax.Array) -> jax.Array:
    """`h [..., H]` x `head [V, H]` -> logits `[..., V]`."""
    return L.linear(h, head)


def causal_mask(t: int) -> jax.Array:
    return jnp.tril(jnp.ones((t, t), bool))
