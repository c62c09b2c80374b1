"""Prometheus metrics: the embedded collector (fake clock) and a real daemon's endpoint.

Every scrape is parsed with prometheus-client's own parser, as Prometheus
would read it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_helpers import DaemonProcess, RawClient, poll_until, wait_for
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from breakerd.actor import ActorSystem
from breakerd.actor.daemon import ConfigError, load_config
from breakerd.actor.daemon._config import parse_metrics_address
from breakerd.actor.testing import FakeClock
from breakerd.clients import CircuitBreaker, CircuitBreakerOpenError, CircuitState
from breakerd.clients._globals import close_all_clients
from breakerd.clients.metrics import BreakerCollector
from breakerd.protocol import BudgetExceededError, BudgetRequest

P = "breakerd_circuitbreaker_"


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape, keyed by (sample name, labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(
    scrape: dict[tuple[str, frozenset[tuple[str, str]]], float], metric: str, /, **labels: str
) -> float:
    return scrape[(metric, frozenset(labels.items()))]


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    # A daemon-mode breaker's client would go on reconnecting to the killed
    # daemon in the background, through every later test.
    yield
    close_all_clients()


def scrape_registry(
    registry: CollectorRegistry,
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return samples(generate_latest(registry).decode())


def test_embedded_collector_reports_an_open_breaker(system: ActorSystem, clock: FakeClock) -> None:
    registry = CollectorRegistry()
    registry.register(BreakerCollector(system))
    breaker = CircuitBreaker(
        "svc", system=system, min_calls=5, timeout=30.0, slow_call_duration=1.0
    )
    CircuitBreaker("idle", system=system)

    def slow_ok() -> int:
        clock.advance(2.0)
        return 1

    def failing() -> int:
        clock.advance(0.5)
        raise TimeoutError("upstream")

    breaker.call_sync(slow_ok)
    breaker.call_sync(lambda: 1)
    for _ in range(3):
        with pytest.raises(TimeoutError):
            breaker.call_sync(failing)
    assert breaker.state is CircuitState.OPEN
    with pytest.raises(CircuitBreakerOpenError):
        breaker.call_sync(lambda: 1)

    m = scrape_registry(registry)
    for state in CircuitState:
        assert value(m, P + "state", name="svc", state=state.value) == (
            1.0 if state is CircuitState.OPEN else 0.0
        )
    assert value(m, P + "calls_seconds_count", name="svc", kind="successful") == 2
    assert value(m, P + "calls_seconds_sum", name="svc", kind="successful") == 2.0
    assert value(m, P + "calls_seconds_count", name="svc", kind="failed") == 3
    assert value(m, P + "calls_seconds_sum", name="svc", kind="failed") == 1.5
    assert value(m, P + "calls_seconds_count", name="svc", kind="ignored") == 0
    assert value(m, P + "not_permitted_calls_total", name="svc") == 1
    assert value(m, P + "slow_calls", name="svc", kind="successful") == 1
    assert value(m, P + "slow_calls", name="svc", kind="failed") == 0
    assert value(m, P + "failure_rate", name="svc") == pytest.approx(60.0)
    assert value(m, P + "slow_call_rate", name="svc") == pytest.approx(20.0)
    assert value(m, P + "buffered_calls", name="svc") == 5
    assert value(m, P + "transitions_total", name="svc", from_state="closed", to_state="open") == 1
    assert value(m, P + "open_until_timestamp_seconds", name="svc") == pytest.approx(
        time.time() + 30.0, abs=5.0
    )
    assert value(m, P + "trials_in_flight", name="svc") == 0
    assert value(m, "breakerd_inbox_depth", name="svc") == 0
    # Below min_calls the rates are -1, as in Resilience4j.
    assert value(m, P + "failure_rate", name="idle") == -1
    assert value(m, P + "slow_call_rate", name="idle") == -1
    assert value(m, P + "open_until_timestamp_seconds", name="idle") == 0
    assert value(m, P + "state", name="idle", state="closed") == 1

    # A half-open trial, scraped while it runs.
    clock.advance(30.0)
    during: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}

    def trial() -> int:
        during.update(scrape_registry(registry))
        return 1

    breaker.call_sync(trial)
    assert value(during, P + "state", name="svc", state="half_open") == 1
    assert value(during, P + "trials_in_flight", name="svc") == 1
    assert value(during, P + "open_until_timestamp_seconds", name="svc") == 0
    m = scrape_registry(registry)
    assert value(m, P + "state", name="svc", state="closed") == 1
    transitions = {
        (f, t): value(m, P + "transitions_total", name="svc", from_state=f, to_state=t)
        for f, t in [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    }
    assert transitions == {k: 1 for k in transitions}


@pytest.mark.anyio
async def test_a_scrape_inside_an_event_loop_reads_without_blocking_it(
    system: ActorSystem,
) -> None:
    # An ASGI metrics app scrapes on its loop thread: no waiting on actors there.
    registry = CollectorRegistry()
    registry.register(BreakerCollector(system, timeout=60.0))
    breaker = CircuitBreaker("svc", system=system, min_calls=1)
    with pytest.raises(TimeoutError):
        await breaker.call(_fail)
    started = time.monotonic()
    m = scrape_registry(registry)
    assert time.monotonic() - started < 30.0  # far below the timeout it must not wait for
    assert value(m, P + "state", name="svc", state="open") == 1
    assert value(m, P + "calls_seconds_count", name="svc", kind="failed") == 1


async def _fail() -> int:
    raise TimeoutError("upstream")


# -- the daemon's endpoint ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        return samples(response.read().decode())


def test_daemon_serves_metrics_of_a_breaker_a_real_client_tripped(tmp_short: Path) -> None:
    port = free_port()
    config = tmp_short / "d.toml"
    config.write_text(f'[daemon]\nmetrics = "127.0.0.1:{port}"\n')
    daemon = DaemonProcess(tmp_short / "s.sock", config=config).wait_ready()
    try:
        # With slow-call detection on, a client times its calls and reports
        # failures with their durations.
        breaker = CircuitBreaker(
            "LLM",
            daemon=str(daemon.socket_path),
            min_calls=4,
            timeout=300.0,
            slow_call_duration=60.0,
        )
        for _ in range(2):
            breaker.call_sync(lambda: 1)
        for _ in range(3):
            with pytest.raises(TimeoutError):
                breaker.call_sync(_fail_sync)
        assert breaker.state is CircuitState.OPEN
        for _ in range(2):
            with pytest.raises(CircuitBreakerOpenError):
                breaker.call_sync(lambda: 1)

        def settled() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
            m = scrape(port)
            # Plain successes and local rejections travel in batches, a few ms later.
            done = (
                value(m, P + "not_permitted_calls_total", name="LLM") == 2
                and value(m, P + "calls_seconds_count", name="LLM", kind="successful") == 2
            )
            return m if done else None

        m = poll_until(settled, 10.0)
        assert m is not None, "the client's counts never reached the daemon"
        assert value(m, P + "state", name="LLM", state="open") == 1
        assert value(m, P + "state", name="LLM", state="closed") == 0
        assert value(m, P + "calls_seconds_count", name="LLM", kind="successful") == 2
        assert value(m, P + "calls_seconds_count", name="LLM", kind="failed") == 3
        assert value(m, P + "calls_seconds_sum", name="LLM", kind="failed") > 0
        assert value(m, P + "failure_rate", name="LLM") == pytest.approx(60.0)
        assert value(m, P + "slow_call_rate", name="LLM") == 0
        assert value(m, P + "buffered_calls", name="LLM") == 5
        assert (
            value(m, P + "transitions_total", name="LLM", from_state="closed", to_state="open") == 1
        )
        assert value(m, P + "open_until_timestamp_seconds", name="LLM") == pytest.approx(
            time.time() + 300.0, abs=30.0
        )
        assert value(m, P + "trials_in_flight", name="LLM") == 0
        assert value(m, "breakerd_inbox_depth", name="LLM") == 0
        assert value(m, "breakerd_clients_connected") == 1  # this process
        started = [e for e in daemon.log_events() if e["event"] == "metrics_serving"]
        assert [e["port"] for e in started] == [port]
    finally:
        daemon.kill()


def _fail_sync() -> int:
    raise TimeoutError("upstream")


def test_serve_metrics_flag_counts_connected_clients(tmp_short: Path) -> None:
    port = free_port()
    sock = tmp_short / "s.sock"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "breakerd.clients",
            "serve",
            "--socket",
            str(sock),
            "--metrics",
            f"127.0.0.1:{port}",
        ],
        stderr=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: sock.exists() or proc.poll() is not None, what="the daemon's socket")
        assert proc.poll() is None
        breaker = CircuitBreaker("db", daemon=str(sock))
        breaker.call_sync(lambda: 1)
        m = scrape(port)
        assert value(m, "breakerd_clients_connected") == 1
        assert value(m, P + "state", name="db", state="closed") == 1
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_metrics_without_the_extra_is_a_clear_error(tmp_short: Path) -> None:
    code = (
        "import sys\n"
        "sys.modules['prometheus_client'] = None\n"  # as if not installed
        "from breakerd.clients.cli._main import main\n"
        f"sys.exit(main(['serve', '--socket', {str(tmp_short / 's.sock')!r}, "
        "'--metrics', '127.0.0.1:9']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "pip install 'breakerd[metrics]'" in result.stderr
    assert not (tmp_short / "s.sock").exists()


@pytest.mark.parametrize(
    ("address", "message"),
    [("nope", "HOST:PORT"), ("127.0.0.1:99999", "HOST:PORT")],
)
def test_bad_metrics_address_is_a_usage_error(tmp_short: Path, address: str, message: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "breakerd.clients",
            "serve",
            "--socket",
            str(tmp_short / "s.sock"),
            "--metrics",
            address,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert message in result.stderr


def test_metrics_port_taken_is_a_clear_error(tmp_short: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "breakerd.clients",
                "serve",
                "--socket",
                str(tmp_short / "s.sock"),
                "--metrics",
                f"127.0.0.1:{port}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr
    assert not (tmp_short / "s.sock").exists()


def test_core_imports_without_prometheus_client() -> None:
    code = (
        "import sys\n"
        "sys.modules['prometheus_client'] = None\n"
        "import breakerd.actor, breakerd.clients, breakerd.protocol\n"
        "from breakerd.clients import CircuitBreaker\n"
        "print(json.dumps('ok'))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", "import json\n" + code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == "ok"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("[::1]:9464", ("::1", 9464)),
        (":9464", ("0.0.0.0", 9464)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_metrics_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_metrics_address(text) == expected


def test_metrics_in_the_config_file(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[daemon]\nmetrics = "127.0.0.1:9464"\n')
    assert load_config(good, tmp_path / "s.sock").metrics == ("127.0.0.1", 9464)
    assert load_config(None, tmp_path / "s.sock").metrics is None
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon]\nmetrics = 9464\n")
    with pytest.raises(ConfigError, match=r'metrics must be a "HOST:PORT" string'):
        load_config(bad, tmp_path / "s.sock")


def test_daemon_serves_the_host_wide_budgets_of_real_clients(tmp_short: Path) -> None:
    port = free_port()
    config = tmp_short / "d.toml"
    config.write_text(f'[daemon]\nmetrics = "127.0.0.1:{port}"\n')
    daemon = DaemonProcess(tmp_short / "s.sock", config=config).wait_ready()
    try:
        path = str(daemon.socket_path)
        holder = CircuitBreaker("LLM", daemon=path, max_concurrent=1)
        CircuitBreaker("plain", daemon=path).call_sync(lambda: 1)
        # A second process holds nothing; this one's call holds the only
        # lease while a raw client is refused one.
        other = RawClient(daemon.socket_path)
        other.register("LLM")
        seen: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}

        def inside() -> None:
            refused = other.request(BudgetRequest("LLM", max_concurrent=1, lease=True))
            assert refused.reason == "concurrency"
            limits = (("remaining_requests", 42.0), ("reset_requests", 20.0))
            other.request(BudgetRequest("LLM", limits=limits))
            seen.update(scrape(port))

        holder.call_sync(inside)
        m = seen
        assert value(m, "breakerd_budget_max_concurrent", name="LLM") == 1
        assert value(m, "breakerd_budget_leases_in_use", name="LLM") == 1
        assert value(m, "breakerd_budget_rejections_total", name="LLM", reason="concurrency") == 1
        assert value(m, "breakerd_budget_rejections_total", name="LLM", reason="rate_budget") == 0
        assert value(m, "breakerd_budget_remaining_requests", name="LLM") == 42
        assert 0 < value(m, "breakerd_budget_reset_requests_seconds", name="LLM") <= 20
        assert value(m, "breakerd_budget_waiters", name="LLM") == 0
        # Absent, not zero: what the breaker has no budget for, what no header said.
        budget_samples = [labels for name, labels in m if name.startswith("breakerd_budget")]
        assert frozenset({("name", "plain")}) not in budget_samples
        assert ("breakerd_budget_max_rate", frozenset({("name", "LLM")})) not in m
        assert ("breakerd_budget_remaining_tokens", frozenset({("name", "LLM")})) not in m
        other.close()
        assert value(scrape(port), "breakerd_budget_leases_in_use", name="LLM") == 0
    finally:
        daemon.kill()


def test_embedded_collector_reports_budgets(system: ActorSystem, clock: FakeClock) -> None:
    registry = CollectorRegistry()
    registry.register(BreakerCollector(system))
    breaker = CircuitBreaker("api", max_rate="2/s", burst=2, system=system)
    CircuitBreaker("plain", system=system)
    for _ in range(2):
        breaker.call_sync(lambda: 1)
    with pytest.raises(BudgetExceededError):
        breaker.call_sync(lambda: 1)
    breaker.observe_limits(remaining_tokens=300, reset_tokens=60.0)
    m = scrape_registry(registry)
    assert value(m, "breakerd_budget_max_rate", name="api") == 2
    assert value(m, "breakerd_budget_rejections_total", name="api", reason="rate_budget") == 1
    assert value(m, "breakerd_budget_remaining_tokens", name="api") == 300
    assert value(m, "breakerd_budget_reset_tokens_seconds", name="api") == 60
    assert ("breakerd_budget_max_rate", frozenset({("name", "plain")})) not in m
