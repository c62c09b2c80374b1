"""Turning what a protected call raised into an outcome the breaker counts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

from breakerd.actor._reasons import RATE_LIMIT_REASONS
from breakerd.protocol import Outcome

from ._openai import openai_error_class

__all__ = ["Classifier", "ClassifyFunc", "RateLimited", "Verdict"]


#: Error classes that concern the whole API key, not one model: with scopes
#: they open the parent breaker (and so every scope under it).
KEY_WIDE: frozenset[str] = frozenset({"quota", "auth"})


@dataclass(frozen=True, slots=True)
class RateLimited:
    """The service asked us to back off: open the breaker for ``retry_after`` seconds.

    ``retry_after=None`` opens it for the breaker's normal open duration.
    ``reason`` is the error class: ``"rate_limited"`` (the default), or a
    key-wide ``"quota"`` or ``"auth"``, which open for ``quota_timeout``
    (capped by it, not by ``max_timeout``). ``error_code`` is the provider's
    code, shown to the callers the breaker then rejects.
    """

    retry_after: float | None = None
    reason: str = "rate_limited"
    error_code: str | None = None

    def __post_init__(self) -> None:
        if self.reason not in RATE_LIMIT_REASONS:
            raise ValueError(
                f"RateLimited reason must be 'rate_limited', 'quota' or 'auth', got {self.reason!r}"
            )

    @property
    def key_wide(self) -> bool:
        return self.reason in KEY_WIDE


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
    4. The OpenAI rules (``openai_error_class``) when ``openai=True`` and
       the exception comes from the openai SDK; a 401/403 opens the breaker
       (class ``auth``, for ``quota_timeout``) only with ``auth_opens=True``.
    5. ``record`` types (default: every ``Exception``): failure.
    6. Anything else: ignored.
    """

    __slots__ = ("_auth_opens", "_classify", "_ignore", "_logged", "_openai", "_record")

    def __init__(
        self,
        *,
        record: tuple[type[BaseException], ...] = (Exception,),
        ignore: tuple[type[BaseException], ...] = (),
        classify: ClassifyFunc | None = None,
        openai: bool = True,
        auth_opens: bool = False,
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
        self._auth_opens = auth_opens
        # Quota and auth errors this breaker has logged: each is said once.
        self._logged: set[tuple[str, object]] = set()

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
            found = openai_error_class(exc, self._logged)
            if found is not None:
                outcome, retry_after, reason, error_code = found
                if outcome is Outcome.RATE_LIMITED:
                    return RateLimited(retry_after, reason or "rate_limited", error_code)
                if reason == "auth" and self._auth_opens:
                    return RateLimited(None, "auth", error_code)
                return outcome
        if isinstance(exc, self._record):
            return Outcome.FAILURE
        return Outcome.IGNORED
