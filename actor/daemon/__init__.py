"""The daemon, `breakerd serve`: one actor system shared by every process on the host.

The socket server, its config, the entry point, the shared-memory state table
writer, the state file, metrics, systemd glue and the fleet link (Redis). The
command line (:mod:`breakerd.clients.cli`) imports what it needs from here.
"""

from ._config import ConfigError, DaemonSettings, load_config
from ._serve import LOOPS, serve_main
from ._server import SERVER_NAME, Daemon, DaemonAlreadyRunningError

__all__ = [
    "LOOPS",
    "SERVER_NAME",
    "ConfigError",
    "Daemon",
    "DaemonAlreadyRunningError",
    "DaemonSettings",
    "load_config",
    "serve_main",
]
