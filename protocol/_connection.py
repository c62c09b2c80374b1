"""One end of a breakerd socket connection, sans-IO in the style of h11.

No sockets, no clock, no threads: bytes in, events out; messages in, bytes
out. The transport owns the socket and does this::

    conn = Connection("server")
    conn.receive_data(data)                     # b"" when the peer closed
    while (event := conn.next_event()) is not NEED_DATA:
        ...                                     # RequestReceived, ...
    sock.sendall(conn.send_response(msgid, result))

Rules
-----

Framing
    Every message is a frame: a 4-byte big-endian unsigned length, then
    exactly that many bytes holding exactly one msgpack value (shapes in
    ``_codec``). A frame longer than ``max_frame_size`` is refused as soon as
    its header is in, without waiting for (or buffering) the rest of its body;
    an empty frame is refused.

Roles
    Only the client sends requests and ``reports`` notifications; only the
    server sends responses and ``state`` notifications.

Handshake
    The client's first request is ``hello``; the server refuses anything else
    first and a second ``hello`` later. The server answers with a ``Welcome``
    carrying the version ``negotiate_version`` picked (which must lie in the
    range the client offered), or with ``VersionMismatchError``. The client
    may pipeline requests behind its ``hello``; the server sends no ``state``
    push before its ``Welcome``. ``Connection.version`` is set once the
    ``Welcome`` has been sent or received.

Errors
    Received bytes that break a rule raise ``RemoteProtocolError`` from
    ``next_event``; a call on this side that would break one raises
    ``LocalProtocolError``. Either way the connection is then dead: every
    later call raises ``ProtocolError`` and the transport must close the
    socket (the frame boundary is lost, and msgpack's ``Unpacker`` must not
    be reused after a decode error). Only a non-message argument
    (``TypeError``) or a msgid out of range (``ValueError``), which mypy or
    the caller's own logic should have caught, leaves the connection as it was.

After every ``receive_data``, call ``next_event`` until it returns
``NEED_DATA``: that is what keeps the buffer down to one frame and one read.
msgids are the client core's business: the connection neither allocates nor
tracks them.
"""

from __future__ import annotations

import struct
from enum import Enum
from typing import Any, Final, Literal, NoReturn, TypeAlias

import msgpack

from ._codec import (
    MAX_FRAME_SIZE,
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    REQUEST,
    RESPONSE,
    ConnectionClosed,
    Event,
    NotificationMessage,
    NotificationReceived,
    RequestMessage,
    RequestReceived,
    ResponseReceived,
    ResultMessage,
    decode_message,
    encode_error,
    encode_notification,
    encode_request,
    encode_response,
    method_of,
)
from ._errors import (
    BreakerError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    VersionMismatchError,
)
from ._messages import Hello, ReportBatch, StatePush, TransitionEvent, Welcome

Role: TypeAlias = Literal["client", "server"]

_HEADER: Final = struct.Struct(">I")
_HEADER_SIZE: Final = 4
_MAX_FRAME_LIMIT: Final = 0xFFFF_FFFF  # what a 4-byte length can say


def frame_notification(message: NotificationMessage) -> bytes:
    """One framed notification, encoded once for many connections.

    For a server pushing the same state to every subscriber: the bytes are
    what ``Connection.send_notification`` would return on each of them, minus
    its checks, so only send them on connections past their handshake.
    """
    body = msgpack.packb(encode_notification(message), use_bin_type=True, datetime=False)
    if len(body) > MAX_FRAME_SIZE:
        raise LocalProtocolError(
            f"the notification takes {len(body)} bytes, over the frame limit of {MAX_FRAME_SIZE}"
        )
    return _HEADER.pack(len(body)) + body


class NeedData(Enum):
    """The type of ``NEED_DATA``."""

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


#: ``next_event()`` has no complete frame yet: feed more with ``receive_data()``.
NEED_DATA: Final = NeedData.NEED_DATA

_CLOSED: Final = ConnectionClosed()


def negotiate_version(
    hello: Hello,
    *,
    min_version: int = MIN_PROTOCOL_VERSION,
    max_version: int = PROTOCOL_VERSION,
) -> int:
    """The highest protocol version both the client (``hello``) and this side speak.

    Raises ``VersionMismatchError``, which the server sends back as the
    answer to ``hello``, when the two ranges do not meet.
    """
    low = max(hello.min_version, min_version)
    high = min(hello.max_version, max_version)
    if hello.min_version > hello.max_version or low > high:
        raise VersionMismatchError(
            f"no common protocol version: client {hello.client!r} (pid {hello.pid}) speaks "
            f"versions {hello.min_version} to {hello.max_version}, this side speaks "
            f"{min_version} to {max_version}; upgrade the older side"
        )
    return high


