"""``breakerd serve``: the daemon's entry point (the only place that configures logging)."""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from typing import Final, Literal

import anyio
import structlog

from breakerd.protocol import default_socket_path

from ._daemon_config import ConfigError, load_config
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


def serve_main(socket_path: Path | None, config_path: Path | None, loop: str = "auto") -> int:
    """Run the daemon in the foreground. Returns the process exit status."""
    configure_daemon_logging()
    try:
        chosen = resolve_loop(loop)
    except ValueError as exc:
        print(f"breakerd: {exc}", file=sys.stderr)
        return 2
    path = socket_path if socket_path is not None else default_socket_path()
    if len(str(path).encode()) > 107:
        print(f"breakerd: socket path too long for a Unix socket: {path}", file=sys.stderr)
        return 2
    try:
        settings = load_config(config_path, path)
    except ConfigError as exc:
        print(f"breakerd: {exc}", file=sys.stderr)
        return 2
    daemon = Daemon(settings, loop_name=chosen)
    try:
        # uvloop's C loop costs the daemon less per request than asyncio's.
        anyio.run(daemon.run, backend_options={"use_uvloop": chosen == "uvloop"})
    except (DaemonAlreadyRunningError, UnsafeSocketPathError) as exc:
        print(f"breakerd: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"breakerd: cannot serve on {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0
