"""The KV cache: a preallocated pytree, read by the forward and written only by `append` / `commit_path`.

One `[B, K, S, D]` buffer per layer for keys and one for values (heads before slots, so attention is a
plain matmul batched over (B, K)), plus `length`, the number of committed slots; slots beyond it are
stale and never attended to.

The forward only *reads* the cache and returns the new tokens' K/V (`KVUpdate`); a separate jitted call,
with the cache donated, writes them in place. Writing inside the same XLA program that reads the cache
made XLA CPU copy every layer's cache each step (decode at 2048 slots: 44 ms instead of 21 ms). The split
also suits tree verification: nothing is written until the accepted path is known, so rejected branches
never touch the cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from dovetail_jax import kernels
from dovetail_jax.config import ModelConfig


@struct.dataclass
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [B, K, S, D]
    v: tuple[jax.Array, ...]  # per layer [B, K, S, D]
    length: jax.Array  # int32 scalar: committed slots

    @property
    def num_slots(self) -> int:
        return self.k[0].shape[2]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]


@struct.dataclass
class KVUpdate:
    """Keys and values of the T tokens a forward just ran, not yet in the cache."""

    k: tuple[jax.Array, ...]  # per layer [B, T, K, D]
    v: tuple[jax.Array, ...]  # per layer [B, T, K, D]


def init_cache(cfg: ModelConfig, num_slots: int, batch: int = 1, device: jax.Device | None = None) -> KVCache:
    """Zeroed cache for `num_slots` positions, committed to `device`."""
    shape = (batch, cfg.num_kv_heads, num_slots, cfg.head_dim)

    def zeros() -> jax.Array:
        return jax.device_put(jnp.zeros(shape, jnp.float32), device)

    return KVCache(
        k=tuple(zeros() for _ in range(cfg.num_layers)),
        v=tuple(zeros() for _ in range(cfg.num_layers)),
        length=jax.device_put(jnp.zeros((), jnp.int32), device),
    )


def _write(buf: jax.Array, rows: jax.Array, start: jax.Array) -> jax.Array:
    """Write `rows [B, W, K, D]` into `buf [B, K, S, D]` at slot `start` (in place when donated)."""
    return jax.lax.dynamic_update_slice(buf, rows.transpose(0, 2, 1, 3).astype(buf.dtype), (0, 0, start, 0))


def _write_rows(bufs: tuple[jax.Array, ...], new: tuple[jax.Array, ...], path: jax.Array | None,
                start: jax.Array) -> tuple[jax.Array, ...]:
    """Rows `path [W]` of each `new [B, T, K, D]` (None: all T in order) into its buffer at slot `start`: one
    `kernels.kv_write` call for all buffers on the CPU (XLA: a gather, a transpose and an update per buffer, ~0.5 ms
    of dispatches for SmolLM2's 60), XLA elsewhere (no gather when all rows go in order)."""

    def xla(bufs: tuple[jax.Array, ...], new: tuple[jax.Array, ...], start: jax.Array) -> tuple[jax.Array, ...]:
        return tuple(_write(b, u if path is None else jnp.take(u, path, axis=1), start)
                     for b, u in zip(bufs, new, strict=True))

    width = new[0].shape[1] if path is None else path.shape[0]
    if kernels.supports_kv_write(bufs, new, width):
        rows = jnp.arange(width, dtype=jnp.int32) if path is None else path
        return jax.lax.platform_dependent(bufs, new, rows, start, cpu=kernels.kv_write,
                                          default=lambda b, u, _, s: xla(b, u, s))
    return xla(bufs, new, start)


def _commit(cache: KVCache, update: KVUpdate, path: jax.Array | None, advance: jax.Array | int) -> KVCache:
    n = len(cache.k)
    rows = _write_rows((*cache.k, *cache.v), (*update.k, *update.v), path, cache.length)
    return KVCache(k=rows[:n], v=rows[n:], length=cache.length + jnp.asarray(advance, jnp.int32))


def append(cache: KVCache, update: KVUpdate, num_valid: jax.Array | int | None = None) -> KVCache:
    """Write all T new rows at `length` and advance it by `num_valid` (default T; fewer for right padding)."""
    t = update.k[0].shape[1]
    return _commit(cache, update, None, t if num_valid is None else num_valid)


def commit_path(cache: KVCache, update: KVUpdate, path: jax.Array, num_accepted: jax.Array) -> KVCache:
    """Commit an accepted tree path: its nodes' K/V (rows `path [W]` of `update`, root first, padded with any
    valid index) go to slots `length ..`; `length` advances by `num_accepted`. A gather, no recompute."""
    return _commit(cache, update, path, num_accepted)
