"""Hostile hosts and odd peers: files, permissions, identity and input that
misbehave around a running daemon, each answered as a user would want."""

from __future__ import annotations

import base64
import errno
import functools
import json
import logging
import os
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Callable

import pytest
import trio
import trio_websocket
import wsproto.utilities

import pgw
from backend import open_backend
from conftest import ROOT, write_stub_cli
from test_faults import pgw_daemon, pyz_pgw, script_pgw  # noqa: F401 - fixtures
from test_run import cancel, connected, environ, request  # noqa: F401 - environ is a fixture

##############################################################################
# Files and permissions
##############################################################################


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_everything_the_daemon_makes_is_private_under_umask_0_and_an_open_home_is_tightened(
    tmp_path, stub_bin, script_pgw  # noqa: F811
):
    write_stub_cli(stub_bin, "claude", "import os; open('made-by-the-cli', 'w').close(); print(oct(os.umask(0)))")
    home = tmp_path / "home"
    with trio.fail_after(30):
        async with open_backend() as backend:
            pgw.write_config(home / "config.json", {"server": backend.url, "worker_id": "w", "token": backend.token})
            home.chmod(0o755)  # as pgworker makes it
            (home / "run.log").write_text("old line\n")
            (home / "run.log").chmod(0o644)
            async with pgw_daemon(
                script_pgw, home, stub_bin, server=backend.url, token=backend.token, preexec_fn=lambda: os.umask(0)
            ):
                connection = await backend.next_connection()
                await connection.send(request("s1"))
                result = await connection.stage_result("s1")
                await trio.sleep(0.7)  # the state file is written at most twice a second
                modes = {name: mode(home / name) for name in ("", "run.log", "run.lock", "state.json", "scratch")}
    assert modes == {"": 0o700, "run.log": 0o600, "run.lock": 0o600, "state.json": 0o600, "scratch": 0o700}
    assert result.stdout == "0o0\n", "the stage gets the caller's umask back"
    assert "made" in (home / "run.log").read_text() and "private (mode 700)" in (home / "run.log").read_text()


async def test_a_deleted_run_log_is_made_again_for_later_lines(tmp_path, stub_bin, script_pgw):  # noqa: F811
    write_stub_cli(stub_bin, "claude", "print('hi')")
    home = tmp_path / "home"
    with trio.fail_after(30):
        async with open_backend() as backend:
            async with pgw_daemon(script_pgw, home, stub_bin, server=backend.url, token=backend.token):
                connection = await backend.next_connection()
                await connection.receive("hello")
                (home / "run.log").unlink()  # logrotate's move, or a user cleaning up
                await connection.send(request("after-delete"))
                await connection.stage_result("after-delete")
                await trio.sleep(0.2)
                assert "stage 'after-delete': ended" in (home / "run.log").read_text()


def test_run_log_rotates_at_its_size_and_keeps_its_backups(tmp_path):
    handler = pgw.LogFile(tmp_path / "run.log", maxBytes=1000, backupCount=2, encoding="utf-8")
    logger = logging.getLogger("pgw-rotation-test")
    logger.addHandler(handler)
    try:
        for number in range(100):
            logger.warning("line %03d %s", number, "x" * 40)
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run.log", "run.log.1", "run.log.2"]
    for path in tmp_path.iterdir():
        assert path.stat().st_size <= 1000 + 60, f"{path.name} grew past its size"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "line 099" in (tmp_path / "run.log").read_text()


class _FullDisk:
    """A log file's stream on a full disk."""

    def write(self, _: str) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    flush = write

    def seek(self, *_: int) -> int:
        return 0

    def close(self) -> None:
        pass


def test_a_log_on_a_full_disk_says_so_once_on_stderr_not_a_traceback_a_line(tmp_path, capsys):
    handler = pgw.LogFile(tmp_path / "run.log", encoding="utf-8")
    logger = logging.getLogger("pgw-full-disk-test")
    logger.addHandler(handler)
    real_stream = handler.stream
    try:
        handler.stream = _FullDisk()  # type: ignore[assignment]
        for number in range(3):
            logger.warning("lost %d", number)
        handler.stream = real_stream
        logger.warning("written")
        handler.stream = _FullDisk()  # type: ignore[assignment]
        logger.warning("lost again")
    finally:
        handler.stream = real_stream
        logger.removeHandler(handler)
        handler.close()
    said = f"pgw: cannot write the log {tmp_path / 'run.log'}: No space left on device\n"
    assert capsys.readouterr().err == said * 2  # once, and once more after a line got through
    assert "written" in (tmp_path / "run.log").read_text()


async def test_a_deleted_run_lock_does_not_let_a_second_daemon_in(tmp_path, stub_bin, script_pgw):  # noqa: F811
    write_stub_cli(stub_bin, "claude", "import time; print('ready', flush=True); time.sleep(3); print('done')")
    home = tmp_path / "home"
    with trio.fail_after(30):
        async with open_backend() as backend:
            async with pgw_daemon(script_pgw, home, stub_bin, server=backend.url, token=backend.token) as first:
                connection = await backend.next_connection()
                await connection.send(request("s1"))
                await connection.receive("stage.stdout", "s1")
                (home / "run.lock").unlink()  # what a clean-up script may do
                second = await trio.run_process(
                    [*script_pgw.argv, "run"], env={"PGW_HOME": str(home), "PATH": f"{stub_bin}:/usr/bin:/bin",
                                                   **script_pgw.env},
                    capture_stdout=True, capture_stderr=True, check=False,
                )
                result = await connection.stage_result("s1")
                assert first.returncode is None
    assert second.returncode == 0 and b"pgw already running" in second.stdout, second
    assert (result.returncode, result.stdout) == (0, "ready\ndone\n")
    assert len(backend.connections) == 1


