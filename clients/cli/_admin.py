"""A one-shot blocking client for the command line: connect, ask, close."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from breakerd.protocol import (
    MIN_PROTOCOL_VERSION,
    NEED_DATA,
    PROTOCOL_VERSION,
    Connection,
    DaemonUnavailableError,
    Hello,
    ProtocolError,
    RequestMessage,
    ResponseReceived,
)

from .._peer import trusted_uids, untrusted_peer

__all__ = ["ask_daemon", "connect_to_daemon", "next_daemon_event"]


def connect_to_daemon(socket_path: Path, timeout: float | None = None) -> socket.socket:
    """A blocking socket connected to the daemon at ``socket_path``, its peer checked.

    Raises ``DaemonUnavailableError`` when nothing listens there, when this
    process may not connect, and when whoever listens is not a daemon this
    process trusts (``SO_PEERCRED``: its own uid, root, or a trusted uid).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(socket_path))
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        sock.close()
        raise DaemonUnavailableError(
            f"no breakerd daemon at {socket_path} (is 'breakerd serve' running?)"
        ) from exc
    except PermissionError as exc:
        sock.close()
        raise DaemonUnavailableError(
            f"not allowed to connect to {socket_path}: {exc.strerror}"
        ) from exc
    except BaseException:
        sock.close()
        raise
    untrusted = untrusted_peer(sock, trusted_uids())
    if untrusted is not None:
        sock.close()
        raise DaemonUnavailableError(f"not asking the daemon at {socket_path}: {untrusted}")
    return sock


def next_daemon_event(
    sock: socket.socket, conn: Connection, socket_path: Path, closed: str
) -> object:
    """The connection's next event, reading the socket as it needs.

    Raises ``DaemonUnavailableError`` when the read fails, with ``closed``
    as its message when the daemon closed the connection, and
    ``ProtocolError`` for bytes that break the protocol.
    """
    while True:
        event = conn.next_event()
        if event is not NEED_DATA:
            return event
        try:
            chunk = sock.recv(65536)
        except OSError as exc:
            raise DaemonUnavailableError(f"lost the daemon at {socket_path}: {exc}") from exc
        if not chunk:
            raise DaemonUnavailableError(closed)
        conn.receive_data(chunk)


def ask_daemon(socket_path: Path, *messages: RequestMessage, timeout: float = 10.0) -> list[Any]:
    """Send ``messages`` after a hello and return their results in order.

    Raises the daemon's error for the first request that failed, and
    ``DaemonUnavailableError`` when there is no daemon to ask.
    """
    sock = connect_to_daemon(socket_path, timeout)
    try:
        conn = Connection("client")
        hello = Hello(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, "breakerd-cli", os.getpid())
        data = conn.send_request(0, hello)
        for msgid, message in enumerate(messages, start=1):
            data += conn.send_request(msgid, message)
        sock.sendall(data)
        results: dict[int, Any] = {}
        while len(results) < len(messages) + 1:
            event = next_daemon_event(
                sock, conn, socket_path, f"the daemon at {socket_path} closed the connection"
            )
            if isinstance(event, ResponseReceived):
                if event.error is not None:
                    raise event.error
                results[event.msgid] = event.result
        return [results[msgid] for msgid in range(1, len(messages) + 1)]
    except ProtocolError as exc:
        raise DaemonUnavailableError(f"the daemon at {socket_path} spoke gibberish: {exc}") from exc
    finally:
        sock.close()
