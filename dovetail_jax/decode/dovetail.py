"""The Dovetail cycle: draft a tree on the accelerator, verify it on the CPU, commit, repeat.

This is the only module that moves arrays between the two devices, and it counts every byte:

    to the draft:  the accepted tokens' features [1, W, H] f32 and the ids after them [1, W] i32, plus their
                   count (W = the longest path a tree can accept, rows past the count are padding);
                   once per prompt, the prompt's features [1, P, H] instead
    to the target: the tree, tokens [T] and parents [T] (int32)

Everything else stays where it is made: the target builds the ancestor mask, positions and paths from the
parents; the draft keeps its cache of accepted context. Each step is compiled once per configuration
(model, draft, tree, cache size, prompt bucket, greedy or sampling) and run once before timing; KV caches
are written by separate calls with the cache donated (see `model/cache.py`). The phases run one after the
other, as in the paper, and each is timed (`time_s`): verify (target forward, acceptance, commit), transfer
(both directions), draft (stable step, expansions, reranking, cache append) and host (reading the accepted
tokens, stop checks, streaming). On a CPU-only machine the "accelerator" is a second host device on the same
cores, so the draft's time adds to the target's.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dovetail_jax import devices
from dovetail_jax.config import DraftConfig, ModelConfig, SamplingConfig, TreeConfig
from dovetail_jax.decode.stats import GenerationStats
from dovetail_jax.decode.target_only import plan_sizes
from dovetail_jax.errors import ConfigError
from dovetail_jax.model import cache as cache_lib
from dovetail_jax.model.cache import KVCache, init_cache
from dovetail_jax.model.draft import DraftParams, DraftShared, draft_model_config
from dovetail_jax.model.params import TargetParams
from dovetail_jax.model.target import causal_mask, forward
from dovetail_jax.speculation import accept as accept_lib
from dovetail_jax.speculation import sampling
from dovetail_jax.speculation import tree as tree_lib
from dovetail_jax.speculation.drafting import draft_tree

log = logging.getLogger(__name__)
_warned_single_device = False


@dataclass(frozen=True)
class Draft:
    """A draft ready to run: its architecture, trainable weights and frozen embedding/head copies, all on the
    draft's device."""

    cfg: DraftConfig
    params: DraftParams
    shared: DraftShared
    source: str = "random"


# --- the jitted steps ----------------------------------------------------------------------------------------

Scalars = tuple[jax.Array, jax.Array, jax.Array]  # temperature, top_k, top_p


def _pick(logits: jax.Array, key: jax.Array, s: Scalars, greedy: bool, filtered: bool):
    if greedy:
        return sampling.greedy(logits), key
    key, sub = jax.random.split(key)
    logp = sampling.processed_log_probs(logits, *s, filtered=filtered)
    return jax.random.categorical(sub, logp, axis=-1).astype(jnp.int32), key


def _target_prefill(params: TargetParams, cache: KVCache, tokens: jax.Array, n_real: jax.Array, key: jax.Array,
                    s: Scalars, *, cfg: ModelConfig, greedy: bool, filtered: bool):
    """Prompt `[1, P]` (right-padded) -> first token, the features and next ids the draft reads, K/V."""
    p = tokens.shape[1]
    positions = jnp.arange(p, dtype=jnp.int32)[None]
    logits, hidden, update = forward(params, cfg, tokens, positions, causal_mask(p), cache, "last", n_real - 1,
                                     empty_cache=True)
    tok, key = _pick(logits, key, s, greedy, filtered)  # [1]
    ids = jnp.roll(tokens, -1, axis=1).at[0, n_real - 1].set(tok[0])  # pair (f_i, t_{i+1}); the last is the root
    return tok, hidden, ids, update, key


