"""The daemon's socket file: its directory, its lock, binding and removing it.

A second daemon on the same socket must refuse to start rather than steal
it, and nothing another user prepared (a directory, a symlink, a hard-linked
lock file) may be trusted or touched. The lock (``flock`` on
``SOCKET.lock``) says who serves; the socket is bound under a hidden name
with its final mode and renamed into place only once it accepts, so whoever
sees the file can connect.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import inspect
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import structlog

from breakerd.protocol import MAX_SOCKET_PATH, BreakerError

__all__ = ["DaemonAlreadyRunningError", "SocketFile", "UnsafeSocketPathError", "serve_unix"]

# Many workers may start at once (gunicorn forking 64 of them, say).
_BACKLOG = 1024


async def serve_unix(
    loop: asyncio.AbstractEventLoop,
    protocol: Callable[[], asyncio.BaseProtocol],
    listener: socket.socket,
) -> asyncio.Server:
    """``create_unix_server`` that never unlinks the socket file itself.

    asyncio from Python 3.13 and uvloop from 0.21 remove a server's socket
    file when it closes (``cleanup_socket``); the daemon decides that alone:
    its own socket goes at shutdown, but one systemd passed in must stay for
    the next activation. Loops without the parameter never remove it.
    """
    # Any: the typeshed of Python 3.11, which mypy checks against, lacks the parameter.
    create: Any = loop.create_unix_server
    if "cleanup_socket" in inspect.signature(create).parameters:
        server = await create(protocol, sock=listener, backlog=_BACKLOG, cleanup_socket=False)
    else:
        server = await create(protocol, sock=listener, backlog=_BACKLOG)
    return cast(asyncio.Server, server)


class DaemonAlreadyRunningError(BreakerError, RuntimeError):
    """Another daemon holds the lock for this socket."""


class UnsafeSocketPathError(BreakerError, RuntimeError):
    """The socket's directory or lock file could be another process's: not used."""


class SocketFile:
    """The socket path a daemon serves, its lock file and the directory holding both."""

    def __init__(self, socket_path: Path, *, activated: bool, log: structlog.BoundLogger) -> None:
        self.socket_path = socket_path
        #: systemd passed the listener in: never bound, never unlinked here.
        self.activated = activated
        self.log = log
        self.uid = os.getuid()
        self._lock_fd: int | None = None

    @property
    def lock_path(self) -> Path:
        return self.socket_path.with_name(self.socket_path.name + ".lock")

    def take_lock(self) -> None:
        directory = self.socket_path.parent
        try:
            directory.mkdir(mode=0o700, parents=True)
            os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask
        except FileExistsError:
            # Not ours: /tmp/breakerd-$UID can be made by anyone before us.
            self._check_directory(directory)
        fd = self._open_lock_file()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                try:
                    holder = self.lock_path.read_text().strip() or "unknown"
                except OSError:
                    holder = "unknown"
                raise DaemonAlreadyRunningError(
                    f"another breakerd daemon (pid {holder}) is serving {self.socket_path}"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        if not self.activated and (self.socket_path.exists() or self.socket_path.is_symlink()):
            # We hold the lock, so whoever made this socket is gone.
            if not stat.S_ISSOCK(self.socket_path.lstat().st_mode):
                self.release_lock()
                raise UnsafeSocketPathError(
                    f"{self.socket_path} exists and is not a socket; not touching it"
                )
            self.socket_path.unlink()
            self.log.warning("stale_socket_removed", socket=str(self.socket_path))

    def _check_directory(self, directory: Path) -> None:
        """Refuse a directory someone else could have prepared (or can change under us)."""
        info = os.lstat(directory)
        if stat.S_ISLNK(info.st_mode):
            raise UnsafeSocketPathError(
                f"socket directory {directory} is a symlink; refusing to serve through it"
            )
        if not stat.S_ISDIR(info.st_mode):
            raise UnsafeSocketPathError(f"socket directory {directory} is not a directory")
        if info.st_uid != self.uid:
            raise UnsafeSocketPathError(
                f"socket directory {directory} belongs to uid {info.st_uid}, not to the "
                f"daemon's uid {self.uid}; remove it or choose another --socket"
            )
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise UnsafeSocketPathError(
                f"socket directory {directory} is writable by group or others (mode "
                f"{stat.S_IMODE(info.st_mode):04o}); make it 0700 or choose another --socket"
            )

    def _open_lock_file(self) -> int:
        """The lock file, made anew, or the one a previous daemon of ours left."""
        path = self.lock_path
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafeSocketPathError(
                    f"lock file {path} is a symlink; not following it (remove it if it is stale)"
                ) from None
            raise
        # It existed: truncated below only if it can only be a lock file of
        # ours. A hard link to some other file has a second name.
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != self.uid or info.st_nlink != 1:
            os.close(fd)
            raise UnsafeSocketPathError(
                f"lock file {path} is not a plain file of the daemon's uid {self.uid} "
                f"with one name; not touching it (remove it if it is stale)"
            )
        return fd

    def release_lock(self) -> None:
        if self._lock_fd is not None:
            try:
                self.lock_path.unlink()
            except FileNotFoundError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None

    @property
    def bind_path(self) -> Path:
        hidden = self.socket_path.with_name(f".{self.socket_path.name}.{os.getpid()}")
        if len(os.fsencode(hidden)) > MAX_SOCKET_PATH:
            return self.socket_path  # no room for the longer name: bind in place
        return hidden

    def bind(self, mode: int, gid: int | None) -> socket.socket:
        """A listener bound under a temporary name; run() renames it into place."""
        path = self.bind_path
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Bind under a umask that already gives the final mode: no window in
        # which the socket is open to others.
        old_umask = os.umask(0o777 & ~mode)
        try:
            listener.bind(str(path))
        except BaseException:
            listener.close()
            raise
        finally:
            os.umask(old_umask)
        if gid is not None:
            os.chown(path, -1, gid)
        os.chmod(path, mode)
        listener.listen(_BACKLOG)
        listener.setblocking(False)
        return listener

    def remove(self) -> None:
        if self._lock_fd is None or self.activated:
            return  # not ours (systemd's socket outlives us, for the next activation)
        for path in (self.socket_path, self.bind_path):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
