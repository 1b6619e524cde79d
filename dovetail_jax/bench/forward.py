"""`dovetail bench forward`: the cost of one target forward over T new tokens, against llama.cpp F32.

This is the cost curve behind every speculative-decoding decision (how many tree tokens a verification may
hold). Per T it times our forward (all T logits, `context` committed tokens before them) with the compiled
matmul kernel and with XLA's dot (`dovetail_jax.kernels`), per weight layout, and llama.cpp evaluating the
same T tokens of the same weights (F32 GGUF) at the same context with logits for all T (one `llama_decode`
of a T-token batch after an untimed prefill). Every cell is timed round-robin, each call synchronously, so
a slow spell of a shared machine hits them alike; each cell reports its best round.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dovetail_jax.argtypes import output_file, positive_int
from dovetail_jax.bench import report
from dovetail_jax.bench.results import write_json_atomic
from dovetail_jax.errors import ConfigError

SCHEMA = "dovetail.bench.forward/1"  # v1 plus the matmul path per row, llama.cpp and a summary
LAYOUTS = ("out_in", "in_out")
MATMULS = ("kernel", "xla")
LLAMA = "llama_cpp_f32"
DEFAULT_ENGINE = "kernel/out_in"  # what the package runs where the kernel builds (params.py default layout)

_say = report.sayer("bench forward")


@dataclass(frozen=True)
class ForwardBenchOptions:
    """What `dovetail bench forward` measures and where it writes."""

    model: str | None = None  # a GGUF file or HF folder; None: the embedded default
    tokenizer: str | None = None
    tokens: tuple[int, ...] = (1, 2, 4, 8, 16, 32)  # T per forward
    context: int = 128  # committed tokens before the T new ones
    layouts: tuple[str, ...] = LAYOUTS  # our projection weight layouts
    matmuls: tuple[str, ...] = MATMULS  # "kernel" (compiled small-T matmul) and/or "xla" (XLA's dot)
    repeats: int = 5  # rounds; each cell reports its best
    calls: int = 10  # timed calls per cell and round
    llama_cpp: bool = True  # also time llama.cpp F32 (skipped with a note if llama_cpp is not installed)
    out: Path | None = None  # JSON result; None: a fresh file in the temp directory


def _csv(kind: Callable[[str], Any], allowed: Sequence[str] | None = None) -> Callable[[str], list[Any]]:
    def parse(s: str) -> list[Any]:
        try:
            vals = [kind(x.strip()) for x in s.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {s!r}") from None
        bad = [v for v in vals if (allowed is not None and v not in allowed) or (kind is int and v <= 0)]
        if not vals or bad:
            raise argparse.ArgumentTypeError(f"bad values {bad or s!r}" + (f" (allowed: {allowed})" if allowed else ""))
        return sorted(set(vals)) if kind is int else list(dict.fromkeys(vals))

    return parse


def add_args(p: argparse.ArgumentParser) -> None:
    """Options of `dovetail bench forward` (`--model`/`--tokenizer` are added by the CLI)."""
    p.add_argument("--tokens", type=_csv(int), default=[1, 2, 4, 8, 16, 32],
                   help="token counts T per forward, comma-separated (1,2,4,8,16,32)")
    p.add_argument("--context", type=positive_int, default=128, help="committed tokens before them (128)")
    p.add_argument("--layouts", type=_csv(str, LAYOUTS), default=list(LAYOUTS),
                   help="weight layouts (out_in,in_out)")
    p.add_argument("--matmuls", type=_csv(str, MATMULS), default=list(MATMULS),
                   help="our matmul paths: kernel (compiled small-T kernel), xla (XLA's dot) (kernel,xla)")
    p.add_argument("--repeats", type=positive_int, default=5, help="rounds; each cell reports its best (5)")
    p.add_argument("--calls", type=positive_int, default=10, help="timed calls per cell and round (10)")
    p.add_argument("--no-llama-cpp", action="store_true", help="do not time llama.cpp F32")
    p.add_argument("--out", type=output_file, default=None,
                   help="JSON result file, replaced only by a complete run (default: a new file in the temp dir)")


def options_from_args(args: argparse.Namespace) -> ForwardBenchOptions:
    return ForwardBenchOptions(
        model=args.model, tokenizer=args.tokenizer, tokens=tuple(args.tokens), context=args.context,
        layouts=tuple(args.layouts), matmuls=tuple(args.matmuls), repeats=args.repeats, calls=args.calls,
        llama_cpp=not args.no_llama_cpp, out=args.out)


@dataclass
class _Cell:
    """One (engine, T) pair: a callable that runs one synchronous forward and returns its seconds."""

    engine: str
    tokens: int
    call: Callable[[], float]
    rounds: list[float] = field(default_factory=list)


def _our_cells(opts: ForwardBenchOptions, cfg: Any, params: dict[str, Any], dev: Any, slots: int) -> list[_Cell]:
    """Compile (and warm up) one forward per (matmul path, layout, T)."""
    import jax
    import jax.numpy as jnp

    from dovetail_jax import kernels
    from dovetail_jax.model.cache import init_cache
    from dovetail_jax.model.target import forward

    matmuls = [m for m in opts.matmuls if m != "kernel" or kernels.kernels_enabled()] or ["xla"]
    if len(matmuls) < len(opts.matmuls):
        _say("compiled kernel unavailable: no 'kernel' rows")
    cache = init_cache(cfg, slots, device=dev).replace(length=jax.device_put(jnp.int32(opts.context), dev))
    cells = []
    for mm in matmuls:
        for lay in opts.layouts:
            fwd = jax.jit(lambda w, c, tok, pos, mask: forward(w, cfg, tok, pos, mask, c)[0])
            for t in opts.tokens:
                inputs = (jax.device_put(jnp.zeros((1, t), jnp.int32), dev),
                          jax.device_put(opts.context + jnp.arange(t, dtype=jnp.int32)[None], dev),
                          jax.device_put(jnp.tril(jnp.ones((t, t), bool)), dev))
                with kernels.xla_only() if mm == "xla" else contextlib.nullcontext():
                    fwd(params[lay], cache, *inputs).block_until_ready()  # trace, compile, warm up

                def call(fwd=fwd, w=params[lay], inputs=inputs) -> float:
                    t0 = time.perf_counter()
                    fwd(w, cache, *inputs).block_until_ready()
                    return time.perf_counter() - t0

                cells.append(_Cell(f"{mm}/{lay}", t, call))
    return cells


class _LlamaForward:
    """llama.cpp's cost of evaluating T new tokens (logits for all) after `context` committed ones."""

    def __init__(self, model_path: Path, context: int, max_tokens: int) -> None:
        from dovetail_jax.bench.peers import LlamaCppEngine

        self.engine = LlamaCppEngine(model_path, n_ctx=max(512, context + max_tokens + 1))
        self.lc, self.ctx = self.engine.lc, self.engine.llm.ctx
        self.context = context
        self.batch = self.lc.llama_batch_init(max(context, max_tokens), 0, 1)
        self._fill(0, context, last_logits_only=True)
        self._decode()  # prefill, untimed

    def _fill(self, pos0: int, n: int, last_logits_only: bool = False) -> None:
        b = self.batch
        for i in range(n):
            b.token[i] = 0  # the same token ids as our forward; the cost does not depend on them
            b.pos[i] = pos0 + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 1 if (not last_logits_only or i == n - 1) else 0
        b.n_tokens = n

    def _decode(self) -> None:
        rc = self.lc.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        self.lc.llama_synchronize(self.ctx)

    def call(self, t: int) -> float:
        """Drop the previous call's tokens, then time one T-token decode with all T logits."""
        self.lc.llama_memory_seq_rm(self.lc.llama_get_memory(self.ctx), 0, self.context, -1)
        self._fill(self.context, t)
        t0 = time.perf_counter()
        self._decode()
        return time.perf_counter() - t0

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.engine.close()


