"""Plain autoregressive decoding with the target alone: the baseline every speedup is measured against.

Prefill and the decode step are each compiled once per (model, cache size, prompt bucket, greedy or
sampling) and reused; the KV cache is donated so its update is in place. The loop dispatches step i+1
before it reads token i back to the host, so Python bookkeeping and streaming overlap the device work.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from dovetail_jax import devices
from dovetail_jax.config import ModelConfig, SamplingConfig
from dovetail_jax.decode.stats import GenerationStats
from dovetail_jax.errors import ConfigError
from dovetail_jax.model.cache import KVCache, init_cache
from dovetail_jax.model.params import TargetParams
from dovetail_jax.model.target import causal_mask, forward
from dovetail_jax.spec import sampling

MIN_PROMPT_BUCKET = 16
MIN_CACHE_SLOTS = 128


def _next_pow2(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(0, (n - 1).bit_length()))


def plan_sizes(cfg: ModelConfig, prompt_len: int, max_new_tokens: int) -> tuple[int, int]:
    """(prompt bucket, cache slots): powers of two, so few distinct shapes are ever compiled."""
    if prompt_len <= 0:
        raise ConfigError("the prompt is empty (it encodes to no tokens)")
    if max_new_tokens <= 0:
        raise ConfigError(f"max_new_tokens must be positive, got {max_new_tokens}")
    limit = cfg.max_position_embeddings
    if prompt_len + max_new_tokens > limit:
        raise ConfigError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = {prompt_len + max_new_tokens} "
            f"exceeds the model's context of {limit} tokens"
        )
    slots = min(_next_pow2(prompt_len + max_new_tokens, MIN_CACHE_SLOTS), limit)
    bucket = min(_next_pow2(prompt_len, MIN_PROMPT_BUCKET), slots)
    return bucket, slots


def _pick(logits: jax.Array, key: jax.Array, s: tuple[jax.Array, jax.Array, jax.Array], greedy: bool):
    if greedy:
        return sampling.greedy(logits), key
    key, sub = jax.random.split(key)
    return sampling.sample(sub, logits, *s).astype(jnp.int32), key


def _prefill(params: TargetParams, cache: KVCache, tokens: jax.Array, n_real: jax.Array, key: jax.Array,
             s: tuple[jax.Array, jax.Array, jax.Array], *, cfg: ModelConfig, greedy: bool):
    # tokens [1, P] right-padded; causal mask keeps pads from touching real tokens
    p = tokens.shape[1]
    positions = (cache.length + jnp.arange(p, dtype=jnp.int32))[None, :]
    logits, _, cache = forward(params, cfg, tokens, positions, causal_mask(p), cache, "last", n_real - 1)
    cache = cache.replace(length=cache.length + n_real)
    tok, key = _pick(logits, key, s, greedy)
    return tok, cache, key


def _decode_step(params: TargetParams, cache: KVCache, tok: jax.Array, key: jax.Array,
                 s: tuple[jax.Array, jax.Array, jax.Array], *, cfg: ModelConfig, greedy: bool):
    positions = jnp.reshape(cache.length, (1, 1))
    logits, _, cache = forward(params, cfg, tok[:, None], positions, jnp.ones((1, 1), bool), cache, "last", 0)
    cache = cache.replace(length=cache.length + 1)
    tok, key = _pick(logits, key, s, greedy)
    return tok, cache, key


@functools.cache
def _jitted(cfg: ModelConfig, greedy: bool):
    pre = jax.jit(functools.partial(_prefill, cfg=cfg, greedy=greedy), donate_argnames=("cache",))
    dec = jax.jit(functools.partial(_decode_step, cfg=cfg, greedy=greedy), donate_argnames=("cache",))
    return pre, dec


@dataclass
class _Compiled:
    prefill: Callable
    decode: Callable
    compile_s: float


_compiled: dict[tuple, _Compiled] = {}


def _compile(params: TargetParams, cfg: ModelConfig, bucket: int, slots: int, greedy: bool,
             device: jax.Device) -> _Compiled:
    """AOT-compile prefill and decode for these shapes (persistent cache makes repeats cheap)."""
    key_ = (id(params), cfg, bucket, slots, greedy, device)
    if key_ in _compiled:
        return _Compiled(_compiled[key_].prefill, _compiled[key_].decode, 0.0)
    t0 = time.perf_counter()
    pre, dec = _jitted(cfg, greedy)
    cache = jax.eval_shape(lambda: init_cache(cfg, slots))
    sds = jax.ShapeDtypeStruct
    sh = jax.sharding.SingleDeviceSharding(device)
    cache = jax.tree.map(lambda x: sds(x.shape, x.dtype, sharding=sh), cache)
    key = sds((2,), jnp.uint32, sharding=sh)
    scal = (sds((), jnp.float32, sharding=sh), sds((), jnp.int32, sharding=sh), sds((), jnp.float32, sharding=sh))
    pre_c = pre.lower(params, cache, sds((1, bucket), jnp.int32, sharding=sh), sds((), jnp.int32, sharding=sh),
                      key, scal).compile()
    dec_c = dec.lower(params, cache, sds((1,), jnp.int32, sharding=sh), key, scal).compile()
    out = _Compiled(pre_c, dec_c, time.perf_counter() - t0)
    _compiled[key_] = out
    return out


def generate(
    params: TargetParams,
    cfg: ModelConfig,
    prompt_ids: list[int],
    max_new_tokens: int,
    sampling_cfg: SamplingConfig = SamplingConfig(),
    eos_ids: tuple[int, ...] = (),
    on_token: Callable[[int], None] | None = None,
    ignore_eos: bool = False,
) -> tuple[list[int], GenerationStats]:
    """Generate up to `max_new_tokens` after `prompt_ids`; stop at an EOS id unless `ignore_eos`.

    `on_token` is called with each new token id as soon as it is on the host (for streaming).
    Returns the new token ids (EOS included when it ended the generation) and the statistics.
    """
    device = devices.target_device()
    bucket, slots = plan_sizes(cfg, len(prompt_ids), max_new_tokens)
    greedy = sampling_cfg.greedy
    comp = _compile(params, cfg, bucket, slots, greedy, device)

    put = functools.partial(jax.device_put, device=device)
    cache = init_cache(cfg, slots, device=device)
    padded = np.zeros((1, bucket), np.int32)
    padded[0, : len(prompt_ids)] = prompt_ids
    s = (put(np.float32(max(sampling_cfg.temperature, 1e-6))), put(np.int32(sampling_cfg.top_k)),
         put(np.float32(sampling_cfg.top_p)))
    key = put(jax.random.key_data(jax.random.key(sampling_cfg.seed)))
    eos = set() if ignore_eos else set(eos_ids)

    t0 = time.perf_counter()
    tok, cache, key = comp.prefill(params, cache, put(padded), put(np.int32(len(prompt_ids))), key, s)
    tok.block_until_ready()
    t1 = time.perf_counter()

    out: list[int] = []
    stop = "length"
    while True:
        nxt = None
        if len(out) + 1 < max_new_tokens:  # dispatch the next step before reading this token
            nxt, cache, key = comp.decode(params, cache, tok, key, s)
        t = int(tok[0])
        out.append(t)
        if on_token is not None:
            on_token(t)
        if t in eos:
            stop = "eos"
            break
        if nxt is None:
            break
        tok = nxt
    if nxt is not None:
        nxt.block_until_ready()  # the step dispatched past EOS: wait, so timings stay honest
    t2 = time.perf_counter()
    stats = GenerationStats(
        mode="target", prompt_tokens=len(prompt_ids), new_tokens=len(out), stop_reason=stop,
        compile_s=comp.compile_s, prefill_s=t1 - t0, decode_s=t2 - t1, decode_steps=len(out) - 1,
        extra={"cache_slots": slots, "prompt_bucket": bucket},
    )
    return out, stats
