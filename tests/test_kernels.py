"""The compiled small-T matmul kernels (`dovetail_jax.kernels`) against float64 numpy, and their fallback.

Shapes cover every token-block remainder (T = 1..33), rows/columns that are not multiples of the register
blocks (37 x 61: 4-row blocks + 1 left over, a partial 16-lane vector, a partial column panel) and the model's
real projection shapes; both weight layouts; both host devices. The fallback runs in a subprocess (the choice
is made once per process) and must give the same numbers and one line on stderr.

The cache-attention kernel: its partial softmax state against float64 numpy (per-row ranges, empty ranges,
both scoring paths, odd D and S), and `layers.attention` with it against the XLA path (values and gradients).
"""

from __future__ import annotations

import ast
import fnmatch
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dovetail_jax import kernels
from dovetail_jax.model import layers as L

needs_kernels = pytest.mark.skipif(not kernels.kernels_enabled(), reason="compiled kernels unavailable here")


def _case(t: int, k: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed + 1000 * t + k + n)
    x = rng.standard_normal((t, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)  # [out, in]
    return x, w, x.astype(np.float64) @ w.T.astype(np.float64)


def _check(y: jax.Array, ref: np.ndarray, k: int) -> None:
    # f32 accumulation over k terms of unit-variance products: error ~ sqrt(k) * eps * |terms|
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=0, atol=4e-6 * k)


@needs_kernels
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_every_token_count_odd_shape(layout: str) -> None:
    for t in range(1, 34):
        x, w, ref = _case(t, 37, 61)
        w_l = w if layout == "out_in" else np.ascontiguousarray(w.T)
        _check(kernels.matmul(jnp.asarray(x), jnp.asarray(w_l), layout), ref, 37)


@needs_kernels
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("t", [1, 6, 7, 16, 32])
@pytest.mark.parametrize("k,n", [(576, 960), (1536, 576), (16, 1), (1, 17), (130, 3)])
def test_model_and_edge_shapes(layout: str, t: int, k: int, n: int) -> None:
    x, w, ref = _case(t, k, n)
    w_l = w if layout == "out_in" else np.ascontiguousarray(w.T)
    _check(jax.jit(lambda a, b: kernels.matmul(a, b, layout))(x, w_l), ref, k)


@needs_kernels
def test_both_host_devices_and_batch_dims() -> None:
    x, w, ref = _case(6, 37, 61)
    for dev in jax.devices("cpu")[:2]:
        for in_out in (False, True):
            w_l = jax.device_put(np.ascontiguousarray(w.T) if in_out else w, dev)
            y = jax.jit(L.linear, static_argnums=2)(jax.device_put(x.reshape(2, 3, 37), dev), w_l, in_out)
            assert y.shape == (2, 3, 61) and y.devices() == {dev}
            _check(y.reshape(6, 61), ref, 37)


@needs_kernels
def test_linear_uses_kernel_only_where_valid() -> None:
    w = jnp.ones((8, 4), jnp.float32)
    hlo = jax.jit(L.linear).lower(jnp.ones((32, 4), jnp.float32), w).as_text()
    assert "dovetail_matmul_oi" in hlo
    assert "dovetail_matmul" not in jax.jit(L.linear).lower(jnp.ones((33, 4), jnp.float32), w).as_text()
    assert "dovetail_matmul" not in jax.jit(L.linear).lower(jnp.ones((3, 4), jnp.bfloat16), w).as_text()


@pytest.mark.parametrize("in_out", [False, True])
def test_grads_through_linear_equal_xla(in_out: bool) -> None:
    x, w, _ = _case(5, 37, 61)
    w_l = jnp.asarray(np.ascontiguousarray(w.T) if in_out else w)
    dims = (((1,), (0 if in_out else 1,)), ((), ()))
    cot = jnp.asarray(np.random.default_rng(3).standard_normal((5, 61)).astype(np.float32))

    def loss(f):
        return lambda a, b: jnp.sum(jnp.tanh(f(a, b)) * cot)

    got = jax.jit(jax.grad(loss(lambda a, b: L.linear(a, b, in_out)), argnums=(0, 1)))(jnp.asarray(x), w_l)
    want = jax.grad(loss(lambda a, b: jax.lax.dot_general(a, b, dims)), argnums=(0, 1))(jnp.asarray(x), w_l)
    for g, h in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-5, atol=1e-5)


