"""Greedy losslessness on the real SmolLM2-135M-Instruct: `--mode dovetail` emits exactly the tokens of
`--mode target`, prompt by prompt, with an untrained draft, with the shipped trained draft, and with a draft
that agrees with the target (the target itself as a standalone draft, so long paths are accepted), over several
tree shapes.

Exactly means: up to a float32 tie of the target's own logits (`bench/divergence.py`: two tokens within 1e-4,
which a 1-token step and a tree verification, adding in different orders, may break differently); such a tie is
reported as a warning, any wider difference fails.

The default run checks a subset; `pytest -m slow` runs the full matrix (20 prompts x 128 new tokens x 4 tree
shapes x 3 drafts; about 15 minutes on 2 cores), which CI runs too.
"""

from __future__ import annotations

import warnings

import pytest

from dovetail_jax import api, devices
from dovetail_jax.bench.divergence import first_divergence
from dovetail_jax.config import DEFAULT_TREE, DraftConfig, TreeConfig
from dovetail_jax.model import draft as draft_lib
from dovetail_jax.model.draft import Draft

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that checks whether a number is prime.",
    "Explain how a hash map works.",
    "Give me three tips for a job interview.",
    "Write a haiku about the sea.",
    "What is the difference between a list and a tuple in Python?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "How do I reverse a string in JavaScript?",
    "Why is the sky blue?",
    "Write a SQL query that counts the rows of a table named users.",
    "What are the health benefits of drinking water?",
    "Translate 'good morning' into Spanish, French and German.",
    "Write a short story about a robot who learns to paint.",
    "Explain recursion to a ten-year-old.",
    "What is 17 times 23? Show your work.",
    "List the planets of the solar system in order.",
    "Write a bash command that finds all .txt files in a directory.",
    "What is photosynthesis?",
    "Give me a recipe for pancakes.",
    "Describe the water cycle.",
]
NEW_TOKENS = 128
TREES = {"chain": TreeConfig(1, 4, 5), "small": TreeConfig(3, 3, 8), "server": TreeConfig(10, 7, 16),
         "laptop": TreeConfig(10, 4, 7), "default": DEFAULT_TREE}  # the default: 4/3/6 and a prompt-lookup chain


@pytest.fixture(scope="module")
def target(smollm2_path):
    return api.load_target(smollm2_path, layout="in_out")


@pytest.fixture(scope="module")
def reference(target):
    """Target-only greedy tokens per prompt (computed on first use)."""
    cache: dict[int, list[int]] = {}

    def get(i: int) -> list[int]:
        if i not in cache:
            cache[i] = api.generate(target, PROMPTS[i], chat=True, max_new_tokens=NEW_TOKENS).token_ids
        return cache[i]

    return get


@pytest.fixture(scope="module")
def drafts(target):
    untrained = api.random_draft(target, DraftConfig(1, "dgf", draft_vocab_size=2048), seed=0)
    dcfg, p, shared = draft_lib.draft_from_lm(target.params, target.cfg, devices.accelerator_device())
    shipped = api.load_draft(target)  # the default draft of checkpoints/ (no fallback: it must exist)
    return {"untrained": untrained, "agreeing": Draft(dcfg, p, shared, source="the target itself", kind="self"),
            "shipped": shipped}


def check(target, reference, draft: Draft, tree: TreeConfig, prompts: list[int]) -> list[int]:
    taus = []
    for i in prompts:
        out = api.generate(target, PROMPTS[i], chat=True, max_new_tokens=NEW_TOKENS, draft=draft, tree=tree)
        ref = reference(i)
        d = first_divergence(target.params, target.cfg, out.prompt_ids, ref, out.token_ids)
        if d is not None:
            first = d["index"]
            what = (f"prompt {i} ({PROMPTS[i]!r}), draft {draft.source}, tree {tree}: first divergence at token "
                    f"{first}: dovetail {out.token_ids[first:first + 5]} vs target {ref[first:first + 5]}, target "
                    f"logit gap {d['logit_gap']}")
            if not d["tie"]:
                pytest.fail(what)
            warnings.warn(f"a float32 tie of the target's own logits, broken differently: {what}", stacklevel=1)
        taus.append(out.stats.acceptance.tau)
        hist = out.stats.acceptance.hist
        if draft.source == "the target itself":
            assert max(k for k, n in enumerate(hist) if n) >= min(tree.max_accepted, 3), hist
    return taus


# The default run's subsets share their prompts (1, 8, 13), so the target-only references are generated once; the
# slow matrix runs every prompt with every draft and tree (the agreeing draft on the server tree among them).
SUBSET = [1, 8, 13]


@pytest.mark.parametrize("tree", ["chain", "laptop"])
def test_untrained_draft_is_lossless_subset(target, reference, drafts, tree):
    check(target, reference, drafts["untrained"], TREES[tree], SUBSET)


def test_agreeing_draft_is_lossless_subset(target, reference, drafts):
    # the whole target drafts here, so a deep tree is costly (44 s a prompt for the server tree on the AMD VM): the
    # small tree and one prompt here, every tree and prompt in the slow matrix
    taus = check(target, reference, drafts["agreeing"], TREES["small"], [8])
    assert min(taus) > 2.0


@pytest.mark.parametrize("tree", ["server", "laptop", "default"])
def test_shipped_draft_is_lossless_and_trained_subset(target, reference, drafts, tree):
    taus = check(target, reference, drafts["shipped"], TREES[tree], SUBSET)
    assert sum(taus) / len(taus) > 2.0, taus  # an untrained draft gives ~1.0


@pytest.mark.slow
@pytest.mark.parametrize("draft", ["untrained", "shipped", "agreeing"])
@pytest.mark.parametrize("tree", list(TREES))
def test_lossless_full_matrix(target, reference, drafts, tree, draft):
    check(target, reference, drafts[draft], TREES[tree], list(range(len(PROMPTS))))
