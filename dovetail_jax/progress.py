"""Progress notes for a person at a terminal: a cold `dovetail generate --mode dovetail` spends ~15 s loading the
models and compiling before its first token, which would otherwise be silence.

Off by default: a library prints nothing unasked, and pipes, tests and `--json` readers must get nothing.
`to_terminal()` turns the notes on when stderr is a terminal (the CLI calls it); `set_sink(fn)` sends them
anywhere (a notebook, a log). `api.load_target`, `api.load_draft` and `api.generate` report through `note()`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

Sink = Callable[[str], None]
_sink: Sink | None = None


def set_sink(sink: Sink | None) -> Sink | None:
    """Send progress notes to `sink` (None: drop them). Returns the previous sink, to restore it."""
    global _sink
    previous, _sink = _sink, sink
    return previous


def to_terminal(stream: TextIO | None = None) -> bool:
    """Print notes as `dovetail: ...` lines on `stream` (default: stderr) if, and only if, it is a terminal.
    Returns whether notes are now on; a pipe or file leaves the current sink alone."""
    out = stream if stream is not None else sys.stderr
    isatty = getattr(out, "isatty", None)
    if not (callable(isatty) and isatty()):
        return False
    set_sink(lambda message: print(f"dovetail: {message}", file=out, flush=True))
    return True


def note(message: str) -> None:
    """Report one step (a short phrase ending in '...') to the sink, if any."""
    if _sink is not None:
        _sink(message)


def short_path(path: str | Path) -> str:
    """`path` with the home directory written as ~ (shorter lines)."""
    p, home = str(path), str(Path.home())
    return "~" + p[len(home):] if home not in ("", "/") and p.startswith(home + "/") else p
