"""Command-line values shared by the `dovetail` subcommands and the benches.

argparse value types (each rejects bad input with one clear message) and the draft/tree flags as one typed
object, so the CLI and the benches build trees and random drafts from flags the same way. No JAX import.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from dovetail_jax.config import TREE_PRESETS, DraftConfig, TreeConfig


def positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def nonneg_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def nonneg_float(s: str) -> float:
    v = float(s)
    if not v >= 0 or math.isinf(v):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {s}")
    return v


def positive_float(s: str) -> float:
    """A finite number > 0, such as a learning rate (nan and inf are refused: they train nothing)."""
    v = float(s)
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {s}")
    return v


SEED_LIMIT = 2**63  # JAX keys and numpy generators take seeds below this


def seed_int(s: str) -> int:
    """A random seed in [0, 2^63): larger values overflow JAX's key, negative ones numpy's generator."""
    v = int(s)
    if not 0 <= v < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2^63), got {s}")
    return v


def probability(s: str) -> float:
    """A value in (0, 1], such as top-p."""
    v = float(s)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {s}")
    return v


def nonempty_text(s: str) -> str:
    if not s.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return s


# --- the draft and tree flags, shared by `generate --mode dovetail` and `bench dovetail` -------------------------

TREE_FLAGS = ("tree", "tree_top_k", "depth", "total_tokens")
RANDOM_FLAGS = ("draft_layers", "draft_fusion", "draft_vocab")


def flag(name: str) -> str:
    """The command-line spelling of an option's field name: draft_vocab -> --draft-vocab."""
    return "--" + name.replace("_", "-")


def tree_from_options(preset: str | None = None, top_k: int | None = None, depth: int | None = None,
                      total_tokens: int | None = None) -> TreeConfig:
    """A preset tree (None: the default one) with any of its sizes replaced; an impossible tree is a ConfigError."""
    base = TREE_PRESETS[preset] if preset else TreeConfig()
    return TreeConfig(top_k=top_k or base.top_k, depth=depth or base.depth,
                      total_tokens=total_tokens or base.total_tokens)


@dataclass(frozen=True)
class DraftFlags:
    """What --draft, the tree flags and the random-draft shaping flags say (None: not given).

    The CLI fills it from its arguments; `generate` and `bench dovetail` read the same flags the same way.
    """

    draft: str | None = None
    tree: str | None = None
    tree_top_k: int | None = None
    depth: int | None = None
    total_tokens: int | None = None
    draft_layers: int | None = None
    draft_fusion: str | None = None
    draft_vocab: int | None = None

    def given(self, names: tuple[str, ...]) -> list[str]:
        """The fields among `names` that were given."""
        return [n for n in names if getattr(self, n) is not None]

    def tree_config(self) -> TreeConfig:
        return tree_from_options(self.tree, self.tree_top_k, self.depth, self.total_tokens)

    def random_config(self) -> DraftConfig:
        """The shape of the random draft used when no trained one is given."""
        return DraftConfig(num_layers=self.draft_layers or 1, fusion=self.draft_fusion or "dgf",
                           draft_vocab_size=self.draft_vocab)
