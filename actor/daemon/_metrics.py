"""Prometheus metrics of breaker actors, read at scrape time (the ``metrics`` extra).

Names and label values are Resilience4j's micrometer ones with a
``breakerd_`` prefix, so Grafana boards port with a prefix change; the README
lists every metric. Nothing is counted per call for metrics: a scrape reads
what the machine and the actor keep anyway.

Reading across threads
----------------------
A scrape runs in the HTTP server's thread (or the embedding app's), not on
the actors' loop. For each breaker it asks the actor for its status, as
``breakerd status`` does, and reads everything else in the reply callback,
which runs in the actor's own thread: one consistent reading per breaker,
with the time window aged to the scrape. That is one inbox message per
breaker per scrape, nothing on the call path.

A breaker that does not answer within ``timeout`` (an inbox deep in work,
the very moment its metrics matter) and any scrape made from inside a
running event loop (which must never block, and may be the actors' own) is
read directly instead: its published snapshot (immutable, replaced whole),
the machine's integer totals, and the actor's counters (each one attribute
read, atomic under the GIL; the transition counts are a dict replaced at
every transition, never mutated). Each value is then exact, but they may
come from instants a few calls apart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from breakerd.protocol import (
    BreakerError,
    BreakerStatus,
    BudgetStatus,
    CircuitState,
    StatusRequest,
)

from .._actor import BreakerActor

__all__ = ["BreakerCollector", "BreakerReading", "BudgetReader", "MetricsServer"]

PREFIX: Final = "breakerd_circuitbreaker_"
#: How long a scrape waits for the actors' answers before reading directly.
SCRAPE_TIMEOUT: Final = 1.0

#: A breaker's budgets by its name at a monotonic instant (None: it has none).
BudgetReader = Callable[[str, float], BudgetStatus | None]


@dataclass(frozen=True, slots=True)
class BreakerReading:
    """Everything a scrape reports about one breaker, read at one instant."""

    status: BreakerStatus
    min_calls: int
    transitions: dict[tuple[str, str], int]
    #: Seconds reported with each kind of outcome: successful, failed, ignored.
    seconds: tuple[float, float, float]
    #: Slow calls reported: successful, failed.
    slow: tuple[int, int]
    inbox: int
    #: The open deadline on the wall clock (seconds since the epoch), or None.
    open_until: float | None


def read_actor(
    actor: BreakerActor,
    clock: Callable[[], float],
    status: BreakerStatus | None = None,
    budgets: BudgetReader | None = None,
) -> BreakerReading:
    """One breaker's reading; ``status`` as the actor answered, else read directly.

    ``budgets``: where its budgets are kept (they live beside the actor, not in it).
    """
    if status is None:
        machine = actor.machine
        status = BreakerStatus(
            snapshot=actor.snapshot,
            successes=machine.successes,
            failures=machine.failures,
            rejections=machine.rejections,
            ignored=machine.ignored,
        )
    if budgets is not None:
        status = dataclasses.replace(status, budget=budgets(actor.name, clock()))
    times = actor.call_times
    open_until = status.snapshot.open_until
    return BreakerReading(
        status=status,
        min_calls=actor.config.min_calls,
        transitions=actor.transition_counts,
        seconds=(times.successful, times.failed, times.ignored),
        slow=(times.slow_successful, times.slow_failed),
        inbox=actor.backlog,
        # CLOCK_MONOTONIC and the wall clock both run at one rate: the
        # remaining open time carries over from one to the other.
        open_until=None if open_until is None else time.time() + (open_until - clock()),
    )


def read_actors(
    actors: Sequence[BreakerActor],
    clock: Callable[[], float],
    timeout: float = SCRAPE_TIMEOUT,
    budgets: BudgetReader | None = None,
) -> list[BreakerReading]:
    """Every breaker's reading, through its actor where possible (see the module doc)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        return [read_actor(actor, clock, None, budgets) for actor in actors]
    answers: dict[str, BreakerReading] = {}
    lock = threading.Lock()
    done = threading.Event()
    pending = len(actors)

    def on_status(actor: BreakerActor) -> Callable[[Any, BaseException | None], None]:
        def reply(result: Any, error: BaseException | None) -> None:
            # The actor's thread: its counters are consistent with ``result``.
            nonlocal pending
            reading = None if error is not None else read_actor(actor, clock, result, budgets)
            with lock:
                if reading is not None:
                    answers[actor.name] = reading
                pending -= 1
                if pending == 0:
                    done.set()

        return reply

    if actors:
        for actor in actors:
            try:
                actor.ask(StatusRequest(actor.name), on_status(actor))
            except BreakerError:
                # Inbox full or stopped: no answer will come; read it directly.
                on_status(actor)(None, BreakerError("not asked"))
        done.wait(timeout)
    with lock:
        return [
            answers.get(actor.name) or read_actor(actor, clock, None, budgets) for actor in actors
        ]


