"""Draft token trees as two flat int32 arrays, and the static-shape views verification needs.

A tree of T nodes is `tokens [T]` and `parents [T]`: node 0 is the root (the last committed token,
`parents[0] == -1`) and every other node's parent has a smaller index, so a single pass in index order
always meets a parent before its children. `width` W (static) bounds the root-to-node path length
(max depth + 1). Everything here is computed with a trip count fixed by W, never by the data, so a
tree of any shape compiles once per (T, W).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class TreeArrays:
    mask: jax.Array  # [T, T] bool: mask[i, j] = j is i or an ancestor of i (the tree attention mask)
    depth: jax.Array  # [T] int32: root = 0 (position offset of each node after the committed prefix)
    paths: jax.Array  # [T, W] int32: root..i, padded with i (rows to gather when committing i's path)


def validate_parents(parents: np.ndarray) -> None:
    """Host-side check of the layout the jitted code assumes but cannot verify; raises ValueError."""
    p = np.asarray(parents)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"parents must be a non-empty 1-D array, got shape {p.shape}")
    if p[0] != -1:
        raise ValueError(f"the root (node 0) must have parent -1, got {p[0]}")
    j = np.arange(1, p.size)
    bad = j[(p[1:] < 0) | (p[1:] >= j)]
    if bad.size:
        raise ValueError(f"parents must precede children (0 <= parents[j] < j); violated at nodes {bad.tolist()}")


def _ancestor_chain(parents: jax.Array, width: int) -> jax.Array:
    """`[W, T]` int32: row k is each node's k-th ancestor, stopping at the root (row 0 = the nodes).

    W - 1 gathers reach the root from any node of depth < W; no data-dependent loop.
    """
    t = parents.shape[0]
    up = jnp.where(parents < 0, 0, parents).astype(jnp.int32)  # the root points to itself
    rows = [jnp.arange(t, dtype=jnp.int32)]
    for _ in range(width - 1):
        rows.append(up[rows[-1]])
    return jnp.stack(rows)


def _mask_from_chain(chain: jax.Array) -> jax.Array:
    t = chain.shape[1]
    return jnp.any(chain[:, :, None] == jnp.arange(t)[None, None, :], axis=0)  # [T, T]


def _depth_from_chain(chain: jax.Array) -> jax.Array:
    # the chain of a depth-d node holds d non-root entries before it reaches 0
    return jnp.sum(chain != 0, axis=0).astype(jnp.int32)  # [T]


def _paths_from_chain(chain: jax.Array, depth: jax.Array) -> jax.Array:
    w, t = chain.shape
    d = jnp.arange(w, dtype=jnp.int32)[None, :]  # [1, W] position along the path
    hops = depth[:, None] - d  # [T, W] ancestor at position d is `depth - d` hops up
    node = jnp.arange(t, dtype=jnp.int32)[:, None]
    up = jnp.take_along_axis(chain.T, jnp.clip(hops, 0, w - 1), axis=1)  # [T, W]
    return jnp.where(hops >= 0, up, node)


def ancestor_mask(parents: jax.Array, width: int) -> jax.Array:
    """`[T, T]` bool: anc[i, j] iff j is i or one of its ancestors (needs every depth < width)."""
    return _mask_from_chain(_ancestor_chain(parents, width))


def depths(mask: jax.Array) -> jax.Array:
    """`[T]` int32 depth of each node from its ancestor mask (ancestors counted, self excluded)."""
    return (jnp.sum(mask, axis=-1) - 1).astype(jnp.int32)


def paths(parents: jax.Array, width: int) -> jax.Array:
    """`[T, W]` int32: row i lists the nodes from the root to i, padded with i so every entry is a
    valid row to gather (the KV commit writes the pads past the new length, where they are stale)."""
    chain = _ancestor_chain(parents, width)
    return _paths_from_chain(chain, _depth_from_chain(chain))


def tree_arrays(parents: jax.Array, width: int) -> TreeArrays:
    """Mask, depths and paths from one ancestor chain."""
    chain = _ancestor_chain(parents, width)
    depth = _depth_from_chain(chain)
    return TreeArrays(mask=_mask_from_chain(chain), depth=depth, paths=_paths_from_chain(chain, depth))
