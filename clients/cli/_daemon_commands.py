"""The daemon's subcommands: ``serve``, ``status``, ``events``, and the admin ones."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from breakerd.protocol import (
    Admin,
    AdminOp,
    BreakerStatus,
    Status,
    StatusRequest,
    default_socket_path,
)

from ._admin import ask_daemon

__all__ = ["add_admin_commands", "add_events", "add_serve", "add_status", "printable"]

_ADMIN: dict[str, tuple[AdminOp, str]] = {
    "open": ("force_open", "force a breaker open: reject every call until it is reset"),
    "close": ("reset", "close a breaker (back to closed with an empty window)"),
    "reset": ("reset", "reset a breaker to closed with an empty window"),
    "disable": ("disable", "disable a breaker: admit every call and record nothing"),
}


def _socket_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--socket",
        type=Path,
        default=None,
        metavar="PATH",
        help="the daemon's Unix socket (default: $BREAKERD_SOCKET, else "
        "$XDG_RUNTIME_DIR/breakerd/breakerd.sock, else /tmp/breakerd-$UID/breakerd.sock)",
    )


def _socket(args: argparse.Namespace) -> Path:
    path: Path | None = args.socket
    return path if path is not None else default_socket_path()


def add_serve(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the daemon in the foreground (JSON logs on stderr)",
        description="Serve breakers to every local process over a Unix socket. "
        "Exits 0 on SIGTERM/SIGINT after failing pending requests and removing the socket.",
    )
    _socket_option(parser)
    parser.add_argument("--config", type=Path, default=None, metavar="FILE", help="TOML config")
    parser.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="the daemon's event loop (default auto: uvloop when installed, else asyncio)",
    )
    parser.add_argument(
        "--metrics",
        default=None,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (needs breakerd[metrics]; "
        "overrides [daemon] metrics)",
    )
    parser.add_argument(
        "--state-file",
        default=None,
        metavar="PATH",
        help="where breaker state survives restarts (default: [daemon] state_file, else "
        "beside the socket, e.g. breakerd.state; 'none' turns it off)",
    )
    parser.add_argument(
        "--redis",
        default=None,
        metavar="URL",
        help="share opens and trials with the daemons of other hosts through this Redis "
        "(redis://HOST:PORT/DB or unix:///PATH; needs breakerd[redis]; overrides [fleet] redis)",
    )
    parser.set_defaults(handler=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from breakerd.actor.daemon._serve import serve_main

    return serve_main(
        _socket(args),
        args.config,
        args.loop,
        metrics=args.metrics,
        state_file=args.state_file,
        redis=args.redis,
    )


def add_status(subparsers: Any) -> None:
    parser = subparsers.add_parser("status", help="show every breaker the daemon serves")
    _socket_option(parser)
    parser.add_argument("--json", action="store_true", help="print a JSON list of objects")
    parser.add_argument(
        "--watch",
        action="store_true",
        help="redraw at every state change the daemon pushes, until interrupted "
        "(with --json: one JSON list a line)",
    )
    parser.set_defaults(handler=_run_status)


def status_record(
    status: BreakerStatus, now: float, wall_now: float | None = None
) -> dict[str, Any]:
    """One breaker's ``status --json`` entry; ``now`` is monotonic, ``wall_now`` epoch seconds."""
    snapshot = status.snapshot
    open_for = open_until = None
    if snapshot.open_until is not None:
        open_for = round(max(0.0, snapshot.open_until - now), 3)
        # Converted here, at the edge: the daemon only knows the monotonic clock.
        open_until = round((time.time() if wall_now is None else wall_now) + open_for, 3)
    # A scope is the breaker PARENT/KEY (parent names hold no "/").
    parent, slash, scope = snapshot.name.partition("/")
    return {
        "name": snapshot.name,
        "parent": parent if slash else None,
        "scope": scope if slash else None,
        "state": snapshot.state.value,
        "reason": snapshot.reason,
        "error_code": snapshot.error_code,
        "retry_after": open_for,
        "open_until": open_until,
        "opened_by_pid": snapshot.opened_by_pid or None,
        "failure_rate": snapshot.failure_rate,
        "slow_call_rate": snapshot.slow_call_rate,
        "calls": snapshot.calls,
        "open_for": open_for,
        "trials_in_flight": snapshot.trials_in_flight,
        "clients": status.clients,
        "successes": status.successes,
        "failures": status.failures,
        "rejections": status.rejections,
        "ignored": status.ignored,
        "generation": snapshot.generation,
        **(
            {}
            if status.share is None
            else {"fleet": {"share": status.share, "hosts_open": list(status.hosts_open)}}
        ),
        **({} if status.budget is None else {"budget": dataclasses.asdict(status.budget)}),
    }


