"""The built pgw.pyz, run as a user would: `python3.1x pgw.pyz ...` in a subprocess.

Each supported Python the machine has runs the pyz with an empty HOME and a
minimal environment, so shiv extracts it afresh and nothing from this venv
or the checkout can leak in. Build it first with `./build.sh` (or run the
suite with `./build.sh test`, which builds it).
"""

from __future__ import annotations

import ast
import glob
import json
import os
import re
import shutil
import stat
import subprocess
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


def _runs_as(executable: str, minor: int) -> bool:
    """Whether `executable` starts and is Python 3.<minor> (pyenv shims may not)."""
    try:
        done = subprocess.run(
            [executable, "-c", "import sys; print(sys.version_info[:2])"],
            capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False,
        )
    except OSError:
        return False
    return done.returncode == 0 and done.stdout.strip() == f"(3, {minor})"


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


def find_python(minor: int) -> str | None:
    """`python3.<minor>` on PATH if it really runs, else the newest pyenv build of it."""
    candidates = [shutil.which(f"python3.{minor}")]
    for root in _pyenv_roots():
        builds = glob.glob(os.path.join(root, "versions", f"3.{minor}.*", "bin", f"python3.{minor}"))
        candidates += sorted(builds, key=_patch_level, reverse=True)
    return next((c for c in candidates if c and _runs_as(c, minor)), None)


def _patch_level(path: str) -> int:
    """3 for .../versions/3.10.3/bin/python3.10; -1 for builds like 3.10.3t."""
    match = re.search(r"/3\.\d+\.(\d+)/bin/", path)
    return int(match.group(1)) if match else -1


PYTHONS = {minor: find_python(minor) for minor in SUPPORTED_MINORS}


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


async def test_run_serves_each_cli_and_stops_cleanly_on_sigterm(python, pyz, home, tmp_path):
    """`pgw.pyz run` as a user starts it: minimal PATH with the stub CLIs, a paired HOME."""
    import signal

    import trio
    from backend import open_backend

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for cli in ("claude", "codex", "deepseek"):
        (bin_dir / cli).write_text(STUB_CLI.format(python=python))
        (bin_dir / cli).chmod(0o755)
    with trio.fail_after(60):
        async with open_backend() as backend:
            config_dir = home / ".pgworker"
            config_dir.mkdir(mode=0o700)
            (config_dir / "config.json").write_text(
                json.dumps({"server": backend.url, "worker_id": "w-1", "token": backend.token})
            )
            env = {"PATH": f"{bin_dir}:{MINIMAL_PATH}", "HOME": str(home)}
            daemon = await trio.lowlevel.open_process(
                [python, str(pyz), "run"], env=env, cwd=home, stdin=subprocess.DEVNULL
            )
            try:
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
            finally:
                if daemon.returncode is None:
                    daemon.kill()
                    await daemon.wait()
    assert hello["capabilities"]["python"] == python_version(python)
    assert all(hello["capabilities"][key]["available"] for key in ("claude_code", "codex", "deepseek_tui"))
    for cli, result in zip(("claude", "codex", "deepseek"), results):
        assert (result.returncode, result.error, result.stdout) == (0, None, f"{cli} to {cli} False\n")
    assert connection.close_code == 1001
    assert backend.token not in (config_dir / "run.log").read_text()


def test_selftest_passes_from_the_pyz(python, pyz, home):
    done = run_pyz(python, pyz, home, "selftest")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines[:-1]] == ["PASS"] * 7
    assert lines[-1].startswith("selftest: all steps passed") and python_version(python) in lines[-1]


async def test_cron_line_from_install_finds_the_clis_under_crons_environment(pyz, home, tmp_path):
    """`install cron` run from a login shell; its line run as cron would: env -i, PATH=/usr/bin:/bin."""
    import signal

    import trio
    from backend import open_backend

    python = PYTHONS[11] or PYTHONS[12] or PYTHONS[13] or PYTHONS[10]
    clis = tmp_path / "local-bin"  # like ~/.local/bin: not on cron's PATH
    clis.mkdir()
    (clis / "claude").write_text(STUB_CLI.format(python=python))
    (clis / "claude").chmod(0o755)
    with trio.fail_after(60):
        async with open_backend() as backend:
            config_dir = home / ".pgworker"
            config_dir.mkdir(mode=0o700)
            (config_dir / "config.json").write_text(json.dumps({"server": backend.url, "worker_id": "w", "token": backend.token}))
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

    python = PYTHONS[11] or PYTHONS[12] or PYTHONS[13] or PYTHONS[10]
    shiv_root = tmp_path / "shiv"
    old = shiv_root / "pgw.pyz_0123456789abcdef"
    (old / "site-packages").mkdir(parents=True)
    (old / "site-packages" / "pgw.py").write_text("# an older build")
    config_dir = home / ".pgworker"
    config_dir.mkdir(mode=0o700)
    (config_dir / "config.json").write_text(json.dumps({"server": "http://127.0.0.1:9", "token": "t"}))
    env = {"PATH": MINIMAL_PATH, "HOME": str(home), "SHIV_ROOT": str(shiv_root)}
    with trio.fail_after(60):
        daemon = await trio.lowlevel.open_process([python, str(pyz), "run"], env=env, stdin=subprocess.DEVNULL)
        try:
            while "removed an older extraction" not in ((config_dir / "run.log").read_text() if (config_dir / "run.log").exists() else ""):
                await trio.sleep(0.1)
        finally:
            daemon.send_signal(signal.SIGTERM)
            assert await daemon.wait() == 0
    assert not old.exists()
    assert [entry.name.startswith("pgw.pyz_") for entry in shiv_root.iterdir() if not entry.name.startswith(".")] == [True]


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
