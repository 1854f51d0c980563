"""Unattended operation: one daemon per home, `pgw status`, leftovers of a killed daemon."""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import trio

import pgw
from backend import open_backend
from conftest import ROOT, write_stub_cli
from test_run import SLEEPER, assert_group_gone, daemon_process, request, wait_ready

PGW = [sys.executable, str(ROOT / "pgw.py")]


def pgw_command(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home.parent), "PGW_HOME": str(home), "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([*PGW, *args], env=env, capture_output=True, text=True, timeout=30, check=False)


# Where a file pgw reads may be something else: a FIFO hung every command (and
# `run`) with no word, a device never ended; a CA file likewise hung `run`.
NOT_A_FILE = {"fifo": lambda path: os.mkfifo(path), "device": lambda path: path.symlink_to("/dev/zero")}


@pytest.mark.parametrize("kind", NOT_A_FILE)
@pytest.mark.parametrize("command", ["status", "config show", "doctor", "run"])
def test_a_config_that_is_no_regular_file_is_named_not_a_hang(tmp_path, kind, command):
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    NOT_A_FILE[kind](home / "config.json")
    done = pgw_command(home, *command.split())
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert f"cannot read {home / 'config.json'}: not a regular file" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_a_log_linked_to_a_device_is_written_to_and_its_mode_left_alone(tmp_path):
    # run.log -> /dev/null: pgw made the device mode 0600, which as root broke /dev/null for every other user.
    device = tmp_path / "null"
    try:
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("making a device node takes CAP_MKNOD")
    device.chmod(0o666)
    (tmp_path / "run.log").symlink_to(device)
    handler = pgw.LogFile(str(tmp_path / "run.log"), encoding="utf-8")
    try:
        handler.emit(logging.LogRecord("pgw", logging.INFO, __file__, 0, "a line", (), None))
    finally:
        handler.close()
    assert stat.S_IMODE(device.stat().st_mode) == 0o666


@pytest.mark.parametrize("kind", NOT_A_FILE)
def test_logs_of_a_log_that_is_no_regular_file_is_one_line_not_a_hang(tmp_path, kind):
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    NOT_A_FILE[kind](home / "run.log")
    done = pgw_command(home, "logs")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == f"pgw: cannot read {home / 'run.log'}: not a regular file\n"


@pytest.mark.parametrize("kind", NOT_A_FILE)
def test_a_ca_file_that_is_no_regular_file_is_named_not_a_hang(tmp_path, kind):
    cafile = tmp_path / "ca.pem"
    NOT_A_FILE[kind](cafile)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PGW_HOME": str(tmp_path / "home"),
           "PYTHONPATH": os.pathsep.join(sys.path), "PGW_CAFILE": str(cafile)}
    done = subprocess.run([*PGW, "pair", "CODE", "--server", "https://127.0.0.1:9"], env=env, capture_output=True,
                          text=True, timeout=30, check=False)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == f"pgw: CA file {cafile} cannot be read: not a regular file; fix PGW_CAFILE\n"


async def wait_for_status(home: Path, code: int, within_s: float = 5.0) -> subprocess.CompletedProcess[str]:
    with trio.move_on_after(within_s):
        while True:
            done = await trio.to_thread.run_sync(pgw_command, home, "status", "--json")
            if done.returncode == code:
                return done
            await trio.sleep(0.1)
    raise AssertionError(f"status never exited {code}: {done.returncode} {done.stdout} {done.stderr}")


async def test_two_runs_on_one_home_exactly_one_connects(tmp_path, stub_bin):
    home = tmp_path / "home"
    with trio.fail_after(20):
        async with open_backend() as backend:
            async with daemon_process(PGW, backend, home, stub_bin) as first:
                async with daemon_process(PGW, backend, home, stub_bin) as second:
                    await backend.next_connection()
                    with trio.fail_after(5):
                        loser, winner = (second, first) if await _first_to_exit(first, second) is second else (first, second)
                    assert loser.returncode == 0
                    await trio.sleep(1.0)
                    assert winner.returncode is None
                    assert len(backend.connections) == 1


async def _first_to_exit(*processes):
    while True:
        for process in processes:
            if process.poll() is not None:
                return process
        await trio.sleep(0.05)


def test_second_run_says_who_holds_the_home(tmp_path):
    home = tmp_path / "home"
    pgw.write_config(home / "config.json", {"server": "http://127.0.0.1:9", "token": "t"})
    fd, holder = pgw.acquire_instance_lock(home)
    assert fd is not None and holder is None
    try:
        done = pgw_command(home, "run")
        assert (done.returncode, done.stdout, done.stderr) == (0, f"pgw already running (pid {os.getpid()})\n", "")
        assert pgw.instance_lock_holder(home) == os.getpid()
        # Flags given were dropped without a word: the user believed them in force.
        done = pgw_command(home, "run", "--max-stages", "3", "--name", "box", "-v")
        assert (done.returncode, done.stdout) == (0, f"pgw already running (pid {os.getpid()})\n")
        assert done.stderr == ("pgw: --name, --max-stages, --verbose not taken: the running pgw keeps its own settings;"
                               " `pgw stop`, then start it with them\n")
    finally:
        os.close(fd)
    assert pgw.instance_lock_holder(home) is None


async def test_status_exit_codes_in_all_three_states(tmp_path, stub_bin):
    home = tmp_path / "home"
    not_running = pgw_command(home, "status")
    assert not_running.returncode == 1 and "not running" in not_running.stdout
    with trio.fail_after(30):
        async with open_backend() as backend:
            async with daemon_process(PGW, backend, home, stub_bin) as daemon:
                connection = await backend.next_connection()
                running = json.loads((await wait_for_status(home, 0)).stdout)
                assert running["running"] and running["connected"] and running["pid"] == daemon.pid
                assert running["server"] == backend.url and running["stages_running"] == 0
                write_stub_cli(stub_bin, "claude", SLEEPER)
                await connection.send(request("s1"))
                await wait_ready(connection, "s1")
                with trio.fail_after(5):  # the daemon publishes at most twice a second
                    while json.loads(pgw_command(home, "status", "--json").stdout)["stages_running"] != 1:
                        await trio.sleep(0.1)
                busy = json.loads(pgw_command(home, "status", "--json").stdout)
                assert (busy["stages_running"], busy["stages_queued"]) == (1, 0)
                lines = pgw_command(home, "status").stdout
                assert f"pid {daemon.pid}" in lines and "1 running, 0 queued" in lines
                await backend.aclose()
                disconnected = json.loads((await wait_for_status(home, 3)).stdout)
                assert disconnected["running"] and not disconnected["connected"]
                assert disconnected["last_error"]
                daemon.send_signal(signal.SIGTERM)
                await daemon.wait()
    assert pgw_command(home, "status").returncode == 1


