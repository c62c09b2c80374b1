"""``breakerd demo``: the original breaker example, replayed end to end.

The original script wrapped ``chat.completions.create`` in a breaker and printed ten
requests: two answers, three timeouts, the breaker opening at a 60% failure
rate, two fallbacks, a half-open trial and recovery. Here the same ten
requests go through the real openai SDK to a scripted stand-in server on
127.0.0.1, so the run needs no network and no API key, and takes seconds
instead of the original script's thirty-second open timeout.

The stand-in is a deliberately small HTTP/1.1 server (Content-Length bodies,
keep-alive) written on anyio streams: enough for the SDK, and it counts every
request it sees, which is how the demo proves that rejected calls never
reached the service.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, TextIO

import anyio
import anyio.abc
import anyio.to_thread
import structlog
from anyio.streams.buffered import BufferedByteReceiveStream

from breakerd.actor import ActorSystem, Transition
from breakerd.protocol import CircuitBreakerOpenError, CircuitState

from .._breaker import CircuitBreaker

if TYPE_CHECKING:
    from openai import AsyncOpenAI

__all__ = [
    "SCRIPT",
    "DemoResult",
    "RequestResult",
    "StandInServer",
    "main_demo",
    "run_demo",
    "stand_in_server",
]

Action = Literal["answer", "stall"]

#: What the stand-in does with each chat completion request, in order; every
#: request past the end of the script is answered.
SCRIPT: Final[tuple[Action, ...]] = ("answer", "answer", "stall", "stall", "stall")

Kind = Literal["success", "failure", "fallback"]

#: The original script's ten calls as it printed them; the open timeout is waited out
#: before the trial call.
EXPECTED: Final[tuple[Kind, ...]] = (
    *("success", "success"),
    *("failure", "failure", "failure"),
    *("fallback", "fallback"),
    *("success", "success", "success"),
)
REQUESTS: Final = len(EXPECTED)
TRIAL_REQUEST: Final = 7
BREAKER_NAME: Final = "LLM"
MODEL: Final = "gpt-4"
FAILURE_THRESHOLD: Final = 0.5
MIN_CALLS: Final = 5
#: Slack after the open deadline, so the trial is not refused by a hair.
DEADLINE_MARGIN: Final = 0.05

_MAX_HEAD: Final = 64 * 1024
_MAX_BODY: Final = 1024 * 1024
_REASONS: Final = {200: "OK", 400: "Bad Request", 404: "Not Found", 413: "Content Too Large"}


# -- the stand-in server ----------------------------------------------------------------


class _BadRequest(Exception):
    pass


@dataclass
class StandInServer:
    """A scripted stand-in for ``POST /v1/chat/completions``.

    ``"answer"`` replies with a chat completion that echoes the prompt;
    ``"stall"`` never replies and holds the connection until the client hangs
    up (or ``stall`` seconds pass), which is what a timing-out API looks like.
    """

    script: Sequence[Action]
    stall: float
    port: int = 0
    #: Scripted errors per model, answered before the script:
    #: ``{model: [(status, headers, error_code), ...]}``, first one first.
    errors: dict[str, list[tuple[int, dict[str, str], str | None]]] = field(default_factory=dict)
    #: Chat completion requests per model.
    by_model: dict[str, int] = field(default_factory=dict)
    #: Every request the server has read in full, chat completions or not.
    requests: int = 0
    #: ``(method, path, action)`` per request, in arrival order.
    log: list[tuple[str, str, str]] = field(default_factory=list)
    _completions: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def handle(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            buffered = BufferedByteReceiveStream(stream)
            try:
                while await self._serve_one(stream, buffered):
                    pass
            except (
                anyio.EndOfStream,
                anyio.IncompleteRead,
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
            ):
                pass  # the client went away: nothing to answer
            except (_BadRequest, anyio.DelimiterNotFound) as exc:
                try:
                    await _send(stream, 400, _error_body(str(exc) or "bad request"), False)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    pass  # an error escaping a handler would take the whole server down

    async def _serve_one(
        self, stream: anyio.abc.SocketStream, buffered: BufferedByteReceiveStream
    ) -> bool:
        """Read and answer one request; False when the connection must close."""
        head = await buffered.receive_until(b"\r\n\r\n", _MAX_HEAD)
        method, path, version, headers = _parse_head(head)
        if "transfer-encoding" in headers:
            raise _BadRequest("chunked bodies are not supported; send Content-Length")
        length_text = headers.get("content-length", "0")
        if not length_text.isdigit():
            raise _BadRequest(f"bad Content-Length {length_text!r}")
        length = int(length_text)
        if length > _MAX_BODY:
            await _send(stream, 413, _error_body("body too large"), keep_alive=False)
            return False
        body = await buffered.receive_exactly(length) if length else b""
        connection = headers.get("connection", "").lower()
        keep_alive = connection != "close" and (version == "HTTP/1.1" or connection == "keep-alive")
        self.requests += 1

        if (method, path) != ("POST", "/v1/chat/completions"):
            self.log.append((method, path, "not_found"))
            await _send(stream, 404, _error_body(f"no route for {method} {path}"), keep_alive)
            return keep_alive
        model = _model_of(body)
        if model is not None:
            self.by_model[model] = self.by_model.get(model, 0) + 1
            pending = self.errors.get(model)
            if pending:
                status, headers, code = pending.pop(0)
                self.log.append((method, path, f"error_{status}"))
                payload = {"error": {"message": f"scripted {status}", "type": "x", "code": code}}
                await _send(stream, status, payload, keep_alive, headers)
                return keep_alive
        action = self.script[self._completions] if self._completions < len(self.script) else None
        self._completions += 1
        self.log.append((method, path, action or "answer"))
        if action == "stall":
            with anyio.move_on_after(self.stall):
                # Holds until the client times out and closes its end.
                await buffered.receive()
            return False
        try:
            request = json.loads(body)
            prompt = str(request["messages"][-1]["content"])
            model = str(request.get("model", MODEL))
        except (ValueError, KeyError, IndexError, TypeError, RecursionError) as exc:
            raise _BadRequest(f"not a chat completion request: {exc!r}") from None
        completion = _completion(self.requests, model, f"stand-in answer to {prompt!r}")
        await _send(stream, 200, completion, keep_alive)
        return keep_alive


def _model_of(body: bytes) -> str | None:
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError, RecursionError):
        return None
    return model if isinstance(model, str) else None


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(f"bad request line {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise _BadRequest(f"bad header line {line!r}")
        headers[name.strip().lower()] = value.strip()
    return parts[0], parts[1], parts[2], headers


_CREATED = 1_700_000_000


def _completion(number: int, model: str, text: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-standin-{number}",
        "object": "chat.completion",
        # The SDK wants a Unix timestamp here; the stand-in has no use for a real one.
        "created": _CREATED,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
    }


def _error_body(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "code": None}}


async def _send(
    stream: anyio.abc.SocketStream,
    status: int,
    payload: Mapping[str, Any],
    keep_alive: bool,
    headers: Mapping[str, str] | None = None,
) -> None:
    body = json.dumps(payload).encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        f"connection: {'keep-alive' if keep_alive else 'close'}\r\n"
        f"{extra}"
        "\r\n"
    )
    await stream.send(head.encode("latin-1") + body)


@asynccontextmanager
async def stand_in_server(
    script: Sequence[Action] = SCRIPT, *, stall: float = 10.0
) -> AsyncIterator[StandInServer]:
    """Serve a ``StandInServer`` on an ephemeral port of 127.0.0.1 while in the block."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    server = StandInServer(script, stall)
    server.port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as group:
        group.start_soon(listener.serve, server.handle)
        try:
            yield server
        finally:
            # Also ends handlers still stalling on a client that never hung up.
            group.cancel_scope.cancel()


