"""The fleet's decisions, without IO: settings, share modes, messages, deadlines.

``_fleet`` moves the bytes (Redis, its own task); everything it decides is
here, on plain values and a clock passed in, so that it is tested without a
Redis and without waiting.

Rules
-----
* Each host's opens live in one sorted set per breaker: member = host id,
  score = that host's open-until in Redis milliseconds (``TIME``). A host's
  score only grows (``ZADD GT``), and entries past their deadline are
  dropped by whoever writes next.
* ``share = "open"``: a host opens until the latest deadline of the *other*
  hosts (its own open is already its own state).
* ``share = "quorum:N"``: a host opens because of the fleet only while N
  hosts (itself included) are open at the same time, and then until the
  instant fewer than N still are: the N-th latest deadline.
* Nothing read from Redis is trusted: a deadline that is not a finite
  number is dropped, one further away than the breaker's ``max_timeout``
  is cut to it; both are reported so the daemon logs them.
"""

from __future__ import annotations

import json
import math
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from breakerd.protocol import ADMIN_OPS

__all__ = [
    "DEFAULT_SHARE",
    "FleetMessage",
    "FleetSettings",
    "Share",
    "bound_remaining",
    "fleet_deadline",
    "parse_message",
    "parse_opens",
    "parse_share",
]

#: How long one Redis command may take before the link counts as down. A
#: healthy Redis answers in well under a millisecond; a quarter second is a
#: Redis (or a network) that would make the fleet's news late anyway.
DEFAULT_OP_TIMEOUT: Final = 0.25
#: Seconds between two ``TIME`` heartbeats: one command a second per host at
#: steady state (100 hosts: 100 commands a second, nothing for one Redis),
#: and a paused Redis is noticed within about this long.
DEFAULT_HEARTBEAT: Final = 1.0
#: Longest wait between two attempts to reach a Redis that is down.
MAX_RECONNECT_DELAY: Final = 2.0


@dataclass(frozen=True, slots=True)
class Share:
    """How much of one breaker the fleet shares: ``off``, ``open`` or ``quorum:N``."""

    mode: Literal["off", "open", "quorum"]
    quorum: int = 1

    def __str__(self) -> str:
        return f"quorum:{self.quorum}" if self.mode == "quorum" else self.mode


DEFAULT_SHARE: Final = Share("open")


def parse_share(value: object) -> Share:
    """``"off"``, ``"open"`` or ``"quorum:N"`` (N >= 1); ``ValueError`` otherwise."""
    if value == "off":
        return Share("off")
    if value == "open":
        return Share("open")
    if isinstance(value, str) and value.startswith("quorum:"):
        count = value[len("quorum:") :]
        if count.isdigit() and int(count) >= 1:
            return Share("quorum", int(count))
    raise ValueError(f'share must be "off", "open" or "quorum:N" (N >= 1), got {value!r}')


def default_host_id() -> str:
    # The pid too: two daemons on one machine (one per socket) are two hosts.
    return f"{socket.gethostname()}/{os.getpid()}"


@dataclass(frozen=True)
class FleetSettings:
    """``[fleet]`` and the ``share`` of each ``[breakers.NAME]``."""

    #: ``redis://HOST:PORT/DB`` or ``unix:///path/to/redis.sock``.
    redis: str
    share: Share = DEFAULT_SHARE
    #: Per breaker, over ``share``.
    shares: dict[str, Share] = field(default_factory=dict)
    #: Every key and the channel start with this: several fleets, one Redis.
    prefix: str = "breakerd"
    #: This daemon's name in the fleet (default: hostname/pid).
    host: str = field(default_factory=default_host_id)
    op_timeout: float = DEFAULT_OP_TIMEOUT
    heartbeat: float = DEFAULT_HEARTBEAT

    def share_for(self, name: str) -> Share:
        return self.shares.get(name, self.share)

    @property
    def channel(self) -> str:
        return f"{self.prefix}:fleet"

    def open_key(self, name: str) -> str:
        return f"{self.prefix}:open:{name}"

    def trial_key(self, name: str) -> str:
        return f"{self.prefix}:trial:{name}"


