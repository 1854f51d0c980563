"""Faults: a backend that breaks, children that misbehave, a daemon that dies.

Whatever breaks, pgw must end every stage in bounded time with
exactly one `stage.exit` (when the connection that carries it survives),
leave no process of the stage running (its group, its grandchildren, and
setsid escapees: every process of the stage carries `PGW_STAGE_ID=<id>` in
its environment, so the checks here scan /proc for it), remove its scratch
dir, and keep serving. Children are real processes: stub CLIs on a PATH fixture.

Most tests run pgw's Daemon in-process against the in-process backend, with
a pgw.Timing of shorter waits. Where the process itself is
the point (memory, signals, SIGKILL, limits) pgw runs as a separate process:
the built `pgw.pyz` where a user would run it, else `python pgw.py`.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import resource
import signal
import subprocess
import sys
import time
import uuid
import zipfile
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio

import pgw
from backend import BackendConnection, open_backend, open_proxy
from conftest import ROOT, write_stub_cli
from test_run import (  # noqa: F401 - `environ` is a fixture
    IGNORES_SIGTERM,
    cancel,
    connected,
    environ,
    live_group_members,
    request,
    running_worker,
)

PYZ = ROOT / "pgw.pyz"

##############################################################################
# Helpers
##############################################################################


def unique(name: str) -> str:
    """A stage id no other test session uses: the scans for survivors look for
    PGW_STAGE_ID=<id> machine-wide, and another session's "s1" is not ours."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


def process_state(pid: int) -> str | None:
    """The state letter of `pid` (R, S, Z, ...), None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2]


def is_alive(pid: int) -> bool:
    return process_state(pid) not in (None, "Z")


def tagged_processes(stage_run_id: str) -> list[int]:
    """Live pids whose environment carries PGW_STAGE_ID=<stage_run_id> (Linux /proc)."""
    tag = f"PGW_STAGE_ID={stage_run_id}".encode() + b"\0"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ_bytes = (entry / "environ").read_bytes()
        except OSError:
            continue
        if (environ_bytes.startswith(tag) or b"\0" + tag in environ_bytes) and is_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


async def assert_nothing_left(stage_run_id: str, pgid: int | None, home: Path, within_s: float = 2.0) -> None:
    """No live member of the stage's group, no process carrying its tag, no scratch dir."""
    with trio.move_on_after(within_s):
        while (pgid is not None and live_group_members(pgid)) or tagged_processes(stage_run_id):
            await trio.sleep(0.05)
    if pgid is not None:
        assert live_group_members(pgid) == [], f"stage {stage_run_id}: process group {pgid} survived"
    assert tagged_processes(stage_run_id) == [], f"stage {stage_run_id}: tagged processes survived"
    assert not (home / "scratch" / stage_run_id).exists(), f"stage {stage_run_id}: scratch dir left"


async def assert_group_gone_within(pgid: int, within_s: float = 2.0) -> None:
    with trio.move_on_after(within_s):
        while live_group_members(pgid):
            await trio.sleep(0.05)
    assert live_group_members(pgid) == [], f"process group {pgid} survived"


async def assert_dead(pid: int, within_s: float = 2.0) -> None:
    with trio.move_on_after(within_s):
        while is_alive(pid):
            await trio.sleep(0.05)
    assert not is_alive(pid), f"pid {pid} survived"


def exits_for(connection: BackendConnection, stage_run_id: str) -> list[dict]:
    return [m for m in connection.received if m.get("type") == "stage.exit" and m.get("stage_run_id") == stage_run_id]


async def assert_one_exit(connection: BackendConnection, stage_run_id: str, settle_s: float = 0.3) -> None:
    """Exactly one stage.exit for the stage, and nothing about it after that."""
    await trio.sleep(settle_s)
    ours = [m for m in connection.received if m.get("stage_run_id") == stage_run_id]
    assert len(exits_for(connection, stage_run_id)) == 1, [m.get("type") for m in ours]
    assert ours[-1]["type"] == "stage.exit", "a frame came after the stage's exit"


