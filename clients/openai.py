"""Protect every request an openai client makes, in one line.

    import openai
    from breakerd.clients import CircuitBreaker
    from breakerd.clients.openai import protect

    client = protect(openai.AsyncOpenAI(), CircuitBreaker("LLM", scope="model"))
    await client.chat.completions.create(model="gpt-4o", messages=messages)

Every method of the client's resources (``chat.completions.create``,
``responses.create``, ``embeddings.create``...) runs under the breaker, with
its keyword arguments, so ``scope="model"`` puts each model in its own scope.

Why a client wrapper and not the SDK's ``http_client`` transport: a
transport sees one HTTP attempt at a time, so each of the SDK's retries would
count as a call of its own, and it cannot see the logical call's arguments
(the model) nor the SDK's final exception, which carries the status, the
headers and the error code the classes need. The wrapper sees the logical
call: one permit, one outcome, after the SDK's own retries. It still keeps
those retries out of an open breaker: the wrapped client's copy stops
retrying (``_sleep_for_retry``, the SDK's one place that waits before a
retry) when the breaker or the call's scope is no longer closed, or when the
answer was a 429 or 402 (the breaker opens on those; retrying them would
only ask again). The call then ends with the error the SDK had at hand.

Streams (``stream=True``): an async stream's call stays open until the
stream ends; an error while iterating counts as a failure, a stream closed
before its end (abandoned) counts as nothing. A sync stream is counted when
it is opened (its HTTP status); errors later in a sync stream are not seen.

``with_raw_response`` and ``with_streaming_response`` views are passed
through unprotected.

Budgets from the API's own headers, on by default: every HTTP response the
wrapped client receives (retries and 429s included) feeds its
``x-ratelimit-*`` headers to ``breaker.observe_limits``, so the breaker
spreads its calls over the time to the reset when little is left. Each call
debits its token estimate (its ``max_tokens``/``max_output_tokens``, or a
``cost=`` keyword, which the wrapper takes off before the SDK sees it) and
its response's ``usage.total_tokens`` corrects it.

The OpenAI rules themselves, for a ``classify=`` of your own:
``classify_openai(exc)`` (the outcome and ``retry_after`` for an openai SDK
exception, or None) and ``parse_retry_after(headers)``.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import sys
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from breakerd.protocol import CircuitState

from ._budgets import call_cost
from ._openai import classify_openai, parse_retry_after

if TYPE_CHECKING:
    from ._breaker import CircuitBreaker

__all__ = ["classify_openai", "parse_retry_after", "protect"]

C = TypeVar("C")

_CLOSED = CircuitState.CLOSED
# The breakers the call in this context runs under: retries stop once one is not closed.
_guards: contextvars.ContextVar[tuple[CircuitBreaker, ...]] = contextvars.ContextVar(
    "breakerd_openai_guards", default=()
)


def protect(client: C, breaker: CircuitBreaker, *, limits: bool = True) -> C:
    """A view of ``client`` (``OpenAI`` or ``AsyncOpenAI``) running every request under ``breaker``.

    The client itself is left as it was; the view uses a copy of it
    (``with_options()``) whose retries stop at an open breaker. With
    ``limits`` (the default) every response's ``x-ratelimit-*`` headers and
    ``usage`` feed the breaker's budgets (``observe_limits``).
    """
    import openai

    if not isinstance(client, (openai.OpenAI, openai.AsyncOpenAI)):
        raise TypeError(f"protect() takes an openai.OpenAI or AsyncOpenAI, got {client!r}")
    copy = client.with_options()
    _stop_retries_at_open_breakers(copy)
    if limits:
        _feed_limits(copy, breaker)
    return _Protected(copy, breaker, is_async=isinstance(client, openai.AsyncOpenAI))  # type: ignore[return-value]


def _stop_retries_at_open_breakers(client: Any) -> None:
    original = client._sleep_for_retry

    if inspect.iscoroutinefunction(original):

        async def sleep_async(*args: Any, **kwargs: Any) -> None:
            response = _stopping_at()
            if response is not None:
                if not response.is_closed:
                    await response.aread()
                raise client._make_status_error_from_response(response) from None
            await original(*args, **kwargs)

        client._sleep_for_retry = sleep_async
    else:

        def sleep_sync(*args: Any, **kwargs: Any) -> None:
            response = _stopping_at()
            if response is not None:
                if not response.is_closed:
                    response.read()
                raise client._make_status_error_from_response(response) from None
            original(*args, **kwargs)

        client._sleep_for_retry = sleep_sync


def _feed_limits(client: Any, breaker: CircuitBreaker) -> None:
    # ``_send_request`` is the SDK's one place that sends an HTTP attempt:
    # every response passes here, a retried 429's included.
    original = client._send_request

    def observe(response: Any) -> None:
        headers = getattr(response, "headers", None)
        if headers is not None and (
            "x-ratelimit-remaining-requests" in headers or "x-ratelimit-remaining-tokens" in headers
        ):
            breaker.observe_limits(headers)

    if inspect.iscoroutinefunction(original):

        async def send_async(*args: Any, **kwargs: Any) -> Any:
            response = await original(*args, **kwargs)
            observe(response)
            return response

        client._send_request = send_async
    else:

        def send_sync(*args: Any, **kwargs: Any) -> Any:
            response = original(*args, **kwargs)
            observe(response)
            return response

        client._send_request = send_sync


def _observe_usage(breaker: CircuitBreaker, result: Any) -> None:
    usage = getattr(result, "usage", None)
    total = getattr(usage, "total_tokens", None)
    if isinstance(total, (int, float)) and not isinstance(total, bool):
        breaker.observe_limits(used_tokens=total)


def _stopping_at() -> Any:
    """Before a retry: the HTTP response to end the call with instead, or None to retry.

    Raises the SDK's connection error instead when the attempt got no
    response and a breaker is no longer closed.
    """
    import openai

    # The SDK waits inside its ``except`` block: the error at hand is the attempt's.
    error = sys.exc_info()[1]
    stop = any(guard.state is not _CLOSED for guard in _guards.get())
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(status, int):
        # The breaker opens on a 429 or 402 once the call ends: asking again
        # would only add load to a service that said no.
        return response if stop or status in (402, 429) else None
    if stop and error is not None:
        try:
            request = error.request  # type: ignore[attr-defined]
        except (AttributeError, RuntimeError):
            request = None
        if "Timeout" in type(error).__name__:
            raise openai.APITimeoutError(request=request) from error
        raise openai.APIConnectionError(request=request) from error
    return None


class _Protected:
    """A client or resource whose methods run under the breaker."""

    __slots__ = ("_breaker", "_is_async", "_target")

    def __init__(self, target: Any, breaker: CircuitBreaker, *, is_async: bool) -> None:
        self._target = target
        self._breaker = breaker
        self._is_async = is_async

    def __getattr__(self, name: str) -> Any:
        from openai._resource import AsyncAPIResource, SyncAPIResource

        value = getattr(self._target, name)
        if name.startswith("_") or name in ("with_raw_response", "with_streaming_response"):
            return value
        if isinstance(value, (SyncAPIResource, AsyncAPIResource)):
            return _Protected(value, self._breaker, is_async=self._is_async)
        if callable(value) and isinstance(self._target, (SyncAPIResource, AsyncAPIResource)):
            return self._wrap(value)
        return value

    def __repr__(self) -> str:
        return f"<protected {self._target!r} by {self._breaker!r}>"

    def _wrap(self, method: Callable[..., Any]) -> Callable[..., Any]:
        breaker = self._breaker
        if self._is_async:

            @functools.wraps(method)
            async def call_async(*args: Any, **kwargs: Any) -> Any:
                token = call_cost.set(kwargs.pop("cost", None))
                try:
                    if kwargs.get("stream"):
                        return await _open_stream(breaker, method, args, kwargs)
                    return await breaker.call(_guarded_async(breaker, method), *args, **kwargs)
                finally:
                    call_cost.reset(token)

            return call_async

        @functools.wraps(method)
        def call_sync(*args: Any, **kwargs: Any) -> Any:
            token = call_cost.set(kwargs.pop("cost", None))
            try:
                return breaker.call_sync(_guarded_sync(breaker, method), *args, **kwargs)
            finally:
                call_cost.reset(token)

        return call_sync


def _guards_for(breaker: CircuitBreaker, kwargs: dict[str, Any]) -> tuple[CircuitBreaker, ...]:
    model = kwargs.get("model")
    if breaker.has_scopes and isinstance(model, str) and model:
        return (breaker, breaker.scoped(model))
    return (breaker,)


def _guarded_async(breaker: CircuitBreaker, method: Callable[..., Any]) -> Callable[..., Any]:
    async def run(*args: Any, **kwargs: Any) -> Any:
        token = _guards.set(_guards_for(breaker, kwargs))
        try:
            result = await method(*args, **kwargs)
        finally:
            _guards.reset(token)
        _observe_usage(breaker, result)
        return result

    return run


def _guarded_sync(breaker: CircuitBreaker, method: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        token = _guards.set(_guards_for(breaker, kwargs))
        try:
            result = method(*args, **kwargs)
        finally:
            _guards.reset(token)
        _observe_usage(breaker, result)
        return result

    return run


class _Abandoned(BaseException):
    """The caller closed a stream before its end: not the service's fault (not an Exception)."""


