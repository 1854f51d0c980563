"""`pgw run` against the in-process backend: stages, cancels, loss, shutdown."""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import sys
import time
import urllib.parse
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

import pgw
from backend import Backend, open_backend, open_proxy
from conftest import ROOT, write_stub_cli

# Helpers ---------------------------------------------------------------------


def live_processes() -> list[tuple[int, int, int]]:
    """(pid, parent pid, process group) of every process but zombies (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z":
            found.append((int(entry.name), int(fields[1]), int(fields[2])))
    return found


def live_group_members(pgid: int) -> list[int]:
    """Pids in process group `pgid` that are not zombies."""
    return [pid for pid, _, group in live_processes() if group == pgid]


async def assert_group_gone(pgid: int, within_s: float = 2.0) -> None:
    with trio.move_on_after(within_s):
        while live_group_members(pgid):
            await trio.sleep(0.05)
    assert live_group_members(pgid) == [], f"process group {pgid} survived"


def request(stage_run_id: str, cli: str = "claude", **fields) -> dict:
    message = {
        "type": "stage.request",
        "stage_run_id": stage_run_id,
        "job_id": "job-1",
        "cli": cli,
        "cli_args": [],
        "stdin": "",
    }
    message.update(fields)
    return message


def cancel(stage_run_id: str, signal_name: str = "SIGTERM") -> dict:
    return {"type": "stage.cancel", "stage_run_id": stage_run_id, "signal": signal_name}


@pytest.fixture
def environ(stub_bin):
    """The worker's environment: stub CLIs first on PATH, a token that must not leak."""
    return {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/"), "PGW_TOKEN": "leak-me-not"}


@asynccontextmanager
async def running_worker(
    backend: Backend, home: Path, environ: dict, server: str | None = None, timing: pgw.Timing = pgw.Timing(), **settings
):
    settings = pgw.Settings(server=server or backend.url, token=backend.token, name="test-box", **settings)
    worker = pgw.Daemon(settings, home, environ=environ, timing=timing)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.run)
        try:
            yield worker
        finally:
            worker.hurry_shutdown()
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def connected(tmp_path, environ, **options):
    """A backend, a worker connected to it, and the backend's side of that connection;
    `options` are running_worker's (a Timing, settings)."""
    async with open_backend() as backend:
        async with running_worker(backend, tmp_path / "home", environ, **options) as worker:
            connection = await backend.next_connection()
            assert (await connection.receive("hello"))["machine_name"] == "test-box"
            yield backend, worker, connection


async def test_a_long_machine_name_goes_to_the_server_whole_and_to_the_log_cut(tmp_path, environ, caplog):
    # `run --name` of 100 KB wrote all of it into run.log, twice.
    caplog.set_level(logging.INFO, logger="pgw")
    with trio.fail_after(10):
        async with open_backend() as backend:
            settings = pgw.Settings(server=backend.url, token=backend.token, name="n" * 100_000)
            daemon = pgw.Daemon(settings, tmp_path / "home", environ=environ)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(daemon.run)
                hello = await (await backend.next_connection()).receive("hello")
                daemon.hurry_shutdown()
                nursery.cancel_scope.cancel()
    assert hello["machine_name"] == "n" * 100_000
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("connected to")]
    assert len(line) < 1000, len(line)


async def test_a_server_under_a_path_prefix_is_connected_to_under_it(tmp_path, environ, stub_bin):
    # A backend a reverse proxy serves under /pg: pairing posts under the
    # prefix, and the connection dropped it, so a paired worker never connected.
    write_stub_cli(stub_bin, "claude", "print('ran')")
    with trio.fail_after(10):
        async with open_backend(prefix="/pg/v1") as backend:
            async with running_worker(backend, tmp_path / "home", environ):
                connection = await backend.next_connection()
                await connection.receive("hello")
                await connection.send(request("s1"))
                assert (await connection.stage_result("s1")).stdout == "ran\n"
    assert backend.handshakes == ["/pg/v1/api/local-worker/connect?token=tok-test"]


async def test_a_close_reason_that_echoes_the_token_leaves_it_out_of_the_state_file(tmp_path, environ):
    # The log hid it, but the state file's last_error (and `pgw status`) kept
    # the server's words as they came.
    token = "tok/secret+123"
    reason = f"bad token {token} ({urllib.parse.quote(token, safe='')})"
    state_file = tmp_path / "home" / pgw.STATE_FILENAME
    with trio.fail_after(10):
        async with open_backend(token=token) as backend:
            async with running_worker(backend, tmp_path / "home", environ) as worker:
                connection = await backend.next_connection()
                await connection.receive("hello")
                await connection.close(1008, reason)
                while "bad token" not in (state_file.read_text() if state_file.exists() else ""):
                    await trio.sleep(0.05)
                assert worker.link.last_error is not None and "bad token <token> (<token>)" in worker.link.last_error
    assert "bad token <token> (<token>)" in state_file.read_text()
    assert token not in state_file.read_text() and urllib.parse.quote(token, safe="") not in state_file.read_text()


SLEEPER = "import time; print('ready', flush=True); time.sleep(60)"
IGNORES_SIGTERM = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
)


async def wait_ready(connection, stage_run_id):
    ack = await connection.receive("stage.ack", stage_run_id)
    frame = await connection.receive("stage.stdout", stage_run_id)
    assert "ready" in frame["data"]
    return ack["pid"]


# Connection ------------------------------------------------------------------


async def test_hello_then_heartbeat_on_connect(tmp_path, environ, stub_bin):
    write_stub_cli(stub_bin, "claude", "pass")
    with trio.fail_after(10):
        async with open_backend() as backend:
            async with running_worker(backend, tmp_path / "home", environ):
                connection = await backend.next_connection()
                hello = await connection.receive()
                ping = await connection.receive()
    assert hello["type"] == "hello"
    assert hello["capabilities"]["claude_code"]["available"] is True
    assert hello["capabilities"]["protocol_version"] == 2
    assert ping["type"] == "ping" and isinstance(ping["ts"], float)
    assert abs(ping["ts"] - time.time()) < 10
    assert backend.handshakes[0] == "/api/local-worker/connect?token=tok-test"


async def test_rejected_token_is_logged_with_advice_and_retried(tmp_path, environ, caplog):
    caplog.set_level(logging.INFO, logger="pgw")
    with trio.fail_after(10):
        async with open_backend() as backend:
            backend.reject_next(403)
            async with running_worker(backend, tmp_path / "home", environ):
                started = trio.current_time()
                await backend.next_connection()
                assert trio.current_time() - started < 1.5, "first retry within 1 s"
    [line] = [r.getMessage() for r in caplog.records if "cannot connect" in r.getMessage()]
    assert "rejected the token (HTTP 403)" in line and "pgw pair" in line
    assert "tok-test" not in caplog.text


async def test_refused_port_is_logged_once_in_plain_words(tmp_path, environ, caplog):
    caplog.set_level(logging.INFO, logger="pgw")
    with trio.fail_after(10):
        async with open_backend() as backend:
            port = backend.port
        server = f"http://127.0.0.1:{port}"
        worker = pgw.Daemon(pgw.Settings(server=server, token="t", name="n"), tmp_path / "h", environ=environ)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker.run)
            await trio.sleep(2.0)  # two or three attempts: 0.5-1 s, then 1-2 s
            nursery.cancel_scope.cancel()
    failures = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(failures) == 1 and "refused the connection" in failures[0]


