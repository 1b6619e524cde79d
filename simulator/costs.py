"""Per-operation cost predictors: a roofline from shapes and the hardware profile, or measured timings.

Following Vidur, predictors are kept apart from the event engine: the engine only sees durations, so a profiled
table (`MeasuredCosts`) can replace the roofline op by op, falling back to it for ops that were not measured.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from simulator.engines import resolve_engine
from simulator.errors import ConfigError
from simulator.hardware import CpuSpec, GpuSpec, HardwareProfile
from simulator.workload import ID_BYTES, Workload, dtype_bytes


class CostModel(Protocol):
    """Seconds per operation; `n` = tokens (rows) processed, `ctx` = keys already in the KV cache."""

    def target_cpu(self, n: int, ctx: int, layers: int | None = None, head: bool = True) -> float: ...
    def target_gpu(self, n: int, ctx: int, layers: int, head: bool = False) -> float: ...
    def draft_pass(self, n: int, ctx: int) -> float: ...
    def draft_head(self, n: int) -> float: ...
    def accept(self, t: int, a: int) -> float: ...
    def host_tree(self) -> float: ...
    def h2d(self, nbytes: float) -> float: ...
    def d2h(self, nbytes: float) -> float: ...


def roofline_seconds(dev: CpuSpec | GpuSpec, nbytes: float, flops: float, n: int, calls: int = 1) -> float:
    """max(bytes / achieved BW, FLOPs / achieved FLOP/s at n rows) + per-call overhead.

    Achieved FLOP/s saturates with the number of rows n as n / (n + n_half): small-M GEMMs do not reach peak,
    which is why verifying a few tokens costs more than the weight-read time alone.
    """
    rate = dev.flops * n / (n + dev.n_half)
    return calls * dev.overhead_s + max(nbytes / dev.bw, flops / rate)


class RooflineCosts:
    """Bytes and FLOPs from the model's shapes and dtypes against the profile's bandwidth and FLOP/s."""

    def __init__(self, hw: HardwareProfile, wl: Workload) -> None:
        self.hw, self.wl = hw, wl
        m = wl.model
        self._tb, self._db = wl.target_bytes_per_weight(), dtype_bytes(wl.draft_dtype)
        self._h, self._lp, self._kv, self._q = m.hidden_size, m.layer_params, m.kv_size, m.q_size
        self.engine = resolve_engine(wl.cpu_engine, hw.cpu_engines or None)  # fitted against this profile
        self.fw = wl.framework
        # a GPU framework's counted host calls replace the profile's coarse per-layer dispatch (never both)
        self._layer_s = 0.0 if self.fw is not None else hw.gpu.layer_s

    def _overlap(self, roof: float, calls: float) -> float:
        """An eager framework's host dispatch runs ahead of the GPU (asynchronous launches) until the phase's host
        sync: the slower of the two is the phase's time. No framework: the roofline alone."""
        return roof if self.fw is None else max(roof, self.fw.dispatch_s(calls))

    def _scores_bytes(self, n: int, ctx: int, layers: int) -> float:
        """Attention-score traffic of an unfused (eager) attention: heads x n x (ctx + n) scores per layer, each
        written and re-read by matmul, scale, mask add, softmax and cast (`attn_score_bytes`); 0 when fused."""
        fw = self.fw
        if fw is None or not fw.attn_score_bytes:
            return 0.0
        return layers * self.wl.model.num_heads * n * (ctx + n) * fw.attn_score_bytes

    def _layers(self, dev: CpuSpec | GpuSpec, wbytes: float, kvbytes: float, n: int, ctx: int, layers: int,
                head_rows: int, vocab: int, calls: int, extra_bytes: float = 0.0) -> float:
        """`layers` decoder layers over n tokens attending to ctx + n keys, plus an LM head over head_rows."""
        h = self._h
        nbytes = extra_bytes + layers * (self._lp * wbytes + 2 * self._kv * (ctx + n) * kvbytes)
        flops = layers * (2 * n * self._lp + 4 * n * (ctx + n) * self._q)
        if head_rows:
            nbytes += vocab * h * wbytes
            flops += 2 * head_rows * vocab * h
        return roofline_seconds(dev, nbytes, flops, max(n, head_rows), calls)

    def target_cpu(self, n: int, ctx: int, layers: int | None = None, head: bool = True) -> float:
        nl = self.wl.model.num_layers if layers is None else layers
        if self.engine is not None:
            return self._engine_forward(n, ctx, nl, head)
        return self._layers(self.hw.cpu, self._tb, 4, n, ctx, nl, n if head else 0, self.wl.model.vocab_size, 1)

    def _engine_forward(self, n: int, ctx: int, layers: int, head: bool) -> float:
        """A target forward as the chosen CPU engine runs it (see `simulator.engines`)."""
        eng, cpu = self.engine, self.hw.cpu
        assert eng is not None
        path = eng.path(self.wl.target_dtype)
        h, v = self._h, self.wl.model.vocab_size
        wbytes = layers * self._lp * path.bytes_per_weight + (v * h * path.bytes_per_weight if head else 0.0)
        kvbytes = layers * 2 * self._kv * (ctx + n) * eng.kv_bytes
        macs = layers * (n * self._lp + 2 * n * (ctx + n) * self._q) + (n * v * h if head else 0)
        # KV in the engine's own format, weights via their path; no engine streams faster than the DRAM peak
        bw = min(cpu.mem_bw * cpu.bw_eff * eng.stream_frac, cpu.mem_bw)
        rate = cpu.peak_flops * eng.gemm_frac * n / (n + eng.n_half)
        return eng.call_s + layers * eng.layer_s + max(wbytes / (bw * path.stream_scale) + kvbytes / bw,
                                                       2 * macs * path.mac_cost / rate)

    def target_gpu(self, n: int, ctx: int, layers: int, head: bool = False) -> float:
        """Target layers on the GPU (with head: a whole decode step). A GPU framework's host calls overlap the
        roofline (`_overlap`); without one, a profile's `gpu.layer_s` adds a fixed dispatch per layer.

        A decode step (head) is the workload's `decode_loop` when it names one: the code of a plain baseline (HF
        generate's own SDPA layers, Sequoia's), whose calls and attention traffic differ from EAGLE's model."""
        fw = self.fw
        loop = None if fw is None else fw.loop(self.wl.decode_loop if head else None)
        scores = 0.0 if loop is None else layers * self.wl.model.num_heads * n * (ctx + n) * loop.attn_score_bytes
        roof = self._layers(self.hw.gpu, self._db, self._db, n, ctx, layers, n if head else 0,
                            self.wl.model.vocab_size, 1, scores)
        calls = 0.0 if loop is None else layers * loop.calls_per_layer + (loop.calls_per_step if head else 0.0)
        return self._overlap(roof, calls) + layers * self._layer_s

    def target_gpu_tree(self, t: int, ctx: int) -> float:
        """The whole target on the GPU verifying a t-token tree (EAGLE on one GPU): all layers and the head over t
        rows attending to ctx + t keys; the framework's host calls include the tree's own (tree mask, posterior,
        KV compaction). For 7B-13B fp16 and t <= 64 this stays weight-bound on a data-centre GPU (2 t FLOPs per
        2-byte weight = t FLOP/B, under the A100's ridge of ~150) and near the ridge on GeForce cards; an eager
        attention adds its score traffic (`_scores_bytes`: ~4% of the weights at t = 60, ctx 256, 13% at ctx 1000)."""
        m = self.wl.model
        nl = m.num_layers
        roof = self._layers(self.hw.gpu, self._db, self._db, t, ctx, nl, t, m.vocab_size, 1,
                            self._scores_bytes(t, ctx, nl))
        fw = self.fw
        calls = 0.0 if fw is None else nl * fw.calls_per_layer + fw.calls_per_tree_verify
        return self._overlap(roof, calls) + nl * self._layer_s

    def draft_pass(self, n: int, ctx: int) -> float:
        """Fusion (DGF or EAGLE fc) + the draft's decoder layers over n tokens; one launch per pass."""
        g, db = self.hw.gpu, self._db
        nl = self.wl.draft_layers
        nbytes = (self.wl.fusion_params * db + nl * (self._lp * db + 2 * self._kv * (ctx + n) * db)
                  + self._scores_bytes(n, ctx, nl))
        flops = 2 * n * self.wl.fusion_params + nl * (2 * n * self._lp + 4 * n * (ctx + n) * self._q)
        fw = self.fw
        calls = 0.0 if fw is None else fw.draft_calls_per_pass + (nl - 1) * fw.calls_per_layer
        return self._overlap(roofline_seconds(g, nbytes, flops, n), calls) + nl * self._layer_s

    def draft_head(self, n: int) -> float:
        """Draft LM head over n rows (reduced vocabulary V') + log-softmax / top-k and the level's tree
        bookkeeping, one launch (graph) or the framework's calls per level (eager)."""
        v = self.wl.draft_vocab
        nbytes = v * self._h * self._db + n * v * 4
        calls = 0.0 if self.fw is None else self.fw.draft_calls_per_level
        return self._overlap(roofline_seconds(self.hw.gpu, nbytes, 2 * n * v * self._h, n), calls)

    def draft_tree_host(self, kind: str) -> float:
        """Host-only work of the draft framework per tree: setup before the levels and the tree's assembly
        (EAGLE-2's dynamic tree loops over its tokens on the host; EAGLE-1's static tree does not). 0 without a
        framework."""
        fw = self.fw
        if fw is None:
            return 0.0
        return fw.dispatch_s(fw.draft_calls_per_cycle) + fw.tree_assembly_s(kind, self.wl.tree.total_tokens)

    def accept(self, t: int, a: int) -> float:
        """CPU: argmax over T x V logits and the KV compaction of a+1 rows (read + write), one call."""
        m = self.wl.model
        nbytes = t * m.vocab_size * 4 + 2 * 2 * m.num_layers * self._kv * (a + 1) * 4
        return roofline_seconds(self.hw.cpu, nbytes, t * m.vocab_size, t)

    def host_tree(self) -> float:
        """Host-side tree bookkeeping: frontier/rerank/mask build as ~depth+2 small host ops."""
        return (self.wl.tree.depth + 2) * self.hw.cpu.dispatch_s

    def h2d(self, nbytes: float) -> float:
        return self.hw.link.seconds(nbytes)

    def d2h(self, nbytes: float) -> float:
        return self.hw.link.seconds(nbytes)