def _describe(obj: list[Any]) -> str:
    """Name an outgoing message in an error (never on the fast path)."""
    if obj[0] == REQUEST:
        return f"{obj[2]!r} request"
    if obj[0] == RESPONSE:
        return "response" if obj[2] is None else "error response"
    return f"{obj[1]!r} notification"


def _new_unpacker(max_frame_size: int) -> msgpack.Unpacker:
    """A streaming decoder for one run of received bytes, bounded by ``max_frame_size``."""
    return msgpack.Unpacker(
        raw=False,
        strict_map_key=True,
        use_list=True,
        # 0 means no cap on unread bytes: one read may hold many frames, and
        # each frame is already bounded by the header check.
        max_buffer_size=0,
        # Start small and grow on demand: most reads hold a few small frames.
        read_size=4096,
        # These bound what one small frame can make msgpack allocate: five
        # bytes can announce an array of four billion entries.
        max_str_len=max_frame_size,
        max_bin_len=max_frame_size,
        max_array_len=max_frame_size,
        max_map_len=max_frame_size // 2,
        # No extension types on this wire (timestamps included).
        max_ext_len=0,
    )


class Connection:
    """One end of a breakerd connection: ``role`` is ``"client"`` or ``"server"``."""

    __slots__ = (
        "_avail",
        "_eof",
        "_error",
        "_error_raised",
        "_frame_len",
        "_greeted",
        "_offered",
        "_packer",
        "_server",
        "_unpacker",
        "max_frame_size",
        "role",
        "version",
    )

    def __init__(self, role: Role, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        if role != "client" and role != "server":
            raise ValueError(f"role must be 'client' or 'server', not {role!r}")
        if not 1 <= max_frame_size <= _MAX_FRAME_LIMIT:
            raise ValueError(
                f"max_frame_size must be in 1..{_MAX_FRAME_LIMIT}, not {max_frame_size}"
            )
        self.role: Role = role
        #: Largest frame body this end accepts and sends, in bytes.
        self.max_frame_size = max_frame_size
        #: The negotiated protocol version, once the Welcome is sent or received.
        self.version: int | None = None
        self._server = role == "server"
        self._packer = msgpack.Packer(use_bin_type=True, datetime=False)
        # Made when bytes arrive and dropped once every byte is consumed: an
        # Unpacker costs ~44 KiB (its decoding stack is inside it), and a
        # daemon with 1,000 mostly idle connections would hold 44 MiB of them.
        self._unpacker: msgpack.Unpacker | None = None
        self._avail = 0  # bytes fed to the unpacker and not consumed yet
        self._frame_len = -1  # body length of the current frame, -1 before its header
        self._eof = False
        self._greeted = False  # hello sent (client) or received (server)
        self._offered: tuple[int, int] | None = None  # the hello's version range
        self._error: ProtocolError | None = None
        self._error_raised = False

    def __repr__(self) -> str:
        state = "dead" if self._error is not None else "closed" if self._eof else "open"
        return f"<Connection {self.role} {state} version={self.version}>"

    # --- receiving -------------------------------------------------------

    def receive_data(self, data: bytes | bytearray) -> None:
        """Add bytes read from the socket; ``b""`` means the peer closed its side.

        Never raises for what the bytes say (``next_event`` does that), only
        when the connection is already dead or bytes follow the EOF.
        """
        if self._error is not None:
            self._raise_dead()
        if not data:
            self._eof = True
            return
        if self._eof:
            self._fail(LocalProtocolError("receive_data() got bytes after the EOF (b'')"))
        unpacker = self._unpacker
        if unpacker is None:
            unpacker = self._unpacker = _new_unpacker(self.max_frame_size)
        try:
            unpacker.feed(data)
        except Exception as exc:  # BufferFull: 2 GiB unread
            self._fail(
                LocalProtocolError(
                    f"cannot buffer more received bytes ({exc!r}): call next_event() "
                    "until NEED_DATA after each receive_data()"
                ),
                exc,
            )
        self._avail += len(data)
        if self._frame_len < 0 and self._avail >= _HEADER_SIZE:
            # Judge the header now rather than at next_event(), so a huge
            # announced frame is refused before any more of it is buffered.
            try:
                self._read_header()
            except RemoteProtocolError as exc:
                self._error = exc

    def next_event(self) -> Event | NeedData:
        """The next event, or ``NEED_DATA`` when no complete frame is buffered.

        After a clean EOF it returns ``ConnectionClosed`` (every time).
        Raises ``ProtocolError`` when the received bytes break the protocol.
        """
        if self._error is not None:
            self._raise_dead()
        n = self._frame_len
        if n < 0:
            if self._avail < _HEADER_SIZE:
                if not self._eof:
                    return NEED_DATA
                if self._avail == 0:
                    return _CLOSED
                self._fail(
                    RemoteProtocolError(
                        f"connection closed inside a frame header ({self._avail} of 4 bytes)"
                    )
                )
            try:
                n = self._read_header()
            except RemoteProtocolError as exc:
                self._fail(exc)
        if self._avail < n:
            if not self._eof:
                return NEED_DATA
            self._fail(
                RemoteProtocolError(
                    f"connection closed inside a frame ({self._avail} of {n} bytes)"
                )
            )
        unpacker = self._unpacker
        assert unpacker is not None  # bytes are buffered
        start = unpacker.tell()
        try:
            obj = unpacker.unpack()
        except msgpack.OutOfData as exc:
            self._fail(
                RemoteProtocolError(f"frame of {n} bytes ends inside its msgpack value"), exc
            )
        except Exception as exc:  # FormatError, StackError, ValueError, RecursionError...
            self._fail(RemoteProtocolError(f"undecodable frame: {type(exc).__name__}: {exc}"), exc)
        used = unpacker.tell() - start
        if used != n:
            self._fail(
                RemoteProtocolError(
                    f"frame of {n} bytes does not hold exactly one msgpack value "
                    f"(its first value takes {used} bytes)"
                )
            )
        self._avail -= n
        self._frame_len = -1
        if not self._avail:
            self._unpacker = None
        try:
            event = decode_message(obj)
        except ProtocolError as exc:
            self._fail(exc)
        if self._server:
            self._check_from_client(event)
        else:
            self._check_from_server(event)
        return event

    def _read_header(self) -> int:
        n: int
        unpacker = self._unpacker
        assert unpacker is not None  # only called with a header's bytes buffered
        (n,) = _HEADER.unpack(unpacker.read_bytes(_HEADER_SIZE))
        self._avail -= _HEADER_SIZE
        if n > self.max_frame_size:
            raise RemoteProtocolError(
                f"peer announced a frame of {n} bytes; the limit is {self.max_frame_size}"
            )
        if n == 0:
            raise RemoteProtocolError("empty frame: a frame holds exactly one msgpack value")
        self._frame_len = n
        return n

    def _check_from_client(
        self, event: RequestReceived | ResponseReceived | NotificationReceived
    ) -> None:
        if isinstance(event, RequestReceived):
            message = event.message
            if not self._greeted:
                if not isinstance(message, Hello):
                    self._fail(
                        RemoteProtocolError(
                            f"the first request must be 'hello', got {method_of(message)!r}"
                        )
                    )
                self._greeted = True
                self._offered = (message.min_version, message.max_version)
            elif isinstance(message, Hello):
                self._fail(RemoteProtocolError("'hello' sent twice"))
        elif isinstance(event, NotificationReceived):
            if not isinstance(event.message, ReportBatch):
                self._fail(
                    RemoteProtocolError(
                        f"a client sent a {method_of(event.message)!r} notification"
                    )
                )
            if not self._greeted:
                self._fail(
                    RemoteProtocolError(
                        "the first message must be a 'hello' request, got a 'reports' notification"
                    )
                )
        else:
            self._fail(RemoteProtocolError(f"a client sent a response (msgid {event.msgid})"))

    def _check_from_server(
        self, event: RequestReceived | ResponseReceived | NotificationReceived
    ) -> None:
        if isinstance(event, ResponseReceived):
            if isinstance(event.result, Welcome):
                self._accept_welcome(event.result, RemoteProtocolError)
        elif isinstance(event, NotificationReceived):
            if not isinstance(event.message, (StatePush, TransitionEvent)):
                self._fail(RemoteProtocolError("a server sent a 'reports' notification"))
        else:
            self._fail(RemoteProtocolError(f"a server sent a {method_of(event.message)!r} request"))

    def _accept_welcome(
        self, welcome: Welcome, error: type[LocalProtocolError | RemoteProtocolError]
    ) -> None:
        # `error` says whose fault a bad Welcome is: the peer's when received,
        # ours when about to be sent.
        offered = self._offered
        if offered is None:
            self._fail(error("a Welcome before any 'hello'"))
        if self.version is not None:
            self._fail(error("a second Welcome"))
        if not offered[0] <= welcome.version <= offered[1]:
            self._fail(
                error(
                    f"Welcome chose protocol version {welcome.version}, outside the "
                    f"range {offered[0]} to {offered[1]} the 'hello' offered"
                )
            )
        self.version = welcome.version

    # --- sending ------------------------------------------------------------

    def send_request(self, msgid: int, message: RequestMessage) -> bytes:
        """Bytes for the request ``msgid`` (client only; the first must be a ``Hello``)."""
        if self._error is not None:
            self._raise_dead()
        obj = encode_request(msgid, message)
        if self._server:
            self._fail(LocalProtocolError("a server does not send requests"))
        if not self._greeted:
            if not isinstance(message, Hello):
                self._fail(LocalProtocolError(f"the first request must be 'hello', not {obj[2]!r}"))
            self._greeted = True
            self._offered = (message.min_version, message.max_version)
        elif isinstance(message, Hello):
            self._fail(LocalProtocolError("'hello' was already sent"))
        return self._frame(obj)

    def send_response(self, msgid: int, result: ResultMessage) -> bytes:
        """Bytes for the successful answer to request ``msgid`` (server only)."""
        if self._error is not None:
            self._raise_dead()
        obj = encode_response(msgid, result)
        if not self._server:
            self._fail(LocalProtocolError("a client does not send responses"))
        if isinstance(result, Welcome):
            self._accept_welcome(result, LocalProtocolError)
        return self._frame(obj)

    def send_error(self, msgid: int, error: BreakerError) -> bytes:
        """Bytes for the failed answer to request ``msgid`` (server only)."""
        if self._error is not None:
            self._raise_dead()
        obj = encode_error(msgid, error)
        if not self._server:
            self._fail(LocalProtocolError("a client does not send responses"))
        return self._frame(obj)

    def send_notification(self, message: NotificationMessage) -> bytes:
        """Bytes for a notification: ``ReportBatch`` from a client, ``StatePush`` or
        ``TransitionEvent`` from a server."""
        if self._error is not None:
            self._raise_dead()
        obj = encode_notification(message)
        if self._server:
            if not isinstance(message, (StatePush, TransitionEvent)):
                self._fail(LocalProtocolError("a server sends no 'reports' notifications"))
            if self.version is None:
                self._fail(LocalProtocolError("no 'state' push before the Welcome is sent"))
        else:
            if not isinstance(message, ReportBatch):
                self._fail(LocalProtocolError(f"a client sends no {obj[1]!r} notifications"))
            if not self._greeted:
                self._fail(LocalProtocolError("the first message must be a 'hello' request"))
        return self._frame(obj)

    def _frame(self, obj: list[Any]) -> bytes:
        try:
            body = self._packer.pack(obj)
        except Exception as exc:  # TypeError, OverflowError, UnicodeEncodeError...
            self._fail(LocalProtocolError(f"cannot encode the {_describe(obj)}: {exc}"), exc)
        n = len(body)
        if n > self.max_frame_size:
            self._fail(
                LocalProtocolError(
                    f"the {_describe(obj)} takes {n} bytes, over the frame limit "
                    f"of {self.max_frame_size}"
                )
            )
        return _HEADER.pack(n) + body

    # --- failure ------------------------------------------------------------

    def _fail(self, exc: ProtocolError, cause: BaseException | None = None) -> NoReturn:
        self._error = exc
        self._error_raised = True
        raise exc from cause

    def _raise_dead(self) -> NoReturn:
        exc = self._error
        assert exc is not None
        if not self._error_raised:
            # Found by receive_data() and not reported yet: report it as it was.
            self._error_raised = True
            raise exc
        raise LocalProtocolError(
            f"the connection is dead after a protocol error ({exc}); close it"
        ) from exc
