"""`dovetail bench target`: the F32 GGUF write-back for llama.cpp, the result JSON, and bad input.

No timing assertions: speeds depend on the machine and its load; these tests check structure and exactness.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize

from dovetail_jax.bench import peers
from dovetail_jax.bench.target import first_divergence

ALIGNMENT = 64  # not the default 32, so the copy must carry the alignment over


def _write_source(path: Path) -> Path:
    """A small GGUF with metadata of many types and Q8_0 / F16 / F32 tensors."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama")
    w.add_custom_alignment(ALIGNMENT)
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -7)
    w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -30000)
    w.add_uint32("llama.block_count", 2)
    w.add_int32("test.i32", -123456)
    w.add_uint64("test.u64", 2**40 + 3)
    w.add_int64("test.i64", -(2**40))
    w.add_float32("llama.rope.freq_base", 100000.0)
    w.add_float32("test.f32_inexact", 1e-5)
    w.add_float64("test.f64", 1.0 / 3.0)
    w.add_bool("test.bool", True)
    w.add_string("general.name", "tiny ünïcode ✓")
    w.add_array("tokenizer.ggml.tokens", ["<s>", "Ġhello", "é", "✓✓", " "])
    w.add_array("tokenizer.ggml.token_type", [3, 1, 1, 1, 4])
    w.add_array("test.floats", [0.5, -1.25, 3.0e-7])
    q8 = rng.standard_normal((8, 64)).astype(np.float32)
    w.add_tensor("token_embd.weight", gguf.quants.quantize(q8, gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_q.weight", rng.standard_normal((6, 10)).astype(np.float16))
    w.add_tensor("output_norm.weight", rng.standard_normal(10).astype(np.float32))
    w.add_tensor("blk.0.ffn_up.weight", rng.standard_normal((2, 3, 32)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _metadata(reader: gguf.GGUFReader) -> dict[str, tuple]:
    return {k: (f.contents(), [int(t) for t in f.types]) for k, f in reader.fields.items()
            if not k.startswith("GGUF.")}


def test_f32_gguf_round_trips_metadata_and_dequantised_tensors(tmp_path):
    src = _write_source(tmp_path / "src.gguf")
    dst = tmp_path / "dst.gguf"
    peers.write_f32_gguf(src, dst)
    a, b = gguf.GGUFReader(src), gguf.GGUFReader(dst)

    meta_a, meta_b = _metadata(a), _metadata(b)
    assert meta_a == meta_b
    assert meta_b["general.alignment"][0] == ALIGNMENT
    assert meta_b["tokenizer.ggml.tokens"][0] == ["<s>", "Ġhello", "é", "✓✓", " "]
    assert {t.tensor_type for t in a.tensors} >= {gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F16}

    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors, strict=True):
        assert tb.tensor_type == gguf.GGMLQuantizationType.F32
        assert tb.shape.tolist() == ta.shape.tolist()
        assert int(tb.data_offset) % ALIGNMENT == 0
        expected = dequantize(ta.data, ta.tensor_type).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(tb.data), expected, err_msg=ta.name)


def test_f32_gguf_rejects_a_file_that_is_not_gguf(tmp_path):
    from dovetail_jax.errors import DovetailError

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(DovetailError, match="bad.gguf"):
        peers.write_f32_gguf(bad, tmp_path / "out.gguf")


def test_f32_gguf_cache_hits_and_replaces_stale_copies(tmp_path, monkeypatch):
    monkeypatch.setenv("DOVETAIL_CACHE_DIR", str(tmp_path / "cache"))
    src = _write_source(tmp_path / "model.gguf")
    first, took = peers.cached_f32_gguf(src)
    assert first.is_file() and took > 0
    assert first.is_relative_to(tmp_path / "cache")
    again, took = peers.cached_f32_gguf(src)
    assert again == first and took == 0.0

    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the source changed: convert again
    fresh, took = peers.cached_f32_gguf(src)
    assert fresh != first and fresh.is_file() and took > 0
    assert not first.exists()
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 2]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([], [4]) is None


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--repeats", "0"], "positive"),
        (["--max-new-tokens", "-3"], "positive"),
        (["--prompt", ""], "empty"),
        (["--model", "/nonexistent/model.gguf", "--no-hf", "--no-llama-cpp"], "/nonexistent/model.gguf"),
    ],
)
def test_bad_input_is_a_one_line_error(run_cli, tmp_path, argv, needle):
    code, out, err = run_cli("bench", "target", "--out", str(tmp_path / "r.json"), *argv)
    assert code == 2
    assert needle in err
    assert "Traceback" not in err
    assert not (tmp_path / "r.json").exists()


