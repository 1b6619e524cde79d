"""Packaging (issue 13): a wheel built from this checkout carries the default drafts and every module, and an
install of it runs `--mode dovetail` with the trained default draft (not a random one); progress notes reach a
terminal only.

The wheel is built from a copy of the checkout (building in place would leave build/ and *.egg-info behind in
the working tree) with `pip wheel --no-deps --no-build-isolation`, and installed with `pip install --target`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from dovetail_jax import progress
from dovetail_jax.io import checkpoint
from dovetail_jax.io.registry import CHECKPOINTS_DIR, DEFAULT_DRAFTS

ROOT = Path(__file__).resolve().parents[1]
DRAFTS_IN_WHEEL = "dovetail_jax/_drafts"  # setup.py's DRAFTS_PACKAGE as a path
DRAFT_FILES = (checkpoint.CARD, "weights.safetensors")


def _pip(*args: str, cwd: Path | None = None) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, cwd=cwd,
                          env=os.environ | {"PIP_DISABLE_PIP_VERSION_CHECK": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel of this checkout (about 8 MB: one 9 MB draft, compressed)."""
    src = tmp_path_factory.mktemp("src") / "dovetail-jax"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                                             ".*_cache", ".hypothesis", "analysis", "tests"))
    out = tmp_path_factory.mktemp("wheel")
    _pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src))
    (whl,) = out.glob("dovetail_jax-*.whl")
    return whl


def test_wheel_carries_the_default_drafts_byte_identical(wheel: Path):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        shipped = {n.split("/")[2] for n in names if n.startswith(DRAFTS_IN_WHEEL + "/")}
        assert shipped == set(DEFAULT_DRAFTS.values())  # the defaults, not the ablation variants
        for name in shipped:
            for f in DRAFT_FILES:
                assert z.read(f"{DRAFTS_IN_WHEEL}/{name}/{f}") == (CHECKPOINTS_DIR / name / f).read_bytes()
            order = CHECKPOINTS_DIR / name / checkpoint.VOCAB_ORDER  # optional: shipped when the draft has one
            in_wheel = f"{DRAFTS_IN_WHEEL}/{name}/{checkpoint.VOCAB_ORDER}"
            assert (in_wheel in names) == order.is_file()
            assert not order.is_file() or z.read(in_wheel) == order.read_bytes()
    assert wheel.stat().st_size < 50 * 2**20


def test_wheel_carries_every_module_and_data_file(wheel: Path):
    """setup.py replaced pyproject's package discovery: nothing of the packages may be left out."""
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    wanted = {p.relative_to(ROOT).as_posix() for pkg in ("dovetail_jax", "simulator") for p in (ROOT / pkg).rglob("*")
              if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".json", ".cc", ".h")}
    assert wanted and wanted <= names, sorted(wanted - names)[:10]


def test_installed_wheel_runs_dovetail_with_the_default_draft(wheel: Path, smollm2_path: Path, tmp_path: Path):
    """`pip install <wheel>` (here into --target, the checkout out of sight) then `generate --mode dovetail`:
    the draft is the wheel's copy of the default, with its card, and no random-draft note is printed. The API's
    progress notes go to a sink the script sets (stdout); stderr, a pipe, gets none."""
    site = tmp_path / "site"
    _pip("install", "--no-deps", "--no-index", "--target", str(site), str(wheel))
    name = next(iter(DEFAULT_DRAFTS.values()))
    installed = site / DRAFTS_IN_WHEEL / name
    assert checkpoint.read_card(installed) == checkpoint.read_card(CHECKPOINTS_DIR / name)
    script = ("import json, sys, dovetail_jax\n"
              "from dovetail_jax import progress\n"
              "print(json.dumps({'package': dovetail_jax.__file__}))\n"
              "progress.set_sink(lambda m: print(json.dumps({'note': m}), flush=True))\n"
              "from dovetail_jax.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    argv = ["generate", "--chat", "--prompt", "What is the capital of France?", "--max-new-tokens", "8",
            "--mode", "dovetail", "--json"]
    env = os.environ | {"PYTHONPATH": str(site)}  # ahead of the editable install of this checkout
    proc = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, *notes, record = (json.loads(line) for line in proc.stdout.splitlines())
    assert Path(first["package"]).resolve().is_relative_to(site.resolve())
    assert Path(record["draft"]["source"]).resolve() == installed.resolve()
    assert record["new_tokens"] >= 1 and record["tau"] >= 1.0
    # the API's progress notes, in order, naming the devices and the wheel's draft
    assert [n["note"].split()[:2] for n in notes] == [["loading", "the"], ["loading", "the"], ["compiling", "the"]]
    assert record["devices"]["target"] in notes[0]["note"] and record["devices"]["draft"] in notes[1]["note"]
    assert progress.short_path(installed.resolve()) in notes[1]["note"]
    assert "untrained" not in proc.stderr and "Traceback" not in proc.stderr
    assert "dovetail: loading" not in proc.stderr  # stderr is a pipe here: no progress notes


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_notes_reach_a_terminal_only():
    previous = progress.set_sink(None)
    try:
        progress.note("dropped")  # off by default: nothing to write to
        pipe = io.StringIO()
        assert progress.to_terminal(pipe) is False
        progress.note("loading the target ...")
        assert pipe.getvalue() == ""
        tty = _Terminal()
        assert progress.to_terminal(tty) is True
        progress.note("loading the target ...")
        assert tty.getvalue() == "dovetail: loading the target ...\n"
        progress.to_terminal(io.StringIO())  # a pipe later does not turn a terminal sink off
        progress.note("compiling ...")
        assert tty.getvalue().splitlines()[-1] == "dovetail: compiling ..."
    finally:
        progress.set_sink(previous)
