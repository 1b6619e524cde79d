"""The Dovetail cycle: draft a tree on the accelerator, verify it on the CPU, commit, repeat.

`DovetailCycle` is the program for one (model, draft, tree, sizes, sampling mode, placement): a frozen object
whose fields are what its jitted steps depend on, whose steps are named methods, and whose one step function
`cycle` takes a `DovetailState` pytree (both caches, the sampling key, the pending tree) to the next. Only the
`transfer.Counter` moves arrays between the two devices, and it counts every byte:

    to the draft:  the accepted tokens' features [1, W, H] f32 and the ids after them [1, W] i32, plus their
                   count (W = the longest path a tree can accept, rows past the count are padding);
                   once per prompt, the prompt's features [1, P, H] instead
    to the target: the tree, tokens [T] and parents [T] (int32), stacked into one [2, T] array (one copy)

With a lookup (`TreeConfig.lookup` L > 0), the host, which is the target's device, keeps the context and its
n-gram index (`speculation.lookup`); when the context's last tokens occurred earlier, the tokens that followed
are grafted onto the tree inside verification (T + L nodes, a second compiled verify), so nothing more crosses
but wider accepted paths (W grows by L).

Everything else stays where it is made: the target builds the ancestor mask, positions and paths from the
parents; the draft keeps its cache of accepted context. Each step is compiled once per program and run once
before timing (`programs.warmed`); the target's KV cache is written by separate calls with the cache donated
(see `model/cache.py`), the draft's by its drafting call itself (`drafting.draft_step`, cache donated: one
dispatch per cycle). The phases run one after the other, as in the paper, and each is timed (`time_s`): verify
(target forward, acceptance, commit), transfer (both directions), draft (stable step, expansions, reranking,
cache append) and host (reading the accepted tokens, stop checks, streaming). On a CPU-only machine the
"accelerator" is a second host device on the same cores, so the draft's time adds to the target's.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dovetail_jax.config import DEFAULT_TREE, DraftConfig, ModelConfig, SamplingConfig, TreeConfig
from dovetail_jax.decode import programs
from dovetail_jax.decode.programs import Output, Scalars
from dovetail_jax.decode.transfer import Counter
from dovetail_jax.devices import Placement
from dovetail_jax.errors import ConfigError
from dovetail_jax.model import cache as cache_lib
from dovetail_jax.model.cache import KVCache, init_cache
from dovetail_jax.model.draft import Draft, DraftParams, DraftShared, draft_model_config
from dovetail_jax.model.params import TargetParams
from dovetail_jax.model.target import causal_mask, forward
from dovetail_jax.plan import Sizes, plan_dovetail
from dovetail_jax.speculation import accept as accept_lib
from dovetail_jax.speculation import lookup as lookup_lib
from dovetail_jax.speculation import tree as tree_lib
from dovetail_jax.speculation.drafting import draft_step
from dovetail_jax.stats import Acceptance, DovetailStats, DraftInfo, GenerationStats, PrefillTimes

log = logging.getLogger(__name__)


# --- the jitted steps ----------------------------------------------------------------------------------------


def _target_prefill(params: TargetParams, cache: KVCache, tokens: jax.Array, n_real: jax.Array, key: jax.Array,
                    s: Scalars, *, cfg: ModelConfig, greedy: bool, filtered: bool, taps: tuple[int, ...] = ()):
    """Prompt `[1, P]` (right-padded) -> first token, the features and next ids the draft reads, K/V. `taps`: the
    draft's feature layers (its features are those blocks' outputs side by side; () = the final norm)."""
    p = tokens.shape[1]
    positions = jnp.arange(p, dtype=jnp.int32)[None]
    logits, hidden, update = forward(params, cfg, tokens, positions, causal_mask(p), cache, "last", n_real - 1,
                                     empty_cache=True, taps=taps)
    tok, key = programs.pick(logits, key, s, greedy, filtered)  # [1]
    ids = jnp.roll(tokens, -1, axis=1).at[0, n_real - 1].set(tok[0])  # pair (f_i, t_{i+1}); the last is the root
    return tok, hidden, ids, update, key


def _draft(params: DraftParams, shared: DraftShared, cache: KVCache, feats: jax.Array, ids: jax.Array,
           n_new: jax.Array, *, cfg: ModelConfig, dcfg: DraftConfig, tree: TreeConfig, empty_cache: bool = False):
    """`drafting.draft_step` with its tree stacked as one `[2, T]` int32 array (tokens, parents), so that one
    array crosses back to the target."""
    tokens, parents, cache = draft_step(params, shared, cache, feats, ids, n_new, cfg=cfg, dcfg=dcfg, tree=tree,
                                        empty_cache=empty_cache)
    return jnp.stack([tokens, parents]), cache


def _verify(params: TargetParams, cache: KVCache, tree_ids: jax.Array, key: jax.Array, s: Scalars,
            chain: jax.Array | None = None, *, cfg: ModelConfig, tree: TreeConfig, greedy: bool, filtered: bool,
            taps: tuple[int, ...] = ()):
    """One target forward over the tree (`tree_ids [2, T]`: tokens, parents), with the lookup `chain` grafted
    on when there is one (a second compilation); accept; return what the commit and the draft need (the
    accepted path's features: the draft's `taps`, as `_target_prefill`) and the tokens the chain added."""
    tokens, parents = tree_ids[0], tree_ids[1]
    drafted, w = tokens.shape[0], tree.width
    at = jnp.int32(0)
    if chain is not None:
        tokens, parents, at = lookup_lib.graft(tokens, parents, chain, tree.drafted.width, tree.lookup)
    arrays = tree_lib.tree_arrays(parents, w)
    positions = (cache.length + arrays.depth)[None]
    logits, hidden, update = forward(params, cfg, tokens[None], positions, arrays.mask, cache, "all", taps=taps)
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
    gain = jnp.where(acc.node >= drafted, a - at, 0)  # accepted past the graft point: what the chain added
    return update, acc.path, (a + 1).astype(jnp.int32), ids[None], feats[None], key, gain


# --- the program ---------------------------------------------------------------------------------------------


@struct.dataclass
class DovetailState:
    """The loop state between two cycles."""

    cache: KVCache  # the target's: the committed context, on the target's device
    draft_cache: KVCache  # the draft's: its stable context, on the draft's device
    tree: jax.Array  # [2, T] int32, the pending tree (tokens, parents), on the target's device
    key: jax.Array  # [2] uint32 sampling key, on the target's device


@dataclass
class LookupCounts:
    """How often the lookup chain was verified, and the tokens it added past the drafted tree."""

    cycles: int = 0
    tokens: int = 0


@dataclass(frozen=True)
class DovetailCycle:
    """The Dovetail program; its fields are what its compiled steps depend on."""

    cfg: ModelConfig
    draft_cfg: DraftConfig
    tree: TreeConfig
    sizes: Sizes
    greedy: bool
    filtered: bool  # top-k / top-p in play (sampling only)
    placement: Placement

    @functools.cached_property
    def target_prefill(self) -> Callable:
        return jax.jit(functools.partial(_target_prefill, cfg=self.cfg, greedy=self.greedy, filtered=self.filtered,
                                         taps=self.draft_cfg.feature_layers))

    @functools.cached_property
    def verify(self) -> Callable:
        return jax.jit(functools.partial(_verify, cfg=self.cfg, tree=self.tree, greedy=self.greedy,
                                         filtered=self.filtered, taps=self.draft_cfg.feature_layers))

    @functools.cached_property
    def commit(self) -> Callable:
        return jax.jit(cache_lib.commit_path, donate_argnames=("cache",))

    @functools.cached_property
    def append(self) -> Callable:
        return jax.jit(cache_lib.append, donate_argnames=("cache",))

    @functools.cached_property
    def draft_first(self) -> Callable:
        return jax.jit(functools.partial(_draft, cfg=self.cfg, dcfg=self.draft_cfg, tree=self.tree.drafted,
                                         empty_cache=True), donate_argnames=("cache",))

    @functools.cached_property
    def draft_next(self) -> Callable:
        return jax.jit(functools.partial(_draft, cfg=self.cfg, dcfg=self.draft_cfg, tree=self.tree.drafted),
                       donate_argnames=("cache",))

    def initial_state(self, key: jax.Array) -> DovetailState:
        """Empty caches and a placeholder tree: everything a generation allocates before its clock starts."""
        slots, p = self.sizes.cache_slots, self.placement
        empty_tree = jax.device_put(np.zeros((2, self.tree.total_tokens), np.int32), p.target)
        return DovetailState(init_cache(self.cfg, slots, device=p.target),
                             init_cache(draft_model_config(self.cfg, self.draft_cfg), slots, device=p.draft),
                             empty_tree, key)

    def prefill(self, params: TargetParams, draft: Draft, state: DovetailState, prompt_ids: list[int], s: Scalars,
                c: Counter) -> tuple[DovetailState, int, int, PrefillTimes]:
        """The target over the prompt, its features to the draft, the first tree. Returns the state, the first
        new token, the bytes sent to the draft and the time split (the counter's clocks start again at 0)."""
        t0 = time.perf_counter()
        put = functools.partial(jax.device_put, device=self.placement.target)
        padded = np.zeros((1, self.sizes.prompt_bucket), np.int32)
        padded[0, : len(prompt_ids)] = prompt_ids
        n_real = put(np.int32(len(prompt_ids)))
        tok, hidden, ids, update, key = self.target_prefill(params, state.cache, put(padded), n_real, state.key, s)
        cache = self.append(state.cache, update, n_real)
        first = int(np.asarray(tok)[0])
        t1 = time.perf_counter()
        moved, sent = c.to_draft((hidden, ids, n_real))
        state = self.redraft(draft, state.replace(cache=cache, key=key), moved, c, first=True)
        times = PrefillTimes(target=t1 - t0, transfer=c.transfer, draft=c.draft)
        c.transfer = c.draft = 0.0
        return state, first, sent, times

    def cycle(self, params: TargetParams, draft: Draft, state: DovetailState, s: Scalars, c: Counter,
              out: Output, lookup: lookup_lib.NgramLookup | None = None,
              counts: LookupCounts | None = None) -> tuple[DovetailState, int]:
        """One cycle: verify the pending tree (with `lookup`'s chain grafted on when it proposes one) and commit
        its accepted path, emit the new tokens (and extend `lookup`'s context by them), then (unless that ended
        the generation) draft the next tree. Returns the state and the tokens committed."""
        ta = time.perf_counter()
        chain = None if lookup is None else lookup.chain
        update, path, n_acc, ids, feats, key, gain = self.verify(params, state.cache, state.tree, state.key, s,
                                                                 chain)
        cache = self.commit(state.cache, update, path, n_acc)
        n = int(np.asarray(n_acc))
        cache.length.block_until_ready()  # the commit belongs to verification (else the next transfer waits on it)
        tb = time.perf_counter()
        new = np.asarray(ids)[0, :n].tolist()
        out.emit(new)
        if lookup is not None:
            lookup.extend(new)
            if chain is not None and counts is not None:
                counts.cycles += 1
                counts.tokens += int(np.asarray(gain))
        c.verify += tb - ta
        c.host += time.perf_counter() - tb
        state = state.replace(cache=cache, key=key)
        if not out.done:
            moved, _ = c.to_draft((feats, ids, n_acc))
            state = self.redraft(draft, state, moved, c)
        return state, n

    def redraft(self, draft: Draft, state: DovetailState, moved: tuple[jax.Array, jax.Array, jax.Array],
                c: Counter, first: bool = False) -> DovetailState:
        """The draft's tree from the accepted pairs `moved` (features, ids, count; on the draft's device), its
        cache advanced; the tree back on the target's device."""
        t0 = time.perf_counter()
        feats, ids, n = moved
        step = self.draft_first if first else self.draft_next
        tree, dcache = step(draft.params, draft.shared, state.draft_cache, feats, ids, n)
        jax.block_until_ready((tree, dcache.length))
        c.draft += time.perf_counter() - t0
        (tree,) = c.to_target((tree,))
        return state.replace(draft_cache=dcache, tree=tree)

    def warm_up(self, params: TargetParams, draft: Draft, s: Scalars) -> None:
        """Run every step once (prefill, first tree, a cycle, the next tree) on a scratch prompt."""
        c = Counter(self.placement)
        state = self.initial_state(programs.seed_key(0, self.placement.target))
        state, *_ = self.prefill(params, draft, state, [0], s, c)
        state, _ = self.cycle(params, draft, state, s, c, Output(2 * self.tree.width, frozenset()))
        if self.tree.lookup:  # the verification with a chain grafted on is a second program
            forced = lookup_lib.NgramLookup([], lookup_lib.chain_size(self.tree))
            forced.chain = np.zeros((forced.size,), np.int32)
            state, _ = self.cycle(params, draft, state, s, c, Output(2 * self.tree.width, frozenset()), forced)
        jax.block_until_ready(state)


# --- checks and the entry point ------------------------------------------------------------------------------


def check_draft(cfg: ModelConfig, draft: Draft, tree: TreeConfig) -> None:
    v = draft.shared.head.shape[0]
    if draft.shared.embed.shape != (cfg.vocab_size, cfg.hidden_size):
        raise ConfigError(f"the draft's embedding is {tuple(draft.shared.embed.shape)}, the target's "
                          f"{(cfg.vocab_size, cfg.hidden_size)}")
    if tree.top_k > v:
        raise ConfigError(f"tree top_k {tree.top_k} exceeds the draft's vocabulary of {v} tokens")


@functools.cache
def _note_shared_device(placement: Placement) -> None:
    """Warn once per placement that has the draft on the target's own device."""
    if placement.shared:
        log.warning("only one device is available: the draft runs on the CPU device with the target (%s)",
                    placement.target)


def generate(
    params: TargetParams,
    cfg: ModelConfig,
    draft: Draft,
    prompt_ids: list[int],
    max_new_tokens: int,
    tree: TreeConfig = DEFAULT_TREE,
    sampling_cfg: SamplingConfig = SamplingConfig(),
    eos_ids: tuple[int, ...] = (),
    on_token: Callable[[int], None] | None = None,
    ignore_eos: bool = False,
    *,
    placement: Placement | None = None,
) -> tuple[list[int], GenerationStats]:
    """Dovetail generation: exactly the target's greedy tokens, or the target's sampling distribution.

    `on_token` receives each new token id as soon as its cycle is verified. `placement`: where the target and
    the draft run (default: where their weights live). Returns the new ids (EOS included when it ended the
    generation) and the statistics (acceptance, bytes moved, time split).
    """
    placement = placement or Placement.of(params, draft.params)
    check_draft(cfg, draft, tree)
    _note_shared_device(placement)
    sizes = plan_dovetail(cfg, tree, len(prompt_ids), max_new_tokens)
    filtered = sampling_cfg.filtered
    s = programs.scalars(sampling_cfg, placement.target)
    prog, compile_s = programs.warmed(
        DovetailCycle(cfg, draft.cfg, tree, sizes, sampling_cfg.greedy, filtered, placement),
        programs.signature((params, draft.params, draft.shared)), lambda p: p.warm_up(params, draft, s))

    c = Counter(placement)
    state = prog.initial_state(programs.seed_key(sampling_cfg.seed, placement.target))
    out = Output(max_new_tokens, frozenset(() if ignore_eos else eos_ids), on_token)
    t0 = time.perf_counter()
    state, first, prefill_bytes, prefill_times = prog.prefill(params, draft, state, prompt_ids, s, c)
    t1 = time.perf_counter()
    out.emit([first])
    lookup = lookup_lib.NgramLookup([*prompt_ids, first], lookup_lib.chain_size(tree)) if tree.lookup else None
    counts = LookupCounts()
    hist = [0] * tree.width
    while not out.done:
        state, n = prog.cycle(params, draft, state, s, c, out, lookup, counts)
        hist[n - 1] += 1
    t2 = time.perf_counter()
    info = DraftInfo(draft.cfg.num_layers, draft.cfg.fusion, int(draft.shared.head.shape[0]), draft.source,
                     draft.kind, draft.cfg.feature_layers)
    return out.tokens, GenerationStats(
        mode="dovetail", prompt_tokens=len(prompt_ids), new_tokens=len(out.tokens), stop_reason=out.stop,
        compile_s=compile_s, prefill_s=t1 - t0, decode_s=t2 - t1, decode_steps=len(out.tokens) - 1,
        cache_slots=sizes.cache_slots, prompt_bucket=sizes.prompt_bucket, acceptance=Acceptance(tuple(hist)),
        dovetail=DovetailStats(tree, info, c.transfers(prefill_bytes), c.phase_times(), prefill_times,
                               counts.cycles, counts.tokens))