def _states(name: str, state: CircuitState) -> Iterator[tuple[list[str], float]]:
    for candidate in CircuitState:
        yield [name, candidate.value], 1.0 if candidate is state else 0.0


def _rate(rate: float | None, calls: int, min_calls: int) -> float:
    # Resilience4j reports -1 until the window holds min_calls outcomes.
    if rate is None or calls < min_calls:
        return -1.0
    return rate * 100.0


def breaker_metrics(readings: Iterable[BreakerReading]) -> list[Metric]:
    """The metric families of these breakers (no daemon-wide ones)."""
    state = GaugeMetricFamily(
        PREFIX + "state",
        "1 for the breaker's current state, 0 for the others",
        labels=["name", "state"],
    )
    calls = SummaryMetricFamily(
        PREFIX + "calls",
        "Calls by outcome (_count: every outcome the breaker recorded; _sum: the seconds "
        "reported with outcomes sent one by one; batched plain successes carry none)",
        labels=["name", "kind"],
        unit="seconds",
    )
    not_permitted = CounterMetricFamily(
        PREFIX + "not_permitted_calls", "Calls rejected by the breaker", labels=["name"]
    )
    slow = GaugeMetricFamily(
        PREFIX + "slow_calls",
        "Calls slower than slow_call_duration since the breaker started, by outcome",
        labels=["name", "kind"],
    )
    failure_rate = GaugeMetricFamily(
        PREFIX + "failure_rate",
        "Failure rate in the window, percent; -1 below min_calls",
        labels=["name"],
    )
    slow_rate = GaugeMetricFamily(
        PREFIX + "slow_call_rate",
        "Slow-call rate in the window, percent; -1 below min_calls",
        labels=["name"],
    )
    buffered = GaugeMetricFamily(
        PREFIX + "buffered_calls", "Outcomes in the window", labels=["name"]
    )
    transitions = CounterMetricFamily(
        PREFIX + "transitions",
        "State transitions since the breaker started",
        labels=["name", "from_state", "to_state"],
    )
    open_until = GaugeMetricFamily(
        PREFIX + "open_until_timestamp_seconds",
        "When an open breaker admits its first trial, seconds since the epoch; 0 when not open",
        labels=["name"],
    )
    trials = GaugeMetricFamily(
        PREFIX + "trials_in_flight", "Half-open trial permits held", labels=["name"]
    )
    inbox = GaugeMetricFamily(
        "breakerd_inbox_depth", "Messages waiting in the breaker actor's inbox", labels=["name"]
    )
    readings = list(readings)  # read twice: the budgets' families follow
    for r in readings:
        status = r.status
        snapshot = status.snapshot
        name = snapshot.name
        for labels, value in _states(name, snapshot.state):
            state.add_metric(labels, value)
        calls.add_metric([name, "successful"], status.successes, r.seconds[0])
        calls.add_metric([name, "failed"], status.failures, r.seconds[1])
        calls.add_metric([name, "ignored"], status.ignored, r.seconds[2])
        not_permitted.add_metric([name], status.rejections)
        slow.add_metric([name, "successful"], r.slow[0])
        slow.add_metric([name, "failed"], r.slow[1])
        failure_rate.add_metric([name], _rate(snapshot.failure_rate, snapshot.calls, r.min_calls))
        slow_rate.add_metric([name], _rate(snapshot.slow_call_rate, snapshot.calls, r.min_calls))
        buffered.add_metric([name], snapshot.calls)
        for (source, target), count in sorted(r.transitions.items()):
            transitions.add_metric([name, source, target], count)
        open_until.add_metric([name], r.open_until or 0.0)
        trials.add_metric([name], snapshot.trials_in_flight)
        inbox.add_metric([name], r.inbox)
    return [
        state,
        calls,
        not_permitted,
        slow,
        failure_rate,
        slow_rate,
        buffered,
        transitions,
        open_until,
        trials,
        inbox,
        *budget_metrics(r.status for r in readings),
    ]