async def test_status_of_a_stopped_daemon_says_it_is_not_connected(tmp_path, stub_bin):
    # SIGSTOPped (Ctrl-Z, a debugger), pgw answers nothing and the server lets
    # it go, but its state file still said connected, and status exit 0.
    home = tmp_path / "home"
    with trio.fail_after(30):
        async with open_backend() as backend:
            async with daemon_process(PGW, backend, home, stub_bin) as daemon:
                await backend.next_connection()
                await wait_for_status(home, 0)
                daemon.send_signal(signal.SIGSTOP)
                try:
                    stopped = pgw_command(home, "status", "--json")
                    lines = pgw_command(home, "status")
                finally:
                    daemon.send_signal(signal.SIGCONT)
                report = json.loads(stopped.stdout)
                assert stopped.returncode == lines.returncode == 3
                assert report["running"] and report["stopped"] and report["connected"] is False, report
                assert f"connected  no: pgw is stopped (SIGSTOP, Ctrl-Z or a debugger); `kill -CONT {daemon.pid}`" in lines.stdout
                going_on = json.loads((await wait_for_status(home, 0)).stdout)
                assert going_on["connected"] and not going_on["stopped"]
                daemon.send_signal(signal.SIGTERM)
                await daemon.wait()


def test_a_state_file_that_cannot_be_rewritten_goes_rather_than_tell_what_no_longer_holds(tmp_path, monkeypatch):
    # With the home's disk full, state.json kept saying "connected" after the
    # connection was lost, and `pgw status` believed it (exit 0).
    home = tmp_path / "home"
    daemon = pgw.Daemon(pgw.Settings(server="http://127.0.0.1:9", token="t"), home)
    pgw.make_private_dirs(home)
    daemon.link.connected = True
    daemon.state_file.write_now()
    assert pgw.read_state(home)["connected"] is True

    def disk_full(path, value, durable=False):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pgw, "write_json_atomically", disk_full)
    daemon.link.connected = False
    daemon.state_file.write_now()
    assert not (home / "state.json").exists()


async def test_a_state_file_removed_while_the_daemon_idles_is_written_again(tmp_path):
    # Nothing changing, it was never written again: `status` said it could not
    # tell whether pgw was connected until the next stage.
    home = tmp_path / "home"
    pgw.make_private_dirs(home)
    daemon = pgw.Daemon(pgw.Settings(server="http://127.0.0.1:9", token="t"), home,
                        timing=pgw.Timing(state_write_interval_s=0.01, state_check_s=0.05))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(daemon.state_file.writer)
            daemon.state_file.publish()
            while not (home / "state.json").exists():
                await trio.sleep(0.01)
            (home / "state.json").unlink()
            while not (home / "state.json").exists():
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert pgw.read_state(home)["pid"] == os.getpid()


async def test_a_state_file_write_that_failed_is_tried_again_without_a_change(tmp_path, monkeypatch):
    # Once the disk had room again, an idle daemon (nothing changing) left
    # `status` without a state file for good.
    home = tmp_path / "home"
    pgw.make_private_dirs(home)
    daemon = pgw.Daemon(pgw.Settings(server="http://127.0.0.1:9", token="t"), home,
                        timing=pgw.Timing(state_write_interval_s=0.01, state_retry_s=0.05))
    real, failures = pgw.write_json_atomically, []

    def full_once(path, value, durable=False):
        if not failures:
            failures.append(path)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, value, durable)

    monkeypatch.setattr(pgw, "write_json_atomically", full_once)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(daemon.state_file.writer)
            daemon.state_file.publish()  # the one change
            while not (home / "state.json").exists():
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert failures and pgw.read_state(home)["pid"] == os.getpid()


def test_status_reads_no_fifo_put_in_place_of_the_state_file(tmp_path):
    home = tmp_path / "home"
    pgw.make_private_dirs(home)
    os.mkfifo(home / "state.json")  # a reader would wait for a writer that never comes
    done = pgw_command(home, "status")  # which times out, and fails, if status waits
    assert done.returncode == 1 and "not running" in done.stdout


def test_status_cannot_tell_without_a_state_file_of_the_running_daemon(tmp_path):
    home = tmp_path / "home"
    pgw.write_config(home / "config.json", {"server": "http://127.0.0.1:9", "token": "t"})
    fd, _ = pgw.acquire_instance_lock(home)
    try:
        for state in (None, {"pid": os.getpid() + 1, "connected": True}):  # none, or an earlier run's
            if state is not None:
                pgw.write_json_atomically(home / "state.json", state)
            done = pgw_command(home, "status")
            assert done.returncode == 3 and "connected  cannot tell: no state file of this run" in done.stdout
            report = json.loads(pgw_command(home, "status", "--json").stdout)
            assert (report["connected"], report["stages_running"], report["last_error"]) == (None, None, None)
    finally:
        os.close(fd)


