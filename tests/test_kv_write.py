"""The one-call KV-cache write (`kernels.kv_write`, used by `cache.append` and `cache.commit_path`) against a
numpy reference and against XLA's gather + dynamic-update-slice path, in place under donation, on both host
devices.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dovetail_jax import kernels
from dovetail_jax.model import cache as C

needs_kernels = pytest.mark.skipif(not kernels.kernels_enabled(), reason="compiled kernels unavailable here")


def _reference(buf: np.ndarray, new: np.ndarray, path: np.ndarray, start: int) -> np.ndarray:
    """numpy: rows `path` of new [B, T, K, D] into buf [B, K, S, D] at slots start.. (start clamped to S - W)."""
    out = buf.copy()
    w, s = len(path), buf.shape[2]
    s0 = min(max(start, 0), s - w)
    out[:, :, s0:s0 + w] = new[:, path].transpose(0, 2, 1, 3)
    return out


def _case(b: int, t: int, kh: int, d: int, s: int, layers: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    bufs = [rng.standard_normal((b, kh, s, d)).astype(np.float32) for _ in range(2 * layers)]
    new = [rng.standard_normal((b, t, kh, d)).astype(np.float32) for _ in range(2 * layers)]
    return bufs, new


@needs_kernels
@pytest.mark.parametrize("b,t,w,start", [(1, 6, 3, 10), (1, 1, 1, 0), (3, 4, 4, 7), (2, 5, 5, 30), (1, 6, 4, 31)])
def test_kernel_matches_numpy(b, t, w, start):
    bufs, new = _case(b, t, 3, 8, 32, 2, seed=b * 100 + t)
    path = np.random.default_rng(w).integers(0, t, w).astype(np.int32)
    out = jax.jit(kernels.kv_write)(tuple(map(jnp.asarray, bufs)), tuple(map(jnp.asarray, new)), jnp.asarray(path),
                                    jnp.int32(start))
    for o, buf, u in zip(out, bufs, new, strict=True):
        np.testing.assert_array_equal(np.asarray(o), _reference(buf, u, path, start))


@needs_kernels
def test_supports_kv_write_refuses_what_it_cannot_do():
    c = jnp.zeros((1, 3, 16, 8), jnp.float32)
    u = jnp.zeros((1, 4, 3, 8), jnp.float32)
    assert kernels.supports_kv_write((c,), (u,), 4)
    assert not kernels.supports_kv_write((c,), (u,), 17)  # more rows than slots
    assert not kernels.supports_kv_write((c.astype(jnp.bfloat16),), (u,), 4)
    assert not kernels.supports_kv_write((c,), (jnp.zeros((1, 4, 2, 8), jnp.float32),), 4)  # kv heads differ
    assert not kernels.supports_kv_write((c, c), (u,), 4)
    with kernels.xla_only():
        assert not kernels.supports_kv_write((c,), (u,), 4)


def _kv(bufs, new, layers, length):
    cache = C.KVCache(k=tuple(map(jnp.asarray, bufs[:layers])), v=tuple(map(jnp.asarray, bufs[layers:])),
                      length=jnp.int32(length))
    return cache, C.KVUpdate(k=tuple(map(jnp.asarray, new[:layers])), v=tuple(map(jnp.asarray, new[layers:])))


@needs_kernels
@pytest.mark.parametrize("device", [0, 1])
def test_commit_and_append_equal_xla_and_stay_in_place(device):
    """`commit_path` and `append` through the kernel give XLA's caches exactly, with the cache donated (the
    donated buffers are consumed: the write did not need a copy of them to survive)."""
    dev = jax.devices()[min(device, len(jax.devices()) - 1)]
    layers, length = 3, 9
    bufs, new = _case(2, 6, 3, 8, 24, layers, seed=7)
    path, n_acc = jnp.asarray([0, 2, 5, 1], jnp.int32), jnp.int32(3)
    results = {}
    for mode in ("kernel", "xla"):
        with jax.default_device(dev), (kernels.xla_only() if mode == "xla" else contextlib.nullcontext()):
            cache, update = _kv(bufs, new, layers, length)
            # fresh partials: jit caches traces per function, and the kernel choice is made when tracing
            commit = jax.jit(functools.partial(C.commit_path), donate_argnums=0)
            append = jax.jit(functools.partial(C.append), donate_argnums=0)
            assert ("dovetail_kv_write" in commit.lower(cache, update, path, n_acc).as_text()) == (mode == "kernel")
            first = cache.k[0]
            cache = commit(cache, update, path, n_acc)
            assert first.is_deleted()  # donated
            cache = append(cache, update, jnp.int32(5))
            assert cache.k[0].devices() == {dev}
            results[mode] = jax.tree.map(np.asarray, cache)
    for a, b in zip(jax.tree.leaves(results["kernel"]), jax.tree.leaves(results["xla"]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(results["kernel"].length) == length + 3 + 5
    # and both against numpy: the path at `length`, then all 6 rows after the 3 accepted
    want = _reference(_reference(bufs[0], new[0], np.array([0, 2, 5, 1]), length), new[0], np.arange(6), length + 3)
    np.testing.assert_array_equal(results["kernel"].k[0], want)
