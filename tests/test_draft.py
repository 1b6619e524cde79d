"""The draft model (fusion + LLaMA blocks + frozen head) against independent references.

References: a plain float64 numpy re-implementation of the draft (DGF / EAGLE fusion, LLaMA blocks with no
input norm in block 0, rotate-half RoPE at the given positions, causal/ancestor-masked GQA), itself checked
against transformers' LlamaModel; the target forward (and transformers) for a whole LLaMA used as the draft.
"""

from __future__ import annotations

import dovetail_helpers as helpers
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dovetail_jax import devices  # noqa: E402
from dovetail_jax.config import DraftConfig, ModelConfig  # noqa: E402
from dovetail_jax.errors import ModelFormatError  # noqa: E402
from dovetail_jax.model import draft as D  # noqa: E402
from dovetail_jax.model import target as T  # noqa: E402
from dovetail_jax.model.cache import append, init_cache  # noqa: E402
from dovetail_jax.model.params import params_from_tensors  # noqa: E402

CFG = ModelConfig(vocab_size=101, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=6, num_kv_heads=2,
                  head_dim=8, rope_theta=5000.0, rms_norm_eps=1e-5, max_position_embeddings=256,
                  name="tiny-draft-target")
TOL = 1e-4


# --------------------------------------------------------------------------------------------- references


def draft_names(cfg: ModelConfig, fusion: str, n_layers: int) -> dict[str, tuple[int, ...]]:
    """EAGLE/Dovetail checkpoint names and shapes, written out by hand."""
    h, f, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    out: dict[str, tuple[int, ...]] = {}
    if fusion == "dgf":
        out |= {"emb_norm.weight": (h,), "W_1": (h, h), "W_2": (h, h), "W_z": (2 * h, h)}
    elif fusion == "eagle":
        out |= {"fc.weight": (h, 2 * h), "fc.bias": (h,)}
    else:
        out["norm.weight"] = (h,)
    for i in range(n_layers):
        p = f"layers.{i}."
        if i > 0 or fusion == "none":
            out[p + "input_layernorm.weight"] = (h,)
        out |= {p + "post_attention_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q), p + "mlp.gate_proj.weight": (f, h),
                p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f)}
    return out


def random_tensors(cfg: ModelConfig, dcfg: DraftConfig, seed: int, scale: float = 0.2) -> dict[str, np.ndarray]:
    """Every weight random (norms ~ 1 +- 0.2, biases and matrices ~ N(0, scale)), float32."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in draft_names(cfg, dcfg.fusion, dcfg.num_layers).items():
        if name.endswith("norm.weight"):
            out[name] = 1.0 + 0.2 * rng.standard_normal(shape)
        else:
            out[name] = scale * rng.standard_normal(shape)
    return {k: v.astype(np.float32) for k, v in out.items()}


def np_rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def np_silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def np_sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def np_rope(x: np.ndarray, pos: np.ndarray, theta: float) -> np.ndarray:
    """Rotate-half RoPE on [T, heads, D] at integer positions [T]."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    ang = np.asarray(pos, np.float64)[:, None] * inv[None, :]
    cos = np.cos(np.concatenate([ang, ang], -1))[:, None, :]
    sin = np.sin(np.concatenate([ang, ang], -1))[:, None, :]
    rot = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + rot * sin


def np_fuse(t: dict[str, np.ndarray], fusion: str, feats: np.ndarray, emb: np.ndarray, eps: float) -> np.ndarray:
    t = {k: np.asarray(v, np.float64) for k, v in t.items()}
    if fusion == "dgf":
        h1 = feats @ t["W_1"]
        h2 = np_silu(np_rms(emb, t["emb_norm.weight"], eps) @ t["W_2"])
        z = np_sigmoid(np.concatenate([h1, h2], -1) @ t["W_z"])
        return z * h1 + (1.0 - z) * h2
    if fusion == "eagle":
        return np.concatenate([emb, feats], -1) @ t["fc.weight"].T + t["fc.bias"]
    return emb


