"""How many of the target's own greedy tokens on the evaluation sets can a draft propose at all?

A token outside the draft's reduced vocabulary is a certain miss at its depth, whatever the draft predicts.
This reports, per draft and per vocabulary size (as trained, and widened along its `vocab_order.npy` as
`--widen-vocab V` would), the share of the target's greedy answer tokens on HumanEval and MT-bench that the
vocabulary covers — the bench's settings (chat template, 128 new tokens), outputs shared with
`estimate_prompt_lookup.py`'s cache.

    python analysis/vocab_coverage_eval_sets.py --sizes 12288,16384,24576 \
        --out analysis/results/vocab_coverage_eval_sets.json checkpoints/smollm2-135m-dgf1-v8192-r9-eagle3

(the committed result is round 9's, which left `checkpoints/` when round 12 shipped; restore it from 3faf12c)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from estimate_prompt_lookup import target_outputs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("drafts", nargs="+", type=Path, help="reduced-vocabulary draft checkpoint folders")
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",") if x.strip()], default=[],
                    help="widened vocabulary sizes to report too, comma-separated")
    ap.add_argument("--datasets", nargs="+", default=["humaneval", "mtbench"])
    ap.add_argument("--limit", type=int, default=1000, help="first N prompts of each dataset")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="as the bench (default 128)")
    ap.add_argument("--out", type=Path, help="JSON to write (else stdout only)")
    args = ap.parse_args(argv)
    from dovetail_jax.errors import DovetailError
    from dovetail_jax.io import checkpoint, registry
    from dovetail_jax.io.load import load_model_files
    from dovetail_jax.train.diagnostics import vocab_coverage

    target_path = registry.default_model_path()
    cfg, _, _ = load_model_files(target_path)
    tokens = {ds: np.concatenate([np.asarray(r["new_ids"], np.int64)
                                  for r in target_outputs(target_path, ds, args.limit, args.max_new_tokens)])
              for ds in args.datasets}
    rows = []
    for folder in args.drafts:
        try:
            _, _, vocab_map, _ = checkpoint.load_draft(folder, cfg)
            maps = {int(vocab_map.size): vocab_map} | {
                n: checkpoint.widened_vocab(folder, vocab_map, n, cfg.vocab_size) for n in args.sizes}
        except DovetailError as e:
            sys.exit(f"error: {e}")
        for n, vm in maps.items():
            rows.append({"draft": str(folder), "vocab": n, "trained_vocab": int(vocab_map.size),
                         **{ds: round(vocab_coverage(vm, t), 4) for ds, t in tokens.items()}})
            print(f"{folder.name} {n}: " + ", ".join(f"{ds} {rows[-1][ds]}" for ds in tokens), file=sys.stderr)
    result = {"schema": "dovetail.analysis.vocab_coverage/1",
              "command": "python analysis/vocab_coverage_eval_sets.py " + " ".join(sys.argv[1:] if argv is None
                                                                                   else argv),
              "what": "share of the target's greedy answer tokens (chat, first max_new_tokens) inside the vocabulary",
              "max_new_tokens": args.max_new_tokens,
              "tokens": {ds: int(t.size) for ds, t in tokens.items()}, "rows": rows}
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
