"""Containment: nothing a stage starts outlives the stage, whatever it does.

Each escape kind is a stub CLI that starts a stubborn process (it ignores
SIGTERM and SIGHUP) meant to outlive it: in a new session or process group,
with an emptied environment, after a double fork, through `nohup … & disown`,
or as a "hopper" that forks and exits every 3 ms so its pid never stays the
same.  Each is ended every way a stage ends: its CLI exits, a cancel, its
timeout, the connection's loss, the daemon's SIGTERM, and the daemon's
SIGKILL (then a restart).  The escapees carry a marker in their argv, the one
thing an emptied environment does not remove, and the checks scan
/proc/*/cmdline for it.  Linux only: elsewhere pgw kills the process group.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import trio

import pgw
from backend import open_backend
from conftest import write_stub_cli
from test_faults import is_alive, pgw_daemon, process_state, pyz_pgw  # noqa: F401 - pyz_pgw is a fixture
from test_run import cancel, connected, environ, live_processes, request, running_worker  # noqa: F401 - environ is a fixture

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the subreaper and /proc are Linux's")

# The escapee: it outlives everything it can, touching its ready file as it
# goes (the file's mtime moving is the proof of life that no pid gives a hopper).
ESCAPEE = (
    "import os, signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN); signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
    "open(sys.argv[2], 'w').close()\n"
    "while True:\n"
    "    os.utime(sys.argv[2])\n"
    "    time.sleep(0.01)\n"
)
# The hopper: a new pid every 3 ms, so one pass over the processes may not see it at all.
HOPPER = (
    "import os, signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN); signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
    "open(sys.argv[2], 'w').close()\n"
    "while True:\n"
    "    if os.fork():\n"
    "        os._exit(0)\n"
    "    os.utime(sys.argv[2])\n"
    "    time.sleep(0.003)\n"
)

DETACHED = """
def detached(code, leave):
    # A double fork; the grandchild leaves the stage's session or group, drops
    # its pipes and execs with an empty environment.
    if os.fork() == 0:
        if os.fork() == 0:
            leave()
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.execve(sys.executable, [sys.executable, "-c", code, MARKER, READY], {})
        os._exit(0)
    os.wait()

