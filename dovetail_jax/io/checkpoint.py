"""Draft checkpoints: a folder with `weights.safetensors` (the trainable weights only) and `card.json`.

The card says which target the draft belongs to (name, shapes and, when known, the SHA-256 of the target's
weights file), the draft's architecture, and whatever training and evaluation recorded. Loading is strict:
a card for another target, a missing, unexpected or mis-shaped tensor, or a damaged file is refused with one
message naming the mismatch. A draft is never loaded partly (the official code's `strict=False` silently
left the gate at its random initialisation).

A bfloat16 checkpoint is loaded for inference with its matrices kept in bfloat16 (`load_draft(keep_bf16=True)`,
the default): the compiled matmul kernel reads them as such, bit-identical to their float32 upcast and half the
bytes per draft forward. `DOVETAIL_DRAFT_F32=1` (read at load time) loads them as float32 instead, for A/B
timings. Training loads float32 (`keep_bf16=False`: optimiser updates need float32 weights).

A reduced-vocabulary draft may carry `vocab_order.npy`: every target id ranked, its own vocabulary first (in
the map's order), then the others by how often the training split's answers used them. `load_draft(vocab_size=N)`
widens the vocabulary to its first N ids: the weights do not depend on the vocabulary (the head is the
target's own, restricted to the vocabulary's rows), so a wider one scores tokens the draft could never propose.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from dovetail_jax.config import DraftConfig, ModelConfig
from dovetail_jax.errors import ConfigError, ModelFormatError
from dovetail_jax.io.hf import read_safetensors, write_safetensors
from dovetail_jax.model.draft import DraftParams, draft_params_from_tensors, draft_tensors

FORMAT = "dovetail-draft/1"
WEIGHTS = "weights.safetensors"
CARD = "card.json"
VOCAB_MAP = "vocab_map"
VOCAB_ORDER = "vocab_order.npy"


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_draft(folder: str | Path, cfg: ModelConfig, dcfg: DraftConfig, params: DraftParams,
               vocab_map: np.ndarray | None = None, target_sha256: str | None = None,
               dtype: str = "bfloat16", card_extra: dict[str, Any] | None = None) -> Path:
    """Write the draft's weights (bfloat16 or float32) and its card; files are replaced atomically."""
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"dtype must be 'bfloat16' or 'float32', got {dtype!r}")
    n_map = None if vocab_map is None else int(np.shape(vocab_map)[0])
    if n_map != dcfg.draft_vocab_size:
        raise ValueError(f"vocab_map of length {n_map} does not match draft_vocab_size {dcfg.draft_vocab_size} "
                         f"(a reduced-vocabulary draft needs its map, a full-vocabulary one none)")
    reserved = {"format", "target", "draft", "dtype"} & set(card_extra or {})
    if reserved:
        raise ValueError(f"card_extra cannot replace the card's own fields: {sorted(reserved)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    tensors: dict[str, np.ndarray] = {k: v.astype(np_dtype) for k, v in draft_tensors(params, cfg).items()}
    if vocab_map is not None:
        tensors[VOCAB_MAP] = np.asarray(vocab_map, np.int32)
    card = {
        "format": FORMAT,
        "target": {"name": cfg.name, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
                   "num_heads": cfg.num_heads, "num_kv_heads": cfg.num_kv_heads,
                   "intermediate_size": cfg.intermediate_size, "sha256": target_sha256},
        "draft": {"num_layers": dcfg.num_layers, "fusion": dcfg.fusion, "draft_vocab_size": dcfg.draft_vocab_size,
                  **({"feature_layers": list(dcfg.feature_layers)} if dcfg.feature_layers else {})},
        "dtype": dtype,
        **(card_extra or {}),
    }
    tmp = folder / (WEIGHTS + ".tmp")
    write_safetensors(tmp, tensors, {"format": FORMAT})
    os.replace(tmp, folder / WEIGHTS)
    tmp = folder / (CARD + ".tmp")
    tmp.write_text(json.dumps(card, indent=1) + "\n")
    os.replace(tmp, folder / CARD)
    return folder


def _check_order(order: np.ndarray, vocab_map: np.ndarray, vocab_size: int, where: str) -> None:
    """A ranking must hold every target id once and start with the draft's own vocabulary."""
    ok = order.ndim == 1 and order.size == vocab_size and np.issubdtype(order.dtype, np.integer)
    if not ok or not np.array_equal(np.sort(order), np.arange(vocab_size)):
        raise ModelFormatError(f"{where}: expected every target id below {vocab_size} once")
    if not np.array_equal(order[:vocab_map.size], vocab_map):
        raise ModelFormatError(f"{where}: must start with the draft's own {vocab_map.size} vocabulary ids, in order")


def save_vocab_order(folder: str | Path, order: np.ndarray, vocab_map: np.ndarray, vocab_size: int) -> Path:
    """Write a reduced-vocabulary draft's ranking of all target ids (`VOCAB_ORDER`) beside its weights."""
    path = Path(folder) / VOCAB_ORDER
    order = np.asarray(order, np.int32)
    _check_order(order, np.asarray(vocab_map, np.int32), vocab_size, str(path))
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, order, allow_pickle=False)
    os.replace(tmp, path)
    return path


