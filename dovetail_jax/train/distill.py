"""Self-distillation in one pass: the target answers prompts in a continuously refilled batch and keeps the
features its generating forwards compute anyway.

The old path (`train/answers.py` then `train/features.py`) steps every row of a batch until its longest
answer ends (finished rows step as padding) and then runs a second, full prefill over every conversation to
extract features. Here:

- **One cache row per conversation, refilled.** The cache has B rows of S slots. A row's conversation
  occupies slots `[kv_start[b], S)`: the prompt is prefilled left-padded into the top `P` slots, and every
  later token is written one slot *below* (`kv_start` counts down). Attention over the cache does not care
  about slot order (RoPE is already in the keys), so the target's pure `forward` with `cache.length = S` and
  the per-row `kv_start` mask of batched generation computes exactly what a lone decode would, while every
  row lives its own life: a row whose answer ended takes the next prompt (a prefill of `refill_rows` rows at
  once) instead of stepping as padding. One decode program (fixed B and S), one prefill program per prompt
  bucket, cache writes in separate donated calls (see `model/cache.py` for why).
- **Features on the way.** The prefill returns the final-norm features and greedy next tokens of the prompt
  positions; each decode step returns those of the token it fed. The last answer token is fed once more
  (one extra step per conversation) so that every position has its feature, as `features.py`'s prefill gives.
- **Multi-layer features on the way too** (`feature_layers`, EAGLE-3): the same forwards return those blocks'
  outputs (and the last block's, whose final norm is the usual feature), written as the shard's
  `taps-<i>-<j>-<k>.npy` — what `features.extract_taps` would add in one more prefill pass per shard.
- **The same files.** Shards in `features.py`'s format (`load_features` and the trainer read them unchanged;
  shard k holds the prompts k*SHARD_RECORDS.. in prompt order) and the answers JSONL of `answers.py`. A shard
  is written to a temporary folder and renamed after its answers are appended, so a run resumes at the first
  missing shard; a folder of another target, prompt list or answer length is refused.

`train/magpie.py` reuses the engine (`run_batch`) with sampling and no features for self-prompting.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from dovetail_jax.config import ModelConfig
from dovetail_jax.errors import ConfigError, ModelFormatError
from dovetail_jax.model import layers as L
from dovetail_jax.model.cache import KVCache, KVUpdate, init_cache
from dovetail_jax.model.params import TargetParams
from dovetail_jax.model.target import causal_mask, forward, lm_head
from dovetail_jax.plan import pow2_at_least
from dovetail_jax.speculation.sampling import processed_log_probs
from dovetail_jax.train import features as F
from dovetail_jax.train.answers import read_answers
from dovetail_jax.train.prompts import Prompt

MIN_BUCKET = 16  # shortest prefill bucket


# --- the jitted programs ------------------------------------------------------------------------------------


def _next_token(logits: jax.Array, keys: jax.Array | None, temperature: float, top_p: float) -> jax.Array:
    """Greedy (`keys is None`) or sampled next token per row of `logits [R, V]`."""
    if keys is None:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    logp = processed_log_probs(logits, jnp.float32(temperature), jnp.int32(0), jnp.float32(top_p),
                               filtered=top_p < 1.0)
    return jax.vmap(jax.random.categorical)(keys, logp).astype(jnp.int32)


def _row_keys(seed: int, conv: jax.Array, pos: jax.Array) -> jax.Array:
    # one key per (conversation, position): a sample does not depend on which row or batch it ran in
    base = jax.random.key(seed)
    return jax.vmap(lambda c, p: jax.random.fold_in(jax.random.fold_in(base, c), p))(conv, pos)


def _features_and_taps(params: TargetParams, cfg: ModelConfig, out: jax.Array, taps: tuple[int, ...]
                       ) -> tuple[jax.Array, jax.Array | None]:
    """Split what `forward(..., taps=(*taps, L - 1))` returned into the final-norm feature `[..., H]` (the last
    block's output, normed exactly as `forward` norms it) and the asked blocks' outputs `[..., k H]`; without
    `taps`, `out` is already the final-norm feature."""
    if not taps:
        return out, None
    h = cfg.hidden_size
    return L.rms_norm(out[..., -h:], params.final_norm, cfg.rms_norm_eps), out[..., :-h]


def _prefill(params: TargetParams, tokens: jax.Array, start: jax.Array, conv: jax.Array, *, cfg: ModelConfig,
             sample: tuple[int, float, float] | None, taps: tuple[int, ...] = ()):
    """Left-padded prompts `tokens [R, P]` (row r's first real token at `start[r]`) from an empty cache:
    features `[R, P, H]` (bf16), greedy next tokens `[R, P]`, the first answer token `[R]`, the K/V and, with
    `taps`, those blocks' outputs `[R, P, k H]` (bf16; else None)."""
    r, p = tokens.shape
    idx = jnp.arange(p, dtype=jnp.int32)
    positions = jnp.maximum(idx[None, :] - start[:, None], 0)
    mask = causal_mask(p)[None] & (idx[None, None, :] >= start[:, None, None])  # [R, P, P]
    _, out, update = forward(params, cfg, tokens, positions, mask, init_cache(cfg, 1, batch=r), "none",
                             empty_cache=True, taps=(*taps, cfg.num_layers - 1) if taps else ())
    hidden, tapped = _features_and_taps(params, cfg, out, taps)
    logits = lm_head(hidden, params.head)  # [R, P, V]
    greedy = jnp.argmax(logits, -1).astype(jnp.int32)
    if sample is None:
        first = greedy[:, -1]
    else:
        first = _next_token(logits[:, -1], _row_keys(sample[0], conv, p - start), sample[1], sample[2])
    return (hidden.astype(jnp.bfloat16), greedy, first, update,
            None if tapped is None else tapped.astype(jnp.bfloat16))


def _step(params: TargetParams, cache: KVCache, tok: jax.Array, pos: jax.Array, kv_start: jax.Array,
          conv: jax.Array, *, cfg: ModelConfig, sample: tuple[int, float, float] | None, taps: tuple[int, ...] = ()):
    """One token per row (`tok [B]` at RoPE position `pos [B]`, seeing cache slots `[kv_start, S)`): its feature
    `[B, H]` (bf16), greedy next token `[B]`, the token to emit `[B]`, its K/V and, with `taps`, those blocks'
    outputs `[B, k H]` (bf16; else None)."""
    logits, out, update = forward(params, cfg, tok[:, None], pos[:, None], jnp.ones((1, 1), bool), cache,
                                  "last", 0, kv_start=kv_start, taps=(*taps, cfg.num_layers - 1) if taps else ())
    hidden, tapped = _features_and_taps(params, cfg, out[:, 0], taps)
    greedy = jnp.argmax(logits, -1).astype(jnp.int32)
    nxt = greedy if sample is None else _next_token(logits, _row_keys(sample[0], conv, pos + 1), sample[1],
                                                    sample[2])
    return (hidden.astype(jnp.bfloat16), greedy, nxt, update,
            None if tapped is None else tapped.astype(jnp.bfloat16))


def _write_step(cache: KVCache, update: KVUpdate, slot: jax.Array) -> KVCache:
    """Row b's new K/V (`update` per layer `[B, 1, K, D]`) into slot `slot[b]`."""
    rows = jnp.arange(slot.shape[0])

    def put(buf: jax.Array, new: jax.Array) -> jax.Array:
        return buf.at[rows, :, slot, :].set(new[:, 0].astype(buf.dtype))  # buf [B, K, S, D]

    return cache.replace(k=tuple(map(put, cache.k, update.k)), v=tuple(map(put, cache.v, update.v)))


def _write_prefill(cache: KVCache, update: KVUpdate, rows: jax.Array) -> KVCache:
    """A left-padded prefill's K/V (`[R, P, K, D]` per layer) into the top P slots of cache rows `rows [R]`
    (an index >= B, a filler row, is dropped)."""
    def put(buf: jax.Array, new: jax.Array) -> jax.Array:
        p = new.shape[1]
        return buf.at[rows, :, buf.shape[2] - p:, :].set(new.transpose(0, 2, 1, 3).astype(buf.dtype), mode="drop")

    return cache.replace(k=tuple(map(put, cache.k, update.k)), v=tuple(map(put, cache.v, update.v)))


@functools.cache
def _programs(cfg: ModelConfig, sample: tuple[int, float, float] | None, taps: tuple[int, ...] = ()):
    return (jax.jit(functools.partial(_prefill, cfg=cfg, sample=sample, taps=taps)),
            jax.jit(functools.partial(_step, cfg=cfg, sample=sample, taps=taps)),
            jax.jit(_write_prefill, donate_argnums=0), jax.jit(_write_step, donate_argnums=0))


# --- the continuously refilled batch ------------------------------------------------------------------------


@dataclass
class Finished:
    """One finished conversation: prompt, answer, and (with features) one feature and greedy next token per
    position of prompt + answer."""

    key: int  # the caller's id (the prompt index)
    prompt_ids: list[int]
    answer_ids: list[int]
    feats: np.ndarray | None  # [P + A, H] uint16 (bfloat16 bits)
    greedy: np.ndarray | None  # [P + A] int32
    taps: np.ndarray | None = None  # [P + A, k H] uint16 (bfloat16 bits): with `feature_layers`


@dataclass
class _Row:
    key: int
    prompt_ids: list[int]
    answer: list[int]
    kv_start: int  # the row's conversation holds cache slots [kv_start, S)
    feats: list[np.ndarray] = field(default_factory=list)
    greedy: list[np.ndarray] = field(default_factory=list)
    taps: list[np.ndarray] = field(default_factory=list)
    complete: bool = False  # the answer ended; with features its last token still has to be fed


def run_batch(params: TargetParams, cfg: ModelConfig, work: Sequence[tuple[int, list[int]]], *,
              max_new_tokens: int, eos_ids: Sequence[int], batch_size: int = 48, refill_rows: int = 8,
              max_prompt_tokens: int = 256, with_features: bool = True,
              sample: tuple[int, float, float] | None = None, feature_layers: tuple[int, ...] = (),
              on_step: Callable[[int], None] | None = None) -> Any:
    """Answer every `(key, prompt_ids)` of `work`, yielding `Finished` conversations as they end (not in order).

    Greedy unless `sample = (seed, temperature, top_p)`. A row that finished is refilled with the next prompts
    of `work`, `refill_rows` at a time (fewer when the queue runs out; the first prefills fill the batch). Each
    answer is cut after its first EOS (kept) or at `max_new_tokens`. `on_step(rows_busy)` is called per decode
    step. Prompts longer than `max_prompt_tokens` are refused (filter them first). With `feature_layers` (and
    features) each conversation also carries those target blocks' outputs (`Finished.taps`)."""
    if batch_size <= 0 or refill_rows <= 0 or max_new_tokens <= 0:
        raise ConfigError("batch size, refill rows and max_new_tokens must be positive")
    for key, ids in work:
        if not 0 < len(ids) <= max_prompt_tokens:
            raise ConfigError(f"prompt {key} has {len(ids)} tokens; allowed 1..{max_prompt_tokens}")
    if feature_layers and not with_features:
        raise ConfigError("feature_layers needs with_features")
    for i in feature_layers:
        if not 0 <= i < cfg.num_layers:
            raise ConfigError(f"feature layer {i} is not a block of this {cfg.num_layers}-block target")
    taps = tuple(int(i) for i in feature_layers)
    refill_rows = min(refill_rows, batch_size)
    bucket_max = pow2_at_least(max_prompt_tokens, MIN_BUCKET)
    slots = bucket_max + max_new_tokens  # prompt + every answer token (the last one is fed too)
    if max_prompt_tokens + max_new_tokens > cfg.max_position_embeddings:
        raise ConfigError(f"{max_prompt_tokens} prompt + {max_new_tokens} new tokens exceed the context "
                          f"({cfg.max_position_embeddings})")
    prefill, step, write_prefill, write_step = _programs(cfg, sample, taps)
    cache = init_cache(cfg, slots, batch=batch_size)
    cache = cache.replace(length=jnp.asarray(slots, jnp.int32))  # every slot >= a row's kv_start is visible
    eos = set(int(e) for e in eos_ids)
    queue = deque(work)
    rows: list[_Row | None] = [None] * batch_size

    def finish(b: int) -> Finished:
        r = rows[b]
        rows[b] = None
        feats = np.concatenate(r.feats) if with_features else None
        greedy = np.concatenate(r.greedy) if with_features else None
        tapped = np.concatenate(r.taps) if taps else None
        return Finished(r.key, r.prompt_ids, r.answer, feats, greedy, tapped)

    def ended(r: _Row) -> bool:
        return r.answer[-1] in eos or len(r.answer) >= max_new_tokens

    while True:
        # refill: whenever `refill_rows` rows are free (or all that the queue still needs)
        done_now: list[Finished] = []
        while queue:
            free = [b for b in range(batch_size) if rows[b] is None]
            take = min(refill_rows, len(queue))
            if len(free) < take:
                break
            batch = [queue.popleft() for _ in range(take)]
            p = pow2_at_least(max(len(ids) for _, ids in batch), MIN_BUCKET)
            tokens = np.zeros((refill_rows, p), np.int32)
            start = np.full(refill_rows, p - 1, np.int32)  # filler rows: one pad token
            target_rows = np.full(refill_rows, batch_size, np.int32)  # out of range: dropped
            conv = np.zeros(refill_rows, np.int32)
            for j, (key, ids) in enumerate(batch):
                tokens[j, p - len(ids):] = ids
                start[j] = p - len(ids)
                target_rows[j] = free[j]
                conv[j] = key
            hid, greedy, first, update, tapped = prefill(params, jnp.asarray(tokens), jnp.asarray(start),
                                                         jnp.asarray(conv))
            cache = write_prefill(cache, update, jnp.asarray(target_rows))
            first = np.asarray(first)
            if with_features:
                hid, greedy = np.asarray(hid).view(np.uint16), np.asarray(greedy)
            if taps:
                tapped = np.asarray(tapped).view(np.uint16)
            for j, (key, ids) in enumerate(batch):
                b = free[j]
                r = _Row(key, list(ids), [int(first[j])], slots - len(ids))
                if with_features:
                    r.feats.append(hid[j, p - len(ids):])
                    r.greedy.append(greedy[j, p - len(ids):])
                if taps:
                    r.taps.append(tapped[j, p - len(ids):])
                rows[b] = r
                if ended(r):
                    r.complete = True
                    if not with_features:
                        done_now.append(finish(b))
        yield from done_now
        busy = [b for b in range(batch_size) if rows[b] is not None]
        if not busy:
            if not queue:
                return
            continue
        tok = np.zeros(batch_size, np.int32)
        pos = np.zeros(batch_size, np.int32)
        kv_start = np.full(batch_size, slots, np.int32)  # idle rows see nothing
        conv = np.zeros(batch_size, np.int32)
        for b in busy:
            r = rows[b]
            tok[b], pos[b], kv_start[b], conv[b] = r.answer[-1], slots - r.kv_start, r.kv_start, r.key
        hid, greedy, nxt, update, tapped = step(params, cache, jnp.asarray(tok), jnp.asarray(pos),
                                                jnp.asarray(kv_start), jnp.asarray(conv))
        cache = write_step(cache, update, jnp.asarray(np.maximum(kv_start - 1, 0)))  # idle rows: a hidden slot
        nxt = np.asarray(nxt)
        if with_features:
            hid, greedy = np.asarray(hid).view(np.uint16), np.asarray(greedy)
        if taps:
            tapped = np.asarray(tapped).view(np.uint16)
        if on_step is not None:
            on_step(len(busy))
        for b in busy:
            r = rows[b]
            r.kv_start -= 1
            if with_features:
                r.feats.append(hid[b:b + 1])
                r.greedy.append(greedy[b:b + 1])
            if taps:
                r.taps.append(tapped[b:b + 1])
            if r.complete:  # its last token was just fed: every position has its feature
                yield finish(b)
                continue
            r.answer.append(int(nxt[b]))
            if ended(r):
                r.complete = True
                if not with_features:
                    yield finish(b)


# --- shards and answers -------------------------------------------------------------------------------------


def _prompts_digest(prompts: Sequence[Prompt]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.source.encode() + b"\0" + p.text.encode() + b"\0")
    return h.hexdigest()


def _rewrite_answers(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    tmp.replace(path)


def distill(target: Any, prompts: Sequence[Prompt], work: Path, *, max_new_tokens: int = 256,
            batch_size: int = 48, refill_rows: int = 8, max_prompt_tokens: int = 256,
            feature_layers: tuple[int, ...] = (), progress: bool = True) -> dict[str, Any]:
    """Answers (`work/answers.jsonl`) and feature shards (`work/features/`) for `prompts`, in one pass.

    `target` needs `cfg`, `params`, `sha256`, `eos_ids` and `tokenizer.encode_prompt` (an `api.Target`). Shard
    k covers prompts `[k*SHARD_RECORDS, (k+1)*SHARD_RECORDS)` (indices into `prompts`); prompts longer than
    `max_prompt_tokens` are skipped (counted in the summary). Existing shards are kept if they belong to this
    target, prompt list and `max_new_tokens`, else refused. With `feature_layers` every new shard also gets
    those target blocks' outputs (`features.taps_file`), taken from the generating forwards; shards written
    before without them get them from `features.extract_taps`. Returns a summary with the labelled tokens/s.
    """
    folder = work / "features"
    answers_path = work / "answers.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    sha, h = target.sha256, target.cfg.hidden_size
    per = F.SHARD_RECORDS
    n_shards = (len(prompts) + per - 1) // per
    done_shards, done_index = set(), set()
    for k in range(n_shards):
        d = F.shard_dir(folder, k)
        if not d.exists():
            continue
        meta = F.check_shard(d, sha, h)
        part = prompts[k * per:(k + 1) * per]
        want = {"prompts_sha256": _prompts_digest(part), "max_new_tokens": max_new_tokens}
        got = {key: meta.get("distill", {}).get(key) for key in want}
        if got != want:
            raise ModelFormatError(f"{d}: written for another prompt list or answer length ({got}, not {want}); "
                                   "use another work folder")
        done_shards.add(k)
        done_index.update(int(i) for i in np.load(d / "index.npy"))
    for tmp in folder.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    # the answers file holds exactly the complete shards' conversations (a crash may leave a shard's lines
    # without its folder): keep those, in file order
    old = read_answers(answers_path, sha)
    kept = [r for r in old if r["index"] in done_index]
    if len(kept) != len(old) or (answers_path.exists() and not answers_path.read_bytes().endswith(b"\n")):
        _rewrite_answers(answers_path, kept)
    if len({r["index"] for r in kept}) != len(done_index):
        raise ModelFormatError(f"{answers_path} lacks answers of existing shards; use another work folder")

    todo_shards = [k for k in range(n_shards) if k not in done_shards]
    work_items: list[tuple[int, list[int]]] = []
    expected: dict[int, list[int]] = {}  # shard -> indices it will hold
    skipped = 0
    for k in todo_shards:
        enc = []
        for i in range(k * per, min(len(prompts), (k + 1) * per)):
            ids = target.tokenizer.encode_prompt(prompts[i].text, chat=True)
            if len(ids) > max_prompt_tokens:
                skipped += 1
                continue
            enc.append((i, ids))
        expected[k] = [i for i, _ in enc]
        work_items += sorted(enc, key=lambda x: len(x[1]))  # similar prompt lengths share a prefill bucket

    pending: dict[int, Finished] = {}
    next_shard = iter(todo_shards)
    stats = {"conversations": 0, "answer_tokens": 0, "tokens": 0, "steps": 0, "busy_row_steps": 0}
    bar = tqdm(total=len(work_items), unit="conv", desc="distill", disable=not progress)
    t0 = time.perf_counter()

    def on_step(busy: int) -> None:
        stats["steps"] += 1
        stats["busy_row_steps"] += busy

    def flush(k: int) -> None:
        convs = [pending.pop(i) for i in expected[k]]
        d = F.shard_dir(folder, k)
        tmp = folder / f".tmp-{k:05d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        lengths = np.array([len(c.prompt_ids) + len(c.answer_ids) for c in convs], np.int64)
        arrays = {
            "feats": np.concatenate([c.feats for c in convs]) if convs else np.zeros((0, h), np.uint16),
            "ids": np.asarray([t for c in convs for t in c.prompt_ids + c.answer_ids], np.int32),
            "argmax": np.concatenate([c.greedy for c in convs]) if convs else np.zeros(0, np.int32),
            "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            "prompt_len": np.array([len(c.prompt_ids) for c in convs], np.int32),
            "index": np.array([c.key for c in convs], np.int64),
        }
        if feature_layers:  # features.py's name, so that extract_taps finds the shard done
            arrays[F.taps_file(feature_layers)[:-len(".npy")]] = (
                np.concatenate([c.taps for c in convs]) if convs else np.zeros((0, len(feature_layers) * h), np.uint16))
        for name, arr in arrays.items():
            np.save(tmp / f"{name}.npy", arr)
        meta = {"format": F.FORMAT, "target": {"name": target.cfg.name, "sha256": sha}, "hidden_size": h,
                "vocab_size": target.cfg.vocab_size, "feature_dtype": "bfloat16", "first_record": k * per,
                "records": len(convs), "tokens": int(lengths.sum()), "max_len": max_prompt_tokens + max_new_tokens,
                "distill": {"prompts_sha256": _prompts_digest(prompts[k * per:(k + 1) * per]),
                            "max_new_tokens": max_new_tokens,
                            "skipped_long_prompts": min(per, len(prompts) - k * per) - len(convs)}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        with answers_path.open("a", encoding="utf-8") as f:  # answers first: a crash now only costs this shard
            for c in convs:
                p = prompts[c.key]
                f.write(json.dumps({"index": c.key, "source": p.source, "prompt": p.text, "prompt_ids": c.prompt_ids,
                                    "answer_ids": c.answer_ids, "target_sha256": sha}) + "\n")
        tmp.rename(d)

    k_wait = next(next_shard, None)
    for conv in run_batch(target.params, target.cfg, work_items, max_new_tokens=max_new_tokens,
                          eos_ids=target.eos_ids, batch_size=batch_size, refill_rows=refill_rows,
                          max_prompt_tokens=max_prompt_tokens, feature_layers=tuple(feature_layers),
                          on_step=on_step):
        pending[conv.key] = conv
        stats["conversations"] += 1
        stats["answer_tokens"] += len(conv.answer_ids)
        stats["tokens"] += len(conv.prompt_ids) + len(conv.answer_ids)
        while k_wait is not None and all(i in pending for i in expected[k_wait]):
            flush(k_wait)
            k_wait = next(next_shard, None)
        dt = time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(tok_s=f"{stats['tokens'] / dt:.0f}", answer_tok_s=f"{stats['answer_tokens'] / dt:.0f}")
    while k_wait is not None:  # shards whose prompts were all skipped
        flush(k_wait)
        k_wait = next(next_shard, None)
    bar.close()
    seconds = time.perf_counter() - t0
    return {"shards": n_shards, "written": len(todo_shards), "skipped_long_prompts": skipped, **stats,
            "seconds": seconds, "tokens_per_s": stats["tokens"] / max(seconds, 1e-9),
            "answer_tokens_per_s": stats["answer_tokens"] / max(seconds, 1e-9),
            "row_utilisation": stats["busy_row_steps"] / max(1, stats["steps"] * batch_size)}
