"""The schedules the simulator compares, each a process on the event engine over CPU, GPU and link resources.

Costs are precomputed per configuration (per context bin and per accepted length) and acceptance outcomes are
pre-sampled with numpy, so the event loop only looks numbers up: that is what makes 100k+ cycles/s possible in
pure Python. On a machine whose "GPU" shares the CPU's cores (`gpu.shares_cpu`), both names map to one resource,
so draft work adds to verification time exactly as measured there.

`SCHEDULES` is the registry: each schedule registers its runner under its name (in the order the CLI lists and
`compare` runs them). Importing this module loads neither numpy nor JAX, so the CLI can list the names cheaply.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from dovetail_jax.config import TREE_PRESETS, DraftConfig, TreeConfig
from simulator.costs import CostModel, MeasuredCosts, RooflineCosts, feature_bytes, tree_bytes
from simulator.engine import Engine, Process, Resource
from simulator.errors import ConfigError, DoesNotFitError
from simulator.hardware import HardwareProfile
from simulator.workload import ID_BYTES, MAX_GUESSES, Workload, dtype_bytes

if TYPE_CHECKING:  # numpy and the acceptance models load when a schedule runs, not when the CLI lists names
    from simulator.acceptance import AcceptanceModel

GiB = 2 ** 30


@dataclass(frozen=True)
class SimOptions:
    cycles: int = 2000  # verification cycles simulated (speculative schedules)
    seed: int = 0
    ngl: int = -1  # target layers on the GPU: partial (-1 = as many as fit), dovetail (-1 = none)
    spec_trees: int = 0  # pipelined: speculative next trees per cycle (0 = as many as fit in a verification)
    prefetch: bool = True  # offload: stream the next layer while computing the current one
    ctx_bins: int = 8

    def __post_init__(self) -> None:
        if self.cycles < 1:
            raise ConfigError(f"cycles must be >= 1, got {self.cycles}")
        if self.spec_trees < 0 or self.spec_trees > MAX_GUESSES:
            raise ConfigError(f"spec_trees must be in 0..{MAX_GUESSES}, got {self.spec_trees}")
        if self.ctx_bins < 1:
            raise ConfigError(f"ctx_bins must be >= 1, got {self.ctx_bins}")


@dataclass
class Prediction:
    schedule: str
    tokens_per_s: float
    tokens: int
    cycles: int
    sim_time_s: float
    tau: float  # simulated tokens per cycle (1 for autoregressive schedules)
    tau_model: float  # the acceptance model's expectation
    split_s_per_token: dict[str, float]
    utilisation: dict[str, float]
    vram_bytes: float
    host_bytes: float
    prefill_s: float
    events: int
    config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    speedup: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


Runner = Callable[[HardwareProfile, Workload, "AcceptanceModel | None", CostModel, SimOptions], Prediction]


@dataclass(frozen=True)
class Schedule:
    """One way to run the model on (CPU, GPU, link): its name, its runner, and what it needs."""

    name: str
    run: Runner
    speculative: bool = False  # drafts a tree, so it needs an acceptance model
    draft: DraftConfig | None = None  # a draft of its own that replaces the workload's (EAGLE-2's head) ...
    tree: TreeConfig | None = None  # ... and the tree it drafts


class ScheduleRegistry(Mapping[str, Schedule]):
    """The schedules by name, in registration order (the order the CLI lists and `compare` runs them)."""

    def __init__(self) -> None:
        self._by_name: dict[str, Schedule] = {}

    def add(self, schedule: Schedule) -> None:
        if schedule.name in self._by_name:
            raise ValueError(f"schedule {schedule.name!r} is registered twice")  # a bug, not a user's input
        self._by_name[schedule.name] = schedule

    def register(self, name: str, **kw: Any) -> Callable[[Runner], Runner]:
        """Decorator: the function is the runner of schedule `name` (`kw`: the other `Schedule` fields)."""

        def add(run: Runner) -> Runner:
            self.add(Schedule(name, run, **kw))
            return run

        return add

    def resolve(self, name: str) -> Schedule:
        """The schedule called `name`, or a ConfigError that lists the choices."""
        if name not in self._by_name:
            raise ConfigError(f"unknown schedule {name!r}; choose from {', '.join(self._by_name)}")
        return self._by_name[name]

    def __getitem__(self, name: str) -> Schedule:
        return self._by_name[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)


SCHEDULES = ScheduleRegistry()


# ---------------------------------------------------------------------------------------------------------------
# memory placement


def _check_fit(hw: HardwareProfile, schedule: str, vram: float, host: float) -> None:
    budget = hw.gpu.mem_bytes
    if hw.gpu.shares_cpu:
        if vram + host > hw.cpu.ram_bytes:
            raise DoesNotFitError(f"{schedule}: needs {(vram + host) / GiB:.2f} GiB of host RAM (shared with the "
                                  f"draft device), {hw.cpu.ram_bytes / GiB:.2f} GiB available")
        return
    if vram > budget:
        raise DoesNotFitError(f"{schedule}: needs {vram / GiB:.2f} GiB of VRAM, the budget is {budget / GiB:.2f} GiB "
                              f"({hw.gpu.name})")
    if host > hw.cpu.ram_bytes:
        raise DoesNotFitError(f"{schedule}: needs {host / GiB:.2f} GiB of host RAM, {hw.cpu.ram_bytes / GiB:.2f} GiB "
                              f"available")


def max_gpu_layers(hw: HardwareProfile, wl: Workload, reserved: float = 0.0) -> int:
    """Most target layers (+ embedding) that fit on the GPU next to `reserved` bytes."""
    budget = (hw.cpu.ram_bytes if hw.gpu.shares_cpu else hw.gpu.mem_bytes) - reserved
    n = 0
    for n_try in range(1, wl.model.num_layers + 1):
        if wl.gpu_target_bytes(n_try) > budget:
            break
        n = n_try
    return n


# ---------------------------------------------------------------------------------------------------------------
# the simulation context shared by the schedules


class _Ctx:
    """Resources and context-length bins for one run."""

    def __init__(self, hw: HardwareProfile, wl: Workload, opts: SimOptions) -> None:
        self.eng = Engine()
        self.cpu = self.eng.resource("cpu")
        self.gpu: Resource = self.cpu if hw.gpu.shares_cpu else self.eng.resource("gpu")
        self.link = self.eng.resource("link")
        nb = max(1, min(opts.ctx_bins, wl.new_tokens))
        self.step = wl.new_tokens / nb
        self.nb = nb
        # keys attended per step: the real context, or the whole preallocated cache if the implementation does so
        self.ctxs = [wl.kv_slots or int(wl.prompt_len + (i + 0.5) * self.step) for i in range(nb)]


def _bin_of(ctx: _Ctx, produced: int) -> int:
    b = int(produced / ctx.step)
    return b if b < ctx.nb else ctx.nb - 1


def _finish(name: str, ctx: _Ctx, wl: Workload, tokens: int, cycles: int, tau_model: float, vram: float,
            host: float, prefill: float, config: dict[str, Any], notes: list[str]) -> Prediction:
    t = ctx.eng.now
    if not (t > 0 and math.isfinite(t) and tokens > 0):
        raise ConfigError(f"{name}: the simulation produced no time or no tokens (check the cost inputs)")
    split = {k: v / tokens for k, v in sorted(ctx.eng.split.items()) if v > 0}
    util = ctx.eng.utilisation()
    if ctx.gpu is ctx.cpu:
        notes.append("draft device shares the CPU's cores: 'cpu' utilisation includes draft work")
    return Prediction(name, tokens / t, tokens, cycles, t, tokens / max(cycles, 1), tau_model, split, util, vram,
                      host, prefill, ctx.eng.events, config, notes)


# ---------------------------------------------------------------------------------------------------------------
# autoregressive baselines: one generation of new_tokens tokens (deterministic)


def _autoregressive(name: str, hw: HardwareProfile, wl: Workload, opts: SimOptions,
                    per_token: Callable[[_Ctx, int], list[tuple[Resource, float, str]]], vram: float, host: float,
                    prefill: float, config: dict[str, Any], notes: list[str]) -> Prediction:
    ctx = _Ctx(hw, wl, opts)
    table = [per_token(ctx, c) for c in ctx.ctxs]
    eng = ctx.eng

    def proc() -> Process:
        for i in range(wl.new_tokens):
            for res, dur, cat in table[_bin_of(ctx, i)]:
                yield eng.use(res, dur, cat)

    eng.process(proc())
    eng.run()
    return _finish(name, ctx, wl, wl.new_tokens, wl.new_tokens, 1.0, vram, host, prefill, config, notes)


@SCHEDULES.register("target-cpu")
def target_cpu(hw: HardwareProfile, wl: Workload, acc: AcceptanceModel | None, costs: CostModel, opts: SimOptions
               ) -> Prediction:
    host = wl.host_bytes()
    _check_fit(hw, "target-cpu", 0.0, host)
    return _autoregressive("target-cpu", hw, wl, opts, lambda c, n: [(c.cpu, costs.target_cpu(1, n), "verify")],
                           0.0, host, costs.target_cpu(wl.prompt_len, 0), {}, [])


@SCHEDULES.register("gpu-only")
def gpu_only(hw: HardwareProfile, wl: Workload, acc: AcceptanceModel | None, costs: CostModel, opts: SimOptions
             ) -> Prediction:
    m = wl.model
    vram = wl.gpu_target_bytes(m.num_layers) + (0 if m.tie_word_embeddings else m.vocab_size * m.hidden_size *
                                                 dtype_bytes(wl.draft_dtype))
    _check_fit(hw, "gpu-only", vram, 0.0)

    def tok(c: _Ctx, n: int) -> list[tuple[Resource, float, str]]:
        return [(c.gpu, costs.target_gpu(1, n, m.num_layers, head=True), "gpu_target"),
                (c.link, costs.d2h(ID_BYTES), "transfer")]

    return _autoregressive("gpu-only", hw, wl, opts, tok, vram, 0.0,
                           costs.target_gpu(wl.prompt_len, 0, m.num_layers, head=True), {}, [])


@SCHEDULES.register("offload")
def offload(hw: HardwareProfile, wl: Workload, acc: AcceptanceModel | None, costs: CostModel, opts: SimOptions
            ) -> Prediction:
    """Whole model on the GPU; layers that do not fit are streamed over the link for every token (2 buffers)."""
    m = wl.model
    db = dtype_bytes(wl.draft_dtype)
    layer_b = m.layer_params * db
    kv_all = 2 * m.num_layers * m.kv_size * db * wl.max_ctx
    head_b = (0 if m.tie_word_embeddings else m.vocab_size * m.hidden_size) * db
    fixed = m.vocab_size * m.hidden_size * db + head_b + kv_all + 2 * layer_b
    budget = hw.cpu.ram_bytes if hw.gpu.shares_cpu else hw.gpu.mem_bytes
    if fixed > budget:
        raise DoesNotFitError(f"offload: embedding, head, KV cache and two layer buffers need {fixed / GiB:.2f} GiB, "
                              f"the VRAM budget is {budget / GiB:.2f} GiB")
    resident = min(m.num_layers, int((budget - fixed) // layer_b))
    streamed = m.num_layers - resident
    vram = fixed + resident * layer_b
    host = streamed * layer_b
    ctx = _Ctx(hw, wl, opts)
    eng = ctx.eng
    res_t = [costs.target_gpu(1, c, resident, head=True) for c in ctx.ctxs]
    lay_t = [costs.target_gpu(1, c, 1) for c in ctx.ctxs]
    xfer = costs.h2d(layer_b)

    def proc() -> Process:
        buf_free = [0.0, 0.0]
        for i in range(wl.new_tokens):
            b = _bin_of(ctx, i)
            last = eng.use(ctx.gpu, res_t[b], "gpu_target")
            for j in range(streamed):
                after = buf_free[j % 2] if opts.prefetch else last.end
                x = eng.use(ctx.link, xfer, "weights_stream", after=after)
                last = eng.use(ctx.gpu, lay_t[b], "gpu_target", after=x.end)
                buf_free[j % 2] = last.end
                yield last
            yield eng.use(ctx.link, costs.d2h(ID_BYTES), "transfer", after=last.end)

    eng.process(proc())
    eng.run()
    notes = [f"{resident} layers resident, {streamed} streamed per token"]
    return _finish("offload", ctx, wl, wl.new_tokens, wl.new_tokens, 1.0, vram, host,
                   costs.target_gpu(wl.prompt_len, 0, m.num_layers, head=True) + streamed * xfer,
                   {"resident_layers": resident, "streamed_layers": streamed}, notes)


@SCHEDULES.register("partial")
def partial(hw: HardwareProfile, wl: Workload, acc: AcceptanceModel | None, costs: CostModel, opts: SimOptions
            ) -> Prediction:
    m = wl.model
    ngl = max_gpu_layers(hw, wl) if opts.ngl < 0 else opts.ngl
    if ngl > m.num_layers:
        raise ConfigError(f"partial: ngl={ngl} exceeds the model's {m.num_layers} layers")
    vram, host = wl.gpu_target_bytes(ngl), wl.host_bytes(m.num_layers - ngl)
    _check_fit(hw, f"partial (ngl={ngl})", vram, host)
    h = m.hidden_size

    def tok(c: _Ctx, n: int) -> list[tuple[Resource, float, str]]:
        ops = []
        if ngl:
            ops += [(c.link, costs.h2d(ID_BYTES), "transfer"), (c.gpu, costs.target_gpu(1, n, ngl), "gpu_target"),
                    (c.link, costs.d2h(h * 4), "transfer")]
        return ops + [(c.cpu, costs.target_cpu(1, n, m.num_layers - ngl, head=True), "verify")]

    pre = costs.target_gpu(wl.prompt_len, 0, ngl) + costs.target_cpu(wl.prompt_len, 0, m.num_layers - ngl)
    return _autoregressive("partial", hw, wl, opts, tok, vram, host, pre, {"ngl": ngl}, [])


# ---------------------------------------------------------------------------------------------------------------
# speculative schedules


@dataclass
class CycleCosts:
    """Durations of one Dovetail cycle, per context bin b and accepted length a. The verification's are indexed
    [chain][b] too: chain 1 is a cycle whose tree carries a prompt-lookup chain (T + L tokens, `tree.lookup`)."""

    verify_gpu: list[list[float]]  # [chain][b]  target layers on the GPU (ngl > 0)
    verify_link: list[float]  # [chain]  hidden states GPU -> CPU at layer ngl
    verify_cpu: list[list[float]]  # [chain][b]
    accept: list[list[float]]  # [chain][a]  the accept step scans the verified width
    h2d: list[float]  # [a]
    draft: list[list[float]]  # [b][a]  stable pass + D expansions + heads
    fix: list[list[float]]  # [b][a]  pipelined: stable pass over the a+1 true features
    spec_tree: list[float]  # [b]  pipelined: one speculative tree (1-token stable pass + expansions + heads)
    host: float
    d2h: float


def cycle_costs(wl: Workload, costs: CostModel, ctxs: list[int], cap: int, ngl: int) -> CycleCosts:
    tr, m = wl.tree, wl.model
    t, k, d = tr.total_tokens, tr.top_k, tr.depth
    widths = (t, t + tr.lookup)  # the verified tokens without and with a lookup chain
    heads = costs.draft_head(1) + d * costs.draft_head(k)
    expand = [d * costs.draft_pass(k, c) + heads for c in ctxs]
    return CycleCosts(
        verify_gpu=[[costs.target_gpu(w, c, ngl) if ngl else 0.0 for c in ctxs] for w in widths],
        verify_link=[costs.d2h(w * m.hidden_size * 4) if ngl else 0.0 for w in widths],
        verify_cpu=[[costs.target_cpu(w, c, m.num_layers - ngl, head=True) for c in ctxs] for w in widths],
        accept=[[costs.accept(w, a) for a in range(cap + 1)] for w in widths],
        h2d=[costs.h2d(feature_bytes(wl, a + 1)) for a in range(cap + 1)],
        draft=[[costs.draft_pass(a + 1, c) + e for a in range(cap + 1)] for c, e in zip(ctxs, expand, strict=True)],
        fix=[[costs.draft_pass(a + 1, c) for a in range(cap + 1)] for c in ctxs],
        spec_tree=[costs.draft_pass(1, c) + e + costs.host_tree() for c, e in zip(ctxs, expand, strict=True)],
        host=costs.host_tree(),
        d2h=costs.d2h(tree_bytes(wl)),
    )


def _cycle_bins(accepted: list[int], new_tokens: int, inv_step: float, last: int) -> list[int]:
    """Context bin of each cycle: the context grows by a + 1 per cycle, and a new generation of `new_tokens` starts
    over at the prompt (the outcomes are sampled up front, so the bins are known before the event loop runs)."""
    bins, produced = [], 0
    for a in accepted:
        b = int(produced * inv_step)
        bins.append(b if b <= last else last)
        produced += a + 1
        if produced >= new_tokens:
            produced = 0
    return bins


def _speculative(name: str, hw: HardwareProfile, wl: Workload, acc: AcceptanceModel, costs: CostModel,
                 opts: SimOptions, pipelined: bool) -> Prediction:
    m = wl.model
    ngl = max(opts.ngl, 0)
    if ngl > m.num_layers:
        raise ConfigError(f"{name}: ngl={ngl} exceeds the model's {m.num_layers} layers")
    vram = wl.draft_vram_bytes() + wl.gpu_target_bytes(ngl)
    host = wl.host_bytes(m.num_layers - ngl)
    _check_fit(hw, name, vram, host)
    out = acc.outcomes(wl.tree)
    cap = out.cap
    ctx = _Ctx(hw, wl, opts)
    cc = cycle_costs(wl, costs, ctx.ctxs, cap, ngl)
    eng, cpu, gpu, link = ctx.eng, ctx.cpu, ctx.gpu, ctx.link
    n = opts.cycles
    a_arr, rank_arr = out.sample(n, opts.seed)
    a_list, rank_list = a_arr.tolist(), rank_arr.tolist()
    # which cycles verify a lookup chain: drawn apart from a (the serial schedule's time is a sum, so its mean is
    # exact for the measured share and histogram; a correlation between a chain and a long accept is ignored)
    rng = random.Random(opts.seed * 7919 + 1)
    ch_list = [int(rng.random() < out.chain_p) for _ in range(n)]
    b_list = _cycle_bins(a_list, wl.new_tokens, 1.0 / ctx.step, ctx.nb - 1)
    notes: list[str] = []
    if pipelined:
        mid = ctx.nb // 2
        verify_mid = cc.verify_gpu[0][mid] + cc.verify_link[0] + cc.verify_cpu[0][mid]
        m_spec = opts.spec_trees or max(1, min(MAX_GUESSES, int(verify_mid / cc.spec_tree[mid])))
        if hw.gpu.shares_cpu:
            notes.append("shared cores: no speculative drafting can overlap verification (= serial)")
        else:
            notes.append(f"up to {m_spec} speculative tree(s) per cycle, hit probability "
                         f"{out.hit_probability(m_spec):.3f}")
    else:
        m_spec = 0

    def serial() -> Process:
        for a, b, ch in zip(a_list, b_list, ch_list, strict=True):
            if ngl:
                yield eng.use(gpu, cc.verify_gpu[ch][b], "verify_gpu")
                yield eng.use(link, cc.verify_link[ch], "transfer")
            yield eng.use(cpu, cc.verify_cpu[ch][b], "verify")
            yield eng.use(cpu, cc.accept[ch][a], "accept")
            yield eng.use(link, cc.h2d[a], "transfer")
            yield eng.use(gpu, cc.draft[b][a], "draft")
            yield eng.use(cpu, cc.host, "host")
            yield eng.use(link, cc.d2h, "transfer")

    def pipe() -> Process:
        fix_a = -1  # accepted length whose true features still have to be folded into the draft KV
        for a, rank, b, ch in zip(a_list, rank_list, b_list, ch_list, strict=True):
            if ngl:
                yield eng.use(gpu, cc.verify_gpu[ch][b], "verify_gpu")
                yield eng.use(link, cc.verify_link[ch], "transfer")
            v = eng.use(cpu, cc.verify_cpu[ch][b], "verify")
            if fix_a >= 0:
                eng.use(gpu, cc.fix[b][fix_a], "draft")
            # guesses drafted back to back while the CPU verifies; drafting stops when the outcome is known,
            # so only the guesses that start before the verification ends are drafted
            d = cc.spec_tree[b]
            t0 = gpu.free_at if gpu.free_at > eng.now else eng.now
            started = 0 if t0 >= v.end else min(m_spec, math.ceil((v.end - t0) / d))
            if started:
                eng.use(gpu, d * started, "draft_speculative")
            yield v
            acc_job = eng.use(cpu, cc.accept[ch][a], "accept")
            if 0 <= rank < started:  # hit: the next tree is drafted; fetch it and fold the true features in
                x = eng.use(link, cc.d2h, "transfer", after=t0 + (rank + 1) * d)
                yield acc_job if acc_job.end > x.end else x
                eng.use(link, cc.h2d[a], "transfer")
                fix_a = a
            else:
                yield acc_job
                yield eng.use(link, cc.h2d[a], "transfer")
                yield eng.use(gpu, cc.draft[b][a], "draft")
                yield eng.use(cpu, cc.host, "host")
                yield eng.use(link, cc.d2h, "transfer")
                fix_a = -1

    eng.process(pipe() if pipelined else serial())
    eng.run()
    mid = ctx.ctxs[ctx.nb // 2]
    prefill = (costs.target_cpu(wl.prompt_len, 0, m.num_layers - ngl) + costs.h2d(feature_bytes(wl, wl.prompt_len))
               + costs.draft_pass(wl.prompt_len, 0) + cc.draft[ctx.nb // 2][0] - costs.draft_pass(1, mid))
    config = {"top_k": wl.tree.top_k, "depth": wl.tree.depth, "total_tokens": wl.tree.total_tokens,
              **({"lookup": wl.tree.lookup, "chain_share": out.chain_p} if wl.tree.lookup else {}),
              "draft_layers": wl.draft_layers, "draft_kind": wl.draft.fusion, "draft_vocab": wl.draft_vocab,
              "ngl": ngl, "acceptance": acc.describe()}
    if pipelined:
        config["spec_trees"] = m_spec
    return _finish(name, ctx, wl, sum(a_list) + n, n, out.tau, vram, host, prefill, config, notes)


def _add_speculative(name: str, pipelined: bool, **kw: Any) -> None:
    def run(hw: HardwareProfile, wl: Workload, acc: AcceptanceModel | None, costs: CostModel, opts: SimOptions
            ) -> Prediction:
        assert acc is not None  # `simulate` checks it
        return _speculative(name, hw, wl, acc, costs, opts, pipelined)

    SCHEDULES.add(Schedule(name, run, speculative=True, **kw))


_add_speculative("dovetail", pipelined=False)
_add_speculative("dovetail-pipelined", pipelined=True)
# EAGLE-2's GPU default on Dovetail's placement: 1-layer fc head, full vocabulary, 60-token tree
_add_speculative("eagle2", pipelined=False, draft=DraftConfig(num_layers=1, fusion="eagle"),
                 tree=TREE_PRESETS["eagle2"])


def make_costs(hw: HardwareProfile, wl: Workload, measured: dict[str, Any] | None = None) -> CostModel:
    """Roofline of (hw, wl), overridden op by op by a measured timing table when one is given."""
    roof = RooflineCosts(hw, wl)
    if measured is None:
        return roof
    return MeasuredCosts(measured, roof, wl.model.num_layers)


CostFactory = Callable[[HardwareProfile, Workload], CostModel]


def simulate(schedule: str, hw: HardwareProfile, wl: Workload, acc: AcceptanceModel | None = None,
             measured: dict[str, Any] | None = None, opts: SimOptions | None = None,
             cost_factory: CostFactory | None = None) -> Prediction:
    """Run one schedule. `measured` is a per-operation timing table (see `costs.MeasuredCosts`);
    `cost_factory(hw, wl)` replaces the cost model entirely (used by calibration)."""
    opts = opts or SimOptions()
    sched = SCHEDULES.resolve(schedule)
    if sched.draft is not None:  # its own draft and tree
        wl = wl.replace(draft=sched.draft, tree=sched.tree or wl.tree)
        if measured is not None:  # measured draft timings belong to Dovetail's draft, not this one
            measured = {"ops": {k: v for k, v in measured.get("ops", {}).items()
                                if k not in ("draft_pass", "draft_head")}}
    costs = cost_factory(hw, wl) if cost_factory else make_costs(hw, wl, measured)
    if sched.speculative and acc is None:
        raise ConfigError(f"{schedule} needs an acceptance model (--tau, --alpha, --rank-probs or --runs)")
    return sched.run(hw, wl, acc, costs, opts)


def compare(hw: HardwareProfile, wl: Workload, acc: AcceptanceModel | None, measured: dict[str, Any] | None = None,
            opts: SimOptions | None = None, schedules: Iterable[str] = SCHEDULES,
            cost_factory: CostFactory | None = None) -> list[Prediction | str]:
    """Every schedule on one machine; a schedule that does not fit yields its one-line reason instead."""
    opts = opts or SimOptions()
    base = simulate("target-cpu", hw, wl, acc, measured, opts, cost_factory)
    out: list[Prediction | str] = []
    for s in schedules:
        if SCHEDULES[s].speculative and acc is None:
            out.append(f"{s}: no acceptance model given")
            continue
        try:
            p = base if s == "target-cpu" else simulate(s, hw, wl, acc, measured, opts, cost_factory)
        except DoesNotFitError as e:
            out.append(str(e))
            continue
        p.speedup = p.tokens_per_s / base.tokens_per_s
        out.append(p)
    return out
