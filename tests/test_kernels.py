"""The compiled small-T matmul kernels (`dovetail_jax.kernels`) against float64 numpy, and their fallback.

Shapes cover every token-block remainder (T = 1..33), rows/columns that are not multiples of the register
blocks (37 x 61: 4-row blocks + 1 left over, a partial 16-lane vector, a partial column panel) and the model's
real projection shapes; both weight layouts; both host devices. The fallback runs in a subprocess (the choice
is made once per process) and must give the same numbers and one line on stderr.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

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
