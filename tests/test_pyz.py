"""The built pgw.pyz, run as a user would: `python3.1x pgw.pyz ...` in a subprocess.

Each supported Python the machine has runs the pyz with an empty HOME and a
minimal environment, so shiv extracts it afresh and nothing from this venv
or the checkout can leak in. Build it first with `./build.sh` (or run the
suite with `./build.sh test`, which builds it).
"""

from __future__ import annotations

import ast
import contextlib
import glob
import json
import os
import re
import shutil
import stat
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYZ = ROOT / "pgw.pyz"
SUPPORTED_MINORS = (10, 11, 12, 13)
# Extraction of a fresh pyz plus importing trio takes about a second; this is generous.
RUN_TIMEOUT_S = 60
# The user's PATH is not ours to pass on: it may hold this venv's bin or pyenv shims.
MINIMAL_PATH = "/usr/local/bin:/usr/bin:/bin"

pytestmark = pytest.mark.pyz


##############################################################################
# Finding interpreters
##############################################################################


def _runs_as(executable: str, minor: int, major: int = 3) -> bool:
    """Whether `executable` starts and is Python <major>.<minor> (pyenv shims may not)."""
    try:
        done = subprocess.run(
            [executable, "-c", "import sys; print(sys.version_info[:2])"],
            capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False,
        )
    except OSError:
        return False
    return done.returncode == 0 and done.stdout.strip() == f"({major}, {minor})"


def _pyenv_roots() -> list[str]:
    roots = [os.environ.get("PYENV_ROOT", "")]
    if shutil.which("pyenv"):
        try:
            roots.append(subprocess.run(
                ["pyenv", "root"], capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False,
            ).stdout.strip())
        except OSError:
            pass
    roots.append(os.path.expanduser("~/.pyenv"))
    return [root for root in dict.fromkeys(roots) if root]


def find_python(minor: int, major: int = 3) -> str | None:
    """`python<major>.<minor>` on PATH if it really runs, else the newest pyenv build of it."""
    candidates = [shutil.which(f"python{major}.{minor}")]
    for root in _pyenv_roots():
        builds = glob.glob(os.path.join(root, "versions", f"{major}.{minor}.*", "bin", f"python{major}.{minor}"))
        candidates += sorted(builds, key=_patch_level, reverse=True)
    return next((c for c in candidates if c and _runs_as(c, minor, major)), None)


def _patch_level(path: str) -> int:
    """3 for .../versions/3.10.3/bin/python3.10; -1 for builds like 3.10.3t."""
    match = re.search(r"/\d\.\d+\.(\d+)/bin/", path)
    return int(match.group(1)) if match else -1


PYTHONS = {minor: find_python(minor) for minor in SUPPORTED_MINORS}
# For the tests that need one supported Python, not each.
ANY_PYTHON = PYTHONS[11] or PYTHONS[12] or PYTHONS[13] or PYTHONS[10]


@pytest.fixture(params=SUPPORTED_MINORS, ids=[f"py3.{minor}" for minor in SUPPORTED_MINORS])
def python(request) -> str:
    executable = PYTHONS[request.param]
    if executable is None:
        pytest.skip(f"no Python 3.{request.param} on this machine (not on PATH, not under pyenv)")
    return executable


##############################################################################
# Running the pyz
##############################################################################


@pytest.fixture(scope="session")
def pyz() -> Path:
    if not PYZ.is_file():
        pytest.fail(f"{PYZ} is missing: run ./build.sh first (./build.sh test builds it and runs the tests)")
    with zipfile.ZipFile(PYZ) as archive:
        packed = archive.read("site-packages/pgw.py")
    if packed != (ROOT / "pgw.py").read_bytes():
        pytest.fail(f"{PYZ} holds an older pgw.py: run ./build.sh to rebuild it")
    return PYZ


