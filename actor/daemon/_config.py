"""The daemon's settings: command-line options and the TOML config file.

Example ``breakerd.toml``::

    [daemon]
    allowed_uids = [1001]     # besides the daemon's own uid and root
    socket_group = "workers"  # open the socket (mode 0660) to this group's members
    max_connections = 1024    # plus one kept for `breakerd` admin commands
    max_connections_per_pid = 64
    hello_timeout = 5.0       # seconds a new connection has to say hello
    idle_timeout = 60.0       # seconds a connection holding nothing may stay silent
    read_budget = 65536       # bytes per connection per loop turn before it is paused
    max_inflight = 256        # requests in flight per connection
    max_outbox = 1048576      # bytes buffered per connection before it is dropped
    state_table_slots = 65536 # breakers in the shared state table (+1 header); 0: off
    max_breakers = 10000      # breakers in the daemon
    max_breakers_per_client = 1000  # breakers one connection may hold (register)
    breaker_idle_timeout = 600.0    # reclaim a closed breaker nobody held this long
    metrics = "127.0.0.1:9464" # Prometheus text at http://HOST:PORT/metrics (needs the extra)
    state_file = "/var/lib/breakerd/state.json"  # default: beside the socket; "none": off

    [defaults]                # every breaker, unless a client or section says otherwise
    failure_threshold = 0.5
    timeout = 30.0

    [breakers.LLM]            # one breaker: wins over any client's settings
    timeout = 60.0
    half_open_calls = 2
    share = "quorum:2"        # the fleet: "off", "open" (default) or "quorum:N"

    [fleet]                   # daemons on other hosts share opens and trials (breakerd[redis])
    redis = "redis://redis.internal:6379/0"   # or "unix:///run/redis/redis.sock"
    share = "open"            # every breaker without its own ``share``

Precedence for a breaker's settings: its ``[breakers.NAME]`` section (over
``[defaults]``), then the first client that registers it, then later
clients (whose differing settings are reported back as conflicts).
"""

from __future__ import annotations

import grp
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final

from breakerd.protocol import BreakerError

from .._machine import BreakerConfig
from ._fleet_logic import FleetSettings, Share, parse_share
from ._state_table import DEFAULT_STATE_TABLE_SLOTS

__all__ = [
    "DEFAULT_BREAKER_IDLE_TIMEOUT",
    "DEFAULT_MAX_BREAKERS",
    "DEFAULT_MAX_BREAKERS_PER_CLIENT",
    "ConfigError",
    "DaemonSettings",
    "MetricsUnavailableError",
    "load_config",
    "parse_metrics_address",
    "with_state_file",
]

#: Breakers in one daemon. A breaker costs the daemon some 9 KiB (its actor,
#: machine, window and task): 10,000 of them about 90 MiB, which any host
#: running a shared daemon can spare, and far more services than one host
#: calls; the state table's default 65,535 slots leave room to raise it.
DEFAULT_MAX_BREAKERS: Final = 10_000
#: Breakers one connection (one client process) may hold: a tenth of the
#: daemon's, so one runaway process that names a breaker per request cannot
#: take them all.
DEFAULT_MAX_BREAKERS_PER_CLIENT: Final = 1_000
#: Seconds a closed breaker that no connection holds is kept before it is
#: reclaimed: long enough that processes restarting in a deploy find their
#: breakers' windows again, short enough that names nobody uses any more do
#: not pile up.
DEFAULT_BREAKER_IDLE_TIMEOUT: Final = 600.0

_BREAKER_FIELDS = frozenset(f.name for f in fields(BreakerConfig))
# 512 MiB of address space: far beyond any host's breakers, and a typo in the
# file must not make the daemon reserve terabytes.
_MAX_TABLE_SLOTS = 1 << 24
# A day: a timeout is a bound on what a client can hold, and inf or 1e300
# would disable it (and overflow the event loop's timer arithmetic).
_MAX_SECONDS = 86_400.0


class ConfigError(BreakerError, ValueError):
    """The config file is unreadable or holds a bad setting."""


class MetricsUnavailableError(BreakerError, RuntimeError):
    """The metrics endpoint cannot be served (its port is taken, say)."""