def hold_roots_pipes():
    # Opens, through /proc, every pipe its stage root holds, for writing: a
    # reader of one then never sees its end of file.
    root, held = os.getppid(), []
    for name in os.listdir(f"/proc/{root}/fd"):
        try:
            if os.readlink(f"/proc/{root}/fd/{name}").startswith("pipe:"):
                held.append(os.open(f"/proc/{root}/fd/{name}", os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            continue
    for fd in held:
        os.set_inheritable(fd, True)  # into the escapee
"""

ESCAPES = {
    "setsid-empty-env": "detached(ESCAPEE, os.setsid)",
    "setpgid-empty-env": "detached(ESCAPEE, lambda: os.setpgid(0, 0))",
    "nohup-disown": (
        "subprocess.run(['/bin/bash', '-c', f'{shutil.which(\"nohup\")} {sys.executable} -c {shlex.quote(ESCAPEE)} "
        "{MARKER} {READY} >/dev/null 2>&1 & disown'], env={}, check=True)"
    ),
    "hopper": "detached(HOPPER, os.setsid)",
    "holds-the-roots-pipes": "hold_roots_pipes(); detached(ESCAPEE, os.setsid)",
}

STUB = """
import os, shlex, shutil, subprocess, sys, time
MARKER = {marker!r}
READY = os.environ["ESCAPEE_READY"]  # outside the scratch dir: it outlives the stage
ESCAPEE = {escapee!r}
HOPPER = {hopper!r}
{detached}
{escape}
for _ in range(500):
    if os.path.exists(READY):
        break
    time.sleep(0.01)
print("ready", flush=True)
if sys.argv[1] != "exit":
    time.sleep(120)
"""

ENDINGS_IN_PROCESS = ("exit", "cancel", "timeout", "disconnect")
ENDINGS_OF_THE_DAEMON = ("daemon-sigterm", "daemon-sigkill")


def marked_processes(marker: str) -> list[int]:
    """Live pids whose argv carries `marker`, the newest first: a hopper's
    live pid is the newest, and a pass over thousands of its zombies ends
    long after the pid it listed first has gone."""
    needle = marker.encode()
    found = []
    for pid in sorted((int(name) for name in os.listdir("/proc") if name.isdigit()), reverse=True):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline and is_alive(pid):
            found.append(pid)
    return found


def children_of(pid: int) -> list[int]:
    """Live pids whose parent is `pid`."""
    return [child for child, parent, _ in live_processes() if parent == pid]


def kill_marked(marker: str) -> None:
    """Test cleanup: whatever pgw failed to kill must not outlive the test.  A
    hopper's new pid every 3 ms can outrun pass after pass, but not its process
    group, which every escapee here shares with its descendants."""
    empty_passes = 0
    for _ in range(200):
        pids = marked_processes(marker)
        empty_passes = 0 if pids else empty_passes + 1
        if empty_passes == 5:  # one pass may fall between a hopper's forks
            return
        for pid in pids:
            try:
                group = os.getpgid(pid)
                if group != os.getpgrp():
                    os.killpg(group, signal.SIGKILL)
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


async def still_running(ready: Path) -> bool:
    """Whether the escapee still touches its ready file: a pid-free proof of life."""
    before = ready.stat().st_mtime_ns
    await trio.sleep(0.25)
    return ready.stat().st_mtime_ns != before


async def assert_none_left(tmp_path: Path, marker: str, within_s: float = 3.0) -> None:
    ready = tmp_path / f"{marker}.ready"
    with trio.move_on_after(within_s):
        while marked_processes(marker) or await still_running(ready):
            pass
    assert not await still_running(ready), "an escapee outlived its stage"
    assert marked_processes(marker) == [], "an escapee outlived its stage"


def escapee_env(tmp_path: Path, marker: str) -> dict[str, str]:
    """The request's env: where the escapee says it ran (the CLI waits for that before "ready")."""
    return {"ESCAPEE_READY": str(tmp_path / f"{marker}.ready")}


def assert_escapee_ran(tmp_path: Path, marker: str) -> None:
    assert (tmp_path / f"{marker}.ready").exists(), "precondition: the escapee never ran"


def write_escaping_cli(stub_bin: Path, kind: str, marker: str) -> None:
    write_stub_cli(stub_bin, "claude", STUB.format(
        marker=marker, escapee=ESCAPEE, hopper=HOPPER, detached=DETACHED, escape=ESCAPES[kind],
    ))


@pytest.mark.parametrize("ending", ENDINGS_IN_PROCESS)
@pytest.mark.parametrize("kind", ESCAPES)
async def test_no_escapee_outlives_a_stage_that_ends(tmp_path, environ, stub_bin, kind, ending):
    marker = f"pgw-escapee-{uuid.uuid4().hex}"
    write_escaping_cli(stub_bin, kind, marker)
    timing = pgw.Timing(cancel_grace_s=1.0)
    try:
        with trio.fail_after(30):
            async with connected(tmp_path, environ, timing=timing) as (backend, _, connection):
                fields = {"timeout_s": 2} if ending == "timeout" else {}
                await connection.send(request("s1", cli_args=[ending], env=escapee_env(tmp_path, marker), **fields))
                assert (await connection.receive("stage.stdout", "s1"))["data"] == "ready\n"
                assert_escapee_ran(tmp_path, marker)
                if ending != "exit":
                    assert await still_running(tmp_path / f"{marker}.ready"), "precondition: it runs beside its stage"
                if ending == "cancel":
                    await connection.send(cancel("s1"))
                if ending == "disconnect":
                    await connection.abort()
                    await (await backend.next_connection()).receive("hello")
                else:
                    result = await connection.stage_result("s1")
                await assert_none_left(tmp_path, marker)
    finally:
        kill_marked(marker)
    if ending != "disconnect":
        expected = {
            "exit": (0, None),
            "cancel": (-15, "cancelled by the server (SIGTERM)"),
            "timeout": (-15, "timed out after 2 s"),
        }[ending]
        assert (result.returncode, result.error) == expected


@pytest.mark.parametrize("ending", ENDINGS_OF_THE_DAEMON)
@pytest.mark.parametrize("kind", ESCAPES)
async def test_no_escapee_outlives_the_daemon(tmp_path, stub_bin, pyz_pgw, kind, ending):  # noqa: F811
    marker = f"pgw-escapee-{uuid.uuid4().hex}"
    write_escaping_cli(stub_bin, kind, marker)
    home = tmp_path / "home"
    try:
        with trio.fail_after(40):
            async with open_backend() as backend:
                async with pgw_daemon(pyz_pgw, home, stub_bin, server=backend.url, token=backend.token) as daemon:
                    connection = await backend.next_connection()
                    await connection.send(request("s1", cli_args=["wait"], env=escapee_env(tmp_path, marker)))
                    assert (await connection.receive("stage.stdout", "s1"))["data"] == "ready\n"
                    assert_escapee_ran(tmp_path, marker)
                    assert await still_running(tmp_path / f"{marker}.ready"), "precondition: it runs beside its stage"
                    spawner = children_of(daemon.pid)
                    assert len(spawner) == 1, "precondition: pgw's one child is the stage spawner"
                    if ending == "daemon-sigterm":
                        daemon.send_signal(signal.SIGTERM)
                        result = await connection.stage_result("s1")
                        assert await daemon.wait() == 0
                        assert result.error == "worker shutting down"
                    else:
                        daemon.kill()
                        await daemon.wait()
                await assert_none_left(tmp_path, marker)
                with trio.move_on_after(3):
                    while is_alive(spawner[0]):
                        await trio.sleep(0.05)
                assert not is_alive(spawner[0]), "the stage spawner outlived pgw"
                if ending == "daemon-sigkill":
                    async with pgw_daemon(pyz_pgw, home, stub_bin, server=backend.url, token=backend.token):
                        await (await backend.next_connection()).receive("hello")
                        assert list((home / "scratch").iterdir()) == []
    finally:
        kill_marked(marker)


SPAWNER_THEN_ROOT = [
    (kind, spawner, root)
    for kind in ("setsid-empty-env", "hopper")
    for spawner in (signal.SIGKILL, signal.SIGSTOP)
    for root in (signal.SIGKILL, signal.SIGSTOP)
]


@pytest.mark.parametrize(
    "kind, spawner_signal, root_signal", SPAWNER_THEN_ROOT,
    ids=[f"{kind}-spawner-{signal.Signals(s).name}-root-{signal.Signals(r).name}" for kind, s, r in SPAWNER_THEN_ROOT],
)
async def test_a_cli_that_kills_the_spawner_then_its_root_takes_nothing_past_the_stage(
    tmp_path, stub_bin, pyz_pgw, kind, spawner_signal, root_signal  # noqa: F811
):
    # With its root's subreaper, the spawner, gone (or stopped) first, the
    # stage's processes would pass to init once the root dies.  `pgw run` is a
    # subreaper itself: they pass to pgw, which kills them.
    marker = f"pgw-escapee-{uuid.uuid4().hex}"
    kill_both = (
        "\nwhile not os.path.exists(READY):\n    time.sleep(0.01)\n"
        "with open('/proc/%d/stat' % os.getppid()) as f:\n    spawner = int(f.read().rpartition(')')[2].split()[1])\n"
        f"os.kill(spawner, {int(spawner_signal)})\nos.kill(os.getppid(), {int(root_signal)})"
    )
    write_stub_cli(stub_bin, "claude", STUB.format(
        marker=marker, escapee=ESCAPEE, hopper=HOPPER, detached=DETACHED, escape=ESCAPES[kind] + kill_both,
    ))
    write_stub_cli(stub_bin, "codex", GRANDPARENT)
    home = tmp_path / "home"
    try:
        with trio.fail_after(60):
            async with open_backend() as backend:
                async with pgw_daemon(pyz_pgw, home, stub_bin, server=backend.url, token=backend.token):
                    connection = await backend.next_connection()
                    spawner = int((await stage_output(connection, "s0", "codex")).split()[0])
                    await connection.send(request("s1", cli_args=["wait"], env=escapee_env(tmp_path, marker)))
                    cli_pid = (await connection.receive("stage.ack", "s1"))["pid"]
                    with trio.fail_after(5):  # a stopped spawner is a SIGCHLD to pgw, which kills it
                        result = await connection.stage_result("s1")
                    assert_escapee_ran(tmp_path, marker)
                    await assert_none_left(tmp_path, marker)
                    assert await gone_or_zombie(cli_pid), "the CLI outlived its stage"
                    assert result.returncode == -1 and "stage root" in (result.error or ""), result.error
                    write_stub_cli(stub_bin, "claude", "print('ran')")
                    await connection.send(request("s2"))
                    assert (await connection.stage_result("s2")).stdout == "ran\n"
                    assert not is_alive(spawner), "the killed or stopped spawner is still there"
    finally:
        kill_marked(marker)


GRANDPARENT = """
import os
with open("/proc/%d/stat" % os.getppid()) as f:
    print(f.read().rpartition(")")[2].split()[1], flush=True)
"""


async def stage_output(connection, stage_run_id: str, cli: str) -> str:
    await connection.send(request(stage_run_id, cli=cli))
    result = await connection.stage_result(stage_run_id)
    assert result.returncode == 0, result.error
    return result.stdout


async def gone_or_zombie(pid: int, within_s: float = 3.0) -> bool:
    with trio.move_on_after(within_s):
        while is_alive(pid):
            await trio.sleep(0.01)
    return not is_alive(pid)


async def test_a_pid_hopper_survives_none_of_ten_cancels(tmp_path, environ, stub_bin):
    markers = {f"h{number}": f"pgw-escapee-{uuid.uuid4().hex}" for number in range(10)}
    try:
        with trio.fail_after(60):
            async with connected(tmp_path, environ, timing=pgw.Timing(cancel_grace_s=0.5)) as (_, _, connection):
                for stage_run_id, marker in markers.items():
                    write_escaping_cli(stub_bin, "hopper", marker)
                    await connection.send(request(stage_run_id, cli_args=["wait"], env=escapee_env(tmp_path, marker)))
                    assert (await connection.receive("stage.stdout", stage_run_id))["data"] == "ready\n"
                    assert await still_running(tmp_path / f"{marker}.ready"), "precondition: it hops beside its stage"
                for stage_run_id in markers:
                    await connection.send(cancel(stage_run_id, "SIGKILL"))
                for stage_run_id in markers:
                    await connection.stage_result(stage_run_id)
                survivors = []
                for stage_run_id, marker in markers.items():
                    try:
                        await assert_none_left(tmp_path, marker, within_s=1.0)
                    except AssertionError:
                        survivors.append(stage_run_id)
    finally:
        for marker in markers.values():
            kill_marked(marker)
    assert survivors == [], f"hoppers survived {len(survivors)} of 10 cancels"


# The stage spawner ---------------------------------------------------------

FD_LISTER = """
import os, sys, time
open_fds = []
for fd in range(3, 1024):
    try:
        os.fstat(fd)
    except OSError:
        continue
    open_fds.append(fd)
print(open_fds, flush=True)
if sys.argv[1:] == ["wait"]:
    time.sleep(60)
"""


async def test_a_cli_holds_no_descriptor_but_its_stdio(tmp_path, environ, stub_bin):
    # pgw passes each stage's pipes to the spawner; none may reach another stage's CLI.
    write_stub_cli(stub_bin, "claude", FD_LISTER)
    with trio.fail_after(30):
        async with connected(tmp_path, environ) as (_, _, connection):
            await connection.send(request("s1", cli_args=["wait"]))
            assert (await connection.receive("stage.stdout", "s1"))["data"] == "[]\n"
            await connection.send(request("s2", stdin="a prompt"))
            assert (await connection.receive("stage.stdout", "s2"))["data"] == "[]\n"
            assert (await connection.stage_result("s2")).returncode == 0
            await connection.send(cancel("s1"))
            assert (await connection.stage_result("s1")).returncode == -15


async def test_a_killed_spawner_is_started_again_and_running_stages_go_on(tmp_path, environ, stub_bin):
    write_stub_cli(stub_bin, "claude", FD_LISTER)
    with trio.fail_after(30):
        async with connected(tmp_path, environ) as (_, worker, connection):
            await connection.send(request("s1", cli_args=["wait"]))
            await connection.receive("stage.stdout", "s1")
            first = worker.spawner._process
            first.kill()
            first.wait()
            await connection.send(request("s2"))
            assert (await connection.stage_result("s2")).returncode == 0
            assert worker.spawner._process.pid != first.pid
            await connection.send(cancel("s1"))
            assert (await connection.stage_result("s1")).returncode == -15


PARENT_ENV_LISTER = """
import os
with open("/proc/%d/environ" % os.getppid(), "rb") as parent:
    names = [entry.split(b"=", 1)[0].decode() for entry in parent.read().split(b"\\0") if entry]
print(sorted(name for name in names if name.startswith("PGW_")), flush=True)
"""


async def test_the_token_is_not_in_the_environment_of_the_clis_parent(tmp_path, environ, stub_bin, monkeypatch):
    # `pgw run --token` passes the token to itself in PGW_TOKEN; the stage
    # roots are the CLIs' parents, and a CLI can read its parent's environment.
    monkeypatch.setenv("PGW_TOKEN", "tok-in-pgw-environment")
    write_stub_cli(stub_bin, "claude", PARENT_ENV_LISTER)
    with trio.fail_after(30):
        async with connected(tmp_path, environ) as (_, _, connection):
            await connection.send(request("s1"))
            result = await connection.stage_result("s1")
    assert (result.returncode, result.stdout) == (0, "[]\n")


async def test_the_spawner_and_the_stage_roots_show_a_short_command_line(tmp_path, environ, stub_bin):
    # Each carried the spawner's 13 KB of source in its argv: `ps -ef` showed
    # it all for every stage root.
    write_stub_cli(stub_bin, "claude", "import os; print(os.getppid())")
    with trio.fail_after(30):
        async with connected(tmp_path, environ) as (_, _, connection):
            await connection.send(request("s1"))
            result = await connection.stage_result("s1")
            root = int(result.stdout)
            spawner = int(Path(f"/proc/{root}/stat").read_bytes().rpartition(b")")[2].split()[1])
            command_lines = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in (root, spawner)}
    assert result.returncode == 0
    for command_line in command_lines.values():
        assert b"# pgw's stage spawner" in command_line and len(command_line) < 200, command_line


async def test_a_spawner_slow_to_read_its_source_holds_up_no_other_task(tmp_path, environ, stub_bin, monkeypatch):
    # Its source went into a pipe from the event loop: a pipe that holds less
    # (8 KiB, once a user's pipes pass pipe-user-pages-soft) held every task
    # until the new Python had started and read it all.
    write_stub_cli(stub_bin, "claude", "print('ran')")
    monkeypatch.setattr(pgw, "STAGE_SPAWNER_LOADER", "import sys, time; time.sleep(2); exec(sys.stdin.buffer.read())")
    monkeypatch.setattr(pgw, "STAGE_SPAWNER_SOURCE", pgw.STAGE_SPAWNER_SOURCE + "#" * (1 << 20) + "\n")
    ticks = 0

    async def tick():
        nonlocal ticks
        while True:
            await trio.sleep(0.05)
            ticks += 1

    with trio.fail_after(30):
        async with connected(tmp_path, environ) as (_, _, connection), trio.open_nursery() as nursery:
            nursery.start_soon(tick)
            await connection.send(request("s1"))
            result = await connection.stage_result("s1")
            nursery.cancel_scope.cancel()
    assert result.stdout == "ran\n"
    assert ticks >= 10, ticks  # about 40 in the 2 s the spawner sleeps; blocked, none


async def test_a_spawner_that_dies_on_a_request_is_named_and_started_again(tmp_path, environ, stub_bin, monkeypatch, caplog):
    # One that cannot run here (a broken interpreter, a library missing) must
    # not leave every stage with "the stage root failed" and nothing more.
    write_stub_cli(stub_bin, "claude", "print('ran')")
    working = pgw.STAGE_SPAWNER_SOURCE
    monkeypatch.setattr(pgw, "STAGE_SPAWNER_SOURCE", "import os, socket, sys\nsocket.socket(fileno=int(sys.argv[1])).recv(1)\nos._exit(3)")
    with trio.fail_after(30):
        async with connected(tmp_path, environ) as (_, _, connection):
            await connection.send(request("s1"))
            result = await connection.stage_result("s1")
            assert result.returncode == -1
            assert result.error == f"cannot start claude: the stage spawner ({sys.executable}) exited with status 3"
            monkeypatch.setattr(pgw, "STAGE_SPAWNER_SOURCE", working)
            await connection.send(request("s2"))
            assert (await connection.stage_result("s2")).stdout == "ran\n"
    assert any("exited with status 3" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


async def test_a_root_that_dies_before_its_cli_starts_costs_no_wait_while_the_spawner_lives(tmp_path, environ, stub_bin):
    # A free root killed from outside just after it took a request: pgw asks
    # the spawner why, which waited 2 s for a spawner that was not ending.
    write_stub_cli(stub_bin, "codex", WHO_IS_MY_ROOT)
    async with connected(tmp_path, environ) as (_, worker, connection):
        await root_of_a_stage(connection, "s1")
        free_root = worker.spawner.free.take()
        assert free_root is not None, "precondition: the stage left its root free"
        with trio.fail_after(1):
            assert await worker.spawner.failure(free_root) is None


async def test_a_stopped_spawner_is_replaced_before_it_takes_a_stage(tmp_path, environ, stub_bin):
    # s1 holds its root, so s2 and s3 need a root forked by the spawner.
    write_stub_cli(stub_bin, "claude", "import sys, time\nprint('ran', flush=True)\nif sys.argv[1:] == ['wait']:\n    time.sleep(60)")
    with trio.fail_after(30):
        async with connected(tmp_path, environ, timing=pgw.Timing(spawner_answer_s=10.0)) as (_, worker, connection):
            await connection.send(request("s1", cli_args=["wait"]))
            await connection.receive("stage.stdout", "s1")
            stopped = worker.spawner._process
            os.kill(stopped.pid, signal.SIGSTOP)
            try:
                with trio.fail_after(5):  # a signal takes effect when its process next runs
                    while process_state(stopped.pid) != "T":
                        await trio.sleep(0.001)
                with trio.fail_after(5):  # not the 10 s a stopped spawner would take to be noticed
                    await connection.send(request("s2"))
                    assert (await connection.stage_result("s2")).stdout == "ran\n"
                assert stopped.poll() is not None, "the stopped spawner was left stopped"
                await connection.send(request("s3"))
                assert (await connection.stage_result("s3")).stdout == "ran\n"
                await connection.send(cancel("s1"))
                assert (await connection.stage_result("s1")).returncode == -15
            finally:
                if stopped.poll() is None:
                    stopped.kill()
                    stopped.wait()


async def test_a_spawner_that_takes_a_request_and_never_answers_is_replaced_and_the_stage_refused_in_time(
    tmp_path, environ, stub_bin, monkeypatch
):
    write_stub_cli(stub_bin, "claude", "print('ran')")
    working = pgw.STAGE_SPAWNER_SOURCE
    stuck = "import socket, sys, time\nsocket.socket(fileno=int(sys.argv[1])).recv(1)\ntime.sleep(60)"
    monkeypatch.setattr(pgw, "STAGE_SPAWNER_SOURCE", stuck)
    with trio.fail_after(30):
        async with connected(tmp_path, environ, timing=pgw.Timing(spawner_answer_s=1.0)) as (_, worker, connection):
            await connection.send(request("s1"))
            while worker.spawner._process is None:
                await trio.sleep(0.001)
            stuck_spawner = worker.spawner._process
            try:
                result = await connection.stage_result("s1")
                assert (result.returncode, result.error) == (-1, "cannot start the stage: the stage spawner did not answer in 1 s")
                assert stuck_spawner.poll() is not None, "the spawner that did not answer lives on"
                monkeypatch.setattr(pgw, "STAGE_SPAWNER_SOURCE", working)
                await connection.send(request("s2"))
                assert (await connection.stage_result("s2")).stdout == "ran\n"
            finally:
                if stuck_spawner.poll() is None:
                    stuck_spawner.kill()
                    stuck_spawner.wait()


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGSTOP], ids=["died", "stopped"])
async def test_the_free_roots_of_a_spawner_that_died_or_stopped_are_not_taken_again(tmp_path, environ, stub_bin, signum):
    # Were its root killed, a stage's processes would pass to the spawner that
    # forked it: with that one dead, to init, and with it stopped, to no one
    # who kills them.  A CLI can stop the spawner (its grandparent) as easily.
    write_stub_cli(stub_bin, "codex", WHO_IS_MY_ROOT)
    with trio.fail_after(30):
        async with connected(tmp_path, environ) as (_, worker, connection):
            first_root = await root_of_a_stage(connection, "s1")
            assert is_alive(first_root), "precondition: the root waits for the next stage"
            first_spawner = worker.spawner._process
            os.kill(first_spawner.pid, signum)
            with trio.fail_after(5):  # a signal takes effect when its process next runs
                while process_state(first_spawner.pid) not in ("T", "Z", None):
                    await trio.sleep(0.001)
            second_root = await root_of_a_stage(connection, "s2")
            assert second_root != first_root
            assert worker.spawner._process.pid in [parent for pid, parent, _ in live_processes() if pid == second_root]
            assert await gone(first_root), "the old spawner's free root lives on"
            assert first_spawner.poll() is not None, "the stopped spawner was left stopped"


