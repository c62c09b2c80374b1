"""Embedded (in-process) breakerd against its peers, side by side in one process.

Scenarios (see bench/README.md):

  a. async success path: ``await breaker.call(work)`` against purgatory,
     aiobreaker and circuitbreaker, as overhead per call over ``await work()``;
  b. sync success path: ``breaker.call_sync(work)`` against pybreaker and
     circuitbreaker, as overhead per call over ``work()``;
  c. rejection path (breaker open), async and sync: the cost of one rejected
     call including catching the exception, over the bare loop;
  d. memory across many rejected calls: bytes of growth per rejection
     (tracemalloc, and RSS as a coarse cross-check).

Method: every contender of a scenario runs in this one process, interleaved
round-robin: a repetition is a few slices, each slice runs every contender in
turn (the order rotates at every slice), and every repetition measures its
own baseline. Reported numbers are the median over repetitions, with min and
max. breakerd's actor thread shares the GIL with the caller, so its work
counts: every breakerd slice ends with a round trip to the actor
(``status()``) *inside* the timed window, so a backlog it left in the inbox
is paid for by breakerd, not by the next contender.

Run: ``python bench/bench_embedded.py [--quick] [--json PATH] [--profile]``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import json
import logging
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import aiobreaker  # type: ignore[import-untyped]
import circuitbreaker  # type: ignore[import-untyped]
import pybreaker
import structlog
from purgatory import AsyncCircuitBreakerFactory
from purgatory.domain.model import OpenedState

from breakerd.actor import ActorSystem
from breakerd.clients import CircuitBreaker, CircuitBreakerOpenError
from breakerd.protocol import InboxFullError

if TYPE_CHECKING:  # purgatory does not export the breaker's class
    from purgatory.service._async.circuitbreaker import AsyncCircuitBreaker

# -- settings shared by every contender --------------------------------------------------

#: Consecutive-failure peers open after this many failures; breakerd judges a
#: failure rate (> 0.5) once ``MIN_CALLS`` outcomes are in its window.
FAILURES_TO_OPEN = 5
FAILURE_THRESHOLD = 0.5
MIN_CALLS = 5
#: Seconds an opened breaker waits before a trial call (all contenders).
RESET_TIMEOUT = 30.0
#: Peers that are tripped for the rejection scenarios wait this long instead,
#: so no trial call can happen mid-run (breakerd's ``force_open`` never expires).
LONG_TIMEOUT = 3600.0

now_ns: Callable[[], int] = time.perf_counter_ns

Role = Literal["baseline", "ours", "peer", "reference"]
SyncLoop = Callable[[int], None]
AsyncLoop = Callable[[int], Coroutine[Any, Any, None]]


class ServiceDown(Exception):
    """What the protected function raises to trip a breaker."""


# -- the protected function: the same trivial body for everyone --------------------------


async def work_async() -> int:
    return 1


def work_sync() -> int:
    return 1


async def fail_async() -> int:
    raise ServiceDown


def fail_sync() -> int:
    raise ServiceDown


# -- parameters --------------------------------------------------------------------------


@dataclass(frozen=True)
class Params:
    reps: int
    # Each repetition interleaves the contenders in this many slices. Success
    # slices stay above breakerd's inbox bound (10,000), as in a long tight
    # loop: slices of exactly the bound would put every drain on that edge.
    slices: int
    calls: int  # calls per contender per repetition, success paths
    rejections: int  # rejected calls per contender per repetition
    warmup: int  # calls in the unrecorded warm-up round
    mem_rejections: int  # scenario d: rejections measured after warm-up
    mem_warmup: int

    @staticmethod
    def for_mode(quick: bool) -> Params:
        if quick:
            return Params(
                reps=5,
                slices=2,
                calls=30_000,
                rejections=15_000,
                warmup=2_000,
                mem_rejections=20_000,
                mem_warmup=2_000,
            )
        return Params(
            reps=7,
            slices=5,
            calls=100_000,
            rejections=50_000,
            warmup=10_000,
            mem_rejections=200_000,
            mem_warmup=10_000,
        )


# -- contenders and results --------------------------------------------------------------


@dataclass(kw_only=True)
class Contender:
    """One way of making the call, as a loop of ``n`` calls.

    ``make`` builds the loop (and the breaker it closes over). With ``fresh``
    a new breaker is built before every repetition, untimed: the rejection
    scenarios use it so one peer's leak cannot pile up across repetitions.
    ``drain`` runs inside the timed window, after the loop (breakerd: a
    round trip to its actor, which has then handled everything posted).
    """

    key: str
    label: str
    role: Role
    fresh: bool = False
    drain: Callable[[], object] | None = None
    #: breakerd only: reads the CPU time of the actor's thread (ns).
    actor_cpu: Callable[[], int] | None = None


@dataclass(kw_only=True)
class AsyncContender(Contender):
    make: Callable[[], Awaitable[AsyncLoop]]


@dataclass(kw_only=True)
class SyncContender(Contender):
    make: Callable[[], SyncLoop]


@dataclass
class Stats:
    median: float
    min: float
    max: float

    @staticmethod
    def of(values: Sequence[float]) -> Stats:
        return Stats(statistics.median(values), min(values), max(values))


@dataclass
class ScenarioResult:
    key: str
    title: str
    unit_note: str
    baseline_key: str
    calls: int
    reps: int
    slices: int
    labels: dict[str, str]
    roles: dict[str, Role]
    #: Absolute ns per call, one value per repetition.
    absolute_ns: dict[str, list[float]]
    #: breakerd only: ns spent in the closing round trips, per repetition (all slices).
    drain_ns: dict[str, list[float]] = field(default_factory=dict)
    #: breakerd only: CPU time of the actor's thread per call, per repetition.
    actor_cpu_ns: dict[str, list[float]] = field(default_factory=dict)

    def overhead_us(self, key: str) -> list[float]:
        base = self.absolute_ns[self.baseline_key]
        return [(v - b) / 1000.0 for v, b in zip(self.absolute_ns[key], base, strict=True)]

    def overhead_stats(self, key: str) -> Stats:
        return Stats.of(self.overhead_us(key))

    def best_peer(self) -> str:
        peers = [k for k, r in self.roles.items() if r == "peer"]
        return min(peers, key=lambda k: self.overhead_stats(k).median)

    def ratio(self, ours: str, peer: str) -> tuple[float, Stats]:
        """Ratio of medians, and the spread of the per-repetition ratios."""
        ratio = self.overhead_stats(ours).median / self.overhead_stats(peer).median
        per_rep = [
            o / p for o, p in zip(self.overhead_us(ours), self.overhead_us(peer), strict=True)
        ]
        return ratio, Stats.of(per_rep)

    def to_json(self) -> dict[str, Any]:
        rows: dict[str, Any] = {}
        for key, values in self.absolute_ns.items():
            row: dict[str, Any] = {
                "label": self.labels[key],
                "role": self.roles[key],
                "absolute_ns_per_call": values,
            }
            if key != self.baseline_key:
                over = self.overhead_us(key)
                row["overhead_us_per_call"] = over
                row["overhead_us"] = vars(Stats.of(over))
            if key in self.drain_ns:
                row["drain_ns_per_rep"] = self.drain_ns[key]
            if key in self.actor_cpu_ns:
                row["actor_thread_cpu_ns_per_call"] = self.actor_cpu_ns[key]
            rows[key] = row
        return {
            "title": self.title,
            "baseline": self.baseline_key,
            "calls_per_rep": self.calls,
            "reps": self.reps,
            "slices_per_rep": self.slices,
            "contenders": rows,
        }


# -- timing harness ----------------------------------------------------------------------


def _rotation(items: Sequence[Any], rep: int) -> list[Any]:
    shift = rep % len(items)
    return list(items[shift:]) + list(items[:shift])


@dataclass
class Segment:
    """One timed run of a contender: ns in all, ns of the closing drain, actor CPU ns."""

    total: int = 0
    drain: int = 0
    actor_cpu: int = 0

    def add(self, other: Segment) -> None:
        self.total += other.total
        self.drain += other.drain
        self.actor_cpu += other.actor_cpu


async def _time_async(c: Contender, loop: AsyncLoop, n: int) -> Segment:
    drain, actor_cpu = c.drain, c.actor_cpu
    gc.collect()
    cpu0 = actor_cpu() if actor_cpu is not None else 0
    t0 = now_ns()
    await loop(n)
    t1 = now_ns()
    if drain is not None:
        drain()
    t2 = now_ns()
    cpu1 = actor_cpu() if actor_cpu is not None else 0
    return Segment(t2 - t0, t2 - t1, cpu1 - cpu0)


def _time_sync(c: Contender, loop: SyncLoop, n: int) -> Segment:
    drain, actor_cpu = c.drain, c.actor_cpu
    gc.collect()
    cpu0 = actor_cpu() if actor_cpu is not None else 0
    t0 = now_ns()
    loop(n)
    t1 = now_ns()
    if drain is not None:
        drain()
    t2 = now_ns()
    cpu1 = actor_cpu() if actor_cpu is not None else 0
    return Segment(t2 - t0, t2 - t1, cpu1 - cpu0)


# A repetition is ``slices`` rounds; each round runs every contender for
# ``n // slices`` calls, in an order that rotates at every round. A burst of
# load from elsewhere on the machine then lands on all contenders of the
# repetition alike, not on whichever one happened to be running.


async def run_async_scenario(
    key: str,
    title: str,
    unit_note: str,
    contenders: list[AsyncContender],
    n: int,
    params: Params,
) -> ScenarioResult:
    loops = {c.key: await c.make() for c in contenders}
    for c in contenders:  # warm-up, not recorded
        await _time_async(c, loops[c.key], params.warmup)
    result = _empty_result(key, title, unit_note, contenders, n, params)
    per_slice = n // params.slices
    for rep in range(params.reps):
        segments = {c.key: Segment() for c in contenders}
        for c in contenders:
            if c.fresh:
                loops[c.key] = await c.make()
        for round_ in range(params.slices):
            for c in _rotation(contenders, rep * params.slices + round_):
                segments[c.key].add(await _time_async(c, loops[c.key], per_slice))
        _record(result, contenders, segments, per_slice * params.slices)
    return result


def run_sync_scenario(
    key: str,
    title: str,
    unit_note: str,
    contenders: list[SyncContender],
    n: int,
    params: Params,
) -> ScenarioResult:
    loops = {c.key: c.make() for c in contenders}
    for c in contenders:  # warm-up, not recorded
        _time_sync(c, loops[c.key], params.warmup)
    result = _empty_result(key, title, unit_note, contenders, n, params)
    per_slice = n // params.slices
    for rep in range(params.reps):
        segments = {c.key: Segment() for c in contenders}
        for c in contenders:
            if c.fresh:
                loops[c.key] = c.make()
        for round_ in range(params.slices):
            for c in _rotation(contenders, rep * params.slices + round_):
                segments[c.key].add(_time_sync(c, loops[c.key], per_slice))
        _record(result, contenders, segments, per_slice * params.slices)
    return result


def _empty_result(
    key: str,
    title: str,
    unit_note: str,
    contenders: Sequence[Contender],
    n: int,
    params: Params,
) -> ScenarioResult:
    baseline = [c.key for c in contenders if c.role == "baseline"]
    assert len(baseline) == 1
    return ScenarioResult(
        key=key,
        title=title,
        unit_note=unit_note,
        baseline_key=baseline[0],
        calls=(n // params.slices) * params.slices,
        reps=params.reps,
        slices=params.slices,
        labels={c.key: c.label for c in contenders},
        roles={c.key: c.role for c in contenders},
        absolute_ns={c.key: [] for c in contenders},
    )


def _record(
    result: ScenarioResult,
    contenders: Sequence[Contender],
    segments: dict[str, Segment],
    calls: int,
) -> None:
    for c in contenders:
        seg = segments[c.key]
        result.absolute_ns[c.key].append(seg.total / calls)
        if c.drain is not None:
            result.drain_ns.setdefault(c.key, []).append(float(seg.drain))
        if c.actor_cpu is not None:
            result.actor_cpu_ns.setdefault(c.key, []).append(seg.actor_cpu / calls)


# -- breakerd ----------------------------------------------------------------------------


def quiet_structlog() -> None:
    """breakerd logs transitions (force_open is a warning); keep errors only."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))