async def test_an_internal_error_in_a_connection_is_named_so_with_its_traceback(tmp_path, environ, monkeypatch, caplog):
    # A bug in pgw must neither read as a network problem ("cannot reach
    # host: ExceptionGroup") nor lose its traceback; the daemon goes on.
    caplog.set_level(logging.INFO, logger="pgw")
    calls = []

    async def broken(self, *_):
        calls.append(1)
        if len(calls) == 1:
            raise TypeError("a bug")
        await trio.sleep_forever()

    monkeypatch.setattr(pgw.Connection, "_keepalive", broken)
    with trio.fail_after(10):
        async with open_backend() as backend:
            async with running_worker(backend, tmp_path / "home", environ, timing=pgw.Timing(reconnect_first_s=0.1)):
                await backend.next_connection()  # ended by the bug, maybe before its hello
                await (await backend.next_connection()).receive("hello")
    [lost] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("disconnected")]
    assert "an internal error in pgw" in lost and "TypeError: a bug" in lost and "cannot reach" not in lost
    [error] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert error.exc_info and "raise TypeError" in logging.Formatter().formatException(error.exc_info)


@pytest.mark.parametrize("code", [1000, 1011])
async def test_server_close_is_followed_by_a_reconnect(tmp_path, environ, code):
    with trio.fail_after(10):
        async with connected(tmp_path, environ) as (backend, _, connection):
            await connection.close(code)
            started = trio.current_time()
            again = await backend.next_connection()
            assert (await again.receive("hello"))["type"] == "hello"
            assert trio.current_time() - started < 1.5


async def test_silent_path_is_replaced_within_the_silence_limit(tmp_path, environ):
    # Noticed at the next heartbeat's end: 2 s + 0.5 s for its answer + 1 s for a ping's.
    timing = pgw.Timing(heartbeat_s=2.0, heartbeat_answer_s=0.5, ws_pong_wait_s=1.0)
    with trio.fail_after(15):
        async with open_backend() as backend, open_proxy(backend.port) as proxy:
            async with running_worker(backend, tmp_path / "home", environ, server=proxy.url, timing=timing):
                first = await backend.next_connection()
                await first.receive("hello")
                proxy.go_silent(new_connections=False)
                started = trio.current_time()
                second = await backend.next_connection()
                await second.receive("hello")
                assert trio.current_time() - started < 3.5 + 1.0 + 1.0


@pytest.mark.parametrize("answer_pings", [True, False], ids=["answers-app-pings", "ignores-app-pings"])
async def test_an_idle_connection_costs_one_exchange_a_heartbeat(tmp_path, environ, monkeypatch, answer_pings):
    # The heartbeat's answer is the proof of life: a server that answers it is
    # sent no WebSocket ping at all; one that does not gets one per heartbeat,
    # and the connection stays up.
    timing = pgw.Timing(heartbeat_s=1.0, heartbeat_answer_s=0.2, ws_pong_wait_s=0.3)
    ws_pings = []
    ping = pgw.FrameWriter.ping

    async def counted(self):
        ws_pings.append(trio.current_time())
        await ping(self)

    monkeypatch.setattr(pgw.FrameWriter, "ping", counted)
    with trio.fail_after(20):
        async with open_backend(answer_pings=answer_pings) as backend:
            async with running_worker(backend, tmp_path / "home", environ, timing=timing):
                connection = await backend.next_connection()
                await connection.receive("hello")
                await trio.sleep(6.0)
                heartbeats = [m for m in connection.received if m.get("type") == "ping"]
    assert len(backend.connections) == 1, "the idle connection was dropped"
    assert 6 <= len(heartbeats) <= 7, f"{len(heartbeats)} heartbeats in 6 s"
    expected = 0 if answer_pings else len(heartbeats)
    assert expected - 1 <= len(ws_pings) <= expected, f"{len(ws_pings)} WebSocket pings after {len(heartbeats)} heartbeats"


def answer_heartbeats(monkeypatch, answers):
    """The backend's application answers the heartbeats for which `answers(n)`
    is a delay in seconds (n counts from 1), and leaves the others unanswered;
    its WebSocket layer answers pings at once, as a busy server's would."""
    import backend as backend_module

    original = backend_module.BackendConnection._send_pong
    count = [0]

    async def send_pong(self):
        count[0] += 1
        delay = answers(count[0])
        if delay is not None:
            await trio.sleep(delay)
            await original(self)

    monkeypatch.setattr(backend_module.BackendConnection, "_send_pong", send_pong)


@pytest.mark.parametrize("answers", [
    lambda n: 0 if n == 1 else None,  # answers the first heartbeat, then never again
    lambda n: None if n % 3 == 0 else 0,  # leaves one in three unanswered
    lambda n: 0.8,  # answers each one late, long after the WebSocket ping's answer
], ids=["stops-answering", "one-in-three-unanswered", "answers-late"])
async def test_a_live_server_that_answers_heartbeats_unreliably_is_not_dropped(tmp_path, environ, monkeypatch, answers):
    # The daemon's idle timings divided by 30: heartbeat 30 s, ping 4 s after it, its answer within 9 s.
    answer_heartbeats(monkeypatch, answers)
    timing = pgw.Timing(heartbeat_s=1.0, heartbeat_answer_s=0.13, ws_pong_wait_s=0.3)
    with trio.fail_after(20):
        async with open_backend() as backend:
            async with running_worker(backend, tmp_path / "home", environ, timing=timing):
                await (await backend.next_connection()).receive("hello")
                await trio.sleep(7)
    assert len(backend.connections) == 1, "a live connection was dropped"


async def test_slow_but_live_link_is_not_dropped(tmp_path, environ, stub_bin):
    timing = pgw.Timing(heartbeat_s=0.5, heartbeat_answer_s=0.2, ws_pong_wait_s=0.3, ws_ping_after_s=0.5, silence_limit_s=1.0)
    write_stub_cli(stub_bin, "claude", "import os; print(os.path.getsize('big.bin'))")
    payload = base64.b64encode(os.urandom(900_000)).decode()  # 1.2 MB on the wire
    with trio.fail_after(20):
        async with open_backend() as backend, open_proxy(backend.port) as proxy:
            async with running_worker(backend, tmp_path / "home", environ, server=proxy.url, timing=timing):
                connection = await backend.next_connection()
                await connection.receive("hello")
                proxy.throttle(300_000)  # 4 s for the request: eight heartbeats, four silence limits
                await connection.send(request("big", files={"big.bin": payload}))
                result = await connection.stage_result("big")
    assert result.stdout == "900000\n" and result.returncode == 0
    assert len(backend.connections) == 1


# Stages ----------------------------------------------------------------------

ECHO_CONTEXT = """
import json, os, sys
prompt = sys.stdin.read()
print(json.dumps({
    "cwd": os.getcwd(),
    "prompt": prompt,
    "argv": sys.argv[1:],
    "file": open("in/data.txt").read(),
    "X": os.environ.get("X"),
    "PGW_TOKEN": os.environ.get("PGW_TOKEN"),
    "PGW_STAGE_ID": os.environ.get("PGW_STAGE_ID"),
}))
print("to stderr", file=sys.stderr)
"""


