"""The fake backend and the proxy, checked with a plain trio-websocket client.

The worker's connection tests trust these helpers; these tests are why.
"""

from __future__ import annotations

import json

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from backend import CONNECT_PATH, ConnectionGone, connect_url, open_backend, open_proxy


def client(server_url: str, token: str = "tok-test", **kw):
    """A bare WebSocket client to the connect URL of `server_url`, quick to give up."""
    options = {"connect_timeout": 2, "disconnect_timeout": 1, "max_message_size": 8 * 2**20}
    options.update(kw)
    return open_websocket_url(connect_url(server_url, token), **options)


async def send_json(ws, message: dict) -> None:
    await ws.send_message(json.dumps(message))


async def get_json(ws) -> dict:
    return json.loads(await ws.get_message())


# handshake ------------------------------------------------------------------


async def test_handshake_with_right_token_is_accepted_and_recorded():
    with trio.fail_after(5):
        async with open_backend(token="tok-a") as backend, client(backend.url, "tok-a") as ws:
            await send_json(ws, {"type": "hello", "machine_name": "box"})
            connection = await backend.next_connection()
            assert await connection.receive("hello") == {"type": "hello", "machine_name": "box"}
            assert backend.url.startswith("http://127.0.0.1:")
            assert backend.handshakes == [f"{CONNECT_PATH}?token=tok-a"]
            assert backend.connections == [connection]


async def test_handshake_with_wrong_token_is_rejected_403():
    with trio.fail_after(5):
        async with open_backend(token="tok-a") as backend:
            with pytest.raises(ConnectionRejected) as rejected:
                async with client(backend.url, "tok-b"):
                    pass
            assert rejected.value.status_code == 403
            assert b"invalid" in rejected.value.body
            assert backend.handshakes == [f"{CONNECT_PATH}?token=tok-b"]
            assert backend.connections == []


async def test_handshake_on_another_path_is_rejected_404():
    with trio.fail_after(5):
        async with open_backend() as backend:
            url = backend.url.replace("http:", "ws:") + "/api/other?token=tok-test"
            with pytest.raises(ConnectionRejected) as rejected:
                async with open_websocket_url(url, connect_timeout=2):
                    pass
            assert rejected.value.status_code == 404
            assert backend.handshakes == ["/api/other?token=tok-test"]


async def test_reject_next_rejects_only_the_next_handshake():
    with trio.fail_after(5):
        async with open_backend() as backend:
            backend.reject_next(500)
            with pytest.raises(ConnectionRejected) as rejected:
                async with client(backend.url):
                    pass
            assert rejected.value.status_code == 500
            async with client(backend.url):
                await backend.next_connection()
            assert len(backend.handshakes) == 2 and len(backend.connections) == 1


# messages -------------------------------------------------------------------


async def test_messages_are_recorded_and_receive_skips_without_consuming():
    with trio.fail_after(5):
        async with open_backend(answer_pings=False) as backend, client(backend.url) as ws:
            connection = await backend.next_connection()
            await send_json(ws, {"type": "ping", "ts": 1.5})
            await ws.send_message("not json {")
            await ws.send_message("[1, 2]")
            await send_json(ws, {"type": "stage.ack", "stage_run_id": "r1", "pid": 7})
            ack = await connection.receive({"stage.ack", "stage.exit"}, stage_run_id="r1")
            assert ack["pid"] == 7
            assert await connection.receive() == {"type": "ping", "ts": 1.5}  # passed over before
            assert await connection.receive() == {"_raw": "not json {"}
            assert await connection.receive() == {"_raw": "[1, 2]"}
            assert connection.received == [
                {"type": "ping", "ts": 1.5},
                {"_raw": "not json {"},
                {"_raw": "[1, 2]"},
                ack,
            ]


async def test_message_over_a_mebibyte_is_accepted():
    with trio.fail_after(5):
        async with open_backend() as backend, client(backend.url) as ws:
            data = "x" * (5 * 2**20)
            await send_json(ws, {"type": "stage.stdout", "stage_run_id": "r1", "seq": 1, "data": data})
            connection = await backend.next_connection()
            assert (await connection.receive("stage.stdout"))["data"] == data


async def test_ping_is_answered_with_pong():
    with trio.fail_after(5):
        async with open_backend() as backend, client(backend.url) as ws:
            await send_json(ws, {"type": "ping", "ts": 1.0})
            assert await get_json(ws) == {"type": "pong"}


async def test_pings_go_unanswered_when_disabled():
    with trio.fail_after(5):
        async with open_backend(answer_pings=False) as backend, client(backend.url) as ws:
            connection = await backend.next_connection()
            await send_json(ws, {"type": "ping", "ts": 1.0})
            await connection.receive("ping")
            await connection.send({"type": "marker"})
            assert await get_json(ws) == {"type": "marker"}  # nothing came before it
            with trio.move_on_after(0.2) as waited:
                await ws.get_message()
            assert waited.cancelled_caught  # nor after it


async def test_stage_result_gathers_one_stage_in_order():
    frames = [
        {"type": "stage.ack", "stage_run_id": "r1", "pid": 42},
        {"type": "stage.stdout", "stage_run_id": "r1", "seq": 1, "data": "hé"},
        {"type": "stage.stdout", "stage_run_id": "r2", "seq": 1, "data": "other"},
        {"type": "stage.stderr", "stage_run_id": "r1", "seq": 2, "data": "oops\n"},
        {"type": "stage.stdout", "stage_run_id": "r1", "seq": 3, "data": "llo"},
        {"type": "stage.exit", "stage_run_id": "r1", "returncode": 3, "duration_ms": 5, "error": None},
    ]
    with trio.fail_after(5):
        async with open_backend() as backend, client(backend.url) as ws:
            connection = await backend.next_connection()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(connection.stage_result, "r1")  # waits before anything arrives
                for frame in frames:
                    await send_json(ws, frame)
            result = await connection.stage_result("r1")
            assert result.ack == frames[0]
            assert (result.stdout, result.stderr, result.seqs) == ("héllo", "oops\n", [1, 2, 3])
            assert (result.returncode, result.error) == (3, None)


