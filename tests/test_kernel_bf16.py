"""bfloat16 weights in the compiled matmul kernel and in the draft loaded from a bf16 checkpoint.

The claim is bit-identity, not closeness: the kernel widens each bf16 weight to its exact f32 value in registers
and does the f32 kernel's FMAs in the f32 kernel's order, so `matmul(x, w_bf16)` must equal
`matmul(x, w_bf16.astype(f32))` to the last bit (every token count 1..32, both layouts, shapes with partial
vectors, panels and row blocks); XLA's path (kernels off) upcasts inside the program, so the same holds there.
Consequently a draft whose matrices are kept bf16 (`checkpoint.load_draft`) must give the same features, draft
log-probabilities and trees, bit for bit, as the same draft upcast to f32. Training must still get float32.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dovetail_jax import devices, kernels
from dovetail_jax.config import DraftConfig, ModelConfig, TreeConfig
from dovetail_jax.io import checkpoint as ck
from dovetail_jax.model import draft as D
from dovetail_jax.model import layers as L
from dovetail_jax.model.cache import init_cache
from dovetail_jax.model.params import TargetParams, from_tensors, init_tensors
from dovetail_jax.speculation.drafting import draft_step

needs_kernels = pytest.mark.skipif(not kernels.kernels_enabled(), reason="compiled kernels unavailable here")

# H = 48: not a multiple of 16 lanes (masked tails), F = 80, q = 48, kv = 24 (GQA)
CFG = ModelConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=12, max_position_embeddings=128, name="tiny-target")
SHA = "c" * 64


def bits(a: jax.Array | np.ndarray) -> np.ndarray:
    """The raw f32 bit patterns (so -0.0 != 0.0 and any last-bit difference shows)."""
    return np.asarray(a, np.float32).view(np.uint32)


def bf16_weight(shape: tuple[int, ...], seed: int) -> jax.Array:
    """Random bf16 weights with a few special values: zeros of both signs, subnormals, large and tiny."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    flat = w.reshape(-1)
    special = np.array([0.0, -0.0, 1e-39, -3e-40, 100.0, 1e-30], np.float32)
    flat[rng.choice(flat.size, size=min(flat.size, special.size), replace=False)] = special[: min(flat.size, 6)]
    return jnp.asarray(w.astype(jnp.bfloat16))


def tokens(t: int, k: int, seed: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal((t, k)).astype(np.float32))


def assert_bits_equal(a: jax.Array, b: jax.Array, what: str = "") -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    np.testing.assert_array_equal(bits(a), bits(b), err_msg=what)


# --------------------------------------------------------------------------------------------- the kernel


@needs_kernels
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("k,n", [(37, 61), (16, 1), (1, 17), (130, 3), (48, 200)])
def test_bf16_kernel_equals_f32_kernel_every_token_count(layout: str, k: int, n: int) -> None:
    w = bf16_weight((n, k) if layout == "out_in" else (k, n), seed=k * n)
    w32 = w.astype(jnp.float32)
    for t in range(1, kernels.MAX_TOKENS + 1):
        x = tokens(t, k, seed=t)
        assert_bits_equal(kernels.matmul(x, w, layout), kernels.matmul(x, w32, layout), f"T={t}")


@needs_kernels
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("t", [1, 4, 7, 16, 32])
@pytest.mark.parametrize("k,n", [(576, 960), (1536, 576)])
def test_bf16_kernel_model_shapes_against_float64(layout: str, t: int, k: int, n: int) -> None:
    """Real projection shapes (several chunks, so the work sharing runs): bit-equal to the f32 kernel, and both
    within f32 rounding of a float64 product (an independent reference)."""
    w = bf16_weight((n, k) if layout == "out_in" else (k, n), seed=t)
    x = tokens(t, k, seed=100 + t)
    y = jax.jit(lambda a, b: kernels.matmul(a, b, layout))(x, w)
    assert_bits_equal(y, kernels.matmul(x, w.astype(jnp.float32), layout))
    w64 = np.asarray(w.astype(jnp.float32), np.float64)
    ref = np.asarray(x, np.float64) @ (w64.T if layout == "out_in" else w64)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=0, atol=4e-6 * k)