def widened_vocab(folder: str | Path, vocab_map: np.ndarray, size: int, vocab_size: int) -> np.ndarray:
    """The first `size` ids of the draft's ranking (`VOCAB_ORDER`): its own vocabulary, then the ids that the
    training answers used most among the others. A ConfigError when the draft has no ranking or `size` is not
    between its vocabulary's size and the target's."""
    path = Path(folder) / VOCAB_ORDER
    if not vocab_map.size <= size <= vocab_size:
        raise ConfigError(f"a draft vocabulary of {vocab_map.size} ids can be widened to {vocab_map.size}.."
                          f"{vocab_size} ids, not {size}")
    if not path.is_file():
        raise ConfigError(f"{folder}: no {VOCAB_ORDER} (a ranking of the other ids) to widen the vocabulary with; "
                          "`python analysis/write_vocab_order.py` writes one from the draft's training data")
    try:
        order = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"{path}: unreadable ({e})") from None
    _check_order(order, vocab_map, vocab_size, str(path))
    return order[:size].astype(np.int32)


def read_card(folder: str | Path) -> dict[str, Any]:
    p = Path(folder)
    card_path = p / CARD
    if not p.is_dir() or not card_path.is_file():
        raise ModelFormatError(f"{p}: not a draft checkpoint (expected a folder with {CARD} and {WEIGHTS})")
    try:
        card = json.loads(card_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{card_path}: cannot read the card ({e})") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise ModelFormatError(f"{card_path}: not a {FORMAT} card")
    return card


def draft_config_from_card(card: dict[str, Any], where: str) -> DraftConfig:
    d = card.get("draft")
    if not isinstance(d, dict):
        raise ModelFormatError(f"{where}: the card has no 'draft' section")
    try:
        return DraftConfig(num_layers=int(d["num_layers"]), fusion=d["fusion"],
                           draft_vocab_size=None if d.get("draft_vocab_size") is None else int(d["draft_vocab_size"]),
                           feature_layers=tuple(int(i) for i in d.get("feature_layers", ())))
    except (KeyError, TypeError, ValueError, ConfigError) as e:
        raise ModelFormatError(f"{where}: bad 'draft' section in the card ({e})") from None


def check_card_target(card: dict[str, Any], cfg: ModelConfig, where: str, target_sha256: str | None = None) -> None:
    """Refuse a draft made for another target: name, shapes, and the weights' hash when both sides know it."""
    t = card.get("target") or {}
    for field, want in (("hidden_size", cfg.hidden_size), ("vocab_size", cfg.vocab_size),
                        ("num_heads", cfg.num_heads), ("num_kv_heads", cfg.num_kv_heads),
                        ("intermediate_size", cfg.intermediate_size)):
        if field in t and t[field] != want:
            raise ModelFormatError(f"{where}: the draft was made for a target with {field} {t[field]}, "
                                   f"this target has {want} ({cfg.name})")
    if t.get("name") and t["name"] != cfg.name:
        raise ModelFormatError(f"{where}: the draft belongs to target '{t['name']}', not '{cfg.name}'")
    if t.get("sha256") and target_sha256 and t["sha256"] != target_sha256:
        raise ModelFormatError(f"{where}: the draft belongs to another weights file of {cfg.name} "
                               f"(sha256 {t['sha256'][:12]}..., this target's is {target_sha256[:12]}...)")


def draft_f32_forced() -> bool:
    """`DOVETAIL_DRAFT_F32` is set (1/on/true/yes): load bfloat16 drafts as float32 (the A/B baseline)."""
    return os.environ.get("DOVETAIL_DRAFT_F32", "").strip().lower() in ("1", "on", "true", "yes")


def load_draft(folder: str | Path, cfg: ModelConfig, device: jax.Device | None = None,
               target_sha256: str | None = None, keep_bf16: bool = True, vocab_size: int | None = None,
               ) -> tuple[DraftConfig, DraftParams, np.ndarray | None, dict[str, Any]]:
    """(architecture, weights on `device`, vocab_map or None, card) of a draft checkpoint. The weights are
    float32, except that with `keep_bf16` (and no `DOVETAIL_DRAFT_F32`) a bfloat16 checkpoint's matrices stay
    bfloat16 (same values; see the module docstring). Never for a float32 checkpoint. `vocab_size` widens a
    reduced vocabulary to that many ids (`widened_vocab`); the architecture returned says so, the card not."""
    folder = Path(folder)
    where = str(folder)
    card = read_card(folder)
    check_card_target(card, cfg, where, target_sha256)
    dcfg = draft_config_from_card(card, where)
    try:
        dcfg.check_target(cfg)
    except ConfigError as e:
        raise ModelFormatError(f"{where}: {e}") from None
    wpath = folder / WEIGHTS
    if not wpath.is_file():
        raise ModelFormatError(f"{where}: {WEIGHTS} is missing")
    tensors = read_safetensors(wpath)
    vocab_map = tensors.pop(VOCAB_MAP, None)
    if dcfg.draft_vocab_size is not None:
        if vocab_map is None or vocab_map.shape != (dcfg.draft_vocab_size,):
            raise ModelFormatError(f"{wpath}: a reduced vocabulary of {dcfg.draft_vocab_size} needs a "
                                   f"'{VOCAB_MAP}' tensor of that length")
        if vocab_map.min() < 0 or vocab_map.max() >= cfg.vocab_size or len(np.unique(vocab_map)) != vocab_map.size:
            raise ModelFormatError(f"{wpath}: '{VOCAB_MAP}' must hold distinct ids below {cfg.vocab_size}")
    elif vocab_map is not None:
        raise ModelFormatError(f"{wpath}: unexpected '{VOCAB_MAP}' for a full-vocabulary draft")
    if vocab_size is not None and vocab_size != dcfg.draft_vocab_size:
        if vocab_map is None:
            raise ConfigError(f"{where}: a full-vocabulary draft has no reduced vocabulary to widen")
        vocab_map = widened_vocab(folder, vocab_map.astype(np.int32), vocab_size, cfg.vocab_size)
        dcfg = dataclasses.replace(dcfg, draft_vocab_size=vocab_size)
    bf16 = keep_bf16 and card.get("dtype") == "bfloat16" and not draft_f32_forced()
    params = draft_params_from_tensors(cfg, dcfg, tensors, device, source=str(wpath), keep_bf16=bf16)
    return dcfg, params, None if vocab_map is None else vocab_map.astype(np.int32), card