# -- the scenario -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class CallResult:
    """What became of one call, as the demo prints it (embedded or through a daemon)."""

    index: int
    prompt: str
    kind: Kind
    #: The answer or the fallback's text; for a failure, the exception's message.
    text: str
    #: The exception's type name for a failure, else None.
    error: str | None
    #: Whether the stand-in server saw a request during this call.
    reached_server: bool
    #: Requests the server had seen once this call returned.
    server_requests: int
    #: The breaker's state once this call returned.
    state: CircuitState
    #: For a fallback: seconds the breaker still had to stay open.
    retry_after: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestResult(CallResult):
    """What became of one of the embedded demo's calls."""

    #: State changes this call caused, in order.
    transitions: tuple[Transition, ...]


@dataclass(frozen=True, slots=True)
class DemoResult:
    requests: tuple[RequestResult, ...]
    transitions: tuple[Transition, ...]
    server_requests: int
    final_state: CircuitState
    elapsed: float

    def kinds(self) -> list[Kind]:
        return [request.kind for request in self.requests]

    def problems(self) -> list[str]:
        """Where the run strayed from the original script's script (empty when it did not)."""
        found: list[str] = []
        expected = list(EXPECTED)
        if self.kinds() != expected:
            found.append(f"calls went {self.kinds()}, expected {expected}")
        timeouts = [r.error for r in self.requests if r.kind == "failure"]
        if any(error != "APITimeoutError" for error in timeouts):
            found.append(f"failures were {timeouts}, expected APITimeoutError")
        if any(r.reached_server for r in self.requests if r.kind == "fallback"):
            found.append("a fallback call reached the server")
        moves = [(t.from_state, t.to_state) for t in self.transitions]
        expected_moves = [
            (CircuitState.CLOSED, CircuitState.OPEN),
            (CircuitState.OPEN, CircuitState.HALF_OPEN),
            (CircuitState.HALF_OPEN, CircuitState.CLOSED),
        ]
        if moves != expected_moves:
            found.append(f"transitions went {moves}, expected {expected_moves}")
        if len(self.requests) > 4 and [t.to_state for t in self.requests[4].transitions] != [
            CircuitState.OPEN
        ]:
            found.append("the breaker did not open on request 4")
        expected_seen = sum(1 for kind in expected if kind != "fallback")
        if self.server_requests != expected_seen:
            found.append(
                f"the server saw {self.server_requests} requests, expected {expected_seen}"
            )
        if self.final_state is not CircuitState.CLOSED:
            found.append(f"the breaker ended {self.final_state.value}, expected closed")
        return found


