"""Training the draft: optax AdamW with warm-up and value clipping, a jitted step, orbax checkpoints.

A run lives in one folder: `run.json` (what was asked: draft architecture, training options, the target and
the feature set), `vocab_map.npy` (the reduced vocabulary, chosen once from the training split),
`ckpt/` (orbax: params, optimiser state, step; saved every `save_every` steps, on Ctrl-C and at the end)
and `log.jsonl` (held-out metrics). Rerunning the same command resumes from the last checkpoint; the batch
order is a pure function of (seed, step), so a resumed run sees the batches it would have seen. Asking a
run folder for a different architecture or target is refused rather than silently mixing two runs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm import tqdm

from dovetail_jax.config import DraftConfig, ModelConfig
from dovetail_jax.errors import ConfigError, TrainingDivergedError
from dovetail_jax.model import draft as D
from dovetail_jax.model.params import TargetParams
from dovetail_jax.plan import train_length as _bucket  # the padded length of a batch
from dovetail_jax.train.features import FeatureSet
from dovetail_jax.train.loss import Batch, losses


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000
    batch_tokens: int = 4096  # padded tokens per step
    lr: float = 1e-3
    warmup: int = 100
    min_lr_ratio: float = 0.1  # cosine decay to lr * this at the last step
    weight_decay: float = 0.01
    clip_value: float = 0.5  # EAGLE clips gradients by value
    noise: float = 0.2  # uniform feature noise of this width
    p_weight: float = 0.1  # weight of the soft cross-entropy
    v_weight: float = 1.0  # weight of the feature regression
    ttt_steps: int = 1  # training-time test: unrolled draft steps on its own outputs (1: off)
    ttt_decay: float = 0.8  # step k's loss weighs ttt_decay ** (k - 1)
    mask_oov: bool = False  # leave positions whose target token is outside the draft vocabulary out of the loss
    seed: int = 0
    save_every: int = 200
    eval_every: int = 200
    heldout_every: int = 20  # every 20th conversation (by index in the answers file) is held out

    def __post_init__(self) -> None:
        """Refuse what would train garbage (a nan or 0 learning rate) before any work, as the CLI does."""
        for f in ("lr", "weight_decay", "clip_value", "noise", "p_weight", "v_weight", "ttt_decay", "min_lr_ratio"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"TrainConfig.{f} must be a finite number >= 0, got {v!r}")
        if self.lr <= 0:
            raise ConfigError(f"TrainConfig.lr must be > 0, got {self.lr!r}")
        for f in ("steps", "batch_tokens", "save_every", "eval_every", "heldout_every", "ttt_steps"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"TrainConfig.{f} must be a positive integer, got {v!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"TrainConfig.warmup must be an integer >= 0, got {self.warmup!r}")


def split(fs: FeatureSet, every: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) sequence numbers; held out: answers-file index divisible by `every`."""
    held = fs.record_index % every == 0
    return np.flatnonzero(~held), np.flatnonzero(held)