@needs_kernels
def test_linear_dispatches_bf16_weights_to_the_bf16_targets() -> None:
    x = tokens(5, 48, 1)
    for in_out, name in ((False, "dovetail_matmul_oi_bf16"), (True, "dovetail_matmul_io_bf16")):
        w = bf16_weight((48, 40) if in_out else (40, 48), 2)
        hlo = jax.jit(L.linear, static_argnums=2).lower(x, w, in_out).as_text()
        assert name in hlo
    assert kernels.supports(x, w) and not kernels.supports(x.astype(jnp.bfloat16), w)
    assert not kernels.supports(x, w.astype(jnp.float16))
    assert "dovetail_matmul" not in jax.jit(L.linear).lower(tokens(33, 48, 1), bf16_weight((40, 48), 2)).as_text()


@needs_kernels
def test_linear_bf16_on_both_host_devices_with_batch_dims() -> None:
    x = np.asarray(tokens(6, 37, 3)).reshape(2, 3, 37)
    for dev in jax.devices("cpu")[:2]:
        for in_out in (False, True):
            w = jax.device_put(bf16_weight((37, 61) if in_out else (61, 37), 4), dev)
            f = jax.jit(L.linear, static_argnums=2)
            y = f(jax.device_put(x, dev), w, in_out)
            assert y.shape == (2, 3, 61) and y.devices() == {dev} and y.dtype == jnp.float32
            assert_bits_equal(y, f(jax.device_put(x, dev), w.astype(jnp.float32), in_out))


@pytest.mark.parametrize("in_out", [False, True])
@pytest.mark.parametrize("t", [1, 5, 33])
def test_xla_path_upcasts_bf16_weights(in_out: bool, t: int) -> None:
    """XLA's path (kernels forced off while tracing; T = 33 is beyond the kernel anyway) equals itself on the
    upcast weights."""
    x = tokens(t, 37, 5)
    w = bf16_weight((37, 61) if in_out else (61, 37), 6)
    with kernels.xla_only():
        y = jax.jit(lambda a, b: L.linear(a, b, in_out))(x, w)
        hlo = jax.jit(lambda a, b: L.linear(a, b, in_out)).lower(x, w).as_text()
        want = jax.jit(lambda a, b: L.linear(a, b, in_out))(x, w.astype(jnp.float32))
    assert "dovetail_matmul" not in hlo and y.dtype == jnp.float32
    assert_bits_equal(y, want)


@pytest.mark.parametrize("in_out", [False, True])
def test_input_gradient_with_bf16_weights(in_out: bool) -> None:
    """The kernel's custom VJP (XLA's dot's gradient) also takes bf16 weights: the input gradient equals the one
    for the upcast weights."""
    x = tokens(5, 37, 7)
    w = bf16_weight((37, 61) if in_out else (61, 37), 8)
    cot = tokens(5, 61, 9)

    def grad(weights: jax.Array) -> jax.Array:
        return jax.jit(jax.grad(lambda a: jnp.sum(jnp.tanh(L.linear(a, weights, in_out)) * cot)))(x)

    assert_bits_equal(grad(w), grad(w.astype(jnp.float32)))


_FALLBACK = textwrap.dedent("""
    import sys
    import numpy as np
    from dovetail_jax import devices
    devices.setup()
    import jax, jax.numpy as jnp
    from dovetail_jax import kernels
    from dovetail_jax.model import layers as L
    x = jnp.asarray(np.load(sys.argv[1])); w = jnp.asarray(np.load(sys.argv[2])).astype(jnp.bfloat16)
    outs = [jax.jit(L.linear, static_argnums=2)(x, v, io) for io in (False, True) for v in (w, w.astype(jnp.float32))]
    np.save(sys.argv[3], np.stack([np.asarray(o) for o in outs]))
    print("enabled", kernels.kernels_enabled())
""")


