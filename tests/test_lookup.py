"""Prompt lookup: the n-gram index against a brute-force search, the graft against plain-Python tree walks, and
the Dovetail loop with a lookup chain: greedy output equals target-only, sampling follows the target's
distribution, the chain is really verified and its statistics and bytes add up."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dovetail_helpers import random_draft, self_draft, tiny_target
from hypothesis import given, settings
from hypothesis import strategies as st
from test_dovetail import ALPHA, N_FIRST, chi2_pvalue, exact_joint
from test_tree import py_path, tight_width

from dovetail_jax.config import DraftConfig, SamplingConfig, TreeConfig
from dovetail_jax.decode import dovetail as DV
from dovetail_jax.decode import target_only
from dovetail_jax.errors import ConfigError
from dovetail_jax.speculation import lookup

# --- the n-gram index ----------------------------------------------------------------------------------------


def brute_continuation(context: list[int], max_n: int, min_n: int, size: int) -> list[int]:
    """The tokens after the latest earlier occurrence of the longest suffix (min_n <= n <= max_n), by scanning."""
    for n in range(min(max_n, len(context) - 1), min_n - 1, -1):
        suffix = context[-n:]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start:start + n] == suffix:
                return context[start + n:start + n + size]
    return []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 4), max_size=12), st.lists(st.lists(st.integers(0, 4), max_size=5), max_size=8),
       st.integers(1, 3), st.integers(1, 3), st.integers(1, 6))
def test_index_matches_brute_force(prompt, chunks, max_n, min_n, size):
    """Extended chunk by chunk (as cycles emit tokens), the index proposes what a scan of the context finds."""
    min_n = min(min_n, max_n)
    lk = lookup.NgramLookup(prompt, size, max_n, min_n)
    context = list(prompt)
    for chunk in [[], *chunks]:
        lk.extend(chunk)
        context += chunk
        want = brute_continuation(context, max_n, min_n, size)
        assert lk.continuation(size) == want
        if want:
            assert lk.chain is not None and lk.chain.dtype == np.int32 and lk.chain.shape == (size,)
            assert lk.chain.tolist() == want + [want[-1]] * (size - len(want))  # padded with its last token
        else:
            assert lk.chain is None


def test_longest_suffix_wins_over_a_later_shorter_one():
    # "1 2" occurred at 0; "2" alone occurred later (followed by 9): the 2-gram's continuation (3) wins
    lk = lookup.NgramLookup([1, 2, 3, 5, 2, 9, 1, 2], 2, min_ngram=1)
    assert lk.chain.tolist() == [3, 5]
    assert lookup.NgramLookup([7, 8], 3).chain is None  # nothing occurred before
    assert lookup.NgramLookup([4, 4, 4], 3).chain.tolist() == [4, 4, 4]  # a repeat proposes itself
    assert lookup.NgramLookup([5, 6, 1, 7, 6], 2).chain is None  # only "6" recurs: one token is too short
    assert lookup.NgramLookup([5, 6, 1, 7, 6], 2, min_ngram=1).chain.tolist() == [1, 7]


def test_chain_size_covers_the_deepest_graft():
    assert lookup.chain_size(TreeConfig(4, 3, 6, lookup=8)) == 8 + 4
    assert lookup.chain_size(TreeConfig(1, 1, 1, lookup=3)) == 3  # a root-only tree grafts at the root
    assert TreeConfig(4, 3, 6, lookup=8).width == TreeConfig(4, 3, 6).width + 8
    assert TreeConfig(4, 3, 6, lookup=8).drafted == TreeConfig(4, 3, 6)
    with pytest.raises(ConfigError, match="lookup must be >= 0"):
        TreeConfig(lookup=-1)


# --- the graft -------------------------------------------------------------------------------------------------

SIZES = [1, 3, 6, 11]  # few distinct T: one compile per (T, width, L)
VOCAB = 16


@st.composite
def drafted_trees(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """A tree with distinct siblings (as drafted), a chain that often spells one of its paths, and L."""
    t = draw(st.sampled_from(SIZES))
    parents = np.array([-1] + [draw(st.integers(0, j - 1)) for j in range(1, t)], np.int32)
    tokens = np.zeros(t, np.int32)
    for p in set(parents[1:].tolist()):
        kids = np.flatnonzero(parents == p)
        tokens[kids] = draw(st.permutations(range(VOCAB)))[:len(kids)]  # distinct among siblings
    tokens[0] = draw(st.integers(0, VOCAB - 1))
    length = draw(st.sampled_from([1, 4]))
    size = length + tight_width(parents) - 1
    chain = draw(st.lists(st.integers(0, VOCAB - 1), min_size=size, max_size=size))
    node = draw(st.integers(0, t - 1))
    spelled = [int(tokens[i]) for i in py_path(parents, node)[1:]]
    if draw(st.booleans()):  # follow a drafted path first, as a chain often does
        chain[:len(spelled)] = spelled
    return tokens, parents, np.array(chain, np.int32), length


@functools.partial(jax.jit, static_argnames=("width", "length"))
def _graft(tokens, parents, chain, width, length):
    return lookup.graft(tokens, parents, chain, width, length)


@settings(max_examples=150, deadline=None)
@given(drafted_trees())
def test_graft_hangs_the_chain_below_the_deepest_spelling_node(case):
    tokens, parents, chain, length = case
    t, width = len(tokens), tight_width(parents)
    new_tokens, new_parents, d = jax.device_get(_graft(jnp.asarray(tokens), jnp.asarray(parents),
                                                       jnp.asarray(chain), width, length))
    # the brute force: the deepest node whose path root..node spells the chain's first tokens
    depth = {i: len(py_path(parents, i)) - 1 for i in range(t)}
    spelling = [i for i in range(t) if [int(tokens[j]) for j in py_path(parents, i)[1:]] == chain[:depth[i]].tolist()]
    at = max(spelling, key=lambda i: (depth[i], -i))
    assert d == depth[at]
    np.testing.assert_array_equal(new_tokens[:t], tokens)
    np.testing.assert_array_equal(new_parents[:t], parents)
    np.testing.assert_array_equal(new_tokens[t:], chain[d:d + length])
    assert new_parents[t] == at and new_parents[t + 1:].tolist() == list(range(t, t + length - 1))
    # the layout verification relies on: parents first, root alone at -1, every path within the width
    assert all(0 <= new_parents[j] < j for j in range(1, t + length)) and new_parents[0] == -1
    assert tight_width(new_parents) <= width + length
    # the last chain node spells the chain to its end: the target can accept all of it
    assert [int(new_tokens[j]) for j in py_path(new_parents, t + length - 1)[1:]] == chain[:d + length].tolist()
    # no sibling is duplicated (the chain's first node would then have been part of the deeper graft point)
    for p in set(new_parents[1:].tolist()):
        kids = new_tokens[new_parents == p]
        assert len(set(kids.tolist())) == len(kids)


# --- the loop ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return tiny_target(vocab=96, seed=3, scale=0.5)


@pytest.mark.parametrize("tree", [TreeConfig(3, 2, 6, lookup=4), TreeConfig(1, 1, 1, lookup=3),
                                  TreeConfig(10, 4, 7, lookup=8)], ids=lambda t: f"{t.top_k}-{t.depth}-{t.total_tokens}"
                                                                                 f"-L{t.lookup}")
def test_greedy_with_lookup_equals_target_only(tiny, tree):
    cfg, params = tiny
    drafts = [random_draft(cfg, params, DraftConfig(1, "dgf")), self_draft(cfg, params)]
    rng = np.random.default_rng(1)
    chained = gained = 0
    for i in range(3):
        motif = rng.integers(0, cfg.vocab_size, size=5).tolist()
        prompt = (motif * 3)[: int(rng.integers(6, 15))]  # repeats: chains get proposed from the first cycle
        ref, _ = target_only.generate(params, cfg, prompt, 40, ignore_eos=True)
        for d in drafts:
            out, st_ = DV.generate(params, cfg, d, prompt, 40, tree, ignore_eos=True)
            assert out == ref, f"draft {d.source}, prompt {i}"
            x = st_.to_dict()
            assert len(x["accept_hist"]) == tree.width and x["tree"]["lookup"] == tree.lookup
            assert 0 <= x["lookup"]["cycles"] <= x["cycles"] and 0 <= x["lookup"]["tokens"] <= len(out)
            chained += x["lookup"]["cycles"]
            if d.source != "self":
                gained += x["lookup"]["tokens"]
    assert chained > 0 and gained > 0  # chains are verified, and past a random draft really accepted


def test_lookup_bytes(tiny):
    """A chain is made on the target's host: only the accepted path's width grows what crosses."""
    cfg, params = tiny
    tree = TreeConfig(3, 3, 8, lookup=5)
    out, st_ = DV.generate(params, cfg, random_draft(cfg, params), [4, 5, 6, 4, 5, 6, 4, 5], 30, tree,
                           ignore_eos=True)
    x = st_.to_dict()
    h, w = cfg.hidden_size, tree.width
    drafted_cycles = x["transfers_to_draft"] - 1
    assert x["bytes_to_draft"] == x["prefill_bytes_to_draft"] + drafted_cycles * (w * h * 4 + w * 4 + 4)
    assert x["bytes_to_target"] == x["transfers_to_target"] * 2 * tree.total_tokens * 4


@pytest.fixture(scope="module")
def small_vocab():
    return tiny_target(vocab=6, seed=11, scale=0.6)


def test_sampling_with_lookup_matches_target_distribution(small_vocab):
    cfg, params = small_vocab
    prompt = [0, 0, 0, 1, 0, 2, 0, 3, 0, 4, 0, 5, 0]  # "0 x" occurred for every x: the first cycle has a chain
    s = SamplingConfig(temperature=1.0)
    probs = exact_joint(cfg, params, prompt, s)
    assert math.isclose(sum(probs.values()), 1.0, abs_tol=1e-5)
    draft = random_draft(cfg, params, DraftConfig(1, "dgf"), seed=2)
    tree = TreeConfig(2, 1, 3, lookup=2)
    counts: dict[tuple[int, ...], int] = {}
    chained = 0
    n = 1500
    for seed in range(n):
        out, st_ = DV.generate(params, cfg, draft, prompt, N_FIRST, tree, SamplingConfig(1.0, seed=seed),
                               ignore_eos=True)
        counts[tuple(out)] = counts.get(tuple(out), 0) + 1
        chained += st_.dovetail.lookup_cycles > 0
    assert chained == n  # every first cycle verified a chain
    assert chi2_pvalue(counts, probs, n) > ALPHA