#: How often a closing round trip found the actor's inbox full.
INBOX_FULL_RETRIES: dict[str, int] = {}


def settle(breaker: CircuitBreaker, nudge: bool = True) -> Callable[[], None]:
    """A round trip through the actor's inbox: afterwards it has handled every post.

    ``status()`` is refused with ``InboxFullError`` while the inbox is at its
    bound (a burst of posts the actor has not caught up with yet). A caller
    would then make its next call, whose report cannot be posted and waits
    for the actor instead (it wakes the actor at once). With ``nudge`` the
    drain does just that, one more ``call_sync(work)``, then asks again;
    without it (a forced-open breaker) it sleeps briefly and asks again.
    Either way the wait is breakerd's backlog and stays inside the timing.
    """

    def drain() -> None:
        while True:
            try:
                breaker.status()
                return
            except InboxFullError:
                INBOX_FULL_RETRIES[breaker.name] = INBOX_FULL_RETRIES.get(breaker.name, 0) + 1
                if nudge:
                    breaker.call_sync(work_sync)
                else:
                    time.sleep(0.0002)  # releases the GIL: the actor catches up

    return drain


def actor_cpu_clock(system: ActorSystem) -> Callable[[], int]:
    """CPU time (ns) of the thread that runs the system's actors."""
    thread_id = system.loop_thread_id
    assert thread_id is not None, "the actor system is not started"
    clock = time.pthread_getcpuclockid(thread_id)
    return lambda: time.clock_gettime_ns(clock)


