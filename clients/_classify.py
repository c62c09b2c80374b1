"""Turning what a protected call raised into an outcome the breaker counts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

from breakerd.protocol import Outcome

from ._openai import classify_openai

__all__ = ["Classifier", "ClassifyFunc", "RateLimited", "Verdict"]


@dataclass(frozen=True, slots=True)
class RateLimited:
    """The service asked us to back off: open the breaker for ``retry_after`` seconds.

    ``retry_after=None`` opens it for the breaker's normal open duration.
    """

    retry_after: float | None = None


#: What a classifier decides: an ``Outcome`` or ``RateLimited(...)``.
Verdict: TypeAlias = Outcome | RateLimited
#: A user's classifier: return a verdict, or None to fall through to the rules.
ClassifyFunc: TypeAlias = Callable[[BaseException], Verdict | None]


class Classifier:
    """The rules, in order, for an exception raised by a protected call.

    1. Anything that is not an ``Exception`` (cancellation, ``KeyboardInterrupt``,
       ``SystemExit``) releases the permit and is never a failure.
    2. ``classify(exc)``, if given and it returns a verdict.
    3. ``ignore`` types: ignored.
    4. The OpenAI rules (``classify_openai``) when ``openai=True`` and the
       exception comes from the openai SDK.
    5. ``record`` types (default: every ``Exception``): failure.
    6. Anything else: ignored.
    """

    __slots__ = ("_classify", "_ignore", "_openai", "_record")

    def __init__(
        self,
        *,
        record: tuple[type[BaseException], ...] = (Exception,),
        ignore: tuple[type[BaseException], ...] = (),
        classify: ClassifyFunc | None = None,
        openai: bool = True,
    ) -> None:
        for label, types in (("record", record), ("ignore", ignore)):
            if not isinstance(types, tuple) or not all(
                isinstance(t, type) and issubclass(t, BaseException) for t in types
            ):
                raise TypeError(f"{label} must be a tuple of exception types, got {types!r}")
        if classify is not None and not callable(classify):
            raise TypeError(f"classify must be callable, got {classify!r}")
        self._record = record
        self._ignore = ignore
        self._classify = classify
        self._openai = openai

    def __call__(self, exc: BaseException) -> Verdict:
        if not isinstance(exc, Exception):
            return Outcome.CANCELLED
        if self._classify is not None:
            verdict = self._classify(exc)
            if verdict is not None:
                if not isinstance(verdict, (Outcome, RateLimited)):
                    raise TypeError(
                        f"classify() must return an Outcome, RateLimited or None, got {verdict!r}"
                    )
                return verdict
        if self._ignore and isinstance(exc, self._ignore):
            return Outcome.IGNORED
        if self._openai:
            openai_verdict = classify_openai(exc)
            if openai_verdict is not None:
                outcome, retry_after = openai_verdict
                return RateLimited(retry_after) if outcome is Outcome.RATE_LIMITED else outcome
        if isinstance(exc, self._record):
            return Outcome.FAILURE
        return Outcome.IGNORED