class Printer:
    def __init__(self, out: TextIO | None) -> None:
        self._out = out

    def __call__(self, line: str) -> None:
        if self._out is not None:
            print(line, file=self._out, flush=True)


async def run_demo(
    out: TextIO | None = None,
    *,
    open_timeout: float = 1.0,
    client_timeout: float = 0.3,
) -> DemoResult:
    """Replay the original script's ten calls; print the story to ``out`` and return what happened.

    Runs on its own ``ActorSystem``, started here and stopped before returning,
    so it shares no breaker with the host application.
    """
    # Imported here: importing breakerd must not pay for the openai SDK.
    import openai

    say = Printer(out)
    clock = time.monotonic
    started = clock()
    system = await anyio.to_thread.run_sync(ActorSystem(clock=clock).start)
    try:
        async with stand_in_server(SCRIPT, stall=max(10.0, 20 * client_timeout)) as server:
            say(f"stand-in OpenAI API on {server.base_url} (no network, no API key)")
            client = openai.AsyncOpenAI(
                api_key="sk-breakerd-demo-not-a-real-key",
                base_url=server.base_url,
                max_retries=0,
                timeout=client_timeout,
                # A proxy from the environment must not swallow our 127.0.0.1 traffic.
                http_client=openai.DefaultAsyncHttpxClient(trust_env=False),
            )
            async with client:
                result = await _play(say, server, client, system, open_timeout, client_timeout)
                await _play_scopes(say, server, client, system)
                return result
    finally:
        await anyio.to_thread.run_sync(system.stop)
        say(f"finished in {clock() - started:.1f}s")