def _budget_cell(budget: dict[str, Any] | None) -> str:
    # The status table's BUDGET column: only what the breaker has.
    if budget is None:
        return "-"
    parts = []
    if budget["max_rate"] is not None:
        parts.append(f"{budget['max_rate']:g}/s")
    if budget["max_concurrent"] is not None:
        parts.append(f"leases {budget['leases_in_use']}/{budget['max_concurrent']}")
    if budget["waiters"]:
        parts.append(f"waiting {budget['waiters']}")
    for key, unit in (("remaining_requests", "req"), ("remaining_tokens", "tok")):
        if budget[key] is not None:
            parts.append(f"{budget[key]:.0f} {unit} left")
    refused = budget["rate_rejections"] + budget["concurrency_rejections"]
    if refused:
        parts.append(f"{refused} refused")
    return ", ".join(parts) or "headers"


def _run_status(args: argparse.Namespace) -> int:
    if not args.watch:
        _print_status(_socket(args), args.json)
        return 0
    from ._events import follow_until_interrupted

    path = _socket(args)
    # Redraw only when a transition is pushed: the terminal is cleared when
    # it is one, and a pipe gets one table after another.
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() and not args.json else ""

    def redraw(*_: object) -> None:
        sys.stdout.write(clear)
        _print_status(path, args.json, compact=True)
        if not clear and not args.json:
            print()
        sys.stdout.flush()

    try:
        follow_until_interrupted(path, (), redraw, on_subscribed=redraw)
    except KeyboardInterrupt:
        return 0
    return 0


def _print_status(path: Path, as_json: bool, *, compact: bool = False) -> None:
    breakers: list[BreakerStatus] = []
    offset: int | None = 0
    fleet: str | None = None
    while offset is not None:
        # A page at a time: every breaker's status may not fit in one frame.
        (status,) = ask_daemon(path, StatusRequest(None, offset))
        assert isinstance(status, Status)
        breakers.extend(status.breakers)
        offset = status.next_offset
        fleet = status.fleet
    # CLOCK_MONOTONIC is system-wide on Linux: the daemon's deadlines are ours.
    now = time.monotonic()
    records = [status_record(b, now) for b in breakers]
    if as_json:
        json.dump(records, sys.stdout, indent=None if compact else 2)
        sys.stdout.write("\n")
        return
    if fleet is not None:
        print(f"fleet link: {fleet}")
    if not records:
        print("no breakers registered")
        return
    headers = ["NAME", "STATE", "FAILURES", "SLOW", "CALLS", "OPEN FOR", "TRIALS", "CLIENTS"]
    budgeted = any("budget" in r for r in records)
    rows = [
        [
            printable(r["name"]),
            r["state"],
            _percent(r["failure_rate"]),
            _percent(r["slow_call_rate"]),
            str(r["calls"]),
            "-" if r["open_for"] is None else f"{r['open_for']:.1f}s",
            str(r["trials_in_flight"]),
            str(r["clients"]),
            *([_budget_cell(r.get("budget"))] if budgeted else []),
        ]
        for r in records
    ]
    if budgeted:
        headers.append("BUDGET")
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    for row in [headers, *rows]:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def printable(name: str) -> str:
    """``name`` safe for a terminal: backslash escapes for what is not printable.

    Names come from any client: a newline would forge a row, an escape
    sequence would drive the admin's terminal. Backslashes are doubled so an
    escaped name never reads like another name.
    """
    if name.isprintable() and "\\" not in name:
        return name
    return "".join(_escape(ch) for ch in name)


def _escape(ch: str) -> str:
    if ch == "\\":
        return "\\\\"
    if ch.isprintable():
        return ch
    if ch in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[ch]
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.0%}"


def add_events(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "events",
        help="print breaker state changes as they happen, until interrupted",
        description="Print one line per state change of the named breakers (every breaker "
        "when none is named, those registered later too), as the daemon pushes it, "
        "flushed at once. Ctrl-C ends it with exit status 0.",
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="only these breakers")
    _socket_option(parser)
    parser.add_argument(
        "--json",
        action="store_true",
        help="one JSON object a line: time, name, from_state, to_state, reason, "
        "failure_rate, slow_call_rate, open_until (times in seconds since the epoch)",
    )
    parser.set_defaults(handler=_run_events)


def _run_events(args: argparse.Namespace) -> int:
    from ._events import event_line, event_record, follow_until_interrupted

    def show(event: Any) -> None:
        line = json.dumps(event_record(event)) if args.json else event_line(event)
        # Flushed at once: the output is piped and tailed during incidents.
        print(line, flush=True)

    try:
        follow_until_interrupted(_socket(args), args.names, show)
    except KeyboardInterrupt:
        return 0
    return 0


def add_admin_commands(subparsers: Any) -> None:
    for command, (op, help_text) in _ADMIN.items():
        parser = subparsers.add_parser(command, help=help_text, description=help_text)
        parser.add_argument("name", metavar="NAME", help="the breaker's name")
        _socket_option(parser)
        parser.add_argument(
            "--fleet",
            action="store_true",
            help="on every daemon of the fleet (those connected to Redis now), not only this one",
        )
        parser.set_defaults(handler=_run_admin, admin_op=op)


def _run_admin(args: argparse.Namespace) -> int:
    (snapshot,) = ask_daemon(_socket(args), Admin(args.name, args.admin_op, args.fleet))
    print(f"{args.name}: {snapshot.state.value}" + (" (sent to the fleet)" if args.fleet else ""))
    return 0
