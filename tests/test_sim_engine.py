"""Event engine and schedules on hand-computable timelines (exact expected times)."""

from __future__ import annotations

import pytest

from dovetail_jax.config import SMOLLM2_135M, DraftConfig, TreeConfig
from simulator.acceptance import ChainAcceptance
from simulator.engine import Engine, Event
from simulator.hardware import load_profile
from simulator.schedules import SimOptions, simulate
from simulator.workload import Workload


def test_serial_chain_of_resources() -> None:
    eng = Engine()
    cpu, gpu, link = eng.resource("cpu"), eng.resource("gpu"), eng.resource("link")

    def proc():
        yield eng.use(cpu, 2.0, "verify")
        yield eng.use(link, 0.5, "transfer")
        yield eng.use(gpu, 1.0, "draft")

    eng.process(proc())
    assert eng.run() == 3.5
    assert eng.split == {"verify": 2.0, "transfer": 0.5, "draft": 1.0}
    assert eng.utilisation() == {"cpu": 2.0 / 3.5, "gpu": 1.0 / 3.5, "link": 0.5 / 3.5}


def test_fifo_contention_between_processes() -> None:
    eng = Engine()
    cpu = eng.resource("cpu")
    ends: list[tuple[str, float]] = []

    def proc(name: str, dur: float):
        yield eng.use(cpu, dur, name)
        ends.append((name, eng.now))

    eng.process(proc("a", 1.0))
    eng.process(proc("b", 2.0))
    eng.run()
    assert ends == [("a", 1.0), ("b", 3.0)]


def test_async_launch_overlaps_and_events_signal() -> None:
    eng = Engine()
    cpu, gpu = eng.resource("cpu"), eng.resource("gpu")
    ev = Event()
    seen: list[float] = []

    def host():
        g1 = eng.use(gpu, 1.0, "draft")  # launched, not waited for
        eng.use(gpu, 1.5, "draft")  # queued behind g1 on the GPU
        yield eng.use(cpu, 3.0, "verify")  # overlaps both GPU jobs
        assert g1.end == 1.0
        eng.succeed(ev, "done")

    def waiter():
        v = yield ev
        seen.append(eng.now)
        assert v == "done"
        yield eng.now + 0.25

    eng.process(host())
    eng.process(waiter())
    assert eng.run() == 3.25
    assert seen == [3.0]
    assert gpu.busy == 2.5 and gpu.free_at == 2.5


def test_use_after_a_future_time() -> None:
    eng = Engine()
    link = eng.resource("link")
    j = eng.use(link, 1.0, "x", after=5.0)
    assert (j.start, j.end) == (5.0, 6.0)
    j2 = eng.use(link, 1.0, "x")
    assert (j2.start, j2.end) == (6.0, 7.0)


class ConstCosts:
    """Constant per-operation costs, so cycle times can be computed by hand."""

    def __init__(self, verify: float = 10.0, accept: float = 1.0, draft_pass: float = 1.0, xfer: float = 0.5,
                 host: float = 0.0) -> None:
        self.v, self.a, self.p, self.x, self.h = verify, accept, draft_pass, xfer, host

    def target_cpu(self, n, ctx, layers=None, head=True):  # noqa: ANN001, ANN201
        return self.v

    def target_gpu(self, n, ctx, layers, head=False):  # noqa: ANN001, ANN201
        return 0.0

    def draft_pass(self, n, ctx):  # noqa: ANN001, ANN201
        return self.p

    def draft_head(self, n):  # noqa: ANN001, ANN201
        return 0.0

    def accept(self, t, a):  # noqa: ANN001, ANN201
        return self.a

    def host_tree(self):  # noqa: ANN201
        return self.h

    def h2d(self, nbytes):  # noqa: ANN001, ANN201
        return self.x

    def d2h(self, nbytes):  # noqa: ANN001, ANN201
        return self.x


# depth 1, top_k 1, 3 tokens: a chain of 2 drafts; alpha = 1 accepts both every cycle (3 tokens per cycle)
WL = Workload(SMOLLM2_135M, DraftConfig(1), TreeConfig(1, 1, 3), prompt_len=16, new_tokens=64)
ALL = ChainAcceptance([1.0])


