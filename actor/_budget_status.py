"""What a breaker's budgets say about themselves: ``breaker.status()`` and the metrics.

Pure, like the budgets: ``now`` is passed in. Embedded, a process's
``Budgets`` reports its own budgets; the daemon's ``BudgetTable`` reports
the host's.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from breakerd.protocol import BudgetStatus

if TYPE_CHECKING:  # the budgets import this module: no cycle at run time
    from ._budget import ConcurrencyBudget, HeaderBudget, RateBudget

__all__ = ["budget_status"]


def budget_status(
    now: float,
    rate: RateBudget | None,
    concurrency: ConcurrencyBudget | None,
    headers: HeaderBudget | None,
    *,
    queued: int = 0,
    rejections: dict[str, int] | None = None,
) -> BudgetStatus:
    """What ``breaker.status()`` and the metrics say of these budgets at ``now``.

    ``queued``: calls waiting for a lease (the caller's queue); ``rejections``:
    refusals so far by reason (``rate_budget``, ``concurrency``).
    """
    counts = rejections or {}
    remaining_requests = remaining_tokens = reset_requests = reset_tokens = None
    if headers is not None:
        # inf: nothing said, or said for a window now past.
        left = headers.remaining_requests(now)
        remaining_requests = None if math.isinf(left) else left
        left = headers.remaining_tokens(now)
        remaining_tokens = None if math.isinf(left) else left
        reset_requests = headers.reset_requests_in(now)
        reset_tokens = headers.reset_tokens_in(now)
    return BudgetStatus(
        max_rate=None if rate is None else rate.rate,
        burst=None if rate is None else rate.burst,
        max_concurrent=None if concurrency is None else concurrency.limit,
        leases_in_use=0 if concurrency is None else concurrency.in_use,
        waiters=queued + (0 if rate is None else rate.backlog(now)),
        remaining_requests=remaining_requests,
        remaining_tokens=remaining_tokens,
        reset_requests=reset_requests,
        reset_tokens=reset_tokens,
        rate_rejections=counts.get("rate_budget", 0),
        concurrency_rejections=counts.get("concurrency", 0),
    )