async def first_stdout(connection: BackendConnection, stage_run_id: str) -> tuple[int, str]:
    """(pid from the ack, data of the first stdout frame)."""
    ack = await connection.receive("stage.ack", stage_run_id)
    frame = await connection.receive("stage.stdout", stage_run_id)
    return ack["pid"], frame["data"]


def kill_groups(pgids: list[int]) -> None:
    """Test cleanup: whatever pgw failed to kill must not outlive the test."""
    for pgid in pgids:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


# pgw as a separate process -----------------------------------------------------


@attrs.frozen
class PgwCommand:
    """How to start pgw as a process: argv prefix and the environment it needs."""

    argv: tuple[str, ...]
    env: dict[str, str]


@pytest.fixture(scope="session")
def pyz_pgw(tmp_path_factory) -> PgwCommand:
    """The built pgw.pyz, run by the Python behind this venv, as a user runs it."""
    if not PYZ.is_file():
        pytest.fail(f"{PYZ} is missing: run ./build.sh first")
    with zipfile.ZipFile(PYZ) as archive:
        if archive.read("site-packages/pgw.py") != (ROOT / "pgw.py").read_bytes():
            pytest.fail(f"{PYZ} holds an older pgw.py: run ./build.sh to rebuild it")
    python = getattr(sys, "_base_executable", sys.executable)  # not the venv: only what the pyz carries
    # One extraction for the whole session instead of one per test.
    return PgwCommand((python, str(PYZ)), {"SHIV_ROOT": str(tmp_path_factory.mktemp("shiv"))})


@pytest.fixture(scope="session")
def script_pgw() -> PgwCommand:
    """`python pgw.py` from this checkout."""
    return PgwCommand((sys.executable, str(ROOT / "pgw.py")), {"PYTHONPATH": os.pathsep.join(sys.path)})


@asynccontextmanager
async def pgw_daemon(
    pgw_command: PgwCommand,
    home: Path,
    stub_bin: Path,
    *args: str,
    server: str,
    token: str,
    extra_env: dict[str, str] | None = None,
    **popen_options,
):
    """`pgw run ARGS` as a process, paired with `server`; stopped if still running at the end
    (two SIGTERMs, so that it kills its stages at once; SIGKILL if that fails)."""
    if not (home / "config.json").exists():
        pgw.write_config(home / "config.json", {"server": server, "worker_id": "w-1", "token": token})
    env = {
        "PATH": f"{stub_bin}:/usr/bin:/bin",
        "HOME": str(home.parent),
        "PGW_HOME": str(home),
        **pgw_command.env,
        **(extra_env or {}),
    }
    process = await trio.lowlevel.open_process(
        [*pgw_command.argv, "run", *args], env=env, stdin=subprocess.DEVNULL, **popen_options
    )
    try:
        yield process
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                await trio.sleep(0.1)
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                with trio.move_on_after(5):
                    await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


def vm_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


##############################################################################
# The connection breaks while stages run
##############################################################################

STREAMER = """
import itertools, subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a grandchild in the group
for n in itertools.count():
    print(f"{n:08d}", flush=True)
    time.sleep(0.002)
"""

QUICK = "print('quick')"


def write_fault_stubs(stub_bin: Path) -> None:
    """claude streams (with a grandchild), codex ignores SIGTERM, deepseek exits at once."""
    write_stub_cli(stub_bin, "claude", STREAMER)
    write_stub_cli(stub_bin, "codex", IGNORES_SIGTERM)
    write_stub_cli(stub_bin, "deepseek", QUICK)


async def start_streaming(connection: BackendConnection, stages: dict[str, str]) -> dict[str, int]:
    """Send each stage (stage_run_id -> cli) and wait for its output: their process groups."""
    for stage_run_id, cli in stages.items():
        await connection.send(request(stage_run_id, cli=cli))
    return {stage_run_id: (await first_stdout(connection, stage_run_id))[0] for stage_run_id in stages}


