"""Timing helpers and the result record of a generation."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any


class Timer:
    """Accumulates wall time per named phase (`with timer("verify"): ...`)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    def __call__(self, name: str) -> _Phase:
        return _Phase(self, name)


class _Phase:
    def __init__(self, timer: Timer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timer.totals[self.name] = self.timer.totals.get(self.name, 0.0) + time.perf_counter() - self.t0


@dataclass
class GenerationStats:
    """What one generation did and how long it took (all times in seconds)."""

    mode: str
    prompt_tokens: int
    new_tokens: int
    stop_reason: str  # "eos" | "length"
    compile_s: float
    prefill_s: float
    decode_s: float
    decode_steps: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: tokens made by decode steps per second, excluding prefill and compile."""
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tokens_per_s"] = self.tokens_per_s
        extra = d.pop("extra")
        d.update(extra)
        return d
