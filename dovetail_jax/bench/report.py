"""What the benches print and record besides their measurements: progress lines, the command that ran, and the
small number formatting and ratio helpers their tables share. No JAX import: the CLI imports the benches cheaply.
"""

from __future__ import annotations

import shlex
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


def sayer(tag: str) -> Callable[[str], None]:
    """A progress printer to stderr, each line prefixed with `[tag]` (stdout stays for tables and JSON)."""

    def say(msg: str) -> None:
        print(f"[{tag}] {msg}", file=sys.stderr, flush=True)

    return say


def command_line() -> str:
    """The command as the user typed it, for the result file (`python -m dovetail_jax.cli` when run as a module)."""
    prog = Path(sys.argv[0]).name
    prog = "python -m dovetail_jax.cli" if prog in ("cli.py", "__main__.py") else prog
    return " ".join([prog, shlex.join(sys.argv[1:])])


def fmt(x: float | None, spec: str) -> str:
    """`x` formatted with `spec`, or "-" for a missing number."""
    return "-" if x is None else format(x, spec)


def rate(n: float, seconds: float) -> float | None:
    """n per second, None without time."""
    return n / seconds if seconds > 0 else None


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, None when either is missing or b is zero."""
    return a / b if a is not None and b else None


def median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None
