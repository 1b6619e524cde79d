"""A small discrete-event engine: clock, event queue (heapq), FIFO resources, generator processes.

SimPy would serve, but its per-event overhead caps a sweep at a few thousand cycles per configuration; this core
keeps what the schedules need (non-preemptive FIFO resources, timed waits, events between processes) at roughly a
microsecond per event.

Processes are generators. They reserve work on a resource with `use()` (which returns at once with the job's
start and end, like an asynchronous GPU launch) and then yield what they wait for: an absolute time (float), a
`Job` (its end) or an `Event`.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Generator
from typing import Any

Process = Generator[Any, Any, None]


class Resource:
    """A server that runs one job at a time, in reservation order (non-preemptive FIFO)."""

    __slots__ = ("name", "free_at", "busy", "last")

    def __init__(self, name: str) -> None:
        self.name, self.free_at, self.busy = name, 0.0, 0.0
        self.last: Job | None = None


class Job:
    """A reservation of [start, end) on a resource."""

    __slots__ = ("res", "start", "end", "cat")

    def __init__(self, res: Resource, start: float, end: float, cat: str) -> None:
        self.res, self.start, self.end, self.cat = res, start, end, cat


class Event:
    """A one-shot signal; processes yielding it resume when it is triggered (immediately if it already was)."""

    __slots__ = ("triggered", "waiters", "value")

    def __init__(self) -> None:
        self.triggered, self.waiters, self.value = False, [], None


class Engine:
    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Process, Any]] = []
        self._seq = itertools.count()
        self.split: dict[str, float] = {}
        self.resources: dict[str, Resource] = {}
        self.events = 0

    def resource(self, name: str) -> Resource:
        if name not in self.resources:
            self.resources[name] = Resource(name)
        return self.resources[name]

    def use(self, res: Resource, dur: float, cat: str, after: float | None = None) -> Job:
        """Reserve `dur` seconds on `res`, starting when it is free and not before `after` (default: now)."""
        t = self.now if after is None or after < self.now else after
        start = res.free_at if res.free_at > t else t
        end = start + dur
        job = Job(res, start, end, cat)
        res.free_at, res.last = end, job
        res.busy += dur
        self.split[cat] = self.split.get(cat, 0.0) + dur
        return job

    def process(self, proc: Process, at: float | None = None) -> None:
        heapq.heappush(self._heap, (self.now if at is None else at, next(self._seq), proc, None))

    def succeed(self, ev: Event, value: Any = None) -> None:
        ev.triggered, ev.value = True, value
        for p in ev.waiters:
            heapq.heappush(self._heap, (self.now, next(self._seq), p, value))
        ev.waiters = []

    def run(self, until: float = math.inf) -> float:
        """Advance until no process is left (or `until`); returns the clock."""
        heap, pop, push, seq = self._heap, heapq.heappop, heapq.heappush, self._seq
        n = 0
        while heap:
            t, _, proc, val = heap[0]
            if t > until:
                break
            pop(heap)
            self.now = t
            n += 1
            try:
                cmd = proc.send(val)
            except StopIteration:
                continue
            cls = cmd.__class__
            if cls is float:
                push(heap, (cmd if cmd > t else t, next(seq), proc, None))
            elif cls is Job:
                push(heap, (cmd.end if cmd.end > t else t, next(seq), proc, cmd))
            elif cls is Event:
                if cmd.triggered:
                    push(heap, (t, next(seq), proc, cmd.value))
                else:
                    cmd.waiters.append(proc)
            else:
                raise TypeError(f"a process yielded {cmd!r}; expected a time, a Job or an Event")
        self.events += n
        return self.now

    def utilisation(self, makespan: float | None = None) -> dict[str, float]:
        span = self.now if makespan is None else makespan
        return {name: (r.busy / span if span > 0 else 0.0) for name, r in self.resources.items()}

