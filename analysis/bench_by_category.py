"""Where does the draft agree least? A `dovetail bench dovetail` result's MT-bench prompts grouped by category.

    python analysis/bench_by_category.py analysis/results/bench_dovetail_full_r11_intel.json \
        --out analysis/results/mtbench_by_category_r11_intel.json

MT-bench's 80 first turns come in 8 categories of 10 (writing, roleplay, reasoning, math, coding, extraction,
stem, humanities). Per category and configuration: τ (committed tokens per cycle, as the bench counts it), the
share of cycles that accept at least one drafted token, and the speedup over target-only on the same prompts
(sum of target decode time over sum of Dovetail decode time: the outputs are the same tokens). It reads the
result only; the categories come from the installed MT-bench question file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any


def by_category(bench: dict[str, Any], categories: dict[str, str]) -> dict[str, dict[str, dict[str, float]]]:
    """{config: {category: {prompts, tokens, cycles, tau, accept_any, speedup}}} over the bench's MT-bench prompts."""
    sums: dict[str, dict[str, defaultdict[str, float]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(float)))
    for prompt in bench["prompts"]["mtbench"]:
        category = categories[prompt["id"]]
        for name, run in prompt["configs"].items():
            s = sums[name][category]
            s["prompts"] += 1
            s["tokens"] += run["tokens"]
            s["cycles"] += run["cycles"]
            s["committed"] += run["tau"] * run["cycles"]
            s["no_accept"] += run["accept_hist"][0]
            s["decode_s"] += run["decode_s"]
            s["target_decode_s"] += prompt["target"]["decode_s"]
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, cats in sums.items():
        out[name] = {c: {"prompts": int(s["prompts"]), "tokens": int(s["tokens"]), "cycles": int(s["cycles"]),
                         "tau": round(s["committed"] / s["cycles"], 4),
                         "accept_any": round(1 - s["no_accept"] / s["cycles"], 4),
                         "speedup": round(s["target_decode_s"] / s["decode_s"], 4)}
                     for c, s in sorted(cats.items())}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench", type=Path, help="a `dovetail bench dovetail` result JSON with MT-bench prompts")
    ap.add_argument("--out", type=Path, help="JSON to write (else stdout only)")
    args = ap.parse_args(argv)
    try:
        bench = json.loads(args.bench.read_text())
    except (OSError, ValueError) as e:
        print(f"error: cannot read {args.bench} as a bench result: {e}", file=sys.stderr)
        return 2
    if not isinstance(bench, dict) or "mtbench" not in bench.get("prompts", {}):
        print(f"error: {args.bench} has no MT-bench prompts", file=sys.stderr)
        return 2
    from dovetail_jax.bench.results import write_json_atomic
    from dovetail_jax.io.eval_prompts import mtbench_categories

    table = by_category(bench, mtbench_categories())
    for name, cats in table.items():
        print(name)
        for c, r in cats.items():
            print(f"  {c:11s} tau {r['tau']:.2f}  accept>=1 {r['accept_any']:.2f}  speedup {r['speedup']:.2f}x")
    if args.out:
        result = {"command": "python analysis/bench_by_category.py " + " ".join(argv or sys.argv[1:]),
                  "bench": str(args.bench), "bench_timestamp": bench.get("timestamp"), "configs": table}
        write_json_atomic(args.out, result)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