async def _play(
    say: Callable[[str], None],
    server: StandInServer,
    client: AsyncOpenAI,
    system: ActorSystem,
    open_timeout: float,
    client_timeout: float,
) -> DemoResult:
    clock = system.clock
    started = clock()
    fallback_calls: list[tuple[str, float | None]] = []

    async def fallback(prompt: str) -> str:
        open_until = breaker.snapshot.open_until
        fallback_calls.append((prompt, None if open_until is None else open_until - clock()))
        return f"sorry, the AI service is unavailable; please retry {prompt!r} later"

    breaker = CircuitBreaker(
        BREAKER_NAME,
        failure_threshold=FAILURE_THRESHOLD,
        timeout=open_timeout,
        min_calls=MIN_CALLS,
        fallback=fallback,
        system=system,
    )
    # list.append is atomic: the actor thread appends, this task reads.
    seen: list[tuple[Transition, float]] = []
    unsubscribe = breaker.on_transition(lambda t: seen.append((t, clock())))

    async def call_llm(prompt: str) -> str:
        response = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}]
        )
        return str(response.choices[0].message.content)

    say(
        f"breaker {BREAKER_NAME!r}: opens above {FAILURE_THRESHOLD:.0%} failures once "
        f"{MIN_CALLS} calls are in, stays open {open_timeout:g}s; "
        f"client timeout {client_timeout:g}s"
    )
    results: list[RequestResult] = []
    try:
        for index in range(REQUESTS):
            if index == TRIAL_REQUEST:
                await _wait_out_open(say, breaker, clock)
            prompt = f"test {index}"
            before_server, before_fallbacks, before_moves = (
                server.requests,
                len(fallback_calls),
                len(seen),
            )
            error: str | None = None
            try:
                # The prompt goes through call() so the fallback gets it too:
                # the original script's fallback wanted it, but its call() passed nothing.
                text = await breaker.call(call_llm, prompt)
            except Exception as exc:
                kind: Kind = "failure"
                text, error = str(exc), type(exc).__name__
            else:
                kind = "fallback" if len(fallback_calls) > before_fallbacks else "success"
            moves = seen[before_moves:]
            result = RequestResult(
                index=index,
                prompt=prompt,
                kind=kind,
                text=text,
                error=error,
                reached_server=server.requests > before_server,
                server_requests=server.requests,
                state=breaker.state,
                retry_after=fallback_calls[-1][1] if kind == "fallback" else None,
                transitions=tuple(t for t, _ in moves),
            )
            results.append(result)
            say(_describe(result, before_server))
            for transition, at in moves:
                say(_describe_transition(transition, at))
    finally:
        unsubscribe()
    say(
        f"the server saw {server.requests} requests for {REQUESTS} calls: "
        f"{sum(1 for r in results if r.kind == 'fallback')} were answered by the fallback "
        "without reaching it"
    )
    return DemoResult(
        requests=tuple(results),
        transitions=tuple(t for t, _ in seen),
        server_requests=server.requests,
        final_state=breaker.state,
        elapsed=clock() - started,
    )


#: The scopes scene's breaker, and the 429 its first model gets.
SCOPED_NAME: Final = "LLM-scoped"
SCOPED_RETRY_AFTER: Final = 30


async def _play_scopes(
    say: Callable[[str], None], server: StandInServer, client: AsyncOpenAI, system: ActorSystem
) -> dict[str, str]:
    """Per-model scopes: one model's 429 opens that model's breaker, not the others'.

    Returns how each call ended, ``{"gpt-4o#1": "rate_limited", ...}``.
    """
    import openai

    server.errors["gpt-4o"] = [
        (429, {"retry-after": str(SCOPED_RETRY_AFTER)}, "rate_limit_exceeded")
    ]
    breaker = CircuitBreaker(SCOPED_NAME, scope="model", system=system)
    say(
        f"scopes: breaker {SCOPED_NAME!r} with scope='model' keeps one child breaker per "
        f"model ({SCOPED_NAME}/MODEL)"
    )

    async def create(**kwargs: Any) -> Any:
        return await client.chat.completions.create(**kwargs)

    ended: dict[str, str] = {}
    for number, model in enumerate(("gpt-4o", "gpt-4o", "gpt-4o-mini"), start=1):
        key = f"{model}#{number}"
        try:
            await breaker.call(create, model=model, messages=[{"role": "user", "content": "hello"}])
        except openai.RateLimitError:
            ended[key] = "rate_limited"
            say(
                f"  {model}: 429 with retry-after {SCOPED_RETRY_AFTER}s: only "
                f"{SCOPED_NAME}/{model} opens"
            )
        except CircuitBreakerOpenError as exc:
            ended[key] = "rejected"
            say(f"  {model}: rejected locally: {exc}")
        else:
            ended[key] = "answered"
            say(f"  {model}: answered by the server: another model's 429 did not stop it")
    say(
        f"  states: {SCOPED_NAME} {breaker.state.value}, "
        + ", ".join(
            f"{SCOPED_NAME}/{model} {breaker.scoped(model).state.value}"
            for model in ("gpt-4o", "gpt-4o-mini")
        )
    )
    return ended


