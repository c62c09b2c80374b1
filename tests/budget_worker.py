"""A client process for the budget figures: threads calling the openai SDK as fast as they can.

``python tests/budget_worker.py JSON`` with keys ``socket`` (the daemon's, or
null for an embedded breaker), ``base_url``, ``seconds``, ``threads`` and
``breaker`` (keyword arguments of ``CircuitBreaker``; its name is
``name``, "API" by default). The breaker protects
an ``openai.OpenAI`` client (``protect``: the API's headers feed it; with
``"protect": false`` the bare client, with ``"limits": false`` no header
feed) with the SDK's own retries off; with ``"until_ok": true`` each thread
stops after its first success; with ``"max_tokens": N`` every call asks for
that many (the budgets' token estimate); with ``"warm_up": true`` it makes
one call before ``ready``.
Prints ``ready`` once connected, reads the instant to start at (the host's
monotonic clock, so every worker starts together) from stdin, then prints
one JSON object: how the calls ended, and the requests its budgets sent the
daemon.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

import openai

from breakerd.clients import CircuitBreaker, CircuitBreakerOpenError
from breakerd.clients.openai import protect
from breakerd.protocol import BudgetExceededError


def main() -> None:
    spec = json.loads(sys.argv[1])
    kwargs: dict[str, Any] = dict(spec.get("breaker", {}))
    if spec.get("socket"):
        kwargs["daemon"] = spec["socket"]
    breaker = CircuitBreaker(spec.get("name", "API"), **kwargs)
    sdk = openai.OpenAI(
        api_key=spec.get("api_key", "sk-shared"),
        base_url=spec["base_url"],
        max_retries=0,
        timeout=30.0,
    )
    client: Any = sdk
    if spec.get("protect", True):
        client = protect(sdk, breaker, limits=spec.get("limits", True))
    extra: dict[str, Any] = {}
    if spec.get("max_tokens"):
        extra["max_tokens"] = spec["max_tokens"]
    _ = breaker.config_conflicts  # connect and register before the start
    if spec.get("warm_up"):
        # One call before the start: this process has seen the API's headers,
        # so its calls ask the daemon from the first (see _budget_link).
        client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], **extra
        )
    print("ready", flush=True)
    start = float(sys.stdin.readline())
    end = start + spec["seconds"]
    counts: dict[str, int] = {}
    lock = threading.Lock()

    def note(key: str) -> None:
        with lock:
            counts[key] = counts.get(key, 0) + 1

    def run() -> None:
        time.sleep(max(start - time.monotonic(), 0.0))
        while time.monotonic() < end:
            try:
                client.chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "hi"}], **extra
                )
                note("ok")
                if spec.get("until_ok"):
                    return  # one success a thread: the outage test counts waiters
            except BudgetExceededError as exc:
                note(f"budget:{exc.reason}")
                time.sleep(min(exc.retry_after or 0.01, 0.05))
            except CircuitBreakerOpenError as exc:
                note(f"rejected:{exc.state}")
                time.sleep(min(exc.retry_after or 0.01, 0.05))
            except openai.APIStatusError as exc:
                note(f"status:{exc.status_code}")

    threads = [threading.Thread(target=run) for _ in range(spec["threads"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    budgets = breaker.budgets
    result = {
        "counts": counts,
        "daemon_requests": getattr(budgets, "requests_sent", 0),
        "slots_dropped": getattr(budgets, "slots_dropped", 0),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
