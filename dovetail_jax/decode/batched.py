"""Batched greedy generation over left-padded prompts: the target answering many prompts at once.

This is how the draft's training data is made (self-distillation): one decode step for B rows reads the
weights once, so B answers cost little more than one on a memory-bound CPU. Rows are left-padded to one
length; a `[B, P, P]` prefill mask and per-row `kv_start` hide the pads, and each row's RoPE positions
start at 0 at its first real token, so every row computes what a lone prompt would (to float rounding).
Rows that finish early keep stepping (their extra tokens are dropped); the batch stops when all rows
have met an EOS or `max_new_tokens`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dovetail_jax.config import ModelConfig
from dovetail_jax.errors import ConfigError
from dovetail_jax.model import cache as cache_lib
from dovetail_jax.model.cache import KVCache, init_cache
from dovetail_jax.model.params import TargetParams
from dovetail_jax.model.target import causal_mask, forward
from dovetail_jax.plan import batch_sizes
from dovetail_jax.speculation import sampling

PAD_ID = 0


def _prefill(params: TargetParams, cache: KVCache, tokens: jax.Array, start: jax.Array, *, cfg: ModelConfig):
    # tokens [B, P] left-padded; start [B] = first real index of each row
    b, p = tokens.shape
    idx = jnp.arange(p, dtype=jnp.int32)
    positions = jnp.maximum(idx[None, :] - start[:, None], 0)
    mask = causal_mask(p)[None] & (idx[None, None, :] >= start[:, None, None])  # [B, P, P]
    logits, _, update = forward(params, cfg, tokens, positions, mask, cache, "last", p - 1, empty_cache=True)
    return sampling.greedy(logits), update


def _step(params: TargetParams, cache: KVCache, tok: jax.Array, start: jax.Array, *, cfg: ModelConfig):
    positions = (cache.length - start)[:, None]  # [B, 1]
    logits, _, update = forward(params, cfg, tok[:, None], positions, jnp.ones((1, 1), bool), cache, "last", 0,
                                kv_start=start)
    return sampling.greedy(logits), update


@functools.cache
def _jitted(cfg: ModelConfig):
    return (jax.jit(functools.partial(_prefill, cfg=cfg)), jax.jit(functools.partial(_step, cfg=cfg)),
            jax.jit(cache_lib.append, donate_argnames=("cache",)))


def generate_greedy_batch(params: TargetParams, cfg: ModelConfig, prompts: Sequence[Sequence[int]],
                          max_new_tokens: int, eos_ids: Sequence[int]) -> list[list[int]]:
    """Greedy answers of the target to `prompts` (one batch), each cut after its first EOS (kept)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt of a batch must have at least one token")
    if max_new_tokens <= 0:
        raise ConfigError(f"max_new_tokens must be positive, got {max_new_tokens}")
    b = len(prompts)
    p, slots = batch_sizes(max(len(x) for x in prompts), max_new_tokens)
    if p + max_new_tokens > cfg.max_position_embeddings:
        raise ConfigError(f"prompt bucket {p} + {max_new_tokens} new tokens exceeds the context "
                          f"({cfg.max_position_embeddings})")
    tokens = np.full((b, p), PAD_ID, np.int32)
    start = np.zeros(b, np.int32)
    for i, x in enumerate(prompts):
        tokens[i, p - len(x):] = x
        start[i] = p - len(x)
    pre, step, app = _jitted(cfg)
    cache = init_cache(cfg, slots, batch=b)
    start_d = jnp.asarray(start)
    tok, update = pre(params, cache, jnp.asarray(tokens), start_d)
    cache = app(cache, update)
    eos = np.asarray(list(eos_ids), np.int32)
    out = np.zeros((b, max_new_tokens), np.int32)
    done = np.zeros(b, bool)
    for t in range(max_new_tokens):
        host = np.asarray(tok)
        out[:, t] = host
        done |= np.isin(host, eos)
        if done.all() or t == max_new_tokens - 1:
            break
        tok, update = step(params, cache, tok, start_d)
        cache = app(cache, update)
    answers = []
    for row in out[:, : t + 1]:
        hits = np.flatnonzero(np.isin(row, eos))
        answers.append(row[: hits[0] + 1].tolist() if hits.size else row.tolist())
    return answers