def make_breakerd(system: ActorSystem, name: str) -> CircuitBreaker:
    return CircuitBreaker(
        name,
        failure_threshold=FAILURE_THRESHOLD,
        timeout=RESET_TIMEOUT,
        min_calls=MIN_CALLS,
        system=system,
    )


# -- scenario a: async success path ------------------------------------------------------


def async_success_contenders(
    breaker: CircuitBreaker, actor_cpu: Callable[[], int] | None = None
) -> list[AsyncContender]:
    async def make_bare() -> AsyncLoop:
        work = work_async

        async def loop(n: int) -> None:
            for _ in range(n):
                await work()

        return loop

    async def make_breakerd() -> AsyncLoop:
        call, work = breaker.call, work_async

        async def loop(n: int) -> None:
            for _ in range(n):
                await call(work)

        return loop

    async def make_purgatory() -> AsyncLoop:
        factory = AsyncCircuitBreakerFactory(
            default_threshold=FAILURES_TO_OPEN, default_ttl=RESET_TIMEOUT
        )
        brk = await factory.get_breaker("bench-success")  # fetched once, reused
        work = work_async

        async def loop(n: int) -> None:
            for _ in range(n):
                async with brk:
                    await work()

        return loop

    async def make_aiobreaker() -> AsyncLoop:
        cb = aiobreaker.CircuitBreaker(
            fail_max=FAILURES_TO_OPEN, timeout_duration=timedelta(seconds=RESET_TIMEOUT)
        )
        call_async, work = cb.call_async, work_async

        async def loop(n: int) -> None:
            for _ in range(n):
                await call_async(work)

        return loop

    async def make_circuitbreaker() -> AsyncLoop:
        wrapped = circuitbreaker.circuit(
            failure_threshold=FAILURES_TO_OPEN,
            recovery_timeout=RESET_TIMEOUT,
            name="bench-success-async",
        )(work_async)

        async def loop(n: int) -> None:
            for _ in range(n):
                await wrapped()

        return loop

    return [
        AsyncContender(key="bare", label="bare: await work()", role="baseline", make=make_bare),
        AsyncContender(
            key="breakerd",
            label="breakerd: await breaker.call(work)",
            role="ours",
            make=make_breakerd,
            drain=settle(breaker),
            actor_cpu=actor_cpu,
        ),
        AsyncContender(
            key="purgatory",
            label="purgatory: async with breaker: await work()",
            role="peer",
            make=make_purgatory,
        ),
        AsyncContender(
            key="aiobreaker",
            label="aiobreaker: await cb.call_async(work)",
            role="peer",
            make=make_aiobreaker,
        ),
        AsyncContender(
            key="circuitbreaker",
            label="circuitbreaker: @circuit async def work",
            role="peer",
            make=make_circuitbreaker,
        ),
    ]


