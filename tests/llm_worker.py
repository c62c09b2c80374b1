"""A client process for the LLM end-to-end tests: the real openai SDK through a scoped breaker.

``python tests/llm_worker.py SOCKET BASE_URL MODEL...`` builds
``CircuitBreaker("LLM", daemon=SOCKET, scope="model")`` and makes one chat
completion per MODEL against the stand-in server at BASE_URL, in order. It
prints one JSON object per call: how it ended (``ok``, ``status:NNN`` for an
error from the server, ``rejected`` with the rejection's fields) and its pid.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import openai

from breakerd.clients import CircuitBreaker, CircuitBreakerOpenError


def main() -> None:
    socket_path, base_url, *models = sys.argv[1:]
    client = openai.OpenAI(api_key="sk-test", base_url=base_url, max_retries=0, timeout=10.0)
    breaker = CircuitBreaker(
        "LLM", daemon=socket_path, scope="model", min_calls=5, timeout=30.0, quota_timeout=900.0
    )

    def create(**kwargs: Any) -> Any:
        return client.chat.completions.create(**kwargs)

    for model in models:
        result: dict[str, Any] = {"pid": os.getpid(), "model": model}
        try:
            breaker.call_sync(create, model=model, messages=[{"role": "user", "content": "hi"}])
            result["end"] = "ok"
        except CircuitBreakerOpenError as exc:
            result["end"] = "rejected"
            for key in ("name", "state", "scope", "reason", "error_code", "retry_after"):
                result[key] = getattr(exc, key)
            result["open_until"] = exc.open_until
            result["opened_by_pid"] = exc.opened_by_pid
            result["message"] = str(exc)
        except openai.APIStatusError as exc:
            result["end"] = f"status:{exc.status_code}"
        print(json.dumps(result), flush=True)
    client.close()


if __name__ == "__main__":
    main()
