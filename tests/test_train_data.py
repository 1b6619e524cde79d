"""Training prompts: offline, deterministic, varied, and disjoint from the evaluation sets."""

from __future__ import annotations

import re

from dovetail_jax.bench.eval_prompts import evaluation_texts
from dovetail_jax.train.prompts import chat_prompts, code_prompts, training_prompts


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip().lower()


def test_prompts_are_deterministic_and_mix_code_and_chat():
    a, b = training_prompts(), training_prompts()
    assert [p.text for p in a] == [p.text for p in b]
    assert len({p.text for p in a}) == len(a)
    sources = {p.source.split("/")[0] for p in a[:200]}
    assert sources == {"code", "chat"}
    assert len(code_prompts()) > 300 and len(chat_prompts()) > 500


def test_no_training_prompt_overlaps_an_evaluation_prompt():
    # the evaluation packages are part of the README's setup (and CI's): a missing one is a failure here
    evals = [_norm(t) for t in evaluation_texts()]
    assert len(evals) >= 164 + 80
    train = [_norm(p.text) for p in training_prompts()]
    assert not set(train) & set(evals)
    joined = "\n".join(train)
    for e in evals:  # an evaluation text inside a training prompt (long ones: "def f(x):" alone means nothing)
        if len(e) >= 40:
            assert e not in joined, e[:80]
    eval_joined = "\n".join(evals)
    hits = [t for t in train if len(t) >= 40 and t in eval_joined]  # a training prompt inside an evaluation text
    assert not hits, hits[:3]
    # common names (median, encode) exist in both, so compare whole signatures, not names
    sigs = set(re.findall(r"def \w+\(.*?\).*?:", " ".join(evals)))
    stub_sigs = set(re.findall(r"def \w+\(.*?\).*?:", joined))
    assert not sigs & stub_sigs, sorted(sigs & stub_sigs)[:10]