def test_kernels_off_bf16_equals_upcast(tmp_path) -> None:
    """With `DOVETAIL_KERNELS=off` (a process-wide choice: a subprocess) bf16 weights give the f32 results."""
    x = np.asarray(tokens(7, 37, 10))
    w = np.asarray(bf16_weight((37, 37), 11).astype(jnp.float32))  # square: both layouts apply
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "w.npy", w)
    env = {**os.environ, "DOVETAIL_CACHE_DIR": str(tmp_path / "cache"), "DOVETAIL_KERNELS": "off"}
    proc = subprocess.run([sys.executable, "-c", _FALLBACK, str(tmp_path / "x.npy"), str(tmp_path / "w.npy"),
                           str(tmp_path / "y.npy")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "enabled False" in proc.stdout
    y = np.load(tmp_path / "y.npy")  # [oi bf16, oi f32, io bf16, io f32]
    assert_bits_equal(y[0], y[1])
    assert_bits_equal(y[2], y[3])
    np.testing.assert_allclose(y[0], x.astype(np.float64) @ w.T.astype(np.float64), rtol=0, atol=4e-6 * 37)


# --------------------------------------------------------------------------------------------- the draft


def tiny_target() -> TargetParams:
    spec = TargetParams.spec(CFG)
    return from_tensors(spec, init_tensors(spec, jax.random.key(3)), devices.target_device())


def bf16_tensors(dcfg: DraftConfig, seed: int) -> dict[str, np.ndarray]:
    """Random draft tensors already rounded to bf16 (what a bf16 checkpoint holds), as float32."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in D.expected_draft_shapes(CFG, dcfg).items():
        x = 1.0 + 0.1 * rng.standard_normal(shape) if len(shape) == 1 else rng.standard_normal(shape) / np.sqrt(
            shape[-1])
        out[name] = np.asarray(x, np.float32).astype(jnp.bfloat16).astype(np.float32)
    return out


def leaf_dtypes(params: D.DraftParams) -> dict[str, str]:
    return {jax.tree_util.keystr(p): str(x.dtype) for p, x in jax.tree_util.tree_leaves_with_path(params)}


@pytest.fixture(scope="module")
def target() -> TargetParams:
    return tiny_target()


@pytest.mark.parametrize("fusion,layout", [("dgf", "out_in"), ("dgf", "in_out"), ("eagle", "out_in")])
def test_bf16_checkpoint_keeps_matrices_bf16_and_same_values(tmp_path, fusion: str, layout: str) -> None:
    dcfg = DraftConfig(num_layers=2, fusion=fusion)
    t = bf16_tensors(dcfg, 1)
    params = D.draft_params_from_tensors(CFG, dcfg, t, layout=layout)
    folder = ck.save_draft(tmp_path / "d", CFG, dcfg, params, target_sha256=SHA, dtype="bfloat16")
    acc = devices.accelerator_device()
    _, p16, _, _ = ck.load_draft(folder, CFG, acc, SHA)
    _, p32, _, _ = ck.load_draft(folder, CFG, acc, SHA, keep_bf16=False)
    kinds = leaf_dtypes(p16)
    assert {v for k, v in kinds.items() if "norm" in k or k.endswith(".b")} == {"float32"}
    matrices = {k: v for k, v in kinds.items() if "norm" not in k and not k.endswith(".b")}
    assert matrices and set(matrices.values()) == {"bfloat16"}, kinds
    assert set(leaf_dtypes(p32).values()) == {"float32"}
    assert all(x.devices() == {acc} for x in jax.tree.leaves(p16))
    for a, b in zip(jax.tree.leaves(p16), jax.tree.leaves(p32), strict=True):
        assert_bits_equal(a.astype(jnp.float32), b)
    # saving the bf16-held draft writes the same file
    again = ck.save_draft(tmp_path / "again", CFG, dcfg, p16, target_sha256=SHA, dtype="bfloat16")
    assert (again / ck.WEIGHTS).read_bytes() == (folder / ck.WEIGHTS).read_bytes()


def test_float32_checkpoint_is_never_kept_bf16(tmp_path) -> None:
    """Even when every value happens to be a bf16 (here: bf16-rounded weights saved as float32)."""
    dcfg = DraftConfig(num_layers=1, fusion="dgf")
    params = D.draft_params_from_tensors(CFG, dcfg, bf16_tensors(dcfg, 2))
    folder = ck.save_draft(tmp_path / "d", CFG, dcfg, params, dtype="float32")
    _, got, _, _ = ck.load_draft(folder, CFG)
    assert set(leaf_dtypes(got).values()) == {"float32"}


def test_draft_f32_switch_and_training_load_float32(tmp_path, monkeypatch) -> None:
    from dovetail_jax.train.pipeline import _warm_start

    dcfg = DraftConfig(num_layers=1, fusion="dgf")
    params = D.draft_params_from_tensors(CFG, dcfg, bf16_tensors(dcfg, 3))
    folder = ck.save_draft(tmp_path / "d", CFG, dcfg, params, target_sha256=SHA, dtype="bfloat16")
    assert "bfloat16" in leaf_dtypes(ck.load_draft(folder, CFG)[1]).values()
    warm, _, _ = _warm_start(SimpleNamespace(cfg=CFG, sha256=SHA), dcfg, folder)  # a training run's start
    assert set(leaf_dtypes(warm).values()) == {"float32"}
    monkeypatch.setenv("DOVETAIL_DRAFT_F32", "1")
    assert set(leaf_dtypes(ck.load_draft(folder, CFG)[1]).values()) == {"float32"}


def test_only_exact_matrices_become_bf16() -> None:
    """`keep_bf16` never changes a value: a matrix bf16 cannot hold exactly stays float32."""
    dcfg = DraftConfig(num_layers=1, fusion="dgf")
    t = bf16_tensors(dcfg, 4)
    t["W_1"] = t["W_1"].copy()
    t["W_1"][0, 0] = np.float32(1.0 + 2.0**-20)
    kinds = leaf_dtypes(D.draft_params_from_tensors(CFG, dcfg, t, keep_bf16=True))
    assert kinds[".fusion.w1"] == "float32" and kinds[".fusion.w2"] == "bfloat16"


def run_cycle(params: D.DraftParams, shared: D.DraftShared, dcfg: DraftConfig, seed: int):
    """Features, top-4 draft log-probabilities and ids of a forward over 6 pairs, then two drafting cycles
    (a prompt's first tree on an empty cache, then one on the filled cache)."""
    rng = np.random.default_rng(seed)
    acc = devices.accelerator_device()
    m = 6
    feats = jax.device_put(rng.standard_normal((1, m, CFG.hidden_size)).astype(np.float32), acc)
    ids = jax.device_put(rng.integers(0, CFG.vocab_size, (1, m)).astype(np.int32), acc)
    dmc = D.draft_model_config(CFG, dcfg)
    cache = init_cache(dmc, 32, device=acc)
    causal = jnp.tril(jnp.ones((m, m), bool))
    # fresh lambdas: jit's trace cache would otherwise reuse a trace made with the other kernel setting
    fwd = jax.jit(lambda p, f, i, c: D.forward(p, shared, CFG, dcfg, f, i, jnp.arange(m, dtype=jnp.int32)[None],
                                               causal, c, empty_cache=True)[0])
    hlo = fwd.lower(params, feats, ids, cache).as_text()
    x = fwd(params, feats, ids, cache)
    lp, top = jax.jit(lambda h: D.top_log_probs(shared, h, 4))(x)
    tree = TreeConfig(top_k=3, depth=3, total_tokens=8)
    step = jax.jit(lambda *a, **k: draft_step(*a, **k), static_argnames=("cfg", "dcfg", "tree", "empty_cache"))
    kw = {"cfg": CFG, "dcfg": dcfg, "tree": tree}
    t1, p1, cache = step(params, shared, cache, feats, ids, jnp.int32(m), empty_cache=True, **kw)
    t2, p2, cache = step(params, shared, cache, feats[:, :3], ids[:, :3], jnp.int32(2), **kw)
    return hlo, (x, lp, top, t1, p1, t2, p2, cache.k[0])


@pytest.mark.parametrize("fusion,layout,kernel", [("dgf", "out_in", True), ("dgf", "in_out", True),
                                                  ("eagle", "out_in", True), ("dgf", "out_in", False)])
def test_bf16_draft_gives_the_f32_drafts_outputs_and_trees(target, fusion: str, layout: str, kernel: bool) -> None:
    if kernel and not kernels.kernels_enabled():
        pytest.skip("compiled kernels unavailable here")
    dcfg = DraftConfig(num_layers=2, fusion=fusion, draft_vocab_size=40)
    acc = devices.accelerator_device()
    t = bf16_tensors(dcfg, 5)
    p16 = D.draft_params_from_tensors(CFG, dcfg, t, acc, layout=layout, keep_bf16=True)
    assert "bfloat16" in leaf_dtypes(p16).values()
    vm = np.random.default_rng(6).permutation(CFG.vocab_size)[:40].astype(np.int32)
    shared = D.make_shared(target, CFG, vm, acc)
    with kernels.xla_only() if not kernel else contextlib.nullcontext():
        hlo, got = run_cycle(p16, shared, dcfg, seed=7)
        _, want = run_cycle(D.upcast_params(p16), shared, dcfg, seed=7)
    assert ("_bf16" in hlo) == kernel and ("dovetail_matmul" in hlo) == kernel
    assert len(set(np.asarray(got[3]).tolist())) > 1  # a real tree, not a degenerate one
    for a, b, what in zip(got, want, ("features", "log-probs", "top ids", "tree 1", "parents 1", "tree 2",
                                      "parents 2", "cache k"), strict=True):
        if a.dtype == jnp.float32:
            assert_bits_equal(a, b, what)
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=what)
