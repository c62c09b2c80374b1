"""``breakerd events`` and ``breakerd status --watch``: transitions pushed by the daemon.

A blocking client, like ``_admin``: one connection, a ``subscribe`` request,
then ``transition`` notifications until the daemon goes away or the user
interrupts. Nothing polls: the process sleeps in ``recv`` between events.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from breakerd.protocol import (
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    Connection,
    DaemonUnavailableError,
    Hello,
    NotificationReceived,
    ProtocolError,
    ResponseReceived,
    Subscribe,
    TransitionEvent,
)

from ._admin import connect_to_daemon, next_daemon_event

__all__ = ["event_line", "event_record", "follow_transitions", "follow_until_interrupted"]

#: Longest pause between two attempts to reach a daemon that went away.
MAX_RECONNECT_DELAY = 2.0


def follow_transitions(
    socket_path: Path,
    names: Sequence[str],
    on_event: Callable[[TransitionEvent], None],
    *,
    on_subscribed: Callable[[], None] | None = None,
) -> None:
    """Call ``on_event`` for every transition of ``names`` (all when empty), forever.

    ``on_subscribed`` runs once the daemon has confirmed the subscription:
    from then on no transition is missed. Returns never; raises
    ``DaemonUnavailableError`` when the daemon is missing, too old for
    events, or goes away.
    """
    sock = connect_to_daemon(socket_path)
    try:
        conn = Connection("client")
        hello = Hello(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, "breakerd-events", os.getpid())
        sock.sendall(conn.send_request(0, hello) + conn.send_request(1, Subscribe(tuple(names))))
        subscribed = False
        while True:
            closed = (
                f"the daemon at {socket_path} went away"
                if subscribed
                else f"the daemon at {socket_path} closed the connection before "
                "confirming the subscription (a daemon without events is too old)"
            )
            event = next_daemon_event(sock, conn, socket_path, closed)
            if isinstance(event, ResponseReceived):
                if event.error is not None:
                    raise event.error
                if event.msgid == 1:
                    subscribed = True
                    if on_subscribed is not None:
                        on_subscribed()
            elif isinstance(event, NotificationReceived) and isinstance(
                event.message, TransitionEvent
            ):
                on_event(event.message)
    except ProtocolError as exc:
        raise DaemonUnavailableError(f"the daemon at {socket_path} spoke gibberish: {exc}") from exc
    finally:
        sock.close()


def follow_until_interrupted(
    socket_path: Path,
    names: Sequence[str],
    on_event: Callable[[TransitionEvent], None],
    *,
    on_subscribed: Callable[[], None] | None = None,
    stderr: TextIO = sys.stderr,
) -> None:
    """``follow_transitions``, resubscribing whenever the daemon comes back.

    An operator tails events through a daemon restart: losing the daemon is
    one line on ``stderr``, and the stream resumes once it is back
    (transitions in between are not shown). No daemon at the start is an
    error, raised at once. Returns only by an exception (Ctrl-C).
    """
    reached = False
    lost = False
    delay = 0.1

    def subscribed() -> None:
        nonlocal reached, lost, delay
        if lost:
            print(f"breakerd: resubscribed at {socket_path}", file=stderr, flush=True)
        reached, lost, delay = True, False, 0.1
        if on_subscribed is not None:
            on_subscribed()

    while True:
        try:
            follow_transitions(socket_path, names, on_event, on_subscribed=subscribed)
        except DaemonUnavailableError as exc:
            if not reached:
                raise
            if not lost:
                lost = True
                print(
                    f"breakerd: {exc}; reconnecting (transitions until then are not shown)",
                    file=stderr,
                    flush=True,
                )
            # A pause between attempts to reach another process, not logic.
            time.sleep(delay)
            delay = min(delay * 2, MAX_RECONNECT_DELAY)


def _wall(instant: float) -> float:
    # CLOCK_MONOTONIC is system-wide on Linux: the daemon's instants are ours,
    # and the wall clock is the same distance away from both.
    return time.time() - (time.monotonic() - instant)


def event_record(event: TransitionEvent) -> dict[str, Any]:
    """The ``--json`` form: times on the wall clock, seconds since the epoch."""
    open_until = None if event.open_until is None else _wall(event.open_until)
    return {
        "time": round(_wall(event.at), 6),
        "name": event.name,
        "from_state": event.from_state.value,
        "to_state": event.to_state.value,
        "reason": event.reason,
        "failure_rate": event.failure_rate,
        "slow_call_rate": event.slow_call_rate,
        "open_until": None if open_until is None else round(open_until, 6),
    }


def _iso(wall: float) -> str:
    moment = datetime.datetime.fromtimestamp(wall, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_line(event: TransitionEvent) -> str:
    """One human line: time, name, move, reason, rates, open deadline."""
    record = event_record(event)
    parts = [
        _iso(record["time"]),
        event.name,
        f"{record['from_state']} -> {record['to_state']}",
        event.reason,
    ]
    if event.failure_rate is not None:
        parts.append(f"failure_rate={event.failure_rate:.1%}")
    if event.slow_call_rate is not None:
        parts.append(f"slow_call_rate={event.slow_call_rate:.1%}")
    if record["open_until"] is not None:
        parts.append(f"open_until={_iso(record['open_until'])}")
    return "  ".join(parts)
