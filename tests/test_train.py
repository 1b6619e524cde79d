"""Draft training: batched generation, feature shards, the loss, the trainer (resume, refusal) and the pipeline."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dovetail_helpers import analysis_script, tiny_target

from dovetail_jax.config import DraftConfig
from dovetail_jax.decode import target_only
from dovetail_jax.decode.batched import generate_greedy_batch
from dovetail_jax.errors import ConfigError, ModelFormatError
from dovetail_jax.model import draft as D
from dovetail_jax.model.cache import append, init_cache
from dovetail_jax.model.target import causal_mask, forward
from dovetail_jax.train import features as F
from dovetail_jax.train import trainer as T
from dovetail_jax.train.loss import Batch, losses, smooth_l1, unroll, unroll_mask


@pytest.fixture(scope="module")
def tiny():
    return tiny_target(vocab=64, seed=3, scale=0.4)


def _prompts(seed: int, n: int, vocab: int = 64) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, size=int(rng.integers(1, 20))).tolist() for _ in range(n)]


def test_batched_generation_equals_one_prompt_at_a_time(tiny):
    cfg, params = tiny
    prompts = _prompts(0, 5)
    eos = (7,)
    got = generate_greedy_batch(params, cfg, prompts, 24, eos)
    for p, g in zip(prompts, got, strict=True):
        ref, _ = target_only.generate(params, cfg, p, 24, eos_ids=eos)
        assert g == ref


def test_batched_generation_rejects_bad_input(tiny):
    cfg, params = tiny
    with pytest.raises(ConfigError):
        generate_greedy_batch(params, cfg, [[1, 2], []], 4, ())
    with pytest.raises(ConfigError):
        generate_greedy_batch(params, cfg, [[1, 2]], 0, ())


def _records(cfg, params, n: int, seed: int = 0) -> list[dict]:
    prompts = _prompts(seed, n)
    answers = generate_greedy_batch(params, cfg, prompts, 16, ())
    pairs = enumerate(zip(prompts, answers, strict=True))
    return [{"index": i, "prompt_ids": p, "answer_ids": a} for i, (p, a) in pairs]


def _fake_target(cfg, params, sha="a" * 64):
    return SimpleNamespace(cfg=cfg, params=params, sha256=sha, eos_ids=(7,))


def test_feature_shard_equals_a_lone_forward(tiny):
    cfg, params = tiny
    recs = _records(cfg, params, 6)
    arrays = F.extract_shard(params, cfg, F.sequences(recs), tokens_per_batch=128)
    for i, (seq, plen) in enumerate(F.sequences(recs)):
        a, b = arrays["offsets"][i], arrays["offsets"][i + 1]
        assert b - a == len(seq) and arrays["prompt_len"][i] == plen
        tok = jnp.asarray([seq], jnp.int32)
        pos = jnp.arange(len(seq), dtype=jnp.int32)[None]
        logits, hid, _ = forward(params, cfg, tok, pos, causal_mask(len(seq)), init_cache(cfg, 1), "all",
                                 empty_cache=True)
        got = arrays["feats"][a:b].view(jnp.bfloat16).astype(np.float32)
        np.testing.assert_allclose(got, np.asarray(hid[0]), rtol=1e-2, atol=1e-2)  # stored in bfloat16
        np.testing.assert_array_equal(arrays["argmax"][a:b], np.asarray(jnp.argmax(logits[0], -1)))
        np.testing.assert_array_equal(arrays["ids"][a:b], seq)


def test_extraction_resumes_and_refuses_foreign_shards(tiny, tmp_path, monkeypatch):
    cfg, params = tiny
    monkeypatch.setattr(F, "SHARD_RECORDS", 4)
    recs = _records(cfg, params, 10)
    tgt = _fake_target(cfg, params)
    first = F.extract_all(tgt, recs[:6], tmp_path, progress=False)
    assert first["extracted"] == 2  # 4 + a short last shard of 2
    again = F.extract_all(tgt, recs, tmp_path, progress=False)
    assert again["extracted"] == 2  # the short shard is redone with its 4 records, one new shard of 2
    assert F.extract_all(tgt, recs, tmp_path, progress=False)["extracted"] == 0
    fs = F.load_features(tmp_path, tgt.sha256, cfg.hidden_size)
    assert fs.num_sequences == 10 and list(fs.record_index) == list(range(10))
    with pytest.raises(ModelFormatError, match="another model"):
        F.load_features(tmp_path, "b" * 64, cfg.hidden_size)
    with pytest.raises(ModelFormatError, match="another model"):
        F.extract_all(_fake_target(cfg, params, "b" * 64), recs, tmp_path, progress=False)
    (tmp_path / "shard-00001" / "ids.npy").write_bytes(b"garbage")
    with pytest.raises(ModelFormatError, match="shard-00001"):
        F.load_features(tmp_path, tgt.sha256, cfg.hidden_size)
    shutil.rmtree(tmp_path / "shard-00001")
    assert F.extract_all(tgt, recs, tmp_path, progress=False)["extracted"] == 1  # only the deleted shard
    (tmp_path / "shard-00002" / "argmax.npy").unlink()
    with pytest.raises(ModelFormatError, match="missing argmax.npy"):
        F.load_features(tmp_path, tgt.sha256, cfg.hidden_size)


def test_smooth_l1_closed_form():
    x = jnp.asarray([0.0, 0.5, -2.0, 3.0])
    np.testing.assert_allclose(smooth_l1(x, jnp.zeros(4)), [0.0, 0.125, 1.5, 2.5])


def test_losses_match_a_numpy_reference(tiny):
    cfg, params = tiny
    dcfg = DraftConfig(num_layers=1, fusion="dgf", draft_vocab_size=16)
    p = D.init_draft(jax.random.key(1), cfg, dcfg)
    vm = np.arange(16, dtype=np.int32)[::-1].copy()
    shared = D.make_shared(params, cfg, vm)
    rng = np.random.default_rng(0)
    b, t, h = 2, 6, cfg.hidden_size
    feats = rng.standard_normal((b, t + 1, h)).astype(np.float32)
    ids = rng.integers(0, 64, (b, t + 1)).astype(np.int32)
    am = rng.integers(0, 16, (b, t + 1)).astype(np.int32)
    mask = np.zeros((b, t), np.float32)
    mask[0, 2:5] = 1
    mask[1, :] = 1
    batch = Batch(feats=jnp.asarray(feats), ids=jnp.asarray(ids), argmax=jnp.asarray(am), mask=jnp.asarray(mask))
    total, m = losses(p, shared, batch, None, cfg=cfg, dcfg=dcfg, noise=0.0, p_weight=0.1)
    # reference: the draft's forward run sequence by sequence, losses by hand in numpy (float64)
    head = np.asarray(shared.head, np.float64)
    v_sum = p_sum = hits = 0.0
    for j in range(b):
        pos = jnp.arange(t, dtype=jnp.int32)[None]
        cache = init_cache(cfg, 1)
        cache = cache.replace(k=cache.k[:1], v=cache.v[:1])
        pred, _ = D.forward(p, shared, cfg, dcfg, jnp.asarray(feats[j:j + 1, :-1]), jnp.asarray(ids[j:j + 1, 1:]),
                            pos, causal_mask(t), cache, empty_cache=True)
        pred = np.asarray(pred[0], np.float64)
        nxt = feats[j, 1:].astype(np.float64)
        d = np.abs(pred - nxt)
        sl1 = np.where(d < 1, 0.5 * d * d, d - 0.5).mean(-1)
        lt = nxt @ head.T
        pt = np.exp(lt - lt.max(-1, keepdims=True))
        pt /= pt.sum(-1, keepdims=True)
        lq = pred @ head.T
        lq = lq - lq.max(-1, keepdims=True)
        lq = lq - np.log(np.exp(lq).sum(-1, keepdims=True))
        v_sum += (mask[j] * sl1).sum()
        p_sum += (mask[j] * -(pt * lq).sum(-1)).sum()
        hits += (mask[j] * (vm[lq.argmax(-1)] == am[j, 1:])).sum()
    n = mask.sum()
    np.testing.assert_allclose(float(m["vloss"]), v_sum / n, rtol=1e-5)
    np.testing.assert_allclose(float(m["ploss"]), p_sum / n, rtol=1e-5)
    np.testing.assert_allclose(float(total), v_sum / n + 0.1 * p_sum / n, rtol=1e-5)
    assert float(m["top1"]) == pytest.approx(hits / n)
    assert float(m["positions"]) == n


def test_unroll_mask_closed_form():
    # step 3 over 4 positions: step-1 keys up to i-2, step-2 key at i-1, itself
    m = np.asarray(unroll_mask(4, 3))
    assert m.shape == (4, 12)
    for i in range(4):
        assert m[i, :4].tolist() == [j <= i - 2 for j in range(4)]
        assert m[i, 4:8].tolist() == [j == i - 1 for j in range(4)]
        assert m[i, 8:].tolist() == [j == i for j in range(4)]


@pytest.mark.parametrize("layers", [1, 2])
def test_unroll_equals_drafting_on_own_guesses_with_a_cache(tiny, layers):
    """Step k at position i = what inference computes: the real pairs 0..i-k+1 through the cache, then k-1
    single-token steps each fed the previous step's output (the tree's depth-k node on the target's path)."""
    cfg, params = tiny
    dcfg = DraftConfig(num_layers=layers, fusion="dgf", draft_vocab_size=None)
    p = D.init_draft(jax.random.key(2), cfg, dcfg)
    shared = D.make_shared(params, cfg)
    rng = np.random.default_rng(1)
    t, steps = 5, 3
    feats = jnp.asarray(rng.standard_normal((1, t, cfg.hidden_size)).astype(np.float32))
    toks = jnp.asarray(rng.integers(0, 64, (1, t)).astype(np.int32))
    outs = unroll(p, shared, feats, toks, steps, cfg=cfg, dcfg=dcfg)

    def empty():
        c = init_cache(cfg, t)
        return c.replace(k=c.k[:layers], v=c.v[:layers])

    for k in range(1, steps + 1):
        for i in range(k - 1, t):
            r = i - k + 1  # the last real pair
            pos = jnp.arange(r + 1, dtype=jnp.int32)[None]
            h, upd = D.forward(p, shared, cfg, dcfg, feats[:, :r + 1], toks[:, :r + 1], pos, causal_mask(r + 1),
                               empty())
            cache = append(empty(), upd)
            x = h[:, -1:]
            for j in range(r + 1, i + 1):
                x, upd = D.forward(p, shared, cfg, dcfg, x, toks[:, j:j + 1], jnp.asarray([[j]], jnp.int32),
                                   jnp.ones((1, 1), bool), cache)
                cache = append(cache, upd)
            np.testing.assert_allclose(np.asarray(outs[k - 1][0, i]), np.asarray(x[0, 0]), rtol=2e-4, atol=2e-5)


