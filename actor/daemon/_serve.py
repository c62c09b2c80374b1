"""``breakerd serve``: the daemon's entry point (the only place that configures logging)."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Final, Literal

import anyio
import structlog

from breakerd.protocol import MAX_SOCKET_PATH, default_socket_path

from . import _systemd as systemd
from ._config import (
    ConfigError,
    MetricsUnavailableError,
    load_config,
    parse_metrics_address,
    with_state_file,
)
from ._fleet_logic import FleetSettings
from ._server import Daemon, DaemonAlreadyRunningError, UnsafeSocketPathError

__all__ = ["LOOPS", "configure_daemon_logging", "resolve_loop", "serve_main"]

#: ``--loop`` values: ``auto`` is uvloop when it is installed, asyncio otherwise.
LOOPS: Final = ("auto", "asyncio", "uvloop")
Loop = Literal["asyncio", "uvloop"]


def configure_daemon_logging(level: int = logging.INFO) -> None:
    """JSON lines on stderr, context variables first (connection ids etc.)."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def resolve_loop(requested: str) -> Loop:
    """The event loop ``--loop requested`` runs on; ``ValueError`` if it cannot be had."""
    if requested not in LOOPS:
        raise ValueError(f"--loop must be one of {', '.join(LOOPS)}, not {requested!r}")
    installed = importlib.util.find_spec("uvloop") is not None
    if requested == "uvloop" and not installed:
        raise ValueError("--loop uvloop: uvloop is not installed (pip install 'breakerd[uvloop]')")
    if requested == "asyncio" or not installed:
        return "asyncio"
    return "uvloop"


def serve_main(
    socket_path: Path | None,
    config_path: Path | None,
    loop: str = "auto",
    metrics: str | None = None,
    state_file: str | None = None,
    redis: str | None = None,
) -> int:
    """Run the daemon in the foreground. Returns the process exit status.

    ``metrics``: ``HOST:PORT`` for the Prometheus endpoint, over the config file's.
    ``state_file``: ``--state-file`` (a path, or ``none``); None leaves it to
    the config file, else beside the socket.
    ``redis``: ``--redis URL``, over ``[fleet] redis``: the fleet is on.
    """
    configure_daemon_logging()
    try:
        chosen = resolve_loop(loop)
    except ValueError as exc:
        print(f"breakerd: {exc}", file=sys.stderr)
        return 2
    try:
        inherited = systemd.listen_socket()
    except systemd.ActivationError as exc:
        print(f"breakerd: {exc}", file=sys.stderr)
        return 2
    path = socket_path if socket_path is not None else default_socket_path()
    if inherited is not None:
        # The unit's ListenStream= decides; the lock and state file go beside it.
        name = inherited.getsockname()
        if not isinstance(name, str) or not name.startswith("/"):
            print(
                "breakerd: the socket systemd passed has no path (ListenStream= must be "
                "a file system path)",
                file=sys.stderr,
            )
            return 2
        path = Path(name)
    if len(str(path).encode()) > MAX_SOCKET_PATH:
        print(f"breakerd: socket path too long for a Unix socket: {path}", file=sys.stderr)
        return 2
    try:
        settings = load_config(config_path, path)
    except ConfigError as exc:
        print(f"breakerd: {exc}", file=sys.stderr)
        return 2
    if metrics is not None:
        try:
            settings = dataclasses.replace(settings, metrics=parse_metrics_address(metrics))
        except ValueError as exc:
            print(f"breakerd: --metrics: {exc}", file=sys.stderr)
            return 2
    if settings.metrics is not None and importlib.util.find_spec("prometheus_client") is None:
        print(
            "breakerd: metrics need prometheus-client, which is not installed "
            "(pip install 'breakerd[metrics]')",
            file=sys.stderr,
        )
        return 2
    if state_file is not None:
        settings = with_state_file(settings, state_file)
    if redis is not None:
        if not redis.startswith(("redis://", "rediss://", "unix://")):
            print(
                f'breakerd: --redis must be a "redis://..." or "unix://..." URL, got {redis!r}',
                file=sys.stderr,
            )
            return 2
        fleet = settings.fleet or FleetSettings(redis=redis)
        settings = dataclasses.replace(settings, fleet=dataclasses.replace(fleet, redis=redis))
    if (
        settings.fleet is not None
        and settings.fleet.redis
        and importlib.util.find_spec("redis") is None
    ):
        print(
            "breakerd: the fleet ([fleet] redis or --redis) needs redis-py, which is not "
            "installed (pip install 'breakerd[redis]')",
            file=sys.stderr,
        )
        return 2
    daemon = Daemon(settings, loop_name=chosen, listen_socket=inherited)
    try:
        # uvloop's C loop costs the daemon less per request than asyncio's.
        anyio.run(daemon.run, backend_options={"use_uvloop": chosen == "uvloop"})
    except (DaemonAlreadyRunningError, MetricsUnavailableError, UnsafeSocketPathError) as exc:
        print(f"breakerd: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"breakerd: cannot serve on {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0
