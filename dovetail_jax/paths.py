"""Where the package keeps what it makes on disk: the one place that reads `$DOVETAIL_CACHE_DIR`.

Everything lives under one cache root (default `~/.cache/dovetail_jax`), never in the repository: XLA's
compiled executables, F32 copies of GGUF files for llama.cpp, built kernels, and training work folders. The
environment is read on every call, so a test or a user can point it elsewhere at any time.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "DOVETAIL_CACHE_DIR"


def cache_root() -> Path:
    """`$DOVETAIL_CACHE_DIR`, default `~/.cache/dovetail_jax`."""
    return Path(os.environ.get(ENV, Path.home() / ".cache" / "dovetail_jax"))


def xla_cache() -> Path:
    """JAX's persistent compilation cache (a second run of a configuration does not compile again)."""
    return cache_root() / "xla"


def f32_gguf_cache() -> Path:
    """F32 GGUF copies of models, converted once for llama.cpp."""
    return cache_root() / "f32_gguf"


def kernels_cache() -> Path:
    """Built native kernels."""
    return cache_root() / "kernels"


def train_work() -> Path:
    """Parent of the training work folders (answers, feature shards, runs), one per target."""
    return cache_root() / "train"
