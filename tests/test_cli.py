"""The `dovetail` command: JSON output, streaming, and one clear message with exit code 2 for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "positive"),
        (["generate", "--prompt", "hi", "--temperature", "-1"], ">= 0"),
        (["generate", "--prompt", "hi", "--top-p", "0"], "(0, 1]"),
        (["generate", "--prompt", "hi", "--top-p", "1.5"], "(0, 1]"),
        (["generate", "--prompt", "hi", "--top-k", "-2"], ">= 0"),
        (["generate", "--prompt", "   "], "empty"),
        (["generate", "--prompt", "hi", "--system", "be brief"], "--chat"),
        (["generate", "--prompt", "hi", "--model", "/nonexistent/model.gguf"], "/nonexistent/model.gguf"),
    ],
)
def test_bad_input_one_message_exit_2(run_cli, argv, needle):
    code, out, err = run_cli(*argv)
    assert code == 2
    assert needle in err
    assert "Traceback" not in err


def test_not_a_model_file(run_cli, tmp_path):
    f = tmp_path / "notes.gguf"
    f.write_text("this is not a model\n")
    code, _, err = run_cli("generate", "--prompt", "hi", "--model", str(f))
    assert code == 2 and "Traceback" not in err and str(f) in err


def test_context_overflow_is_reported(run_cli, smollm2_path):
    code, _, err = run_cli("generate", "--prompt", "hi", "--model", str(smollm2_path),
                           "--max-new-tokens", "9000")
    assert code == 2 and "exceeds the model's context" in err


def test_json_output_and_streaming_subprocess(smollm2_path):
    """A real subprocess run: one JSON object with the documented keys, and no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "dovetail_jax.cli", "generate", "--prompt", "def fibonacci(n):", "--model",
         str(smollm2_path), "--max-new-tokens", "12", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    for key in ("text", "token_ids", "new_tokens", "tokens_per_s", "prefill_s", "decode_s", "compile_s", "mode",
                "devices", "prompt_tokens"):
        assert key in d, key
    assert d["mode"] == "target" and d["new_tokens"] == len(d["token_ids"]) == 12
    assert d["tokens_per_s"] > 0 and d["devices"]["target"].startswith("cpu")

    stream = subprocess.run(
        [sys.executable, "-m", "dovetail_jax.cli", "generate", "--prompt", "def fibonacci(n):", "--model",
         str(smollm2_path), "--max-new-tokens", "12"],
        capture_output=True, text=True, timeout=300,
    )
    assert stream.returncode == 0, stream.stderr
    assert stream.stdout.strip() == d["text"].strip()
    assert "tok/s" in stream.stderr