@dataclass(frozen=True)
class DaemonSettings:
    socket_path: Path
    allowed_uids: frozenset[int] = frozenset()
    socket_mode: int = 0o600
    #: The group the socket is opened to (mode 0660), and whose members may connect.
    socket_gid: int | None = None
    max_connections: int = 1024
    #: Connections one process may hold (SO_PEERCRED's pid).
    max_connections_per_pid: int = 64
    #: Seconds a new connection has to complete its hello before it is closed.
    hello_timeout: float = 5.0
    #: Seconds a connection that holds nothing (no breaker registered, no
    #: request in flight, no trial lease) may stay silent before it is closed.
    idle_timeout: float = 60.0
    #: Bytes a connection may send per event-loop turn: past it, it is not read
    #: until later turns pay back what it overdrew (a flooder waits, others not).
    read_budget: int = 1 << 16
    max_inflight: int = 256
    max_outbox: int = 1 << 20
    #: Slots in the shared state table (the header included); 0: no table.
    state_table_slots: int = DEFAULT_STATE_TABLE_SLOTS
    max_breakers: int = DEFAULT_MAX_BREAKERS
    #: Breakers one connection may hold: those it registered.
    max_breakers_per_client: int = DEFAULT_MAX_BREAKERS_PER_CLIENT
    #: Seconds before a closed breaker that no connection holds is reclaimed.
    breaker_idle_timeout: float = DEFAULT_BREAKER_IDLE_TIMEOUT
    defaults: dict[str, Any] = field(default_factory=dict)
    breakers: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: (host, port) of the Prometheus endpoint; None: no metrics.
    metrics: tuple[str, int] | None = None
    #: Where breaker state survives restarts: None is beside the socket
    #: (``breakerd.sock`` -> ``breakerd.state``); see ``persist_state``.
    state_file: Path | None = None
    #: False: no state file at all (``--state-file none``).
    persist_state: bool = True
    #: The file these settings came from, re-read on SIGHUP.
    config_path: Path | None = None
    #: Redis and what each breaker shares with the fleet; None: no fleet.
    fleet: FleetSettings | None = None

    def state_file_path(self) -> Path | None:
        """The state file to use, or None when persistence is off."""
        if not self.persist_state:
            return None
        if self.state_file is not None:
            return self.state_file
        beside = self.socket_path.with_suffix(".state")
        # A socket named like a state file must not be replaced by one.
        return beside if beside != self.socket_path else beside.with_name(beside.name + ".state")

    def configured(self, name: str) -> BreakerConfig | None:
        """The config-file settings for ``name``, or None when it has no section."""
        section = self.breakers.get(name)
        if section is None:
            return None
        return BreakerConfig.from_dict({**self.defaults, **section})

    def for_client(self, name: str, requested: dict[str, Any]) -> BreakerConfig:
        """What a client's registration gets when it is the first one."""
        configured = self.configured(name)
        if configured is not None:
            return configured
        return BreakerConfig.from_dict({**self.defaults, **requested})


