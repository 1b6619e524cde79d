"""Pre-norm LLaMA decoder blocks and the loop over a stack of them, shared by the target and the draft.

The block only reads the KV cache and returns its new keys and values; see `cache.py` for why writes are a
separate call. The draft's tree expansion also passes `lead_k`/`lead_v`: keys of earlier tokens of the same
cycle that are not in the cache (the freshly accepted context and the tree levels drafted so far), so rejected
branches never touch the cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from dovetail_jax.config import ModelConfig
from dovetail_jax.model import layers as L
from dovetail_jax.model.cache import KVCache, KVUpdate
from dovetail_jax.model.params import LayerParams, Layout


def decoder_layer(
    p: LayerParams,
    cfg: ModelConfig,
    x: jax.Array,  # [B, T, H]
    cos: jax.Array,  # [B, T, D/2]
    sin: jax.Array,
    k_cache: jax.Array | None,  # [B, K, S, D]; None: no committed prefix
    v_cache: jax.Array | None,
    prefix_len: jax.Array,
    mask: jax.Array,  # [T, P + T]: new token i sees lead/new key j
    in_out: bool = False,
    lead_k: jax.Array | None = None,  # [B, P, K, D] uncommitted keys that precede the T new tokens
    lead_v: jax.Array | None = None,
    kv_start: jax.Array | None = None,  # [B]: cache slots before it are hidden from that row
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns the new hidden state `[B, T, H]` and this layer's K and V of the T new tokens `[B, T, K, D]`.

    `p.attn_norm` may be None: the first block of an EAGLE/Dovetail draft has no input norm.
    """
    b, t, _ = x.shape
    h = x if p.attn_norm is None else L.rms_norm(x, p.attn_norm, cfg.rms_norm_eps)
    attn, k, v = L.self_attention(L.linear(h, p.wqkv, in_out), cos, sin, cfg.num_kv_heads, k_cache, v_cache,
                                  prefix_len, mask, lead_k, lead_v, kv_start)
    x = x + L.linear(attn, p.wo, in_out)
    x = x + L.swiglu(L.rms_norm(x, p.mlp_norm, cfg.rms_norm_eps), p.w_gate_up, p.w_down, in_out)
    return x, k, v


def run_layers(
    layers: Sequence[LayerParams],
    cfg: ModelConfig,
    layout: Layout,
    x: jax.Array,  # [B, T, H] the first block's input
    positions: jax.Array,  # [B, T] int32 (RoPE positions)
    mask: jax.Array,  # [T, P + T] (or [B, T, T]) bool over the lead keys and the new tokens
    cache: KVCache,  # one entry per layer; only read
    empty_cache: bool = False,
    lead: KVUpdate | None = None,  # per layer [B, P, K, D] uncommitted keys/values before the new tokens
    kv_start: jax.Array | None = None,  # [B]: cache slots before it are hidden from that row
    taps: tuple[int, ...] = (),  # static: also return the outputs of these blocks (0-based)
) -> tuple[jax.Array, KVUpdate, tuple[jax.Array, ...]]:
    """Run the stack (unrolled in Python: on XLA CPU faster than a `lax.scan` over stacked layers); returns the
    last block's output `[B, T, H]` (no final norm), the new tokens' K/V per layer, for the caller to write, and
    the outputs `[B, T, H]` of the blocks `taps` names, in that order (the residual stream after each: EAGLE-3's
    multi-layer features). `empty_cache=True` (static) promises an empty cache, so attention skips it."""
    cos, sin = L.rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
    ks, vs, outs = [], [], {}
    for i, (p, k_cache, v_cache) in enumerate(zip(layers, cache.k, cache.v, strict=True)):
        if empty_cache:
            k_cache = v_cache = None
        x, k, v = decoder_layer(p, cfg, x, cos, sin, k_cache, v_cache, cache.length, mask, layout == "in_out",
                                None if lead is None else lead.k[i], None if lead is None else lead.v[i], kv_start)
        ks.append(k)
        vs.append(v)
        if i in taps:
            outs[i] = x
    return x, KVUpdate(k=tuple(ks), v=tuple(vs)), tuple(outs[i] for i in taps)
