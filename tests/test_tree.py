"""Tree arrays (ancestor mask, depths, paths) and the KV commit of a path, against plain-Python walks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dovetail_jax.config import ModelConfig
from dovetail_jax.model import cache as kv
from dovetail_jax.speculation import tree

SIZES = [1, 2, 3, 7, 13, 20]  # few distinct T: one compile per (T, W)


@st.composite
def parent_arrays(draw: st.DrawFn) -> np.ndarray:
    """Random tree: T from SIZES, parents[j] uniform in [0, j)."""
    t = draw(st.sampled_from(SIZES))
    return np.array([-1] + [draw(st.integers(0, j - 1)) for j in range(1, t)], np.int32)


def py_path(parents: np.ndarray, i: int) -> list[int]:
    """Root..i by following parent pointers."""
    out = [i]
    while parents[out[-1]] >= 0:
        out.append(int(parents[out[-1]]))
    return out[::-1]


def tight_width(parents: np.ndarray) -> int:
    return max(len(py_path(parents, i)) for i in range(len(parents)))


@functools.partial(jax.jit, static_argnames="width")
def _arrays(parents: jax.Array, width: int) -> tree.TreeArrays:
    return tree.tree_arrays(parents, width)


def run(parents: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mask, depth, paths) of `tree_arrays` as numpy, checking that depth counts each node's strict ancestors."""
    arrays = jax.device_get(_arrays(jnp.asarray(parents), width))
    mask, depth, paths = arrays.mask, arrays.depth, arrays.paths
    np.testing.assert_array_equal(depth, mask.sum(axis=-1) - 1)
    assert mask.dtype == bool and depth.dtype == np.int32 and paths.dtype == np.int32
    assert mask.shape == (len(parents),) * 2 and paths.shape == (len(parents), width)
    return mask, depth, paths


@settings(max_examples=150, deadline=None)
@given(parent_arrays())
def test_mask_is_the_ancestor_relation(parents: np.ndarray):
    mask, _, _ = run(parents, tight_width(parents))
    t = len(parents)
    assert mask.diagonal().all()
    assert not np.triu(mask, 1).any()  # anc[i, j] implies j <= i
    closed = (mask.astype(int) @ mask.astype(int)) > 0
    np.testing.assert_array_equal(closed, mask)  # anc[i, j] and anc[j, k] imply anc[i, k]
    for i in range(1, t):
        expect = mask[parents[i]].copy()
        expect[i] = True
        np.testing.assert_array_equal(mask[i], expect)  # row(i) = {i} | row(parent(i))
    for i in range(t):
        assert set(np.flatnonzero(mask[i])) == set(py_path(parents, i))


@settings(max_examples=150, deadline=None)
@given(parent_arrays(), st.integers(0, 3), st.integers(0, 50))
def test_depths_and_paths_match_python_walk(parents: np.ndarray, extra: int, committed: int):
    """Any width >= max depth + 1 works; pads are the node itself; positions along a path are contiguous."""
    width = tight_width(parents) + extra
    _, depth, paths = run(parents, width)
    for i in range(len(parents)):
        walk = py_path(parents, i)
        assert depth[i] == len(walk) - 1
        np.testing.assert_array_equal(paths[i], walk + [i] * (width - len(walk)))
        # the nodes on i's path sit at positions committed + 0..depth[i]: the KV slots a commit writes them to
        positions = committed + depth[paths[i, : depth[i] + 1]]
        np.testing.assert_array_equal(positions, committed + np.arange(depth[i] + 1))


def test_chain_star_and_single_node():
    chain = np.array([-1, 0, 1, 2, 3], np.int32)
    mask, depth, paths = run(chain, 5)
    np.testing.assert_array_equal(mask, np.tril(np.ones((5, 5), bool)))
    np.testing.assert_array_equal(depth, np.arange(5))
    np.testing.assert_array_equal(paths[4], [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(paths[2], [0, 1, 2, 2, 2])
    star = np.array([-1, 0, 0, 0], np.int32)
    mask, depth, paths = run(star, 2)
    np.testing.assert_array_equal(depth, [0, 1, 1, 1])
    np.testing.assert_array_equal(paths, [[0, 0], [0, 1], [0, 2], [0, 3]])
    mask, depth, paths = run(np.array([-1], np.int32), 1)
    assert mask.tolist() == [[True]] and depth.tolist() == [0] and paths.tolist() == [[0]]


CFG = ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                  head_dim=4)
SLOTS = 32  # >= committed prefix (<= 8) + widest path (20)


@settings(max_examples=40, deadline=None)
@given(parent_arrays(), st.integers(0, 8), st.integers(0, 2**31 - 1), st.data())
def test_commit_path_writes_the_accepted_path(parents: np.ndarray, prefix: int, seed: int, data: st.DataObject):
    """Committing paths[node] with num_accepted = depth + 1 (root included) puts exactly the path's rows
    at slots L..L+depth, advances length by depth + 1 and leaves slots < L alone."""
    t = len(parents)
    width = tight_width(parents)
    node = data.draw(st.integers(0, t - 1))
    _, depth, paths = run(parents, width)
    rng = np.random.default_rng(seed)
    shape = (CFG.num_kv_heads, CFG.head_dim)

    def rows(n: int) -> tuple[np.ndarray, ...]:
        return tuple(rng.standard_normal((1, n, *shape)).astype(np.float32) for _ in range(CFG.num_layers))

    cache = kv.init_cache(CFG, SLOTS)
    if prefix:
        cache = kv.append(cache, kv.KVUpdate(k=rows(prefix), v=rows(prefix)))
    before = jax.device_get(cache)
    upd = kv.KVUpdate(k=rows(t), v=rows(t))
    d = int(depth[node])
    out = jax.device_get(kv.commit_path(cache, upd, jnp.asarray(paths[node]), jnp.int32(d + 1)))
    assert int(out.length) == prefix + d + 1
    walk = py_path(parents, node)
    for new, old, src in [*zip(out.k, before.k, upd.k, strict=True), *zip(out.v, before.v, upd.v, strict=True)]:
        np.testing.assert_array_equal(new[:, :, :prefix], old[:, :, :prefix])
        expect = src[:, walk].transpose(0, 2, 1, 3)  # [B, K, depth + 1, D]
        np.testing.assert_array_equal(new[:, :, prefix : prefix + d + 1], expect)