# -- scenario b: sync success path -------------------------------------------------------


def sync_success_contenders(
    breaker: CircuitBreaker, actor_cpu: Callable[[], int] | None = None
) -> list[SyncContender]:
    def make_bare() -> SyncLoop:
        work = work_sync

        def loop(n: int) -> None:
            for _ in range(n):
                work()

        return loop

    def make_breakerd() -> SyncLoop:
        call_sync, work = breaker.call_sync, work_sync

        def loop(n: int) -> None:
            for _ in range(n):
                call_sync(work)

        return loop

    def make_pybreaker() -> SyncLoop:
        cb = pybreaker.CircuitBreaker(fail_max=FAILURES_TO_OPEN, reset_timeout=RESET_TIMEOUT)
        call, work = cb.call, work_sync

        def loop(n: int) -> None:
            for _ in range(n):
                call(work)

        return loop

    def make_circuitbreaker() -> SyncLoop:
        wrapped = circuitbreaker.circuit(
            failure_threshold=FAILURES_TO_OPEN,
            recovery_timeout=RESET_TIMEOUT,
            name="bench-success-sync",
        )(work_sync)

        def loop(n: int) -> None:
            for _ in range(n):
                wrapped()

        return loop

    return [
        SyncContender(key="bare", label="bare: work()", role="baseline", make=make_bare),
        SyncContender(
            key="breakerd",
            label="breakerd: breaker.call_sync(work)",
            role="ours",
            make=make_breakerd,
            drain=settle(breaker),
            actor_cpu=actor_cpu,
        ),
        SyncContender(
            key="pybreaker", label="pybreaker: cb.call(work)", role="peer", make=make_pybreaker
        ),
        SyncContender(
            key="circuitbreaker",
            label="circuitbreaker: @circuit def work",
            role="peer",
            make=make_circuitbreaker,
        ),
    ]


# -- scenario c: rejection path ----------------------------------------------------------
#
# Each peer is opened the way its users would see it open: failures up to its
# threshold (circuitbreaker, purgatory) or its documented ``open()``
# (pybreaker, aiobreaker), with a reset timeout long enough that no trial call
# happens mid-run. breakerd uses ``force_open()``. Peers get a freshly opened
# breaker before every repetition (untimed), so a leak cannot pile up.


async def open_purgatory() -> AsyncCircuitBreaker:
    factory = AsyncCircuitBreakerFactory(
        default_threshold=FAILURES_TO_OPEN, default_ttl=LONG_TIMEOUT
    )
    brk = await factory.get_breaker("bench-open")
    for _ in range(FAILURES_TO_OPEN):
        try:
            async with brk:
                await fail_async()
        except ServiceDown:
            pass
    assert brk.context.state == "opened", brk.context.state
    return brk


def open_circuitbreaker(name: str) -> Any:
    cb = circuitbreaker.CircuitBreaker(
        failure_threshold=FAILURES_TO_OPEN, recovery_timeout=LONG_TIMEOUT, name=name
    )
    failing = cb(fail_sync)
    for _ in range(FAILURES_TO_OPEN):
        try:
            failing()
        except ServiceDown:
            pass
    assert cb.opened
    return cb


def open_aiobreaker() -> Any:
    cb = aiobreaker.CircuitBreaker(
        fail_max=FAILURES_TO_OPEN, timeout_duration=timedelta(seconds=LONG_TIMEOUT)
    )
    cb.open()
    return cb


def open_pybreaker() -> pybreaker.CircuitBreaker:
    cb = pybreaker.CircuitBreaker(fail_max=FAILURES_TO_OPEN, reset_timeout=LONG_TIMEOUT)
    cb.open()
    return cb


def async_rejection_contenders(
    breaker: CircuitBreaker, actor_cpu: Callable[[], int] | None = None
) -> list[AsyncContender]:
    """Loops of rejected calls; ``breaker`` must be forced open already."""

    async def make_empty() -> AsyncLoop:
        async def loop(n: int) -> None:
            for _ in range(n):
                try:
                    pass
                except ServiceDown:
                    pass

        return loop

    async def make_bare() -> AsyncLoop:
        work = work_async

        async def loop(n: int) -> None:
            for _ in range(n):
                try:
                    await work()
                except ServiceDown:
                    pass

        return loop

    async def make_raise() -> AsyncLoop:
        fail = fail_async

        async def loop(n: int) -> None:
            for _ in range(n):
                try:
                    await fail()
                except ServiceDown:
                    pass

        return loop

    async def make_breakerd() -> AsyncLoop:
        call, work = breaker.call, work_async

        async def loop(n: int) -> None:
            for _ in range(n):
                try:
                    await call(work)
                except CircuitBreakerOpenError:
                    pass

        return loop

    async def make_purgatory() -> AsyncLoop:
        brk = await open_purgatory()
        work = work_async

        async def loop(n: int) -> None:
            for _ in range(n):
                try:
                    async with brk:
                        await work()
                except OpenedState:
                    pass

        return loop

    async def make_aiobreaker() -> AsyncLoop:
        call_async, work = open_aiobreaker().call_async, work_async
        error = aiobreaker.CircuitBreakerError

        async def loop(n: int) -> None:
            for _ in range(n):
                try:
                    await call_async(work)
                except error:
                    pass

        return loop

    async def make_circuitbreaker() -> AsyncLoop:
        wrapped = open_circuitbreaker("bench-open-async")(work_async)
        error = circuitbreaker.CircuitBreakerError

        async def loop(n: int) -> None:
            for _ in range(n):
                try:
                    await wrapped()
                except error:
                    pass

        return loop

    return [
        AsyncContender(
            key="empty", label="empty loop: try/except", role="baseline", make=make_empty
        ),
        AsyncContender(
            key="bare", label="ref: await work(), not rejected", role="reference", make=make_bare
        ),
        AsyncContender(
            key="raise",
            label="ref: await f() that raises, caught",
            role="reference",
            make=make_raise,
        ),
        AsyncContender(
            key="breakerd",
            label="breakerd: await breaker.call (forced open)",
            role="ours",
            make=make_breakerd,
            drain=settle(breaker, nudge=False),
            actor_cpu=actor_cpu,
        ),
        AsyncContender(
            key="purgatory",
            label="purgatory: async with breaker",
            role="peer",
            make=make_purgatory,
            fresh=True,
        ),
        AsyncContender(
            key="aiobreaker",
            label="aiobreaker: await cb.call_async(work)",
            role="peer",
            make=make_aiobreaker,
            fresh=True,
        ),
        AsyncContender(
            key="circuitbreaker",
            label="circuitbreaker: @circuit async def work",
            role="peer",
            make=make_circuitbreaker,
            fresh=True,
        ),
    ]


