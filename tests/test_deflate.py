"""permessage-deflate (RFC 7692): pgw offers it, inflates what arrives, deflates what it sends.

Against real servers that negotiate the extension and that decline it:

- the `websockets` library's server (what uvicorn, and so the real FastAPI
  backend, runs), in a process of its own (`WebsocketsServer`, the source in
  WEBSOCKETS_SERVER): it speaks enough of the protocol to send requests and
  to record what arrives, and says what it saw as JSON lines on stdout;
- the in-process wsproto/trio-websocket backend of backend.py, with `deflate=`.

pgw runs in this process (`running_worker`), except where its memory is
measured (`pgw_daemon`, `python pgw.py run`).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import random
import struct
import subprocess
import sys
import zlib
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio
import trio_websocket
import wsproto
import wsproto.connection
import wsproto.events
import wsproto.extensions

import pgw
from backend import open_backend, open_proxy
from conftest import ROOT, write_stub_cli
from test_faults import BINARY_BYTES, BINARY_SEED, BINARY_WRITER, PgwCommand, pgw_daemon
from test_protocol import unmask_text_frames
from test_run import request, running_worker

##############################################################################
# Output the stub CLIs print, and what pgw must deliver of it
##############################################################################

# Made both in the stub CLI and here (exec'd), so the test knows what every
# byte must be.  A pool of sentences over a Zipf-weighted vocabulary, as
# codex-like JSON event lines and as prose: zlib deflates it about 3.6x at
# level 6, as it does real agent output, where one repeated line would
# deflate a thousandfold and hide a window or context bug.
TEXT_SOURCE = r'''
import itertools, json, random

def text_chunks(seed, total):
    """`total` bytes of agent-like output, ASCII, in chunks of about 64 KiB."""
    rng = random.Random(seed)
    syllables = "ka ro mi te lu an or is et um pre con de ex in ter al ic ous ment tion ly er ing".split()
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(3000)]
    words += "the of and a to is that we by lemma proof let then since hence suppose for all there exists".split()
    rng.shuffle(words)
    cumulative = list(itertools.accumulate(1 / rank for rank in range(1, len(words) + 1)))
    sentences = [
        " ".join(rng.choices(words, cum_weights=cumulative, k=rng.randint(6, 30))).capitalize() + rng.choice(".,:?;") + " "
        for _ in range(4000)
    ]
    kinds = ["item.delta", "item.delta", "reasoning.delta", "exec.output"]
    made, seq, lines, size = 0, 0, [], 0
    while made < total:
        if rng.random() < 0.5:
            seq += 1
            text = "".join(rng.choices(sentences, k=rng.randint(1, 3)))
            event = {"type": rng.choice(kinds), "id": f"msg_{rng.getrandbits(64):016x}", "seq": seq, "text": text}
            line = json.dumps(event) + "\n"
        else:
            line = "".join(rng.choices(sentences, k=rng.randint(1, 6))) + ("\n" if rng.random() < 0.5 else "")
        lines.append(line)
        size += len(line)
        if size >= 65536 or made + size >= total:
            chunk = "".join(lines).encode()[: total - made]
            made += len(chunk)
            lines, size = [], 0
            yield chunk
'''


def _text_namespace() -> dict:
    namespace: dict = {"__name__": "text_source"}
    exec(compile(TEXT_SOURCE, "text-source", "exec"), namespace)
    return namespace


text_chunks = _text_namespace()["text_chunks"]


@attrs.frozen
class Shape:
    """A stub CLI's script and the stdout/stderr text pgw must deliver of it."""

    script: str
    stdout: str
    stderr: str = ""


MULTIBYTE = ("aé証😀" * 60000).encode() + b"\xff\xfe" + b"end"
MULTIBYTE_WRITER = """
import os
data = ("aé証😀" * 60000).encode() + b"\\xff\\xfe" + b"end"
step = 7919  # a prime: cuts characters everywhere
for start in range(0, len(data), step):
    os.write(1, data[start:start + step])
"""

# Random bytes on both streams, cut everywhere: the fault suite's own writer.
CONTROL_SEED, CONTROL_BYTES, CONTROL_WRITER = BINARY_SEED, BINARY_BYTES, BINARY_WRITER

LINE_BYTES = 10_000_000
LINE_WRITER = TEXT_SOURCE + f"""
import sys
for chunk in text_chunks(7, {LINE_BYTES}):
    sys.stdout.buffer.write(chunk.replace(b"\\n", b" "))
sys.stdout.buffer.write(b"\\n")
"""

MIXED_BYTES = 50 * 2**20
MIXED_WRITER = TEXT_SOURCE + f"""
import sys
for n, chunk in enumerate(text_chunks(11, {MIXED_BYTES})):
    stream = sys.stderr if n % 8 == 7 else sys.stdout  # every eighth chunk to stderr
    stream.buffer.write(chunk)
    stream.flush()
"""


def mixed_expected() -> tuple[str, str]:
    chunks = list(text_chunks(11, MIXED_BYTES))
    stdout = b"".join(chunk for n, chunk in enumerate(chunks) if n % 8 != 7)
    stderr = b"".join(chunk for n, chunk in enumerate(chunks) if n % 8 == 7)
    return stdout.decode(), stderr.decode()


