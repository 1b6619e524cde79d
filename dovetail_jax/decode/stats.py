"""The result record of a generation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


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
