"""Where the data stage's time goes: the continuously refilled batch's decode step and refill prefill, timed alone.

    python analysis/profile_distill_step.py [--out analysis/results/profile_distill_step.json]

`dovetail train-draft --stage data` answers prompts in a batch of B = 32 cache rows of S = 512 slots (prompt bucket
256 + 256 answer tokens; `train/distill.py`), one decode step per answer token of every busy row plus a refill
prefill of 8 rows whenever 8 rows are free. This times, on the default model and with the data stage's own jitted
programs (`distill._programs`), best and median of `--repeats` calls on a quiet machine:

- `step`: one decode step (forward of 1 token per row over the whole S-slot cache, LM head, argmax, features) at
  the data stage's shape and at other B and S, so that the per-row and per-slot costs separate (every row attends
  all S slots, masked: the cache's K/V bytes grow with B x S);
- `write_step`: the donated per-row K/V write that follows each step;
- `prefill`: a refill of 8 left-padded prompts of P = 64..256 tokens.

The answer-token rate bound B / (step + write) is what the stage would reach with every row busy and no
prefills; the progress bar's `answer_tok_s` is the measured rate with both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dovetail_jax import api, devices, machine
from dovetail_jax.model.cache import init_cache
from dovetail_jax.model.params import fast_layout
from dovetail_jax.train import distill

OUT = Path(__file__).resolve().parent / "results" / "profile_distill_step.json"


def _time(fn: Any, repeats: int) -> dict[str, float]:
    jax.block_until_ready(fn())  # compile + warm
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return {"best_ms": min(ts) * 1e3, "median_ms": statistics.median(ts) * 1e3}


def _kv_bytes(cfg: Any, batch: int, slots: int) -> int:
    return cfg.num_layers * 2 * batch * cfg.num_kv_heads * slots * cfg.head_dim * 4  # f32 K and V


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python analysis/profile_distill_step.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args(argv)
    devices.setup()
    target = api.load_target(layout=fast_layout(2))
    params, cfg = target.params, target.cfg
    prefill, step, write_prefill, write_step = distill._programs(cfg, None)
    rng = np.random.default_rng(0)
    steps = []
    for batch, slots in ((32, 512), (32, 272), (32, 1024), (16, 512), (8, 512), (1, 512)):
        cache = init_cache(cfg, slots, batch=batch)
        cache = cache.replace(length=jnp.asarray(slots, jnp.int32))
        # a mid-answer batch: row b has filled slots [kv_start[b], S) (prompt + part of its answer)
        kv_start = jnp.asarray(rng.integers(slots // 4, slots - 8, batch), jnp.int32)
        tok = jnp.asarray(rng.integers(0, cfg.vocab_size, batch), jnp.int32)
        pos = slots - kv_start
        conv = jnp.arange(batch, dtype=jnp.int32)
        t_step = _time(lambda: step(params, cache, tok, pos, kv_start, conv), args.repeats)  # noqa: B023
        update = step(params, cache, tok, pos, kv_start, conv)[3]
        holder = {"cache": cache}

        def write(h: dict = holder, u: Any = update, slot: jax.Array = kv_start - 1) -> Any:
            h["cache"] = write_step(h["cache"], u, slot)  # donated: the cache is carried from call to call
            return h["cache"].k[0]

        t_write = _time(write, args.repeats)
        total = t_step["best_ms"] + t_write["best_ms"]
        steps.append({"batch": batch, "slots": slots, "kv_bytes": _kv_bytes(cfg, batch, slots), "step": t_step,
                      "write_step": t_write, "answer_tok_s_bound": batch / total * 1e3})
        print(f"B {batch:>2} S {slots:>4}: step {t_step['best_ms']:.1f} ms (median {t_step['median_ms']:.1f}), "
              f"write {t_write['best_ms']:.1f} ms, bound {batch / total * 1e3:.0f} tok/s", flush=True)
    prefills = []
    for p in (64, 128, 256):
        r = 8
        tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (r, p)), jnp.int32)
        start = jnp.asarray(rng.integers(0, p // 2, r), jnp.int32)
        conv = jnp.arange(r, dtype=jnp.int32)
        t = _time(lambda: prefill(params, tokens, start, conv), max(3, args.repeats // 3))  # noqa: B023
        prefills.append({"rows": r, "bucket": p, **t, "prompt_tok_s": r * p / t["best_ms"] * 1e3})
        print(f"prefill 8 x {p}: {t['best_ms']:.0f} ms ({r * p / t['best_ms'] * 1e3:.0f} tok/s)", flush=True)
    cmd = "python analysis/profile_distill_step.py" + ("" if args.out == str(OUT) else f" --out {args.out}")
    res = {"command": cmd, "machine": {**machine.machine_info(),
                                       "memory_read_gbs": machine.memory_read_bandwidth_gbs()},
           "model": cfg.name, "weights_bytes": int(sum(x.nbytes for x in jax.tree.leaves(params))),
           "steps": steps, "prefills": prefills}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
