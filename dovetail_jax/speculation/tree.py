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
from flax import struct


@struct.dataclass
class TreeArrays:
    mask: jax.Array  # [T, T] bool: mask[i, j] = j is i or an ancestor of i (the tree attention mask)
    depth: jax.Array  # [T] int32: root = 0 (position offset of each node after the committed prefix)
    paths: jax.Array  # [T, W] int32: root..i, padded with i (rows to gather when committing i's path)


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


def tree_arrays(parents: jax.Array, width: int) -> TreeArrays:
    """Mask, depths and paths from one ancestor chain (needs every node's depth < width).

    The layout is the caller's promise (`parents[0] == -1`, `0 <= parents[j] < j`): jitted code cannot check it,
    and the draft builds its trees that way (`speculation.drafting`)."""
    chain = _ancestor_chain(parents, width)
    depth = _depth_from_chain(chain)
    return TreeArrays(mask=_mask_from_chain(chain), depth=depth, paths=_paths_from_chain(chain, depth))
