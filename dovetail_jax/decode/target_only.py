"""Plain autoregressive decoding with the target alone: the baseline every speedup is measured against.

Prefill and the decode step are each compiled once per (model, cache size, prompt bucket, greedy or
sampling) and reused. They only read the KV cache; a second small compiled call, with the cache donated,
writes the new K/V in place (see `model/cache.py` for why the write is a separate program). The loop dispatches step i+1
before it reads token i back to the host, so Python bookkeeping and streaming overlap the device work.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dovetail_jax import devices
from dovetail_jax.config import ModelConfig, SamplingConfig
from dovetail_jax.decode.stats import GenerationStats
from dovetail_jax.errors import ConfigError
from dovetail_jax.model import cache as cache_lib
from dovetail_jax.model.cache import KVCache, init_cache
from dovetail_jax.model.params import TargetParams
from dovetail_jax.model.target import causal_mask, forward
from dovetail_jax.speculation import sampling

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
    # tokens [1, P] right-padded; the causal mask keeps pads from touching real tokens
    p = tokens.shape[1]
    positions = (cache.length + jnp.arange(p, dtype=jnp.int32))[None, :]
    logits, _, update = forward(params, cfg, tokens, positions, causal_mask(p), cache, "last", n_real - 1,
                                empty_cache=True)  # generation always starts from a fresh cache
    tok, key = _pick(logits, key, s, greedy)
    return tok, update, key


def _decode_step(params: TargetParams, cache: KVCache, tok: jax.Array, key: jax.Array,
                 s: tuple[jax.Array, jax.Array, jax.Array], *, cfg: ModelConfig, greedy: bool):
    positions = jnp.reshape(cache.length, (1, 1))
    logits, _, update = forward(params, cfg, tok[:, None], positions, jnp.ones((1, 1), bool), cache, "last", 0)
    tok, key = _pick(logits, key, s, greedy)
    return tok, update, key


@functools.cache
def _jitted(cfg: ModelConfig, greedy: bool):
    """The forward steps read the cache; `append` (cache donated) writes their K/V in place."""
    pre = jax.jit(functools.partial(_prefill, cfg=cfg, greedy=greedy))
    dec = jax.jit(functools.partial(_decode_step, cfg=cfg, greedy=greedy))
    app = jax.jit(cache_lib.append, donate_argnames=("cache",))
    return pre, dec, app


@dataclass
class _Compiled:
    prefill: Callable
    decode: Callable
    append_prompt: Callable
    append_token: Callable
    compile_s: float


_compiled: dict[tuple, _Compiled] = {}


def _compile(params: TargetParams, cfg: ModelConfig, bucket: int, slots: int, greedy: bool,
             device: jax.Device) -> _Compiled:
    """AOT-compile prefill, decode and the cache writes for these shapes and run each once (the persistent
    cache makes repeats in a new process cheap); `compile_s` covers both."""
    key_ = (id(params), cfg, bucket, slots, greedy, device)
    if key_ in _compiled:
        return dataclasses.replace(_compiled[key_], compile_s=0.0)
    t0 = time.perf_counter()
    pre, dec, app = _jitted(cfg, greedy)
    sh = jax.sharding.SingleDeviceSharding(device)

    def spec(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)

    def on_device(tree: Any) -> Any:
        return jax.tree.map(lambda x: spec(x.shape, x.dtype), tree)

    cache = on_device(jax.eval_shape(lambda: init_cache(cfg, slots)))
    key = spec((2,), jnp.uint32)
    scal = (spec((), jnp.float32), spec((), jnp.int32), spec((), jnp.float32))
    n_real = spec((), jnp.int32)
    pre_l = pre.lower(params, cache, spec((1, bucket), jnp.int32), n_real, key, scal)
    dec_l = dec.lower(params, cache, spec((1,), jnp.int32), key, scal)
    upd_prompt = on_device(pre_l.out_info[1])
    upd_token = on_device(dec_l.out_info[1])
    out = _Compiled(
        prefill=pre_l.compile(),
        decode=dec_l.compile(),
        append_prompt=app.lower(cache, upd_prompt, n_real).compile(),
        append_token=app.lower(cache, upd_token).compile(),
        compile_s=0.0,
    )
    _warm_up(out, params, cfg, bucket, slots, device)
    out.compile_s = time.perf_counter() - t0
    _compiled[key_] = out
    return out


def _warm_up(comp: _Compiled, params: TargetParams, cfg: ModelConfig, bucket: int, slots: int,
             device: jax.Device) -> None:
    """Run every executable once on a scratch cache: the first execution of a freshly compiled or cache-loaded
    XLA CPU executable costs ~0.4 s more than later ones, which belongs to set-up, not to prefill or decode."""
    put = functools.partial(jax.device_put, device=device)
    cache = init_cache(cfg, slots, device=device)
    s = (put(np.float32(1.0)), put(np.int32(0)), put(np.float32(1.0)))
    key = put(jax.random.key_data(jax.random.key(0)))
    n = put(np.int32(1))
    tok, update, key = comp.prefill(params, cache, put(np.zeros((1, bucket), np.int32)), n, key, s)
    cache = comp.append_prompt(cache, update, n)
    tok, update, key = comp.decode(params, cache, tok, key, s)
    cache = comp.append_token(cache, update)
    jax.block_until_ready((tok, cache))


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
    n_real = put(np.int32(len(prompt_ids)))
    tok, update, key = comp.prefill(params, cache, put(padded), n_real, key, s)
    cache = comp.append_prompt(cache, update, n_real)
    tok.block_until_ready()
    t1 = time.perf_counter()

    out: list[int] = []
    stop = "length"
    while True:
        nxt = None
        if len(out) + 1 < max_new_tokens:  # dispatch the next step before reading this token
            nxt, update, key = comp.decode(params, cache, tok, key, s)
            cache = comp.append_token(cache, update)
        t = int(np.asarray(tok)[0])  # one device-to-host copy (indexing a jax.Array would dispatch a slice)
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
