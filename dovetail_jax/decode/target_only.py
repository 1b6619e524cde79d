"""Plain autoregressive decoding with the target alone: the baseline every speedup is measured against.

`TargetOnly` is the program for one (model, prompt bucket and cache size, greedy or sampling, device): its
prefill and decode step only read the KV cache; `append` (cache donated) writes their K/V in place (see
`model/cache.py` for why the write is a separate program). It is compiled and run once per shape before
anything is timed (`programs.warmed`). The loop dispatches step i+1 before it reads token i back to the host,
so Python bookkeeping and streaming overlap the device work.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dovetail_jax.config import ModelConfig, SamplingConfig
from dovetail_jax.decode import programs
from dovetail_jax.decode.programs import Output, Scalars
from dovetail_jax.devices import Placement
from dovetail_jax.model import cache as cache_lib
from dovetail_jax.model.cache import KVCache, init_cache
from dovetail_jax.model.params import TargetParams
from dovetail_jax.model.target import causal_mask, forward
from dovetail_jax.plan import Sizes, plan_sizes
from dovetail_jax.stats import GenerationStats


@struct.dataclass
class DecodeState:
    """Between two steps: the cache with every token but `token` written, the last token `[1]`, the key."""

    cache: KVCache
    token: jax.Array
    key: jax.Array


def _prefill(params: TargetParams, cache: KVCache, tokens: jax.Array, n_real: jax.Array, key: jax.Array,
             s: Scalars, *, cfg: ModelConfig, greedy: bool, filtered: bool):
    # tokens [1, P] right-padded; the causal mask keeps pads from touching real tokens
    p = tokens.shape[1]
    positions = (cache.length + jnp.arange(p, dtype=jnp.int32))[None, :]
    logits, _, update = forward(params, cfg, tokens, positions, causal_mask(p), cache, "last", n_real - 1,
                                empty_cache=True)  # generation always starts from a fresh cache
    tok, key = programs.pick(logits, key, s, greedy, filtered)
    return tok, update, key


def _decode_step(params: TargetParams, cache: KVCache, tok: jax.Array, key: jax.Array, s: Scalars, *,
                 cfg: ModelConfig, greedy: bool, filtered: bool):
    positions = jnp.reshape(cache.length, (1, 1))
    logits, _, update = forward(params, cfg, tok[:, None], positions, jnp.ones((1, 1), bool), cache, "last", 0)
    tok, key = programs.pick(logits, key, s, greedy, filtered)
    return tok, update, key


@dataclass(frozen=True)
class TargetOnly:
    """The target-only decode program; its fields are what its compiled steps depend on."""

    cfg: ModelConfig
    sizes: Sizes
    greedy: bool
    placement: Placement
    filtered: bool = True  # top-k / top-p in play (sampling only): without them no sort of the vocabulary

    @functools.cached_property
    def prefill_step(self) -> Callable:
        return jax.jit(functools.partial(_prefill, cfg=self.cfg, greedy=self.greedy, filtered=self.filtered))

    @functools.cached_property
    def decode_step(self) -> Callable:
        return jax.jit(functools.partial(_decode_step, cfg=self.cfg, greedy=self.greedy, filtered=self.filtered))

    @functools.cached_property
    def append(self) -> Callable:
        return jax.jit(cache_lib.append, donate_argnames=("cache",))

    def empty_cache(self) -> KVCache:
        return init_cache(self.cfg, self.sizes.cache_slots, device=self.placement.target)

    def padded(self, prompt_ids: list[int]) -> np.ndarray:
        """The prompt right-padded to the bucket, `[1, P]`."""
        out = np.zeros((1, self.sizes.prompt_bucket), np.int32)
        out[0, : len(prompt_ids)] = prompt_ids
        return out

    def prefill(self, params: TargetParams, cache: KVCache, padded: np.ndarray, n_real: int, key: jax.Array,
                s: Scalars) -> DecodeState:
        """`cache` (empty; donated) holding the prompt, and the first new token (not yet read)."""
        put = functools.partial(jax.device_put, device=self.placement.target)
        n = put(np.int32(n_real))
        tok, update, key = self.prefill_step(params, cache, put(padded), n, key, s)
        return DecodeState(self.append(cache, update, n), tok, key)

    def step(self, params: TargetParams, state: DecodeState, s: Scalars) -> DecodeState:
        """Dispatch one decode step; `state.cache` is donated (do not use it again)."""
        tok, update, key = self.decode_step(params, state.cache, state.token, state.key, s)
        return DecodeState(self.append(state.cache, update), tok, key)

    def warm_up(self, params: TargetParams) -> None:
        """Run every step once on scratch data: the first execution of a freshly compiled or cache-loaded XLA
        CPU executable costs ~0.4 s more than later ones, which belongs to set-up, not to prefill or decode."""
        s = programs.scalars(SamplingConfig(temperature=1.0), self.placement.target)
        key = programs.seed_key(0, self.placement.target)
        state = self.step(params, self.prefill(params, self.empty_cache(), self.padded([0]), 1, key, s), s)
        jax.block_until_ready(state)


def generate(
    params: TargetParams,
    cfg: ModelConfig,
    prompt_ids: list[int],
    max_new_tokens: int,
    sampling_cfg: SamplingConfig = SamplingConfig(),
    eos_ids: tuple[int, ...] = (),
    on_token: Callable[[int], None] | None = None,
    ignore_eos: bool = False,
    *,
    placement: Placement | None = None,
) -> tuple[list[int], GenerationStats]:
    """Generate up to `max_new_tokens` after `prompt_ids`; stop at an EOS id unless `ignore_eos`.

    `on_token` is called with each new token id as soon as it is on the host (for streaming). `placement`:
    where to run (its target device; default: where `params` live). Returns the new token ids (EOS included
    when it ended the generation) and the statistics.
    """
    placement = placement or Placement.of(params)
    sizes = plan_sizes(cfg, len(prompt_ids), max_new_tokens)
    prog, compile_s = programs.warmed(TargetOnly(cfg, sizes, sampling_cfg.greedy, placement,
                                                         sampling_cfg.filtered),
                                      programs.signature(params), lambda p: p.warm_up(params))
    s = programs.scalars(sampling_cfg, placement.target)
    key = programs.seed_key(sampling_cfg.seed, placement.target)
    out = Output(max_new_tokens, frozenset(() if ignore_eos else eos_ids), on_token)
    cache, padded = prog.empty_cache(), prog.padded(prompt_ids)

    t0 = time.perf_counter()
    state = prog.prefill(params, cache, padded, len(prompt_ids), key, s)
    state.token.block_until_ready()
    t1 = time.perf_counter()
    while True:  # dispatch the next step before reading this token
        nxt = prog.step(params, state, s) if len(out.tokens) + 1 < max_new_tokens else None
        out.emit([int(np.asarray(state.token)[0])])  # one device-to-host copy (indexing would dispatch a slice)
        if out.done:
            break
        state = nxt
    if nxt is not None:
        nxt.token.block_until_ready()  # the step dispatched past EOS: wait, so timings stay honest
    t2 = time.perf_counter()
    return out.tokens, GenerationStats(
        mode="target", prompt_tokens=len(prompt_ids), new_tokens=len(out.tokens), stop_reason=out.stop,
        compile_s=compile_s, prefill_s=t1 - t0, decode_s=t2 - t1, decode_steps=len(out.tokens) - 1,
        cache_slots=sizes.cache_slots, prompt_bucket=sizes.prompt_bucket)
