"""`dovetail train-draft`: answers -> features -> training -> a draft checkpoint with its card.

Every stage resumes: answers are appended per batch, feature shards are written whole or not at all, and
training restarts from its last orbax checkpoint. The work folder (answers, shards, runs) defaults to the
user's cache, keyed by the target's weights, and never lives in the repository.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dovetail_jax import paths
from dovetail_jax.config import TREE_PRESETS, DraftConfig, SamplingConfig, TreeConfig
from dovetail_jax.errors import ConfigError, TrainingDivergedError
from dovetail_jax.stats import Acceptance
from dovetail_jax.train.answers import read_answers
from dovetail_jax.train.features import extract_taps, load_features
from dovetail_jax.train.sources import Mix
from dovetail_jax.train.trainer import (
    TrainConfig,
    check_run,
    choose_vocab,
    fit_feature_projection,
    rank_vocab,
    run_record,
    split,
    token_counts,
    train,
)

VOCAB_ORDER_NOTE = ("vocab_order.npy: every target id ranked, this draft's vocabulary first, then the others by "
                    "count among the training split's answer tokens and the target's greedy choices; "
                    "`--widen-vocab V` (api.load_draft(vocab_size=V)) scores the first V")


@dataclass(frozen=True)
class PipelineOptions:
    """What `dovetail train-draft` makes beside the draft and training configurations, and where."""

    work: Path  # answers, feature shards and runs (see `default_work_dir`)
    run_dir: Path | None = None  # default: <work>/runs/<architecture>
    out: Path | None = None  # the checkpoint folder; default: <run>/export
    force: bool = False  # replace an existing `out` (atomically, once the new draft is complete)
    num_prompts: int | None = None  # the first N training prompts (None: all)
    max_new_tokens: int = 256  # longest answer
    gen_batch: int = 32  # rows answered at once (32: the small-T matmul kernel's largest)
    eval_prompts: int = 8  # held-out prompts for the card's tau (0: skip)
    stages: Literal["all", "data", "train"] = "all"
    mix: Mix = Mix()  # prompts per source (see `train/sources.py`); every source by default
    init: Path | None = None  # start from this draft checkpoint's weights and vocabulary (a warm start)
    new_vocab: bool = False  # with `init`: choose the reduced vocabulary again from this data (its size: dcfg's)
    stop_at: int | None = None  # end this sitting at this step with a checkpoint
    self_prompts: int = 0  # grow the prompt list by the target's own user turns from this many samples (Magpie)
    later_turns: int = 0  # grow the prompt list by this many of ShareGPT's standalone later user turns
    progress: bool = True  # progress bars and lines on stderr


def default_work_dir(target: Any) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", target.cfg.name.lower()).strip("-")
    return paths.train_work() / f"{slug}-{(target.sha256 or 'unknown')[:12]}"


def check_out(out: Path, force: bool) -> None:
    """Refuse an `out` that holds anything (a draft, above all) unless `force`: a run never replaces a draft by
    accident. Called before any work; `export` replaces it atomically."""
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        if not out.is_dir():
            raise ConfigError(f"{out} exists and is not a folder; choose another --out")
        if not force:
            raise ConfigError(f"{out} already exists; choose another --out, or pass --force to replace it "
                              "once the new draft is complete")


def check_draft_vocab(dcfg: DraftConfig, vocab_size: int) -> None:
    """A reduced vocabulary cannot be larger than the target's (it selects target tokens)."""
    if dcfg.draft_vocab_size is not None and dcfg.draft_vocab_size > vocab_size:
        raise ConfigError(f"--draft-vocab {dcfg.draft_vocab_size} is larger than the target's vocabulary "
                          f"({vocab_size} tokens); use at most {vocab_size}, or 0 for the full vocabulary")


def arch_name(dcfg: DraftConfig) -> str:
    vocab = "full" if dcfg.draft_vocab_size is None else f"v{dcfg.draft_vocab_size}"
    taps = "-taps" + ".".join(str(i) for i in dcfg.feature_layers) if dcfg.feature_layers else ""
    return f"{dcfg.fusion}{dcfg.num_layers}-{vocab}{taps}"


