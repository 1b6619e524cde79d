"""Benchmark results on disk: JSON under analysis/results/, written atomically (never a half-written file).

A result file is replaced only by a complete run: progress goes to `partial_path(out)` beside it, which the
finished run removes, so an interrupted or failed run leaves the committed file byte-identical."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as indented JSON to `path` via a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def partial_path(path: Path) -> Path:
    """Where a run in progress keeps its results: x.json -> x.partial.json, beside the final file."""
    return path.with_name(f"{path.stem}.partial{path.suffix or '.json'}")

