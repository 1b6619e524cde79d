"""Draft checkpoints (`weights.safetensors` + `card.json`) and the safetensors reader/writer.

References: the official `safetensors` package (numpy and torch backends) for the file format, torch's own
float32 -> bfloat16 rounding for the stored precision, and plain dict/JSON inspection for the card.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
st_numpy = pytest.importorskip("safetensors.numpy")
st_torch = pytest.importorskip("safetensors.torch")

from dovetail_jax import devices  # noqa: E402
from dovetail_jax.config import DraftConfig, ModelConfig  # noqa: E402
from dovetail_jax.errors import ModelFormatError  # noqa: E402
from dovetail_jax.io import checkpoint as ck  # noqa: E402
from dovetail_jax.io.hf import read_safetensors, write_safetensors  # noqa: E402
from dovetail_jax.model import draft as D  # noqa: E402

CFG = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, name="tiny-target")
SHA = "ab" * 32


def random_tensors(cfg: ModelConfig, dcfg: DraftConfig, seed: int) -> dict[str, np.ndarray]:
    """Random float32 values with full mantissas (so bfloat16 really rounds), in checkpoint names/shapes."""
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in D.expected_draft_shapes(cfg, dcfg).items()}


def make(dcfg: DraftConfig, seed: int = 0, layout: str = "in_out"):
    t = random_tensors(CFG, dcfg, seed)
    return t, D.draft_params_from_tensors(CFG, dcfg, t, layout=layout)


def torch_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 -> float32, rounded by torch (round to nearest even)."""
    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16).float().numpy()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("fusion,layout", [("dgf", "out_in"), ("eagle", "in_out"), ("none", "in_out")])
def test_round_trip(tmp_path, dtype, fusion, layout):
    dcfg = DraftConfig(num_layers=2, fusion=fusion)
    t, params = make(dcfg, seed=1, layout=layout)
    folder = ck.save_draft(tmp_path / "d", CFG, dcfg, params, target_sha256=SHA, dtype=dtype,
                           card_extra={"train": {"steps": 12, "lr": 3e-4}, "note": "hello"})
    assert sorted(p.name for p in folder.iterdir()) == ["card.json", "weights.safetensors"]  # no leftover .tmp
    acc = devices.accelerator_device()
    dcfg2, params2, vm, card = ck.load_draft(folder, CFG, device=acc, target_sha256=SHA)
    assert dcfg2 == dcfg and vm is None
    assert all(x.devices() == {acc} for x in (params2.layers[0].wqkv, params2.layers[1].w_down))
    back = D.draft_tensors(params2, CFG)
    assert sorted(back) == sorted(t)
    for k, x in t.items():
        want = x if dtype == "float32" else torch_bf16(x)
        np.testing.assert_array_equal(back[k], want, err_msg=k)
        if dtype == "bfloat16":  # within bf16 rounding, and really rounded
            assert np.all(np.abs(back[k] - x) <= np.abs(x) * 2.0**-8), k
    if dtype == "bfloat16":
        assert any(not np.array_equal(back[k], t[k]) for k in t)
    # the raw file: the official reader sees the stored dtype and exactly these names
    raw = st_torch.load_file(str(folder / "weights.safetensors"))
    assert sorted(raw) == sorted(t)
    assert {v.dtype for v in raw.values()} == {torch.float32 if dtype == "float32" else torch.bfloat16}
    # the card
    card_file = json.loads((folder / "card.json").read_text())
    assert card == card_file
    assert card["format"] == "dovetail-draft/1" and card["dtype"] == dtype
    assert card["target"] == {"name": "tiny-target", "hidden_size": 32, "vocab_size": 97, "num_heads": 4,
                              "num_kv_heads": 2, "intermediate_size": 48, "sha256": SHA}
    assert card["draft"] == {"num_layers": 2, "fusion": fusion, "draft_vocab_size": None}
    assert card["train"] == {"steps": 12, "lr": 3e-4} and card["note"] == "hello"
    assert ck.read_card(folder) == card


def test_round_trip_reduced_vocabulary(tmp_path):
    dcfg = DraftConfig(num_layers=1, fusion="dgf", draft_vocab_size=5)
    t, params = make(dcfg, seed=2)
    vm = np.array([96, 4, 0, 50, 7], np.int64)
    folder = ck.save_draft(tmp_path / "d", CFG, dcfg, params, vocab_map=vm, dtype="float32")
    raw = st_numpy.load_file(str(folder / "weights.safetensors"))
    assert raw["vocab_map"].dtype == np.int32
    np.testing.assert_array_equal(raw["vocab_map"], vm)
    dcfg2, params2, vm2, card = ck.load_draft(folder, CFG)
    assert dcfg2 == dcfg and card["draft"]["draft_vocab_size"] == 5 and card["target"]["sha256"] is None
    assert vm2.dtype == np.int32
    np.testing.assert_array_equal(vm2, vm)
    back = D.draft_tensors(params2, CFG)
    assert sorted(back) == sorted(t)
    for k in t:
        np.testing.assert_array_equal(back[k], t[k])