def heldout_tau(target: Any, draft: Any, records: list[dict[str, Any]], tree: TreeConfig, n: int,
                max_new_tokens: int) -> dict[str, Any]:
    """τ of greedy Dovetail decoding on the first `n` held-out training prompts (never evaluation prompts)."""
    from dovetail_jax.decode import dovetail as dt

    runs = []
    for rec in records[:n]:
        _, stats = dt.generate(target.params, target.cfg, draft, rec["prompt_ids"], max_new_tokens, tree,
                               SamplingConfig(), tuple(target.eos_ids))
        runs.append(stats.acceptance)
    acc = Acceptance.pool(runs)
    return {"tau": acc.tau or 0.0, "prompts": min(n, len(records)), "cycles": acc.cycles,
            "max_new_tokens": max_new_tokens, "tree": dataclasses.asdict(tree)}


def _prompt_list(opts: PipelineOptions, say: Callable[[str], None]) -> list[Any]:
    """The training prompts of this work folder: made once from the asked sources and kept in
    `<work>/prompts.jsonl`, so every later sitting resumes on the same list even if installed packages (a
    source) change; a folder made for other sources is refused."""
    from dovetail_jax.train.prompts import Prompt
    from dovetail_jax.train.sources import training_prompts_mix

    path = opts.work / "prompts.jsonl"
    head = {"format": "dovetail-prompts/1", "mix": dataclasses.asdict(opts.mix)}
    if path.exists():
        lines = path.read_text(encoding="utf-8").splitlines()
        if not lines or {k: json.loads(lines[0]).get(k) for k in head} != head:  # other keys: growth records
            got = json.loads(lines[0]).get("mix") if lines else None
            raise ConfigError(f"{path} holds the prompts of sources {got}, not {head['mix']}; use the same "
                              "--sources or another --work folder")
        return [Prompt(**json.loads(line)) for line in lines[1:]]
    say("building the training prompt list (a pass over installed packages' sources, ~1-2 min; once per work "
        "folder)")
    prompts = training_prompts_mix(opts.mix)
    _write_prompt_list(path, head, prompts)
    return prompts


def _write_prompt_list(path: Path, head: dict[str, Any], prompts: list[Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in [head, *map(dataclasses.asdict, prompts)]),
                   encoding="utf-8")
    tmp.replace(path)  # atomic: a crash leaves the old list or the new one


def _prompt_list_head(work: Path) -> dict[str, Any]:
    """The first line of `<work>/prompts.jsonl`: its sources and what has grown it (the prompts are read by
    `_prompt_list`)."""
    with (work / "prompts.jsonl").open(encoding="utf-8") as f:
        return json.loads(f.readline())


def _grow_with_self_prompts(target: Any, opts: PipelineOptions, prompts: list[Any],
                            say: Callable[[str], None]) -> list[Any]:
    """Grow the work folder's prompt list by the user turns the target writes itself (Magpie, `train/magpie.py`)
    from `opts.self_prompts` samples, appended after the prompts it has so their answers and shards stay valid.

    The samples go to `<work>/magpie.jsonl` (resumes); kept turns not already in the list and clean of the
    evaluation sets are appended in sample order, and the list's head records how many samples it has taken.
    A partial last shard is remade (its slice of the list grows): its conversations come back the same."""
    from dovetail_jax.train import magpie
    from dovetail_jax.train.sources import new_prompts, read_magpie

    head = _prompt_list_head(opts.work)
    taken = int(head.get("self_prompts", 0))
    if opts.self_prompts <= taken:
        say(f"the prompt list already holds the self-prompted turns of {taken} samples (asked {opts.self_prompts})")
        return prompts
    turns = opts.work / "magpie.jsonl"
    say(f"self-prompting: the target writes {opts.self_prompts} user turns -> {turns} (resumes)")
    magpie.generate_user_turns(target, opts.self_prompts, turns, progress=opts.progress)
    fresh = new_prompts(prompts, read_magpie(turns, below=opts.self_prompts))
    return _append_prompts(opts.work, prompts, fresh, {**head, "self_prompts": opts.self_prompts}, "self-prompted",
                           say)