def test_unrolled_losses_weigh_steps_and_mask_oov(tiny):
    cfg, params = tiny
    dcfg = DraftConfig(num_layers=1, fusion="dgf", draft_vocab_size=16)
    p = D.init_draft(jax.random.key(1), cfg, dcfg)
    vm = np.arange(16, dtype=np.int32) * 2  # even ids only
    shared = D.make_shared(params, cfg, vm)
    rng = np.random.default_rng(4)
    b, t = 2, 6
    batch = Batch(feats=jnp.asarray(rng.standard_normal((b, t + 1, cfg.hidden_size)).astype(np.float32)),
                  ids=jnp.asarray(rng.integers(0, 64, (b, t + 1)).astype(np.int32)),
                  argmax=jnp.asarray(rng.integers(0, 32, (b, t + 1)).astype(np.int32)),
                  mask=jnp.ones((b, t), jnp.float32))
    one, m1 = losses(p, shared, batch, None, cfg=cfg, dcfg=dcfg, noise=0.0, p_weight=0.1, report_steps=3)
    three, m3 = losses(p, shared, batch, None, cfg=cfg, dcfg=dcfg, noise=0.0, p_weight=0.1, steps=3, decay=0.5)
    assert float(m3["top1"]) == pytest.approx(float(m1["top1"]))
    assert float(m3["top1_3"]) == pytest.approx(float(m1["top1_3"]))  # reported, not trained, at steps=1
    assert float(one) == pytest.approx(float(m1["vloss"]) + 0.1 * float(m1["ploss"]), rel=1e-6)
    # the total is step 1's plus the decayed unrolled steps: recompute those from `unroll` by hand
    outs = unroll(p, shared, batch.feats[:, :-1], batch.ids[:, 1:], 3, cfg=cfg, dcfg=dcfg)
    head = np.asarray(shared.head, np.float64)
    nxt = np.asarray(batch.feats[:, 1:], np.float64)
    lt = nxt @ head.T
    pt = np.exp(lt - lt.max(-1, keepdims=True))
    pt /= pt.sum(-1, keepdims=True)
    want = 0.0
    for k, o in enumerate(outs, 1):
        o = np.asarray(o, np.float64)[:, k - 1:]
        d = np.abs(o - nxt[:, k - 1:])
        v = np.where(d < 1, 0.5 * d * d, d - 0.5).mean(-1).mean()
        lq = o @ head.T
        lq = lq - lq.max(-1, keepdims=True)
        lq = lq - np.log(np.exp(lq).sum(-1, keepdims=True))
        want += 0.5 ** (k - 1) * (v + 0.1 * -(pt[:, k - 1:] * lq).sum(-1).mean())
    assert float(three) == pytest.approx(want, rel=1e-4)
    # with mask_oov only positions whose greedy token is an even id (in the draft vocabulary) count
    _, mo = losses(p, shared, batch, None, cfg=cfg, dcfg=dcfg, noise=0.0, mask_oov=True)
    assert float(mo["positions"]) == float((np.asarray(batch.argmax[:, 1:]) % 2 == 0).sum())


