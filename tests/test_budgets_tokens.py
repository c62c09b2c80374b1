"""Host-wide token budgets end to end: a real daemon, worker processes, a real local server.

(The token count's rules, with ``now`` passed in, are in test_budget_ops.py.)

The stand-in server (``limited_server.LimitedServer`` with ``tokens=``)
enforces a token limit per API key over a sliding window (a tokens-per-minute
limit, scaled down to seconds so a test sees it reset), charges each request
its ``max_tokens`` plus one prompt token when it arrives, answers with
OpenAI's ``x-ratelimit-*-tokens`` headers and a ``usage`` of what it charged.
The workers (``budget_worker.py``) ask for ``max_tokens`` on every call,
through ``protect()`` and a daemon-mode breaker: the daemon debits each
slot's token estimate from what the headers said is left, and holds the
calls past it until the reset.

Each worker makes one call before the start (``warm_up``): a process lets
its calls go without asking the daemon until a response has told it of a
budget (``_budget_link``), so calls made at once by processes that have seen
nothing yet are not counted against the tokens by anyone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import DaemonProcess, poll_until
from limited_server import LimitedServer
from test_budgets_daemon import results, start_workers, total

#: Tokens per window: ten calls of ``MAX_TOKENS`` (plus a prompt token) each.
TOKENS = 1000
TOKEN_WINDOW = 2.0
MAX_TOKENS = 99
SECONDS = 5.0


@pytest.fixture
def token_daemon(tmp_short: Path) -> Any:
    process = DaemonProcess(tmp_short / "s.sock").wait_ready(started_log=True)
    poll_until(process.socket_path.exists, 10)
    yield process
    process.kill()


def test_the_host_stays_under_a_token_limit_and_resumes_at_its_reset(
    token_daemon: DaemonProcess,
) -> None:
    # Requests are plenty (1,000 a second): only the tokens bind.
    with LimitedServer(limit=1000, tokens=TOKENS, token_window=TOKEN_WINDOW) as server:
        _, procs = start_workers(
            server,
            token_daemon.socket_path,
            {"wait": TOKEN_WINDOW + 1.0},
            processes=2,
            threads=4,
            seconds=SECONDS,
            max_tokens=MAX_TOKENS,
            warm_up=True,
        )
        found = results(procs)
        statuses = server.statuses()
        charges = sorted(server.charges)
    ok = total(found, "ok")
    assert server.token_429s == 0, (statuses, found)
    assert statuses.get(429, 0) == 0, (statuses, found)
    assert ok + 2 == statuses.get(200, 0)  # and the two warm-up calls
    per_window = TOKENS // (MAX_TOKENS + 1)
    # The first window holds ten calls at most; the rest were held until the
    # tokens reset, then admitted: calls keep succeeding window after window.
    first = charges[0][0]
    later = [at for at, _ in charges if at >= first + TOKEN_WINDOW]
    assert later, charges
    assert ok >= 2 * per_window, (ok, found)
    # Nobody went over the limit in any window, as the server counts.
    for i, (at, _) in enumerate(charges):
        in_window = sum(c for t, c in charges[i:] if t < at + TOKEN_WINDOW)
        assert in_window <= TOKENS
