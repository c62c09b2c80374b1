"""Reply callbacks a daemon-mode link uses: answering, and waiting for an answer in a thread."""

from __future__ import annotations

import threading
from typing import Any

from ._core import Reply

__all__ = ["SyncReply", "answer", "ignore_reply"]


def answer(reply: Reply | None, result: Any, error: BaseException | None) -> None:
    """Call ``reply`` unless there is none (a fire-and-forget request)."""
    if reply is not None:
        reply(result, error)


def ignore_reply(result: Any, error: BaseException | None) -> None:
    """A reply nobody waits for."""


class SyncReply:
    """A reply callback that one thread waits on (lighter than a ``concurrent.futures.Future``)."""

    __slots__ = ("_error", "_lock", "_result", "done")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self._result: Any = None
        self._error: BaseException | None = None
        self.done = False

    def __call__(self, result: Any, error: BaseException | None) -> None:
        if self.done:
            return  # run again after an interrupted dispatch: the first answer stands
        self._result = result
        self._error = error
        self.done = True
        self._lock.release()

    def ready(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds for the answer; True if it is in."""
        if self.done:
            return True
        if timeout > 0 and self._lock.acquire(timeout=timeout):
            self._lock.release()  # for wait()
            return True
        return self.done

    def wait(self) -> Any:
        if not self.done:
            self._lock.acquire()
        error = self._error
        if error is not None:
            raise error
        return self._result