async def test_a_prompt_too_long_for_execve_is_refused_before_it_starts(tmp_path, environ, stub_bin):
    write_stub_cli(stub_bin, "claude", "print('ran')")
    with trio.fail_after(30):
        async with connected(tmp_path, environ) as (_, _, connection):
            await connection.send(request("s1", stdin="p" * (pgw.EXEC_MAX_BYTES + 1), stdin_mode="argv_last"))
            result = await connection.stage_result("s1")
            await connection.send(request("s2", stdin="p" * 1000, stdin_mode="argv_last"))
            assert (await connection.stage_result("s2")).stdout == "ran\n"
    assert result.ack is None and result.returncode == -1
    assert "send a long prompt on standard input" in result.error


@pytest.mark.parametrize("where", ["prompt", "argument", "environment"])
async def test_one_string_too_long_for_execve_is_refused_before_it_starts(tmp_path, environ, stub_bin, where):
    # Linux takes at most 32 pages in any one argument or NAME=value, whatever the total.
    write_stub_cli(stub_bin, "claude", "print('ran')")
    name = len("LONG=") if where == "environment" else 0
    long = "p" * (pgw.EXEC_STRING_MAX_BYTES - name)  # one byte over, with the NUL
    fits = "p" * (pgw.EXEC_STRING_MAX_BYTES - name - 1)
    asked = {
        "prompt": lambda text: request("s", stdin=text, stdin_mode="argv_last"),
        "argument": lambda text: request("s", cli_args=[text]),
        "environment": lambda text: request("s", env={"LONG": text}),
    }[where]
    with trio.fail_after(30):
        async with connected(tmp_path, environ) as (_, _, connection):
            await connection.send({**asked(long), "stage_run_id": "long"})
            refused = await connection.stage_result("long")
            await connection.send({**asked(fits), "stage_run_id": "fits"})
            ran = await connection.stage_result("fits")
    assert refused.ack is None and refused.returncode == -1
    assert f"comes to {pgw.EXEC_STRING_MAX_BYTES + 1} bytes" in refused.error
    assert "send a long prompt on standard input" in refused.error
    assert (ran.returncode, ran.stdout) == (0, "ran\n")


