"""What is left of an API's token limit, as its headers said and as calls spend it.

Pure, like the budgets around it (``_budget.HeaderBudget`` holds one): every
method takes ``now``. The rules, each because a plain "what the last response
said, less the estimates since" overspent against a server enforcing tokens
per window (tests/test_budgets_tokens.py: 10 and 6 429s in 5 s without them):

* A count is as old as its call's arrival: the calls in flight when it comes
  are subtracted from it, each at the last call's estimate (the daemon hears
  of calls, not of each one's cost). Within a window the reset never moves
  earlier: an older response's reset is an older call's.
* A call admitted now keeps the window from emptying for a window's length
  after it (at the safety margin, and ``SLACK`` at least): the reset moves
  past it, as a sliding window's own does.
* A call that waits for the reset is debited from the window after it, or
  from the one after that once it is full (when the API said its limit),
  windows spaced as far apart: every waiter
  let go at one reset would otherwise spend it twice over at once.
"""

from __future__ import annotations

import math
from typing import Final

__all__ = ["SLACK", "TokenLimit"]

#: Seconds a window is stretched at least, however short it is: a call
#: reaches the API later than its slot by its transit and its process's
#: scheduling (on a loaded 2-vCPU host, over the 5 % margin of a 2 s window).
SLACK: Final = 0.25


class TokenLimit:
    """The tokens left before the reset, and the tokens of calls waiting for later windows."""

    __slots__ = (
        "_ahead",
        "_cost",
        "_last",
        "_unpriced",
        "limit",
        "margin",
        "remaining",
        "reset_at",
        "window",
    )

    def __init__(self, margin: float) -> None:
        self.margin = margin
        self.remaining = math.inf
        self.reset_at = -math.inf
        #: The longest reset seen: the window's length (a sliding window's
        #: reset is shorter by the age of its newest call).
        self.window = 1.0
        #: The limit per window, when the API said it.
        self.limit: float | None = None
        # Tokens of calls waiting for the reset, by window: [0] the one after it.
        self._ahead: list[float] = []
        # The last call's estimate: what each call in flight is taken to cost.
        self._cost = 0.0
        # Calls in flight when a count came before any estimate was known:
        # subtracted from it at the first estimate.
        self._unpriced = 0
        # Where the last call's tokens were debited (-1: from what is left now).
        self._last = -1

    def known(self, now: float) -> bool:
        return now < self.reset_at

    @property
    def gap(self) -> float:
        """Seconds a call's tokens count in the window: its length, at the margin, or more."""
        return max(self.window / self.margin, self.window + SLACK)

    def left(self, now: float) -> float:
        """Tokens estimated left before the reset (``inf`` when nothing is known)."""
        return self.remaining if self.known(now) else math.inf

    def reset_in(self, now: float) -> float | None:
        """Seconds until the reset, as estimated (None: unknown or past)."""
        return self.reset_at - now if self.known(now) else None

    def observe(
        self,
        now: float,
        remaining: float | None,
        reset: float | None,
        limit: float | None,
        others: int,
    ) -> None:
        """A response's token count (``reset``: seconds from now).

        ``others``: the calls in flight but the one that carried it.
        """
        self._roll(now)
        if limit is not None and limit > 0:
            self.limit = float(limit)
        if remaining is None or not remaining >= 0:
            return
        self._unpriced = 0 if self._cost else others
        seconds = 1.0 if reset is None or not math.isfinite(reset) else max(reset, 0.0)
        left = max(float(remaining) - others * self._cost, 0.0)
        if self.known(now):
            seconds = max(seconds, self.reset_at - now)
        self.remaining = left
        self.reset_at = now + seconds
        self.window = max(self.window, seconds, 1e-3)

    def prepare(self, now: float, tokens: float) -> None:
        """Before a call costing ``tokens`` is planned: past resets rolled, calls priced."""
        self._roll(now)
        if tokens <= 0:
            return
        if self._unpriced and self.known(now):
            self.remaining = max(self.remaining - self._unpriced * tokens, 0.0)
        self._unpriced = 0
        self._cost = tokens

    def _roll(self, now: float) -> None:
        # Past the reset, a window's tokens are the limit less what waited for it.
        while self._ahead and now >= self.reset_at and self.limit is not None:
            self.remaining = max(self.limit - self._ahead.pop(0), 0.0)
            self.reset_at += self.gap

    def _window_for(self, now: float, tokens: float) -> int:
        # -1: what is left now pays (or nothing is known); else the window
        # after the reset that does (0: the next one).
        if tokens <= 0 or not self.known(now):
            return -1
        if self.remaining >= tokens and not self._ahead:
            return -1  # (not before calls already waiting: the reset would move past them)
        if self.limit is None:
            return 0  # a window's size unknown: each waits for the next reset
        for window, spent in enumerate(self._ahead):
            if spent + tokens <= self.limit:
                return window
        return len(self._ahead)

    def earliest(self, now: float, tokens: float) -> float:
        """The first instant the tokens allow a call costing ``tokens`` to leave."""
        window = self._window_for(now, tokens)
        return -math.inf if window < 0 else self.reset_at + window * self.gap

    def debit(self, now: float, tokens: float, leave: float) -> None:
        """A call costing ``tokens`` leaves at ``leave`` (planned with ``earliest``)."""
        window = self._last = self._window_for(now, tokens)
        if window >= 0 and self.limit is not None:
            self._ahead.extend([0.0] * (window + 1 - len(self._ahead)))
            self._ahead[window] += tokens
        elif tokens > 0 and self.known(now):
            self.remaining -= tokens
            if window < 0:
                self.reset_at = max(self.reset_at, leave + self.gap)

    def correct(self, now: float, tokens: float) -> None:
        """Tokens back (estimates larger than the calls' ``usage``), or more spent if negative."""
        if self.known(now):
            self.remaining += tokens

    def give_back(self, now: float, tokens: float) -> None:
        """The call debited last never left: undo its debit."""
        if tokens > 0 and 0 <= self._last < len(self._ahead):
            self._ahead[self._last] = max(self._ahead[self._last] - tokens, 0.0)
        elif tokens > 0 and self.known(now):
            self.remaining += tokens
        self._last = -1
