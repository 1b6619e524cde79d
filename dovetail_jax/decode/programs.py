"""What the decode loops share: the output and its stop rule, the token choice, the sampling scalars, and the
one compile-and-warm cache.

A decode program (`target_only.TargetOnly`, `dovetail.DovetailCycle`) is a frozen dataclass whose fields are
exactly what its compiled code depends on (model, sizes, sampling mode, tree, draft, placement); its jitted
steps are named methods made once per instance. `warmed` keeps one warm instance per program and argument
signature (shapes, dtypes and devices of the weights, never their identity): the first call compiles every
step and runs each once, outside any timed region, and reports how long that took (`compile_s`); later calls
with the same shapes get the same warm instance and 0.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from dovetail_jax.config import SamplingConfig
from dovetail_jax.speculation import sampling

Scalars = tuple[jax.Array, jax.Array, jax.Array]  # temperature, top_k, top_p (traced: changing them never compiles)
P = TypeVar("P", bound=Hashable)

_programs: dict[Hashable, Any] = {}  # one instance per program: its jitted steps are made (and traced) once
_warm: set[Hashable] = set()  # (program, argument signature) pairs whose executables have run once


@dataclass
class Output:
    """The tokens emitted so far, streamed as they come, and whether (and why) generation stops."""

    max_new_tokens: int
    eos: frozenset[int]
    on_token: Callable[[int], None] | None = None
    tokens: list[int] = field(default_factory=list)
    stop: str = "length"
    done: bool = False

    def emit(self, new: list[int]) -> None:
        for t in new:
            self.tokens.append(t)
            if self.on_token is not None:
                self.on_token(t)
            if t in self.eos:
                self.stop, self.done = "eos", True
                return
            if len(self.tokens) >= self.max_new_tokens:
                self.done = True
                return


def pick(logits: jax.Array, key: jax.Array, s: Scalars, greedy: bool, filtered: bool) -> tuple[jax.Array, jax.Array]:
    """The next token `[B]` from `logits [B, V]`: argmax, or a draw from the processed distribution (top-k/top-p
    skipped when not `filtered`); returns it with the advanced key."""
    if greedy:
        return sampling.greedy(logits), key
    key, sub = jax.random.split(key)
    logp = sampling.processed_log_probs(logits, *s, filtered=filtered)
    return jax.random.categorical(sub, logp, axis=-1).astype(jnp.int32), key


def scalars(cfg: SamplingConfig, device: jax.Device) -> Scalars:
    """The sampling scalars on `device` (temperature floored so that greedy-by-temperature never divides by 0)."""
    return jax.device_put((np.float32(max(cfg.temperature, 1e-6)), np.int32(cfg.top_k), np.float32(cfg.top_p)),
                          device)


def seed_key(seed: int, device: jax.Device) -> jax.Array:
    """A raw `[2]` uint32 PRNG key on `device` (raw, so it crosses jit boundaries as a plain array)."""
    return jax.device_put(jax.random.key_data(jax.random.key(seed)), device)


def signature(tree: Any) -> Hashable:
    """What a compiled program depends on in a pytree of arrays: its structure and each leaf's shape, dtype and
    placement."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((np.shape(x), getattr(x, "dtype", type(x)), getattr(x, "sharding", None)) for x in leaves)


def warmed(program: P, args: Hashable, warm_up: Callable[[P], None]) -> tuple[P, float]:
    """The warm instance of `program` for arguments of signature `args`, and the seconds this call spent making
    it warm (`warm_up(program)` compiles and runs every step once; 0 when it was already warm)."""
    program = _programs.setdefault(program, program)
    if (program, args) in _warm:
        return program, 0.0
    t0 = time.perf_counter()
    warm_up(program)
    _warm.add((program, args))
    return program, time.perf_counter() - t0


def clear() -> None:
    """Forget every program (their next use traces and compiles again, e.g. after patching a step)."""
    _programs.clear()
    _warm.clear()
