"""A stand-in OpenAI server that enforces a request limit per API key, for the budget figures.

``LimitedServer(limit=20, window=1.0)`` answers ``POST /v1/chat/completions``
(and ``/v1/responses``) on 127.0.0.1 from a thread per request. Per API key
it keeps the arrival times of the last ``window`` seconds (a sliding window):
a request that would be the ``limit + 1``-th in the window gets a real 429
(``rate_limit_exceeded``, ``retry-after-ms`` to the next free slot); every
answer carries OpenAI's headers (``x-ratelimit-limit-requests``,
``-remaining-requests``, ``-reset-requests``: the time until the window is
empty again, "the time until the rate limit resets to its initial state").

With ``tokens=N`` it also enforces N tokens per ``token_window`` seconds
per key (a scaled-down tokens-per-minute limit), as OpenAI counts them when
a request arrives: its ``max_tokens`` (or ``max_completion_tokens``) plus
one prompt token; a request past them gets a 429 (``type: tokens``), and
every answer carries ``x-ratelimit-limit-tokens``, ``-remaining-tokens`` and
``-reset-tokens``. A successful answer's ``usage`` says it used exactly
what it was charged.

It records, on the host's monotonic clock (the one daemon and clients use):
every arrival and its status, and the most requests in flight at once. A
request is in flight while its handler runs, ``latency`` seconds, and ends
early if its client goes away (a killed process). ``outage(seconds)`` makes
it answer 503 until then.
"""

from __future__ import annotations

import json
import select
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _Server(ThreadingHTTPServer):
    # The workers connect all at once: with the default queue of 5, a
    # connection beyond it waits for the kernel's retry, a second later,
    # and its call (admitted then) reaches the server that much late.
    request_queue_size = 128