# ---------------------------------------------------------------------------------------------------------------
# Measured per-operation timings (Vidur-style profiled operators)

_OPS = {"target_forward": ("n", "ctx"), "draft_pass": ("n", "ctx"), "draft_head": ("n",), "accept": ("n",),
        "host_tree": (), "transfer": ("bytes",)}


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear in x, extrapolating linearly from the two end points (never below 0)."""
    if len(xs) == 1:
        return ys[0]
    i = 1
    while i < len(xs) - 1 and x > xs[i]:
        i += 1
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


class _Table:
    """Rows keyed by up to two coordinates: piecewise-linear in the first, linear between groups of the second."""

    def __init__(self, op: str, rows: Iterable[dict[str, Any]]) -> None:
        keys = _OPS[op]
        groups: dict[float, dict[float, list[float]]] = {}
        for r in rows:
            s = r.get("s")
            if not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
                raise ConfigError(f"measured timing for {op}: 's' must be a positive number, got {s!r}")
            coords = []
            for k in keys:
                v = r.get(k)
                if not isinstance(v, (int, float)) or v < 0:
                    raise ConfigError(f"measured timing for {op}: '{k}' must be a number >= 0, got {v!r}")
                coords.append(float(v))
            x = coords[0] if coords else 0.0
            g = coords[1] if len(coords) > 1 else 0.0
            groups.setdefault(g, {}).setdefault(x, []).append(float(s))
        if not groups:
            raise ConfigError(f"measured timing table for {op} is empty")
        self.gkeys = sorted(groups)
        self.curves = []
        for g in self.gkeys:
            xs = sorted(groups[g])
            self.curves.append((xs, [sorted(groups[g][x])[len(groups[g][x]) // 2] for x in xs]))

    def __call__(self, x: float = 0.0, g: float = 0.0) -> float:
        vals = [_interp(xs, ys, x) for xs, ys in self.curves]
        return _interp(self.gkeys, vals, g)


class MeasuredCosts:
    """Ops present in a measured table use it (interpolated); the rest fall back to the roofline.

    Table JSON: `{"ops": {"target_forward": [{"n": 1, "ctx": 128, "s": 0.021}, ...], "draft_pass": [...],
    "draft_head": [{"n", "s"}], "accept": [{"n", "s"}], "host_tree": [{"s"}], "transfer": [{"bytes", "s"}]}}`.
    A target_forward row is the whole target (all layers + LM head over n rows) on the CPU.
    """

    def __init__(self, table: dict[str, Any], fallback: CostModel, num_layers: int) -> None:
        ops = table.get("ops") if isinstance(table, dict) else None
        if not isinstance(ops, dict):
            raise ConfigError("measured timing table needs an 'ops' object")
        unknown = set(ops) - set(_OPS)
        if unknown:
            raise ConfigError(f"measured timing table has unknown ops {sorted(unknown)}; known: {sorted(_OPS)}")
        self.tables = {op: _Table(op, rows) for op, rows in ops.items() if rows}
        self.fallback, self.num_layers = fallback, num_layers

    @classmethod
    def from_file(cls, path: str | Path, fallback: CostModel, num_layers: int) -> MeasuredCosts:
        try:
            table = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read measured timings {str(path)!r}: {e}") from None
        return cls(table, fallback, num_layers)

    def target_cpu(self, n: int, ctx: int, layers: int | None = None, head: bool = True) -> float:
        t = self.tables.get("target_forward")
        if t is None:
            return self.fallback.target_cpu(n, ctx, layers, head)
        full = t(n, ctx)
        if (layers is None or layers == self.num_layers) and head:
            return full
        # a layer subset or no head: scale the measured whole-model time by the roofline's share
        fb = self.fallback
        return full * fb.target_cpu(n, ctx, layers, head) / fb.target_cpu(n, ctx, None, True)

    def target_gpu(self, n: int, ctx: int, layers: int, head: bool = False) -> float:
        return self.fallback.target_gpu(n, ctx, layers, head)

    def draft_pass(self, n: int, ctx: int) -> float:
        t = self.tables.get("draft_pass")
        return t(n, ctx) if t else self.fallback.draft_pass(n, ctx)

    def draft_head(self, n: int) -> float:
        t = self.tables.get("draft_head")
        return t(n) if t else self.fallback.draft_head(n)

    def accept(self, t: int, a: int) -> float:
        tb = self.tables.get("accept")
        return tb(t) if tb else self.fallback.accept(t, a)

    def host_tree(self) -> float:
        t = self.tables.get("host_tree")
        return t() if t else self.fallback.host_tree()

    def h2d(self, nbytes: float) -> float:
        t = self.tables.get("transfer")
        return t(nbytes) if t else self.fallback.h2d(nbytes)

    def d2h(self, nbytes: float) -> float:
        t = self.tables.get("transfer")
        return t(nbytes) if t else self.fallback.d2h(nbytes)


class ScaledCosts:
    """A base predictor times calibration factors fitted on measured runs (the 'fitted overheads').

    `target` holds (n, factor) points: the factor for a target forward over n tokens is interpolated in log2(n),
    constant outside the calibrated range, because verification efficiency changes with the token count.
    """

    def __init__(self, base: CostModel, target: Sequence[tuple[int, float]] = (), draft: float = 1.0,
                 host: float = 1.0, transfer: float = 1.0, accept: float = 1.0) -> None:
        for name, f in [("draft", draft), ("host", host), ("transfer", transfer), ("accept", accept)] + [
                (f"target n={n}", x) for n, x in target]:
            if not (math.isfinite(f) and f > 0):
                raise ConfigError(f"calibration factor {name} must be positive and finite, got {f!r}")
        pts = sorted(target)
        self.base, self._xs = base, [math.log2(n) for n, _ in pts]
        self._ys = [f for _, f in pts]
        self.draft, self.host, self.transfer, self.acc = draft, host, transfer, accept

    def target_factor(self, n: int) -> float:
        if not self._xs:
            return 1.0
        x = math.log2(max(n, 1))
        if x <= self._xs[0]:
            return self._ys[0]
        if x >= self._xs[-1]:
            return self._ys[-1]
        return _interp(self._xs, self._ys, x)

    def target_cpu(self, n: int, ctx: int, layers: int | None = None, head: bool = True) -> float:
        return self.base.target_cpu(n, ctx, layers, head) * self.target_factor(n)

    def target_gpu(self, n: int, ctx: int, layers: int, head: bool = False) -> float:
        return self.base.target_gpu(n, ctx, layers, head)

    def draft_pass(self, n: int, ctx: int) -> float:
        return self.base.draft_pass(n, ctx) * self.draft

    def draft_head(self, n: int) -> float:
        return self.base.draft_head(n) * self.draft

    def accept(self, t: int, a: int) -> float:
        return self.base.accept(t, a) * self.acc

    def host_tree(self) -> float:
        return self.base.host_tree() * self.host

    def h2d(self, nbytes: float) -> float:
        return self.base.h2d(nbytes) * self.transfer

    def d2h(self, nbytes: float) -> float:
        return self.base.d2h(nbytes) * self.transfer


def feature_bytes(wl: Workload, rows: int) -> float:
    """Accepted target features (fp32; k of them per row for a draft with k feature layers) + their ids sent to
    the draft."""
    k = max(1, len(wl.draft.feature_layers))
    return rows * k * wl.model.hidden_size * 4 + (rows + 1) * ID_BYTES


def tree_bytes(wl: Workload) -> float:
    """Tree tokens + parent indices sent back to the CPU."""
    return 2 * wl.tree.total_tokens * ID_BYTES