async def test_stage_runs_in_its_scratch_dir_with_files_env_and_prompt(tmp_path, environ, stub_bin):
    write_stub_cli(stub_bin, "claude", ECHO_CONTEXT)
    files = {"in/data.txt": base64.b64encode("données".encode()).decode()}
    with trio.fail_after(10):
        async with connected(tmp_path, environ) as (_, _, connection):
            await connection.send(request("s1", cli_args=["-p", "x y"], stdin="prove it ✓", files=files, env={"X": "1"}))
            result = await connection.stage_result("s1")
    seen = json.loads(result.stdout)
    scratch = tmp_path / "home" / "scratch" / "s1"
    assert seen == {
        "cwd": str(scratch),
        "prompt": "prove it ✓",
        "argv": ["-p", "x y"],
        "file": "données",
        "X": "1",
        "PGW_TOKEN": None,
        "PGW_STAGE_ID": "s1",
    }
    assert result.stderr == "to stderr\n"
    assert result.exit == {"type": "stage.exit", "stage_run_id": "s1", "returncode": 0, "duration_ms": result.exit["duration_ms"], "error": None}
    assert result.seqs == list(range(1, len(result.frames) + 1))
    assert not scratch.exists()


async def test_ack_comes_before_any_output(tmp_path, environ, stub_bin):
    write_stub_cli(stub_bin, "claude", "import sys; sys.stderr.write('e'); print('o')")
    with trio.fail_after(10):
        async with connected(tmp_path, environ) as (_, _, connection):
            await connection.send(request("s1"))
            await connection.stage_result("s1")
            kinds = [m["type"] for m in connection.received if m.get("stage_run_id") == "s1"]
    assert kinds[0] == "stage.ack" and kinds[-1] == "stage.exit"
    assert sorted(kinds[1:-1]) == ["stage.stderr", "stage.stdout"]


async def test_argv_last_appends_the_prompt_and_leaves_stdin_unconnected(tmp_path, environ, stub_bin):
    write_stub_cli(stub_bin, "codex", "import json, sys; print(json.dumps([sys.argv[1:], sys.stdin.read()]))")
    with trio.fail_after(10):
        async with connected(tmp_path, environ) as (_, _, connection):
            await connection.send(request("s1", cli="codex", cli_args=["exec"], stdin="the prompt", stdin_mode="argv_last"))
            result = await connection.stage_result("s1")
    assert json.loads(result.stdout) == [["exec", "the prompt"], ""]


MULTIBYTE_WRITER = """
import os, sys
data = ("aé証😀" * 60000).encode() + b"\\xff\\xfe" + "end".encode()
step = 7919  # a prime: cuts characters everywhere
for start in range(0, len(data), step):
    os.write(1, data[start:start + step])
"""


async def test_output_never_splits_a_character_and_frames_stay_small(tmp_path, environ, stub_bin):
    write_stub_cli(stub_bin, "claude", MULTIBYTE_WRITER)
    expected = (("aé証😀" * 60000).encode() + b"\xff\xfe" + b"end").decode("utf-8", "replace")
    with trio.fail_after(20):
        async with connected(tmp_path, environ) as (_, _, connection):
            await connection.send(request("s1"))
            result = await connection.stage_result("s1")
    assert result.stdout == expected
    assert all(len(frame["data"].encode()) <= 256 * 1024 for frame in result.frames)


async def test_an_ascii_read_after_half_a_character_keeps_its_place(tmp_path, environ, stub_bin):
    # The pump sends an all-ASCII read as it is, but not while a character
    # begun by the read before waits for its end.
    write_stub_cli(stub_bin, "claude", (
        "import os, time\n"
        "os.write(1, b'x\\xc3'); time.sleep(0.3); os.write(1, b'abc'); time.sleep(0.3); os.write(1, b'\\xc3')"
    ))
    with trio.fail_after(20):
        async with connected(tmp_path, environ) as (_, _, connection):
            await connection.send(request("s1"))
            result = await connection.stage_result("s1")
    assert result.stdout == "x\ufffdabc\ufffd"
    assert [frame["data"] for frame in result.frames] == ["x", "\ufffdabc", "\ufffd"]


async def test_output_frames_stay_whole_while_the_server_pings(tmp_path, environ, stub_bin):
    # pgw writes its own frames beside trio-websocket's pongs: they must not interleave.
    write_stub_cli(stub_bin, "claude", (
        "import os\n"
        "line = b'\"quoted\" \\\\ line\\n' * 1000\n"
        "for _ in range(2000): os.write(1, line)"
    ))
    pongs = 0
    with trio.fail_after(60):
        async with connected(tmp_path, environ) as (_, _, connection):
            await connection.send(request("s1"))
            async with trio.open_nursery() as nursery:
                async def ping_until_exit():
                    nonlocal pongs
                    while True:
                        await connection.ws_ping()
                        pongs += 1
                nursery.start_soon(ping_until_exit)
                result = await connection.stage_result("s1")
                nursery.cancel_scope.cancel()
    assert result.stdout == '"quoted" \\ line\n' * 2_000_000
    assert result.seqs == list(range(1, len(result.seqs) + 1))
    assert pongs > 10


async def test_bad_requests_each_get_one_exit_and_the_connection_keeps_serving(tmp_path, environ, stub_bin):
    write_stub_cli(stub_bin, "claude", "print('fine')")
    too_large = base64.b64encode(b"\0" * (50 * 2**20 + 1)).decode()
    bad = {
        "b-cli": (request("b-cli", cli="rm"), "cli: 'rm' is not one of codex, claude, deepseek"),
        "b-type": (request("b-type", cli_args="ls"), "cli_args: expected an array"),
        "b-missing": ({"type": "stage.request", "stage_run_id": "b-missing"}, "job_id: required field missing"),
        "b-abs": (request("b-abs", files={"/tmp/evil": "aGk="}), "unsafe file path '/tmp/evil'"),
        "b-dotdot": (request("b-dotdot", files={"../../evil": "aGk="}), "`..` is not allowed"),
        "b-nul": (request("b-nul", files={"a\0b": "aGk="}), "contains NUL"),
        "b-b64": (request("b-b64", files={"x": "%%%"}), "not valid base64"),
        "b-big": (request("b-big", files={"x": too_large}), "files too large"),
        "b-nocli": (request("b-nocli", cli="deepseek"), "CLI not found: 'deepseek'"),
        "../b-id": (request("../b-id"), "cannot name a scratch directory"),
        # Not JSON, but what Python's json.dumps writes by default (a backend
        # meaning "no timeout"), or a BOM, or a number past Python's 4,300
        # digits: the id is still there to answer.
        "b-nan": (json.dumps(request("b-nan", timeout_s=float("nan"))), "not JSON: NaN is not a JSON number"),
        "b-inf": (json.dumps(request("b-inf", timeout_s=float("inf"))), "not JSON: Infinity is not a JSON number"),
        "b-bom": ("\ufeff" + json.dumps(request("b-bom")), "not JSON: Unexpected UTF-8 BOM"),
        "b-digits": (json.dumps(request("b-digits"))[:-1] + ', "n": ' + "9" * 5000 + "}", "not JSON: a number of more digits than 4300"),
    }
    with trio.fail_after(30):
        async with connected(tmp_path, environ) as (_, _, connection):
            for raw in ("not json", "[1]", json.dumps({"type": "stage.launch"}), json.dumps({"no": "type"})):
                await connection.send(raw)
            for message, _ in bad.values():
                await connection.send(message)
            await connection.send(request("good"))
            good = await connection.stage_result("good")
            for stage_run_id in bad:
                await connection.stage_result(stage_run_id)
            await connection.send(request("good-2"))
            await connection.stage_result("good-2")
            received = list(connection.received)
    assert good.stdout == "fine\n" and good.returncode == 0
    for stage_run_id, (_, error) in bad.items():
        exits = [m for m in received if m["type"] == "stage.exit" and m["stage_run_id"] == stage_run_id]
        assert len(exits) == 1, stage_run_id
        assert exits[0]["returncode"] == -1 and error in exits[0]["error"], exits[0]
        assert not any(m["type"] == "stage.ack" and m["stage_run_id"] == stage_run_id for m in received)
    assert not (tmp_path / "evil").exists() and not (tmp_path / "home" / "b-id").exists()


