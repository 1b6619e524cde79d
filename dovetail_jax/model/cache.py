"""The KV cache: a preallocated pytree that every jitted step takes in and gives back (donated).

One `[B, S, K, D]` buffer per layer (measured faster on XLA CPU than
`[B, K, S, D]`) for keys and for values, plus `length`, the number of committed
slots. A forward writes its T new entries at `length .. length+T-1`; prefill and decode then advance
`length`, while tree verification leaves it and `commit_path` gathers the accepted path into place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from dovetail_jax.config import ModelConfig


@struct.dataclass
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [B, S, K, D]
    v: tuple[jax.Array, ...]  # per layer [B, S, K, D]
    length: jax.Array  # int32 scalar: committed slots

    @property
    def num_slots(self) -> int:
        return self.k[0].shape[1]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    def nbytes(self) -> int:
        return sum(int(x.size) * x.dtype.itemsize for x in self.k + self.v)


def init_cache(cfg: ModelConfig, num_slots: int, batch: int = 1, device: jax.Device | None = None) -> KVCache:
    """Zeroed cache for `num_slots` positions, committed to `device`."""
    shape = (batch, num_slots, cfg.num_kv_heads, cfg.head_dim)

    def zeros() -> jax.Array:
        return jax.device_put(jnp.zeros(shape, jnp.float32), device)

    return KVCache(
        k=tuple(zeros() for _ in range(cfg.num_layers)),
        v=tuple(zeros() for _ in range(cfg.num_layers)),
        length=jax.device_put(jnp.zeros((), jnp.int32), device),
    )


def write(buf: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Write `new [B, T, K, D]` into `buf [B, S, K, D]` at slot `start` (in place when donated)."""
    return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (0, start, 0, 0))


def commit_path(cache: KVCache, path_slots: jax.Array, num_accepted: jax.Array) -> KVCache:
    """Keep only an accepted tree path: gather its rows into contiguous slots after the prefix.

    `path_slots [W]` are offsets (relative to `length`) of the path's nodes in the slots the verify step
    wrote, root first, padded with any valid offset; `num_accepted` of them are kept and `length`
    advances by that much. Gather, no recompute; rows beyond the new length are stale and masked.
    """
    start = cache.length
    src = start + path_slots

    def gather(buf: jax.Array) -> jax.Array:
        rows = jnp.take(buf, src, axis=1)  # [B, W, K, D]
        return write(buf, rows, start)

    return KVCache(
        k=tuple(gather(b) for b in cache.k),
        v=tuple(gather(b) for b in cache.v),
        length=start + num_accepted.astype(jnp.int32),
    )
