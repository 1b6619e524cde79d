"""The target LLaMA forward: one pure function for prefill, single-token decode and tree verification.

`forward` runs T new tokens with arbitrary `positions` and a `[T, T]` mask among themselves on top of
the committed prefix in the cache; it returns logits, the final-norm hidden states (the features a
Dovetail draft reads) and the new tokens' K/V, which the caller writes with `cache.append` (prefill,
decode) or `cache.commit_path` (the accepted path of a verified tree). The layers run in `block.run_layers`,
the same loop as the draft's.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from dovetail_jax.config import ModelConfig
from dovetail_jax.model import layers as L
from dovetail_jax.model.block import run_layers
from dovetail_jax.model.cache import KVCache, KVUpdate
from dovetail_jax.model.params import TargetParams

LogitsMode = Literal["all", "last", "none"]


def forward(
    params: TargetParams,
    cfg: ModelConfig,
    tokens: jax.Array,  # [B, T] int32
    positions: jax.Array,  # [B, T] int32 (RoPE positions)
    tree_mask: jax.Array,  # [T, T] bool: new token i may see new token j ([B, T, T]: per row)
    cache: KVCache,
    logits_mode: LogitsMode = "all",
    last_index: jax.Array | int = -1,
    empty_cache: bool = False,
    kv_start: jax.Array | None = None,  # [B]: cache slots before it are hidden from that row
    taps: tuple[int, ...] = (),  # static: the blocks whose outputs make the features (EAGLE-3); () = final norm
) -> tuple[jax.Array | None, jax.Array, KVUpdate]:
    """Returns (logits, features, update); the cache is only read.

    logits: `[B, T, V]` ("all"), `[B, V]` at `last_index` ("last") or None; features: what a draft reads,
    `[B, T, H]` after the final norm, or with `taps` the outputs of those blocks (before any norm) side by side,
    `[B, T, len(taps) * H]` (a multi-layer-feature draft's `DraftConfig.feature_layers`); update: the T tokens'
    K/V, to be written by `cache.append` or `cache.commit_path`.
    `empty_cache=True` (static) promises `cache.length == 0`, so attention skips the cache entirely: a
    fresh prefill then costs O(T^2), not O(T * slots). A `[B, T, T]` mask with `kv_start` runs a batch of
    left-padded sequences (batched generation of training data).
    """
    x = jnp.take(params.embed, tokens, axis=0)
    x, update, tapped = run_layers(params.layers, cfg, params.layout, x, positions, tree_mask, cache, empty_cache,
                                   kv_start=kv_start, taps=taps)
    hidden = L.rms_norm(x, params.final_norm, cfg.rms_norm_eps)
    feats = jnp.concatenate(tapped, axis=-1) if taps else hidden
    if logits_mode == "none":
        return None, feats, update
    if logits_mode == "last":
        h_last = jnp.take(hidden, jnp.asarray(last_index), axis=1)  # [B, H]
        return lm_head(h_last, params.head), feats, update
    return lm_head(hidden, params.head), feats, update


def lm_head(h: jax.Array, head: jax.Array) -> jax.Array:
    """`h [..., H]` x `head [V, H]` -> logits `[..., V]`."""
    return L.linear(h, head)


def causal_mask(t: int) -> jax.Array:
    return jnp.tril(jnp.ones((t, t), bool))