async def _open_stream(
    breaker: CircuitBreaker, method: Callable[..., Any], args: Any, kwargs: dict[str, Any]
) -> Any:
    """Run the call under the breaker until its stream ends; hand the stream over at once."""
    loop = asyncio.get_running_loop()
    handed: asyncio.Future[Any] = loop.create_future()
    guarded = _guarded_async(breaker, method)

    async def whole_stream(*call_args: Any, **call_kwargs: Any) -> Any:
        stream = await guarded(*call_args, **call_kwargs)
        watched = _WatchedStream(stream, loop.create_future())
        handed.set_result(watched)
        await watched.ended  # raises the stream's error, or _Abandoned
        return None

    call = asyncio.ensure_future(breaker.call(whole_stream, *args, **kwargs))
    # Once the stream is handed over nobody awaits the call: its end (an
    # abandoned stream's _Abandoned, say) must not be reported as lost.
    call.add_done_callback(lambda task: task.cancelled() or task.exception())
    await asyncio.wait((handed, call), return_when=asyncio.FIRST_COMPLETED)
    if handed.done():
        watched: _WatchedStream = handed.result()
        watched.call = call
        return watched
    return call.result()  # a rejection, a fallback's answer, or the opening error


class _WatchedStream:
    """An ``AsyncStream`` that tells the breaker how it ended."""

    def __init__(self, stream: Any, ended: asyncio.Future[None]) -> None:
        self._stream = stream
        self.ended = ended
        self.call: asyncio.Future[Any] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        try:
            async for item in self._stream:
                yield item
        except Exception as exc:
            self._end(exc)
            await self._settled()
            raise
        except BaseException:
            self._end(_Abandoned())
            raise
        else:
            self._end(None)
            await self._settled()
        finally:
            # A generator closed early (the caller broke out of its loop).
            self._end(_Abandoned())

    async def __aenter__(self) -> _WatchedStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._end(_Abandoned())
        await self._stream.close()
        await self._settled()

    async def _settled(self) -> None:
        # The caller reads its own write: the outcome is recorded when the
        # stream's end reaches the caller.
        if self.call is not None:
            await asyncio.wait((self.call,))

    def _end(self, error: BaseException | None) -> None:
        if self.ended.done():
            return
        if error is None:
            self.ended.set_result(None)
        else:
            self.ended.set_exception(error)
