"""The one-pass self-distillation writer: answers identical to one-at-a-time greedy decoding, features equal to a
lone prefill, shards that `load_features` reads, resume and refusal; self-prompting; vocabulary coverage."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
from dovetail_helpers import tiny_target

from dovetail_jax.decode import target_only
from dovetail_jax.errors import ConfigError, ModelFormatError
from dovetail_jax.model.cache import init_cache
from dovetail_jax.model.target import causal_mask, forward
from dovetail_jax.train import distill as DI
from dovetail_jax.train import features as F
from dovetail_jax.train.answers import read_answers
from dovetail_jax.train.prompts import Prompt

EOS = 7


@pytest.fixture(scope="module")
def tiny():
    return tiny_target(vocab=64, seed=3, scale=0.4)


class _Tok:
    """Prompt text "12 5 9" -> ids [12, 5, 9]: the tiny target has no tokenizer."""

    def encode_prompt(self, text: str, chat: bool = False) -> list[int]:
        return [int(x) for x in text.split()]


def _target(cfg, params, sha="a" * 64):
    return SimpleNamespace(cfg=cfg, params=params, sha256=sha, eos_ids=(EOS,), tokenizer=_Tok())


def _prompts(seed: int, n: int, max_len: int = 20) -> list[Prompt]:
    rng = np.random.default_rng(seed)
    return [Prompt(f"t/{i % 2}", " ".join(str(x) for x in rng.integers(8, 64, size=int(rng.integers(1, max_len)))))
            for i in range(n)]


def _lone(cfg, params, seq):
    tok = jnp.asarray([seq], jnp.int32)
    pos = jnp.arange(len(seq), dtype=jnp.int32)[None]
    logits, hid, _ = forward(params, cfg, tok, pos, causal_mask(len(seq)), init_cache(cfg, 1), "all",
                             empty_cache=True)
    return np.asarray(hid[0]), np.asarray(jnp.argmax(logits[0], -1))


@pytest.mark.parametrize("batch,refill", [(3, 2), (4, 1), (16, 8)])
def test_run_batch_equals_one_prompt_at_a_time_and_a_lone_prefill(tiny, batch, refill):
    cfg, params = tiny
    prompts = [[int(x) for x in p.text.split()] for p in _prompts(0, 9)]
    got = {c.key: c for c in DI.run_batch(params, cfg, list(enumerate(prompts)), max_new_tokens=14,
                                          eos_ids=(EOS,), batch_size=batch, refill_rows=refill,
                                          max_prompt_tokens=32)}
    assert sorted(got) == list(range(9))
    lengths = set()
    for i, p in enumerate(prompts):
        ref, _ = target_only.generate(params, cfg, p, 14, eos_ids=(EOS,))
        c = got[i]
        assert c.prompt_ids == p and c.answer_ids == ref
        lengths.add(len(ref))
        hid, am = _lone(cfg, params, p + ref)
        assert c.feats.shape == (len(p) + len(ref), cfg.hidden_size)
        feats = c.feats.view(jnp.bfloat16).astype(np.float32)
        np.testing.assert_allclose(feats, hid.astype(jnp.bfloat16).astype(np.float32), rtol=1e-2, atol=1e-2)
        np.testing.assert_array_equal(c.greedy, am)
    assert len(lengths) > 1  # EOS ended some answers early: rows were refilled at different times


def test_run_batch_refuses_bad_input(tiny):
    cfg, params = tiny
    with pytest.raises(ConfigError):
        list(DI.run_batch(params, cfg, [(0, [])], max_new_tokens=4, eos_ids=()))
    with pytest.raises(ConfigError):
        list(DI.run_batch(params, cfg, [(0, [1] * 40)], max_new_tokens=4, eos_ids=(), max_prompt_tokens=32))


def test_distill_writes_loadable_shards_resumes_and_refuses(tiny, tmp_path, monkeypatch):
    cfg, params = tiny
    monkeypatch.setattr(F, "SHARD_RECORDS", 4)
    prompts = _prompts(1, 10) + [Prompt("long", " ".join(["9"] * 40))]  # the last one is too long: skipped
    tgt = _target(cfg, params)
    s = DI.distill(tgt, prompts, tmp_path, max_new_tokens=12, batch_size=3, refill_rows=2, max_prompt_tokens=32,
                   progress=False)
    assert s["written"] == 3 and s["skipped_long_prompts"] == 1 and s["conversations"] == 10
    fs = F.load_features(tmp_path / "features", tgt.sha256, cfg.hidden_size)
    assert list(fs.record_index) == list(range(10))
    recs = read_answers(tmp_path / "answers.jsonl", tgt.sha256)
    assert [r["index"] for r in recs] == list(range(10))
    for j, r in enumerate(recs):
        ref, _ = target_only.generate(params, cfg, r["prompt_ids"], 12, eos_ids=(EOS,))
        assert r["answer_ids"] == ref and r["prompt"] == prompts[j].text and r["source"] == prompts[j].source
        a, b = fs.offsets[j], fs.offsets[j + 1]
        assert list(fs.ids[a:b]) == r["prompt_ids"] + ref and fs.prompt_len[j] == len(r["prompt_ids"])
    # the same records through the old extractor: the same arrays (features within bf16 rounding)
    old = F.extract_shard(params, cfg, F.sequences(recs[:4]))
    new = {n: np.load(tmp_path / "features" / "shard-00000" / f"{n}.npy") for n in old}
    for n in ("ids", "argmax", "offsets", "prompt_len"):
        np.testing.assert_array_equal(new[n], old[n])
    np.testing.assert_allclose(new["feats"].view(jnp.bfloat16).astype(np.float32),
                               old["feats"].view(jnp.bfloat16).astype(np.float32), rtol=1e-2, atol=1e-2)
    # resume: nothing to do; a deleted shard (and the answers a crash left behind) is redone alone
    assert DI.distill(tgt, prompts, tmp_path, max_new_tokens=12, batch_size=3, refill_rows=2,
                      max_prompt_tokens=32, progress=False)["written"] == 0
    shutil.rmtree(tmp_path / "features" / "shard-00001")
    again = DI.distill(tgt, prompts, tmp_path, max_new_tokens=12, batch_size=3, refill_rows=2,
                       max_prompt_tokens=32, progress=False)
    assert again["written"] == 1 and again["conversations"] == 4
    recs2 = read_answers(tmp_path / "answers.jsonl", tgt.sha256)
    assert sorted(r["index"] for r in recs2) == list(range(10)) and len(recs2) == 10
    with pytest.raises(ModelFormatError, match="another model"):
        DI.distill(_target(cfg, params, "b" * 64), prompts, tmp_path, max_new_tokens=12, max_prompt_tokens=32,
                   progress=False)
    with pytest.raises(ModelFormatError, match="another prompt list"):
        DI.distill(tgt, prompts, tmp_path, max_new_tokens=13, max_prompt_tokens=32, progress=False)
    meta = json.loads((tmp_path / "features" / "shard-00002" / "meta.json").read_text())
    assert meta["records"] == 2 and meta["distill"]["skipped_long_prompts"] == 1


def test_distill_keeps_multi_layer_features_equal_to_the_extra_pass(tmp_path, monkeypatch):
    """With `feature_layers` the generating forwards also give those blocks' outputs: the same (to bf16
    rounding) as `extract_taps`' extra prefill pass, which then finds every shard done; answers, final-norm
    features and greedy tokens stay bit for bit those of a run without them."""
    cfg, params = tiny_target(vocab=64, seed=5, scale=0.4, layers=4)
    monkeypatch.setattr(F, "SHARD_RECORDS", 4)
    prompts = _prompts(2, 7)
    layers = (0, 2, 3)
    plain, tapped = tmp_path / "plain", tmp_path / "tapped"
    kw = dict(max_new_tokens=10, batch_size=3, refill_rows=2, max_prompt_tokens=32, progress=False)
    DI.distill(_target(cfg, params), prompts, plain, **kw)
    DI.distill(_target(cfg, params), prompts, tapped, feature_layers=layers, **kw)
    name = F.taps_file(layers)
    for k in (0, 1):
        a, b = F.shard_dir(plain / "features", k), F.shard_dir(tapped / "features", k)
        for n in ("feats", "ids", "argmax", "offsets", "prompt_len", "index"):
            np.testing.assert_array_equal(np.load(b / f"{n}.npy"), np.load(a / f"{n}.npy"))
        assert not (a / name).exists()
    assert F.extract_taps(_target(cfg, params), plain / "features", layers, progress=False)["extracted"] == 2
    assert F.extract_taps(_target(cfg, params), tapped / "features", layers, progress=False)["extracted"] == 0
    for k in (0, 1):
        got = np.load(F.shard_dir(tapped / "features", k) / name)
        ref = np.load(F.shard_dir(plain / "features", k) / name)
        assert got.shape == ref.shape == (np.load(F.shard_dir(plain / "features", k) / "ids.npy").size, 3 * 32)
        np.testing.assert_allclose(got.view(jnp.bfloat16).astype(np.float32),
                                   ref.view(jnp.bfloat16).astype(np.float32), rtol=2e-2, atol=2e-2)
    fs = F.load_features(tapped / "features", "a" * 64, cfg.hidden_size, taps=layers)
    assert fs.taps is not None and fs.taps.width == 3 * 32
    with pytest.raises(ConfigError, match="not a block"):
        list(DI.run_batch(params, cfg, [(0, [9])], max_new_tokens=2, eos_ids=(), feature_layers=(4,)))


def test_distill_matches_one_at_a_time_on_smollm2(smollm2_path, tmp_path):
    from dovetail_jax import api

    target = api.load_target(smollm2_path, layout="in_out")
    prompts = [Prompt("chat", t) for t in ("Name three colors.", "What is 2 + 2?", "Write a haiku about rain.",
                                            "def add(a, b):")]
    s = DI.distill(target, prompts, tmp_path, max_new_tokens=6, batch_size=2, refill_rows=1, progress=False)
    assert s["conversations"] == 4
    recs = read_answers(tmp_path / "answers.jsonl", target.sha256)
    fs = F.load_features(tmp_path / "features", target.sha256, target.cfg.hidden_size)
    for j, r in enumerate(recs):
        ref, _ = target_only.generate(target.params, target.cfg, r["prompt_ids"], 6, eos_ids=target.eos_ids)
        assert r["answer_ids"] == ref
        hid, am = _lone(target.cfg, target.params, r["prompt_ids"] + ref)
        a, b = fs.offsets[j], fs.offsets[j + 1]
        got = fs.feats[a:b].astype(np.float32)
        # SmolLM2's massive activation makes f32 paths differ by ~1e-4 relative; then bf16 rounding
        np.testing.assert_allclose(got, hid.astype(jnp.bfloat16).astype(np.float32), rtol=2e-2, atol=2e-2)
        assert (fs.argmax[a:b] == am).mean() >= 0.95  # greedy ties may flip in f32 noise


# --- self-prompting (train/magpie.py) ---------------------------------------------------------------------------

_WORDS = ["how", "do", "i", "write", "the", "a", "poem", "about", "cats", "and", "dogs", "what", "is", "python",
          "explain", "to", "me"]


class _WordTok:
    """A stand-in tokenizer for the tiny target: id i is a word, the ChatML marks are ids 1 and 2 (like SmolLM2),
    EOS (7) ends a turn."""

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return "".join(f"<s> {m['role']} {m['content']} </s> " for m in messages)

    def encode(self, text, add_special_tokens=True):
        table = {"<s>": 1, "</s>": 2, "system": 3, "user": 4, "assistant": 5}
        return [table[w] for w in text.split()]

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(_WORDS[i % len(_WORDS)] for i in ids)


def test_self_prompting_is_sampled_resumable_and_independent_of_the_batch(tiny, tmp_path):
    from dovetail_jax.train import magpie as MP
    from dovetail_jax.train.sources import read_magpie

    cfg, params = tiny
    tgt = SimpleNamespace(cfg=cfg, params=params, sha256="a" * 64, eos_ids=(EOS,), tokenizer=_WordTok())
    assert MP.user_prefix_ids(tgt.tokenizer) == [1, 4]  # "<s> user " before the user's text
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    s = MP.generate_user_turns(tgt, 12, a, seed=1, max_tokens=10, batch_size=3, refill_rows=2, progress=False)
    assert s["generated"] == 12
    MP.generate_user_turns(tgt, 5, b, seed=1, max_tokens=10, batch_size=5, refill_rows=1, progress=False)
    MP.generate_user_turns(tgt, 12, b, seed=1, max_tokens=10, batch_size=4, refill_rows=4, progress=False)  # resume
    ra = {r["index"]: r for r in map(json.loads, a.read_text().splitlines())}
    rb = {r["index"]: r for r in map(json.loads, b.read_text().splitlines())}
    assert sorted(ra) == sorted(rb) == list(range(12))
    assert all(ra[i]["text"] == rb[i]["text"] for i in ra)  # one key per (turn, position)
    assert len({r["text"] for r in ra.values()}) > 6  # sampled, not one greedy turn
    assert {r["reason"] for r in ra.values()} <= {"", "no end of turn", "too short", "not English"}
    kept = [r["text"] for _, r in sorted(ra.items()) if r["keep"]]
    assert [p.text for p in read_magpie(a)] == list(dict.fromkeys(kept))
    with pytest.raises(ModelFormatError, match="sampling settings"):
        MP.generate_user_turns(tgt, 12, a, seed=2, max_tokens=10, progress=False)
    # a near-zero temperature samples the greedy continuation: one-at-a-time greedy decoding is the reference
    c = tmp_path / "c.jsonl"
    MP.generate_user_turns(tgt, 2, c, temperature=1e-4, max_tokens=10, batch_size=2, progress=False)
    ref, _ = target_only.generate(params, cfg, [1, 4], 10, eos_ids=(EOS,))
    body = ref[:-1] if ref[-1] == EOS else ref
    assert all(json.loads(x)["text"] == _WordTok().decode(body) for x in c.read_text().splitlines())


def test_self_prompts_grow_a_work_folders_prompt_list_after_what_it_has(tiny, tmp_path):
    """`train-draft --self-prompts N`: the kept, new, decontaminated turns are appended in sample order; the list
    before them, and every complete shard, stay; the partial last shard is remade; asking again is a no-op and a
    larger N only appends."""
    from dataclasses import asdict

    from dovetail_jax.io.eval_prompts import evaluation_texts
    from dovetail_jax.train import magpie as MP
    from dovetail_jax.train import pipeline as PL
    from dovetail_jax.train.sources import Mix

    cfg, params = tiny
    tgt = SimpleNamespace(cfg=cfg, params=params, sha256="a" * 64, eos_ids=(EOS,), tokenizer=_WordTok())
    work = tmp_path / "work"
    turns = work / "magpie.jsonl"
    MP.generate_user_turns(tgt, 16, turns, batch_size=4, progress=False)  # the pipeline's settings
    rows = [json.loads(x) for x in turns.read_text().splitlines()]
    kept = list(dict.fromkeys(r["text"] for r in sorted(rows, key=lambda r: r["index"]) if r["keep"]))
    assert len(kept) >= 3
    # sample 16 (not yet drawn) is an MT-bench question the target "wrote": decontamination must drop it
    leak = evaluation_texts()[-1]
    with turns.open("a") as f:
        f.write(json.dumps({**rows[0], "index": 16, "text": leak, "keep": True, "reason": ""}) + "\n")
    base = [Prompt("code/x", f"prompt {i}") for i in range(F.SHARD_RECORDS + 2)] + [Prompt("chat", kept[0])]
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"format": "dovetail-prompts/1", "mix": asdict(Mix())}, *map(asdict, base)]))
    for k in (0, 1):  # shard 1 holds 3 of 128 prompts: partial
        F.shard_dir(work / "features", k).mkdir(parents=True)
    opts = PL.PipelineOptions(work=work, self_prompts=16, progress=False)
    listed = PL._prompt_list(opts, print)
    assert listed == base
    grown = PL._grow_with_self_prompts(tgt, opts, listed, print)
    assert grown[:len(base)] == base and [p.text for p in grown[len(base):]] == kept[1:]
    assert {p.source for p in grown[len(base):]} == {"magpie"}
    assert F.shard_dir(work / "features", 0).exists() and not F.shard_dir(work / "features", 1).exists()
    assert PL._prompt_list(opts, print) == grown  # what the next sitting reads
    before = (work / "prompts.jsonl").read_bytes()
    assert PL._grow_with_self_prompts(tgt, opts, grown, print) == grown
    assert (work / "prompts.jsonl").read_bytes() == before
    more = PL._grow_with_self_prompts(tgt, PL.PipelineOptions(work=work, self_prompts=40, progress=False), grown,
                                      print)
    assert more[:len(grown)] == grown and leak not in [p.text for p in more]
    assert len(more) > len(grown)  # samples 17..39 add turns
    assert json.loads((work / "prompts.jsonl").read_text().splitlines()[0])["self_prompts"] == 40


def test_later_turns_grow_a_work_folders_prompt_list_after_what_it_has(tmp_path):
    """`train-draft --later-turns N`: the first N of ShareGPT's standalone later turns, less those listed already,
    are appended after the list; the partial last shard is remade; asking again is a no-op, a larger N appends the
    next ones, and both kinds of growth keep each other's head records."""
    from dataclasses import asdict

    from dovetail_jax.train import pipeline as PL
    from dovetail_jax.train.sources import Mix, sharegpt_later_prompts

    later = sharegpt_later_prompts()[0]
    work = tmp_path / "work"
    base = [Prompt("code/x", f"prompt {i}") for i in range(F.SHARD_RECORDS + 2)] + [later[3]]  # listed already
    (work / "prompts.jsonl").parent.mkdir(parents=True)
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"format": "dovetail-prompts/1", "mix": asdict(Mix()), "self_prompts": 7}, *map(asdict, base)]))
    for k in (0, 1):  # shard 1 holds 3 of 128 prompts: partial
        F.shard_dir(work / "features", k).mkdir(parents=True)
    opts = PL.PipelineOptions(work=work, later_turns=6, progress=False)
    grown = PL._grow_with_later_turns(opts, PL._prompt_list(opts, print), print)
    assert grown == base + later[:3] + later[4:6]
    assert F.shard_dir(work / "features", 0).exists() and not F.shard_dir(work / "features", 1).exists()
    assert PL._prompt_list(opts, print) == grown  # what the next sitting reads
    before = (work / "prompts.jsonl").read_bytes()
    assert PL._grow_with_later_turns(opts, grown, print) == grown
    assert (work / "prompts.jsonl").read_bytes() == before
    more = PL._grow_with_later_turns(PL.PipelineOptions(work=work, later_turns=9, progress=False), grown, print)
    assert more == grown + later[6:9]
    head = json.loads((work / "prompts.jsonl").read_text().splitlines()[0])
    assert head["later_turns"] == 9 and head["self_prompts"] == 7


