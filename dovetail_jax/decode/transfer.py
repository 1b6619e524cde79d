"""The counter of a Dovetail generation: the only code that moves arrays between the target's and the draft's
devices, and the clock of each phase of the cycle.

Every crossing moves a tuple of arrays, waited for, so its time is the transfer's own and its bytes are the
arrays' sizes (padding included: what actually moves). The arrays go through host memory: `np.asarray` (one
end is always the host CPU, the target's device; from a GPU this is the device-to-host copy a direct transfer
makes too), then a jitted identity whose inputs live on the destination, so JAX's C++ dispatch copies the
host arrays there. Measured inside the decode loop on the 2 shared cores, that is ~0.26 ms per crossing where
`jax.device_put` (its Python path, the same either from the source device or from host arrays) takes ~0.6 ms.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding

from dovetail_jax.devices import Placement
from dovetail_jax.stats import PhaseTimes, Transfers


@functools.cache
def _mover(device: jax.Device) -> Callable[[tuple[np.ndarray, ...]], tuple[jax.Array, ...]]:
    """Host arrays -> the same arrays on `device` (an identity compiled per shape; the copies are its inputs'
    transfer, and donating them lets the outputs alias them)."""
    on = SingleDeviceSharding(device)
    return jax.jit(lambda xs: xs, in_shardings=on, out_shardings=on, donate_argnums=0)


@dataclass
class Counter:
    """Bytes and copies in each direction, and seconds per phase (verify, draft, transfer, host)."""

    placement: Placement
    verify: float = 0.0
    draft: float = 0.0
    transfer: float = 0.0
    host: float = 0.0
    bytes_to_draft: int = 0
    bytes_to_target: int = 0
    transfers_to_draft: int = 0
    transfers_to_target: int = 0

    def to_draft(self, arrays: tuple[jax.Array, ...]) -> tuple[Any, int]:
        """`arrays` on the draft's device, and the bytes moved."""
        moved, n = self._cross(arrays, self.placement.draft)
        self.bytes_to_draft += n
        self.transfers_to_draft += 1
        return moved, n

    def to_target(self, arrays: tuple[jax.Array, ...]) -> Any:
        """`arrays` on the target's device."""
        moved, n = self._cross(arrays, self.placement.target)
        self.bytes_to_target += n
        self.transfers_to_target += 1
        return moved

    def _cross(self, arrays: tuple[jax.Array, ...], device: jax.Device) -> tuple[Any, int]:
        t0 = time.perf_counter()
        host = tuple(np.asarray(x) for x in arrays)
        moved = jax.block_until_ready(_mover(device)(host))
        self.transfer += time.perf_counter() - t0
        return moved, sum(h.nbytes for h in host)

    def phase_times(self) -> PhaseTimes:
        return PhaseTimes(verify=self.verify, draft=self.draft, transfer=self.transfer, host=self.host)

    def transfers(self, prefill_bytes_to_draft: int) -> Transfers:
        return Transfers(self.bytes_to_draft, self.bytes_to_target, self.transfers_to_draft,
                         self.transfers_to_target, prefill_bytes_to_draft)
