"""Servers behind their own CA: doctor's network checks and the worker's connection."""

from __future__ import annotations

import json
import logging
import shutil
import ssl
import subprocess
import urllib.parse
from contextlib import asynccontextmanager

import pytest
import trio
import trio_websocket

import pgw
from conftest import PairServer


def self_signed_certificate(directory, name="127.0.0.1", subject_alt_name="IP:127.0.0.1"):
    """A self-signed certificate for `name`: (cert.pem, key.pem); the cert is its own CA."""
    if shutil.which("openssl") is None:
        pytest.fail("these tests need the openssl command")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "2", "-subj", f"/CN={name}", "-addext", f"subjectAltName={subject_alt_name}"],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


@pytest.fixture
def certificate(tmp_path):
    """A self-signed certificate for 127.0.0.1: (cert.pem, key.pem)."""
    return self_signed_certificate(tmp_path)


@asynccontextmanager
async def tls_backend(certificate, token="tok-tls"):
    """A WebSocket server with that certificate; accepts `token`, rejects others with 403."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    accepted = []

    async def handler(request):
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(request.path).query)
        if query.get("token") != [token]:
            await request.reject(403, body=b'{"detail": "bad token"}')
            return
        ws = await request.accept()
        accepted.append(ws)
        try:
            while True:
                await ws.get_message()
        except trio_websocket.ConnectionClosed:
            pass

    async with trio.open_nursery() as nursery:
        server = await nursery.start(trio_websocket.serve_websocket, handler, "127.0.0.1", 0, context)
        yield f"https://127.0.0.1:{server.port}", accepted
        nursery.cancel_scope.cancel()


def by_name(checks):
    return {check.name: check for check in checks}


async def test_doctor_fails_an_untrusted_certificate_and_names_the_fix(certificate):
    with trio.fail_after(10):
        async with tls_backend(certificate) as (url, _):
            checks = by_name(await pgw.network_checks(pgw.Settings(url, "tok-tls", "w", "n")))
    assert checks["tcp"].status == "PASS"
    assert checks["tls"].status == "FAIL"
    assert "not trusted" in checks["tls"].detail and "pgw config set cafile" in checks["tls"].detail
    assert checks["websocket"].status == "SKIP"  # not tried after the TLS failure


async def test_doctor_passes_with_the_ca_file_and_the_right_token(certificate):
    with trio.fail_after(10):
        async with tls_backend(certificate) as (url, accepted):
            settings = pgw.Settings(url, "tok-tls", "w", "n", cafile=str(certificate[0]))
            checks = by_name(await pgw.network_checks(settings))
            assert len(accepted) == 1
    assert [checks[name].status for name in ("dns", "tcp", "tls", "websocket")] == ["PASS"] * 4
    assert checks["proxy"].status == "SKIP"  # none set: connected directly
    assert checks["websocket"].detail == "the server accepted the token; uncompressed: the server declined permessage-deflate"


async def test_doctor_fails_a_rejected_token(certificate):
    with trio.fail_after(10):
        async with tls_backend(certificate) as (url, _):
            settings = pgw.Settings(url, "wrong", "w", "n", cafile=str(certificate[0]))
            checks = by_name(await pgw.network_checks(settings))
    assert checks["websocket"].status == "FAIL"
    assert "rejected the token (HTTP 403)" in checks["websocket"].detail and "pgw pair" in checks["websocket"].detail
    assert "wrong" not in checks["websocket"].detail


async def test_doctor_fails_a_server_that_is_down():
    with trio.fail_after(10):
        async with _closed_port() as url:
            checks = by_name(await pgw.network_checks(pgw.Settings(url, "t", "w", "n")))
    assert checks["tcp"].status == "FAIL" and "refused" in checks["tcp"].detail


@asynccontextmanager
async def _closed_port():
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    yield f"http://127.0.0.1:{port}"


async def test_worker_connects_through_an_internal_ca(certificate, tmp_path):
    with trio.fail_after(10):
        async with tls_backend(certificate) as (url, accepted):
            settings = pgw.Settings(server=url, token="tok-tls", name="n", cafile=str(certificate[0]))
            worker = pgw.Daemon(settings, tmp_path / "h")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(worker.run)
                while not accepted:
                    await trio.sleep(0.05)
                nursery.cancel_scope.cancel()


async def test_untrusted_certificate_is_logged_in_plain_words_at_once(certificate, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pgw")
    with trio.fail_after(10):
        async with tls_backend(certificate) as (url, _):
            worker = pgw.Daemon(pgw.Settings(server=url, token="tok-tls", name="n"), tmp_path / "h")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(worker.run)
                started = trio.current_time()
                while "cannot connect" not in caplog.text:
                    await trio.sleep(0.05)
                assert trio.current_time() - started < 3
                nursery.cancel_scope.cancel()
    assert "TLS certificate is not trusted" in caplog.text and "tok-tls" not in caplog.text


def test_doctor_command_json_against_the_tls_server_with_cafile(certificate, tmp_path, monkeypatch, capsys):
    """The whole command, with the server in a thread of its own."""
    import threading

    home = tmp_path / "home"
    monkeypatch.setenv("PGW_HOME", str(home))
    monkeypatch.setenv("PATH", str(tmp_path))  # no CLI anywhere
    ready, result = threading.Event(), {}

    async def serve():
        result["token"] = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as result["scope"]:
            async with tls_backend(certificate) as (url, _):
                result["url"] = url
                ready.set()
                await trio.sleep_forever()

    thread = threading.Thread(target=lambda: trio.run(serve))
    thread.start()
    try:
        assert ready.wait(10)
        pgw.write_config(home / "config.json", {"server": result["url"], "worker_id": "w", "token": "tok-tls", "cafile": str(certificate[0])})
        status = pgw.main(["doctor", "--json"])
    finally:
        trio.from_thread.run_sync(result["scope"].cancel, trio_token=result["token"])
        thread.join(10)
    report = json.loads(capsys.readouterr().out)
    checks = {check["name"]: check["status"] for check in report["checks"]}
    assert (checks["tls"], checks["websocket"]) == ("PASS", "PASS")
    assert status == 1 and checks["clis"] == "FAIL"  # no CLI on this PATH: still a FAIL


async def test_ssl_cert_file_is_honoured_when_no_cafile_is_set(certificate, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))
    with trio.fail_after(10):
        async with tls_backend(certificate) as (url, _):
            checks = by_name(await pgw.network_checks(pgw.Settings(url, "tok-tls", "w", "n")))
    assert checks["tls"].status == "PASS" and checks["websocket"].status == "PASS"


def test_pair_saves_the_ca_file_it_reached_the_server_with(certificate, tmp_path, monkeypatch, capsys):
    # Unsaved, pair succeeded and every `run` after it met an untrusted
    # certificate, for ever; --name was saved, --cafile not.
    server = PairServer(certificate)
    home = tmp_path / "home"
    monkeypatch.setenv("PGW_HOME", str(home))
    monkeypatch.chdir(certificate[0].parent)
    try:
        assert pgw.main(["pair", "1", "--server", server.url, "--cafile", certificate[0].name]) == 0, capsys.readouterr()
    finally:
        server.close()
    config = json.loads((home / "config.json").read_text())
    assert config["cafile"] == str(certificate[0].resolve())
