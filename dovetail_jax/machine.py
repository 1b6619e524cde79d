"""What this machine can do: CPU identity and measured memory read bandwidth.

Decode of a small model on a CPU is bound by how fast the weights stream from DRAM, so a benchmark
reports the machine's own read bandwidth next to the bytes each token reads: the ratio says how close
to the hardware a decoder runs, independently of how loaded or fast the machine happens to be.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from dovetail_jax import devices


def memory_read_bandwidth_gbs(size_mib: int = 1024, repeats: int = 5, device: jax.Device | None = None) -> float:
    """Best-of-`repeats` GB/s of a jitted sum over a float32 array of `size_mib` MiB (well beyond the caches).

    A read-reduction writes almost nothing, so it measures the streaming read that decode is bound by.
    """
    if size_mib < 512:
        raise ValueError(f"size_mib must be >= 512 so the array does not fit in any cache, got {size_mib}")
    if repeats <= 0:
        raise ValueError(f"repeats must be positive, got {repeats}")
    device = device or devices.target_device()
    n = size_mib * 2**20 // 4
    with jax.default_device(device):
        x = jnp.ones((n,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()  # compile and touch every page once
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        total(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    nbytes = x.nbytes
    del x
    return nbytes / best / 1e9


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def load_average() -> float | None:
    """1-minute load average: a busy machine slows the spin-waiting peers (OpenMP) more than XLA, so record it."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, RAM and software versions: what a reader needs to compare two result files."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "mem_total_gib": _mem_total_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_devices": [str(d) for d in jax.devices()],
    }