def test_help_explains():
    proc = subprocess.run([sys.executable, "-m", "dovetail_jax.cli", "generate", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    for flag in ("--prompt", "--chat", "--model", "--max-new-tokens", "--temperature", "--top-p", "--top-k", "--seed",
                 "--json"):
        assert flag in proc.stdout


def test_unsupported_architecture_gguf(run_cli, tmp_path):
    from tiny_models import tiny_model, write_gguf

    model, _ = tiny_model("gqa_tied")
    p = write_gguf(model, tmp_path / "gpt2.gguf", arch="gpt2")
    code, _, err = run_cli("generate", "--prompt", "hi", "--model", str(p))
    assert code == 2 and "unsupported architecture 'gpt2'" in err and "Traceback" not in err


@pytest.mark.parametrize("fmt", ["gguf", "hf"])
def test_generate_on_tiny_model_files(run_cli, tmp_path, fmt):
    """`--model` with a GGUF file and with an HF folder: greedy ids equal HF transformers' own greedy."""
    import torch
    from tiny_models import make_tiny_hf, write_gguf

    folder, model, _ = make_tiny_hf(tmp_path / "hf", "gqa_tied")
    path = folder if fmt == "hf" else write_gguf(model, tmp_path / "tiny.gguf")
    code, out, err = run_cli("generate", "--prompt", "hello world", "--model", str(path),
                             "--max-new-tokens", "12", "--ignore-eos", "--json")
    assert code == 0, err
    d = json.loads(out)
    from dovetail_jax.io.load import load_model_files

    ids = load_model_files(path)[2].encode("hello world")
    seq = list(ids)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert d["token_ids"] == seq[len(ids):]


def test_tokenizer_override(run_cli, tmp_path):
    """`--tokenizer` replaces the model's own: a GGUF without tokenizer metadata runs with a tokenizer.json."""
    from tiny_models import make_tiny_hf, write_gguf

    folder, model, _ = make_tiny_hf(tmp_path / "hf", "gqa_tied")
    path = write_gguf(model, tmp_path / "notok.gguf", tokenizer=False)
    code, _, err = run_cli("generate", "--prompt", "hello", "--model", str(path), "--max-new-tokens", "3")
    assert code == 2 and "Traceback" not in err
    code, out, err = run_cli("generate", "--prompt", "hello", "--model", str(path), "--tokenizer", str(folder),
                             "--max-new-tokens", "3", "--ignore-eos", "--json")
    assert code == 0, err
    assert json.loads(out)["new_tokens"] == 3


# --- --mode dovetail -----------------------------------------------------------------------------------------


@pytest.fixture
def tiny_gguf(tmp_path):
    from tiny_models import make_tiny_hf, write_gguf

    folder, model, _ = make_tiny_hf(tmp_path / "hf", "gqa_tied")
    return write_gguf(model, tmp_path / "tiny.gguf"), folder


def _gen(run_cli, path, *extra):
    code, out, err = run_cli("generate", "--prompt", "hello world", "--model", str(path), "--max-new-tokens", "20",
                             "--ignore-eos", "--json", *extra)
    assert code == 0, err
    return json.loads(out), err


def test_dovetail_mode_json_and_lossless(run_cli, tiny_gguf):
    path, _ = tiny_gguf
    ref, _ = _gen(run_cli, path)
    d, err = _gen(run_cli, path, "--mode", "dovetail", "--draft-vocab", "64", "--tree", "laptop")
    assert "untrained" in err  # the random draft is announced
    assert d["token_ids"] == ref["token_ids"] and d["mode"] == "dovetail"
    for key in ("tau", "cycles", "accept_hist", "bytes_to_draft", "bytes_to_target", "time_s", "tree", "draft"):
        assert key in d, key
    assert set(d["time_s"]) == {"draft", "verify", "transfer", "host"}
    assert d["tree"] == {"top_k": 10, "depth": 4, "total_tokens": 7, "lookup": 0} and d["draft"]["vocab"] == 64
    assert "lookup" not in d  # no lookup counts without a lookup
    # with prompt lookup on the preset tree: the same tokens, the chain's counts reported
    k, _ = _gen(run_cli, path, "--mode", "dovetail", "--draft-vocab", "64", "--tree", "laptop", "--lookup", "4")
    assert k["token_ids"] == ref["token_ids"] and k["tree"]["lookup"] == 4 and len(k["accept_hist"]) == 10
    assert set(k["lookup"]) == {"cycles", "tokens"} and k["lookup"]["cycles"] <= k["cycles"]
    # the model itself as a standalone draft: same tokens, long accepted paths
    s, _ = _gen(run_cli, path, "--mode", "dovetail", "--draft", str(path), "--tree-top-k", "2", "--depth", "3",
                "--total-tokens", "6")
    assert s["token_ids"] == ref["token_ids"] and s["tau"] > 2.5 and s["draft"]["fusion"] == "none"


def test_dovetail_draft_checkpoint_from_cli(run_cli, tiny_gguf, tmp_path):
    import jax

    from dovetail_jax.config import DraftConfig
    from dovetail_jax.io.checkpoint import save_draft
    from dovetail_jax.io.load import load_model_files
    from dovetail_jax.model.draft import init_draft

    path, _ = tiny_gguf
    cfg = load_model_files(path)[0]
    dcfg = DraftConfig(2, "dgf")
    save_draft(tmp_path / "draft", cfg, dcfg, init_draft(jax.random.key(0), cfg, dcfg))
    ref, _ = _gen(run_cli, path)
    d, _ = _gen(run_cli, path, "--mode", "dovetail", "--draft", str(tmp_path / "draft"))
    assert d["token_ids"] == ref["token_ids"] and d["draft"]["n_layers"] == 2
    other = cfg.replace(hidden_size=64, head_dim=64 // cfg.num_heads, name="other")
    save_draft(tmp_path / "other", other, dcfg, init_draft(jax.random.key(0), other, dcfg))
    code, _, err = run_cli("generate", "--prompt", "hi", "--model", str(path), "--mode", "dovetail", "--draft",
                           str(tmp_path / "other"))
    assert code == 2 and "hidden_size 64" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--mode", "dovetail", "--total-tokens", "0"], "positive"),
        (["--mode", "dovetail", "--depth", "0"], "positive"),
        (["--mode", "dovetail", "--tree-top-k", "0"], "positive"),
        (["--mode", "dovetail", "--tree-top-k", "2", "--depth", "1", "--total-tokens", "9"], "exceeds"),
        (["--depth", "3"], "--mode dovetail"),
        (["--mode", "dovetail", "--draft", "/nonexistent/draft"], "/nonexistent/draft"),
        (["--mode", "dovetail", "--draft", "/tmp", "--draft-layers", "2"], "random draft"),
        (["--mode", "dovetail", "--max-new-tokens", "8188"], "exceeds the model's context"),
    ],
)
def test_dovetail_bad_input(run_cli, smollm2_path, extra, needle):
    code, _, err = run_cli("generate", "--prompt", "hi", "--model", str(smollm2_path), *extra)
    assert code == 2 and needle in err and "Traceback" not in err, err


def test_single_device_is_said_once(caplog):
    import jax

    from dovetail_jax.decode import dovetail as DV
    from dovetail_jax.devices import Placement

    DV._note_shared_device.cache_clear()
    cpu = jax.devices("cpu")[0]
    with caplog.at_level("WARNING"):
        DV._note_shared_device(Placement(cpu, cpu))
        DV._note_shared_device(Placement(cpu, cpu))
    assert sum("only one device" in r.message for r in caplog.records) == 1