def test_save_replaces_an_existing_checkpoint(tmp_path):
    dcfg = DraftConfig(num_layers=1, fusion="eagle")
    _, p1 = make(dcfg, seed=3)
    t2, p2 = make(dcfg, seed=4)
    ck.save_draft(tmp_path, CFG, dcfg, p1, dtype="float32")
    ck.save_draft(tmp_path, CFG, dcfg, p2, dtype="float32", card_extra={"v": 2})
    _, params, _, card = ck.load_draft(tmp_path, CFG)
    assert card["v"] == 2
    np.testing.assert_array_equal(D.draft_tensors(params, CFG)["fc.weight"], t2["fc.weight"])


def test_bad_dtype_argument(tmp_path):
    _, params = make(DraftConfig(num_layers=1, fusion="dgf"))
    with pytest.raises(ValueError, match="dtype"):
        ck.save_draft(tmp_path / "d", CFG, DraftConfig(num_layers=1), params, dtype="float16")


# --------------------------------------------------------------------------------------------- refusals


@pytest.fixture
def saved(tmp_path):
    """A valid float32 checkpoint (2-layer DGF, target sha known) and its tensors."""
    dcfg = DraftConfig(num_layers=2, fusion="dgf")
    t, params = make(dcfg, seed=5)
    folder = ck.save_draft(tmp_path / "draft", CFG, dcfg, params, target_sha256=SHA, dtype="float32")
    return folder, t


def refused(folder: Path, match: str, cfg: ModelConfig = CFG, sha: str | None = None) -> str:
    """load_draft raises one ModelFormatError matching `match`, and leaves every file byte-identical."""
    before = snapshot(folder) if folder.is_dir() else None
    with pytest.raises(ModelFormatError, match=match) as e:
        ck.load_draft(folder, cfg, target_sha256=sha)
    if before is not None:
        assert snapshot(folder) == before
    return str(e.value)


def edit_card(folder: Path, **kw) -> None:
    card = json.loads((folder / "card.json").read_text())
    for path, value in kw.items():
        node = card
        *parents, leaf = path.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    (folder / "card.json").write_text(json.dumps(card))


def edit_weights(folder: Path, drop: str | None = None, add: dict[str, np.ndarray] | None = None) -> None:
    t = read_safetensors(folder / "weights.safetensors")
    if drop:
        del t[drop]
    t |= add or {}
    write_safetensors(folder / "weights.safetensors", t)


def test_valid_checkpoint_loads_with_and_without_the_sha(saved):
    folder, _ = saved
    ck.load_draft(folder, CFG, target_sha256=SHA)
    ck.load_draft(folder, CFG)  # the target's hash unknown: not checked
    edit_card(folder, target__sha256=None)
    ck.load_draft(folder, CFG, target_sha256="cd" * 32)  # the card's unknown: not checked


def test_refuses_another_target_name(saved):
    folder, _ = saved
    msg = refused(folder, "belongs to target 'tiny-target', not 'other-model'", cfg=CFG.replace(name="other-model"))
    assert str(folder) in msg


def test_refuses_another_hidden_size(saved):
    folder, _ = saved
    other = CFG.replace(hidden_size=64, num_heads=8, num_kv_heads=4)
    refused(folder, "hidden_size 32, this target has 64", cfg=other)


@pytest.mark.parametrize("field,value", [("vocab_size", 98), ("num_heads", 2), ("num_kv_heads", 4),
                                         ("intermediate_size", 64)])
def test_refuses_other_target_shapes(saved, field, value):
    folder, _ = saved
    refused(folder, f"{field} {getattr(CFG, field)}, this target has {value}", cfg=CFG.replace(**{field: value}))


def test_refuses_sha_mismatch(saved):
    folder, _ = saved
    refused(folder, r"another weights file of tiny-target \(sha256 abababababab\.\.\., this target's is "
                    r"cdcdcdcdcdcd\.\.\.\)", sha="cd" * 32)


def test_refuses_missing_card(saved):
    folder, _ = saved
    (folder / "card.json").unlink()
    refused(folder, "not a draft checkpoint")
    refused(folder / "nowhere", "not a draft checkpoint")


