"""Budgets per scope (``scope_budgets=``) on an embedded breaker.

Time is a ``FakeClock``: a budgeted call that waits sleeps on it, which
moves it at once. Concurrency tests use real threads that block on events,
never on a duration.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from test_budgets_openai import LimitedServer, sync_client

from breakerd.actor import ActorSystem
from breakerd.actor._budget import SAFETY_MARGIN
from breakerd.actor.testing import FakeClock
from breakerd.clients import CircuitBreaker, CircuitBreakerOpenError, CircuitState, RateLimited
from breakerd.clients.openai import protect
from breakerd.protocol import BudgetExceededError

GAP = 1 / (20 * SAFETY_MARGIN)  # the spacing of "20/s"
MESSAGES = [{"role": "user", "content": "hi"}]


def ok(model: str | None = None) -> str:
    return "ok"


def test_a_scope_at_its_rate_is_refused_while_other_scopes_and_the_parent_go_on(
    system: ActorSystem,
) -> None:
    breaker = CircuitBreaker(
        "sb-rate",
        scope="model",
        scope_budgets={"gpt-4o": {"max_rate": "1/min"}},
        system=system,
    )
    assert breaker.call_sync(ok, model="gpt-4o") == "ok"
    with pytest.raises(BudgetExceededError) as caught:
        breaker.call_sync(ok, model="gpt-4o")
    assert caught.value.reason == "rate_budget"
    assert caught.value.name == "sb-rate/gpt-4o"
    assert caught.value.scope == "gpt-4o"
    assert caught.value.retry_after == pytest.approx(60 / SAFETY_MARGIN)
    # Another model has no budget of its own, and unscoped calls only the parent's (none).
    assert [breaker.call_sync(ok, model="gpt-4o-mini") for _ in range(5)] == ["ok"] * 5
    assert [breaker.call_sync(ok) for _ in range(5)] == ["ok"] * 5
    assert breaker.budgets is None
    scope_budgets = breaker.scoped("gpt-4o").budgets
    assert scope_budgets is not None
    assert scope_budgets.name == "sb-rate/gpt-4o"


@pytest.mark.anyio
async def test_async_scoped_calls_are_refused_by_their_scope_alone(system: ActorSystem) -> None:
    breaker = CircuitBreaker(
        "sb-async", scope="model", scope_budgets={"a": {"max_rate": "1/min"}}, system=system
    )

    async def call(model: str) -> str:
        return model

    assert await breaker.call(call, model="a") == "a"
    with pytest.raises(BudgetExceededError, match="sb-async/a"):
        await breaker.call(call, model="a")
    assert await breaker.call(call, model="b") == "b"


def test_a_scope_waits_for_its_slots_while_another_scope_goes_at_once(
    system: ActorSystem, clock: FakeClock
) -> None:
    breaker = CircuitBreaker(
        "sb-wait",
        scope="model",
        scope_budgets=lambda key: {"max_rate": "20/s"} if key == "slow" else None,
        wait=1.0,
        system=system,
    )

    def when(model: str) -> float:
        return clock()

    start = clock()
    paced = []
    for _ in range(5):
        paced.append(breaker.call_sync(when, model="slow") - start)
        before = clock()
        assert breaker.call_sync(when, model="fast") == before  # no wait for the other scope
    assert paced == pytest.approx([i * GAP for i in range(5)])


def test_the_parents_rate_binds_every_scope_and_a_scopes_refusal_spends_none_of_it(
    system: ActorSystem, clock: FakeClock
) -> None:
    breaker = CircuitBreaker(
        "sb-order",
        scope="model",
        max_rate="1/min",
        burst=2,
        scope_budgets={"a": {"max_rate": "1/min"}},
        system=system,
    )
    assert breaker.call_sync(ok, model="a") == "ok"  # the parent's first slot, a's only one
    with pytest.raises(BudgetExceededError) as by_scope:
        breaker.call_sync(ok, model="a")
    assert by_scope.value.name == "sb-order/a"
    # The scope refused before the parent was asked: its second slot is still there.
    assert breaker.call_sync(ok, model="b") == "ok"
    with pytest.raises(BudgetExceededError) as by_parent:
        breaker.call_sync(ok, model="c")
    assert by_parent.value.name == "sb-order"
    with pytest.raises(BudgetExceededError) as unscoped:
        breaker.call_sync(ok)
    assert unscoped.value.name == "sb-order"


def test_a_call_the_parents_budgets_refuse_is_refused_at_once(
    system: ActorSystem, clock: FakeClock
) -> None:
    breaker = CircuitBreaker(
        "sb-final",
        scope="model",
        max_rate="1/min",
        scope_budgets={"a": {"max_rate": "20/s"}},
        wait=1.0,
        system=system,
    )
    breaker.call_sync(ok, model="a")
    clock.advance(GAP)
    before = clock()
    with pytest.raises(BudgetExceededError) as caught:
        breaker.call_sync(ok, model="a")
    assert caught.value.name == "sb-final"
    # The parent's turn is further than the wait: no waiting it out, and no
    # more of the scope's slots spent asking again.
    assert clock() == before


def test_a_scoped_call_does_not_wait_for_a_parent_shut_past_its_wait(
    system: ActorSystem, clock: FakeClock
) -> None:
    def quota(exc: BaseException) -> RateLimited | None:
        return RateLimited(reason="quota") if isinstance(exc, KeyError) else None

    breaker = CircuitBreaker(
        "sb-shut",
        scope="model",
        scope_budgets={"a": {"max_rate": "20/s"}},
        classify=quota,
        wait=1.0,
        system=system,
    )

    def out_of_quota(model: str) -> None:
        raise KeyError(model)

    with pytest.raises(KeyError):
        breaker.call_sync(out_of_quota, model="a")
    assert breaker.state is CircuitState.OPEN  # the key's quota: for quota_timeout
    before = clock()
    with pytest.raises(CircuitBreakerOpenError) as caught:
        breaker.call_sync(ok, model="a")
    assert caught.value.name == "sb-shut"
    assert caught.value.reason == "quota"
    # Refused at once, without waiting for its scope's next slot: the key
    # will not reopen within the wait.
    assert clock() == before


def _hold(
    breaker: CircuitBreaker, model: str, started: threading.Event, release: threading.Event
) -> threading.Thread:
    def held(model: str) -> None:
        started.set()
        release.wait(10)

    thread = threading.Thread(target=breaker.call_sync, args=(held,), kwargs={"model": model})
    thread.start()
    assert started.wait(10)
    return thread


def test_the_parents_max_concurrent_binds_across_scopes_and_a_scopes_its_own(
    system: ActorSystem,
) -> None:
    breaker = CircuitBreaker(
        "sb-conc",
        scope="model",
        max_concurrent=3,
        scope_budgets={"a": {"max_concurrent": 1}},
        system=system,
    )
    release = threading.Event()
    threads = [_hold(breaker, "a", threading.Event(), release)]
    try:
        with pytest.raises(BudgetExceededError) as by_scope:
            breaker.call_sync(ok, model="a")
        assert by_scope.value.reason == "concurrency"
        assert by_scope.value.name == "sb-conc/a"
        # A call its scope refused held none of the key's leases.
        assert breaker.in_flight == 1
        assert breaker.scoped("a").in_flight == 1
        threads += [_hold(breaker, m, threading.Event(), release) for m in ("b", "c")]
        assert breaker.in_flight == 3
        for model in ("d", None):
            with pytest.raises(BudgetExceededError) as by_parent:
                breaker.call_sync(ok, model=model)
            assert by_parent.value.reason == "concurrency"
            assert by_parent.value.name == "sb-conc"
    finally:
        release.set()
        for thread in threads:
            thread.join(10)
    assert breaker.in_flight == 0
    assert breaker.scoped("a").in_flight == 0
    assert breaker.call_sync(ok, model="a") == "ok"


def test_headers_feed_the_scope_of_the_call_that_got_them(
    system: ActorSystem, clock: FakeClock
) -> None:
    breaker = CircuitBreaker("sb-headers", scope="model", scope_budgets={}, system=system)

    def exhausted(model: str | None = None) -> str:
        breaker.observe_limits(remaining_requests=0, reset_requests=30.0)
        return "ok"

    breaker.call_sync(exhausted, model="gpt-4o")
    with pytest.raises(BudgetExceededError) as caught:
        breaker.call_sync(ok, model="gpt-4o")
    assert caught.value.name == "sb-headers/gpt-4o"
    assert caught.value.retry_after == pytest.approx(30.0)
    # The model's limit, not the key's: other models and unscoped calls go on.
    assert breaker.call_sync(ok, model="gpt-4o-mini") == "ok"
    assert breaker.call_sync(ok) == "ok"
    assert breaker.budgets is None
    # Outside a scoped call the parent takes them, as without scope_budgets.
    breaker.observe_limits(remaining_requests=0, reset_requests=10.0)
    with pytest.raises(BudgetExceededError) as parent:
        breaker.call_sync(ok)
    assert parent.value.name == "sb-headers"
    clock.advance(30.0)
    assert breaker.call_sync(ok, model="gpt-4o") == "ok"


def test_protect_feeds_each_models_headers_to_its_scope(
    system: ActorSystem, clock: FakeClock
) -> None:
    server = LimitedServer(
        clock, {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s"}
    )
    breaker = CircuitBreaker(
        "sb-protect",
        scope="model",
        scope_budgets={"gpt-4o": {"max_rate": "600/min"}},
        system=system,
    )
    client: Any = protect(sync_client(server), breaker)
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    with pytest.raises(BudgetExceededError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.name == "sb-protect/gpt-4o"
    assert caught.value.retry_after == pytest.approx(2.0)
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # its own limit
    with pytest.raises(BudgetExceededError):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert len(server.arrivals) == 2  # the API never saw the calls it would have refused
    assert breaker.budgets is None
    clock.advance(2.0)
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert len(server.arrivals) == 3


def test_usage_corrects_the_scopes_token_estimate(system: ActorSystem, clock: FakeClock) -> None:
    server = LimitedServer(
        clock,
        {"x-ratelimit-remaining-tokens": "1000", "x-ratelimit-reset-tokens": "60s"},
        used=50,
    )
    breaker = CircuitBreaker("sb-usage", scope="model", scope_budgets={}, system=system)
    client: Any = protect(sync_client(server), breaker)
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # learns: 1000 left
    server.headers = [{}]  # no more headers: only usage corrects the estimate now
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=900)
    # 900 estimated, 50 used: 900 more fit again (1000 - 50 - 50 used so far).
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=850)
    assert len(server.arrivals) == 3


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"gpt-4o": {"max_rate": "fast"}}, r"scope_budgets\['gpt-4o'\]: max_rate must be"),
        ({"gpt-4o": {"rate": "1/s"}}, r"scope_budgets\['gpt-4o'\]: unknown field 'rate'"),
        ({"gpt-4o": {"wait": 1.0}}, r"scope_budgets\['gpt-4o'\]: unknown field 'wait'"),
        ({"gpt-4o": {"max_concurrent": 0}}, r"scope_budgets\['gpt-4o'\]: max_concurrent"),
        ({"gpt-4o": {"burst": 3}}, r"scope_budgets\['gpt-4o'\]: burst only applies"),
        ({"gpt-4o": "500/min"}, r"scope_budgets\['gpt-4o'\] must be a dict"),
        ({"": {"max_rate": "1/s"}}, r"scope_budgets keys must be non-empty strings"),
        ("500/min", r"scope_budgets must be a mapping"),
    ],
)
def test_bad_scope_budgets_are_refused_naming_the_key_and_field(
    system: ActorSystem, spec: Any, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        CircuitBreaker("sb-bad", scope="model", scope_budgets=spec, system=system)


def test_scope_budgets_need_scopes_and_a_callables_answer_is_checked(
    system: ActorSystem,
) -> None:
    with pytest.raises(ValueError, match="scope_budgets needs scope="):
        CircuitBreaker("sb-noscope", scope_budgets={"a": {"max_rate": "1/s"}}, system=system)
    bad: Callable[[str], Any] = lambda key: {"max_rate": 5}  # noqa: E731
    breaker = CircuitBreaker("sb-callable", scope="model", scope_budgets=bad, system=system)
    with pytest.raises(ValueError, match=r"scope_budgets\('a'\): max_rate must be"):
        breaker.call_sync(ok, model="a")


def test_an_expired_scope_takes_its_budgets_and_past_max_scopes_the_parent_governs(
    system: ActorSystem, clock: FakeClock
) -> None:
    breaker = CircuitBreaker(
        "sb-life",
        scope="model",
        scope_ttl=10.0,
        max_scopes=1,
        scope_budgets=lambda key: {"max_rate": "1/min"},
        system=system,
    )
    breaker.call_sync(ok, model="a")
    # Past max_scopes "b" has no scope: the parent (no budgets) alone governs it.
    assert [breaker.call_sync(ok, model="b") for _ in range(3)] == ["ok"] * 3
    old = breaker.scoped("a")
    assert old.budgets is not None
    clock.advance(11.0)
    # "a" has been idle past scope_ttl: it goes with its budgets, and "b"
    # gets the free place, a scope of its own with its budgets.
    breaker.call_sync(ok, model="b")
    assert breaker.scope_count == 1
    assert old.budgets is None
    with pytest.raises(BudgetExceededError, match="sb-life/b"):
        breaker.call_sync(ok, model="b")


def test_without_scope_budgets_the_scopes_share_the_parents_budgets(
    system: ActorSystem,
) -> None:
    breaker = CircuitBreaker("sb-none", scope="model", max_rate="1/min", system=system)
    breaker.call_sync(ok, model="a")
    with pytest.raises(BudgetExceededError) as caught:
        breaker.call_sync(ok, model="b")
    assert caught.value.name == "sb-none"


def test_the_fallback_answers_a_scopes_refusal(system: ActorSystem) -> None:
    breaker = CircuitBreaker(
        "sb-fallback",
        scope="model",
        scope_budgets={"a": {"max_rate": "1/min"}},
        fallback=lambda model: f"later:{model}",
        system=system,
    )
    assert breaker.call_sync(ok, model="a") == "ok"
    assert breaker.call_sync(ok, model="a") == "later:a"
