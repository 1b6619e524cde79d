"""Held-out agreement of several draft checkpoints on one and the same held-out split.

    python analysis/eval_drafts_heldout.py --out /tmp/heldout.json checkpoints/smollm2-135m-dgf1-v8192 ...

A draft's card reports top-1 on the held-out split of the data *it* was trained on; drafts trained on different
data (or data that grew since) are not comparable that way. This script scores every given draft on the held-out
split (every 20th conversation, as `train-draft` splits it) of one work folder's feature shards: top-1 of the
first draft step and of unrolled steps 2 and 3 (the draft on its own guesses, as deeper in a tree), the losses, and
the coverage of the draft's vocabulary on the target's greedy tokens there (a ceiling on its top-1). The result is
JSON (`--out`, written atomically) so README tables can be rebuilt from it.

The split is by a conversation's index in the answers file, so a folder that grew keeps every earlier held-out
conversation held out: a draft trained on an earlier state of the folder never saw any of them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def evaluate_drafts(drafts: list[Path], work: Path | None, heldout_every: int, batch_tokens: int) -> dict[str, Any]:
    from dovetail_jax import api
    from dovetail_jax.io.checkpoint import load_draft
    from dovetail_jax.model import draft as D
    from dovetail_jax.train.diagnostics import greedy_answer_tokens, vocab_coverage
    from dovetail_jax.train.features import load_features
    from dovetail_jax.train.pipeline import default_work_dir
    from dovetail_jax.train.trainer import TrainConfig, evaluate, split

    target = api.load_target()
    work = work or default_work_dir(target)
    fs = load_features(work / "features", target.sha256, target.cfg.hidden_size)
    _, held = split(fs, heldout_every)
    greedy = greedy_answer_tokens(fs, held)
    tc = TrainConfig(batch_tokens=batch_tokens, heldout_every=heldout_every)
    rows = []
    for folder in drafts:
        t0 = time.perf_counter()
        dcfg, params, vocab_map, card = load_draft(folder, target.cfg, target_sha256=target.sha256)
        shared = D.make_shared(target.params, target.cfg, vocab_map)
        m = evaluate(params, shared, fs, held, target.cfg, dcfg, tc)
        rows.append({"draft": str(folder), "name": card.get("name"), "layers": dcfg.num_layers,
                     "fusion": dcfg.fusion, "draft_vocab": dcfg.draft_vocab_size,
                     "trained_on_conversations": card.get("training", {}).get("conversations"),
                     **{k: round(float(v), 4) for k, v in m.items()},
                     "vocab_coverage": round(vocab_coverage(vocab_map, greedy), 4),
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(f"{folder}: " + ", ".join(f"{k} {rows[-1][k]}" for k in ("top1", "top1_2", "top1_3", "vocab_coverage")),
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
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = ap.parse_args(argv)
    for d in args.drafts:
        if not (d / "card.json").is_file():
            ap.error(f"{d} is not a draft checkpoint folder (no card.json)")
    from dovetail_jax.bench.results import write_atomic

    result = evaluate_drafts(args.drafts, args.work, args.heldout_every, args.batch_tokens)
    write_atomic(args.out, lambda tmp: tmp.write_text(json.dumps(result, indent=1) + "\n"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