def sync_rejection_contenders(
    breaker: CircuitBreaker, actor_cpu: Callable[[], int] | None = None
) -> list[SyncContender]:
    """Loops of rejected calls; ``breaker`` must be forced open already."""

    def make_empty() -> SyncLoop:
        def loop(n: int) -> None:
            for _ in range(n):
                try:
                    pass
                except ServiceDown:
                    pass

        return loop

    def make_bare() -> SyncLoop:
        work = work_sync

        def loop(n: int) -> None:
            for _ in range(n):
                try:
                    work()
                except ServiceDown:
                    pass

        return loop

    def make_raise() -> SyncLoop:
        fail = fail_sync

        def loop(n: int) -> None:
            for _ in range(n):
                try:
                    fail()
                except ServiceDown:
                    pass

        return loop

    def make_breakerd() -> SyncLoop:
        call_sync, work = breaker.call_sync, work_sync

        def loop(n: int) -> None:
            for _ in range(n):
                try:
                    call_sync(work)
                except CircuitBreakerOpenError:
                    pass

        return loop

    def make_pybreaker() -> SyncLoop:
        call, work = open_pybreaker().call, work_sync
        error = pybreaker.CircuitBreakerError

        def loop(n: int) -> None:
            for _ in range(n):
                try:
                    call(work)
                except error:
                    pass

        return loop

    def make_circuitbreaker() -> SyncLoop:
        wrapped = open_circuitbreaker("bench-open-sync")(work_sync)
        error = circuitbreaker.CircuitBreakerError

        def loop(n: int) -> None:
            for _ in range(n):
                try:
                    wrapped()
                except error:
                    pass

        return loop

    return [
        SyncContender(
            key="empty", label="empty loop: try/except", role="baseline", make=make_empty
        ),
        SyncContender(
            key="bare", label="ref: work(), not rejected", role="reference", make=make_bare
        ),
        SyncContender(
            key="raise", label="ref: f() that raises, caught", role="reference", make=make_raise
        ),
        SyncContender(
            key="breakerd",
            label="breakerd: breaker.call_sync (forced open)",
            role="ours",
            make=make_breakerd,
            drain=settle(breaker, nudge=False),
            actor_cpu=actor_cpu,
        ),
        SyncContender(
            key="pybreaker",
            label="pybreaker: cb.call(work)",
            role="peer",
            make=make_pybreaker,
            fresh=True,
        ),
        SyncContender(
            key="circuitbreaker",
            label="circuitbreaker: @circuit def work",
            role="peer",
            make=make_circuitbreaker,
            fresh=True,
        ),
    ]


# -- scenario d: memory across rejections ------------------------------------------------


@dataclass
class MemoryResult:
    key: str
    label: str
    role: Role
    rejections: int
    #: tracemalloc: growth of traced memory over the measured rejections.
    traced_bytes: int
    #: RSS growth over as many rejections, in a separate pass without tracemalloc.
    rss_bytes: int

    @property
    def traced_per_rejection(self) -> float:
        return self.traced_bytes / self.rejections

    @property
    def rss_per_rejection(self) -> float:
        return self.rss_bytes / self.rejections

    def to_json(self) -> dict[str, Any]:
        return {
            **vars(self),
            "traced_bytes_per_rejection": self.traced_per_rejection,
            "rss_bytes_per_rejection": self.rss_per_rejection,
        }


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def memory_growth(
    run: Callable[[int], Awaitable[None]], params: Params, *, traced: bool
) -> int:
    """Growth in bytes over ``params.mem_rejections`` rejections, after a warm-up."""
    if traced:
        tracemalloc.start()
    try:
        await run(params.mem_warmup)
        gc.collect()
        before = tracemalloc.get_traced_memory()[0] if traced else rss_bytes()
        await run(params.mem_rejections)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0] if traced else rss_bytes()
    finally:
        if traced:
            tracemalloc.stop()
    return after - before


def _runner(
    c: Contender, loop: AsyncLoop | SyncLoop, sync: bool
) -> Callable[[int], Awaitable[None]]:
    async def run(n: int) -> None:
        if sync:
            loop(n)
        else:
            await loop(n)  # type: ignore[misc]
        if c.drain is not None:
            c.drain()

    return run


