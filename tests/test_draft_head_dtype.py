"""The draft's LM head in bfloat16 (`make_shared(head_dtype=)`, `api.load_draft(head_dtype=)`, `--draft-head`).

A bf16 head is the target's head rows rounded to nearest-even bfloat16 once at load; `layers.linear` widens it
exactly, so the draft's log-probabilities must equal those of the rounded head written out in float32 (bit for
bit) and a float64 reference computed from an independently rounded head (to f32 rounding). The default must stay
the f32 head, bit-identical to the target's rows. Whatever the head, Dovetail's greedy output is the target's.
"""

from __future__ import annotations

import contextlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dovetail_jax import devices, kernels
from dovetail_jax.config import DraftConfig, ModelConfig, TreeConfig
from dovetail_jax.errors import ConfigError
from dovetail_jax.model import draft as D
from dovetail_jax.model.cache import init_cache
from dovetail_jax.model.params import TargetParams, from_tensors, init_tensors
from dovetail_jax.speculation.drafting import draft_step

CFG = ModelConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=12, max_position_embeddings=128, name="tiny-target")


def rne_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even) by integer arithmetic on the bits, as float32: an
    independent reference for the rounding `make_shared` does (finite inputs)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    r = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return r.astype(np.uint32).view(np.float32)


def bits(a: jax.Array | np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float32).view(np.uint32)


def log_softmax64(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def target() -> TargetParams:
    spec = TargetParams.spec(CFG)
    t = from_tensors(spec, init_tensors(spec, jax.random.key(3)), devices.target_device())
    # head values of a real model's magnitude, with ties and near-ties of the bf16 rounding among them
    head = np.random.default_rng(0).standard_normal((CFG.vocab_size, CFG.hidden_size)).astype(np.float32) * 0.05
    flat = head.reshape(-1).view(np.uint32)
    flat[:8] = (flat[:8] & 0xFFFF0000) | np.array([0x8000, 0x8000, 0x7FFF, 0x8001] * 2, np.uint32)
    flat[1::2][:4] |= 0x10000  # odd bf16 mantissas: ties round up there, down elsewhere
    return t.replace(lm_head=jax.device_put(head, devices.target_device()))


VM = np.random.default_rng(6).permutation(CFG.vocab_size)[:40].astype(np.int32)


def test_default_head_is_the_targets_f32_rows(target) -> None:
    acc = devices.accelerator_device()
    for vm in (None, VM):
        shared = D.make_shared(target, CFG, vm, acc)
        want = np.asarray(target.head) if vm is None else np.asarray(target.head)[vm]
        assert shared.head.dtype == jnp.float32 and shared.head.devices() == {acc}
        np.testing.assert_array_equal(bits(shared.head), bits(want))
        assert D.make_shared(target, CFG, vm, acc, head_dtype="float32").head.dtype == jnp.float32


def test_bf16_head_is_the_rounded_rows_and_embedding_stays_f32(target) -> None:
    acc = devices.accelerator_device()
    shared = D.make_shared(target, CFG, VM, acc, head_dtype="bfloat16")
    assert shared.head.dtype == jnp.bfloat16 and shared.head.shape == (40, CFG.hidden_size)
    assert shared.head.devices() == {acc}
    np.testing.assert_array_equal(bits(shared.head.astype(jnp.float32)), bits(rne_bf16(np.asarray(target.head)[VM])))
    assert shared.embed.dtype == jnp.float32
    np.testing.assert_array_equal(bits(shared.embed), bits(target.embed))
    np.testing.assert_array_equal(np.asarray(shared.vocab_map), VM)


@pytest.mark.parametrize("bad", ["bf16", "float16", "", None, jnp.bfloat16])
def test_make_shared_refuses_other_dtypes(target, bad) -> None:
    with pytest.raises(ValueError, match="head_dtype"):
        D.make_shared(target, CFG, None, head_dtype=bad)


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("rows", [1, 4, 40])  # 40 rows: beyond the kernel's 32, XLA's path in both settings
def test_bf16_head_log_probs_equal_the_rounded_reference(target, kernel: bool, rows: int) -> None:
    if kernel and not kernels.kernels_enabled():
        pytest.skip("compiled kernels unavailable here")
    acc = devices.accelerator_device()
    s16 = D.make_shared(target, CFG, VM, acc, head_dtype="bfloat16")
    rounded = rne_bf16(np.asarray(target.head)[VM])
    s_up = s16.replace(head=jax.device_put(rounded, acc))  # the same values written out in f32
    s32 = D.make_shared(target, CFG, VM, acc)
    h = np.random.default_rng(rows).standard_normal((1, rows, CFG.hidden_size)).astype(np.float32) * 8
    hidden = jax.device_put(h, acc)
    with kernels.xla_only() if not kernel else contextlib.nullcontext():
        lp = jax.jit(lambda s, x: D.log_probs(s, x))
        got, up, full = lp(s16, hidden), lp(s_up, hidden), lp(s32, hidden)
        top, ids = jax.jit(lambda s, x: D.top_log_probs(s, x, 4))(s16, hidden)
    assert got.dtype == jnp.float32 and got.shape == (1, rows, 40)
    np.testing.assert_array_equal(bits(got), bits(up))  # exact widening, on either path
    ref = log_softmax64(h.astype(np.float64) @ rounded.astype(np.float64).T)
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=0, atol=2e-5)
    # the rounding is real: the f32 head's log-probs are measurably elsewhere
    assert np.abs(np.asarray(full, np.float64) - ref).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(ids), np.argsort(-np.asarray(got), axis=-1, kind="stable")[..., :4])
    np.testing.assert_array_equal(bits(top), bits(np.take_along_axis(np.asarray(got), np.asarray(ids), -1)))