async def break_connection(how: str, connection: BackendConnection, proxy) -> None:
    if how.startswith("close-"):
        await connection.close(int(how.removeprefix("close-")))
    elif how == "abort":
        await connection.abort()
    elif how == "proxy-reset":
        proxy.reset_all()
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["close-1000", "close-1011", "abort", "proxy-reset"])
async def test_connection_broken_mid_stream_kills_every_stage_and_reconnects(tmp_path, environ, stub_bin, how):
    timing = pgw.Timing(cancel_grace_s=1.0)
    write_fault_stubs(stub_bin)
    home = tmp_path / "home"
    stages = {unique("stream-1"): "claude", unique("stream-2"): "claude", unique("stubborn"): "codex"}
    with trio.fail_after(20):
        async with open_backend() as backend, open_proxy(backend.port) as proxy:
            async with running_worker(backend, home, environ, server=proxy.url, timing=timing):
                first = await backend.next_connection()
                await first.receive("hello")
                pgids = await start_streaming(first, stages)
                try:
                    await break_connection(how, first, proxy)
                    broken = trio.current_time()
                    second = await backend.next_connection()
                    await second.receive("hello")
                    # The stubborn child costs the 1 s grace; the first retry comes within 1 s.
                    assert trio.current_time() - broken < 1.0 + 1.0 + 1.0
                    for stage_run_id, pgid in pgids.items():
                        await assert_nothing_left(stage_run_id, pgid, home, within_s=0.5)
                    await second.send(request("after", cli="deepseek"))
                    after = await second.stage_result("after")
                finally:
                    kill_groups(list(pgids.values()))
    assert (after.returncode, after.error, after.stdout) == (0, None, "quick\n")
    assert not any(m.get("stage_run_id") in stages for m in second.received), "an old stage spoke on the new connection"


async def test_backend_restart_while_stages_run(tmp_path, environ, stub_bin):
    """The backend goes away (1001) and a new one comes up behind the same address."""
    timing = pgw.Timing(cancel_grace_s=1.0)
    write_fault_stubs(stub_bin)
    home = tmp_path / "home"
    stages = {unique("stream"): "claude", unique("stubborn"): "codex"}
    with trio.fail_after(30):
        async with open_backend() as old, open_proxy(old.port) as proxy:
            async with running_worker(old, home, environ, server=proxy.url, timing=timing):
                connection = await old.next_connection()
                await connection.receive("hello")
                pgids = await start_streaming(connection, stages)
                try:
                    await old.aclose()
                    assert connection.close_code == 1001
                    await trio.sleep(1.5)  # down for a while: some reconnects are refused
                    async with open_backend() as new:
                        proxy.target_port = new.port
                        restarted = trio.current_time()
                        again = await new.next_connection()
                        await again.receive("hello")
                        # Backoff after ~2 refusals: at most 1 s, then 2 s, then 4 s (jitter below).
                        assert trio.current_time() - restarted < 4.5
                        for stage_run_id, pgid in pgids.items():
                            await assert_nothing_left(stage_run_id, pgid, home, within_s=0.5)
                        await again.send(request("after", cli="deepseek"))
                        after = await again.stage_result("after")
                finally:
                    kill_groups(list(pgids.values()))
    assert after.returncode == 0 and after.stdout == "quick\n"


async def test_silent_path_kills_the_stages_and_reconnects_within_the_limit(tmp_path, environ, stub_bin):
    timing = pgw.Timing(silence_limit_s=3.0, ws_ping_after_s=1.0, cancel_grace_s=1.0)  # the limits while stages run
    write_fault_stubs(stub_bin)
    home = tmp_path / "home"
    stages = {unique("stream"): "claude", unique("stubborn"): "codex"}
    with trio.fail_after(30):
        async with open_backend() as backend, open_proxy(backend.port) as proxy:
            async with running_worker(backend, home, environ, server=proxy.url, timing=timing):
                first = await backend.next_connection()
                await first.receive("hello")
                await trio.sleep(0.5)  # the first heartbeat answered: idle, pgw waits for the next one
                pgids = await start_streaming(first, stages)
                try:
                    proxy.go_silent(new_connections=False)
                    silent = trio.current_time()
                    second = await backend.next_connection()
                    await second.receive("hello")
                    # silence limit + SIGTERM grace + first retry, and a margin
                    assert trio.current_time() - silent < 3.0 + 1.0 + 1.0 + 2.0
                    for stage_run_id, pgid in pgids.items():
                        await assert_nothing_left(stage_run_id, pgid, home, within_s=0.5)
                    await second.send(request("after", cli="deepseek"))
                    after = await second.stage_result("after")
                finally:
                    kill_groups(list(pgids.values()))
                    proxy.connections[0].reset()  # the black-holed one: no 2 s close timeout at teardown
    assert after.returncode == 0 and after.stdout == "quick\n"
    assert len(backend.connections) == 2


