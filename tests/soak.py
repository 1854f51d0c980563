"""Soak pgw: many stages over one daemon with random cancels, timeouts and forced disconnects.

    .venv/bin/python tests/soak.py --stages 1000          # the full soak
    .venv/bin/python tests/soak.py --seconds 100          # the CI version (tests/test_soak.py)

One `pgw run` process (the built pgw.pyz with --pyz, else `python pgw.py`)
serves an in-process backend through a proxy. Stages are sent CONCURRENCY at
a time; each is one of the kinds below (a quick exit, output, a failure, a
sleep cut short by a SIGTERM or SIGKILL cancel or by its timeout, a child that
ignores SIGTERM, a tree with a setsid escapee, a bad request). Every
DISCONNECT_EVERY seconds on average after pgw connects, the connection is broken
while stages run:
closed (1000 or 1011), reset by the backend or by the proxy, or black-holed
(the proxy stops forwarding without closing; pgw must notice by itself).

What it checks and prints, exiting 1 if any check fails:

- requests sent == exits received + lost with the connection, each exit
  exactly once; a stage counts as lost only when the connection it was sent
  on closed before its exit arrived (PROTOCOL.md: exits go over the
  connection, so stages running at a disconnect are killed and never answered);
  no stage is left waiting on an open connection;
- every exit says what its stage's kind allows (returncode, error);
- no process carrying one of the soak's PGW_STAGE_ID values is left;
- pgw's open file descriptors are the same after the soak as after the warm-up;
- pgw's RSS at the end is within 10 MB of the RSS after the warm-up.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import uuid
import zipfile
from pathlib import Path
from typing import Callable, Optional

import attrs
import trio
import trio_websocket

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path[:0] = [str(ROOT), str(TESTS)]

from backend import Backend, BackendConnection, ConnectionGone, Proxy, open_backend, open_proxy  # noqa: E402

RSS_DRIFT_LIMIT_BYTES = 10_000_000  # RSS stays flat: within 10 MB over the soak
WARM_UP_STAGES = 20
# No stage may wait this long for its exit on a connection that is up: the
# longest (a silent path: 30 s to notice while stages run, 10 s grace, a retry) takes ~45 s.
STAGE_LIMIT_S = 90.0
SETTLE_S = 15.0  # after the last exit: time for the last kills to land (grace 10 s + SIGKILL)
# A close (1000, 1011), a TCP reset from either side, a black-holed path.
DISCONNECTS = ["close-1000", "close-1011", "backend-reset", "proxy-reset", "silent"]

STUB = """#!{python}
import os, signal, subprocess, sys, time
mode, arg = sys.argv[1], float(sys.argv[2])
if mode == "quick":
    print("ok")
elif mode == "output":
    chunk = ("o" * 1023 + "\\n") * 64
    for _ in range(int(arg)):
        sys.stdout.write(chunk)
        sys.stderr.write(chunk)
elif mode == "fail":
    print("failing", file=sys.stderr)
    sys.exit(3)
elif mode == "stdin":
    print(len(sys.stdin.read()))
