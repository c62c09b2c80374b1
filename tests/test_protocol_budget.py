"""The budget messages' codec, derived from their dataclasses like every other.

Their fields need more of the grammar than the others do (finite numbers,
limit names, lease ids, a map of pairs): these tests pin what those markers
accept and refuse. The bytes are pinned in test_protocol_golden.py.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from breakerd.protocol import (
    PROTOCOL_VERSION,
    BudgetGrant,
    BudgetRequest,
    Connection,
    Hello,
    RemoteProtocolError,
    RequestReceived,
    ResponseReceived,
    Welcome,
)
from breakerd.protocol._codec import MAX_COUNT, decode_message, encode_request, encode_response
from breakerd.protocol._derive import derive
from breakerd.protocol._wire import ALWAYS, Count, Finite, NonNegativeFloat, OneOf, wire

LIMIT_NAMES = [
    "remaining_requests",
    "reset_requests",
    "remaining_tokens",
    "reset_tokens",
    "limit_requests",
    "limit_tokens",
]

finite = st.floats(allow_nan=False, allow_infinity=False)
non_negative = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False)
counts = st.integers(0, MAX_COUNT)

REQUEST_FIELDS: dict[str, st.SearchStrategy[Any]] = dict(
    name=st.text(max_size=20),
    rate=non_negative,
    burst=st.integers(1, MAX_COUNT),  # 0 means 1: it comes back as 1
    max_concurrent=counts,
    want=counts,
    wait=non_negative,
    tokens=non_negative,
    lease=st.booleans(),
    release=st.lists(st.integers(1, 2**63), max_size=5).map(tuple),
    done=counts,
    started=counts,
    tokens_back=non_negative,
    limits=st.dictionaries(st.sampled_from(LIMIT_NAMES), non_negative).map(
        lambda d: tuple(d.items())
    ),
    ramp=st.booleans(),
    generation=st.integers(0, 2**64 - 1),
)
GRANT_FIELDS: dict[str, st.SearchStrategy[Any]] = dict(
    slots=st.lists(finite, max_size=5).map(tuple),
    lease=st.integers(0, 2**64 - 1),
    reason=st.none() | st.text(max_size=12),
    retry_after=st.none() | finite,
    ramp_at=st.none() | finite,
)


def greeted_pair() -> tuple[Connection, Connection]:
    client, server = Connection("client"), Connection("server")
    server.receive_data(client.send_request(0, Hello(1, PROTOCOL_VERSION, "t", 1)))
    assert isinstance(server.next_event(), RequestReceived)
    client.receive_data(server.send_response(0, Welcome(PROTOCOL_VERSION, "d", 2)))
    assert isinstance(client.next_event(), ResponseReceived)
    return client, server


@given(request=st.builds(BudgetRequest, **REQUEST_FIELDS))
def test_any_budget_request_round_trips(request: BudgetRequest) -> None:
    client, server = greeted_pair()
    server.receive_data(client.send_request(7, request))
    assert server.next_event() == RequestReceived(7, request)


@given(grant=st.builds(BudgetGrant, **GRANT_FIELDS))
def test_any_budget_grant_round_trips(grant: BudgetGrant) -> None:
    client, server = greeted_pair()
    client.send_request(7, BudgetRequest("llm"))
    client.receive_data(server.send_response(7, grant))
    assert client.next_event() == ResponseReceived(7, grant, None)


def test_the_strategies_set_every_field() -> None:
    for cls, fields in [(BudgetRequest, REQUEST_FIELDS), (BudgetGrant, GRANT_FIELDS)]:
        assert set(fields) == {f.name for f in dataclasses.fields(cls)}, cls.__name__


def decode_request(params: dict[Any, Any]) -> BudgetRequest:
    event = decode_message(msgpack.unpackb(msgpack.packb([0, 1, "budget", params])))
    assert isinstance(event, RequestReceived)
    assert isinstance(event.message, BudgetRequest)
    return event.message


def decode_grant(result: dict[Any, Any]) -> BudgetGrant:
    result = {"type": "budget_grant", **result}
    event = decode_message(msgpack.unpackb(msgpack.packb([1, 1, None, result])))
    assert isinstance(event, ResponseReceived)
    assert isinstance(event.result, BudgetGrant)
    return event.result


def test_what_a_peer_may_leave_out_or_send_as_another_type() -> None:
    assert decode_request({"name": "llm"}) == BudgetRequest("llm")
    loose = decode_request(
        {"name": "llm", "rate": 20, "wait": 1, "limits": {"reset_tokens": 3}, "later": [1]}
    )
    assert loose == BudgetRequest("llm", 20.0, wait=1.0, limits=(("reset_tokens", 3.0),))
    assert type(loose.rate) is float
    assert type(loose.limits[0][1]) is float
    # A burst of 0 is a burst of 1, as the hand-written decoder had it.
    assert decode_request({"name": "llm", "burst": 0}).burst == 1
    # The limits come back in the order the peer sent them.
    limits = {"limit_tokens": 1.0, "remaining_requests": 2.0, "reset_requests": 0.0}
    assert decode_request({"name": "x", "limits": limits}).limits == tuple(limits.items())
    assert decode_grant({}) == BudgetGrant()
    assert decode_grant({"slots": [-1, 2.5], "retry_after": 0}) == BudgetGrant(
        (-1.0, 2.5), retry_after=0.0
    )


NAN, INF = float("nan"), float("inf")

# (field, bad value, what the error says): every field, every way it can be wrong.
BAD_REQUEST: list[tuple[str, object, str]] = [
    ("name", 3, "field 'name' must be a string, got an integer"),
    ("name", None, "field 'name' must be a string, got nil"),
    ("rate", NAN, "field 'rate' must be a finite number >= 0, got nan"),
    ("rate", INF, "field 'rate' must be a finite number >= 0, got inf"),
    ("rate", -1, "field 'rate' must be a finite number >= 0, got -1"),
    ("rate", "1", "field 'rate' must be a finite number >= 0, got a string"),
    ("rate", True, "field 'rate' must be a finite number >= 0, got a boolean"),
    ("burst", -1, "field 'burst' must be >= 0, got -1"),
    ("burst", 2**32, f"field 'burst' is {2**32}, past the limit of {MAX_COUNT}"),
    ("burst", 1.0, "field 'burst' must be an integer, got a float"),
    ("max_concurrent", -2, "field 'max_concurrent' must be >= 0, got -2"),
    ("want", None, "field 'want' must be an integer, got nil"),
    ("want", 2**32, "field 'want' is 4294967296, past the limit"),
    ("wait", -0.5, "field 'wait' must be a finite number >= 0, got -0.5"),
    ("tokens", INF, "field 'tokens' must be a finite number >= 0, got inf"),
    ("lease", 1, "field 'lease' must be a boolean, got an integer"),
    ("lease", None, "field 'lease' must be a boolean, got nil"),
    ("release", 7, "field 'release' must be an array, got an integer"),
    ("release", [0], "release[0] must be >= 1, got 0"),
    ("release", [1, -1], "release[1] must be >= 1, got -1"),
    ("release", [2**63 + 1], f"release[0] is {2**63 + 1}, past the limit of {2**63}"),
    ("release", [1.0], "release[0] must be an integer, got a float"),
    ("done", True, "field 'done' must be an integer, got a boolean"),
    ("started", -1, "field 'started' must be >= 0, got -1"),
    ("tokens_back", NAN, "field 'tokens_back' must be a finite number >= 0, got nan"),
    ("limits", [], "field 'limits' must be a map, got an array of 0"),
    ("limits", None, "field 'limits' must be a map, got nil"),
    ("limits", {"remaining_bananas": 1}, "a key of field 'limits' is 'remaining_bananas', not"),
    ("limits", {b"reset_tokens": 1}, "a key of field 'limits' must be a string, got binary"),
    (
        "limits",
        {"reset_tokens": -1.0},
        "limits['reset_tokens'] must be a finite number >= 0, got -1.0",
    ),
    ("limits", {"limit_tokens": "9"}, "limits['limit_tokens'] must be a finite number >= 0, got"),
    ("ramp", 1, "field 'ramp' must be a boolean, got an integer"),
    ("generation", -1, "field 'generation' must be >= 0, got -1"),
    ("generation", 0.5, "field 'generation' must be an integer, got a float"),
]
BAD_GRANT: list[tuple[str, object, str]] = [
    ("slots", None, "field 'slots' must be an array, got nil"),
    ("slots", 1.0, "field 'slots' must be an array, got a float"),
    ("slots", [1.0, NAN], "slots[1] must be a finite number, got nan"),
    ("slots", [-INF], "slots[0] must be a finite number, got -inf"),
    ("slots", ["1"], "slots[0] must be a finite number, got a string"),
    ("lease", -1, "field 'lease' must be >= 0, got -1"),
    ("lease", 1.5, "field 'lease' must be an integer, got a float"),
    ("lease", True, "field 'lease' must be an integer, got a boolean"),
    ("reason", 3, "field 'reason' must be a string or nil, got an integer"),
    ("retry_after", NAN, "field 'retry_after' must be a finite number or nil, got nan"),
    ("retry_after", "1", "field 'retry_after' must be a finite number or nil, got a string"),
    ("ramp_at", INF, "field 'ramp_at' must be a finite number or nil, got inf"),
]


@pytest.mark.parametrize(("key", "value", "message"), BAD_REQUEST)
def test_every_bad_request_field_is_refused_by_name(key: str, value: object, message: str) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        decode_request({"name": "llm", key: value})
    assert str(caught.value).startswith(f"budget params: {message}")


@pytest.mark.parametrize(("key", "value", "message"), BAD_GRANT)
def test_every_bad_grant_field_is_refused_by_name(key: str, value: object, message: str) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        decode_grant({key: value})
    assert str(caught.value).startswith(f"budget_grant result: {message}")


def test_the_tables_cover_every_field() -> None:
    assert {k for k, _, _ in BAD_REQUEST} == {f.name for f in dataclasses.fields(BudgetRequest)}
    assert {k for k, _, _ in BAD_GRANT} == {f.name for f in dataclasses.fields(BudgetGrant)}


def test_a_request_without_a_name_is_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="budget params: missing required field 'name'"):
        decode_request({"rate": 1.0})


# --- the markers, on messages of their own ---------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Plus(BudgetRequest):
    """BudgetRequest and one more field: adding one is this line."""

    priority: Count = 0


def test_a_new_budget_field_is_one_line_and_costs_old_peers_nothing() -> None:
    codec = derive(Plus)
    base = BudgetRequest("llm", 2.0, limits=(("reset_tokens", 1.0),))
    plus = Plus("llm", 2.0, limits=(("reset_tokens", 1.0),))
    # At its default it adds nothing to the map...
    assert codec.encode(plus) == encode_request(1, base)[3]
    # ...otherwise it is sent, and read back; older peers ignore the key.
    wire_map = msgpack.unpackb(msgpack.packb(codec.encode(dataclasses.replace(plus, priority=3))))
    assert wire_map["priority"] == 3
    assert codec.decode(wire_map, "w") == dataclasses.replace(plus, priority=3)
    assert decode_request(wire_map) == base


@dataclasses.dataclass(frozen=True, slots=True)
class Marked:
    """One field per marker the budget messages brought."""

    at_least_one: Annotated[float, Finite(minimum=1.0)] = 1.0
    any_number: Annotated[float, Finite()] | None = None
    color: Annotated[str, OneOf(frozenset({"red", "blue"}))] = "red"
    sizes: tuple[tuple[Annotated[str, OneOf(frozenset({"s", "m"}))], int], ...] = dataclasses.field(
        default=(), metadata=wire(as_map=True)
    )
    zero_is_five: Count = dataclasses.field(default=5, metadata=wire(zero=True))
    ratio: NonNegativeFloat = dataclasses.field(default=0.0, metadata=ALWAYS)


def test_the_markers_accept_and_refuse_what_they_say() -> None:
    codec = derive(Marked)
    m = Marked(2.5, -3.0, "blue", (("m", 2), ("s", 1)), 7, 0.5)
    assert codec.encode(m) == {
        "at_least_one": 2.5,
        "any_number": -3.0,
        "color": "blue",
        "sizes": {"m": 2, "s": 1},
        "zero_is_five": 7,
        "ratio": 0.5,
    }
    assert codec.decode(codec.encode(m), "w") == m
    assert codec.decode({"zero_is_five": 0}, "w") == Marked()
    assert codec.decode({}, "w") == Marked()
    assert codec.encode(Marked()) == {"ratio": 0.0}
    refusals: list[tuple[dict[str, object], str]] = [
        ({"at_least_one": 0.5}, "w: field 'at_least_one' must be a finite number >= 1, got 0.5"),
        ({"any_number": INF}, "w: field 'any_number' must be a finite number or nil, got inf"),
        ({"color": "green"}, "w: field 'color' is 'green', not one of: blue, red"),
        ({"sizes": {"l": 1}}, "w: a key of field 'sizes' is 'l', not one of: m, s"),
        ({"sizes": {"s": "1"}}, "w: sizes['s'] must be an integer, got a string"),
        ({"zero_is_five": -1}, "w: field 'zero_is_five' must be >= 0, got -1"),
    ]
    for bad, message in refusals:
        with pytest.raises(RemoteProtocolError) as caught:
            codec.decode(bad, "w")
        assert str(caught.value) == message


def test_a_map_of_anything_but_pairs_fails_at_import() -> None:
    @dataclasses.dataclass(frozen=True)
    class NotPairs:
        items: tuple[int, ...] = dataclasses.field(default=(), metadata=wire(as_map=True))

    with pytest.raises(TypeError, match=r"NotPairs.items: as_map needs a tuple\[tuple\[K, V\]"):
        derive(NotPairs)


def test_encoding_trusts_its_input_and_sends_every_budget_field() -> None:
    # Every field at its default is on the wire (the budget messages always
    # were), but the recovery ramp's: added later, they go only when set, so
    # a request without them is what an older daemon reads.
    later = {"ramp", "generation", "ramp_at"}
    assert list(encode_request(1, BudgetRequest("llm"))[3]) == [
        f.name for f in dataclasses.fields(BudgetRequest) if f.name not in later
    ]
    assert list(encode_response(1, BudgetGrant())[3]) == [
        "type",
        *(f.name for f in dataclasses.fields(BudgetGrant) if f.name not in later),
    ]
    assert {"ramp", "generation"} <= set(
        encode_request(1, BudgetRequest("llm", ramp=True, generation=3))[3]
    )
    assert "ramp_at" in encode_response(1, BudgetGrant(ramp_at=1.0))[3]
