"""Which device runs what, and the JAX runtime setup that must precede backend start.

The target always lives on the CPU (`jax.devices("cpu")[0]`). The draft's accelerator is the first GPU
when JAX sees one, else a second host device that this module creates (`jax_num_cpu_devices = 2`), so the
heterogeneous code path is exercised everywhere with the same code. Importing this module configures
JAX; do it before any other JAX work (the `dovetail_jax` modules that touch arrays all import it).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax

log = logging.getLogger(__name__)

NUM_HOST_DEVICES = 2


def _configure_host_devices() -> None:
    """Ask XLA for two host devices; a no-op (with a warning) if the backend already started."""
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return  # the user chose explicitly
    try:
        jax.config.update("jax_num_cpu_devices", NUM_HOST_DEVICES)
    except Exception as e:  # backend already initialised by the caller
        log.warning("could not create %d host devices (%s); the draft will share the target's device",
                    NUM_HOST_DEVICES, e)


def _configure_compilation_cache() -> None:
    """Persist compiled executables so a second run of the same configuration does not compile again."""
    path = Path(os.environ.get("DOVETAIL_CACHE_DIR", Path.home() / ".cache" / "dovetail_jax")) / "xla"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("compilation cache disabled: %s", e)
        return
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


_configure_host_devices()
_configure_compilation_cache()


def target_device() -> jax.Device:
    """The CPU device that holds the target's weights and KV cache."""
    return jax.devices("cpu")[0]


def accelerator_device() -> jax.Device:
    """The draft's device: the first GPU if any, else the second host device, else the CPU itself."""
    for platform in ("gpu", "tpu"):
        try:
            devs = jax.devices(platform)
        except RuntimeError:
            continue
        if devs:
            return devs[0]
    cpus = jax.devices("cpu")
    return cpus[1] if len(cpus) > 1 else cpus[0]


def describe() -> dict[str, str]:
    """Human-readable placement, for `--json` outputs and logs."""
    return {"target": str(target_device()), "draft": str(accelerator_device())}