def test_refuses_damaged_card(saved):
    folder, _ = saved
    text = (folder / "card.json").read_text()
    (folder / "card.json").write_text(text[: len(text) // 2])
    refused(folder, "cannot read the card")
    (folder / "card.json").write_bytes(b"\xff\xfe\x00garbage")
    refused(folder, "cannot read the card")
    (folder / "card.json").write_text("[1, 2]")
    refused(folder, "not a dovetail-draft/1 card")


def test_refuses_wrong_format(saved):
    folder, _ = saved
    edit_card(folder, format="dovetail-draft/0")
    refused(folder, "not a dovetail-draft/1 card")


def test_refuses_bad_draft_section(saved):
    folder, _ = saved
    edit_card(folder, draft__fusion="medusa")
    refused(folder, "bad 'draft' section")


def test_refuses_missing_weights(saved):
    folder, _ = saved
    (folder / "weights.safetensors").unlink()
    refused(folder, "weights.safetensors is missing")


@pytest.mark.parametrize("cut", [100, 5, 100_000])
def test_refuses_truncated_weights(saved, cut):
    """Cut the file: inside the data (tensor out of bounds), or inside the header."""
    folder, _ = saved
    w = folder / "weights.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: max(0, len(data) - cut)] if cut < 100_000 else data[:20])
    msg = refused(folder, "truncated file|bad header length|damaged safetensors header")
    assert str(w) in msg


def test_refuses_missing_tensor(saved):
    folder, _ = saved
    edit_weights(folder, drop="W_z")
    msg = refused(folder, r"missing tensor\(s\) W_z")
    assert "weights.safetensors" in msg


def test_refuses_extra_tensor(saved):
    folder, _ = saved
    edit_weights(folder, add={"layers.0.input_layernorm.weight": np.ones(32, np.float32)})
    refused(folder, r"unexpected tensor\(s\) layers\.0\.input_layernorm\.weight")


def test_refuses_wrong_shape_tensor(saved):
    folder, _ = saved
    edit_weights(folder, add={"W_1": np.zeros((32, 16), np.float32)})
    refused(folder, r"'W_1' has shape \(32, 16\), expected \(32, 32\)")


def test_refuses_missing_vocab_map(tmp_path):
    dcfg = DraftConfig(num_layers=1, fusion="eagle", draft_vocab_size=4)
    _, params = make(dcfg)
    folder = ck.save_draft(tmp_path / "d", CFG, dcfg, params, vocab_map=np.arange(4), dtype="float32")
    edit_weights(folder, drop="vocab_map")
    refused(folder, "reduced vocabulary of 4 needs a 'vocab_map' tensor")


@pytest.mark.parametrize("vm,match", [(np.arange(5), "needs a 'vocab_map' tensor of that length"),
                                      (np.array([1, 2, 2, 3]), "distinct ids below 97"),
                                      (np.array([1, 2, 97, 3]), "distinct ids below 97"),
                                      (np.array([1, -2, 0, 3]), "distinct ids below 97")])
def test_refuses_bad_vocab_map(tmp_path, vm, match):
    dcfg = DraftConfig(num_layers=1, fusion="eagle", draft_vocab_size=4)
    _, params = make(dcfg)
    folder = ck.save_draft(tmp_path / "d", CFG, dcfg, params, vocab_map=np.arange(4), dtype="float32")
    edit_weights(folder, add={"vocab_map": vm.astype(np.int32)})
    refused(folder, match)


def test_refuses_vocab_map_for_full_vocabulary(saved):
    folder, _ = saved
    edit_weights(folder, add={"vocab_map": np.arange(4, dtype=np.int32)})
    refused(folder, "unexpected 'vocab_map' for a full-vocabulary draft")


# --- widening a reduced vocabulary along the draft's ranking (vocab_order.npy) ------------------------------


def test_rank_vocab_closed_form():
    from dovetail_jax.train.trainer import rank_vocab

    counts = np.array([5, 0, 9, 9, 1, 7])  # ids 2 and 3 tie: the lower id first
    np.testing.assert_array_equal(rank_vocab(np.array([4, 1]), counts), [4, 1, 2, 3, 5, 0])


@pytest.fixture
def ranked(tmp_path):
    """A 5-id draft with its ranking of all 97 target ids saved beside it."""
    from dovetail_jax.train.trainer import rank_vocab

    dcfg = DraftConfig(num_layers=1, fusion="dgf", draft_vocab_size=5)
    t, params = make(dcfg, seed=3)
    vm = np.array([96, 4, 0, 50, 7], np.int32)
    folder = ck.save_draft(tmp_path / "d", CFG, dcfg, params, vocab_map=vm, dtype="float32")
    order = rank_vocab(vm, np.random.default_rng(0).integers(0, 1000, CFG.vocab_size))
    ck.save_vocab_order(folder, order, vm, CFG.vocab_size)
    return folder, t, vm, order


@pytest.mark.parametrize("size", [5, 8, 40, 97])
def test_widened_vocabulary_is_the_ranking_prefix(ranked, size):
    folder, t, vm, order = ranked
    dcfg, params, got, card = ck.load_draft(folder, CFG, vocab_size=size)
    assert dcfg.draft_vocab_size == size and card["draft"]["draft_vocab_size"] == 5
    np.testing.assert_array_equal(got, order[:size])
    np.testing.assert_array_equal(got[:5], vm)  # the trained ids keep their rows, in order
    back = D.draft_tensors(params, CFG)  # the weights do not depend on the vocabulary
    for k in t:
        np.testing.assert_array_equal(back[k], t[k])


@pytest.mark.parametrize("size,match", [(4, "can be widened to 5..97 ids, not 4"),
                                        (98, "can be widened to 5..97 ids, not 98")])
def test_widening_refuses_sizes_outside_the_range(ranked, size, match):
    from dovetail_jax.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        ck.load_draft(ranked[0], CFG, vocab_size=size)


def test_widening_needs_a_ranking(tmp_path):
    from dovetail_jax.errors import ConfigError

    dcfg = DraftConfig(num_layers=1, fusion="dgf", draft_vocab_size=4)
    _, params = make(dcfg)
    folder = ck.save_draft(tmp_path / "d", CFG, dcfg, params, vocab_map=np.arange(4), dtype="float32")
    assert ck.load_draft(folder, CFG, vocab_size=4)[0] == dcfg  # its own size needs none
    with pytest.raises(ConfigError, match="no vocab_order.npy"):
        ck.load_draft(folder, CFG, vocab_size=8)


def test_widening_a_full_vocabulary_draft_is_refused(saved):
    from dovetail_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="full-vocabulary draft"):
        ck.load_draft(saved[0], CFG, vocab_size=50)


BAD_RANKINGS = [(lambda o: o[:-1], "every target id below 97 once"),
                (lambda o: np.concatenate([o[:-1], o[:1]]), "every target id below 97 once"),
                (lambda o: np.concatenate([o[1:2], o[:1], o[2:]]), "must start with the draft's own 5 vocabulary ids")]


@pytest.mark.parametrize("edit,match", BAD_RANKINGS + [(lambda o: o.astype(np.float32), "every target id below 97")])
def test_refuses_a_bad_ranking_file(ranked, edit, match):
    folder, _, vm, order = ranked
    np.save(folder / ck.VOCAB_ORDER, edit(order))
    with pytest.raises(ModelFormatError, match=match):
        ck.load_draft(folder, CFG, vocab_size=8)


@pytest.mark.parametrize("edit,match", BAD_RANKINGS)
def test_never_writes_a_bad_ranking(ranked, edit, match):
    folder, _, vm, order = ranked
    with pytest.raises(ModelFormatError, match=match):
        ck.save_vocab_order(folder, edit(order), vm, CFG.vocab_size)
    np.testing.assert_array_equal(np.load(folder / ck.VOCAB_ORDER), order)  # the good one stays


def test_refuses_a_damaged_ranking_file(ranked):
    folder = ranked[0]
    (folder / ck.VOCAB_ORDER).write_bytes(b"not a numpy file")
    with pytest.raises(ModelFormatError, match="unreadable"):
        ck.load_draft(folder, CFG, vocab_size=8)


@pytest.mark.parametrize("vocab_size,vm", [(None, np.arange(4)), (4, None), (4, np.arange(6))],
                         ids=["map_without_size", "size_without_map", "length_mismatch"])
def test_save_never_writes_an_unloadable_checkpoint(tmp_path, vocab_size, vm):
    dcfg = DraftConfig(num_layers=1, fusion="eagle", draft_vocab_size=vocab_size)
    _, params = make(dcfg)
    with pytest.raises(ValueError, match="vocab"):
        ck.save_draft(tmp_path / "d", CFG, dcfg, params, vocab_map=vm, dtype="float32")
    assert not (tmp_path / "d" / ck.CARD).exists()


def test_card_extra_cannot_overwrite_the_card(tmp_path):
    dcfg = DraftConfig(num_layers=1, fusion="eagle")
    _, params = make(dcfg)
    with pytest.raises(ValueError, match="target"):
        ck.save_draft(tmp_path / "d", CFG, dcfg, params, card_extra={"target": {"name": "x"}})


def test_check_card_target_directly():
    card = {"target": {"name": "tiny-target", "hidden_size": 32, "sha256": SHA}}
    ck.check_card_target(card, CFG, "x", SHA)
    ck.check_card_target({}, CFG, "x", SHA)  # a card without a target section names nothing to refuse
    with pytest.raises(ModelFormatError, match="^here: the draft belongs to target 'tiny-target', not 'b'$"):
        ck.check_card_target(card, CFG.replace(name="b"), "here")


# --------------------------------------------------------------------------------------------- safetensors


def sample_tensors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "a.f32": rng.standard_normal((3, 5)).astype(np.float32),
        "b.i32": rng.integers(-(2**31), 2**31 - 1, size=(7,), dtype=np.int64).astype(np.int32),
        "d.empty": np.zeros((0, 4), np.float32),
        "e.odd": rng.standard_normal((1, 3)).astype(np.float32),  # 12 bytes: the next tensor starts unaligned
        "f.i32": np.arange(5, dtype=np.int32).reshape(5, 1),
    }


