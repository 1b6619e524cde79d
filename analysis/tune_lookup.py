"""Prompt lookup's two knobs, chain length L and the shortest suffix matched, A/B'd against no lookup.

Each prompt is decoded greedily with the default draft and tree (4/3/6) once per variant, one variant after the
other (same minute, same machine state), and every variant's tokens must equal the first's. Reported per dataset
and variant: τ, decode tokens/s and its ratio to the variant without lookup, the share of cycles that verified a
chain and the tokens chains added. The shortest suffix is `speculation.lookup.MIN_NGRAM`, set here per variant
(the library reads it when a generation starts). A first N prompts' subset, so a run takes ~15 min alone:

    python analysis/tune_lookup.py --out analysis/results/lookup_tuning.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from dovetail_jax import api
from dovetail_jax.config import TreeConfig
from dovetail_jax.io.eval_prompts import load_dataset
from dovetail_jax.speculation import lookup

VARIANTS = ((0, 3), (4, 2), (6, 2), (6, 3), (8, 3), (12, 3))  # (L, shortest suffix); (0, _) = no lookup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limits", default="humaneval=40,mtbench=24", help="first N prompts per dataset")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, help="JSON to write (else stdout only)")
    args = ap.parse_args()
    limits = {k: int(v) for k, v in (x.split("=") for x in args.limits.split(","))}
    target = api.load_target()
    draft = api.load_draft(target)
    totals: dict[str, dict[str, dict[str, float]]] = {}
    for ds, limit in limits.items():
        for _, message in tqdm(load_dataset(ds)[:limit], desc=ds, file=sys.stderr):
            first = None
            for length, min_n in VARIANTS:
                lookup.MIN_NGRAM = min_n
                out = api.generate(target, message, chat=True, max_new_tokens=args.max_new_tokens, draft=draft,
                                   tree=TreeConfig(4, 3, 6, lookup=length))
                first = first if first is not None else out.token_ids
                st = out.stats
                row = totals.setdefault(ds, {}).setdefault(f"L{length}-n{min_n}" if length else "none", {
                    "lookup": length, "min_ngram": min_n if length else None, "prompts": 0, "identical": 0,
                    "tokens": 0, "decode_steps": 0, "decode_s": 0.0, "cycles": 0, "lookup_cycles": 0,
                    "lookup_tokens": 0})
                row["prompts"] += 1
                row["identical"] += out.token_ids == first
                row["tokens"] += st.new_tokens
                row["decode_steps"] += st.decode_steps
                row["decode_s"] += st.decode_s
                row["cycles"] += st.acceptance.cycles
                row["lookup_cycles"] += st.dovetail.lookup_cycles
                row["lookup_tokens"] += st.dovetail.lookup_tokens
    for rows in totals.values():
        base = rows["none"]["decode_steps"] / rows["none"]["decode_s"]
        for r in rows.values():
            r["tau"] = r["decode_steps"] / r["cycles"]  # tokens per verification (the prefill's first excluded)
            r["decode_tok_s"] = r["decode_steps"] / r["decode_s"]
            r["over_no_lookup"] = r["decode_tok_s"] / base
            r["share_of_cycles_with_chain"] = r["lookup_cycles"] / r["cycles"]
    result = {"schema": "dovetail.analysis.lookup_tuning/1",
              "command": "python analysis/tune_lookup.py " + " ".join(sys.argv[1:]),
              "tree": {"top_k": 4, "depth": 3, "total_tokens": 6}, "draft": str(draft.source),
              "max_new_tokens": args.max_new_tokens, "greedy": True, "datasets": totals}
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    for ds, rows in totals.items():
        for name, r in rows.items():
            print(f"{ds:10s} {name:7s} tau {r['tau']:.2f}  {r['decode_tok_s']:6.1f} tok/s  x{r['over_no_lookup']:.3f}"
                  f"  chain in {r['share_of_cycles_with_chain']:.0%} of cycles  identical {r['identical']}/"
                  f"{r['prompts']}")


if __name__ == "__main__":
    main()