def _grow_with_later_turns(opts: PipelineOptions, prompts: list[Any], say: Callable[[str], None]) -> list[Any]:
    """Grow the work folder's prompt list by the first `opts.later_turns` of ShareGPT's standalone later user
    turns (`sources.sharegpt_later_prompts`, a seeded shuffle of the whole file), appended like self-prompted
    turns: those not already listed and clean of the evaluation sets. The list's head records how many it took;
    a larger N later appends the next ones."""
    from dovetail_jax.train.sources import new_prompts, sharegpt_later_prompts

    head = _prompt_list_head(opts.work)
    taken = int(head.get("later_turns", 0))
    if opts.later_turns <= taken:
        say(f"the prompt list already holds the first {taken} ShareGPT later turns (asked {opts.later_turns})")
        return prompts
    later, stats = sharegpt_later_prompts()
    if opts.later_turns > stats.prompts_kept:
        say(f"ShareGPT has {stats.prompts_kept} standalone later turns; taking all of them")
    fresh = new_prompts(prompts, later[:opts.later_turns])
    return _append_prompts(opts.work, prompts, fresh, {**head, "later_turns": opts.later_turns},
                           "ShareGPT later-turn", say)


def _append_prompts(work: Path, prompts: list[Any], fresh: list[Any], head: dict[str, Any], what: str,
                    say: Callable[[str], None]) -> list[Any]:
    """`prompts + fresh` as the work folder's list (with the new `head`). Complete shards stay valid (their
    slices do not change); a partial last shard is removed, since its slice grows: it is remade with its
    conversations the same (greedy answers) and the first new ones."""
    from dovetail_jax.train import features as F

    per = F.SHARD_RECORDS
    partial = F.shard_dir(work / "features", len(prompts) // per)
    if fresh and len(prompts) % per and partial.exists():
        say(f"remaking the last shard ({len(prompts) % per} of {per} prompts) with the first new ones")
        shutil.rmtree(partial)
    grown = prompts + fresh
    _write_prompt_list(work / "prompts.jsonl", head, grown)
    say(f"prompt list: {len(prompts)} + {len(fresh)} {what} = {len(grown)}")
    return grown


def _data(target: Any, opts: PipelineOptions, say: Callable[[str], None], summary: dict[str, Any],
          feature_layers: tuple[int, ...] = ()) -> list[dict[str, Any]]:
    """The data stage (answers and feature shards in one distillation pass, with `feature_layers` those blocks'
    outputs too) unless only training runs; returns the answers' records. Ctrl-C during it keeps every complete
    shard: the next run resumes after them."""
    from dovetail_jax.train.distill import distill
    from dovetail_jax.train.sources import mix_record

    answers = opts.work / "answers.jsonl"
    if opts.stages in ("all", "data"):
        prompts = _prompt_list(opts, say)
        if opts.self_prompts:
            prompts = _grow_with_self_prompts(target, opts, prompts, say)
        if opts.later_turns:
            prompts = _grow_with_later_turns(opts, prompts, say)
        prompts = prompts[:opts.num_prompts]
        summary["prompts"] = mix_record(opts.mix, prompts)
        say(f"distillation: {len(prompts)} training prompts {summary['prompts']['counts']} -> {opts.work}")
        summary["distill"] = distill(target, prompts, opts.work, max_new_tokens=opts.max_new_tokens,
                                     batch_size=opts.gen_batch, feature_layers=feature_layers,
                                     progress=opts.progress)
    records = read_answers(answers, target.sha256)  # file order: shards stay valid as the file grows
    if not records:
        raise ConfigError(f"{answers}: no answers yet; run with --stage all or --stage data first")
    return records


def _vocab_map(fs: Any, train_seqs: np.ndarray, dcfg: DraftConfig, run_dir: Path,
               eos_ids: tuple[int, ...], vocab_size: int) -> np.ndarray | None:
    """The reduced vocabulary, chosen once per run folder and reused on resume."""
    if dcfg.draft_vocab_size is None:
        return None
    vm_path = run_dir / "vocab_map.npy"
    if vm_path.exists():
        return np.load(vm_path)
    vocab_map = choose_vocab(fs, train_seqs, dcfg.draft_vocab_size, eos_ids, vocab_size)
    np.save(vm_path, vocab_map)
    return vocab_map


def _warm_start(target: Any, dcfg: DraftConfig, init: Path | None, new_vocab: bool = False,
                seed: int = 0) -> tuple[Any, np.ndarray | None, dict[str, Any]]:
    """(weights, vocabulary, what the run record says) of the draft a run starts from; (None, None, {}) for a
    fresh start. The draft must have the asked architecture and be trained for this target. With `new_vocab`
    its vocabulary is dropped (None: the run chooses one from its data, of any size): the trained weights do not
    depend on it, since the draft's head is the target's own, restricted to the vocabulary's rows. A draft with
    fewer layers than asked is grown (`draft.deepen`; the new blocks are drawn from `seed`), and a final-norm
    draft asked to read target blocks gets a fresh projection for them (`seed`; its fusion and blocks kept)."""
    if init is None:
        return None, None, {}
    from dovetail_jax.io.checkpoint import WEIGHTS, file_sha256, load_draft

    got, params, vocab_map, card = load_draft(init, target.cfg, target_sha256=target.sha256, keep_bf16=False)
    deeper = got.num_layers < dcfg.num_layers
    same_vocab = new_vocab or got.draft_vocab_size == dcfg.draft_vocab_size
    add_taps = not got.feature_layers and bool(dcfg.feature_layers)
    same_taps = got.feature_layers == dcfg.feature_layers or add_taps
    if got.fusion != dcfg.fusion or got.num_layers > dcfg.num_layers or not same_vocab or not same_taps:
        raise ConfigError(f"--init {init} is a {arch_name(got)} draft, not {arch_name(dcfg)}; pass matching "
                          "--fusion" + ("" if new_vocab else "/--draft-vocab (or --new-vocab)")
                          + f", --feature-layers and --layers {got.num_layers} or more")
    if deeper or add_taps:
        import jax

        from dovetail_jax.model import draft as D

        fresh = D.init_draft(jax.random.key(seed), target.cfg, dcfg, layout=params.layout)
        if add_taps:  # a new projection of the target blocks' features; the fusion and blocks stay trained
            params = params.replace(feature_fc=fresh.feature_fc, feature_norm=fresh.feature_norm,
                                    feature_layers=dcfg.feature_layers)
        if deeper:  # the extra blocks start as the identity: the grown draft begins exactly where `init` ends
            params = D.deepen(params, fresh)
    record = {"name": card.get("name"), "weights_sha256": file_sha256(Path(init) / WEIGHTS),
              "steps": card.get("training", {}).get("steps")}
    if new_vocab:
        record["new_vocab"] = True
    if deeper:
        record["grown_from_layers"] = got.num_layers
    if add_taps:
        record["feature_layers_added"] = list(dcfg.feature_layers)
    return params, None if new_vocab else vocab_map, {"init": record}


def run(target: Any, dcfg: DraftConfig, tc: TrainConfig, opts: PipelineOptions) -> dict[str, Any]:
    """Answers -> features -> training -> checkpoint and card, each stage resuming; returns a JSON summary.

    A sitting that ends before `tc.steps` (--stop-at, or Ctrl-C during training, which saves a checkpoint)
    returns `"complete": False` (and `"interrupted": True` after Ctrl-C) after saying how to resume. An
    existing `opts.out` is refused before any work unless `opts.force`; a diverged run raises
    `TrainingDivergedError` and exports nothing.
    """
    say = (lambda m: print(f"dovetail: {m}", file=sys.stderr)) if opts.progress else (lambda m: None)
    check_draft_vocab(dcfg, target.cfg.vocab_size)
    dcfg.check_target(target.cfg)
    if opts.new_vocab and opts.init is None:
        raise ConfigError("--new-vocab only applies to a warm start: pass --init DIR too")
    run_dir = opts.run_dir or opts.work / "runs" / arch_name(dcfg)
    exports = opts.stages == "all" or (opts.stages == "train" and opts.out is not None)
    if exports:
        check_out(opts.out or run_dir / "export", opts.force)
    opts.work.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"work": str(opts.work)}
    records = _data(target, opts, say, summary, dcfg.feature_layers)
    if opts.stages == "data":
        return summary
    features = opts.work / "features"
    if dcfg.feature_layers:  # a multi-layer-feature draft: its blocks' outputs beside each shard (resumes)
        say(f"features of target blocks {dcfg.feature_layers} for every shard that lacks them")
        summary["taps"] = extract_taps(target, features, dcfg.feature_layers, opts.progress)
    fs = load_features(features, target.sha256, target.cfg.hidden_size, taps=dcfg.feature_layers)
    run_dir.mkdir(parents=True, exist_ok=True)
    init_params, init_vm, init_record = _warm_start(target, dcfg, opts.init, opts.new_vocab, tc.seed)
    train_seqs, held_seqs = split(fs, tc.heldout_every)
    if init_record.get("init", {}).get("feature_layers_added"):  # a fitted projection, not a random one
        w, g, fit = fit_feature_projection(fs, train_seqs, seed=tc.seed)
        init_params = init_params.replace(feature_fc=init_params.feature_fc.at[:].set(w),
                                          feature_norm=init_params.feature_norm.at[:].set(g))
        init_record["init"]["feature_fc"] = f"least squares to the final-norm feature on {fit['rows']} positions"
        say(f"feature projection: least squares on {fit['rows']} training positions, R^2 {fit['r2']:.3f}")
    record = run_record(target.cfg, dcfg, tc, target.sha256, {"folder": str(features),
                                                              "conversations": fs.num_sequences}) | init_record
    check_run(run_dir, record)
    (run_dir / "run.json").write_text(json.dumps(record, indent=1))
    if init_vm is not None:
        np.save(run_dir / "vocab_map.npy", init_vm)
    vocab_map = _vocab_map(fs, train_seqs, dcfg, run_dir, tuple(target.eos_ids), target.cfg.vocab_size)
    say(f"train: {arch_name(dcfg)} on {train_seqs.size} conversations ({int(fs.offsets[-1])} tokens in all), "
        f"{held_seqs.size} held out; run folder {run_dir}")
    result = train(target.params, target.cfg, dcfg, tc, fs, vocab_map, run_dir, target.sha256, opts.progress,
                   opts.stop_at, init_params)
    summary["train"] = {"step": result.step, "heldout": result.heldout, "seconds": result.seconds}
    if result.step < tc.steps:
        how = ("rerun the same command to resume" if result.interrupted or opts.stop_at is None
               else f"--stop-at {opts.stop_at} reached: rerun without --stop-at (or with a larger one) to continue")
        say(f"training stopped at step {result.step} of {tc.steps} (checkpoint saved in {run_dir}); {how}")
        return summary | {"complete": False} | ({"interrupted": True} if result.interrupted else {})
    if not exports:
        return summary
    if not math.isfinite(result.heldout.get("loss", math.nan)):
        raise TrainingDivergedError(f"training diverged: the held-out loss is {result.heldout.get('loss')}; "
                                    f"nothing exported (run folder {run_dir}); lower --lr or use another run folder")
    out = opts.out or run_dir / "export"
    diag = diagnostics(run_dir, fs, held_seqs, vocab_map, tc)
    order = None if vocab_map is None else rank_vocab(vocab_map, token_counts(fs, train_seqs, target.cfg.vocab_size))
    return summary | export(target, dcfg, tc, result, vocab_map, out, records, fs, opts.eval_prompts, say, diag,
                            init_record, order)