##############################################################################
# Children that misbehave
##############################################################################
# Each case: the stub CLI, how the stage is ended (by itself, a cancel or its
# timeout), and what its exit must say. Every case also checks: one exit, in
# bounded time, its group and its tagged processes gone, its scratch removed.

TREE_IGNORING_SIGTERM = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by the whole tree, exec included
stubborn = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
for _ in range(3):
    subprocess.Popen([sys.executable, "-c", stubborn])
print("ready", flush=True)
time.sleep(60)
"""

GRANDCHILDREN_KEEP_WRITING = """
import subprocess, sys
writer = "import itertools, time\\nfor n in itertools.count():\\n    print(n, flush=True)\\n    time.sleep(0.01)"
for _ in range(2):
    subprocess.Popen([sys.executable, "-c", writer])  # inherit stdout and stderr
print("ready", flush=True)
"""

ESCAPEE = """
import subprocess, sys, time
escapee = subprocess.Popen(
    [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"],
    start_new_session=True, {pipes}
)
print(escapee.pid, flush=True)
{then}
"""
ESCAPEE_HOLDING_PIPES = ESCAPEE.format(pipes="", then="")
ESCAPEE_WITHOUT_PIPES = ESCAPEE.format(
    pipes="stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL", then=""
)
ESCAPEE_THEN_WAITS = ESCAPEE.format(pipes="", then="time.sleep(60)")

CLOSES_PIPES_AND_LINGERS = """
import os, time
print("ready", flush=True)
os.close(1); os.close(2)
time.sleep(60)
"""

NEVER_READS_STDIN = "import time; time.sleep(0.3)"
NEVER_READS_STDIN_AND_WAITS = "import time; print('ready', flush=True); time.sleep(60)"

BINARY_SEED = 5
BINARY_BYTES = 1 << 20
BINARY_WRITER = f"""
import os, random
rng = random.Random({BINARY_SEED})
out, err = rng.randbytes({BINARY_BYTES}), rng.randbytes({BINARY_BYTES})
step = 4093  # a prime: sequences cut everywhere
for start in range(0, len(out), step):
    os.write(1, out[start:start + step])
    os.write(2, err[start:start + step])
"""

STDERR_LINES = 100 * 2**20 // 64  # 100 MiB of 64-byte numbered lines
STDERR_BATCH = 4096


def numbered_lines(start: int, stop: int, width: int, filler: str) -> str:
    body = filler * (width - 8)
    return "".join(f"{n:07d}{body}\n" for n in range(start, stop))


STDERR_WRITER = f"""
import sys
def numbered_lines(start, stop, width, filler):
    body = filler * (width - 8)
    return "".join(f"{{n:07d}}{{body}}\\n" for n in range(start, stop))
for start in range(0, {STDERR_LINES}, {STDERR_BATCH}):
    sys.stderr.write(numbered_lines(start, start + {STDERR_BATCH}, 64, "e"))
sys.stderr.flush()
print("done")
"""


@attrs.frozen
class Misbehaviour:
    script: str
    end: str = "exit"  # "exit": it ends by itself; "cancel-SIGTERM", "cancel-SIGKILL"; "timeout"
    returncode: int = 0
    error: str | None = None
    within_s: float = 3.0  # from the end trigger (the request, for "exit") to the stage's exit
    stdin: str = ""
    escapee: bool = False  # stdout's first line is the pid of a setsid'd grandchild


MISBEHAVIOURS = {
    "tree-ignores-sigterm-cancelled": Misbehaviour(
        TREE_IGNORING_SIGTERM, "cancel-SIGTERM", -9, "cancelled by the server (SIGTERM)", within_s=3.0
    ),
    "tree-ignores-sigterm-timed-out": Misbehaviour(
        TREE_IGNORING_SIGTERM, "timeout", -9, "timed out after 1 s", within_s=4.0
    ),
    "grandchildren-keep-writing-to-the-pipes": Misbehaviour(GRANDCHILDREN_KEEP_WRITING, within_s=5.0),
    "setsid-escapee-holds-the-pipes": Misbehaviour(ESCAPEE_HOLDING_PIPES, within_s=5.0, escapee=True),
    "setsid-escapee-without-pipes": Misbehaviour(ESCAPEE_WITHOUT_PIPES, escapee=True),
    "setsid-escapee-then-cancelled": Misbehaviour(
        ESCAPEE_THEN_WAITS, "cancel-SIGKILL", -9, "cancelled by the server (SIGKILL)", escapee=True
    ),
    "closes-pipes-and-lingers-then-cancelled": Misbehaviour(
        CLOSES_PIPES_AND_LINGERS, "cancel-SIGTERM", -15, "cancelled by the server (SIGTERM)"
    ),
    "never-reads-a-large-prompt": Misbehaviour(NEVER_READS_STDIN, stdin="p" * (8 * 2**20)),
    "never-reads-a-large-prompt-then-cancelled": Misbehaviour(
        NEVER_READS_STDIN_AND_WAITS, "cancel-SIGTERM", -15, "cancelled by the server (SIGTERM)", stdin="p" * (8 * 2**20)
    ),
    "exits-at-once": Misbehaviour("pass"),
    "exits-at-once-with-status-3": Misbehaviour("raise SystemExit(3)", returncode=3),
    "kills-itself": Misbehaviour("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", returncode=-9),
    "invalid-utf8-and-binary": Misbehaviour(BINARY_WRITER),
    "100-mib-to-stderr": Misbehaviour(STDERR_WRITER, within_s=20.0),
}


@pytest.mark.parametrize("case", MISBEHAVIOURS, ids=list(MISBEHAVIOURS))
async def test_misbehaving_child_ends_with_one_exit_and_leaves_nothing(tmp_path, environ, stub_bin, case):
    behaviour = MISBEHAVIOURS[case]
    write_stub_cli(stub_bin, "claude", behaviour.script)
    write_stub_cli(stub_bin, "codex", QUICK)
    home = tmp_path / "home"
    timeout = {"timeout_s": 1} if behaviour.end == "timeout" else {}
    leftovers: list[int] = []
    s1 = unique("s1")
    with trio.fail_after(40):
        async with connected(tmp_path, environ, timing=pgw.Timing(cancel_grace_s=1.0)) as (_, _, connection):
            try:
                started = trio.current_time()
                await connection.send(request(s1, stdin=behaviour.stdin, **timeout))
                pgid = (await connection.receive("stage.ack", s1))["pid"]
                leftovers.append(pgid)
                if behaviour.escapee or behaviour.end.startswith("cancel"):
                    first_line = (await connection.receive("stage.stdout", s1))["data"]
                if behaviour.escapee:
                    escapee = int(first_line.split()[0])
                    assert process_state(escapee) is not None, "the escapee never started"
                    assert os.getpgid(escapee) != pgid, "the escapee did not leave the group"
                    leftovers.append(escapee)
                if behaviour.end.startswith("cancel"):
                    await trio.sleep(0.2)  # let the tree grow
                    started = trio.current_time()
                    await connection.send(cancel(s1, behaviour.end.removeprefix("cancel-")))
                result = await connection.stage_result(s1)
                took = trio.current_time() - started
                if behaviour.escapee:
                    await assert_dead(escapee, within_s=1.0)
                await assert_nothing_left(s1, pgid, home)
                await connection.send(request("next", cli="codex"))  # the worker still serves
                assert (await connection.stage_result("next")).stdout == "quick\n"
                await assert_one_exit(connection, s1, settle_s=0)
            finally:
                kill_groups(leftovers[:1])
                kill_pids(leftovers[1:])
    assert (result.returncode, result.error) == (behaviour.returncode, behaviour.error)
    assert took < behaviour.within_s, f"the stage took {took:.1f} s to end"
    assert result.seqs == list(range(1, len(result.frames) + 1))
    assert all(len(frame["data"].encode()) <= 256 * 1024 for frame in result.frames)
    if case == "invalid-utf8-and-binary":
        rng = random.Random(BINARY_SEED)
        out, err = rng.randbytes(BINARY_BYTES), rng.randbytes(BINARY_BYTES)
        assert result.stdout == out.decode("utf-8", "replace")
        assert result.stderr == err.decode("utf-8", "replace")
    if case == "100-mib-to-stderr":
        expected = hashlib.sha256()
        for start in range(0, STDERR_LINES, STDERR_BATCH):
            expected.update(numbered_lines(start, start + STDERR_BATCH, 64, "e").encode())
        received = hashlib.sha256()
        for frame in result.frames:
            if frame["type"] == "stage.stderr":
                received.update(frame["data"].encode())
        assert received.hexdigest() == expected.hexdigest(), "stderr arrived changed, cut or out of order"
        assert result.stdout == "done\n"


async def test_a_cli_that_cannot_start_gets_an_error_exit(tmp_path, environ, stub_bin):
    (stub_bin / "claude").write_text("#!/nonexistent/interpreter\n")
    (stub_bin / "claude").chmod(0o755)
    with trio.fail_after(10):
        async with connected(tmp_path, environ) as (_, _, connection):
            await connection.send(request("s1"))
            result = await connection.stage_result("s1")
            await assert_one_exit(connection, "s1")
    assert result.ack is None and result.returncode == -1
    assert result.error.startswith("cannot start claude: ")


##############################################################################
# A slow backend (pgw as a process: its memory is measured)
##############################################################################

BIG_LINES = 200 * 1024  # 1 KiB lines: 200 MiB
BIG_BATCH = 64
BIG_WRITER = f"""
import sys
def numbered_lines(start, stop, width, filler):
    body = filler * (width - 8)
    return "".join(f"{{n:07d}}{{body}}\\n" for n in range(start, stop))
for start in range(0, {BIG_LINES}, {BIG_BATCH}):
    sys.stdout.write(numbered_lines(start, start + {BIG_BATCH}, 1024, "."))
"""
THROTTLE_BYTES_PER_S = 1_000_000  # a slow home uplink
RSS_LIMIT_BYTES = 100_000_000
HEARTBEAT_GAP_LIMIT_S = 31.0  # an app ping every 30 s, on time


async def sample_rss(pid: int, samples: list[int], every_s: float = 0.5) -> None:
    while True:
        try:
            samples.append(vm_rss_bytes(pid))
        except OSError:
            return
        await trio.sleep(every_s)


async def record_pings(connection: BackendConnection, arrivals: list[tuple[float, float]]) -> None:
    """(arrival time at the backend, seconds since the ping's own ts) for every app ping."""
    while True:
        ping = await connection.receive("ping")
        arrivals.append((trio.current_time(), time.time() - ping["ts"]))


def expected_big_output_digest() -> str:
    digest = hashlib.sha256()
    for start in range(0, BIG_LINES, BIG_BATCH):
        digest.update(numbered_lines(start, start + BIG_BATCH, 1024, ".").encode())
    return digest.hexdigest()


@pytest.mark.takes_s(211)
async def test_slow_backend_gets_200_mib_in_order_with_bounded_memory_and_a_timely_heartbeat(tmp_path, stub_bin, pyz_pgw):
    """About 210 s: 200 MiB through a 1 MB/s proxy. CI runs it."""
    write_stub_cli(stub_bin, "claude", BIG_WRITER)
    home = tmp_path / "home"
    rss: list[int] = []
    pings: list[tuple[float, float]] = []
    with trio.fail_after(420):
        async with open_backend() as backend, open_proxy(backend.port) as proxy:
            async with pgw_daemon(pyz_pgw, home, stub_bin, server=proxy.url, token=backend.token) as daemon:
                connection = await backend.next_connection()
                await connection.receive("hello")
                proxy.throttle(THROTTLE_BYTES_PER_S)
                async with trio.open_nursery() as watchers:
                    watchers.start_soon(sample_rss, daemon.pid, rss)
                    watchers.start_soon(record_pings, connection, pings)
                    started = trio.current_time()
                    await connection.send(request("big"))
                    result = await connection.stage_result("big")
                    finished = trio.current_time()
                    watchers.cancel_scope.cancel()
                assert daemon.returncode is None, "pgw died"
    digest = hashlib.sha256()
    lines = 0
    for frame in result.frames:
        assert frame["type"] == "stage.stdout", frame["type"]
        digest.update(frame["data"].encode())
        lines += frame["data"].count("\n")
    assert (result.returncode, result.error) == (0, None)
    assert result.seqs == list(range(1, len(result.frames) + 1))
    assert lines == BIG_LINES
    assert digest.hexdigest() == await trio.to_thread.run_sync(expected_big_output_digest), "output changed or reordered"
    assert len(backend.connections) == 1, "pgw dropped a slow but live connection"
    peak = max(rss)
    print(f"\n200 MiB at 1 MB/s: {finished - started:.0f} s, pgw RSS {rss[0] / 1e6:.0f} MB at start, peak {peak / 1e6:.0f} MB")
    assert peak < RSS_LIMIT_BYTES, f"pgw's RSS reached {peak / 1e6:.0f} MB"
    during = [arrival for arrival, _ in pings if started <= arrival <= finished]
    gaps = [later - earlier for earlier, later in zip(during, during[1:])]
    latency = max(late for arrival, late in pings if started <= arrival <= finished)
    print(f"heartbeat: {len(during)} pings during the transfer, gaps {min(gaps):.1f}-{max(gaps):.1f} s, "
          f"each at most {latency:.1f} s behind its ts")
    assert len(during) >= (finished - started) // 30 - 1
    assert max(gaps) <= HEARTBEAT_GAP_LIMIT_S, f"heartbeat gaps {[round(g, 1) for g in gaps]}"


##############################################################################
# The daemon itself: SIGTERM, SIGKILL, a full disk (pgw as a process)
##############################################################################

TREE_WITH_ESCAPEE = """
import subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
escapee = subprocess.Popen(
    [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True,
    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
)
print(escapee.pid, flush=True)
time.sleep(60)
"""


async def test_sigkilled_daemon_leaves_nothing_once_restarted(tmp_path, stub_bin, pyz_pgw):
    """Extends test_unattended's case: several stages, grandchildren and setsid escapees, the pyz:
    nothing outlives the SIGKILLed daemon, and its restart empties scratch/."""
    write_stub_cli(stub_bin, "claude", TREE_WITH_ESCAPEE)
    home = tmp_path / "home"
    stages = tuple(unique(f"orphan-{n}") for n in range(3))
    pgids: list[int] = []
    escapees: list[int] = []
    with trio.fail_after(40):
        async with open_backend() as backend:
            try:
                async with pgw_daemon(pyz_pgw, home, stub_bin, server=backend.url, token=backend.token) as daemon:
                    connection = await backend.next_connection()
                    for stage_run_id in stages:
                        await connection.send(request(stage_run_id))
                    for stage_run_id in stages:
                        pgid, first_line = await first_stdout(connection, stage_run_id)
                        pgids.append(pgid)
                        escapees.append(int(first_line))
                    daemon.kill()
                    await daemon.wait()
                # Each stage root sees pgw go (its command pipe closes) and kills its stage.
                for pgid in pgids:
                    await assert_group_gone_within(pgid)
                for pid in escapees:
                    await assert_dead(pid)
                assert sorted(p.name for p in (home / "scratch").iterdir()) == sorted(stages)
                async with pgw_daemon(pyz_pgw, home, stub_bin, server=backend.url, token=backend.token):
                    again = await backend.next_connection()
                    await again.receive("hello")
                    for stage_run_id, pgid in zip(stages, pgids):
                        await assert_nothing_left(stage_run_id, pgid, home)
                    assert list((home / "scratch").iterdir()) == []
            finally:
                kill_groups(pgids)
                kill_pids(escapees)


async def test_sigterm_stops_running_and_waiting_stages_and_escapees(tmp_path, stub_bin, pyz_pgw):
    """Extends test_run's SIGTERM case: escapees, a stage streaming, one waiting for a slot, the pyz."""
    write_stub_cli(stub_bin, "claude", STREAMER)
    write_stub_cli(stub_bin, "codex", ESCAPEE_THEN_WAITS)  # its escapee holds the pipes and ignores SIGTERM
    home = tmp_path / "home"
    stream, escaper, waiting = unique("stream"), unique("escaper"), unique("waiting")
    leftovers_groups: list[int] = []
    escapees: list[int] = []
    with trio.fail_after(40):
        async with open_backend() as backend:
            try:
                async with pgw_daemon(
                    pyz_pgw, home, stub_bin, "--max-stages", "2", server=backend.url, token=backend.token
                ) as daemon:
                    connection = await backend.next_connection()
                    await connection.send(request(stream))
                    await connection.send(request(escaper, cli="codex"))
                    await connection.send(request(waiting))
                    stream_pgid, _ = await first_stdout(connection, stream)
                    escaper_pgid, first_line = await first_stdout(connection, escaper)
                    leftovers_groups += [stream_pgid, escaper_pgid]
                    escapees.append(int(first_line))
                    daemon.send_signal(signal.SIGTERM)
                    results = {s: await connection.stage_result(s) for s in (stream, escaper, waiting)}
                    assert await daemon.wait() == 0
                for stage_run_id, pgid in ((stream, stream_pgid), (escaper, escaper_pgid)):
                    await assert_nothing_left(stage_run_id, pgid, home, within_s=0.5)
                await assert_dead(escapees[0], within_s=0.5)
            finally:
                kill_groups(leftovers_groups)
                kill_pids(escapees)
    assert connection.close_code == 1001
    assert [(r.returncode, r.error) for r in results.values()] == [
        (-15, "worker shutting down"),
        (-15, "worker shutting down"),
        (-1, "worker shutting down, before it started"),
    ]
    assert results[waiting].ack is None
    for stage_run_id in results:
        assert len(exits_for(connection, stage_run_id)) == 1
    assert list((home / "scratch").iterdir()) == []


def try_mount_tmpfs(directory: Path, size: str) -> bool:
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(directory)],
                          capture_output=True, check=False)
    return done.returncode == 0


