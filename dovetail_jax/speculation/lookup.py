"""Prompt-lookup decoding as a branch of the drafted tree: an n-gram match in the context proposes a chain.

Answers often restate their prompt (code most of all), and a restated stretch is longer than any drafted tree
can accept in one cycle. `NgramLookup` keeps the context (prompt + emitted tokens) on the host and an index of
its n-grams: the longest suffix of the context (n = `MAX_NGRAM` .. `MIN_NGRAM` tokens) that occurred earlier
proposes the tokens that followed its latest occurrence. `graft` (jitted, on the target's device) hangs that
chain below the drafted tree's deepest node whose path spells the chain's first tokens, so the chain adds `L`
new nodes past what the draft already proposes and never duplicates a sibling.

Any proposal keeps decoding lossless: greedy acceptance takes the deepest path the target's argmax agrees with,
and the rejection walk is exact for any deterministic proposal that depends only on the past (`accept.py`).
The index costs O(MAX_NGRAM) dictionary updates per new token; a lookup is MAX_NGRAM dictionary reads.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from dovetail_jax.config import TreeConfig
from dovetail_jax.speculation import tree as tree_lib

MAX_NGRAM = 3  # longest context suffix matched (prompt-lookup decoding's usual 3)
# Shortest suffix worth a chain. On the target's own greedy answers (analysis/results/prompt_lookup_estimate.json,
# by match length, chain 8) a one-token match gives 0.5 accepted chain tokens a cycle (HumanEval and MT-bench
# alike), less than the draft's own first guess already does; two tokens give 1.5-1.9 and three 3.8-3.9. A
# chain costs every cycle it is verified in (T + L tokens instead of T), so one-token matches are not used.
MIN_NGRAM = 2


class NgramLookup:
    """The context of one generation, an index of where each n-gram (n <= `max_ngram`) last ended with a token
    after it, and the chain the context proposes now (`chain [size]` int32, None when no suffix of at least
    `min_ngram` tokens matches)."""

    def __init__(self, context: Iterable[int], size: int, max_ngram: int = MAX_NGRAM,
                 min_ngram: int | None = None) -> None:
        self.size, self.max_ngram = size, max_ngram
        self.min_ngram = MIN_NGRAM if min_ngram is None else min_ngram  # read at call time (analysis/tune_lookup.py)
        self.context: list[int] = []
        self._last_end: dict[tuple[int, ...], int] = {}
        self._indexed = 0  # n-grams ending before this position are in the index
        self.chain: np.ndarray | None = None
        self.extend(context)

    def extend(self, tokens: Iterable[int]) -> None:
        """Append tokens to the context and propose again."""
        self.context.extend(int(t) for t in tokens)
        self._index()
        cont = self.continuation(self.size)
        self.chain = None
        if cont:  # a short continuation is padded with its last token: lossless, only less likely accepted
            self.chain = np.full((self.size,), cont[-1], np.int32)
            self.chain[:len(cont)] = cont

    def _index(self) -> None:
        # an n-gram enters the index once a token follows it, so a suffix never matches itself
        ctx = self.context
        for end in range(self._indexed, len(ctx) - 1):
            for n in range(self.min_ngram, min(self.max_ngram, end + 1) + 1):
                self._last_end[tuple(ctx[end - n + 1:end + 1])] = end
        self._indexed = max(self._indexed, len(ctx) - 1)

    def continuation(self, size: int) -> list[int]:
        """Up to `size` tokens after the latest earlier occurrence of the longest matching suffix ([] if none)."""
        ctx = self.context
        for n in range(min(self.max_ngram, len(ctx) - 1), self.min_ngram - 1, -1):
            end = self._last_end.get(tuple(ctx[-n:]))
            if end is not None:
                return ctx[end + 1:end + 1 + size]
        return []


def chain_size(tree: TreeConfig) -> int:
    """Tokens a proposal needs: the graft point can be as deep as the drafted tree's longest path."""
    return tree.lookup + tree.max_accepted


def graft(tokens: jax.Array, parents: jax.Array, chain: jax.Array, drafted_width: int,
          length: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The drafted tree (`tokens`, `parents` [T]) with `length` chain nodes appended: `[T + length]` each, and
    the graft point's depth d. Node T + k holds `chain[d + k]`; node T hangs below the deepest drafted node whose
    path root..node spells `chain[:d]` (the root when none), node T + k below node T + k - 1. `chain` needs
    `length + drafted_width - 1` tokens."""
    t = tokens.shape[0]
    arrays = tree_lib.tree_arrays(parents, drafted_width)
    agrees = (tokens == jnp.take(chain, jnp.maximum(arrays.depth - 1, 0))).at[0].set(True)  # [T]
    spells = jnp.all(~arrays.mask | agrees[None, :], axis=1)  # [T] every node on root..i agrees
    at = jnp.argmax(jnp.where(spells, arrays.depth, -1)).astype(jnp.int32)  # unique: siblings differ
    d = arrays.depth[at]
    new_tokens = jax.lax.dynamic_slice(chain, (d,), (length,)).astype(jnp.int32)
    new_parents = jnp.concatenate([at[None], t + jnp.arange(length - 1, dtype=jnp.int32)])
    return jnp.concatenate([tokens, new_tokens]), jnp.concatenate([parents, new_parents]), d
