"""Held-out agreement of several draft checkpoints on one and the same held-out split.

    python analysis/eval_drafts_heldout.py --out /tmp/heldout.json checkpoints/smollm2-135m-dgf1-v8192 ...

A draft's card reports top-1 on the held-out split of the data *it* was trained on; drafts trained on different
data (or data that grew since) are not comparable that way. This script scores every given draft on the held-out
split (every 20th conversation, as `train-draft` splits it) of one work folder's feature shards: top-1 of the
first draft step and of unrolled steps 2 and 3 (the draft on its own guesses, as deeper in a tree), the losses, and
the coverage of the draft's vocabulary on the target's greedy tokens there (a ceiling on its top-1). A draft that
reads several target blocks (EAGLE-3) is fed their features from the shards' `taps-*.npy`. The result is
JSON (`--out`, written atomically) so README tables can be rebuilt from it.

`--widen-vocab 16384 full` also scores each reduced-vocabulary draft with its vocabulary widened, *same weights*:
its own ids first, then the ids most frequent in the training split's answers and greedy tokens (`full`: every
target id). The draft's head is the target's own, restricted to the vocabulary's rows, so a wider vocabulary
needs no training; it lifts the coverage ceiling at the price of a larger head on the draft's device.

The split is by a conversation's index in the answers file, so a folder that grew keeps every earlier held-out
conversation held out: a draft trained on an earlier state of the folder never saw any of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def widen(vocab_map: np.ndarray, counts: np.ndarray, size: int | None) -> np.ndarray | None:
    """`vocab_map` followed by the most counted other ids up to `size` ids (None: the full vocabulary)."""
    if size is None:
        return None
    if size < vocab_map.size:
        raise ValueError(f"cannot widen a vocabulary of {vocab_map.size} to {size}")
    from dovetail_jax.train.trainer import rank_vocab

    return rank_vocab(vocab_map, counts)[:size]


def evaluate_drafts(drafts: list[Path], work: Path | None, heldout_every: int, batch_tokens: int,
                    widen_to: list[int | None] = ()) -> dict[str, Any]:
    from dovetail_jax import api
    from dovetail_jax.io.checkpoint import load_draft
    from dovetail_jax.model import draft as D
    from dovetail_jax.train.diagnostics import greedy_answer_tokens, vocab_coverage
    from dovetail_jax.train.features import load_features
    from dovetail_jax.train.pipeline import default_work_dir
    from dovetail_jax.train.trainer import TrainConfig, evaluate, split, token_counts

    target = api.load_target()
    work = work or default_work_dir(target)
    fs = load_features(work / "features", target.sha256, target.cfg.hidden_size)
    tapped = {(): fs}  # feature layers -> the same shards with those blocks' features mapped (EAGLE-3 drafts)
    train_seqs, held = split(fs, heldout_every)
    counts = token_counts(fs, train_seqs, target.cfg.vocab_size) if widen_to else None
    greedy = greedy_answer_tokens(fs, held)
    tc = TrainConfig(batch_tokens=batch_tokens, heldout_every=heldout_every)
    rows = []
    for folder in drafts:
        t0 = time.perf_counter()
        dcfg, params, vocab_map, card = load_draft(folder, target.cfg, target_sha256=target.sha256)
        layers = tuple(dcfg.feature_layers)
        if layers not in tapped:
            tapped[layers] = load_features(work / "features", target.sha256, target.cfg.hidden_size, taps=layers)
        variants = [vocab_map] + ([widen(vocab_map, counts, n) for n in widen_to] if vocab_map is not None else [])
        for vm in variants:
            shared = D.make_shared(target.params, target.cfg, vm)
            d = dataclasses.replace(dcfg, draft_vocab_size=None if vm is None else int(vm.size))
            m = evaluate(params, shared, tapped[layers], held, target.cfg, d, tc)
            rows.append({"draft": str(folder), "name": card.get("name"), "layers": dcfg.num_layers,
                         "fusion": dcfg.fusion, "feature_layers": list(layers), "draft_vocab": d.draft_vocab_size,
                         **({"trained_vocab": dcfg.draft_vocab_size} if vm is not vocab_map else {}),
                         "trained_on_conversations": card.get("training", {}).get("conversations"),
                         **{k: round(float(v), 4) for k, v in m.items()},
                         "vocab_coverage": round(vocab_coverage(vm, greedy), 4),
                         "seconds": round(time.perf_counter() - t0, 1)})
            t0 = time.perf_counter()
            print(f"{folder} (vocabulary {d.draft_vocab_size or 'full'}): "
                  + ", ".join(f"{k} {rows[-1][k]}" for k in ("top1", "top1_2", "top1_3", "vocab_coverage")),
                  file=sys.stderr)
    return {"command": "python analysis/eval_drafts_heldout.py " + " ".join(sys.argv[1:]),
            "work": str(work), "heldout_every": heldout_every,
            "heldout": {"conversations": int(held.size), "positions": int(greedy.size)}, "drafts": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("drafts", nargs="+", type=Path, help="draft checkpoint folders")
    ap.add_argument("--work", type=Path, default=None,
                    help="train-draft work folder whose feature shards to split (default: the default target's)")
    ap.add_argument("--heldout-every", type=int, default=20, help="every Nth conversation is held out (20)")
    ap.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per evaluation batch (4096)")
    ap.add_argument("--widen-vocab", nargs="+", default=[], metavar="N|full",
                    help="also score each reduced-vocabulary draft with its vocabulary widened to N ids (same "
                         "weights; `full`: every target id)")
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = ap.parse_args(argv)
    widen_to: list[int | None] = []
    for w in args.widen_vocab:
        if w != "full" and not (w.isdigit() and int(w) > 0):
            ap.error(f"--widen-vocab takes positive sizes or 'full', not {w!r}")
        widen_to.append(None if w == "full" else int(w))
    for d in args.drafts:
        if not (d / "card.json").is_file():
            ap.error(f"{d} is not a draft checkpoint folder (no card.json)")
    from dovetail_jax.bench.results import write_atomic

    result = evaluate_drafts(args.drafts, args.work, args.heldout_every, args.batch_tokens, widen_to)
    write_atomic(args.out, lambda tmp: tmp.write_text(json.dumps(result, indent=1) + "\n"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