def test_safetensors_round_trip_and_official_reader(tmp_path):
    t = sample_tensors(0)
    path = tmp_path / "x.safetensors"
    write_safetensors(path, t, {"format": "test"})
    back = read_safetensors(path)
    assert sorted(back) == sorted(t)
    official = st_numpy.load_file(str(path))
    assert sorted(official) == sorted(t)
    for k, x in t.items():
        assert back[k].dtype == x.dtype and back[k].shape == x.shape, k
        np.testing.assert_array_equal(back[k], x)
        assert official[k].dtype == x.dtype and official[k].shape == x.shape, k
        np.testing.assert_array_equal(official[k], x)
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        assert f.metadata() == {"format": "test"}
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert (8 + header_len) % 8 == 0  # data aligned to 8 bytes


def test_bfloat16_round_trip_and_official_reader(tmp_path):
    x = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32) * 100
    path = tmp_path / "b.safetensors"
    write_safetensors(path, {"w": x.astype(ml_dtypes.bfloat16), "i": np.array([7, -7], np.int32)})
    want = torch_bf16(x)
    assert not np.array_equal(want, x)
    back = read_safetensors(path)
    assert back["w"].dtype == np.float32  # floats come back as float32
    np.testing.assert_array_equal(back["w"], want)
    official = st_torch.load_file(str(path))
    assert official["w"].dtype == torch.bfloat16
    np.testing.assert_array_equal(official["w"].float().numpy(), want)
    np.testing.assert_array_equal(official["i"].numpy(), [7, -7])


