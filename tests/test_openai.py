"""The OpenAI rules, checked against exceptions the real openai SDK raises.

Every error here comes out of ``AsyncOpenAI.chat.completions.create`` talking
to an ``httpx2.MockTransport``, so the tests follow the SDK's own mapping
from responses to exception types. The breaker runs on an ``ActorSystem``
with a hand-advanced clock: nothing sleeps.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import AsyncIterator, Callable
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
    Outcome,
    RateLimited,
    Verdict,
)
from breakerd.clients.openai import classify_openai, parse_retry_after

pytestmark = pytest.mark.anyio

Respond = Callable[[httpx2.Request], httpx2.Response]


class Upstream:
    """The openai SDK wired to a scripted transport that counts requests."""

    def __init__(self, *responses: Respond) -> None:
        # The last response repeats for every request past the script.
        self._responses = responses
        self.requests = 0
        self.client = openai.AsyncOpenAI(
            api_key="sk-test",
            base_url="http://api.openai.test/v1",
            max_retries=0,
            timeout=5.0,
            http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(self._handle)),
        )

    def _handle(self, request: httpx2.Request) -> httpx2.Response:
        respond = self._responses[min(self.requests, len(self._responses) - 1)]
        self.requests += 1
        return respond(request)

    async def ask(self, prompt: str) -> str:
        response = await self.client.chat.completions.create(
            model="gpt-4", messages=[{"role": "user", "content": prompt}]
        )
        return str(response.choices[0].message.content)


def status(
    code: int, headers: dict[str, str] | None = None, error_code: str | None = None
) -> Respond:
    body = {"error": {"message": f"status {code}", "type": "test_error", "code": error_code}}
    return lambda request: httpx2.Response(code, headers=headers, json=body)


def answer(request: httpx2.Request) -> httpx2.Response:
    return httpx2.Response(
        200,
        json={
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": 0,
            "model": "gpt-4",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "hello"},
                    "finish_reason": "stop",
                }
            ],
        },
    )


def read_timeout(request: httpx2.Request) -> httpx2.Response:
    raise httpx2.ReadTimeout("timed out reading", request=request)


def refused(request: httpx2.Request) -> httpx2.Response:
    raise httpx2.ConnectError("connection refused", request=request)


@pytest.fixture
async def upstreams() -> AsyncIterator[Callable[..., Upstream]]:
    made: list[Upstream] = []

    def make(*responses: Respond) -> Upstream:
        upstream = Upstream(*responses)
        made.append(upstream)
        return upstream

    yield make
    for upstream in made:
        await upstream.client.close()


async def sdk_error(respond: Respond) -> openai.OpenAIError:
    upstream = Upstream(respond)
    try:
        await upstream.ask("hi")
    except openai.OpenAIError as exc:
        return exc
    finally:
        await upstream.client.close()
    raise AssertionError("the SDK did not raise")


TIMEOUT = 30.0


def state(guard: CircuitBreaker) -> CircuitState:
    # A function, not the property: mypy would narrow the property across awaits.
    return guard.state


def breaker(system: ActorSystem, *, min_calls: int = 1, **kwargs: Any) -> CircuitBreaker:
    return CircuitBreaker("LLM", timeout=TIMEOUT, min_calls=min_calls, system=system, **kwargs)


# -- classify_openai on its own -------------------------------------------------------------


@pytest.mark.parametrize(
    ("respond", "error_type", "expected"),
    [
        (status(500), openai.InternalServerError, (Outcome.FAILURE, None)),
        (status(502), openai.InternalServerError, (Outcome.FAILURE, None)),
        (status(503), openai.InternalServerError, (Outcome.FAILURE, None)),
        (status(408), openai.APIStatusError, (Outcome.FAILURE, None)),
        (status(429, {"retry-after": "7"}), openai.RateLimitError, (Outcome.RATE_LIMITED, 7.0)),
        (
            status(429, {"retry-after-ms": "250"}),
            openai.RateLimitError,
            (Outcome.RATE_LIMITED, 0.25),
        ),
        (status(429), openai.RateLimitError, (Outcome.RATE_LIMITED, None)),
        (
            status(429, {"retry-after": "7"}, error_code="insufficient_quota"),
            openai.RateLimitError,
            (Outcome.RATE_LIMITED, None),
        ),
        (status(400), openai.BadRequestError, (Outcome.IGNORED, None)),
        (status(401), openai.AuthenticationError, (Outcome.IGNORED, None)),
        (status(403), openai.PermissionDeniedError, (Outcome.IGNORED, None)),
        (status(404), openai.NotFoundError, (Outcome.IGNORED, None)),
        (status(422), openai.UnprocessableEntityError, (Outcome.IGNORED, None)),
        (read_timeout, openai.APITimeoutError, (Outcome.FAILURE, None)),
        (refused, openai.APIConnectionError, (Outcome.FAILURE, None)),
    ],
    ids=[
        "500",
        "502",
        "503",
        "408",
        "429-retry-after",
        "429-retry-after-ms",
        "429-bare",
        "429-insufficient-quota",
        "400",
        "401",
        "403",
        "404",
        "422",
        "read-timeout",
        "connect-error",
    ],
)
async def test_classify_openai_on_real_sdk_errors(
    respond: Respond, error_type: type[Exception], expected: tuple[Outcome, float | None]
) -> None:
    exc = await sdk_error(respond)
    assert type(exc) is error_type
    assert classify_openai(exc) == expected


async def test_invalid_response_body_is_a_failure() -> None:
    garbage = httpx2.MockTransport(lambda request: httpx2.Response(200, json={"choices": 1}))
    client = openai.AsyncOpenAI(
        api_key="sk-test",
        base_url="http://api.openai.test/v1",
        max_retries=0,
        http_client=httpx2.AsyncClient(transport=garbage),
        _strict_response_validation=True,
    )
    async with client:
        with pytest.raises(openai.APIResponseValidationError) as info:
            await client.chat.completions.create(
                model="gpt-4", messages=[{"role": "user", "content": "hi"}]
            )
    assert classify_openai(info.value) == (Outcome.FAILURE, None)


def test_classify_openai_leaves_other_exceptions_alone() -> None:
    assert classify_openai(ValueError("not from openai")) is None
    assert classify_openai(TimeoutError()) is None


# -- through CircuitBreaker.call ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("respond", "error_type"),
    [
        (status(500), openai.InternalServerError),
        (status(502), openai.InternalServerError),
        (status(408), openai.APIStatusError),
        (read_timeout, openai.APITimeoutError),
        (refused, openai.APIConnectionError),
    ],
    ids=["500", "502", "408", "read-timeout", "connect-error"],
)
async def test_service_failures_open_the_breaker(
    system: ActorSystem,
    clock: FakeClock,
    upstreams: Callable[..., Upstream],
    respond: Respond,
    error_type: type[Exception],
) -> None:
    upstream = upstreams(respond)
    guard = breaker(system)

    with pytest.raises(error_type):
        await guard.call(upstream.ask, "hi")

    assert state(guard) is CircuitState.OPEN
    assert guard.snapshot.open_until == pytest.approx(clock() + TIMEOUT)
    with pytest.raises(CircuitBreakerOpenError) as rejected:
        await guard.call(upstream.ask, "hi")
    assert rejected.value.retry_after == pytest.approx(TIMEOUT)
    assert upstream.requests == 1  # the rejected call never went out


@pytest.mark.parametrize(
    ("code", "error_type"),
    [
        (400, openai.BadRequestError),
        (404, openai.NotFoundError),
        (409, openai.ConflictError),
        (422, openai.UnprocessableEntityError),
    ],
)
async def test_client_errors_neither_open_nor_count(
    system: ActorSystem, upstreams: Callable[..., Upstream], code: int, error_type: type[Exception]
) -> None:
    upstream = upstreams(status(code))
    guard = breaker(system)

    for _ in range(3):
        with pytest.raises(error_type):
            await guard.call(upstream.ask, "hi")

    assert state(guard) is CircuitState.CLOSED
    counts = guard.status()
    assert (counts.ignored, counts.failures, counts.successes) == (3, 0, 0)
    assert upstream.requests == 3


async def test_ignored_errors_do_not_count_towards_min_calls(
    system: ActorSystem, upstreams: Callable[..., Upstream]
) -> None:
    upstream = upstreams(status(400), status(500))
    guard = breaker(system, min_calls=2)

    with pytest.raises(openai.BadRequestError):
        await guard.call(upstream.ask, "hi")
    with pytest.raises(openai.InternalServerError):
        await guard.call(upstream.ask, "hi")
    # Had the 400 counted as a call, 1 failure out of 2 would already be judged.
    assert guard.status().snapshot.calls == 1
    assert state(guard) is CircuitState.CLOSED

    with pytest.raises(openai.InternalServerError):
        await guard.call(upstream.ask, "hi")
    assert state(guard) is CircuitState.OPEN


@pytest.mark.parametrize(
    ("code", "error_type"),
    [(401, openai.AuthenticationError), (403, openai.PermissionDeniedError)],
)
async def test_auth_errors_are_ignored_and_logged_as_errors(
    system: ActorSystem, upstreams: Callable[..., Upstream], code: int, error_type: type[Exception]
) -> None:
    upstream = upstreams(status(code))
    guard = breaker(system)

    with structlog.testing.capture_logs() as logs, pytest.raises(error_type):
        await guard.call(upstream.ask, "hi")

    assert state(guard) is CircuitState.CLOSED
    auth = [entry for entry in logs if entry["event"] == "openai_auth_error"]
    assert len(auth) == 1
    assert auth[0]["log_level"] == "error"
    assert auth[0]["status"] == code


async def test_server_errors_are_not_logged_by_the_classifier(
    system: ActorSystem, upstreams: Callable[..., Upstream]
) -> None:
    upstream = upstreams(status(400), status(500))
    guard = breaker(system, min_calls=5)

    with structlog.testing.capture_logs() as logs:
        for error_type in (openai.BadRequestError, openai.InternalServerError):
            with pytest.raises(error_type):
                await guard.call(upstream.ask, "hi")

    assert [entry for entry in logs if entry["event"].startswith("openai_")] == []


async def test_429_retry_after_opens_for_exactly_that_long(
    system: ActorSystem, clock: FakeClock, upstreams: Callable[..., Upstream]
) -> None:
    upstream = upstreams(status(429, {"retry-after": "7"}), answer)
    # min_calls=5: a rate limit needs no failure rate to be judged.
    guard = breaker(system, min_calls=5)

    with pytest.raises(openai.RateLimitError):
        await guard.call(upstream.ask, "hi")

    assert state(guard) is CircuitState.OPEN
    assert guard.snapshot.open_until == clock() + 7.0
    with pytest.raises(CircuitBreakerOpenError) as rejected:
        await guard.call(upstream.ask, "hi")
    assert rejected.value.retry_after == pytest.approx(7.0)

    clock.advance(6.9)
    with pytest.raises(CircuitBreakerOpenError):
        await guard.call(upstream.ask, "hi")
    assert upstream.requests == 1

    clock.advance(0.1)
    assert await guard.call(upstream.ask, "hi") == "hello"
    assert state(guard) is CircuitState.CLOSED
    assert upstream.requests == 2


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after-ms": "1500"}, 1.5),
        # The finer header wins when a server sends both.
        ({"retry-after-ms": "250", "retry-after": "7"}, 0.25),
        # No hint: the breaker's own open timeout.
        ({}, TIMEOUT),
    ],
    ids=["ms", "ms-and-seconds", "none"],
)
async def test_429_open_duration_follows_the_headers(
    system: ActorSystem,
    clock: FakeClock,
    upstreams: Callable[..., Upstream],
    headers: dict[str, str],
    seconds: float,
) -> None:
    upstream = upstreams(status(429, headers))
    guard = breaker(system, min_calls=5)

    with pytest.raises(openai.RateLimitError):
        await guard.call(upstream.ask, "hi")

    assert state(guard) is CircuitState.OPEN
    assert guard.snapshot.open_until == pytest.approx(clock() + seconds)


async def test_insufficient_quota_opens_for_the_quota_timeout_and_logs_an_error(
    system: ActorSystem, clock: FakeClock, upstreams: Callable[..., Upstream]
) -> None:
    upstream = upstreams(status(429, {"retry-after": "7"}, error_code="insufficient_quota"))
    guard = breaker(system, min_calls=5, quota_timeout=900.0)

    with structlog.testing.capture_logs() as logs, pytest.raises(openai.RateLimitError):
        await guard.call(upstream.ask, "hi")

    # Waiting 7 s will not refill a quota: the long quota_timeout applies.
    assert state(guard) is CircuitState.OPEN
    assert guard.snapshot.open_until == pytest.approx(clock() + 900.0)
    assert (guard.snapshot.reason, guard.snapshot.error_code) == ("quota", "insufficient_quota")
    quota = [entry for entry in logs if entry["event"] == "openai_insufficient_quota"]
    assert len(quota) == 1
    assert quota[0]["log_level"] == "error"


async def test_openai_false_counts_every_sdk_error_as_a_plain_failure(
    system: ActorSystem, clock: FakeClock, upstreams: Callable[..., Upstream]
) -> None:
    upstream = upstreams(status(401), status(429, {"retry-after": "7"}))
    guard = breaker(system, min_calls=2, openai=False)

    with structlog.testing.capture_logs() as logs, pytest.raises(openai.AuthenticationError):
        await guard.call(upstream.ask, "hi")
    assert logs == []  # the OpenAI rules, logging included, are off
    assert guard.status().failures == 1
    assert state(guard) is CircuitState.CLOSED

    with pytest.raises(openai.RateLimitError):
        await guard.call(upstream.ask, "hi")
    # Opened by the failure rate (2 of 2), for the timeout, not retry-after.
    assert state(guard) is CircuitState.OPEN
    assert guard.snapshot.open_until == pytest.approx(clock() + TIMEOUT)


async def test_custom_classify_runs_before_the_openai_rules(
    system: ActorSystem, clock: FakeClock, upstreams: Callable[..., Upstream]
) -> None:
    seen: list[type[BaseException]] = []

    def classify(exc: BaseException) -> Verdict | None:
        seen.append(type(exc))
        if isinstance(exc, openai.InternalServerError) and exc.status_code == 503:
            return Outcome.IGNORED  # planned maintenance, say
        if isinstance(exc, openai.BadRequestError):
            return RateLimited(2.0)
        return None

    upstream = upstreams(status(503), status(503), status(400))
    guard = breaker(system, classify=classify)

    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            await guard.call(upstream.ask, "hi")
    assert state(guard) is CircuitState.CLOSED
    assert guard.status().ignored == 2

    with pytest.raises(openai.BadRequestError):
        await guard.call(upstream.ask, "hi")
    assert state(guard) is CircuitState.OPEN
    assert guard.snapshot.open_until == pytest.approx(clock() + 2.0)
    assert seen == [openai.InternalServerError, openai.InternalServerError, openai.BadRequestError]


async def test_custom_classify_returning_none_falls_through_to_the_openai_rules(
    system: ActorSystem, upstreams: Callable[..., Upstream]
) -> None:
    upstream = upstreams(status(502))
    guard = breaker(system, classify=lambda exc: None)

    with pytest.raises(openai.InternalServerError):
        await guard.call(upstream.ask, "hi")
    assert state(guard) is CircuitState.OPEN


async def test_successful_calls_keep_the_breaker_closed(
    system: ActorSystem, upstreams: Callable[..., Upstream]
) -> None:
    upstream = upstreams(answer)
    guard = breaker(system)

    for _ in range(3):
        assert await guard.call(upstream.ask, "hi") == "hello"
    assert state(guard) is CircuitState.CLOSED
    assert guard.status().successes == 3


# -- parse_retry_after -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after": " 7 "}, 7.0),
        ({"retry-after": "0"}, 0.0),
        # Negative seconds make no sense as a wait: no wait at all.
        ({"retry-after": "-5"}, 0.0),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "250", "retry-after": "7"}, 0.25),
        # A negative ms value is not believable; the seconds header is used.
        ({"retry-after-ms": "-1", "retry-after": "7"}, 7.0),
        ({}, None),
        ({"retry-after": "soon"}, None),
        ({"retry-after": ""}, None),
        ({"retry-after": "inf"}, None),
        ({"retry-after": "nan"}, None),
        ({"retry-after": "1e400"}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers) == expected


def test_parse_retry_after_reads_case_insensitive_httpx_headers() -> None:
    assert parse_retry_after(httpx2.Headers({"Retry-After": "3"})) == 3.0
    assert parse_retry_after(httpx2.Headers({"Retry-After-Ms": "40"})) == 0.04


def test_parse_retry_after_http_date() -> None:
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    past = email.utils.formatdate(time.time() - 30, usegmt=True)
    # HTTP dates have whole seconds: allow for the truncation and the test's own run time.
    assert parse_retry_after({"retry-after": future}) == pytest.approx(30, abs=2)
    assert parse_retry_after({"retry-after": past}) == 0.0


def test_parse_retry_after_http_date_with_an_injected_wall_clock() -> None:
    date = "Wed, 21 Oct 2026 07:28:00 GMT"
    instant = email.utils.mktime_tz(email.utils.parsedate_tz(date))  # type: ignore[arg-type]
    assert parse_retry_after({"retry-after": date}, wall_clock=lambda: instant - 42.0) == 42.0
    assert parse_retry_after({"retry-after": date}, wall_clock=lambda: instant + 5.0) == 0.0


@pytest.mark.parametrize("headers", [None, 42, "retry-after: 7", ["retry-after", "7"]])
def test_parse_retry_after_tolerates_non_mappings(headers: Any) -> None:
    assert parse_retry_after(headers) is None


def test_parse_retry_after_falls_back_past_a_garbage_ms_header() -> None:
    assert parse_retry_after({"retry-after-ms": "abc", "retry-after": "7"}) == 7.0
