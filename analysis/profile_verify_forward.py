"""Where a verification forward's time goes: the target's projections alone, and one forward traced op by op.

    python analysis/profile_verify_forward.py [--out analysis/results/profile_verify_forward.json]

Two measurements for T = 1 (a decode step) and T = 6 (the default tree's verification), on the default model:
- `chain`: the forward's 121 projections (per layer wqkv, wo, w_gate_up, w_down, then the LM head), `[out, in]`
  f32, through `kernels.matmul` alone (random weights of the model's shapes, 538 MB: beyond any cache), best of
  30 calls; bytes / time is the read rate the kernel reaches, to compare with the machine's read bandwidth
  (`machine.memory_read_bandwidth_gbs`, recorded beside it).
- `forward`: `model.target.forward` with all logits at a context of 180 committed slots out of 512 (a mid-answer
  verification), median of 20 calls, and a `jax.profiler` trace of 10 more, summed per XLA op kind: the FFI calls
  split by their place in a layer (projections, attention, LM head) and everything else ("xla_ops").
- `tree_attention_ab`: the same forward with the fused tree-attention kernel and without it
  (`DOVETAIL_TREE_ATTENTION=off`: RoPE and the new tokens' part in XLA, the cache part still the kernel), both
  compiled up front and called alternately, 15 rounds; the medians and their difference.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dovetail_jax import api, kernels, machine
from dovetail_jax.model.cache import init_cache
from dovetail_jax.model.target import forward

OUT = Path(__file__).resolve().parent / "results" / "profile_verify_forward.json"
SLOTS, CONTEXT = 512, 180
SLOT_NAMES = ("wqkv", "attention", "wo", "w_gate_up", "w_down")  # FFI calls per layer, in order


def _best_and_median(f: Any, n: int) -> tuple[float, float]:
    jax.block_until_ready(f())
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(f())
        ts.append(time.perf_counter() - t0)
    return float(np.min(ts)), float(np.median(ts))


def chain(cfg: Any, t: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    h = cfg.hidden_size
    shapes = [(cfg.q_size + 2 * cfg.kv_size, h), (h, cfg.q_size), (2 * cfg.intermediate_size, h),
              (h, cfg.intermediate_size)] * cfg.num_layers + [(cfg.vocab_size, h)]
    ws = [jnp.asarray(rng.standard_normal(s, dtype=np.float32) * 0.02) for s in shapes]
    x = jnp.asarray(rng.standard_normal((t, max(s[1] for s in shapes)), dtype=np.float32))

    @jax.jit
    def run(ws: list[jax.Array], x: jax.Array) -> jax.Array:
        acc = jnp.zeros((), jnp.float32)
        for w in ws:  # a data dependence between calls keeps them in order
            acc = acc + kernels.matmul(x[:, : w.shape[1]], w, "out_in")[0, 0]
        return acc

    best, _ = _best_and_median(lambda: run(ws, x), 30)
    nbytes = sum(w.nbytes for w in ws)
    return {"calls": len(ws), "bytes": nbytes, "best_ms": 1e3 * best, "gb_s": nbytes / best / 1e9}


def traced_forward(target: Any, t: int) -> dict[str, Any]:
    params, cfg = target.params, target.cfg
    cache = init_cache(cfg, SLOTS, device=jax.devices()[0]).replace(length=jnp.int32(CONTEXT))
    tokens = (jnp.arange(t, dtype=jnp.int32) + 100)[None]
    positions = (CONTEXT + jnp.arange(t, dtype=jnp.int32))[None]
    mask = jnp.tril(jnp.ones((t, t), bool))
    f = jax.jit(functools.partial(forward, cfg=cfg, logits_mode="all"))
    call = functools.partial(f, params, tokens=tokens, positions=positions, tree_mask=mask, cache=cache)
    _, median = _best_and_median(call, 20)
    reps = 10
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(reps):
                jax.block_until_ready(call())
        with gzip.open(glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)[0]) as fh:
            trace = json.load(fh)
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    ffi = sorted((e for e in events if e["name"].startswith("ffi_call")), key=lambda e: e["ts"])
    per_call = len(ffi) // reps
    parts: dict[str, float] = collections.Counter()
    for i, e in enumerate(ffi):
        j = i % per_call
        parts["lm_head" if j == per_call - 1 else SLOT_NAMES[j % len(SLOT_NAMES)]] += e["dur"] / reps / 1e3
    # XLA's own ops: fusions and the like, i.e. leaf events that are neither FFI calls nor runtime/Python spans
    skip = re.compile(r"^(ffi_call|end: |\$|Thunk|Pjit|Common|Parse|Handle|Allocate|ExecuteHelper)")
    parts["xla_ops"] = sum(e["dur"] for e in events if not skip.match(e["name"])) / reps / 1e3
    return {"median_ms": 1e3 * median, "ffi_calls": per_call,
            "ms_per_call_by_part": {k: round(v, 3) for k, v in parts.items()}}


def tree_attention_ab(target: Any, t: int, rounds: int = 15) -> dict[str, float]:
    params, cfg = target.params, target.cfg
    cache = init_cache(cfg, SLOTS, device=jax.devices()[0]).replace(length=jnp.int32(CONTEXT))
    tokens = (jnp.arange(t, dtype=jnp.int32) + 100)[None]
    positions = (CONTEXT + jnp.arange(t, dtype=jnp.int32))[None]
    mask = jnp.tril(jnp.ones((t, t), bool))
    calls = {}
    for mode in ("on", "off"):  # the switch is read when the forward is traced
        os.environ["DOVETAIL_TREE_ATTENTION"] = mode
        f = jax.jit(functools.partial(forward, cfg=cfg, logits_mode="all"))
        calls[mode] = functools.partial(f, params, tokens=tokens, positions=positions, tree_mask=mask, cache=cache)
        jax.block_until_ready(calls[mode]())
    os.environ.pop("DOVETAIL_TREE_ATTENTION")
    times: dict[str, list[float]] = {m: [] for m in calls}
    for _ in range(rounds):
        for m, c in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(c())
            times[m].append(time.perf_counter() - t0)
    on, off = (1e3 * float(np.median(times[m])) for m in ("on", "off"))
    return {"fused_median_ms": on, "unfused_median_ms": off, "saved_ms": off - on}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python analysis/profile_verify_forward.py")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    if not kernels.kernels_enabled():
        raise SystemExit("error: the compiled kernels are not available here; this profile is about them")
    target = api.load_target(None, layout="out_in")
    cmd = "python analysis/profile_verify_forward.py" + ("" if args.out == str(OUT) else f" --out {args.out}")
    res: dict[str, Any] = {"command": cmd, "machine": machine.machine_info(),
                           "memory_read_gbs": machine.memory_read_bandwidth_gbs(),
                           "context": CONTEXT, "cache_slots": SLOTS, "tokens": {}}
    for t in (1, 6):
        res["tokens"][str(t)] = {"chain": chain(target.cfg, t), "forward": traced_forward(target, t),
                                 "tree_attention_ab": tree_attention_ab(target, t)}
        print(t, json.dumps(res["tokens"][str(t)]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