def test_batch_plan_covers_every_sequence_once_within_budget():
    lengths = np.random.default_rng(0).integers(5, 300, 200)
    seqs = np.arange(200)[::3]
    plan = T.batch_plan(lengths, seqs, 1024, seed=0, epoch=0)
    flat = np.concatenate(plan)
    assert sorted(flat.tolist()) == sorted(seqs.tolist())
    for b in plan:
        assert b.size == 1 or T._bucket(int(lengths[b].max())) * b.size <= 1024
    again = T.batch_plan(lengths, seqs, 1024, seed=0, epoch=0)
    assert all(np.array_equal(a, b) for a, b in zip(plan, again, strict=True))


def test_make_batch_masks_the_answer_only(tiny):
    cfg, params = tiny
    recs = _records(cfg, params, 3)
    arrays = F.extract_shard(params, cfg, F.sequences(recs))
    fs = F.FeatureSet(feats=arrays["feats"].view(jnp.bfloat16), ids=arrays["ids"], argmax=arrays["argmax"],
                      offsets=arrays["offsets"], prompt_len=arrays["prompt_len"], record_index=np.arange(3),
                      meta={})
    b = T.make_batch(fs, np.arange(3))
    for j, r in enumerate(recs):
        n, p = len(r["prompt_ids"]) + len(r["answer_ids"]), len(r["prompt_ids"])
        want = np.zeros(b.mask.shape[1])
        want[p - 1:n - 1] = 1
        np.testing.assert_array_equal(np.asarray(b.mask[j]), want)
        np.testing.assert_array_equal(np.asarray(b.ids[j, :n]), r["prompt_ids"] + r["answer_ids"])


