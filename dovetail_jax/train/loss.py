"""The draft's training loss (EAGLE / Dovetail recipe): regress the next target feature, match the target's
next-token distribution through the frozen head, and report top-1 agreement with the target's greedy token.

For a sequence with target features f[0..n) and ids t[0..n), position i feeds (f[i], t[i+1]) to the draft,
which predicts f[i+1]; the head on that prediction is a guess of t[i+2]. The loss counts positions whose
prediction is a token of the answer (i >= prompt_len - 1), as at inference time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from dovetail_jax.config import DraftConfig, ModelConfig
from dovetail_jax.model import draft as D
from dovetail_jax.model import layers as L
from dovetail_jax.model.cache import KVCache
from dovetail_jax.model.target import causal_mask


@struct.dataclass
class Batch:
    feats: jax.Array  # [B, T+1, H] target features (f32)
    ids: jax.Array  # [B, T+1] int32 token ids
    argmax: jax.Array  # [B, T+1] int32 the target's greedy next token after each position
    mask: jax.Array  # [B, T] f32: 1 where position i's prediction is trained


def smooth_l1(x: jax.Array, y: jax.Array, beta: float = 1.0) -> jax.Array:
    d = jnp.abs(x - y)
    return jnp.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)


def _empty_cache(cfg: ModelConfig, dcfg: DraftConfig, b: int) -> KVCache:
    z = jnp.zeros((b, cfg.num_kv_heads, 1, cfg.head_dim), jnp.float32)  # never read (empty_cache)
    return KVCache(k=(z,) * dcfg.num_layers, v=(z,) * dcfg.num_layers, length=jnp.zeros((), jnp.int32))


def losses(params: D.DraftParams, shared: D.DraftShared, batch: Batch, key: jax.Array | None, *,
           cfg: ModelConfig, dcfg: DraftConfig, noise: float = 0.2, p_weight: float = 0.1
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(total loss, metrics); `key=None` or `noise=0` trains on clean features."""
    f_in, f_next = batch.feats[:, :-1], batch.feats[:, 1:]
    b, t, _ = f_in.shape
    if key is not None and noise > 0:
        f_in = f_in + noise * (jax.random.uniform(key, f_in.shape) - 0.5)  # EAGLE's uniform feature noise
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    pred, _ = D.forward(params, shared, cfg, dcfg, f_in, batch.ids[:, 1:], positions, causal_mask(t),
                        _empty_cache(cfg, dcfg, b), empty_cache=True)
    m = batch.mask
    denom = jnp.maximum(m.sum(), 1.0)
    vloss = (m * smooth_l1(pred, f_next).mean(-1)).sum() / denom
    target_p = jax.nn.softmax(L.linear(jax.lax.stop_gradient(f_next), shared.head), -1)  # over the draft vocab
    log_q = jax.nn.log_softmax(L.linear(pred, shared.head), -1)
    ploss = -(m * (target_p * log_q).sum(-1)).sum() / denom
    guess = D.to_target_ids(shared, jnp.argmax(log_q, -1))
    top1 = (m * (guess == batch.argmax[:, 1:])).sum() / denom
    total = vloss + p_weight * ploss
    return total, {"loss": total, "vloss": vloss, "ploss": ploss, "top1": top1, "positions": m.sum()}