def test_reads_official_files(tmp_path):
    t = sample_tensors(2)
    path = tmp_path / "o.safetensors"
    st_numpy.save_file(t, str(path), metadata={"k": "v"})
    back = read_safetensors(path)
    assert sorted(back) == sorted(t)
    for k, x in t.items():
        np.testing.assert_array_equal(back[k], x)
    bf = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    st_torch.save_file({"bf": bf, "f16": bf.half()}, str(tmp_path / "t.safetensors"))
    back = read_safetensors(tmp_path / "t.safetensors")
    np.testing.assert_array_equal(back["bf"], bf.float().numpy())
    np.testing.assert_array_equal(back["f16"], bf.half().float().numpy())


def test_scalar_tensor_keeps_its_shape(tmp_path):
    path = tmp_path / "s.safetensors"
    write_safetensors(path, {"s": np.array(2.5, np.float32)})
    assert st_numpy.load_file(str(path))["s"].shape == ()
    assert read_safetensors(path)["s"].shape == ()


def test_write_refuses_unsupported_dtype(tmp_path):
    with pytest.raises(ValueError, match="'u'"):
        write_safetensors(tmp_path / "u.safetensors", {"u": np.zeros(3, np.uint8)})


def test_read_refuses_damaged_files(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(b"\x01\x02")
    with pytest.raises(ModelFormatError, match="bad header length"):
        read_safetensors(p)
    p.write_bytes((10).to_bytes(8, "little") + b"{not json}")
    with pytest.raises(ModelFormatError, match="damaged safetensors header"):
        read_safetensors(p)
    hdr = json.dumps({"w": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}).encode()
    p.write_bytes(len(hdr).to_bytes(8, "little") + hdr + b"\x00\x00")
    with pytest.raises(ModelFormatError, match="'w' has unsupported dtype U8"):
        read_safetensors(p)
    hdr = json.dumps({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode()
    p.write_bytes(len(hdr).to_bytes(8, "little") + hdr + b"\x00" * 12)
    with pytest.raises(ModelFormatError, match="'w' data is out of bounds"):
        read_safetensors(p)
