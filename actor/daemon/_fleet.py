"""The fleet link: one daemon's Redis connection, in its own task.

The daemon stays the only writer of its breakers; this task is the only
code that talks to Redis, and no call ever waits on it: calls read the
state table and the actors as without a fleet. What crosses the link:

* a breaker that opens here (on its own outcomes) runs ``OPEN_LUA``: the
  host's deadline goes into the breaker's sorted set (Redis ``TIME`` plus
  the time left, so no two clocks are compared), and the whole set is
  published; every other host applies it (``_fleet_logic.fleet_deadline``);
* when an open breaker's time is up, its actor asks ``gate`` before a
  trial; the first ask sends ``TRIAL_LUA`` (``SET NX PX
  half_open_max_wait``) and the call is rejected; once the lease is this
  host's, the breaker goes half-open here and nowhere else. A success
  closes the breaker fleet-wide (``CLOSE_LUA``), a failure re-opens it
  fleet-wide and gives the lease back;
* a ``TIME`` heartbeat: Redis's clock against ours (the offset that turns
  Redis deadlines into monotonic ones), and a Redis that stopped answering
  is noticed.

Any error or a command slower than ``op_timeout`` takes the link down:
``fleet_unavailable`` is logged once, every breaker decides alone (the
gate admits trials again), and the task reconnects by itself, then
republishes its own opens and re-reads everyone else's.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Literal, cast

import anyio
import structlog

from breakerd.protocol import Admin, AdminOp, BreakerError, CircuitState

from .._machine import Transition
from .._reasons import FLEET_REASONS, TransitionReason
from ._fleet_logic import (
    MAX_RECONNECT_DELAY,
    FleetSettings,
    Share,
    bound_remaining,
    fleet_deadline,
    parse_message,
    parse_opens,
)

if TYPE_CHECKING:
    from breakerd.protocol import Snapshot

    from .._actor import BreakerActor

__all__ = ["ADMIN_LUA", "CLOSE_LUA", "OPEN_LUA", "READ_LUA", "TRIAL_LUA", "FleetLink"]

_NOW_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

#: KEYS: opens, trial. ARGV: host, milliseconds left, name, channel,
#: "1" to give the trial lease back, reason. The later deadline wins: ZADD GT.
OPEN_LUA: Final = (
    _NOW_LUA
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], 'GT', now + tonumber(ARGV[2]), ARGV[1])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
local ttl = (tonumber(last[2]) or now) - now
redis.call('PEXPIRE', KEYS[1], math.floor(math.min(math.max(ttl, 1), 86400000)))
if ARGV[5] == '1' and redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
end
local opens = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
redis.call('PUBLISH', ARGV[4], cjson.encode(
  {op='open', name=ARGV[3], host=ARGV[1], reason=ARGV[6], now=now, opens=opens}))
return {now, opens}
"""
)

#: KEYS: opens, trial. ARGV: host, name, channel, reason.
CLOSE_LUA: Final = (
    _NOW_LUA
    + """
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('PUBLISH', ARGV[3], cjson.encode(
  {op='close', name=ARGV[2], host=ARGV[1], reason=ARGV[4], now=now}))
return now
"""
)

#: KEYS: trial. ARGV: host, lease milliseconds. Returns {now, -1} when the
#: lease is this host's, else {now, milliseconds until it expires}.
TRIAL_LUA: Final = (
    _NOW_LUA
    + """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {now, -1}
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return {now, -1}
end
return {now, redis.call('PTTL', KEYS[1])}
"""
)

#: KEYS: opens, trial. ARGV: host, name, channel, operation. A reset
#: forgets the fleet's opens and lease too: no host re-opens from them.
ADMIN_LUA: Final = (
    _NOW_LUA
    + """
if ARGV[4] == 'reset' then
  redis.call('DEL', KEYS[1], KEYS[2])
end
redis.call('PUBLISH', ARGV[3], cjson.encode(
  {op='admin', name=ARGV[2], host=ARGV[1], admin=ARGV[4], now=now}))
return now
"""
)

#: KEYS: opens. Returns {now, opens}.
READ_LUA: Final = (
    _NOW_LUA
    + """
return {now, redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')}
"""
)

LinkState = Literal["connecting", "up", "down"]
_Op = tuple[str, str]
#: Ops waiting for the link; past this, new ones are dropped (logged): a
#: flood of trips while Redis is slow must not grow the daemon without end.
_MAX_OPS: Final = 100_000


