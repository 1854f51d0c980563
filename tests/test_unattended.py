"""Unattended operation: one daemon per home, `pgw status`, leftovers of a killed daemon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import trio

import pgw
from backend import open_backend
from conftest import ROOT, write_stub_cli
from test_run import SLEEPER, assert_group_gone, daemon_process, live_group_members, request, wait_ready

PGW = [sys.executable, str(ROOT / "pgw.py")]


def pgw_command(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home.parent), "PGW_HOME": str(home), "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([*PGW, *args], env=env, capture_output=True, text=True, timeout=30, check=False)


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


async def test_restart_after_sigkill_kills_what_the_dead_daemon_left(tmp_path, stub_bin):
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
            assert live_group_members(pgid), "the stage outlived its SIGKILLed daemon"
            assert (home / "scratch" / "orphan").exists()
            async with daemon_process(PGW, backend, home, stub_bin):
                await backend.next_connection()
                await assert_group_gone(pgid)
                assert list((home / "scratch").iterdir()) == []
                assert "killed 1 process(es) left running by a pgw that died" in (home / "run.log").read_text()


def test_selftest_fails_a_step_that_does_not_hold(capsys, monkeypatch):
    monkeypatch.setattr(pgw, "check_file_path", lambda name: tuple(name.split("/")))  # lets `..` through
    assert pgw.main(["selftest"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  bad request" in out and "PASS  echo" in out
    assert "selftest: 1 step(s) failed" in out
