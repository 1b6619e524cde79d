"""Typed statistics of a generation: what the loop measured, read by the CLI, the benches, training and the
simulator.

No JAX import (the simulator's run reader uses it). `Acceptance` is the only place τ and the per-depth
acceptance rates are computed, for one run or pooled over many (pooling sums counts, never averages ratios).
`GenerationStats.to_dict()` gives the flat JSON record of `dovetail generate --json`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from dovetail_jax.config import TreeConfig


@dataclass(frozen=True)
class Acceptance:
    """How many tokens each Dovetail cycle committed: `hist[i]` = cycles that committed i + 1 tokens (i accepted
    drafts + the target's bonus token); its length is the tree's width (the longest acceptable path + 1)."""

    hist: tuple[int, ...]

    @property
    def cycles(self) -> int:
        return sum(self.hist)

    @property
    def committed(self) -> int:
        """Tokens committed by all cycles (bonus tokens included)."""
        return sum((i + 1) * c for i, c in enumerate(self.hist))

    @property
    def tau(self) -> float | None:
        """Tokens committed per cycle (per target forward), bonus included; None without cycles."""
        return self.committed / self.cycles if self.cycles else None

    @property
    def depth_reached(self) -> list[int]:
        """Entry d: cycles that accepted >= d drafts, i.e. whose verification reached depth d + 1 (d < width)."""
        return [sum(self.hist[d:]) for d in range(len(self.hist))]

    @property
    def depth_accept_rates(self) -> list[float | None]:
        """Entry d: of the cycles that reached depth d + 1, the share that accepted a draft there (None: none
        reached it)."""
        r = self.depth_reached
        return [r[d + 1] / r[d] if r[d] else None for d in range(len(r) - 1)]

    @classmethod
    def pool(cls, many: Iterable[Acceptance]) -> Acceptance:
        """The histograms of many runs summed (shorter ones padded with zeros)."""
        hists = [a.hist for a in many]
        width = max((len(h) for h in hists), default=0)
        return cls(tuple(sum(h[i] for h in hists if i < len(h)) for i in range(width)))

    def to_dict(self) -> dict[str, Any]:
        """The pooled record of the benches (None where undefined)."""
        reached = self.depth_reached
        return {"cycles": self.cycles, "committed": self.committed, "tau": self.tau, "accept_hist": list(self.hist),
                "depth_accept_rates": self.depth_accept_rates, "depth_reached": reached[:-1],
                "depth_accepted": reached[1:]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Acceptance:
        """From any record with an `accept_hist` list (a run's JSON or `to_dict()`)."""
        return cls(tuple(int(c) for c in d["accept_hist"]))


@dataclass(frozen=True)
class Transfers:
    """Bytes and copies between the target's and the draft's devices over a generation (prefill included)."""

    bytes_to_draft: int
    bytes_to_target: int
    transfers_to_draft: int
    transfers_to_target: int
    prefill_bytes_to_draft: int  # the prompt's features (part of bytes_to_draft)

    def to_dict(self) -> dict[str, int]:
        return {"bytes_to_draft": self.bytes_to_draft, "bytes_to_target": self.bytes_to_target,
                "transfers_to_draft": self.transfers_to_draft, "transfers_to_target": self.transfers_to_target,
                "prefill_bytes_to_draft": self.prefill_bytes_to_draft}


@dataclass(frozen=True)
class PhaseTimes:
    """Seconds spent in each phase of the Dovetail cycles (summed; the decode time minus loop overhead)."""

    verify: float  # target forward over the tree, acceptance, KV commit
    draft: float  # the draft's tree (stable step, expansions, reranking, cache append)
    transfer: float  # both directions
    host: float  # reading the accepted tokens, stop checks, streaming

    def to_dict(self) -> dict[str, float]:
        return {"verify": self.verify, "draft": self.draft, "transfer": self.transfer, "host": self.host}


@dataclass(frozen=True)
class PrefillTimes:
    """Seconds of the Dovetail prefill: the target over the prompt, its features to the draft, the first tree."""

    target: float
    transfer: float
    draft: float

    def to_dict(self) -> dict[str, float]:
        return {"target": self.target, "transfer": self.transfer, "draft": self.draft}


@dataclass(frozen=True)
class DraftInfo:
    """What draft ran, for records: layers, fusion, vocabulary V' of its head, where it came from."""

    n_layers: int
    fusion: str
    vocab: int
    source: str  # for people: a path, "random (seed 0)", "self (the target itself)"
    kind: str  # for code: the `Draft.kind` ("trained", "random", "standalone" or "self"); not in the JSON
    feature_layers: tuple[int, ...] = ()  # target blocks read (EAGLE-3); () = the final-norm feature

    @property
    def is_random(self) -> bool:
        return self.kind == "random"

    def to_dict(self) -> dict[str, Any]:
        d = {"n_layers": self.n_layers, "fusion": self.fusion, "vocab": self.vocab, "source": self.source}
        return d | ({"feature_layers": list(self.feature_layers)} if self.feature_layers else {})


@dataclass(frozen=True)
class DovetailStats:
    """What only a Dovetail generation has: its tree and draft, the traffic between devices, the time split."""

    tree: TreeConfig
    draft: DraftInfo
    transfers: Transfers
    time_s: PhaseTimes
    prefill_time_s: PrefillTimes
    lookup_cycles: int = 0  # cycles whose tree had a lookup chain grafted on
    lookup_tokens: int = 0  # tokens accepted from the chain past what the drafted tree spelled


@dataclass(frozen=True)
class GenerationStats:
    """What one generation did and how long it took (all times in seconds)."""

    mode: str  # "target" | "dovetail"
    prompt_tokens: int
    new_tokens: int
    stop_reason: str  # "eos" | "length"
    compile_s: float  # compiling and first executions, outside prefill and decode (0 when already warm)
    prefill_s: float
    decode_s: float
    decode_steps: int  # new tokens made after the prefill's first one
    cache_slots: int
    prompt_bucket: int
    acceptance: Acceptance | None = None  # Dovetail only
    dovetail: DovetailStats | None = None

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: tokens made by decode steps per second, excluding prefill and compile."""
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON record (`dovetail generate --json`, the benches' raw runs)."""
        d: dict[str, Any] = {
            "mode": self.mode, "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
            "stop_reason": self.stop_reason, "compile_s": self.compile_s, "prefill_s": self.prefill_s,
            "decode_s": self.decode_s, "decode_steps": self.decode_steps, "tokens_per_s": self.tokens_per_s,
        }
        if self.acceptance is not None:  # one run: 0 where a pooled record says None
            a = self.acceptance
            d |= {"cycles": a.cycles, "tau": a.tau or 0.0, "accept_hist": list(a.hist),
                  "depth_accept_rates": [r or 0.0 for r in a.depth_accept_rates]}
        if self.dovetail is not None:
            x = self.dovetail
            d |= x.transfers.to_dict()
            d |= {"time_s": x.time_s.to_dict(), "prefill_time_s": x.prefill_time_s.to_dict(),
                  "tree": {"top_k": x.tree.top_k, "depth": x.tree.depth, "total_tokens": x.tree.total_tokens,
                           "lookup": x.tree.lookup},
                  "draft": x.draft.to_dict()}
            if x.tree.lookup:
                d["lookup"] = {"cycles": x.lookup_cycles, "tokens": x.lookup_tokens}
        return d | {"cache_slots": self.cache_slots, "prompt_bucket": self.prompt_bucket}
