"""`dovetail profile-hw`: measure this machine into a hardware profile (and optionally per-operation timings).

The only simulator module that imports JAX. It measures what the cost model needs, not peak spec numbers:
matmul FLOP/s at decode-like and prefill-like row counts (with weights streamed from DRAM), read bandwidth,
cross-device transfer latency and bandwidth, and the per-jit-call dispatch overhead. With `--ops MODEL` it also
times the project's own target forward (`dovetail_jax.model.target.forward`, random weights at MODEL's shapes)
per token count and context, which `costs.MeasuredCosts` uses instead of the roofline (Vidur's profiled ops).
Timings on a shared machine are noisy: rerun the command rather than trusting one run.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from simulator.errors import ConfigError
from simulator.files import write_json
from simulator.hardware import parse_profile

GEMM_K, GEMM_N = 2048, 8192  # 64 MiB f32 weight: larger than the L3 of the machines we target, so it streams
ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 512)


def _jax() -> Any:
    import jax

    from dovetail_jax import devices

    devices.setup()  # two host devices (the second stands in for the accelerator) before the backend starts
    return jax


_SIGINT: list[int] = []  # Ctrl-C seen while measuring (see `_deferred_sigint`)


@contextlib.contextmanager
def _deferred_sigint() -> Iterator[None]:
    """Ctrl-C while measuring stops at the next timed call. A KeyboardInterrupt raised straight from the signal can
    land in a Python callback JAX runs for the garbage collector, where it is printed as a traceback and lost (the
    measurement then ran to its end); so the first Ctrl-C only sets a flag that `_check_sigint` turns into
    KeyboardInterrupt, and a second one interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def note(signum: int, frame: Any) -> None:
        if _SIGINT:
            raise KeyboardInterrupt
        _SIGINT.append(signum)

    _SIGINT.clear()
    old = signal.signal(signal.SIGINT, note)
    try:
        yield
        _check_sigint()
    finally:
        signal.signal(signal.SIGINT, old)
        _SIGINT.clear()


def _check_sigint() -> None:
    if _SIGINT:
        raise KeyboardInterrupt


def _median_time(fn: Callable[[], Any], reps: int, warm: int = 2) -> float:
    for _ in range(warm):
        _check_sigint()
        fn()
    ts = []
    for _ in range(reps):
        _check_sigint()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def measure_gemm(jax: Any, dev: Any, reps: int) -> dict[int, float]:
    """Seconds of one `[n, K] @ [K, N]` f32 matmul (dispatch included) for n in ROWS."""
    import jax.numpy as jnp

    w = jax.device_put(jnp.ones((GEMM_K, GEMM_N), jnp.float32) * 0.01, dev)
    f = jax.jit(lambda x, w: x @ w)
    out = {}
    for n in ROWS:
        x = jax.device_put(jnp.ones((n, GEMM_K), jnp.float32), dev)
        out[n] = _median_time(lambda x=x: f(x, w).block_until_ready(), reps)
    return out


def measure_read_bw(jax: Any, dev: Any, reps: int, mib: int = 512) -> float:
    """Streaming read bandwidth in B/s on `dev`, measured as `dovetail bench target` does (`dovetail_jax.machine`)."""
    from dovetail_jax import machine

    return machine.memory_read_bandwidth_gbs(mib, reps, dev) * 1e9


def measure_dispatch(jax: Any, dev: Any, reps: int) -> float:
    import jax.numpy as jnp

    x = jax.device_put(jnp.ones((8,), jnp.float32), dev)
    f = jax.jit(lambda x: x + 1)
    return _median_time(lambda: f(x).block_until_ready(), reps * 10, warm=10)


def measure_transfer(jax: Any, src: Any, dst: Any, reps: int) -> tuple[float, float]:
    """(latency s, bandwidth B/s) of `device_put` src -> dst, from an 8-float and a 4 MiB copy."""
    import jax.numpy as jnp

    small = jax.device_put(jnp.ones((8,), jnp.float32), src)
    big = jax.device_put(jnp.ones((2 ** 20,), jnp.float32), src)
    t_small = _median_time(lambda: jax.device_put(small, dst).block_until_ready(), reps * 10, warm=5)
    t_big = _median_time(lambda: jax.device_put(big, dst).block_until_ready(), reps * 4, warm=3)
    bw = big.nbytes / max(t_big - t_small, 1e-7)
    return t_small, bw