def test_status_cannot_tell_from_a_state_file_in_a_home_the_daemon_cannot_write(tmp_path):
    # A read-only home: the daemon can neither rewrite its state file nor
    # remove it, and status believed "connected" after the connection was lost.
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root, to run this as nobody")
    base = Path(tempfile.mkdtemp(prefix="pgw-readonly-"))  # pytest's tmp_path is closed to nobody
    base.chmod(0o755)
    home = base / "home"
    pgw.make_private_dirs(home)
    code = (
        "import os, sys, json; sys.path.insert(0, sys.argv[1]); import pgw\n"
        "from pathlib import Path\n"
        "home = Path(sys.argv[2]); fd, _ = pgw.acquire_instance_lock(home)\n"
        "pgw.write_json_atomically(home / 'state.json', {'pid': os.getpid(), 'connected': True})\n"
        "os.chmod(home, 0o500)\n"
        "sys.exit(pgw.main(['--home', str(home), 'status']))\n"
    )
    os.chown(home, 65534, 65534)
    try:
        done = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code, str(ROOT), str(home)],
            capture_output=True, text=True, timeout=60, cwd="/", env={"PATH": "/usr/bin:/bin", "HOME": str(home)},
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert done.returncode == 3, done.stdout + done.stderr
    assert f"connected  cannot tell: {home} cannot be written" in done.stdout


async def test_sigkilled_daemon_takes_its_stages_with_it_and_a_restart_clears_scratch(tmp_path, stub_bin):
    write_stub_cli(stub_bin, "claude", SLEEPER)
    home = tmp_path / "home"
    with trio.fail_after(30):
        async with open_backend() as backend:
            async with daemon_process(PGW, backend, home, stub_bin) as daemon:
                connection = await backend.next_connection()
                await connection.send(request("orphan"))
                pgid = await wait_ready(connection, "orphan")
                daemon.kill()
                await daemon.wait()
            await assert_group_gone(pgid)  # the stage root saw pgw go and killed the stage
            assert (home / "scratch" / "orphan").exists()
            async with daemon_process(PGW, backend, home, stub_bin):
                await backend.next_connection()
                assert list((home / "scratch").iterdir()) == []