@dataclass(frozen=True, slots=True)
class FleetMessage:
    """One pub/sub message: a breaker opened (with every host's open) or closed."""

    op: Literal["open", "close", "admin"]
    name: str
    host: str
    #: Redis time (milliseconds) when the message was made.
    now: float
    reason: str = ""
    #: host -> open-until, Redis milliseconds (``open`` only).
    opens: dict[str, float] = field(default_factory=dict)
    #: ``force_open``, ``disable`` or ``reset`` (``admin`` only).
    admin: str = ""


def parse_opens(flat: object) -> dict[str, float]:
    """``ZRANGE ... WITHSCORES`` as a dict; ``ValueError`` on anything else."""
    if not isinstance(flat, (list, tuple)) or len(flat) % 2:
        raise ValueError(f"expected host/deadline pairs, got {flat!r:.200}")
    opens: dict[str, float] = {}
    for i in range(0, len(flat), 2):
        host, score = flat[i], flat[i + 1]
        if isinstance(host, bytes):
            host = host.decode("utf-8", "replace")
        if isinstance(score, bytes):
            score = score.decode("ascii", "replace")
        if not isinstance(host, str):
            raise ValueError(f"a host id must be a string, got {host!r:.200}")
        try:
            deadline = float(score)
        except (TypeError, ValueError):
            raise ValueError(f"a deadline must be a number, got {score!r:.200}") from None
        if not math.isfinite(deadline):
            raise ValueError(f"a deadline must be finite, got {score!r:.200}")
        opens[host] = deadline
    return opens


def parse_message(data: bytes | str) -> FleetMessage:
    """A pub/sub payload as a message; ``ValueError`` for anything malformed."""
    try:
        raw: Any = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError("a fleet message must be a JSON object")
    op, name, host, now = raw.get("op"), raw.get("name"), raw.get("host"), raw.get("now")
    if op not in ("open", "close", "admin"):
        raise ValueError(f"unknown op {op!r:.50}")
    if not isinstance(name, str) or not isinstance(host, str):
        raise ValueError("name and host must be strings")
    if isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now):
        raise ValueError(f"now must be a finite number, got {now!r:.50}")
    reason = raw.get("reason", "")
    admin = raw.get("admin", "")
    if op == "admin" and admin not in ADMIN_OPS:
        raise ValueError(f"unknown admin operation {admin!r:.50}")
    opens: dict[str, float] = {}
    if op == "open":
        # cjson encodes an empty Lua table as an object, a full one as a list.
        flat = raw.get("opens")
        opens = parse_opens([] if flat == {} else flat)
    return FleetMessage(op, name, host, float(now), str(reason)[:100], opens, str(admin))


def fleet_deadline(
    opens: dict[str, float], now: float, share: Share, own_host: str
) -> float | None:
    """Until when the fleet keeps this host's breaker open (same unit as ``now``), or None.

    ``opens``: every host's open-until; ``now``: the same clock's present.
    """
    if share.mode == "off":
        return None
    if share.mode == "open":
        others = [until for host, until in opens.items() if host != own_host and until > now]
        return max(others) if others else None
    live = sorted((until for until in opens.values() if until > now), reverse=True)
    if len(live) < share.quorum:
        return None
    # From then on fewer than N hosts are open: the quorum is gone.
    return live[share.quorum - 1]


def bound_remaining(remaining: float, max_timeout: float | None) -> tuple[float | None, str | None]:
    """Seconds to stay open, cut to ``max_timeout``; and what was wrong, if anything.

    ``(None, problem)``: not a usable duration at all.
    """
    if not math.isfinite(remaining):
        return None, "not a finite deadline"
    if remaining <= 0:
        return None, None
    cap = max_timeout if max_timeout is not None else 600.0
    if remaining > cap:
        return cap, f"{remaining:.3f}s away, more than max_timeout ({cap}s)"
    return remaining, None