def control_expected() -> tuple[str, str]:
    rng = random.Random(CONTROL_SEED)
    out, err = rng.randbytes(CONTROL_BYTES), rng.randbytes(CONTROL_BYTES)
    return out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def shape(name: str) -> Shape:
    if name == "multibyte-cut-at-frame-edges":
        return Shape(MULTIBYTE_WRITER, MULTIBYTE.decode("utf-8", "replace"))
    if name == "control-and-invalid-bytes":
        return Shape(CONTROL_WRITER, *control_expected())
    if name == "10-mb-single-line":
        return Shape(LINE_WRITER, b"".join(text_chunks(7, LINE_BYTES)).replace(b"\n", b" ").decode() + "\n")
    if name == "50-mib-mixed":
        return Shape(MIXED_WRITER, *mixed_expected())
    raise ValueError(name)


SHAPES = ("multibyte-cut-at-frame-edges", "control-and-invalid-bytes", "10-mb-single-line", "50-mib-mixed")


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@pytest.fixture
def environ(stub_bin):
    """pgw's environment: the stub CLIs first on PATH."""
    return {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/")}


##############################################################################
# The websockets server, in a process of its own
##############################################################################

# argv[1]: {"deflate": null (declines) or ServerPerMessageDeflateFactory's
# arguments}.  stdin: one command a line, to the latest connection:
# {"send": TEXT}.  stdout: one event a line: listening, connect (the offer
# and the answer, as headers), message (anything but output and exits),
# stage (at each stage.exit: the exit, its ack and what its output frames
# carried), closed.  The server's max_size stays the library's 1 MiB default,
# which is uvicorn's too: a message pgw sends past it closes the connection.
WEBSOCKETS_SERVER = r'''
import asyncio, hashlib, json, sys, threading
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory

config = json.loads(sys.argv[1])
connections = []

def emit(event):
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()

def new_stage():
    return {"ack": None, "frames": 0, "seqs": [], "out_before_ack": False, "max_data_bytes": 0, "max_message_bytes": 0,
            "stage.stdout": hashlib.sha256(), "stage.stderr": hashlib.sha256(), "chars": {"stage.stdout": 0, "stage.stderr": 0},
            "text": {"stage.stdout": [], "stage.stderr": []}}

async def handler(ws):
    emit({"ev": "connect", "path": ws.request.path,
          "offered": ws.request.headers.get("Sec-WebSocket-Extensions"),
          "accepted": ws.response.headers.get("Sec-WebSocket-Extensions")})
    connections.append(ws)
    stages = {}
    try:
        async for raw in ws:
            message = json.loads(raw)
            kind, stage_id = message.get("type"), message.get("stage_run_id")
            if kind in ("stage.stdout", "stage.stderr"):
                stage = stages.setdefault(stage_id, new_stage())
                data = message["data"]
                stage["frames"] += 1
                stage["seqs"].append(message["seq"])
                stage["out_before_ack"] |= stage["ack"] is None
                stage[kind].update(data.encode("utf-8", "surrogatepass"))
                stage["chars"][kind] += len(data)
                if sum(stage["chars"].values()) <= 4 * 2**20:
                    stage["text"][kind].append(data)
                stage["max_data_bytes"] = max(stage["max_data_bytes"], len(data.encode("utf-8", "surrogatepass")))
                stage["max_message_bytes"] = max(stage["max_message_bytes"], len(raw.encode("utf-8", "surrogatepass")))
            elif kind == "stage.ack":
                stages.setdefault(stage_id, new_stage())["ack"] = message["pid"]
            elif kind == "stage.exit":
                stage = stages.pop(stage_id, None) or new_stage()
                whole = sum(stage["chars"].values()) <= 4 * 2**20
                emit({"ev": "stage", "exit": message, "ack": stage["ack"], "frames": stage["frames"],
                      "seqs_in_order": stage["seqs"] == list(range(1, len(stage["seqs"]) + 1)),
                      "out_before_ack": stage["out_before_ack"],
                      "max_data_bytes": stage["max_data_bytes"], "max_message_bytes": stage["max_message_bytes"],
                      "stdout_sha256": stage["stage.stdout"].hexdigest(), "stderr_sha256": stage["stage.stderr"].hexdigest(),
                      "stdout_chars": stage["chars"]["stage.stdout"], "stderr_chars": stage["chars"]["stage.stderr"],
                      "stdout": "".join(stage["text"]["stage.stdout"]) if whole else None,
                      "stderr": "".join(stage["text"]["stage.stderr"]) if whole else None})
            else:
                emit({"ev": "message", "message": message})
    except ConnectionClosed:
        pass
    finally:
        emit({"ev": "closed", "code": ws.close_code, "reason": ws.close_reason})

async def main():
    loop = asyncio.get_running_loop()
    commands = asyncio.Queue()

    def read_stdin():
        for line in sys.stdin:
            loop.call_soon_threadsafe(commands.put_nowait, line)
        loop.call_soon_threadsafe(commands.put_nowait, "")

    threading.Thread(target=read_stdin, daemon=True).start()
    deflate = config["deflate"]
    extensions = None if deflate is None else [ServerPerMessageDeflateFactory(**deflate)]
    async with serve(handler, "127.0.0.1", 0, compression=None, extensions=extensions, ping_interval=None) as server:
        emit({"ev": "listening", "port": server.sockets[0].getsockname()[1]})
        while True:
            line = await commands.get()
            if not line:
                return
            command = json.loads(line)
            await connections[-1].send(command["send"])

asyncio.run(main())
'''

# What uvicorn's websockets protocols negotiate at their defaults
# (ServerPerMessageDeflateFactory()), as the real backend does, and the
# `websockets` library's own default (serve(compression="deflate")).
UVICORN_DEFAULTS: dict = {}
WEBSOCKETS_DEFAULTS = {"server_max_window_bits": 12, "client_max_window_bits": 12, "compress_settings": {"memLevel": 5}}


class WebsocketsServer:
    """The WEBSOCKETS_SERVER process: `events` are what it said, in order."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.port = 0
        self.events: list[dict] = []
        self._buffer = b""
        self._seen = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _next_event(self) -> dict:
        while b"\n" not in self._buffer:
            data = await self.process.stdout.receive_some(1 << 20)
            if not data:
                raise AssertionError(f"the websockets server ended; events so far: {self.events}")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        event = json.loads(line)
        self.events.append(event)
        return event

    async def wait_for(self, ev: str, **match: object) -> dict:
        """The next event of kind `ev` (with these fields) after those already returned."""
        while True:
            while self._seen < len(self.events):
                event = self.events[self._seen]
                self._seen += 1
                if event["ev"] == ev and all(event.get(key) == value for key, value in match.items()):
                    return event
                if event["ev"] == "closed" and ev != "closed":
                    raise AssertionError(f"the connection closed while waiting for {ev}: {event}")
            await self._next_event()

    async def send(self, message: dict | str) -> None:
        text = message if isinstance(message, str) else json.dumps(message, ensure_ascii=False)
        await self.process.stdin.send_all(json.dumps({"send": text}).encode() + b"\n")


@asynccontextmanager
async def websockets_server(deflate: dict | None):
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", WEBSOCKETS_SERVER, json.dumps({"deflate": deflate})],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    server = WebsocketsServer(process)
    try:
        server.port = (await server.wait_for("listening"))["port"]
        yield server
    finally:
        with trio.CancelScope(shield=True):
            process.kill()
            await process.wait()


# App pings every 50 ms: heartbeats go through the compressor between output frames.
FAST_HEARTBEAT = pgw.Timing(heartbeat_s=0.05)


@asynccontextmanager
async def worker_on_websockets(tmp_path, environ, deflate: dict | None, **settings):
    """A websockets server, a counting proxy in front of it, pgw connected through
    that proxy, and the server's connect event."""
    async with websockets_server(deflate) as server, open_proxy(server.port) as proxy:
        settings = {"server": proxy.url, "token": "tok-test", "name": "test-box", **settings}
        worker = pgw.Daemon(pgw.Settings(**settings), tmp_path / "home", environ=environ, timing=FAST_HEARTBEAT)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker.run)
            try:
                connect = await server.wait_for("connect")
                assert (await server.wait_for("message"))["message"]["type"] == "hello"
                yield server, proxy, connect
            finally:
                worker.hurry_shutdown()
                nursery.cancel_scope.cancel()


