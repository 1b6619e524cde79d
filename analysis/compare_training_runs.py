"""Held-out learning curves of several `train-draft` runs, side by side at the steps they share.

    python analysis/compare_training_runs.py --out analysis/results/train_ab_round7.json RUN_DIR RUN_DIR ...

An A/B of a training-recipe change (a loss weight, a deeper draft) is two runs from the same start on the same
data with the same schedule: their run folders' `log.jsonl` hold the held-out evaluations (top-1 at draft steps
1-3, the losses) every `--eval-every` steps, always on the same held-out split of one work folder (every 20th
conversation). This script reads those logs and the runs' `run.json` (what differs between the arms) and writes
one JSON (atomically), so a README sentence such as "p-weight 1.0 ties 0.1 at step 100" has a file behind it.
Runs still in progress are fine: a step is compared once every run has reached it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

METRICS = ("top1", "top1_2", "top1_3", "vloss", "ploss")


def read_run(folder: Path) -> dict[str, Any]:
    """The run record and its held-out evaluations by step."""
    record = json.loads((folder / "run.json").read_text())
    evals: dict[int, dict[str, float]] = {}
    log = folder / "log.jsonl"
    for line in log.read_text().splitlines() if log.exists() else []:
        row = json.loads(line)
        if "heldout" in row:
            evals[int(row["step"])] = {k: round(float(row["heldout"][k]), 4) for k in METRICS if k in row["heldout"]}
    return {"run": str(folder), "draft": record["draft"], "train": record["train"], "init": record.get("init"),
            "conversations": record.get("features", {}).get("conversations"), "heldout": evals}


def differences(runs: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """The settings (draft architecture and training) in which the runs differ: what the comparison tests."""
    out: dict[str, list[Any]] = {}
    for section in ("draft", "train"):
        keys = sorted(set().union(*(r[section] for r in runs)))
        for k in keys:
            vals = [r[section].get(k) for r in runs]
            if any(v != vals[0] for v in vals):
                out[f"{section}.{k}"] = vals
    return out


def compare(folders: list[Path]) -> dict[str, Any]:
    runs = [read_run(f) for f in folders]
    shared = sorted(set.intersection(*(set(r["heldout"]) for r in runs)))
    table = [{"step": s, "runs": [r["heldout"][s] for r in runs]} for s in shared]
    return {"command": "python analysis/compare_training_runs.py " + " ".join(sys.argv[1:]),
            "differences": differences(runs), "shared_steps": table,
            "runs": [r | {"heldout": {str(k): v for k, v in sorted(r["heldout"].items())}} for r in runs]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders (<work>/runs/NAME)")
    ap.add_argument("--out", type=Path, help="JSON to write (default: print only)")
    args = ap.parse_args(argv)
    missing = [str(f) for f in args.runs if not (f / "run.json").is_file()]
    if missing:
        print(f"compare_training_runs: not a train-draft run folder (no run.json): {', '.join(missing)}",
              file=sys.stderr)
        return 2
    result = compare(args.runs)
    print("differences: " + json.dumps(result["differences"]), file=sys.stderr)
    for row in result["shared_steps"]:
        cells = "  |  ".join(" / ".join(f"{m[k]:.4f}" for k in ("top1", "top1_2", "top1_3")) for m in row["runs"])
        print(f"step {row['step']:>5}:  {cells}", file=sys.stderr)
    if args.out:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