def _replace_folder(new: Path, out: Path) -> None:
    """Move the complete folder `new` to `out`: a rename when `out` is free, else a swap by two renames, the old
    folder kept beside until the new one is in place (a crash in between leaves both on disk, never neither)."""
    if not out.exists():
        os.replace(new, out)
        return
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
        os.replace(new, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)


def diagnostics(run_dir: Path, fs: Any, held_seqs: np.ndarray, vocab_map: np.ndarray | None,
                tc: TrainConfig) -> dict[str, Any]:
    """What the card says to decide the next step by: the reduced vocabulary's coverage of the target's held-out
    greedy tokens (a ceiling on top-1), training vs held-out top-1 (a gap: data-limited; none: capacity- or
    recipe-limited) and the learning curve of held-out top-1 per unrolled step against tokens seen."""
    from dovetail_jax.train.diagnostics import greedy_answer_tokens, vocab_coverage

    log_path = run_dir / "log.jsonl"
    log = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    curve = [{"step": e["step"], "padded_tokens_seen": e["step"] * tc.batch_tokens,
              **{k: round(v, 4) for k, v in e["heldout"].items() if k.startswith("top1")}} for e in log]
    return {"heldout_vocab_coverage": round(vocab_coverage(vocab_map, greedy_answer_tokens(fs, held_seqs)), 4),
            "train_top1_ema": round(log[-1]["train_ema"]["top1"], 4) if log else None,
            "learning_curve": curve}


