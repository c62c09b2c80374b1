"""The daemon's state file: every breaker's settings and state, across restarts.

Rules
-----
* One writer: the daemon's loop thread (the actors' own thread), at every
  transition (from a transition listener, after the pushes and before the
  request that caused it is answered), at most
  ``SNAPSHOT_INTERVAL`` seconds after any other change (counts, windows,
  new breakers), and once more on shutdown. Nothing is written while
  nothing changed.
* Atomic: a temporary file beside the target (``O_EXCL | O_NOFOLLOW``, mode
  0600), ``fsync``, ``rename``, ``fsync`` of the directory. A reader sees
  the old file or the new one, never half of one, even after a power cut.
* Wall clock only here, behind an injectable function: instants (an open
  deadline, time-window buckets) are stored as seconds since the epoch and
  converted back to the monotonic clock on load, so neither a restart nor a
  reboot shortens an open breaker. The time left is stored too and bounds
  the restored deadline, so a wall clock set back cannot lengthen it either.
* A bad, truncated or unreadable file is logged and renamed
  ``<name>.bad-<epoch seconds>``; the daemon starts without it, never fails.

Format: JSON, ``{"format": "breakerd-state", "version": 1, "written_at": ...,
"breakers": [...]}``, one record per breaker as ``Machine.export_state``
gives it, with its instants on the wall clock.
"""

from __future__ import annotations

import errno
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Final

import anyio
import structlog

from breakerd.protocol import BreakerError

from .._actor import BreakerActor
from .._machine import BreakerConfig, Machine, Transition

__all__ = [
    "SNAPSHOT_INTERVAL",
    "STATE_FORMAT",
    "STATE_VERSION",
    "StateFile",
    "StateFileError",
    "assemble",
    "decode_state",
    "encode_record",
    "encode_state",
]

STATE_FORMAT: Final = "breakerd-state"
STATE_VERSION: Final = 1
#: Longest time counts and windows wait to reach the file (transitions do not wait).
SNAPSHOT_INTERVAL: Final = 1.0
# Far beyond any host's breakers; refuses to read a stray huge file into memory.
_MAX_FILE_SIZE: Final = 1 << 30
#: Records per piece written: big enough that writes are few, small enough to cost no memory.
_CHUNK_RECORDS: Final = 1024


class StateFileError(BreakerError, ValueError):
    """The state file cannot be used: not JSON, another format or version, or inconsistent."""


def encode_record(record: dict[str, Any], now: float, wall_now: float) -> bytes:
    """One breaker's part of the file: a ``Machine.export_state`` record taken at ``now``."""
    return json.dumps(
        _stored(record, now, wall_now), separators=(",", ":"), allow_nan=False
    ).encode()


def _stored(record: dict[str, Any], now: float, wall_now: float) -> dict[str, Any]:
    """``record`` with its instants on the wall clock, as the file keeps them."""
    to_wall = wall_now - now
    stored = dict(record)
    open_until = record["open_until"]
    if open_until is not None:
        stored["open_until"] = open_until + to_wall
        stored["open_remaining"] = max(0.0, open_until - now)
    window = record["window"]
    if "buckets" in window:
        stored["window"] = {
            "buckets": [[second + to_wall, *counts] for second, *counts in window["buckets"]]
        }
    return stored


def _encode_without_config(record: dict[str, Any], now: float, wall_now: float) -> bytes:
    """``encode_record`` less its settings, which breakers with equal settings share."""
    stored = _stored(record, now, wall_now)
    del stored["config"]
    return json.dumps(stored, separators=(",", ":"), allow_nan=False).encode()


def _header(wall_now: float) -> bytes:
    header = json.dumps(
        {"format": STATE_FORMAT, "version": STATE_VERSION, "written_at": wall_now},
        separators=(",", ":"),
    ).encode()
    return header[:-1] + b',"breakers":['


def assemble(parts: Iterable[bytes], wall_now: float) -> bytes:
    """The whole file from ``encode_record`` parts."""
    return b"".join((_header(wall_now), b",".join(parts), b"]}"))


def encode_state(records: Iterable[dict[str, Any]], now: float, wall_now: float) -> bytes:
    """The file's bytes for ``Machine.export_state`` records taken at monotonic ``now``."""
    return assemble((encode_record(record, now, wall_now) for record in records), wall_now)


