"""Feature extraction: the target's final-norm hidden states over the self-distilled conversations, in shards.

A shard is a folder `shard-NNNNN/` holding, for `SHARD_RECORDS` conversations concatenated:
`feats.npy` (bfloat16 bits as uint16, `[N, H]`), `ids.npy` (`[N]` int32 token ids), `argmax.npy` (`[N]`
int32, the target's greedy next token after each position, for top-1 agreement), `offsets.npy` (`[S+1]`
int64 row ranges), `prompt_len.npy` (`[S]` int32; the loss covers the answer only) and `index.npy` (`[S]`
int64, each conversation's prompt index, which decides the held-out split), plus `meta.json`
naming the target (name and weights sha256). Shards are written to a temporary folder and renamed, so a
shard either exists whole or not at all, and an interrupted extraction resumes at the first missing one.
The forwards are the target's fast prefill path (`empty_cache`), batched over sequences of similar length.

Multi-layer features (a draft with `DraftConfig.feature_layers`, EAGLE-3) are added to existing shards by
`extract_taps`: `taps-<i>-<j>-<k>.npy` (bfloat16 bits, `[N, k H]`, the blocks' outputs side by side), one more
prefill over each shard's own token ids, written whole (temporary name, then rename) and skipped when present.
`load_features(..., taps=...)` maps those files instead of reading them into memory (3.5 kB a token for SmolLM2
with 3 blocks).
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tqdm import tqdm

from dovetail_jax.config import ModelConfig
from dovetail_jax.errors import ModelFormatError
from dovetail_jax.model.cache import init_cache
from dovetail_jax.model.params import TargetParams
from dovetail_jax.model.target import causal_mask, forward, lm_head
from dovetail_jax.plan import feature_batch

FORMAT = "dovetail-features/1"
SHARD_RECORDS = 128
MAX_LEN = 512
_FILES = ("feats.npy", "ids.npy", "argmax.npy", "offsets.npy", "prompt_len.npy", "index.npy")


def _features(params: TargetParams, tokens: jax.Array, *, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cache = init_cache(cfg, 1, batch=b)  # never read: empty_cache
    _, hidden, _ = forward(params, cfg, tokens, positions, causal_mask(t), cache, "none", empty_cache=True)
    logits = lm_head(hidden, params.head)  # [B, T, V]
    return hidden.astype(jnp.bfloat16), jnp.argmax(logits, -1).astype(jnp.int32)


@functools.cache
def _jitted(cfg: ModelConfig):
    return jax.jit(functools.partial(_features, cfg=cfg))


def _tapped(params: TargetParams, tokens: jax.Array, *, cfg: ModelConfig, taps: tuple[int, ...]) -> jax.Array:
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cache = init_cache(cfg, 1, batch=b)  # never read: empty_cache
    _, feats, _ = forward(params, cfg, tokens, positions, causal_mask(t), cache, "none", empty_cache=True, taps=taps)
    return feats.astype(jnp.bfloat16)


@functools.cache
def _jitted_taps(cfg: ModelConfig, taps: tuple[int, ...]):
    return jax.jit(functools.partial(_tapped, cfg=cfg, taps=taps))


def _batched(fn: Any, seqs: Sequence[list[int]], tokens_per_batch: int) -> list[list[np.ndarray]]:
    """`fn(tokens [b, t])`'s per-position outputs for every sequence, in batches of similar length (sorted,
    padded to a power of two: one compiled shape per length); per sequence, one array per output of `fn`."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out: list[list[np.ndarray]] = [[] for _ in seqs]
    sorted_lengths = [len(seqs[i]) for i in order]
    k = 0
    while k < len(order):
        t, b = feature_batch(sorted_lengths, k, tokens_per_batch)
        rows = order[k:k + b]
        tok = np.zeros((b, t), np.int32)  # rows past the end of `rows` stay padding
        for j, i in enumerate(rows):
            tok[j, : len(seqs[i])] = seqs[i]
        res = [np.asarray(r) for r in fn(jnp.asarray(tok))]
        for j, i in enumerate(rows):
            out[i] = [r[j, : len(seqs[i])] for r in res]
        k += len(rows)
    return out


def sequences(records: Sequence[dict[str, Any]], max_len: int = MAX_LEN) -> list[tuple[list[int], int]]:
    """(prompt + answer ids cut to `max_len`, prompt length) per record."""
    return [((r["prompt_ids"] + r["answer_ids"])[:max_len], len(r["prompt_ids"])) for r in records]


def extract_shard(params: TargetParams, cfg: ModelConfig, seqs: Sequence[tuple[list[int], int]],
                  tokens_per_batch: int = 4096) -> dict[str, np.ndarray]:
    """Arrays of one shard (see the module docstring), computed in batches of similar length."""
    fn = _jitted(cfg)
    per_seq = _batched(lambda tok: fn(params, tok), [s[0] for s in seqs], tokens_per_batch)
    lengths = np.array([len(s[0]) for s in seqs], np.int64)
    return {
        "feats": np.concatenate([x[0].view(np.uint16) for x in per_seq]),
        "ids": np.concatenate([np.asarray(s[0], np.int32) for s in seqs]),
        "argmax": np.concatenate([x[1] for x in per_seq]),
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "prompt_len": np.array([s[1] for s in seqs], np.int32),
    }


def taps_file(layers: Sequence[int]) -> str:
    return "taps-" + "-".join(str(i) for i in layers) + ".npy"


def extract_taps(target: Any, folder: Path, layers: tuple[int, ...], progress: bool = True,
                 tokens_per_batch: int = 4096) -> dict[str, Any]:
    """Add the outputs of target blocks `layers` (`[N, len(layers) * H]` bfloat16 bits) to every shard of
    `folder` that lacks them; each shard's own token ids are run again (the features of the distillation pass
    are the final norm's only). Resumes: a shard's file is written whole or not at all."""
    shards = sorted(p for p in folder.glob("shard-*") if p.is_dir())
    name = taps_file(layers)
    todo = [d for d in shards if not (d / name).is_file()]
    bar = tqdm(total=len(shards), initial=len(shards) - len(todo), unit="shard", desc=f"taps {layers}",
               disable=not progress)
    fn = _jitted_taps(target.cfg, tuple(layers))
    t0, tokens = time.perf_counter(), 0
    for d in todo:
        check_shard(d, target.sha256, target.cfg.hidden_size)
        ids, offsets = np.load(d / "ids.npy"), np.load(d / "offsets.npy")
        seqs = [ids[offsets[i]:offsets[i + 1]].tolist() for i in range(offsets.size - 1)]
        per_seq = _batched(lambda tok: (fn(target.params, tok),), seqs, tokens_per_batch)
        arr = np.concatenate([x[0].view(np.uint16) for x in per_seq])
        tmp = d / (name + ".tmp")
        with tmp.open("wb") as fh:
            np.save(fh, arr)
        tmp.replace(d / name)
        tokens += int(ids.size)
        bar.update(1)
        bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
    bar.close()
    return {"layers": list(layers), "shards": len(shards), "extracted": len(todo), "tokens": tokens,
            "seconds": time.perf_counter() - t0}


def _meta(target_name: str, sha256: str, cfg: ModelConfig, first: int, count: int, n_tokens: int) -> dict:
    return {"format": FORMAT, "target": {"name": target_name, "sha256": sha256}, "hidden_size": cfg.hidden_size,
            "vocab_size": cfg.vocab_size, "feature_dtype": "bfloat16", "first_record": first, "records": count,
            "tokens": n_tokens, "max_len": MAX_LEN}


def shard_dir(folder: Path, k: int) -> Path:
    return folder / f"shard-{k:05d}"