def fit_feature_projection(fs: FeatureSet, seqs: np.ndarray, rows: int = 32768, seed: int = 0
                           ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """A warm start for a draft's multi-layer-feature projection (`DraftParams.feature_fc`, `feature_norm`): the
    least-squares linear map from the target blocks' features to the final-norm feature at the same position,
    over `rows` positions drawn from `seqs`, and a norm weight restoring the final feature's typical scale (the
    norm after the map removes it). A final-norm draft given this projection starts close to where it was,
    instead of reading noise through a random one. Returns (W `[k H, H]` in-out, norm weight `[H]`, fit stats)."""
    if fs.taps is None:
        raise ConfigError("no multi-layer features loaded to fit the projection on")
    rng = np.random.default_rng(seed)
    starts, ends = fs.offsets[seqs], fs.offsets[seqs + 1]
    picks = rng.choice(seqs.size, size=rows, p=(ends - starts) / (ends - starts).sum())
    pos = [int(starts[j]) + int(rng.integers(0, ends[j] - starts[j])) for j in picks]
    x = np.stack([np.asarray(fs.taps.rows(p, 1)[0], np.float64) for p in pos])  # [rows, k H]
    y = np.asarray(fs.feats[pos], np.float64)  # [rows, H]
    w, *_ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ w
    scale = float(np.median(np.sqrt((y ** 2).mean(-1))))
    stats = {"rows": rows, "r2": float(1.0 - (resid ** 2).sum() / ((y - y.mean(0)) ** 2).sum()),
             "final_feature_rms": scale}
    return w.astype(np.float32), np.full(y.shape[1], scale, np.float32), stats


def token_counts(fs: FeatureSet, seqs: np.ndarray, size: int) -> np.ndarray:
    """How often each id below `size` is an answer token or a greedy choice of the target in the conversations
    `seqs` (prompt positions do not count): what the reduced vocabulary is ranked by."""
    counts = np.zeros(size, np.int64)
    for s in seqs:
        a, b = int(fs.offsets[s]) + int(fs.prompt_len[s]), int(fs.offsets[s + 1])
        counts += np.bincount(fs.ids[a:b], minlength=size)[:size]
        counts += np.bincount(fs.argmax[a:b], minlength=size)[:size]
    return counts


def choose_vocab(fs: FeatureSet, seqs: np.ndarray, size: int, always: tuple[int, ...] = (),
                 vocab_size: int | None = None) -> np.ndarray:
    """The `size` target ids most frequent among the answers' tokens and the target's greedy choices of the
    training split (EOS ids always kept): the reduced draft vocabulary. With the target's `vocab_size`, ids
    never seen fill it up to `size` (else the map could come out shorter than the draft's head)."""
    counts = token_counts(fs, seqs, max(int(max(fs.ids.max(), fs.argmax.max())) + 1, vocab_size or 0))
    order = np.argsort(-counts, kind="stable")
    keep = list(dict.fromkeys(int(i) for i in always))
    for i in order:
        if len(keep) >= size:
            break
        if int(i) not in keep:
            keep.append(int(i))
    return np.asarray(keep[:size], np.int32)


def rank_vocab(vocab_map: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Every id below `counts.size` ranked: `vocab_map` first (in its order), then the others by count, ties by
    id. A reduced vocabulary is widened along it (`checkpoint.VOCAB_ORDER`)."""
    vm = np.asarray(vocab_map, np.int32)
    member = np.zeros(counts.size, bool)
    member[vm] = True
    order = np.argsort(-np.asarray(counts), kind="stable")
    return np.concatenate([vm, order[~member[order]].astype(np.int32)])


def batch_plan(lengths: np.ndarray, seqs: np.ndarray, batch_tokens: int, seed: int, epoch: int) -> list[np.ndarray]:
    """One epoch's batches: a seeded shuffle, then groups of 64 sorted by length so each batch pads little;
    each batch holds as many sequences as fit `batch_tokens` at its power-of-two length."""
    rng = np.random.default_rng([seed, epoch])
    order = seqs[rng.permutation(seqs.size)]
    batches = []
    for g in range(0, order.size, 64):
        group = sorted(order[g:g + 64].tolist(), key=lambda s: lengths[s])
        k = 0
        while k < len(group):
            t = _bucket(int(lengths[group[min(len(group) - 1, k + 1)]]))
            n = max(1, batch_tokens // t)
            chunk = group[k:k + n]
            while len(chunk) > 1 and _bucket(int(max(lengths[s] for s in chunk))) * len(chunk) > batch_tokens:
                chunk = chunk[:-1]
            batches.append(np.asarray(chunk))
            k += len(chunk)
    order2 = rng.permutation(len(batches))
    return [batches[i] for i in order2]


def make_batch(fs: FeatureSet, seqs: np.ndarray, taps: bool = False) -> Batch:
    """Pad the sequences to a power-of-two length T (+1 row for the shifted targets); with `taps`, also their
    multi-layer features (the inputs of a draft with feature layers)."""
    lengths = (fs.offsets[seqs + 1] - fs.offsets[seqs]).astype(np.int64)
    t = _bucket(int(lengths.max()) - 1)
    b, h = seqs.size, fs.feats.shape[1]
    feats = np.zeros((b, t + 1, h), np.float32)
    ids = np.zeros((b, t + 1), np.int32)
    am = np.zeros((b, t + 1), np.int32)
    mask = np.zeros((b, t), np.float32)
    if taps and fs.taps is None:
        raise ConfigError("the batch needs multi-layer features, and none are loaded")
    taps = np.zeros((b, t + 1, fs.taps.width), np.float32) if taps else None
    for j, s in enumerate(seqs):
        a, n, p = int(fs.offsets[s]), int(lengths[j]), int(fs.prompt_len[s])
        feats[j, :n] = fs.feats[a:a + n]
        ids[j, :n] = fs.ids[a:a + n]
        am[j, :n] = fs.argmax[a:a + n]
        mask[j, max(0, p - 1): n - 1] = 1.0  # predictions from the last prompt token to the last answer one
        if taps is not None:
            taps[j, :n] = fs.taps.rows(a, n)
    return Batch(feats=jnp.asarray(feats), ids=jnp.asarray(ids), argmax=jnp.asarray(am), mask=jnp.asarray(mask),
                 taps=None if taps is None else jnp.asarray(taps))


def optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, tc.lr, max(1, tc.warmup), max(tc.steps, tc.warmup + 1),
                                                  tc.lr * tc.min_lr_ratio)
    return optax.chain(optax.clip(tc.clip_value),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=tc.weight_decay))


@functools.cache
def _step_fn(cfg: ModelConfig, dcfg: DraftConfig, tc: TrainConfig) -> Callable:
    opt = optimizer(tc)
    loss = functools.partial(losses, cfg=cfg, dcfg=dcfg, noise=tc.noise, **_loss_options(tc))

    def step(params, opt_state, shared, batch, key):
        (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params, shared, batch, key)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 1))


def _loss_options(tc: TrainConfig) -> dict[str, Any]:
    return {"p_weight": tc.p_weight, "v_weight": tc.v_weight, "steps": tc.ttt_steps, "decay": tc.ttt_decay,
            "mask_oov": tc.mask_oov}


EVAL_STEPS = 3  # held-out top-1 is reported for the first three unrolled steps (tree depths), whatever the recipe


@functools.cache
def _eval_fn(cfg: ModelConfig, dcfg: DraftConfig, tc: TrainConfig) -> Callable:
    return jax.jit(functools.partial(losses, key=None, cfg=cfg, dcfg=dcfg, noise=0.0, report_steps=EVAL_STEPS,
                                     **_loss_options(tc)))


def evaluate(params: D.DraftParams, shared: D.DraftShared, fs: FeatureSet, seqs: np.ndarray, cfg: ModelConfig,
             dcfg: DraftConfig, tc: TrainConfig) -> dict[str, float]:
    """Held-out metrics, weighted by trained positions (clean features): step 1's losses and top-1, and the
    top-1 of unrolled steps 2 and 3 (`top1_2`, `top1_3`: the draft on its own guesses, as deeper in a tree)."""
    fn = _eval_fn(cfg, dcfg, tc)
    lengths = fs.offsets[1:] - fs.offsets[:-1]
    tot: dict[str, float] = {}
    n = 0.0
    for chunk in batch_plan(lengths, seqs, tc.batch_tokens, seed=12345, epoch=0):
        _, m = fn(params, shared, make_batch(fs, chunk, bool(dcfg.feature_layers)))
        w = float(m["positions"])
        for k in ("loss", "vloss", "ploss", "top1", *(f"top1_{i}" for i in range(2, EVAL_STEPS + 1))):
            tot[k] = tot.get(k, 0.0) + float(m[k]) * w
        n += w
    return {k: v / max(n, 1.0) for k, v in tot.items()} | {"positions": n}


def _batches(lengths: np.ndarray, seqs: np.ndarray, tc: TrainConfig, start: int) -> Iterator[np.ndarray]:
    """Batches for steps `start`, `start+1`, ... (epochs follow each other; a pure function of seed and step)."""
    epoch, skip = 0, start
    while True:
        plan = batch_plan(lengths, seqs, tc.batch_tokens, tc.seed, epoch)
        if skip >= len(plan):
            skip -= len(plan)
            epoch += 1
            continue
        yield from plan[skip:]
        skip = 0
        epoch += 1


def _finite(tree: Any) -> bool:
    """Whether every leaf of a parameter pytree is finite (checked before a checkpoint is written)."""
    return all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(tree))


def _diverged(what: str, step: int, mngr: Any, run: Path, tc: TrainConfig) -> TrainingDivergedError:
    kept = mngr.latest_step()
    where = f"the last good checkpoint (step {kept}) is kept in {run / 'ckpt'}" if kept is not None else \
        "no checkpoint was written"
    return TrainingDivergedError(f"training diverged: {what} at step {step}; stopped, nothing exported, {where}; "
                                 f"lower --lr (now {tc.lr:g}) or use another run folder")


def run_record(cfg: ModelConfig, dcfg: DraftConfig, tc: TrainConfig, target_sha256: str | None,
               features: dict[str, Any]) -> dict[str, Any]:
    draft = dataclasses.asdict(dcfg)
    if not dcfg.feature_layers:  # as the records of runs from before multi-layer features say it
        draft.pop("feature_layers")
    else:
        draft["feature_layers"] = list(dcfg.feature_layers)  # as JSON reads it back
    return {"target": {"name": cfg.name, "sha256": target_sha256}, "draft": draft,
            "train": dataclasses.asdict(tc), "features": features}


def check_run(run: Path, record: dict[str, Any]) -> None:
    """Refuse to resume a run folder that was started for another draft, target or option set (steps may grow)."""
    path = run / "run.json"
    if not path.exists():
        return
    old = json.loads(path.read_text())
    for key in ("target", "draft", "features", "init"):
        if old.get(key) != record.get(key):
            raise ConfigError(f"{run} holds a run for {key} {old.get(key)}, not {record.get(key)}; "
                              "use another run folder or the same options")
    a = {k: v for k, v in old.get("train", {}).items() if k not in ("steps", "save_every", "eval_every")}
    b = {k: v for k, v in record["train"].items() if k not in ("steps", "save_every", "eval_every")}
    if a != b:
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise ConfigError(f"{run} was started with other training options ({', '.join(diff)}); "
                          "use another run folder or the same options")


@dataclass
class TrainResult:
    params: D.DraftParams
    step: int
    heldout: dict[str, float]  # empty after Ctrl-C between evaluations (no extra pass over the held-out split)
    seconds: float
    interrupted: bool  # Ctrl-C ended the sitting (after a checkpoint); the caller reports it, no exception


def train(target: TargetParams, cfg: ModelConfig, dcfg: DraftConfig, tc: TrainConfig, fs: FeatureSet,
          vocab_map: np.ndarray | None, run: Path, target_sha256: str | None, progress: bool = True,
          stop_at: int | None = None, init: D.DraftParams | None = None) -> TrainResult:
    """Train (or resume) the draft in `run`; returns the final parameters and held-out metrics.

    A fresh run starts from `init` (a trained draft of the same architecture: a warm start) or from a seeded
    random draft.
    `stop_at` ends this sitting early (with a checkpoint) without changing the schedule, which spans
    `tc.steps`; the next call resumes from there. Ctrl-C saves a checkpoint and returns at once.
    """
    if dcfg.feature_layers and (fs.taps is None or fs.taps.layers != dcfg.feature_layers):
        raise ConfigError(f"a draft reading target blocks {dcfg.feature_layers} needs their features in the shards "
                          f"(features.extract_taps); loaded: {None if fs.taps is None else fs.taps.layers}")
    train_seqs, held_seqs = split(fs, tc.heldout_every)
    if train_seqs.size == 0 or held_seqs.size == 0:
        raise ConfigError(f"need both training and held-out conversations; have {train_seqs.size} and "
                          f"{held_seqs.size} (held out: every {tc.heldout_every}th)")
    shared = D.make_shared(target, cfg, vocab_map)
    # a copy of `init`: the jitted step donates the parameters, and the caller's arrays must survive
    params = jax.tree.map(jnp.copy, init) if init is not None else D.init_draft(jax.random.key(tc.seed), cfg, dcfg)
    opt_state = optimizer(tc).init(params)
    mngr = ocp.CheckpointManager(
        (run / "ckpt").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=False))
    step = 0
    latest = mngr.latest_step()
    if latest is not None:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": opt_state})
        restored = mngr.restore(latest, args=ocp.args.StandardRestore(abstract))
        params, opt_state, step = restored["params"], restored["opt_state"], latest
    lengths = fs.offsets[1:] - fs.offsets[:-1]
    step_fn = _step_fn(cfg, dcfg, tc)
    key = jax.random.key(tc.seed + 1)
    log = (run / "log.jsonl").open("a")
    bar = tqdm(total=tc.steps, initial=step, unit="step", desc="train", disable=not progress)
    t0, interrupted = time.perf_counter(), False
    ema: dict[str, float] = {}

    def save(s: int) -> None:
        if not _finite(params):  # never a checkpoint of diverged weights: the last good one stays the latest
            raise _diverged("the parameters are not finite", s, mngr, run, tc)
        mngr.save(s, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}), force=True)
        mngr.wait_until_finished()

    last_eval: tuple[int, dict[str, float]] = (-1, {})
    try:
        batches = _batches(lengths, train_seqs, tc, step)
        end = tc.steps if stop_at is None else min(tc.steps, stop_at)
        while step < end:
            chunk = next(batches)
            params, opt_state, m = step_fn(params, opt_state, shared, make_batch(fs, chunk, bool(dcfg.feature_layers)),
                                           jax.random.fold_in(key, step))
            step += 1
            if not math.isfinite(float(m["loss"])):
                raise _diverged(f"the loss is {float(m['loss'])}", step, mngr, run, tc)
            for k in ("loss", "top1"):
                ema[k] = float(m[k]) if k not in ema else 0.95 * ema[k] + 0.05 * float(m[k])
            bar.update(1)
            bar.set_postfix(loss=f"{ema['loss']:.3f}", top1=f"{ema['top1']:.3f}")
            if step % tc.eval_every == 0 or step == tc.steps:
                ev = evaluate(params, shared, fs, held_seqs, cfg, dcfg, tc)
                last_eval = (step, ev)
                log.write(json.dumps({"step": step, "heldout": ev, "train_ema": dict(ema),
                                      "time": time.time()}) + "\n")
                log.flush()
                bar.write(f"step {step}: held-out loss {ev['loss']:.4f} top-1 {ev['top1']:.3f}")
            if step % tc.save_every == 0 or step == end:
                save(step)
    except KeyboardInterrupt:
        interrupted = True
        if mngr.latest_step() != step:
            save(step)
    except TrainingDivergedError:
        mngr.close()
        raise
    finally:
        bar.close()
        log.close()
    # the result's held-out numbers: the loop's own evaluation when it ended on one (a second pass over the
    # held-out split costs minutes and gives the same numbers); none after Ctrl-C, whose user wants out now
    if last_eval[0] == step:
        heldout = last_eval[1]
    elif interrupted:
        heldout = {}
    else:
        heldout = evaluate(params, shared, fs, held_seqs, cfg, dcfg, tc)
    mngr.close()
    return TrainResult(params=params, step=step, heldout=heldout, seconds=time.perf_counter() - t0,
                       interrupted=interrupted)
