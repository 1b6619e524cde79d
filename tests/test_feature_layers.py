"""Multi-layer features (EAGLE-3): the target hands a draft the outputs of several of its blocks side by side, and
the draft projects them to one feature (`DraftConfig.feature_layers`, `feature_fc`) before its fusion; its own
outputs (tree expansion) skip the projection. Checked against HF transformers' `hidden_states` (the real model),
a numpy fusion, the checkpoint round trip, and greedy losslessness of such a draft on the real model."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dovetail_jax import api, devices  # noqa: E402
from dovetail_jax.config import DraftConfig, ModelConfig, TreeConfig, eagle3_feature_layers  # noqa: E402
from dovetail_jax.errors import ConfigError, ModelFormatError  # noqa: E402
from dovetail_jax.io import checkpoint  # noqa: E402
from dovetail_jax.model import draft as D  # noqa: E402
from dovetail_jax.model.cache import init_cache  # noqa: E402
from dovetail_jax.model.target import causal_mask, forward  # noqa: E402

TINY = ModelConfig(vocab_size=101, hidden_size=48, intermediate_size=80, num_layers=8, num_heads=6, num_kv_heads=2,
                   head_dim=8, rope_theta=5000.0, rms_norm_eps=1e-5, max_position_embeddings=256,
                   name="tiny-eagle3-target")


@pytest.fixture(scope="module")
def target(smollm2_path):
    return api.load_target(smollm2_path, layout="in_out")


def test_eagle3_layers_and_config_checks() -> None:
    assert eagle3_feature_layers(30) == (2, 15, 27) and eagle3_feature_layers(8) == (2, 4, 5)
    with pytest.raises(ConfigError, match="6 or more blocks"):
        eagle3_feature_layers(4)
    for bad, msg in (((3,), "2 or more distinct"), ((2, 2), "2 or more distinct"), ((-1, 3), ">= 0"),
                     ([2, 3], "tuple"), ((2, 1.5), "integer")):
        with pytest.raises(ConfigError, match=msg):
            DraftConfig(feature_layers=bad)
    with pytest.raises(ConfigError, match="reads no target features"):
        DraftConfig(fusion="none", feature_layers=(1, 2))
    with pytest.raises(ConfigError, match=r"feature_layers \[8\] out of range"):
        DraftConfig(feature_layers=(2, 8)).check_target(TINY)
    DraftConfig(feature_layers=(2, 7)).check_target(TINY)


def test_taps_are_hf_hidden_states(target, hf_smollm2) -> None:
    """Block i's output is HF's `hidden_states[i + 1]` (index 0 is the embedding; the last entry is after the
    final norm). The residual stream carries SmolLM2's massive activation (|x| ~ 2e4 from layer 12), so the
    bound is relative to each layer's largest value, at float32 rounding of sums in another order (measured:
    1.5e-3 of 778 at block 2, 9.8e-3 of 2.2e4 at blocks 15 and 27; the neighbouring block differs by 27-550)."""
    ids = target.tokenizer.encode("def fibonacci(n):\n    if n < 2:")
    n, taps = len(ids), eagle3_feature_layers(target.cfg.num_layers)
    cache = init_cache(target.cfg, 64, device=devices.target_device())
    args = (target.params, target.cfg, jnp.asarray([ids], jnp.int32), jnp.arange(n)[None], causal_mask(n), cache)
    logits, feats, _ = forward(*args, taps=taps)
    logits0, final, _ = forward(*args)
    h = target.cfg.hidden_size
    assert feats.shape == (1, n, 3 * h) and final.shape == (1, n, h)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(logits0))  # taps change only what is returned
    with torch.no_grad():
        hs = hf_smollm2(torch.tensor([ids]), output_hidden_states=True).hidden_states
    for j, i in enumerate(taps):
        ours, ref = np.asarray(feats[0, :, j * h:(j + 1) * h]), hs[i + 1][0].numpy()
        assert np.abs(ours - ref).max() <= 5e-6 * np.abs(ref).max() + 1e-4, (i, np.abs(ours - ref).max())
    assert np.abs(np.asarray(final[0]) - hs[-1][0].numpy()).max() <= 1e-3  # () keeps the final-norm feature


def _draft(dcfg: DraftConfig, seed: int = 0) -> D.DraftParams:
    return D.init_draft(jax.random.key(seed), TINY, dcfg, layout="in_out")


@pytest.mark.parametrize("fusion", ["dgf", "eagle"])
def test_target_features_are_projected_own_outputs_are_not(fusion) -> None:
    dcfg = DraftConfig(fusion=fusion, feature_layers=(1, 4, 6))
    p = _draft(dcfg)
    h = TINY.hidden_size
    assert p.feature_fc.shape == (3 * h, h) and p.feature_layers == (1, 4, 6)
    shapes = D.expected_draft_shapes(TINY, dcfg)
    assert shapes["feature_fc.weight"] == (h, 3 * h) and shapes["feature_norm.weight"] == (h,)  # Linear(3H -> H)
    rng = np.random.default_rng(1)
    feats3 = rng.standard_normal((2, 5, 3 * h)).astype(np.float32)
    own = rng.standard_normal((2, 5, h)).astype(np.float32)
    emb = rng.standard_normal((2, 5, h)).astype(np.float32)
    p = p.replace(feature_norm=jnp.asarray(rng.uniform(0.5, 1.5, h), jnp.float32))
    plain = p.replace(feature_fc=None, feature_norm=None, feature_layers=())  # the same fusion, no projection
    proj = feats3.astype(np.float64) @ np.asarray(p.feature_fc, np.float64)
    proj = proj / np.sqrt((proj**2).mean(-1, keepdims=True) + TINY.rms_norm_eps) * np.asarray(p.feature_norm)
    want = D.fuse(plain, TINY, jnp.asarray(proj, jnp.float32), jnp.asarray(emb))
    got = D.fuse(p, TINY, jnp.asarray(feats3), jnp.asarray(emb))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(D.fuse(p, TINY, jnp.asarray(own), jnp.asarray(emb))),
                                  np.asarray(D.fuse(plain, TINY, jnp.asarray(own), jnp.asarray(emb))))
    q = D.quantize_matrices(p)  # the int8 inference path quantizes the projection too
    assert type(q.feature_fc).__name__ == "Int8Weight"


def test_checkpoint_round_trip_keeps_the_feature_layers(tmp_path) -> None:
    dcfg = DraftConfig(num_layers=1, feature_layers=(2, 4, 5))
    p = _draft(dcfg, seed=3)
    tensors = D.draft_tensors(p, TINY)
    assert "feature_fc.weight" in tensors
    folder = checkpoint.save_draft(tmp_path / "d", TINY, dcfg, p, target_sha256="0" * 64, dtype="float32")
    card = checkpoint.read_card(folder)
    assert card["draft"]["feature_layers"] == [2, 4, 5]
    dcfg2, p2, _, _ = checkpoint.load_draft(folder, TINY)
    assert dcfg2 == dcfg and p2.feature_layers == (2, 4, 5)
    np.testing.assert_array_equal(np.asarray(p2.feature_fc), np.asarray(p.feature_fc))
    # a card whose layers the target lacks, or a draft without them, is refused by name
    card["draft"]["feature_layers"] = [2, 4, 9]
    (folder / checkpoint.CARD).write_text(__import__("json").dumps(card))
    with pytest.raises(ModelFormatError, match="out of range"):
        checkpoint.load_draft(folder, TINY)
    card["draft"].pop("feature_layers")
    (folder / checkpoint.CARD).write_text(__import__("json").dumps(card))
    with pytest.raises(ModelFormatError, match="unexpected tensor.*feature_fc.weight"):
        checkpoint.load_draft(folder, TINY)


@pytest.mark.parametrize("tree", [TreeConfig(4, 3, 6), TreeConfig(10, 7, 16)], ids=["4-3-6", "10-7-16"])
def test_a_multi_layer_feature_draft_is_lossless_and_sends_its_features(tree) -> None:
    """Random drafts reading the final norm or blocks (0, 2) of a tiny 3-block target: greedy output identical to
    target-only; the prompt's and every cycle's features are 2 blocks wide (2x the bytes, counted)."""
    from dovetail_helpers import random_draft, tiny_target

    from dovetail_jax.decode import dovetail as DV
    from dovetail_jax.decode import target_only

    cfg, params = tiny_target(vocab=96, seed=3, scale=0.5, layers=3)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, 11).tolist()
    ref, _ = target_only.generate(params, cfg, prompt, 40, ignore_eos=True)
    stats = {}
    for name, dcfg in (("final", DraftConfig(1)), ("taps", DraftConfig(1, feature_layers=(0, 2)))):
        out, st = DV.generate(params, cfg, random_draft(cfg, params, dcfg), prompt, 40, tree, ignore_eos=True)
        assert out == ref, name
        assert st.dovetail.draft.to_dict().get("feature_layers") == ([0, 2] if name == "taps" else None)
        stats[name] = st
    f, e = (stats[k].dovetail.transfers for k in ("final", "taps"))
    extra = cfg.hidden_size * 4  # one more f32 feature per position
    assert e.prefill_bytes_to_draft - f.prefill_bytes_to_draft == extra * stats["final"].prompt_bucket

    def per_cycle(t) -> float:  # noqa: ANN001
        return (t.bytes_to_draft - t.prefill_bytes_to_draft) / (t.transfers_to_draft - 1)

    assert per_cycle(e) - per_cycle(f) == pytest.approx(extra * tree.width)


# --------------------------------------------------------------------------------------------- training data


def _tiny_shards(tmp_path, monkeypatch):  # noqa: ANN001, ANN202
    from types import SimpleNamespace

    from dovetail_helpers import tiny_target

    from dovetail_jax.decode.batched import generate_greedy_batch
    from dovetail_jax.train import features as F

    cfg, params = tiny_target(vocab=64, seed=3, scale=0.4, layers=3)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 64, size=int(rng.integers(2, 20))).tolist() for _ in range(40)]
    answers = generate_greedy_batch(params, cfg, prompts, 16, ())
    recs = [{"index": i, "prompt_ids": p, "answer_ids": a} for i, (p, a) in enumerate(zip(prompts, answers,
                                                                                          strict=True))]
    monkeypatch.setattr(F, "SHARD_RECORDS", 16)
    tgt = SimpleNamespace(cfg=cfg, params=params, sha256="a" * 64, eos_ids=(7,))
    F.extract_all(tgt, recs, tmp_path, progress=False)
    return tgt, recs


def test_taps_in_the_shards_equal_a_lone_forward_and_resume(tmp_path, monkeypatch) -> None:
    from dovetail_jax.train import features as F
    from dovetail_jax.train import trainer as T

    tgt, recs = _tiny_shards(tmp_path, monkeypatch)
    cfg, params, layers = tgt.cfg, tgt.params, (0, 2)
    first = F.extract_taps(tgt, tmp_path, layers, progress=False)
    assert first["extracted"] == 3 and first["tokens"] > 0
    assert F.extract_taps(tgt, tmp_path, layers, progress=False)["extracted"] == 0  # resumes: nothing to do
    fs = F.load_features(tmp_path, tgt.sha256, cfg.hidden_size, taps=layers)
    assert fs.taps.layers == layers and fs.taps.width == 2 * cfg.hidden_size and len(fs.taps.parts) == 3
    for s in (0, 17, 39):  # one conversation in each shard
        a, n = int(fs.offsets[s]), int(fs.offsets[s + 1] - fs.offsets[s])
        seq = (recs[s]["prompt_ids"] + recs[s]["answer_ids"])[:n]
        _, want, _ = forward(params, cfg, jnp.asarray([seq], jnp.int32), jnp.arange(n)[None], causal_mask(n),
                             init_cache(cfg, 1), "none", empty_cache=True, taps=layers)
        got = np.asarray(fs.taps.rows(a, n), np.float32)
        np.testing.assert_allclose(got, np.asarray(want[0]), rtol=1e-2, atol=1e-2)  # stored in bfloat16
    batch = T.make_batch(fs, np.array([3, 20]), taps=True)
    assert batch.taps.shape[2] == 2 * cfg.hidden_size and batch.taps.shape[:2] == batch.feats.shape[:2]
    assert T.make_batch(fs, np.array([3, 20])).taps is None  # a final-norm draft's batch
    # another set of blocks is another file; a shard without it, or with a wrong one, is named
    with pytest.raises(ModelFormatError, match=r"shard-00000: no readable taps-0-1\.npy"):
        F.load_features(tmp_path, tgt.sha256, cfg.hidden_size, taps=(0, 1))
    np.save(tmp_path / "shard-00001" / "taps-0-2.npy", np.zeros((3, 4), np.uint16))
    with pytest.raises(ModelFormatError, match=r"shard-00001: taps-0-2\.npy has shape \(3, 4\)"):
        F.load_features(tmp_path, tgt.sha256, cfg.hidden_size, taps=layers)


def test_a_multi_layer_feature_draft_trains(tmp_path, monkeypatch) -> None:
    """The unrolled loss runs on target taps at step 1 and on the draft's own outputs after; training lowers it.
    A feature set without the draft's taps is refused before any step."""
    from dovetail_jax.train import features as F
    from dovetail_jax.train import trainer as T

    tgt, _ = _tiny_shards(tmp_path / "f", monkeypatch)
    cfg, params, layers = tgt.cfg, tgt.params, (0, 2)
    F.extract_taps(tgt, tmp_path / "f", layers, progress=False)
    fs = F.load_features(tmp_path / "f", tgt.sha256, cfg.hidden_size, taps=layers)
    dcfg = DraftConfig(num_layers=1, draft_vocab_size=32, feature_layers=layers)
    tc = T.TrainConfig(steps=30, batch_tokens=256, lr=1e-2, warmup=5, save_every=30, eval_every=30,
                       heldout_every=5, ttt_steps=3)
    train_seqs, _ = T.split(fs, 5)
    vm = T.choose_vocab(fs, train_seqs, 32, (7,))
    res = T.train(params, cfg, dcfg, tc, fs, vm, tmp_path / "run", tgt.sha256, progress=False)
    assert res.params.feature_fc.shape == (2 * cfg.hidden_size, cfg.hidden_size)
    shared = D.make_shared(params, cfg, vm)
    fresh = T.evaluate(D.init_draft(jax.random.key(0), cfg, dcfg), shared, fs, train_seqs, cfg, dcfg, tc)
    trained = T.evaluate(res.params, shared, fs, train_seqs, cfg, dcfg, tc)
    assert all(np.isfinite(v) for v in trained.values()) and trained["loss"] < 0.8 * fresh["loss"]
    assert T.run_record(cfg, dcfg, tc, None, {})["draft"]["feature_layers"] == [0, 2]
    assert "feature_layers" not in T.run_record(cfg, DraftConfig(), tc, None, {})["draft"]  # as older runs say
    plain = F.load_features(tmp_path / "f", tgt.sha256, cfg.hidden_size)
    with pytest.raises(ConfigError, match=r"reading target blocks \(0, 2\) needs their features"):
        T.train(params, cfg, dcfg, tc, plain, vm, tmp_path / "run2", tgt.sha256, progress=False)


