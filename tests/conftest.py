"""Shared fixtures: a scripted pairing server, an isolated pgw home, stub CLIs."""

from __future__ import annotations

import http.server
import json
import os
import ssl
import stat
import sys
import threading
from pathlib import Path
from typing import Optional

import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Hypothesis fails an example that takes over 200 ms by default: a timed
# assertion, which a busy shared machine fails at random.  Speed is the
# bench's to measure.
settings.register_profile("pgw", deadline=None)
settings.load_profile("pgw")


class PairServer:
    """A real HTTP server on 127.0.0.1:0 answering pair-confirm as scripted.

    `requests` holds the decoded JSON bodies received (path in `paths`);
    `reply(status, body, headers)` queues the next answer (headers: extra
    ones, such as a redirect's Location); with nothing queued it answers 200
    `{"worker_id": "w-1", "token": "tok-secret"}`.
    """

    DEFAULT = (200, json.dumps({"worker_id": "w-1", "token": "tok-secret"}).encode())

    def __init__(self, certificate: Optional[tuple[Path, Path]] = None) -> None:
        self.requests: list[object] = []
        self.paths: list[str] = []
        self._replies: list[tuple[int, bytes, dict[str, str]]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                server.paths.append(self.path)
                try:
                    server.requests.append(json.loads(raw))
                except ValueError:
                    server.requests.append(raw)
                status, body, headers = server._replies.pop(0) if server._replies else (*server.DEFAULT, {})
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        scheme = "http"
        if certificate is not None:  # https, with this (cert.pem, key.pem)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*certificate)
            self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def reply(self, status: int, body: bytes, headers: Optional[dict[str, str]] = None) -> None:
        self._replies.append((status, body, headers or {}))

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `takes_s(N)` first, longest first; the rest keep their order.

    `./build.sh test` hands the tests out to its workers one at a time in this order
    (`--dist loadgroup`, no groups): a test of minutes must start at once, or the whole
    run waits for it at the end. Every worker collects, so the order must not depend on
    anything but the tests (sort is stable)."""
    def seconds(item: pytest.Item) -> float:
        marker = item.get_closest_marker("takes_s")
        return marker.args[0] if marker else 0

    items.sort(key=seconds, reverse=True)


PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture(autouse=True)
def no_proxy_from_the_host(monkeypatch):
    """A proxy set on the machine running the tests (a CI runner's, say) must not
    route the tests' loopback servers; the proxy tests set their own."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
def pair_server():
    server = PairServer()
    yield server
    server.close()


@pytest.fixture
def pgw_home(tmp_path, monkeypatch):
    """An empty pgw home, with no pgw settings leaking in from the environment."""
    home = tmp_path / "pgw-home"
    monkeypatch.setenv("PGW_HOME", str(home))
    for name in ("PGW_SERVER", "PGW_TOKEN", "PGW_NAME"):
        monkeypatch.delenv(name, raising=False)
    return home


def write_stub_cli(directory: Path, name: str, script: str) -> Path:
    """An executable Python script called `name` in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(f"#!{sys.executable}\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def stub_bin(tmp_path, monkeypatch):
    """A PATH holding only a fresh directory for stub CLIs (plus /usr/bin:/bin)."""
    directory = tmp_path / "bin"
    directory.mkdir()
    monkeypatch.setenv("PATH", os.pathsep.join([str(directory), "/usr/bin", "/bin"]))
    return directory