async def test_a_request_larger_than_a_socket_holds_reaches_a_new_root_and_a_free_one_whole(tmp_path, environ, stub_bin):
    # 600 KB of arguments: more than a Unix socket takes at once, so the rest
    # of the request follows the first send, to the spawner, then to a root.
    write_stub_cli(stub_bin, "claude", "import os, sys\nprint(os.getppid(), sum(len(a) for a in sys.argv[1:]), flush=True)")
    cli_args = [chr(ord("a") + n) * 100_000 for n in range(6)]
    with trio.fail_after(30):
        async with connected(tmp_path, environ) as (_, _, connection):
            await connection.send(request("new-root", cli_args=cli_args))
            first = await connection.stage_result("new-root")
            await connection.send(request("free-root", cli_args=cli_args))
            second = await connection.stage_result("free-root")
    assert first.stdout.split()[1] == second.stdout.split()[1] == "600000"
    assert first.stdout.split()[0] == second.stdout.split()[0], "the second stage did not go to the free root"


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
@pytest.mark.parametrize("kind", ESCAPES)
async def test_a_cli_that_kills_or_stops_its_stage_root_takes_nothing_past_the_stage(tmp_path, environ, stub_bin, kind, signum):
    # The root is the stage's subreaper; killed, it would hand the stage's
    # processes to init.  They go to the spawner instead, which kills them.
    # Stopped, it would kill nothing and never report the CLI's exit: the
    # spawner kills it, and the stage ends the same way.
    marker = f"pgw-escapee-{uuid.uuid4().hex}"
    kill_root = f"\nwhile not os.path.exists(READY):\n    time.sleep(0.01)\nos.kill(os.getppid(), {int(signum)})"
    write_stub_cli(stub_bin, "claude", STUB.format(
        marker=marker, escapee=ESCAPEE, hopper=HOPPER, detached=DETACHED, escape=ESCAPES[kind] + kill_root,
    ))
    try:
        with trio.fail_after(30):
            async with connected(tmp_path, environ) as (_, _, connection):
                await connection.send(request("s1", cli_args=["wait"], env=escapee_env(tmp_path, marker)))
                cli_pid = (await connection.receive("stage.ack", "s1"))["pid"]
                started = trio.current_time()
                result = await connection.stage_result("s1")
                assert trio.current_time() - started < 3.0, "the stage outlived its killed root"
                assert_escapee_ran(tmp_path, marker)
                await assert_none_left(tmp_path, marker)
                assert not is_alive(cli_pid), "the CLI outlived its stage"
    finally:
        kill_marked(marker)
    assert result.returncode == -1 and "stage root" in (result.error or "")