class LimitedServer:
    def __init__(
        self,
        limit: int = 20,
        window: float = 1.0,
        latency: float = 0.01,
        *,
        tokens: int | None = None,
        token_window: float = 60.0,
    ) -> None:
        # A latency per request, so calls overlap as real ones do.
        self.limit = limit
        self.window = window
        self.latency = latency
        self.tokens = tokens
        self.token_window = token_window
        self.lock = threading.Lock()
        self.windows: dict[str, deque[float]] = {}
        #: API key -> (arrival, tokens charged) within the token window.
        self.token_windows: dict[str, deque[tuple[float, int]]] = {}
        #: (monotonic arrival, tokens charged) of every request that got a 200.
        self.charges: list[tuple[float, int]] = []
        #: Requests refused for tokens (429, ``type: tokens``).
        self.token_429s = 0
        #: (monotonic arrival, status) of every request.
        self.arrivals: list[tuple[float, int]] = []
        #: Each key's arrival times (its authorization header's).
        self.arrivals_by_key: dict[str, list[float]] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        #: API key -> its requests in flight now.
        self.in_flight_by_key: dict[str, int] = {}
        #: (monotonic instant, requests in flight) at every change.
        self.flight_log: list[tuple[float, int]] = []
        self.down_until = 0.0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                owner.handle(self)

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> LimitedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def outage(self, seconds: float) -> None:
        """Answer 503 for the next ``seconds``."""
        self.down_until = time.monotonic() + seconds

    def statuses(self, start: float = 0.0, end: float = float("inf")) -> dict[int, int]:
        """How many answers of each status arrived in ``[start, end)``."""
        counts: dict[int, int] = {}
        with self.lock:
            for at, status in self.arrivals:
                if start <= at < end:
                    counts[status] = counts.get(status, 0) + 1
        return counts

    def around_429s(self) -> str:
        """The arrivals before each 429, for an assertion's message."""
        with self.lock:
            arrivals = sorted(self.arrivals)
        if not arrivals:
            return "no arrivals"
        first = arrivals[0][0]
        lines = []
        for i, (_at, status) in enumerate(arrivals):
            if status == 429:
                before = arrivals[max(0, i - self.limit) : i + 1]
                lines.append(" ".join(f"{t - first:.3f}:{s}" for t, s in before))
        return "\n".join(lines)

    def most_in_any_window(self) -> int:
        """The most requests that arrived within any one ``window`` (accepted or not)."""
        with self.lock:
            times = sorted(at for at, _ in self.arrivals)
        most = 0
        first = 0
        for last, at in enumerate(times):
            while at - times[first] >= self.window:
                first += 1
            most = max(most, last - first + 1)
        return most

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        length = int(request.headers.get("content-length") or 0)
        body = json.loads(request.rfile.read(length) or b"{}")
        key = request.headers.get("authorization", "")
        now = time.monotonic()
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 0
        charge = int(max_tokens) + 1
        with self.lock:
            arrivals = self.windows.setdefault(key, deque())
            while arrivals and arrivals[0] <= now - self.window:
                arrivals.popleft()
            spent = self.token_windows.setdefault(key, deque())
            while spent and spent[0][0] <= now - self.token_window:
                spent.popleft()
            tokens_used = sum(tokens for _, tokens in spent)
            short_of_tokens = self.tokens is not None and tokens_used + charge > self.tokens
            if now < self.down_until:
                status = 503
            elif len(arrivals) >= self.limit or short_of_tokens:
                status = 429
                self.token_429s += short_of_tokens
            else:
                status = 200
                arrivals.append(now)
                spent.append((now, charge))
                tokens_used += charge
                self.charges.append((now, charge))
            self.arrivals.append((now, status))
            self.arrivals_by_key.setdefault(key, []).append(now)
            remaining = max(self.limit - len(arrivals), 0)
            reset = (arrivals[-1] + self.window - now) if arrivals else 0.0
            next_free = (arrivals[0] + self.window - now) if arrivals else 0.0
            self.in_flight += 1
            self.in_flight_by_key[key] = self.in_flight_by_key.get(key, 0) + 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.flight_log.append((now, self.in_flight))
        try:
            headers = {
                "x-ratelimit-limit-requests": str(self.limit),
                "x-ratelimit-remaining-requests": str(remaining),
                "x-ratelimit-reset-requests": f"{max(reset, 0.0):.3f}s",
            }
            if self.tokens is not None:
                # Reset: when the window is empty of every charge (OpenAI's
                # "the time until the rate limit resets to its initial state").
                token_reset = (spent[-1][0] + self.token_window - now) if spent else 0.0
                headers["x-ratelimit-limit-tokens"] = str(self.tokens)
                headers["x-ratelimit-remaining-tokens"] = str(max(self.tokens - tokens_used, 0))
                headers["x-ratelimit-reset-tokens"] = f"{max(token_reset, 0.0):.3f}s"
            if status == 200:
                # The client may go away meanwhile (a killed process): then
                # the request is over at once, as a real server's would be.
                select.select([request.connection], [], [], self.latency)
                payload: dict[str, Any] = {
                    "id": "c",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body.get("model", "gpt-4o"),
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "hi"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {
                        "prompt_tokens": 1,
                        "completion_tokens": max(charge - 1, 1),
                        "total_tokens": max(charge, 2),
                    },
                }
            elif status == 429:
                if short_of_tokens and len(arrivals) < self.limit:
                    next_free = (spent[0][0] + self.token_window - now) if spent else 0.0
                kind = "tokens" if short_of_tokens else "requests"
                headers["retry-after-ms"] = str(int(max(next_free, 0.0) * 1000) + 1)
                payload = {
                    "error": {
                        "message": f"Rate limit reached for {kind}",
                        "type": kind,
                        "code": "rate_limit_exceeded",
                    }
                }
            else:
                payload = {"error": {"message": "overloaded", "type": "server_error"}}
            data = json.dumps(payload).encode()
            try:
                request.send_response(status)
                for name, value in headers.items():
                    request.send_header(name, value)
                request.send_header("content-type", "application/json")
                request.send_header("content-length", str(len(data)))
                request.end_headers()
                request.wfile.write(data)
            except OSError:
                pass  # the client went away
        finally:
            with self.lock:
                self.in_flight -= 1
                self.in_flight_by_key[key] -= 1
                self.flight_log.append((time.monotonic(), self.in_flight))