def fit_device(gemm: dict[int, float], read_bw: float, dispatch: float) -> dict[str, float]:
    """Roofline parameters that reproduce the measured GEMM curve: peak FLOP/s, bandwidth, n_half."""
    flops = {n: 2 * n * GEMM_K * GEMM_N for n in gemm}
    nbytes = {n: 4 * (GEMM_K * GEMM_N + n * (GEMM_K + GEMM_N)) for n in gemm}
    peak = max(flops[n] / max(t - dispatch, 1e-9) for n, t in gemm.items())
    bw = max(read_bw, max(nbytes[n] / max(gemm[n] - dispatch, 1e-9) for n in gemm if n <= 2))

    def err(nh: float) -> float:
        e = 0.0
        for n, t in gemm.items():
            pred = dispatch + max(nbytes[n] / bw, flops[n] / (peak * n / (n + nh)))
            e += math.log(pred / t) ** 2
        return e

    n_half = min((2 ** (i / 4) for i in range(-8, 41)), key=err)
    return {"peak_flops": peak, "mem_bw": bw, "n_half": n_half}


def measure_profile(reps: int = 7) -> dict[str, Any]:
    """Measure this machine; returns profile JSON (numbers with their source) ready for `parse_profile`."""
    jax = _jax()
    cpu_devs = jax.devices("cpu")
    cpu = cpu_devs[0]
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    acc = gpus[0] if gpus else (cpu_devs[1] if len(cpu_devs) > 1 else cpu)
    host = platform.node() or "this machine"
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    src = f"measured by dovetail profile-hw on {host} at {stamp}"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    c_gemm = measure_gemm(jax, cpu, reps)
    c_bw = measure_read_bw(jax, cpu, reps)
    c_disp = measure_dispatch(jax, cpu, reps)
    c_fit = fit_device(c_gemm, c_bw, c_disp)
    lat, link_bw = measure_transfer(jax, cpu, acc, reps) if acc is not cpu else (1e-6, 1e12)

    def v(x: Any, what: str) -> dict[str, Any]:
        return {"value": x, "source": f"{src}: {what}"}

    gemm_note = f"fit to [n,{GEMM_K}]x[{GEMM_K},{GEMM_N}] f32 matmuls, n in {list(ROWS)}"
    cpu_sec = {"name": v(platform.processor() or platform.machine(), "platform"),
               "cores": v(os.cpu_count() or 1, "os.cpu_count()"),
               "peak_flops": v(c_fit["peak_flops"], gemm_note), "mem_bw": v(c_fit["mem_bw"], "jnp.sum / GEMV"),
               "flops_eff": v(1.0, "peak_flops is already the achieved rate"),
               "bw_eff": v(1.0, "mem_bw is already the achieved rate"), "n_half": v(c_fit["n_half"], gemm_note),
               "dispatch_s": v(c_disp, "median jit call on 8 floats"), "ram_bytes": v(ram, "sysconf")}
    if gpus:
        g_gemm = measure_gemm(jax, acc, reps)
        g_fit = fit_device(g_gemm, measure_read_bw(jax, acc, reps), measure_dispatch(jax, acc, reps))
        vram = getattr(acc, "memory_stats", lambda: {})() or {}
        gpu_sec = {"name": v(str(acc.device_kind), "jax device"), "peak_flops": v(g_fit["peak_flops"], gemm_note),
                   "mem_bw": v(g_fit["mem_bw"], "jnp.sum / GEMV"), "vram_bytes": v(vram.get("bytes_limit", 8e9),
                                                                                     "memory_stats bytes_limit"),
                   "flops_eff": v(1.0, "achieved"), "bw_eff": v(1.0, "achieved"),
                   "n_half": v(g_fit["n_half"], gemm_note),
                   "launch_s": v(measure_dispatch(jax, acc, reps), "median jit call"),
                   "reserved_bytes": v(0, "memory_stats limit excludes the context"), "shares_cpu": v(False, "GPU")}
    else:
        gpu_sec = {k: val for k, val in cpu_sec.items() if k in ("peak_flops", "mem_bw", "flops_eff", "bw_eff",
                                                                  "n_half")}
        gpu_sec |= {"name": v(str(acc), "second XLA host device (no GPU)"), "vram_bytes": v(ram, "host RAM"),
                    "launch_s": v(measure_dispatch(jax, acc, reps), "median jit call on the draft device"),
                    "reserved_bytes": v(0, "shared host memory"),
                    "shares_cpu": v(True, "the draft device is a host device on the same cores")}
    link = {"gen": v(3, "placeholder (no PCIe between host devices)") if not gpus else v(3, "assumed; edit"),
            "lanes": v(16, "placeholder") if not gpus else v(16, "assumed; edit"),
            "efficiency": v(1.0, "bandwidth below is measured"),
            "latency_s": v(lat, "median device_put of 8 floats"),
            "bandwidth": v(link_bw, "4 MiB device_put, latency removed")}
    raw = {"name": f"measured-{host}", "description": f"{src}; XLA {jax.__version__}", "cpu": cpu_sec,
           "gpu": gpu_sec, "link": link,
           "raw": {"cpu_gemm_s": {str(k): t for k, t in c_gemm.items()}, "cpu_read_bw": c_bw}}
    parse_profile(raw, "measured")  # never write a profile the simulator would refuse
    return raw


