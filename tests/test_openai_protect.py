"""``breakerd.clients.openai.protect``: every request of an openai client under a breaker.

The real openai SDK talks to a scripted ``httpx2.MockTransport``; the breaker
runs on an ``ActorSystem`` with a hand-advanced clock. The SDK's retries wait
``retry-after-ms: 1`` (a millisecond), as the scripted answers say.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx2
import openai
import pytest

from breakerd.clients import ActorSystem, CircuitBreaker, CircuitBreakerOpenError, CircuitState
from breakerd.clients.openai import protect

pytestmark = pytest.mark.anyio

Respond = Callable[[httpx2.Request], httpx2.Response]
QUICK_RETRY = {"retry-after-ms": "1"}
MESSAGES = [{"role": "user", "content": "hi"}]


def error(code: int, headers: dict[str, str] | None = None, error_code: str | None = None) -> Any:
    body = {"error": {"message": f"status {code}", "type": "x", "code": error_code}}
    return lambda request: httpx2.Response(code, headers=headers, json=body)


def answer(request: httpx2.Request) -> httpx2.Response:
    model = json.loads(request.content)["model"]
    return httpx2.Response(
        200,
        json={
            "id": "c",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": f"hi from {model}"},
                    "finish_reason": "stop",
                }
            ],
        },
    )


class Script:
    """Answers per model, in order; the last one repeats. Counts requests per model."""

    def __init__(self, **answers: list[Respond]) -> None:
        self.answers = answers
        self.requests: dict[str, int] = {}
        self.on_request: Callable[[], None] | None = None

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        model = json.loads(request.content)["model"]
        seen = self.requests.get(model, 0)
        self.requests[model] = seen + 1
        if self.on_request is not None:
            self.on_request()
        script = self.answers.get(model, [answer])
        return script[min(seen, len(script) - 1)](request)


def async_client(script: Any, max_retries: int = 2) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        api_key="sk-test",
        base_url="http://api.openai.test/v1",
        max_retries=max_retries,
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(script)),
    )


def sync_client(script: Any, max_retries: int = 2) -> openai.OpenAI:
    return openai.OpenAI(
        api_key="sk-test",
        base_url="http://api.openai.test/v1",
        max_retries=max_retries,
        http_client=httpx2.Client(transport=httpx2.MockTransport(script)),
    )


def state(guard: CircuitBreaker) -> CircuitState:
    return guard.state


async def test_every_request_runs_under_the_models_scope(system: ActorSystem) -> None:
    script = Script(**{"gpt-4o": [error(429, {"retry-after": "20"}, "rate_limit_exceeded")]})
    breaker = CircuitBreaker("LLM", scope="model", system=system)
    client: Any = protect(async_client(script), breaker)
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert script.requests == {"gpt-4o": 1}  # a 429 is not retried: the breaker opens on it
    with pytest.raises(CircuitBreakerOpenError) as info:
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert info.value.scope == "gpt-4o"
    reply = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert reply.choices[0].message.content == "hi from gpt-4o-mini"
    assert script.requests == {"gpt-4o": 1, "gpt-4o-mini": 1}


async def test_the_sdks_retries_are_one_logical_call(system: ActorSystem) -> None:
    script = Script(**{"gpt-4o": [error(500, QUICK_RETRY), error(503, QUICK_RETRY), answer]})
    breaker = CircuitBreaker("LLM", min_calls=1, system=system)
    client: Any = protect(async_client(script), breaker)
    reply = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert reply.choices[0].message.content == "hi from gpt-4o"
    assert script.requests == {"gpt-4o": 3}
    status = breaker.status()
    assert (status.successes, status.failures) == (1, 0)
    assert state(breaker) is CircuitState.CLOSED


async def test_retries_stop_at_a_breaker_opened_meanwhile(system: ActorSystem) -> None:
    script = Script(**{"gpt-4o": [error(500, QUICK_RETRY)]})
    breaker = CircuitBreaker("LLM", min_calls=5, system=system)
    client: Any = protect(async_client(script, max_retries=3), breaker)
    opened = False

    def open_once() -> None:
        nonlocal opened
        if not opened:
            opened = True
            breaker.force_open()

    # Another caller (or process) opens the breaker while this call's first
    # attempt is out: the SDK must not retry into it.
    script.on_request = open_once
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert script.requests == {"gpt-4o": 1}


def test_sync_clients_too(system: ActorSystem) -> None:
    script = Script(**{"gpt-4o": [error(500, QUICK_RETRY), answer]})
    breaker = CircuitBreaker("LLM", scope="model", min_calls=1, system=system)
    client: Any = protect(sync_client(script), breaker)
    reply = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert reply.choices[0].message.content == "hi from gpt-4o"
    assert script.requests == {"gpt-4o": 2}
    assert breaker.scoped("gpt-4o").status().successes == 1
    with pytest.raises(TypeError, match=r"openai\.OpenAI or AsyncOpenAI"):
        protect(script, breaker)


def sse(chunks: list[str], *, fail_after: int | None = None) -> Respond:
    """A chat completion stream of ``chunks``; the connection drops after ``fail_after``."""

    def respond(request: httpx2.Request) -> httpx2.Response:
        model = json.loads(request.content)["model"]

        async def body() -> AsyncIterator[bytes]:
            for index, text in enumerate(chunks):
                if fail_after is not None and index == fail_after:
                    raise httpx2.ReadError("connection dropped", request=request)
                event = {
                    "id": "c",
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": model,
                    "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
                }
                yield f"data: {json.dumps(event)}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=body())

    return respond


async def test_a_stream_that_ends_well_is_a_success(system: ActorSystem) -> None:
    script = Script(**{"gpt-4o": [sse(["a", "b", "c"])]})
    breaker = CircuitBreaker("LLM", scope="model", min_calls=1, system=system)
    client: Any = protect(async_client(script), breaker)
    stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    assert breaker.scoped("gpt-4o").status().successes == 0  # not before it ends
    texts = [chunk.choices[0].delta.content async for chunk in stream]
    assert texts == ["a", "b", "c"]
    status = breaker.scoped("gpt-4o").status()
    assert (status.successes, status.failures) == (1, 0)


async def test_a_stream_that_fails_midway_is_a_failure(system: ActorSystem) -> None:
    script = Script(**{"gpt-4o": [sse(["a", "b", "c"], fail_after=1)]})
    breaker = CircuitBreaker("LLM", scope="model", min_calls=1, system=system)
    client: Any = protect(async_client(script), breaker)
    stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    seen: list[str] = []

    async def drain() -> None:
        async for chunk in stream:
            seen.append(chunk.choices[0].delta.content)

    with pytest.raises(openai.APIConnectionError):
        await drain()
    assert seen == ["a"]
    child = breaker.scoped("gpt-4o")
    assert child.status().failures == 1
    assert state(child) is CircuitState.OPEN


async def test_an_abandoned_stream_counts_as_nothing(system: ActorSystem) -> None:
    script = Script(**{"gpt-4o": [sse(["a", "b", "c"])]})
    breaker = CircuitBreaker("LLM", scope="model", min_calls=1, system=system)
    client: Any = protect(async_client(script), breaker)
    stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    async for _chunk in stream:
        break  # the caller has what it wanted
    await stream.close()
    status = breaker.scoped("gpt-4o").status()
    assert (status.successes, status.failures, status.ignored) == (0, 0, 0)
    assert state(breaker.scoped("gpt-4o")) is CircuitState.CLOSED
