"""Which draft tokens of a verified tree the target accepts, and the bonus token it emits after them.

Input is the tree (`tokens [T]`, `parents [T]`, see `tree.py`) and the target's logits at every node
(`logits [T, V]`: row i is the target's next-token distribution after the path root..i).

Greedy keeps the deepest path whose every token is the target's argmax. Sampling is EAGLE-2's recursive
rejection with deterministic proposals (q = a point mass): at the current node with residual p, children
are tried in index order, child x accepted with probability p[x]; on rejection p[x] is zeroed and p
renormalised. The emitted sequence is then distributed exactly as sampling the target token by token.
The logits processor is applied to every node's row, the bonus included.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from dovetail_jax.speculation import sampling, tree


@struct.dataclass
class Acceptance:
    node: jax.Array  # int32 scalar: deepest accepted node (0 = root: no draft token accepted)
    num_accepted: jax.Array  # int32 scalar a = depth of node (accepted draft tokens)
    bonus: jax.Array  # int32 scalar: the token the target emits after the accepted path
    path: jax.Array  # [W] int32: node indices root..node, padded with node (= paths[node])


def _acceptance(node: jax.Array, bonus: jax.Array, arrays: tree.TreeArrays) -> Acceptance:
    node = node.astype(jnp.int32)
    return Acceptance(node=node, num_accepted=arrays.depth[node], bonus=bonus.astype(jnp.int32),
                      path=arrays.paths[node])


def accept_greedy(tokens: jax.Array, parents: jax.Array, logits: jax.Array, width: int) -> Acceptance:
    """Deepest node whose whole path matches the target's argmax (ties: lowest index); bonus = argmax there."""
    g = sampling.greedy(logits)  # [T]
    ok = (tokens == g[jnp.maximum(parents, 0)]).at[0].set(True)  # [T] node agrees with its parent's argmax
    arrays = tree.tree_arrays(parents, width)
    accepted = jnp.all(~arrays.mask | ok[None, :], axis=1)  # [T] the whole root..i path agrees
    score = jnp.where(accepted, arrays.depth, -1)
    node = jnp.argmax(score)  # first maximum: the lowest index among equally deep nodes
    return _acceptance(node, g[node], arrays)


def _reject(p: jax.Array, x: jax.Array) -> jax.Array:
    """Residual after rejecting the deterministic proposal x: norm(max(p - onehot(x), 0)) = p without x.

    The guard only matters for a rejected point mass, which has probability zero (uniforms are < 1).
    """
    p = p.at[x].set(0.0)
    return p / jnp.maximum(jnp.sum(p), jnp.finfo(p.dtype).tiny)


def rejection_walk(
    tokens: jax.Array, parents: jax.Array, probs: jax.Array, uniforms: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One pass over the nodes in index order, trying each child of the current node against the residual.

    Parents precede children, so after moving to node j every child of j is still ahead; siblings are
    tried in index order. Returns (node, residual [V] at node, trial_p [T], tried [T]); trial_p[j] is the
    acceptance probability node j had (0 where not tried), so a test can weigh every decision pattern.
    """
    t = tokens.shape[0]

    def step(j, carry):
        cur, p, trial_p, tried = carry
        x = tokens[j]
        px = p[x]
        trial = parents[j] == cur
        acc = trial & (uniforms[j] < px)
        rej = trial & ~acc
        p = jnp.where(acc, probs[j], jnp.where(rej, _reject(p, x), p))
        cur = jnp.where(acc, j, cur)
        return cur, p, trial_p.at[j].set(jnp.where(trial, px, 0.0)), tried.at[j].set(trial)

    init = (jnp.int32(0), probs[0], jnp.zeros((t,), probs.dtype), jnp.zeros((t,), bool))
    node, residual, trial_p, tried = jax.lax.fori_loop(1, t, step, init)
    return node, residual, trial_p, tried


def accept_sampling(
    key: jax.Array,
    tokens: jax.Array,
    parents: jax.Array,
    logits: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    width: int,
    filtered: bool = True,
) -> Acceptance:
    """Lossless tree acceptance under the processed distribution (width and filtered static).

    filtered=False skips top-k/top-p (valid only when top_k == 0 and top_p == 1).
    """
    probs = sampling.processed_probs(logits, temperature, top_k, top_p, filtered=filtered)  # [T, V]
    k_walk, k_bonus = jax.random.split(key)
    uniforms = jax.random.uniform(k_walk, tokens.shape, probs.dtype)  # [T], entry 0 unused
    node, residual, _, _ = rejection_walk(tokens, parents, probs, uniforms)
    bonus = jax.random.categorical(k_bonus, jnp.log(residual))
    return _acceptance(node, bonus, tree.tree_arrays(parents, width))