def bytes_up(proxy) -> int:
    return sum(connection.bytes_up for connection in proxy.connections)


def bytes_down(proxy) -> int:
    return sum(connection.bytes_down for connection in proxy.connections)


def check_stage(stage: dict, expected: Shape) -> None:
    assert (stage["exit"]["returncode"], stage["exit"]["error"]) == (0, None)
    assert stage["ack"] is not None and not stage["out_before_ack"]
    assert stage["seqs_in_order"]
    assert stage["max_data_bytes"] <= 256 * 1024
    assert stage["max_message_bytes"] <= pgw.OUTPUT_MESSAGE_MAX_BYTES
    if stage["stdout"] is not None:  # small enough to carry whole: the first difference shows
        assert stage["stdout"] == expected.stdout
        assert stage["stderr"] == expected.stderr
    assert (stage["stdout_chars"], stage["stdout_sha256"]) == (len(expected.stdout), digest(expected.stdout))
    assert (stage["stderr_chars"], stage["stderr_sha256"]) == (len(expected.stderr), digest(expected.stderr))


def negotiated(connect: dict) -> bool:
    return (connect["accepted"] or "").startswith("permessage-deflate")


##############################################################################
# Round trips through a server that negotiates the extension
##############################################################################



@pytest.mark.parametrize("name", SHAPES)
async def test_output_arrives_byte_for_byte_deflated_through_the_websockets_server(tmp_path, environ, stub_bin, name):
    expected = shape(name)
    write_stub_cli(stub_bin, "claude", expected.script)
    with trio.fail_after(120):
        async with worker_on_websockets(tmp_path, environ, UVICORN_DEFAULTS) as (server, proxy, connect):
            assert negotiated(connect), connect
            before = bytes_up(proxy)
            await server.send(request("s1"))
            stage = await server.wait_for("stage")
            up = bytes_up(proxy) - before
    check_stage(stage, expected)
    if name in ("10-mb-single-line", "50-mib-mixed"):
        sent = len(expected.stdout.encode()) + len(expected.stderr.encode())
        assert up < sent / 3, f"{up} bytes on the wire for {sent} bytes of output: not deflated"


@pytest.mark.parametrize("name", SHAPES)
async def test_output_arrives_byte_for_byte_deflated_through_the_wsproto_backend(tmp_path, environ, stub_bin, name):
    expected = shape(name)
    write_stub_cli(stub_bin, "claude", expected.script)
    with trio.fail_after(120):
        async with open_backend(deflate={}) as backend:
            async with running_worker(backend, tmp_path / "home", environ, timing=FAST_HEARTBEAT):
                connection = await backend.next_connection()
                assert connection.deflate is not None, "permessage-deflate was not negotiated"
                await connection.send(request("s1"))
                result = await connection.stage_result("s1")
                # A short stage may end within one heartbeat: the next pings
                # still come through the compressor the output went through.
                with trio.move_on_after(5):
                    while sum(1 for message in connection.received if message.get("type") == "ping") < 3:
                        await trio.sleep(0.01)
                pings = sum(1 for message in connection.received if message.get("type") == "ping")
    assert (result.returncode, result.error) == (0, None)
    assert result.ack is not None
    assert result.seqs == list(range(1, len(result.frames) + 1))
    assert all(len(frame["data"].encode()) <= 256 * 1024 for frame in result.frames)
    assert (len(result.stdout), digest(result.stdout)) == (len(expected.stdout), digest(expected.stdout))
    assert (len(result.stderr), digest(result.stderr)) == (len(expected.stderr), digest(expected.stderr))
    assert pings >= 3, "heartbeats went through the same compressor"