def load_config(path: Path | None, socket_path: Path) -> DaemonSettings:
    if path is None:
        return DaemonSettings(socket_path=socket_path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    unknown = sorted(set(data) - {"daemon", "defaults", "breakers", "fleet"})
    if unknown:
        raise ConfigError(f"{path}: unknown section(s): {', '.join(unknown)}")
    daemon = _table(data, "daemon", path)
    defaults = _table(data, "defaults", path)
    breakers_table = _table(data, "breakers", path)
    _check_breaker_keys(defaults, "[defaults]", path)
    breakers: dict[str, dict[str, Any]] = {}
    shares: dict[str, Share] = {}
    for name, section in breakers_table.items():
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: [breakers.{name}] must be a table")
        section = dict(section)
        if "share" in section:
            shares[name] = _share(section.pop("share"), f"[breakers.{name}]", path)
        _check_breaker_keys(section, f"[breakers.{name}]", path)
        if section or name not in shares:
            # A section that only says what to share leaves the settings to clients.
            breakers[name] = section
    known_daemon = {
        "allowed_uids",
        "socket_group",
        "max_connections",
        "max_connections_per_pid",
        "hello_timeout",
        "idle_timeout",
        "read_budget",
        "max_inflight",
        "max_outbox",
        "state_table_slots",
        "max_breakers",
        "max_breakers_per_client",
        "breaker_idle_timeout",
        "metrics",
        "state_file",
    }
    unknown = sorted(set(daemon) - known_daemon)
    if unknown:
        raise ConfigError(f"{path}: unknown [daemon] setting(s): {', '.join(unknown)}")
    settings = DaemonSettings(
        socket_path=socket_path,
        allowed_uids=frozenset(_int_list(daemon.get("allowed_uids", []), "allowed_uids", path)),
        socket_mode=0o660 if "socket_group" in daemon else 0o600,
        socket_gid=_group(daemon["socket_group"], path) if "socket_group" in daemon else None,
        max_connections=_positive(daemon.get("max_connections", 1024), "max_connections", path),
        max_connections_per_pid=_positive(
            daemon.get("max_connections_per_pid", 64), "max_connections_per_pid", path
        ),
        hello_timeout=_seconds(daemon.get("hello_timeout", 5.0), "hello_timeout", path),
        idle_timeout=_seconds(daemon.get("idle_timeout", 60.0), "idle_timeout", path),
        read_budget=_positive(daemon.get("read_budget", 1 << 16), "read_budget", path),
        max_inflight=_positive(daemon.get("max_inflight", 256), "max_inflight", path),
        max_outbox=_positive(daemon.get("max_outbox", 1 << 20), "max_outbox", path),
        state_table_slots=_table_slots(
            daemon.get("state_table_slots", DEFAULT_STATE_TABLE_SLOTS), path
        ),
        max_breakers=_positive(
            daemon.get("max_breakers", DEFAULT_MAX_BREAKERS), "max_breakers", path
        ),
        max_breakers_per_client=_positive(
            daemon.get("max_breakers_per_client", DEFAULT_MAX_BREAKERS_PER_CLIENT),
            "max_breakers_per_client",
            path,
        ),
        breaker_idle_timeout=_seconds(
            daemon.get("breaker_idle_timeout", DEFAULT_BREAKER_IDLE_TIMEOUT),
            "breaker_idle_timeout",
            path,
        ),
        defaults=dict(defaults),
        breakers=breakers,
        metrics=_metrics(daemon["metrics"], path) if "metrics" in daemon else None,
        config_path=path,
        fleet=_fleet(_table(data, "fleet", path), shares, path),
    )
    if "state_file" in daemon:
        settings = with_state_file(settings, _state_file(daemon["state_file"], path))
    # Validate every breaker now, so a bad file fails at start, not at first use.
    try:
        BreakerConfig.from_dict(settings.defaults)
        for name in breakers:
            settings.configured(name)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return settings


def _share(value: object, where: str, path: Path) -> Share:
    try:
        return parse_share(value)
    except ValueError as exc:
        raise ConfigError(f"{path}: {where} {exc}") from None


def _fleet(section: dict[str, Any], shares: dict[str, Share], path: Path) -> FleetSettings | None:
    unknown = sorted(set(section) - {"redis", "share", "prefix", "host"})
    if unknown:
        raise ConfigError(f"{path}: unknown [fleet] setting(s): {', '.join(unknown)}")
    if "redis" not in section:
        if section or shares:
            # Shares kept for --redis, which may turn the fleet on.
            return FleetSettings(
                redis="",
                share=_share(section.get("share", "open"), "[fleet]", path),
                shares=shares,
            )
        return None
    url = section["redis"]
    if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(
            f'{path}: [fleet] redis must be a "redis://..." or "unix://..." URL, got {url!r}'
        )
    extra: dict[str, Any] = {}
    for key in ("prefix", "host"):
        if key in section:
            value = section[key]
            if not isinstance(value, str) or not value or len(value) > 200:
                raise ConfigError(f"{path}: [fleet] {key} must be a short string, got {value!r}")
            extra[key] = value
    return FleetSettings(
        redis=url,
        share=_share(section.get("share", "open"), "[fleet]", path),
        shares=shares,
        **extra,
    )


def parse_metrics_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6; ``:PORT``: every interface) as (host, port)."""
    host, colon, port_text = text.rpartition(":")
    if not colon or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"metrics address must be HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", int(port_text)


def _metrics(value: object, path: Path) -> tuple[str, int]:
    if not isinstance(value, str):
        raise ConfigError(f'{path}: [daemon] metrics must be a "HOST:PORT" string, got {value!r}')
    try:
        return parse_metrics_address(value)
    except ValueError as exc:
        raise ConfigError(f"{path}: [daemon] {exc}") from None


def with_state_file(settings: DaemonSettings, value: str) -> DaemonSettings:
    """``settings`` with ``--state-file value`` applied: a path, or ``none`` for no file."""
    if value == "none":
        return replace(settings, state_file=None, persist_state=False)
    return replace(settings, state_file=Path(value), persist_state=True)


def _state_file(value: object, path: Path) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f'{path}: [daemon] state_file must be a path or "none", got {value!r}')
    return value


def _table(data: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: [{key}] must be a table")
    return value


def _check_breaker_keys(section: dict[str, Any], where: str, path: Path) -> None:
    unknown = sorted(set(section) - _BREAKER_FIELDS)
    if unknown:
        raise ConfigError(f"{path}: {where}: unknown breaker setting(s): {', '.join(unknown)}")


def _int_list(value: object, key: str, path: Path) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise ConfigError(f"{path}: [daemon] {key} must be a list of uids")
    return value


def _positive(value: object, key: str, path: Path) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{path}: [daemon] {key} must be an integer >= 1, got {value!r}")
    return value


def _seconds(value: object, key: str, path: Path) -> float:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not 0 < value <= _MAX_SECONDS
    ):
        raise ConfigError(
            f"{path}: [daemon] {key} must be a number of seconds > 0 and <= {_MAX_SECONDS:g}, "
            f"got {value!r}"
        )
    return float(value)


def _table_slots(value: object, path: Path) -> int:
    if type(value) is not int or value == 1 or not 0 <= value <= _MAX_TABLE_SLOTS:
        raise ConfigError(
            f"{path}: [daemon] state_table_slots must be 0 (no table) or an integer "
            f"from 2 to {_MAX_TABLE_SLOTS}, got {value!r}"
        )
    return value


def _group(value: object, path: Path) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value:
        try:
            return grp.getgrnam(value).gr_gid
        except KeyError:
            raise ConfigError(f"{path}: [daemon] socket_group: no group named {value!r}") from None
    raise ConfigError(f"{path}: [daemon] socket_group must be a group name or gid, got {value!r}")
