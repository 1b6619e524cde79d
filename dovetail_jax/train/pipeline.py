"""`dovetail train-draft`: answers -> features -> training -> a draft checkpoint with its card.

Every stage resumes: answers are appended per batch, feature shards are written whole or not at all, and
training restarts from its last orbax checkpoint. The work folder (answers, shards, runs) defaults to the
user's cache, keyed by the target's weights, and never lives in the repository.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from dovetail_jax.config import TREE_PRESETS, DraftConfig, SamplingConfig, TreeConfig
from dovetail_jax.errors import ConfigError
from dovetail_jax.train.answers import generate_answers, read_answers
from dovetail_jax.train.features import extract_all, load_features
from dovetail_jax.train.prompts import training_prompts
from dovetail_jax.train.trainer import TrainConfig, check_run, choose_vocab, run_record, split, train


def default_work_dir(target: Any) -> Path:
    from dovetail_jax.bench.peers import cache_dir

    slug = re.sub(r"[^a-z0-9]+", "-", target.cfg.name.lower()).strip("-")
    return cache_dir() / "train" / f"{slug}-{(target.sha256 or 'unknown')[:12]}"


def arch_name(dcfg: DraftConfig) -> str:
    vocab = "full" if dcfg.draft_vocab_size is None else f"v{dcfg.draft_vocab_size}"
    return f"{dcfg.fusion}{dcfg.num_layers}-{vocab}"


def heldout_tau(target: Any, draft: Any, records: list[dict[str, Any]], tree: TreeConfig, n: int,
                max_new_tokens: int) -> dict[str, Any]:
    """τ of greedy Dovetail decoding on the first `n` held-out training prompts (never evaluation prompts)."""
    from dovetail_jax.decode import dovetail as dt

    committed = cycles = 0
    for rec in records[:n]:
        _, stats = dt.generate(target.params, target.cfg, draft, rec["prompt_ids"], max_new_tokens, tree,
                               SamplingConfig(), tuple(target.eos_ids))
        committed += sum((i + 1) * c for i, c in enumerate(stats.extra["accept_hist"]))
        cycles += stats.extra["cycles"]
    return {"tau": committed / max(cycles, 1), "prompts": min(n, len(records)), "cycles": cycles,
            "max_new_tokens": max_new_tokens, "tree": dataclasses.asdict(tree)}


def run(target: Any, dcfg: DraftConfig, tc: TrainConfig, *, work: Path, run_dir: Path | None, out: Path | None,
        num_prompts: int | None, max_new_tokens: int, gen_batch: int, eval_prompts: int, stages: str,
        progress: bool = True, stop_at: int | None = None) -> dict[str, Any]:
    say = (lambda m: print(f"dovetail: {m}", file=sys.stderr)) if progress else (lambda m: None)
    work.mkdir(parents=True, exist_ok=True)
    answers = work / "answers.jsonl"
    summary: dict[str, Any] = {"work": str(work)}
    if stages in ("all", "data"):  # the prompts (an ast pass over the standard library) only feed this stage
        prompts = training_prompts()[:num_prompts]
        say(f"answers: {len(prompts)} training prompts -> {answers}")
        summary["answers"] = generate_answers(target, prompts, answers, max_new_tokens, gen_batch, progress)
    records = read_answers(answers, target.sha256)  # file order: shards stay valid as the file grows
    if not records:
        raise ConfigError(f"{answers}: no answers yet; run with --stage all or --stage data first")
    features = work / "features"
    if stages in ("all", "data"):
        say(f"features: {len(records)} conversations -> {features}")
        summary["features"] = extract_all(target, records, features, progress)
    if stages == "data":
        return summary
    fs = load_features(features, target.sha256, target.cfg.hidden_size)
    run_dir = run_dir or work / "runs" / arch_name(dcfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = run_record(target.cfg, dcfg, tc, target.sha256, {"folder": str(features),
                                                              "conversations": fs.num_sequences})
    check_run(run_dir, record)
    (run_dir / "run.json").write_text(json.dumps(record, indent=1))
    train_seqs, held_seqs = split(fs, tc.heldout_every)
    vocab_map = None
    if dcfg.draft_vocab_size is not None:
        vm_path = run_dir / "vocab_map.npy"
        if vm_path.exists():
            vocab_map = np.load(vm_path)
        else:
            vocab_map = choose_vocab(fs, train_seqs, dcfg.draft_vocab_size, tuple(target.eos_ids))
            np.save(vm_path, vocab_map)
    n_tokens = int(fs.offsets[-1])
    say(f"train: {arch_name(dcfg)} on {train_seqs.size} conversations ({n_tokens} tokens in all), "
        f"{held_seqs.size} held out; run folder {run_dir}")
    result = train(target.params, target.cfg, dcfg, tc, fs, vocab_map, run_dir, target.sha256, progress, stop_at)
    summary["train"] = {"step": result.step, "heldout": result.heldout, "seconds": result.seconds}
    if result.step < tc.steps:
        msg = (f"training stopped at step {result.step} of {tc.steps} (checkpoint saved in {run_dir}); "
               "rerun the same command to resume")
        if result.interrupted:
            raise KeyboardInterrupt(msg)
        say(msg)
        return summary | {"complete": False}
    if stages == "train" and out is None:
        return summary
    out = out or run_dir / "export"
    return summary | export(target, dcfg, tc, result, vocab_map, out, records, fs, eval_prompts, say)


def export(target: Any, dcfg: DraftConfig, tc: TrainConfig, result: Any, vocab_map: np.ndarray | None, out: Path,
           records: list[dict[str, Any]], fs: Any, eval_prompts: int, say: Any) -> dict[str, Any]:
    """Write the checkpoint, measure τ on held-out prompts with it, and write the card again with τ."""
    from dovetail_jax import api
    from dovetail_jax.io.checkpoint import save_draft

    held = [r for r in records if r["index"] % tc.heldout_every == 0]
    card: dict[str, Any] = {
        "name": out.name,
        "training": {
            "data": "self-distillation: the target's greedy answers (max 256 tokens) to offline prompts "
                    "(Python standard-library functions + templated chat requests; dovetail_jax/train/prompts.py)",
            "conversations": int(fs.num_sequences), "tokens": int(fs.offsets[-1]),
            "heldout_every": tc.heldout_every, "steps": result.step, "seconds": round(result.seconds, 1),
            "options": dataclasses.asdict(tc),
        },
        "heldout": {k: round(float(v), 5) for k, v in result.heldout.items()},
        "created": time.strftime("%Y-%m-%d"),
    }
    save_draft(out, target.cfg, dcfg, result.params, vocab_map, target.sha256, "bfloat16", card)
    if eval_prompts > 0:
        draft = api.load_draft(target, out)
        card["heldout_tau"] = {}
        for name in ("server", "laptop"):
            say(f"held-out τ with the {name} tree on {eval_prompts} training-distribution prompts")
            card["heldout_tau"][name] = heldout_tau(target, draft, held, TREE_PRESETS[name], eval_prompts, 128)
        save_draft(out, target.cfg, dcfg, result.params, vocab_map, target.sha256, "bfloat16", card)
    say(f"wrote {out} (held-out top-1 {result.heldout['top1']:.3f})")
    return {"checkpoint": str(out), "card": card}