async def test_repeated_request_for_a_running_stage_is_ignored(tmp_path, environ, stub_bin):
    write_stub_cli(stub_bin, "claude", "import time; time.sleep(0.5); print('once')")
    with trio.fail_after(10):
        async with connected(tmp_path, environ) as (_, _, connection):
            await connection.send(request("s1"))
            await connection.receive("stage.ack", "s1")
            await connection.send(request("s1"))
            result = await connection.stage_result("s1")
            await connection.send(request("after"))
            await connection.stage_result("after")
            mine = [m["type"] for m in connection.received if m.get("stage_run_id") == "s1"]
    assert result.stdout == "once\n"
    assert mine.count("stage.ack") == 1 and mine.count("stage.exit") == 1


async def test_cancel_sigterm_kills_the_group_after_the_grace(tmp_path, environ, stub_bin):
    write_stub_cli(stub_bin, "claude", IGNORES_SIGTERM)
    with trio.fail_after(10):
        async with connected(tmp_path, environ, timing=pgw.Timing(cancel_grace_s=1.0)) as (_, _, connection):
            await connection.send(request("s1"))
            pid = await wait_ready(connection, "s1")
            started = trio.current_time()
            await connection.send(cancel("s1"))
            result = await connection.stage_result("s1")
            elapsed = trio.current_time() - started
            await assert_group_gone(pid)
    assert result.returncode == -9
    assert result.error == "cancelled by the server (SIGTERM)"
    assert 0.9 <= elapsed < 3


async def test_cancel_sigterm_lets_a_polite_child_exit(tmp_path, environ, stub_bin):
    write_stub_cli(stub_bin, "claude", SLEEPER)
    with trio.fail_after(5):
        async with connected(tmp_path, environ) as (_, _, connection):
            await connection.send(request("s1"))
            pid = await wait_ready(connection, "s1")
            await connection.send(cancel("s1"))
            result = await connection.stage_result("s1")
            await assert_group_gone(pid)
    assert result.returncode == -15


async def test_cancel_sigterm_reaches_a_cli_that_stopped_itself(tmp_path, environ, stub_bin):
    # A stopped process takes no signal but SIGKILL until it goes on: the
    # SIGTERM waited, and the stage took the whole grace to die as -9.
    write_stub_cli(stub_bin, "claude", (
        "import os, signal, sys\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))\n"
        "print('ready', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGSTOP)\n"
        "signal.pause()\n"
    ))
    with trio.fail_after(10):  # well under the grace
        async with connected(tmp_path, environ, timing=pgw.Timing(cancel_grace_s=30.0)) as (_, _, connection):
            await connection.send(request("s1"))
            pid = await wait_ready(connection, "s1")
            await connection.send(cancel("s1"))
            result = await connection.stage_result("s1")
            await assert_group_gone(pid)
    assert result.returncode == 7 and result.error == "cancelled by the server (SIGTERM)"


async def test_cancel_sigkill_kills_at_once(tmp_path, environ, stub_bin):
    write_stub_cli(stub_bin, "claude", IGNORES_SIGTERM)
    with trio.fail_after(5):  # well under the 10 s grace
        async with connected(tmp_path, environ) as (_, _, connection):
            await connection.send(request("s1"))
            pid = await wait_ready(connection, "s1")
            await connection.send(cancel("s1", "SIGKILL"))
            result = await connection.stage_result("s1")
            await assert_group_gone(pid)
    assert result.returncode == -9 and result.error == "cancelled by the server (SIGKILL)"


async def test_a_sigkill_cancel_in_a_sigterm_grace_names_the_sigkill(tmp_path, environ, stub_bin):
    write_stub_cli(stub_bin, "claude", IGNORES_SIGTERM)
    with trio.fail_after(5):  # well under the 10 s grace
        async with connected(tmp_path, environ) as (_, _, connection):
            await connection.send(request("s1"))
            await wait_ready(connection, "s1")
            await connection.send(cancel("s1"))
            await trio.sleep(0.3)  # the CLI ignores the SIGTERM
            await connection.send(cancel("s1", "SIGKILL"))
            result = await connection.stage_result("s1")
    assert result.returncode == -9 and result.error == "cancelled by the server (SIGKILL)"


async def test_cancel_of_an_unknown_stage_does_nothing(tmp_path, environ, stub_bin):
    write_stub_cli(stub_bin, "claude", "print('ok')")
    with trio.fail_after(5):
        async with connected(tmp_path, environ) as (_, _, connection):
            await connection.send(cancel("never-was"))
            await connection.send(request("s1"))
            await connection.stage_result("s1")
            await connection.send(cancel("s1", "SIGKILL"))  # finished: a no-op too
            await connection.send(request("s2"))
            await connection.stage_result("s2")
            assert not any(m.get("stage_run_id") == "never-was" for m in connection.received)
            assert [m["type"] for m in connection.received].count("stage.exit") == 2


