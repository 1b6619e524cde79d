"""Write `vocab_order.npy` beside a reduced-vocabulary draft exported before `train-draft` wrote one (round 9 and
earlier), from the work folder it was trained on, so that `--widen-vocab V` can widen its vocabulary.

The ranking is the pipeline's (`trainer.rank_vocab`): the draft's own vocabulary first, then every other target
id by how often the training split's answers use it — the first N records of the answers file, N being the
conversations its card says it was trained on, without the held-out ones (index divisible by the card's
`heldout_every`). The pipeline also counts the target's greedy choice at every answer position; those are the
answer tokens shifted by one, so counting the answers alone ranks the ids the same way up to ties.

    python analysis/write_vocab_order.py checkpoints/smollm2-135m-dgf1-v8192-r9-eagle3

(round 9 left `checkpoints/` when round 12 shipped; restore it with
`git checkout 3faf12c -- checkpoints/smollm2-135m-dgf1-v8192-r9-eagle3`)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def answer_counts(answers: Path, conversations: int | None, heldout_every: int, vocab_size: int
                  ) -> tuple[np.ndarray, int]:
    """(how often each id is an answer token in the training split, records counted)."""
    from dovetail_jax.train.answers import read_answers

    records = read_answers(answers)[:conversations]
    counts = np.zeros(vocab_size, np.int64)
    used = 0
    for r in records:
        if r["index"] % heldout_every:
            counts += np.bincount(np.asarray(r["answer_ids"], np.int64), minlength=vocab_size)[:vocab_size]
            used += 1
    return counts, used


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("drafts", nargs="+", type=Path, help="reduced-vocabulary draft checkpoint folders")
    ap.add_argument("--work", type=Path, default=None,
                    help="train-draft work folder the drafts were trained on (default: the default target's)")
    ap.add_argument("--force", action="store_true", help="replace an existing vocab_order.npy")
    args = ap.parse_args(argv)
    from dovetail_jax import api
    from dovetail_jax.errors import DovetailError
    from dovetail_jax.io.checkpoint import VOCAB_ORDER, load_draft, save_vocab_order
    from dovetail_jax.train.pipeline import default_work_dir
    from dovetail_jax.train.trainer import rank_vocab

    target = api.load_target()
    work = args.work or default_work_dir(target)
    answers = work / "answers.jsonl"
    if not answers.is_file():
        sys.exit(f"error: {answers}: no answers file (run `dovetail train-draft --stage data` first)")
    out = []
    for folder in args.drafts:
        try:
            _, _, vocab_map, card = load_draft(folder, target.cfg, target_sha256=target.sha256)
        except DovetailError as e:
            sys.exit(f"error: {e}")
        if vocab_map is None:
            sys.exit(f"error: {folder}: a full-vocabulary draft has nothing to widen")
        if (folder / VOCAB_ORDER).exists() and not args.force:
            sys.exit(f"error: {folder / VOCAB_ORDER} exists; pass --force to replace it")
        training = card.get("training", {})
        counts, used = answer_counts(answers, training.get("conversations"), int(training.get("heldout_every", 20)),
                                     target.cfg.vocab_size)
        path = save_vocab_order(folder, rank_vocab(vocab_map, counts), vocab_map, target.cfg.vocab_size)
        out.append({"draft": str(folder), "wrote": str(path), "draft_vocab": int(vocab_map.size),
                    "training_records_counted": used, "answer_tokens_counted": int(counts.sum())})
        print(f"{path}: {used} training conversations, {int(counts.sum())} answer tokens", file=sys.stderr)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
