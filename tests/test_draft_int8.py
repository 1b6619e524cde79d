"""Int8 draft weights: `model.quant`, `kernels.matmul_q8`, `draft.quantize_matrices`, `make_shared(head_dtype=
"int8")`, `api.load_draft(weight_dtype=)`, `--draft-weights` / `--draft-head int8`.

References are independent: the quantization against its closed form (|w - q s| <= s / 2, the row's absmax maps to
+-127), the kernel and XLA's path against a float64 product of the int8 values and scales, a quantized draft against
the same draft run on the dequantized matrices written out in f32. Dovetail's greedy output must stay the target's.
"""

from __future__ import annotations

import contextlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dovetail_jax import devices, kernels
from dovetail_jax.config import DraftConfig, ModelConfig
from dovetail_jax.errors import ConfigError
from dovetail_jax.model import draft as D
from dovetail_jax.model import layers as L
from dovetail_jax.model import quant
from dovetail_jax.model.cache import init_cache
from dovetail_jax.model.params import TargetParams, from_tensors, init_tensors

needs_kernels = pytest.mark.skipif(not kernels.kernels_enabled(), reason="compiled kernels unavailable here")

CFG = ModelConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=12, max_position_embeddings=128, name="tiny-target")


def weights(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Gaussian weights with an outlier per matrix and an all-zero output channel (scale 1, q 0)."""
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.05
    w.reshape(-1)[seed % w.size] = 0.9
    return w


# --- quantization --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_out", [False, True])
def test_quantize_closed_form(in_out: bool) -> None:
    w = weights((61, 37), 3)  # [out, in], or [in, out] when in_out
    out_axis, in_axis = (1, 0) if in_out else (0, 1)
    zero = 5
    np.moveaxis(w, out_axis, 0)[zero] = 0.0
    qw = quant.quantize(w, in_out)
    q, s = np.asarray(qw.q), np.asarray(qw.scale)
    assert q.dtype == np.int8 and q.shape == w.shape and s.dtype == np.float32 and s.shape == (w.shape[out_axis],)
    assert np.abs(q.astype(int)).max() <= quant.QMAX
    absmax = np.abs(w.astype(np.float64)).max(axis=in_axis)
    np.testing.assert_allclose(s[np.arange(s.size) != zero], (absmax / 127)[np.arange(s.size) != zero], rtol=1e-7)
    assert s[zero] == 1.0 and not np.moveaxis(q, out_axis, 0)[zero].any()
    sb = s[None, :] if in_out else s[:, None]
    assert np.all(np.abs(w - q * sb) <= sb / 2 + 1e-9)  # round to nearest
    # each nonzero channel's largest weight maps to +-127
    top = np.abs(np.moveaxis(q, out_axis, 0)).max(axis=1)
    assert np.all(top[np.arange(s.size) != zero] == 127)
    np.testing.assert_allclose(np.asarray(qw.dequantize(in_out)), q * sb, rtol=0, atol=0)


def test_quantize_is_deterministic_and_placed() -> None:
    w = weights((40, 48), 4)
    acc = devices.accelerator_device()
    a, b = quant.quantize(w, False, acc), quant.quantize(jnp.asarray(w), False)
    assert a.q.devices() == {acc} and a.scale.devices() == {acc}
    np.testing.assert_array_equal(np.asarray(a.q), np.asarray(b.q))
    np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale))
    assert a.dtype == jnp.int8 and a.shape == (40, 48)
    with pytest.raises(ValueError, match="2-D"):
        quant.quantize(np.ones(3, np.float32), False)


# --- the kernel and XLA's path -------------------------------------------------------------------------------


def reference(x: np.ndarray, qw: quant.Int8Weight, in_out: bool) -> np.ndarray:
    q = np.asarray(qw.q, np.float64)
    return (np.asarray(x, np.float64) @ (q if in_out else q.T)) * np.asarray(qw.scale, np.float64)


@needs_kernels
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("k,n", [(37, 61), (16, 1), (1, 17), (130, 3), (576, 960)])
def test_q8_kernel_every_token_count_against_float64(layout: str, k: int, n: int) -> None:
    in_out = layout == "in_out"
    qw = quant.quantize(weights((k, n) if in_out else (n, k), k + n), in_out)
    f = jax.jit(lambda a, q, s: kernels.matmul_q8(a, q, s, layout))
    for t in range(1, kernels.MAX_TOKENS + 1):
        x = np.random.default_rng(t).standard_normal((t, k)).astype(np.float32)
        y = f(x, qw.q, qw.scale)
        assert y.dtype == jnp.float32 and y.shape == (t, n)
        ref = reference(x, qw, in_out)
        np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=0, atol=2e-6 * np.sqrt(k) + 1e-6,
                                   err_msg=f"T={t}")


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("in_out", [False, True])
@pytest.mark.parametrize("t", [1, 5, 33])  # 33 rows: beyond the kernel, XLA's path in both settings
def test_linear_takes_int8_weights_on_both_paths(kernel: bool, in_out: bool, t: int) -> None:
    if kernel and not kernels.kernels_enabled():
        pytest.skip("compiled kernels unavailable here")
    qw = quant.quantize(weights((37, 61) if in_out else (61, 37), 7), in_out)
    x = np.random.default_rng(t).standard_normal((1, t, 37)).astype(np.float32)
    with contextlib.nullcontext() if kernel else kernels.xla_only():
        f = jax.jit(lambda a, w: L.linear(a, w, in_out))
        y = f(x, qw)
        hlo = f.lower(x, qw).as_text()
    assert ("dovetail_matmul_" in hlo) == (kernel and t <= kernels.MAX_TOKENS)
    if kernel and t <= kernels.MAX_TOKENS:
        assert ("dovetail_matmul_io_q8" if in_out else "dovetail_matmul_oi_q8") in hlo
    assert y.shape == (1, t, 61) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y[0], np.float64), reference(x[0], qw, in_out), rtol=0, atol=1e-5)


@needs_kernels
def test_supports_q8_refuses_what_the_kernel_cannot_take() -> None:
    x = jnp.ones((3, 48), jnp.float32)
    qw = quant.quantize(weights((40, 48), 1), False)
    assert kernels.supports_q8(x, qw.q, qw.scale, "out_in")
    assert not kernels.supports_q8(x, qw.q, qw.scale, "in_out")  # 48 outputs there, 40 scales
    assert not kernels.supports_q8(x.astype(jnp.bfloat16), qw.q, qw.scale, "out_in")
    assert not kernels.supports_q8(x, qw.q.astype(jnp.int32), qw.scale, "out_in")
    assert not kernels.supports_q8(x, qw.q, qw.scale.astype(jnp.bfloat16), "out_in")
    assert not kernels.supports_q8(jnp.ones((33, 48)), qw.q, qw.scale, "out_in")
    with kernels.xla_only():
        assert not kernels.supports_q8(x, qw.q, qw.scale, "out_in")


# --- a quantized draft ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def target() -> TargetParams:
    spec = TargetParams.spec(CFG)
    return from_tensors(spec, init_tensors(spec, jax.random.key(3)), devices.target_device())


def dequantized(params: D.DraftParams) -> D.DraftParams:
    """A quantized draft's f32 twin: every `Int8Weight` written out as the float32 matrix it stands for."""
    io = params.layout == "in_out"
    fz = params.fusion
    names = ("w1", "w2", "wz") if isinstance(fz, D.DGFParams) else ("w",)
    return params.replace(
        fusion=fz.replace(**{k: getattr(fz, k).dequantize(True) for k in names}),
        layers=tuple(lp.replace(**{k: getattr(lp, k).dequantize(io) for k in ("wqkv", "wo", "w_gate_up", "w_down")})
                     for lp in params.layers))


@pytest.mark.parametrize("fusion", ["dgf", "eagle"])
def test_quantized_draft_equals_its_dequantized_f32_twin(target, fusion: str) -> None:
    acc = devices.accelerator_device()
    dcfg = DraftConfig(num_layers=2, fusion=fusion, draft_vocab_size=40)
    params = D.init_draft(jax.random.key(1), CFG, dcfg, acc)
    vm = np.arange(40)
    q_params = D.quantize_matrices(params, acc)
    q_shared = D.make_shared(target, CFG, vm, acc, head_dtype="int8")
    io = params.layout == "in_out"
    fz = q_params.fusion
    mats = [(fz.w1, True), (fz.w2, True), (fz.wz, True)] if fusion == "dgf" else [(fz.w, True)]
    for lp in q_params.layers:
        mats += [(lp.wqkv, io), (lp.wo, io), (lp.w_gate_up, io), (lp.w_down, io)]
    assert all(isinstance(w, quant.Int8Weight) and w.q.devices() == {acc} for w, _ in mats)
    assert isinstance(q_shared.head, quant.Int8Weight) and q_shared.head.shape == (40, CFG.hidden_size)
    assert q_shared.embed.dtype == jnp.float32  # gathered, not streamed: stays
    assert q_params.layers[1].attn_norm.dtype == jnp.float32  # norms stay
    deq = dequantized(q_params)  # the f32 twin: the same values written out in float32
    deq_shared = q_shared.replace(head=q_shared.head.dequantize(False))
    rng = np.random.default_rng(2)
    t = 5
    feats = jax.device_put(rng.standard_normal((1, t, CFG.hidden_size)).astype(np.float32), acc)
    ids = jax.device_put(rng.integers(0, CFG.vocab_size, (1, t)).astype(np.int32), acc)
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    mask = jnp.tril(jnp.ones((t, t), bool))
    cache = init_cache(D.draft_model_config(CFG, dcfg), 16, device=acc)

    @jax.jit
    def run(p, s):
        h, _ = D.forward(p, s, CFG, dcfg, feats, ids, pos, mask, cache, empty_cache=True)
        return h, D.log_probs(s, h)

    (hq, lq), (hd, ld) = run(q_params, q_shared), run(deq, deq_shared)
    np.testing.assert_allclose(np.asarray(hq), np.asarray(hd), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lq), np.asarray(ld), rtol=1e-5, atol=1e-5)
    # and the quantization is real: the float draft is measurably elsewhere
    hf, _ = run(params, D.make_shared(target, CFG, vm, acc))
    assert np.abs(np.asarray(hf) - np.asarray(hq)).max() > 1e-4


