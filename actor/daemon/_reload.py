"""SIGHUP: re-read the config file and apply it to the live daemon.

What a reload changes
---------------------
* Breakers with a ``[breakers.NAME]`` section take its settings (over
  ``[defaults]``) at once, keeping their state, generation, totals and, when
  the window's kind and size are unchanged, their window (see
  ``Machine.reconfigure``). Connected clients get the new snapshot pushed.
* A changed ``[defaults]`` applies to breakers created after the reload; a
  breaker without a section keeps the settings it was created with.
* ``allowed_uids``, ``max_connections``, ``max_inflight`` and ``max_outbox``
  apply to the next check. The socket's place, group and mode, the state
  table's size and the state file's place need a restart: a change to them
  is logged and otherwise ignored.
* A file that does not load (unreadable, not TOML, a bad setting) is logged
  and changes nothing: the daemon keeps serving with the old settings.

The daemon's loop thread runs this, which is every actor's thread: each
actor is reconfigured between two of its messages, never during one.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Final

from breakerd.protocol import StatePush, frame_notification

from . import _systemd as systemd
from ._config import ConfigError, DaemonSettings, load_config

if TYPE_CHECKING:
    from ._server import Daemon

__all__ = ["reload_config"]

#: Settings that a running daemon cannot change: they shape its socket and files.
_RESTART_ONLY: Final = (
    "socket_path",
    "socket_mode",
    "socket_gid",
    "state_table_slots",
)
#: Kept from the running daemon without a word: ``--state-file`` overrides the
#: file, and the fleet link keeps the Redis and shares it started with.
_KEPT: Final = ("state_file", "persist_state", "fleet")


def reload_config(daemon: Daemon) -> bool:
    """Re-read ``daemon``'s config file; False (logged) when it is kept as it was."""
    old = daemon.settings
    path = old.config_path
    if path is None:
        daemon.log.warning(
            "config_reload_skipped", reason="the daemon was started without --config"
        )
        return False
    systemd.notify(systemd.reloading_message())
    try:
        try:
            new = load_config(path, old.socket_path)
        except ConfigError as exc:
            daemon.log.error("config_reload_failed", error=str(exc), effect="old settings kept")
            return False
        ignored = [name for name in _RESTART_ONLY if _differs(name, old, new)]
        if ignored:
            daemon.log.warning(
                "config_reload_needs_restart", settings=ignored, effect="kept until a restart"
            )
        new = dataclasses.replace(new, **{name: getattr(old, name) for name in (*ignored, *_KEPT)})
        daemon.settings = new
        changed = []
        for actor in daemon.system.actors():
            configured = new.configured(actor.name)
            if configured is None or configured == actor.config:
                continue
            settings = list(actor.config.differences(configured))
            actor.reconfigure(configured)
            changed.append(actor.name)
            daemon.log.info("breaker_reconfigured", breaker=actor.name, settings=settings)
            subscribers = daemon.subscribers.get(actor.name)
            if subscribers:
                frame = frame_notification(StatePush(actor.snapshot))
                for peer in tuple(subscribers):
                    peer.push_frame(frame)
        if daemon.state_file is not None:
            daemon.state_file.write()
        daemon.log.info("config_reloaded", config=str(path), breakers_changed=changed)
        return True
    finally:
        systemd.notify("READY=1")


def _differs(name: str, old: DaemonSettings, new: DaemonSettings) -> bool:
    return bool(getattr(old, name) != getattr(new, name))