# closing --------------------------------------------------------------------


async def test_backend_close_code_is_seen_by_client():
    with trio.fail_after(5):
        async with open_backend() as backend, client(backend.url) as ws:
            connection = await backend.next_connection()
            await connection.close(4001, "go away")
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            assert (closed.value.reason.code, closed.value.reason.reason) == (4001, "go away")
            assert connection.closed.is_set() and connection.close_code == 4001


async def test_worker_close_is_recorded_and_ends_waits():
    with trio.fail_after(5):
        async with open_backend() as backend:
            async with client(backend.url) as ws:
                connection = await backend.next_connection()
                await send_json(ws, {"type": "hello"})
            await connection.closed.wait()
            assert connection.close_code == 1000
            assert await connection.receive("hello") == {"type": "hello"}  # recorded before the close
            with pytest.raises(ConnectionGone, match="stage.exit"):
                await connection.stage_result("r1")


async def test_abort_drops_tcp_without_close_frame():
    with trio.fail_after(5):
        async with open_backend() as backend, client(backend.url) as ws:
            connection = await backend.next_connection()
            await connection.abort()
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason.code == 1006
            assert connection.close_code == 1006


async def test_pause_reading_blocks_the_sender_until_resumed():
    big = json.dumps({"type": "stage.stdout", "data": "y" * (32 * 2**20)})  # beyond loopback buffers
    with trio.fail_after(8):
        async with open_backend() as backend, client(backend.url) as ws:
            connection = await backend.next_connection()
            connection.pause_reading()
            sent = trio.Event()

            async def send_big():
                await ws.send_message(big)
                sent.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_big)
                with trio.move_on_after(0.5):
                    await sent.wait()
                assert not sent.is_set() and connection.received == []
                connection.resume_reading()
                assert (await connection.receive("stage.stdout"))["data"] == "y" * (32 * 2**20)


# the proxy ------------------------------------------------------------------


async def test_proxy_forwards_both_ways():
    with trio.fail_after(5):
        async with open_backend() as backend, open_proxy(backend.port) as proxy:
            async with client(proxy.url) as ws:
                await send_json(ws, {"type": "ping", "ts": 2.0})
                assert await get_json(ws) == {"type": "pong"}
                connection = await backend.next_connection()
                assert connection.received == [{"type": "ping", "ts": 2.0}]
            assert proxy.connections[0].bytes_up > 0 and proxy.connections[0].bytes_down > 0


async def test_go_silent_stops_delivery_and_resume_restores_it():
    with trio.fail_after(5):
        async with open_backend() as backend, open_proxy(backend.port) as proxy:
            async with client(proxy.url) as ws:
                connection = await backend.next_connection()
                proxy.go_silent()
                await send_json(ws, {"type": "ping", "ts": 3.0})
                with trio.move_on_after(0.5) as waited:
                    await ws.get_message()
                assert waited.cancelled_caught
                assert connection.received == []
                proxy.resume()
                assert await get_json(ws) == {"type": "pong"}
                assert connection.received == [{"type": "ping", "ts": 3.0}]


async def test_go_silent_black_holes_new_connections_unless_told_otherwise():
    with trio.fail_after(5):
        async with open_backend() as backend, open_proxy(backend.port) as proxy:
            async with client(proxy.url) as old:
                proxy.go_silent()
                # Not connect_timeout: trio-websocket's ConnectionTimeout only comes
                # once the server hangs up (its reader task outlives the timeout),
                # and behind a black hole it never does.
                with trio.move_on_after(0.5) as waited:
                    async with client(proxy.url):
                        pytest.fail("handshake got through a silent proxy")
                assert waited.cancelled_caught
                proxy.resume()
                proxy.go_silent(new_connections=False)
                async with client(proxy.url) as new:
                    await send_json(new, {"type": "ping", "ts": 4.0})
                    assert await get_json(new) == {"type": "pong"}
                proxy.resume()
                await send_json(old, {"type": "ping", "ts": 5.0})
                assert await get_json(old) == {"type": "pong"}


async def test_throttle_limits_a_megabyte_each_way():
    rate = 2_000_000  # bytes/s: 1 MB should take about 0.5 s each way
    payload = {"type": "stage.stdout", "data": "z" * 1_000_000}
    expected_s = len(json.dumps(payload)) / rate
    with trio.fail_after(8):
        async with open_backend() as backend, open_proxy(backend.port) as proxy:
            async with client(proxy.url) as ws:
                connection = await backend.next_connection()
                proxy.throttle(rate)

                start = trio.current_time()
                await send_json(ws, payload)
                await connection.receive("stage.stdout")
                assert trio.current_time() - start >= 0.7 * expected_s

                start = trio.current_time()
                await connection.send(payload)
                assert (await get_json(ws))["data"] == payload["data"]
                assert trio.current_time() - start >= 0.7 * expected_s


async def test_reset_all_resets_both_sides():
    with trio.fail_after(5):
        async with open_backend() as backend, open_proxy(backend.port) as proxy:
            async with client(proxy.url) as ws:
                connection = await backend.next_connection()
                proxy.reset_all()
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason.code == 1006
                await connection.closed.wait()
                assert connection.close_code == 1006