@pytest.fixture
def home(tmp_path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    return home


def run_pyz(python: str, pyz: Path, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python pyz ARGS` with only PATH and HOME set: no PYTHONPATH, no venv, no PGW_*."""
    env = {"PATH": MINIMAL_PATH, "HOME": str(home)}
    return subprocess.run(
        [python, str(pyz), *args],
        env=env, cwd=home, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False,
    )


def python_version(python: str) -> str:
    return subprocess.run(
        [python, "-c", "import platform; print(platform.python_version())"],
        capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=True,
    ).stdout.strip()


def locked_versions() -> dict[str, str]:
    """{name: version} pinned in requirements.lock."""
    text = (ROOT / "requirements.lock").read_text()
    return dict(re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", text, flags=re.M))


def pgw_version() -> str:
    tree = ast.parse((ROOT / "pgw.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("pgw.py has no __version__")


##############################################################################
# The pyz on each Python
##############################################################################


def test_version_names_pgw_its_libraries_and_the_running_python(python, pyz, home):
    done = run_pyz(python, pyz, home, "--version")

    assert done.returncode == 0, done.stderr
    locked = locked_versions()
    assert f"pgw {pgw_version()}" in done.stdout
    for dist in ("trio", "trio-websocket", "attrs", "cattrs"):
        assert f"{dist} {locked[dist]}" in done.stdout
    assert f"Python {python_version(python)}" in done.stdout
    # shiv extracted the pyz under the fresh HOME: it ran on what it carries.
    assert list((home / ".shiv").glob("pgw.pyz_*/site-packages/trio"))


def test_packages_on_pythonpath_do_not_take_the_place_of_the_pyzs_own(python, pyz, home, tmp_path):
    # They came first: an older attrs there broke every command with a traceback.
    for name in ("attrs", "trio"):
        (tmp_path / "elsewhere" / name).mkdir(parents=True)
        (tmp_path / "elsewhere" / name / "__init__.py").write_text("raise ImportError('not the one pgw carries')\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "PYTHONPATH": str(tmp_path / "elsewhere")}
    done = subprocess.run([python, str(pyz), "--version"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert f"attrs {locked_versions()['attrs']}" in done.stdout


@pytest.mark.parametrize("where", ["SHIV_ROOT", "~/.shiv"])
def test_an_extraction_that_cannot_be_written_any_more_still_serves(pyz, home, tmp_path, where):
    # Unpacked, then read-only (a read-only mount, `chattr +i`): every command
    # refused to start ("cannot unpack pgw.pyz ... not writable"), `status` and
    # `stop` included, though nothing was left to unpack.
    root = tmp_path / "shiv-root" if where == "SHIV_ROOT" else home / ".shiv"
    env = {"PATH": MINIMAL_PATH, "HOME": str(home), "PGW_HOME": str(tmp_path / "pgw-home"),
           **({"SHIV_ROOT": str(root)} if where == "SHIV_ROOT" else {})}

    def status() -> subprocess.CompletedProcess[str]:
        return subprocess.run([ANY_PYTHON, str(pyz), "status"], env=env, capture_output=True, text=True, timeout=60)

    assert status().returncode == 1  # not running: unpacked now
    if subprocess.run(["chattr", "+i", str(root)], capture_output=True, check=False).returncode != 0:
        pytest.skip("no chattr +i on this file system")
    try:
        done = status()
        empty_root = tmp_path / "empty-root"
        empty_root.mkdir()
        subprocess.run(["chattr", "+i", str(empty_root)], check=True)
        try:
            refused = subprocess.run([ANY_PYTHON, str(pyz), "status"], env={**env, "SHIV_ROOT": str(empty_root)},
                                     capture_output=True, text=True, timeout=60)
        finally:
            subprocess.run(["chattr", "-i", str(empty_root)], check=True)
    finally:
        subprocess.run(["chattr", "-i", str(root)], check=True)
    assert (done.returncode, done.stderr) == (1, ""), done.stderr
    assert "not running" in done.stdout
    assert refused.returncode == 1 and "cannot unpack pgw.pyz into SHIV_ROOT=" in refused.stderr  # nothing there to use


def test_capabilities_report_protocol_2_and_the_running_python(python, pyz, home):
    done = run_pyz(python, pyz, home, "capabilities")

    assert done.returncode == 0, done.stderr
    capabilities = json.loads(done.stdout)
    assert capabilities["protocol_version"] == 2
    assert capabilities["python"] == python_version(python)


def test_pair_writes_a_private_config_under_home(python, pyz, home, pair_server):
    done = run_pyz(python, pyz, home, "pair", "ABCD-1234", "--server", pair_server.url)

    assert done.returncode == 0, done.stderr
    assert len(pair_server.requests) == 1
    assert pair_server.requests[0]["pair_code"] == "ABCD-1234"
    config_path = home / ".pgworker" / "config.json"
    assert stat.S_IMODE(config_path.stat().st_mode) == 0o600
    config = json.loads(config_path.read_text())
    assert config["server"] == pair_server.url
    assert config["worker_id"] == "w-1"
    assert config["token"] == "tok-secret"
    assert "tok-secret" not in done.stdout + done.stderr


STUB_CLI = """#!{python}
import os, sys
print(os.path.basename(sys.argv[0]), sys.stdin.read(), os.getcwd() == os.environ["HOME"])
"""


def stub_clis(bin_dir: Path, python: str, names: tuple[str, ...] = ("claude",)) -> None:
    bin_dir.mkdir()
    for cli in names:
        (bin_dir / cli).write_text(STUB_CLI.format(python=python))
        (bin_dir / cli).chmod(0o755)


def paired(home: Path, backend, worker_id: str = "w-1") -> Path:
    """HOME's pgw home, paired with `backend`."""
    config_dir = home / ".pgworker"
    config_dir.mkdir(mode=0o700)
    (config_dir / "config.json").write_text(
        json.dumps({"server": backend.url, "worker_id": worker_id, "token": backend.token})
    )
    return config_dir


def interrupted(process: subprocess.Popen) -> tuple[str, str]:
    """What `process` wrote once given a SIGINT (as a Ctrl-C); killed if it did not end."""
    import signal

    try:
        process.send_signal(signal.SIGINT)
        return process.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@contextlib.asynccontextmanager
async def daemon_of(command: list[str], **options):
    """`command` running (a trio Process), killed at the end if it has not exited."""
    import trio

    daemon = await trio.lowlevel.open_process(command, **options)
    try:
        yield daemon
    finally:
        if daemon.returncode is None:
            daemon.kill()
            await daemon.wait()


async def test_run_serves_each_cli_and_stops_cleanly_on_sigterm(python, pyz, home, tmp_path):
    """`pgw.pyz run` as a user starts it: minimal PATH with the stub CLIs, a paired HOME."""
    import signal

    import trio
    from backend import open_backend

    bin_dir = tmp_path / "bin"
    stub_clis(bin_dir, python, ("claude", "codex", "deepseek"))
    with trio.fail_after(60):
        async with open_backend() as backend:
            config_dir = paired(home, backend)
            env = {"PATH": f"{bin_dir}:{MINIMAL_PATH}", "HOME": str(home)}
            async with daemon_of([python, str(pyz), "run"], env=env, cwd=home, stdin=subprocess.DEVNULL) as daemon:
                connection = await backend.next_connection()
                hello = await connection.receive("hello")
                for cli in ("claude", "codex", "deepseek"):
                    await connection.send({
                        "type": "stage.request", "stage_run_id": f"s-{cli}", "job_id": "j",
                        "cli": cli, "cli_args": [], "stdin": f"to {cli}",
                    })
                results = [await connection.stage_result(f"s-{cli}") for cli in ("claude", "codex", "deepseek")]
                daemon.send_signal(signal.SIGTERM)
                assert await daemon.wait() == 0
                await connection.closed.wait()
    assert hello["capabilities"]["python"] == python_version(python)
    assert all(hello["capabilities"][key]["available"] for key in ("claude_code", "codex", "deepseek_tui"))
    for cli, result in zip(("claude", "codex", "deepseek"), results):
        assert (result.returncode, result.error, result.stdout) == (0, None, f"{cli} to {cli} False\n")
    assert connection.close_code == 1001
    assert backend.token not in (config_dir / "run.log").read_text()


CLOSED = {"stdout": ">&-", "stderr": "2>&-", "all": "<&- >&- 2>&-"}


@pytest.mark.parametrize("closed", CLOSED)
def test_commands_run_with_standard_streams_closed(python, pyz, home, closed):
    # As from a script or a service manager that closes them: Python leaves
    # sys.stdout None, and the first file opened takes the number.
    done = subprocess.run(
        ["bash", "-c", f'exec "$@" {CLOSED[closed]}', "bash", python, str(pyz), "capabilities"],
        env={"PATH": MINIMAL_PATH, "HOME": str(home)}, cwd=home, capture_output=True, text=True,
        timeout=RUN_TIMEOUT_S, check=False,
    )
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    if closed == "stderr":
        assert json.loads(done.stdout)["protocol_version"] == 2


async def test_run_with_standard_streams_closed_serves_and_stops_cleanly(pyz, home, tmp_path):
    import signal

    import trio
    from backend import open_backend

    python = ANY_PYTHON
    bin_dir = tmp_path / "bin"
    stub_clis(bin_dir, python)
    with trio.fail_after(60):
        async with open_backend() as backend:
            config_dir = paired(home, backend)
            async with daemon_of(["bash", "-c", f'exec "$@" {CLOSED["all"]}', "bash", python, str(pyz), "run"],
                                 env={"PATH": f"{bin_dir}:{MINIMAL_PATH}", "HOME": str(home)}, cwd=home) as daemon:
                connection = await backend.next_connection()
                await connection.receive("hello")
                await connection.send({"type": "stage.request", "stage_run_id": "s1", "job_id": "j",
                                       "cli": "claude", "cli_args": [], "stdin": "hi"})
                result = await connection.stage_result("s1")
                daemon.send_signal(signal.SIGTERM)
                assert await daemon.wait() == 0
    assert result.stdout == "claude hi False\n"
    log = (config_dir / "run.log").read_text()
    assert "stopped" in log and "Traceback" not in log, log


# Runs its arguments with the signals' default dispositions, as from a terminal:
# CI may start the tests with some of them ignored, which a child keeps.
WITH_DEFAULT_SIGNALS = (
    "import os, signal, sys\n"
    "for name in ('SIGHUP', 'SIGTERM', 'SIGINT'): signal.signal(getattr(signal, name), signal.SIG_DFL)\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


@pytest.mark.parametrize("name", ["SIGHUP", "SIGTERM", "SIGINT"])
async def test_a_signal_while_the_pyz_starts_is_obeyed_as_once_running(pyz, home, tmp_path, name):
    # While shiv unpacked and pgw imported (about 0.2 s, longer on a cold disk)
    # the signals had their default actions: a SIGHUP (a closing terminal) killed
    # `run`, a SIGTERM (a watchdog) ended it with no log line.  A .pth file in
    # the extraction signals the process in that window, while shiv imports.
    import signal

    import trio
    from backend import open_backend

    python = ANY_PYTHON
    env = {"PATH": MINIMAL_PATH, "HOME": str(home), "SHIV_ROOT": str(tmp_path / "shiv")}
    assert run_start([python, str(pyz), "--version"], env, home).returncode == 0
    [site_packages] = (tmp_path / "shiv").glob("*/site-packages")
    (site_packages / "signalled_early.pth").write_text(f"import os, signal; os.kill(os.getpid(), signal.{name})\n")
    with trio.fail_after(RUN_TIMEOUT_S):
        async with open_backend() as backend:
            config_dir = paired(home, backend)
            async with daemon_of([python, str(pyz), "run"], env=env, cwd=home, stdin=subprocess.DEVNULL) as daemon:
                if name == "SIGHUP":  # ignored, as once running: it connects, and stops on a SIGTERM
                    await (await backend.next_connection()).receive("hello")
                    daemon.send_signal(signal.SIGTERM)
                assert await daemon.wait() == 0
    log = (config_dir / "run.log").read_text()
    assert "stopped" in log and "Traceback" not in log, log
    assert (f"received {name} while starting" in log) == (name != "SIGHUP"), log
    # Any other command is signalled as usual: the start code's block is taken back.
    done = run_start([python, "-c", WITH_DEFAULT_SIGNALS, python, str(pyz), "status"], env, home)
    if name == "SIGINT":
        assert (done.returncode, done.stderr) == (130, "pgw: interrupted\n"), done
    else:
        assert done.returncode == -getattr(signal, name), done


def test_another_entry_point_gets_the_signals_the_start_code_held(pyz, home, tmp_path):
    # Only pgw's main took them back: code run with SHIV_ENTRY_POINT (or
    # SHIV_MODULE) had SIGTERM, SIGINT, SIGQUIT and SIGHUP blocked for good.
    python = ANY_PYTHON
    (tmp_path / "blocked.py").write_text("import signal\ndef main():\n    print(sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])))\n")
    env = {"PATH": MINIMAL_PATH, "HOME": str(home), "PYTHONPATH": str(tmp_path)}
    for variable in ("SHIV_ENTRY_POINT", "SHIV_MODULE"):
        done = run_start([python, str(pyz)], {**env, variable: "blocked:main"}, home)
        assert (done.returncode, done.stdout) == (0, "[]\n"), (variable, done)


def test_ctrl_c_while_waiting_for_another_pgws_unpacking_is_obeyed(pyz, home, tmp_path):
    # The start code holds the signals until pgw can take them, but shiv's
    # unpacking waits, as long as it takes, for another pgw's (one stopped
    # with Ctrl-Z, say): that wait could not be interrupted.
    import fcntl

    python = ANY_PYTHON
    shiv_root = tmp_path / "shiv"
    shiv_root.mkdir(mode=0o700)
    with zipfile.ZipFile(pyz) as archive:
        build_id = json.loads(archive.read("environment.json"))["build_id"]
    other = os.open(shiv_root / f".{pyz.resolve().name}_{build_id}_lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(other, fcntl.LOCK_EX)  # another pgw unpacking
        process = subprocess.Popen([python, "-c", WITH_DEFAULT_SIGNALS, python, str(pyz), "status"], cwd=home,
                                   env={"PATH": MINIMAL_PATH, "HOME": str(home), "SHIV_ROOT": str(shiv_root)},
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1)
        waited = process.poll() is None
        out, err = interrupted(process)
    finally:
        os.close(other)
    assert waited, "it did not wait for the other unpacking"
    assert (process.returncode, err) == (130, "pgw: interrupted\n"), out + err


def test_ctrl_c_while_an_old_python_probes_a_newer_one_is_obeyed(pyz, home, tmp_path):
    # A Ctrl-C after the candidate had exited made the probe's killpg fail,
    # and that error, not the KeyboardInterrupt, was taken for a candidate
    # that does not run: pgw went on, or said no Python 3.10 was there.
    old = OLD_PYTHONS[(3, 9)]
    if old is None:
        pytest.skip("no Python 3.9 on this machine")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3.13").write_text("#!/bin/sh\nkill -INT $PPID\nexit 0\n")  # as a Ctrl-C meanwhile
    (bin_dir / "python3.13").chmod(0o755)
    (bin_dir / "python3.11").symlink_to(newest_python())
    done = run_start([newest_python(), "-c", WITH_DEFAULT_SIGNALS, old, str(pyz), "status"],
                     {"PATH": f"{bin_dir}:{MINIMAL_PATH}", "HOME": str(home)}, home)
    assert (done.returncode, done.stderr) == (130, "pgw: interrupted\n"), done


def test_selftest_passes_from_the_pyz(python, pyz, home):
    done = run_pyz(python, pyz, home, "selftest")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines[:-1]] == ["PASS"] * 7
    assert lines[-1].startswith("selftest: all steps passed") and python_version(python) in lines[-1]


@pytest.mark.parametrize("moment", ["unpacking", "a-selftest-step"])
def test_ctrl_c_while_the_pyz_unpacks_or_runs_is_one_line_and_status_130(python, pyz, home, tmp_path, moment):
    # A KeyboardInterrupt traceback while shiv unpacked or pgw imported, and
    # an exception group's while selftest's tasks ran.

    shiv_root = tmp_path / "shiv"
    env = {"PATH": MINIMAL_PATH, "HOME": str(home), "SHIV_ROOT": str(shiv_root)}
    if moment == "a-selftest-step":
        assert run_pyz(python, pyz, home, "--version").returncode == 0  # unpacked already: the start is quick
        env["SHIV_ROOT"] = str(home / ".shiv")
    # As from a terminal: a shell's background job (CI's, say) starts with SIGINT
    # ignored, and Python keeps it so.
    with_ctrl_c = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
    process = subprocess.Popen([python, "-c", with_ctrl_c, python, str(pyz), "selftest"], env=env, cwd=home,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        if moment == "unpacking":
            while not (shiv_root.is_dir() and any(entry.name.endswith(".tmp") for entry in shiv_root.iterdir())):
                assert time.monotonic() < deadline and process.poll() is None, "never saw it unpack"
                time.sleep(0.002)
        else:
            assert process.stdout.readline().startswith("PASS"), "no selftest step passed"
    finally:
        out, err = interrupted(process)
    assert (process.returncode, err) == (130, "pgw: interrupted\n"), out + err


async def test_cron_line_from_install_finds_the_clis_under_crons_environment(pyz, home, tmp_path):
    """`install cron` run from a login shell; its line run as cron would: env -i, PATH=/usr/bin:/bin."""
    import signal

    import trio
    from backend import open_backend

    python = ANY_PYTHON
    clis = tmp_path / "local-bin"  # like ~/.local/bin: not on cron's PATH
    stub_clis(clis, python)
    with trio.fail_after(60):
        async with open_backend() as backend:
            paired(home, backend, worker_id="w")
            shell_env = {"PATH": f"{clis}:{MINIMAL_PATH}", "HOME": str(home)}
            printed = subprocess.run([python, str(pyz), "install", "cron"], env=shell_env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=True).stdout
            line = next(entry for entry in printed.splitlines() if entry.startswith("@reboot "))
            command = line[len("@reboot "):]
            cron = await trio.lowlevel.open_process(
                ["env", "-i", f"HOME={home}", "LOGNAME=pgw", "SHELL=/bin/sh", "PATH=/usr/bin:/bin", "/bin/sh", "-c", command],
                start_new_session=True, stdin=subprocess.DEVNULL,
            )
            try:
                connection = await backend.next_connection()
                hello = await connection.receive("hello")
                await connection.send({"type": "stage.request", "stage_run_id": "c1", "job_id": "j", "cli": "claude", "cli_args": [], "stdin": "from cron"})
                result = await connection.stage_result("c1")
            finally:
                os.killpg(cron.pid, signal.SIGTERM)
                await cron.wait()
    assert hello["capabilities"]["claude_code"] == {"available": True, "path": str(clis / "claude")}
    assert result.returncode == 0 and result.stdout.startswith("claude from cron")
    assert (home / ".pgworker" / "shiv").is_dir(), "SHIV_ROOT points into the pgw home"


async def test_run_prunes_older_extractions_of_pgw(pyz, home, tmp_path):
    import signal

    import trio

    import fcntl

    python = ANY_PYTHON
    shiv_root = tmp_path / "shiv"
    old, held = shiv_root / f"pgw.pyz_{'0123456789abcdef' * 4}", shiv_root / f"pgw.pyz_{'fedcba9876543210' * 4}"
    for extraction in (old, held):
        (extraction / "site-packages").mkdir(parents=True)
        (extraction / "site-packages" / "pgw.py").write_text("# another build")
    # Another pgw runs from `held` (another home, the same SHIV_ROOT): it holds its in-use lock.
    holder = os.open(shiv_root / f".{held.name}_in_use", os.O_RDONLY | os.O_CREAT, 0o600)
    fcntl.flock(holder, fcntl.LOCK_SH)
    config_dir = home / ".pgworker"
    config_dir.mkdir(mode=0o700)
    (config_dir / "config.json").write_text(json.dumps({"server": "http://127.0.0.1:9", "token": "t"}))
    env = {"PATH": MINIMAL_PATH, "HOME": str(home), "SHIV_ROOT": str(shiv_root)}
    with trio.fail_after(60):
        daemon = await trio.lowlevel.open_process([python, str(pyz), "run"], env=env, stdin=subprocess.DEVNULL)
        try:
            while "removed an older extraction" not in ((config_dir / "run.log").read_text() if (config_dir / "run.log").exists() else ""):
                await trio.sleep(0.1)
            [current] = [e for e in shiv_root.iterdir() if e.is_dir() and e.name.startswith("pgw.pyz_") and e not in (old, held)]
            probe = os.open(shiv_root / f".{current.name}_in_use", os.O_RDONLY)
            try:
                with pytest.raises(BlockingIOError):  # the running pgw holds its own
                    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(probe)
        finally:
            daemon.send_signal(signal.SIGTERM)
            assert await daemon.wait() == 0
            os.close(holder)
    assert not old.exists() and held.exists()
    assert sorted(entry.name for entry in shiv_root.iterdir() if not entry.name.startswith(".")) == sorted([current.name, held.name])


def test_every_command_holds_its_extraction_while_it_runs(pyz, home, tmp_path):
    # Only `run` held it: another build's `run` could prune the extraction a
    # `logs -f`, `doctor` or `selftest` of this one was still importing from.
    import fcntl

    python = ANY_PYTHON
    shiv_root = tmp_path / "shiv"
    pgw_home = home / ".pgworker"
    pgw_home.mkdir(mode=0o700)
    (pgw_home / "run.log").write_text("a line\n")
    env = {"PATH": MINIMAL_PATH, "HOME": str(home), "SHIV_ROOT": str(shiv_root)}
    follower = subprocess.Popen([python, str(pyz), "logs", "-f"], env=env, cwd=home, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        assert follower.stdout.readline() == "a line\n"  # it runs: unpacked, imported, reading
        [lock] = [entry for entry in shiv_root.iterdir() if entry.name.endswith("_in_use")]
        probe = os.open(lock, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(probe)
    finally:
        follower.kill()
        follower.wait()


def test_the_extraction_is_held_before_pgw_is_imported(pyz, home, tmp_path):
    # pgw took its in-use lock only once its imports were done: another build's
    # `run` pruned the extraction in between, and the first died of
    # "No module named 'pgw'".  The start code holds it before shiv looks.
    import fcntl

    python = ANY_PYTHON
    shiv_root = tmp_path / "shiv"
    env = {"PATH": MINIMAL_PATH, "HOME": str(home), "SHIV_ROOT": str(shiv_root), "SHIV_INTERPRETER": "1"}
    waiting = "import sys; print('pgw' in sys.modules, flush=True); sys.stdin.read()"  # pgw not imported
    interpreter = subprocess.Popen([python, str(pyz), "-c", waiting], env=env, cwd=home, stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert interpreter.stdout.readline() == "False\n"
        [lock] = [entry for entry in shiv_root.iterdir() if entry.name.endswith("_in_use")]
        probe = os.open(lock, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):  # what a prune tries first
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(probe)
    finally:
        interpreter.kill()
        interpreter.wait()


def test_a_lock_file_a_prune_removed_meanwhile_is_locked_anew(pyz, tmp_path):
    # A prune locks the in-use file, removes the extraction and the file: a
    # hold that opened the file before must not settle for the removed one.
    # The start code's `hold`, taken out of the pyz and run here.
    import fcntl

    with zipfile.ZipFile(pyz) as archive:
        tree = ast.parse(archive.read("__main__.py"))
    [hold_def] = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "hold"]
    namespace = {"os": os}
    exec(compile(ast.Module(body=[hold_def], type_ignores=[]), "__main__.py", "exec"), namespace)
    path = tmp_path / ".pgw.pyz_abc_in_use"
    path.touch()
    pruner = os.open(path, os.O_RDONLY)
    fcntl.flock(pruner, fcntl.LOCK_EX)
    opened = []
    real_open = os.open

    def open_then_prune(name, *args):
        fd = real_open(name, *args)
        if not opened:
            opened.append(fd)
            os.unlink(path)  # the prune, done while the hold waited
            os.close(pruner)
        return fd

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "open", open_then_prune)
        fd = namespace["hold"](str(path))
    assert opened and fd is not None and os.path.samestat(os.fstat(fd), os.stat(path))
    os.close(fd)


##############################################################################
# The pyz's own start code (build.sh's start_code): before shiv and any dependency
##############################################################################

# Python 2.7 too: still the `python` of older systems, where a user may type `python pgw.pyz`.
OLD_VERSIONS = ((2, 7), (3, 6), (3, 7), (3, 8), (3, 9))
OLD_PYTHONS = {version: find_python(version[1], version[0]) for version in OLD_VERSIONS}
NOBODY_UID = 65534  # nobody/nogroup on Debian and RHEL alike


def newest_python() -> str:
    python = PYTHONS[13] or PYTHONS[12] or PYTHONS[11] or PYTHONS[10]
    if python is None:
        pytest.skip("no Python 3.10+ on this machine")
    return python


@pytest.fixture(params=OLD_VERSIONS, ids=[f"py{major}.{minor}" for major, minor in OLD_VERSIONS])
def old_python(request) -> str:
    executable = OLD_PYTHONS[request.param]
    if executable is None:
        pytest.skip(f"no Python {request.param[0]}.{request.param[1]} on this machine (not on PATH, not under pyenv)")
    return executable


def run_start(command: list[str], env: dict[str, str], cwd: Path, umask: int | None = None) -> subprocess.CompletedProcess[str]:
    """Run `command` with exactly `env`; under `umask` if given (via sh: no preexec_fn)."""
    if umask is not None:
        command = ["/bin/sh", "-c", f'umask {umask:03o} && exec "$@"', "sh", *command]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)


def assert_one_line_naming(done: subprocess.CompletedProcess[str], fix: str) -> None:
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.splitlines()) == 1 and done.stderr.endswith("\n"), done.stderr
    assert fix in done.stderr


def assert_private_tree(root: Path) -> None:
    """root and everything under it: no group or other bits, owned by us, no symlinks."""
    for path in [root, *root.rglob("*")]:
        info = path.lstat()
        assert not stat.S_ISLNK(info.st_mode), path
        assert stat.S_IMODE(info.st_mode) & 0o077 == 0, f"{path} has mode {stat.S_IMODE(info.st_mode):04o}"
        assert info.st_uid == os.geteuid(), path


REFUSING_SHIM = "#!/bin/sh\necho 'pyenv: {name}: command not found' >&2\nexit 127\n"


def test_old_python_reexecs_under_the_newest_python_on_path_that_runs(old_python, pyz, home, tmp_path):
    """A pyenv-like shim for python3.13 that refuses to run is passed over for python3.11."""
    newer = newest_python()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3.13").write_text(REFUSING_SHIM.format(name="python3.13"))
    (bin_dir / "python3.13").chmod(0o755)
    (bin_dir / "python3.11").symlink_to(newer)

    done = run_start([old_python, str(pyz), "--version"], {"PATH": f"{bin_dir}:{MINIMAL_PATH}", "HOME": str(home)}, home)

    assert (done.returncode, done.stderr) == (0, "")
    assert f"Python {python_version(newer)} ({bin_dir / 'python3.11'})" in done.stdout


HANGING_SHIM = "#!/bin/sh\nsleep 1000 &\necho $! > {pid_file}\nsleep 1000\n"


@pytest.mark.takes_s(12)
def test_a_candidate_python_that_hangs_is_given_up_on_with_all_it_started(pyz, home, tmp_path):
    """The probe's timeout killed the candidate alone: what it had started ran on under init."""
    old_python = OLD_PYTHONS[(3, 9)]
    if old_python is None:
        pytest.skip("no Python 3.9 on this machine (not on PATH, not under pyenv)")
    newer = newest_python()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    pid_file = tmp_path / "started.pid"
    (bin_dir / "python3.13").write_text(HANGING_SHIM.format(pid_file=pid_file))
    (bin_dir / "python3.13").chmod(0o755)
    (bin_dir / "python3.11").symlink_to(newer)

    done = run_start([old_python, str(pyz), "--version"], {"PATH": f"{bin_dir}:{MINIMAL_PATH}", "HOME": str(home)}, home)

    assert (done.returncode, done.stderr) == (0, "")
    assert f"Python {python_version(newer)} ({bin_dir / 'python3.11'})" in done.stdout
    started = int(pid_file.read_text())
    for _ in range(100):  # killed: gone once its parent, init, has reaped it
        if not os.path.exists(f"/proc/{started}") or open(f"/proc/{started}/stat").read().split()[2] == "Z":
            break
        time.sleep(0.05)
    else:
        os.kill(started, 9)
        raise AssertionError("the hanging candidate's child was left running")


def test_old_python_without_a_newer_one_exits_with_one_line_naming_the_fix(old_python, pyz, home, tmp_path):
    """PATH holds a refusing shim and a `python3.12` that is really this old Python: no exec loop."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3.13").write_text(REFUSING_SHIM.format(name="python3.13"))
    (bin_dir / "python3.13").chmod(0o755)
    (bin_dir / "python3.12").symlink_to(old_python)

    done = run_start([old_python, str(pyz), "--version"], {"PATH": str(bin_dir), "HOME": str(home)}, home)

    assert_one_line_naming(done, "pgw: needs Python 3.10 or newer;")
    assert f"{old_python} is {python_version(old_python)}." in done.stderr
    assert f"python3.11 {pyz}" in done.stderr
    assert not (home / ".shiv").exists()


def test_missing_home_unpacks_into_a_private_dir_under_the_temp_dir(pyz, tmp_path):
    python = newest_python()
    home = tmp_path / "nonexistent"
    temp = tmp_path / "tmp"
    temp.mkdir()

    done = run_start([python, str(pyz), "--version"], {"PATH": MINIMAL_PATH, "HOME": str(home), "TMPDIR": str(temp)}, tmp_path)

    assert (done.returncode, done.stderr) == (0, "")
    assert f"pgw {pgw_version()}" in done.stdout
    assert not home.exists()
    fallback = temp / f"pgw-shiv-{os.geteuid()}"
    assert stat.S_IMODE(fallback.lstat().st_mode) == 0o700
    assert list(fallback.glob("pgw.pyz_*/site-packages/pgw.py"))
    assert_private_tree(fallback)


def test_a_shiv_dir_owned_by_someone_else_is_passed_over_for_the_private_dir(pyz, home, tmp_path):
    """`sudo` keeping HOME: ~/.shiv belongs to the user, who could plant code root would run."""
    python = newest_python()
    (home / ".shiv").mkdir(mode=0o755)
    os.chown(home / ".shiv", NOBODY_UID, NOBODY_UID)
    temp = tmp_path / "tmp"
    temp.mkdir()

    done = run_start([python, str(pyz), "--version"], {"PATH": MINIMAL_PATH, "HOME": str(home), "TMPDIR": str(temp)}, home)

    assert (done.returncode, done.stderr) == (0, "")
    assert list((home / ".shiv").iterdir()) == []
    assert list((temp / f"pgw-shiv-{os.geteuid()}").glob("pgw.pyz_*/site-packages/pgw.py"))


def _runs_as_nobody(python: str) -> bool:
    try:
        return subprocess.run(
            ["setpriv", f"--reuid={NOBODY_UID}", f"--regid={NOBODY_UID}", "--clear-groups", python, "-c", "pass"],
            env={"PATH": MINIMAL_PATH}, cwd="/", capture_output=True, timeout=RUN_TIMEOUT_S, check=False,
        ).returncode == 0
    except OSError:
        return False


def test_unwritable_home_unpacks_into_a_private_dir_as_an_unprivileged_user(pyz):
    """Root ignores permissions, so this runs as nobody: a home it cannot write, a shared /tmp."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run as nobody")
    system_pythons = [shutil.which(f"python3.{minor}", path=MINIMAL_PATH) for minor in SUPPORTED_MINORS]
    python = next((p for p in [*system_pythons, *PYTHONS.values()] if p and _runs_as_nobody(p)), None)
    if python is None:
        pytest.skip("no Python 3.10+ that nobody can run (pyenv's usually live under root's home)")
    import tempfile

    shared = Path(tempfile.mkdtemp(prefix="pgw-test-nobody-"))  # pytest's tmp_path is root-only
    try:
        shared.chmod(0o755)
        shutil.copy(pyz, shared / "pgw.pyz")
        (shared / "home").mkdir(mode=0o755)  # root's: nobody cannot write it
        (shared / "tmp").mkdir()
        (shared / "tmp").chmod(0o1777)
        env = {"PATH": MINIMAL_PATH, "HOME": str(shared / "home"), "TMPDIR": str(shared / "tmp")}

        done = run_start(
            ["setpriv", f"--reuid={NOBODY_UID}", f"--regid={NOBODY_UID}", "--clear-groups",
             python, str(shared / "pgw.pyz"), "--version"], env, shared,
        )

        assert (done.returncode, done.stderr) == (0, "")
        assert f"pgw {pgw_version()}" in done.stdout
        fallback = shared / "tmp" / f"pgw-shiv-{NOBODY_UID}"
        info = fallback.lstat()
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (NOBODY_UID, 0o700)
        assert list(fallback.glob("pgw.pyz_*/site-packages/pgw.py"))
        assert not (shared / "home" / ".shiv").exists()
    finally:
        shutil.rmtree(shared)


@pytest.mark.parametrize("planted", ["mode 0777", "another user's", "a symlink"])
def test_a_fallback_dir_someone_else_could_write_is_refused_with_one_line(pyz, tmp_path, planted):
    """On a shared host another user may make /tmp/pgw-shiv-UID first, to plant code in it."""
    python = newest_python()
    temp = tmp_path / "tmp"
    temp.mkdir()
    fallback = temp / f"pgw-shiv-{os.geteuid()}"
    if planted == "a symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        fallback.symlink_to(tmp_path / "elsewhere")
    else:
        fallback.mkdir()
        fallback.chmod(0o777 if planted == "mode 0777" else 0o700)
        if planted == "another user's":
            os.chown(fallback, NOBODY_UID, NOBODY_UID)
    env = {"PATH": MINIMAL_PATH, "HOME": str(tmp_path / "nonexistent"), "TMPDIR": str(temp)}

    done = run_start([python, str(pyz), "--version"], env, tmp_path)

    assert_one_line_naming(done, "set SHIV_ROOT to a directory you can write")
    assert f"{fallback}: " in done.stderr and "(refused)" in done.stderr
    assert list(tmp_path.rglob("pgw.pyz_*")) == []


def test_umask_000_unpacks_privately_and_hands_pgw_the_callers_umask(pyz, home, tmp_path):
    """Under umask 000 shiv made its tree 0777: another user could swap in code that the next
    pgw (root's, under cron) would run. pgw itself, and so its stages, keep the caller's umask."""
    python = newest_python()
    env = {"PATH": MINIMAL_PATH, "HOME": str(home)}

    done = run_start([python, str(pyz), "--version"], env, home, umask=0o000)

    assert (done.returncode, done.stderr) == (0, "")
    root = home / ".shiv"
    assert_private_tree(root)
    [pgw_py] = root.glob("pgw.pyz_*/site-packages/pgw.py")
    assert pgw_py.stat().st_mode & 0o022 == 0
    # The entry point runs under the caller's umask: a stand-in for pgw:main prints it.
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    (probe_dir / "umask_probe.py").write_text("import os\ndef main():\n    print(oct(os.umask(0)))\n    return 0\n")
    env.update(SHIV_ENTRY_POINT="umask_probe:main", SHIV_PREPEND_PYTHONPATH=str(probe_dir))
    probed = run_start([python, str(pyz)], env, home, umask=0o027)
    assert (probed.returncode, probed.stdout) == (0, "0o27\n"), probed.stderr


def test_an_old_loose_extraction_root_is_tightened_and_its_planted_files_dropped(pyz, home, tmp_path):
    """A ~/.shiv left 0777 by an older pgw under umask 000: another user may have planted this
    build's extraction (its name is predictable) and a lock symlink that shiv would truncate."""
    python = newest_python()
    root = home / ".shiv"
    root.mkdir()
    root.chmod(0o777)
    with zipfile.ZipFile(pyz) as archive:
        build_id = json.loads(archive.read("environment.json"))["build_id"]
    planted = root / f"pgw.pyz_{build_id}" / "site-packages"
    planted.mkdir(parents=True)
    (planted / "pgw.py").write_text("def main():\n    print('planted code ran')\n")
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (root / f".pgw.pyz_{build_id}_lock").symlink_to(victim)

    done = run_start([python, str(pyz), "--version"], {"PATH": MINIMAL_PATH, "HOME": str(home)}, home)

    assert (done.returncode, done.stderr) == (0, "")
    assert "planted code ran" not in done.stdout and f"pgw {pgw_version()}" in done.stdout
    assert victim.read_text() == "keep me"
    assert stat.S_IMODE(root.stat().st_mode) & 0o022 == 0
    assert_private_tree(root / f"pgw.pyz_{build_id}")


def test_shiv_root_writable_by_others_and_not_ours_to_change_is_refused(pyz, home, tmp_path):
    python = newest_python()
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: tightening it is not ours to do

    done = run_start([python, str(pyz), "--version"], {"PATH": MINIMAL_PATH, "HOME": str(home), "SHIV_ROOT": str(shared)}, home)

    assert_one_line_naming(done, "set SHIV_ROOT to a directory only you can write")
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    assert list(shared.iterdir()) == []


def test_start_code_wraps_functions_shivs_bootstrap_still_calls(pyz):
    """The start code replaces five module functions of shiv's (pinned) _bootstrap:
    bootstrap() must still look them up by these names, or the wrapping does nothing."""
    with zipfile.ZipFile(pyz) as archive:
        tree = ast.parse(archive.read("_bootstrap/__init__.py"))
        start_code = archive.read("__main__.py").decode()
    [bootstrap] = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "bootstrap"]
    called = {node.func.id for node in ast.walk(bootstrap) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    for name in ("cache_path", "extract_site_packages", "run", "execute_interpreter", "prepend_pythonpath"):
        assert name in called
        assert f"_bootstrap.{name} = " in start_code
    assert "_bootstrap.bootstrap()" in start_code


##############################################################################
# What the pyz holds
##############################################################################


def test_pyz_is_pure_python_and_carries_the_310_backports(pyz):
    with zipfile.ZipFile(pyz) as archive:
        names = archive.namelist()
        environment = json.loads(archive.read("environment.json"))
    with open(pyz, "rb") as file:
        shebang = file.readline()

    assert shebang == b"#!/usr/bin/env python3\n"
    assert environment["entry_point"] == "pgw:main"
    assert [n for n in names if n.endswith((".so", ".pyd", ".dylib", ".pyc"))] == []
    # Markers are evaluated on the build Python (3.11+): these must be here anyway.
    assert "site-packages/exceptiongroup/__init__.py" in names
    for name, version in locked_versions().items():
        dist_info = f"site-packages/{name.replace('-', '_')}-{version}.dist-info/METADATA"
        assert any(n.lower() == dist_info.lower() for n in names), f"{name} {version} not in the pyz"


def test_runtime_lock_has_no_markers_and_matches_the_dev_lock():
    runtime = (ROOT / "requirements.lock").read_text()
    dev = (ROOT / "requirements-dev.lock").read_text()

    requirement_lines = [line for line in runtime.splitlines() if re.match(r"[A-Za-z0-9]", line)]
    assert [line for line in requirement_lines if ";" in line] == []
    for name, version in locked_versions().items():
        assert re.search(rf"^{re.escape(name)}=={re.escape(version)}[ ;\\]", dev, flags=re.M), (
            f"requirements-dev.lock does not pin {name}=={version}: run ./build.sh lock"
        )
