"""An in-process fake prove-graph backend, and a TCP proxy to break the path to it.

The backend speaks the thin-worker protocol (see PROTOCOL.md) as plain JSON
over trio-websocket. It deliberately does not import pgw: a test oracle that
shared pgw's encoder or its constants would share its bugs too.

Theory of operation
-------------------
`open_backend()` listens on 127.0.0.1, port 0. Every TCP connection gets its
own nursery holding trio-websocket's reader task and ours:

```
open_backend                 nursery; Backend.aclose() on exit
└─ _run                      cancel scope covering everything below
   ├─ accept loop            own cancel scope, so listening stops first
   └─ one TCP connection     _PausableStream around the socket
      ├─ trio-websocket      reader task (wrap_server_stream)
      ├─ _read_loop          the only get_message() caller: record, wake waiters
      └─ pong senders        one short task per answered ping
```

Each connection is served with trio-websocket's public `wrap_server_stream`
(the per-connection half of `serve_websocket`), because only then does the
backend hold the TCP stream itself: `abort()` needs it to send a reset and
`pause_reading()` needs it to stop reading, and `WebSocketConnection` keeps
its stream private.

With `deflate=` (wsproto's PerMessageDeflate arguments, `{}` for its
defaults) the backend accepts permessage-deflate (RFC 7692) when the worker
offers it: wsproto then inflates what the worker sends and deflates what the
backend sends. trio-websocket's `accept()` has no parameter for extensions,
so that one accept sends wsproto's AcceptConnection itself, as `accept()`
does, through trio-websocket's private `_send` and `_open_handshake`; the
worker's offer is read from the private `_event` (wsproto takes the header
out of the public `headers`).

Every message is read as soon as it arrives and recorded in
`BackendConnection.received`, so trio-websocket's queue never fills (it is
unbounded as well). Waiting helpers park on a `trio.lowlevel.ParkingLot` that
is woken on every arrival and on close: no polling.

`open_proxy()` is a TCP relay to put between the worker and the backend. It
can black-hole the path (`go_silent`), slow it down (`throttle`) or cut it
with a reset (`reset_all`).
"""

from __future__ import annotations

import functools
import json
import math
import socket
import struct
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, wrap_server_stream
from wsproto.events import AcceptConnection
from wsproto.extensions import PerMessageDeflate

T = TypeVar("T")

##############################################################################
# Constants
##############################################################################

# PROTOCOL.md, "The connection": the one path the worker connects to.
CONNECT_PATH = "/api/local-worker/connect"

# PROTOCOL.md: a stage.request carries up to ~67 MiB of base64, so both ends
# accept 128 MiB. trio-websocket's default is 1 MiB.
MAX_MESSAGE_BYTES = 128 * 2**20

# A client that opens TCP but never sends its HTTP upgrade (say, through a
# silent proxy) is dropped after this long. trio-websocket's default is 60 s,
# longer than any test here.
HANDSHAKE_TIMEOUT_S = 10.0

# How long close() waits for the worker's answering close frame before it
# drops the TCP connection instead. A healthy worker answers in milliseconds.
CLOSE_TIMEOUT_S = 2.0

# After rejecting a handshake, the backend waits up to this long for the
# client to hang up before closing. Closing at once, with the client's
# bytes still unread, could turn the close into a reset that destroys the
# HTTP answer before the client reads it.
REJECT_LINGER_S = 1.0

# The proxy reads at most this much at a time (trio's own default).
PROXY_READ_BYTES = 65536

# Throttled data is read and written in slices worth this much time, so the
# rate holds at the scale of a few tens of milliseconds, not just on average.
THROTTLE_SLICE_S = 0.02

PONG_TEXT = json.dumps({"type": "pong"})


##############################################################################
# Errors
##############################################################################


class BackendError(Exception):
    """Something a test waited for can no longer happen."""


class ConnectionGone(BackendError):
    """The connection closed before a message the test waits for arrived."""


class BackendClosed(BackendError):
    """The backend stopped before a connection the test waits for came."""


##############################################################################
# Helpers shared by the backend and the proxy
##############################################################################


def connect_url(server_url: str, token: str) -> str:
    """The WebSocket URL a worker paired with `server_url` opens (PROTOCOL.md).

    Written out here rather than taken from pgw, so that pgw's version is
    checked against an independent one.
    """
    parts = urllib.parse.urlsplit(server_url.rstrip("/"))
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    query = urllib.parse.urlencode({"token": token})
    return f"{scheme}://{parts.netloc}{parts.path}{CONNECT_PATH}?{query}"