@pytest.fixture(scope="module")
def tiny_features(tiny, tmp_path_factory):
    cfg, params = tiny
    folder = tmp_path_factory.mktemp("feats")
    recs = _records(cfg, params, 40, seed=5)
    F.extract_all(_fake_target(cfg, params), recs, folder, progress=False)
    return F.load_features(folder, "a" * 64, cfg.hidden_size)


def _leaves(p):
    return [np.asarray(x) for x in jax.tree.leaves(p)]


def test_training_learns_and_resumes_exactly(tiny, tiny_features, tmp_path):
    cfg, params = tiny
    fs = tiny_features
    dcfg = DraftConfig(num_layers=1, fusion="dgf", draft_vocab_size=32)
    tc = T.TrainConfig(steps=40, batch_tokens=256, lr=1e-2, warmup=5, save_every=10, eval_every=20,
                       heldout_every=5)
    train_seqs, _ = T.split(fs, 5)
    vm = T.choose_vocab(fs, train_seqs, 32, (7,))
    assert vm.size == 32 and 7 in vm and len(set(vm.tolist())) == 32
    full = T.train(params, cfg, dcfg, tc, fs, vm, tmp_path / "a", "a" * 64, progress=False)
    log = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 20 and log[-1]["step"] == 40
    shared = D.make_shared(params, cfg, vm)
    fresh = T.evaluate(D.init_draft(jax.random.key(0), cfg, dcfg), shared, fs, train_seqs, cfg, dcfg, tc)
    trained = T.evaluate(full.params, shared, fs, train_seqs, cfg, dcfg, tc)
    assert trained["loss"] < 0.7 * fresh["loss"]  # the optimiser fits the training split
    assert full.heldout["loss"] < T.evaluate(D.init_draft(jax.random.key(0), cfg, dcfg), shared, fs,
                                             T.split(fs, 5)[1], cfg, dcfg, tc)["loss"]
    # stop after 20 steps, then rerun asking for 40: same weights as the uninterrupted run
    part = T.train(params, cfg, dcfg, tc, fs, vm, tmp_path / "b", "a" * 64, progress=False, stop_at=20)
    assert part.step == 20 and not part.interrupted
    resumed = T.train(params, cfg, dcfg, tc, fs, vm, tmp_path / "b", "a" * 64, progress=False)
    assert resumed.step == 40
    for x, y in zip(_leaves(full.params), _leaves(resumed.params), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_ctrl_c_saves_and_returns_without_a_heldout_pass(tiny, tiny_features, tmp_path, monkeypatch):
    """Ctrl-C between evaluations: a checkpoint at the step reached, `interrupted`, and no extra pass over the
    held-out split (minutes on the real data); the next call resumes from that checkpoint."""
    cfg, params = tiny
    fs = tiny_features
    dcfg = DraftConfig(num_layers=1, fusion="dgf", draft_vocab_size=32)
    tc = T.TrainConfig(steps=10, batch_tokens=256, lr=1e-3, warmup=1, save_every=100, eval_every=100,
                       heldout_every=5)
    vm = T.choose_vocab(fs, T.split(fs, 5)[0], 32, (7,))
    real, calls = T.make_batch, []

    def make_batch(fs_, seqs, taps=False):
        calls.append(len(seqs))
        if len(calls) == 7:  # the 7th training batch: steps 1-6 are done
            raise KeyboardInterrupt
        return real(fs_, seqs, taps)

    monkeypatch.setattr(T, "make_batch", make_batch)
    out = T.train(params, cfg, dcfg, tc, fs, vm, tmp_path / "r", "a" * 64, progress=False)
    assert out.interrupted and out.step == 6 and out.heldout == {}
    assert len(calls) == 7  # nothing evaluated after the interrupt
    monkeypatch.setattr(T, "make_batch", real)
    resumed = T.train(params, cfg, dcfg, tc, fs, vm, tmp_path / "r", "a" * 64, progress=False)
    assert resumed.step == 10 and not resumed.interrupted and "top1" in resumed.heldout


def test_warm_start_continues_from_the_given_draft(tiny, tiny_features, tmp_path):
    """`init`: a fresh run starts from those weights (one step moves them by at most lr per weight, AdamW's
    bound), not from the seeded random draft; a run folder made from another start is refused."""
    cfg, params = tiny
    fs = tiny_features
    dcfg = DraftConfig(num_layers=1, fusion="dgf", draft_vocab_size=32)
    tc = T.TrainConfig(steps=3, batch_tokens=256, lr=1e-3, warmup=1, eval_every=1, heldout_every=5)
    train_seqs, _ = T.split(fs, 5)
    vm = T.choose_vocab(fs, train_seqs, 32, (7,))
    start = D.init_draft(jax.random.key(99), cfg, dcfg)
    out = T.train(params, cfg, dcfg, tc, fs, vm, tmp_path / "w", "a" * 64, progress=False, stop_at=2, init=start)
    fresh = D.init_draft(jax.random.key(tc.seed), cfg, dcfg)
    moved = [np.abs(a - b).max() for a, b in zip(_leaves(out.params), _leaves(start), strict=True)]
    assert 0 < max(moved) <= 3e-3  # two AdamW steps (the first at lr 0) move a weight by a few lr at most
    assert any(np.abs(a - b).max() > 1e-2 for a, b in zip(_leaves(out.params), _leaves(fresh), strict=True))
    rec = T.run_record(cfg, dcfg, tc, "a" * 64, {"folder": "f", "conversations": 3})
    (tmp_path / "run.json").write_text(json.dumps(rec | {"init": {"name": "x", "weights_sha256": "1" * 64}}))
    with pytest.raises(ConfigError, match="init"):
        T.check_run(tmp_path, rec)


def test_warm_start_keeps_or_drops_the_drafts_vocabulary(tiny, tmp_path):
    """`--init` keeps the draft's vocabulary and needs the same size; with `--new-vocab` the weights come along
    unchanged (they do not depend on the vocabulary: the head is the target's) and any size may be chosen anew."""
    from dovetail_jax.io import checkpoint as ck
    from dovetail_jax.train.pipeline import _warm_start

    cfg, _ = tiny
    dcfg = DraftConfig(num_layers=1, fusion="dgf", draft_vocab_size=32)
    start = D.init_draft(jax.random.key(5), cfg, dcfg)
    vm = np.arange(3, 35, dtype=np.int32)
    folder = ck.save_draft(tmp_path / "d", cfg, dcfg, start, vocab_map=vm, target_sha256="a" * 64, dtype="float32")
    target = SimpleNamespace(cfg=cfg, sha256="a" * 64)
    params, got_vm, rec = _warm_start(target, dcfg, folder)
    np.testing.assert_array_equal(got_vm, vm)
    assert "new_vocab" not in rec["init"]
    bigger = DraftConfig(num_layers=1, fusion="dgf", draft_vocab_size=48)
    with pytest.raises(ConfigError, match="--new-vocab"):
        _warm_start(target, bigger, folder)
    params2, got_vm2, rec2 = _warm_start(target, bigger, folder, new_vocab=True)
    assert got_vm2 is None and rec2["init"]["new_vocab"] is True
    assert rec2["init"]["weights_sha256"] == rec["init"]["weights_sha256"]
    for x, y in zip(_leaves(params), _leaves(params2), strict=True):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ConfigError, match="fusion"):
        _warm_start(target, DraftConfig(num_layers=1, fusion="eagle", draft_vocab_size=32), folder)
    # more layers: the draft is grown (`draft.deepen`), its block kept; fewer: refused
    two = DraftConfig(num_layers=2, fusion="dgf", draft_vocab_size=32)
    grown, grown_vm, rec3 = _warm_start(target, two, folder, seed=3)
    assert len(grown.layers) == 2 and rec3["init"]["grown_from_layers"] == 1
    np.testing.assert_array_equal(grown_vm, vm)
    for x, y in zip(_leaves(grown.layers[0]), _leaves(params.layers[0]), strict=True):
        np.testing.assert_array_equal(x, y)
    folder2 = ck.save_draft(tmp_path / "d2", cfg, two, grown, vocab_map=vm, target_sha256="a" * 64, dtype="float32")
    with pytest.raises(ConfigError, match="--layers 2 or more"):
        _warm_start(target, dcfg, folder2)


