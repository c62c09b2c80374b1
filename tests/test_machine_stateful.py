"""Model-based test of the breaker machine against a small reference model.

The model keeps plain lists (every outcome of the window, every decided trial)
and recomputes every rate from scratch, so it is obviously right where the
machine is clever (running totals, packed ring items, bucket deques). Time is
just another rule: it only moves forward, by drawn amounts or straight onto a
deadline, and nothing reads a clock.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from breakerd.actor._machine import BreakerConfig, Decision, Machine, Transition
from breakerd.protocol import CircuitState, Outcome

CLOSED = CircuitState.CLOSED
OPEN = CircuitState.OPEN
HALF_OPEN = CircuitState.HALF_OPEN
FORCED_OPEN = CircuitState.FORCED_OPEN
DISABLED = CircuitState.DISABLED

START = 100.0

S = Outcome.SUCCESS
F = Outcome.FAILURE
IGNORED = Outcome.IGNORED
CANCELLED = Outcome.CANCELLED
RATE_LIMITED = Outcome.RATE_LIMITED


def in_time_window(instant: float, now: float, seconds: float) -> bool:
    """Whether an outcome recorded at ``instant`` is still in a time window at ``now``.

    The bucket of second ``s`` covers ``[s, s + 1)`` and leaves the window once
    all of it is older than ``seconds`` (the rule stated in ``_TimeWindow``).
    """
    return math.floor(instant) + 1 + seconds > now


def close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-9)


class Model:
    """The rules of the module docstring, written the slow and plain way."""

    def __init__(self, config: BreakerConfig, draws: Iterator[float]) -> None:
        self.config = config
        self.draws = draws
        self.state = CLOSED
        self.generation = 0
        self.open_until: float | None = None
        #: (instant, failed, slow) of every outcome in the window, oldest first.
        self.window: list[tuple[float, bool, bool]] = []
        self.opens_since_close = 0
        #: lease -> deadline
        self.leases: dict[int, float] = {}
        #: (failed, slow) of every trial decided in this half-open period.
        self.trials: list[tuple[bool, bool]] = []
        #: Leases a transition cut short and not reported yet: they still count, once.
        self.orphans: set[int] = set()
        self.successes = self.failures = self.ignored = self.rejections = 0
        #: (from, to) of the transitions made by the current command.
        self.moves: list[tuple[CircuitState, CircuitState]] = []

    # -- queries --

    def failure_rate(self) -> float | None:
        if not self.window:
            return None
        return sum(1 for _, failed, _ in self.window if failed) / len(self.window)

    def slow_call_rate(self) -> float | None:
        if not self.window:
            return None
        return sum(1 for _, _, slow in self.window if slow) / len(self.window)

    def next_deadline(self) -> float | None:
        return min(self.leases.values(), default=None)

    def is_slow(self, duration: float) -> bool:
        limit = self.config.slow_call_duration
        return limit is not None and duration > limit

    # -- commands --

    def acquire(self, now: float) -> tuple[bool, float | None, bool]:
        """Return (admitted, retry_after, is_a_trial_lease)."""
        if self.state in (CLOSED, DISABLED):
            return True, None, False
        if self.state is FORCED_OPEN:
            self.rejections += 1
            return False, None, False
        if self.state is OPEN:
            assert self.open_until is not None
            if now < self.open_until:
                self.rejections += 1
                return False, self.open_until - now, False
            self.move(HALF_OPEN)
        else:
            self.expire(now)
            if self.state is not HALF_OPEN:
                return self.acquire(now)
        # Leases handed out in this half-open period: those in flight plus
        # those already decided. Ignored and cancelled ones were given back.
        if len(self.leases) + len(self.trials) >= self.config.half_open_calls:
            self.rejections += 1
            return False, None, False
        return True, None, True

    def grant(self, lease: int, now: float) -> None:
        self.leases[lease] = now + self.config.half_open_max_wait

    def count(self, outcome: Outcome) -> None:
        if outcome is Outcome.SUCCESS:
            self.successes += 1
        elif outcome in (Outcome.FAILURE, Outcome.RATE_LIMITED):
            self.failures += 1
        elif outcome is Outcome.IGNORED:
            self.ignored += 1

    def record(
        self,
        generation: int,
        outcome: Outcome,
        now: float,
        duration: float,
        lease: int,
        retry_after: float | None,
    ) -> bool | None:
        """Return whether the report counted (None: either answer is fine)."""
        if generation != self.generation:
            # Out of the window, but in the books if the call really ran:
            # any plain permit of an older generation, or a trial cut short.
            if generation < self.generation:
                if lease:
                    if lease not in self.orphans:
                        return False
                    self.orphans.discard(lease)  # the first report settles it
                if outcome is not Outcome.CANCELLED:
                    self.count(outcome)
                if outcome is Outcome.RATE_LIMITED and self.state is OPEN:
                    self.extend(now, retry_after)
            return False
        if self.state is DISABLED:
            if outcome is Outcome.CANCELLED:
                return None
            self.count(outcome)
            return True
        if self.state in (OPEN, FORCED_OPEN):
            return False
        if self.state is HALF_OPEN:
            if lease not in self.leases:
                return False
            del self.leases[lease]
        if outcome is Outcome.CANCELLED:
            return True
        self.count(outcome)
        if outcome is Outcome.IGNORED:
            return True
        if outcome is Outcome.RATE_LIMITED:
            self.open(now, retry_after)
            return True
        failed = outcome is Outcome.FAILURE
        slow = self.is_slow(duration)
        if self.state is HALF_OPEN:
            self.trials.append((failed, slow))
            self.judge_trials(now)
        else:
            self.add_to_window(now, failed, slow)
            self.judge_window(now)
        return True

    def add_to_window(self, now: float, failed: bool, slow: bool) -> None:
        seconds = self.config.window_seconds
        if seconds is None:
            self.window = [*self.window, (now, failed, slow)][-self.config.window_size :]
        else:
            kept = [item for item in self.window if in_time_window(item[0], now, seconds)]
            self.window = [*kept, (now, failed, slow)]

    def judge_window(self, now: float) -> None:
        if len(self.window) < self.config.min_calls:
            return
        failure_rate = self.failure_rate()
        slow_rate = self.slow_call_rate()
        assert failure_rate is not None
        assert slow_rate is not None
        if failure_rate > self.config.failure_threshold or (
            self.config.slow_call_duration is not None
            and slow_rate > self.config.slow_call_threshold
        ):
            self.open(now, None)

    def judge_trials(self, now: float) -> None:
        done = len(self.trials)
        if done < self.config.half_open_calls:
            return
        failure_rate = sum(1 for failed, _ in self.trials if failed) / done
        slow_rate = sum(1 for _, slow in self.trials if slow) / done
        if failure_rate > self.config.failure_threshold or (
            self.config.slow_call_duration is not None
            and slow_rate > self.config.slow_call_threshold
        ):
            self.open(now, None)
        else:
            self.move(CLOSED)

    def expire(self, now: float) -> None:
        for lease, deadline in sorted(self.leases.items(), key=lambda item: item[1]):
            if self.state is not HALF_OPEN or deadline > now:
                return
            del self.leases[lease]
            self.failures += 1
            self.trials.append((True, False))
            self.judge_trials(now)

    def open(self, now: float, retry_after: float | None) -> None:
        config = self.config
        if retry_after is not None and math.isfinite(retry_after) and retry_after >= 0:
            duration = retry_after
        else:
            duration = config.timeout
            for _ in range(self.opens_since_close):
                duration *= config.backoff
            if config.max_timeout is not None and duration > config.max_timeout:
                duration = config.max_timeout
            if config.jitter:
                duration *= 1.0 + config.jitter * (2.0 * next(self.draws) - 1.0)
        self.opens_since_close += 1
        self.move(OPEN)
        self.open_until = now + duration

    def extend(self, now: float, retry_after: float | None) -> None:
        """Open-until only grows: a later server deadline moves it, nothing else does."""
        assert self.open_until is not None
        if retry_after is None or not math.isfinite(retry_after) or retry_after < 0:
            return
        if self.config.max_timeout is not None:
            retry_after = min(retry_after, self.config.max_timeout)
        if now + retry_after > self.open_until:
            self.move(OPEN)
            self.open_until = now + retry_after

    def admin(self, target: CircuitState) -> None:
        if self.state is not target:
            self.move(target)
        elif target is CLOSED:
            # reset of a closed breaker: an empty window, no transition
            self.window = []
            self.opens_since_close = 0

    def move(self, target: CircuitState) -> None:
        self.orphans.update(self.leases)
        self.moves.append((self.state, target))
        self.state = target
        self.generation += 1
        self.open_until = None
        self.leases.clear()
        self.trials.clear()
        if target is CLOSED:
            self.window = []
            self.opens_since_close = 0


@dataclass(frozen=True)
class Permit:
    generation: int
    lease: int


DURATIONS = st.sampled_from([0.0, 0.5, 1.0, 1.5, 3.0])
RETRY_AFTER = st.sampled_from([None, 0.0, 1.5, 10.0, -1.0, math.nan])
STEPS = st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0, 2.5, 7.0, 40.0])
REPORTED = st.sampled_from(list(Outcome))
#: Weighted towards the outcomes that move the breaker.
OUTCOMES = st.sampled_from([S, S, S, F, F, F, F, IGNORED, CANCELLED, RATE_LIMITED])


class MachineVersusModel(RuleBasedStateMachine):
    """Drive the machine and the model side by side; bound to a config per test below."""

    CONFIG: ClassVar[BreakerConfig]
    #: The values the injected ``rng`` returns, in a cycle.
    DRAWS: ClassVar[tuple[float, ...]]

    def __init__(self) -> None:
        super().__init__()
        self.config = config = self.CONFIG
        machine_draws = itertools.cycle(self.DRAWS)
        self.machine = Machine("svc", config, rng=lambda: next(machine_draws))
        self.model = Model(config, itertools.cycle(self.DRAWS))
        self.now = START
        self.outstanding: list[Permit] = []
        self.history: list[Permit] = []
        self.leases_seen: set[int] = set()
        self.last_generation = self.machine.generation
        self.last_state = self.machine.state

    # -- helpers --

    def begin(self) -> tuple[int, CircuitState]:
        self.model.moves = []
        return self.machine.generation, self.machine.state

    def check_transitions(
        self, before: tuple[int, CircuitState], transitions: tuple[Transition, ...]
    ) -> None:
        generation, state = before
        assert [(t.from_state, t.to_state) for t in transitions] == self.model.moves
        for t in transitions:
            assert t.from_state is state
            assert t.generation == generation + 1, "generation must rise by one per transition"
            assert (t.open_until is not None) == (t.to_state is OPEN)
            generation, state = t.generation, t.to_state
        assert self.machine.generation == generation
        assert self.machine.state is state
        if transitions:
            assert transitions[-1].open_until == self.machine.open_until

    def do_acquire(self) -> Decision:
        before = self.begin()
        decision = self.machine.acquire(self.now)
        admitted, retry_after, trial = self.model.acquire(self.now)
        self.check_transitions(before, decision.transitions)
        assert decision.admitted == admitted, (decision, self.model.state)
        assert close(decision.retry_after, retry_after), (decision.retry_after, retry_after)
        assert decision.generation == self.machine.generation
        if trial:
            assert decision.lease != 0
            assert decision.lease not in self.leases_seen, "lease ids are unique"
            self.leases_seen.add(decision.lease)
            self.model.grant(decision.lease, self.now)
        else:
            assert decision.lease == 0
        if decision.admitted:
            permit = Permit(decision.generation, decision.lease)
            self.outstanding.append(permit)
            self.history.append(permit)
        return decision

    def do_record(
        self,
        permit: Permit,
        outcome: Outcome,
        duration: float,
        retry_after: float | None,
    ) -> bool:
        before = self.begin()
        result = self.machine.record(
            permit.generation,
            outcome,
            self.now,
            duration=duration,
            lease=permit.lease,
            retry_after=retry_after,
        )
        counted = self.model.record(
            permit.generation, outcome, self.now, duration, permit.lease, retry_after
        )
        self.check_transitions(before, result.transitions)
        if counted is not None:
            assert result.counted == counted
        return result.counted

    def do_expire(self) -> None:
        before = self.begin()
        transitions = self.machine.expire(self.now)
        self.model.expire(self.now)
        self.check_transitions(before, transitions)

    def observable(self) -> object:
        m = self.machine
        return (
            m.snapshot(),
            m.successes,
            m.failures,
            m.ignored,
            m.rejections,
            m.next_deadline(),
            m.generation,
        )

    # -- rules --

    @rule()
    def acquire(self) -> None:
        self.do_acquire()

    @precondition(
        lambda self: (
            self.model.state is OPEN
            and self.model.open_until is not None
            and self.now < self.model.open_until
        )
    )
    @rule(fraction=st.sampled_from([0.0, 0.5, 0.99]))
    def acquire_before_the_open_deadline(self, fraction: float) -> None:
        open_until = self.machine.open_until
        assert open_until is not None
        self.now = max(self.now, min(self.now + fraction * (open_until - self.now), open_until))
        if self.now >= open_until:
            return
        generation = self.machine.generation
        decision = self.do_acquire()
        assert not decision.admitted, "open admitted a call before its deadline"
        assert decision.retry_after is not None
        assert 0 < decision.retry_after <= open_until - self.now + 1e-9
        assert self.machine.generation == generation
        assert self.machine.state is OPEN

    @rule(outcome=OUTCOMES, duration=DURATIONS, retry_after=RETRY_AFTER)
    def call(self, outcome: Outcome, duration: float, retry_after: float | None) -> None:
        """Acquire and, if admitted, report at once: the common case."""
        if self.do_acquire().admitted:
            permit = self.outstanding.pop()
            self.do_record(permit, outcome, duration, retry_after)

    @precondition(lambda self: bool(self.outstanding))
    @rule(data=st.data(), outcome=OUTCOMES, duration=DURATIONS, retry_after=RETRY_AFTER)
    def report(
        self, data: st.DataObject, outcome: Outcome, duration: float, retry_after: float | None
    ) -> None:
        index = data.draw(st.integers(0, len(self.outstanding) - 1), label="permit")
        permit = self.outstanding.pop(index)
        # The actor expires overdue leases on every message before handling it.
        self.do_expire()
        self.do_record(permit, outcome, duration, retry_after)

    @precondition(lambda self: any(p.lease for p in self.history))
    @rule(data=st.data(), outcome=REPORTED)
    def report_a_lease_again(self, data: st.DataObject, outcome: Outcome) -> None:
        leased = [p for p in self.history if p.lease and p not in self.outstanding]
        if not leased:
            return
        permit = data.draw(st.sampled_from(leased), label="reported lease")
        # record() expires overdue leases first, as the actor does on every message.
        self.do_expire()
        before = self.observable()
        counted = self.do_record(permit, outcome, 0.0, None)
        assert not counted
        assert self.observable() == before

    @rule(
        data=st.data(),
        outcome=REPORTED,
        duration=DURATIONS,
        retry_after=RETRY_AFTER,
        offset=st.sampled_from([-3, -2, -1, 1, 2]),
    )
    def report_stale_generation(
        self,
        data: st.DataObject,
        outcome: Outcome,
        duration: float,
        retry_after: float | None,
        offset: int,
    ) -> None:
        current = self.machine.generation
        stale = [p for p in self.history if p.generation != current]
        use_old: bool = data.draw(st.booleans(), label="use an old permit")
        if stale and use_old:
            permit = data.draw(st.sampled_from(stale), label="old permit")
        else:
            live_leases = sorted(self.model.leases) or [0]
            lease = data.draw(st.sampled_from(live_leases), label="lease")
            permit = Permit(current + offset, lease)
        assert permit.generation != current
        before = self.observable()
        moves = self.begin()
        result = self.machine.record(
            permit.generation,
            outcome,
            self.now,
            duration=duration,
            lease=permit.lease,
            retry_after=retry_after,
        )
        assert not result.counted
        # The books still count it (the totals invariant checks the model's rule).
        self.model.record(permit.generation, outcome, self.now, duration, permit.lease, retry_after)
        if self.model.moves:
            # Only a late rate limit with a later deadline moves an open breaker.
            assert outcome is Outcome.RATE_LIMITED
            assert permit.generation < current
            self.check_transitions(moves, result.transitions)
            return
        assert result.transitions == ()
        snapshot = before[0]  # type: ignore[index]
        assert self.machine.snapshot() == snapshot, "a stale report changed the machine"

    @rule(count=st.sampled_from([1, 2, 3, 5, 9]), stale=st.booleans())
    def successes_in_bulk(self, count: int, stale: bool) -> None:
        """What a drained tally applies: ``count`` plain successes in one call."""
        generation = self.machine.generation - (1 if stale else 0)
        before = self.begin()
        transitions = self.machine.record_successes(generation, count, self.now)
        for _ in range(count):
            self.model.record(generation, Outcome.SUCCESS, self.now, 0.0, 0, None)
        self.check_transitions(before, transitions)

    @invariant()
    def safe_successes_cannot_trip(self) -> None:
        """While the machine says successes are safe, no run of them, at any
        later instant, changes the state (the proxy's fire-and-forget rule)."""
        if not self.machine.successes_safe():
            return
        draws, self.model.draws = self.model.draws, iter(())
        try:
            for later in (0.0, 2.5, 7.0):
                for count in (1, 5, 13):
                    model = copy.deepcopy(self.model)
                    generation = model.generation
                    for _ in range(count):
                        model.record(generation, Outcome.SUCCESS, self.now + later, 0.0, 0, None)
                    assert model.state is self.model.state, (later, count)
        finally:
            self.model.draws = draws

    @rule(step=STEPS)
    def advance(self, step: float) -> None:
        self.now += step

    @rule(data=st.data())
    def advance_to_a_deadline(self, data: st.DataObject) -> None:
        """Jump onto an open deadline, a lease deadline or the next whole second."""
        deadlines = [float(math.floor(self.now) + 1), *self.model.leases.values()]
        if self.model.open_until is not None:
            deadlines.append(self.model.open_until)
        target = data.draw(st.sampled_from(sorted(deadlines)), label="deadline")
        self.now = max(self.now, target)

    @rule()
    def expire(self) -> None:
        self.do_expire()

    @rule(op=st.sampled_from(["force_open", "disable", "reset", None, None, None, None]))
    def admin(self, op: str | None) -> None:
        if op is None:  # administrators are rarer than calls
            return
        before = self.begin()
        if op == "force_open":
            t = self.machine.force_open(self.now)
            self.model.admin(FORCED_OPEN)
        elif op == "disable":
            t = self.machine.disable(self.now)
            self.model.admin(DISABLED)
        else:
            t = self.machine.reset(self.now)
            self.model.admin(CLOSED)
        self.check_transitions(before, () if t is None else (t,))

    # -- invariants --

    @invariant()
    def trials_in_flight_are_bounded(self) -> None:
        assert self.machine.trials_in_flight <= self.config.half_open_calls
        assert self.machine.trials_in_flight == len(self.model.leases)
        assert self.machine.next_deadline() == self.model.next_deadline()
        if self.machine.state is not HALF_OPEN:
            assert self.machine.trials_in_flight == 0

    @invariant()
    def state_matches_the_model(self) -> None:
        assert self.machine.state is self.model.state
        assert self.machine.generation == self.model.generation
        assert close(self.machine.open_until, self.model.open_until)
        assert (self.machine.open_until is not None) == (self.machine.state is OPEN)

    @invariant()
    def window_matches_the_model(self) -> None:
        assert self.machine.window_calls == len(self.model.window)
        assert self.machine.failure_rate() == self.model.failure_rate()
        assert self.machine.slow_call_rate() == self.model.slow_call_rate()

    @invariant()
    def totals_match_the_model(self) -> None:
        m, model = self.machine, self.model
        assert (m.successes, m.failures, m.ignored, m.rejections) == (
            model.successes,
            model.failures,
            model.ignored,
            model.rejections,
        )

    @invariant()
    def generation_rises_with_every_state_change(self) -> None:
        generation, state = self.machine.generation, self.machine.state
        assert generation >= self.last_generation
        if state is not self.last_state:
            assert generation > self.last_generation
        self.last_generation, self.last_state = generation, state


NO_DRAWS = (0.5,)

CONFIGS: dict[str, tuple[BreakerConfig, tuple[float, ...]]] = {
    "one_call": (
        BreakerConfig(
            min_calls=1, window_size=1, half_open_calls=1, timeout=5, half_open_max_wait=3
        ),
        NO_DRAWS,
    ),
    "pairs_backoff": (
        BreakerConfig(
            min_calls=2,
            window_size=3,
            half_open_calls=2,
            timeout=4,
            backoff=2,
            max_timeout=20,
            half_open_max_wait=6,
        ),
        NO_DRAWS,
    ),
    "three_trials_slow": (
        BreakerConfig(
            min_calls=3,
            window_size=4,
            half_open_calls=3,
            failure_threshold=0.5,
            timeout=3,
            slow_call_duration=1.0,
            slow_call_threshold=0.25,
            half_open_max_wait=2.5,
        ),
        NO_DRAWS,
    ),
    "time_window": (
        BreakerConfig(
            window_seconds=2,
            min_calls=2,
            half_open_calls=1,
            timeout=2.5,
            half_open_max_wait=4,
        ),
        NO_DRAWS,
    ),
    "zero_timeout_any_failure": (
        BreakerConfig(
            min_calls=2,
            window_size=2,
            failure_threshold=0.0,
            half_open_calls=1,
            timeout=0,
            half_open_max_wait=1,
        ),
        NO_DRAWS,
    ),
    "jitter": (
        BreakerConfig(
            min_calls=2,
            window_size=5,
            half_open_calls=3,
            failure_threshold=0.6,
            timeout=6,
            backoff=1.5,
            jitter=0.5,
            half_open_max_wait=5,
        ),
        (0.0, 0.3, 0.999, 0.5),
    ),
}

SETTINGS = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    # One minimal counterexample per config is enough, and keeps failing runs short.
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_machine_matches_the_model(name: str) -> None:
    config, draws = CONFIGS[name]

    class Bound(MachineVersusModel):
        CONFIG = config
        DRAWS = draws

    run_state_machine_as_test(Bound, settings=SETTINGS)