def read_meta(shard: Path) -> dict[str, Any]:
    try:
        meta = json.loads((shard / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{shard}: unreadable meta.json ({e})") from None
    if meta.get("format") != FORMAT:
        raise ModelFormatError(f"{shard}: not a feature shard (format {meta.get('format')!r}, expected {FORMAT!r})")
    return meta


def extract_all(target: Any, records: Sequence[dict[str, Any]], folder: Path, progress: bool = True) -> dict:
    """Write every missing shard of `records` under `folder`; existing shards must belong to this target."""
    folder.mkdir(parents=True, exist_ok=True)
    n_shards = (len(records) + SHARD_RECORDS - 1) // SHARD_RECORDS
    todo = []
    for k in range(n_shards):
        d = shard_dir(folder, k)
        if d.exists():
            meta = check_shard(d, target.sha256, target.cfg.hidden_size)
            if meta["records"] == min(SHARD_RECORDS, len(records) - k * SHARD_RECORDS):
                continue
            shutil.rmtree(d)  # a short last shard, written before more answers arrived
        todo.append(k)
    bar = tqdm(total=n_shards, initial=n_shards - len(todo), unit="shard", desc="features", disable=not progress)
    t0, tokens = time.perf_counter(), 0
    for k in todo:
        first = k * SHARD_RECORDS
        recs = records[first:first + SHARD_RECORDS]
        arrays = extract_shard(target.params, target.cfg, sequences(recs))
        arrays["index"] = np.array([r["index"] for r in recs], np.int64)
        tmp = folder / f".tmp-{k:05d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name, arr in arrays.items():
            np.save(tmp / f"{name}.npy", arr)
        meta = _meta(target.cfg.name, target.sha256, target.cfg, first, len(recs), int(arrays["ids"].size))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        tmp.rename(shard_dir(folder, k))
        tokens += int(arrays["ids"].size)
        bar.update(1)
        bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
    bar.close()
    return {"shards": n_shards, "extracted": len(todo), "tokens": tokens, "seconds": time.perf_counter() - t0}


def check_shard(shard: Path, sha256: str | None, hidden_size: int) -> dict[str, Any]:
    """The shard's meta, after checking it belongs to this target and has all its files."""
    meta = read_meta(shard)
    if sha256 is not None and meta["target"]["sha256"] != sha256:
        raise ModelFormatError(
            f"{shard}: features of another model ({meta['target']['name']}, weights sha256 "
            f"{meta['target']['sha256'][:12]}…), not of this target ({sha256[:12]}…); use another --work folder")
    if meta.get("hidden_size") != hidden_size:
        raise ModelFormatError(f"{shard}: hidden size {meta.get('hidden_size')} != the target's {hidden_size}")
    missing = [f for f in _FILES if not (shard / f).is_file()]
    if missing:
        raise ModelFormatError(f"{shard}: missing {', '.join(missing)}; delete the shard folder to re-extract it")
    return meta


@dataclass
class Taps:
    """Multi-layer features of a feature set, mapped from the shards' files (not read into memory)."""

    layers: tuple[int, ...]
    parts: list[np.ndarray]  # per shard [n, width] bfloat16 (memory-mapped)
    starts: np.ndarray  # [shards + 1] int64: each shard's first row in the feature set

    @property
    def width(self) -> int:
        return int(self.parts[0].shape[1])

    def rows(self, a: int, n: int) -> np.ndarray:
        """Rows `a .. a + n` (one conversation: never across shards)."""
        k = int(np.searchsorted(self.starts, a, side="right")) - 1
        lo = a - int(self.starts[k])
        return self.parts[k][lo:lo + n]


@dataclass
class FeatureSet:
    """All shards of a folder in memory (bfloat16 features: ~1.2 kB per token for SmolLM2)."""

    feats: np.ndarray  # [N, H] bfloat16
    ids: np.ndarray  # [N] int32
    argmax: np.ndarray  # [N] int32
    offsets: np.ndarray  # [S+1] int64
    prompt_len: np.ndarray  # [S] int32
    record_index: np.ndarray  # [S] int64: prompt index of each conversation (decides the held-out split)
    meta: dict[str, Any]
    taps: Taps | None = None  # with `load_features(taps=...)`: the multi-layer features

    @property
    def num_sequences(self) -> int:
        return int(self.prompt_len.size)


def load_features(folder: Path, sha256: str | None, hidden_size: int, taps: tuple[int, ...] = ()) -> FeatureSet:
    """Every shard of `folder` (and, with `taps`, their multi-layer features of those blocks, memory-mapped)."""
    shards = sorted(p for p in folder.glob("shard-*") if p.is_dir())
    if not shards:
        raise ModelFormatError(f"{folder}: no feature shards; run `dovetail train-draft` data preparation first")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("feats", "ids", "argmax", "prompt_len", "lengths", "rec")}
    tap_parts: list[np.ndarray] = []
    meta = {}
    for shard in shards:
        meta = check_shard(shard, sha256, hidden_size)
        try:
            # features memory-mapped: the concatenation below is the only copy in memory (loading each shard and
            # then concatenating held every feature twice at once: ~20 GB for round 12's data on a 24 GB machine)
            arr = {n: np.load(shard / f"{n}.npy", mmap_mode="r" if n == "feats" else None)
                   for n in ("feats", "ids", "argmax", "offsets", "prompt_len", "index")}
        except (OSError, ValueError) as e:
            raise ModelFormatError(f"{shard}: damaged array file ({e}); delete the shard folder to re-extract it") \
                from None
        n = int(arr["offsets"][-1])
        ok = (arr["feats"].shape == (n, hidden_size) and arr["ids"].shape == (n,) and arr["argmax"].shape == (n,)
              and arr["prompt_len"].size == arr["offsets"].size - 1 == meta["records"] == arr["index"].size)
        if not ok:
            raise ModelFormatError(f"{shard}: array shapes disagree with each other or with meta.json; "
                                   "delete the shard folder to re-extract it")
        if taps:
            try:
                tp = np.load(shard / taps_file(taps), mmap_mode="r")
            except (OSError, ValueError) as e:
                raise ModelFormatError(f"{shard}: no readable {taps_file(taps)} ({e}); extract the features of "
                                       f"blocks {taps} first (features.extract_taps)") from None
            if tp.shape != (n, len(taps) * hidden_size):
                raise ModelFormatError(f"{shard}: {taps_file(taps)} has shape {tp.shape}, expected "
                                       f"{(n, len(taps) * hidden_size)}; delete it to extract it again")
            tap_parts.append(tp.view(ml_dtypes.bfloat16))
        parts["feats"].append(arr["feats"])
        parts["ids"].append(arr["ids"])
        parts["argmax"].append(arr["argmax"])
        parts["prompt_len"].append(arr["prompt_len"])
        parts["lengths"].append(np.diff(arr["offsets"]))
        parts["rec"].append(arr["index"])
    lengths = np.concatenate(parts["lengths"])
    return FeatureSet(
        feats=np.concatenate(parts["feats"]).view(ml_dtypes.bfloat16),
        ids=np.concatenate(parts["ids"]),
        argmax=np.concatenate(parts["argmax"]),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        prompt_len=np.concatenate(parts["prompt_len"]),
        record_index=np.concatenate(parts["rec"]).astype(np.int64),
        meta=meta,
        taps=Taps(taps, tap_parts, np.concatenate([[0], np.cumsum([p.shape[0] for p in tap_parts])]).astype(np.int64))
        if taps else None,
    )