_FALLBACK = textwrap.dedent("""
    import logging, sys
    import numpy as np
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from dovetail_jax import devices
    devices.setup()
    import jax, jax.numpy as jnp
    from dovetail_jax import kernels
    from dovetail_jax.model import layers as L
    if sys.argv[4] == "no-avx512":
        kernels._cpu_flags = lambda: {"fma", "avx2"}  # a machine without AVX-512
    x = np.load(sys.argv[1]); w = np.load(sys.argv[2])
    y1 = jax.jit(L.linear)(jnp.asarray(x), jnp.asarray(w))
    y2 = jax.jit(L.linear)(jnp.asarray(x[:3]), jnp.asarray(w))  # a second trace: still one message
    np.save(sys.argv[3], np.asarray(y1))
    print("enabled", kernels.kernels_enabled())
""")


@pytest.mark.parametrize("env,cpu", [({"DOVETAIL_KERNELS": "off"}, ""), ({"CXX": "/nonexistent/g++"}, ""),
                                     ({}, "no-avx512")])
def test_fallback_same_result_one_line(tmp_path, env: dict[str, str], cpu: str) -> None:
    x, w, ref = _case(7, 37, 61)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "w.npy", w)
    run_env = {**os.environ, "DOVETAIL_CACHE_DIR": str(tmp_path / "cache"), **env}
    proc = subprocess.run([sys.executable, "-c", _FALLBACK, str(tmp_path / "x.npy"), str(tmp_path / "w.npy"),
                           str(tmp_path / "y.npy"), cpu], capture_output=True, text=True, env=run_env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "enabled False" in proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if "kernel" in ln.lower()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    y = np.load(tmp_path / "y.npy")
    _check(jnp.asarray(y), ref, 37)
    if kernels.kernels_enabled():  # the kernel's result in this process: same numbers within f32 rounding
        np.testing.assert_allclose(np.asarray(L.linear(jnp.asarray(x), jnp.asarray(w))), y, rtol=1e-5, atol=1e-5)


def test_build_is_cached_and_atomic(tmp_path, monkeypatch) -> None:
    if not kernels.kernels_enabled():
        pytest.skip("compiled kernels unavailable here")
    monkeypatch.setenv("DOVETAIL_CACHE_DIR", str(tmp_path))
    first = kernels.build()
    assert first.parent == tmp_path / "kernels" and first.exists()
    stamp = first.stat().st_mtime_ns
    assert kernels.build() == first and first.stat().st_mtime_ns == stamp  # no rebuild
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temp file left behind


def test_build_key_covers_the_shared_header(tmp_path, monkeypatch) -> None:
    """simd.h is compiled into both kernels: editing it must name a new library (a rebuild), not reuse the old."""
    header = tmp_path / "simd.h"
    header.write_bytes(kernels.HEADERS[0].read_bytes())
    before = kernels.build_key("g++")
    monkeypatch.setattr(kernels, "HEADERS", (header,))
    assert kernels.build_key("g++") == before  # the same text: the same library
    header.write_bytes(header.read_bytes().replace(b"0xEE", b"0xEF", 1))
    assert kernels.build_key("g++") != before


def _quoted_includes(path: Path) -> set[str]:
    return {line.split('"')[1] for line in path.read_text().splitlines() if line.startswith('#include "')}


def test_every_local_header_is_keyed_and_shipped() -> None:
    """Each `#include "x.h"` of the kernels that is not XLA's must be in HEADERS (the build key) and match the
    package data globs of setup.py (a wheel or sdist without it could not build the kernels)."""
    folder = kernels.SOURCES[0].parent
    local = {name for p in (*kernels.SOURCES, *kernels.HEADERS) for name in _quoted_includes(p)
             if not name.startswith("xla/")}
    assert local == {p.name for p in kernels.HEADERS} and all((folder / n).is_file() for n in local)
    setup = ast.parse((Path(__file__).resolve().parents[1] / "setup.py").read_text())
    (globs,) = [ast.literal_eval(node.values[node.keys.index(key)]) for node in ast.walk(setup)
                if isinstance(node, ast.Dict) for key in node.keys
                if isinstance(key, ast.Constant) and key.value == "dovetail_jax.kernels"]
    for p in (*kernels.SOURCES, *kernels.HEADERS):
        assert any(fnmatch.fnmatch(p.name, g) for g in globs), (p.name, globs)


# ---- the cache-attention kernel -------------------------------------------------------------------------------


def _attn_ref(q: np.ndarray, k: np.ndarray, v: np.ndarray, lo: np.ndarray, hi: int):
    """Partial softmax state over slots [lo[b], hi) in float64: m (-inf if empty), l, o relative to m."""
    b_, kh, m_, d = q.shape
    m = np.full((b_, kh, m_), -np.inf)
    lsum, o = np.zeros((b_, kh, m_)), np.zeros((b_, kh, m_, d))
    for b in range(b_):
        a, e = max(int(lo[b]), 0), min(hi, k.shape[2])
        if a < e:
            s = np.einsum("kmd,ksd->kms", q[b].astype(np.float64), k[b, :, a:e].astype(np.float64))
            m[b] = s.max(-1)
            p = np.exp(s - m[b][..., None])
            lsum[b], o[b] = p.sum(-1), np.einsum("kms,ksd->kmd", p, v[b, :, a:e].astype(np.float64))
    return m, lsum, o


@needs_kernels
@pytest.mark.parametrize("b,kh,m,s,d", [(1, 3, 3, 2048, 64), (4, 3, 9, 300, 64), (3, 2, 7, 77, 40),
                                        (4, 1, 1, 1000, 128), (3, 3, 20, 130, 40), (2, 1, 13, 5, 16),
                                        (3, 3, 96, 200, 64), (2, 2, 1, 64, 64)])
def test_cache_attention_against_float64(b: int, kh: int, m: int, s: int, d: int) -> None:
    # one row from slot 0, the others from per-row lo > 0 (S not a multiple of the 64-slot sub-block nor of
    # the chunks), hi < S, and with B >= 3 one row whose range is empty; M over 12 takes the transposed path
    rng = np.random.default_rng(b * 1000 + kh * 100 + m + s + d)
    q = (rng.standard_normal((b, kh, m, d)) * d**-0.5).astype(np.float32)
    k = rng.standard_normal((b, kh, s, d)).astype(np.float32) * 2
    v = rng.standard_normal((b, kh, s, d)).astype(np.float32)
    hi = s - 3 if s > 8 else s
    lo = rng.integers(1, max(hi // 2, 2), b).astype(np.int32)
    lo[0] = 0
    if b >= 3:
        lo[2] = hi  # nothing visible
    got = jax.jit(kernels.cache_attention)(q, k, v, lo, np.int32(hi))
    gm, gl, go = (np.asarray(a, np.float64) for a in got)
    rm, rl, ro = _attn_ref(q, k, v, lo, hi)
    empty = ~np.isfinite(rm)
    assert (np.isneginf(gm) == empty).all() and (gl[empty] == 0).all() and (go[empty] == 0).all()
    np.testing.assert_allclose(gm[~empty], rm[~empty], rtol=0, atol=1e-5)
    np.testing.assert_allclose(gl, rl, rtol=2e-5, atol=0)
    np.testing.assert_allclose(go, ro, rtol=0, atol=2e-5 * np.abs(ro).max())
    np.testing.assert_allclose(go[~empty] / gl[~empty][..., None], ro[~empty] / rl[~empty][..., None], atol=2e-5)


def _attn_case(b: int, t: int, lead: int, s: int, per_row_mask: bool, kv_start: bool, seed: int = 0):
    """Random `layers.attention` arguments: SmolLM2's heads (9 query, 3 kv, D=64), a random tree mask over
    `lead` uncommitted keys plus the T new ones (every query sees itself), prefix_len < S."""
    rng = np.random.default_rng(seed + 100 * b + t)
    n, kh, d, u = 9, 3, 64, lead + t

    def f32(*shape: int) -> jax.Array:
        return jnp.asarray(rng.standard_normal(shape).astype(np.float32))

    own = np.eye(t, u, lead, dtype=bool)
    mask = (rng.random((b, t, u) if per_row_mask else (t, u)) < 0.5) | own
    start = jnp.asarray(rng.integers(0, s // 2, b).astype(np.int32)) if kv_start else None
    return (f32(b, t, n, d), f32(b, u, kh, d), f32(b, u, kh, d), f32(b, kh, s, d), f32(b, kh, s, d),
            jnp.int32(s - 7), jnp.asarray(mask), start)


@needs_kernels
@pytest.mark.parametrize("b,t,lead,s,per_row_mask,kv_start", [(1, 1, 0, 2048, False, False),
                                                              (32, 1, 0, 512, True, True),
                                                              (2, 7, 3, 300, False, True),
                                                              (3, 11, 0, 130, True, False),
                                                              (2, 32, 0, 100, False, True)])
def test_attention_with_kernel_equals_xla(b: int, t: int, lead: int, s: int, per_row_mask: bool,
                                          kv_start: bool) -> None:
    args = _attn_case(b, t, lead, s, per_row_mask, kv_start)
    lowered = jax.jit(L.attention).lower(*args).as_text()
    assert "dovetail_cache_attention" in lowered
    got = jax.jit(L.attention)(*args)
    with kernels.xla_only():
        xla = jax.jit(lambda *a: L.attention(*a))
        assert "dovetail_cache_attention" not in xla.lower(*args).as_text()
        want = xla(*args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_attention_kernel_on_both_host_devices() -> None:
    args = _attn_case(2, 3, 0, 90, False, True, seed=2)
    with kernels.xla_only():
        want = np.asarray(jax.jit(lambda *a: L.attention(*a))(*args))
    for dev in jax.devices("cpu")[:2]:
        got = jax.jit(L.attention)(*jax.device_put(args, dev))
        assert got.devices() == {dev}
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_grads_through_attention_with_cache_equal_xla() -> None:
    # the kernel's VJP is XLA's: differentiating through a cached attention works and gives XLA's gradients
    args = _attn_case(2, 5, 2, 200, True, True, seed=1)
    cot = jnp.asarray(np.random.default_rng(5).standard_normal((2, 5, 9 * 64)).astype(np.float32))

    def loss(*a: jax.Array) -> jax.Array:
        return jnp.sum(jnp.tanh(L.attention(*a)) * cot)

    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*args)
    with kernels.xla_only():
        want = jax.jit(jax.grad(lambda *a: loss(*a), argnums=(0, 1, 2, 3, 4)))(*args)
    for g, h in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_attention_kernel_only_where_valid(monkeypatch) -> None:
    q, k = jnp.ones((2, 3, 6, 64), jnp.float32), jnp.ones((2, 3, 100, 64), jnp.float32)
    assert kernels.supports_attention(q, k, k)
    assert not kernels.supports_attention(q.astype(jnp.bfloat16), k, k)
    assert not kernels.supports_attention(jnp.ones((2, 3, kernels.MAX_ATTENTION_ROWS + 1, 64)), k, k)
    assert not kernels.supports_attention(q, k[:1], k[:1])
    assert not kernels.supports_attention(q, k, k[..., :32])
    with kernels.xla_only():
        assert not kernels.supports_attention(q, k, k)
    monkeypatch.setenv("DOVETAIL_ATTENTION_KERNEL", "off")  # attention on XLA, the matmul kernel still on
    assert not kernels.supports_attention(q, k, k) and kernels.kernels_enabled()
    args = _attn_case(2, 3, 0, 100, False, True)
    assert "dovetail_cache_attention" not in jax.jit(lambda *a: L.attention(*a)).lower(*args).as_text()


_ATTN_FALLBACK = textwrap.dedent("""
    import sys
    import numpy as np
    from dovetail_jax import devices
    devices.setup()
    import jax, jax.numpy as jnp
    from dovetail_jax import kernels
    from dovetail_jax.model import layers as L
    a = np.load(sys.argv[1])
    args = [jnp.asarray(a[f"a{i}"]) for i in range(8)]
    hlo = jax.jit(L.attention).lower(*args).as_text()
    np.save(sys.argv[2], np.asarray(jax.jit(L.attention)(*args)))
    print("enabled", kernels.kernels_enabled(), "custom call", "dovetail_cache_attention" in hlo)
""")


def test_attention_fallback_same_result(tmp_path) -> None:
    args = _attn_case(3, 4, 0, 150, True, True)
    np.savez(tmp_path / "a.npz", **{f"a{i}": np.asarray(x) for i, x in enumerate(args)})
    run_env = {**os.environ, "DOVETAIL_CACHE_DIR": str(tmp_path / "cache"), "DOVETAIL_KERNELS": "off"}
    proc = subprocess.run([sys.executable, "-c", _ATTN_FALLBACK, str(tmp_path / "a.npz"), str(tmp_path / "y.npy")],
                          capture_output=True, text=True, env=run_env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "enabled False custom call False" in proc.stdout
    assert "Traceback" not in proc.stderr
    y = np.load(tmp_path / "y.npy")
    assert y.shape == (3, 4, 9 * 64) and np.isfinite(y).all()
    if kernels.kernels_enabled():  # the kernel's result in this process: same numbers within f32 rounding
        np.testing.assert_allclose(np.asarray(jax.jit(L.attention)(*args)), y, rtol=1e-5, atol=1e-5)
