"""Where a greedy Dovetail run first differs from target-only, and whether the target itself could tell them apart.

Both decoders run the same f32 target, but a 6-token tree verification and a 1-token decode step add in different
orders (the kernels' register blocks, the attention's chunks, cache part vs new tokens), so their logits differ by
rounding: ~1e-6 here, while every forward of ours stays within 1e-4 of HF transformers in f32. Where the target's
two best logits are closer than that, both tokens are its greedy choice within float32, and two correct decoders
may part ways there. A difference is therefore classified, not just counted: the first differing position, both
tokens and their logit gap from one full forward of the prompt and the shared prefix (a third order of additions,
the prefill's); a gap within `TIE_LOGIT_GAP` is a float tie, anything wider a real mismatch (a lossless decoder
never gives one).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dovetail_jax.config import ModelConfig
from dovetail_jax.model.cache import init_cache
from dovetail_jax.model.params import TargetParams
from dovetail_jax.model.target import causal_mask, forward

# The logit bound our f32 forwards hold against HF transformers' f32 (tests/test_target_forward.py): two tokens
# closer than this are a tie that evaluation order may break either way.
TIE_LOGIT_GAP = 1e-4


def next_logits(params: TargetParams, cfg: ModelConfig, ids: list[int]) -> np.ndarray:
    """The target's logits `[V]` for the token after `ids`, from one full (prefill) forward, as float64."""
    n = len(ids)
    logits, _, _ = jax.jit(lambda p, t: forward(p, cfg, t, jnp.arange(n, dtype=jnp.int32)[None], causal_mask(n),
                                                init_cache(cfg, n), "last", n - 1, empty_cache=True))(
        params, jnp.asarray([ids], jnp.int32))
    return np.asarray(logits[0], np.float64)


def first_divergence(params: TargetParams, cfg: ModelConfig, prompt_ids: list[int], reference: list[int],
                     tokens: list[int]) -> dict[str, Any] | None:
    """None when `tokens` equal `reference` (target-only's); else the first differing index, both tokens, the
    target's logit gap between them after the shared prefix, its best logit there, and `tie` (gap within
    TIE_LOGIT_GAP). Outputs of different lengths that agree where both exist (one cut short) are no tie."""
    if list(tokens) == list(reference):
        return None
    i = next((j for j, (a, b) in enumerate(zip(reference, tokens, strict=False)) if a != b), None)
    if i is None:
        return {"index": min(len(reference), len(tokens)), "target_token": None, "dovetail_token": None,
                "logit_gap": None, "top_logit": None, "tie": False}
    logits = next_logits(params, cfg, list(prompt_ids) + list(reference[:i]))
    a, b = int(reference[i]), int(tokens[i])
    gap = float(abs(logits[a] - logits[b]))
    return {"index": i, "target_token": a, "dovetail_token": b, "logit_gap": gap, "top_logit": float(logits.max()),
            "tie": gap <= TIE_LOGIT_GAP}