def test_the_output_shapes_are_what_the_stubs_print(tmp_path):
    # The expected texts are computed, not recorded: check the computation
    # against the stubs themselves, run directly.
    for name in ("multibyte-cut-at-frame-edges", "control-and-invalid-bytes", "10-mb-single-line"):
        expected = shape(name)
        done = subprocess.run([sys.executable, write_stub_cli(tmp_path, name, expected.script)], capture_output=True, check=True)
        assert done.stdout.decode("utf-8", "replace") == expected.stdout
        assert done.stderr.decode("utf-8", "replace") == expected.stderr
    text = b"".join(text_chunks(3, 4 << 20))
    deflater = zlib.compressobj(pgw.DEFLATE_LEVEL, zlib.DEFLATED, -15, pgw.DEFLATE_MEM_LEVEL)
    ratio = len(text) / len(deflater.compress(text) + deflater.flush())
    assert len(text) == 4 << 20 and 3 <= ratio <= 6, f"the text deflates {ratio:.1f}x, not like agent output"


##############################################################################
# Incoming messages: inflated by wsproto, limits counted inflated
##############################################################################

FILES_DIGEST = """
import hashlib, os, sys
prompt = sys.stdin.buffer.read()
for root, _, names in sorted(os.walk(".")):
    for name in sorted(names):
        path = os.path.join(root, name)
        print(path, os.path.getsize(path), hashlib.sha256(open(path, "rb").read()).hexdigest())
print("prompt", len(prompt), hashlib.sha256(prompt).hexdigest())
"""


def files_request(stage_run_id: str) -> tuple[dict, str, int]:
    """A request with 24 MiB of text files and a 4 MiB prompt; what the stub must print; its size."""
    files = {f"src/part-{n}.tex": b"".join(text_chunks(20 + n, 6 << 20)) for n in range(4)}
    prompt = b"".join(text_chunks(30, 4 << 20)).decode()
    message = request(stage_run_id, files={name: base64.b64encode(data).decode() for name, data in files.items()}, stdin=prompt)
    lines = [f"./{name} {len(data)} {hashlib.sha256(data).hexdigest()}" for name, data in sorted(files.items())]
    lines.append(f"prompt {len(prompt)} {hashlib.sha256(prompt.encode()).hexdigest()}")
    return message, "\n".join(lines) + "\n", len(json.dumps(message))


async def test_a_request_with_files_is_inflated_whole_from_the_websockets_server(tmp_path, environ, stub_bin):
    write_stub_cli(stub_bin, "claude", FILES_DIGEST)
    message, printed, size = files_request("files")
    with trio.fail_after(120):
        async with worker_on_websockets(tmp_path, environ, UVICORN_DEFAULTS) as (server, proxy, connect):
            assert negotiated(connect), connect
            before = bytes_down(proxy)
            await server.send(message)
            stage = await server.wait_for("stage")
            down = bytes_down(proxy) - before
    assert (stage["exit"]["returncode"], stage["exit"]["error"]) == (0, None)
    assert stage["stdout"] == printed
    assert down < size / 2, f"{down} bytes on the wire for a {size}-byte request: not deflated"


@asynccontextmanager
async def deflating_through_a_proxy(tmp_path, environ):
    """pgw connected to the wsproto backend with deflate, through a proxy that
    counts the bytes; yields (backend, proxy, connection) after the hello."""
    async with open_backend(deflate={}) as backend, open_proxy(backend.port) as proxy:
        async with running_worker(backend, tmp_path / "home", environ, server=proxy.url):
            connection = await backend.next_connection()
            assert connection.deflate is not None, "permessage-deflate was not negotiated"
            await connection.receive("hello")
            yield backend, proxy, connection


async def test_a_request_with_files_is_inflated_whole_from_the_wsproto_backend(tmp_path, environ, stub_bin):
    write_stub_cli(stub_bin, "claude", FILES_DIGEST)
    message, printed, size = files_request("files")
    with trio.fail_after(120):
        async with deflating_through_a_proxy(tmp_path, environ) as (_, proxy, connection):
            before = bytes_down(proxy)
            await connection.send(message)
            result = await connection.stage_result("files")
            down = bytes_down(proxy) - before
    assert (result.returncode, result.error, result.stdout) == (0, None, printed)
    assert down < size / 2, f"{down} bytes on the wire for a {size}-byte request: not deflated"


SIZE_AND_DIGEST = "import hashlib, sys; prompt = sys.stdin.buffer.read(); print(len(prompt), hashlib.sha256(prompt).hexdigest())"


async def test_a_small_message_inflating_to_120_mib_is_answered_on_the_same_connection(tmp_path, environ, stub_bin):
    write_stub_cli(stub_bin, "claude", SIZE_AND_DIGEST)
    prompt = "y" * (120 * 2**20 - 300)  # the whole message is about 120 MiB inflated, 120 KiB deflated
    with trio.fail_after(60):
        async with deflating_through_a_proxy(tmp_path, environ) as (backend, proxy, connection):
            before = bytes_down(proxy)
            await connection.send(request("huge", stdin=prompt))
            huge = await connection.stage_result("huge")
            down = bytes_down(proxy) - before
            await connection.send(request("after", stdin="x"))
            after = await connection.stage_result("after")
            assert len(backend.connections) == 1 and not connection.closed.is_set()
    assert (huge.returncode, huge.stdout.split()) == (0, [str(len(prompt)), hashlib.sha256(prompt.encode()).hexdigest()])
    assert after.returncode == 0
    assert down < 2**20, f"{down} bytes on the wire: the message was not deflated"