# A root runs stage after stage ---------------------------------------------------

# The CLI says who its root is and which processes that root has besides
# itself: whatever an earlier stage under the same root left would show there.
WHO_IS_MY_ROOT = """
import os
root = os.getppid()
with open("/proc/%d/task/%d/children" % (root, root)) as f:
    others = sorted(int(pid) for pid in f.read().split() if int(pid) != os.getpid())
print(root, others, flush=True)
"""


def root_and_others(stdout: str) -> tuple[int, str]:
    root, others = stdout.split(" ", 1)
    return int(root), others.strip()


async def root_of_a_stage(connection, stage_run_id: str) -> int:
    """The root a WHO_IS_MY_ROOT stage (as `codex`) ran under."""
    await connection.send(request(stage_run_id, cli="codex"))
    result = await connection.stage_result(stage_run_id)
    assert result.returncode == 0, result.error
    return root_and_others(result.stdout)[0]


async def gone(pid: int, within_s: float = 2.0) -> bool:
    """Whether `pid` is gone (not even a zombie) within `within_s`."""
    with trio.move_on_after(within_s):
        while Path(f"/proc/{pid}").exists():
            await trio.sleep(0.01)
    return not Path(f"/proc/{pid}").exists()


async def test_a_root_takes_the_next_stage_only_once_nothing_of_the_last_is_left(tmp_path, environ, stub_bin):
    marker = f"pgw-escapee-{uuid.uuid4().hex}"
    write_stub_cli(stub_bin, "claude", STUB.format(
        marker=marker, escapee=ESCAPEE, hopper=HOPPER, detached=DETACHED, escape=ESCAPES["hopper"],
    ))
    write_stub_cli(stub_bin, "codex", WHO_IS_MY_ROOT)
    try:
        with trio.fail_after(30):
            async with connected(tmp_path, environ) as (_, _, connection):
                await connection.send(request("escapes", cli_args=["exit"], env=escapee_env(tmp_path, marker)))
                escaped = await connection.stage_result("escapes")
                assert_escapee_ran(tmp_path, marker)
                await connection.send(request("next", cli="codex"))
                first = await connection.stage_result("next")
                await connection.send(request("after", cli="codex"))
                second = await connection.stage_result("after")
        assert escaped.returncode == 0 and first.returncode == 0 and second.returncode == 0
        root, others = root_and_others(first.stdout)
        assert root_and_others(second.stdout) == (root, "[]"), "the second stage got another root"
        assert others == "[]", "the next stage's root still had the last stage's processes"
        await assert_none_left(tmp_path, marker)
    finally:
        kill_marked(marker)


