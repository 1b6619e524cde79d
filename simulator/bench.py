"""Speed of the simulator itself: simulated cycles per second and the time of a 1,000-configuration sweep.

    python -m simulator.bench [--out analysis/results/sim_bench.json]

Goals (issue): >= 100,000 cycles/s and a 1,000-configuration sweep in < 10 s. Best of `--repeats`, because the
machine may be shared; the load average is recorded next to the numbers.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dovetail_jax.config import LLAMA2_7B, DraftConfig
from simulator.acceptance import PositionalAcceptance
from simulator.errors import ConfigError
from simulator.files import write_json
from simulator.hardware import load_profile
from simulator.schedules import SimOptions, simulate
from simulator.tune import sweep
from simulator.workload import PAPER_TREE, Workload

OUT = Path(__file__).resolve().parent.parent / "analysis" / "results" / "sim_bench.json"
ACC = PositionalAcceptance([0.6, 0.15, 0.08, 0.04, 0.02], 0.95)
SWEEP_GRID = {"top_k": [2, 4, 6, 8, 10], "depth": [2, 3, 4, 5, 6], "total_tokens": [4, 6, 8, 12, 16, 24, 32, 48],
              "draft_layers": [1, 2, 3, 4, 5]}


def bench(cycles: int = 200_000, repeats: int = 3, sweep_cycles: int = 1000) -> dict[str, Any]:
    hw = load_profile("paper-server1-4214r-2080super")
    wl = Workload(LLAMA2_7B, DraftConfig(5), PAPER_TREE)
    res: dict[str, Any] = {"cycles_per_s": {}}
    for sched in ("dovetail", "dovetail-pipelined", "eagle2"):
        best = 0.0
        for r in range(repeats):
            t0 = time.perf_counter()
            simulate(sched, hw, wl, ACC, opts=SimOptions(cycles=cycles, seed=r))
            best = max(best, cycles / (time.perf_counter() - t0))
        res["cycles_per_s"][sched] = best
    n_cfg = 1
    for v in SWEEP_GRID.values():
        n_cfg *= len(v)
    best_t = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        rows = sweep(hw, wl, ACC, SWEEP_GRID, opts=SimOptions(cycles=sweep_cycles))
        best_t = min(best_t, time.perf_counter() - t0)
    res["sweep"] = {"configurations": n_cfg, "feasible": sum(r["feasible"] for r in rows),
                    "cycles_per_configuration": sweep_cycles, "seconds": best_t}
    res["goals"] = {"cycles_per_s": 100_000, "sweep_1000_s": 10.0,
                    "met": min(res["cycles_per_s"].values()) >= 100_000 and best_t < 10.0}
    res["machine"] = {"node": platform.node(), "python": platform.python_version(), "cpus": os.cpu_count(),
                      "load_average": os.getloadavg()}
    res["when"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    res["command"] = "python -m simulator.bench"
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m simulator.bench")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--cycles", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    if args.cycles <= 0 or args.repeats <= 0:
        ap.error("--cycles and --repeats must be positive")
    res = bench(args.cycles, args.repeats)
    try:  # whole or not at all: an unwritable --out leaves the old result as it was
        write_json(args.out, res)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for k, v in res["cycles_per_s"].items():
        print(f"{k:<20} {v:12,.0f} cycles/s")
    s = res["sweep"]
    print(f"sweep: {s['configurations']} configurations x {s['cycles_per_configuration']} cycles in "
          f"{s['seconds']:.2f} s (load average {res['machine']['load_average'][0]:.1f}); goals met: "
          f"{res['goals']['met']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