def test_adding_the_options_does_not_import_jax():
    """The CLI builds every subcommand's parser on each call, so this module must stay cheap to import."""
    code = ("import sys; from dovetail_jax import cli; cli.build_parser();"
            " assert not {'jax', 'torch', 'llama_cpp'} & set(sys.modules), 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_memory_bandwidth_is_measured():
    from dovetail_jax import machine

    assert machine.memory_read_bandwidth_gbs(size_mib=512, repeats=1) > 0
    with pytest.raises(ValueError):
        machine.memory_read_bandwidth_gbs(size_mib=64)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    tiny_models = pytest.importorskip("tiny_models")
    folder, _, _ = tiny_models.make_tiny_hf(tmp_path_factory.mktemp("tiny") / "model")
    return folder


def test_bench_json_schema_on_a_tiny_model(run_cli, tmp_path, monkeypatch, tiny_folder):
    from dovetail_jax import machine

    monkeypatch.setattr(machine, "memory_read_bandwidth_gbs", lambda: 25.0)  # the real one reads 1 GiB
    out_file = tmp_path / "results" / "bench.json"
    n = 5
    argv = ["bench", "target", "--model", str(tiny_folder), "--prompt", "def fib", "--max-new-tokens", str(n),
            "--repeats", "2", "--no-hf", "--no-llama-cpp", "--out", str(out_file), "--json"]
    monkeypatch.setattr(sys, "argv", ["dovetail", *argv])
    code, out, err = run_cli(*argv)
    assert code == 0, err
    res = json.loads(out)  # with --json, stdout is the JSON alone
    assert json.loads(out_file.read_text()) == res
    assert not list(out_file.parent.glob("*.tmp"))
    assert "dovetail-jax (f32)" in err  # the table went to stderr

    assert res["schema"] == "dovetail.bench.target/1"
    for key in ("timestamp", "command", "model", "prompt", "machine", "engines", "skipped", "ratios", "bandwidth",
                "greedy_tokens_match"):
        assert key in res
    assert res["command"].startswith("dovetail bench target --model")
    assert res["max_new_tokens"] == n and res["repeats"] == 2 and "best" in res["aggregate"]
    assert res["prompt"]["text"] == "def fib" and res["prompt"]["tokens"] == len(res["prompt"]["ids"]) > 0
    assert res["model"]["path"] == str(tiny_folder)
    m = res["machine"]
    assert m["cores"] >= 1 and m["cpu"] and m["jax"] and m["memory_read_gbs"] == 25.0

    ours = res["engines"]["dovetail_jax"]
    assert len(ours["token_ids"]) == n and len(ours["runs_decode_tok_s"]) == 2
    assert ours["decode_tok_s"] > 0 and ours["prefill_s"] > 0 and ours["compile_s"] >= 0
    assert ours["deterministic"] is True

    assert res["engines"]["hf_transformers"] is None and res["skipped"]["hf_transformers"] == "--no-hf"
    assert res["engines"]["llama_cpp_f32"] is None and res["skipped"]["llama_cpp_f32"] == "--no-llama-cpp"
    assert res["ratios"]["ours_over_hf"] is None and res["ratios"]["meets_goal"]["ours_over_hf"] is None
    assert res["ratios"]["goals"] == {"ours_over_hf": 2.0, "ours_over_llama_cpp_f32": 0.75}
    assert res["greedy_tokens_match"] == {"hf_transformers": None, "llama_cpp_f32": None}

    b = res["bandwidth"]
    assert b["bytes_per_token"] == b["weight_bytes_per_token"] + b["kv_bytes_per_token"] > 0
    assert b["effective_gbs"] == pytest.approx(b["bytes_per_token"] * ours["decode_tok_s"] / 1e9)


def test_llama_cpp_is_skipped_for_a_folder_model(tiny_folder):
    from dovetail_jax.bench.target import _llama_skip

    assert "not a GGUF" in _llama_skip(True, tiny_folder)


def test_bench_forward_on_a_tiny_model(run_cli, tmp_path, tiny_folder):
    out_file = tmp_path / "fwd.json"
    code, out, err = run_cli("bench", "forward", "--model", str(tiny_folder), "--tokens", "1,3", "--context", "5",
                             "--repeats", "2", "--calls", "2", "--out", str(out_file))
    assert code == 0, err
    res = json.loads(out_file.read_text())
    assert res["schema"] == "dovetail.bench.forward/1" and res["context"] == 5
    cells = {(r["layout"], r["tokens"]) for r in res["rows"]}
    assert cells == {(lay, t) for lay in ("out_in", "in_out") for t in (1, 3)}
    assert all(len(r["rounds_ms"]) == 2 and 0 < r["best_ms"] <= r["median_ms"] for r in res["rows"])
    assert set(res["fastest_layout_per_tokens"]) == {"1", "3"}  # JSON object keys are strings


@pytest.mark.parametrize("argv", [["--tokens", "0,2"], ["--tokens", "a"], ["--layouts", "rows"],
                                  ["--context", "9000"]])
def test_bench_forward_bad_input(run_cli, tmp_path, tiny_folder, argv):
    code, _, err = run_cli("bench", "forward", "--model", str(tiny_folder), "--out", str(tmp_path / "f.json"), *argv)
    assert code == 2 and "Traceback" not in err
