"""Two measurements of the Dovetail cycle inside the decode loop, default model and draft, default tree.

    python analysis/profile_decode_cycle.py [--prompts 2] [--rounds 4] [--out FILE]

(default out: analysis/results/profile_decode_cycle.json)

- `kv_write_ab`: the first HumanEval prompts decoded (greedy, 128 new tokens) with the KV-write kernel
  (`kernels.kv_write`, one FFI call for every layer's cache write) and without it (the XLA gather + update per
  buffer; `kernels.supports_kv_write` patched to refuse, every program recompiled), alternately for `--rounds`
  rounds; medians over prompts x rounds of the verify phase (forward, acceptance, commit) and the whole cycle, ms
  per cycle.
- `draft_idle`: one draft step (the cycle's `draft_next`, on inputs captured from a real cycle) called back to back
  and after 5 and 28 ms of sleep (28 ms ~ one verification), 40 calls each; medians. Shows how much of the draft's
  time in the loop is its weights coming back from DRAM after the target ran (or after nothing ran at all).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dovetail_jax import api, kernels, machine
from dovetail_jax.bench.results import write_json_atomic
from dovetail_jax.decode import dovetail, programs
from dovetail_jax.io import eval_prompts

OUT = Path(__file__).resolve().parent / "results" / "profile_decode_cycle.json"
NEW_TOKENS = 128


def kv_write_ab(target: Any, draft: Any, prompts: list[str], rounds: int) -> dict[str, Any]:
    supports = kernels.supports_kv_write
    per: dict[str, list[tuple[float, float]]] = {"kernel": [], "xla": []}
    try:
        for _ in range(rounds):
            for mode in per:
                kernels.supports_kv_write = supports if mode == "kernel" else (lambda *a: False)
                programs.clear()  # the choice is made when the steps are traced
                api.generate(target, prompts[0], chat=True, max_new_tokens=16, draft=draft)  # compile, untimed
                for p in prompts:
                    o = api.generate(target, p, chat=True, max_new_tokens=NEW_TOKENS, draft=draft)
                    cycles = o.stats.acceptance.cycles
                    per[mode].append((1e3 * o.stats.dovetail.time_s.verify / cycles,
                                      1e3 * o.stats.decode_s / cycles))
    finally:
        kernels.supports_kv_write = supports
        programs.clear()
    med = {m: np.median(np.array(v), axis=0) for m, v in per.items()}
    return {"prompts": len(prompts), "rounds": rounds,
            **{m: {"verify_ms_per_cycle": float(v[0]), "cycle_ms": float(v[1])} for m, v in med.items()},
            "verify_saved_ms": float(med["xla"][0] - med["kernel"][0]),
            "cycle_saved_ms": float(med["xla"][1] - med["kernel"][1])}


def draft_idle(target: Any, draft: Any, prompt: str, gaps_s: tuple[float, ...] = (0.0, 0.005, 0.028),
               calls: int = 40) -> dict[str, float]:
    api.generate(target, prompt, chat=True, max_new_tokens=32, draft=draft)
    prog = next(p for p in programs._programs if isinstance(p, dovetail.DovetailCycle))
    step = prog.draft_next
    seen: dict[str, Any] = {}

    def spy(*args: Any) -> Any:  # keep the last cycle's inputs and the cache it returns
        out = step(*args)
        seen["args"], seen["cache"] = args[3:], out[1]
        return out

    prog.__dict__["draft_next"] = spy
    try:
        api.generate(target, prompt, chat=True, max_new_tokens=32, draft=draft)
    finally:
        del prog.__dict__["draft_next"]
    feats, ids, n = seen["args"]
    cache = seen["cache"]

    def run(c: Any) -> Any:  # the same step again, its cache rewound to where it started
        tree, c = step(draft.params, draft.shared, c, feats, ids, n)
        jax.block_until_ready(tree)
        return c.replace(length=c.length - n)

    cache = run(cache)
    res = {}
    for gap in gaps_s:
        ts = []
        for _ in range(calls):
            if gap:
                time.sleep(gap)
            t0 = time.perf_counter()
            cache = run(cache)
            ts.append(time.perf_counter() - t0)
        res[f"after_{int(gap * 1e3)}ms_idle_ms"] = 1e3 * float(np.median(ts))
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python analysis/profile_decode_cycle.py")
    ap.add_argument("--prompts", type=int, default=2, help="first N HumanEval prompts (2)")
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds of the A/B (4)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    if not kernels.kernels_enabled():
        raise SystemExit("error: the compiled kernels are not available here; this profile is about them")
    if args.prompts < 1 or args.rounds < 1:
        raise SystemExit("error: --prompts and --rounds must be at least 1")
    target = api.load_target()
    draft = api.load_draft(target)
    prompts = [m for _, m in eval_prompts.load_dataset("humaneval")[: args.prompts]]
    cmd = "python analysis/profile_decode_cycle.py" + (
        f" --prompts {args.prompts}" if args.prompts != 2 else "") + (
        f" --rounds {args.rounds}" if args.rounds != 4 else "") + ("" if args.out == str(OUT) else f" --out {args.out}")
    res = {"command": cmd, "machine": machine.machine_info(), "memory_read_gbs": machine.memory_read_bandwidth_gbs(),
           "tree": "default", "draft": draft.source, "new_tokens": NEW_TOKENS,
           "kv_write_ab": kv_write_ab(target, draft, prompts, args.rounds),
           "draft_idle": draft_idle(target, draft, prompts[0])}
    print(res["kv_write_ab"], res["draft_idle"])
    write_json_atomic(Path(args.out), res)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