# ---------------------------------------------------------------------------------------------------------------
# per-operation timings of the project's own code


def measure_ops(model: str, draft_layers: int, top_k: int, reps: int = 5,
                ns: tuple[int, ...] = (1, 2, 4, 8, 16, 32), ctxs: tuple[int, ...] = (128, 512)) -> dict[str, Any]:
    """Time `dovetail_jax.model.target.forward` (random weights, MODEL's shapes) per (n tokens, context).

    `ctx` in the rows is the attention span: our forward attends over the whole preallocated cache (masked),
    so the cache is sized to exactly `ctx` slots (half of them filled) and the simulator is given the same
    span (`Workload.kv_slots`) when it predicts our runs.

    The draft pass is timed as the same forward with `draft_layers` layers and no LM head on the draft
    device; the draft head as an `[n, H] x [V, H]` product there. DGF's fusion matmuls are not in these
    timings (a few H x H products); the roofline covers what is missing.
    """
    jax = _jax()
    import jax.numpy as jnp
    import numpy as np

    from dovetail_jax import devices
    from dovetail_jax.model.cache import init_cache
    from dovetail_jax.model.params import expected_shapes, params_from_tensors
    from dovetail_jax.model.target import forward, lm_head
    from simulator.workload import resolve_model

    cfg = resolve_model(model)
    rng = np.random.default_rng(0)

    def params_for(c: Any, dev: Any) -> Any:
        t = {k: (rng.standard_normal(s, dtype=np.float32) * 0.02) for k, s in expected_shapes(c).items()}
        return params_from_tensors(c, t, dev, "synthetic")

    def time_forward(c: Any, params: Any, dev: Any, n: int, ctx: int, mode: str) -> float:
        slots = ctx
        # the forward only reads the cache (the decoding loop writes the new K/V in a separate small call),
        # so every call sees the same context
        f = jax.jit(lambda p, toks, pos, mask, cache: forward(p, c, toks, pos, mask, cache, mode))
        cache = init_cache(c, slots, device=dev).replace(length=jax.device_put(jnp.int32(ctx // 2), dev))
        toks = jax.device_put(jnp.zeros((1, n), jnp.int32), dev)
        pos = jax.device_put(ctx // 2 + jnp.arange(n, dtype=jnp.int32)[None, :], dev)
        mask = jax.device_put(jnp.tril(jnp.ones((n, n), bool)), dev)

        def call() -> None:
            _, hidden, _ = f(params, toks, pos, mask, cache)
            jax.block_until_ready(hidden)

        return _median_time(call, reps)

    tdev, ddev = devices.target_device(), devices.accelerator_device()
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows: dict[str, list[dict[str, float]]] = {"target_forward": [], "draft_pass": [], "draft_head": []}
    tparams = params_for(cfg, tdev)
    for ctx in ctxs:
        for n in ns:
            rows["target_forward"].append({"n": n, "ctx": ctx, "s": time_forward(cfg, tparams, tdev, n, ctx, "all")})
    del tparams
    dcfg = cfg.replace(num_layers=draft_layers)
    dparams = params_for(dcfg, ddev)
    for ctx in ctxs:
        for n in sorted({1, 2, 4, top_k}):
            rows["draft_pass"].append({"n": n, "ctx": ctx, "s": time_forward(dcfg, dparams, ddev, n, ctx, "none")})
    head = dparams.head
    fh = jax.jit(lambda h, w: jax.lax.top_k(lm_head(h, w), top_k))
    for n in sorted({1, top_k}):
        h = jax.device_put(jnp.ones((n, cfg.hidden_size), jnp.float32), ddev)
        rows["draft_head"].append({"n": n, "s": _median_time(lambda h=h: jax.block_until_ready(fh(h, head)), reps)})
    lat, bw = measure_transfer(jax, tdev, ddev, reps) if ddev != tdev else (1e-6, 1e12)
    rows["transfer"] = [{"bytes": 32, "s": lat}, {"bytes": 4 * 2 ** 20, "s": lat + 4 * 2 ** 20 / bw}]
    return {"kind": "dovetail-op-timings", "model": cfg.name, "draft_layers": draft_layers,
            "source": f"measured by dovetail profile-hw --ops at {stamp}, f32, random weights", "ops": rows}


@dataclass(frozen=True)
class ProfileOptions:
    """What `dovetail profile-hw` measures and where it writes."""

    out: Path = Path("hw_profile.json")
    quick: bool = False  # fewer repetitions (noisier)
    ops: str | None = None  # also time target/draft ops at this model's shapes (synthetic weights)
    ops_out: Path = Path("op_timings.json")
    draft_layers: int = 1
    top_k: int = 10


def run(opts: ProfileOptions) -> int:
    """Measure this machine into a profile JSON (and per-operation timings with `opts.ops`); prints a summary."""
    reps = 3 if opts.quick else 7
    print(f"measuring this machine ({'--quick, ' if opts.quick else ''}about {'10 s' if opts.quick else 'a minute'}; "
          f"{opts.out} is written only when complete) ...", file=sys.stderr, flush=True)
    try:
        with _deferred_sigint():
            prof = measure_profile(reps)
    except ConfigError:
        raise
    except Exception as e:  # a JAX runtime problem is the user's environment, not a simulator bug
        raise ConfigError(f"profile-hw could not measure this machine: {e}") from None
    write_json(opts.out, prof)  # whole or not at all
    c = prof["cpu"]
    print(f"wrote {opts.out}: CPU {c['peak_flops']['value'] / 1e9:.0f} GFLOP/s, {c['mem_bw']['value'] / 1e9:.1f} GB/s, "
          f"n_half {c['n_half']['value']:.2f}, dispatch {c['dispatch_s']['value'] * 1e6:.0f} us; link "
          f"{prof['link']['latency_s']['value'] * 1e6:.0f} us + {prof['link']['bandwidth']['value'] / 1e9:.1f} GB/s")
    if opts.ops:
        with _deferred_sigint():
            ops = measure_ops(opts.ops, opts.draft_layers, opts.top_k, reps=3 if opts.quick else 5)
        write_json(opts.ops_out, ops)
        tf = ops["ops"]["target_forward"]
        print(f"wrote {opts.ops_out}: target forward n=1 {tf[0]['s'] * 1e3:.1f} ms, n={tf[-1]['n']} "
              f"{tf[-1]['s'] * 1e3:.1f} ms (ctx {tf[-1]['ctx']})")
    return 0