def test_bf16_head_trees_equal_the_upcast_heads(target) -> None:
    """A whole drafting cycle (first tree, then one on the filled cache) with the bf16 head proposes exactly
    what the rounded head in f32 proposes."""
    acc = devices.accelerator_device()
    dcfg = DraftConfig(num_layers=1, fusion="dgf", draft_vocab_size=40)
    params = D.init_draft(jax.random.key(1), CFG, dcfg, acc)
    s16 = D.make_shared(target, CFG, VM, acc, head_dtype="bfloat16")
    s_up = s16.replace(head=s16.head.astype(jnp.float32))
    rng = np.random.default_rng(2)
    m = 6
    feats = jax.device_put(rng.standard_normal((1, m, CFG.hidden_size)).astype(np.float32), acc)
    ids = jax.device_put(rng.integers(0, CFG.vocab_size, (1, m)).astype(np.int32), acc)
    kw = {"cfg": CFG, "dcfg": dcfg, "tree": TreeConfig(top_k=3, depth=3, total_tokens=8)}
    step = jax.jit(lambda *a, **k: draft_step(*a, **k), static_argnames=("cfg", "dcfg", "tree", "empty_cache"))

    def cycle(shared: D.DraftShared) -> list[np.ndarray]:
        cache = init_cache(D.draft_model_config(CFG, dcfg), 32, device=acc)
        t1, p1, cache = step(params, shared, cache, feats, ids, jnp.int32(m), empty_cache=True, **kw)
        t2, p2, cache = step(params, shared, cache, feats[:, :3], ids[:, :3], jnp.int32(2), **kw)
        return [np.asarray(x) for x in (t1, p1, t2, p2)]

    got, want = cycle(s16), cycle(s_up)
    assert len(set(got[0].tolist())) > 1 and set(got[0].tolist()) <= set(VM.tolist()) | set(np.asarray(ids)[0])
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


# --- the API and the CLI on a tiny GGUF ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from tiny_models import make_tiny_hf, write_gguf

    tmp = tmp_path_factory.mktemp("tiny")
    _, model, _ = make_tiny_hf(tmp / "hf", "gqa_tied")
    return write_gguf(model, tmp / "tiny.gguf")


@pytest.fixture(scope="module")
def tiny(tiny_gguf, tmp_path_factory):
    """The API, the tiny target and a draft checkpoint for it (random weights saved as a trained draft)."""
    from dovetail_jax import api
    from dovetail_jax.io import checkpoint as ck

    target = api.load_target(tiny_gguf, layout="in_out")
    dcfg = DraftConfig(num_layers=1, fusion="dgf", draft_vocab_size=64)
    params = D.init_draft(jax.random.key(4), target.cfg, dcfg)
    folder = ck.save_draft(tmp_path_factory.mktemp("draft") / "d", target.cfg, dcfg, params,
                           vocab_map=np.arange(64), target_sha256=target.sha256, dtype="float32")
    return api, target, folder


