"""Command-line values shared by the `dovetail` subcommands and the benches.

argparse value types (each rejects bad input with one clear message) and the draft/tree flags as one typed
object, so the CLI and the benches build trees and random drafts from flags the same way. No JAX import.
"""

from __future__ import annotations

import argparse
import math
import os
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dovetail_jax.config import DEFAULT_TREE, TREE_PRESETS, DraftConfig, TreeConfig

INT_LIMIT = 2**31 - 1  # counts and sizes end up in int32 arrays and XLA shapes: larger ones would overflow there


def positive_int(s: str) -> int:
    v = int(s)
    if not 0 < v <= INT_LIMIT:
        raise argparse.ArgumentTypeError(f"must be a positive integer (at most 2^31 - 1), got {s}")
    return v


def nonneg_int(s: str) -> int:
    v = int(s)
    if not 0 <= v <= INT_LIMIT:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0 (at most 2^31 - 1), got {s}")
    return v


def feature_layers(s: str) -> tuple[int, ...] | str:
    """`--feature-layers`: "eagle3" (EAGLE-3's low, middle and high blocks of the target, resolved once it is
    loaded), "none" (the final-norm feature), or 2+ distinct 0-based block indices, comma-separated."""
    if s.strip().lower() in ("eagle3", "none"):
        return s.strip().lower()
    try:
        v = tuple(int(x) for x in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'eagle3', 'none' or block indices like 2,15,27; got {s!r}") \
            from None
    if len(v) < 2 or len(set(v)) != len(v) or min(v) < 0:
        raise argparse.ArgumentTypeError(f"must name 2 or more distinct blocks >= 0, got {s!r}")
    return v


def int_range(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse type for an integer in lo..hi (the help of the flag should say the same range)."""

    def parse(s: str) -> int:
        v = int(s)
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be an integer in {lo}..{hi}, got {s}")
        return v

    parse.__name__ = f"integer in {lo}..{hi}"  # argparse's "invalid <name> value" message for non-integers
    return parse


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


def utf8_text(s: str) -> str:
    """Text as given, refusing bytes that are not UTF-8: Python keeps them in argv as lone surrogates
    ("surrogateescape"), which the tokenizer and every text output would choke on."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        try:
            what = f"byte 0x{s[e.start].encode('utf-8', 'surrogateescape').hex()}"
        except UnicodeEncodeError:  # a surrogate that stands for no byte (only possible in-process)
            what = "a lone surrogate"
        raise argparse.ArgumentTypeError(f"is not valid UTF-8 text ({what} at character {e.start}); "
                                         "check the terminal's or the script's encoding") from None
    return s


def nonempty_text(s: str) -> str:
    """UTF-8 text with something in it besides white space (a prompt)."""
    if not utf8_text(s).strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return s


# --- paths: refused at parse time, before a model is loaded or a minute is spent measuring ------------------------


def _special(p: Path) -> bool:
    """An existing path that is neither a regular file nor a folder (a FIFO, socket or device): opening it can
    block forever or read endlessly."""
    try:
        mode = p.stat().st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def input_path(s: str) -> str:
    """A file or folder to read (its existence is checked by the reader, which knows what it expects); a FIFO
    or device is refused here, as reading one would hang. Preset names that are not paths pass through."""
    if not s:
        raise argparse.ArgumentTypeError("must not be empty")
    if _special(Path(s).expanduser()):
        raise argparse.ArgumentTypeError(f"{s} is not a regular file or folder (a pipe or device cannot be read "
                                         "as one)")
    return s


def input_file(s: str) -> str:
    """A file to read: as `input_path`, and not a folder."""
    if Path(input_path(s)).expanduser().is_dir():
        raise argparse.ArgumentTypeError(f"{s} is a folder, not a file")
    return s


def _probe(folder: Path, p: Path) -> None:
    """Create and remove a file in `folder`: the only test that holds for root, read-only mounts and /proc alike
    (os.access answers yes to root everywhere)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".dovetail-probe-", dir=folder)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot write {p}: {folder} is not writable ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(name)


def _creatable(p: Path, folder: bool) -> None:
    """Raise ArgumentTypeError unless `p` (a file, or a folder when `folder`) can be written or created: checked
    before any work, so a result that took minutes to compute is never lost to an unwritable path."""
    p = p.expanduser()
    if p.exists():
        if folder and not p.is_dir():
            raise argparse.ArgumentTypeError(f"{p} exists and is not a folder")
        if not folder and p.is_dir():
            raise argparse.ArgumentTypeError(f"{p} is a folder, not a file")
        if not folder and _special(p):
            raise argparse.ArgumentTypeError(f"{p} is not a regular file (a pipe or device)")
        _probe(p if folder else p.absolute().parent, p)  # a file is replaced by a rename in its folder
        return
    parent = p.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot create {p}: {parent} is not a folder")
    _probe(parent, p)


def output_file(s: str) -> Path:
    """A file to write (created with its folders, or replaced whole): it must be creatable now."""
    if not s.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    _creatable(Path(s), folder=False)
    return Path(s)


def output_dir(s: str) -> Path:
    """A folder to write into (created with its parents): it must be a folder, or creatable, now."""
    if not s.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    _creatable(Path(s), folder=True)
    return Path(s)


# --- the draft and tree flags, shared by `generate --mode dovetail` and `bench dovetail` -------------------------

TREE_FLAGS = ("tree", "tree_top_k", "depth", "total_tokens", "lookup")
RANDOM_FLAGS = ("draft_layers", "draft_fusion", "draft_vocab")


def flag(name: str) -> str:
    """The command-line spelling of an option's field name: draft_vocab -> --draft-vocab."""
    return "--" + name.replace("_", "-")


def tree_from_options(preset: str | None = None, top_k: int | None = None, depth: int | None = None,
                      total_tokens: int | None = None, lookup: int | None = None) -> TreeConfig:
    """A preset tree (None: the default one, `DEFAULT_TREE`) with any of its sizes replaced; an impossible tree is
    a ConfigError."""
    base = TREE_PRESETS[preset] if preset else DEFAULT_TREE
    return TreeConfig(top_k=top_k or base.top_k, depth=depth or base.depth,
                      total_tokens=total_tokens or base.total_tokens,
                      lookup=base.lookup if lookup is None else lookup)


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
    lookup: int | None = None
    draft_layers: int | None = None
    draft_fusion: str | None = None
    draft_vocab: int | None = None
    widen_vocab: int | None = None  # a trained draft's vocabulary widened to this many ids (`api.load_draft`)

    def given(self, names: tuple[str, ...]) -> list[str]:
        """The fields among `names` that were given."""
        return [n for n in names if getattr(self, n) is not None]

    def tree_config(self) -> TreeConfig:
        return tree_from_options(self.tree, self.tree_top_k, self.depth, self.total_tokens, self.lookup)

    def random_config(self) -> DraftConfig:
        """The shape of the random draft used when no trained one is given."""
        return DraftConfig(num_layers=self.draft_layers or 1, fusion=self.draft_fusion or "dgf",
                           draft_vocab_size=self.draft_vocab)


PROMPT_SOURCES = ("stdlib_code", "chat", "package_code", "sharegpt")  # the fields of `train.sources.Mix`


def prompt_sources(s: str) -> dict[str, int | None]:
    """`--sources a,b`: the training-prompt sources to use, as `Mix` fields (None: all of it, 0: none)."""
    names = [n.strip() for n in s.split(",") if n.strip()]
    bad = [n for n in names if n not in PROMPT_SOURCES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(PROMPT_SOURCES)}; got {s!r}")
    return {n: (None if n in names else 0) for n in PROMPT_SOURCES}
