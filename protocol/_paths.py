"""Where the daemon's socket lives by default (shared by daemon and clients)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["MAX_SOCKET_PATH", "SOCKET_ENV", "default_socket_path"]

SOCKET_ENV = "BREAKERD_SOCKET"
#: sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


def default_socket_path(environ: Mapping[str, str] | None = None) -> Path:
    """``$BREAKERD_SOCKET``, else ``$XDG_RUNTIME_DIR/breakerd/breakerd.sock``,
    else ``/tmp/breakerd-$UID/breakerd.sock``."""
    env = os.environ if environ is None else environ
    explicit = env.get(SOCKET_ENV)
    if explicit:
        return Path(explicit)
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "breakerd" / "breakerd.sock"
    return Path(f"/tmp/breakerd-{os.getuid()}") / "breakerd.sock"