else:
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if mode == "tree":
        sleeper = [sys.executable, "-c", f"import time; time.sleep({{arg}})"]
        subprocess.Popen(sleeper)
        subprocess.Popen(sleeper, start_new_session=True, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print("ready", flush=True)
    time.sleep(arg)
"""


##############################################################################
# Stage kinds: what is sent, and which exits are right for it
##############################################################################


@attrs.frozen
class Kind:
    name: str
    weight: int
    args: Callable[[random.Random], list[str]]
    fields: Callable[[random.Random], dict] = lambda rng: {}
    cancel: Optional[str] = None  # "SIGTERM" / "SIGKILL" after a random delay
    # (returncode, error) pairs this kind may end with; a cancel or a timeout
    # that comes after the child's own end leaves the natural outcome, and a
    # cancel that comes before the CLI started ends it unstarted (-1).
    allowed: Callable[[int, Optional[str]], bool] = lambda rc, error: (rc, error) == (0, None)


def _finished_or(rc: int, error: Optional[str], *stopped: tuple[int, str]) -> bool:
    return (rc, error) == (0, None) or any(rc == code and error is not None and error.startswith(text) for code, text in stopped)


KINDS = [
    Kind("quick", 20, lambda rng: ["quick", "0"]),
    Kind("output", 10, lambda rng: ["output", str(rng.randint(1, 32))]),  # 64 KiB-2 MiB each way
    Kind("prompt", 5, lambda rng: ["stdin", "0"], lambda rng: {"stdin": "p" * rng.randint(0, 300_000)}),
    Kind("files", 5, lambda rng: ["quick", "0"],
         lambda rng: {"files": {f"d/{n}.txt": "aGVsbG8=" for n in range(rng.randint(1, 50))}}),
    Kind("fail", 5, lambda rng: ["fail", "0"], allowed=lambda rc, error: (rc, error) == (3, None)),
    Kind("sleep", 15, lambda rng: ["sleep", f"{rng.uniform(0.05, 1.5):.2f}"]),
    Kind("cancel-term", 10, lambda rng: ["sleep", "30"], cancel="SIGTERM",
         allowed=lambda rc, error: _finished_or(rc, error, (-15, "cancelled by the server (SIGTERM)"), (-1, "cancelled by the server (SIGTERM), before it started"))),
    Kind("cancel-kill", 6, lambda rng: ["stubborn", "30"], cancel="SIGKILL",
         allowed=lambda rc, error: _finished_or(rc, error, (-9, "cancelled by the server (SIGKILL)"), (-1, "cancelled by the server (SIGKILL), before it started"))),
    Kind("tree-cancelled", 6, lambda rng: ["tree", "30"], cancel="SIGTERM",
         allowed=lambda rc, error: _finished_or(rc, error, (-15, "cancelled by the server (SIGTERM)"), (-1, "cancelled by the server (SIGTERM), before it started"))),
    Kind("tree", 4, lambda rng: ["tree", f"{rng.uniform(0.1, 1.0):.2f}"]),
    Kind("timeout", 8, lambda rng: ["sleep", "30"], lambda rng: {"timeout_s": 1},
         allowed=lambda rc, error: (rc, error) == (-15, "timed out after 1 s")),
    Kind("timeout-stubborn", 1, lambda rng: ["stubborn", "30"], lambda rng: {"timeout_s": 1},
         allowed=lambda rc, error: (rc, error) == (-9, "timed out after 1 s")),
    Kind("bad-request", 5, lambda rng: ["quick", "0"], lambda rng: {"files": {"../escape": "aGk="}},
         allowed=lambda rc, error: rc == -1 and error is not None and error.startswith("unsafe file path")),
]


##############################################################################
# The soak
##############################################################################


@attrs.define
class Soak:
    args: argparse.Namespace
    rng: random.Random
    run_id: str
    backend: Backend
    proxy: Proxy
    pid: int
    connection: Optional[BackendConnection] = None
    change: trio.Event = attrs.field(factory=trio.Event)
    sent: dict[str, tuple[Kind, BackendConnection]] = attrs.field(factory=dict)
    exits: dict[str, dict] = attrs.field(factory=dict)
    lost: set[str] = attrs.field(factory=set)
    hung: set[str] = attrs.field(factory=set)
    wrong: list[str] = attrs.field(factory=list)
    not_sent: int = 0
    disconnects: collections.Counter = attrs.field(factory=collections.Counter)
    offline_s: float = 0.0
    broken_at: Optional[float] = None
    silenced: list = attrs.field(factory=list)

    def _changed(self) -> None:
        """Wake every waiter of current_connection(): the connection state changed."""
        self.change.set()
        self.change = trio.Event()

    async def track_connections(self, nursery: trio.Nursery) -> None:
        """Keep `connection` on pgw's newest connection."""
        while True:
            connection = await self.backend.next_connection()
            try:
                await connection.receive("hello")
            except ConnectionGone:
                continue
            if self.broken_at is not None:
                self.offline_s += trio.current_time() - self.broken_at
                self.broken_at = None
            for silent in self.silenced:  # pgw gave up on it: let its waiters see the loss
                silent.reset()
            self.silenced.clear()
            self.connection = connection
            self._changed()
            nursery.start_soon(self._watch, connection)

    async def _watch(self, connection: BackendConnection) -> None:
        await connection.closed.wait()
        self._changed()

    async def current_connection(self) -> BackendConnection:
        """The connection to send on: open, with no break of ours in progress."""
        while self.connection is None or self.connection.closed.is_set() or self.broken_at is not None:
            await self.change.wait()
        return self.connection

    async def break_connections(self, stop: trio.Event) -> None:
        while not stop.is_set():
            connection = await self.current_connection()  # counted from pgw's reconnect
            with trio.move_on_after(self.rng.uniform(0.5, 1.5) * self.args.disconnect_every):
                await stop.wait()
            if stop.is_set():
                return
            if connection is not self.connection or connection.closed.is_set():
                continue
            how = self.rng.choice(self.args.disconnects)
            self.disconnects[how] += 1
            self.broken_at = trio.current_time()  # no new requests until pgw is back
            if how == "close-1000":
                await connection.close(1000)
            elif how == "close-1011":
                await connection.close(1011, "internal error")
            elif how == "backend-reset":
                await connection.abort()
            elif how == "proxy-reset":
                self.proxy.reset_all()
            else:  # silent: pgw must notice (30 s), kill its stages and come back by itself
                self.silenced = [c for c in self.proxy.connections if not c.closed.is_set()]
                self.proxy.go_silent(new_connections=False)

    async def run_stage(self, number: int, kind: Kind, slots: trio.Semaphore) -> None:
        try:
            stage_run_id = f"soak-{self.run_id}-{number:05d}-{kind.name}"
            message = {
                "type": "stage.request", "stage_run_id": stage_run_id, "job_id": f"job-{number}",
                "cli": self.rng.choice(["claude", "codex"]), "cli_args": kind.args(self.rng), "stdin": "",
                **kind.fields(self.rng),
            }
            cancel_after = self.rng.uniform(0.1, 1.5) if kind.cancel else None
            while True:
                connection = await self.current_connection()
                try:
                    await connection.send(message)
                    break
                except (trio_websocket.ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
                    self.not_sent += 1  # closed under us: send it again on the next connection
            self.sent[stage_run_id] = (kind, connection)
            with trio.move_on_after(STAGE_LIMIT_S) as limit:
                try:
                    if cancel_after is not None:
                        with trio.move_on_after(cancel_after):
                            await connection.stage_result(stage_run_id)
                        if not connection.closed.is_set() and stage_run_id not in _exited(connection):
                            try:
                                await connection.send({"type": "stage.cancel", "stage_run_id": stage_run_id, "signal": kind.cancel})
                            except (trio_websocket.ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
                                pass
                    result = await connection.stage_result(stage_run_id)
                except ConnectionGone:
                    self.lost.add(stage_run_id)
                    return
            if limit.cancelled_caught:
                self.hung.add(stage_run_id)
                return
            self.exits[stage_run_id] = result.exit
            if not kind.allowed(result.returncode, result.error):
                self.wrong.append(f"{stage_run_id}: returncode {result.returncode}, error {result.error!r}")
        finally:
            slots.release()


def _exited(connection: BackendConnection) -> set[str]:
    return {m.get("stage_run_id") for m in connection.received if m.get("type") == "stage.exit"}


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def processes_left(run_id: str) -> list[int]:
    """Live processes carrying PGW_STAGE_ID=soak-<run_id>-... (Linux /proc)."""
    needle = f"PGW_STAGE_ID=soak-{run_id}-".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if (environ.startswith(needle) or b"\0" + needle in environ) and stat[stat.rindex(")") + 2] != "Z":
            found.append(int(entry.name))
    return found


def pgw_command(use_pyz: bool, scratch: Path) -> tuple[list[str], dict[str, str]]:
    if not use_pyz:
        return [sys.executable, str(ROOT / "pgw.py")], {"PYTHONPATH": str(ROOT)}
    pyz = ROOT / "pgw.pyz"
    with zipfile.ZipFile(pyz) as archive:
        if archive.read("site-packages/pgw.py") != (ROOT / "pgw.py").read_bytes():
            raise SystemExit(f"{pyz} holds an older pgw.py: run ./build.sh first")
    python = getattr(sys, "_base_executable", sys.executable)
    return [python, str(pyz)], {"SHIV_ROOT": str(scratch / "shiv")}


async def soak(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    run_id = uuid.uuid4().hex[:8]
    print(f"soak: seed {args.seed}, run {run_id}, up to {args.stages} stages"
          + (f" or {args.seconds:g} s" if args.seconds else "")
          + f", {args.concurrency} at a time, a disconnect every ~{args.disconnect_every:g} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="pgw-soak-") as temp:
        scratch = Path(temp)
        bin_dir, home = scratch / "bin", scratch / "home"
        bin_dir.mkdir()
        home.mkdir(mode=0o700)
        for cli in ("claude", "codex"):
            (bin_dir / cli).write_text(STUB.format(python=sys.executable))
            (bin_dir / cli).chmod(0o755)
        argv, extra_env = pgw_command(args.pyz, scratch)
        stderr_path = scratch / "pgw.stderr"
        async with open_backend() as backend, open_proxy(backend.port) as proxy:
            (home / "config.json").write_text(json.dumps({"server": proxy.url, "worker_id": "w-soak", "token": backend.token}))
            (home / "config.json").chmod(0o600)
            env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(scratch), "PGW_HOME": str(home), **extra_env}
            with stderr_path.open("wb") as stderr:
                daemon = await trio.lowlevel.open_process(
                    [*argv, "run"], env=env, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr
                )
            state = Soak(args, rng, run_id, backend, proxy, daemon.pid)
            overall_s = args.give_up_after
            try:
                status = 1
                with trio.move_on_after(overall_s):
                    status = await drive(args, state, daemon)
                    overall_s = 0
                if overall_s:
                    waiting = sorted(set(state.sent) - set(state.exits) - state.lost - state.hung)
                    print(f"soak: FAIL: not done within {overall_s:g} s; {len(waiting)} stages still waiting,"
                          f" e.g. {waiting[:5]}; connection {state.connection!r}, broken_at {state.broken_at},"
                          f" {len(backend.connections)} connections, disconnects {dict(state.disconnects)}")
                    for stage_run_id in waiting[:5]:
                        connection = state.sent[stage_run_id][1]
                        seen = [m.get("type") for m in connection.received if m.get("stage_run_id") == stage_run_id]
                        print(f"  {stage_run_id}: on connection {backend.connections.index(connection)}"
                              f" (closed: {connection.closed.is_set()}), seen {seen}")
            finally:
                if daemon.returncode is None:
                    daemon.kill()
                    await daemon.wait()
        if status != 0:
            tail = stderr_path.read_text(errors="replace")[-2000:] + (home / "run.log").read_text(errors="replace")[-4000:]
            print(f"--- pgw's stderr and run.log, last lines ---\n{tail}")
    return status


async def drive(args: argparse.Namespace, state: Soak, daemon: trio.Process) -> int:
    started = trio.current_time()
    kinds, weights = KINDS, [kind.weight for kind in KINDS]
    async with trio.open_nursery() as background:
        background.start_soon(state.track_connections, background)
        with trio.fail_after(30):
            await state.current_connection()
            warm_up = trio.Semaphore(args.concurrency)
            async with trio.open_nursery() as stages:
                for number in range(WARM_UP_STAGES):
                    await warm_up.acquire()
                    stages.start_soon(state.run_stage, number, KINDS[0], warm_up)
            await trio.sleep(1.0)
        fds_before, rss_before = open_fds(state.pid), rss_bytes(state.pid)
        soak_started = trio.current_time()
        deadline = soak_started + args.seconds if args.seconds else float("inf")
        stop_breaking = trio.Event()
        background.start_soon(state.break_connections, stop_breaking)
        slots = trio.Semaphore(args.concurrency)
        async with trio.open_nursery() as stages:
            number = WARM_UP_STAGES
            while number < WARM_UP_STAGES + args.stages and trio.current_time() < deadline:
                await slots.acquire()
                kind = state.rng.choices(kinds, weights)[0]
                stages.start_soon(state.run_stage, number, kind, slots)
                number += 1
                if number % 100 == 0:
                    print(f"  {number - WARM_UP_STAGES} stages sent, {trio.current_time() - soak_started:.0f} s,"
                          f" pgw RSS {rss_bytes(state.pid) / 1e6:.1f} MB, {open_fds(state.pid)} fds", flush=True)
            stop_breaking.set()
        soak_s = trio.current_time() - soak_started
        with trio.fail_after(90):
            await state.current_connection()
            with trio.move_on_after(SETTLE_S):
                while processes_left(state.run_id):
                    await trio.sleep(0.2)
            await trio.sleep(1.0)  # pgw's own bookkeeping after the last exit
        left = processes_left(state.run_id)
        fds_after, rss_after = open_fds(state.pid), rss_bytes(state.pid)
        connections = len(state.backend.connections)
        background.cancel_scope.cancel()
    daemon.send_signal(signal.SIGTERM)
    with trio.move_on_after(15):
        await daemon.wait()
    for pid in left:  # the report says so; the machine need not keep them
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return report(state, soak_s, trio.current_time() - started, connections, left, fds_before, fds_after,
                  rss_before, rss_after, daemon.returncode)


def report(state: Soak, soak_s: float, total_s: float, connections: int, left: list[int], fds_before: int,
           fds_after: int, rss_before: int, rss_after: int, pgw_status: Optional[int]) -> int:
    every_exit = collections.Counter()
    for connection in state.backend.connections:
        for message in connection.received:
            if message.get("type") == "stage.exit" and str(message.get("stage_run_id", "")).startswith("soak-"):
                every_exit[message["stage_run_id"]] += 1
    counted = {stage_run_id: kind for stage_run_id, (kind, _) in state.sent.items()}
    warm_up = {i for i in counted if counted[i].name == "quick" and int(i.split("-")[2]) < WARM_UP_STAGES}
    sent = len(counted) - len(warm_up)
    exits = sum(1 for i in counted if i not in warm_up and every_exit[i] >= 1)
    lost = {i for i in state.lost if i not in warm_up}
    twice = sorted(i for i, count in every_exit.items() if count > 1)
    unknown = sorted(i for i in every_exit if i not in counted)
    lost_on_open = sorted(i for i in lost if not state.sent[i][1].closed.is_set())
    lost_with_exit = sorted(i for i in lost if every_exit[i])
    by_kind = collections.Counter(counted[i].name for i in counted if i not in warm_up)
    lost_by_kind = collections.Counter(counted[i].name for i in lost)
    rss_drift = rss_after - rss_before
    checks = {
        "sent == exits + lost": sent == exits + len(lost),
        "each exit exactly once": not twice and not unknown,
        "lost only with their connection": not lost_on_open and not lost_with_exit,
        "no stage left waiting": not state.hung,
        "every exit fits its stage": not state.wrong,
        "no process left": not left,
        "open fds unchanged": fds_before == fds_after,
        "RSS flat within 10 MB": abs(rss_drift) <= RSS_DRIFT_LIMIT_BYTES,
        "pgw stopped cleanly on SIGTERM": pgw_status == 0,
    }
    disconnects = sum(state.disconnects.values())
    print(f"soak: {sent} stages in {soak_s:.0f} s ({total_s:.0f} s in all) over {connections} connections;"
          f" {disconnects} forced disconnects ({', '.join(f'{n} {how}' for how, n in sorted(state.disconnects.items())) or 'none'}),"
          f" {state.offline_s:.1f} s offline")
    print(f"  stage kinds        {', '.join(f'{name} {n}' for name, n in sorted(by_kind.items()))}")
    print(f"  requests sent      {sent} (plus {len(warm_up)} warm-up; {state.not_sent} resent after a close)")
    print(f"  exits received     {exits}" + (f"; twice: {twice[:5]}" if twice else "") + (f"; unknown ids: {unknown[:5]}" if unknown else ""))
    print(f"  lost with the conn {len(lost)} ({', '.join(f'{name} {n}' for name, n in sorted(lost_by_kind.items())) or 'none'})")
    if state.hung:
        print(f"  left waiting       {len(state.hung)}: {sorted(state.hung)[:5]}")
    if state.wrong:
        print(f"  wrong exits        {len(state.wrong)}: {state.wrong[:5]}")
    print(f"  processes left     {len(left)}" + (f": {left[:10]}" if left else ""))
    print(f"  pgw open fds       before {fds_before}, after {fds_after}")
    print(f"  pgw RSS            start {rss_before / 1e6:.1f} MB, end {rss_after / 1e6:.1f} MB ({rss_drift / 1e6:+.1f} MB)")
    failed = [name for name, ok in checks.items() if not ok]
    print("soak: PASS" if not failed else f"soak: FAIL: {'; '.join(failed)}", flush=True)
    return 1 if failed else 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, default=1000, help="stages to send (default 1000)")
    parser.add_argument("--seconds", type=float, default=0, help="stop sending after this long (default: no limit)")
    parser.add_argument("--concurrency", type=int, default=8, help="stages in flight at once (default 8)")
    parser.add_argument("--disconnect-every", type=float, default=15.0,
                        help="mean seconds a connection lives before it is broken (default 15)")
    parser.add_argument("--disconnects", type=lambda text: text.split(","), default=DISCONNECTS,
                        help=f"kinds of forced disconnect to pick from (default {','.join(DISCONNECTS)}; "
                        "silent costs pgw's 30 s silence limit each time)")
    parser.add_argument("--give-up-after", type=float, default=900.0,
                        help="fail if the soak has not finished after this many seconds (default 900)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: a new one, printed)")
    parser.add_argument("--pyz", action="store_true", help="run the built pgw.pyz instead of pgw.py")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**32)
    return trio.run(soak, args)


if __name__ == "__main__":
    sys.exit(main())
