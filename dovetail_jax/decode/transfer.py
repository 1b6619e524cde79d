"""The counter of a Dovetail generation: the only code that moves arrays between the target's and the draft's
devices, and the clock of each phase of the cycle.

Every crossing is one `device_put` of a tuple of arrays, waited for, so its time is the transfer's own and its
bytes are the arrays' sizes (padding included: what actually moves).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from dovetail_jax.devices import Placement
from dovetail_jax.stats import PhaseTimes, Transfers


def nbytes(*xs: Any) -> int:
    return sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize for x in xs)


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
        moved = jax.block_until_ready(jax.device_put(arrays, device))
        self.transfer += time.perf_counter() - t0
        return moved, nbytes(*arrays)

    def phase_times(self) -> PhaseTimes:
        return PhaseTimes(verify=self.verify, draft=self.draft, transfer=self.transfer, host=self.host)

    def transfers(self, prefill_bytes_to_draft: int) -> Transfers:
        return Transfers(self.bytes_to_draft, self.bytes_to_target, self.transfers_to_draft,
                         self.transfers_to_target, prefill_bytes_to_draft)
