"""The draft's training loss: regress the next target feature, match the target's next-token distribution
through the frozen head, and report top-1 agreement with the target's greedy token, at every unrolled step.

For a sequence with target features f[0..n) and ids t[0..n), position i feeds (f[i], t[i+1]) to the draft,
which predicts f[i+1]; the head on that prediction is a guess of t[i+2]. The loss counts positions whose
prediction is a token of the answer (i >= prompt_len - 1), as at inference time.

**Training-time test** (EAGLE-3, HASS): at depth d of a tree the draft reads its *own* depth d-1 output, not
a target feature, and attends to real context plus its own earlier guesses. Step k of the unroll reproduces
that for every position at once: position i feeds (step k-1's output at i-1, t[i+1]) and attends to step-1
keys up to i-k+1 (the real context), to step m's key at i-(k-m) for 1 < m < k (its own chain) and to itself:
exactly what the tree's depth-k node sees (`speculation/drafting.py`), so step k's top-1 is the draft's
depth-k agreement on the target's path. Step k's loss weighs `decay**(k-1)`.

The soft cross-entropy is taken over the draft vocabulary; with `mask_oov` positions whose greedy target
token lies outside it (a certain miss whatever the draft does) are left out of it and of top-1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from dovetail_jax.config import DraftConfig, ModelConfig
from dovetail_jax.model import draft as D
from dovetail_jax.model import layers as L
from dovetail_jax.model.cache import KVCache, KVUpdate
from dovetail_jax.model.target import causal_mask


@struct.dataclass
class Batch:
    feats: jax.Array  # [B, T+1, H] target features (f32): the regression targets, and the inputs by default
    ids: jax.Array  # [B, T+1] int32 token ids
    argmax: jax.Array  # [B, T+1] int32 the target's greedy next token after each position
    mask: jax.Array  # [B, T] f32: 1 where position i's prediction is trained
    taps: jax.Array | None = None  # [B, T+1, k H] multi-layer features: the inputs of a `feature_layers` draft


def smooth_l1(x: jax.Array, y: jax.Array, beta: float = 1.0) -> jax.Array:
    d = jnp.abs(x - y)
    return jnp.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)


def _empty_cache(cfg: ModelConfig, dcfg: DraftConfig, b: int) -> KVCache:
    z = jnp.zeros((b, cfg.num_kv_heads, 1, cfg.head_dim), jnp.float32)  # never read (empty_cache)
    return KVCache(k=(z,) * dcfg.num_layers, v=(z,) * dcfg.num_layers, length=jnp.zeros((), jnp.int32))


def unroll_mask(t: int, k: int) -> jax.Array:
    """`[t, k t]` bool: what step k's query i sees among the keys of steps 1..k (blocks of t, step order)."""
    i = jnp.arange(t)[:, None]
    j = jnp.arange(t)[None, :]
    blocks = [j <= i - k + 1] + [j == i - (k - m) for m in range(2, k + 1)]
    return jnp.concatenate(blocks, axis=1)


def _concat(a: KVUpdate | None, b: KVUpdate) -> KVUpdate:
    if a is None:
        return b
    return KVUpdate(k=tuple(jnp.concatenate([x, y], axis=1) for x, y in zip(a.k, b.k, strict=True)),
                    v=tuple(jnp.concatenate([x, y], axis=1) for x, y in zip(a.v, b.v, strict=True)))


def unroll(params: D.DraftParams, shared: D.DraftShared, feats: jax.Array, tokens: jax.Array, steps: int, *,
           cfg: ModelConfig, dcfg: DraftConfig) -> list[jax.Array]:
    """The draft's outputs `[B, T, H]` at steps 1..`steps` over `feats [B, T, H]` (`[B, T, k H]` for a draft with
    feature layers: step 1 reads them, later steps the draft's own `H`-wide outputs) and `tokens [B, T]`."""
    b, t, _ = feats.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cache = _empty_cache(cfg, dcfg, b)
    outs: list[jax.Array] = []
    lead: KVUpdate | None = None
    x = feats
    for k in range(1, steps + 1):
        mask = causal_mask(t) if k == 1 else unroll_mask(t, k)
        pred, upd = D.forward(params, shared, cfg, dcfg, x, tokens, positions, mask, cache, lead, empty_cache=True)
        outs.append(pred)
        lead = _concat(lead, upd)
        # position i reads step k's guess at i-1; position 0 (out of every later step's loss, and seen only by
        # positions out of it) keeps its target feature, or zeros when that is wider than an output
        first = feats[:, :1] if feats.shape[-1] == pred.shape[-1] else jnp.zeros_like(pred[:, :1])
        x = jnp.concatenate([first, pred[:, :-1]], axis=1)
    return outs


def losses(params: D.DraftParams, shared: D.DraftShared, batch: Batch, key: jax.Array | None, *,
           cfg: ModelConfig, dcfg: DraftConfig, noise: float = 0.2, p_weight: float = 0.1, v_weight: float = 1.0,
           steps: int = 1, decay: float = 0.8, mask_oov: bool = False, report_steps: int = 0
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(total loss over `steps` unrolled steps, metrics); `key=None` or `noise=0` trains on clean features.
    Metrics without a suffix are step 1's (the plain next-token guess); `top1_k` is step k's top-1 for
    k >= 2, up to `max(steps, report_steps)` (steps beyond `steps` are measured, not in the loss)."""
    f_in = (batch.taps if dcfg.feature_layers else batch.feats)[:, :-1]  # a feature-layers draft reads the taps
    f_next = batch.feats[:, 1:]
    b, t, _ = f_in.shape
    if key is not None and noise > 0:
        f_in = f_in + noise * (jax.random.uniform(key, f_in.shape) - 0.5)  # EAGLE's uniform feature noise
    target_p = jax.nn.softmax(L.linear(jax.lax.stop_gradient(f_next), shared.head), -1)  # over the draft vocab
    greedy = batch.argmax[:, 1:]
    m = batch.mask
    if mask_oov and shared.vocab_map is not None:
        member = jnp.zeros((cfg.vocab_size,), bool).at[shared.vocab_map].set(True)
        m = m * jnp.take(member, greedy)
    total = jnp.zeros((), jnp.float32)
    metrics: dict[str, jax.Array] = {}
    outs = unroll(params, shared, f_in, batch.ids[:, 1:], max(steps, report_steps), cfg=cfg, dcfg=dcfg)
    for k, pred in enumerate(outs, 1):
        mk = m * (jnp.arange(t) >= k - 1)  # step k needs k-1 earlier positions
        dk = jnp.maximum(mk.sum(), 1.0)
        vloss = (mk * smooth_l1(pred, f_next).mean(-1)).sum() / dk
        log_q = jax.nn.log_softmax(L.linear(pred, shared.head), -1)
        ploss = -(mk * (target_p * log_q).sum(-1)).sum() / dk
        top1 = (mk * (D.to_target_ids(shared, jnp.argmax(log_q, -1)) == greedy)).sum() / dk
        if k <= steps:
            total = total + decay ** (k - 1) * (v_weight * vloss + p_weight * ploss)
        if k == 1:
            metrics |= {"vloss": vloss, "ploss": ploss, "top1": top1}
        else:
            metrics[f"top1_{k}"] = top1
    metrics |= {"loss": total, "positions": m.sum()}
    return total, metrics