async def _wait_out_open(
    say: Callable[[str], None], breaker: CircuitBreaker, clock: Callable[[], float]
) -> None:
    open_until = breaker.snapshot.open_until
    if breaker.state is not CircuitState.OPEN or open_until is None:
        return
    delay = max(0.0, open_until - clock()) + DEADLINE_MARGIN
    say(f"waiting {delay:.1f}s for the open timeout to pass...")
    await anyio.sleep(delay)


def _describe(result: RequestResult, server_before: int) -> str:
    line = f"request {result.index}: {result.kind} - "
    if result.kind == "success":
        line += result.text
        if any(t.to_state is CircuitState.HALF_OPEN for t in result.transitions):
            line += " (the half-open trial call)"
    elif result.kind == "failure":
        line += f"{result.error} ({result.text})"
    else:
        retry = "" if result.retry_after is None else f", retry in {result.retry_after:.1f}s"
        reached = (
            "REACHED THE SERVER"
            if result.reached_server
            else f"not sent: the server is still at {server_before} requests"
        )
        line += f"{result.text} (breaker {result.state.value}{retry}; {reached})"
    return line


_WHY: Final = {
    "failure_rate_exceeded": "failure rate {rate} > {threshold}",
    "open_timeout_elapsed": "open timeout elapsed, one trial call let through",
    "trial_succeeded": "the trial call succeeded",
    "trial_failed": "the trial call failed",
    "rate_limited": "the service asked us to back off",
}


def _describe_transition(transition: Transition, at: float) -> str:
    why = _WHY.get(transition.reason, transition.reason).format(
        rate=f"{transition.failure_rate or 0.0:.0%}", threshold=f"{FAILURE_THRESHOLD:.0%}"
    )
    line = f"  breaker {transition.from_state.value} -> {transition.to_state.value}: {why}"
    if transition.open_until is not None:
        line += f"; open for {max(0.0, transition.open_until - at):.1f}s"
    return line


# -- the CLI entry point ------------------------------------------------------------------


def main_demo(
    out: TextIO,
    *,
    open_timeout: float = 1.0,
    client_timeout: float = 0.3,
    verbose: bool = False,
) -> int:
    """``breakerd demo``: run the scenario, return 0 if it went as scripted."""
    # Only the entry point may configure logging, and it puts it back after:
    # callers (tests, an embedding app) keep their own configuration.
    was_configured = structlog.is_configured()
    previous = structlog.get_config()
    configure_demo_logging(verbose)
    try:
        result = anyio.run(
            lambda: run_demo(out, open_timeout=open_timeout, client_timeout=client_timeout)
        )
    finally:
        if was_configured:
            structlog.configure(**previous)
        else:
            structlog.reset_defaults()
    problems = result.problems()
    if problems:
        raise RuntimeError("the demo did not go as scripted: " + "; ".join(problems))
    return 0


def drop_event(logger: object, method: str, event: Mapping[str, Any]) -> Any:
    raise structlog.DropEvent


def configure_demo_logging(verbose: bool) -> None:
    """breakerd's own events on stderr with ``-v``; otherwise none."""
    if verbose:
        structlog.configure(
            processors=[
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False),
                structlog.dev.ConsoleRenderer(colors=False),
            ],
            logger_factory=structlog.PrintLoggerFactory(sys.stderr),
            cache_logger_on_first_use=False,
        )
    else:
        # The demo prints every transition itself; the log would say it twice.
        structlog.configure(processors=[drop_event], cache_logger_on_first_use=False)
