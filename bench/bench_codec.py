"""The wire codec alone: encode and decode each kind of message, in µs.

Not a test: it prints a table for a person to read. Each row times one
message through the public codec the way a connection uses it (``encode_*``
then ``msgpack.packb``; ``msgpack.unpackb`` then ``decode_message``), best of
several repetitions, so runs of two checkouts on one machine compare.

``--fast-paths`` adds, for the messages with a hand-tuned decoder (snapshot,
admission, report batch), that decoder beside the derived checker, on maps
msgpack already decoded: the figures that justify keeping each one.

Run: ``python bench/bench_codec.py [--fast-paths] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import timeit
from collections.abc import Callable
from typing import Any

import msgpack

from breakerd import protocol
from breakerd.protocol import (
    Acquire,
    Admission,
    BreakerStatus,
    CircuitState,
    Hello,
    Outcome,
    Registered,
    Report,
    ReportBatch,
    Snapshot,
    StatePush,
    Status,
    TransitionEvent,
    Welcome,
)
from breakerd.protocol._codec import (
    decode_message,
    encode_notification,
    encode_request,
    encode_response,
)

SNAP = Snapshot("llm", CircuitState.CLOSED, 7, calls=40, failure_rate=0.25)
SNAP_OPEN = Snapshot(
    "llm", CircuitState.OPEN, 8, open_until=99.75, failure_rate=1.0, calls=5, reason="failure_rate"
)
STATUS = Status(
    tuple(
        BreakerStatus(SNAP, successes=10, failures=3, rejections=5, ignored=2, clients=4)
        for _ in range(100)
    ),
    next_offset=100,
)

#: (label, wire value of the message) for every row.
CASES: list[tuple[str, list[Any]]] = [
    ("state push (snapshot)", encode_notification(StatePush(SNAP))),
    ("state push (open, with reason)", encode_notification(StatePush(SNAP_OPEN))),
    ("admission result", encode_response(1, Admission(True, 7, 0, SNAP))),
    ("acquire request", encode_request(1, Acquire("llm"))),
    ("acquire carrying successes", encode_request(1, Acquire("llm", 3, 7))),
    ("report request (failure)", encode_request(1, Report("llm", 7, Outcome.FAILURE, 0.5))),
    ("snapshot result", encode_response(1, SNAP_OPEN)),
    (
        "reports: 100 items",
        encode_notification(
            ReportBatch(tuple(Report("llm", 7, Outcome.SUCCESS, 0.25) for _ in range(100)))
        ),
    ),
    (
        "reports: counts only",
        encode_notification(ReportBatch((), (("llm", 7, 500), ("db", 0, 3)), (("llm", 2),))),
    ),
    ("registered result", encode_response(1, Registered(SNAP, ("timeout",), slot=3))),
    ("status result, 100 breakers", encode_response(1, STATUS)),
    ("hello request", encode_request(1, Hello(1, 1, "bench", 42))),
    ("welcome result", encode_response(1, Welcome(1, "daemon", 1, 4096))),
    (
        "transition event",
        encode_notification(
            TransitionEvent("llm", CircuitState.CLOSED, CircuitState.OPEN, 8, "x", 1.5, 0.75)
        ),
    ),
]
# The budget messages, where the checkout has them (so that one script times
# an older checkout too): a budgeted call sends one request now and then.
if hasattr(protocol, "BudgetRequest"):
    CASES += [
        (
            "budget request",
            encode_request(
                1,
                protocol.BudgetRequest(
                    "llm", 20.0, 2, want=4, wait=1.5, done=3, limits=(("remaining_requests", 9.0),)
                ),
            ),
        ),
        (
            "budget grant",
            encode_response(1, protocol.BudgetGrant((1.0, 1.05, 1.1, 1.15), 0, "rate_budget", 0.2)),
        ),
    ]


def per_call_us(fn: Callable[[], object], repeat: int) -> float:
    # CPU time, not wall time: the machine is shared, and a preempted
    # repetition would count another process's time as ours.
    timer = timeit.Timer(fn, timer=time.process_time)
    number, _ = timer.autorange()
    return min(timer.repeat(repeat, number)) / number * 1e6


def encoder_of(wire: list[Any]) -> Callable[[], object]:
    event = decode_message(msgpack.unpackb(msgpack.packb(wire)))
    kind = wire[0]
    message: Any = getattr(event, "message", None) or getattr(event, "result", None)
    if kind == 0:
        return lambda: msgpack.packb(encode_request(1, message))
    if kind == 1:
        return lambda: msgpack.packb(encode_response(1, message))
    return lambda: msgpack.packb(encode_notification(message))


def decoder_of(wire: list[Any]) -> Callable[[], object]:
    data = msgpack.packb(wire)
    return lambda: decode_message(msgpack.unpackb(data))


def fast_path_rows(repeat: int) -> list[tuple[str, float, float]]:
    """(label, hand-tuned µs, derived µs) for the map decoders alone."""
    from breakerd.protocol import _codec

    rows = []
    batch = ReportBatch(tuple(Report("llm", 7, Outcome.SUCCESS, 0.25) for _ in range(100)))
    admission = Admission(True, 7, 0, SNAP)
    pairs: list[tuple[str, Callable[[], object], Callable[[], object]]] = []
    snap_map = msgpack.unpackb(msgpack.packb(_codec._DERIVED_SNAPSHOT.encode(SNAP)))
    adm_map = msgpack.unpackb(msgpack.packb(_codec._DERIVED_ADMISSION.encode(admission)))
    batch_map = msgpack.unpackb(msgpack.packb(_codec._DERIVED_REPORTS.encode(batch)))
    pairs += [
        (
            "snapshot: decode",
            lambda: _codec._snapshot(snap_map, "w"),
            lambda: _codec._DERIVED_SNAPSHOT.decode(snap_map, "w"),
        ),
        (
            "admission: decode",
            lambda: _codec._admission(adm_map),
            lambda: _codec._DERIVED_ADMISSION.decode(adm_map, "w"),
        ),
        (
            "reports, 100 items: decode",
            lambda: _codec._reports(batch_map, "w"),
            lambda: _codec._DERIVED_REPORTS.decode(batch_map, "w"),
        ),
    ]
    for label, fast, derived in pairs:
        rows.append((label, per_call_us(fast, repeat), per_call_us(derived, repeat)))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="repetitions; the best counts")
    parser.add_argument("--fast-paths", action="store_true", help="hand-tuned vs derived")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    print(f"bench_codec: Python {sys.version.split()[0]}, msgpack {msgpack.version}")
    print(f"   best of {args.repeat}, CPU time; µs per message, msgpack included")
    print(f"   {'message':<34}{'encode':>10}{'decode':>10}")
    results: dict[str, Any] = {"rows": {}}
    for label, wire in CASES:
        enc = per_call_us(encoder_of(wire), args.repeat)
        dec = per_call_us(decoder_of(wire), args.repeat)
        results["rows"][label] = {"encode": enc, "decode": dec}
        print(f"   {label:<34}{enc:>10.3f}{dec:>10.3f}")
    if args.fast_paths:
        print("\n   hand-tuned vs derived decoder (no msgpack), µs per call")
        print(f"   {'':<34}{'tuned':>10}{'derived':>10}{'ratio':>8}")
        results["fast_paths"] = {}
        for label, fast, derived in fast_path_rows(args.repeat):
            results["fast_paths"][label] = {"tuned": fast, "derived": derived}
            print(f"   {label:<34}{fast:>10.3f}{derived:>10.3f}{derived / fast:>7.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