def test_a_run_folder_refuses_another_architecture(tiny):
    cfg, _ = tiny
    tc = T.TrainConfig()
    rec = T.run_record(cfg, DraftConfig(num_layers=1), tc, "a" * 64, {"folder": "f", "conversations": 3})
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        run = Path(d)
        (run / "run.json").write_text(json.dumps(rec))
        T.check_run(run, T.run_record(cfg, DraftConfig(num_layers=1), T.TrainConfig(steps=5000), "a" * 64,
                                      {"folder": "f", "conversations": 3}))  # more steps: fine
        with pytest.raises(ConfigError, match="draft"):
            T.check_run(run, T.run_record(cfg, DraftConfig(num_layers=2), tc, "a" * 64,
                                          {"folder": "f", "conversations": 3}))
        with pytest.raises(ConfigError, match="target"):
            T.check_run(run, T.run_record(cfg, DraftConfig(num_layers=1), tc, "b" * 64,
                                          {"folder": "f", "conversations": 3}))
        with pytest.raises(ConfigError, match="lr"):
            T.check_run(run, T.run_record(cfg, DraftConfig(num_layers=1), T.TrainConfig(lr=1.0), "a" * 64,
                                          {"folder": "f", "conversations": 3}))
    shutil.rmtree(d, ignore_errors=True)


