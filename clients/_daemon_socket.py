"""One connected socket to the daemon: bytes out, bytes (and the welcome's descriptor) in.

A ``DaemonClient`` makes one per connection (``DaemonSocket.open``) and
drops it when the connection ends; everything here belongs to that one
connection: the descriptor, the poll object a reading caller waits on, why
it is being dropped, and the state table's descriptor until the welcome
takes it. The client's lock and reader baton decide who calls what.
"""

from __future__ import annotations

import os
import select
import socket
from pathlib import Path
from typing import Final

from breakerd.protocol import MAX_SOCKET_PATH

from ._peer import untrusted_peer

__all__ = ["DaemonSocket", "check_socket_path"]

_READ_SIZE: Final = 65536
#: Descriptors accepted with a welcome (the daemon sends one; more are closed).
_MAX_WELCOME_FDS: Final = 4


def check_socket_path(path: str | Path) -> str:
    """The socket path as a string, or ``ValueError`` saying why it cannot be one."""
    text = os.fspath(path)
    if not text:
        raise ValueError("daemon socket path is empty")
    if "\0" in text:
        raise ValueError(f"daemon socket path {text!r} contains a NUL byte")
    size = len(os.fsencode(text))
    if size > MAX_SOCKET_PATH:
        raise ValueError(
            f"daemon socket path {text!r} is {size} bytes long; a Unix socket path "
            f"holds at most {MAX_SOCKET_PATH} (use a shorter directory)"
        )
    return text


class DaemonSocket:
    """One connection to the daemon, from ``connect()`` to ``close()``."""

    __slots__ = ("_sock", "awaiting_welcome", "break_reason", "fd", "read_poll", "table_fd")

    @classmethod
    def open(
        cls,
        path: str,
        *,
        connect_timeout: float,
        request_timeout: float,
        trusted_uids: frozenset[int],
    ) -> DaemonSocket | str:
        """A connection to the daemon at ``path``, or why there is none."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(connect_timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            return f"cannot connect ({exc.strerror or exc!r})"
        untrusted = untrusted_peer(sock, trusted_uids)
        if untrusted is not None:
            # Someone else's socket at our path: its answers could steer every breaker.
            sock.close()
            return untrusted
        # Bounds a write to a daemon that stopped reading; reads only happen
        # after poll() says there is data, so they never wait on it.
        sock.settimeout(request_timeout)
        return cls(sock)

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.fd = sock.fileno()
        #: What a caller holding the reader baton waits on.
        self.read_poll = select.poll()
        self.read_poll.register(self.fd, select.POLLIN)
        #: Why the connection is being dropped, once it is (the first reason wins).
        self.break_reason: str | None = None
        #: Until the welcome is in, reads pick up the table's descriptor.
        self.awaiting_welcome = True
        self.table_fd: int | None = None

    def write(self, data: bytes) -> str | None:
        """Write all of ``data``: None, or why the connection must be dropped."""
        try:
            # One write(2) on the non-blocking descriptor first: sendall() on a
            # socket with a timeout polls before every send, a system call
            # that is nearly always wasted. It finishes what is left.
            try:
                sent = os.write(self.fd, data)
            except BlockingIOError:
                sent = 0
            if sent < len(data):
                self._sock.sendall(memoryview(data)[sent:])
        except OSError as exc:
            return f"write failed: {exc.strerror or exc!r}"
        return None

    def read(self) -> bytes:
        """One read (``b""``: end of file); raises ``BlockingIOError`` when there is nothing."""
        if not self.awaiting_welcome:
            return os.read(self.fd, _READ_SIZE)
        # A plain read would drop (close) a descriptor that came with the bytes.
        data, fds, _, _ = socket.recv_fds(
            self._sock,
            _READ_SIZE,
            _MAX_WELCOME_FDS,
            socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT,
        )
        for received in fds:
            if self.table_fd is None:
                self.table_fd = received
            else:
                os.close(received)
        return data

    def take_table_fd(self) -> int | None:
        """The welcome is in: the table's descriptor, if one came (the caller closes it)."""
        self.awaiting_welcome = False
        table_fd, self.table_fd = self.table_fd, None
        return table_fd

    def shut(self, reason: str) -> None:
        """Start dropping the connection: ``shutdown()`` ends any reader's wait at once.

        The descriptor stays open for whoever holds the reader baton (closing
        it here could let the number be reused under a poll).
        """
        if self.break_reason is None:
            self.break_reason = reason
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def end_writing(self) -> bool:
        """Send end of file (a graceful close); False if the socket is already broken."""
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            return False
        return True

    def close(self) -> None:
        table_fd, self.table_fd = self.table_fd, None
        if table_fd is not None:
            try:
                os.close(table_fd)
            except OSError:
                pass
        try:
            self._sock.close()
        except OSError:
            pass
