"""EAGLE-2 tree drafting (`spec.drafting`) against a plain-Python re-derivation of the algorithm.

The draft under test is a whole tiny LLaMA (`draft_from_lm`, fusion "none"): it ignores the features, so the
distribution after any tree path is the LM's distribution over context + path, computed here from scratch
by transformers (float64) over the whole token sequence. The tree is then rebuilt in plain Python: level 1 =
the root's top-k; `depth` expansions of the k best frontier nodes (k children each, value = cumulative
log-probability, all k^2 children pooled, the k best as next frontier); finally the best total_tokens - 1 by
value (ties: lower pool index) in pool order, parents indexed into [root] + selection. Every comparison the
tree depends on is asserted to have a margin, so the exact comparison of tokens and parents is meaningful.
One test also covers a feature-reading (DGF) draft, whose children read their parent's output as feature,
against a float64 numpy re-implementation of the draft.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

import numpy as np
import pytest
from dovetail_helpers import hf_llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dovetail_jax import devices  # noqa: E402
from dovetail_jax.config import DraftConfig, ModelConfig, TreeConfig  # noqa: E402
from dovetail_jax.model import draft as D  # noqa: E402
from dovetail_jax.model import target as T  # noqa: E402
from dovetail_jax.model.cache import append, init_cache  # noqa: E402
from dovetail_jax.model.params import params_from_tensors  # noqa: E402
from dovetail_jax.speculation.drafting import draft_step, draft_tree, select_nodes  # noqa: E402

CFG = ModelConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=128, name="tiny-lm")
GAP = 1e-3  # the smallest margin any comparison the reference tree depends on may have
SLOTS = 32


# --------------------------------------------------------------------------------------------- the LM


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lm():
    """(float64 HF model for the reference, target params, (dcfg, draft params, shared) on the accelerator)."""
    model, _, tensors = hf_llama(CFG, 0, scale=0.25, max_pos=128)
    target = params_from_tensors(CFG, tensors, devices.target_device())
    draft = D.draft_from_lm(target, CFG, devices.accelerator_device())
    return model.double(), target, draft


def lm_dist(model) -> Callable[[tuple[int, ...]], np.ndarray]:
    @functools.cache
    def dist(seq: tuple[int, ...]) -> np.ndarray:
        """float64 log-probabilities of the token after `seq`, from scratch."""
        with torch.no_grad():
            logits = model(torch.tensor([list(seq)])).logits[0, -1]
        return torch.log_softmax(logits, -1).numpy()

    return dist


# --------------------------------------------------------------------------------------------- the reference


def ranked(values: np.ndarray, n: int, what: str, ordered: bool = True) -> list[int]:
    """Indices of the n largest values, descending (ties: lower index), asserting a margin at every comparison
    the result depends on (the cut, and with `ordered` the order within the n), so it does not hinge on
    rounding."""
    order = sorted(range(len(values)), key=lambda j: (-values[j], j))
    pairs = list(zip(order[:n], order[1: n + 1], strict=False))  # consecutive ranks, the cut included
    if not ordered:
        pairs = pairs[n - 1:]  # only the cut (nothing when everything is kept)
    for a, b in pairs:
        assert values[a] - values[b] > GAP, f"{what}: near-tie {values[a]} vs {values[b]}; pick another seed"
    return order[:n]


def eagle2_reference(dist, k: int, depth: int, total: int, vocab_map: np.ndarray | None = None,
                     root: int = -1, useless: list[int] | None = None) -> tuple[list[int], list[int]]:
    """The EAGLE-2 tree in plain Python. `dist(path)` = draft log-probs over the target vocabulary after the
    root-to-node `path` of target ids (the root excluded); with `vocab_map` only those ids are scored.
    `useless` collects the expansions whose frontier cannot beat the pool's (total - 1)-th best value."""

    def top(path: tuple[int, ...]) -> list[tuple[int, float]]:
        lp = dist(path)
        if vocab_map is not None:  # the reduced head: the same logits restricted and renormalised
            sub = lp[vocab_map]
            lp_d = sub - np.log(np.exp(sub - sub.max()).sum()) - sub.max()
            return [(int(vocab_map[j]), float(lp_d[j])) for j in ranked(lp_d, k, f"top-k after {path}")]
        return [(j, float(lp[j])) for j in ranked(lp, k, f"top-k after {path}")]

    pool_tok, pool_val, pool_par, pool_path = [], [], [], []
    for tok, lp in top(()):
        pool_tok.append(tok)
        pool_val.append(lp)
        pool_par.append(-1)
        pool_path.append((tok,))
    frontier = list(range(k))
    for i in range(depth):
        base = len(pool_tok)
        full = useless is not None and 1 < total <= base + 1
        if full and sorted(pool_val, reverse=True)[total - 2] >= max(pool_val[f] for f in frontier):
            useless.append(i)
        for f in frontier:
            for tok, lp in top(pool_path[f]):
                pool_tok.append(tok)
                pool_val.append(pool_val[f] + lp)
                pool_par.append(f)
                pool_path.append(pool_path[f] + (tok,))
        if i + 1 < depth:
            frontier = [base + j for j in ranked(np.array(pool_val[base:]), k, f"frontier {i + 1}")]
    n = total - 1
    sel = sorted(ranked(np.array(pool_val), n, "selection", ordered=False))  # then in pool order
    assert len(pool_tok) == TreeConfig(top_k=k, depth=depth, total_tokens=total).pool_size
    tokens = [root] + [pool_tok[j] for j in sel]
    parents = [-1] + [0 if pool_par[j] < 0 else sel.index(pool_par[j]) + 1 for j in sel]
    return tokens, parents


