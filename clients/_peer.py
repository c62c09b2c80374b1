"""Who answers on the daemon's socket: the peer check every client makes after connecting.

A socket path is only a name: without ``XDG_RUNTIME_DIR`` it lives under
``/tmp``, where another user may have put a socket of their own first. So a
client asks the kernel who is at the other end (``SO_PEERCRED``: the uid of
the process that bound the socket) and talks only to a daemon running as its
own uid, as root, or as a uid it was told to trust: ``trusted_uids``, or the
``BREAKERD_TRUSTED_UIDS`` environment variable (uids separated by commas or
spaces). Anyone else is treated as no daemon at all.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterable, Mapping
from typing import Final

__all__ = ["TRUSTED_UIDS_ENV", "trusted_uids", "untrusted_peer"]

TRUSTED_UIDS_ENV: Final = "BREAKERD_TRUSTED_UIDS"
_PEERCRED: Final = struct.Struct("3i")


def trusted_uids(
    extra: Iterable[int] = (), environ: Mapping[str, str] | None = None
) -> frozenset[int]:
    """The uids a daemon may run as: ours, root, ``extra`` and ``$BREAKERD_TRUSTED_UIDS``.

    ``ValueError`` names an entry of the variable that is not a uid.
    """
    env = os.environ if environ is None else environ
    uids = {os.getuid(), 0, *extra}
    for entry in env.get(TRUSTED_UIDS_ENV, "").replace(",", " ").split():
        if not (entry.isascii() and entry.isdigit()):
            raise ValueError(
                f"{TRUSTED_UIDS_ENV}: {entry!r} is not a uid (expected numbers separated "
                "by commas or spaces)"
            )
        uids.add(int(entry))
    return frozenset(uids)


def untrusted_peer(sock: socket.socket, trusted: frozenset[int]) -> str | None:
    """Why the daemon at the other end of ``sock`` must not be used, or None if it may."""
    if not hasattr(socket, "SO_PEERCRED"):  # pragma: no cover - not Linux
        return None
    pid, uid, _ = _PEERCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    )
    if uid in trusted:
        return None
    return (
        f"the process serving this socket (pid {pid}) runs as uid {uid}, which this "
        f"process does not trust (its own uid, root, or {TRUSTED_UIDS_ENV})"
    )