def deflate_bomb(inflated_mib: int) -> bytes:
    """One deflated server text frame (unmasked, RSV1) of `inflated_mib` MiB of
    spaces, about 1 KiB per MiB: the deflate of one more MiB of spaces after
    spaces is the same whatever came before, so it is made once and repeated."""
    deflater = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = deflater.compress(b" " * 2**20) + deflater.flush(zlib.Z_SYNC_FLUSH)
    more = deflater.compress(b" " * 2**20) + deflater.flush(zlib.Z_SYNC_FLUSH)
    payload = (first + more * (inflated_mib - 1))[:-4]  # RFC 7692 7.2.1: without the flush's 00 00 ff ff
    return bytes((0xC1, 127)) + struct.pack("!Q", len(payload)) + payload


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


# pgw holds a message up to the 128 MiB limit; wsproto inflates each read
# (at most 64 KiB from the socket) in one call, up to ~66 MiB.  So a bomb of
# any size costs what a 128 MiB message does (measured: 320-380 MB, as a
# legitimate 120 MiB request costs 300-370 MB), never its inflated size.
BOMB_INFLATED_MIB = 2048
BOMB_PEAK_RSS_LIMIT_BYTES = 512 * 2**20


async def test_a_deflate_bomb_is_refused_with_bounded_memory_and_pgw_reconnects(tmp_path, stub_bin):
    # `python pgw.py run` in a process of its own: its peak RSS is pgw's alone.
    script_pgw = PgwCommand((sys.executable, str(ROOT / "pgw.py")), {"PYTHONPATH": os.pathsep.join(sys.path)})
    bomb = deflate_bomb(BOMB_INFLATED_MIB)
    assert len(bomb) < 4 * 2**20
    home = tmp_path / "home"
    with trio.fail_after(60):
        async with open_backend(deflate={}) as backend:
            async with pgw_daemon(script_pgw, home, stub_bin, server=backend.url, token=backend.token) as daemon:
                first = await backend.next_connection()
                assert first.deflate is not None, "permessage-deflate was not negotiated"
                await first.receive("hello")
                await first.send_raw(bomb)
                await first.closed.wait()
                second = await backend.next_connection()
                await second.receive("hello")
                peak = peak_rss_bytes(daemon.pid)
                assert daemon.returncode is None, "pgw died"
    print(f"\na {BOMB_INFLATED_MIB} MiB deflate bomb ({len(bomb)} bytes): pgw's peak RSS {peak / 2**20:.0f} MiB")
    assert first.close_code == 1009
    assert peak < BOMB_PEAK_RSS_LIMIT_BYTES, f"pgw's peak RSS reached {peak / 2**20:.0f} MiB"
    warnings = [line for line in (home / "run.log").read_text().splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and warnings[0].split(" WARNING ")[1].startswith(
        "disconnected: pgw refused a message from the server of more than 128 MiB "
        "(the limit, counted after inflation) and closed the connection (1009); reconnecting in"
    ), warnings


##############################################################################
# The parameters the server chooses
##############################################################################

# Each print is read (and sent) as a message of its own: a compressor that
# kept its context would refer back into the message before.
REPEATED_MESSAGES = """
import sys, time
for n in range(200):
    print("the same long line again, and again, and again: " * 8, flush=True)
    time.sleep(0.003)
"""


@pytest.mark.parametrize("server", ["websockets", "wsproto"])
async def test_client_no_context_takeover_is_honoured(tmp_path, environ, stub_bin, server):
    write_stub_cli(stub_bin, "claude", REPEATED_MESSAGES)
    expected = ("the same long line again, and again, and again: " * 8 + "\n") * 200
    with trio.fail_after(60):
        if server == "websockets":
            async with worker_on_websockets(tmp_path, environ, {"client_no_context_takeover": True}) as (ws, _, connect):
                assert "client_no_context_takeover" in connect["accepted"], connect
                await ws.send(request("s1"))
                stage = await ws.wait_for("stage")
            frames = stage["frames"]
            check_stage(stage, Shape(REPEATED_MESSAGES, expected))
        else:
            async with open_backend(deflate={"client_no_context_takeover": True}) as backend:
                async with running_worker(backend, tmp_path / "home", environ, timing=FAST_HEARTBEAT):
                    connection = await backend.next_connection()
                    assert connection.deflate is not None and connection.deflate.client_no_context_takeover
                    await connection.send(request("s1"))
                    result = await connection.stage_result("s1")
                    assert len(backend.connections) == 1 and not connection.closed.is_set()
            frames = len(result.frames)
            assert result.stdout == expected
    assert frames >= 20, "the lines did not go out as messages of their own"


def window_writer(block_bytes: int) -> str:
    """The same block of letters printed 40 times, each its own message: a
    compressor using more window than the server allows refers back to the
    block in the message before, past what the server's inflater keeps."""
    return f"""
import random, sys, time
rng = random.Random(4)
block = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range({block_bytes}))
for n in range(40):
    print(n, block, flush=True)
    time.sleep(0.01)
"""


@pytest.mark.parametrize("bits, block_bytes", [(9, 2000), (8, 120)])
async def test_a_lowered_client_window_is_honoured(tmp_path, environ, stub_bin, bits, block_bytes):
    # 8 bits: zlib has none, pgw deflates with 9, whose references reach back
    # at most 250 bytes: the 120-byte block (with its message's head, under
    # 250 bytes) is referred to across messages, and inflates.
    script = window_writer(block_bytes)
    write_stub_cli(stub_bin, "claude", script)
    expected = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    params = {"client_max_window_bits": bits, "server_max_window_bits": max(bits, 9)}
    with trio.fail_after(60):
        async with worker_on_websockets(tmp_path, environ, params) as (server, proxy, connect):
            assert f"client_max_window_bits={bits}" in connect["accepted"], connect
            before = bytes_up(proxy)
            await server.send(request("s1"))
            stage = await server.wait_for("stage")
            up = bytes_up(proxy) - before
    check_stage(stage, Shape(script, expected))
    assert stage["frames"] >= 20, "the lines did not go out as messages of their own"
    if bits == 8:
        assert up < len(expected) / 2, "the blocks were not referred back to across messages"


##############################################################################
# Declined, or turned off
##############################################################################


async def test_a_server_that_declines_gets_the_same_output_uncompressed(tmp_path, environ, stub_bin):
    expected = shape("multibyte-cut-at-frame-edges")
    write_stub_cli(stub_bin, "claude", expected.script)
    with trio.fail_after(60):
        async with worker_on_websockets(tmp_path, environ, None) as (server, proxy, connect):
            assert connect["offered"].startswith("permessage-deflate"), connect
            assert connect["accepted"] is None
            before = bytes_up(proxy)
            await server.send(request("s1"))
            stage = await server.wait_for("stage")
            up = bytes_up(proxy) - before
    check_stage(stage, expected)
    assert up > len(expected.stdout.encode()), "sent deflated to a server that declined"


async def test_compression_off_offers_nothing(tmp_path, environ, stub_bin):
    write_stub_cli(stub_bin, "claude", "print('plain')")
    config = pgw.parse_config(json.dumps(pgw.set_host_setting({}, "compression", "off")), tmp_path / "config.json")
    settings = pgw.resolve_settings({}, {}, config, "box")
    assert settings.compression is False
    with trio.fail_after(30):
        async with worker_on_websockets(tmp_path, environ, UVICORN_DEFAULTS, compression=settings.compression) as (
            server, _, connect
        ):
            assert (connect["offered"], connect["accepted"]) == (None, None)
            await server.send(request("s1"))
            stage = await server.wait_for("stage")
        async with open_backend(deflate={}) as backend:
            async with running_worker(backend, tmp_path / "home", environ, compression=False):
                connection = await backend.next_connection()
                assert (connection.offered_extensions, connection.deflate) == (None, None)
    assert stage["stdout"] == "plain\n"


async def test_compression_turned_off_while_running_is_used_from_the_next_connection(tmp_path, environ):
    settings = {"compression": True}
    with trio.fail_after(30):
        async with open_backend(deflate={}) as backend:
            worker_settings = pgw.Settings(server=backend.url, token=backend.token, name="test-box")
            worker = pgw.Daemon(
                worker_settings, tmp_path / "home", environ=environ,
                timing=pgw.Timing(reconnect_first_s=0.05), reread=lambda: attrs.evolve(worker_settings, **settings),
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(worker.run)
                first = await backend.next_connection()
                await first.receive("hello")
                assert first.deflate is not None
                settings["compression"] = False  # `pgw config set compression off` while it runs
                await first.close(1011)
                second = await backend.next_connection()
                await second.receive("hello")
                assert (second.offered_extensions, second.deflate) == (None, None)
                worker.hurry_shutdown()


@pytest.mark.parametrize("deflate, compression, detail", [
    ({}, True, "compressed: permessage-deflate; client_max_window_bits=15; server_max_window_bits=15"),
    ({}, False, "uncompressed: compression is off"),
    (None, True, "uncompressed: the server declined permessage-deflate"),
])
async def test_doctor_says_whether_the_connection_is_compressed(deflate, compression, detail):
    with trio.fail_after(10):
        async with open_backend(deflate=deflate) as backend:
            settings = pgw.Settings(backend.url, backend.token, compression=compression)
            checks = {check.name: check for check in await pgw.network_checks(settings)}
    assert checks["websocket"].status == "PASS"
    assert checks["websocket"].detail == f"the server accepted the token; {detail}"


##############################################################################
# The setting
##############################################################################


def test_compression_is_on_unless_set_off():
    assert pgw.resolve_settings({}, {}, {}, "box").compression is True
    assert pgw.resolve_settings({}, {}, {"compression": "on"}, "box").compression is True
    assert pgw.resolve_settings({}, {}, {"compression": "off"}, "box").compression is False
    config = pgw.set_host_setting({"server": "http://x"}, "compression", "off")
    assert config == {"server": "http://x", "compression": "off"}
    assert pgw.unset_host_setting(config, "compression") == {"server": "http://x"}
    assert "compression" in pgw.HOST_SETTINGS


@pytest.mark.parametrize("value", ["yes", "OFF", "false", ""])
def test_compression_takes_only_on_or_off(value):
    with pytest.raises(pgw.UsageError, match=f"^compression: expected on or off, got {value!r}$"):
        pgw.set_host_setting({}, "compression", value)


@pytest.mark.parametrize("value", ["yes", False, 0, None])
def test_a_config_with_a_bad_compression_value_is_refused(tmp_path, value):
    with pytest.raises(pgw.ConfigError, match="'compression' must be \"on\" or \"off\""):
        pgw.parse_config(json.dumps({"compression": value}), tmp_path / "config.json")


##############################################################################
# The frames pgw writes, read back by wsproto (no I/O)
##############################################################################


class _FakeWebSocket:
    """What FrameWriter reads of a trio-websocket connection."""

    closed = None

    def __init__(self) -> None:
        setattr(self, pgw.TRIO_WEBSOCKET_STREAM_LOCK, trio.StrictFIFOLock())


def negotiated_deflate(response: str) -> pgw.Deflate:
    deflate = pgw.Deflate()
    deflate.finalize(response)  # as wsproto does with the server's answer
    return deflate


def server_reading(response: str) -> wsproto.connection.Connection:
    """A wsproto server connection that inflates as the server agreed in `response`."""
    extension = wsproto.extensions.PerMessageDeflate()
    extension.finalize(response)
    return wsproto.connection.Connection(wsproto.connection.ConnectionType.SERVER, [extension])


# The same 150 characters that do not repeat within themselves, five times:
# each message after the first refers back to the one before (within the
# 250 bytes even a 9-bit window reaches), unless told not to.
_RNG = random.Random(3)
SAME_TEXT = "".join(_RNG.choice("abcdefghijklmnopqrstuvwxyzé証😀 ") for _ in range(150))
MESSAGES = [pgw.wire(pgw.StageStdout("s1", n, SAME_TEXT)) for n in range(1, 6)]


@pytest.mark.parametrize("response", [
    "permessage-deflate",
    "permessage-deflate; client_max_window_bits=9",
    "permessage-deflate; client_no_context_takeover",
    "permessage-deflate; client_no_context_takeover; client_max_window_bits=10",
])
def test_deflated_frames_read_back_whole_with_rsv1_and_no_flush_tail(response):
    writer = pgw.FrameWriter(_FakeWebSocket(), None, negotiated_deflate(response))  # type: ignore[arg-type]
    frames = [bytes(writer._frame(message)) for message in MESSAGES]
    assert all(frame[0] == 0xC1 for frame in frames), "FIN, RSV1 and the text opcode"
    assert unmask_text_frames(b"".join(frames), server_reading(response)) == [m.decode() for m in MESSAGES]
    sizes = [len(frame) for frame in frames]
    if "no_context_takeover" in response:
        assert min(sizes) > 0.9 * max(sizes), "each message deflated on its own"
        # ... and each one inflates on its own, with a fresh inflater:
        assert [unmask_text_frames(frame, server_reading(response)) for frame in frames] == [[m.decode()] for m in MESSAGES]
    else:
        assert sizes[1] < sizes[0] / 3, "later messages refer back to the first"


def test_an_undeflated_writer_writes_plain_text_frames():
    writer = pgw.FrameWriter(_FakeWebSocket(), None)  # type: ignore[arg-type]
    frame = bytes(writer._frame(MESSAGES[0]))
    assert frame[0] == 0x81
    assert unmask_text_frames(frame) == [MESSAGES[0].decode()]


def test_a_deflated_output_message_stays_under_a_mebibyte_on_the_wire():
    # Output that does not deflate (random code points) grows by deflate's
    # stored-block overhead: still under the 1 MiB a server takes.
    rng = random.Random(9)
    text = "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(256 * 1024))
    writer = pgw.FrameWriter(_FakeWebSocket(), None, negotiated_deflate("permessage-deflate"))  # type: ignore[arg-type]
    for piece in pgw.escaped_output(text):
        message = pgw.output_message(pgw.StageStdout, "s" * 200, 2**40, piece)
        frame = writer._frame(message)
        header = 2 + 8 + 4  # a 64-bit length and the mask key
        assert len(message) <= pgw.OUTPUT_MESSAGE_MAX_BYTES
        assert len(frame) - header <= pgw.OUTPUT_MESSAGE_MAX_BYTES


def test_an_eight_bit_window_is_taken_as_nine():
    deflate = negotiated_deflate("permessage-deflate; client_max_window_bits=8; server_max_window_bits=8")
    assert (deflate.client_max_window_bits, deflate.server_max_window_bits) == (9, 9)
    assert str(deflate) == "permessage-deflate; client_max_window_bits=9; server_max_window_bits=9"


def server_frames(pieces: list[bytes], first_opcode: int = 0x1) -> bytes:
    """A server's unmasked frames of one deflated message, cut into `pieces`."""
    frames = b""
    for index, piece in enumerate(pieces):
        fin = 0x80 if index == len(pieces) - 1 else 0
        first = fin | (0x40 | first_opcode if index == 0 else 0)  # RSV1 on the first frame only
        size = len(piece)
        length = bytes((size,)) if size < 126 else struct.pack("!BH", 126, size)
        frames += bytes((first,)) + length + piece
    return frames


def final_block_deflater(window: bytes = b"") -> bytes:
    """What deflates a message in one stream ending with a BFINAL block, as
    RFC 7692 7.2.3.4 allows a sender that cannot flush: with context takeover,
    the next stream may still refer back to `window`, what came before."""
    def deflate(text: bytes) -> bytes:
        compressor = zlib.compressobj(6, zlib.DEFLATED, -15, zdict=window) if window else zlib.compressobj(6, zlib.DEFLATED, -15)
        return compressor.compress(text) + compressor.flush(zlib.Z_FINISH)
    return deflate  # type: ignore[return-value]


def client_reading(response: str) -> wsproto.connection.Connection:
    """A wsproto client connection inflating with pgw's Deflate, as pgw reads."""
    return wsproto.connection.Connection(wsproto.connection.ConnectionType.CLIENT, [negotiated_deflate(response)])


def texts_read(connection: wsproto.connection.Connection, data: bytes) -> list[str]:
    """The whole text messages in `data` (wsproto gives one event per frame),
    pings and pongs aside."""
    connection.receive_data(data)
    texts, text = [], ""
    for event in connection.events():
        if isinstance(event, (wsproto.events.Ping, wsproto.events.Pong)):
            continue
        assert isinstance(event, wsproto.events.TextMessage), event
        text += event.data
        if event.message_finished:
            texts.append(text)
            text = ""
    return texts


REQUESTS = [json.dumps({"type": "stage.request", "stage_run_id": f"s{n}", "cli": "claude", "stdin": SAME_TEXT})
            for n in range(4)]


@pytest.mark.parametrize("response", ["permessage-deflate", "permessage-deflate; server_no_context_takeover"])
def test_messages_whose_deflate_stream_ends_with_a_final_block_all_inflate(response):
    # Each message its own stream, ended with BFINAL (a fresh compressor, and
    # Z_FINISH): every one after the first used to inflate to nothing.
    connection = client_reading(response)
    for text in REQUESTS:
        assert texts_read(connection, server_frames([final_block_deflater()(text.encode())])) == [text]


def test_a_final_block_stream_may_refer_back_to_the_message_before():
    # With context takeover the sender's next stream may use the last
    # message's window (RFC 7692 7.2.2: the receiver keeps it).
    connection, window = client_reading("permessage-deflate"), b""
    for text in REQUESTS:
        deflated = final_block_deflater(window)(text.encode())
        if window:
            assert len(deflated) < len(final_block_deflater()(text.encode())) / 2, "it refers back"
        assert texts_read(connection, server_frames([deflated])) == [text]
        window = (window + text.encode())[-32768:]


def test_final_blocks_and_sync_flushes_mix_within_a_connection_and_across_frames():
    connection, flushing = client_reading("permessage-deflate"), zlib.compressobj(6, zlib.DEFLATED, -15)
    window = b""
    for index, text in enumerate(REQUESTS * 2):
        data = text.encode()
        if index % 2:
            deflated = final_block_deflater(window)(data)
            flushing = zlib.compressobj(6, zlib.DEFLATED, -15, zdict=window + data)  # the stream after it
        else:
            deflated = (flushing.compress(data) + flushing.flush(zlib.Z_SYNC_FLUSH))[:-4]
        window = (window + data)[-32768:]
        third = len(deflated) // 3
        pieces = [deflated[:third], deflated[third : 2 * third], deflated[2 * third :]]
        assert texts_read(connection, server_frames(pieces)) == [text]



@pytest.mark.parametrize("response", ["permessage-deflate", "permessage-deflate; server_no_context_takeover"])
@pytest.mark.parametrize("control", [b"\x89\x04ping", b"\x8a\x00", b"\x89\x00"], ids=["ping", "pong", "empty-ping"])
def test_a_control_frame_between_the_fragments_of_a_deflated_message_leaves_it_whole(response, control):
    # RFC 6455 5.4: a server may send a ping while it sends a message in
    # pieces, as websockets does when it pings during send(async iterable).
    connection = client_reading(response)
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    for text in REQUESTS:
        if "no_context_takeover" in response:
            compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
        deflated = (compressor.compress(text.encode()) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]
        frames = server_frames([deflated[:10], deflated[10:20], deflated[20:]])
        first_end = 2 + 10
        second_end = first_end + 2 + 10
        with_controls = frames[:first_end] + control + frames[first_end:second_end] + control + frames[second_end:]
        assert texts_read(connection, with_controls) == [text]


def test_a_control_frame_with_rsv1_is_still_refused():
    connection = client_reading("permessage-deflate")
    connection.receive_data(b"\xc9\x00")  # FIN, RSV1 and the ping opcode
    assert [type(event) for event in connection.events()] == [wsproto.events.CloseConnection]


##############################################################################
# What pgw takes from trio-websocket and wsproto to offer the extension
##############################################################################


async def test_trio_websocket_and_wsproto_still_have_what_pgw_uses_for_deflate():
    # open_websocket does what trio-websocket's wrap_client_stream does, through
    # its private names, with the offer put in the opening request; pgw names
    # trio-websocket's own too-big close by its reason.  An upgrade that
    # renames any of these must fail here, by name.
    lock = (ROOT / "requirements.lock").read_text()
    assert "trio-websocket==0.12.2" in lock and "wsproto==1.3.2" in lock
    connection = trio_websocket.WebSocketConnection(
        None, wsproto.WSConnection(wsproto.ConnectionType.CLIENT), host="h", path="/"  # type: ignore[arg-type]
    )
    request_name, reader_name, opened_name = pgw.TRIO_WEBSOCKET_HANDSHAKE
    assert isinstance(getattr(connection, request_name), wsproto.events.Request)
    assert callable(getattr(connection, reader_name))
    assert isinstance(getattr(connection, opened_name), trio.Event)
    assert getattr(connection, pgw.TRIO_WEBSOCKET_WSPROTO).state is wsproto.connection.ConnectionState.CONNECTING
    assert callable(getattr(connection, pgw.TRIO_WEBSOCKET_PING_HANDLER))  # LatestPing.note takes its place
    assert "extensions" in {field.name for field in dataclasses.fields(wsproto.events.Request)}
    assert all(hasattr(wsproto.extensions.PerMessageDeflate(), name) for name in pgw.WSPROTO_INFLATE_STATE)
    with trio.fail_after(10):
        async with open_backend() as backend:
            url = f"ws://127.0.0.1:{backend.port}/api/local-worker/connect?token={backend.token}"
            async with trio_websocket.open_websocket_url(url, max_message_size=10) as ws:
                connection = await backend.next_connection()
                await connection.send("x" * 11)
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await ws.get_message()
    assert closed.value.reason.code == 1009
    assert closed.value.reason.reason == pgw.TRIO_WEBSOCKET_TOO_BIG_REASON.format(10)