# --- vocabulary coverage (train/diagnostics.py) -----------------------------------------------------------------


def test_vocab_coverage_counts_tokens_inside_the_reduced_vocabulary(tiny, tmp_path):
    from dovetail_jax.train import diagnostics as DG

    rng = np.random.default_rng(0)
    vm = rng.permutation(64)[:20]
    tokens = rng.integers(0, 64, 500)
    want = sum(int(t) in set(vm.tolist()) for t in tokens) / tokens.size
    assert DG.vocab_coverage(vm, tokens) == pytest.approx(want)
    assert DG.vocab_coverage(None, tokens) == 1.0
    # from shards written by `distill`: the greedy tokens at the trained positions are the greedy answers
    cfg, params = tiny
    DI.distill(_target(cfg, params), _prompts(2, 6), tmp_path, max_new_tokens=10, batch_size=4, refill_rows=2,
               max_prompt_tokens=32, progress=False)
    fs = F.load_features(tmp_path / "features", "a" * 64, cfg.hidden_size)
    recs = read_answers(tmp_path / "answers.jsonl")
    np.testing.assert_array_equal(DG.greedy_answer_tokens(fs), DG.answer_tokens(recs))


def test_coverage_report_reads_a_shipped_checkpoints_vocabulary():
    from pathlib import Path

    from dovetail_jax.train import diagnostics as DG

    ck = Path(__file__).parents[1] / "checkpoints" / "smollm2-135m-dgf1-v8192"
    if not ck.exists():
        pytest.skip("no shipped draft")
    vm = DG.checkpoint_vocab_map(ck)
    assert vm.size == 8192 and np.unique(vm).size == 8192
    outside = np.setdiff1d(np.arange(49152), vm)[:30]
    rep = DG.coverage_report(ck, np.concatenate([vm[:90], outside]))
    assert rep["coverage"] == pytest.approx(0.75) and rep["missed_distinct"] == 30
