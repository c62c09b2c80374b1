"""The openai wrapper feeds the API's ``x-ratelimit-*`` headers and ``usage`` to the breaker.

The real openai SDK talks to a scripted ``httpx2.MockTransport``; the breaker
runs on a ``FakeClock``, so a budgeted wait moves it at once.
"""

from __future__ import annotations

import json
from typing import Any

import httpx2
import openai
import pytest

from breakerd.actor import ActorSystem
from breakerd.actor.testing import FakeClock
from breakerd.clients import CircuitBreaker
from breakerd.clients.openai import protect
from breakerd.protocol import BudgetExceededError

MESSAGES = [{"role": "user", "content": "hi"}]


class LimitedServer:
    """Answers every request with the next headers of its script (the last repeats)."""

    def __init__(self, clock: FakeClock, *headers: dict[str, str], used: int = 10) -> None:
        self.clock = clock
        self.headers = list(headers)
        self.used = used
        self.arrivals: list[float] = []
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.arrivals.append(self.clock())
        self.bodies.append(json.loads(request.content))
        headers = self.headers[min(len(self.arrivals) - 1, len(self.headers) - 1)]
        return httpx2.Response(
            200,
            headers=headers,
            json={
                "id": "c",
                "object": "chat.completion",
                "created": 0,
                "model": "gpt-4o",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "hi"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": 1,
                    "completion_tokens": self.used - 1,
                    "total_tokens": self.used,
                },
            },
        )


def sync_client(server: LimitedServer) -> openai.OpenAI:
    return openai.OpenAI(
        api_key="sk-test",
        base_url="http://api.openai.test/v1",
        max_retries=0,
        http_client=httpx2.Client(transport=httpx2.MockTransport(server)),
    )


def async_client(server: LimitedServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        api_key="sk-test",
        base_url="http://api.openai.test/v1",
        max_retries=0,
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(server)),
    )


def test_an_exhausted_key_is_not_asked_again_before_its_reset(
    system: ActorSystem, clock: FakeClock
) -> None:
    server = LimitedServer(
        clock,
        {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s"},
    )
    client: Any = protect(sync_client(server), CircuitBreaker("oa-exhausted", system=system))
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    with pytest.raises(BudgetExceededError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.reason == "rate_budget"
    assert caught.value.retry_after == pytest.approx(2.0)
    assert len(server.arrivals) == 1  # the API never saw the call it would have refused
    clock.advance(2.0)
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert len(server.arrivals) == 2


def test_cost_and_usage_keep_the_token_estimate(system: ActorSystem, clock: FakeClock) -> None:
    server = LimitedServer(
        clock,
        {"x-ratelimit-remaining-tokens": "1000", "x-ratelimit-reset-tokens": "60s"},
        used=50,
    )
    client: Any = protect(sync_client(server), CircuitBreaker("oa-tokens", system=system))
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # learns: 1000 left
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES, cost=900)
    assert "cost" not in server.bodies[-1]  # taken off before the SDK saw it
    # Its own response said 1000 are left: that wins over estimate and usage.
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=1000)
    server.headers = [{"x-ratelimit-remaining-tokens": "100", "x-ratelimit-reset-tokens": "60s"}]
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=50)
    with pytest.raises(BudgetExceededError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=500)
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES, cost=40)
    assert len(server.arrivals) == 5


@pytest.mark.anyio
async def test_async_calls_running_low_are_spread_over_the_reset(
    system: ActorSystem, clock: FakeClock
) -> None:
    server = LimitedServer(
        clock,
        {
            "x-ratelimit-limit-requests": "100",
            "x-ratelimit-remaining-requests": "3",
            "x-ratelimit-reset-requests": "1s",
        },
    )
    breaker = CircuitBreaker("oa-low", wait=10.0, system=system)
    client: Any = protect(async_client(server), breaker)
    for _ in range(4):
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    gaps = [b - a for a, b in zip(server.arrivals, server.arrivals[1:], strict=False)]
    assert gaps[0] == 0.0  # the first response taught it how little is left
    assert all(gap > 0.1 for gap in gaps[1:])  # then spread, not at once
