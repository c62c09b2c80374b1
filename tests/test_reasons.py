"""``Transition.reason`` is a ``TransitionReason``: members, never strings matched by prefix."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import msgpack
import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from breakerd.actor import ActorSystem, BreakerConfig, TransitionReason
from breakerd.actor._machine import Machine, Transition
from breakerd.actor.testing import FakeClock
from breakerd.clients import CircuitBreaker, RateLimited
from breakerd.protocol import CircuitState, Outcome, TransitionEvent, frame_notification

R = TransitionReason
CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN
ROOT = Path(__file__).resolve().parent.parent

# The state each reason moves a breaker to.
TARGETS: dict[TransitionReason, set[CircuitState]] = {
    R.FAILURE_RATE_EXCEEDED: {OPEN},
    R.SLOW_CALL_RATE_EXCEEDED: {OPEN},
    R.RATE_LIMITED: {OPEN},
    R.QUOTA: {OPEN},
    R.AUTH: {OPEN},
    R.OPEN_TIMEOUT_ELAPSED: {HALF_OPEN},
    R.TRIAL_SUCCEEDED: {CLOSED},
    R.TRIAL_FAILED: {OPEN},
    R.TRIAL_SLOW: {OPEN},
    R.ADMIN_FORCE_OPEN: {CircuitState.FORCED_OPEN},
    R.ADMIN_DISABLE: {CircuitState.DISABLED},
    R.ADMIN_RESET: {CLOSED},
    R.FLEET_OPEN: {OPEN},
    R.FLEET_CLOSED: {HALF_OPEN, CLOSED},
}

outcomes = st.sampled_from([Outcome.SUCCESS, Outcome.FAILURE, Outcome.RATE_LIMITED])
# A newer peer's class this side does not know among them.
classes = st.sampled_from([None, "rate_limited", "quota", "auth", "a_newer_class"])
operations = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), st.floats(0.0, 40.0)),
        st.tuples(st.just("acquire")),
        st.tuples(
            st.just("report"),
            st.integers(0, 5),
            outcomes,
            classes,
            st.sampled_from([None, 5.0, 50.0]),
            st.sampled_from([0.1, 2.0]),
        ),
        st.tuples(st.sampled_from(["force_open", "disable", "reset", "fleet_close", "expire"])),
        st.tuples(st.just("fleet_open"), st.floats(1.0, 60.0)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_every_transition_carries_a_member_that_names_where_it_went(ops: list[Any]) -> None:
    machine = Machine(
        "svc",
        BreakerConfig(min_calls=2, timeout=10.0, slow_call_duration=1.0, half_open_calls=2),
    )
    now = 0.0
    permits: list[tuple[int, int]] = []
    seen: list[Transition] = []
    for op in ops:
        kind = op[0]
        if kind == "advance":
            now += op[1]
            seen.extend(machine.expire(now))
        elif kind == "acquire":
            decision = machine.acquire(now)
            seen.extend(decision.transitions)
            if decision.admitted:
                permits.append((decision.generation, decision.lease))
        elif kind == "report":
            if not permits:
                continue
            generation, lease = permits.pop(op[1] % len(permits))
            _, _, outcome, why, retry_after, duration = op
            result = machine.record(
                generation,
                outcome,
                now,
                duration=duration,
                lease=lease,
                retry_after=retry_after if outcome is Outcome.RATE_LIMITED else None,
                reason=why if outcome is Outcome.RATE_LIMITED else None,
            )
            seen.extend(result.transitions)
        elif kind == "fleet_open":
            seen.extend(machine.fleet_open(now + op[1], now))
        elif kind == "fleet_close":
            seen.extend(machine.fleet_close(now))
        elif kind == "expire":
            seen.extend(machine.expire(now))
        else:
            moved = getattr(machine, kind)(now)
            if moved is not None:
                seen.append(moved)
        # What rejections and status say stays a plain string (it travels on the wire).
        assert type(machine.snapshot().reason) in (str, type(None))
    for transition in seen:
        assert type(transition.reason) is TransitionReason
        assert transition.to_state in TARGETS[transition.reason], transition


def test_a_rate_limit_class_this_side_does_not_know_opens_as_rate_limited() -> None:
    machine = Machine("svc", BreakerConfig(timeout=10.0))
    permit = machine.acquire(0.0)
    result = machine.record(
        permit.generation, Outcome.RATE_LIMITED, 1.0, retry_after=5.0, reason="a_newer_class"
    )
    (opened,) = result.transitions
    assert opened.reason is R.RATE_LIMITED
    assert opened.open_until == 6.0
    assert machine.snapshot().reason == "rate_limited"


def test_rate_limited_takes_only_the_classes_the_breaker_knows() -> None:
    for known in ("rate_limited", "quota", "auth", R.QUOTA):
        assert RateLimited(1.0, known).reason == known
    with pytest.raises(ValueError, match="'rate_limited', 'quota' or 'auth'"):
        RateLimited(1.0, "overloaded")


def test_a_reason_is_its_plain_string_in_json_msgpack_and_the_wire() -> None:
    # A member equals its string; mypy compares the literals as unrelated types.
    assert R.QUOTA == "quota"  # type: ignore[comparison-overlap]
    assert json.dumps({"reason": R.QUOTA}) == json.dumps({"reason": "quota"})
    assert msgpack.packb({"reason": R.QUOTA}) == msgpack.packb({"reason": "quota"})

    def event(reason: str) -> bytes:
        return frame_notification(TransitionEvent("svc", CLOSED, OPEN, 3, reason, 1.0))

    assert event(R.FAILURE_RATE_EXCEEDED) == event("failure_rate_exceeded")


def test_the_actor_logs_the_reason_as_its_plain_string() -> None:
    # Exactly a str: the library logger's stdlib route renders values with
    # repr(), which for a member would read "<TransitionReason.ADMIN_RESET: ...>".
    system = ActorSystem(clock=FakeClock()).start()
    try:
        breaker = CircuitBreaker("svc", system=system, min_calls=1)
        with structlog.testing.capture_logs() as logs:
            breaker.force_open()
            breaker.reset()
        reasons = [e["reason"] for e in logs if "reason" in e]
        assert reasons == ["admin_force_open", "admin_reset"]
        assert {type(reason) for reason in reasons} == {str}
    finally:
        system.stop()


def test_no_library_code_matches_a_reason_by_prefix() -> None:
    found = []
    for folder in ("actor", "protocol", "clients"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("startswith", "endswith")
                    and isinstance(node.func.value, ast.Attribute)
                    and node.func.value.attr == "reason"
                ):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []
