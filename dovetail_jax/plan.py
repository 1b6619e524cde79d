"""Every power-of-two size the code compiles for, planned in one place.

A jitted program is compiled once per input shape, so lengths that vary per request (prompts, answers,
training sequences) are rounded up to a power of two: a handful of shapes are ever compiled, and the padding
costs at most 2x. This module holds the rounding and each caller's sizes: the prompt bucket and cache slots
of a generation (target-only and Dovetail), the batched generator's, the trainer's and the feature
extractor's sequence lengths, `bench forward`'s cache, and the simulator's estimate of our cache. No JAX
import: the simulator uses it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from dovetail_jax.config import ModelConfig, TreeConfig
from dovetail_jax.errors import ConfigError

MIN_PROMPT_BUCKET = 16  # prompts shorter than this share one prefill shape
MIN_CACHE_SLOTS = 128  # KV caches smaller than this save nothing worth another compile
MIN_TRAIN_LENGTH = 64  # the trainer's shortest padded sequence
MIN_FEATURE_LENGTH = 64  # the feature extractor's shortest padded sequence


def pow2_at_least(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= `n`, and at least `minimum`."""
    return max(minimum, 1 << max(0, (n - 1).bit_length()))


class Sizes(NamedTuple):
    """The two static sizes of one generation; a tuple, so `bucket, slots = plan_sizes(...)` unpacks it."""

    prompt_bucket: int  # the prompt is right-padded to this length for the prefill
    cache_slots: int  # KV-cache positions preallocated for prompt + new tokens (+ a tree)


def cache_slots(tokens: int, limit: int | None = None) -> int:
    """Slots of a KV cache that must hold `tokens` positions, capped at the model's context `limit`."""
    slots = pow2_at_least(tokens, MIN_CACHE_SLOTS)
    return slots if limit is None else min(slots, limit)


def plan_sizes(cfg: ModelConfig, prompt_len: int, max_new_tokens: int) -> Sizes:
    """A target-only generation's sizes; refuses an empty prompt or one that would overflow the context."""
    if prompt_len <= 0:
        raise ConfigError("the prompt is empty (it encodes to no tokens)")
    if max_new_tokens <= 0:
        raise ConfigError(f"max_new_tokens must be positive, got {max_new_tokens}")
    limit = cfg.max_position_embeddings
    if prompt_len + max_new_tokens > limit:
        raise ConfigError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = {prompt_len + max_new_tokens} "
            f"exceeds the model's context of {limit} tokens"
        )
    slots = cache_slots(prompt_len + max_new_tokens, limit)
    return Sizes(min(pow2_at_least(prompt_len, MIN_PROMPT_BUCKET), slots), slots)


def plan_dovetail(cfg: ModelConfig, tree: TreeConfig, prompt_len: int, max_new_tokens: int) -> Sizes:
    """A Dovetail generation's sizes (both caches): room for the tree's longest path past the last token."""
    limit = cfg.max_position_embeddings
    if prompt_len + max_new_tokens + tree.width > limit:
        raise ConfigError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) + the tree's longest path "
            f"({tree.width}) = {prompt_len + max_new_tokens + tree.width} exceeds the model's context of {limit} "
            f"tokens; lower --max-new-tokens or the tree size"
        )
    return plan_sizes(cfg, prompt_len, max_new_tokens + tree.width)


def batch_sizes(longest_prompt: int, max_new_tokens: int) -> Sizes:
    """Batched generation: the left-padded prompt length and the cache slots (not capped: the caller checks)."""
    bucket = pow2_at_least(longest_prompt, MIN_PROMPT_BUCKET)
    return Sizes(bucket, cache_slots(bucket + max_new_tokens))


def train_length(n: int) -> int:
    """The padded length of a training batch whose longest sequence has `n` positions."""
    return pow2_at_least(n, MIN_TRAIN_LENGTH)


def feature_batch(lengths: Sequence[int], start: int, tokens_per_batch: int) -> tuple[int, int]:
    """(padded length T, rows) of the feature batch starting at `start` in `lengths` (sorted ascending).

    The smallest power-of-two T >= MIN_FEATURE_LENGTH whose fixed batch of `tokens_per_batch // T` rows holds
    its longest row: one compiled shape per length.
    """
    t = MIN_FEATURE_LENGTH
    while lengths[min(start + max(1, tokens_per_batch // t), len(lengths)) - 1] > t:
        t *= 2
    return t, max(1, tokens_per_batch // t)
