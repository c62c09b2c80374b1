"""Shared fixtures: a fake clock and an actor system on it, and real daemon processes
(modules may override any of them)."""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_helpers import DaemonProcess, short_tmpdir, wait_for

from breakerd.actor import ActorSystem
from breakerd.actor.testing import FakeClock


@pytest.fixture
def anyio_backend() -> str:
    """anyio's pytest plugin runs the ``anyio``-marked async tests on asyncio."""
    return "asyncio"


@pytest.fixture
def clock() -> FakeClock:
    """A monotonic clock that moves only when a test says so."""
    return FakeClock()


@pytest.fixture
def system(clock: FakeClock) -> Iterator[ActorSystem]:
    """An actor system on the fake clock, its loop in a thread of its own."""
    with ActorSystem(clock=clock).running_in_thread() as running:
        yield running


@pytest.fixture
def tmp_short() -> Iterator[Path]:
    """A fresh directory under /tmp, short enough for Unix socket paths."""
    path = short_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


#: uvloop is an optional extra (``breakerd[uvloop]``, in ``dev``): without it
#: the daemon runs on asyncio only, and its uvloop cases have nothing to run on.
UVLOOP = importlib.util.find_spec("uvloop") is not None


@pytest.fixture(
    params=[
        "asyncio",
        pytest.param(
            "uvloop",
            marks=pytest.mark.skipif(
                not UVLOOP, reason="uvloop is not installed (pip install 'breakerd[uvloop]')"
            ),
        ),
    ]
)
def daemon(tmp_short: Path, request: pytest.FixtureRequest) -> Iterator[DaemonProcess]:
    """``breakerd serve`` on each event loop it supports (uvloop comes with the dev extra)."""
    # The log line, not the socket file: the file appears at bind(), a moment
    # before listen(), and a connect in that moment is refused.
    process = DaemonProcess(tmp_short / "s.sock", loop=request.param).wait_ready(started_log=True)
    # And the socket's final name, given a moment after that line is logged.
    wait_for(process.socket_path.exists, what="the daemon's socket")
    yield process
    process.kill()