def _run(schedule: str, profile: str, cycles: int = 10):
    hw = load_profile(profile)
    return simulate(schedule, hw, WL, ALL, opts=SimOptions(cycles=cycles), cost_factory=lambda h, w: ConstCosts())


def test_serial_dovetail_exact_time() -> None:
    # verify 10 + accept 1 + h2d 0.5 + draft (stable pass 1 + 1 expansion 1) + host 0 + d2h 0.5 = 14 per cycle
    p = _run("dovetail", "paper-server1-4214r-2080super")
    assert p.sim_time_s == pytest.approx(140.0)
    assert p.tokens == 30 and p.tau == 3.0
    assert p.tokens_per_s == pytest.approx(30 / 140)
    assert p.split_s_per_token["verify"] == pytest.approx(100 / 30)


def test_pipelined_dovetail_exact_time() -> None:
    # The GPU drafts the (always right) guess while the CPU verifies: a cycle is verify 10 + accept 1 = 11;
    # the fix pass (1) and the guess (2) finish long before, and the tree's fetch (0.5) hides behind accept.
    p = _run("dovetail-pipelined", "paper-server1-4214r-2080super")
    assert p.sim_time_s == pytest.approx(110.0)
    assert p.tokens == 30


def test_pipelined_equals_serial_on_shared_cores() -> None:
    # when the draft device shares the CPU's cores nothing can overlap verification
    serial = _run("dovetail", "host-2core-shared")
    pipe = _run("dovetail-pipelined", "host-2core-shared")
    assert pipe.sim_time_s == pytest.approx(serial.sim_time_s) == pytest.approx(140.0)


class WidthCosts(ConstCosts):
    """A verification of the 3-token tree costs 10, of the tree with its 2-token lookup chain 30; its accept step
    (which scans every verified token's logits) 1 and 3."""

    def target_cpu(self, n, ctx, layers=None, head=True):  # noqa: ANN001, ANN201
        return {3: 10.0, 5: 30.0}.get(n, self.v)

    def accept(self, t, a):  # noqa: ANN001, ANN201
        return {3: 1.0, 5: 3.0}[t]


@pytest.mark.parametrize("share,cycle", [(0.0, 14.0), (1.0, 36.0)])
def test_serial_dovetail_with_a_lookup_chain_exact_time(share: float, cycle: float) -> None:
    # every cycle accepts the drafted 2 and the chain's 2 (a = 4, 5 tokens): verify 10 or 30, accept 1 or 3,
    # then h2d 0.5 + draft 2 + d2h 0.5 as above
    from simulator.acceptance import HistogramAcceptance

    tree = TreeConfig(1, 1, 3, lookup=2)
    acc = HistogramAcceptance(tree, [0, 0, 0, 0, 7], chain_share=share)
    p = simulate("dovetail", load_profile("paper-server1-4214r-2080super"), WL.replace(tree=tree), acc,
                 opts=SimOptions(cycles=10), cost_factory=lambda h, w: WidthCosts())
    assert p.tau == 5.0 and p.tokens == 50
    assert p.sim_time_s == pytest.approx(10 * cycle)


def test_serial_dovetail_prices_the_measured_share_of_chain_cycles() -> None:
    from simulator.acceptance import HistogramAcceptance

    tree = TreeConfig(1, 1, 3, lookup=2)
    acc = HistogramAcceptance(tree, [0, 0, 0, 0, 7], chain_share=0.3)
    n = 4000
    p = simulate("dovetail", load_profile("paper-server1-4214r-2080super"), WL.replace(tree=tree), acc,
                 opts=SimOptions(cycles=n), cost_factory=lambda h, w: WidthCosts())
    chains = (p.sim_time_s - 14.0 * n) / 22.0  # each chain cycle adds 30 - 10 to verify and 3 - 1 to accept
    assert chains == pytest.approx(round(chains), abs=1e-6)
    assert abs(chains / n - 0.3) < 4 * (0.3 * 0.7 / n) ** 0.5  # binomial: within 4 sigma