def _verify(params: TargetParams, cache: KVCache, tokens: jax.Array, parents: jax.Array, key: jax.Array,
            s: Scalars, *, cfg: ModelConfig, tree: TreeConfig, greedy: bool, filtered: bool):
    """One target forward over the tree; accept; return what the commit and the draft need."""
    w = tree.width
    arrays = tree_lib.tree_arrays(parents, w)
    positions = (cache.length + arrays.depth)[None]
    logits, hidden, update = forward(params, cfg, tokens[None], positions, arrays.mask, cache, "all")
    if greedy:
        acc = accept_lib.accept_greedy(tokens, parents, logits[0], w)
    else:
        key, sub = jax.random.split(key)
        acc = accept_lib.accept_sampling(sub, tokens, parents, logits[0], *s, w, filtered=filtered)
    a = acc.num_accepted
    j = jnp.arange(w)
    path_tokens = jnp.take(tokens, acc.path)
    # the tokens this cycle emits = the ids the draft pairs with the path's features: accepted drafts, bonus
    ids = jnp.where(j < a, jnp.roll(path_tokens, -1), jnp.where(j == a, acc.bonus, 0)).astype(jnp.int32)
    feats = jnp.take(hidden[0], acc.path, axis=0)
    return update, acc.path, (a + 1).astype(jnp.int32), ids[None], feats[None], key


@functools.cache
def _jitted(cfg: ModelConfig, dcfg: DraftConfig, tree: TreeConfig, greedy: bool, filtered: bool):
    kw = {"greedy": greedy, "filtered": filtered}
    return {
        "prefill": jax.jit(functools.partial(_target_prefill, cfg=cfg, **kw)),
        "append": jax.jit(cache_lib.append, donate_argnames=("cache",)),
        "verify": jax.jit(functools.partial(_verify, cfg=cfg, tree=tree, **kw)),
        "commit": jax.jit(cache_lib.commit_path, donate_argnames=("cache",)),
        "draft": jax.jit(functools.partial(draft_tree, cfg=cfg, dcfg=dcfg, tree=tree)),
        "draft_first": jax.jit(functools.partial(draft_tree, cfg=cfg, dcfg=dcfg, tree=tree, empty_cache=True)),
    }


_warm: set[tuple] = set()


# --- planning ------------------------------------------------------------------------------------------------


def plan(cfg: ModelConfig, tree: TreeConfig, prompt_len: int, max_new_tokens: int) -> tuple[int, int]:
    """(prompt bucket, cache slots) for both caches; refuses a request whose tree would not fit."""
    limit = cfg.max_position_embeddings
    if prompt_len + max_new_tokens + tree.width > limit:
        raise ConfigError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) + the tree's longest path "
            f"({tree.width}) = {prompt_len + max_new_tokens + tree.width} exceeds the model's context of {limit} "
            f"tokens; lower --max-new-tokens or the tree size"
        )
    return plan_sizes(cfg, prompt_len, max_new_tokens + tree.width)


def check_draft(cfg: ModelConfig, draft: Draft, tree: TreeConfig) -> None:
    v = draft.shared.head.shape[0]
    if draft.shared.embed.shape != (cfg.vocab_size, cfg.hidden_size):
        raise ConfigError(f"the draft's embedding is {tuple(draft.shared.embed.shape)}, the target's "
                          f"{(cfg.vocab_size, cfg.hidden_size)}")
    if tree.top_k > v:
        raise ConfigError(f"tree top_k {tree.top_k} exceeds the draft's vocabulary of {v} tokens")


def _device_note(target_dev: jax.Device, draft_dev: jax.Device) -> None:
    global _warned_single_device
    if target_dev == draft_dev and not _warned_single_device:
        _warned_single_device = True
        log.warning("only one device is available: the draft runs on the CPU device with the target (%s)",
                    target_dev)


# --- the loop ------------------------------------------------------------------------------------------------


@dataclass
class _Counters:
    verify: float = 0.0
    draft: float = 0.0
    transfer: float = 0.0
    host: float = 0.0
    bytes_to_draft: int = 0
    bytes_to_target: int = 0
    transfers_to_draft: int = 0
    transfers_to_target: int = 0

    def cross(self, arrays: tuple[jax.Array, ...], device: jax.Device, to_draft: bool) -> tuple[Any, int]:
        """Move `arrays` to `device` in one call, wait, and count it; returns (arrays there, bytes moved)."""
        t0 = time.perf_counter()
        moved = jax.block_until_ready(jax.device_put(arrays, device))
        self.transfer += time.perf_counter() - t0
        n = _nbytes(*arrays)
        if to_draft:
            self.bytes_to_draft += n
            self.transfers_to_draft += 1
        else:
            self.bytes_to_target += n
            self.transfers_to_target += 1
        return moved, n


