"""``breakerd demo`` and its CLI: the original script's run, end to end.

Integration tests: the real openai SDK talks to the demo's stand-in server
over a real socket, and the breaker really waits out its (short) open
timeout, so this module takes a few seconds.
"""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys

import anyio
import pytest
import structlog

from breakerd.clients import CircuitState
from breakerd.clients.cli import _demo as demo
from breakerd.clients.cli._demo import run_demo, stand_in_server
from breakerd.clients.cli._main import main

OPEN_TIMEOUT = 0.5
#: Above the demo's 0.3 s so that a loaded machine does not time out a good answer.
CLIENT_TIMEOUT = 0.5


@pytest.mark.anyio
async def test_demo_replays_the_original_run() -> None:
    out = io.StringIO()

    result = await run_demo(out, open_timeout=OPEN_TIMEOUT, client_timeout=CLIENT_TIMEOUT)

    requests = result.requests
    assert result.kinds() == ["success"] * 2 + ["failure"] * 3 + ["fallback"] * 2 + ["success"] * 3
    assert [r.error for r in requests[2:5]] == ["APITimeoutError"] * 3
    assert all(r.reached_server for r in requests[:5])

    assert [r.transitions for r in requests[:4]] == [()] * 4
    (opened,) = requests[4].transitions
    assert (opened.from_state, opened.to_state) == (CircuitState.CLOSED, CircuitState.OPEN)
    assert opened.failure_rate == pytest.approx(0.6)
    assert requests[4].state is CircuitState.OPEN

    for rejected in requests[5:7]:
        assert rejected.state is CircuitState.OPEN
        assert not rejected.reached_server
        assert rejected.server_requests == 5
        assert rejected.prompt in rejected.text  # the fallback got the call's prompt
        assert rejected.retry_after is not None
        assert 0 < rejected.retry_after <= OPEN_TIMEOUT

    trial = requests[7]
    assert trial.reached_server
    assert [(t.from_state, t.to_state) for t in trial.transitions] == [
        (CircuitState.OPEN, CircuitState.HALF_OPEN),
        (CircuitState.HALF_OPEN, CircuitState.CLOSED),
    ]
    assert [r.state for r in requests[7:]] == [CircuitState.CLOSED] * 3
    assert all(r.reached_server and r.transitions == () for r in requests[8:])
    assert [r.text for r in requests[8:]] == [
        "stand-in answer to 'test 8'",
        "stand-in answer to 'test 9'",
    ]

    assert result.server_requests == 8
    assert result.final_state is CircuitState.CLOSED
    assert result.problems() == []

    lines = out.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("request ")] == [
        f"request {i}" for i in range(10)
    ]
    assert any("closed -> open" in line for line in lines)
    assert any(line.startswith("the server saw 8 requests for 10 calls") for line in lines)

    # problems() is what turns a run gone wrong into a failing exit code.
    leaked = dataclasses.replace(requests[5], reached_server=True)
    strayed = dataclasses.replace(
        result, requests=(*requests[:5], leaked, *requests[6:]), server_requests=9
    )
    assert "a fallback call reached the server" in strayed.problems()
    assert any("the server saw 9 requests" in problem for problem in strayed.problems())


def test_cli_demo_exits_0_and_leaves_logging_as_it_was(
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = structlog.get_config()

    assert main(["demo"]) == 0

    captured = capsys.readouterr()
    assert "request 5: fallback - " in captured.out
    assert "request 9: success - " in captured.out
    assert captured.err == ""  # structlog's events are off unless --verbose
    assert structlog.get_config() == before


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["nope"], "invalid choice: 'nope'"),
        (["demo", "--open-timeout", "0"], "must be a positive number of seconds"),
        (["demo", "--client-timeout", "fast"], "not a number: 'fast'"),
        # Raised by the command's handler, not the parser.
        (["demo", "--socket", "/tmp/x.sock"], "--socket only applies with --daemon"),
    ],
)
def test_cli_usage_errors_are_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], complaint: str
) -> None:
    assert main(argv) == 2

    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert complaint in captured.err


def test_cli_runtime_errors_are_one_line_and_exit_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> int:
        raise RuntimeError("the demo did not go as scripted\nsecond line")

    monkeypatch.setattr(demo, "main_demo", broken)

    assert main(["demo"]) == 1
    assert capsys.readouterr().err == "breakerd: error: the demo did not go as scripted\n"


def test_python_dash_m_runs_the_cli() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "breakerd.clients", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0
    assert "demo" in done.stdout


# -- the stand-in server on its own: raw HTTP over a real socket -----------------------------


async def _exchange(port: int, raw: bytes) -> bytes:
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(raw)
        received = b""
        with anyio.fail_after(5):
            while True:
                try:
                    received += await stream.receive()
                except anyio.EndOfStream:
                    return received


@pytest.mark.anyio
async def test_stand_in_keeps_the_connection_alive_between_requests() -> None:
    body = b'{"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}'
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
    request = head % len(body) + body
    closing = request.replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n")
    async with stand_in_server(["answer", "answer"]) as server:
        reply = await _exchange(server.port, request + closing)

    assert reply.count(b"HTTP/1.1 200 OK") == 2
    assert b"stand-in answer to 'hi'" in reply
    assert server.requests == 2


@pytest.mark.anyio
async def test_stand_in_answers_bad_requests_with_4xx() -> None:
    async with stand_in_server() as server:
        not_found = await _exchange(
            server.port, b"GET /v1/models HTTP/1.1\r\nConnection: close\r\n\r\n"
        )
        garbage = await _exchange(server.port, b"NONSENSE\r\n\r\n")
        bad_json = await _exchange(
            server.port,
            b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 3\r\n\r\n{x}",
        )

    assert not_found.startswith(b"HTTP/1.1 404 ")
    assert garbage.startswith(b"HTTP/1.1 400 ")
    assert bad_json.startswith(b"HTTP/1.1 400 ")
    assert [entry[2] for entry in server.log] == ["not_found", "answer"]


@pytest.mark.anyio
async def test_the_scopes_scene_keeps_one_models_429_to_that_model() -> None:
    import openai

    from breakerd.actor import ActorSystem

    lines: list[str] = []
    system = await anyio.to_thread.run_sync(ActorSystem().start)
    try:
        async with stand_in_server(()) as server:
            client = openai.AsyncOpenAI(
                api_key="sk-test",
                base_url=server.base_url,
                max_retries=0,
                timeout=5.0,
                http_client=openai.DefaultAsyncHttpxClient(trust_env=False),
            )
            async with client:
                ended = await demo._play_scopes(lines.append, server, client, system)
    finally:
        await anyio.to_thread.run_sync(system.stop)
    assert ended == {
        "gpt-4o#1": "rate_limited",
        "gpt-4o#2": "rejected",
        "gpt-4o-mini#3": "answered",
    }
    assert server.by_model == {"gpt-4o": 1, "gpt-4o-mini": 1}
    assert (
        lines[-1]
        == "  states: LLM-scoped closed, LLM-scoped/gpt-4o open, LLM-scoped/gpt-4o-mini closed"
    )
    rejected = next(line for line in lines if "rejected locally" in line)
    assert "scope 'gpt-4o' of 'LLM-scoped'" in rejected
    assert "rate_limit_exceeded" in rejected