def _llama_cells(opts: ForwardBenchOptions, model_path: Path) -> tuple[list[_Cell], Any, dict[str, Any]]:
    """llama.cpp cells (empty, with the reason, when it cannot run) and the object to close afterwards."""
    if not opts.llama_cpp:
        return [], None, {"skipped": "--no-llama-cpp"}
    if model_path.suffix != ".gguf":
        return [], None, {"skipped": f"{model_path} is not a GGUF file"}
    try:
        import llama_cpp
    except ImportError:
        return [], None, {"skipped": "llama_cpp is not installed (pip install -e '.[bench]')"}
    peer = _LlamaForward(model_path, opts.context, max(opts.tokens))
    for t in opts.tokens:
        peer.call(t)  # warm up every batch shape
    info = {"engine": f"llama-cpp-python {llama_cpp.__version__}, F32 GGUF", "threads": peer.engine.threads,
            "f32_gguf": str(peer.engine.f32)}
    return [_Cell(LLAMA, t, lambda t=t: peer.call(t)) for t in opts.tokens], peer, info


def _time_rounds(cells: list[_Cell], repeats: int, calls: int) -> None:
    """Round-robin: every round times every cell `calls` times (mean per call)."""
    from tqdm import tqdm

    for _ in tqdm(range(repeats), desc="rounds", file=sys.stderr, unit="round"):
        for cell in cells:
            cell.rounds.append(sum(cell.call() for _ in range(calls)) / calls)


def _rows(cells: list[_Cell], bytes_per_forward: int | None) -> list[dict[str, Any]]:
    """One row per cell; `over_t1`: its best time over the same engine's best at the smallest T."""
    import numpy as np

    smallest = min(c.tokens for c in cells)
    best1 = {c.engine: min(c.rounds) for c in cells if c.tokens == smallest}
    rows = []
    for c in cells:
        best = min(c.rounds)
        matmul, _, layout = c.engine.partition("/")
        row = {"engine": c.engine, "matmul": matmul, "layout": layout} if layout else {"engine": c.engine}
        rows.append(row | {
            "tokens": c.tokens, "best_ms": best * 1e3, "median_ms": float(np.median(c.rounds)) * 1e3,
            "rounds_ms": [x * 1e3 for x in c.rounds], "over_t1": best / best1[c.engine],
            "effective_gbs": bytes_per_forward / best / 1e9 if bytes_per_forward else None,
        })
    return rows


