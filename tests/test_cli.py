"""The command line, in-process: pair, config, capabilities, doctor, revoke, logs, stop, help."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import pwd
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import pgw
from conftest import ROOT, write_stub_cli
from test_tls import self_signed_certificate


def run(capsys, *argv):
    """pgw's exit status, stdout and stderr for one command line."""
    status = pgw.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(err, *fragments):
    assert err.count("\n") == 1 and err.startswith("pgw: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# pair -----------------------------------------------------------------------


def test_pair_writes_private_config_with_pgworker_fields(capsys, pgw_home, pair_server, monkeypatch):
    monkeypatch.setattr(pgw, "_machine_name", lambda: "lab-box")
    status, out, err = run(capsys, "pair", "CODE-42", "--server", pair_server.url + "/")
    assert (status, err) == (0, "")
    assert "w-1" in out and "tok-secret" not in out
    config_path = pgw_home / "config.json"
    assert json.loads(config_path.read_text()) == {
        "server": pair_server.url,
        "worker_id": "w-1",
        "token": "tok-secret",
    }
    assert stat.S_IMODE(config_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(pgw_home.stat().st_mode) == 0o700
    assert pair_server.paths == ["/api/local-worker/pair-confirm"]
    [body] = pair_server.requests
    assert body["pair_code"] == "CODE-42"
    assert body["machine_name"] == "lab-box"
    assert body["capabilities"]["protocol_version"] == 2


@pytest.mark.parametrize("connected", [True, False, None])  # None: no state file to tell
def test_pair_while_the_daemon_runs_says_when_it_takes_the_new_credentials(capsys, pgw_home, pair_server, connected):
    # The daemon reads the credentials again before each connection: one that
    # stays connected went on as the old worker, and `pair` said nothing of it.
    pgw.make_private_dirs(pgw_home)
    fd, _ = pgw.acquire_instance_lock(pgw_home)  # this test's process stands in for `pgw run`
    try:
        if connected is not None:
            pgw.write_json_atomically(pgw_home / "state.json", {"pid": os.getpid(), "connected": connected})
        status, out, err = run(capsys, "pair", "CODE-42", "--server", pair_server.url)
    finally:
        os.close(fd)
    assert status == 0 and "paired worker w-1" in out
    if connected is None:
        assert_one_line_error(err, f"the running pgw (pid {os.getpid()}) may be connected with the previous credentials")
    elif connected:
        assert_one_line_error(err, f"the running pgw (pid {os.getpid()}) stays connected with the previous credentials")
        assert "`pgw stop`" in err
    else:
        assert err == "" and f"the running pgw (pid {os.getpid()}) uses the new credentials at its next connection attempt" in out
    status, out, err = run(capsys, "pair", "CODE-42", "--server", pair_server.url)  # none running: nothing to say
    assert (status, err) == (0, "") and "running pgw" not in out


def test_pair_while_the_daemon_runs_on_a_token_from_its_environment_says_the_new_one_is_not_used(capsys, pgw_home, pair_server):
    # PGW_TOKEN (which --token becomes) outranks config.json: the daemon
    # reconnected with the old token for good, and `pair` said it would not.
    pgw.make_private_dirs(pgw_home)
    fd, _ = pgw.acquire_instance_lock(pgw_home)
    try:
        pgw.write_json_atomically(pgw_home / "state.json", {"pid": os.getpid(), "connected": True, "token_from_environment": True})
        status, out, err = run(capsys, "pair", "CODE-42", "--server", pair_server.url)
    finally:
        os.close(fd)
    assert status == 0
    assert_one_line_error(err, f"the running pgw (pid {os.getpid()}) takes its token from PGW_TOKEN (or --token)")


async def test_the_state_file_says_whether_the_token_came_from_the_environment(tmp_path, monkeypatch):
    daemon = pgw.Daemon(pgw.Settings(server="http://127.0.0.1:9", token="t"), tmp_path)
    monkeypatch.delenv("PGW_TOKEN", raising=False)
    assert daemon.state()["token_from_environment"] is False
    monkeypatch.setenv("PGW_TOKEN", "from-env-1234567")
    assert daemon.state()["token_from_environment"] is True


def test_pair_warns_that_a_token_in_the_environment_outranks_the_one_it_saves(capsys, pgw_home, pair_server, monkeypatch):
    # `revoke` warned of it; `pair` saved the new token and said nothing.
    monkeypatch.setenv("PGW_TOKEN", "tok-from-env")
    status, _, err = run(capsys, "pair", "CODE-42", "--server", pair_server.url)
    assert status == 0 and json.loads((pgw_home / "config.json").read_text())["token"] == "tok-secret"
    assert err == "pgw: warning: PGW_TOKEN is set here; a pgw started with it uses that token, not the one just saved: unset it\n"


def test_pair_name_flag_beats_environment(capsys, pgw_home, pair_server, monkeypatch):
    monkeypatch.setenv("PGW_NAME", "from-env")
    assert run(capsys, "pair", "C", "--server", pair_server.url, "--name", "from-flag")[0] == 0
    monkeypatch.delenv("PGW_NAME")
    monkeypatch.setattr(pgw, "_machine_name", lambda: "")
    (pgw_home / "config.json").unlink()  # it saved the flag's name, which would win now
    assert run(capsys, "pair", "C", "--server", pair_server.url)[0] == 0
    assert [r["machine_name"] for r in pair_server.requests] == ["from-flag", "local-worker"]


def test_pair_server_from_environment_when_no_flag(capsys, pgw_home, pair_server, monkeypatch):
    monkeypatch.setenv("PGW_SERVER", pair_server.url)
    assert run(capsys, "pair", "C")[0] == 0
    assert json.loads((pgw_home / "config.json").read_text())["server"] == pair_server.url


def test_pair_keeps_host_settings_of_the_old_config(capsys, pgw_home, pair_server):
    pgw_home.mkdir()
    (pgw_home / "config.json").write_text(json.dumps({"token": "old", "max_stages": 3}))
    assert run(capsys, "pair", "C", "--server", pair_server.url)[0] == 0
    config = json.loads((pgw_home / "config.json").read_text())
    assert config["max_stages"] == 3 and config["token"] == "tok-secret"


OLD_CONFIG = {"server": "http://old.example", "worker_id": "w-old", "token": "tok-old"}


@pytest.mark.parametrize(
    "status_code, body, fragments",
    [
        (400, b'{"detail": "pair code expired"}', ["400", "pair code expired"]),
        (500, b"Internal Server Error", ["500", "Internal Server Error"]),
        (200, b"<html>proxy login</html>", ["not JSON"]),
        (200, b'{"worker_id": "w-2"}', ["lacks a worker_id or a token"]),
        # An escape sequence from the server reached the terminal as a command.
        (400, b'{"detail": "\\u001b[31mRED\\u001b]0;title\\u0007 \\u202eevil"}', ["400", "\\x1b[31mRED\\x1b]0;title\\x07 \\u202eevil"]),
    ],
)
def test_pair_failure_keeps_old_config(capsys, pgw_home, pair_server, status_code, body, fragments):
    pgw_home.mkdir()
    (pgw_home / "config.json").write_text(json.dumps(OLD_CONFIG))
    pair_server.reply(status_code, body)
    status, out, err = run(capsys, "pair", "C", "--server", pair_server.url)
    assert status == 1 and out == ""
    assert_one_line_error(err, "pairing failed", *fragments)
    assert err.rstrip("\n").isprintable()
    assert json.loads((pgw_home / "config.json").read_text()) == OLD_CONFIG


def test_pair_refused_port_is_one_line(capsys, pgw_home):
    status, _, err = run(capsys, "pair", "C", "--server", f"http://127.0.0.1:{free_port()}")
    assert status == 1
    assert_one_line_error(err, "refused the connection")
    assert not (pgw_home / "config.json").exists()


def test_pair_unknown_host_is_one_line(capsys, pgw_home):
    status, _, err = run(capsys, "pair", "C", "--server", "http://no-such-host.invalid")
    assert status == 1
    assert_one_line_error(err, "pairing failed")


def test_pair_without_server_says_the_flag_is_missing(capsys, pgw_home, monkeypatch):
    default = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setattr(pgw, "DEFAULT_SERVER", default)  # the real default may be taken on a shared host
    status, _, err = run(capsys, "pair", "C")
    assert status == 1
    assert_one_line_error(err, "no server given: pass --server URL", f"tried the default {default}", "connection refused")
    assert not (pgw_home / "config.json").exists()


def test_pair_with_server_in_config_does_not_blame_a_missing_flag(capsys, pgw_home):
    pgw.write_config(pgw_home / "config.json", {"server": f"http://127.0.0.1:{free_port()}"})
    _, _, err = run(capsys, "pair", "C")
    assert_one_line_error(err, "refused the connection")
    assert "no server given" not in err


@contextlib.contextmanager
def banner_server(banner: bytes, hang: bool):
    """A TCP server on 127.0.0.1:0 that writes `banner` to each client, then
    closes or (hang) keeps the connection open without another byte."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    held = []

    def serve():
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            client.sendall(banner)
            held.append(client) if hang else client.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        for client in held:
            client.close()


@pytest.mark.parametrize("hang", [False, True], ids=["closes", "hangs"])
def test_pair_with_a_port_that_does_not_speak_http_is_one_line(capsys, pgw_home, hang):
    with banner_server(b"SSH-2.0-OpenSSH_9.6\r\n", hang) as port:
        started = time.monotonic()
        status, _, err = run(capsys, "pair", "C", "--server", f"http://127.0.0.1:{port}")
    assert time.monotonic() - started < 10
    assert status == 1
    assert_one_line_error(err, "did not answer in HTTP", "is this the web address of the prove-graph server?")


def test_pair_over_https_with_a_plain_http_server_suggests_http(capsys, pgw_home, pair_server):
    host = pair_server.url.split("//")[1]
    status, _, err = run(capsys, "pair", "C", "--server", f"https://{host}")
    assert status == 1
    assert_one_line_error(err, "does not speak TLS", f"try http://{host}")
    assert pair_server.requests == []


@pytest.mark.parametrize("code", [301, 302, 307, 308])
def test_pair_refuses_a_redirect_and_names_the_server_to_use(capsys, pgw_home, pair_server, code):
    pgw.write_config(pgw_home / "config.json", OLD_CONFIG)
    pair_server.reply(code, b"", {"Location": "https://pg.example/app/api/local-worker/pair-confirm"})
    status, out, err = run(capsys, "pair", "C", "--server", pair_server.url)
    assert status == 1 and out == ""
    assert_one_line_error(
        err, f"redirects ({code}) to https://pg.example/app/api/local-worker/pair-confirm", "pair with --server https://pg.example/app"
    )
    assert len(pair_server.requests) == 1, "the redirect must not be followed"
    assert json.loads((pgw_home / "config.json").read_text()) == OLD_CONFIG


# A redirect on the same server, where pairing with it again meets the same
# redirect: pgw advised "pair with --server" the very URL given.
@pytest.mark.parametrize("location", ["/login", "/api/local-worker/pair-confirm"])
def test_pair_redirect_within_the_same_server_is_not_advised_as_a_new_server(capsys, pgw_home, pair_server, location):
    pair_server.reply(301, b"", {"Location": location})
    _, _, err = run(capsys, "pair", "C", "--server", pair_server.url)
    assert_one_line_error(err, f"redirects (301) to {pair_server.url}{location}, not to another server")
    assert "pair with --server" not in err


def test_pair_redirect_to_a_broken_url_is_named_not_a_traceback(capsys, pgw_home, pair_server):
    pair_server.reply(301, b"", {"Location": "http://[::1/x"})
    _, _, err = run(capsys, "pair", "C", "--server", pair_server.url)
    assert_one_line_error(err, "redirects (301) to 'http://[::1/x', which is not a URL")


def test_pair_saves_the_name_given_so_run_says_hello_with_it(capsys, pgw_home, pair_server, monkeypatch):
    monkeypatch.setattr(pgw, "_machine_name", lambda: "host-name")
    assert run(capsys, "pair", "C", "--server", pair_server.url, "--name", "lab box")[0] == 0
    config = json.loads((pgw_home / "config.json").read_text())
    assert config["name"] == "lab box"
    assert pgw.resolve_settings({}, {}, config, "host-name").name == "lab box"


@pytest.mark.parametrize("url", ["ftp://example.com", "http://", "example.com:8000", "http://h:99999", "http://h/?x=1",
                                 "http://[::1", "http://[nothing]"])
def test_pair_bad_server_url(capsys, pgw_home, url):
    status, _, err = run(capsys, "pair", "C", "--server", url)
    assert status == 1
    assert_one_line_error(err, "bad server URL")


@pytest.mark.parametrize("url", ["http://ada:s3cretpw@127.0.0.1:1", "https://ada@h", "http://:s3cretpw@h/p", "http://ada:s3cretpw@[::1",
                                 "http:/ada:s3cretpw@127.0.0.1", "//ada:s3cretpw@h", "http:///ada:s3cretpw@h", "ada:s3cretpw@h"])
@pytest.mark.parametrize("command", [["pair", "C", "--server"], ["config", "set", "server"]])
def test_a_server_url_naming_a_user_is_refused_without_showing_it(capsys, pgw_home, url, command):
    # Taken, it was shown everywhere: run.log, status, doctor, revoke, and the
    # state file (pair took `ada:s3cretpw@127.0.0.1` for a host name).
    status, out, err = run(capsys, *command, url)
    assert status == (1 if command[0] == "pair" else 2)  # a value given to `config set` wrong is a usage error
    assert_one_line_error(err, "bad server URL: it names a user", "drop it")
    assert "s3cretpw" not in out + err and "ada" not in out + err
    assert not (pgw_home / "config.json").exists()


@pytest.mark.parametrize("argv", [["pair"], ["pair", "C", "--bogus"], ["launch"], ["doctor", "extra"], ["logs", "-n", "x"]])
def test_usage_errors_exit_2_in_one_line(capsys, pgw_home, argv):
    status, _, err = run(capsys, *argv)
    assert status == 2
    assert_one_line_error(err, "--help")


# config ---------------------------------------------------------------------


def test_config_write_is_atomic_when_rename_fails(pgw_home, monkeypatch):
    path = pgw_home / "config.json"
    pgw.write_config(path, OLD_CONFIG)

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(pgw.ConfigError, match="No space left"):
        pgw.write_config(path, {"token": "new"})
    assert json.loads(path.read_text()) == OLD_CONFIG
    assert os.listdir(pgw_home) == ["config.json"]


def test_config_written_private_even_under_permissive_umask(pgw_home):
    old_umask = os.umask(0)
    try:
        pgw.write_config(pgw_home / "config.json", OLD_CONFIG)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((pgw_home / "config.json").stat().st_mode) == 0o600
    assert stat.S_IMODE(pgw_home.stat().st_mode) == 0o700


@pytest.mark.parametrize(
    "content, fragment",
    [("{not json", "is not valid JSON (line 1)"), ("[1]", "must hold a JSON object"), ('{"token": 5}', "'token' must be a string"),
     ("[" * 200_000, "nested too deep to be a config"),
     ('{"env": {"A=B": "x"}}', "'env': 'A=B' is not a variable a program can be started with"),
     ('{"env": {"": "x"}}', "'env': '' is not a variable"),
     ('{"env": {"A": "x\\u0000y"}}', "'env': 'A' is not a variable"),
     ('{"proxy": "http://[::1:3128"}', "'proxy': Invalid IPv6 URL")],
)
def test_corrupt_config_is_one_line_error(capsys, pgw_home, pair_server, content, fragment):
    pgw_home.mkdir()
    (pgw_home / "config.json").write_text(content)
    status, _, err = run(capsys, "pair", "C", "--server", pair_server.url)
    assert status == 1
    assert_one_line_error(err, str(pgw_home / "config.json"), fragment)
    assert pair_server.requests == []


def test_unreadable_config_is_one_line_error(capsys, pgw_home):
    (pgw_home / "config.json").mkdir(parents=True)
    status, _, err = run(capsys, "revoke")
    assert status == 1
    assert_one_line_error(err, "cannot read")


def test_settings_precedence_flag_env_config_default():
    config = {"server": "http://config", "token": "t-config", "name": "n-config", "worker_id": "w"}
    environ = {"PGW_SERVER": "http://env", "PGW_TOKEN": "t-env", "PGW_NAME": "n-env"}
    flags = {"server": "http://flag/", "token": "t-flag", "name": "n-flag"}
    assert pgw.resolve_settings(flags, environ, config, "host") == pgw.Settings("http://flag", "t-flag", "w", "n-flag")
    assert pgw.resolve_settings({}, environ, config, "host") == pgw.Settings("http://env", "t-env", "w", "n-env")
    assert pgw.resolve_settings({}, {}, config, "host") == pgw.Settings("http://config", "t-config", "w", "n-config")
    assert pgw.resolve_settings({}, {}, {}, "host") == pgw.Settings(pgw.DEFAULT_SERVER, None, None, "host")
    assert pgw.resolve_settings({}, {}, {}, "").name == "local-worker"


def test_home_defaults_to_dot_pgworker(monkeypatch, tmp_path):
    monkeypatch.delenv("PGW_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert pgw.pgw_home() == tmp_path / ".pgworker"


def test_the_websocket_resource_keeps_the_servers_path_and_quotes_the_token():
    # A backend behind a reverse proxy's prefix: pairing posts under it, and
    # the connection dropped it, so a paired worker could never connect.
    assert pgw.websocket_resource("https://pg.example/base", "a b/+") == "/base/api/local-worker/connect?token=a%20b%2F%2B"
    assert pgw.websocket_resource("https://pg.example/a%20b/c d", "t") == "/a%20b/c%20d/api/local-worker/connect?token=t"
    assert pgw.websocket_resource("http://127.0.0.1:8000", "t") == "/api/local-worker/connect?token=t"


# capabilities and doctor ----------------------------------------------------


def test_capabilities_reports_stub_clis_on_path(capsys, stub_bin):
    claude = write_stub_cli(stub_bin, "claude", "print('claude 1.0')")
    status, out, _ = run(capsys, "capabilities")
    caps = json.loads(out)
    assert status == 0
    assert caps["claude_code"] == {"available": True, "path": str(claude)}
    assert caps["codex"] == {"available": False, "path": None}
    assert caps["deepseek_tui"] == {"available": False, "path": None}
    assert caps["protocol_version"] == 2
    assert caps["platform"] == os.uname().sysname.lower()


def test_capabilities_and_pair_find_the_clis_on_the_configs_path_as_run_does(capsys, pgw_home, pair_server, tmp_path, stub_bin):
    # `config set env.PATH ...` is the fix doctor names for a CLI not found:
    # run and doctor used it, `capabilities` and the pairing request did not.
    claude = write_stub_cli(tmp_path / "elsewhere", "claude", "print('claude 1.0')")
    pgw.write_config(pgw_home / "config.json", {"server": pair_server.url, "env": {"PATH": str(claude.parent)}})
    status, out, _ = run(capsys, "capabilities")
    assert status == 0 and json.loads(out)["claude_code"] == {"available": True, "path": str(claude)}
    assert run(capsys, "pair", "CODE-42")[0] == 0
    assert pair_server.requests[0]["capabilities"]["claude_code"] == {"available": True, "path": str(claude)}


HANGING_CLI = """
import os, subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # holds stdout
time.sleep(60)
"""


def test_doctor_lists_checks_with_cli_versions(capsys, pgw_home, stub_bin, monkeypatch):
    server = f"http://127.0.0.1:{free_port()}"
    pgw.write_config(pgw_home / "config.json", {**OLD_CONFIG, "server": server})
    write_stub_cli(stub_bin, "claude", "print('1.0.96 (Claude Code)')")
    write_stub_cli(stub_bin, "codex", "import sys; sys.stderr.write('codex-cli 0.46.0\\n')")
    write_stub_cli(stub_bin, "deepseek", HANGING_CLI)
    monkeypatch.setattr(pgw, "VERSION_PROBE_TIMEOUT_S", 0.5)
    started = time.monotonic()
    status, out, _ = run(capsys, "doctor")
    assert time.monotonic() - started < 5
    lines = {line.split()[1]: line for line in out.splitlines()}
    assert lines["config"].startswith("PASS") and "worker w-old" in lines["config"]
    assert lines["claude"].startswith("PASS") and "1.0.96 (Claude Code)" in lines["claude"]
    assert "codex-cli 0.46.0" in lines["codex"]
    assert lines["deepseek"].startswith("WARN") and "gave no answer within 0.5 s" in lines["deepseek"]
    assert lines["daemon"].startswith("WARN")
    assert lines["dns"].startswith("PASS")
    assert lines["tcp"].startswith("FAIL") and "refused the connection" in lines["tcp"]
    assert status == 1, "a FAIL makes doctor exit 1"
    assert "tok-old" not in out


@pytest.mark.parametrize("then", ["exits", "hangs"])
def test_a_cli_whose_version_leaves_a_process_in_a_session_of_its_own_holds_up_no_probe(tmp_path, stub_bin, then):
    # The probe read its pipes to their end of file, which the process (an
    # updater, say) held for as long as it ran: doctor took its whole life
    # to answer, and said the CLI gave no answer; with a CLI that hung as
    # well, doctor never ended.
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc")
    pid_file = tmp_path / "updater.pid"
    updater = f"import os, sys, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    write_stub_cli(stub_bin, "deepseek", (
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', {updater!r}], start_new_session=True)\n"
        "print('deepseek 1.0', flush=True)\n"
        f"time.sleep({0 if then == 'exits' else 60})\n"
    ))
    try:
        answer = pgw.probe_cli_version(str(stub_bin / "deepseek"), timeout_s=5 if then == "exits" else 1)
        while not pid_file.read_text() if pid_file.exists() else True:
            time.sleep(0.01)
        updater_pid = int(pid_file.read_text())
        # Still running: the probe did not wait for it (nor kill it: not the CLI's group).
        assert pgw.process_state(updater_pid) not in (None, "Z")
    finally:
        if pid_file.exists() and pid_file.read_text():
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert answer == (("deepseek 1.0", None) if then == "exits" else (None, "`--version` gave no answer within 1 s"))


def test_doctor_json_keeps_pgworkers_fields(capsys, pgw_home, stub_bin):
    write_stub_cli(stub_bin, "claude", "print('claude 2.0'); print('second line')")
    write_stub_cli(stub_bin, "codex", "import sys; sys.exit(3)")
    pgw.write_config(pgw_home / "config.json", {"server": f"http://127.0.0.1:{free_port()}"})
    status, out, _ = run(capsys, "doctor", "--json")
    report = json.loads(out)
    assert status == 1 and report["ok"] is False
    assert report["paired"] is False and report["worker_id"] is None
    assert report["config_path"] == str(pgw_home / "config.json")
    assert report["capabilities"]["claude_code"]["version"] == "claude 2.0"
    assert report["capabilities"]["codex"]["version"] is None
    assert "exit status 3" in report["capabilities"]["codex"]["problem"]
    assert report["capabilities"]["deepseek_tui"] == {"available": False, "path": None, "version": None}
    assert {"name": "config", "status": "FAIL"}.items() <= report["checks"][2].items()


@pytest.mark.parametrize("mode", [0o644, 0o666])
def test_doctor_warns_about_a_config_others_can_read_or_write(capsys, pgw_home, stub_bin, mode):
    # Writable, it is worse than a token to read: whoever writes the server
    # into it has this machine run their stages.
    pgw.write_config(pgw_home / "config.json", {**OLD_CONFIG, "server": f"http://127.0.0.1:{free_port()}"})
    (pgw_home / "config.json").chmod(mode)
    _, out, _ = run(capsys, "doctor")
    [line] = [line for line in out.splitlines() if line.split()[1] == "config"]
    assert line.startswith("WARN") and f"mode {mode:o}" in line and "chmod 600" in line
    assert ("change the server it goes to" in line) == bool(mode & 0o022), line


def test_doctor_finds_clis_on_the_configured_path(capsys, pgw_home, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    write_stub_cli(elsewhere, "claude", "print('claude 9')")
    pgw.write_config(pgw_home / "config.json", {"server": f"http://127.0.0.1:{free_port()}", "env": {"PATH": str(elsewhere)}})
    _, out, _ = run(capsys, "doctor")
    assert "PASS  claude     " + str(elsewhere / "claude") in out


def test_doctor_names_a_cli_on_the_path_this_user_may_not_run(capsys, pgw_home, tmp_path):
    # "not found on PATH" for a CLI that is there, missing its x bit: a user
    # went looking for an install that was not missing.
    elsewhere = tmp_path / "elsewhere"
    write_stub_cli(elsewhere, "claude", "print('claude 9')")
    (elsewhere / "claude").chmod(0o644)
    (elsewhere / "codex").mkdir()  # a directory is no CLI: still "not found"
    pgw.write_config(pgw_home / "config.json", {"server": f"http://127.0.0.1:{free_port()}", "env": {"PATH": str(elsewhere)}})
    _, out, _ = run(capsys, "doctor")
    assert (f"WARN  claude     {elsewhere / 'claude'} is on PATH, but this user may not run it (not executable, or on a "
            "file system mounted noexec): `chmod +x` it") in out, out
    assert "WARN  codex      not found on PATH" in out, out


def test_doctor_names_the_pgw_it_runs_by_its_absolute_path(capsys, pgw_home, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(pgw.sys, "argv", ["./pgw.py", "doctor"])
    monkeypatch.setattr(pgw, "__file__", "./pgw.py")
    _, out, _ = run(capsys, "doctor")
    assert f"PASS  pgw        pgw {pgw.__version__} from {ROOT / 'pgw.py'}\n" in out, out


def test_doctor_reports_corrupt_config_and_fails(capsys, pgw_home, stub_bin):
    pgw_home.mkdir()
    (pgw_home / "config.json").write_text("{")
    status, out, err = run(capsys, "doctor")
    assert status == 1 and err == ""
    assert "FAIL  config" in out and "is not valid JSON" in out


# config set -------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["config", "set", "name", "y"], ["run"], ["install", "cron", "--apply", "--force"]])
def test_a_home_of_another_users_is_refused_in_one_line(capsys, pgw_home, argv):
    # As root, in a service account's home: config.json (and scratch/) became
    # root's, and the account's own pgw could no longer read them.
    if os.geteuid() != 0:
        pytest.skip("needs root, to give the home to another user")
    pgw.write_config(pgw_home / "config.json", {**OLD_CONFIG})
    for path in (pgw_home, pgw_home / "config.json"):
        os.chown(path, 65534, 65534)
    status, out, err = run(capsys, *argv)
    assert status != 0
    assert_one_line_error(err, f"{pgw_home} belongs to {pwd.getpwuid(65534).pw_name}: run pgw as")
    assert {path.name: path.stat().st_uid for path in pgw_home.iterdir()} == {"config.json": 65534}


@pytest.mark.parametrize("fix", [["unset", "max_stages"], ["set", "max_stages", "5"]])
def test_a_setting_broken_by_hand_is_fixed_with_config_set_or_unset(capsys, pgw_home, fix):
    # Both refused, naming the broken setting, and told the user to delete
    # the config and pair again: a pair code spent over one setting.
    pgw.write_config(pgw_home / "config.json", {**OLD_CONFIG, "max_stages": "5"})
    status, _, err = run(capsys, "config", "show")
    assert status == 1
    assert_one_line_error(err, "'max_stages' must be a whole number", "`pgw config unset max_stages`")
    assert "pair again" not in err
    assert run(capsys, "config", *fix)[0] == 0
    config = json.loads((pgw_home / "config.json").read_text())
    assert config == {**OLD_CONFIG, **({"max_stages": 5} if fix[0] == "set" else {})}
    pgw.write_config(pgw_home / "config.json", {**OLD_CONFIG, "max_stages": "5"})
    status, _, err = run(capsys, "config", "set", "name", "box")  # what stays broken is still refused
    assert status == 1 and "'max_stages' must be a whole number" in err


def test_config_set_and_unset_host_settings(capsys, pgw_home, tmp_path):
    ca, _ = self_signed_certificate(tmp_path)
    pgw.write_config(pgw_home / "config.json", OLD_CONFIG)
    for key, value in (("env.PATH", "/opt/bin"), ("max_stages", "2"), ("cafile", str(ca)), ("name", "lab"), ("server", "https://pg.example/")):
        assert run(capsys, "config", "set", key, value)[0] == 0
    config = json.loads((pgw_home / "config.json").read_text())
    assert config == {**OLD_CONFIG, "env": {"PATH": "/opt/bin"}, "max_stages": 2, "cafile": str(ca), "name": "lab", "server": "https://pg.example"}
    assert run(capsys, "config", "unset", "env.PATH")[0] == 0
    assert json.loads((pgw_home / "config.json").read_text())["env"] == {}
    _, out, _ = run(capsys, "config", "show")
    assert "tok-old" not in out and "<hidden>" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["config", "set", "max_stages", "-1"], "max_stages: expected a whole number"),
        (["config", "set", "colour", "red"], "unknown setting 'colour'"),
        (["config", "set", "cafile", "/no/such.pem"], "is not a file"),
        # Saved, it stopped `run` from starting, even against an http:// server.
        (["config", "set", "cafile", "/etc/passwd"], "CA file /etc/passwd is not a usable PEM bundle"),
        (["config", "set", "name"], "needs a KEY and a VALUE"),
        (["config", "frobnicate"], "invalid choice"),
    ],
)
def test_config_set_rejects_bad_input_in_one_line(capsys, pgw_home, argv, message):
    status, _, err = run(capsys, *argv)
    assert status == 2
    assert_one_line_error(err, message)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("env.A=B", "x", "cannot contain `=`: use `pgw config set env.A VALUE`"),
        ("env.", "x", "env.NAME needs a NAME"),
        ("env.A\0B", "x", "cannot contain a NUL character"),
        ("env.PGW_STAGE_ID", "x", "names starting with PGW_ are pgw's own"),
        ("env.PGW_HOME", "/tmp", "names starting with PGW_ are pgw's own"),
        ("env.A", "x\0y", "contains a NUL character"),
    ],
)
def test_config_set_refuses_env_that_no_stage_could_use(capsys, pgw_home, key, value, message):
    pgw.write_config(pgw_home / "config.json", OLD_CONFIG)
    status, _, err = run(capsys, "config", "set", key, value)
    assert status == 2
    assert_one_line_error(err, message)
    assert json.loads((pgw_home / "config.json").read_text()) == OLD_CONFIG


@pytest.mark.parametrize("key", ["name", "env.FOO", "env", "max_stages"])
def test_config_unset_of_a_setting_that_is_not_set_says_so(capsys, pgw_home, key):
    pgw.write_config(pgw_home / "config.json", {**OLD_CONFIG, "env": {"BAR": "1"}} if key != "env" else OLD_CONFIG)
    before = (pgw_home / "config.json").read_text()
    status, out, err = run(capsys, "config", "unset", key)
    assert (status, err) == (0, "")
    assert out == f"{key} is not set in {pgw_home / 'config.json'}; nothing changed\n"
    assert (pgw_home / "config.json").read_text() == before


def test_config_unset_without_a_config_writes_none(capsys, pgw_home):
    assert run(capsys, "config", "unset", "name")[0] == 0
    assert not (pgw_home / "config.json").exists()


@pytest.mark.parametrize(
    "config, fragment",
    [({"max_stages": "2"}, "'max_stages' must be a whole number"), ({"env": {"A": 1}}, "'env' must be an object of strings")],
)
def test_bad_host_settings_in_config_are_one_line_errors(capsys, pgw_home, config, fragment):
    pgw.write_config(pgw_home / "config.json", config)
    status, _, err = run(capsys, "run")
    assert status == 1
    assert_one_line_error(err, fragment)


def test_settings_from_config_reach_the_worker_options():
    config = {"token": "t", "max_stages": 3, "cafile": "/ca.pem", "env": {"PATH": "/opt/bin"}}
    settings = pgw.resolve_settings({"max_stages": None}, {}, config, "h")
    assert (settings.max_stages, settings.cafile, settings.stage_env) == (3, "/ca.pem", {"PATH": "/opt/bin"})
    assert pgw.resolve_settings({"max_stages": 0}, {"PGW_CAFILE": "/env.pem"}, config, "h").max_stages == 0
    assert pgw.resolve_settings({}, {"PGW_CAFILE": "/env.pem"}, config, "h").cafile == "/env.pem"


# revoke ---------------------------------------------------------------------


def test_revoke_deletes_pgworker_config(capsys, pgw_home):
    pgw.write_config(pgw_home / "config.json", OLD_CONFIG)
    status, out, _ = run(capsys, "revoke")
    assert status == 0
    assert not (pgw_home / "config.json").exists()
    assert "w-old" in out and "tok-old" not in out


def test_revoke_keeps_host_settings(capsys, pgw_home):
    pgw.write_config(pgw_home / "config.json", {**OLD_CONFIG, "max_stages": 2})
    assert run(capsys, "revoke")[0] == 0
    assert json.loads((pgw_home / "config.json").read_text()) == {"max_stages": 2}


def test_revoke_while_the_daemon_runs_says_it_still_holds_the_token(capsys, pgw_home):
    pgw.write_config(pgw_home / "config.json", OLD_CONFIG)
    fd, _ = pgw.acquire_instance_lock(pgw_home)  # this test's process stands in for `pgw run`
    try:
        status, out, err = run(capsys, "revoke")
    finally:
        os.close(fd)
    assert status == 0 and "removed" in out
    assert_one_line_error(err, f"the running pgw (pid {os.getpid()}) still holds the old token: run `pgw stop`")


@pytest.mark.parametrize("paired", [True, False])
def test_revoke_says_a_token_in_the_environment_still_pairs_what_starts_from_here(capsys, pgw_home, monkeypatch, paired):
    # "removed the token" or "not paired", while PGW_TOKEN (which outranks
    # config.json) kept any `pgw run` started from this shell paired.
    if paired:
        pgw.write_config(pgw_home / "config.json", OLD_CONFIG)
    monkeypatch.setenv("PGW_TOKEN", "tok-env0123456789")
    status, out, err = run(capsys, "revoke")
    assert status == 0 and ("removed" if paired else "not paired") in out
    assert_one_line_error(err, "PGW_TOKEN is set here; a pgw started with it still uses that token: unset it")
    assert "tok-env0123456789" not in out + err


def test_revoke_shows_no_password_an_older_pgw_stored_in_the_server_url(capsys, pgw_home):
    pgw.write_config(pgw_home / "config.json", {**OLD_CONFIG, "server": "https://ada:s3cretpw@pg.example.org\x1b[2J"})
    status, out, _ = run(capsys, "revoke")
    assert status == 0 and "https://pg.example.org" in out
    assert "s3cretpw" not in out and "\x1b" not in out


def test_revoke_when_not_paired(capsys, pgw_home):
    status, out, _ = run(capsys, "revoke")
    assert status == 0 and "not paired" in out


# --version ------------------------------------------------------------------


def test_version_names_pgw_libraries_and_python(capsys):
    with pytest.raises(SystemExit) as exited:
        pgw.main(["--version"])
    out = capsys.readouterr().out
    assert exited.value.code == 0
    assert out.startswith(f"pgw {pgw.__version__}")
    for dist in ("trio", "trio-websocket", "attrs", "cattrs"):
        assert f"{dist} " in out and f"{dist} (version unknown)" not in out
    assert f"Python {'.'.join(map(str, os.sys.version_info[:3]))}" in out


# help and --home -----------------------------------------------------------------


def test_no_command_prints_the_commands_a_start_line_and_exits_2(capsys):
    status, out, err = run(capsys)
    assert (status, err) == (2, "")
    for command in ("pair", "run", "install", "status", "logs", "stop", "doctor", "selftest"):
        assert f"\n    {command} " in out
    assert "start here: `pgw selftest`, then `pgw pair CODE --server URL`, then `pgw install cron --apply`" in out
    for variable in ("PGW_HOME", "PGW_SERVER", "PGW_TOKEN", "PGW_NAME", "PGW_CAFILE", "SHIV_ROOT"):
        assert f"\n  {variable} " in out


def test_every_command_has_a_description_of_its_own(capsys):
    [commands] = [action for action in pgw.build_parser()._actions if isinstance(action, argparse._SubParsersAction)]
    assert {"logs", "stop"} <= set(commands.choices)
    for name in commands.choices:
        with pytest.raises(SystemExit):
            pgw.main([name, "--help"])
        out = capsys.readouterr().out
        description = out.split("\n\n")[1]
        assert description[0].isupper() and len(description.split()) >= 3, (name, description)


def test_home_option_is_pgw_home(capsys, pgw_home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run(capsys, "--home", "other", "config", "set", "name", "lab")[0] == 0
    assert json.loads((tmp_path / "other" / "config.json").read_text()) == {"name": "lab"}
    assert os.environ["PGW_HOME"] == str(tmp_path / "other"), "made absolute, so a chdir or install keeps it"
    assert not pgw_home.exists()


def test_an_empty_home_option_is_a_usage_error_not_the_default_home(capsys, pgw_home):
    # `--home "$DIR"` with DIR unset used the default home without a word.
    status, out, err = run(capsys, "--home", "", "config", "set", "name", "lab")
    assert (status, out) == (2, "")
    assert err == "pgw: argument --home: expected a directory, not an empty string; see `pgw --help`\n"
    assert not pgw_home.exists()


def test_config_set_refuses_what_would_make_the_config_too_big_to_read(capsys, pgw_home):
    # Saved, a config over the 1 MiB pgw reads broke every command, `config
    # unset` (the way back) included.
    value = "x" * (pgw.CONFIG_MAX_BYTES // 2)
    assert run(capsys, "config", "set", "env.A", value)[0] == 0
    before = (pgw_home / "config.json").read_bytes()
    status, _, err = run(capsys, "config", "set", "env.B", value)
    assert status == 1
    assert_one_line_error(err, f"not saved: {pgw_home / 'config.json'} would pass the 1024 KiB pgw reads of it")
    assert (pgw_home / "config.json").read_bytes() == before
    assert run(capsys, "config", "unset", "env.A")[0] == 0


@pytest.mark.parametrize("name", ["a\nb", "lab\x1b[2Jbox", "a\u2028b"])
def test_a_machine_name_with_a_control_character_is_refused(capsys, pgw_home, pair_server, monkeypatch, name):
    # It went to the server as given, where a newline can forge a line of
    # whatever shows it.
    for argv, env in ((["pair", "C", "--server", pair_server.url, "--name", name], {}),
                      (["config", "set", "name", name], {}),
                      (["pair", "C", "--server", pair_server.url], {"PGW_NAME": name})):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        status, _, err = run(capsys, *argv)
        assert status in (1, 2)
        assert_one_line_error(err, "holds a control character", "use a plain name")
    assert pair_server.requests == []
    assert not (pgw_home / "config.json").exists()


def test_install_names_the_pgw_home_when_it_holds_a_newline(capsys, tmp_path, monkeypatch):
    # It said "SHIV_ROOT holds a control character": SHIV_ROOT is made from the home.
    home = tmp_path / "h\nx"
    monkeypatch.setenv("PGW_HOME", str(home))
    status, _, err = run(capsys, "install", "cron")
    assert status == 1
    assert_one_line_error(err, "cannot install: the pgw home holds a control character")


# logs ---------------------------------------------------------------------------


def test_logs_prints_the_last_lines(capsys, pgw_home):
    pgw_home.mkdir()
    (pgw_home / "run.log").write_text("".join(f"line {n}\n" for n in range(1, 101)))
    status, out, _ = run(capsys, "logs")
    assert status == 0 and out == "".join(f"line {n}\n" for n in range(51, 101))
    assert run(capsys, "logs", "-n", "2")[1] == "line 99\nline 100\n"
    assert run(capsys, "logs", "-n", "0")[1] == ""


def test_logs_without_a_log_says_who_writes_it(capsys, pgw_home):
    status, out, err = run(capsys, "logs")
    assert (status, out) == (1, "")
    assert_one_line_error(err, f"no log yet at {pgw_home / 'run.log'}: pgw run writes it")


def read_until(stream, text, within_s=10.0):
    """What `stream` gave until `text` appeared in it (a line at a time)."""
    seen = ""
    deadline = time.monotonic() + within_s
    while text not in seen:
        # In a thread, waited for with a deadline: a line that never comes must
        # fail the test, not hang it (select cannot see what the stream buffered).
        got: list[str] = []
        reader = threading.Thread(target=lambda: got.append(stream.readline()), daemon=True)
        reader.start()
        reader.join(max(0.0, deadline - time.monotonic()))
        assert got, f"{text!r} never came: {seen!r}"
        line = got[0]
        assert line, f"EOF before {text!r}: {seen!r}"
        seen += line
    return seen


@contextlib.contextmanager
def sigint_as_from_a_terminal():
    """A shell without job control starts a background job (`./build.sh test &`, a CI
    runner's script) with SIGINT ignored, and every child inherits that: Python then never
    raises KeyboardInterrupt, so a child started here would not see the test's Ctrl-C.
    Start it as a terminal's foreground job would be: SIGINT handled."""
    previous = signal.getsignal(signal.SIGINT)
    if previous == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if previous == signal.SIG_IGN:
            signal.signal(signal.SIGINT, previous)


def test_logs_follow_survives_rotation_and_ends_quietly_on_ctrl_c(pgw_home):
    pgw_home.mkdir()
    log = pgw_home / "run.log"
    log.write_text("old 1\nold 2\n")
    with sigint_as_from_a_terminal():
        follower = subprocess.Popen(
            [sys.executable, str(ROOT / "pgw.py"), "logs", "-f", "-n", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
    try:
        assert read_until(follower.stdout, "old 2\n") == "old 2\n"
        with log.open("a") as appending:
            appending.write("appended\n")
        assert read_until(follower.stdout, "appended\n") == "appended\n"
        with log.open("a") as appending:
            appending.write("last before rotation\n")
        log.rename(pgw_home / "run.log.1")  # as RotatingFileHandler does
        log.write_text("first after rotation\n")
        assert read_until(follower.stdout, "first after rotation\n") == "last before rotation\nfirst after rotation\n"
        follower.send_signal(signal.SIGINT)
        _, err = follower.communicate(timeout=10)
    finally:
        follower.kill()
    assert follower.returncode == 130
    assert err == ""


@pytest.mark.parametrize("written", [True, False], ids=["then-written", "never-written"])
def test_logs_follow_waits_for_a_log_not_written_yet_and_ends_quietly_on_ctrl_c(pgw_home, written):
    # `pgw logs -f` just after `install`, before `run` wrote a line, exited 1
    # ("no log yet"), where tail -F waits.
    pgw_home.mkdir()
    with sigint_as_from_a_terminal():
        follower = subprocess.Popen(
            [sys.executable, str(ROOT / "pgw.py"), "logs", "-f"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
    try:
        # Said once, as tail -F says it: a wait is no hang (and now it waits).
        waiting = f"pgw: no log yet at {pgw_home / 'run.log'}: waiting for pgw run to write it\n"
        assert read_until(follower.stderr, waiting) == waiting
        assert follower.poll() is None, follower.communicate()
        if written:
            (pgw_home / "run.log").write_text("first line\n")
            assert read_until(follower.stdout, "first line\n") == "first line\n"
        follower.send_signal(signal.SIGINT)
        out, err = follower.communicate(timeout=10)
    finally:
        follower.kill()
    assert (follower.returncode, out, err) == (130, "", "")


# stop -----------------------------------------------------------------------------

HOLD_LOCK = """
import signal, sys, time
from pathlib import Path
import pgw
if sys.argv[2] == "ignore-sigterm":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
fd, _ = pgw.acquire_instance_lock(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(60)
"""


@contextlib.contextmanager
def lock_holder(home, mode="default"):
    """A process standing in for `pgw run`: it holds HOME's lock until it ends."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(home), mode],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_stop_terminates_the_lock_holder_and_waits_for_the_lock(capsys, pgw_home):
    with lock_holder(pgw_home) as holder:
        status, out, err = run(capsys, "stop")
        assert (status, err) == (0, "")
        assert out == f"stopped pgw (pid {holder.pid})\n"
        assert holder.wait(timeout=5) == -signal.SIGTERM
    assert pgw.instance_lock_holder(pgw_home) is None


def test_stop_when_not_running_says_so(capsys, pgw_home):
    status, out, _ = run(capsys, "stop")
    assert status == 0 and out == f"pgw is not running (home {pgw_home})\n"


def test_stop_gives_up_on_a_daemon_that_does_not_stop(capsys, pgw_home, monkeypatch):
    monkeypatch.setattr(pgw, "STOP_WAIT_S", 0.5)
    with lock_holder(pgw_home, "ignore-sigterm") as holder:
        status, _, err = run(capsys, "stop")
        assert status == 1
        assert_one_line_error(err, f"pgw (pid {holder.pid}) did not stop within 0.5 s", f"kill -KILL {holder.pid}")
        assert holder.poll() is None


def test_stop_never_signals_a_pid_that_does_not_hold_the_lock(capsys, pgw_home, monkeypatch):
    monkeypatch.setattr(pgw, "LOCK_PID_SETTLE_S", 0.3)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pgw_home.mkdir()
        (pgw_home / "run.lock").write_text(f"{bystander.pid}\n")  # left by a pgw that ended
        assert run(capsys, "stop")[0] == 0
        fd, _ = pgw.acquire_instance_lock(pgw_home)  # this test takes the lock ...
        try:
            (pgw_home / "run.lock").write_text(f"{bystander.pid}\n")  # ... before writing its own pid
            status, _, err = run(capsys, "stop")
        finally:
            os.close(fd)
        assert status == 1
        assert_one_line_error(err, "nothing signalled")
        time.sleep(0.2)
        assert bystander.poll() is None, "the bystander was signalled"
    finally:
        bystander.kill()
        bystander.wait()


def test_a_state_file_or_pairing_answer_nested_too_deep_is_no_traceback(capsys, pgw_home):
    # Python's parser raises RecursionError, not ValueError, on valid JSON nested too deep.
    pgw_home.mkdir()
    (pgw_home / "state.json").write_text("[" * 200_000)
    assert pgw.read_state(pgw_home) is None
    with pytest.raises(pgw.PairingError, match="is not JSON"):
        pgw.pairing_answer("http://s", b"[" * 200_000)
    assert pgw.describe_wire_text("[" * 200_000) == "200000 bytes, not JSON"


def test_the_verbose_log_of_a_message_cannot_forge_a_line_or_grow_with_its_id():
    forged = "s\n2026-11-28 08:00:00 WARNING the server asked to upload ~/.ssh: done\x1b[2J"
    described = pgw.describe_wire_text(json.dumps({"type": "stage.cancel", "stage_run_id": forged, "signal": "\n"}))
    assert "\n" not in described and "\x1b" not in described, described
    huge = pgw.describe_wire_text(json.dumps({"type": "stage.request", "stage_run_id": "s" * 5_000_000}))
    assert len(huge) < 500, len(huge)


def test_a_home_made_for_pgw_is_private_to_its_last_parent_whatever_the_umask(capsys, tmp_path, monkeypatch):
    home = tmp_path / "a" / "b" / "home"
    monkeypatch.setenv("PGW_HOME", str(home))
    old_umask = os.umask(0)
    try:
        status, _, err = run(capsys, "config", "set", "name", "box")
    finally:
        os.umask(old_umask)
    assert status == 0, err
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "a", tmp_path / "a" / "b", home)} == {0o700}


# Bytes that are not UTF-8, as an argument or a variable in another encoding
# gives them (Python reads them as lone surrogates): each was a traceback.
NOT_UTF8 = os.fsdecode(b"box\xff")


@pytest.mark.parametrize("argv", [
    ["config", "set", "name", NOT_UTF8], ["config", "set", "env.X", NOT_UTF8], ["config", "set", "proxy", NOT_UTF8],
    ["config", "set", f"env.{NOT_UTF8}", "x"],
])
def test_config_set_of_text_that_is_not_utf8_is_one_line(capsys, pgw_home, argv):
    status, _, err = run(capsys, *argv)
    assert status == 2
    assert_one_line_error(err, "not valid UTF-8 text", "\\udcff")
    assert not (pgw_home / "config.json").exists()


@pytest.mark.parametrize("variable, value", [("PGW_NAME", NOT_UTF8), ("PGW_SERVER", "http://" + NOT_UTF8), ("PGW_TOKEN", NOT_UTF8)])
@pytest.mark.parametrize("command", [["run"], ["pair", "C", "--server", "http://127.0.0.1:9"], ["status"]])
def test_a_setting_that_is_not_utf8_is_one_line(tmp_path, variable, value, command):
    if command[0] == "pair" and variable == "PGW_SERVER":
        command = ["pair", "C"]
    env = {"PATH": "/usr/bin:/bin", "PGW_HOME": str(tmp_path / "home"), "PYTHONPATH": os.pathsep.join(sys.path), variable: value}
    done = subprocess.run([sys.executable, str(ROOT / "pgw.py"), *command], env=env, capture_output=True, text=True,
                          errors="backslashreplace", timeout=30, check=False)
    status, err = done.returncode, done.stderr
    if command == ["status"]:  # says what it can, naming the setting
        assert status == 1 and "Traceback" not in err
        assert f"paired     cannot tell: the {variable[4:].lower()} given" in done.stdout, done.stdout
        return
    assert status == 1
    assert_one_line_error(err, f"the {variable[4:].lower()} given", "is not valid UTF-8 text")
    assert ("\\udcff" in err) == (variable != "PGW_TOKEN"), "a token is a secret, not echoed"


def test_a_name_flag_that_is_not_utf8_is_one_line(capsys, pgw_home, pair_server):
    status, _, err = run(capsys, "pair", "C", "--server", pair_server.url, "--name", NOT_UTF8)
    assert status == 1
    assert_one_line_error(err, "the name given, 'box\\udcff', is not valid UTF-8 text")
    assert pair_server.requests == []


def test_a_home_shared_with_other_users_is_refused_not_made_private(capsys, tmp_path, monkeypatch):
    # PGW_HOME=/tmp, by mistake: making it 0700 would break it for every user.
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    monkeypatch.setenv("PGW_HOME", str(shared))
    status, _, err = run(capsys, "config", "set", "name", "box")
    assert status == 1
    assert_one_line_error(err, f"{shared} is shared with other users (mode 1777)", "PGW_HOME")
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777


@pytest.mark.parametrize("mode", [0o1777, 0o777, 0o775])
def test_run_refused_in_a_home_others_can_write_writes_nothing_there(capsys, tmp_path, monkeypatch, mode):
    # Another user can plant run.log there as a link to a file of ours: the
    # line saying why pgw did not start was appended to that file.
    shared = tmp_path / "shared"
    shared.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("mine\n")
    (shared / "run.log").symlink_to(victim)
    shared.chmod(mode)
    monkeypatch.setenv("PGW_HOME", str(shared))
    monkeypatch.setenv("PGW_SERVER", "http://[::1")  # refused before any check of the home
    status, _, err = run(capsys, "run")
    assert status == 1 and err.startswith("pgw: "), err
    assert victim.read_text() == "mine\n"
    assert sorted(p.name for p in shared.iterdir()) == ["run.log"]


def test_a_home_open_to_others_is_made_private_and_said_so(capsys, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o755)  # as pgworker may have left it
    monkeypatch.setenv("PGW_HOME", str(home))
    status, _, err = run(capsys, "config", "set", "name", "box")
    assert status == 0
    assert err == f"pgw: made {home} private (mode 700): other users could read what pgw keeps there\n"
    assert stat.S_IMODE(home.stat().st_mode) == 0o700


@pytest.mark.parametrize("holding", ["a-directory", "many-files"])
@pytest.mark.parametrize("command", [["config", "set", "name", "box"], ["run", "--token", "tok0123456789abcdef"], ["pair", "CODE-1"]])
def test_an_open_directory_holding_more_than_pgws_files_is_refused_not_made_private(capsys, tmp_path, monkeypatch, command, holding):
    # As root, `PGW_HOME=/home` (or /etc, /usr/bin) made it mode 700: every
    # other user lost their way into it.
    other = tmp_path / "home"
    other.mkdir()
    names = ["ada"] if holding == "a-directory" else [f"tool{number:02d}" for number in range(pgw.HOME_OTHER_FILES_MAX + 1)]
    for name in names:
        (other / name).mkdir() if holding == "a-directory" else (other / name).write_text("")
    (other / "config.json").write_text("{}")
    other.chmod(0o755)
    monkeypatch.setenv("PGW_HOME", str(other))
    # pair must not get as far as sending; run, unrefused, would end at once on a URL it cannot use
    monkeypatch.setenv("PGW_SERVER", "http://[::1" if command[0] == "run" else f"http://127.0.0.1:{free_port()}")
    status, _, err = run(capsys, *command)
    assert status == 1
    assert_one_line_error(err, f"{other} holds more than pgw's files ('{names[0]}'", "(mode 755)", "PGW_HOME", "chmod 700")
    assert stat.S_IMODE(other.stat().st_mode) == 0o755
    assert sorted(path.name for path in other.iterdir()) == sorted([*names, "config.json"])


# What pgw and pgworker leave in a home; and a few files of the user's own
# (pgw.pyz downloaded there, an editor's backup, launchd's log of a failed start).
HOMES_STILL_PGWS = {
    "pgws-own": ("config.json", "run.log", "run.log.1", "run.log.5", "state.json", ".state.json.x1y2.tmp", "run.lock"),
    "a-few-of-the-users": ("config.json", "pgw.pyz", "config.json~", "launchd.log", "nohup.out"),
}


@pytest.mark.parametrize("holding", HOMES_STILL_PGWS)
def test_an_open_pgworker_home_is_made_private_with_what_it_holds(capsys, tmp_path, monkeypatch, holding):
    home = tmp_path / ".pgworker"
    (home / "scratch" / "s1").mkdir(parents=True)
    for name in HOMES_STILL_PGWS[holding]:
        (home / name).write_text("{}")
    home.chmod(0o755)
    monkeypatch.setenv("PGW_HOME", str(home))
    status, _, err = run(capsys, "config", "set", "name", "box")
    assert status == 0 and "private (mode 700)" in err
    assert stat.S_IMODE(home.stat().st_mode) == 0o700


@pytest.mark.parametrize("mode", [0o600, 0o644])
def test_a_file_as_the_pgw_home_is_one_line_and_doctor_still_reports_every_check(capsys, tmp_path, monkeypatch, mode):
    # PGW_HOME=~/.pgworker/config.json, by mistake: at mode 644 doctor ended
    # on a bare "Not a directory", with none of its checks.
    home = tmp_path / "config.json"
    home.write_text("{}")
    home.chmod(mode)
    monkeypatch.setenv("PGW_HOME", str(home))
    monkeypatch.setenv("PGW_TOKEN", "tok0123456789abcdef")
    status, _, err = run(capsys, "config", "set", "name", "box")
    assert status == 1
    assert_one_line_error(err, f"{home}", "PGW_HOME")
    status, out, _ = run(capsys, "doctor", "--json")
    report = json.loads(out)
    assert status == 1 and report["ok"] is False
    [check] = [check for check in report["checks"] if check["name"] == "run"]
    assert check["status"] == "FAIL" and f"{home} is not a directory" in check["detail"], check


@pytest.mark.parametrize("value", ["²", "١٢", "-1", "1.5", ""])
def test_a_count_is_ascii_digits_only(capsys, pgw_home, value):
    # str.isdigit() takes "²" and Arabic-Indic digits; int() takes neither ("²") or reads them as 12.
    status, _, err = run(capsys, "config", "set", "max_stages", value)
    assert status == 2 and "max_stages: expected a whole number >= 0" in err and "Traceback" not in err
    status, _, err = run(capsys, "logs", "-n", value)
    assert status == 2 and "expected a whole number >= 0" in err


def test_logs_takes_a_count_beyond_any_log(capsys, pgw_home):
    pgw_home.mkdir()
    (pgw_home / "run.log").write_text("one\ntwo\n")
    status, out, _ = run(capsys, "logs", "-n", "99999999999999999999")
    assert (status, out) == (0, "one\ntwo\n")


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["run", "--help"], ["status"], ["config", "show"], ["capabilities"]])
@pytest.mark.parametrize("unbuffered", [{}, {"PYTHONUNBUFFERED": "1"}], ids=["buffered", "unbuffered"])
def test_output_to_a_full_disk_is_one_line_not_a_traceback(tmp_path, argv, unbuffered):
    # Unbuffered (as in many a container), each write fails as it is made:
    # argparse's help used to ignore that, and exit 0 having said nothing.
    env = {"PATH": "/usr/bin:/bin", "PGW_HOME": str(tmp_path / "home"), "HOME": str(tmp_path), **unbuffered}
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, str(ROOT / "pgw.py"), *argv], stdout=full, stderr=subprocess.PIPE,
                              text=True, env=env, timeout=60)
    assert done.returncode == 1 and done.stderr == "pgw: No space left on device\n", done.stderr


@pytest.mark.parametrize("drip", ["headers", "body"])
def test_pairing_with_a_server_that_answers_a_byte_at_a_time_ends_within_its_timeout(drip):
    # A socket's timeout bounds each read: a server that sends one byte every
    # 0.2 s would hold `pair` for as long as it likes.
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n" + b" " * 50
    cut = 10 if drip == "headers" else answer.index(b"\r\n\r\n") + 4
    stop = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(answer[:cut])
            for byte in answer[cut:]:
                if stop.wait(0.2):
                    return
                conn.sendall(bytes([byte]))

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    started = time.monotonic()
    try:
        with pytest.raises(pgw.PairingError) as caught:
            pgw.request_pairing(f"http://127.0.0.1:{listener.getsockname()[1]}", {"code": "C"}, timeout_s=1.0)
    finally:
        stop.set()
        listener.close()
    assert str(caught.value).endswith("gave no answer within 1 s")
    assert time.monotonic() - started < 5


def test_a_worker_id_with_terminal_escapes_is_printed_quoted(capsys, pgw_home, pair_server):
    evil = "w\x1b[2J\x1b]0;pwned\x07\npaired worker other"
    pair_server.reply(200, json.dumps({"worker_id": evil, "token": "tok-secret"}).encode())
    status, out, _ = run(capsys, "pair", "C", "--server", pair_server.url)
    assert status == 0
    assert out.count("\n") == 1 and "\x1b" not in out and "\x07" not in out
    assert out.startswith(f"paired worker {evil!r} with ")


@pytest.mark.parametrize("where", ["config", "environment", "flag"])
def test_a_server_url_with_a_broken_ipv6_host_is_one_line_error(capsys, pgw_home, monkeypatch, where):
    # urllib raises ValueError on a `[` without its `]`: a traceback from every command.
    pgw_home.mkdir(mode=0o700)
    config = {"server": "http://[::1" if where == "config" else "http://127.0.0.1:9", "worker_id": "w", "token": "t"}
    (pgw_home / "config.json").write_text(json.dumps(config))
    (pgw_home / "config.json").chmod(0o600)
    if where == "environment":
        monkeypatch.setenv("PGW_SERVER", "http://[::1")
    status, _, err = run(capsys, "run", *(["--server", "http://[::1"] if where == "flag" else []))
    assert status == 1
    assert_one_line_error(err, "bad server URL 'http://[::1': Invalid IPv6 URL")


# what a new user met in the field ---------------------------------------------


def test_pair_into_a_home_it_cannot_write_spends_no_code(capsys, tmp_path, monkeypatch, pair_server):
    # The code went to the server (which spends it) before pgw found it could
    # not save the pairing: the user needed a new code for nothing.
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o500)
    # Root passes over modes, not over the immutable attribute.
    immutable = os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(read_only)], capture_output=True).returncode == 0
    if os.geteuid() == 0 and not immutable:
        pytest.skip("root, and no chattr +i here")
    monkeypatch.setenv("PGW_HOME", str(read_only))
    try:
        status, out, err = run(capsys, "pair", "CODE-42", "--server", pair_server.url)
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(read_only)], check=True)
    assert status == 1 and pair_server.requests == []
    assert_one_line_error(err, f"cannot write to {read_only}", "the pairing code was not sent", "PGW_HOME")


def test_a_pgw_home_that_is_your_whole_home_or_the_root_is_refused(capsys, tmp_path, monkeypatch):
    # `--home ~` made the user's whole home directory mode 700.
    monkeypatch.setenv("HOME", str(tmp_path))
    tmp_path.chmod(0o755)
    status, _, err = run(capsys, "--home", "~", "config", "set", "name", "x")
    assert status != 0 and "which pgw would make private (mode 700)" in err and err.count("\n") == 1
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755
    # The root directory, checked without a command: one that let it through
    # would make / mode 700 on the machine running the tests.
    with pytest.raises(pgw.ConfigError, match="/ is the root directory"):
        pgw.refuse_unfit_home(Path("/"))


def test_selftest_whose_output_cannot_be_written_says_so_in_one_line():
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, str(ROOT / "pgw.py"), "selftest"], stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert (done.returncode, done.stderr) == (1, "pgw: No space left on device\n")


def test_run_refused_before_its_home_exists_still_leaves_its_reason(capsys, tmp_path, monkeypatch):
    # Under cron nobody sees stderr: a first `run` before `pair` left nothing
    # for `status` to show, as its home did not exist yet.
    home = tmp_path / ".pgworker"  # in a home directory that exists, as ~ does
    monkeypatch.setenv("PGW_HOME", str(home))
    status, _, err = run(capsys, "run")
    assert status == 1 and "not paired yet" in err
    assert "not paired yet" in (home / "run.log").read_text() and "not paired yet" in pgw.read_state(home)["last_error"]


def test_a_relative_pgw_home_is_shown_as_the_directory_it_names(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PGW_HOME", "rel/home")
    status, out, _ = run(capsys, "config", "set", "name", "x")
    assert status == 0 and str(tmp_path / "rel" / "home" / "config.json") in out
    assert pgw.pgw_home() == tmp_path / "rel" / "home"


def test_status_of_a_daemon_on_a_token_from_its_environment_says_it_is_paired(capsys, pgw_home):
    pgw.make_private_dirs(pgw_home)
    fd, _ = pgw.acquire_instance_lock(pgw_home)
    try:
        pgw.write_json_atomically(pgw_home / "state.json", {"pid": os.getpid(), "connected": True, "token_from_environment": True})
        status, out, _ = run(capsys, "status")
    finally:
        os.close(fd)
    assert status == 0 and "paired     yes: the running pgw has its token from PGW_TOKEN (or --token)" in out


def test_uninstall_cron_where_there_is_no_cron_has_nothing_to_remove(capsys, pgw_home, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no crontab on it
    status, out, err = run(capsys, "uninstall", "cron")
    assert (status, err) == (0, "") and "nothing to remove" in out


def test_a_refused_run_writes_nothing_into_the_home_it_refused(capsys, tmp_path, monkeypatch):
    # `--home ~` was refused, but the refusal's reason went into ~/run.log
    # and ~/state.json all the same.
    monkeypatch.setenv("HOME", str(tmp_path))
    status, _, err = run(capsys, "--home", "~", "run", "--token", "tok0123456789abcdef")
    assert status == 1 and "your home directory itself" in err
    assert sorted(path.name for path in tmp_path.iterdir()) == []


def test_a_directory_that_holds_your_home_is_refused_as_a_pgw_home(capsys, tmp_path, monkeypatch):
    # It was made mode 700 like any home: every other user's entry in it too.
    monkeypatch.setenv("HOME", str(tmp_path / "users" / "ada"))
    (tmp_path / "users" / "ada").mkdir(parents=True)
    (tmp_path / "users").chmod(0o755)
    status, _, err = run(capsys, "--home", str(tmp_path / "users"), "config", "set", "name", "x")
    assert status != 0 and "a directory that holds your home directory" in err and err.count("\n") == 1
    assert stat.S_IMODE((tmp_path / "users").stat().st_mode) == 0o755


def test_a_failed_pair_leaves_no_directory_it_would_have_made(capsys, tmp_path, monkeypatch):
    home = tmp_path / "q1" / "q2" / "home"
    monkeypatch.setenv("PGW_HOME", str(home))
    status, _, err = run(capsys, "pair", "CODE-1", "--server", f"http://127.0.0.1:{free_port()}")
    assert status == 1 and "pairing failed" in err
    assert not (tmp_path / "q1").exists()


def test_status_says_why_run_is_refused_in_its_home(capsys, tmp_path, monkeypatch):
    # A refused `run` writes nothing into the home it refused, and under cron
    # its stderr goes nowhere: status said "last error -".
    home = tmp_path / "home"
    (home / "ada").mkdir(parents=True)
    home.chmod(0o755)
    monkeypatch.setenv("PGW_HOME", str(home))
    status, out, _ = run(capsys, "status")
    assert status == 1 and f"last error {home} holds more than pgw's files ('ada')" in out, out
    status, out, _ = run(capsys, "status", "--json")
    assert status == 1 and "holds more than pgw's files" in json.loads(out)["last_error"]


@pytest.fixture
def home_kept_out(pgw_home, monkeypatch):
    """Another user's home (root's pgw, looked at by a user): its mode keeps
    this user out, as it would (root is never kept out)."""
    pgw.make_private_dirs(pgw_home)
    opened = os.open

    def refused_for_the_home(path, *args, **kwargs):
        if os.fspath(path) == str(pgw_home):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return opened(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refused_for_the_home)
    return pgw_home


def test_stop_in_a_home_this_user_cannot_open_cannot_tell(capsys, home_kept_out):
    # It said "not running", with status 0, while a daemon ran there.
    status, out, err = run(capsys, "stop")
    assert (status, out) == (1, "")
    assert err == f"pgw: cannot tell whether pgw runs for {home_kept_out}: Permission denied\n"


def test_status_in_a_home_this_user_cannot_open_says_it_cannot_tell(capsys, home_kept_out):
    # Exit 1 said "not running" to a script, which would start a second pgw;
    # and --json printed no JSON.
    status, out, err = run(capsys, "status")
    reason = f"cannot tell whether pgw runs for {home_kept_out}: Permission denied"
    assert (status, err) == (4, "")
    assert out.splitlines()[0] == f"running    {reason}", out
    status, out, err = run(capsys, "status", "--json")
    report = json.loads(out)
    assert (status, err) == (4, "")
    assert report["running"] is None and report["connected"] is None and report["paired"] is None, report
    assert report["error"] == reason and report["home"] == str(home_kept_out), report


@pytest.mark.parametrize("state_names_it", [True, False])
def test_status_does_not_take_a_run_lock_replaced_by_hand_for_the_daemon(capsys, pgw_home, state_names_it):
    # It reported whatever pid the file held as pgw (an unrelated process),
    # and "no state file of this run yet" beside a state file of the running pgw.
    pgw.make_private_dirs(pgw_home)
    fd, _ = pgw.acquire_instance_lock(pgw_home)  # this test's process stands in for `pgw run`, the home open
    try:
        (pgw_home / "run.lock").write_text("1\n")  # init: it holds no pgw home open
        pgw.write_json_atomically(pgw_home / "state.json", {"pid": os.getpid() if state_names_it else 1, "connected": True})
        status, out, _ = run(capsys, "status")
        report = json.loads(run(capsys, "status", "--json")[1])
    finally:
        os.close(fd)
    if state_names_it:
        assert status == 0 and f"running    yes, pid {os.getpid()}," in out and report["pid"] == os.getpid()
    else:
        assert status == 3 and "pid unknown: " in out and "connected  cannot tell: which process is pgw is not known" in out
        assert report["running"] is True and report["pid"] is None
    assert "pid 1," not in out


@pytest.mark.parametrize("name", ["ada\u202eoof", "a\u2066b"])
def test_a_machine_name_that_reorders_text_is_refused(capsys, pgw_home, name):
    status, _, err = run(capsys, "config", "set", "name", name)
    assert status == 2
    assert_one_line_error(err, "holds a control character")


def test_status_of_no_running_daemon_takes_no_token_from_an_old_state_file(capsys, pgw_home):
    pgw.make_private_dirs(pgw_home)
    pgw.write_json_atomically(pgw_home / "state.json", {"pid": 12345678, "connected": True, "token_from_environment": True})
    status, out, _ = run(capsys, "status")
    assert status == 1 and "paired     no" in out


def test_a_relative_home_after_its_current_directory_was_removed_is_one_line(tmp_path):
    gone = tmp_path / "gone"
    gone.mkdir()
    code = "import os, sys; sys.path.insert(0, sys.argv[1]); import pgw; os.rmdir(os.getcwd()); sys.exit(pgw.main(sys.argv[2:]))"
    for argv, env in ((["status"], {"PGW_HOME": "rel"}), (["--home", "rel", "status"], {})):
        done = subprocess.run([sys.executable, "-c", code, str(ROOT), *argv], cwd=gone, capture_output=True, text=True,
                              timeout=60, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **env})
        gone.mkdir(exist_ok=True)
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
        assert "is relative, and the current directory no longer exists" in done.stderr


@pytest.mark.parametrize("owner", ["self", "another user"])
def test_a_config_this_user_may_not_read_is_not_to_be_deleted(capsys, pgw_home, monkeypatch, owner):
    # The advice was to delete it and pair again, which spends a pair code on
    # a file that only needs its mode back, or its own user to run pgw.
    pgw.make_private_dirs(pgw_home)
    config = pgw_home / "config.json"
    config.write_text(json.dumps({"server": "http://h", "worker_id": "w", "token": "t"}))
    opened = pgw.open_regular_file

    def refused(path, *args, **kwargs):
        if os.fspath(path) == str(config):  # as mode 000 would for a user (root is never kept out)
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return opened(path, *args, **kwargs)

    monkeypatch.setattr(pgw, "open_regular_file", refused)
    if owner != "self":
        monkeypatch.setattr(pgw.os, "geteuid", lambda: os.stat(config).st_uid + 1)
    status, out, err = run(capsys, "config", "show")
    assert_one_line_error(err, f"cannot read {config}: Permission denied")
    assert "pair again" not in err and status == 1, err
    if owner == "self":
        assert f"chmod 600 {config}" in err, err
    else:
        name = pgw.user_name(os.stat(config).st_uid)
        assert f"it belongs to {name}: run pgw as {name}, or set PGW_HOME" in err, err


@pytest.mark.parametrize("given", ["", "relative/home"])
def test_the_default_home_is_absolute_whatever_home_says(capsys, tmp_path, monkeypatch, given):
    # HOME= (empty, as `env HOME=` leaves it) put the pgw home at /.pgworker;
    # a relative HOME gave a relative pgw home, named so wherever it was read.
    monkeypatch.delenv("PGW_HOME", raising=False)
    monkeypatch.setenv("HOME", given)
    monkeypatch.chdir(tmp_path)
    expected = tmp_path / given / ".pgworker" if given else Path(pwd.getpwuid(os.getuid()).pw_dir) / ".pgworker"
    assert pgw.pgw_home() == expected and expected.is_absolute()
    status, out, _ = run(capsys, "status")
    assert f"for {expected})" in out.splitlines()[0], out


@pytest.mark.parametrize("after", ["pair", "stream"])
def test_selftest_stopped_by_sigterm_leaves_nothing_behind(tmp_path, after):
    # Its temporary directory (a home, a config with a token, the stub CLIs)
    # stayed in /tmp after a SIGTERM, as a `timeout` or a cancelled CI job sends.
    process = subprocess.Popen([sys.executable, str(ROOT / "pgw.py"), "selftest"], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        for line in process.stdout:
            if line.startswith(f"PASS  {after} "):
                break
        process.send_signal(signal.SIGTERM)
        rest = process.stdout.read()
        assert process.wait(timeout=30) == 128 + signal.SIGTERM, rest
    finally:
        process.kill()
        process.wait()
    assert rest.splitlines()[-1] == "selftest: stopped by SIGTERM; nothing of it is left", rest
    assert list(tmp_path.iterdir()) == []
    left = [pid for pid in os.listdir("/proc") if pid.isdigit() and str(tmp_path).encode() in _cmdline(pid)]
    assert left == []


def _cmdline(pid: str) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read()
    except OSError:
        return b""


def test_selftest_works_where_programs_may_run_when_tmp_is_mounted_noexec(capsys, tmp_path, monkeypatch):
    # A /tmp mounted noexec (hardened hosts) failed the connect step with a raw
    # dict of capabilities, though pgw itself would run there.
    noexec, home = tmp_path / "tmp", tmp_path / "home"
    noexec.mkdir()
    home.mkdir()
    monkeypatch.setenv("TMPDIR", str(noexec))
    monkeypatch.setattr(pgw.tempfile, "tempdir", None)  # TMPDIR is read once, and kept
    monkeypatch.setenv("HOME", str(home))
    checked = pgw.programs_can_run_in
    monkeypatch.setattr(pgw, "programs_can_run_in", lambda d: d.parent != noexec and checked(d))
    status, out, _ = run(capsys, "selftest")
    assert status == 0, out
    assert out.splitlines()[0] == f"selftest: programs may not run in {noexec} (mounted noexec?): working in {home}"
    assert f"config.json mode 600 in {home}/pgw-selftest-" in out, out
    assert list(noexec.iterdir()) == list(home.iterdir()) == []
    monkeypatch.setattr(pgw, "programs_can_run_in", lambda d: False)
    status, out, _ = run(capsys, "selftest")
    assert status == 1
    assert out.splitlines()[0] == (f"FAIL  setup        the stub CLIs cannot run from {noexec} or {home} (mounted noexec?): "
                                   "set TMPDIR to a directory where programs may run"), out
    assert list(noexec.iterdir()) == list(home.iterdir()) == []


@pytest.fixture
def noexec_dir(tmp_path):
    """A directory on a file system mounted noexec: a tmpfs mounted for the
    test (root, where mounts are allowed), else one this host has."""
    mount = tmp_path / "noexec"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "noexec,size=8m", "tmpfs", str(mount)],
                          capture_output=True) if os.geteuid() == 0 else None
    if done is not None and done.returncode == 0:
        try:
            yield mount
        finally:
            subprocess.run(["umount", str(mount)], check=True)
        return
    mounts = Path("/proc/self/mounts").read_text().splitlines() if Path("/proc/self/mounts").exists() else []
    found = [fields[1] for fields in (line.split() for line in mounts)
             if len(fields) > 3 and "noexec" in fields[3].split(",") and os.access(fields[1], os.W_OK)
             and fields[1].startswith(("/dev/shm", "/run/user", "/tmp", "/var/tmp"))]
    if not found:
        pytest.skip("no noexec mount to write in here")
    with pgw.tempfile.TemporaryDirectory(dir=found[0]) as directory:
        yield Path(directory)


def test_selftest_with_tmpdir_mounted_noexec_passes_from_the_home(tmp_path, noexec_dir):
    assert pgw.programs_can_run_in(tmp_path) and not pgw.programs_can_run_in(noexec_dir)
    home = tmp_path / "home"
    home.mkdir()
    done = subprocess.run([sys.executable, str(ROOT / "pgw.py"), "selftest"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TMPDIR": str(noexec_dir), "HOME": str(home),
                               "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[0].endswith(f"(mounted noexec?): working in {home}"), done.stdout
    assert list(noexec_dir.iterdir()) == list(home.iterdir()) == []


@pytest.mark.parametrize("source", ["flag", "environment", "config"])
def test_a_bad_server_url_or_ca_file_names_where_it_was_set(capsys, pgw_home, monkeypatch, source):
    # "fix `cafile` or --cafile" for a PGW_CAFILE set in a crontab long ago,
    # and a bad URL with no word of PGW_SERVER, sent users to the wrong place.
    flags, config = [], {"worker_id": "w", "token": "t"}
    if source == "flag":
        flags, where = ["--cafile", "/nonexistent/ca.pem"], "--cafile"
    elif source == "environment":
        monkeypatch.setenv("PGW_CAFILE", "/nonexistent/ca.pem")
        where = "PGW_CAFILE"
    else:
        config["cafile"], where = "/nonexistent/ca.pem", "`cafile` in config.json"
    pgw.write_config(pgw_home / "config.json", {"server": "https://127.0.0.1:9", **config})
    status, _, err = run(capsys, "run", *flags)
    assert status == 1
    assert_one_line_error(err, f"CA file /nonexistent/ca.pem does not exist: fix {where}")
    if source == "flag":
        status, _, err = run(capsys, "run", "--server", "ftp://h")
        where = "--server"
    elif source == "environment":
        monkeypatch.setenv("PGW_SERVER", "ftp://h")
        status, _, err = run(capsys, "run")
        where = "PGW_SERVER"
    else:
        pgw.write_config(pgw_home / "config.json", {"server": "ftp://h", **config})
        status, _, err = run(capsys, "run")
        where = "`server` in config.json"
    assert_one_line_error(err, "bad server URL 'ftp://h'", f"(the server URL set by {where})")


@pytest.mark.parametrize("argv, message", [
    (["config", "show", "server"], "config show takes no KEY or VALUE; see `pgw config --help`"),
    (["config", "show", "a", "b"], "config show takes no KEY or VALUE; see `pgw config --help`"),
    (["config", "set", "server"], "config set needs a KEY and a VALUE; see `pgw config --help`"),
    (["config", "unset"], "config unset needs a KEY and no VALUE; see `pgw config --help`"),
    (["config", "unset", "name", "x"], "config unset needs a KEY and no VALUE; see `pgw config --help`"),
    (["status", "--bogus"], "unrecognized arguments: --bogus; see `pgw status --help`"),
    (["stop", "now"], "unrecognized arguments: now; see `pgw stop --help`"),
    (["logs", "a\nb"], "unrecognized arguments: 'a\\nb'; see `pgw logs --help`"),
    # A flag in the wrong place is told where it goes.
    (["-v", "run"], "-v goes after the command: `pgw run -v ...`"),
    (["status", "--home", "/tmp"], "--home goes before the command: `pgw --home ... status`"),
    # An empty value is an unset shell variable, not the default: `--name ""`
    # sent the name saved before, `pair ""` an empty code.
    (["run", "--name", ""], "--name is empty (an unset shell variable?): give a value, or leave it out; see `pgw run --help`"),
    (["run", "--token", ""], "--token is empty (an unset shell variable?): give a value, or leave it out; see `pgw run --help`"),
    (["pair", "1", "--server", ""], "--server is empty (an unset shell variable?): give a value, or leave it out; see `pgw pair --help`"),
    (["pair", " \t", "--server", "http://h"], "the pairing code is empty: give the one the server shows; see `pgw pair --help`"),
    (["config", "set", "server", "ftp://h"], "server: bad server URL 'ftp://h': expected http://HOST[:PORT] or https://HOST[:PORT]"),
])
def test_arguments_a_command_does_not_take_are_refused_naming_its_help(capsys, pgw_home, argv, message):
    # `config show a b` showed the config and `config unset` said "unknown
    # setting ''"; a stray flag sent to `pgw --help`, which lists no command's flags.
    status, out, err = run(capsys, *argv)
    assert (status, out) == (2, "")
    assert err == f"pgw: {message}\n"
    assert not pgw_home.exists()


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
def test_output_in_an_encoding_without_the_homes_characters_is_escaped_not_a_traceback(tmp_path, encoding):
    home = tmp_path / "hé-🚀"
    env = {**os.environ, "PYTHONIOENCODING": encoding, "PGW_HOME": str(home), "PYTHONPATH": os.pathsep.join(sys.path)}
    for command in (["status"], ["status", "--json"], ["logs"]):
        done = subprocess.run([sys.executable, str(ROOT / "pgw.py"), *command], capture_output=True, env=env, timeout=60)
        assert b"Traceback" not in done.stderr and done.returncode == 1, (command, done)
        if "--json" in command:
            assert json.loads(done.stdout)["home"] == str(home)
        else:
            assert b"\\U0001f680" in done.stdout + done.stderr, (command, done)


def test_a_pairing_code_is_sent_without_the_spaces_pasted_around_it(capsys, pgw_home, pair_server):
    status, _, err = run(capsys, "pair", "  123-456 \n", "--server", pair_server.url)
    assert status == 0, err
    assert pair_server.requests[-1]["pair_code"] == "123-456"


@pytest.mark.parametrize("url", ["http://h/ path", "http://h\t/x", " http://a b"])
def test_a_server_url_holding_a_space_is_refused_as_such(capsys, pgw_home, url):
    # It reached the network and came back as "did not answer in HTTP".
    status, _, err = run(capsys, "pair", "1", "--server", url)
    assert status == 1
    assert_one_line_error(err, "it holds a space or a control character")


@pytest.fixture
def full_dir(tmp_path):
    """A directory on a small tmpfs filled to the last byte (root, where mounts are allowed)."""
    mount = tmp_path / "full"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("no tmpfs can be mounted here")
    try:
        filler = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        with contextlib.suppress(OSError):
            while True:
                os.write(filler, b"x" * 4096)
        os.close(filler)
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_pair_on_a_full_disk_does_not_spend_the_code(capsys, full_dir, pair_server, monkeypatch):
    # The code went to the server, which spent it, and the pairing it sent
    # back could not be saved: the user needed a new code, and the server
    # kept a worker no machine would ever connect as.
    monkeypatch.setenv("PGW_HOME", str(full_dir / "home"))
    status, _, err = run(capsys, "pair", "1", "--server", pair_server.url)
    assert status == 1
    assert_one_line_error(err, f"cannot write to {full_dir}", "No space left on device", "the pairing code was not sent")
    assert pair_server.requests == []
    assert sorted(os.listdir(full_dir)) == ["filler"]


def test_pair_with_a_bad_ca_file_for_an_http_server_spends_no_code(capsys, pgw_home, pair_server):
    # Saved with the pairing, it stopped every `run` from starting.
    status, _, err = run(capsys, "pair", "1", "--server", pair_server.url, "--cafile", "/nonexistent/ca.pem")
    assert status == 1 and pair_server.requests == []
    assert_one_line_error(err, "CA file /nonexistent/ca.pem does not exist: fix --cafile")


@pytest.mark.parametrize("argv", [["status", "--token", "tok-S3CRET-1"], ["--token", "tok-S3CRET-1", "run"],
                                  ["status", "--token=tok-S3CRET-1"], ["pair", "--token", "tok-S3CRET-1", "C"]])
def test_a_token_given_where_it_does_not_go_is_not_quoted_back(capsys, pgw_home, argv):
    # The usage error quoted what it could not place: the token, on a screen
    # or in a script's captured output.
    status, out, err = run(capsys, *argv)
    assert status == 2 and "tok-S3CRET-1" not in out + err
    assert_one_line_error(err, "unrecognized arguments" if argv[0] == "pair" else "<token>")