async def test_stages_at_once_get_roots_of_their_own_and_a_free_root_exits_in_time(tmp_path, environ, stub_bin):
    gate = tmp_path / "gate"
    write_stub_cli(stub_bin, "codex", WHO_IS_MY_ROOT + f"""
import time
while not os.path.exists({str(gate)!r}):
    time.sleep(0.01)
""")
    with trio.fail_after(30):
        async with connected(tmp_path, environ, timing=pgw.Timing(root_idle_s=1.0)) as (_, worker, connection):
            ids = [f"s{n}" for n in range(3)]
            for stage_id in ids:
                await connection.send(request(stage_id, cli="codex"))
            for stage_id in ids:
                await connection.receive("stage.stdout", stage_id)
            gate.touch()
            results = [await connection.stage_result(stage_id) for stage_id in ids]
            roots = {root_and_others(result.stdout)[0] for result in results}
            assert len(roots) == 3, "stages running at once shared a root"
            spawner = worker.spawner._process.pid
            assert set(children_of(spawner)) == roots, "the roots are not the spawner's children, or one ended early"
            await trio.sleep(2.0)
            assert children_of(spawner) == [], "a root outlived its idle time"
            assert worker.spawner._process.poll() is None, "the spawner ended with its roots"
            await connection.send(request("later", cli="codex"))
            assert (await connection.stage_result("later")).returncode == 0