def _reset(stream: trio.SocketStream) -> None:
    """Close `stream` with a TCP reset (RST) rather than an orderly FIN.

    With SO_LINGER on and a zero timeout, close() discards unsent data and
    sends a reset. Tasks blocked on the socket wake with ClosedResourceError.
    """
    try:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass  # already closed
    stream.socket.close()


class _PausableStream(trio.abc.Stream):
    """A socket stream whose reading can be paused, and which can be reset.

    While paused, `receive_some` waits before touching the socket, so the
    kernel's buffers fill and the peer's sends block: real backpressure. A
    read that was already waiting on the socket when `pause()` was called
    still completes (at most one chunk).
    """

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner
        self._may_read = trio.Event()
        self._may_read.set()

    @property
    def paused(self) -> bool:
        return not self._may_read.is_set()

    def pause(self) -> None:
        if self._may_read.is_set():
            self._may_read = trio.Event()

    def resume(self) -> None:
        self._may_read.set()

    def reset(self) -> None:
        self.resume()  # a reader parked on the pause must see the close
        _reset(self.inner)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await self._may_read.wait()
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        self.resume()
        await self.inner.aclose()


##############################################################################
# The backend
##############################################################################


def _parse(message: str | bytes) -> dict:
    """One received message as recorded: the JSON object, or its raw form."""
    if isinstance(message, bytes):
        return {"_binary": message}
    try:
        value = json.loads(message)
    except ValueError:
        return {"_raw": message}
    return value if isinstance(value, dict) else {"_raw": message}


def _types(messages: list[dict]) -> list[object]:
    return [m.get("type", "?") for m in messages]


@attrs.frozen
class StageResult:
    """What the worker sent about one stage, up to and including its stage.exit."""

    ack: dict | None
    frames: list[dict]  # stage.stdout and stage.stderr, in arrival order
    exit: dict

    @property
    def stdout(self) -> str:
        return "".join(f["data"] for f in self.frames if f.get("type") == "stage.stdout")

    @property
    def stderr(self) -> str:
        return "".join(f["data"] for f in self.frames if f.get("type") == "stage.stderr")

    @property
    def seqs(self) -> list[int]:
        return [f["seq"] for f in self.frames]

    @property
    def returncode(self) -> int:
        return self.exit["returncode"]

    @property
    def error(self) -> str | None:
        return self.exit.get("error")


