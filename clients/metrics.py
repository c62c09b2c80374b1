"""Prometheus metrics of the breakers in this process (the ``metrics`` extra).

    from prometheus_client import REGISTRY
    from breakerd.clients.metrics import BreakerCollector

    REGISTRY.register(BreakerCollector())

The same metric names and labels as ``breakerd serve --metrics`` (the README
lists them), for the in-process breakers of one actor system. Breakers in
daemon mode live in the daemon: scrape the daemon for those (one shows up
here only once it has fallen back to a local breaker during an outage).
"""

from __future__ import annotations

from collections.abc import Iterable

try:
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "breakerd.clients.metrics needs prometheus-client: pip install 'breakerd[metrics]'"
    ) from exc
from prometheus_client.core import Metric

from breakerd.actor import ActorSystem, default_system
from breakerd.actor.daemon._metrics import SCRAPE_TIMEOUT, breaker_metrics, read_actors
from breakerd.protocol import BudgetStatus

from ._globals import budgets_of

__all__ = ["BreakerCollector"]


class BreakerCollector(Collector):
    """Reports the breakers of ``system`` (default: the process-wide one) at every scrape.

    A scrape asks each breaker's actor for its state (one message per breaker,
    nothing on the call path) and waits up to ``timeout`` seconds for the
    answers; a breaker that does not answer in time, and every breaker when
    the scrape runs inside an event loop (which it must not block), is read
    directly from its published state instead.
    """

    def __init__(self, system: ActorSystem | None = None, *, timeout: float = SCRAPE_TIMEOUT):
        self._system = system
        self._timeout = timeout

    def collect(self) -> Iterable[Metric]:
        system = self._system if self._system is not None else default_system()

        def budgets(name: str, now: float) -> BudgetStatus | None:
            # An embedded breaker's budgets are keyed by its clock (``shared_budgets``).
            found = budgets_of((id(system.clock), name))
            return None if found is None else found.status()

        return breaker_metrics(read_actors(system.actors(), system.clock, self._timeout, budgets))
