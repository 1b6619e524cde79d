"""Benchmark results on disk: JSON under analysis/results/, written atomically (never a half-written file).

A result file is replaced only by a complete run: progress goes to `partial_path(out)` beside it, which the
finished run removes, so an interrupted or failed run leaves the committed file byte-identical."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` for a temporary path beside `path`, then rename it to `path`: an interruption or error
    at any point leaves the file that was there byte-identical, and no temporary file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as indented JSON to `path` via a temporary file and a rename."""
    text = json.dumps(data, indent=1) + "\n"  # serialised first: a value JSON cannot hold fails before any write
    write_atomic(path, lambda tmp: tmp.write_text(text))


def partial_path(path: Path) -> Path:
    """Where a run in progress keeps its results: x.json -> x.partial.json, beside the final file."""
    return path.with_name(f"{path.stem}.partial{path.suffix or '.json'}")