async def run_memory_scenario(
    async_contenders: list[AsyncContender],
    sync_contenders: list[SyncContender],
    params: Params,
) -> list[MemoryResult]:
    # Sync ones first and purgatory (the reported leak) last, so that memory a
    # leaky contender frees cannot be reused to hide another one's RSS growth.
    todo: list[Contender] = [c for c in sync_contenders if c.role in ("ours", "peer")]
    todo += [c for c in async_contenders if c.role in ("ours", "peer")]
    todo.sort(key=lambda c: c.key == "purgatory")
    results = []
    for c in todo:
        sync = isinstance(c, SyncContender)
        growth = {}
        for traced in (False, True):
            loop: AsyncLoop | SyncLoop
            if isinstance(c, SyncContender):
                loop = c.make()
            else:
                assert isinstance(c, AsyncContender)
                loop = await c.make()
            growth[traced] = await memory_growth(_runner(c, loop, sync), params, traced=traced)
            del loop
            gc.collect()
        results.append(
            MemoryResult(
                key=f"{c.key}-{'sync' if sync else 'async'}",
                label=c.label,
                role=c.role,
                rejections=params.mem_rejections,
                traced_bytes=growth[True],
                rss_bytes=growth[False],
            )
        )
    return results


# -- output ------------------------------------------------------------------------------


def print_scenario(
    result: ScenarioResult,
    *,
    also_vs: Sequence[str] = (),
    goals: Mapping[str, float] | None = None,
    cpu_of: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Print one table and breakerd's ratios; returns the ratios for the JSON report.

    Ratios are against the best peer (lowest median) and every peer in
    ``also_vs``; ``goals`` maps ``"best"`` or a peer key to a target ratio.
    ``cpu_of`` names, per contender key, the thread whose CPU time
    ``actor_cpu`` read (default: "its actor thread").
    """
    goals = goals or {}
    base = Stats.of([v / 1000.0 for v in result.absolute_ns[result.baseline_key]])
    print()
    print(f"== {result.title} ==")
    print(
        f"   {result.reps} reps x {result.calls:,} calls per contender, interleaved round-robin "
        f"in {result.slices} slices per rep"
    )
    print(f"   {result.unit_note}")
    print(
        f"   baseline {result.labels[result.baseline_key]!r}: "
        f"{base.median:.3f} us/call (min {base.min:.3f}, max {base.max:.3f})"
    )
    header = f"   {'contender':<46}{'median':>9}{'min':>9}{'max':>9}"
    print(header)
    print("   " + "-" * (len(header) - 3))
    for key, role in result.roles.items():
        if role == "baseline":
            continue
        s = result.overhead_stats(key)
        mark = {"ours": "  <- ours", "reference": "  (reference)"}.get(role, "")
        print(f"   {result.labels[key]:<46}{s.median:>9.3f}{s.min:>9.3f}{s.max:>9.3f}{mark}")
    for key, drains in result.drain_ns.items():
        d = statistics.median(drains) / 1000.0
        print(
            f"   ({key}: its closing round trips to the actor, inside the timing, took "
            f"{d:.0f} us per rep, {d / result.calls:.4f} us/call)"
        )
    for key, cpu in result.actor_cpu_ns.items():
        print(
            f"   ({key}: CPU time of {(cpu_of or {}).get(key, 'its actor thread')}, "
            "inside the timing: "
            f"median {statistics.median(cpu) / 1000:.4f} us/call)"
        )
    ratios: dict[str, Any] = {}
    ours = next(k for k, r in result.roles.items() if r == "ours")
    best = result.best_peer()
    for peer in [best, *(k for k in also_vs if k != best)]:
        ratio, spread = result.ratio(ours, peer)
        line = (
            f"   ratio {ours} / {peer}{' (best peer)' if peer == best else ''}: {ratio:.2f}x"
            f"  (per-rep ratios {spread.min:.2f}..{spread.max:.2f})"
        )
        goal = goals.get(peer, goals.get("best") if peer == best else None)
        if goal is not None:
            line += f"   goal <= {goal:.2f}x: {'MET' if ratio <= goal else 'NOT MET'}"
        print(line)
        ratios[peer] = {
            "ratio_of_medians": ratio,
            "per_rep": vars(spread),
            "best_peer": peer == best,
            "goal": goal,
        }
    return ratios


def print_memory(results: list[MemoryResult], params: Params) -> None:
    print()
    print("== d. memory growth across rejected calls (breaker open) ==")
    print(
        f"   {params.mem_rejections:,} rejections per contender after {params.mem_warmup:,} "
        "warm-up; exception caught and dropped; gc.collect() before each reading"
    )
    print(
        "   B/rej: tracemalloc (every thread's Python allocations); "
        "RSS B/rej: separate pass without tracemalloc (page-grained)"
    )
    header = f"   {'contender':<46}{'B/rej':>10}{'total MB':>10}{'RSS B/rej':>11}"
    print(header)
    print("   " + "-" * (len(header) - 3))
    for r in results:
        mark = "  <- ours" if r.role == "ours" else ""
        leak = "  LEAKS" if r.traced_per_rejection >= 8.0 else ""
        # round(...) + 0.0 prints a tiny negative growth (memory freed) as 0.0, not -0.0
        traced = round(r.traced_per_rejection, 1) + 0.0
        total_mb = round(r.traced_bytes / 1e6, 2) + 0.0
        rss = round(r.rss_per_rejection, 1) + 0.0
        print(f"   {r.label:<46}{traced:>10.1f}{total_mb:>10.2f}{rss:>11.1f}{mark}{leak}")


def environment() -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for dist in ("breakerd", "purgatory", "aiobreaker", "circuitbreaker", "pybreaker"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "versions": versions,
        "switch_interval_s": sys.getswitchinterval(),
        "breakerd_source": breakerd_source(),
    }


def breakerd_source() -> str:
    """The breakerd checkout measured: commit, and how many files differ from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "actor", "clients", "protocol"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit} + {len(changed)} changed file(s) in actor/ clients/ protocol/"