def export(target: Any, dcfg: DraftConfig, tc: TrainConfig, result: Any, vocab_map: np.ndarray | None, out: Path,
           records: list[dict[str, Any]], fs: Any, eval_prompts: int, say: Any,
           diag: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
           vocab_order: np.ndarray | None = None) -> dict[str, Any]:
    """Write the checkpoint into a temporary folder beside `out`, measure τ on held-out prompts with it, write the
    card again with τ, and only then move it to `out` (replacing what is there: the caller checked `--force`).
    `vocab_order` (a reduced vocabulary's ranking of every target id) goes beside it, to widen it at load."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if vocab_order is not None:
            from dovetail_jax.io.checkpoint import save_vocab_order

            tmp.mkdir(parents=True)
            save_vocab_order(tmp, vocab_order, vocab_map, target.cfg.vocab_size)
        card = _write_draft(target, dcfg, tc, result, vocab_map, out.name, tmp, records, fs, eval_prompts, say,
                            diag, extra)
        _replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"wrote {out} (held-out top-1 {result.heldout['top1']:.3f})")
    return {"checkpoint": str(out), "card": card}


def _source_counts(records: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        top = str(r.get("source", "unknown")).split("/")[0]
        counts[top] = counts.get(top, 0) + 1
    return dict(sorted(counts.items()))


def _write_draft(target: Any, dcfg: DraftConfig, tc: TrainConfig, result: Any, vocab_map: np.ndarray | None,
                 name: str, folder: Path, records: list[dict[str, Any]], fs: Any, eval_prompts: int,
                 say: Any, diag: dict[str, Any] | None = None, extra: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """The checkpoint and its card in `folder` (τ measured with the written draft); returns the card."""
    from dovetail_jax import api
    from dovetail_jax.io.checkpoint import VOCAB_ORDER, save_draft

    held = [r for r in records if r["index"] % tc.heldout_every == 0]
    card: dict[str, Any] = {
        "name": name,
        "training": {
            "data": "self-distillation: the target's greedy answers (max 256 tokens) to offline prompts, "
                    "decontaminated against HumanEval and MT-bench (dovetail_jax/train/sources.py)",
            "sources": _source_counts(records),
            "conversations": int(fs.num_sequences), "tokens": int(fs.offsets[-1]),
            "answer_tokens": int(sum(len(r["answer_ids"]) for r in records)),
            "padded_tokens_seen": result.step * tc.batch_tokens,
            "heldout_every": tc.heldout_every, "steps": result.step, "seconds": round(result.seconds, 1),
            "options": dataclasses.asdict(tc),
            **(extra or {}),
        },
        "heldout": {k: round(float(v), 5) for k, v in result.heldout.items()},
        **({"diagnostics": diag} if diag else {}),
        **({"vocab_order": VOCAB_ORDER_NOTE} if (folder / VOCAB_ORDER).is_file() else {}),
        "created": time.strftime("%Y-%m-%d"),
    }
    save_draft(folder, target.cfg, dcfg, result.params, vocab_map, target.sha256, "bfloat16", card)
    if eval_prompts > 0:
        draft = api.load_draft(target, folder)
        card["heldout_tau"] = {}
        for tree in ("server", "laptop"):
            say(f"held-out τ with the {tree} tree on {eval_prompts} training-distribution prompts")
            card["heldout_tau"][tree] = heldout_tau(target, draft, held, TREE_PRESETS[tree], eval_prompts, 128)
        save_draft(folder, target.cfg, dcfg, result.params, vocab_map, target.sha256, "bfloat16", card)
    return card
