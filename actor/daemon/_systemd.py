"""systemd glue: socket activation, readiness notification and the watchdog.

Hand-written rather than a dependency: the protocols are a few environment
variables and one datagram each (``sd_listen_fds(3)``, ``sd_notify(3)``),
and the libraries that wrap them either need libsystemd's headers to build
(``systemd-python``) or bring more than this file does.

* Socket activation: ``LISTEN_PID`` is our pid and ``LISTEN_FDS`` >= 1: the
  listening socket is descriptor 3 (``SD_LISTEN_FDS_START``). The variables
  are removed so that no child takes the socket for its own.
* ``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace): the
  daemon sends ``READY=1`` once the socket accepts, ``RELOADING=1`` and
  ``READY=1`` around a SIGHUP reload, ``STOPPING=1`` when it starts to shut
  down, and ``WATCHDOG=1`` from ``watchdog``.
* ``WATCHDOG_USEC`` (for us unless ``WATCHDOG_PID`` names another process):
  ``WATCHDOG=1`` at half that interval, and only once every breaker actor
  has answered a ping through its own inbox, so a daemon whose actors stop
  draining is restarted by systemd rather than kept alive by a timer.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

import anyio
import structlog

from breakerd.protocol import BreakerError

from .._actor import BreakerActor

__all__ = [
    "SD_LISTEN_FDS_START",
    "ActivationError",
    "listen_socket",
    "notify",
    "ping_all",
    "reloading_message",
    "watchdog",
    "watchdog_interval",
]

SD_LISTEN_FDS_START: Final = 3

_logger = structlog.get_logger("breakerd.daemon")


class ActivationError(BreakerError, RuntimeError):
    """systemd passed something the daemon cannot serve on."""


def listen_socket(environ: dict[str, str] | None = None) -> socket.socket | None:
    """The socket systemd passed us, or None when not socket-activated.

    Raises ``ActivationError`` when the passed descriptor is not a listening
    Unix stream socket.
    """
    env = os.environ if environ is None else environ
    pid, count = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    if pid is None or count is None:
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)
    try:
        if int(pid) != os.getpid() or int(count) < 1:
            return None
        n = int(count)
    except ValueError:
        return None
    if n > 1:
        _logger.warning(
            "socket_activation_extra_fds", passed=n, effect="serving the first socket only"
        )
    try:
        sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    except OSError as exc:
        raise ActivationError(f"descriptor 3 from systemd is not a socket: {exc}") from None
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening:
        sock.detach()
        raise ActivationError(
            "the socket systemd passed must be a listening Unix stream socket "
            "(ListenStream=/path in the .socket unit)"
        )
    os.set_inheritable(sock.fileno(), False)
    return sock


def notify(message: str, environ: dict[str, str] | None = None) -> bool:
    """Send ``message`` to systemd's ``NOTIFY_SOCKET``; False when there is none or it fails."""
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), address)
    except OSError as exc:
        _logger.warning("sd_notify_failed", message=message, error=str(exc))
        return False
    return True


def reloading_message(clock: Callable[[], float] = time.monotonic) -> str:
    """``RELOADING=1`` with the timestamp ``Type=notify-reload`` services must send."""
    return f"RELOADING=1\nMONOTONIC_USEC={int(clock() * 1_000_000)}"


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` messages (half of ``WATCHDOG_USEC``), or None."""
    env = os.environ if environ is None else environ
    usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
    if not usec or not env.get("NOTIFY_SOCKET"):
        return None
    try:
        if pid and int(pid) != os.getpid():
            return None
        value = int(usec)
    except ValueError:
        return None
    return value / 2_000_000 if value > 0 else None


async def ping_all(actors: Iterable[BreakerActor]) -> None:
    """Return once every actor has answered a ping from its own drain."""
    pending = list(actors)
    if not pending:
        return
    done = anyio.Event()
    left = len(pending)

    def answered(result: Any, error: BaseException | None) -> None:
        nonlocal left
        left -= 1
        if left == 0:
            done.set()

    for actor in pending:
        actor.ping(answered)
    await done.wait()


async def watchdog(
    interval: float,
    actors: Callable[[], Iterable[BreakerActor]],
    send: Callable[[str], object] = notify,
) -> None:
    """``WATCHDOG=1`` every ``interval`` seconds while every actor drains, until cancelled.

    A round that never completes sends nothing more: systemd's timer then
    runs out and it restarts the daemon, which is the point.
    """
    while True:
        await ping_all(actors())
        send("WATCHDOG=1")
        await anyio.sleep(interval)