class BackendConnection:
    """One accepted worker connection, seen from the backend.

    `received` holds every message in arrival order: the parsed JSON object,
    `{"_raw": text}` for text that is not a JSON object, `{"_binary": data}`
    for a binary message. `close_code` is the code of the close frame that
    ended the connection (the backend's own from `close()`, or the worker's),
    1006 when the TCP connection ended without one. `offered_extensions` is
    the worker's Sec-WebSocket-Extensions header (None without one);
    `deflate` the permessage-deflate in use, None when not negotiated.
    """

    def __init__(
        self,
        ws: WebSocketConnection,
        stream: _PausableStream,
        nursery: trio.Nursery,
        *,
        path: str,
        answer_pings: bool,
        close_timeout_s: float,
        offered_extensions: str | None = None,
        deflate: PerMessageDeflate | None = None,
    ) -> None:
        self.path = path
        self.offered_extensions = offered_extensions
        self.deflate = deflate
        self.answer_pings = answer_pings
        self.received: list[dict] = []
        self.closed = trio.Event()
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self._ws = ws
        self._stream = stream
        self._nursery = nursery
        self._close_timeout_s = close_timeout_s
        self._consumed: set[int] = set()
        self._first_unconsumed = 0
        self._arrivals = trio.lowlevel.ParkingLot()

    def __repr__(self) -> str:
        state = f"closed {self.close_code}" if self.closed.is_set() else "open"
        return f"<BackendConnection {state}, received {_types(self.received)}>"

    # sending ----------------------------------------------------------------

    async def send(self, message: dict | str | bytes) -> None:
        """Send a dict as JSON text; a str (or bytes) exactly as given.

        As with any trio-websocket send, do not cancel it mid-way: a frame
        cut short leaves the stream corrupt.
        """
        if isinstance(message, dict):
            message = json.dumps(message, ensure_ascii=False)
        await self._ws.send_message(message)

    async def send_raw(self, data: bytes) -> None:
        """Write `data` to the TCP stream as it is, beside trio-websocket: a
        frame it would not make. Under trio-websocket's private `_stream_lock`,
        which its own writes (a close frame answering the worker's) take."""
        try:
            async with self._ws._stream_lock:
                await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the worker hung up: closed (and close_code) say how

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close from the backend's side with `code`, and wait until closed.

        If the worker does not answer the close frame within the close
        timeout, the TCP connection is reset instead.
        """
        self._mark_closed(code, reason or None)
        self.resume_reading()  # the worker's close frame must be read
        with trio.move_on_after(self._close_timeout_s):
            await self._ws.aclose(code, reason or None)
        if not self.closed.is_set():
            self._stream.reset()
        await self.closed.wait()

    async def abort(self) -> None:
        """Drop the TCP connection with a reset and no close frame."""
        self._mark_closed(1006, "aborted by the backend")
        self._stream.reset()
        await self.closed.wait()

    async def ws_ping(self) -> None:
        """Send a WebSocket ping and wait for the worker's pong."""
        await self._ws.ping()

    # backpressure -----------------------------------------------------------

    def pause_reading(self) -> None:
        """Stop reading from the socket until `resume_reading()`.

        The worker's sends then block once the kernel's buffers are full
        (several MiB on loopback). While paused the backend also answers
        nothing: no pongs, no WebSocket pongs, no close frames.
        """
        self._stream.pause()

    def resume_reading(self) -> None:
        self._stream.resume()

    # waiting ----------------------------------------------------------------

    async def receive(
        self,
        type_: str | set[str] | frozenset[str] | None = None,
        stage_run_id: str | None = None,
    ) -> dict:
        """The earliest message not yet returned by `receive` that matches.

        Messages that do not match are passed over for this call only: they
        stay in `received` and a later `receive` with another filter can
        return them. Raises ConnectionGone if the connection closes first.
        """
        types = {type_} if isinstance(type_, str) else type_

        def matches(message: dict) -> bool:
            if types is not None and message.get("type") not in types:
                return False
            return stage_run_id is None or message.get("stage_run_id") == stage_run_id

        def find() -> dict | None:
            for index in range(self._first_unconsumed, len(self.received)):
                if index not in self._consumed and matches(self.received[index]):
                    self._consumed.add(index)
                    while self._first_unconsumed in self._consumed:
                        self._first_unconsumed += 1
                    return self.received[index]
            return None

        wanted = f"type {type_!r}" if type_ is not None else "any message"
        if stage_run_id is not None:
            wanted += f" for stage {stage_run_id!r}"
        return await self._wait_for(find, wanted)

    async def stage_result(self, stage_run_id: str) -> StageResult:
        """Wait for the stage's stage.exit; return its ack, output frames and exit.

        Reads `received` directly and does not affect `receive`.
        """

        def find() -> StageResult | None:
            ours = [m for m in self.received if m.get("stage_run_id") == stage_run_id]
            exits = [m for m in ours if m.get("type") == "stage.exit"]
            if not exits:
                return None
            acks = [m for m in ours if m.get("type") == "stage.ack"]
            frames = [m for m in ours if m.get("type") in ("stage.stdout", "stage.stderr")]
            return StageResult(ack=acks[0] if acks else None, frames=frames, exit=exits[0])

        return await self._wait_for(find, f"stage.exit for stage {stage_run_id!r}")

    async def _wait_for(self, find: Callable[[], T | None], wanted: str) -> T:
        await trio.lowlevel.checkpoint()
        while True:
            found = find()
            if found is not None:
                return found
            if self.closed.is_set():
                raise ConnectionGone(
                    f"connection closed (code {self.close_code}, {self.close_reason!r}) "
                    f"before {wanted} arrived; received {_types(self.received)}"
                )
            await self._arrivals.park()

    # the reader -------------------------------------------------------------

    def _mark_closed(self, code: int, reason: str | None) -> None:
        """Record why the connection ended; the first explanation wins."""
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason

    async def _read_loop(self) -> None:
        try:
            while True:
                try:
                    message = await self._ws.get_message()
                except ConnectionClosed as closed:
                    reason = closed.reason
                    if reason is None:
                        self._mark_closed(1006, None)
                    else:
                        self._mark_closed(reason.code, reason.reason)
                    return
                parsed = _parse(message)
                self.received.append(parsed)
                self._arrivals.unpark_all()
                if self.answer_pings and parsed.get("type") == "ping":
                    self._nursery.start_soon(self._send_pong)
        finally:
            self._mark_closed(1006, "backend stopped")
            self.closed.set()
            self._arrivals.unpark_all()

    async def _send_pong(self) -> None:
        try:
            await self._ws.send_message(PONG_TEXT)
        except ConnectionClosed:
            pass