def _chunks(
    parts: Iterable[tuple[bytes, bytes]], wall_now: float, size: int = _CHUNK_RECORDS
) -> Iterator[bytes]:
    """The file in pieces of ``size`` records, from (settings, rest) record halves.

    A record is ``{"config":SETTINGS,`` and the rest of its own object. Pieces,
    not one ``bytes``: at 100,000 breakers the whole file is about 50 MB, and
    building it (twice, with the join) doubled the daemon's peak memory.
    """
    yield _header(wall_now)
    batch: list[bytes] = []
    first = True
    for config, rest in parts:
        batch.append(b'{"config":' + config + b"," + rest[1:])
        if len(batch) >= size:
            yield (b"" if first else b",") + b",".join(batch)
            first = False
            batch.clear()
    if batch:
        yield (b"" if first else b",") + b",".join(batch)
    yield b"]}"


def decode_state(data: bytes, now: float, wall_now: float) -> list[Machine]:
    """The machines a file describes, on the monotonic clock whose current reading is ``now``.

    Raises ``StateFileError`` for anything but a complete, consistent file.
    """
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateFileError(f"not a JSON document: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != STATE_FORMAT:
        raise StateFileError(f"not a breakerd state file (no format {STATE_FORMAT!r})")
    if document.get("version") != STATE_VERSION:
        raise StateFileError(
            f"state file version {document.get('version')!r} is not supported "
            f"(this breakerd reads version {STATE_VERSION})"
        )
    breakers = document.get("breakers")
    if not isinstance(breakers, list):
        raise StateFileError("'breakers' must be a list")
    to_monotonic = now - wall_now
    machines: list[Machine] = []
    names: set[str] = set()
    for stored in breakers:
        try:
            if not isinstance(stored, dict):
                raise ValueError("a breaker record must be an object")
            record = dict(stored)
            open_until = record.pop("open_until", None)
            remaining = record.pop("open_remaining", None)
            if open_until is not None:
                if not all(_finite(x) for x in (open_until, remaining)):
                    raise ValueError("open_until and open_remaining must be finite numbers")
                # Never longer than it had left when written: a wall clock
                # set back while the daemon was down must not lengthen it.
                record["open_until"] = now + min(open_until - wall_now, remaining)
            else:
                record["open_until"] = None
            window = record.get("window")
            if isinstance(window, dict) and "buckets" in window:
                buckets = window["buckets"]
                if not isinstance(buckets, list) or not all(
                    isinstance(b, list) and len(b) == 4 and _finite(b[0]) for b in buckets
                ):
                    raise ValueError("time window buckets must be [second, total, failed, slow]")
                record["window"] = {
                    "buckets": [[math.floor(b[0] + to_monotonic), *b[1:]] for b in buckets]
                }
            machine = Machine.restore(record)
        except ValueError as exc:
            raise StateFileError(f"breaker record {_label(stored)}: {exc}") from None
        if machine.name in names:
            raise StateFileError(f"breaker {machine.name!r} appears twice")
        names.add(machine.name)
        machines.append(machine)
    return machines


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _label(stored: object) -> str:
    name = stored.get("name") if isinstance(stored, dict) else None
    return repr(name)[:80] if name is not None else "(unnamed)"


class StateFile:
    """Reads and writes one state file; persists a daemon's actors (its loop thread only)."""

    def __init__(
        self,
        path: Path,
        actors: Callable[[], Iterable[BreakerActor]],
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        interval: float = SNAPSHOT_INTERVAL,
    ) -> None:
        self.path = path
        self.interval = interval
        self._actors = actors
        self._clock = clock
        self._wall_clock = wall_clock
        self._log = structlog.get_logger("breakerd.daemon").bind(state_file=str(path))
        # name -> (the machine's change mark, its settings, its encoded record
        # less them): an idle breaker is neither exported nor encoded again.
        self._parts: dict[str, tuple[int, BreakerConfig, bytes]] = {}
        # Settings -> their JSON: breakers with equal settings share one
        # BreakerConfig (the actor system interns them), and so one encoding.
        self._configs: dict[BreakerConfig, bytes] = {}
        self._collecting = False
        self._failing = False
        #: Files written since start, and breakers the last ``load`` brought back.
        self.writes = 0
        self.restored = 0

    # -- loading ---------------------------------------------------------------------

    def load(self) -> list[Machine]:
        """The machines in the file; [] when there is none or it cannot be used."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return []
        except OSError as exc:
            reason = "a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
            self._set_aside(f"cannot open: {reason}")
            return []
        try:
            with os.fdopen(fd, "rb") as f:
                data = f.read(_MAX_FILE_SIZE + 1)
        except OSError as exc:
            self._set_aside(f"cannot read: {exc.strerror or exc}")
            return []
        if len(data) > _MAX_FILE_SIZE:
            self._set_aside(f"larger than {_MAX_FILE_SIZE} bytes")
            return []
        try:
            machines = decode_state(data, self._clock(), self._wall_clock())
        except StateFileError as exc:
            self._set_aside(str(exc))
            return []
        self.restored = len(machines)
        return machines

    def _set_aside(self, error: str) -> None:
        target = self.path.with_name(f"{self.path.name}.bad-{int(self._wall_clock())}")
        try:
            os.replace(self.path, target)
        except OSError as exc:
            self._log.error(
                "state_file_invalid",
                error=error,
                set_aside_failed=exc.strerror or str(exc),
                effect="starting with no breakers",
            )
            return
        self._log.error(
            "state_file_invalid",
            error=error,
            moved_to=str(target),
            effect="starting with no breakers",
        )

    # -- writing ---------------------------------------------------------------------

    def on_transition(self, transition: Transition, snapshot: object) -> None:
        """Transition listener: the file has every transition before its cause is answered."""
        if self._collecting:
            return  # a settle in write() caused it; that write includes it
        self.write()

    def write(self, *, settle: bool = False) -> bool:
        """Write every actor's state if it changed since the last write; True if written.

        ``settle`` applies what each actor has queued first (not from inside a
        transition listener). A failed write is logged and retried at the next
        change or interval; the daemon carries on.
        """
        self._collecting = True
        try:
            actors = sorted(self._actors(), key=lambda actor: actor.name)
            if settle:
                for actor in actors:
                    actor.settle()
            parts = self._parts
            fresh: dict[str, tuple[int, BreakerConfig, bytes]] = {}
            changed = len(actors) != len(parts)
            now, wall_now = self._clock(), self._wall_clock()
            for actor in actors:
                machine = actor.machine
                mark = machine.change_mark()
                config = machine.config
                cached = parts.get(actor.name)
                if cached is None or cached[0] != mark:
                    rest = _encode_without_config(actor.export_state(), now, wall_now)
                    cached = (mark, config, rest)
                    changed = True
                elif cached[1] is not config and cached[1] != config:
                    cached = (mark, config, cached[2])
                    changed = True
                fresh[actor.name] = cached
        finally:
            self._collecting = False
        if not changed:
            return False
        used: dict[BreakerConfig, bytes] = {}
        try:
            self._write_atomically(_chunks(self._halves(fresh, used), wall_now))
        except OSError as exc:
            if not self._failing:
                # Once per outage, not once per second.
                self._log.error(
                    "state_file_write_failed",
                    error=exc.strerror or str(exc),
                    effect="state is kept in memory and written once writing works again",
                )
            self._failing = True
            return False
        self._configs = used
        if self._failing:
            self._log.info("state_file_write_recovered")
            self._failing = False
        self._parts = fresh
        self.writes += 1
        return True

    def _halves(
        self, parts: dict[str, tuple[int, BreakerConfig, bytes]], used: dict[BreakerConfig, bytes]
    ) -> Iterator[tuple[bytes, bytes]]:
        """Each record's (settings, rest) in file order; fills ``used`` with the settings seen."""
        configs = self._configs
        for _, config, rest in parts.values():
            encoded = used.get(config)
            if encoded is None:
                encoded = configs.get(config)
                if encoded is None:
                    encoded = json.dumps(
                        config.as_dict(), separators=(",", ":"), allow_nan=False
                    ).encode()
                used[config] = encoded
            yield encoded, rest

    def _write_atomically(self, pieces: Iterable[bytes]) -> None:
        path = self.path
        temporary = path.with_name(f".{path.name}.tmp")
        try:
            os.unlink(temporary)  # left by a daemon killed mid-write
        except FileNotFoundError:
            pass
        fd = os.open(
            temporary,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
        try:
            for piece in pieces:
                view = memoryview(piece)
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            # The rename itself must reach the disk, or a crash could bring back the old file.
            os.fsync(directory)
        finally:
            os.close(directory)

    async def run(self) -> None:
        """Write at most ``interval`` seconds after any change, until cancelled."""
        while True:
            await anyio.sleep(self.interval)
            self.write(settle=True)