def _summary(rows: list[dict[str, Any]], peer: list[dict[str, Any]], tokens: Sequence[int]) -> dict[str, Any]:
    """Per T: ours (the package's default path, kernel/out_in, when measured; else the fastest row), llama.cpp,
    and ours / llama.cpp time (< 1: we are faster)."""
    out = {}
    for t in tokens:
        at = [r for r in rows if r["tokens"] == t]
        ours = next((r for r in at if r["engine"] == DEFAULT_ENGINE), None) or min(at, key=lambda r: r["best_ms"])
        lc = next((r for r in peer if r["tokens"] == t), None)
        out[str(t)] = {
            "ours_engine": ours["engine"], "ours_ms": ours["best_ms"], "ours_over_t1": ours["over_t1"],
            "llama_cpp_ms": lc["best_ms"] if lc else None, "llama_cpp_over_t1": lc["over_t1"] if lc else None,
            "ours_time_over_llama_cpp": ours["best_ms"] / lc["best_ms"] if lc else None,
        }
    return out


def _table(rows: list[dict[str, Any]], summary: dict[str, Any], tokens: Sequence[int]) -> str:
    engines = list(dict.fromkeys(r["engine"] for r in rows))
    lines = [f"{'T':>4}" + "".join(f"{e + ' ms':>18}" for e in engines) + f"{'ours/llama.cpp':>16}"]
    for t in tokens:
        by = {r["engine"]: r for r in rows if r["tokens"] == t}
        cells = "".join(f"{by[e]['best_ms']:>10.2f} ({by[e]['over_t1']:.2f}x)" for e in engines)
        ratio = summary[str(t)]["ours_time_over_llama_cpp"]
        lines.append(f"{t:>4}{cells}" + (f"{ratio:>16.2f}" if ratio is not None else f"{'-':>16}"))
    return "\n".join(lines)


def run(opts: ForwardBenchOptions | argparse.Namespace) -> dict[str, Any]:
    """Time the cells round-robin, write the JSON (`opts.out`, else a temp file) and print the table."""
    if isinstance(opts, argparse.Namespace):
        opts = options_from_args(opts)
    from dovetail_jax import devices
    from dovetail_jax.io.load import load_model_files
    from dovetail_jax.io.registry import default_model_path
    from dovetail_jax.machine import load_average, machine_info
    from dovetail_jax.model.params import params_from_tensors, weight_bytes
    from dovetail_jax.plan import pow2_at_least

    dev = devices.placement().target
    model_path = Path(opts.model) if opts.model is not None else default_model_path()
    cfg, tensors, _ = load_model_files(opts.model, tokenizer=opts.tokenizer)
    if opts.context + max(opts.tokens) > cfg.max_position_embeddings:
        raise ConfigError(f"context {opts.context} + {max(opts.tokens)} tokens exceeds the model's "
                          f"{cfg.max_position_embeddings}")
    slots = pow2_at_least(opts.context + max(opts.tokens))
    params = {lay: params_from_tensors(cfg, tensors, dev, layout=lay) for lay in opts.layouts}
    del tensors
    bytes_per_forward = weight_bytes(next(iter(params.values()))) + cfg.kv_bytes_per_token() * slots
    cells = _our_cells(opts, cfg, params, dev, slots)
    llama, peer, llama_info = _llama_cells(opts, model_path)
    load_start = load_average()
    try:
        _time_rounds(cells + llama, opts.repeats, opts.calls)
    finally:
        if peer is not None:
            peer.close()
    rows, peer_rows = _rows(cells, bytes_per_forward), _rows(llama, None) if llama else []
    summary = _summary(rows, peer_rows, opts.tokens)
    fastest = {str(t): min((r for r in rows if r["tokens"] == t), key=lambda r: r["best_ms"])["layout"]
               for t in opts.tokens}
    res = {
        "schema": SCHEMA, "command": report.command_line(), "model": cfg.name, "context": opts.context,
        "cache_slots": slots, "logits": "all T positions", "timing": "synchronous calls, best round of the mean",
        "bytes_per_forward": bytes_per_forward, "rows": rows, "fastest_layout_per_tokens": fastest,
        "llama_cpp": llama_info | {"rows": peer_rows}, "summary": summary,
        "machine": {**machine_info(), "load_average_1m": {"start": load_start, "end": load_average()}},
    }
    out = opts.out or Path(tempfile.mkdtemp(prefix="dovetail_bench_forward_")) / "bench_forward.json"
    write_json_atomic(Path(out), res)
    print(_table(rows + peer_rows, summary, opts.tokens) + f"\nwrote {out}")
    return res
