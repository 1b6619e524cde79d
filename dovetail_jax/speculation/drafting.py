"""EAGLE-2's dynamic token tree, drafted on the draft's device in one jitted call per cycle.

One call (`draft_tree`) runs:
1. the *stable* step: the draft over the M newly accepted (feature, next token) pairs, on top of its cache of
   accepted context. Its K/V is returned, not written: the caller appends the valid rows (donated cache), so
   tree expansions never pollute the cache;
2. level 1: the root's `top_k` children, scored by the draft's log-probability;
3. `depth` expansions: one draft forward over the `top_k` frontier nodes (all at the same position, each seeing
   the stable pairs and its own ancestors among earlier frontier nodes, through `lead` keys that live only in
   this call), `top_k` children per node, every child's cumulative log-probability (EAGLE-2's node value)
   added to the candidate pool, and the `top_k` best children as the next frontier;
4. reranking: the best `total_tokens - 1` candidates by value (ties to the earlier candidate), re-sorted into
   pool order. A child's value never exceeds its parent's and parents come first in the pool, so the set is
   ancestor-closed and parents precede children.

The same bound makes an expansion useless when the pool's `total_tokens - 1`-th best value is already at least
every frontier node's value: none of its descendants could enter the selection (a tie goes to the earlier
candidate), so it and all later ones are skipped (`lax.cond`; their children get value -inf). The tree is
exactly the one the full expansion gives; the draft just stops early when it is unsure beyond the first levels.

The result is the tree as two small arrays, `tokens [T]` (root first) and `parents [T]` (root -1): the only
thing that goes back to the target's device. Shapes depend only on (M, tree config), so there is one
compilation per configuration plus one per prompt bucket for the first tree.

`draft_step` is what the decode loop runs: `draft_tree` and the append of the stable K/V in one program, with
the cache donated (one dispatch per cycle instead of two; the append writes in place after the last read).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dovetail_jax.config import DraftConfig, ModelConfig, TreeConfig
from dovetail_jax.model import cache as cache_lib
from dovetail_jax.model import draft as D
from dovetail_jax.model.cache import KVCache, KVUpdate


def _concat(a: KVUpdate, b: KVUpdate) -> KVUpdate:
    return KVUpdate(k=tuple(jnp.concatenate([x, y], axis=1) for x, y in zip(a.k, b.k, strict=True)),
                    v=tuple(jnp.concatenate([x, y], axis=1) for x, y in zip(a.v, b.v, strict=True)))


def _no_children(cfg: ModelConfig, layers: int, k: int) -> tuple[jax.Array, KVUpdate, jax.Array, jax.Array]:
    """What a skipped expansion yields: children of log-probability -inf (never selected), zero outputs and K/V."""
    kv = tuple(jnp.zeros((1, k, cfg.num_kv_heads, cfg.head_dim), jnp.float32) for _ in range(layers))
    return (jnp.zeros((1, k, cfg.hidden_size), jnp.float32), KVUpdate(k=kv, v=kv),
            jnp.full((k, k), -jnp.inf, jnp.float32), jnp.zeros((k, k), jnp.int32))


def select_nodes(scores: jax.Array, parents: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """The `n` best pool candidates (by score, ties to the lower index), in pool order, and each one's parent
    as an index into [root] + selection (0 = root). `parents` holds pool indices, -1 for the root."""
    idx = jnp.arange(scores.shape[0], dtype=jnp.int32)
    _, order = jax.lax.sort((-scores, idx), num_keys=2)  # score descending, then pool index ascending
    sel = jnp.sort(order[:n])
    pp = jnp.take(parents, sel)
    node_parent = jnp.where(pp < 0, 0, jnp.searchsorted(sel, pp).astype(jnp.int32) + 1)
    return sel, node_parent


def draft_tree(
    params: D.DraftParams,
    shared: D.DraftShared,
    cache: KVCache,
    feats: jax.Array,  # [1, M, H] target features of the accepted tokens (root of the cycle first)
    ids: jax.Array,  # [1, M] int32: the token after each feature; ids[0, n_new - 1] is the new root
    n_new: jax.Array,  # int32 scalar: valid pairs (1..M); the rest is padding
    *,
    cfg: ModelConfig,
    dcfg: DraftConfig,
    tree: TreeConfig,
    empty_cache: bool = False,
) -> tuple[jax.Array, jax.Array, KVUpdate]:
    """Draft one tree. Returns (tokens [T] int32, parents [T] int32, the stable pairs' K/V to append).
    `empty_cache=True` (static; the prompt's first tree) skips attending over the still empty cache."""
    m = feats.shape[1]
    k, depth, t = tree.top_k, tree.depth, tree.total_tokens
    start = cache.length
    positions = (start + jnp.arange(m, dtype=jnp.int32))[None]
    hidden, stable = D.forward(params, shared, cfg, dcfg, feats, ids, positions, jnp.tril(jnp.ones((m, m), bool)),
                               cache, empty_cache=empty_cache)
    last = n_new - 1
    root = jnp.take(ids[0], last)
    out = jnp.take(hidden[0], last, axis=0)  # [H]: the draft's guess of the root's feature

    top_lp, top_ids = D.top_log_probs(shared, out, k)  # [k]
    pool_tok = [D.to_target_ids(shared, top_ids)]
    pool_score = [top_lp]
    pool_parent = [jnp.full((k,), -1, jnp.int32)]
    f_tok, f_h, f_score = pool_tok[0], jnp.broadcast_to(out, (k, out.shape[-1])), top_lp
    f_pool = jnp.arange(k, dtype=jnp.int32)  # pool index of each frontier node
    anc = jnp.eye(k, dtype=bool)  # [k, k (i + 1)]: frontier node sees earlier frontier slot
    valid = jnp.broadcast_to(jnp.arange(m) < n_new, (k, m))  # the stable pairs every node sees
    lead = stable
    base = k
    for i in range(depth):
        pos = jnp.broadcast_to(start + n_new + i, (1, k)).astype(jnp.int32)
        mask = jnp.concatenate([valid, anc], axis=1)

        def expand(f_h=f_h, f_tok=f_tok, pos=pos, mask=mask, lead=lead):
            h, upd = D.forward(params, shared, cfg, dcfg, f_h[None], f_tok[None], pos, mask, cache, lead,
                               empty_cache)
            return (h, upd, *D.top_log_probs(shared, h[0], k))  # lp, child [k, k]

        if 1 < t <= base + 1:  # the pool already holds a full selection: expand only if a child could enter it
            cut = jax.lax.top_k(jnp.concatenate(pool_score), t - 1)[0][-1]
            h, upd, lp, child = jax.lax.cond(cut >= jnp.max(f_score), functools.partial(_no_children, cfg,
                                             len(params.layers), k), expand)
        else:
            h, upd, lp, child = expand()
        value = (f_score[:, None] + lp).reshape(-1)  # [k^2]: cumulative log-probability
        pool_tok.append(D.to_target_ids(shared, child).reshape(-1))
        pool_score.append(value)
        pool_parent.append(jnp.repeat(f_pool, k))
        if i + 1 < depth:  # the next frontier: the k best children
            f_score, best = jax.lax.top_k(value, k)
            row = best // k
            f_tok = pool_tok[-1][best]
            f_h = h[0][row]
            f_pool = (base + best).astype(jnp.int32)
            anc = jnp.concatenate([anc[row], jnp.eye(k, dtype=bool)], axis=1)
            lead = _concat(lead, upd)
        base += k * k

    tokens = root[None].astype(jnp.int32)
    parents = jnp.full((1,), -1, jnp.int32)
    if t > 1:
        sel, node_parent = select_nodes(jnp.concatenate(pool_score), jnp.concatenate(pool_parent), t - 1)
        tokens = jnp.concatenate([tokens, jnp.take(jnp.concatenate(pool_tok), sel).astype(jnp.int32)])
        parents = jnp.concatenate([parents, node_parent])
    return tokens, parents, stable


def draft_step(
    params: D.DraftParams,
    shared: D.DraftShared,
    cache: KVCache,
    feats: jax.Array,  # [1, M, H]
    ids: jax.Array,  # [1, M] int32
    n_new: jax.Array,  # int32 scalar: valid pairs (1..M)
    *,
    cfg: ModelConfig,
    dcfg: DraftConfig,
    tree: TreeConfig,
    empty_cache: bool = False,
) -> tuple[jax.Array, jax.Array, KVCache]:
    """`draft_tree`, then its stable K/V appended to the draft cache (`n_new` valid rows). Returns (tokens [T],
    parents [T], the advanced cache). Jit it with `cache` donated so that the write happens in place."""
    tokens, parents, stable = draft_tree(params, shared, cache, feats, ids, n_new, cfg=cfg, dcfg=dcfg, tree=tree,
                                         empty_cache=empty_cache)
    # Every read of the cache feeds the tree, so making the write's offset depend on the tree (token ids are
    # never negative) orders the write after the reads and XLA updates the donated cache in place; unordered,
    # it copies each cache buffer twice (an optimization_barrier does not survive XLA CPU's passes).
    at = cache.replace(length=jnp.where(tokens[-1] >= 0, cache.length, 0))
    return tokens, parents, cache_lib.append(at, stable, n_new)