# -- profile (--profile) -----------------------------------------------------------------


def caller_and_actor_split(system: ActorSystem, calls: int) -> None:
    """Split breakerd's per-call cost between the caller's thread and the actor.

    Caller only: the same loops with no actor at work (success path: a breaker
    of an actor system that is never started, so posts just queue up, in
    batches below the inbox bound; rejection path: a forced-open breaker whose
    actor system is then stopped, so nothing is posted). With actor: a running
    actor and the closing round trip, as in the scenarios. The difference is
    what the actor's thread costs the caller through the shared GIL.
    """
    batch = 5_000  # below the default inbox bound (10,000): no post may fall back
    batches = max(5, calls // batch)
    live = make_breakerd(system, "bench-split")
    live_open = make_breakerd(system, "bench-split-open")
    live_open.force_open()
    halted = ActorSystem().start()
    dead_open = make_breakerd(halted, "bench-split-open")
    dead_open.force_open()
    halted.stop()

    def idle() -> CircuitBreaker:
        return make_breakerd(ActorSystem(), "bench-split-idle")  # never started

    def sync_ok(b: CircuitBreaker) -> None:
        call_sync, work = b.call_sync, work_sync
        for _ in range(batch):
            call_sync(work)

    def sync_reject(b: CircuitBreaker) -> None:
        call_sync, work = b.call_sync, work_sync
        for _ in range(batch):
            try:
                call_sync(work)
            except CircuitBreakerOpenError:
                pass

    async def async_ok(b: CircuitBreaker) -> None:
        call, work = b.call, work_async
        for _ in range(batch):
            await call(work)

    async def async_reject(b: CircuitBreaker) -> None:
        call, work = b.call, work_async
        for _ in range(batch):
            try:
                await call(work)
            except CircuitBreakerOpenError:
                pass

    def measure_sync(loop: Callable[[CircuitBreaker], None], reject: bool) -> tuple[float, float]:
        caller, full = [], []
        for _ in range(batches):
            b = dead_open if reject else idle()
            gc.collect()
            t0 = now_ns()
            loop(b)
            caller.append(now_ns() - t0)
            b = live_open if reject else live
            gc.collect()
            t0 = now_ns()
            loop(b)
            settle(b, nudge=not reject)()
            full.append(now_ns() - t0)
        return statistics.median(caller) / batch, statistics.median(full) / batch

    async def measure_async(
        loop: Callable[[CircuitBreaker], Awaitable[None]], reject: bool
    ) -> tuple[float, float]:
        caller, full = [], []
        for _ in range(batches):
            b = dead_open if reject else idle()
            gc.collect()
            t0 = now_ns()
            await loop(b)
            caller.append(now_ns() - t0)
            b = live_open if reject else live
            gc.collect()
            t0 = now_ns()
            await loop(b)
            settle(b, nudge=not reject)()
            full.append(now_ns() - t0)
        return statistics.median(caller) / batch, statistics.median(full) / batch

    async def both_async() -> list[tuple[float, float]]:
        return [await measure_async(async_ok, False), await measure_async(async_reject, True)]

    ok_async, reject_async = asyncio.run(both_async())
    rows = [
        ("await call, success", ok_async),
        ("call_sync, success", measure_sync(sync_ok, False)),
        ("await call, rejected", reject_async),
        ("call_sync, rejected", measure_sync(sync_reject, True)),
    ]
    print()
    print(f"== where breakerd's time goes: caller vs actor ({batches} x {batch:,} calls) ==")
    print(f"   {'us per call':<24}{'caller only':>13}{'with actor':>13}{'actor share':>13}")
    for label, (caller_ns, full_ns) in rows:
        print(
            f"   {label:<24}{caller_ns / 1000:>13.3f}{full_ns / 1000:>13.3f}"
            f"{(full_ns - caller_ns) / 1000:>13.3f}"
        )
    print("   (absolute: the loop and the bare call are included; medians over batches)")


def component_costs() -> None:
    """A few primitives the breakerd call paths use, timed alone on this machine."""
    n = 200_000
    rows: list[tuple[str, Callable[[], object]]] = [
        ("os.getpid()", os.getpid),
        ("time.monotonic()", time.monotonic),
        (
            "CircuitBreakerOpenError(name, None, 'forced_open')",
            lambda: CircuitBreakerOpenError("bench", None, "forced_open"),
        ),
        ("Exception('...') (for comparison)", lambda: Exception("circuit breaker is open")),
    ]
    print()
    print("== primitives, timed alone (us per call, including a lambda/loop ~0.03) ==")
    for label, fn in rows:
        t0 = now_ns()
        for _ in range(n):
            fn()
        print(f"   {label:<52}{(now_ns() - t0) / n / 1000:>8.3f}")


def profile_breakerd(system: ActorSystem, calls: int) -> None:
    """Where breakerd's time goes: caller vs actor split, cProfile, primitives."""
    caller_and_actor_split(system, calls)
    component_costs()
    ok = make_breakerd(system, "bench-profile")
    down = make_breakerd(system, "bench-profile-open")
    down.force_open()

    async def async_ok() -> None:
        call, work = ok.call, work_async
        for _ in range(calls):
            await call(work)

    def sync_ok() -> None:
        call_sync, work = ok.call_sync, work_sync
        for _ in range(calls):
            call_sync(work)

    def sync_down() -> None:
        call_sync, work = down.call_sync, work_sync
        for _ in range(calls):
            try:
                call_sync(work)
            except CircuitBreakerOpenError:
                pass

    runs: list[tuple[str, CircuitBreaker, Callable[[], None]]] = [
        ("await breaker.call(work), success", ok, lambda: asyncio.run(async_ok())),
        ("breaker.call_sync(work), success", ok, sync_ok),
        ("breaker.call_sync(work), rejected", down, sync_down),
    ]
    for label, breaker, run in runs:
        drain = settle(breaker, nudge=breaker is ok)
        drain()
        profiler = cProfile.Profile()
        profiler.enable()
        run()
        drain()
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(8)
        body = out.getvalue()
        start = body.find("   ncalls")
        print()
        print(f"== cProfile: {label}, {calls:,} calls (caller's thread only; inflated) ==")
        print(body[start:].rstrip() if start >= 0 else body.rstrip())


# -- main --------------------------------------------------------------------------------

SUCCESS_NOTE = "overhead = time per protected call - time per bare call, same repetition"
REJECTION_NOTE = "cost = time per rejected call incl. catching it - time per empty loop iteration"


async def async_part(
    system: ActorSystem, params: Params
) -> tuple[ScenarioResult, ScenarioResult, list[AsyncContender]]:
    """Scenarios a and c (async), in one event loop."""
    cpu = actor_cpu_clock(system)
    success = await run_async_scenario(
        "a_async_success",
        "a. async success path: overhead per call over `await work()`, us",
        SUCCESS_NOTE,
        async_success_contenders(make_breakerd(system, "bench-success-async"), cpu),
        params.calls,
        params,
    )
    down = make_breakerd(system, "bench-open-async")
    down.force_open()
    contenders = async_rejection_contenders(down, cpu)
    rejection = await run_async_scenario(
        "c_async_rejection",
        "c. rejection path, async (breaker open): cost per rejected call, us",
        REJECTION_NOTE,
        contenders,
        params.rejections,
        params,
    )
    return success, rejection, contenders


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="breakerd embedded vs peers, in one process")
    parser.add_argument("--quick", action="store_true", help="a smaller run (< 20 s)")
    parser.add_argument("--json", metavar="PATH", help="also write every sample to PATH")
    parser.add_argument("--profile", action="store_true", help="then profile breakerd's call loops")
    args = parser.parse_args(argv)
    params = Params.for_mode(args.quick)
    quiet_structlog()
    started = time.monotonic()

    env = environment()
    print(
        f"bench_embedded ({'quick' if args.quick else 'full'}): Python {env['python']}, "
        f"{env['cpus']} CPUs; " + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    )
    print(f"breakerd source: {env['breakerd_source']}")
    print(
        f"settings: breakerd failure_threshold={FAILURE_THRESHOLD} min_calls={MIN_CALLS} "
        f"timeout={RESET_TIMEOUT:g}s; peers open after {FAILURES_TO_OPEN} failures, "
        f"reset timeout {RESET_TIMEOUT:g}s ({LONG_TIMEOUT:g}s when opened for c/d)"
    )

    system = ActorSystem().start()
    cpu = actor_cpu_clock(system)
    try:
        a, c_async, async_rejections = asyncio.run(async_part(system, params))
        b = run_sync_scenario(
            "b_sync_success",
            "b. sync success path: overhead per call over `work()`, us",
            SUCCESS_NOTE,
            sync_success_contenders(make_breakerd(system, "bench-success-sync"), cpu),
            params.calls,
            params,
        )
        down = make_breakerd(system, "bench-open-sync")
        down.force_open()
        sync_rejections = sync_rejection_contenders(down, cpu)
        c_sync = run_sync_scenario(
            "c_sync_rejection",
            "c. rejection path, sync (breaker open): cost per rejected call, us",
            REJECTION_NOTE,
            sync_rejections,
            params.rejections,
            params,
        )
        ratios = {
            a.key: print_scenario(a, goals={"best": 0.8}),
            b.key: print_scenario(b, also_vs=("pybreaker",), goals={"pybreaker": 0.5}),
            # A rejection costs less than the fastest peer's (circuitbreaker's).
            c_async.key: print_scenario(c_async, goals={"circuitbreaker": 1.0}),
            c_sync.key: print_scenario(
                c_sync, also_vs=("pybreaker",), goals={"circuitbreaker": 1.0}
            ),
        }
        memory = asyncio.run(run_memory_scenario(async_rejections, sync_rejections, params))
        print_memory(memory, params)
        elapsed = time.monotonic() - started
        print()
        print(f"total time: {elapsed:.1f} s")
        if args.json:
            report = {
                "environment": env,
                "mode": "quick" if args.quick else "full",
                "params": vars(params),
                "scenarios": {r.key: r.to_json() for r in (a, b, c_async, c_sync)},
                "ratios": ratios,
                "memory": [m.to_json() for m in memory],
                "inbox_full_retries": INBOX_FULL_RETRIES,
                "elapsed_s": elapsed,
            }
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
            print(f"wrote {args.json}")
        if args.profile:
            profile_breakerd(system, params.calls)
        if INBOX_FULL_RETRIES:
            print()
            print(
                "note: a closing status() found the actor's inbox at its bound and was "
                f"retried after one more call (see settle()): {INBOX_FULL_RETRIES}"
            )
    finally:
        system.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
