"""The library's loggers: the app's structlog setup if it has one, else stdlib logging.

A library must not print into its host's output. structlog unconfigured
prints every event, debug included, to stdout: in a CLI whose stdout is its
output, or a gunicorn log where several workers write at once, that corrupts
what the app prints. So each event is routed when it is logged (the app may
configure logging after importing breakerd, or after making its breakers):

* structlog configured by the app (``structlog.is_configured()``): the
  app's processors, levels and output, exactly as its own loggers;
* otherwise the stdlib logger ``breakerd``, the event rendered as
  ``event key=value ...``: an app that configured ``logging`` gets them
  through its own handlers and levels, and one that configured nothing gets
  Python's last-resort handler: warnings and errors on stderr, debug and
  info dropped.

The daemon's entry point configures structlog itself (JSON lines on
stderr), so its events take the first route.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

__all__ = ["LibraryLogger", "library_logger"]

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
}


class LibraryLogger:
    """A structlog-like logger (``bind``, ``debug`` ... ``exception``) that routes per event."""

    __slots__ = ("_context", "_name")

    def __init__(self, name: str, context: dict[str, Any] | None = None) -> None:
        self._name = name
        self._context = context or {}

    def bind(self, **values: Any) -> LibraryLogger:
        return LibraryLogger(self._name, {**self._context, **values})

    def debug(self, event: str, **fields: Any) -> None:
        self._log("debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log("error", event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._log("exception", event, fields)

    def _log(self, method: str, event: str, fields: dict[str, Any]) -> None:
        if structlog.is_configured():
            logger = structlog.get_logger(self._name)
            if self._context:
                logger = logger.bind(**self._context)
            getattr(logger, method)(event, **fields)
            return
        stdlib = logging.getLogger(self._name)
        level = _LEVELS[method]
        if not stdlib.isEnabledFor(level):
            return
        text = " ".join([event, *(f"{k}={v!r}" for k, v in {**self._context, **fields}.items())])
        stdlib.log(level, "%s", text, exc_info=method == "exception")


def library_logger(name: str = "breakerd") -> LibraryLogger:
    """The logger breakerd's library modules (not the daemon's entry point) log through."""
    return LibraryLogger(name)