def test_quantize_matrices_is_idempotent() -> None:
    dcfg = DraftConfig(num_layers=1, fusion="dgf")
    once = D.quantize_matrices(D.init_draft(jax.random.key(2), CFG, dcfg))
    twice = D.quantize_matrices(once)
    for a, b in zip(jax.tree.leaves(once), jax.tree.leaves(twice), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- the API, the CLI and the bench on a tiny GGUF ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_models import make_tiny_hf, write_gguf

    from dovetail_jax import api
    from dovetail_jax.io import checkpoint as ck

    tmp = tmp_path_factory.mktemp("tiny")
    _, model, _ = make_tiny_hf(tmp / "hf", "gqa_tied")
    gguf = write_gguf(model, tmp / "tiny.gguf")
    target = api.load_target(gguf, layout="in_out")
    dcfg = DraftConfig(num_layers=1, fusion="dgf", draft_vocab_size=64)
    params = D.init_draft(jax.random.key(4), target.cfg, dcfg)
    folder = ck.save_draft(tmp / "d", target.cfg, dcfg, params, vocab_map=np.arange(64),
                           target_sha256=target.sha256, dtype="bfloat16")
    return api, target, folder


def test_api_weight_dtype(tiny) -> None:
    api, target, folder = tiny
    stored = api.load_draft(target, folder, weight_dtype="stored", head_dtype="bfloat16")
    q8 = api.load_draft(target, folder, weight_dtype="int8", head_dtype="int8")
    assert stored.params.layers[0].wqkv.dtype == jnp.bfloat16 and stored.shared.head.dtype == jnp.bfloat16
    assert isinstance(q8.params.layers[0].wqkv, quant.Int8Weight) and isinstance(q8.shared.head, quant.Int8Weight)
    assert q8.kind == "trained" and q8.source == stored.source
    auto = api.load_draft(target, folder)  # the default for a draft sharing the target's head: int8 for both
    assert auto.params.layers[0].wqkv.dtype == jnp.int8 and auto.shared.head.dtype == jnp.int8
    for a, b in zip(jax.tree.leaves((auto.params, auto.shared)), jax.tree.leaves((q8.params, q8.shared)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert api.load_draft(target, "self").params.layers[0].wqkv.dtype == jnp.float32  # whole LMs stay as they are
    r = api.random_draft(target, DraftConfig(draft_vocab_size=64), weight_dtype="int8")
    assert isinstance(r.params.fusion.w1, quant.Int8Weight)
    s = api.load_draft(target, "self", weight_dtype="int8")  # its own f32 head stays
    assert isinstance(s.params.layers[0].w_down, quant.Int8Weight) and s.shared.head.dtype == jnp.float32


@pytest.mark.parametrize("call,needle", [
    (lambda api, t, f: api.load_draft(t, f, weight_dtype="q8"), "weight_dtype must be one of"),
    (lambda api, t, f: api.load_draft(t, f, weight_dtype=8), "weight_dtype must be one of"),
    (lambda api, t, f: api.random_draft(t, weight_dtype="bfloat16"), "weight_dtype must be one of"),
    (lambda api, t, f: api.load_draft(t, "self", head_dtype="int8"), "'self' draft"),
])
def test_api_refuses_bad_weight_dtype(tiny, call, needle) -> None:
    api, target, folder = tiny
    with pytest.raises(ConfigError, match=needle):
        call(api, target, folder)


@pytest.mark.parametrize("draft", ["trained", "random"])
def test_generate_with_int8_draft_is_the_targets_greedy_output(run_cli, tiny, draft) -> None:
    _, target, folder = tiny
    which = ["--draft", str(folder)] if draft == "trained" else ["--draft-vocab", "64"]
    for prompt in ("def fib(n):", "hello world, the"):
        common = ["generate", "--model", str(target.path), "--prompt", prompt, "--max-new-tokens", "12",
                  "--ignore-eos", "--json"]
        code, out, err = run_cli(*common)
        assert code == 0, err
        want = json.loads(out)["token_ids"]
        code, out, err = run_cli(*common, "--mode", "dovetail", "--draft-head", "int8", "--draft-weights", "int8",
                                 *which)
        assert code == 0, err
        assert json.loads(out)["token_ids"] == want and len(want) == 12


@pytest.mark.parametrize("argv,needle", [
    (["generate", "--prompt", "hi", "--mode", "dovetail", "--draft-weights", "int4"], "--draft-weights"),
    (["generate", "--prompt", "hi", "--draft-weights", "int8"], "--mode dovetail"),
    (["generate", "--prompt", "hi", "--mode", "dovetail", "--draft", "self", "--draft-head", "int8"],
     "--draft-head int8"),
    (["bench", "dovetail", "--draft-weights", "q8"], "--draft-weights"),
])
def test_cli_refuses_bad_draft_weights(run_cli, tmp_path, argv, needle) -> None:
    code, out, err = run_cli(*argv, *(["--out", str(tmp_path / "r.json")] if argv[0] == "bench" else []))
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("dovetail: error:") and needle in lines[0], err
    assert not list(tmp_path.iterdir())


def test_bench_config_draft_weights(tiny, tmp_path) -> None:
    from dovetail_jax.argtypes import DraftFlags
    from dovetail_jax.bench import dovetail as bd

    api, target, folder = tiny
    d = str(folder)
    cs = bd.parse_configs([{"name": "s", "draft": d, "draft_weights": "stored", "draft_head": "bf16"},
                           {"name": "q", "draft": d, "draft_weights": "int8", "draft_head": "int8"},
                           {"name": "q2", "draft": d, "draft_weights": "int8", "draft_head": "int8", "tree": "laptop"}],
                          "f.json")
    assert [c.draft_weights for c in cs] == ["stored", "int8", "int8"]
    assert cs[1].to_dict()["draft_weights"] == "int8"
    drafts, info = bd._load_drafts(api, target, cs, seed=0)
    assert len(drafts) == 2 and drafts[cs[1].draft_key] is drafts[cs[2].draft_key]
    assert [info[n]["draft_weight_dtype"] for n in ("s", "q")] == ["bfloat16", "int8"]
    assert [info[n]["draft_head_dtype"] for n in ("s", "q")] == ["bfloat16", "int8"]
    (one,) = bd.resolve_configs(None, DraftFlags(draft_vocab=64), None, "int8")
    assert one.draft_weights == "int8" and one.name.endswith("-wint8")
    with pytest.raises(ConfigError, match="draft_weights must be one of"):
        bd.parse_configs([{"name": "a", "draft_weights": "int4"}], "f.json")
    f = tmp_path / "c.json"
    f.write_text(json.dumps([{"name": "a", "draft": "random"}]))
    with pytest.raises(ConfigError, match="--configs replaces --draft-weights"):
        bd.resolve_configs(f, DraftFlags(), None, "int8")
