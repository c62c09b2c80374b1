"""Error classes of the OpenAI rules and the rejections they explain, with the real SDK.

Every error comes out of ``AsyncOpenAI`` talking to an ``httpx2.MockTransport``
that answers in the shapes of OpenAI, Azure OpenAI and vLLM; the breaker runs
on an ``ActorSystem`` with a hand-advanced clock: nothing sleeps.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

import httpx2
import openai
import pytest
import structlog.testing

from breakerd.actor.testing import FakeClock
from breakerd.clients import (
    ActorSystem,
    CircuitBreaker,
    CircuitBreakerOpenError,
    CircuitState,
    RateLimited,
)
from breakerd.clients._openai import openai_error_class, parse_rate_limit_reset
from breakerd.protocol import Outcome

pytestmark = pytest.mark.anyio

Respond = Callable[[httpx2.Request], httpx2.Response]
TIMEOUT = 30.0


def status(
    code: int, headers: dict[str, str] | None = None, error_code: str | None = None
) -> Respond:
    body = {"error": {"message": f"status {code}", "type": "test_error", "code": error_code}}
    return lambda request: httpx2.Response(code, headers=headers, json=body)


def client(respond: Callable[[httpx2.Request], Any]) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        api_key="sk-test",
        base_url="http://api.openai.test/v1",
        max_retries=0,
        timeout=5.0,
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(respond)),
    )


async def ask(sdk: openai.AsyncOpenAI, model: str = "gpt-4o") -> str:
    response = await sdk.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}]
    )
    return str(response.choices[0].message.content)


async def sdk_error(respond: Respond) -> openai.OpenAIError:
    sdk = client(respond)
    try:
        await ask(sdk)
    except openai.OpenAIError as exc:
        return exc
    finally:
        await sdk.close()
    raise AssertionError("the SDK did not raise")


# -- the classes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "retry_after"),
    [
        # OpenAI: the request budget is spent, it resets in 6m0s.
        (
            {
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": "6m0s",
                "x-ratelimit-remaining-tokens": "1000",
                "x-ratelimit-reset-tokens": "1s",
            },
            360.0,
        ),
        # The token budget is spent: its reset counts, not the requests'.
        (
            {
                "x-ratelimit-remaining-requests": "10",
                "x-ratelimit-reset-requests": "1s",
                "x-ratelimit-remaining-tokens": "0",
                "x-ratelimit-reset-tokens": "1.5s",
            },
            1.5,
        ),
        # Both spent: the later one.
        (
            {
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": "20ms",
                "x-ratelimit-remaining-tokens": "0",
                "x-ratelimit-reset-tokens": "1m30s",
            },
            90.0,
        ),
        # Budgets with room say nothing about this 429: the normal timeout.
        (
            {"x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "9s"},
            None,
        ),
        # Azure OpenAI: retry-after-ms wins over everything.
        (
            {
                "retry-after-ms": "2500",
                "retry-after": "3",
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": "60s",
            },
            2.5,
        ),
        # vLLM and most gateways: a plain Retry-After beats the reset headers.
        (
            {
                "retry-after": "4",
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": "60",
            },
            4.0,
        ),
        # A reset in plain seconds (some gateways).
        ({"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "12"}, 12.0),
    ],
    ids=["requests", "tokens", "both", "room", "azure", "vllm", "plain-seconds"],
)
async def test_rate_limited_takes_its_deadline_from_the_headers(
    headers: dict[str, str], retry_after: float | None
) -> None:
    exc = await sdk_error(status(429, headers, error_code="rate_limit_exceeded"))
    assert isinstance(exc, openai.RateLimitError)
    found = openai_error_class(exc)
    assert found is not None
    assert found.outcome is Outcome.RATE_LIMITED
    assert found.reason == "rate_limited"
    assert found.error_code == "rate_limit_exceeded"
    assert found.retry_after == (None if retry_after is None else pytest.approx(retry_after))


@pytest.mark.parametrize("raw", ["", "abc", "5x", "-1", "1s junk", "nan", "inf"])
def test_a_bad_reset_header_is_no_deadline(raw: str) -> None:
    headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": raw}
    assert parse_rate_limit_reset(headers) is None


@pytest.mark.parametrize(
    ("respond", "reason", "code"),
    [
        (status(429, error_code="insufficient_quota"), "quota", "insufficient_quota"),
        (status(402), "quota", "payment_required"),
    ],
    ids=["insufficient-quota", "402"],
)
async def test_quota_classes(respond: Respond, reason: str, code: str) -> None:
    found = openai_error_class(await sdk_error(respond))
    assert found is not None
    assert (found.outcome, found.reason, found.error_code) == (Outcome.RATE_LIMITED, reason, code)


@pytest.mark.parametrize("code", [500, 502, 503, 529])
async def test_overloaded_is_a_failure(code: int) -> None:
    found = openai_error_class(await sdk_error(status(code)))
    assert found is not None
    assert found.outcome is Outcome.FAILURE


# -- through the breaker: durations and explanations ------------------------------------------


def state(guard: CircuitBreaker) -> CircuitState:
    # A function, not the property: mypy would narrow the property across awaits.
    return guard.state


def breaker(system: ActorSystem, **kwargs: Any) -> CircuitBreaker:
    settings: dict[str, Any] = {"timeout": TIMEOUT, "min_calls": 5, "system": system}
    settings.update(kwargs)
    return CircuitBreaker("LLM", **settings)


async def test_the_rejection_says_why_until_when_and_who(
    system: ActorSystem, clock: FakeClock
) -> None:
    sdk = client(status(429, {"retry-after": "7"}, error_code="rate_limit_exceeded"))
    guard = breaker(system)
    with pytest.raises(openai.RateLimitError):
        await guard.call(ask, sdk)
    before = time.time()
    with pytest.raises(CircuitBreakerOpenError) as info:
        await guard.call(ask, sdk)
    error = info.value
    assert error.state == "open"
    assert error.scope is None
    assert error.reason == "rate_limited"
    assert error.error_code == "rate_limit_exceeded"
    assert error.retry_after == pytest.approx(7.0)
    assert error.open_until is not None
    assert before + 7.0 - 1 < error.open_until < time.time() + 7.0 + 1
    assert error.opened_by_pid == os.getpid()
    text = str(error)
    assert "'LLM' is open" in text
    assert "rate_limited" in text
    assert "rate_limit_exceeded" in text
    assert "retry after 7.000s" in text
    assert "back off" in text
    assert text.count(". ") == 0  # one sentence
    await sdk.close()


async def test_quota_opens_for_quota_timeout_then_one_trial_and_logs_once(
    system: ActorSystem, clock: FakeClock
) -> None:
    answers = [status(429, {"retry-after": "1"}, error_code="insufficient_quota")] * 2
    sdk = client(lambda request: answers.pop(0)(request) if answers else ok(request))
    guard = breaker(system, quota_timeout=120.0, max_timeout=60.0)
    with structlog.testing.capture_logs() as logs:
        with pytest.raises(openai.RateLimitError):
            await guard.call(ask, sdk)
        assert guard.snapshot.open_until == pytest.approx(clock() + 120.0)
        with pytest.raises(CircuitBreakerOpenError) as info:
            await guard.call(ask, sdk)
        assert info.value.reason == "quota"
        assert "add credit or raise the quota" in str(info.value)
        clock.advance(120.0)
        with pytest.raises(openai.RateLimitError):
            await guard.call(ask, sdk)  # the one trial, refused again
        assert guard.state is CircuitState.OPEN
    quota = [entry for entry in logs if entry["event"] == "openai_insufficient_quota"]
    assert len(quota) == 1
    assert quota[0]["log_level"] == "error"
    clock.advance(120.0)
    assert await guard.call(ask, sdk) == "hello"
    assert state(guard) is CircuitState.CLOSED
    await sdk.close()


async def test_auth_is_ignored_unless_auth_opens(system: ActorSystem, clock: FakeClock) -> None:
    sdk = client(status(401))
    quiet = breaker(system)
    with pytest.raises(openai.AuthenticationError):
        await quiet.call(ask, sdk)
    assert quiet.state is CircuitState.CLOSED
    strict = CircuitBreaker(
        "LLM-auth", timeout=TIMEOUT, system=system, auth_opens=True, quota_timeout=300.0
    )
    with structlog.testing.capture_logs() as logs, pytest.raises(openai.AuthenticationError):
        await strict.call(ask, sdk)
    assert strict.state is CircuitState.OPEN
    assert strict.snapshot.reason == "auth"
    assert strict.snapshot.open_until == pytest.approx(clock() + 300.0)
    assert [entry["log_level"] for entry in logs if entry["event"] == "openai_auth_error"] == [
        "error"
    ]
    await sdk.close()


async def test_a_later_short_retry_after_never_shortens_an_open(
    system: ActorSystem, clock: FakeClock
) -> None:
    # Two calls in flight while the breaker is closed; the long 429 lands
    # first, the short one after: the open keeps the long deadline.
    gates = [asyncio.Event(), asyncio.Event()]
    hints = ["30", "2"]
    seen: list[int] = []
    both_out = asyncio.Event()

    async def respond(request: httpx2.Request) -> httpx2.Response:
        index = len(seen)
        seen.append(index)
        if len(seen) == 2:
            both_out.set()
        await gates[index].wait()
        return status(429, {"retry-after": hints[index]})(request)

    sdk = client(respond)
    guard = breaker(system)
    first = asyncio.ensure_future(guard.call(ask, sdk))
    second = asyncio.ensure_future(guard.call(ask, sdk))
    await both_out.wait()
    gates[0].set()
    with pytest.raises(openai.RateLimitError):
        await first
    assert guard.snapshot.open_until == pytest.approx(clock() + 30.0)
    generation = guard.snapshot.generation
    gates[1].set()
    with pytest.raises(openai.RateLimitError):
        await second
    assert guard.snapshot.open_until == pytest.approx(clock() + 30.0)
    assert guard.snapshot.generation == generation
    await sdk.close()


class Limited(Exception):
    """A service's 429 with a retry-after, as a user's classifier sees it."""


def limited(exc: BaseException) -> RateLimited | None:
    return RateLimited(float(exc.args[0])) if isinstance(exc, Limited) else None


async def test_a_later_long_retry_after_extends_the_open(
    system: ActorSystem, clock: FakeClock
) -> None:
    gates = [asyncio.Event(), asyncio.Event()]

    async def upstream(index: int, seconds: float) -> None:
        await gates[index].wait()
        raise Limited(seconds)

    guard = breaker(system, classify=limited)
    first = asyncio.ensure_future(guard.call(upstream, 0, 5.0))
    second = asyncio.ensure_future(guard.call(upstream, 1, 50.0))
    await asyncio.sleep(0)
    gates[0].set()
    with pytest.raises(Limited):
        await first
    assert guard.snapshot.open_until == pytest.approx(clock() + 5.0)
    opened = guard.snapshot.generation
    gates[1].set()
    with pytest.raises(Limited):
        await second
    # A new generation, so every proxy sees the later deadline.
    assert guard.snapshot.generation == opened + 1
    assert guard.snapshot.open_until == pytest.approx(clock() + 50.0)
    actor = system.get("LLM")
    assert actor is not None
    assert actor.restarts == 0  # the open-to-open transition is logged, not a crash
    with pytest.raises(CircuitBreakerOpenError) as info:
        await guard.call(upstream, 0, 1.0)
    assert info.value.retry_after == pytest.approx(50.0)


def ok(request: httpx2.Request) -> httpx2.Response:
    return httpx2.Response(
        200,
        json={
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": 0,
            "model": "gpt-4o",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "hello"},
                    "finish_reason": "stop",
                }
            ],
        },
    )