def _nbytes(*xs: Any) -> int:
    return sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize for x in xs)


def generate(
    params: TargetParams,
    cfg: ModelConfig,
    draft: Draft,
    prompt_ids: list[int],
    max_new_tokens: int,
    tree: TreeConfig = TreeConfig(),
    sampling_cfg: SamplingConfig = SamplingConfig(),
    eos_ids: tuple[int, ...] = (),
    on_token: Callable[[int], None] | None = None,
    ignore_eos: bool = False,
) -> tuple[list[int], GenerationStats]:
    """Dovetail generation: exactly the target's greedy tokens, or the target's sampling distribution.

    `on_token` receives each new token id as soon as its cycle is verified. Returns the new ids (EOS included
    when it ended the generation) and the statistics (tau, acceptance histogram, bytes moved, time split).
    """
    check_draft(cfg, draft, tree)
    tdev, ddev = devices.target_device(), devices.accelerator_device()
    _device_note(tdev, ddev)
    bucket, slots = plan(cfg, tree, len(prompt_ids), max_new_tokens)
    greedy = sampling_cfg.greedy
    filtered = sampling_cfg.top_k > 0 or sampling_cfg.top_p < 1.0
    fns = _jitted(cfg, draft.cfg, tree, greedy, filtered)
    dmc = draft_model_config(cfg, draft.cfg)
    s = jax.device_put((np.float32(max(sampling_cfg.temperature, 1e-6)), np.int32(sampling_cfg.top_k),
                        np.float32(sampling_cfg.top_p)), tdev)

    compile_s = 0.0
    warm_key = (id(params), id(draft.params), cfg, draft.cfg, tree, bucket, slots, greedy, filtered, tdev, ddev)
    if warm_key not in _warm:  # compile and run every program once, outside the timed region
        t0 = time.perf_counter()
        _run(fns, params, cfg, draft, dmc, [0] * len(prompt_ids), 2 * tree.width, tree, bucket, slots, s,
             jax.random.key_data(jax.random.key(0)), tdev, ddev, (), None, True, _Counters())
        compile_s = time.perf_counter() - t0
        _warm.add(warm_key)

    c = _Counters()
    key = jax.random.key_data(jax.random.key(sampling_cfg.seed))
    eos = () if ignore_eos else tuple(eos_ids)
    out, info = _run(fns, params, cfg, draft, dmc, prompt_ids, max_new_tokens, tree, bucket, slots, s, key, tdev,
                     ddev, eos, on_token, False, c)
    hist = info["hist"]
    cycles = int(sum(hist))
    tau = float(np.dot(np.arange(1, len(hist) + 1), hist) / cycles) if cycles else 0.0
    reached = [int(sum(hist[d:])) for d in range(len(hist))]  # cycles that accepted >= d drafts
    rates = [reached[d + 1] / reached[d] if reached[d] else 0.0 for d in range(len(hist) - 1)]
    stats = GenerationStats(
        mode="dovetail", prompt_tokens=len(prompt_ids), new_tokens=len(out), stop_reason=info["stop"],
        compile_s=compile_s, prefill_s=info["prefill_s"], decode_s=info["decode_s"], decode_steps=len(out) - 1,
        extra={
            "cycles": cycles, "tau": tau, "accept_hist": hist, "depth_accept_rates": rates,
            "bytes_to_draft": c.bytes_to_draft, "bytes_to_target": c.bytes_to_target,
            "transfers_to_draft": c.transfers_to_draft, "transfers_to_target": c.transfers_to_target,
            "prefill_bytes_to_draft": info["prefill_bytes"],
            "time_s": {"verify": c.verify, "draft": c.draft, "transfer": c.transfer, "host": c.host},
            "prefill_time_s": info["prefill_split"],
            "tree": {"top_k": tree.top_k, "depth": tree.depth, "total_tokens": tree.total_tokens},
            "draft": {"n_layers": draft.cfg.num_layers, "fusion": draft.cfg.fusion,
                      "vocab": int(draft.shared.head.shape[0]), "source": draft.source},
            "draft_layers": draft.cfg.num_layers,
            "cache_slots": slots, "prompt_bucket": bucket,
        },
    )
    return out, stats


