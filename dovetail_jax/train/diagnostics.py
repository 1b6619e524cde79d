"""Data diagnostics for a draft: how much of the target's greedy output its reduced vocabulary can even name.

A draft with a reduced vocabulary (`vocab_map`, the V' target ids its head scores) cannot propose a token
outside it: every such greedy target token is a certain miss at that depth, whatever the draft learned. The
coverage of the target's greedy outputs by `vocab_map` is thus an upper bound on the draft's top-1.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dovetail_jax.errors import ModelFormatError
from dovetail_jax.io.checkpoint import VOCAB_MAP, WEIGHTS
from dovetail_jax.io.hf import read_safetensors
from dovetail_jax.train.features import FeatureSet


def checkpoint_vocab_map(folder: str | Path) -> np.ndarray | None:
    """The reduced vocabulary of a draft checkpoint (None: the draft scores the full vocabulary)."""
    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise ModelFormatError(f"{folder}: {WEIGHTS} is missing")
    vm = read_safetensors(path).get(VOCAB_MAP)
    return None if vm is None else np.asarray(vm, np.int64)


def vocab_coverage(vocab_map: np.ndarray | None, tokens: np.ndarray) -> float:
    """Fraction of `tokens` that lie inside `vocab_map` (1.0 for a full-vocabulary draft or no tokens)."""
    tokens = np.asarray(tokens).ravel()
    if vocab_map is None or tokens.size == 0:
        return 1.0
    return float(np.isin(tokens, np.asarray(vocab_map)).mean())


def answer_tokens(records: Iterable[dict[str, Any]]) -> np.ndarray:
    """All answer tokens of answers-file records (the target's greedy outputs), concatenated."""
    parts = [np.asarray(r["answer_ids"], np.int64) for r in records]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def greedy_answer_tokens(fs: FeatureSet, seqs: Sequence[int] | None = None) -> np.ndarray:
    """The target's greedy next token at every trained position of feature shards (from the last prompt token
    to the one before the last answer token: the positions whose prediction is an answer token)."""
    seqs = range(fs.num_sequences) if seqs is None else seqs
    parts = []
    for s in seqs:
        a, b = int(fs.offsets[s]), int(fs.offsets[s + 1])
        parts.append(fs.argmax[a + max(0, int(fs.prompt_len[s]) - 1): b - 1])
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def coverage_report(folder: str | Path, tokens: np.ndarray) -> dict[str, Any]:
    """Coverage of `tokens` by the checkpoint in `folder`, and the most frequent tokens it misses."""
    vm = checkpoint_vocab_map(folder)
    tokens = np.asarray(tokens, np.int64).ravel()
    out: dict[str, Any] = {"checkpoint": str(folder), "draft_vocab": None if vm is None else int(vm.size),
                           "tokens": int(tokens.size), "coverage": vocab_coverage(vm, tokens)}
    if vm is not None and tokens.size:
        miss = tokens[~np.isin(tokens, vm)]
        ids, counts = np.unique(miss, return_counts=True)
        top = np.argsort(-counts, kind="stable")[:20]
        out["missed_distinct"] = int(ids.size)
        out["top_missed"] = [[int(ids[i]), int(counts[i])] for i in top]
    return out