async def test_a_root_whose_cli_could_not_start_takes_the_next_stage(tmp_path, environ, stub_bin):
    write_stub_cli(stub_bin, "codex", WHO_IS_MY_ROOT)
    (stub_bin / "claude").write_text("#!/nonexistent/interpreter\n")
    (stub_bin / "claude").chmod(0o755)
    with trio.fail_after(30):
        async with connected(tmp_path, environ) as (_, _, connection):
            root = await root_of_a_stage(connection, "s1")
            await connection.send(request("not-started"))
            refused = await connection.stage_result("not-started")
            assert (refused.ack, refused.error) == (None, "cannot start claude: No such file or directory")
            assert await root_of_a_stage(connection, "s3") == root


async def test_a_home_given_as_a_relative_path_serves_stage_after_stage(tmp_path, environ, stub_bin, monkeypatch):
    # A root that ran a stage has its working directory at /, where a relative
    # scratch directory would not be found.
    write_stub_cli(stub_bin, "claude", "import os\nprint(os.getcwd(), os.getppid(), flush=True)")
    monkeypatch.chdir(tmp_path)
    with trio.fail_after(30):
        async with open_backend() as backend:
            async with running_worker(backend, Path("home"), environ):
                connection = await backend.next_connection()
                await connection.receive("hello")
                results = []
                for n in range(3):
                    await connection.send(request(f"s{n}"))
                    results.append(await connection.stage_result(f"s{n}"))
    assert [(r.returncode, r.stdout.split()[0]) for r in results] == [
        (0, str(tmp_path / "home" / "scratch" / f"s{n}")) for n in range(3)
    ]
    assert len({r.stdout.split()[1] for r in results}) == 1, "the stages did not all run under one root"


# What a process of the stage's user can change in its root from outside, and
# every CLI the root starts afterwards would inherit.
WHAT_I_INHERIT = """
import os, resource
limits = [resource.getrlimit(getattr(resource, name)) for name in sorted(dir(resource)) if name.startswith("RLIMIT_")]
with open("/proc/self/oom_score_adj") as f:
    oom = f.read().strip()
print(os.getppid(), os.getpriority(os.PRIO_PROCESS, 0), limits, sorted(os.sched_getaffinity(0)),
      os.sched_getscheduler(0), oom, flush=True)
"""
CHANGES_TO_THE_ROOT = {
    "nice": "os.setpriority(os.PRIO_PROCESS, root, os.getpriority(os.PRIO_PROCESS, root) + 5)",
    "rlimit": "resource.prlimit(root, resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))",
    "affinity": "os.sched_setaffinity(root, {min(os.sched_getaffinity(root))})",
    "scheduler": "os.sched_setscheduler(root, os.SCHED_BATCH, os.sched_param(0))",
    "oom_score_adj": "open('/proc/%d/oom_score_adj' % root, 'w').write('500')",
}