def budget_metrics(statuses: Iterable[BreakerStatus]) -> list[Metric]:
    """The budget families of these breakers: samples only for a breaker with budgets,
    and for what they know (no remaining count before the API's headers said one)."""
    max_rate = GaugeMetricFamily(
        "breakerd_budget_max_rate",
        "max_rate, calls per second (paced at 95 percent of it)",
        labels=["name"],
    )
    max_concurrent = GaugeMetricFamily(
        "breakerd_budget_max_concurrent", "max_concurrent, calls in flight at most", labels=["name"]
    )
    leases = GaugeMetricFamily(
        "breakerd_budget_leases_in_use", "max_concurrent leases held", labels=["name"]
    )
    waiters = GaugeMetricFamily(
        "breakerd_budget_waiters",
        "Calls waiting to leave: a rate slot still ahead, or queued for a lease",
        labels=["name"],
    )
    rejections = CounterMetricFamily(
        "breakerd_budget_rejections",
        "Admissions refused by the budgets, by reason (rate_budget, concurrency)",
        labels=["name", "reason"],
    )
    headers = [
        (
            GaugeMetricFamily(
                f"breakerd_budget_remaining_{limit}",
                f"{limit.capitalize()} the API's headers said are left, less those spent since",
                labels=["name"],
            ),
            GaugeMetricFamily(
                f"breakerd_budget_reset_{limit}_seconds",
                f"Seconds until the API's {limit} count resets, as its headers said",
                labels=["name"],
            ),
        )
        for limit in ("requests", "tokens")
    ]
    for status in statuses:
        budget = status.budget
        if budget is None:
            continue
        name = status.snapshot.name
        if budget.max_rate is not None:
            max_rate.add_metric([name], budget.max_rate)
        if budget.max_concurrent is not None:
            max_concurrent.add_metric([name], budget.max_concurrent)
            leases.add_metric([name], budget.leases_in_use)
        waiters.add_metric([name], budget.waiters)
        rejections.add_metric([name, "rate_budget"], budget.rate_rejections)
        rejections.add_metric([name, "concurrency"], budget.concurrency_rejections)
        for (remaining, reset), left, seconds in zip(
            headers,
            (budget.remaining_requests, budget.remaining_tokens),
            (budget.reset_requests, budget.reset_tokens),
            strict=True,
        ):
            if left is not None:
                remaining.add_metric([name], left)
            if seconds is not None:
                reset.add_metric([name], seconds)
    return [max_rate, max_concurrent, leases, waiters, rejections, *(m for h in headers for m in h)]


class BreakerCollector(Collector):
    """A prometheus-client collector of the breakers ``actors()`` returns."""

    def __init__(
        self,
        actors: Callable[[], Sequence[BreakerActor]],
        clock: Callable[[], float],
        *,
        clients: Callable[[], int] | None = None,
        timeout: float = SCRAPE_TIMEOUT,
        budgets: BudgetReader | None = None,
    ) -> None:
        self._actors = actors
        self._clock = clock
        self._clients = clients
        self._timeout = timeout
        self._budgets = budgets

    def collect(self) -> Iterable[Metric]:
        readings = read_actors(self._actors(), self._clock, self._timeout, self._budgets)
        yield from breaker_metrics(readings)
        if self._clients is not None:
            yield GaugeMetricFamily(
                "breakerd_clients_connected",
                "Client connections to the daemon",
                value=self._clients(),
            )


class MetricsServer:
    """prometheus-client's HTTP server in a thread of its own, at ``/metrics``."""

    def __init__(self, collector: Collector, host: str, port: int) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self._server, self._thread = start_http_server(port, host, registry=self.registry)
        self.port: int = self._server.server_address[1]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
