"""Build hook: ship the default drafts of `checkpoints/` inside the wheel, as package data of `dovetail_jax._drafts`.

`checkpoints/` stays at the top of the repository (an editable install reads it there); a wheel carries only the
folders that `dovetail_jax.io.registry.DEFAULT_DRAFTS` names (a rename there is the only edit), mapped under the
package so `dovetail_jax.io.registry` finds them after `pip install .` too. The registry is read with `ast`, not
imported: an isolated build environment has setuptools only. pyproject.toml declares the rest and must not
have a [tool.setuptools] packages or package-data table, which would override these.
"""

from __future__ import annotations

import ast
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
DRAFTS_PACKAGE = "dovetail_jax._drafts"  # = dovetail_jax.io.registry.PACKAGED_DRAFTS_DIR's package
DRAFT_FILES = ("card.json", "weights.safetensors")  # = dovetail_jax.io.checkpoint's CARD and WEIGHTS
OPTIONAL_FILES = ("vocab_order.npy",)  # = dovetail_jax.io.checkpoint's VOCAB_ORDER, shipped when present


def shipped_drafts() -> list[str]:
    """The folder names in the `DEFAULT_DRAFTS = {sha256: folder}` literal of dovetail_jax/io/registry.py."""
    tree = ast.parse((ROOT / "dovetail_jax" / "io" / "registry.py").read_text())
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (node.targets[0] if isinstance(node, ast.Assign)
                                                                         else None)
        if isinstance(target, ast.Name) and target.id == "DEFAULT_DRAFTS" and isinstance(node.value, ast.Dict):
            names = sorted({ast.literal_eval(v) for v in node.value.values})
            missing = [f"checkpoints/{n}/{f}" for n in names for f in DRAFT_FILES
                       if not (ROOT / "checkpoints" / n / f).is_file()]
            if missing:
                raise SystemExit(f"setup.py: the default drafts are incomplete, missing {', '.join(missing)}")
            return names
    raise SystemExit("setup.py: no DEFAULT_DRAFTS = {...} literal in dovetail_jax/io/registry.py")


setup(
    packages=[*find_packages(include=["dovetail_jax*", "simulator*"]), DRAFTS_PACKAGE],
    package_dir={DRAFTS_PACKAGE: "checkpoints"},
    package_data={
        "simulator": ["presets/*.json", "data/*.json"],
        "dovetail_jax.kernels": ["*.cc", "*.h"],  # compiled on first use (dovetail_jax/kernels/__init__.py)
        DRAFTS_PACKAGE: [f"{name}/{f}" for name in shipped_drafts() for f in DRAFT_FILES + OPTIONAL_FILES
                         if f in DRAFT_FILES or (ROOT / "checkpoints" / name / f).is_file()],
    },
)
