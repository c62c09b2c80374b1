"""The daemon's command line, run as real processes against a real daemon."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_helpers import DaemonProcess, RawClient, short_tmpdir, wait_for

from breakerd.protocol import CircuitState, Outcome, Register


def breakerd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "breakerd.clients", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.fixture
def daemon() -> Iterator[DaemonProcess]:
    tmp = short_tmpdir()
    process = DaemonProcess(tmp / "s.sock").wait_ready()
    yield process
    process.kill()
    shutil.rmtree(tmp, ignore_errors=True)


def test_status_json_lists_every_breaker(daemon: DaemonProcess) -> None:
    client = RawClient(daemon.socket_path)
    generation = client.register("LLM", min_calls=2, timeout=300.0).generation
    client.register("db")
    client.report("LLM", generation, Outcome.SUCCESS)
    client.report("LLM", generation, Outcome.FAILURE)
    client.report("LLM", generation, Outcome.FAILURE)
    result = breakerd("status", "--json", "--socket", str(daemon.socket_path))
    assert result.returncode == 0, result.stderr
    records = {r["name"]: r for r in json.loads(result.stdout)}
    assert set(records) == {"LLM", "db"}
    llm = records["LLM"]
    assert llm["state"] == "open"
    assert llm["failure_rate"] == pytest.approx(2 / 3)
    assert llm["calls"] == 3
    assert (llm["successes"], llm["failures"], llm["rejections"]) == (1, 2, 0)
    assert 250 < llm["open_for"] <= 300
    assert llm["clients"] == 1
    assert records["db"]["state"] == "closed"
    client.close()


def test_status_table_and_the_socket_environment_variable(daemon: DaemonProcess) -> None:
    client = RawClient(daemon.socket_path)
    client.register("LLM")
    env = {**os.environ, "BREAKERD_SOCKET": str(daemon.socket_path)}
    result = breakerd("status", env=env)
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.splitlines()
    assert header.split()[:3] == ["NAME", "STATE", "FAILURES"]
    assert row.split()[:2] == ["LLM", "closed"]
    client.close()


def test_admin_commands_change_the_shared_state(daemon: DaemonProcess) -> None:
    client = RawClient(daemon.socket_path)
    client.register("LLM")
    sock = str(daemon.socket_path)
    for command, state in [
        ("open", CircuitState.FORCED_OPEN),
        ("disable", CircuitState.DISABLED),
        ("close", CircuitState.CLOSED),
        ("open", CircuitState.FORCED_OPEN),
        ("reset", CircuitState.CLOSED),
    ]:
        result = breakerd(command, "LLM", "--socket", sock)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"LLM: {state.value}"
        assert client.status("LLM").breakers[0].snapshot.state is state
    # The registered client was told of every change.
    assert [p.state for p in client.pushes][:2] == [CircuitState.FORCED_OPEN, CircuitState.DISABLED]
    client.close()


def test_unknown_breaker_is_a_one_line_error(daemon: DaemonProcess) -> None:
    result = breakerd("open", "nope", "--socket", str(daemon.socket_path))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "breakerd: no breaker named 'nope' is registered with this daemon"
    )


def test_a_missing_daemon_is_a_one_line_error() -> None:
    tmp = short_tmpdir()
    for args in (["status"], ["status", "--json"], ["reset", "LLM"]):
        result = breakerd(*args, "--socket", str(tmp / "none.sock"))
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1
        assert "no breakerd daemon at" in lines[0]
    shutil.rmtree(tmp)


def test_serve_runs_the_daemon_and_stops_on_sigterm() -> None:
    tmp = short_tmpdir()
    socket_path = tmp / "s.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "breakerd.clients", "serve", "--socket", str(socket_path)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: socket_path.exists() or proc.poll() is not None, what="the socket")
        result = breakerd("status", "--socket", str(socket_path))
        assert result.stdout.strip() == "no breakers registered"
        proc.terminate()
        assert proc.wait(30) == 0
        assert not socket_path.exists()
        assert proc.stderr is not None
        lines = [json.loads(line) for line in proc.stderr.read().splitlines()]
        assert lines[0]["event"] == "daemon_started"
        assert lines[-1]["event"] == "daemon_stopped"
    finally:
        proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_bad_config_file_is_refused_at_start(tmp_path: Path) -> None:
    config = tmp_path / "breakerd.toml"
    config.write_text("[breakers.LLM]\ntimeout = -1\n")
    tmp = short_tmpdir()
    result = breakerd("serve", "--socket", str(tmp / "s.sock"), "--config", str(config))
    assert result.returncode == 2
    assert "timeout must be" in result.stderr
    assert not (tmp / "s.sock").exists()
    shutil.rmtree(tmp)


def test_the_config_file_wins_over_clients(tmp_path: Path) -> None:
    config = tmp_path / "breakerd.toml"
    config.write_text("[defaults]\nmin_calls = 3\n\n[breakers.LLM]\ntimeout = 60.0\n")
    tmp = short_tmpdir()
    process = DaemonProcess(tmp / "s.sock", config=config).wait_ready()
    try:
        first = RawClient(process.socket_path)
        registered = first.request(Register("LLM", {"timeout": 5.0, "min_calls": 3}))
        assert registered.conflicts == ("timeout",)
        other = first.request(Register("other", {"timeout": 5.0, "min_calls": 2}))
        assert other.conflicts == ()  # no section: the first client decides
        first.close()
    finally:
        process.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def test_the_command_line_imports_no_runtime_it_does_not_use() -> None:
    # `breakerd status` must answer fast: importing the actor runtime, asyncio
    # and anyio costs more than the status round trip itself.
    code = (
        "import sys, breakerd.clients.cli._main\n"
        "heavy = {'breakerd.actor', 'asyncio', 'anyio', 'structlog', 'openai'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_public_names_still_import_from_the_package() -> None:
    import breakerd.clients as clients

    for name in clients.__all__:
        assert getattr(clients, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = clients.nope  # type: ignore[attr-defined]