def test_the_simulator_counts_the_extra_features() -> None:
    """k features per accepted row cross the link (closed form), and the projection is priced with the fusion."""
    from dovetail_jax.config import SMOLLM2_135M, TreeConfig
    from simulator.costs import ID_BYTES, feature_bytes
    from simulator.workload import Workload

    h = SMOLLM2_135M.hidden_size
    plain = Workload(SMOLLM2_135M, DraftConfig(1), TreeConfig(4, 3, 6))
    e3 = Workload(SMOLLM2_135M, DraftConfig(1, feature_layers=eagle3_feature_layers(30)), TreeConfig(4, 3, 6))
    assert feature_bytes(plain, 3) == 3 * h * 4 + 4 * ID_BYTES
    assert feature_bytes(e3, 3) == 3 * 3 * h * 4 + 4 * ID_BYTES
    assert e3.fusion_params - plain.fusion_params == 3 * h * h + h


def test_warm_start_adds_the_feature_projection(tmp_path) -> None:
    """`--init` a final-norm draft with `--feature-layers`: its fusion and blocks are kept as they are and a fresh
    projection is added; a draft already reading other blocks, or going back to the final norm, is refused."""
    from types import SimpleNamespace

    from dovetail_jax.train.pipeline import _warm_start

    plain = DraftConfig(num_layers=1, draft_vocab_size=32)
    start = _draft(plain, seed=5)
    vm = np.arange(3, 35, dtype=np.int32)
    folder = checkpoint.save_draft(tmp_path / "d", TINY, plain, start, vocab_map=vm, target_sha256="a" * 64,
                                   dtype="float32")
    target = SimpleNamespace(cfg=TINY, sha256="a" * 64)
    e3 = plain.replace(feature_layers=(2, 4, 5))
    params, got_vm, rec = _warm_start(target, e3, folder, seed=1)
    assert params.feature_layers == (2, 4, 5) and params.feature_fc.shape == (3 * TINY.hidden_size,
                                                                               TINY.hidden_size)
    assert rec["init"]["feature_layers_added"] == [2, 4, 5]
    np.testing.assert_array_equal(got_vm, vm)
    kept, before = D.draft_tensors(params, TINY), D.draft_tensors(start, TINY)  # checkpoint names: any layout
    assert set(kept) - set(before) == {"feature_fc.weight", "feature_norm.weight"}
    for name, w in before.items():
        np.testing.assert_array_equal(kept[name], w)
    folder2 = checkpoint.save_draft(tmp_path / "d2", TINY, e3, params, vocab_map=vm, target_sha256="a" * 64,
                                    dtype="float32")
    for other in (plain, plain.replace(feature_layers=(1, 3))):
        with pytest.raises(ConfigError, match="--feature-layers"):
            _warm_start(target, other, folder2)


