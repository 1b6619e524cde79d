"""Result files of the simulator's commands, written whole or not at all.

Each file goes to a temporary name beside it and is renamed into place only when complete, so an interrupted
or failed `simulate --out`, `profile-hw` or `plot` leaves a file that was there byte-identical (and no
temporary file behind). An unwritable path is a ConfigError naming it, not a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from simulator.errors import ConfigError


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` for a temporary path beside `path`, then rename it to `path` (creating its folders)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):  # a folder that is a file: nothing was made to clean up
            tmp.unlink(missing_ok=True)


def write_json(path: str | Path, data: Any) -> None:
    """`data` as indented JSON, atomically."""
    text = json.dumps(data, indent=1) + "\n"
    write_atomic(path, lambda tmp: tmp.write_text(text))