def test_selftest_fails_a_step_that_does_not_hold(capsys, monkeypatch):
    monkeypatch.setattr(pgw, "check_file_path", lambda name: tuple(name.split("/")))  # lets `..` through
    assert pgw.main(["selftest"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  bad request" in out and "PASS  echo" in out
    assert "selftest: 1 step(s) failed" in out


def test_selftest_still_fails_a_step_under_python_O():
    # `python -O` drops every `assert`: the steps' checks must not be asserts.
    code = (
        "import sys, pgw\n"
        "pgw.check_file_path = lambda name: tuple(name.split('/'))\n"
        "sys.exit(pgw.main(['selftest']))"
    )
    done = subprocess.run([sys.executable, "-O", "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "FAIL  bad request" in done.stdout, done.stdout + done.stderr


# install and uninstall ----------------------------------------------------------

FAKE_CRONTAB = """#!/bin/sh
# a crontab(1) stand-in keeping the table in $CRONTAB_FILE
if [ "$1" = "-l" ]; then
  [ -f "$CRONTAB_FILE" ] || { echo "no crontab for $USER" >&2; exit 1; }
  cat "$CRONTAB_FILE"
elif [ "$1" = "-" ]; then
  cat > "$CRONTAB_FILE"
fi
"""


PAIRED = {"server": "http://127.0.0.1:9", "worker_id": "w-1", "token": "tok-secret"}


def fake_crontab(tmp_path, monkeypatch, table_text=None):
    """crontab(1) stand-in on PATH; the table it keeps."""
    tools = tmp_path / "tools"
    tools.mkdir(exist_ok=True)
    (tools / "crontab").write_text(FAKE_CRONTAB)
    (tools / "crontab").chmod(0o755)
    table = tmp_path / "crontab.txt"
    if table_text is not None:
        table.write_text(table_text)
    monkeypatch.setenv("PATH", f"{tools}:/usr/bin:/bin")
    monkeypatch.setenv("CRONTAB_FILE", str(table))
    return table


def test_install_cron_prints_absolute_paths_and_a_path_with_the_clis(capsys, pgw_home, tmp_path, monkeypatch):
    clis = tmp_path / "clis"
    write_stub_cli(clis, "claude", "print('claude')")
    pgw.write_config(pgw_home / "config.json", {"env": {"PATH": str(clis)}})
    assert pgw.main(["install", "cron"]) == 0
    out = capsys.readouterr().out
    reboot = next(line for line in out.splitlines() if line.startswith("@reboot "))
    watchdog = next(line for line in out.splitlines() if line.startswith("*/5 * * * * "))
    assert reboot[len("@reboot "):] == watchdog[len("*/5 * * * * "):]
    assert f"PATH={clis}:" in reboot
    assert f"SHIV_ROOT={pgw_home / 'shiv'}" in reboot and f"PGW_HOME={pgw_home}" in reboot
    assert f"{sys.executable} {ROOT / 'pgw.py'} run >/dev/null 2>&1" in reboot


def test_install_cron_apply_is_idempotent_and_uninstall_keeps_other_lines(capsys, pgw_home, tmp_path, monkeypatch):
    table = fake_crontab(tmp_path, monkeypatch, "MAILTO=me\n0 3 * * * backup\n")
    pgw.write_config(pgw_home / "config.json", PAIRED)
    assert pgw.main(["install", "cron", "--apply"]) == 0
    once = table.read_text()
    assert pgw.main(["install", "cron", "--apply"]) == 0
    assert table.read_text() == once
    assert once.startswith("MAILTO=me\n0 3 * * * backup\n") and once.count("@reboot") == 1
    assert pgw.main(["uninstall", "cron"]) == 0
    assert table.read_text() == "MAILTO=me\n0 3 * * * backup\n"
    assert pgw.main(["uninstall", "cron"]) == 0
    assert "nothing to remove" in capsys.readouterr().out


@pytest.mark.parametrize("command", [["install", "cron", "--apply"], ["uninstall", "cron"]])
def test_a_crontab_failing_in_several_lines_is_one_line(capsys, pgw_home, tmp_path, monkeypatch, command):
    fake_crontab(tmp_path, monkeypatch)
    (tmp_path / "tools" / "crontab").write_text(
        "#!/bin/sh\necho 'crontab: your account is not allowed' >&2\necho 'see your administrator' >&2\nexit 1\n"
    )
    pgw.write_config(pgw_home / "config.json", PAIRED)
    assert pgw.main(command) == 1
    assert capsys.readouterr().err == (
        "pgw: `crontab -l` failed: crontab: your account is not allowed see your administrator\n"
    )


def test_install_apply_refuses_a_home_run_would_refuse(capsys, tmp_path, monkeypatch):
    # Installed, the watchdog's `run` was refused every 5 minutes with its
    # output gone to /dev/null, and nothing written into the refused home:
    # no reason anywhere.
    table = fake_crontab(tmp_path, monkeypatch)
    home = tmp_path / "home"
    (home / "ada").mkdir(parents=True)
    pgw.write_json_atomically(home / "config.json", PAIRED)
    home.chmod(0o755)
    monkeypatch.setenv("PGW_HOME", str(home))
    assert pgw.main(["install", "cron", "--apply"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{home} holds more than pgw's files ('ada')" in err, err
    assert not table.exists()


def test_a_block_without_its_end_marker_costs_no_line_of_the_users(capsys, pgw_home, tmp_path, monkeypatch):
    # A hand edit left pgw's begin marker without its end: every line after
    # it was taken for pgw's and deleted, by install and uninstall alike.
    table = fake_crontab(tmp_path, monkeypatch, f"MAILTO=me\n{pgw.CRON_BEGIN}\n0 1 * * * /usr/bin/backup\n")
    pgw.write_config(pgw_home / "config.json", PAIRED)
    assert pgw.main(["install", "cron", "--apply"]) == 0
    installed = table.read_text()
    assert installed.startswith("MAILTO=me\n0 1 * * * /usr/bin/backup\n") and installed.count(pgw.CRON_BEGIN) == 1
    assert pgw.main(["uninstall", "cron"]) == 0
    assert table.read_text() == "MAILTO=me\n0 1 * * * /usr/bin/backup\n"


def test_each_pgw_home_has_a_cron_block_of_its_own(capsys, tmp_path, monkeypatch):
    # Several workers on one host (PGW_HOME, as the README suggests) shared one
    # block: installing the second replaced the first's lines, and
    # uninstalling either removed both.  A block belongs to the home it runs.
    table = fake_crontab(tmp_path, monkeypatch, f"MAILTO=me\n{pgw.CRON_BEGIN}\n@reboot pgw run\n{pgw.CRON_END}\n")
    monkeypatch.setenv("HOME", str(tmp_path))  # the block above runs ~/.pgworker, which has none of its own here
    homes = [tmp_path / "one", tmp_path / "two 100%"]
    for home in homes:
        pgw.write_config(home / "config.json", PAIRED)
        assert pgw.main(["--home", str(home), "install", "cron", "--apply"]) == 0
    both = table.read_text()
    assert both.count(pgw.CRON_BEGIN) == 3 and both.startswith(f"MAILTO=me\n{pgw.CRON_BEGIN}\n@reboot pgw run\n")
    assert pgw.main(["--home", str(homes[0]), "install", "cron", "--apply"]) == 0
    assert table.read_text().count("@reboot") == 3  # once more changes nothing
    assert pgw.main(["--home", str(homes[0]), "uninstall", "cron"]) == 0
    left = table.read_text()
    assert left.count(pgw.CRON_BEGIN) == 2 and f"PGW_HOME='{homes[1]}'".replace("%", "\\%") in left
    assert str(homes[0]) not in left
    assert pgw.main(["--home", str(homes[0]), "uninstall", "cron"]) == 0
    assert "nothing to remove" in capsys.readouterr().out and table.read_text() == left
    assert pgw.main(["--home", str(homes[1]), "uninstall", "cron"]) == 0
    assert table.read_text() == f"MAILTO=me\n{pgw.CRON_BEGIN}\n@reboot pgw run\n{pgw.CRON_END}\n"
    assert pgw.main(["--home", str(tmp_path / ".pgworker"), "uninstall", "cron"]) == 0  # the default home's
    assert table.read_text() == "MAILTO=me\n"


@pytest.mark.parametrize("name", ["plain", "with space", "100%", "it's", "$HOME", "back\\slash", "-dash", "ü"])
def test_a_cron_block_names_the_home_it_runs(name, tmp_path):
    home = tmp_path / name
    launch = pgw.launch_for_this_host(home, {"PGW_HOME": str(home)}, "/usr/bin")
    block = pgw.cron_block(launch).splitlines()
    assert pgw.cron_block_home(block) == str(home)
    assert pgw.cron_block_home([line.replace("PGW_HOME=", "X=") for line in block]) != str(home)


def test_a_crontab_keeps_every_line_of_the_users_byte_for_byte(capsys, pgw_home, tmp_path, monkeypatch):
    # Lines were split as Python splits them, at a form feed, U+2028 or U+0085
    # too, and written back split: "# note\f* * * * * job" became a live job.
    users = "# note\f* * * * * echo formfeed-job\n# old: \u2028*/1 * * * * echo ls-job\n\x85x\r\n0 3 * * * backup\n"
    table = fake_crontab(tmp_path, monkeypatch)
    table.write_bytes(users.encode("utf-8") + b"# \xff not UTF-8\n")
    pgw.write_config(pgw_home / "config.json", PAIRED)
    assert pgw.main(["install", "cron", "--apply"]) == 0
    assert table.read_bytes().startswith(users.encode("utf-8") + b"# \xff not UTF-8\n" + pgw.CRON_BEGIN.encode())
    assert pgw.main(["uninstall", "cron"]) == 0
    assert table.read_bytes() == users.encode("utf-8") + b"# \xff not UTF-8\n"


@pytest.mark.parametrize("character", ["\u2028", "\u2029", "\x85", "\x0c"])
def test_install_refuses_a_home_holding_a_line_separator(capsys, tmp_path, monkeypatch, character):
    table = fake_crontab(tmp_path, monkeypatch, "0 3 * * * backup\n")
    home = tmp_path / f"odd{character}home"
    pgw.write_config(home / "config.json", PAIRED)
    assert pgw.main(["--home", str(home), "install", "cron", "--apply"]) == 1
    assert "holds a control character" in capsys.readouterr().err
    assert table.read_text() == "0 3 * * * backup\n"


def test_install_cron_refuses_a_backslash_before_a_percent_sign(capsys, tmp_path, monkeypatch):
    # cron would end the command at that %: the line is written escaped as \\%,
    # and cron reads the first backslash as escaping the second.
    table = fake_crontab(tmp_path, monkeypatch)
    home = tmp_path / "a\\%b"
    pgw.write_config(home / "config.json", PAIRED)
    assert pgw.main(["--home", str(home), "install", "cron", "--apply"]) == 1
    assert "a backslash before a %" in capsys.readouterr().err and not table.exists()


@pytest.mark.parametrize("job", [
    "@reboot env PGW_HOME={home} /usr/bin/python3 pgw.pyz run",
    "*/5 * * * * PGW_HOME={home} /usr/bin/python3 pgw.pyz run",
    "0 0 * * * SHIV_ROOT=/x env PATH=/bin PGW_HOME={home} pgw run",
])
def test_a_block_of_an_older_or_hand_edited_form_belongs_to_the_home_it_runs(capsys, tmp_path, monkeypatch, job):
    monkeypatch.setenv("HOME", str(tmp_path))
    other = tmp_path / "other"
    block = f"{pgw.CRON_BEGIN}\n{job.format(home=other)}\n{pgw.CRON_END}  \n"  # an end marker an editor left a space on
    table = fake_crontab(tmp_path, monkeypatch, block)
    assert pgw.main(["--home", str(tmp_path / ".pgworker"), "uninstall", "cron"]) == 0
    assert "nothing to remove" in capsys.readouterr().out and table.read_text() == block
    assert pgw.main(["--home", str(other), "uninstall", "cron"]) == 0
    assert table.read_text() == ""


def test_one_home_named_two_ways_is_one_service(capsys, tmp_path, monkeypatch):
    # Through a symlink, or a `..` after one, the same directory got a second
    # crontab block (or unit), and with it a second watchdog.
    table = fake_crontab(tmp_path, monkeypatch)
    real = tmp_path / "deep" / "sub" / "home"
    pgw.write_config(real / "config.json", PAIRED)
    (tmp_path / "link").symlink_to(real)
    (tmp_path / "up").symlink_to(tmp_path / "deep" / "sub")
    for name in (real, tmp_path / "link", tmp_path / "up" / ".." / "sub" / "home"):
        assert pgw.main(["--home", str(name), "install", "cron", "--apply"]) == 0
    assert table.read_text().count("@reboot") == 1 and f"PGW_HOME={real}" in table.read_text()
    assert pgw.systemd_unit_name(tmp_path / "link") == pgw.systemd_unit_name(real)
    assert pgw.main(["--home", str(tmp_path / "link"), "uninstall", "cron"]) == 0
    assert "@reboot" not in table.read_text()


def systemctl_recorder(tmp_path, monkeypatch, fails=""):
    """A systemctl stand-in on PATH that notes each call, failing those whose
    words hold `fails`; the file of its calls."""
    calls = tmp_path / "calls"
    write_stub_cli(tmp_path / "tools", "systemctl", (
        "import sys; words = ' '.join(sys.argv[1:])\n"
        f"open({str(calls)!r}, 'a').write(words + '\\n')\n"
        f"sys.exit(1 if {fails!r} and {fails!r} in words else 0)"
    ))
    monkeypatch.setenv("PATH", f"{tmp_path / 'tools'}:/usr/bin:/bin")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path))
    return calls


def test_each_pgw_home_has_a_systemd_unit_of_its_own(capsys, tmp_path, monkeypatch):
    calls = systemctl_recorder(tmp_path, monkeypatch)
    units = tmp_path / "xdg" / "systemd" / "user"
    default, other = tmp_path / ".pgworker", tmp_path / "other"
    for home in (default, other):
        pgw.write_config(home / "config.json", PAIRED)
    monkeypatch.delenv("PGW_HOME", raising=False)
    assert pgw.main(["install", "systemd", "--apply"]) == 0
    assert pgw.main(["--home", str(other), "install", "systemd", "--apply"]) == 0
    name = pgw.systemd_unit_name(other)
    assert re.fullmatch(r"pgw-[0-9a-f]{12}\.service", name)
    assert sorted(path.name for path in units.iterdir()) == sorted(["pgw.service", name])
    assert pgw.unit_home((units / "pgw.service").read_text()) == str(default)
    assert pgw.unit_home((units / name).read_text()) == str(other)
    assert pgw.main(["--home", str(default), "install", "systemd", "--apply"]) == 0  # named: the same home
    assert sorted(path.name for path in units.iterdir()) == sorted(["pgw.service", name])
    assert pgw.main(["--home", str(other), "uninstall", "systemd"]) == 0
    assert [path.name for path in units.iterdir()] == ["pgw.service"]
    assert calls.read_text().splitlines()[-2:] == [f"--user disable --now {name}", "--user daemon-reload"]


def test_a_unit_an_older_pgw_installed_for_another_home_moves_to_a_name_of_its_own(capsys, tmp_path, monkeypatch):
    # Before each home had a unit of its own, every home's was pgw.service.
    calls = systemctl_recorder(tmp_path, monkeypatch)
    units = tmp_path / "xdg" / "systemd" / "user"
    other = tmp_path / "other"
    pgw.write_config(other / "config.json", PAIRED)
    pgw.write_config(tmp_path / ".pgworker" / "config.json", PAIRED)
    units.mkdir(parents=True)
    (units / "pgw.service").write_text(f'[Service]\nExecStart=/usr/bin/python3 pgw.pyz run\nEnvironment="PGW_HOME={other}"\n')
    monkeypatch.delenv("PGW_HOME", raising=False)
    assert pgw.main(["install", "systemd", "--apply"]) == 1  # the default home's name, taken by the other home
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"runs another pgw home, {other}" in err and f"PGW_HOME={other} pgw install systemd" in err
    assert pgw.main(["uninstall", "systemd"]) == 0
    assert f"runs another pgw home, {other}" in capsys.readouterr().out and (units / "pgw.service").exists()
    assert not calls.exists()
    assert pgw.main(["--home", str(other), "install", "systemd", "--apply"]) == 0
    assert "--user disable --now pgw.service" in calls.read_text().splitlines()
    assert [path.name for path in units.iterdir()] == [pgw.systemd_unit_name(other)]
    assert pgw.main(["--home", str(tmp_path / ".pgworker"), "install", "systemd", "--apply"]) == 0
    assert sorted(path.name for path in units.iterdir()) == sorted(["pgw.service", pgw.systemd_unit_name(other)])


@pytest.mark.parametrize("kind", ["systemd", "launchd"])
def test_a_service_names_the_home_it_runs(kind, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    other = tmp_path / 'a "quoted" 100% \\ home'
    launch = pgw.launch_for_this_host(other, {"PGW_HOME": str(other)}, "/usr/bin")
    older = pgw.install_target(kind, tmp_path / ".pgworker")
    older.parent.mkdir(parents=True)
    older.write_text(pgw.systemd_unit(launch) if kind == "systemd" else pgw.launchd_plist(launch, other))
    assert pgw.service_home(kind, older) == str(other)
    assert pgw.older_service_of_this_home(kind, other) == older
    assert pgw.older_service_of_this_home(kind, tmp_path / "third") is None
    assert pgw.install_target(kind, other) != older


def test_a_failed_install_keeps_the_unit_an_older_pgw_installed(capsys, tmp_path, monkeypatch):
    # The older unit was stopped and removed first; the new one then failed to
    # be written, and the home was left with no service at all.
    calls = systemctl_recorder(tmp_path, monkeypatch)
    units = tmp_path / "xdg" / "systemd" / "user"
    other = tmp_path / "other"
    pgw.write_config(other / "config.json", PAIRED)
    units.mkdir(parents=True)
    (units / "pgw.service").write_text(f'[Service]\nEnvironment="PGW_HOME={other}"\n')
    (units / pgw.systemd_unit_name(other)).mkdir()  # what cannot be written
    assert pgw.main(["--home", str(other), "install", "systemd", "--apply"]) == 1
    assert "cannot write" in capsys.readouterr().err
    assert (units / "pgw.service").exists() and not calls.exists()


@pytest.mark.parametrize("line", [
    "Environment=PGW_HOME={home}",
    'Environment="PGW_HOME={home}" "SHIV_ROOT={home}/shiv"',
    "Environment=SHIV_ROOT=/x PGW_HOME={home}",
    "Environment='PGW_HOME={home}'",
])
def test_a_unit_names_its_home_however_its_environment_is_written(line, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    home = tmp_path / "w9"
    assert pgw.unit_home(f"[Service]\nExecStart=/usr/bin/pgw run\n{line.format(home=home)}\n") == str(home)


def test_a_relative_xdg_config_home_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", "relcfg")  # invalid, says the XDG spec
    assert pgw.install_target("systemd", tmp_path / ".pgworker") == tmp_path / ".config" / "systemd" / "user" / "pgw.service"


def test_uninstall_of_a_unit_that_is_a_directory_says_so_before_touching_systemd(capsys, pgw_home, tmp_path, monkeypatch):
    calls = systemctl_recorder(tmp_path, monkeypatch)
    pgw.install_target("systemd", pgw_home).mkdir(parents=True)
    assert pgw.main(["uninstall", "systemd"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "it is a directory" in err and str(pgw.install_target("systemd", pgw_home)) in err
    assert not calls.exists()


def test_uninstall_systemd_says_when_the_service_may_still_run(capsys, pgw_home, tmp_path, monkeypatch):
    systemctl_recorder(tmp_path, monkeypatch, fails="disable")
    pgw.write_config(pgw_home / "config.json", PAIRED)
    assert pgw.main(["install", "systemd", "--apply"]) == 0
    capsys.readouterr()
    assert pgw.main(["uninstall", "systemd"]) == 1
    out, err = capsys.readouterr()
    assert "may still run" in err and "is kept, for `pgw uninstall systemd` to try again" in err and err.count("\n") == 1
    assert "removed" not in out and pgw.install_target("systemd", pgw_home).exists()  # for the next try


@pytest.mark.parametrize("failing", ["daemon-reload", "enable"])
def test_an_install_the_service_manager_refuses_leaves_no_unit_behind(capsys, pgw_home, tmp_path, monkeypatch, failing):
    # With no user bus (root over ssh, say) the unit stayed, enabled nowhere,
    # and `uninstall` then failed on it too.
    systemctl_recorder(tmp_path, monkeypatch, fails=failing)
    pgw.write_config(pgw_home / "config.json", PAIRED)
    assert pgw.main(["install", "systemd", "--apply"]) == 1
    out, err = capsys.readouterr()
    target = pgw.install_target("systemd", pgw_home)
    assert err.count("\n") == 1 and err.endswith(f"; {target} is removed again\n") and not target.exists()
    # One that was there before (installed and enabled earlier) stays.
    systemctl_recorder(tmp_path, monkeypatch)
    assert pgw.main(["install", "systemd", "--apply"]) == 0
    systemctl_recorder(tmp_path, monkeypatch, fails=failing)
    assert pgw.main(["install", "systemd", "--apply"]) == 1
    assert target.exists()


def test_install_systemd_writes_a_restarting_unit(capsys, pgw_home, tmp_path, monkeypatch):
    tools = tmp_path / "tools"
    write_stub_cli(tools, "systemctl", f"import sys; open({str(tmp_path / 'calls')!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')")
    monkeypatch.setenv("PATH", f"{tools}:/usr/bin:/bin")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    pgw.write_config(pgw_home / "config.json", PAIRED)
    assert pgw.main(["install", "systemd", "--apply"]) == 0
    name = pgw.systemd_unit_name(pgw_home)
    unit = (tmp_path / "xdg" / "systemd" / "user" / name).read_text()
    assert "Restart=always" in unit and f"ExecStart={sys.executable} {ROOT / 'pgw.py'} run" in unit
    assert f'Environment="SHIV_ROOT={pgw_home / "shiv"}"' in unit
    assert (tmp_path / "calls").read_text() == f"--user daemon-reload\n--user enable --now {name}\n"
    assert pgw.main(["uninstall", "systemd"]) == 0
    assert not (tmp_path / "xdg" / "systemd" / "user" / name).exists()


def test_install_systemd_writes_private_files_whatever_the_umask_or_says_why_it_cannot(capsys, pgw_home, tmp_path, monkeypatch):
    # Under umask 000 the unit and the directories made for it were writable
    # by every local user, who could then change what runs at each boot.
    tools = tmp_path / "tools"
    write_stub_cli(tools, "systemctl", "pass")
    monkeypatch.setenv("PATH", f"{tools}:/usr/bin:/bin")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    pgw.write_config(pgw_home / "config.json", PAIRED)
    unit = tmp_path / "xdg" / "systemd" / "user" / pgw.systemd_unit_name(pgw_home)
    old_umask = os.umask(0)
    try:
        assert pgw.main(["install", "systemd", "--apply"]) == 0
        unit.chmod(0o666)  # a unit from before: rewritten private
        assert pgw.main(["install", "systemd", "--apply"]) == 0
    finally:
        os.umask(old_umask)
    modes = {path: stat.S_IMODE(path.stat().st_mode) for path in (unit, unit.parent, unit.parent.parent)}
    assert modes == {unit: 0o600, unit.parent: 0o700, unit.parent.parent: 0o700}, modes
    capsys.readouterr()
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "file"))  # a home without a usable ~/.config
    assert pgw.main(["install", "systemd", "--apply"]) == 1
    assert capsys.readouterr().err == f"pgw: cannot write {tmp_path / 'file' / 'systemd' / 'user' / unit.name}: Not a directory\n"


def test_install_launchd_prints_a_keepalive_agent(capsys, pgw_home):
    import plistlib

    assert pgw.main(["install", "launchd"]) == 0
    out = capsys.readouterr().out
    agent = plistlib.loads(out.split("\n", 1)[1].encode())
    assert agent["KeepAlive"] is True and agent["RunAtLoad"] is True
    assert agent["ProgramArguments"] == [sys.executable, str(ROOT / "pgw.py"), "run"]


def test_install_without_the_tool_is_one_line_error(capsys, pgw_home, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    pgw.write_config(pgw_home / "config.json", PAIRED)
    assert pgw.main(["install", "cron", "--apply"]) == 1
    err = capsys.readouterr().err
    assert err == "pgw: `crontab` is not installed on this host\n"


@pytest.mark.parametrize("pyz_name", ["pgw.pyz", "pgw"])
def test_prune_removes_older_extractions_of_pgw_and_nothing_else(tmp_path, pyz_name):
    # The shiv root is every shiv app's: installed as `pgw`, pgw removed
    # `pgw_tools.pyz_<id>`, another app's, and unlinked links named `pgw_*`.
    root = tmp_path / "shiv"
    build = {name: name * 64 for name in "abcdef"}
    current = root / f"{pyz_name}_{build['a']}"
    ours = [f"{pyz_name}_{build[name]}" for name in "abc"]
    for name in ours:
        (root / name / "site-packages").mkdir(parents=True)
        (root / name / "site-packages" / "pgw.py").write_text("")
    others = [f"{pyz_name}_tools.pyz_{build['d']}", f"{pyz_name}_{build['e']}x", "other.pyz_" + build["f"],
              f"{pyz_name}_{'0ld1' * 16}"]  # the last: pgw's name, but not an extraction of pgw
    for name in others:
        (root / name / "site-packages").mkdir(parents=True)
    (root / f"{pyz_name}_{build['f']}").symlink_to(root / ours[1])
    (root / f".{ours[1]}_lock").write_text("")
    removed = pgw.prune_old_extractions(root, current)
    assert sorted(path.name for path in removed) == sorted(ours[1:])
    assert sorted(path.name for path in root.iterdir()) == sorted([ours[0], *others, f"{pyz_name}_{build['f']}"])


def test_install_writes_a_relative_pgw_home_as_an_absolute_one(capsys, pgw_home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PGW_HOME", "rel-home")
    assert pgw.main(["install", "cron"]) == 0
    cron = capsys.readouterr().out
    assert f"PGW_HOME={tmp_path / 'rel-home'} " in cron and f"SHIV_ROOT={tmp_path / 'rel-home' / 'shiv'} " in cron
    assert pgw.main(["install", "systemd"]) == 0
    assert f'Environment="PGW_HOME={tmp_path / "rel-home"}"' in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["cron", "systemd"])
@pytest.mark.parametrize("where", ["env.PATH", "PGW_HOME"])
def test_install_refuses_a_newline_that_would_start_a_line_of_its_own(capsys, pgw_home, tmp_path, monkeypatch, kind, where):
    # `config set env.PATH $'/usr/bin\n* * * * * id > /tmp/x #'` made `install
    # cron` print a working second cron job, and broke the unit's Environment=.
    planted = "/usr/bin:/bin\n* * * * * touch /tmp/planted #"
    if where == "PGW_HOME":
        monkeypatch.setenv("PGW_HOME", str(tmp_path / "home\n* * * * * touch planted #"))
    else:
        assert pgw.main(["config", "set", "env.PATH", planted]) == 0
    capsys.readouterr()
    assert pgw.main(["install", kind]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("pgw: cannot install: ") and "control character" in err


def test_systemd_unit_escapes_quotes_and_backslashes_in_its_environment(capsys, tmp_path, monkeypatch):
    home = tmp_path / 'a "quoted" \\ home'
    monkeypatch.setenv("PGW_HOME", str(home))
    assert pgw.main(["install", "systemd"]) == 0
    unit = capsys.readouterr().out.split("\n", 1)[1]
    line = [line for line in unit.splitlines() if line.startswith('Environment="PGW_HOME=')][0]
    value = line[len('Environment="PGW_HOME='):-1]
    unescaped = re.sub(r"\\(.)", r"\1", value)  # systemd's C escapes, as far as these two go
    assert line.endswith('"') and unescaped == str(home)


def test_systemd_unit_doubles_percent_signs(capsys, tmp_path, monkeypatch):
    home = tmp_path / "100%home"
    monkeypatch.setenv("PGW_HOME", str(home))
    assert pgw.main(["install", "systemd"]) == 0
    unit = capsys.readouterr().out.split("\n", 1)[1]
    assert f'Environment="PGW_HOME={tmp_path}/100%%home"' in unit
    assert f'Environment="SHIV_ROOT={tmp_path}/100%%home/shiv"' in unit
    assert re.search(r"(?<!%)%(?!%)", unit.replace("%%", "")) is None, "a lone % is a systemd specifier"


@pytest.mark.parametrize("kind, host", [("launchd", "linux"), ("systemd", "darwin")])
def test_install_on_the_wrong_os_refuses_before_writing(capsys, pgw_home, tmp_path, monkeypatch, kind, host):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(sys, "platform", host)
    pgw.write_config(pgw_home / "config.json", PAIRED)
    assert pgw.main(["install", kind, "--apply"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{kind} exists only on" in err and "`pgw install cron --apply`" in err
    assert not pgw.install_target(kind, pgw_home).exists()
    assert not pgw.install_target(kind, pgw_home).parent.exists()


def test_uninstall_on_the_wrong_os_removes_the_file_left_behind(capsys, pgw_home, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(sys, "platform", "linux")
    plist = pgw.install_target("launchd", pgw_home)
    plist.parent.mkdir(parents=True)
    plist.write_text("<plist/>")
    assert pgw.main(["uninstall", "launchd"]) == 0
    assert not plist.exists()
    assert "nothing to stop" in capsys.readouterr().out


def test_systemctl_without_a_user_bus_says_how_to_get_one(capsys, pgw_home, tmp_path, monkeypatch):
    tools = tmp_path / "tools"
    write_stub_cli(tools, "systemctl", "import sys; sys.stderr.write('Failed to connect to bus: No medium found\\n'); sys.exit(1)")
    monkeypatch.setenv("PATH", f"{tools}:/usr/bin:/bin")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("USER", "alice")
    monkeypatch.setenv("LOGNAME", "alice")
    pgw.write_config(pgw_home / "config.json", PAIRED)
    assert pgw.main(["install", "systemd", "--apply"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "Failed to connect to bus" in err and "log in as alice directly" in err and "not `su`" in err
    assert "`loginctl enable-linger alice`" in err


def test_install_apply_on_an_unpaired_host_refuses_unless_forced(capsys, pgw_home, tmp_path, monkeypatch):
    table = fake_crontab(tmp_path, monkeypatch, "0 3 * * * backup\n")
    assert pgw.main(["install", "cron", "--apply"]) == 1
    assert capsys.readouterr().err == (
        "pgw: not paired yet: run `pgw pair CODE --server URL` first (or pass --force to install anyway)\n"
    )
    assert table.read_text() == "0 3 * * * backup\n"
    assert pgw.main(["install", "cron", "--apply", "--force"]) == 0
    assert "@reboot" in table.read_text()
    pgw.main(["uninstall", "cron"])
    monkeypatch.setenv("PGW_TOKEN", "tok-env")
    assert pgw.main(["install", "cron", "--apply"]) == 0
    assert "@reboot" in table.read_text()
    # Which the lines do not carry: the service's pgw has it only from its own environment.
    assert "tok-env" not in table.read_text()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pgw: warning: this home is not paired, and the token in PGW_TOKEN" in err


async def test_uninstall_cron_stops_the_running_daemon_too(tmp_path, stub_bin, monkeypatch):
    # It removed the lines and left the daemon running, where the README says
    # uninstall stops it for good (systemd's `disable --now` does).
    home = tmp_path / "home"
    table = fake_crontab(tmp_path, monkeypatch, f"MAILTO=me\n{pgw.CRON_BEGIN}\n@reboot PGW_HOME={home} pgw run\n{pgw.CRON_END}\n")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PGW_HOME": str(home),
           "PYTHONPATH": os.pathsep.join(sys.path), "CRONTAB_FILE": str(table)}
    with trio.fail_after(30):
        async with open_backend() as backend:
            async with daemon_process(PGW, backend, home, stub_bin) as daemon:
                await backend.next_connection()
                done = await trio.to_thread.run_sync(functools.partial(
                    subprocess.run, [*PGW, "uninstall", "cron"], env=env, capture_output=True, text=True, timeout=30
                ))
                assert (done.returncode, done.stderr) == (0, "")
                assert done.stdout == f"removed pgw's lines for the home {home} from your crontab\nstopped pgw (pid {daemon.pid})\n"
                assert daemon.returncode == 0 or await daemon.wait() == 0
    assert table.read_text() == "MAILTO=me\n"


@pytest.mark.parametrize("paused", [False, True])
async def test_stop_ends_a_real_daemon_cleanly(tmp_path, stub_bin, paused):
    # A daemon stopped by Ctrl-Z or SIGSTOP took its SIGTERM only once it went
    # on: `stop` waited 15 s, then advised SIGKILL.
    home = tmp_path / "home"
    with trio.fail_after(30):
        async with open_backend() as backend:
            async with daemon_process(PGW, backend, home, stub_bin) as daemon:
                await backend.next_connection()
                if paused:
                    daemon.send_signal(signal.SIGSTOP)
                stopped = await trio.to_thread.run_sync(pgw_command, home, "stop")
                assert (stopped.returncode, stopped.stdout, stopped.stderr) == (0, f"stopped pgw (pid {daemon.pid})\n", "")
                assert daemon.returncode == 0 or await daemon.wait() == 0
                assert "received SIGTERM" in (home / "run.log").read_text()
    again = pgw_command(home, "stop")
    assert (again.returncode, again.stdout) == (0, f"pgw is not running (home {home})\n")