@pytest.mark.parametrize("change", CHANGES_TO_THE_ROOT)
async def test_what_a_cli_changes_in_its_root_no_later_cli_inherits(tmp_path, environ, stub_bin, change):
    # A nice value, a limit, CPUs, a scheduler: a process of the same user may
    # set them on the root from outside, and a root cannot always undo that (a
    # hard limit once lowered, a nice value once raised).
    if change == "affinity" and len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: no affinity to take away")
    write_stub_cli(stub_bin, "codex", WHAT_I_INHERIT)
    write_stub_cli(stub_bin, "claude", f"import os, resource\nroot = os.getppid()\n{CHANGES_TO_THE_ROOT[change]}\n")
    with trio.fail_after(30):
        async with connected(tmp_path, environ) as (_, _, connection):
            await connection.send(request("before", cli="codex"))
            before = await connection.stage_result("before")
            await connection.send(request("changes"))
            assert (await connection.stage_result("changes")).returncode == 0
            await connection.send(request("after", cli="codex"))
            after = await connection.stage_result("after")
    assert before.returncode == 0 and after.returncode == 0
    assert after.stdout.split(" ", 1)[1] == before.stdout.split(" ", 1)[1], f"a later CLI inherited the {change}"
    assert after.stdout.split()[0] != before.stdout.split()[0], "the changed root took another stage"


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGSTOP])
async def test_a_free_root_killed_or_stopped_meanwhile_costs_the_next_stage_nothing(tmp_path, environ, stub_bin, signum):
    # Killed by the OOM killer or a user, or stopped (which the spawner meets
    # with SIGKILL), while it waits for a stage: the next goes to a new root.
    write_stub_cli(stub_bin, "codex", WHO_IS_MY_ROOT)
    with trio.fail_after(30):
        async with connected(tmp_path, environ) as (_, _, connection):
            first_root = await root_of_a_stage(connection, "s1")
            os.kill(first_root, signum)
            assert await gone(first_root), "precondition: the root is gone"
            assert await root_of_a_stage(connection, "s2") != first_root


async def test_free_roots_end_with_the_daemon_and_are_reaped_by_it(tmp_path, environ, stub_bin):
    write_stub_cli(stub_bin, "codex", WHO_IS_MY_ROOT)
    with trio.fail_after(30):
        async with connected(tmp_path, environ) as (_, _, connection):
            root = await root_of_a_stage(connection, "s1")
            assert is_alive(root), "precondition: the root waits for the next stage"
        # Gone, not even a zombie handed to init: the spawner reaps it before exiting.
        assert await gone(root, within_s=1.0), "a free root outlived the daemon, or was left to init to reap"


# What a CLI started by the root sees of its start: run by the CLI itself.
START_PROBE = """
import json, os, signal, sys
ignored = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("SigIgn:"))
print(json.dumps({
    "cwd": os.getcwd(), "umask": os.umask(0), "leads_its_session": os.getsid(0) == os.getpid(),
    # Ignored at exec, as the root has them (Python itself then ignores SIGPIPE and SIGXFSZ):
    "ignored": [s for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP) if int(ignored, 16) >> (s - 1) & 1],
    "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd"))[:4], "stdin": sys.stdin.read(),
}), flush=True)
"""

# A root's start of a CLI, outside pgw: the spawner's code up to its main(),
# with the signals as a root has them, then start_cli as the root calls it.
START_DRIVER = """
import sys
{way}
for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(signum, signal.SIG_IGN)
signal.signal(signal.SIGCHLD, lambda *_: None)
os.umask(0o022)
request = json.loads(sys.argv[2])
stdin_r, stdin_w = os.pipe()
stdout_r, stdout_w = os.pipe()
os.write(stdin_w, b"the prompt")
os.close(stdin_w)
try:
    cli = start_cli(request, [stdin_r, stdout_w, os.dup(2)])
except OSError as exc:
    print(json.dumps({"errno": exc.errno}))
    sys.exit()
os.close(stdout_w)
probe = json.loads(os.read(stdout_r, 65536))
os.waitpid(cli, 0)
print(json.dumps({**probe, "root_cwd": os.getcwd(), "root_umask": os.umask(0)}))
"""

# posix_spawn as a C library without its setsid flag has it, and as a system
# older than the headers Python was built with answers that flag.
NO_SETSID = {
    "fork": "def no_setsid(*args, **kwargs):\n    raise NotImplementedError\nos.posix_spawn = no_setsid",
    "fork after EINVAL": "def no_setsid(*args, **kwargs):\n    raise OSError(errno.EINVAL, 'Invalid argument')\nos.posix_spawn = no_setsid",
}


@pytest.mark.parametrize("way", ["posix_spawn", *NO_SETSID])
def test_a_cli_starts_in_its_own_session_directory_and_umask_with_default_signals(tmp_path, way):
    # posix_spawn where the C library can start a session with it, else fork
    # and exec: the CLI must not see a difference.
    spawner = pgw.STAGE_SPAWNER_SOURCE.rstrip()
    assert spawner.endswith("main()")
    driver = spawner[: -len("main()")] + START_DRIVER.replace("{way}", NO_SETSID.get(way, ""))
    scratch = tmp_path / "scratch"
    scratch.mkdir()

    def start(argv, cwd=scratch):
        request = {"argv": argv, "env": {"PATH": "/usr/bin:/bin"}, "cwd": str(cwd), "umask": 0o077}
        done = subprocess.run([sys.executable, "-I", "-S", "-c", driver, "3", json.dumps(request)],
                              capture_output=True, text=True, timeout=30, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    seen = start([sys.executable, "-I", "-c", START_PROBE])
    assert seen == {
        "cwd": str(scratch), "umask": 0o077, "leads_its_session": True, "ignored": [],
        "fds": [0, 1, 2, 3], "stdin": "the prompt", "root_cwd": "/", "root_umask": 0o022,
    }
    assert start([str(tmp_path / "missing")]) == {"errno": errno.ENOENT}
    assert start([sys.executable, "-c", "pass"], cwd=tmp_path / "gone") == {"errno": errno.ENOENT}