def np_block(t: dict[str, np.ndarray], pre: str, cfg: ModelConfig, x: np.ndarray, pos: np.ndarray,
             mask: np.ndarray) -> np.ndarray:
    """One LLaMA block on [T, H] (input norm only if its weight exists), attention over the same T tokens."""
    w = {k[len(pre):]: np.asarray(v, np.float64) for k, v in t.items() if k.startswith(pre)}
    n, kh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    tt = x.shape[0]
    h = np_rms(x, w["input_layernorm.weight"], cfg.rms_norm_eps) if "input_layernorm.weight" in w else x
    q = np_rope((h @ w["self_attn.q_proj.weight"].T).reshape(tt, n, d), pos, cfg.rope_theta)
    k = np_rope((h @ w["self_attn.k_proj.weight"].T).reshape(tt, kh, d), pos, cfg.rope_theta)
    v = (h @ w["self_attn.v_proj.weight"].T).reshape(tt, kh, d)
    k = np.repeat(k, n // kh, axis=1)  # query head j reads kv head j // (n / kh)
    v = np.repeat(v, n // kh, axis=1)
    s = np.einsum("tnd,snd->nts", q, k) / np.sqrt(d)
    s = np.where(mask[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("nts,snd->tnd", p, v).reshape(tt, n * d)
    x = x + o @ w["self_attn.o_proj.weight"].T
    h = np_rms(x, w["post_attention_layernorm.weight"], cfg.rms_norm_eps)
    g = np_silu(h @ w["mlp.gate_proj.weight"].T) * (h @ w["mlp.up_proj.weight"].T)
    return x + g @ w["mlp.down_proj.weight"].T


def np_draft(t: dict[str, np.ndarray], cfg: ModelConfig, dcfg: DraftConfig, embed: np.ndarray, feats: np.ndarray,
             tokens: np.ndarray, pos: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The draft's output features [T, H] for one sequence, float64."""
    emb = np.asarray(embed, np.float64)[np.asarray(tokens)]
    x = np_fuse(t, dcfg.fusion, np.asarray(feats, np.float64), emb, cfg.rms_norm_eps)
    for i in range(dcfg.num_layers):
        x = np_block(t, f"layers.{i}.", cfg, x, pos, mask)
    if dcfg.fusion == "none":
        x = np_rms(x, np.asarray(t["norm.weight"], np.float64), cfg.rms_norm_eps)
    return x


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def assert_close(got, want, tol: float = TOL) -> None:
    """max |got - want| <= tol * max(1, max |want|) (the hidden states grow over layers)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    err = np.max(np.abs(got - want))
    assert err <= tol * max(1.0, np.max(np.abs(want))), f"max error {err} (scale {np.max(np.abs(want))})"


def random_shared(cfg: ModelConfig, seed: int) -> tuple[np.ndarray, np.ndarray, D.DraftShared]:
    rng = np.random.default_rng(seed)
    embed = rng.standard_normal((cfg.vocab_size, cfg.hidden_size)).astype(np.float32)
    head = (0.2 * rng.standard_normal((cfg.vocab_size, cfg.hidden_size))).astype(np.float32)
    shared = D.DraftShared(embed=jnp.asarray(embed), head=jnp.asarray(head), vocab_map=None)
    return embed, head, shared


# --------------------------------------------------------------------------------------------- a HF LLaMA


def hf_llama(seed: int, tie: bool = False):
    return helpers.hf_llama(CFG, seed, tie)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def hf_model():
    return hf_llama(0)


def test_numpy_reference_matches_transformers(hf_model):
    """The numpy blocks (with every norm, as fusion 'none') reproduce transformers' LlamaModel exactly, so the
    reference's RoPE, GQA and masking conventions are HF's."""
    model, cfg, tensors = hf_model
    t = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.") and "embed" not in k}
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, size=11)
    ref = np_draft(t, cfg, DraftConfig(num_layers=cfg.num_layers, fusion="none"), tensors["model.embed_tokens.weight"],
                   np.zeros((11, cfg.hidden_size)), ids, np.arange(11), np.tril(np.ones((11, 11), bool)))
    with torch.no_grad():
        hf = model(torch.tensor([ids.tolist()]), output_hidden_states=True).hidden_states[-1][0].double().numpy()
    assert_close(ref, hf, 1e-5)


# --------------------------------------------------------------------------------------------- fusion


def test_expected_shapes_are_the_checkpoint_names():
    for fusion in ("dgf", "eagle", "none"):
        for n in (1, 3):
            assert D.expected_draft_shapes(CFG, DraftConfig(num_layers=n, fusion=fusion)) == draft_names(CFG, fusion,
                                                                                                         n)


def test_dgf_fusion_formula():
    dcfg = DraftConfig(num_layers=1, fusion="dgf")
    t = random_tensors(CFG, dcfg, seed=1, scale=0.3)
    params = D.draft_params_from_tensors(CFG, dcfg, t)
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((2, 5, CFG.hidden_size)).astype(np.float32)
    emb = (3.0 * rng.standard_normal((2, 5, CFG.hidden_size))).astype(np.float32)
    got = np.asarray(D.fuse(params, CFG, jnp.asarray(feats), jnp.asarray(emb)))
    # written out once more, step by step, from the paper's equations (W's are [in, out])
    f64 = {k: v.astype(np.float64) for k, v in t.items()}
    e = emb.astype(np.float64)
    e_n = e / np.sqrt((e**2).mean(-1, keepdims=True) + CFG.rms_norm_eps) * f64["emb_norm.weight"]
    h = CFG.hidden_size
    h1 = np.einsum("bti,io->bto", feats.astype(np.float64), f64["W_1"])
    a = np.einsum("bti,io->bto", e_n, f64["W_2"])
    h2 = a * (1.0 / (1.0 + np.exp(-a)))
    gate = np.einsum("bti,io->bto", h1, f64["W_z"][:h]) + np.einsum("bti,io->bto", h2, f64["W_z"][h:])  # [h1; h2]
    z = 1.0 / (1.0 + np.exp(-gate))
    want = z * h1 + (1.0 - z) * h2
    assert_close(got, want, 1e-5)
    assert np.max(np.abs(want)) > 0.5 and 0.05 < z.mean() < 0.95  # a real mix of both branches


def test_eagle_fusion_formula():
    dcfg = DraftConfig(num_layers=1, fusion="eagle")
    t = random_tensors(CFG, dcfg, seed=4)
    params = D.draft_params_from_tensors(CFG, dcfg, t)
    rng = np.random.default_rng(5)
    feats = rng.standard_normal((1, 4, CFG.hidden_size)).astype(np.float32)
    emb = rng.standard_normal((1, 4, CFG.hidden_size)).astype(np.float32)
    got = np.asarray(D.fuse(params, CFG, jnp.asarray(feats), jnp.asarray(emb)))
    w, b = t["fc.weight"].astype(np.float64), t["fc.bias"].astype(np.float64)  # torch Linear(2H -> H): [out, in]
    h = CFG.hidden_size
    want = emb[0] @ w[:, :h].T + feats[0] @ w[:, h:].T + b  # the embedding first, then the feature
    assert_close(got[0], want, 1e-5)


def test_none_fusion_is_the_embedding():
    dcfg = DraftConfig(num_layers=1, fusion="none")
    params = D.draft_params_from_tensors(CFG, dcfg, random_tensors(CFG, dcfg, seed=6))
    emb = np.random.default_rng(7).standard_normal((1, 3, CFG.hidden_size)).astype(np.float32)
    got = D.fuse(params, CFG, jnp.ones_like(emb), jnp.asarray(emb))
    np.testing.assert_array_equal(np.asarray(got), emb)


# --------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("fusion", ["dgf", "eagle", "none"])
@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("n_layers", [1, 3])
def test_forward_matches_numpy(fusion, layout, n_layers):
    """Batch of 2 rows at different position offsets, causal mask, empty cache; outputs and the log-probs."""
    dcfg = DraftConfig(num_layers=n_layers, fusion=fusion)
    t = random_tensors(CFG, dcfg, seed=10 + n_layers)
    params = D.draft_params_from_tensors(CFG, dcfg, t, layout=layout)
    assert params.layout == layout
    assert (params.layers[0].attn_norm is None) == (fusion != "none")
    assert (params.final_norm is None) == (fusion != "none")
    embed, head, shared = random_shared(CFG, 20)
    rng = np.random.default_rng(30)
    n = 9
    feats = rng.standard_normal((2, n, CFG.hidden_size)).astype(np.float32)
    tokens = rng.integers(0, CFG.vocab_size, size=(2, n)).astype(np.int32)
    pos = np.stack([np.arange(n), 7 + np.arange(n)]).astype(np.int32)
    mask = np.tril(np.ones((n, n), bool))
    cache = init_cache(D.draft_model_config(CFG, dcfg), 16, batch=2)
    out, upd = D.forward(params, shared, CFG, dcfg, jnp.asarray(feats), jnp.asarray(tokens), jnp.asarray(pos),
                         jnp.asarray(mask), cache)
    assert len(upd.k) == n_layers and upd.k[0].shape == (2, n, CFG.num_kv_heads, CFG.head_dim)
    lp = np.asarray(D.log_probs(shared, out))
    for r in range(2):
        ref = np_draft(t, CFG, dcfg, embed, feats[r], tokens[r], pos[r], mask)
        assert_close(out[r], ref)
        assert_close(lp[r], np_log_softmax(ref @ head.astype(np.float64).T))


def test_top_log_probs_is_top_k_of_log_probs():
    """Drafting's `top_log_probs` (ranked on the logits, only the winners normalised) returns exactly what
    `top_k(log_probs)` does, bit for bit, and the float64 top-k."""
    _, head, shared = random_shared(CFG, 21)
    hidden = np.random.default_rng(22).standard_normal((3, 5, CFG.hidden_size)).astype(np.float32)
    k = 4
    vals, ids = jax.jit(lambda h: D.top_log_probs(shared, h, k))(jnp.asarray(hidden))
    ref_vals, ref_ids = jax.jit(lambda h: jax.lax.top_k(D.log_probs(shared, h), k))(jnp.asarray(hidden))
    assert vals.shape == ids.shape == (3, 5, k) and ids.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ref_ids))
    np.testing.assert_array_equal(np.asarray(vals), np.asarray(ref_vals))
    lp64 = np_log_softmax(hidden.astype(np.float64) @ head.astype(np.float64).T)
    order = np.argsort(-lp64, axis=-1, kind="stable")
    ranked = np.take_along_axis(lp64, order, -1)
    assert np.min(ranked[..., :k] - ranked[..., 1: k + 1]) > 1e-4  # no near-ties: the ranking is meaningful
    np.testing.assert_array_equal(np.asarray(ids), order[..., :k])
    assert_close(vals, ranked[..., :k])


def test_block0_really_has_no_input_norm():
    """Scaling the first block's input changes the output (an input norm would cancel the scale)."""
    dcfg = DraftConfig(num_layers=1, fusion="eagle")
    t = random_tensors(CFG, dcfg, seed=40)
    t2 = dict(t, **{"fc.weight": 3.0 * t["fc.weight"], "fc.bias": 3.0 * t["fc.bias"]})
    _, _, shared = random_shared(CFG, 41)
    rng = np.random.default_rng(42)
    feats = jnp.asarray(rng.standard_normal((1, 4, CFG.hidden_size)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, size=(1, 4)), jnp.int32)
    cache = init_cache(D.draft_model_config(CFG, dcfg), 8)
    outs = [np.asarray(D.forward(D.draft_params_from_tensors(CFG, dcfg, x), shared, CFG, dcfg, feats, tokens,
                                 jnp.arange(4)[None], jnp.tril(jnp.ones((4, 4), bool)), cache)[0]) for x in (t, t2)]
    assert np.max(np.abs(outs[0] * 3.0 - outs[1])) > 1e-2


jit_forward = jax.jit(D.forward, static_argnums=(2, 3))  # one program per shape (eager: hundreds of op compiles)


def tree_ancestors(parents: list[int]) -> np.ndarray:
    n = len(parents)
    anc = np.eye(n, dtype=bool)
    for i in range(n):
        j = parents[i]
        while j >= 0:
            anc[i, j] = True
            j = parents[j]
    return anc


def path_of(parents: list[int], i: int) -> list[int]:
    out = []
    while i >= 0:
        out.append(i)
        i = parents[i]
    return out[::-1]


@pytest.mark.parametrize("lead_valid", [3, 2])
@pytest.mark.parametrize("fusion", ["dgf", "none"])
def test_cache_plus_lead_equals_one_causal_pass(fusion, lead_valid):
    """5 tokens in the cache, 3 uncommitted `lead` tokens (only the first `lead_valid` visible, like the padded
    stable rows of a tree cycle), then a 5-node tree under an ancestor mask at depth positions: each node's
    output and K/V equal a from-scratch causal run over its context + root-to-node path."""
    dcfg = DraftConfig(num_layers=2, fusion=fusion)
    t = random_tensors(CFG, dcfg, seed=50)
    params = D.draft_params_from_tensors(CFG, dcfg, t, layout="out_in")
    _, _, shared = random_shared(CFG, 51)
    rng = np.random.default_rng(52)
    h = CFG.hidden_size
    pre_f = rng.standard_normal((8, h)).astype(np.float32)
    pre_t = rng.integers(0, CFG.vocab_size, size=8).astype(np.int32)
    parents = [-1, 0, 0, 1, 3]
    node_f = rng.standard_normal((5, h)).astype(np.float32)
    node_t = rng.integers(0, CFG.vocab_size, size=5).astype(np.int32)
    depth = np.array([len(path_of(parents, i)) - 1 for i in range(5)])

    def run(f, tok, pos, mask, cache, lead=None):
        return jit_forward(params, shared, CFG, dcfg, jnp.asarray(f[None]), jnp.asarray(tok[None]),
                           jnp.asarray(np.asarray(pos, np.int32)[None]), jnp.asarray(mask), cache, lead)

    cache = init_cache(D.draft_model_config(CFG, dcfg), 16)
    _, upd = run(pre_f[:5], pre_t[:5], np.arange(5), np.tril(np.ones((5, 5), bool)), cache)
    cache = append(cache, upd)
    _, lead = run(pre_f[5:], pre_t[5:], 5 + np.arange(3), np.tril(np.ones((3, 3), bool)), cache)
    ctx = 5 + lead_valid
    mask = np.concatenate([np.broadcast_to(np.arange(3) < lead_valid, (5, 3)), tree_ancestors(parents)], axis=1)
    out, upd = run(node_f, node_t, ctx + depth, mask, cache, lead)
    # the references: row i = context + root-to-node-i path, right padded to one length, causal, no cache
    paths = [path_of(parents, i) for i in range(5)]
    width = ctx + max(len(p) for p in paths)
    ref_f = np.zeros((5, width, h), np.float32)
    ref_t = np.zeros((5, width), np.int32)
    for i, path in enumerate(paths):
        ref_f[i, : ctx + len(path)] = np.concatenate([pre_f[:ctx], node_f[path]])
        ref_t[i, : ctx + len(path)] = np.concatenate([pre_t[:ctx], node_t[path]])
    causal = np.tril(np.ones((width, width), bool))
    ref, ref_upd = jit_forward(params, shared, CFG, dcfg, jnp.asarray(ref_f), jnp.asarray(ref_t),
                               jnp.broadcast_to(jnp.arange(width), (5, width)), jnp.asarray(causal),
                               init_cache(D.draft_model_config(CFG, dcfg), width, batch=5))
    embed = np.asarray(shared.embed)
    for i, path in enumerate(paths):
        last = ctx + len(path) - 1
        assert_close(out[0, i], ref[i, last])
        for layer in range(2):
            assert_close(upd.k[layer][0, i], ref_upd.k[layer][i, last])
            assert_close(upd.v[layer][0, i], ref_upd.v[layer][i, last])
        # and the from-scratch run itself is the numpy reference
        n = last + 1
        want = np_draft(t, CFG, dcfg, embed, ref_f[i, :n], ref_t[i, :n], np.arange(n), causal[:n, :n])
        assert_close(ref[i, :n], want)


# --------------------------------------------------------------------------------------------- draft_from_lm


@pytest.mark.parametrize("target_layout,draft_layout", [("out_in", "in_out"), ("in_out", "out_in"),
                                                        ("in_out", "in_out")])
def test_draft_from_lm_is_the_lm(hf_model, target_layout, draft_layout):
    model, cfg, tensors = hf_model
    target = params_from_tensors(cfg, tensors, devices.target_device(), layout=target_layout)
    acc = devices.accelerator_device()
    dcfg, params, shared = D.draft_from_lm(target, cfg, acc, layout=draft_layout)
    assert dcfg == DraftConfig(num_layers=cfg.num_layers, fusion="none")
    assert params.layout == draft_layout and shared.vocab_map is None
    assert all(x.devices() == {acc} for x in jax.tree_util.tree_leaves((params, shared)))
    rng = np.random.default_rng(60)
    n = 13
    ids = rng.integers(0, cfg.vocab_size, size=n).astype(np.int32)
    mask = np.tril(np.ones((n, n), bool))
    dcache = init_cache(D.draft_model_config(cfg, dcfg), 16, device=acc)
    outs = []
    for feat_seed in (61, 62):  # the features are ignored
        feats = np.random.default_rng(feat_seed).standard_normal((1, n, cfg.hidden_size)).astype(np.float32)
        put = lambda x: jax.device_put(x, acc)  # noqa: E731
        h, _ = jit_forward(params, shared, cfg, dcfg, put(feats), put(ids[None]), put(np.arange(n)[None]), put(mask),
                           dcache)
        assert h.devices() == {acc}
        outs.append(np.asarray(D.log_probs(shared, h))[0])
    np.testing.assert_array_equal(outs[0], outs[1])
    tcache = init_cache(cfg, 16, device=devices.target_device())
    logits, hidden, _ = T.forward(target, cfg, jnp.asarray(ids[None]), jnp.arange(n)[None], T.causal_mask(n), tcache)
    assert_close(outs[0], np_log_softmax(np.asarray(logits[0])), 1e-5)
    with torch.no_grad():
        hf = model(torch.tensor([ids.tolist()])).logits[0].double().numpy()
    assert_close(outs[0], np_log_softmax(hf))


def test_draft_from_lm_tied_head():
    model, cfg, tensors = hf_llama(1, tie=True)
    target = params_from_tensors(cfg, tensors)
    _, _, shared = D.draft_from_lm(target, cfg)
    np.testing.assert_array_equal(np.asarray(shared.head), tensors["model.embed_tokens.weight"])
    np.testing.assert_array_equal(np.asarray(shared.embed), tensors["model.embed_tokens.weight"])


# --------------------------------------------------------------------------------------------- vocabulary


def test_reduced_vocabulary(hf_model):
    _, cfg, tensors = hf_model
    target = params_from_tensors(cfg, tensors)
    vm = np.array([17, 3, 99, 0, 42, 100, 56], np.int32)
    acc = devices.accelerator_device()
    shared = D.make_shared(target, cfg, vm, device=acc)
    assert shared.head.shape == (7, cfg.hidden_size) and shared.embed.shape == (cfg.vocab_size, cfg.hidden_size)
    assert all(x.devices() == {acc} for x in (shared.head, shared.embed, shared.vocab_map))
    np.testing.assert_array_equal(np.asarray(shared.head), tensors["lm_head.weight"][vm])
    np.testing.assert_array_equal(np.asarray(shared.embed), tensors["model.embed_tokens.weight"])
    ids = jnp.asarray([[6, 0, 2], [1, 5, 4]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(D.to_target_ids(shared, ids)), vm[np.asarray(ids)])
    full = D.make_shared(target, cfg)
    np.testing.assert_array_equal(np.asarray(full.head), tensors["lm_head.weight"])
    np.testing.assert_array_equal(np.asarray(D.to_target_ids(full, ids)), np.asarray(ids))
    # the reduced head's log-probs are the full logits restricted to vm, renormalised
    hid = np.random.default_rng(70).standard_normal((3, cfg.hidden_size)).astype(np.float32)
    lp = np.asarray(D.log_probs(shared, jax.device_put(hid, acc)))
    assert_close(lp, np_log_softmax((hid.astype(np.float64) @ tensors["lm_head.weight"].astype(np.float64).T)[:, vm]),
                 1e-5)


@pytest.mark.parametrize("vm", [[3, 5, 3], [0, 101], [-1, 4], [], [[1, 2], [3, 4]]],
                         ids=["duplicate", "too_large", "negative", "empty", "2d"])
def test_bad_vocab_map_is_refused(hf_model, vm):
    _, cfg, tensors = hf_model
    target = params_from_tensors(cfg, tensors)
    with pytest.raises(ModelFormatError, match="vocab_map"):
        D.make_shared(target, cfg, np.array(vm, np.int32))


# --------------------------------------------------------------------------------------------- tensors


@pytest.mark.parametrize("fusion", ["dgf", "eagle", "none"])
def test_check_draft_tensors(fusion):
    dcfg = DraftConfig(num_layers=2, fusion=fusion)
    t = random_tensors(CFG, dcfg, seed=80)
    D.check_draft_tensors(CFG, dcfg, t)  # complete: accepted

    missing = dict(t)
    del missing["layers.1.mlp.up_proj.weight"]
    with pytest.raises(ModelFormatError, match=r"missing tensor\(s\) layers\.1\.mlp\.up_proj\.weight"):
        D.check_draft_tensors(CFG, dcfg, missing)

    extra = dict(t, **{"layers.2.self_attn.q_proj.weight": t["layers.1.self_attn.q_proj.weight"]})
    with pytest.raises(ModelFormatError, match=r"unexpected tensor\(s\) layers\.2\.self_attn\.q_proj\.weight"):
        D.check_draft_tensors(CFG, dcfg, extra)

    if fusion != "none":  # block 0 of a fused draft has no input norm: one is unexpected
        extra = dict(t, **{"layers.0.input_layernorm.weight": np.ones(CFG.hidden_size, np.float32)})
        with pytest.raises(ModelFormatError, match=r"layers\.0\.input_layernorm\.weight"):
            D.check_draft_tensors(CFG, dcfg, extra)

    bad = dict(t, **{"layers.1.self_attn.k_proj.weight": np.zeros((8, CFG.hidden_size), np.float32)})
    with pytest.raises(ModelFormatError, match=r"'layers\.1\.self_attn\.k_proj\.weight' has shape \(8, 48\), "
                                               r"expected \(16, 48\)"):
        D.check_draft_tensors(CFG, dcfg, bad)
    with pytest.raises(ModelFormatError, match="missing"):  # the loader validates too (never loads partly)
        D.draft_params_from_tensors(CFG, dcfg, missing)


def test_draft_for_another_hidden_size_is_refused():
    other = CFG.replace(hidden_size=32, num_heads=4, num_kv_heads=2, name="other")
    dcfg = DraftConfig(num_layers=1, fusion="dgf")
    t = random_tensors(other, dcfg, seed=81)
    with pytest.raises(ModelFormatError, match=r"'emb_norm\.weight' has shape \(32,\), expected \(48,\)") as e:
        D.draft_params_from_tensors(CFG, dcfg, t, source="my-draft")
    assert "my-draft" in str(e.value) and "48" in str(e.value)
    t = random_tensors(other, DraftConfig(num_layers=1, fusion="eagle"), seed=82)
    with pytest.raises(ModelFormatError, match=r"'fc\.weight' has shape \(32, 64\), expected \(48, 96\)"):
        D.check_draft_tensors(CFG, DraftConfig(num_layers=1, fusion="eagle"), t)


@pytest.mark.parametrize("fusion", ["dgf", "eagle", "none"])
@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_tensors_round_trip_exactly(fusion, layout):
    dcfg = DraftConfig(num_layers=2, fusion=fusion)
    t = random_tensors(CFG, dcfg, seed=90)
    back = D.draft_tensors(D.draft_params_from_tensors(CFG, dcfg, t, layout=layout), CFG)
    assert sorted(back) == sorted(t)
    for k in t:
        assert back[k].dtype == np.float32 and back[k].shape == t[k].shape, k
        np.testing.assert_array_equal(back[k], t[k], err_msg=k)


def test_init_draft_shapes_and_statistics():
    for fusion in ("dgf", "eagle", "none"):
        dcfg = DraftConfig(num_layers=2, fusion=fusion)
        p = D.init_draft(jax.random.key(0), CFG, dcfg, layout="out_in")
        t = D.draft_tensors(p, CFG)
        assert {k: v.shape for k, v in t.items()} == draft_names(CFG, fusion, 2)
        q = t["layers.1.self_attn.q_proj.weight"]
        assert abs(q.std() - 0.02) < 0.004 and abs(q.mean()) < 0.004
        for k, v in t.items():
            if k.endswith("norm.weight"):
                np.testing.assert_array_equal(v, 1.0)
        if fusion == "eagle":
            lim = np.sqrt(6.0 / (3 * CFG.hidden_size))
            w = t["fc.weight"]
            assert w.min() >= -lim and w.max() <= lim and w.max() > 0.9 * lim
            np.testing.assert_array_equal(t["fc.bias"], 0.0)


@pytest.mark.parametrize("fusion", ["dgf", "eagle"])
def test_a_grown_draft_computes_what_it_grew_from(fusion):
    """`deepen`: a 1-layer draft grown to 3 layers gives the same features (the new blocks add a zero residual
    branch), keeps the trained block bit for bit, and its new output projections get a gradient (they can
    learn); a shallower or other-fusion target shape is refused."""
    one = D.init_draft(jax.random.key(1), CFG, DraftConfig(num_layers=1, fusion=fusion))
    three_cfg = DraftConfig(num_layers=3, fusion=fusion)
    grown = D.deepen(one, D.init_draft(jax.random.key(2), CFG, three_cfg, layout=one.layout))
    assert len(grown.layers) == 3
    for a, b in zip(jax.tree.leaves(grown.layers[0]), jax.tree.leaves(one.layers[0]), strict=True):
        np.testing.assert_array_equal(a, b)
    _, _, shared = random_shared(CFG, 21)
    rng = np.random.default_rng(31)
    n = 7
    feats = jnp.asarray(rng.standard_normal((1, n, CFG.hidden_size)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, size=(1, n)), jnp.int32)
    pos = jnp.arange(n, dtype=jnp.int32)[None]
    mask = T.causal_mask(n)

    def out(p, dcfg):
        cache = init_cache(D.draft_model_config(CFG, dcfg), 8, batch=1)
        return D.forward(p, shared, CFG, dcfg, feats, tokens, pos, mask, cache, empty_cache=True)[0]

    np.testing.assert_allclose(out(grown, three_cfg), out(one, DraftConfig(num_layers=1, fusion=fusion)),
                               rtol=0, atol=1e-6)
    g = jax.grad(lambda p: jnp.sum(out(p, three_cfg) ** 2))(grown)
    assert all(float(jnp.abs(lp.wo).max()) > 0 and float(jnp.abs(lp.w_down).max()) > 0 for lp in g.layers[1:])
    with pytest.raises(ValueError, match="grow"):
        D.deepen(grown, one)
    with pytest.raises(ValueError, match="grow"):
        D.deepen(one, D.init_draft(jax.random.key(2), CFG, DraftConfig(num_layers=2, fusion="none")))