def _run(fns: dict[str, Callable], params: TargetParams, cfg: ModelConfig, draft: Draft, dmc: ModelConfig,
         prompt_ids: list[int], max_new: int, tree: TreeConfig, bucket: int, slots: int, s: Scalars,
         key: Any, tdev: jax.Device, ddev: jax.Device, eos: tuple[int, ...],
         on_token: Callable[[int], None] | None, warm: bool, c: _Counters) -> tuple[list[int], dict[str, Any]]:
    """The prefill and the cycles. With `warm`, runs until every program has executed once."""
    clock = time.perf_counter
    to_t = functools.partial(jax.device_put, device=tdev)
    cache = init_cache(cfg, slots, device=tdev)
    dcache = init_cache(dmc, slots, device=ddev)
    key = to_t(key)
    padded = np.zeros((1, bucket), np.int32)
    padded[0, : len(prompt_ids)] = prompt_ids

    def draft_step(feats_d: Any, dcache: KVCache, first: bool = False) -> tuple[jax.Array, jax.Array, KVCache]:
        """The draft's tree from the accepted pairs, its stable cache advanced; the tree back on the CPU."""
        t0 = clock()
        f_d, i_d, n_d = feats_d
        tokens, parents, stable = fns["draft_first" if first else "draft"](draft.params, draft.shared, dcache, f_d,
                                                                          i_d, n_d)
        dcache = fns["append"](dcache, stable, n_d)
        jax.block_until_ready((tokens, parents, dcache.length))
        c.draft += clock() - t0
        (tokens_t, parents_t), _ = c.cross((tokens, parents), tdev, to_draft=False)
        return tokens_t, parents_t, dcache

    # prefill: the target over the prompt, its features to the draft, the first tree
    t0 = clock()
    n_real = to_t(np.int32(len(prompt_ids)))
    tok, hidden, ids, update, key = fns["prefill"](params, cache, to_t(padded), n_real, key, s)
    cache = fns["append"](cache, update, n_real)
    first = int(np.asarray(tok)[0])
    t1 = clock()
    moved, prefill_bytes = c.cross((hidden, ids, n_real), ddev, to_draft=True)
    tokens_t, parents_t, dcache = draft_step(moved, dcache, first=True)
    t4 = clock()
    prefill = {"target": t1 - t0, "transfer": c.transfer, "draft": c.draft}
    c.transfer = c.draft = 0.0

    out = [first]
    if on_token is not None:
        on_token(first)
    hist = [0] * tree.width
    stop = "eos" if first in eos else "length"
    done = first in eos or len(out) >= max_new
    while not done:
        ta = clock()
        update, path, n_acc, ids, feats, key = fns["verify"](params, cache, tokens_t, parents_t, key, s)
        cache = fns["commit"](cache, update, path, n_acc)
        n = int(np.asarray(n_acc))
        cache.length.block_until_ready()  # the commit belongs to verification (else the next transfer waits on it)
        tb = clock()
        new = np.asarray(ids)[0, :n].tolist()
        hist[n - 1] += 1
        for t in new:
            out.append(t)
            if on_token is not None:
                on_token(t)
            if t in eos:
                stop, done = "eos", True
                break
            if len(out) >= max_new:
                done = True
                break
        c.verify += tb - ta
        c.host += clock() - tb
        if done and not warm:
            break
        moved, _ = c.cross((feats, ids, n_acc), ddev, to_draft=True)
        tokens_t, parents_t, dcache = draft_step(moved, dcache)
        if warm:
            break
    t_end = clock()
    return out, {"hist": hist, "stop": stop, "prefill_s": t4 - t0, "decode_s": t_end - t4,
                 "prefill_split": prefill, "prefill_bytes": prefill_bytes}