# --------------------------------------------------------------------------------------------- running


@functools.cache
def jitted(dcfg: DraftConfig, tree: TreeConfig):
    return jax.jit(functools.partial(draft_tree, cfg=CFG, dcfg=dcfg, tree=tree))


def run_draft(draft, cache, ids: np.ndarray, n_new: int, tree: TreeConfig, feats: np.ndarray | None = None,
              shared: D.DraftShared | None = None):
    dcfg, params, shared0 = draft
    acc = devices.accelerator_device()
    m = ids.shape[0]
    if feats is None:
        feats = np.random.default_rng(m * 7 + n_new).standard_normal((m, CFG.hidden_size)).astype(np.float32)
    put = functools.partial(jax.device_put, device=acc)
    before = jax.device_get(cache)
    tokens, parents, stable = jitted(dcfg, tree)(params, shared or shared0, cache, put(feats[None]),
                                                 put(ids[None].astype(np.int32)), put(np.int32(n_new)))
    after = jax.device_get(cache)  # draft_tree only reads the draft cache
    assert int(after.length) == int(before.length)
    for a, b in zip(jax.tree_util.tree_leaves(after), jax.tree_util.tree_leaves(before), strict=True):
        np.testing.assert_array_equal(a, b)
    tokens, parents = np.asarray(tokens), np.asarray(parents)
    assert tokens.shape == parents.shape == (tree.total_tokens,)
    assert tokens.dtype == parents.dtype == np.int32
    check_tree(tokens, parents)
    assert tokens[0] == ids[n_new - 1]
    assert len(stable.k) == dcfg.num_layers and stable.k[0].shape == (1, m, CFG.num_kv_heads, CFG.head_dim)
    return tokens, parents, stable


def check_tree(tokens: np.ndarray, parents: np.ndarray) -> None:
    assert parents[0] == -1
    for j in range(1, len(parents)):
        assert 0 <= parents[j] < j, (j, parents)
    kids: dict[int, list[int]] = {}
    for j in range(1, len(parents)):
        kids.setdefault(int(parents[j]), []).append(int(tokens[j]))
    for p, toks in kids.items():
        assert len(set(toks)) == len(toks), f"repeated sibling tokens under node {p}: {toks}"