def test_an_unwritable_run_log_is_one_line_not_a_traceback(tmp_path):
    home = tmp_path / "home"
    pgw.write_config(home / "config.json", {"server": "http://127.0.0.1:9", "worker_id": "w", "token": "tok-unwritable"})
    (home / "run.log").mkdir()  # unwritable even for root
    done = subprocess.run(
        [sys.executable, str(ROOT / "pgw.py"), "run"], env={"PGW_HOME": str(home), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("pgw: cannot write the log ") and done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr


async def test_a_stage_that_swaps_scratch_for_a_symlink_cannot_make_pgw_delete_elsewhere(tmp_path, environ, stub_bin):
    victim = tmp_path / "victim"
    (victim / "later").mkdir(parents=True)
    (victim / "later" / "precious.txt").write_text("keep me")
    write_stub_cli(stub_bin, "claude", (
        "import os, sys\n"
        "scratch = os.path.dirname(os.getcwd())\n"
        "os.rename(scratch, scratch + '-moved')\n"
        f"os.symlink({str(victim)!r}, scratch)\n"
        "print('swapped')"
    ))
    write_stub_cli(stub_bin, "codex", "print('fine')")
    with trio.fail_after(20):
        async with connected(tmp_path, environ) as (_, _, connection):
            await connection.send(request("swapper"))
            assert (await connection.stage_result("swapper")).stdout == "swapped\n"
            await connection.send(request("later", cli="codex"))
            later = await connection.stage_result("later")
    assert (victim / "later" / "precious.txt").read_text() == "keep me"
    assert later.stdout == "fine\n"
    scratch = tmp_path / "home" / "scratch"
    assert scratch.is_dir() and not scratch.is_symlink()


DEPTH = 1500  # past Python's recursion limit (1000); 2,100 levels pass PATH_MAX (4,096 bytes) as a path


async def test_a_tree_deeper_than_python_recurses_is_written_and_removed(tmp_path, environ, stub_bin):
    # shutil.rmtree (before Python 3.12) and pathlib's mkdir(parents=True)
    # recurse once a level: a request's file nested that deep, or a tree a
    # CLI left behind, raised RecursionError, an internal error with a
    # traceback thousands of lines long.
    write_stub_cli(stub_bin, "claude", (
        "import os\n"
        f"for _ in range({DEPTH}):\n"
        "    os.mkdir('d'); os.chdir('d')\n"
        "open('leaf', 'w').close()\n"
        "print('deep')"
    ))
    write_stub_cli(stub_bin, "codex", "import os; print(sorted(os.listdir('.')))")
    with trio.fail_after(60):
        async with connected(tmp_path, environ) as (_, _, connection):
            await connection.send(request("left-deep"))
            assert (await connection.stage_result("left-deep")).stdout == "deep\n"
            await connection.send(request("given-deep", cli="codex", files={"f/" * DEPTH + "x": "MQ==", "y": "Mg=="}))
            given = await connection.stage_result("given-deep")
            await connection.send(request("too-deep", cli="codex", files={"f/" * 2100 + "x": "MQ=="}))
            too_deep = await connection.stage_result("too-deep")
    assert given.returncode == 0 and given.stdout == "['f', 'y']\n", given
    assert too_deep.error == "cannot write the stage's files: File name too long", too_deep
    assert list((tmp_path / "home" / "scratch").iterdir()) == []


def test_a_tree_is_removed_listing_each_directory_once_and_nothing_outside(tmp_path, monkeypatch):
    # Listing a directory again after each of its subdirectories made a stage
    # that left 20,000 sibling directories cost minutes of cleanup.
    outside = tmp_path / "outside"
    (outside / "kept").mkdir(parents=True)
    top = tmp_path / "scratch" / "s1"
    for number in range(50):
        for leaf in ("a", "b"):
            (top / f"d{number}" / leaf).mkdir(parents=True)
            (top / f"d{number}" / leaf / "f").write_text("x")
    (top / "d0" / "out").symlink_to(outside)
    (top / "link-to-outside").symlink_to(outside / "kept")
    listed: list[object] = []
    real_scandir = os.scandir

    def counting_scandir(path):
        listed.append(path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", counting_scandir)
    assert pgw.remove_tree(str(top)) is None
    assert not top.exists() and (outside / "kept").is_dir()
    assert len(listed) == 1 + 50 + 100


def test_a_fifo_or_a_symlink_named_as_a_rollout_is_passed_over_not_waited_on(tmp_path):
    # A codex stage can put anything in the sessions dir.  Opened, a FIFO
    # blocked its thread until a writer came: every later codex stage, and
    # pgw's shutdown, waited for ever.
    scratch = tmp_path / "scratch" / "s1"
    scratch.mkdir(parents=True)
    day = tmp_path.joinpath("sessions", *time.strftime("%Y %m %d").split())
    day.mkdir(parents=True)
    meta = json.dumps({"type": "session_meta", "payload": {"cwd": str(scratch.resolve())}})
    messages = [json.dumps({"type": "response_item", "payload": {"type": "message", "role": "assistant",
                                                                "content": [{"text": text}]}})
                for text in ("the real one", "the last, which the trace leaves out")]
    (day / "rollout-real.jsonl").write_text("\n".join([meta, *messages]) + "\n")
    now = time.time()
    os.utime(day / "rollout-real.jsonl", (now - 10, now - 10))
    os.mkfifo(day / "rollout-fifo.jsonl")
    (day / "rollout-link.jsonl").symlink_to(day / "rollout-fifo.jsonl")
    for name in ("rollout-fifo.jsonl", "rollout-link.jsonl"):
        os.utime(day / name, (now - 1, now - 1), follow_symlinks=False)
    found: list[str] = []
    reader = threading.Thread(target=lambda: found.append(pgw.read_codex_trace(scratch, tmp_path / "sessions", now - 60, now)),
                              daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # let the stuck open go, so that nothing is left behind
        with open(day / "rollout-fifo.jsonl", "w"):
            pass
        reader.join(10)
        pytest.fail("read_codex_trace waited on the FIFO")
    assert "the real one" in found[0]


def test_a_huge_codex_rollout_is_read_from_its_end_only(tmp_path):
    scratch = tmp_path / "scratch" / "s1"
    scratch.mkdir(parents=True)
    day = tmp_path.joinpath("sessions", *time.strftime("%Y %m %d").split())
    day.mkdir(parents=True)
    filler = json.dumps({"type": "response_item", "payload": {"type": "message", "role": "assistant",
                                                             "content": [{"text": "x" * 1000}]}})
    with (day / "rollout-big.jsonl").open("w") as rollout:
        rollout.write(json.dumps({"type": "session_meta", "payload": {"cwd": str(scratch.resolve())}}) + "\n")
        for _ in range(30_000):  # about 30 MiB
            rollout.write(filler + "\n")
        for text in ("near the end", "the last"):
            rollout.write(json.dumps({"type": "response_item", "payload": {
                "type": "message", "role": "assistant", "content": [{"text": text}]}}) + "\n")
    trace = pgw.read_codex_trace(scratch, tmp_path / "sessions", time.time() - 60, time.time())
    assert "near the end" in trace and "the last" not in trace
    assert len(trace) <= pgw.CODEX_ROLLOUT_TAIL_BYTES


##############################################################################
# Identity and input
##############################################################################


async def test_pairing_again_while_running_is_picked_up_at_the_next_attempt(tmp_path, stub_bin, script_pgw):  # noqa: F811
    home = tmp_path / "home"
    with trio.fail_after(30):
        async with open_backend() as backend:
            pgw.write_config(home / "config.json", {"server": backend.url, "worker_id": "w-old", "token": "tok-revoked"})
            async with pgw_daemon(script_pgw, home, stub_bin, server=backend.url, token="unused"):
                while "rejected the token" not in ((home / "run.log").read_text() if (home / "run.log").exists() else ""):
                    await trio.sleep(0.1)
                pgw.write_config(home / "config.json", {"server": backend.url, "worker_id": "w-new", "token": backend.token})
                connection = await backend.next_connection()
                await connection.receive("hello")
    log_text = (home / "run.log").read_text()
    assert "the credentials changed (paired again?): now worker w-new" in log_text
    assert backend.token not in log_text and "tok-revoked" not in log_text


async def test_the_config_env_set_while_running_counts_from_the_next_stage(tmp_path, stub_bin, script_pgw):  # noqa: F811
    # `config set env.PATH ...`, the fix doctor names for a CLI not found, was
    # never used by the running pgw, not even after it reconnected.
    write_stub_cli(stub_bin, "claude", "import os; print(os.environ.get('GREETING', 'none'))")
    home = tmp_path / "home"
    with trio.fail_after(30):
        async with open_backend() as backend:
            paired = {"server": backend.url, "worker_id": "w-1", "token": backend.token}
            pgw.write_config(home / "config.json", paired)
            async with pgw_daemon(script_pgw, home, stub_bin, server=backend.url, token=backend.token):
                connection = await backend.next_connection()
                await connection.receive("hello")
                await connection.send(request("s1"))
                first = await connection.stage_result("s1")
                pgw.write_config(home / "config.json", {**paired, "env": {"GREETING": "hi"}})
                await connection.send(request("s2"))
                second = await connection.stage_result("s2")
    assert (first.stdout, second.stdout) == ("none\n", "hi\n")
    assert "the config's env setting changed: the next stage gets the new one" in (home / "run.log").read_text()


@pytest.mark.parametrize("broken", ["huge-number", "through-a-file"])
async def test_a_config_broken_while_running_costs_no_stage_and_no_daemon(tmp_path, stub_bin, script_pgw, broken):  # noqa: F811
    # What json.loads or open raise for these is no ConfigError: the next
    # stage ended as an internal error, and the next reconnect ended pgw.
    write_stub_cli(stub_bin, "claude", "print('ran')")
    home = tmp_path / "home"
    with trio.fail_after(30):
        async with open_backend() as backend:
            pgw.write_config(home / "config.json", {"server": backend.url, "worker_id": "w-1", "token": backend.token})
            async with pgw_daemon(script_pgw, home, stub_bin, server=backend.url, token=backend.token):
                connection = await backend.next_connection()
                await connection.receive("hello")
                swapped = home / "config.new"
                if broken == "huge-number":
                    swapped.write_text('{"max_stages": 1' + "0" * 5000 + "}")
                else:
                    (tmp_path / "a-file").write_text("")
                    swapped.symlink_to(tmp_path / "a-file" / "config.json")
                os.replace(swapped, home / "config.json")
                await connection.send(request("s1"))
                first = await connection.stage_result("s1")
                await connection.abort()
                connection = await backend.next_connection()  # it reconnects, on the settings in use
                await connection.receive("hello")
                await connection.send(request("s2"))
                second = await connection.stage_result("s2")
    assert (first.returncode, first.error, second.returncode) == (0, None, 0)
    log_text = (home / "run.log").read_text()
    assert log_text.count("cannot read the settings again; keeping the ones in use") == 1, log_text
    assert "internal error" not in log_text and "Traceback" not in log_text


async def test_a_token_given_on_the_command_line_leaves_the_process_list(tmp_path, stub_bin, script_pgw):  # noqa: F811
    write_stub_cli(stub_bin, "claude", "import time; print('ready', flush=True); time.sleep(30)")
    home = tmp_path / "home"
    home.mkdir()
    with trio.fail_after(30):
        async with open_backend(token="tok-on-the-command-line") as backend:
            pgw.write_config(home / "config.json", {"server": backend.url, "worker_id": "w", "token": "tok-wrong"})
            async with pgw_daemon(
                script_pgw, home, stub_bin, "--token", backend.token, server=backend.url, token="tok-wrong"
            ) as daemon:
                connection = await backend.next_connection()  # the flag's token was used
                await connection.send(request("s1"))
                pid = (await connection.receive("stage.ack", "s1"))["pid"]
                await connection.receive("stage.stdout", "s1")
                processes = [daemon.pid, pid, *descendants_of(daemon.pid)]
                cmdlines = {p: Path(f"/proc/{p}/cmdline").read_bytes() for p in processes}
    assert all(b"tok-on-the-command-line" not in cmdline for cmdline in cmdlines.values()), cmdlines


def descendants_of(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat_line = (entry / "stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat_line[stat_line.rindex(")") + 2:].split()[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


async def test_an_id_the_locale_cannot_encode_is_refused_not_the_connection(tmp_path, stub_bin, script_pgw):  # noqa: F811
    # In an ASCII (or Latin-1) locale the OS cannot take `日本` as a name or in
    # a variable: UnicodeEncodeError escaped the request's checks and dropped
    # the connection, every running stage with it, with no exit for this one.
    write_stub_cli(stub_bin, "claude", "print('ran')")
    ascii_locale = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    with trio.fail_after(30):
        async with open_backend() as backend:
            async with pgw_daemon(script_pgw, tmp_path / "home", stub_bin, server=backend.url, token=backend.token,
                                  extra_env=ascii_locale):
                connection = await backend.next_connection()
                await connection.send(request("日本"))
                refused = await connection.stage_result("日本")
                await connection.send(request("ascii"))
                assert (await connection.stage_result("ascii")).stdout == "ran\n"
                assert not connection.closed.is_set()
    assert refused.returncode == -1 and "cannot name a scratch directory" in (refused.error or ""), refused.exit


async def test_a_request_that_trips_a_bug_in_its_checks_costs_that_stage_only(tmp_path, environ, stub_bin, monkeypatch):
    write_stub_cli(stub_bin, "claude", "print('ran')")
    real_prepare = pgw.prepare_stage

    def prepare(request, *args):
        if request.stage_run_id == "trips":
            raise TypeError("a check pgw got wrong")
        return real_prepare(request, *args)

    monkeypatch.setattr(pgw, "prepare_stage", prepare)
    with trio.fail_after(20):
        async with connected(tmp_path, environ) as (_, _, connection):
            await connection.send(request("trips"))
            tripped = await connection.stage_result("trips")
            await connection.send(request("fine"))
            assert (await connection.stage_result("fine")).stdout == "ran\n"
            assert not connection.closed.is_set()
    assert (tripped.returncode, tripped.error) == (-1, "internal error in pgw: TypeError")


async def test_two_ids_for_one_directory_are_not_both_accepted(tmp_path, environ, stub_bin):
    write_stub_cli(stub_bin, "claude", "import time; print('ready', flush=True); time.sleep(2)")
    with trio.fail_after(20):
        async with connected(tmp_path, environ) as (_, _, connection):
            await connection.send(request("é"))
            await connection.receive("stage.stdout", "é")
            # The same name as bytes decoded with surrogateescape: it names scratch/é too.
            await connection.send(json.dumps(request("\udcc3\udca9")))
            twin = await connection.stage_result("\udcc3\udca9")
            first = await connection.stage_result("é")
    assert twin.ack is None and "cannot name a scratch directory" in twin.error
    assert first.returncode == 0


async def test_an_id_naming_a_running_stages_directory_is_refused_and_harms_it_not(tmp_path, environ, stub_bin):
    # On macOS's file system, blind to case, `Job1` names `job1`'s directory,
    # which pgw took for one an earlier stage left, and emptied under the
    # running stage.  Here a symlink stands in for the folding Linux lacks.
    write_stub_cli(stub_bin, "claude", "import time; print('ready', flush=True); time.sleep(1); print(open('f').read())")
    with trio.fail_after(20):
        async with connected(tmp_path, environ) as (_, _, connection):
            await connection.send(request("job1", files={"f": base64.b64encode(b"kept").decode()}))
            await connection.receive("stage.stdout", "job1")
            (tmp_path / "home" / "scratch" / "Job1").symlink_to("job1")
            await connection.send(request("Job1"))
            twin = await connection.stage_result("Job1")
            first = await connection.stage_result("job1")
    assert twin.ack is None and "names the scratch directory of the running stage 'job1'" in twin.error
    assert first.returncode == 0 and first.stdout == "ready\nkept\n"


async def test_ids_and_bad_fields_reach_the_log_quoted_and_cut(tmp_path, environ, stub_bin, caplog):
    caplog.set_level(logging.INFO, logger="pgw")
    write_stub_cli(stub_bin, "claude", "print('ok')")
    forged = "x\n2026-11-27 10:00:00 INFO connected to https://forged.example"
    huge = "t" * (5 * 2**20)
    with trio.fail_after(20):
        async with connected(tmp_path, environ) as (_, _, connection):
            await connection.send(request(forged))
            await connection.stage_result(forged)
            await connection.send({"type": huge})
            await connection.send(request("huge-cli", cli=huge))
            bad = await connection.stage_result("huge-cli")
    assert all("\n" not in record.getMessage() for record in caplog.records)
    assert max(len(record.getMessage()) for record in caplog.records) < 2000
    assert len(bad.error) < 1000 and "5242880 characters" in bad.error


##############################################################################
# Peers
##############################################################################


async def test_a_binary_frame_is_not_run_and_a_request_in_one_is_answered(tmp_path, environ, stub_bin, caplog):
    # PROTOCOL.md owes every stage.request with a usable id its exit: a
    # server that sent one as a binary frame waited for it for ever.
    caplog.set_level(logging.INFO, logger="pgw")
    write_stub_cli(stub_bin, "claude", "print('ran')")
    with trio.fail_after(20):
        async with connected(tmp_path, environ) as (_, _, connection):
            await connection.send(json.dumps(request("binary")).encode())
            await connection.send(json.dumps(cancel("binary")).encode())
            await connection.send(b"\xff\xfe not even UTF-8")
            await connection.send(request("text"))
            assert (await connection.stage_result("text")).stdout == "ran\n"
            binary = await connection.stage_result("binary")
    assert binary.ack is None and binary.frames == [] and binary.returncode == -1
    assert binary.error == "bad request: a binary message of %d bytes: the protocol's messages are text frames" % len(
        json.dumps(request("binary")).encode()
    )
    warnings = [r.getMessage() for r in caplog.records if "binary message of" in r.getMessage()]
    # The request is answered, so it is not said to be skipped (it was, with no stage named).
    assert warnings[0].startswith("stage 'binary': refused a bad request (its exit says why): a binary message of")
    assert len(warnings) == 3 and all("skipped a bad message: a binary message of" in w for w in warnings[1:]), warnings


async def test_a_handshake_with_an_extension_not_offered_is_refused_in_plain_words(tmp_path, environ, caplog):
    caplog.set_level(logging.INFO, logger="pgw")

    async def answer(stream: trio.SocketStream) -> None:
        request_text = b""
        while b"\r\n\r\n" not in request_text:
            request_text += await stream.receive_some(4096)
        key = [line.split(b":", 1)[1].strip() for line in request_text.split(b"\r\n")
               if line.lower().startswith(b"sec-websocket-key:")][0]
        import hashlib
        accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\nSec-WebSocket-Extensions: x-webkit-deflate-frame\r\n\r\n"
        )
        await trio.sleep(5)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(functools.partial(trio.serve_tcp, answer, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            settings = pgw.Settings(server=f"http://127.0.0.1:{port}", token="tok-ext", name="n")
            daemon = pgw.Daemon(settings, tmp_path / "home", environ=environ)
            nursery.start_soon(daemon.run)
            while "cannot connect" not in caplog.text:
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    [line] = [r.getMessage() for r in caplog.records if "cannot connect" in r.getMessage()]
    assert "not one pgw can accept" in line and "extension" in line and "ExceptionGroup" not in line


async def read_request(stream: trio.SocketStream) -> bytes:
    """The opening handshake's request, up to its blank line."""
    request_text = b""
    while b"\r\n\r\n" not in request_text:
        request_text += await stream.receive_some(4096)
    return request_text


async def daemon_against(answer, tmp_path: Path, environ, caplog, until: str, timing: pgw.Timing = pgw.Timing(),
                         **settings) -> None:
    """An in-process daemon against a hand-written server (`answer` serves each
    connection), until `until` shows in pgw's log."""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(functools.partial(trio.serve_tcp, answer, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            config = pgw.Settings(server=f"http://127.0.0.1:{port}", token="tok-hand", name="n", **settings)
            nursery.start_soon(pgw.Daemon(config, tmp_path / "home", environ=environ, timing=timing).run)
            with trio.fail_after(5):
                while until not in caplog.text:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()


def accept_key(request_text: bytes) -> bytes:
    import hashlib
    key = [line.split(b":", 1)[1].strip() for line in request_text.split(b"\r\n")
           if line.lower().startswith(b"sec-websocket-key:")][0]
    return base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())


def echoing(body: bytes) -> bytes:
    return b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def switching(extensions: bytes) -> Callable[[bytes], bytes]:
    return lambda request_text: (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_key(request_text) + b"\r\nSec-WebSocket-Extensions: " + extensions + b"\r\n\r\n"
    )


# What a server or something on its way answers to the opening handshake, then
# closes (None: at once), and what pgw's one log line must say of it.
HANDSHAKE_ENDINGS = {
    "end-of-file": (None, "closed the connection during the WebSocket handshake"),
    "reset": ("reset", "closed the connection during the WebSocket handshake"),
    "503-until-closed": (lambda _: b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n\r\nbusy, try later",
                         "refused the WebSocket (HTTP 503)"),
    "401-until-closed": (lambda _: b"HTTP/1.1 401 Unauthorized\r\nConnection: close\r\n\r\nwho are you",
                         "rejected the token (HTTP 401)"),
    "409-with-a-reason": (lambda _: b'HTTP/1.1 409 Conflict\r\nContent-Type: application/json\r\nContent-Length: 44\r\n\r\n'
                                    b'{"detail":"worker w-1 is already connected"}',
                          "refused the WebSocket (HTTP 409: worker w-1 is already connected)"),
    "403-with-a-reason": (lambda _: b"HTTP/1.1 403 Forbidden\r\nContent-Length: 13\r\n\r\ntoken revoked",
                          "rejected the token (HTTP 403: token revoked): run `pgw pair"),
    # The token echoed back is not logged; an escape sequence reaches no terminal.
    "400-echoing-the-token": (lambda r: echoing(b"bad token \x1b[2J" + r.split(b"\r\n")[0]),
                              "refused the WebSocket (HTTP 400: bad token \\x1b[2JGET /api/local-worker/connect?token=<token> HTTP/1.1)"),
    "moved": (lambda _: b"HTTP/1.1 301 Moved Permanently\r\nLocation: https://new.example/api/x?token=tok-hand\r\nContent-Length: 0\r\n\r\n",
              "redirects the WebSocket (HTTP 301) to 'https://new.example/api/x': if that is where it moved, "
              "`pgw config set server URL`"),
    "moved-until-closed": (lambda _: b"HTTP/1.1 301 Moved Permanently\r\nLocation: https://new.example/api/x\r\nConnection: close\r\n\r\n",
                           "redirects the WebSocket (HTTP 301) to 'https://new.example/api/x'"),
    "moved-to-a-broken-url": (lambda _: b"HTTP/1.1 301 Moved Permanently\r\nLocation: http://[::1/x\r\nContent-Length: 0\r\n\r\n",
                              "redirects the WebSocket (HTTP 301) to 'http://[::1/x'"),
    "window-without-value": (switching(b"permessage-deflate; client_max_window_bits"),
                             "client_max_window_bits without a value"),
    "window-of-16": (switching(b"permessage-deflate; server_max_window_bits=16"), "server_max_window_bits='16'"),
    "window-not-a-number": (switching(b"permessage-deflate; server_max_window_bits=abc"), "server_max_window_bits='abc'"),
    "unknown-parameter": (switching(b"permessage-deflate; foo=bar"), "unknown parameter 'foo'"),
    "parameter-twice": (switching(b"permessage-deflate; server_no_context_takeover; server_no_context_takeover"),
                        "server_no_context_takeover given twice"),
    "extension-twice": (switching(b"permessage-deflate, permessage-deflate"), "accepted twice"),
    # wsproto reads these three headers as ASCII, and raised UnicodeDecodeError:
    # logged as "cannot reach", as if the server had not answered.
    "extensions-not-ascii": (switching(b"permessage-deflate; server_max_window_bits=\xb9\xb2"), "header that is not ASCII"),
    "connection-not-ascii": (lambda r: switching(b"permessage-deflate")(r).replace(b"Connection: Upgrade", b"Connection: Upgrade, caf\xe9"),
                             "header that is not ASCII"),
    "protocol-not-ascii": (lambda r: switching(b"permessage-deflate")(r).replace(b"\r\n\r\n", b"\r\nSec-WebSocket-Protocol: \xe9\r\n\r\n"),
                           "header that is not ASCII"),
    "upgrade-not-ascii": (lambda r: switching(b"permessage-deflate")(r).replace(b"Upgrade: websocket", b"Upgrade: websock\xe9t"),
                          "Missing header, 'Upgrade: websocket'"),
    "status-reason-not-ascii": (lambda _: b"HTTP/1.1 403 Verboten f\xfcr dich\r\nContent-Length: 0\r\n\r\n",
                                "rejected the token (HTTP 403)"),
    "window-with-a-leading-zero": (switching(b"permessage-deflate; server_max_window_bits=08"), "server_max_window_bits='08'"),
    # A field on several lines means its values joined by commas (RFC 9110 5.3):
    # wsproto read only the last line.
    "extension-on-two-lines": (lambda r: switching(b"permessage-deflate; client_max_window_bits=9")(r).replace(
        b"\r\n\r\n", b"\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n"), "accepted twice"),
    "an-extension-not-offered-on-a-line-of-its-own": (lambda r: switching(b"x-webkit-deflate-frame")(r).replace(
        b"\r\n\r\n", b"\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n"), "x-webkit-deflate-frame"),
    "accept-twice": (lambda r: switching_plainly(r).replace(b"Sec-WebSocket-Accept", b"Sec-WebSocket-Accept: d3Jvbmc=\r\nSec-WebSocket-Accept"),
                     "Bad accept token"),
}


@pytest.mark.parametrize("ending", HANDSHAKE_ENDINGS)
async def test_a_handshake_cut_short_or_answered_wrongly_is_named_at_once(tmp_path, environ, caplog, ending):
    # Not after the 15 s connect timeout, not as an internal error, not as
    # "cannot reach": the server was reached, and said (or did) something.
    caplog.set_level(logging.INFO, logger="pgw")
    answer_with, expected = HANDSHAKE_ENDINGS[ending]

    async def answer(stream: trio.SocketStream) -> None:
        request_text = await read_request(stream)
        if answer_with == "reset":
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif answer_with is not None:
            await stream.send_all(answer_with(request_text))
            if b" 101 " in answer_with(request_text):
                await trio.sleep(5)
        await stream.aclose()

    await daemon_against(answer, tmp_path, environ, caplog, "cannot connect", pgw.Timing(connect_timeout_s=10.0))
    [line] = [r.getMessage() for r in caplog.records if "cannot connect" in r.getMessage()]
    assert expected in line, line
    assert "tok-hand" not in caplog.text and "\x1b" not in caplog.text
    assert "internal error" not in line and "cannot reach" not in line and "in time" not in line, line
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# A refusal whose body does not end: pgw read it until the connect timeout
# (a server streaming one took pgw to 200 MiB), and lost the status and
# Retry-After with it.
ENDLESS_REFUSALS = {
    "body-shorter-than-its-length": (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 120\r\nContent-Length: 1000\r\n\r\n0123456789",
                                     b""),
    "body-streaming": (b"HTTP/1.1 409 Conflict\r\nTransfer-Encoding: chunked\r\n\r\n", b"10000\r\n" + b"x" * 0x10000 + b"\r\n"),
}


@pytest.mark.parametrize("refusal", ENDLESS_REFUSALS)
async def test_a_refusal_is_told_from_its_head_without_waiting_for_its_body(tmp_path, environ, caplog, refusal):
    head, more = ENDLESS_REFUSALS[refusal]

    async def answer(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await stream.send_all(head)
        try:
            while True:
                await stream.send_all(more)
                await trio.sleep(0.001 if more else 1)
        except trio.BrokenResourceError:  # pgw closed it: what the test waits for
            pass

    await daemon_against(answer, tmp_path, environ, caplog, "cannot connect", pgw.Timing(connect_timeout_s=10.0))
    [line] = [r.getMessage() for r in caplog.records if "cannot connect" in r.getMessage()]
    assert f"refused the WebSocket (HTTP {head.split()[1].decode()})" in line, line
    if b"Retry-After" in head:
        assert "next try in 120 s" in line or "retrying in 120" in line, line


async def test_a_server_that_takes_the_connection_and_says_nothing_is_named_as_such(tmp_path, environ, caplog):
    # It was "did not complete the connection in time", which the
    # troubleshooting table reads as a firewall dropping packets.
    async def answer(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await trio.sleep_forever()

    await daemon_against(answer, tmp_path, environ, caplog, "cannot connect", pgw.Timing(connect_timeout_s=0.5))
    [line] = [r.getMessage() for r in caplog.records if "cannot connect" in r.getMessage()]
    assert "took the connection but gave no answer to the WebSocket handshake in 0.5 s" in line, line


def switching_plainly(request_text: bytes) -> bytes:
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_key(request_text) + b"\r\n\r\n")


# Interim (1xx) responses a server or a proxy may send before its 101 (RFC 9110
# 15.2), and how: as writes of their own, or run together with what follows.
# wsproto takes any 1xx for the answer to the handshake: pgw logged "refused
# the WebSocket (HTTP 100)" and never connected.
INTERIM_RESPONSES = {
    "100-continue": [b"HTTP/1.1 100 Continue\r\n\r\n"],
    "103-early-hints-a-byte-at-a-time": [bytes([byte]) for byte in
                                         b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"],
    "two-with-the-101-in-one-write": [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\nX-A: 1\r\n\r\n", b"101"],
    "without-a-reason-phrase": [b"HTTP/1.1 100\r\n\r\n"],
    "in-bare-lf-lines": [b"HTTP/1.1 100 Continue\n\n"],
}
# 101s written as RFC 9110 5.3 and RFC 9112 allow: wsproto kept only the last
# line of a field given on several, and waited for CRLF where a line may end
# in a bare LF.
SWITCHING_ANSWERS = {
    "connection-on-two-lines": lambda answer: answer.replace(b"Connection: Upgrade\r\n", b"Connection: Upgrade\r\nConnection: keep-alive\r\n"),
    "connection-on-two-lines-upgrade-first": lambda answer: answer.replace(b"Connection: Upgrade\r\n", b"connection: keep-alive\r\nConnection: Upgrade\r\n"),
    "connection-folded": lambda answer: answer.replace(b"Connection: Upgrade\r\n", b"Connection: keep-alive,\r\n  Upgrade\r\n"),
    "bare-lf-lines": lambda answer: answer.replace(b"\r\n", b"\n"),
}


@pytest.mark.parametrize("answered", [f"after-{name}" for name in INTERIM_RESPONSES] + list(SWITCHING_ANSWERS))
async def test_a_101_after_interim_responses_or_written_as_http_allows_connects(tmp_path, environ, caplog, answered):
    caplog.set_level(logging.INFO, logger="pgw")
    hellos = []

    async def answer(stream: trio.SocketStream) -> None:
        request_text = await read_request(stream)
        switching = SWITCHING_ANSWERS.get(answered, lambda answer: answer)(switching_plainly(request_text))
        writes = INTERIM_RESPONSES.get(answered.removeprefix("after-"), [])
        if writes and writes[-1] == b"101":
            writes = writes[:-1]
            writes[-1] += switching
        else:
            writes = writes + [switching]
        for data in writes:
            await stream.send_all(data)
            await trio.sleep(0.001)
        received = b""
        while not client_frames(received):
            received += await stream.receive_some(65536)
        hellos.extend(json.loads(payload)["type"] for _, payload in client_frames(received))
        reason = struct.pack("!H", 1000) + b"got the hello"
        await stream.send_all(bytes((0x88, len(reason))) + reason)
        await trio.sleep(5)

    await daemon_against(answer, tmp_path, environ, caplog, "got the hello")
    assert hellos[:1] == ["hello"]
    assert "refused" not in caplog.text and "cannot connect" not in caplog.text


def client_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, unmasked payload) of each whole client frame in `data`."""
    frames = []
    while len(data) >= 2:
        size, at = data[1] & 0x7F, 2
        if size == 126:
            size, at = struct.unpack("!H", data[2:4])[0], 4
        elif size == 127:
            size, at = struct.unpack("!Q", data[2:10])[0], 10
        if len(data) < at + 4 + size:
            break
        key, payload = data[at:at + 4], data[at + 4:at + 4 + size]
        frames.append((data[0] & 0x0F, bytes(b ^ key[i % 4] for i, b in enumerate(payload))))
        data = data[at + 4 + size:]
    return frames


# A frame from the server that RFC 6455 forbids, and the close code it calls for.
BROKEN_FRAMES = {
    "rsv2-set": (b"\xa1\x02hi", 1002),
    "masked-by-the-server": (b"\x81\x82abcd" + bytes([ord("h") ^ ord("a"), ord("i") ^ ord("b")]), 1002),
    "text-not-utf8": (b"\x81\x02\xff\xfe", 1007),
    "ping-of-126-bytes": (b"\x89\x7e\x00\x7e" + b"x" * 126, 1002),
}


@pytest.mark.parametrize("frame", BROKEN_FRAMES)
async def test_a_frame_the_protocol_forbids_gets_a_close_from_pgw_and_is_named_as_its_doing(tmp_path, environ, caplog, frame):
    # RFC 6455 7.1.7: the endpoint that fails the connection should send a
    # Close frame first; pgw sent none, and logged that the server had closed.
    caplog.set_level(logging.INFO, logger="pgw")
    broken, code = BROKEN_FRAMES[frame]
    received = bytearray()
    done = trio.Event()

    async def answer(stream: trio.SocketStream) -> None:
        request_text = await read_request(stream)
        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_key(request_text) + b"\r\n\r\n"
        )
        await stream.send_all(broken)
        with trio.move_on_after(5):
            while chunk := await stream.receive_some(65536):
                received.extend(chunk)
        done.set()
        await stream.aclose()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(functools.partial(trio.serve_tcp, answer, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            settings = pgw.Settings(server=f"http://127.0.0.1:{port}", token="tok-frame", name="n", compression="off")
            daemon = pgw.Daemon(settings, tmp_path / "home", environ=environ)
            nursery.start_soon(daemon.run)
            await done.wait()
            while "disconnected" not in caplog.text:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    closes = [payload for opcode, payload in client_frames(bytes(received)) if opcode == 0x8]
    assert closes[:1] == [struct.pack("!H", code)], client_frames(bytes(received))
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("disconnected")][:1]
    assert f"pgw closed the connection ({code}): the server sent " in line, line


async def test_a_close_reason_cannot_forge_a_log_line(tmp_path, environ, caplog):
    # The reason is the server's text: a newline in it would start a line of
    # run.log that pgw never wrote, and an escape sequence would reach a terminal.
    caplog.set_level(logging.INFO, logger="pgw")
    reason = "bye\n2026-01-01 00:00:00 INFO stage 'x': ended ok\x1b[2J".encode()

    async def answer(stream: trio.SocketStream) -> None:
        request_text = await read_request(stream)
        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_key(request_text) + b"\r\n\r\n"
        )
        payload = struct.pack("!H", 1000) + reason
        await stream.send_all(bytes((0x88, len(payload))) + payload)
        with trio.move_on_after(2):
            while await stream.receive_some(65536):
                pass
        await stream.aclose()

    await daemon_against(answer, tmp_path, environ, caplog, "disconnected", compression="off")
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("disconnected")][:1]
    assert 'the server closed the connection (1000: "bye\\n2026' in line, line
    assert "\n" not in line and "\x1b" not in line, line


@pytest.mark.parametrize(
    "status, header, wait_s",
    [(503, b"120", 120.0), (429, b"Thu, 01 Jan 1970 00:17:10 GMT", 30.0), (503, b"99999999999", 3600.0),
     (503, b"soon", None), (503, None, None), (500, b"5", None)],
)
def test_a_refusal_says_how_long_to_wait_in_seconds_or_as_a_date(status, header, wait_s):
    headers = ((b"Retry-After", header),) if header is not None else ()
    refusal = trio_websocket.ConnectionRejected(status, headers, None)
    assert pgw.retry_after_s(refusal, now_unix=1000.0) == wait_s


# A refusal's body ends at its Content-Length, or only with the connection
# (RFC 9112 6.3), as many proxies and small servers send it: its headers were
# dropped then, and with them the Retry-After.
@pytest.mark.parametrize("framing", [b"Content-Length: 0\r\n\r\n", b"Connection: close\r\n\r\nbusy"])
async def test_a_server_that_asks_to_retry_later_is_retried_no_sooner(tmp_path, environ, caplog, framing):
    caplog.set_level(logging.INFO, logger="pgw")

    async def answer(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await stream.send_all(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 7\r\n" + framing)
        await stream.aclose()

    await daemon_against(answer, tmp_path, environ, caplog, "cannot connect", pgw.Timing(reconnect_first_s=0.05))
    [line] = [r.getMessage() for r in caplog.records if "cannot connect" in r.getMessage()]
    assert line.endswith("the server refused the WebSocket (HTTP 503); retrying in 7.0 s"), line


def test_a_window_in_other_digits_than_ascii_fails_the_handshake_not_pgw():
    # "¹²".isdigit() is true, and int() would raise ValueError on it.
    with pytest.raises(wsproto.utilities.RemoteProtocolError, match="server_max_window_bits='¹²'"):
        pgw.Deflate().finalize("permessage-deflate; server_max_window_bits=¹²")


@pytest.mark.parametrize("value, bits", [('"10"', 10), ('"1\\1"', 11), ("12", 12), ("8", 9)])
def test_a_window_may_be_quoted_and_eight_bits_are_taken_as_nine(value, bits):
    deflate = pgw.Deflate()
    deflate.finalize(f"permessage-deflate; client_max_window_bits={value}; server_no_context_takeover")
    assert (deflate.client_max_window_bits, deflate.server_no_context_takeover) == (bits, True)


##############################################################################
# The daemon's own reasons: reconnect reminders, refusals under cron, doctor
##############################################################################


async def test_a_long_outage_is_reminded_at_growing_intervals_and_counted_for_status(tmp_path, environ, caplog):
    caplog.set_level(logging.INFO, logger="pgw")
    timing = pgw.Timing(reconnect_first_s=0.02, reconnect_cap_s=0.05, reconnect_reminder_s=0.3)
    with trio.fail_after(20):
        async with open_backend() as backend:
            port = backend.port
        daemon = pgw.Daemon(pgw.Settings(server=f"http://127.0.0.1:{port}", token="t", name="n"), tmp_path / "h",
                            environ=environ, timing=timing)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(daemon.run)
            await trio.sleep(2.5)
            with trio.move_on_after(1):  # a moment between two tries, not during one
                while daemon.link.next_try_unix is None:
                    await trio.sleep(0.001)
            state = daemon.state()
            nursery.cancel_scope.cancel()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings[0].startswith("cannot connect: 127.0.0.1:") and "refused" in warnings[0]
    reminders = [w for w in warnings if w.startswith("still cannot connect after ")]
    assert 2 <= len(reminders) <= 4, warnings  # 0.3 s, then 0.6, 1.2: growing, not one per try
    assert state["tries"] > 10 and state["next_try_at"] is not None and "refused" in state["last_error"]


def test_run_refusing_to_start_under_cron_leaves_its_reason_for_status_and_logs(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {"PGW_HOME": str(home), "PATH": "/usr/bin:/bin"}  # cron's: no terminal, nobody reads stderr
    done = subprocess.run([sys.executable, str(ROOT / "pgw.py"), "run"], env=env, capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)
    assert done.returncode == 1 and "not paired" in done.stderr
    assert "did not start: not paired yet" in (home / "run.log").read_text()
    status = subprocess.run([sys.executable, str(ROOT / "pgw.py"), "status"], env=env, capture_output=True,
                            text=True, timeout=30)
    assert "last error not paired yet" in status.stdout and "paired     no" in status.stdout


def test_doctor_fails_what_run_would_refuse(tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("PGW_HOME", str(home))
    monkeypatch.setenv("PATH", str(tmp_path))  # no CLI, no network needed for this
    pgw.write_config(home / "config.json", {"server": "http://127.0.0.1:9", "worker_id": "w", "token": "tok-ca",
                                            "cafile": str(tmp_path / "missing-ca.pem")})
    assert pgw.main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  run        `pgw run` would refuse to start: CA file" in out
    for name in ("tls", "websocket"):
        assert f"SKIP  {name}" in out


def serve_in_a_thread(answer: Callable[[bytes], bytes], then: Callable[[socket.socket], None] = lambda _: None):
    """A listener answering each opening handshake with `answer(request)`, then
    doing `then` with the connection; the listener and its port."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:  # closed: the test is over
                return
            with connection:
                request_text = b""
                while b"\r\n\r\n" not in request_text and (chunk := connection.recv(4096)):
                    request_text += chunk
                connection.sendall(answer(request_text))
                then(connection)

    threading.Thread(target=serve, daemon=True).start()
    return listener, listener.getsockname()[1]


def doctor_against(listener_and_port: tuple[socket.socket, int], token: str, home: Path, capsys, monkeypatch,
                   *options: str) -> str:
    listener, port = listener_and_port
    monkeypatch.setenv("PGW_HOME", str(home))
    monkeypatch.setenv("PATH", str(home.parent))  # no CLI
    pgw.write_config(home / "config.json", {"server": f"http://127.0.0.1:{port}", "worker_id": "w", "token": token})
    try:
        assert pgw.main(["doctor", *options]) == 1  # no CLI: a FAIL whatever the server does
    finally:
        listener.close()
    return capsys.readouterr().out


# What a server may do once it accepted the token and doctor closes: RFC 6455
# lets it ping before its own close (trio-websocket's reader then failed to
# pong in the closing state), or it may never answer the close.
AFTER_DOCTORS_CLOSE = {
    "pings-then-closes": lambda connection: (connection.recv(4096), connection.sendall(b"\x89\x04late\x88\x02\x03\xe8"),
                                             time.sleep(1)),
    "never-answers": lambda connection: time.sleep(30),  # longer than the connect timeout, which doctor waited out
}


@pytest.mark.parametrize("after", AFTER_DOCTORS_CLOSE)
def test_doctor_passes_a_server_that_accepted_the_token_whatever_it_does_at_the_close(tmp_path, capsys, monkeypatch, after):
    out = doctor_against(serve_in_a_thread(switching_plainly, AFTER_DOCTORS_CLOSE[after]), "tok-doctor", tmp_path / "home",
                         capsys, monkeypatch)
    assert "PASS  websocket  the server accepted the token" in out, out


@pytest.mark.parametrize("as_json", [False, True])
def test_doctor_hides_the_token_a_server_echoes(tmp_path, capsys, monkeypatch, as_json):
    # Its report is pasted into bug reports, and showed a redirect's Location
    # with the token in it, which the log hid.
    token = "tok-doctor-secret/+"
    quoted = urllib.parse.quote(token, safe="")
    redirect = f"HTTP/1.1 307 Temporary Redirect\r\nLocation: /moved/{token}/{quoted}/x\r\nContent-Length: 0\r\n\r\n"
    out = doctor_against(serve_in_a_thread(lambda _: redirect.encode()), token, tmp_path / "home", capsys, monkeypatch,
                         *(["--json"] if as_json else []))
    assert "/moved/<token>/<token>/x" in out and token not in out and quoted not in out


def test_doctor_says_an_http_server_needs_no_tls_check_whatever_failed(tmp_path, capsys, monkeypatch):
    # It said "not checked after the websocket check failed", as if TLS came
    # after the WebSocket and would have been checked otherwise.
    refusal = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"
    out = doctor_against(serve_in_a_thread(lambda _: refusal), "tok-doctor", tmp_path / "home", capsys, monkeypatch)
    assert "FAIL  websocket" in out and "SKIP  tls        not needed for an http:// server" in out, out


async def test_doctor_beside_a_running_daemon_does_not_open_a_second_connection(tmp_path, stub_bin, script_pgw):  # noqa: F811
    home = tmp_path / "home"
    with trio.fail_after(30):
        async with open_backend() as backend:
            async with pgw_daemon(script_pgw, home, stub_bin, server=backend.url, token=backend.token):
                await (await backend.next_connection()).receive("hello")
                await trio.sleep(0.7)  # the state file says connected
                doctor = await trio.run_process(
                    [*script_pgw.argv, "doctor"], env={"PGW_HOME": str(home), "PATH": f"{stub_bin}:/usr/bin:/bin",
                                                      **script_pgw.env},
                    capture_stdout=True, capture_stderr=True, check=False,
                )
                assert len(backend.connections) == 1 and len(backend.handshakes) == 1
    out = doctor.stdout.decode()
    assert "SKIP  websocket  the running pgw (pid" in out and "is connected" in out, out


def test_a_tool_that_hangs_is_given_up_on_with_all_it_started(tmp_path):
    # A crontab that hung was given up on after 30 s, and the child it had
    # started ran on under init.
    marker = f"pgw-tool-child-{os.getpid()}-{time.monotonic_ns()}"
    tool = tmp_path / "crontab"
    tool.write_text(f"#!/bin/sh\n{sys.executable} -c 'import time; time.sleep(300)' {marker} &\nsleep 300\n")
    tool.chmod(0o755)
    with pytest.raises(pgw.PgwError, match="gave no answer within 2 s"):
        pgw._run_tool([str(tool), "-l"], timeout_s=2)
    deadline = time.monotonic() + 5
    while any(marker.encode() in cmdline for cmdline in _cmdlines()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(marker.encode() in cmdline for cmdline in _cmdlines())


def _cmdlines() -> list[bytes]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                    found.append(cmdline.read())
            except OSError:
                continue
    return found


def test_a_tool_whose_escaped_child_holds_its_pipes_is_still_given_up_on_in_time(tmp_path):
    # After the kill, its pipes were read to their end, which a child in a
    # session of its own held: install waited as long as that child lived.
    tool = tmp_path / "systemctl"
    tool.write_text(f"#!/bin/sh\nsetsid {sys.executable} -c 'import time; time.sleep(20)' &\nsleep 300\n")
    tool.chmod(0o755)
    started = time.monotonic()
    with pytest.raises(pgw.PgwError, match="gave no answer within 1 s"):
        pgw._run_tool([str(tool)], timeout_s=1)
    assert time.monotonic() - started < 10


def test_a_refusals_content_length_of_thousands_of_digits_is_no_length():
    head = b"HTTP/1.1 403 Forbidden\r\nContent-Length: " + b"1" * 5000
    assert pgw.merged_fields(head, b"body").endswith(b"Content-Length: 0\r\n\r\n")


def test_a_token_across_the_cut_of_a_refusals_body_is_hidden_whole():
    token = "tok-" + "s" * 40
    body = b"x" * (pgw.REFUSAL_BODY_MAX_BYTES - 10) + token.encode()
    head = b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d" % len(body)
    kept = pgw.merged_fields(head, body, pgw.token_forms(token))
    assert b"tok-" not in kept and kept.endswith(b"x<token>")
