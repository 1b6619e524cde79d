"""Which device runs what, and the JAX runtime setup that must precede backend start.

The target always lives on the CPU (`jax.devices("cpu")[0]`). The draft's accelerator is the first GPU
when JAX sees one, else a second host device (`jax_num_cpu_devices = 2`), so the heterogeneous code path is
exercised everywhere with the same code. Nothing happens at import: `setup()` asks for the host devices and
the persistent compilation cache, and must run before JAX's backend starts (before any array or device
query); `placement()` calls it and returns the explicit `Placement` that the API, the CLI and the decode
loops pass around.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax

from dovetail_jax import paths
from dovetail_jax.errors import ConfigError

log = logging.getLogger(__name__)

NUM_HOST_DEVICES = 2
_setup_done = False


def setup(compilation_cache: Path | None = None) -> None:
    """Configure JAX for this package: two host devices (the second stands in for the accelerator) and a
    persistent compilation cache (default `paths.xla_cache()`). Idempotent; call it before any JAX work.
    Called too late, it warns and the draft shares the target's device."""
    global _setup_done
    if _setup_done:
        return
    _setup_done = True
    _configure_host_devices()
    _configure_compilation_cache(compilation_cache or paths.xla_cache())


def _configure_host_devices() -> None:
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return  # the user chose explicitly
    try:
        jax.config.update("jax_num_cpu_devices", NUM_HOST_DEVICES)
    except RuntimeError as e:  # the backend already started
        if len(jax.devices("cpu")) < NUM_HOST_DEVICES:
            log.warning("dovetail_jax.devices.setup() ran after JAX's backend started, so the %d host devices "
                        "could not be created and the draft will share the target's device; call it before any "
                        "JAX operation (%s)", NUM_HOST_DEVICES, e)


def _configure_compilation_cache(path: Path) -> None:
    """Persist compiled executables so a second run of the same configuration does not compile again."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("compilation cache disabled: %s", e)
        return
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


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


@dataclass(frozen=True)
class Placement:
    """Where the target and the draft live (hashable: part of what a compiled decode program is for)."""

    target: jax.Device
    draft: jax.Device

    @property
    def shared(self) -> bool:
        """True when there is one device only and the draft runs beside the target."""
        return self.target == self.draft

    def describe(self) -> dict[str, str]:
        """Human-readable placement, for `--json` outputs and logs."""
        return {"target": str(self.target), "draft": str(self.draft)}

    @classmethod
    def of(cls, target_params: Any, draft_params: Any = None) -> Placement:
        """Where these weights already live (the draft beside the target when there is none)."""
        target = _device_of(target_params)
        return cls(target, target if draft_params is None else _device_of(draft_params))


def _device_of(tree: Any) -> jax.Device:
    devs = {d for x in jax.tree.leaves(tree) for d in x.devices()}
    if len(devs) != 1:
        raise ConfigError(f"weights spread over {len(devs)} devices; pass an explicit Placement")
    return devs.pop()


def placement() -> Placement:
    """Set JAX up (once) and place the target on the CPU and the draft on the accelerator."""
    setup()
    return Placement(target_device(), accelerator_device())
