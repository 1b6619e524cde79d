"""`dovetail bench forward`: time one target forward over T tokens, per weight layout, at a given context.

This is the cost curve behind every speculative-decoding decision (how many tree tokens a verification may
hold) and behind the layout choice of `model/params.py`. Layouts and token counts are timed round-robin, so a
slow spell of a shared machine hits them alike; each cell reports its best round.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from dovetail_jax.argtypes import positive_int
from dovetail_jax.bench.results import write_json_atomic
from dovetail_jax.errors import ConfigError

DEFAULT_OUT = Path("analysis/results/bench_forward.json")
SCHEMA = "dovetail.bench.forward/1"
LAYOUTS = ("out_in", "in_out")


def _int_list(s: str) -> list[int]:
    try:
        vals = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not vals or min(vals) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return sorted(set(vals))


def _layouts(s: str) -> list[str]:
    vals = [x.strip() for x in s.split(",") if x.strip()]
    bad = [v for v in vals if v not in LAYOUTS]
    if not vals or bad:
        raise argparse.ArgumentTypeError(f"layouts must be among {', '.join(LAYOUTS)}, got {s!r}")
    return vals


def add_args(p: argparse.ArgumentParser) -> None:
    """Options of `dovetail bench forward` (`--model` is added by the CLI)."""
    p.add_argument("--tokens", type=_int_list, default=[1, 2, 4, 8, 16, 32],
                   help="token counts T per forward, comma-separated (1,2,4,8,16,32)")
    p.add_argument("--context", type=positive_int, default=128, help="committed tokens before them (128)")
    p.add_argument("--layouts", type=_layouts, default=list(LAYOUTS), help="weight layouts (out_in,in_out)")
    p.add_argument("--repeats", type=positive_int, default=5, help="rounds; each cell reports its best (5)")
    p.add_argument("--calls", type=positive_int, default=10, help="timed calls per cell and round (10)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON result file (default {DEFAULT_OUT})")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from tqdm import tqdm

    from dovetail_jax import devices
    from dovetail_jax.bench.machine import load_average, machine_info
    from dovetail_jax.io.load import load_model_files
    from dovetail_jax.model.cache import init_cache
    from dovetail_jax.model.params import params_from_tensors
    from dovetail_jax.model.target import forward

    cfg, tensors, _ = load_model_files(args.model, tokenizer=args.tokenizer)
    dev = devices.target_device()
    ctx = args.context
    slots = 1 << (ctx + max(args.tokens) - 1).bit_length()
    if ctx + max(args.tokens) > cfg.max_position_embeddings:
        raise ConfigError(f"context {ctx} + {max(args.tokens)} tokens exceeds the model's "
                          f"{cfg.max_position_embeddings}")
    params = {lay: params_from_tensors(cfg, tensors, dev, layout=lay) for lay in args.layouts}
    del tensors
    fwd = jax.jit(lambda w, c, tok, pos, mask: forward(w, cfg, tok, pos, mask, c)[0])
    cache = init_cache(cfg, slots, device=dev).replace(length=jax.device_put(jnp.int32(ctx), dev))
    cells = {}
    for t in args.tokens:
        inputs = (jax.device_put(jnp.zeros((1, t), jnp.int32), dev),
                  jax.device_put(ctx + jnp.arange(t, dtype=jnp.int32)[None], dev),
                  jax.device_put(jnp.tril(jnp.ones((t, t), bool)), dev))
        for lay in args.layouts:
            fwd(params[lay], cache, *inputs).block_until_ready()  # compile and warm up
            cells[(lay, t)] = (inputs, [])
    load_start = load_average()
    for _ in tqdm(range(args.repeats), desc="rounds", file=sys.stderr, unit="round"):
        for (lay, _t), (inputs, times) in cells.items():
            t0 = time.perf_counter()
            for _ in range(args.calls):
                out = fwd(params[lay], cache, *inputs)
            out.block_until_ready()
            times.append((time.perf_counter() - t0) / args.calls)
    rows = [{"layout": lay, "tokens": t, "best_ms": min(v[1]) * 1e3, "median_ms": float(np.median(v[1])) * 1e3,
             "rounds_ms": [x * 1e3 for x in v[1]]} for (lay, t), v in cells.items()]
    best = {t: min((r for r in rows if r["tokens"] == t), key=lambda r: r["best_ms"])["layout"] for t in args.tokens}
    res = {
        "schema": SCHEMA,
        "command": "dovetail " + " ".join(sys.argv[1:]),
        "model": cfg.name,
        "context": ctx,
        "cache_slots": slots,
        "logits": "all T positions",
        "rows": rows,
        "fastest_layout_per_tokens": best,
        "machine": {**machine_info(), "load_average_1m": {"start": load_start, "end": load_average()}},
    }
    write_json_atomic(Path(args.out), res)
    header = f"{'T':>4}" + "".join(f"{lay + ' ms':>12}" for lay in args.layouts)
    lines = [header]
    for t in args.tokens:
        by = {r["layout"]: r["best_ms"] for r in rows if r["tokens"] == t}
        lines.append(f"{t:>4}" + "".join(f"{by[lay]:>12.2f}" for lay in args.layouts))
    print("\n".join(lines) + f"\nwrote {args.out}")
    return res