def test_the_fitted_projection_starts_where_the_final_norm_draft_was(tmp_path, monkeypatch) -> None:
    """Warm start of a trained final-norm draft with feature layers: the least-squares projection (fitted to the
    final-norm feature) keeps the draft near its held-out loss; a random projection throws it far off."""
    from dovetail_jax.train import features as F
    from dovetail_jax.train import trainer as T

    tgt, _ = _tiny_shards(tmp_path / "f", monkeypatch)
    cfg, params, layers = tgt.cfg, tgt.params, (0, 2)
    F.extract_taps(tgt, tmp_path / "f", layers, progress=False)
    fs = F.load_features(tmp_path / "f", tgt.sha256, cfg.hidden_size, taps=layers)
    plain = DraftConfig(num_layers=1, draft_vocab_size=32)
    tc = T.TrainConfig(steps=40, batch_tokens=256, lr=1e-2, warmup=5, save_every=40, eval_every=40, heldout_every=5)
    train_seqs, held = T.split(fs, 5)
    vm = T.choose_vocab(fs, train_seqs, 32, (7,))
    base = T.train(params, cfg, plain, tc, fs, vm, tmp_path / "run", tgt.sha256, progress=False).params
    shared = D.make_shared(params, cfg, vm)
    e3 = plain.replace(feature_layers=layers)
    fresh = D.init_draft(jax.random.key(1), cfg, e3, layout=base.layout)
    random_fc = base.replace(feature_fc=fresh.feature_fc, feature_norm=fresh.feature_norm, feature_layers=layers)
    w, g, fit = T.fit_feature_projection(fs, train_seqs, rows=2048)
    assert w.shape == (2 * cfg.hidden_size, cfg.hidden_size) and fit["r2"] > 0.5
    fitted = random_fc.replace(feature_fc=jnp.asarray(w), feature_norm=jnp.asarray(g))
    loss = {name: T.evaluate(p, shared, fs, held, c, c_d, tc)["loss"]
            for name, p, c, c_d in (("base", base, cfg, plain), ("random", random_fc, cfg, e3),
                                    ("fitted", fitted, cfg, e3))}
    assert loss["fitted"] < loss["random"] and loss["fitted"] < 1.5 * loss["base"], loss


def test_simulate_prices_feature_layers(tmp_path, capsys) -> None:
    """`dovetail simulate --feature-layers eagle3`: at the same acceptance the draft costs a little more (the
    projection) and 3x the feature bytes cross; blocks the model lacks are one clear error."""
    from simulator import cli

    base = ["simulate", "--profile", "host-2core-amd-epyc-2", "--model", "smollm2-135m", "--draft-dtype", "int8",
            "--draft-vocab", "8192", "--top-k", "4", "--depth", "3", "--total-tokens", "6", "--acceptance-profile",
            "smollm2-dgf1-humaneval", "--schedule", "dovetail", "--json"]
    res = {}
    for fl in ("none", "eagle3"):
        out = tmp_path / f"{fl}.json"
        assert cli.main([*base, "--feature-layers", fl, "--out", str(out)]) == 0
        res[fl] = json.loads(out.read_text())
    capsys.readouterr()
    one = {fl: r["results"][0] if "results" in r else r for fl, r in res.items()}
    assert one["eagle3"]["tokens_per_s"] < one["none"]["tokens_per_s"]
    assert cli.main([*base, "--feature-layers", "2,30"]) == 2
    assert "feature_layers [30] out of range" in capsys.readouterr().err
