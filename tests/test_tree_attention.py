"""The fused tree-attention kernel (`kernels.tree_attention`: RoPE, the cache part, the new tokens under the tree
mask, one softmax) against float64 numpy, and `layers.self_attention` with it against its XLA path (values,
gradients, both host devices, where it is used and where not).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dovetail_jax import kernels
from dovetail_jax.model import layers as L

needs_kernels = pytest.mark.skipif(not kernels.kernels_enabled(), reason="compiled kernels unavailable here")


def _rope64(x: np.ndarray, pos: np.ndarray, theta: float) -> np.ndarray:
    """Rotate-half RoPE in float64: x [B, T, H, D], pos [B, T]."""
    d = x.shape[-1]
    ang = pos[..., None].astype(np.float64) * theta ** (-np.arange(0, d, 2) / d)  # [B, T, D/2]
    c, s = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def _reference(qkv, pos, theta, kc, vc, lo, hi, mask):
    """Float64 attention of T new tokens: every query head h (kv head h // G) over the cache slots [lo[b], hi)
    and the new keys the mask shows it, softmax over both. Returns out [B, T, N D], k, v [B, T, K, D]."""
    qkv, kc, vc = (np.asarray(a, np.float64) for a in (qkv, kc, vc))
    b, t, w = qkv.shape
    kh, d = kc.shape[1], kc.shape[3]
    n = w // d - 2 * kh
    q = _rope64(qkv[..., : n * d].reshape(b, t, n, d), pos, theta)
    k = _rope64(qkv[..., n * d:(n + kh) * d].reshape(b, t, kh, d), pos, theta)
    v = qkv[..., (n + kh) * d:].reshape(b, t, kh, d)
    mask = np.broadcast_to(np.asarray(mask), (b, t, t))
    out = np.zeros((b, t, n, d))
    for bi in range(b):
        for h in range(n):
            j = h // (n // kh)
            keys = np.concatenate([kc[bi, j, lo[bi]:hi], k[bi, :, j]])
            vals = np.concatenate([vc[bi, j, lo[bi]:hi], v[bi, :, j]])
            for ti in range(t):
                seen = np.concatenate([np.ones(max(hi - lo[bi], 0), bool), mask[bi, ti]])
                s = keys[seen] @ q[bi, ti, h] / np.sqrt(d)
                p = np.exp(s - s.max())
                out[bi, ti, h] = p @ vals[seen] / p.sum()
    return out.reshape(b, t, n * d), k, v


def _case(b: int, t: int, n: int, kh: int, d: int, s: int, hi: int, per_row_mask: bool, seed: int = 0):
    rng = np.random.default_rng(seed + 1000 * b + t)
    qkv = rng.standard_normal((b, t, (n + 2 * kh) * d)).astype(np.float32)
    pos = (hi + rng.integers(0, 3, (b, t))).astype(np.int32)
    kc, vc = (rng.standard_normal((b, kh, s, d)).astype(np.float32) for _ in range(2))
    mask = (rng.random((b, t, t) if per_row_mask else (t, t)) < 0.5) | np.eye(t, dtype=bool)
    lo = rng.integers(0, max(hi // 3, 1), b).astype(np.int32)
    return qkv, pos, kc, vc, lo, mask


def _run(qkv, pos, kc, vc, lo, hi, mask, theta=10000.0):
    cos, sin = L.rope_cos_sin(jnp.asarray(pos), kc.shape[3], theta)
    f = jax.jit(lambda *a: L.self_attention(*a[:3], kc.shape[1], *a[3:]))
    args = (jnp.asarray(qkv), cos, sin, jnp.asarray(kc), jnp.asarray(vc), jnp.int32(hi), jnp.asarray(mask), None,
            None, jnp.asarray(lo))
    return f, args


@needs_kernels
@pytest.mark.parametrize("b,t,n,kh,d,s,hi,per_row_mask", [
    (1, 6, 9, 3, 64, 512, 180, False),   # SmolLM2's heads, the default tree's verification
    (1, 1, 9, 3, 64, 300, 299, False),   # a decode step, the cache nearly full
    (2, 16, 9, 3, 64, 256, 70, True),    # a 16-token tree, per-row masks (batched generation)
    (3, 5, 4, 2, 10, 40, 33, True),      # odd D/16, G = 2
    (2, 3, 6, 3, 64, 100, 0, False),     # an empty cache: new tokens only
])
def test_tree_attention_against_float64(b, t, n, kh, d, s, hi, per_row_mask) -> None:
    qkv, pos, kc, vc, lo, mask = _case(b, t, n, kh, d, s, hi, per_row_mask)
    f, args = _run(qkv, pos, kc, vc, lo, hi, mask)
    assert "dovetail_tree_attention" in f.lower(*args).as_text()
    got = [np.asarray(a) for a in f(*args)]
    want = _reference(qkv, pos, 10000.0, kc, vc, lo, hi, mask)
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=2e-5 * max(1.0, np.abs(w).max()))


@needs_kernels
def test_tree_attention_equals_the_xla_path_on_both_host_devices() -> None:
    qkv, pos, kc, vc, lo, mask = _case(2, 7, 9, 3, 64, 200, 150, True, seed=3)
    f, args = _run(qkv, pos, kc, vc, lo, 150, mask)
    with kernels.xla_only():
        xla = jax.jit(lambda *a: L.self_attention(*a[:3], 3, *a[3:]))
        assert "dovetail_tree_attention" not in xla.lower(*args).as_text()
        want = [np.asarray(a) for a in xla(*args)]
    for dev in jax.devices("cpu")[:2]:
        got = f(*jax.device_put(args, dev))
        for g, w in zip(got, want, strict=True):
            assert g.devices() == {dev}
            np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_grads_through_tree_attention_equal_xla() -> None:
    qkv, pos, kc, vc, lo, mask = _case(2, 4, 9, 3, 64, 90, 60, False, seed=4)
    _, args = _run(qkv, pos, kc, vc, lo, 60, mask)
    cot = jnp.asarray(np.random.default_rng(5).standard_normal((2, 4, 9 * 64)).astype(np.float32))

    def loss(qkv, cos, sin, k, v):
        out, kn, vn = L.self_attention(qkv, cos, sin, 3, k, v, *args[5:])
        return jnp.sum(jnp.tanh(out) * cot) + jnp.sum(kn * kn) + jnp.sum(jnp.sin(vn))

    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*args[:5])
    with kernels.xla_only():
        want = jax.jit(jax.grad(lambda *a: loss(*a), argnums=(0, 1, 2, 3, 4)))(*args[:5])
    for g, h in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-4, atol=1e-5)


@needs_kernels
def test_tree_attention_only_where_valid(monkeypatch) -> None:
    qkv, k = jnp.ones((1, 6, 15 * 64), jnp.float32), jnp.ones((1, 3, 100, 64), jnp.float32)
    mask = jnp.ones((6, 6), bool)
    assert kernels.supports_tree_attention(qkv, k, k, mask)
    assert kernels.supports_tree_attention(qkv, k, k, jnp.ones((1, 6, 6), bool))
    assert not kernels.supports_tree_attention(qkv, k, k, jnp.ones((6, 8), bool))  # lead keys: not fused
    assert not kernels.supports_tree_attention(qkv, k, k, mask.astype(jnp.int32))
    assert not kernels.supports_tree_attention(qkv.astype(jnp.bfloat16), k, k, mask)
    assert not kernels.supports_tree_attention(qkv[..., :-1], k, k, mask)  # not (N + 2K) D
    assert not kernels.supports_tree_attention(jnp.ones((1, 6, 16 * 64)), k, k, mask)  # K does not divide N
    too_many = kernels.MAX_ATTENTION_ROWS // 3 + 1
    assert not kernels.supports_tree_attention(jnp.ones((1, too_many, 15 * 64)), k, k,
                                               jnp.ones((too_many, too_many), bool))
    with kernels.xla_only():
        assert not kernels.supports_tree_attention(qkv, k, k, mask)
    monkeypatch.setenv("DOVETAIL_TREE_ATTENTION", "off")  # the cache kernel stays, RoPE and the merge go to XLA
    assert not kernels.supports_tree_attention(qkv, k, k, mask) and kernels.attention_enabled()
    case = _case(1, 3, 9, 3, 64, 50, 20, False)
    f, args = _run(*case[:5], 20, case[5])
    text = f.lower(*args).as_text()
    assert "dovetail_tree_attention" not in text and "dovetail_cache_attention" in text


@needs_kernels
def test_lead_keys_take_the_xla_path() -> None:
    # the draft's tree expansion passes uncommitted lead keys: RoPE and attention stay in XLA (+ the cache kernel)
    qkv, pos, kc, vc, lo, _ = _case(1, 2, 9, 3, 64, 40, 10, False)
    cos, sin = L.rope_cos_sin(jnp.asarray(pos), 64, 10000.0)
    lead = jnp.ones((1, 3, 3, 64), jnp.float32)
    f = jax.jit(lambda *a: L.self_attention(*a[:3], 3, *a[3:]))
    args = (jnp.asarray(qkv), cos, sin, jnp.asarray(kc), jnp.asarray(vc), jnp.int32(10), jnp.ones((2, 5), bool),
            lead, lead, None)
    text = f.lower(*args).as_text()
    assert "dovetail_tree_attention" not in text and "dovetail_cache_attention" in text
    out, k, v = f(*args)
    assert out.shape == (1, 2, 9 * 64) and k.shape == v.shape == (1, 2, 3, 64)