class Backend:
    """A fake prove-graph backend. Make one with `open_backend()`.

    A handshake is accepted when its path is CONNECT_PATH (under `prefix`) and its `token`
    query parameter equals `token`; otherwise it is rejected with 404 (wrong
    path) or 403 (wrong or missing token). `reject_next()` scripts rejections
    that take precedence. `handshakes` records every request target seen,
    rejected ones included; `connections` the accepted ones, in order.
    """

    def __init__(
        self,
        token: str = "tok-test",
        *,
        answer_pings: bool = True,
        max_message_size: int = MAX_MESSAGE_BYTES,
        handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
        close_timeout_s: float = CLOSE_TIMEOUT_S,
        deflate: dict | None = None,
        prefix: str = "",
    ) -> None:
        self.token = token
        self.prefix = prefix  # the path a reverse proxy would serve the backend under
        self.answer_pings = answer_pings
        self._deflate = deflate
        self.port = 0
        self.connections: list[BackendConnection] = []
        self.handshakes: list[str] = []
        self._max_message_size = max_message_size
        self._handshake_timeout_s = handshake_timeout_s
        self._close_timeout_s = close_timeout_s
        self._scripted_rejections: deque[int] = deque()
        self._handed_out = 0
        self._arrivals = trio.lowlevel.ParkingLot()
        self._everything = trio.CancelScope()
        self._listening = trio.CancelScope()
        self._closing = False

    @property
    def url(self) -> str:
        """The server URL as a worker stores it when paired."""
        return f"http://127.0.0.1:{self.port}{self.prefix}"

    def __repr__(self) -> str:
        return f"<Backend {self.url}, {len(self.connections)} connections>"

    def reject_next(self, status: int, count: int = 1) -> None:
        """Reject the next `count` handshakes with HTTP `status`, whatever their token."""
        self._scripted_rejections.extend([status] * count)

    async def next_connection(self) -> BackendConnection:
        """The next accepted connection that this method has not returned yet."""
        await trio.lowlevel.checkpoint()
        while self._handed_out >= len(self.connections):
            if self._closing:
                raise BackendClosed(f"backend closed; handshakes seen: {self.handshakes}")
            await self._arrivals.park()
        self._handed_out += 1
        return self.connections[self._handed_out - 1]

    async def aclose(self) -> None:
        """Stop listening, close every open connection with 1001, stop."""
        if self._closing:
            return
        self._closing = True
        self._arrivals.unpark_all()
        self._listening.cancel()
        try:
            async with trio.open_nursery() as nursery:
                for connection in self.connections:
                    if not connection.closed.is_set():
                        nursery.start_soon(connection.close, 1001, "backend shutting down")
        finally:
            self._everything.cancel()

    # serving ----------------------------------------------------------------

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self._everything:
            async with trio.open_nursery() as handlers:
                [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
                self.port = listener.socket.getsockname()[1]
                handlers.start_soon(self._accept_loop, listener, handlers)
                task_status.started()

    async def _accept_loop(self, listener: trio.SocketListener, handlers: trio.Nursery) -> None:
        with self._listening:
            # serve_listeners closes the listener when cancelled.
            await trio.serve_listeners(self._serve_connection, [listener], handler_nursery=handlers)

    def _verdict(self, target: str) -> tuple[int, bytes] | None:
        """The (status, body) to reject this handshake with, or None to accept."""
        if self._scripted_rejections:
            status = self._scripted_rejections.popleft()
            return status, json.dumps({"detail": f"scripted rejection {status}"}).encode()
        parts = urllib.parse.urlsplit(target)
        if parts.path != self.prefix + CONNECT_PATH:
            return 404, json.dumps({"detail": "Not Found"}).encode()
        tokens = urllib.parse.parse_qs(parts.query).get("token", [])
        if tokens != [self.token]:
            return 403, json.dumps({"detail": "invalid worker token"}).encode()
        return None

    async def _serve_connection(self, tcp_stream: trio.SocketStream) -> None:
        stream = _PausableStream(tcp_stream)
        try:
            async with trio.open_nursery() as nursery:
                request = None
                with trio.move_on_after(self._handshake_timeout_s):
                    request = await wrap_server_stream(
                        nursery,
                        stream,
                        # Unbounded: our reader takes every message at once anyway,
                        # but a full queue would stall trio-websocket's reader.
                        message_queue_size=math.inf,  # type: ignore[arg-type]
                        max_message_size=self._max_message_size,
                        # None lets trio pick (64 KiB), several times faster than 4 KiB.
                        receive_buffer_size=None,
                    )
                if request is None:
                    nursery.cancel_scope.cancel()
                    return
                self.handshakes.append(request.path)
                verdict = self._verdict(request.path)
                if verdict is not None:
                    status, body = verdict
                    await request.reject(status, body=body)
                    # trio-websocket's reader ends when the client hangs up.
                    nursery.cancel_scope.deadline = trio.current_time() + REJECT_LINGER_S
                    return
                ws, deflate = await self._accept(request)
                offered = request._event.extensions  # wsproto takes this header out of `headers`
                connection = BackendConnection(
                    ws,
                    stream,
                    nursery,
                    path=request.path,
                    answer_pings=self.answer_pings,
                    close_timeout_s=self._close_timeout_s,
                    offered_extensions=", ".join(offered) if offered else None,
                    deflate=deflate,
                )
                self.connections.append(connection)
                self._arrivals.unpark_all()
                await connection._read_loop()
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()


    async def _accept(self, request: WebSocketRequest) -> tuple[WebSocketConnection, PerMessageDeflate | None]:
        """`request.accept()`, with permessage-deflate when the backend has `deflate` and the worker offers it."""
        if self._deflate is None:
            return await request.accept(), None
        extension = PerMessageDeflate(**self._deflate)
        ws = request._connection
        await ws._send(AcceptConnection(extensions=[extension]))
        ws._open_handshake.set()
        return ws, extension if extension.enabled() else None


@asynccontextmanager
async def open_backend(token: str = "tok-test", **kw: object) -> AsyncIterator[Backend]:
    """Run a Backend on 127.0.0.1 (port 0) for the duration of the block.

    Keyword arguments go to `Backend` (answer_pings, max_message_size,
    handshake_timeout_s, close_timeout_s, deflate).
    """
    backend = Backend(token, **kw)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(backend._run)
        try:
            yield backend
        finally:
            await backend.aclose()


##############################################################################
# The proxy
##############################################################################


class ProxyConnection:
    """One relayed TCP connection: `client` is the worker's side, `server` the backend's."""

    def __init__(self, proxy: Proxy, client: trio.SocketStream, *, silent: bool) -> None:
        self.client = client
        self.server: trio.SocketStream | None = None
        self.bytes_up = 0  # worker -> backend, delivered
        self.bytes_down = 0  # backend -> worker, delivered
        self.closed = trio.Event()
        self._proxy = proxy
        self._audible = trio.Event()
        if not silent:
            self._audible.set()
        self._was_reset = False
        self._next_slot = {"up": 0.0, "down": 0.0}  # throttle: earliest next send

    def go_silent(self) -> None:
        if self._audible.is_set() and not self._was_reset:
            self._audible = trio.Event()

    def resume(self) -> None:
        self._audible.set()

    def reset(self) -> None:
        """Reset both sides (RST), as a middlebox dropping the flow would."""
        self._was_reset = True
        self._audible.set()  # wake pumps parked on the silence so they see the close
        _reset(self.client)
        if self.server is not None:
            _reset(self.server)

    async def _wait_audible(self) -> None:
        while not self._audible.is_set():
            await self._audible.wait()

    def _read_size(self) -> int:
        rate = self._proxy.rate
        if rate is None:
            return PROXY_READ_BYTES
        # Read no more than one slice, so that the excess waits in the
        # sender's kernel buffers, as it would behind a slow link.
        return max(1, min(PROXY_READ_BYTES, int(rate * THROTTLE_SLICE_S)))

    async def _deliver(self, sink: trio.SocketStream, data: bytes, direction: str) -> None:
        view = memoryview(data)
        while view:
            await self._wait_audible()
            rate = self._proxy.rate
            if rate is None:
                piece, view = view, view[len(view) :]
            else:
                size = max(1, int(rate * THROTTLE_SLICE_S))
                piece, view = view[:size], view[size:]
                start = max(trio.current_time(), self._next_slot[direction])
                await trio.sleep_until(start)
                self._next_slot[direction] = start + len(piece) / rate
            await sink.send_all(piece)
            if direction == "up":
                self.bytes_up += len(piece)
            else:
                self.bytes_down += len(piece)

    async def _pump(self, source: trio.SocketStream, sink: trio.SocketStream, direction: str) -> None:
        try:
            while True:
                await self._wait_audible()
                data = await source.receive_some(self._read_size())
                if not data:
                    await self._wait_audible()  # a black hole swallows the FIN too
                    await sink.send_eof()
                    return
                await self._deliver(sink, data, direction)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # One side broke or was reset: break the other side the same way.
            self.reset()


class Proxy:
    """A TCP relay on 127.0.0.1 (port 0) to a target port, for breaking the path.

    - `go_silent()`: stop forwarding both ways without closing anything, as
      a black-holed route does. Bytes already read are held and delivered on
      `resume()`, like TCP retransmissions after the route comes back; the
      rest wait in kernel buffers, so senders eventually block. With
      `new_connections=True` (the default) connections made while silent are
      silent too: their TCP connect succeeds (the kernel completes it), but
      no byte passes, so a WebSocket handshake times out. With False, only
      the connections open now go silent: a reconnect gets through.
    - `throttle(bytes_per_s)`: limit each direction of each connection to
      that rate; None removes the limit.
    - `reset_all()`: reset (RST) every open connection, on both sides.
    """

    def __init__(self, target_port: int, *, target_host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self.rate: float | None = None
        self.connections: list[ProxyConnection] = []
        self._silence_new = False
        self._everything = trio.CancelScope()

    @property
    def url(self) -> str:
        """The server URL to give the worker so that it goes through the proxy."""
        return f"http://127.0.0.1:{self.port}"

    def __repr__(self) -> str:
        return f"<Proxy :{self.port} -> {self.target_host}:{self.target_port}>"

    def go_silent(self, *, new_connections: bool = True) -> None:
        self._silence_new = new_connections
        for connection in self.connections:
            connection.go_silent()

    def resume(self) -> None:
        self._silence_new = False
        for connection in self.connections:
            connection.resume()

    def throttle(self, bytes_per_s: float | None) -> None:
        if bytes_per_s is not None and bytes_per_s <= 0:
            raise ValueError(f"bytes_per_s must be positive or None, not {bytes_per_s!r}")
        self.rate = bytes_per_s

    def reset_all(self) -> None:
        for connection in self.connections:
            if not connection.closed.is_set():
                connection.reset()

    async def aclose(self) -> None:
        self._everything.cancel()
        await trio.lowlevel.checkpoint()

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self._everything:
            async with trio.open_nursery() as nursery:
                serve = functools.partial(trio.serve_tcp, self._relay, 0, host="127.0.0.1")
                [listener] = await nursery.start(serve)
                self.port = listener.socket.getsockname()[1]
                task_status.started()

    async def _relay(self, client: trio.SocketStream) -> None:
        connection = ProxyConnection(self, client, silent=self._silence_new)
        self.connections.append(connection)
        try:
            try:
                connection.server = await trio.open_tcp_stream(self.target_host, self.target_port)
            except OSError:
                _reset(client)  # the target refused: so does the proxy
                return
            async with trio.open_nursery() as nursery:
                nursery.start_soon(connection._pump, client, connection.server, "up")
                nursery.start_soon(connection._pump, connection.server, client, "down")
        finally:
            with trio.CancelScope(shield=True):
                await client.aclose()
                if connection.server is not None:
                    await connection.server.aclose()
            connection.closed.set()


@asynccontextmanager
async def open_proxy(target_port: int, *, target_host: str = "127.0.0.1") -> AsyncIterator[Proxy]:
    """Run a Proxy to target_port for the duration of the block."""
    proxy = Proxy(target_port, target_host=target_host)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy._run)
        try:
            yield proxy
        finally:
            await proxy.aclose()