@pytest.mark.parametrize("full", ["tmpfs-enospc", "rlimit-fsize"])
async def test_full_disk_while_writing_files_fails_the_stage_not_the_daemon(tmp_path, stub_bin, script_pgw, full):
    """A full disk (a 2 MiB tmpfs as scratch: ENOSPC) or a file-size limit (EFBIG): an error exit, pgw lives on."""
    write_stub_cli(stub_bin, "claude", "import os; print(sorted(os.listdir('.')))")
    home = tmp_path / "home"
    scratch = home / "scratch"
    popen_options = {}
    if full == "tmpfs-enospc":
        if not try_mount_tmpfs(scratch, "2m"):
            pytest.skip("cannot mount a tmpfs here (needs root); rlimit-fsize covers the same path")
    else:
        limit = 2 * 2**20

        def limit_file_size() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        popen_options["preexec_fn"] = limit_file_size
    too_big = base64.b64encode(os.urandom(3 * 2**20)).decode()
    small = base64.b64encode(b"fits").decode()
    try:
        with trio.fail_after(30):
            async with open_backend() as backend:
                async with pgw_daemon(
                    script_pgw, home, stub_bin, server=backend.url, token=backend.token, **popen_options
                ) as daemon:
                    connection = await backend.next_connection()
                    await connection.send(request("full", files={"a.txt": small, "big.bin": too_big}))
                    failed = await connection.stage_result("full")
                    await connection.send(request("fits", files={"a.txt": small}))
                    fits = await connection.stage_result("fits")
                    await assert_one_exit(connection, "full")
                    assert daemon.returncode is None, "pgw died"
                    assert len(backend.connections) == 1
                    assert list(scratch.iterdir()) == [], "the half-written scratch dir was left"
    finally:
        if full == "tmpfs-enospc":
            subprocess.run(["umount", "-l", str(scratch)], check=False)
    reason = "No space left on device" if full == "tmpfs-enospc" else "File too large"
    assert failed.ack is None and failed.returncode == -1
    assert failed.error == f"cannot write the stage's files: {reason}"
    assert (fits.returncode, fits.error, fits.stdout) == (0, None, "['a.txt']\n")
