"""Explicit device setup: importing the package leaves JAX alone; `devices.setup()` makes the second host
device (idempotently) and says so when it is called too late. Each case runs in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {"DOVETAIL_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)


def test_imports_leave_jax_config_alone(tmp_path):
    run("import jax\n"
        "before = (jax.config.jax_num_cpu_devices, jax.config.jax_compilation_cache_dir)\n"
        "import dovetail_jax.api, dovetail_jax.decode.dovetail, dovetail_jax.model.target, dovetail_jax.devices\n"
        "assert (jax.config.jax_num_cpu_devices, jax.config.jax_compilation_cache_dir) == before\n"
        "assert len(jax.devices('cpu')) == 1\n", tmp_path)


def test_setup_then_placement(tmp_path):
    run("from dovetail_jax import devices\n"
        "devices.setup(); devices.setup()  # idempotent\n"
        "p = devices.placement()\n"
        "assert p.target != p.draft and not p.shared, p\n"
        "assert set(p.describe()) == {'target', 'draft'}\n"
        "import jax\n"
        f"assert jax.config.jax_compilation_cache_dir == {str(tmp_path / 'xla')!r}\n"
        "x = jax.device_put(1.0, p.draft)\n"
        "assert devices.Placement.of(jax.device_put(1.0, p.target), x) == p\n", tmp_path)


def test_setup_too_late_warns(tmp_path):
    out = run("import jax\n"
              "jax.devices()  # the backend starts with one host device\n"
              "from dovetail_jax import devices\n"
              "devices.setup()\n"
              "assert devices.placement().shared\n", tmp_path)
    assert "after JAX's backend started" in out.stderr