def padded_ids(rng: np.random.Generator, m: int) -> np.ndarray:
    """M random pair tokens: the first n_new are real, the rest padding that is not zero (so a leak would show)."""
    return rng.integers(0, CFG.vocab_size, size=m).astype(np.int32)


def none_cache():
    """An empty cache for the LM-as-draft (its blocks are the LM's)."""
    dcfg = DraftConfig(num_layers=CFG.num_layers, fusion="none")
    return init_cache(D.draft_model_config(CFG, dcfg), SLOTS, device=devices.accelerator_device())


# --------------------------------------------------------------------------------------------- the trees


CASES = {  # name: (top_k, depth, total_tokens, M, n_new, seed)
    "chain": (1, 3, 5, 5, 5, 1),
    "k2_d3": (2, 3, 7, 6, 6, 2),  # the tree of test_second_cycle_on_a_filled_draft_cache: one compilation
    "k3_d3_padded": (3, 3, 8, 8, 5, 4),
    "root_only": (2, 1, 1, 4, 4, 4),
    "everything_kept": (2, 2, 11, 4, 2, 5),
    "k3_d2_one_pair": (3, 2, 6, 4, 1, 6),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tree_matches_eagle2_reference(lm, case):
    model, _, draft = lm
    k, depth, total, m, n_new, seed = CASES[case]
    tree = TreeConfig(top_k=k, depth=depth, total_tokens=total)
    ids = padded_ids(np.random.default_rng(seed), m)
    tokens, parents, _ = run_draft(draft, none_cache(), ids, n_new, tree)
    dist = lm_dist(model)
    context = tuple(int(x) for x in ids[:n_new])
    want_t, want_p = eagle2_reference(lambda path: dist(context + path), k, depth, total, root=int(ids[n_new - 1]))
    assert tokens.tolist() == want_t
    assert parents.tolist() == want_p


@pytest.mark.parametrize("seed", [7, 10])  # 7: expansions 1 and 2 skipped, 10: only the last
def test_useless_expansions_are_skipped_exactly(lm, seed):
    """Where the pool's (total - 1)-th best value already beats every frontier node, the expansion is skipped
    (`lax.cond`): the tree is still the full EAGLE-2 reference's. The cases are chosen so that it happens."""
    model, _, draft = lm
    k, depth, total, m, n_new = 3, 3, 4, 6, 5
    ids = padded_ids(np.random.default_rng(seed), m)
    tokens, parents, _ = run_draft(draft, none_cache(), ids, n_new, TreeConfig(top_k=k, depth=depth,
                                                                               total_tokens=total))
    dist = lm_dist(model)
    context = tuple(int(x) for x in ids[:n_new])
    useless: list[int] = []
    want = eagle2_reference(lambda path: dist(context + path), k, depth, total, root=int(ids[n_new - 1]),
                            useless=useless)
    assert useless  # the skip is exercised
    assert (tokens.tolist(), parents.tolist()) == want


def test_chain_is_greedy_decoding(lm):
    """top_k = 1: the tree is the LM's greedy continuation of the context."""
    model, _, draft = lm
    ids = np.random.default_rng(5).integers(0, CFG.vocab_size, size=5).astype(np.int32)
    tokens, parents, _ = run_draft(draft, none_cache(), ids, 5, TreeConfig(top_k=1, depth=3, total_tokens=5))
    assert parents.tolist() == [-1, 0, 1, 2, 3]
    seq = ids.tolist()
    dist = lm_dist(model)
    for _ in range(4):
        seq.append(int(np.argmax(dist(tuple(seq)))))
    assert tokens.tolist() == seq[4:]


def test_second_cycle_on_a_filled_draft_cache(lm):
    """Prefill-like call, append its valid stable K/V, then a second call with new pairs: the reference
    context is the concatenation of both calls' valid pairs."""
    model, target, draft = lm
    tree = TreeConfig(top_k=2, depth=3, total_tokens=7)
    rng = np.random.default_rng(11)
    dist = lm_dist(model)
    cache = none_cache()
    ids1 = padded_ids(rng, 6)
    t1, p1, stable1 = run_draft(draft, cache, ids1, 6, tree)
    want = eagle2_reference(lambda path: dist(tuple(ids1.tolist()) + path), 2, 3, 7, root=int(ids1[-1]))
    assert (t1.tolist(), p1.tolist()) == want
    cache = append(cache, stable1, 6)
    assert int(cache.length) == 6
    ids2 = padded_ids(rng, 6)
    t2, p2, stable2 = run_draft(draft, cache, ids2, 3, tree)
    context = tuple(ids1.tolist()) + tuple(ids2[:3].tolist())
    want = eagle2_reference(lambda path: dist(context + path), 2, 3, 7, root=int(ids2[2]))
    assert (t2.tolist(), p2.tolist()) == want
    # the stable pairs' K/V are the LM's own K/V of the context (the draft is the target's copy), the second
    # call's at positions 6..8
    _, _, upd = T.forward(target, CFG, jnp.asarray(np.array(context)[None]), jnp.arange(9)[None], T.causal_mask(9),
                          init_cache(CFG, SLOTS, device=devices.target_device()))
    for layer in range(CFG.num_layers):
        for got, want in ((stable1.k, upd.k), (stable1.v, upd.v)):
            np.testing.assert_allclose(np.asarray(got[layer][0]), np.asarray(want[layer][0, :6]), atol=1e-4)
        for got, want in ((stable2.k, upd.k), (stable2.v, upd.v)):
            np.testing.assert_allclose(np.asarray(got[layer][0, :3]), np.asarray(want[layer][0, 6:]), atol=1e-4)
    # a third call on the twice-filled cache
    cache = append(cache, stable2, 3)
    ids3 = padded_ids(rng, 6)
    t3, p3, _ = run_draft(draft, cache, ids3, 2, tree)
    context += tuple(ids3[:2].tolist())
    assert (t3.tolist(), p3.tolist()) == eagle2_reference(lambda path: dist(context + path), 2, 3, 7,
                                                          root=int(ids3[1]))


def test_reduced_vocabulary_tree(lm):
    """With a reduced head the draft ranks only vocab_map's tokens (renormalised) and returns target ids."""
    model, target, draft = lm
    vm = np.random.default_rng(12).permutation(CFG.vocab_size)[:30].astype(np.int32)
    shared = D.make_shared(target, CFG, vm, devices.accelerator_device())
    tree = TreeConfig(top_k=3, depth=2, total_tokens=6)
    ids = padded_ids(np.random.default_rng(13), 6)
    tokens, parents, _ = run_draft(draft, none_cache(), ids, 4, tree, shared=shared)
    assert set(tokens[1:].tolist()) <= set(vm.tolist())
    dist = lm_dist(model)
    context = tuple(ids[:4].tolist())
    want = eagle2_reference(lambda path: dist(context + path), 3, 2, 6, vocab_map=vm, root=int(ids[3]))
    assert (tokens.tolist(), parents.tolist()) == want


def test_padding_does_not_leak(lm):
    """Changing the padded pairs (tokens and features) beyond n_new changes nothing in the tree."""
    _, _, draft = lm
    tree = TreeConfig(top_k=3, depth=3, total_tokens=8)
    rng = np.random.default_rng(14)
    ids = padded_ids(rng, 8)
    feats = rng.standard_normal((8, CFG.hidden_size)).astype(np.float32)
    a = run_draft(draft, none_cache(), ids, 5, tree, feats)
    ids2, feats2 = ids.copy(), feats.copy()
    ids2[5:] = (ids2[5:] + 17) % CFG.vocab_size
    feats2[5:] *= -3.0
    b = run_draft(draft, none_cache(), ids2, 5, tree, feats2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


# --------------------------------------------------------------------------------------------- a DGF draft


def np_rms(x, w, eps=CFG.rms_norm_eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def np_silu(x):
    return x / (1.0 + np.exp(-x))


def np_rope(x, pos):
    d = x.shape[-1]
    ang = np.asarray(pos, np.float64)[:, None] / CFG.rope_theta ** (np.arange(0, d, 2) / d)
    ang = np.concatenate([ang, ang], -1)[:, None, :]
    return x * np.cos(ang) + np.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1) * np.sin(ang)


def np_dgf_draft(t: dict[str, np.ndarray], embed: np.ndarray, feats: np.ndarray, tokens: list[int]) -> np.ndarray:
    """float64 DGF draft over one causal sequence of pairs at positions 0..: outputs [T, H]."""
    n, kh, d = CFG.num_heads, CFG.num_kv_heads, CFG.head_dim
    tt = len(tokens)
    e = embed[np.asarray(tokens)]
    h1 = feats @ t["W_1"]
    h2 = np_silu(np_rms(e, t["emb_norm.weight"]) @ t["W_2"])
    z = 1.0 / (1.0 + np.exp(-(np.concatenate([h1, h2], -1) @ t["W_z"])))
    x = z * h1 + (1.0 - z) * h2
    pos = np.arange(tt)
    causal = np.tril(np.ones((tt, tt), bool))
    for i in range(len([k for k in t if k.endswith("post_attention_layernorm.weight")])):
        w = {k[len(f"layers.{i}."):]: v for k, v in t.items() if k.startswith(f"layers.{i}.")}
        h = np_rms(x, w["input_layernorm.weight"]) if "input_layernorm.weight" in w else x
        q = np_rope((h @ w["self_attn.q_proj.weight"].T).reshape(tt, n, d), pos)
        k = np.repeat(np_rope((h @ w["self_attn.k_proj.weight"].T).reshape(tt, kh, d), pos), n // kh, 1)
        v = np.repeat((h @ w["self_attn.v_proj.weight"].T).reshape(tt, kh, d), n // kh, 1)
        s = np.where(causal[None], np.einsum("tnd,snd->nts", q, k) / np.sqrt(d), -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        x = x + np.einsum("nts,snd->tnd", p, v).reshape(tt, n * d) @ w["self_attn.o_proj.weight"].T
        h = np_rms(x, w["post_attention_layernorm.weight"])
        x = x + (np_silu(h @ w["mlp.gate_proj.weight"].T) * (h @ w["mlp.up_proj.weight"].T)) @ w[
            "mlp.down_proj.weight"].T
    return x


def test_dgf_draft_feeds_the_parent_output_back(lm):
    """A DGF draft: each tree node is the pair (output of its parent's pair, node token), the root's pair
    being the last stable pair. The reference runs the float64 numpy draft over context pairs + path pairs."""
    _, target, _ = lm
    dcfg = DraftConfig(num_layers=2, fusion="dgf")
    rng = np.random.default_rng(20)
    t = {}
    for name, shape in D.expected_draft_shapes(CFG, dcfg).items():
        t[name] = (1.0 + 0.2 * rng.standard_normal(shape)) if name.endswith("norm.weight") else \
            0.2 * rng.standard_normal(shape)
    t = {k: v.astype(np.float32) for k, v in t.items()}
    acc = devices.accelerator_device()
    params = D.draft_params_from_tensors(CFG, dcfg, t, acc, layout="out_in")
    shared = D.make_shared(target, CFG, None, acc)
    embed, head = np.asarray(shared.embed, np.float64), np.asarray(shared.head, np.float64)
    t64 = {k: v.astype(np.float64) for k, v in t.items()}

    tree = TreeConfig(top_k=2, depth=4, total_tokens=9)
    m, n_new = 6, 4
    ids = padded_ids(rng, m)
    feats = rng.standard_normal((m, CFG.hidden_size)).astype(np.float32)
    cache = init_cache(D.draft_model_config(CFG, dcfg), SLOTS, device=acc)
    tokens, parents, _ = run_draft((dcfg, params, shared), cache, ids, n_new, tree, feats)

    @functools.cache
    def output(path: tuple[int, ...]) -> np.ndarray:
        """The draft's output at the pair of the last node of `path` (the root for an empty path)."""
        if not path:
            return np_dgf_draft(t64, embed, feats[:n_new].astype(np.float64), ids[:n_new].tolist())[-1]
        f = np.concatenate([feats[:n_new].astype(np.float64)] + [output(path[:j])[None] for j in range(len(path))])
        return np_dgf_draft(t64, embed, f, ids[:n_new].tolist() + list(path))[-1]

    def dist(path: tuple[int, ...]) -> np.ndarray:
        logits = head @ output(path)
        return logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())

    want = eagle2_reference(dist, 2, 4, 9, root=int(ids[n_new - 1]))
    assert (tokens.tolist(), parents.tolist()) == want


# --------------------------------------------------------------------------------------------- select_nodes


def ref_select(scores: np.ndarray, parents: np.ndarray, n: int) -> tuple[list[int], list[int]]:
    order = np.lexsort((np.arange(len(scores)), -scores))  # score descending, then index ascending (stable)
    sel = sorted(order[:n].tolist())
    return sel, [0 if parents[j] < 0 else sel.index(int(parents[j])) + 1 for j in sel]


@functools.partial(jax.jit, static_argnums=2)
def _select(scores, parents, n):
    return select_nodes(scores, parents, n)


def random_pool(rng: np.random.Generator, size: int, roots: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """An ancestor-closed pool like the drafter's: `roots` level-1 nodes, then children of earlier nodes whose
    integer score is the parent's minus 0..step (so exact ties, parent/child ties included, are common)."""
    parents = np.full(size, -1, np.int32)
    scores = np.zeros(size, np.float32)
    scores[:roots] = -rng.integers(0, step + 1, roots)
    for j in range(roots, size):
        parents[j] = rng.integers(0, j)
        scores[j] = scores[parents[j]] - rng.integers(0, step + 1)
    return scores, parents


@pytest.mark.parametrize("n", [1, 5, 13, 29, 30])
@pytest.mark.parametrize("step", [0, 1, 3])
def test_select_nodes_matches_numpy(n, step):
    rng = np.random.default_rng(100 * n + step)
    for _ in range(4):
        scores, parents = random_pool(rng, 30, 3, step)
        sel, node_parent = _select(jnp.asarray(scores), jnp.asarray(parents), n)
        want_sel, want_par = ref_select(scores, parents, n)
        assert np.asarray(sel).tolist() == want_sel
        assert np.asarray(node_parent).tolist() == want_par


def test_select_nodes_hand_made_ties():
    #                  0    1    2    3    4    5    6    7
    scores = np.array([-1., -1., -2., -1., -3., -2., -1., -2.], np.float32)
    parents = np.array([-1, -1, -1, +0, +2, +1, +3, +1], np.int32)
    sel, par = _select(jnp.asarray(scores), jnp.asarray(parents), 5)
    # ranked: 0, 1, 3, 6 (all -1, by index), then the -2's by index: 2
    assert np.asarray(sel).tolist() == [0, 1, 2, 3, 6]
    assert np.asarray(par).tolist() == [0, 0, 0, 1, 4]
    sel, par = _select(jnp.asarray(scores), jnp.asarray(parents), 6)
    assert np.asarray(sel).tolist() == [0, 1, 2, 3, 5, 6]
    assert np.asarray(par).tolist() == [0, 0, 0, 1, 2, 4]


def test_empty_cache_path_gives_the_same_tree(lm):
    """The prompt's first tree skips attending over the (empty) cache: same tree and stable K/V."""
    _, _, draft = lm
    dcfg, params, shared = draft
    tree = TreeConfig(top_k=2, depth=3, total_tokens=7)
    ids = padded_ids(np.random.default_rng(9), 6)
    tokens, parents, stable = run_draft(draft, none_cache(), ids, 4, tree)
    put = functools.partial(jax.device_put, device=devices.accelerator_device())
    feats = np.random.default_rng(6 * 7 + 4).standard_normal((6, CFG.hidden_size)).astype(np.float32)
    fast = jax.jit(functools.partial(draft_tree, cfg=CFG, dcfg=dcfg, tree=tree, empty_cache=True))
    t2, p2, s2 = fast(params, shared, none_cache(), put(feats[None]), put(ids[None]), put(np.int32(4)))
    assert np.asarray(t2).tolist() == tokens.tolist() and np.asarray(p2).tolist() == parents.tolist()
    for a, b in zip(jax.tree.leaves(s2), jax.tree.leaves(stable), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def _step(dcfg: DraftConfig, tree: TreeConfig, empty_cache: bool = False):
    return jax.jit(functools.partial(draft_step, cfg=CFG, dcfg=dcfg, tree=tree, empty_cache=empty_cache),
                   donate_argnames=("cache",))


@pytest.mark.parametrize("empty", [True, False])
def test_draft_step_is_draft_tree_then_append(lm, empty):
    """`draft_step` (the decode loop's one program per cycle, cache donated) = `draft_tree`, then `append` of
    its valid stable rows: the same tree, the same cache afterwards."""
    _, _, draft = lm
    dcfg, params, shared = draft
    tree = TreeConfig(top_k=2, depth=3, total_tokens=7)
    rng = np.random.default_rng(40)
    put = functools.partial(jax.device_put, device=devices.accelerator_device())
    cache = none_cache()
    if not empty:  # a cache holding 5 accepted pairs
        _, _, stable = run_draft(draft, cache, padded_ids(rng, 6), 5, tree)
        cache = append(cache, stable, 5)
    ids = padded_ids(rng, 6)
    feats = put(rng.standard_normal((1, 6, CFG.hidden_size)).astype(np.float32))
    args = (feats, put(ids[None]), put(np.int32(4)))
    tokens, parents, stable = jitted(dcfg, tree)(params, shared, cache, *args)
    want = jax.device_get(append(cache, stable, 4))
    copy = jax.tree.map(lambda x: put(np.asarray(x)), cache)  # draft_step consumes its cache
    t2, p2, got = _step(dcfg, tree, empty)(params, shared, copy, *args)
    assert np.asarray(t2).tolist() == np.asarray(tokens).tolist()
    assert np.asarray(p2).tolist() == np.asarray(parents).tolist()
    assert int(got.length) == int(want.length) == (4 if empty else 9)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


def test_draft_step_writes_the_cache_in_place(lm):
    """The compiled `draft_step` holds no copy of a cache buffer: the write is ordered after every read of the
    cache, so the donated buffers are updated in place (a copy would cost the whole cache every cycle), by XLA or
    by the KV-write kernel."""
    _, _, draft = lm
    dcfg, params, shared = draft
    put = functools.partial(jax.device_put, device=devices.accelerator_device())
    cache = none_cache()
    hlo = _step(dcfg, TreeConfig(top_k=2, depth=3, total_tokens=7)).lower(
        params, shared, cache, put(np.zeros((1, 6, CFG.hidden_size), np.float32)), put(np.zeros((1, 6), np.int32)),
        put(np.int32(4))).compile().as_text()
    shape = re.escape(f"f32[1,{CFG.num_kv_heads},{SLOTS},{CFG.head_dim}]")
    # the write: XLA's in-place update, or one `kernels.kv_write` call with the caches aliased to its results
    assert (re.search(rf"= {shape}\{{[0-9,]+\}} dynamic-update-slice|= {shape}\{{[0-9,]+\}} fusion", hlo)
            or 'custom_call_target="dovetail_kv_write"' in hlo)
    copies = [line for line in hlo.splitlines() if re.search(rf"= {shape}\{{[0-9,]+\}} copy\(", line)]
    assert not copies, copies
