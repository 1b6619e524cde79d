"""The JAX target forward against Hugging Face transformers (PyTorch, float32) on tiny random LLaMAs.

Covers the three uses of the one forward: prefill, single-token decode through the cache, and tree
verification with an ancestor mask (each node's logits equal those of its root-to-node path).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dovetail_jax import devices  # noqa: E402
from dovetail_jax.config import ModelConfig  # noqa: E402
from dovetail_jax.model.cache import append, commit_path, init_cache  # noqa: E402
from dovetail_jax.model.params import (  # noqa: E402
    TargetParams,
    expected_shapes,
    param_specs,
    params_from_tensors,
    to_tensors,
)
from dovetail_jax.model.target import causal_mask, forward  # noqa: E402

TOL = 1e-4

CONFIGS = {
    "gqa_untied": dict(vocab_size=101, hidden_size=48, intermediate_size=80, num_layers=3, num_heads=6,
                       num_kv_heads=2, rope_theta=5000.0, tie_word_embeddings=False),
    "mha_tied": dict(vocab_size=67, hidden_size=40, intermediate_size=72, num_layers=2, num_heads=5,
                     num_kv_heads=5, rope_theta=10000.0, tie_word_embeddings=True),
    "mqa_odd": dict(vocab_size=53, hidden_size=36, intermediate_size=50, num_layers=2, num_heads=3,
                    num_kv_heads=1, rope_theta=100000.0, tie_word_embeddings=False),
}


def build(name: str, seed: int = 0):
    c = CONFIGS[name]
    torch.manual_seed(seed)
    hc = transformers.LlamaConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_layers"], num_attention_heads=c["num_heads"], num_key_value_heads=c["num_kv_heads"],
        rope_theta=c["rope_theta"], tie_word_embeddings=c["tie_word_embeddings"], max_position_embeddings=256,
        rms_norm_eps=1e-5,
    )
    model = transformers.LlamaForCausalLM(hc).float().eval()
    with torch.no_grad():  # larger weights than the default init, so that errors are not hidden by tiny logits
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.2)
    cfg = ModelConfig(head_dim=c["hidden_size"] // c["num_heads"], max_position_embeddings=256, rms_norm_eps=1e-5,
                      **c)
    tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    return model, cfg, params_from_tensors(cfg, tensors, devices.target_device())


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].numpy()


@pytest.fixture(scope="module", params=list(CONFIGS))
def tiny(request):
    return build(request.param)


def test_prefill_matches_hf(tiny):
    model, cfg, params = tiny
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, size=19)
    cache = init_cache(cfg, 64, device=devices.target_device())
    logits, hidden, _ = forward(params, cfg, jnp.asarray(ids[None], jnp.int32), jnp.arange(19)[None],
                                    causal_mask(19), cache)
    np.testing.assert_allclose(np.asarray(logits[0]), hf_logits(model, ids), atol=TOL, rtol=0)
    with torch.no_grad():
        ref_h = model(torch.tensor([ids.tolist()]), output_hidden_states=True).hidden_states[-1][0].numpy()
    np.testing.assert_allclose(np.asarray(hidden[0]), ref_h, atol=TOL, rtol=0)
    # the fresh-prefill shortcut (no cache attention at all) gives the same result, up to f32 rounding (with a
    # cache, the fused tree-attention kernel sums in another order than XLA's dots)
    fast, _, _ = forward(params, cfg, jnp.asarray(ids[None], jnp.int32), jnp.arange(19)[None], causal_mask(19),
                         cache, empty_cache=True)
    np.testing.assert_allclose(np.asarray(fast), np.asarray(logits), atol=2e-5, rtol=0)


def test_decode_through_cache_matches_hf(tiny):
    """Prefill 7 tokens, then decode 10 single tokens; every step's logits equal HF on the full prefix."""
    model, cfg, params = tiny
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, size=17)
    cache = init_cache(cfg, 32, device=devices.target_device())
    _, _, upd = forward(params, cfg, jnp.asarray(ids[None, :7], jnp.int32), jnp.arange(7)[None], causal_mask(7),
                        cache, "none")
    cache = append(cache, upd)
    assert int(cache.length) == 7
    ref = hf_logits(model, ids)
    step = jax.jit(lambda p, c, t, pos: forward(p, cfg, t, pos, jnp.ones((1, 1), bool), c, "last", 0))
    write = jax.jit(append, donate_argnums=(0,))
    for i in range(7, 17):
        logits, _, upd = step(params, cache, jnp.asarray([[ids[i]]], jnp.int32), jnp.asarray([[i]], jnp.int32))
        cache = write(cache, upd)
        np.testing.assert_allclose(np.asarray(logits[0]), ref[i], atol=TOL, rtol=0)
    assert int(cache.length) == 17