def test_api_head_dtype(tiny) -> None:
    api, target, folder = tiny
    default = api.load_draft(target, folder, head_dtype="float32")
    bf = api.load_draft(target, folder, head_dtype="bfloat16")
    assert default.kind == bf.kind == "trained"
    assert default.shared.head.dtype == jnp.float32 and bf.shared.head.dtype == jnp.bfloat16
    auto = api.load_draft(target, folder)  # the default for a draft sharing the target's head: int8 per row
    q8 = api.load_draft(target, folder, head_dtype="int8")
    assert auto.shared.head.dtype == jnp.int8
    for a, b in zip(jax.tree.leaves(auto.shared.head), jax.tree.leaves(q8.shared.head), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    want = rne_bf16(np.asarray(default.shared.head))
    np.testing.assert_array_equal(bits(bf.shared.head.astype(jnp.float32)), bits(want))
    for a, b in zip(jax.tree.leaves(default.params), jax.tree.leaves(bf.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # only the head changes
    r = api.random_draft(target, DraftConfig(draft_vocab_size=64), head_dtype="bfloat16")
    assert r.shared.head.dtype == jnp.bfloat16 and api.random_draft(target).shared.head.dtype == jnp.int8
    assert api.random_draft(target, head_dtype="float32").shared.head.dtype == jnp.float32
    assert api.HEAD_DTYPES == ("float32", "bfloat16", "int8")


@pytest.mark.parametrize("call,needle", [
    (lambda api, t, f: api.load_draft(t, f, head_dtype="bf16"), "head_dtype must be one of"),
    (lambda api, t, f: api.load_draft(t, f, head_dtype=0), "head_dtype must be one of"),
    (lambda api, t, f: api.random_draft(t, head_dtype="float16"), "head_dtype must be one of"),
    (lambda api, t, f: api.load_draft(t, "self", head_dtype="bfloat16"), "'self' draft"),
    (lambda api, t, f: api.load_draft(t, t.path, head_dtype="bfloat16"), "standalone draft"),
])
def test_api_refuses_bad_head_dtype(tiny, call, needle) -> None:
    api, target, folder = tiny
    with pytest.raises(ConfigError) as e:
        call(api, target, folder)
    assert needle in str(e.value) and "head_dtype" in str(e.value)


def test_api_self_and_standalone_keep_f32_by_default(tiny) -> None:
    api, target, _ = tiny
    assert api.load_draft(target, "self").shared.head.dtype == jnp.float32
    assert api.load_draft(target, "self", head_dtype="float32").shared.head.dtype == jnp.float32


PROMPTS = ("def fib(n):", "hello world, the")


@pytest.mark.parametrize("draft", ["trained", "random"])
def test_generate_with_bf16_head_is_the_targets_greedy_output(run_cli, tiny, draft) -> None:
    _, target, folder = tiny
    which = ["--draft", str(folder)] if draft == "trained" else ["--draft-vocab", "64"]
    for prompt in PROMPTS:
        common = ["generate", "--model", str(target.path), "--prompt", prompt, "--max-new-tokens", "12",
                  "--ignore-eos", "--json"]
        code, out, err = run_cli(*common)
        assert code == 0, err
        want = json.loads(out)["token_ids"]
        code, out, err = run_cli(*common, "--mode", "dovetail", "--draft-head", "bf16", *which)
        assert code == 0, err
        got = json.loads(out)
        assert got["token_ids"] == want and len(want) == 12
        assert got["mode"] == "dovetail"


@pytest.mark.parametrize("argv,needle", [
    (["generate", "--prompt", "hi", "--mode", "dovetail", "--draft-head", "f16"], "--draft-head"),
    (["generate", "--prompt", "hi", "--draft-head", "bf16"], "--mode dovetail"),
    (["generate", "--prompt", "hi", "--mode", "dovetail", "--draft", "self", "--draft-head", "bf16"],
     "--draft-head bf16"),
    (["bench", "dovetail", "--draft-head", "bfloat16"], "--draft-head"),
    (["bench", "dovetail", "--draft", "self", "--draft-head", "bf16"], "--draft-head"),
])
def test_cli_refuses_bad_draft_head(run_cli, tmp_path, argv, needle) -> None:
    code, out, err = run_cli(*argv, *(["--out", str(tmp_path / "r.json")] if argv[0] == "bench" else []))
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("dovetail: error:") and needle in lines[0], err
    assert not list(tmp_path.iterdir())


# --- bench dovetail configurations ---------------------------------------------------------------------------


def test_bench_config_draft_head() -> None:
    from dovetail_jax.argtypes import DraftFlags
    from dovetail_jax.bench import dovetail as bd

    cs = bd.parse_configs([
        {"name": "a", "draft": "d/x", "draft_head": "bf16"},
        {"name": "b", "draft": "d/x"},
        {"name": "c", "draft": "d/x", "draft_head": "f32"},
        {"name": "r", "draft": "random", "draft_vocab": 64, "draft_head": "bf16"},
    ], "f.json")
    assert [c.draft_head for c in cs] == ["bf16", None, "f32", "bf16"]  # None: the API's default for the kind
    assert len({cs[0].draft_key, cs[1].draft_key, cs[2].draft_key}) == 3  # same path, other heads: loaded apart
    assert cs[0].to_dict()["draft_head"] == "bf16" and cs[2].to_dict()["draft_head"] == "f32"
    assert "draft_head" in bd.CONFIG_KEYS and bd.DRAFT_HEADS == {"f32": "float32", "bf16": "bfloat16", "int8": "int8"}
    (one,) = bd.resolve_configs(None, DraftFlags(draft_vocab=64), "bf16")
    assert one.draft_head == "bf16" and one.name.endswith("-bf16")
    (dflt,) = bd.resolve_configs(None, DraftFlags(draft_vocab=64))
    assert dflt.draft_head is None and not dflt.name.endswith(("f32", "bf16"))


@pytest.mark.parametrize("entry,needle", [
    ({"draft_head": "bfloat16"}, "draft_head must be one of"),
    ({"draft_head": 16}, "draft_head must be one of"),
    ({"draft_head": ""}, "draft_head must be one of"),
    ({"draft": "self", "draft_head": "bf16"}, "'self' draft"),
    ({"draft_dtype": "bf16"}, "unknown key"),
])
def test_bench_config_refuses_bad_draft_head(entry, needle) -> None:
    from dovetail_jax.bench import dovetail as bd

    with pytest.raises(ConfigError) as e:
        bd.parse_configs([{"name": "a", **entry}], "f.json")
    assert needle in str(e.value)


def test_bench_configs_and_draft_head_flag_exclude_each_other(tmp_path) -> None:
    from dovetail_jax.argtypes import DraftFlags
    from dovetail_jax.bench import dovetail as bd

    f = tmp_path / "c.json"
    f.write_text(json.dumps([{"name": "a", "draft": "random", "draft_head": "bf16"}]))
    assert bd.resolve_configs(f, DraftFlags())[0].draft_head == "bf16"
    with pytest.raises(ConfigError, match="--configs replaces --draft-head"):
        bd.resolve_configs(f, DraftFlags(), "bf16")


def test_bench_loads_one_draft_per_head_and_records_it(tiny) -> None:
    """Two configurations of one draft path with different heads get two drafts; the record says which head."""
    from dovetail_jax.bench import dovetail as bd

    api, target, folder = tiny
    d = str(folder)
    cs = bd.parse_configs([{"name": "f", "draft": d, "draft_head": "f32"},
                           {"name": "b", "draft": d, "draft_head": "bf16"},
                           {"name": "b2", "draft": d, "draft_head": "bf16", "tree": "laptop"}], "f.json")
    drafts, info = bd._load_drafts(api, target, cs, seed=0)
    assert len(drafts) == 2
    assert drafts[cs[0].draft_key].shared.head.dtype == jnp.float32
    assert drafts[cs[1].draft_key] is drafts[cs[2].draft_key]
    assert drafts[cs[1].draft_key].shared.head.dtype == jnp.bfloat16
    assert [info[n]["draft_head"] for n in ("f", "b", "b2")] == ["f32", "bf16", "bf16"]
    assert [info[n]["draft_head_dtype"] for n in ("f", "b")] == ["float32", "bfloat16"]