GRANDCHILD_HOLDS_PIPES = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # inherits stdout/stderr
print(child.pid, flush=True)
"""


async def test_grandchild_holding_the_pipes_does_not_hold_the_stage(tmp_path, environ, stub_bin):
    write_stub_cli(stub_bin, "claude", GRANDCHILD_HOLDS_PIPES)
    with trio.fail_after(10):
        async with connected(tmp_path, environ) as (_, _, connection):
            await connection.send(request("s1"))
            pgid = (await connection.receive("stage.ack", "s1"))["pid"]
            started = trio.current_time()
            result = await connection.stage_result("s1")
            assert trio.current_time() - started < 4
            await assert_group_gone(pgid)
    assert result.returncode == 0 and result.error is None
    assert result.stdout.strip().isdigit()


LINGERS_WITHOUT_PIPES = """
import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
os.close(1); os.close(2)
time.sleep(60)
"""


async def test_timeout_kills_a_child_that_closed_its_pipes_and_lingers(tmp_path, environ, stub_bin):
    write_stub_cli(stub_bin, "claude", LINGERS_WITHOUT_PIPES)
    with trio.fail_after(10):
        async with connected(tmp_path, environ, timing=pgw.Timing(cancel_grace_s=0.5)) as (_, _, connection):
            await connection.send(request("s1", timeout_s=3))  # room for a slow start under load
            pgid = await wait_ready(connection, "s1")
            result = await connection.stage_result("s1")
            await assert_group_gone(pgid)
    assert result.error == "timed out after 3 s"
    assert result.returncode == -9
    assert 3000 <= result.exit["duration_ms"] < 6000


async def test_fifty_concurrent_stages_that_never_read_stdin(tmp_path, environ, stub_bin):
    write_stub_cli(stub_bin, "claude", "import os; print(os.environ['PGW_STAGE_ID'])")
    prompt = "p" * 200_000  # more than a pipe holds: the write must not wedge the stage
    with trio.fail_after(60):
        async with connected(tmp_path, environ) as (_, _, connection):
            for number in range(50):
                await connection.send(request(f"s{number}", stdin=prompt))
            results = [await connection.stage_result(f"s{number}") for number in range(50)]
    for number, result in enumerate(results):
        assert (result.returncode, result.error, result.stdout) == (0, None, f"s{number}\n")


async def test_max_stages_queues_in_order_and_a_cancelled_waiter_never_starts(tmp_path, environ, stub_bin):
    write_stub_cli(stub_bin, "claude", "import time; time.sleep(0.5); print('done')")
    with trio.fail_after(10):
        async with connected(tmp_path, environ, max_stages=1) as (_, _, connection):
            for stage_run_id in ("s1", "s2", "s3"):
                await connection.send(request(stage_run_id))
            await connection.receive("stage.ack", "s1")
            await connection.send(cancel("s2"))
            waiter = await connection.stage_result("s2")
            await connection.stage_result("s3")
            order = [(m["type"], m["stage_run_id"]) for m in connection.received if m["type"] in ("stage.ack", "stage.exit")]
    assert waiter.ack is None and waiter.returncode == -1
    assert waiter.error == "cancelled by the server (SIGTERM), before it started"
    assert order.index(("stage.exit", "s1")) < order.index(("stage.ack", "s3"))


async def test_a_flood_of_stray_messages_cannot_rotate_the_log_away(tmp_path, environ, stub_bin, caplog):
    caplog.set_level(logging.INFO, logger="pgw")
    write_stub_cli(stub_bin, "claude", "print('fine')")
    with trio.fail_after(30):
        async with connected(tmp_path, environ) as (_, _, connection):
            for number in range(3 * pgw.STRAY_LINES_PER_MINUTE):
                await connection.send(cancel(f"gone-{number}"))
            await connection.send(request("after"))
            assert (await connection.stage_result("after")).stdout == "fine\n"
    lines = [record.getMessage() for record in caplog.records]
    assert sum("cancel for no running stage ignored" in line for line in lines) == pgw.STRAY_LINES_PER_MINUTE
    assert sum("counted, not logged" in line for line in lines) == 1
    assert any("stage 'after': ended" in line for line in lines)


async def test_a_stage_stopped_while_its_many_files_are_written_ends_at_once(tmp_path, environ, stub_bin):
    # Writing runs in a thread trio cannot cancel: 300,000 files held a
    # shutdown (or a cancel) for 40 s.  The writer stops between two files.
    write_stub_cli(stub_bin, "claude", "print('ran')")
    files = {f"d{number // 1000}/f{number}": "" for number in range(60_000)}
    with trio.fail_after(60):
        async with connected(tmp_path, environ) as (_, worker, connection):
            await connection.send(request("many", files=files))
            scratch = tmp_path / "home" / "scratch" / "many"
            while not (scratch / "d0").exists():
                await trio.sleep(0.01)
            await connection.send(cancel("many"))
            with trio.move_on_after(5):
                stopped = await connection.stage_result("many")
            assert "many" not in worker.stages, "the cancel waited for every file to be written"
    assert stopped.error == "cancelled by the server (SIGTERM), before it started", stopped.error
    assert not scratch.exists()


async def test_the_files_of_a_queued_stage_wait_on_disk_not_in_memory(tmp_path, environ, stub_bin):
    # Each request may carry 50 MiB of files: a queue of them held in memory,
    # decoded and as base64, had pgw at 1.26 GB for ten.
    write_stub_cli(stub_bin, "claude", "import sys, time\nif sys.argv[1:] == ['hold']:\n    time.sleep(60)\nprint(open('f').read())")
    with trio.fail_after(30):
        async with connected(tmp_path, environ, max_stages=1) as (_, worker, connection):
            await connection.send(request("s1", cli_args=["hold"]))
            await connection.receive("stage.ack", "s1")
            await connection.send(request("s2", files={"f": base64.b64encode(b"waited").decode()}))
            scratch = tmp_path / "home" / "scratch" / "s2"
            while "s2" not in worker.stages or not (scratch / "f").exists():
                await trio.sleep(0.01)
            queued = worker.stages["s2"]
            assert not queued.running, "precondition: s2 waits for the slot"
            assert queued.prepared.files == [] and queued.request.files == {}
            await connection.send(cancel("s1", "SIGKILL"))
            waited = await connection.stage_result("s2")
    assert waited.stdout == "waited\n"


async def test_slow_server_slows_the_child_and_nothing_is_lost(tmp_path, environ, stub_bin):
    write_stub_cli(
        stub_bin,
        "claude",
        "import sys\nfor n in range(300):\n    sys.stdout.write(f'{n:08d}' + 'x' * (100_000 - 9) + '\\n')",
    )
    with trio.fail_after(60):
        async with connected(tmp_path, environ) as (_, worker, connection):
            connection.pause_reading()
            await connection.send(request("s1"))
            await trio.sleep(2.0)
            read_while_paused = worker.stages["s1"].output.bytes_out
            connection.resume_reading()
            result = await connection.stage_result("s1")
    assert read_while_paused < 20 * 2**20, "pgw kept reading the child while the server did not read"
    lines = result.stdout.splitlines()
    assert [int(line[:8]) for line in lines] == list(range(300))
    assert result.seqs == list(range(1, len(result.frames) + 1))


LAST_WORDS_ON_SIGTERM = """
import signal, sys, time
def bye(*_):
    print("after SIGTERM", flush=True)
    sys.exit(3)