def random_tree(rng: np.random.Generator, n: int) -> np.ndarray:
    """parent[i] < i, root 0 has parent -1."""
    return np.array([-1] + [int(rng.integers(0, i)) for i in range(1, n)])


def ancestors(parent: np.ndarray) -> np.ndarray:
    n = len(parent)
    anc = np.eye(n, dtype=bool)
    for i in range(n):
        j = parent[i]
        while j >= 0:
            anc[i, j] = True
            j = parent[j]
    return anc


def path_to(parent: np.ndarray, i: int) -> list[int]:
    path = []
    while i >= 0:
        path.append(i)
        i = parent[i]
    return path[::-1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tree_verification_equals_sequential_paths(tiny, seed):
    """Each tree node's logits equal HF's logits at the end of prefix + root-to-node path."""
    model, cfg, params = tiny
    rng = np.random.default_rng(10 + seed)
    prefix = rng.integers(0, cfg.vocab_size, size=9)
    n = 12
    parent = random_tree(rng, n)
    tokens = rng.integers(0, cfg.vocab_size, size=n)
    depth = np.array([len(path_to(parent, i)) - 1 for i in range(n)])
    cache = init_cache(cfg, 64, device=devices.target_device())
    _, _, upd = forward(params, cfg, jnp.asarray(prefix[None], jnp.int32), jnp.arange(9)[None], causal_mask(9),
                        cache, "none")
    cache = append(cache, upd)
    logits, _, tree_upd = forward(params, cfg, jnp.asarray(tokens[None], jnp.int32),
                                  jnp.asarray((9 + depth)[None]), jnp.asarray(ancestors(parent)), cache)
    for i in range(n):
        seq = np.concatenate([prefix, tokens[path_to(parent, i)]])
        np.testing.assert_allclose(np.asarray(logits[0, i]), hf_logits(model, seq)[-1], atol=TOL, rtol=0)

    # commit the path to the deepest node, then decode one more token through the compacted cache
    leaf = int(np.argmax(depth))
    path = path_to(parent, leaf)
    padded = jnp.asarray(path + [path[-1]] * 3, jnp.int32)  # padding rows land beyond the new length
    cache = commit_path(cache, tree_upd, padded, jnp.int32(len(path)))
    assert int(cache.length) == 9 + len(path)
    nxt = int(rng.integers(0, cfg.vocab_size))
    pos = 9 + len(path)
    logits, _, _ = forward(params, cfg, jnp.asarray([[nxt]], jnp.int32), jnp.asarray([[pos]]),
                           jnp.ones((1, 1), bool), cache, "last", 0)
    seq = np.concatenate([prefix, tokens[path], [nxt]])
    np.testing.assert_allclose(np.asarray(logits[0]), hf_logits(model, seq)[-1], atol=TOL, rtol=0)


def test_batched_prefill_with_right_padding(tiny):
    """Rows of different lengths, right-padded, give each row's own logits (the batched prefill path)."""
    model, cfg, params = tiny
    rng = np.random.default_rng(3)
    lens = [11, 6]
    toks = np.zeros((2, 11), np.int32)
    rows = [rng.integers(0, cfg.vocab_size, size=n) for n in lens]
    for r, row in enumerate(rows):
        toks[r, : len(row)] = row
    cache = init_cache(cfg, 16, batch=2, device=devices.target_device())
    assert cache.batch == 2 and cache.num_slots == 16
    logits, _, _ = forward(params, cfg, jnp.asarray(toks), jnp.broadcast_to(jnp.arange(11), (2, 11)),
                           causal_mask(11), cache)
    for r, row in enumerate(rows):
        np.testing.assert_allclose(np.asarray(logits[r, : len(row)]), hf_logits(model, row), atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["gqa_tied", "mha_untied", "mqa_head_dim", "q8_gqa"])
@pytest.mark.parametrize("fmt", ["hf", "gguf_f32"])
def test_logits_from_saved_files_match_hf(tmp_path, name, fmt):
    """End to end through the loaders: a tiny model saved as an HF folder or written as a GGUF file (q/k rows
    permuted as llama.cpp's converter does), loaded and run, gives HF's logits."""
    from tiny_models import make_tiny_hf, write_gguf

    from dovetail_jax.io.load import load_model_files

    folder, model, _ = make_tiny_hf(tmp_path / "hf", name)
    path = folder if fmt == "hf" else write_gguf(model, tmp_path / "m.gguf", "F32")
    cfg, tensors, _ = load_model_files(path)
    params = params_from_tensors(cfg, tensors, devices.target_device())
    ids = np.random.default_rng(5).integers(0, cfg.vocab_size, size=13)
    logits, _, _ = forward(params, cfg, jnp.asarray(ids[None], jnp.int32), jnp.arange(13)[None], causal_mask(13),
                           init_cache(cfg, 16, device=devices.target_device()))
    np.testing.assert_allclose(np.asarray(logits[0]), hf_logits(model, ids), atol=TOL, rtol=0)


def test_in_out_layout_gives_the_same_forward(tiny):
    """The `[in, out]` weight layout (for multi-token verification) computes the same function."""
    model, cfg, params = tiny
    tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    params_io = params_from_tensors(cfg, tensors, devices.target_device(), layout="in_out")
    assert params_io.layout == "in_out" and params_io.layers[0].wqkv.shape == params.layers[0].wqkv.shape[::-1]
    rng = np.random.default_rng(4)
    prefix = rng.integers(0, cfg.vocab_size, size=6)
    parent = random_tree(rng, 9)
    tokens = rng.integers(0, cfg.vocab_size, size=9)
    depth = np.array([len(path_to(parent, i)) - 1 for i in range(9)])
    outs = []
    for p in (params, params_io):
        cache = init_cache(cfg, 32, device=devices.target_device())
        _, _, upd = forward(p, cfg, jnp.asarray(prefix[None], jnp.int32), jnp.arange(6)[None], causal_mask(6), cache,
                            "none")
        cache = append(cache, upd)
        logits, hidden, _ = forward(p, cfg, jnp.asarray(tokens[None], jnp.int32), jnp.asarray((6 + depth)[None]),
                                    jnp.asarray(ancestors(parent)), cache)
        outs.append((np.asarray(logits), np.asarray(hidden)))
    np.testing.assert_allclose(outs[1][0], outs[0][0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(outs[1][1], outs[0][1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_spec_fuses_places_and_converts_back(tiny, layout):
    """One description per weight: the fused leaves are torch's q/k/v and gate/up rows stacked (transposed in
    "in_out"), each leaf has the spec's shape and sits on the given device, and `to_tensors` returns the
    state dict exactly."""
    model, cfg, _ = tiny
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    dev = devices.target_device()
    spec = TargetParams.spec(cfg, layout)
    params = params_from_tensors(cfg, sd, dev, layout=layout)
    for s, x in zip(param_specs(spec), jax.tree_util.tree_leaves(params), strict=True):
        assert x.shape == s.shape and x.dtype == np.float32 and x.devices() == {dev}
    orient = (lambda w: w.T) if layout == "in_out" else (lambda w: w)
    for i, layer in enumerate(params.layers):
        p = f"model.layers.{i}."
        qkv = np.concatenate([sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        gate_up = np.concatenate([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
        np.testing.assert_array_equal(np.asarray(layer.wqkv), orient(qkv))
        np.testing.assert_array_equal(np.asarray(layer.w_gate_up), orient(gate_up))
        np.testing.assert_array_equal(np.asarray(layer.w_down), orient(sd[p + "mlp.down_proj.weight"]))
    back = to_tensors(spec, params)
    assert sorted(back) == sorted(sd) == sorted(expected_shapes(cfg))
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