def test_train_draft_end_to_end_on_smollm2(run_cli, smollm2_path, tmp_path):
    """The whole pipeline on the real target, tiny: answers, shards, 4 steps, a checkpoint with its card that
    loads and decodes losslessly; then the refusals: another architecture in the same run folder, and a
    feature shard of another model. Nothing already written is lost."""
    from dovetail_jax import api

    work = tmp_path / "work"
    out = tmp_path / "draft"
    base = ("train-draft", "--model", str(smollm2_path), "--work", str(work), "--num-prompts", "3",
            "--max-new-tokens", "12", "--gen-batch", "3", "--warmup", "1", "--save-every", "2", "--eval-every", "2",
            "--eval-prompts", "1", "--sources", "chat")
    code, _, err = run_cli(*base, "--steps", "4", "--stop-at", "2")
    assert code == 0 and "stopped at step 2 of 4" in err, err[-2000:]
    code, stdout, err = run_cli(*base, "--steps", "4", "--out", str(out), "--json")
    assert code == 0, err[-2000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["distill"]["written"] == 0 and summary["prompts"]["counts"] == {"chat": 3}
    assert summary["train"]["step"] == 4
    card = json.loads((out / "card.json").read_text())
    assert card["target"]["sha256"] and card["draft"] == {"num_layers": 1, "fusion": "dgf", "draft_vocab_size": 8192}
    assert card["training"]["steps"] == 4 and 0 <= card["heldout"]["top1"] <= 1
    assert card["heldout_tau"]["server"]["tau"] >= 1.0
    target = api.load_target(smollm2_path, layout="in_out")
    draft = api.load_draft(target, out)
    ref = api.generate(target, "Name three colors.", chat=True, max_new_tokens=24)
    got = api.generate(target, "Name three colors.", chat=True, max_new_tokens=24, draft=draft)
    assert got.token_ids == ref.token_ids
    # the export ranks every id for widening: its vocabulary first; a widened draft is lossless too
    order = np.load(out / "vocab_order.npy")
    assert "vocab_order" in card and sorted(order.tolist()) == list(range(target.cfg.vocab_size))
    wide = api.load_draft(target, out, vocab_size=9000)
    assert wide.cfg.draft_vocab_size == 9000 and int(wide.shared.head.shape[0]) == 9000
    got = api.generate(target, "Name three colors.", chat=True, max_new_tokens=24, draft=wide)
    assert got.token_ids == ref.token_ids
    # a draft exported before the pipeline wrote a ranking gets one from its work folder (the training answers)
    (out / "vocab_order.npy").unlink()
    assert analysis_script("write_vocab_order").main([str(out), "--work", str(work)]) == 0
    again = np.load(out / "vocab_order.npy")
    np.testing.assert_array_equal(again[:8192], order[:8192])
    weights = (out / "weights.safetensors").read_bytes()
    code, _, err = run_cli(*base, "--steps", "4", "--layers", "2", "--run", str(work / "runs" / "dgf1-v8192"))
    assert code == 2 and "draft" in err and "Traceback" not in err
    meta = work / "features" / "shard-00000" / "meta.json"
    m = json.loads(meta.read_text())
    m["target"]["sha256"] = "0" * 64
    meta.write_text(json.dumps(m))
    code, _, err = run_cli(*base, "--steps", "4")
    assert code == 2 and "features of another model" in err and "Traceback" not in err
    assert (out / "weights.safetensors").read_bytes() == weights


def test_widened_vocabulary_keeps_the_drafts_ids_first_then_the_most_counted() -> None:
    ev = analysis_script("eval_drafts_heldout")
    # two conversations: prompt tokens never count, answers and greedy choices do
    fs = SimpleNamespace(offsets=np.array([0, 5, 9]), prompt_len=np.array([2, 1]),
                         ids=np.array([9, 9, 1, 2, 2, 9, 3, 3, 3]), argmax=np.array([0, 0, 2, 2, 4, 0, 3, 5, 5]))
    counts = T.token_counts(fs, np.array([0, 1]), 10)
    want = np.zeros(10, np.int64)
    for s in (0, 1):
        a, b = fs.offsets[s] + fs.prompt_len[s], fs.offsets[s + 1]
        for t in [*fs.ids[a:b], *fs.argmax[a:b]]:
            want[t] += 1
    np.testing.assert_array_equal(counts, want)  # 2: 4, 3: 4, 5: 2, 1: 1, 4: 1
    vm = np.array([1, 7], np.int32)
    np.testing.assert_array_equal(ev.widen(vm, counts, 5), [1, 7, 2, 3, 5])
    np.testing.assert_array_equal(ev.widen(vm, counts, 2), vm)
    assert ev.widen(vm, counts, None) is None
    with pytest.raises(ValueError, match="cannot widen"):
        ev.widen(vm, counts, 1)