signal.signal(signal.SIGTERM, bye)
print("before", flush=True)
time.sleep(60)
"""


def catches(pid, signum) -> bool:
    """Whether process `pid` has a handler for `signum` (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            caught = next(line for line in status if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(int(caught.split()[1], 16) & (1 << (signum - 1)))


@pytest.mark.parametrize("server", ["reading", "not-reading-for-a-while"])
async def test_a_cancelled_stage_sends_what_its_cli_wrote_before_and_during_its_grace(tmp_path, environ, stub_bin, server):
    # A stop cancelled the pumps: a read waiting for room in the outbox (a
    # slow server) was dropped, and what the CLI wrote once told to stop
    # (its last words, partial results) was never read.
    write_stub_cli(stub_bin, "claude", LAST_WORDS_ON_SIGTERM)
    write_stub_cli(stub_bin, "codex", "import sys\nfor _ in range(300):\n    sys.stdout.write('x' * 100_000 + '\\n')")
    with trio.fail_after(60):
        async with connected(tmp_path, environ) as (_, worker, connection):
            if server != "reading":
                connection.pause_reading()
                await connection.send(request("big", cli="codex"))
                # Until its pump waits for room in the outbox: what the socket's
                # buffers took first varies (700 KB to several MiB).
                while "big" not in worker.stages or not worker.stages["big"].output.pumps_waiting_on_server:
                    await trio.sleep(0.01)
            await connection.send(request("victim"))
            while "victim" not in worker.stages or worker.stages["victim"].root is None:
                await trio.sleep(0.01)
            # Its SIGTERM handler is set, and "before" on its way (its ack, or
            # a read of it, may wait for room in the outbox): a fixed sleep was
            # outrun by a loaded machine.
            while not catches(worker.stages["victim"].root.cli_pid, signal.SIGTERM):
                await trio.sleep(0.01)
            await trio.sleep(0.2)
            await connection.send(cancel("victim"))
            await trio.sleep(0.5)
            connection.resume_reading()
            victim = await connection.stage_result("victim")
    assert (victim.stdout, victim.returncode, victim.error) == ("before\nafter SIGTERM\n", 3, "cancelled by the server (SIGTERM)")
    assert victim.seqs == list(range(1, len(victim.frames) + 1))


@pytest.mark.parametrize("signals", [1, 2])
async def test_a_shutdown_ends_in_its_time_when_the_server_stopped_reading(tmp_path, environ, stub_bin, signals):
    # The exits wait for room in the outbox, which a server that reads nothing
    # never makes: pgw waited until the keepalive gave the link up (43 s), a
    # second signal or not.
    write_stub_cli(stub_bin, "claude", "import sys\nwhile True:\n    sys.stdout.write('x' * 100_000 + '\\n')")
    timing = pgw.Timing(shutdown_grace_s=0.5, close_timeout_s=0.5)
    ended = trio.Event()
    with trio.fail_after(60):
        async with open_backend() as backend:
            settings = pgw.Settings(server=backend.url, token=backend.token, name="test-box")
            worker = pgw.Daemon(settings, tmp_path / "home", environ=environ, timing=timing)

            async def run_worker() -> None:
                await worker.run()
                ended.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_worker)
                connection = await backend.next_connection()
                await connection.receive("hello")
                await connection.send(request("s1"))
                await connection.receive("stage.ack", "s1")
                connection.pause_reading()
                while True:  # until pgw can send no more: the socket's buffers are full
                    before = worker.stages["s1"].output.bytes_out
                    await trio.sleep(0.5)
                    if worker.stages["s1"].output.bytes_out == before:
                        break
                for _ in range(signals):
                    worker.request_shutdown()
                with trio.move_on_after(timing.shutdown_grace_s + 2 * timing.close_timeout_s + 5):
                    await ended.wait()
                stopped = ended.is_set()
                nursery.cancel_scope.cancel()
    assert stopped, "pgw was still shutting down"


CODEX_WITH_ROLLOUT = """
import json, os, pathlib, time
day = pathlib.Path(os.environ["CODEX_HOME"], "sessions", *time.strftime("%Y %m %d").split())  # as codex files it
day.mkdir(parents=True, exist_ok=True)
records = [
    {"type": "session_meta", "payload": {"cwd": str(pathlib.Path.cwd().resolve())}},
    {"type": "response_item", "payload": {"type": "message", "role": "assistant", "content": [{"text": "step one"}]}},
    {"type": "response_item", "payload": {"type": "message", "role": "assistant", "content": [{"text": "final"}]}},
]
(day / "rollout-x.jsonl").write_text("\\n".join(json.dumps(r) for r in records))
print("final")
"""


async def test_codex_stage_gets_its_rollout_extract_before_exit(tmp_path, environ, stub_bin):
    write_stub_cli(stub_bin, "codex", CODEX_WITH_ROLLOUT)
    environ["CODEX_HOME"] = str(tmp_path / "codex")
    with trio.fail_after(10):
        async with connected(tmp_path, environ) as (_, _, connection):
            await connection.send(request("s1", cli="codex"))
            result = await connection.stage_result("s1")
    assert result.frames[-1]["type"] == "stage.stdout"
    trace = result.frames[-1]["data"]
    assert "=== CODEX TRACE (rollout extract) ===" in trace and "step one" in trace and "final" not in trace


# Where codex writes its rollout is the stage's own CODEX_HOME (or HOME): the
# config's env or the request's may set it, and pgw looked only in its own.
@pytest.mark.parametrize("set_by", ["config", "request", "request-home"])
async def test_the_rollout_is_found_where_the_stages_own_environment_puts_it(tmp_path, environ, stub_bin, set_by):
    write_stub_cli(stub_bin, "codex", CODEX_WITH_ROLLOUT.replace(
        'os.environ["CODEX_HOME"]', 'os.environ.get("CODEX_HOME") or os.path.join(os.environ["HOME"], ".codex")'
    ))
    environ.pop("CODEX_HOME", None)
    codex_home = str(tmp_path / "stage-codex")
    env = {"request": {"CODEX_HOME": codex_home}, "request-home": {"HOME": str(tmp_path / "stage-home")}}.get(set_by, {})
    settings = {"stage_env": {"CODEX_HOME": codex_home}} if set_by == "config" else {}
    with trio.fail_after(10):
        async with connected(tmp_path, environ, **settings) as (_, _, connection):
            await connection.send(request("s1", cli="codex", env=env))
            result = await connection.stage_result("s1")
    assert result.returncode == 0 and "step one" in result.frames[-1]["data"], result.frames


async def test_a_lone_surrogate_in_a_rollout_is_sent_as_u_fffd_not_an_internal_error(tmp_path, environ, stub_bin):
    # JSON lets a file hold `\ud800`: split_text's encode raised, and the stage
    # ended as an internal error with its trace lost.
    write_stub_cli(stub_bin, "codex", CODEX_WITH_ROLLOUT.replace('"step one"', '"step \\ud800 one" + "a" * 100000'))
    environ["CODEX_HOME"] = str(tmp_path / "codex")
    with trio.fail_after(10):
        async with connected(tmp_path, environ) as (_, _, connection):
            await connection.send(request("s1", cli="codex"))
            result = await connection.stage_result("s1")
    assert result.returncode == 0 and result.error is None, result.error
    trace = "".join(frame["data"] for frame in result.frames)
    assert "step \ufffd one" in trace and "\ud800" not in trace


async def test_connection_loss_kills_running_stages_and_reconnects(tmp_path, environ, stub_bin):
    write_stub_cli(stub_bin, "claude", SLEEPER)
    with trio.fail_after(10):
        async with connected(tmp_path, environ) as (backend, _, connection):
            await connection.send(request("s1"))
            pgid = await wait_ready(connection, "s1")
            await connection.abort()
            second = await backend.next_connection()
            await second.receive("hello")
            await assert_group_gone(pgid, within_s=0.5)
            assert not (tmp_path / "home" / "scratch" / "s1").exists()


async def test_scratch_is_emptied_when_run_starts(tmp_path, environ):
    leftover = tmp_path / "home" / "scratch" / "old-run"
    leftover.mkdir(parents=True)
    (leftover / "f").write_text("x")
    with trio.fail_after(5):
        async with connected(tmp_path, environ):
            assert list((tmp_path / "home" / "scratch").iterdir()) == []


# The daemon as a process: signals and logs ------------------------------------


@asynccontextmanager
async def daemon_process(command: list[str], backend: Backend, home: Path, stub_bin: Path, *extra: str):
    pgw.write_config(home / "config.json", {"server": backend.url, "worker_id": "w-1", "token": backend.token})
    env = {
        "PATH": f"{stub_bin}:/usr/bin:/bin",
        "HOME": str(home.parent),
        "PGW_HOME": str(home),
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    process = await trio.lowlevel.open_process([*command, "run", *extra], env=env, stdin=-3)  # DEVNULL
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_sigterm_mid_stage_sends_exits_closes_1001_and_leaves_nothing(tmp_path, stub_bin):
    write_stub_cli(stub_bin, "claude", SLEEPER)
    write_stub_cli(stub_bin, "codex", IGNORES_SIGTERM)
    home = tmp_path / "home"
    with trio.fail_after(30):
        async with open_backend() as backend:
            async with daemon_process([sys.executable, str(ROOT / "pgw.py")], backend, home, stub_bin) as daemon:
                connection = await backend.next_connection()
                await connection.send(request("polite"))
                await connection.send(request("stubborn", cli="codex"))
                polite = await wait_ready(connection, "polite")
                stubborn = await wait_ready(connection, "stubborn")
                daemon.send_signal(signal.SIGHUP)
                await trio.sleep(0.3)
                assert daemon.returncode is None, "SIGHUP must not stop pgw"
                started = trio.current_time()
                daemon.send_signal(signal.SIGTERM)
                results = [await connection.stage_result(s) for s in ("polite", "stubborn")]
                assert await daemon.wait() == 0
                elapsed = trio.current_time() - started
                await connection.closed.wait()
            await assert_group_gone(polite)
            await assert_group_gone(stubborn)
    assert [r.error for r in results] == ["worker shutting down"] * 2
    assert [r.returncode for r in results] == [-15, -9]
    assert connection.close_code == 1001
    assert 4.5 <= elapsed < 10, "SIGTERM, a 5 s grace, SIGKILL"
    log_text = (home / "run.log").read_text()
    assert "stage 'polite': started cli=claude" in log_text and "stage 'stubborn': ended cli=codex" in log_text
    assert backend.token not in log_text


@pytest.mark.parametrize("signals", [["SIGTERM", "SIGINT"], ["SIGQUIT"]], ids=["a-second-signal", "sigquit"])
async def test_quitting_at_once_skips_the_grace_and_still_sends_the_exits(tmp_path, stub_bin, signals):
    # A second SIGTERM/SIGINT, or a first SIGQUIT (Ctrl-\\), whose Python
    # default ended pgw on the spot: no log line, and no exit for the stage,
    # which the server then waited for in vain.
    write_stub_cli(stub_bin, "claude", IGNORES_SIGTERM)
    home = tmp_path / "home"
    with trio.fail_after(20):
        async with open_backend() as backend:
            async with daemon_process([sys.executable, str(ROOT / "pgw.py")], backend, home, stub_bin) as daemon:
                connection = await backend.next_connection()
                await connection.send(request("s1"))
                pgid = await wait_ready(connection, "s1")
                started = trio.current_time()
                for name in signals:
                    daemon.send_signal(getattr(signal, name))
                    await trio.sleep(0.3)
                result = await connection.stage_result("s1")
                assert await daemon.wait() == 0
                assert trio.current_time() - started < 4, "no 5 s grace: at once"
            await assert_group_gone(pgid)
    assert result.returncode == -9 and result.error == "worker shutting down"
    assert ("received SIGQUIT: quitting now" in (home / "run.log").read_text()) == (signals == ["SIGQUIT"])


async def test_a_close_left_unanswered_after_every_exit_went_out_is_no_lost_exit(tmp_path, stub_bin):
    # The log said "pgw stopped without sending every stage's exit" whenever
    # the server did not answer the close in time, though every exit had gone.
    write_stub_cli(stub_bin, "claude", IGNORES_SIGTERM)
    home = tmp_path / "home"
    with trio.fail_after(30):
        async with open_backend() as backend:
            async with daemon_process([sys.executable, str(ROOT / "pgw.py")], backend, home, stub_bin) as daemon:
                connection = await backend.next_connection()
                await connection.send(request("s1"))
                await wait_ready(connection, "s1")
                connection.pause_reading()  # the exit reaches the socket; nothing answers the close
                # The read already under way when reading paused takes this one.
                await connection.send(request("refused", cli="rm"))
                await connection.receive("stage.exit", "refused")
                daemon.send_signal(signal.SIGQUIT)
                assert await daemon.wait() == 0
                connection.resume_reading()
                result = await connection.stage_result("s1")
    assert result.error == "worker shutting down"
    log_text = (home / "run.log").read_text()
    assert "every stage's exit was sent; the server did not answer the close in time" in log_text
    assert "without sending every stage's exit" not in log_text


@pytest.mark.parametrize("planted", ["fifo", "symlink"])
async def test_run_lock_is_replaced_not_written_through(tmp_path, stub_bin, planted):
    # A FIFO at run.lock held `run` in its open for ever, deaf to SIGTERM (and
    # status and stop took it for not running); a symlink had it truncate
    # and write the file it pointed to.
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("mine\n")
    if planted == "fifo":
        os.mkfifo(home / "run.lock")
    else:
        (home / "run.lock").symlink_to(victim)
    with trio.fail_after(30):
        async with open_backend() as backend:
            async with daemon_process([sys.executable, str(ROOT / "pgw.py")], backend, home, stub_bin) as daemon:
                await (await backend.next_connection()).receive("hello")
                pid_file = home / "run.lock"
                assert pid_file.is_file() and not pid_file.is_symlink()
                assert pid_file.read_text() == f"{daemon.pid}\n"
                assert pgw.instance_lock_holder(home) == daemon.pid
                daemon.send_signal(signal.SIGTERM)
                assert await daemon.wait() == 0
    assert victim.read_text() == "mine\n"


def test_a_run_log_that_cannot_be_written_is_why_status_says_run_did_not_start(capsys, tmp_path, monkeypatch):
    # The reason went to run.log only, which could not be written: status
    # showed an older, unrelated error.  A FIFO there was named as "No such
    # device or address; fix its permissions".
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    pgw.write_json_atomically(home / "state.json", {"pid": None, "last_error": "an old error"})
    os.mkfifo(home / "run.log")
    monkeypatch.setenv("PGW_HOME", str(home))
    assert pgw.main(["run", "--token", "tok0123456789abcdef", "--server", "http://127.0.0.1:9"]) == 1
    assert capsys.readouterr().err == (
        f"pgw: cannot write the log {home / 'run.log'}: not a regular file; fix or remove it, or set PGW_HOME to a"
        " directory you own\n"
    )
    assert pgw.main(["status"]) == 1
    assert f"last error cannot write the log {home / 'run.log'}: not a regular file" in capsys.readouterr().out


# `pgw run` signalling itself at its first step, as a watchdog (or a closing
# terminal) may signal it while it starts.
SIGNALLED_WHILE_STARTING = (
    "import os, signal, sys\n"
    "import pgw\n"
    "checked = pgw.run_preflight\n"
    "pgw.run_preflight = lambda args: (os.kill(os.getpid(), getattr(signal, sys.argv[1])), checked(args))[1]\n"
    "sys.exit(pgw.main(sys.argv[2:]))\n"
)


@pytest.mark.parametrize("name", ["SIGQUIT", "SIGHUP"])
async def test_a_signal_while_starting_is_obeyed_as_once_running(tmp_path, stub_bin, name):
    # Before the daemon's own handlers were set, SIGQUIT killed `run` with a
    # core dump and SIGHUP (which pgw ignores) killed it too, with no log line.
    home = tmp_path / "home"
    with trio.fail_after(30):
        async with open_backend() as backend:
            async with daemon_process([sys.executable, "-c", SIGNALLED_WHILE_STARTING, name], backend, home, stub_bin) as daemon:
                if name == "SIGQUIT":
                    assert await daemon.wait() == 0
                else:
                    await backend.next_connection()
                    daemon.send_signal(signal.SIGTERM)
                    assert await daemon.wait() == 0
    log_text = (home / "run.log").read_text()
    assert ("received SIGQUIT while starting: quitting now" in log_text) == (name == "SIGQUIT")
    assert "stopped" in log_text


RESTARTED_WITHOUT_TOKEN = (
    "import os, signal, sys\n"
    "import pgw\n"
    "restart = pgw._restart_without_token_in_ps\n"
    "def signalled_first(token, early=()):\n"
    "    if token in sys.argv:  # the first process: signalled just before it restarts\n"
    "        os.kill(os.getpid(), signal.SIGQUIT)\n"
    "    restart(token, early)\n"
    "pgw._restart_without_token_in_ps = signalled_first\n"
    "sys.exit(pgw.main(sys.argv[1:]))\n"
)


async def test_a_signal_just_before_the_token_restart_is_obeyed_after_it(tmp_path, stub_bin):
    # `run --token` starts itself again without the token in its arguments: a
    # signal noted before that exec was lost, and the daemon ran on.
    home = tmp_path / "home"
    with trio.fail_after(30):
        async with open_backend() as backend:
            async with daemon_process([sys.executable, "-c", RESTARTED_WITHOUT_TOKEN], backend, home, stub_bin,
                                      "--token", backend.token) as daemon:
                assert await daemon.wait() == 0
    assert "received SIGQUIT while starting: quitting now" in (home / "run.log").read_text()


def test_run_when_not_paired_says_how_to_pair(capsys, pgw_home):
    assert pgw.main(["run"]) == 1
    err = capsys.readouterr().err
    assert err == "pgw: not paired yet: run `pgw pair CODE --server URL` (or pass --token)\n"


def test_run_rejects_a_negative_max_stages(capsys, pgw_home):
    assert pgw.main(["run", "--max-stages", "-1"]) == 2


@pytest.mark.filterwarnings("error")  # an unclosed socket's ResourceWarning fails the test
async def test_failed_attempts_leave_no_open_sockets(tmp_path, environ):
    timing = pgw.Timing(reconnect_first_s=0.01, reconnect_cap_s=0.02)
    with trio.fail_after(20):
        async with open_backend() as backend:
            backend.reject_next(403, count=5)
            async with running_worker(backend, tmp_path / "home", environ, timing=timing):
                await backend.next_connection()  # one warm-up: trio's own fds exist now
            before = len(os.listdir("/proc/self/fd"))
            backend.reject_next(403, count=30)
            async with running_worker(backend, tmp_path / "home", environ, timing=timing):
                second = await backend.next_connection()
                await second.abort()
                await backend.next_connection()
            await trio.sleep(0.1)
            after = len(os.listdir("/proc/self/fd"))
    assert after <= before + 2, f"{after - before} file descriptors leaked over 31 failed connections"


async def test_verbose_log_shows_frames_but_no_contents(tmp_path, environ, stub_bin, caplog):
    caplog.set_level(logging.DEBUG, logger="pgw")
    write_stub_cli(stub_bin, "claude", "import os; print('out-' + os.environ['API_KEY'])")
    with trio.fail_after(10):
        async with connected(tmp_path, environ) as (_, _, connection):
            await connection.send(request("s1", env={"API_KEY": "sk-secret"}, stdin="prompt-secret"))
            assert (await connection.stage_result("s1")).stdout == "out-sk-secret\n"
    assert "received stage.request s1 cli=claude" in caplog.text
    assert "sent stage.stdout s1 seq=1" in caplog.text
    assert "secret" not in caplog.text and "tok-test" not in caplog.text


async def test_trio_websocket_still_has_the_lock_pgw_writes_under():
    # FrameWriter writes pgw's own frames under trio-websocket's private
    # stream lock; an upgrade that renames or drops it must fail here, by name.
    import trio_websocket

    assert "trio-websocket==0.12.2" in (ROOT / "requirements.lock").read_text()
    with trio.fail_after(10):
        async with open_backend() as backend:
            async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{backend.port}/api/local-worker/connect?token={backend.token}") as ws:
                assert isinstance(getattr(ws, pgw.TRIO_WEBSOCKET_STREAM_LOCK), trio.StrictFIFOLock)


async def test_a_flood_of_pings_never_holds_up_the_reader_behind_a_slow_send():
    # A server that pinged every few ms while pgw's sends crawled (its end
    # read slowly, under load): each ping's pong waited for the send lock, and
    # the reader with it, so a stage.cancel sat unread behind the pings and
    # the keepalive, seeing nothing read for 30 s, dropped the connection and
    # every stage.  The reader notes a ping and goes on; one pong answers the
    # latest when the lock is free, as RFC 6455 5.5.3 allows.
    import wsproto
    import wsproto.events

    ours, theirs = trio.testing.memory_stream_pair()
    server = wsproto.WSConnection(wsproto.ConnectionType.SERVER)

    async def receive_events():
        while True:
            events = list(server.events())
            if events:
                return events
            server.receive_data(await theirs.receive_some())

    async def accept():
        assert isinstance((await receive_events())[0], wsproto.events.Request)
        await theirs.send_all(server.send(wsproto.events.AcceptConnection()))

    settings = pgw.Settings(server="http://h", token="t", compression=False)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept)
            pings = pgw.LatestPing()
            ws, _ = await pgw.open_websocket(nursery, ours, settings, 5, pings=pings)
            frames = pgw.FrameWriter(ws, ours, None)
            lock = getattr(ws, pgw.TRIO_WEBSOCKET_STREAM_LOCK)
            await lock.acquire()  # a send that crawls
            nursery.start_soon(frames.answer_pings, pings)
            flood = b"".join(server.send(wsproto.events.Ping(b"%d" % number)) for number in range(1000))
            await theirs.send_all(flood + server.send(wsproto.events.TextMessage("after the pings")))
            with trio.fail_after(3):
                assert await ws.get_message() == "after the pings"
            lock.release()
            [pong] = await receive_events()
            assert pong == wsproto.events.Pong(b"999")
            nursery.cancel_scope.cancel()


async def test_a_pump_slow_to_run_is_not_taken_for_an_outside_process_holding_the_pipes(tmp_path, environ, stub_bin, monkeypatch, caplog):
    # Under heavy load (a load average of 18 on 2 cores) the pumps did not get
    # to read the pipes' end within the drain's grace after the CLI's exit:
    # pgw logged "a process outside the stage holds its pipes" and stopped
    # reading, which would lose what was still in them.  Nothing holds a pipe
    # whose end is waiting to be read.
    caplog.set_level(logging.INFO, logger="pgw")
    write_stub_cli(stub_bin, "claude", "import sys\nsys.stdout.write('x' * 100000)")
    receive_now = pgw.receive_now

    async def starved(pipe, max_bytes):
        if max_bytes > 4096:  # an output pump's read, not the report pipe's
            await trio.sleep(0.3)  # longer than the grace below, at every read
        return await receive_now(pipe, max_bytes)

    monkeypatch.setattr(pgw, "receive_now", starved)
    with trio.fail_after(60):
        async with connected(tmp_path, environ, timing=pgw.Timing(pipe_drain_grace_s=0.1)) as (_, _, connection):
            await connection.send(request("s1"))
            result = await connection.stage_result("s1")
    assert result.returncode == 0 and result.stdout == "x" * 100000
    assert "holds its pipes" not in caplog.text


async def test_a_pipe_held_outside_the_stage_after_the_other_ended_does_not_hold_the_stage(tmp_path, environ, stub_bin, caplog):
    # A process outside the stage (here this test, through /proc) keeps the
    # CLI's stderr open after stdout ended: the drain must still give up on
    # it, whatever a pipe read to its end reports when polled.
    caplog.set_level(logging.INFO, logger="pgw")
    write_stub_cli(stub_bin, "claude", "import sys, time\nprint('ready', flush=True)\ntime.sleep(1)")
    with trio.fail_after(30):
        async with connected(tmp_path, environ, timing=pgw.Timing(pipe_drain_grace_s=0.2)) as (_, _, connection):
            await connection.send(request("s1"))
            pid = (await connection.receive("stage.ack", "s1"))["pid"]
            await connection.receive("stage.stdout", "s1")
            held = os.open(f"/proc/{pid}/fd/2", os.O_WRONLY)  # the stderr pipe, opened anew
            try:
                result = await connection.stage_result("s1")
            finally:
                os.close(held)
    assert result.returncode == 0 and result.stdout == "ready\n"
    assert "stage 's1': a process outside the stage holds its pipes; stopped reading" in caplog.text
