"""A worker process of ``breakerd demo --daemon``: one daemon-backed breaker, commands on stdin.

Run as ``python -m breakerd.clients.cli._demo_worker PLAN_JSON`` by the
coordinator (``_demo_daemon``). It reads one JSON command per line on stdin,
makes that call through its own ``CircuitBreaker(..., daemon=socket)`` and
openai client, and answers with JSON lines on stdout; the transitions its
breaker sees arrive on the same stdout as they happen.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread

from ._demo import (
    FAILURE_THRESHOLD,
    MIN_CALLS,
    MODEL,
    Kind,
    configure_demo_logging,
)


def _worker_main(plan: Mapping[str, Any]) -> int:
    """A worker: one daemon-backed breaker and one openai client; commands on stdin."""
    configure_demo_logging(bool(plan.get("verbose")))
    anyio.run(_worker, plan)
    return 0


async def _worker(plan: Mapping[str, Any]) -> None:
    # Imported here: importing breakerd must not pay for the openai SDK.
    import openai

    from .._breaker import CircuitBreaker

    lock = threading.Lock()

    def emit(**message: Any) -> None:
        # The breaker's transitions arrive on its IO thread, replies on this one.
        with lock:
            sys.stdout.write(json.dumps(message) + "\n")
            sys.stdout.flush()

    fallbacks: list[float | None] = []

    async def fallback(prompt: str) -> str:
        open_until = breaker.snapshot.open_until
        fallbacks.append(None if open_until is None else open_until - time.monotonic())
        return f"sorry, the AI service is unavailable; please retry {prompt!r} later"

    breaker = CircuitBreaker(
        plan["name"],
        failure_threshold=FAILURE_THRESHOLD,
        timeout=plan["open_timeout"],
        min_calls=MIN_CALLS,
        fallback=fallback,
        daemon=plan["socket"],
        # The point is the shared breaker: without the daemon, fail loudly
        # rather than carry on with a private one.
        on_unavailable="deny",
    )
    breaker.on_transition(
        lambda t: emit(
            event="transition",
            generation=t.generation,
            failure_rate=t.failure_rate,
            open_until=t.open_until,
            **{"from": t.from_state.value, "to": t.to_state.value},
        )
    )
    client = openai.AsyncOpenAI(
        api_key="sk-breakerd-demo-not-a-real-key",
        base_url=plan["base_url"],
        max_retries=0,
        timeout=plan["client_timeout"],
        http_client=openai.DefaultAsyncHttpxClient(trust_env=False),
    )

    async def call_llm(prompt: str) -> str:
        response = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}]
        )
        return str(response.choices[0].message.content)

    async with client:
        snapshot = breaker.snapshot
        emit(event="ready", state=snapshot.state.value, generation=snapshot.generation)
        while True:
            line = await anyio.to_thread.run_sync(sys.stdin.readline)
            if not line:
                return
            command = json.loads(line)
            if command["op"] == "exit":
                return
            before = len(fallbacks)
            error: str | None = None
            try:
                text = await breaker.call(call_llm, command["prompt"])
            except Exception as exc:
                kind: Kind = "failure"
                text, error = str(exc), type(exc).__name__
            else:
                kind = "fallback" if len(fallbacks) > before else "success"
            snapshot = breaker.snapshot
            emit(
                index=command["index"],
                kind=kind,
                text=text,
                error=error,
                state=snapshot.state.value,
                generation=snapshot.generation,
                retry_after=fallbacks[-1] if kind == "fallback" else None,
            )


if __name__ == "__main__":
    raise SystemExit(_worker_main(json.loads(sys.argv[1])))