class FleetLink:
    """One daemon's share of the fleet. Everything runs on the daemon's loop thread."""

    def __init__(
        self,
        settings: FleetSettings,
        get_actor: Callable[[str], BreakerActor | None],
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self._get_actor = get_actor
        self._clock = clock
        self.state: LinkState = "connecting"
        self.log = structlog.get_logger("breakerd.fleet").bind(host=settings.host)
        #: Redis's clock minus ours, in seconds (from the last TIME read).
        self.offset = 0.0
        self._ops: deque[_Op] = deque()
        self._wakeup = anyio.Event()
        self._names: set[str] = set()
        #: Breakers opened here on their own outcomes: name -> open-until (our clock).
        self.own_opens: dict[str, float] = {}
        #: Why each of those opened (the transition's reason), for the others' logs.
        self._open_reasons: dict[str, str] = {}
        #: Trial leases this host holds: name -> when Redis lets them go (our clock).
        self.trials_held: dict[str, float] = {}
        self._trials_asked: set[str] = set()
        self._trial_retry: dict[str, float] = {}
        #: The last opens seen per breaker: host -> open-until (our clock).
        self.opens: dict[str, dict[str, float]] = {}
        #: Redis commands sent since start (for the bench and status).
        self.commands = 0

    # -- the daemon's hooks (loop thread) -------------------------------------------

    def share_for(self, name: str) -> Share:
        return self.settings.share_for(name)

    def attach(self, actor: BreakerActor) -> None:
        name = actor.name
        if self.share_for(name).mode == "off":
            return
        self._names.add(name)
        actor.trial_gate = self.gate
        actor.listeners.append(self._on_transition)
        snapshot = actor.snapshot
        if (
            self.share_for(name).mode == "open"
            and snapshot.state is CircuitState.OPEN
            and snapshot.open_until is not None
            and snapshot.open_until > self._clock()
        ):
            # Restored open from the state file: the fleet may never have
            # heard of it. Not under quorum, where it would count as this
            # host's own trip although the fleet may have caused it.
            self.own_opens[name] = snapshot.open_until
            self._open_reasons[name] = "restored"
            if self.state == "up":
                self._push(("open", name))
        if self.state == "up":
            self._push(("read", name))  # a late joiner: what is open already

    def admin(self, name: str, op: str) -> None:
        """Send an admin move to the other daemons (this one's actor does it itself)."""
        self._push((f"admin:{op}", name))

    def forget(self, name: str) -> None:
        self._names.discard(name)
        for table in (
            self.own_opens,
            self._open_reasons,
            self.trials_held,
            self._trial_retry,
            self.opens,
        ):
            table.pop(name, None)
        self._trials_asked.discard(name)

    def hosts_open(self, name: str) -> list[str]:
        now = self._clock()
        return sorted(host for host, until in self.opens.get(name, {}).items() if until > now)

    def gate(self, name: str) -> bool:
        """May ``name`` (open, its time up) go half-open here now? Never waits."""
        if self.state != "up":
            return True  # alone: as without a fleet
        now = self._clock()
        held = self.trials_held.get(name)
        if held is not None and held > now:
            return True
        if name not in self._trials_asked and now >= self._trial_retry.get(name, 0.0):
            self._trials_asked.add(name)
            self._push(("trial", name))
        return False

    def _on_transition(self, transition: Transition, snapshot: Snapshot) -> None:
        name = snapshot.name
        target = transition.to_state
        if target is CircuitState.OPEN:
            self.trials_held.pop(name, None)
            if transition.reason in FLEET_REASONS or transition.open_until is None:
                return  # the fleet's own news: not sent back
            self.own_opens[name] = transition.open_until
            self._open_reasons[name] = transition.reason
            if self.state == "up":
                self._push(("open", name))
        elif target is CircuitState.CLOSED:
            self.own_opens.pop(name, None)
            self._open_reasons.pop(name, None)
            self.trials_held.pop(name, None)
            if transition.reason is TransitionReason.TRIAL_SUCCEEDED and self.state == "up":
                self._push(("close", name))

    def _push(self, op: _Op) -> None:
        if len(self._ops) >= _MAX_OPS:
            self.log.warning("fleet_backlog_full", dropped=op[0], breaker=op[1])
            return
        self._ops.append(op)
        self._wakeup.set()

    # -- the link task ----------------------------------------------------------------

    async def run(self) -> None:
        delay = 0.05
        while True:
            joined = False
            try:
                joined = await self._session()
            except Exception as exc:  # any Redis, socket or timeout error: the link is down
                self._down(exc)
            if joined:
                delay = 0.05
            await anyio.sleep(delay)
            delay = min(delay * 2, MAX_RECONNECT_DELAY)

    def _down(self, exc: BaseException) -> None:
        if self.state != "down":
            self.log.warning(
                "fleet_unavailable",
                error=repr(exc)[:300],
                effect="every breaker decides alone until Redis answers again",
            )
        self.state = "down"
        self._ops.clear()
        self._trials_asked.clear()
        self._trial_retry.clear()
        # A lease we held lapses in Redis by itself; here we decide alone now.
        self.trials_held.clear()

    async def _session(self) -> bool:
        import redis.asyncio as aioredis  # an optional extra: only when the fleet is on

        timeout = self.settings.op_timeout
        client = aioredis.Redis.from_url(
            self.settings.redis,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry_on_timeout=False,
            retry=None,
        )
        try:
            scripts = {
                "open": client.register_script(OPEN_LUA),
                "close": client.register_script(CLOSE_LUA),
                "trial": client.register_script(TRIAL_LUA),
                "read": client.register_script(READ_LUA),
                "admin": client.register_script(ADMIN_LUA),
            }
            await self._heartbeat(client)
            pubsub: Any = client.pubsub(ignore_subscribe_messages=True)
            try:
                with anyio.fail_after(timeout):
                    await pubsub.subscribe(self.settings.channel)
                await self._join(scripts)
                failures: list[Exception] = []
                async with anyio.create_task_group() as group:

                    async def guarded(work: Callable[[], Any]) -> None:
                        try:
                            await work()
                        except Exception as exc:
                            failures.append(exc)
                            group.cancel_scope.cancel()

                    group.start_soon(guarded, lambda: self._listen(pubsub))
                    group.start_soon(guarded, lambda: self._work(client, scripts))
                if failures:
                    raise failures[0]
            finally:
                with anyio.move_on_after(timeout, shield=True):
                    await pubsub.aclose()
        finally:
            with anyio.move_on_after(timeout, shield=True):
                await client.aclose()
        return True

    async def _join(self, scripts: dict[str, Any]) -> None:
        """Up again: republish our opens, re-read everyone's."""
        was = self.state
        self.state = "up"
        now = self._clock()
        republished = 0
        for name, until in list(self.own_opens.items()):
            actor = self._get_actor(name)
            if until <= now or actor is None or actor.snapshot.state is not CircuitState.OPEN:
                self.own_opens.pop(name, None)
                continue
            await self._do(scripts, ("open", name))
            republished += 1
        for name in list(self._names):
            await self._do(scripts, ("read", name))
        self.log.info(
            "fleet_rejoined" if was == "down" else "fleet_joined",
            redis=_safe_url(self.settings.redis),
            opens_republished=republished,
            breakers_read=len(self._names),
        )

    async def _heartbeat(self, client: Any) -> None:
        before = self._clock()
        with anyio.fail_after(self.settings.op_timeout):
            seconds, micros = await client.time()
        self.commands += 1
        self._measure(int(seconds) * 1000 + int(micros) // 1000, before)

    def _measure(self, redis_ms: float, before: float) -> None:
        self.offset = redis_ms / 1000.0 - (before + self._clock()) / 2

    async def _work(self, client: Any, scripts: dict[str, Any]) -> None:
        ops = self._ops
        while True:
            with anyio.move_on_after(self.settings.heartbeat) as idle:
                await self._wakeup.wait()
            self._wakeup = anyio.Event()
            if idle.cancelled_caught and not ops:
                await self._heartbeat(client)
            while ops:
                await self._do(scripts, ops.popleft())

    async def _do(self, scripts: dict[str, Any], op: _Op) -> None:
        """One op; a command Redis refuses (a key of the wrong type, say) is that op's loss.

        Only an error of the link itself (a timeout, a lost connection) ends
        the session: a hostile value under one breaker's key must not take
        the whole fleet link down again and again.
        """
        from redis.exceptions import ResponseError

        try:
            await self._send(scripts, op)
        except ResponseError as exc:
            self._trials_asked.discard(op[1])
            self.log.warning(
                "fleet_command_failed", op=op[0], breaker=op[1][:200], error=str(exc)[:300]
            )

    async def _send(self, scripts: dict[str, Any], op: _Op) -> None:
        kind, name = op
        settings = self.settings
        actor = self._get_actor(name)
        if actor is None:
            return
        before = self._clock()
        result: Any
        with anyio.fail_after(settings.op_timeout):
            if kind.startswith("admin:"):
                result = await scripts["admin"](
                    keys=[settings.open_key(name), settings.trial_key(name)],
                    args=[settings.host, name, settings.channel, kind[len("admin:") :]],
                )
                self.commands += 1
                self._measure(float(result), before)
                if kind == "admin:reset":
                    self.opens.pop(name, None)
                return
            if kind == "open":
                until = self.own_opens.get(name)
                if until is None or until <= before:
                    return
                result = await scripts["open"](
                    keys=[settings.open_key(name), settings.trial_key(name)],
                    args=[
                        settings.host,
                        max(1, int((until - before) * 1000)),
                        name,
                        settings.channel,
                        "1",
                        self._open_reasons.get(name, ""),
                    ],
                )
            elif kind == "close":
                result = await scripts["close"](
                    keys=[settings.open_key(name), settings.trial_key(name)],
                    args=[settings.host, name, settings.channel, "trial_succeeded"],
                )
            elif kind == "trial":
                wait = actor.config.half_open_max_wait
                result = await scripts["trial"](
                    keys=[settings.trial_key(name)],
                    args=[settings.host, max(1, int(wait * 1000))],
                )
            else:
                result = await scripts["read"](keys=[settings.open_key(name)])
        self.commands += 1
        now = self._clock()
        if kind == "close":
            self._measure(float(result), before)
            self.opens.pop(name, None)
            return
        redis_now, payload = result
        self._measure(float(redis_now), before)
        if kind == "trial":
            self._trials_asked.discard(name)
            wait = actor.config.half_open_max_wait
            if int(payload) < 0:
                self.trials_held[name] = now + wait
                self.log.info("fleet_trial_lease_taken", breaker=name)
            else:
                self._trial_retry[name] = now + min(max(int(payload), 0) / 1000.0, wait)
            return
        self._apply_opens(name, payload)

    # -- news from the others --------------------------------------------------------

    async def _listen(self, pubsub: Any) -> None:
        while True:
            message = await pubsub.get_message(timeout=self.settings.heartbeat)
            if message is None or message.get("type") != "message":
                continue
            try:
                news = parse_message(message["data"])
            except ValueError as exc:
                self.log.warning("fleet_message_invalid", error=str(exc)[:300])
                continue
            if news.host == self.settings.host:
                continue
            if news.op == "admin":
                self._admin_news(news.name, news.admin)
                continue
            if news.name not in self._names:
                continue
            self._trial_retry.pop(news.name, None)
            if news.op == "close":
                self.opens.pop(news.name, None)
                self.trials_held.pop(news.name, None)
                actor = self._get_actor(news.name)
                if actor is not None:
                    actor.fleet_close()
                continue
            self._apply_opens(news.name, news.opens, f"{news.host}: {news.reason}")

    def _admin_news(self, name: str, op: str) -> None:
        # Every breaker of that name, shared or not: the operator named it.
        actor = self._get_actor(name)
        if actor is None:
            return
        if op == "reset":
            self.opens.pop(name, None)
            self.own_opens.pop(name, None)
        self.log.info("fleet_admin_received", breaker=name, op=op)
        try:
            actor.ask(Admin(name, cast(AdminOp, op)), None, force=True)
        except BreakerError:
            pass  # shutting down

    def _apply_opens(self, name: str, raw: object, why: str = "") -> None:
        actor = self._get_actor(name)
        if actor is None:
            return
        if isinstance(raw, dict):
            opens = raw
        else:
            try:
                opens = parse_opens(raw)
            except ValueError as exc:
                self.log.warning("fleet_value_invalid", breaker=name, error=str(exc)[:300])
                return
        now = self._clock()
        cap = actor.config.max_timeout
        # Redis milliseconds to seconds left; each bounded before it is kept.
        redis_now = (now + self.offset) * 1000.0
        local: dict[str, float] = {}
        for host, until_ms in opens.items():
            left, problem = bound_remaining((until_ms - redis_now) / 1000.0, cap)
            if problem is not None:
                self.log.warning(
                    "fleet_value_bounded", breaker=name, from_host=host[:200], problem=problem
                )
            if left is not None:
                local[host] = now + left
        self.opens[name] = local
        until = fleet_deadline(local, now, self.share_for(name), self.settings.host)
        if until is not None:
            if actor.snapshot.state is not CircuitState.OPEN:
                self.log.info("fleet_open_received", breaker=name, reason=why[:300])
            actor.fleet_open(until)


def _safe_url(url: str) -> str:
    """The URL without a password, for the log."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return scheme + sep + rest
