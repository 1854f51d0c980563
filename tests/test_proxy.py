"""HTTP proxies: which one pgw uses (as urllib and curl choose), the CONNECT
tunnel, and `run`, `doctor`, `pair` and `selftest` on a host behind a proxy.

The proxy here is a small CONNECT-only HTTP proxy written for these tests. It
resolves names from a table of its own: the backend is `backend.invalid`, a
name no DNS resolves (RFC 6761), so a worker that does not go through the
proxy, or that resolves the name itself, cannot reach the backend at all.
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import logging
import os
import urllib.parse
import urllib.request
from contextlib import asynccontextmanager

import attrs
import pytest
import trio
import trio.testing

import pgw
import test_run
from backend import open_backend
from conftest import write_stub_cli
from test_cli import assert_one_line_error, free_port, run
from test_run import request, running_worker
from test_tls import by_name, self_signed_certificate, tls_backend

BACKEND_NAME = "backend.invalid"
# A password with every character a URL must escape; it must never be shown.
USER, PASSWORD = "ada lovelace", "s3cr3t:p@ss/wörd"
PROXY_USERINFO = f"{urllib.parse.quote(USER, safe='')}:{urllib.parse.quote(PASSWORD, safe='')}"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
# Every form of the secret a careless message could show.
SECRETS = (PASSWORD, urllib.parse.quote(PASSWORD, safe=""), BASIC.split()[1])
FAST_RETRIES = pgw.Timing(reconnect_first_s=0.05, reconnect_cap_s=0.1)


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text


##############################################################################
# A CONNECT proxy
##############################################################################

environ = test_run.environ  # the worker's environment (a fixture): stub CLIs on PATH, no proxy


class ConnectProxy:
    """A CONNECT-only HTTP proxy on 127.0.0.1, port 0.

    It resolves `backend.invalid` and IP addresses (as themselves) only;
    anything else gets 502. With `credentials` (user, password) it answers
    407 to a CONNECT without them; with `answer` it answers every CONNECT
    with that status. `accepted` counts TCP connections; `requests` holds each
    CONNECT's target and headers (names in lower case).
    """

    def __init__(self, credentials: tuple[str, str] | None = None, answer: int | None = None) -> None:
        self.credentials, self.answer = credentials, answer
        self.port = 0
        self.accepted = 0
        self.requests: list[tuple[str, dict[str, str]]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url_with_credentials(self, user: str = USER, password: str = PASSWORD) -> str:
        return f"http://{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}@127.0.0.1:{self.port}"

    @property
    def targets(self) -> list[str]:
        return [target for target, _ in self.requests]

    def _refusal(self, target: str, headers: dict[str, str]) -> int | None:
        if self.answer is not None:
            return self.answer
        if self.credentials is not None:
            expected = "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode()
            if headers.get("proxy-authorization") != expected:
                return 407
        return None

    async def serve(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        async with client:
            head = b""
            while b"\r\n\r\n" not in head:
                data = await client.receive_some(4096)
                if not data:
                    return
                head += data
            request_line, *lines = head.split(b"\r\n\r\n")[0].decode("utf-8").split("\r\n")
            _, target, _ = request_line.split(" ")
            headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
            self.requests.append((target, headers))
            status = self._refusal(target, headers)
            host, _, port = target.rpartition(":")
            address = "127.0.0.1" if host == BACKEND_NAME else host.strip("[]")
            upstream = None
            if status is None:
                try:
                    upstream = await trio.open_tcp_stream(address, int(port))
                except OSError:
                    status = 502
            if upstream is None:
                challenge = 'Proxy-Authenticate: Basic realm="test"\r\n' if status == 407 else ""
                await client.send_all(f"HTTP/1.1 {status} Nope\r\n{challenge}Content-Length: 0\r\n\r\n".encode())
                return
            async with upstream:
                await client.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await relay(client, upstream)


async def relay(one: trio.abc.Stream, other: trio.abc.Stream) -> None:
    """Copy both ways until either side ends."""
    async with trio.open_nursery() as nursery:

        async def pipe(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
            try:
                while data := await source.receive_some(65536):
                    await sink.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            nursery.cancel_scope.cancel()

        nursery.start_soon(pipe, one, other)
        nursery.start_soon(pipe, other, one)


@asynccontextmanager
async def open_connect_proxy(**options):
    proxy = ConnectProxy(**options)
    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(functools.partial(trio.serve_tcp, proxy.serve, 0, host="127.0.0.1"))
        proxy.port = listener.socket.getsockname()[1]
        yield proxy
        nursery.cancel_scope.cancel()


async def say_hello(backend, home, environ, server, **settings) -> None:
    """Run a worker until the backend has its hello, then stop it."""
    async with running_worker(backend, home, environ, server=server, **settings):
        connection = await backend.next_connection()
        await connection.receive("hello")


def backend_url(backend) -> str:
    return f"http://{BACKEND_NAME}:{backend.port}"


##############################################################################
# Choosing the proxy: pure, as urllib and curl choose
##############################################################################

@pytest.mark.parametrize(
    "server, environment, chosen",
    [
        ("https://pg.example", {}, None),
        ("https://pg.example", {"https_proxy": "http://p:3128"}, "http://p:3128"),
        ("http://pg.example", {"https_proxy": "http://p:3128"}, None),
        ("http://pg.example", {"HTTP_PROXY": "http://p:8080"}, "http://p:8080"),
        ("https://pg.example", {"http_proxy": "http://p:8080"}, None),
        ("https://pg.example", {"ALL_PROXY": "http://all:1"}, "http://all:1"),
        ("https://pg.example", {"all_proxy": "http://all:1", "HTTPS_PROXY": "http://p:2"}, "http://p:2"),
        ("https://pg.example", {"https_proxy": "http://lower:1", "HTTPS_PROXY": "http://upper:2"}, "http://lower:1"),
        # An empty lower-case variable turns the upper-case one off, as in urllib.
        ("https://pg.example", {"https_proxy": "", "HTTPS_PROXY": "http://upper:2"}, None),
        ("https://pg.example", {"https_proxy": "p.corp:3128"}, "http://p.corp:3128"),  # no scheme: http
        ("https://pg.example", {"https_proxy": "http://p"}, "http://p:80"),
        ("https://pg.example", {"https_proxy": "http://[::1]:3128"}, "http://[::1]:3128"),
        # no_proxy: `*`, host, domain suffix with or without its dot, host:port, IP address.
        ("https://pg.example", {"https_proxy": "http://p:1", "no_proxy": "*"}, None),
        ("https://pg.example", {"https_proxy": "http://p:1", "no_proxy": "other.org, pg.example"}, None),
        ("https://pg.example", {"https_proxy": "http://p:1", "NO_PROXY": "PG.Example"}, None),
        ("https://a.b.example", {"https_proxy": "http://p:1", "no_proxy": ".example"}, None),
        ("https://a.b.example", {"https_proxy": "http://p:1", "no_proxy": "example"}, None),
        ("https://notexample", {"https_proxy": "http://p:1", "no_proxy": "example"}, "http://p:1"),
        ("https://pg.example", {"https_proxy": "http://p:1", "no_proxy": "pg.example:443"}, None),
        ("https://pg.example", {"https_proxy": "http://p:1", "no_proxy": "pg.example:8443"}, "http://p:1"),
        ("https://pg.example:8443", {"https_proxy": "http://p:1", "no_proxy": "pg.example:8443"}, None),
        ("http://10.1.2.3:8000", {"http_proxy": "http://p:1", "no_proxy": "10.1.2.3"}, None),
        ("http://10.1.2.30:8000", {"http_proxy": "http://p:1", "no_proxy": "10.1.2.3"}, "http://p:1"),
        ("http://[::1]:8000", {"http_proxy": "http://p:1", "no_proxy": "::1"}, None),
        # The lower-case no_proxy wins too, even when empty.
        ("https://pg.example", {"https_proxy": "http://p:1", "no_proxy": "", "NO_PROXY": "*"}, "http://p:1"),
    ],
)
def test_the_environment_chooses_the_proxy_as_urllib_and_curl_do(server, environment, chosen):
    proxy = pgw.choose_proxy(server, None, environment)
    assert (proxy.url if proxy else None) == chosen


def test_the_config_setting_wins_over_the_environment_and_no_proxy():
    environment = {"https_proxy": "http://env:1", "no_proxy": "*"}
    assert pgw.choose_proxy("https://pg.example", "none", environment) is None
    proxy = pgw.choose_proxy("https://pg.example", "http://config:3128", environment)
    assert (proxy.url, proxy.source) == ("http://config:3128", "the config's `proxy`")


@pytest.mark.parametrize(
    "environment",
    [
        {},
        {"https_proxy": "http://a:1", "HTTPS_PROXY": "http://b:2", "http_proxy": "", "HTTP_PROXY": "http://c:3"},
        {"HTTP_PROXY": "http://c:3", "REQUEST_METHOD": "GET"},  # CGI: HTTP_PROXY may be a client's header
        {"http_proxy": "http://c:3", "REQUEST_METHOD": "GET", "No_Proxy": "x", "no_proxy": "y", "ALL_PROXY": "z"},
    ],
)
def test_proxy_variables_are_read_exactly_as_urllib_reads_them(environment, monkeypatch):
    for name in list(os.environ):
        if name.lower().endswith("_proxy") or name == "REQUEST_METHOD":
            monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert pgw.environment_proxies(os.environ) == urllib.request.getproxies_environment()


def test_credentials_are_percent_decoded_and_kept_out_of_every_repr():
    proxy = pgw.parse_proxy_url(f"http://{PROXY_USERINFO}@proxy.corp:3128", "test")
    assert proxy.authorization == BASIC and proxy.url == "http://proxy.corp:3128"
    settings = pgw.Settings("https://pg.example", "tok", proxy=f"http://{PROXY_USERINFO}@proxy.corp:3128")
    assert_no_secret(repr(proxy) + repr(settings))
    assert pgw.parse_proxy_url("http://ada@p:1", "test").authorization == "Basic " + base64.b64encode(b"ada:").decode()


@pytest.mark.parametrize(
    "url, fragment",
    [
        ("https://p.corp:3128", "the proxy is https://, but pgw talks to proxies in plain HTTP only"),
        ("socks5h://p.corp:1080", "the proxy is socks5h://"),
        (f"http://{PROXY_USERINFO}@p.corp:port", "the proxy's port is not a number"),
        (f"http://{PROXY_USERINFO}@:3128", "the proxy URL names no host"),
        (f"http://{PROXY_USERINFO}@p.corp:3128/path", "a proxy URL has no path"),
    ],
)
def test_a_proxy_url_pgw_cannot_use_is_refused_without_quoting_it(url, fragment):
    with pytest.raises(pgw.ConfigError) as caught:
        pgw.choose_proxy("https://pg.example", None, {"HTTPS_PROXY": url})
    message = str(caught.value)
    assert message.startswith("https_proxy in the environment: ") and fragment in message
    assert "expected http://[USER:PASSWORD@]HOST:PORT" in message and "\n" not in message
    assert_no_secret(message)


##############################################################################
# The `proxy` setting: config set, show and the config file
##############################################################################

@pytest.mark.parametrize(
    "setting, shown",
    [
        (f"http://{PROXY_USERINFO}@p.corp:3128", f"http://{urllib.parse.quote(USER, safe='')}:<hidden>@p.corp:3128"),
        ("ada:p@ss:w0rd@p.corp:3128", "http://ada:<hidden>@p.corp:3128"),  # written by hand, without a scheme
        ("http://ada@p.corp:3128", "http://ada@p.corp:3128"),
        ("none", "none"),
    ],
)
def test_config_show_hides_the_proxy_password_however_it_is_written(setting, shown):
    assert pgw.without_password(setting) == shown


def test_config_set_proxy_none_url_and_unset(capsys, pgw_home):
    path = pgw_home / "config.json"
    assert run(capsys, "config", "set", "proxy", "NONE")[0] == 0
    assert json.loads(path.read_text()) == {"proxy": "none"}
    assert run(capsys, "config", "set", "proxy", "proxy.corp:3128")[0] == 0
    assert json.loads(path.read_text()) == {"proxy": "http://proxy.corp:3128"}
    assert pgw.resolve_settings({}, {}, json.loads(path.read_text()), "h").proxy == "http://proxy.corp:3128"
    assert run(capsys, "config", "unset", "proxy")[0] == 0
    assert json.loads(path.read_text()) == {}


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("https://p.corp:3128", "proxy: the proxy is https://, but pgw talks to proxies in plain HTTP only"),
        (f"http://{PROXY_USERINFO}@p.corp:x", "the proxy's port is not a number"),
        ("", "the proxy URL names no host"),
    ],
)
def test_config_set_proxy_refuses_a_bad_url_in_one_line(capsys, pgw_home, value, fragment):
    status, _, err = run(capsys, "config", "set", "proxy", value)
    assert status == 2
    assert_one_line_error(err, fragment, "(or `none` to connect directly)")
    assert_no_secret(err)
    assert not (pgw_home / "config.json").exists()


@pytest.mark.parametrize(
    "config, fragment",
    [({"proxy": 3128}, "'proxy' must be a string"), ({"proxy": f"ftp://{PROXY_USERINFO}@p:1"}, "'proxy': the proxy is ftp://")],
)
def test_a_bad_proxy_in_the_config_file_is_a_one_line_error(capsys, pgw_home, config, fragment):
    pgw.write_config(pgw_home / "config.json", config)  # no token: even a pgw that took it would not start
    status, _, err = run(capsys, "run")
    assert status == 1
    assert_one_line_error(err, fragment)
    assert_no_secret(err)


##############################################################################
# The tunnel, against a scripted proxy on a memory stream
##############################################################################

def scripted_proxy(authorization: str | None = None) -> pgw.Proxy:
    """The proxy on the other end of a memory stream."""
    return pgw.Proxy("proxy.test", 3128, "test", authorization)


def test_connect_request_names_the_target_and_carries_the_credentials():
    assert pgw.connect_request(scripted_proxy(BASIC), "backend.invalid:443") == (
        f"CONNECT backend.invalid:443 HTTP/1.1\r\nHost: backend.invalid:443\r\nUser-Agent: pgw/{pgw.__version__}\r\n"
        f"Proxy-Authorization: {BASIC}\r\n\r\n"
    ).encode()
    assert b"Proxy-Authorization" not in pgw.connect_request(scripted_proxy(), "h:1")
    assert pgw.tunnel_target("::1", 8000) == "[::1]:8000"
    assert pgw.tunnel_target("bücher.example", 443) == "xn--bcher-kva.example:443"


@pytest.mark.parametrize(
    "head, authorization, fragments",
    [
        (b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic", None,
         ["refused the tunnel to h:1: HTTP 407 Proxy Authentication Required", "give the proxy as http://USER:PASSWORD@HOST:PORT"]),
        (b"HTTP/1.1 407 x", BASIC, ["HTTP 407", "did not accept the user and password"]),
        (b"HTTP/1.0 403 Forbidden", None, ["HTTP 403 Forbidden", "does not allow tunnels to h:1"]),
        (b"HTTP/1.1 502 Bad Gateway", None, ["HTTP 502 Bad Gateway", "it could not reach h:1"]),
        (b"HTTP/1.1 599 \x1b[31mforged\nline", None, ["HTTP 599"]),
        (b"SSH-2.0-OpenSSH_9.6", None, ["does not answer in HTTP: is it an HTTP proxy?"]),
        (b"HTTP/1.1 20 OK", None, ["does not answer in HTTP"]),
        (b"HTTP/1.1 2000 OK", None, ["does not answer in HTTP"]),
    ],
)
def test_a_refusal_names_the_proxy_and_the_status_and_nothing_the_proxy_wrote(head, authorization, fragments):
    with pytest.raises(pgw.ProxyError) as caught:
        pgw.check_proxy_reply(head, scripted_proxy(authorization), "h:1")
    message = str(caught.value)
    assert "http://proxy.test:3128" in message and all(fragment in message for fragment in fragments)
    assert "forged" not in message and "\n" not in message and "Nope" not in message


@pytest.mark.parametrize("head", [b"HTTP/1.1 200 Connection established", b"HTTP/1.0 200", b"HTTP/1.1 204 OK\r\nVia: x"])
def test_a_2xx_opens_the_tunnel(head):
    pgw.check_proxy_reply(head, scripted_proxy(), "h:1")


async def tunnel_through(answer, deadline_s: float = 10.0):
    """request_tunnel against `answer(proxy_side)`; (tunnel or ProxyError, proxy_side)."""
    client, proxy_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer, proxy_side)
        try:
            outcome = await pgw.request_tunnel(client, scripted_proxy(), BACKEND_NAME, 443, trio.current_time() + deadline_s)
        except pgw.ProxyError as exc:
            outcome = exc
        nursery.cancel_scope.cancel()
    return outcome, proxy_side


async def test_bytes_after_the_reply_are_the_first_bytes_of_the_tunnel():
    async def answer(proxy_side):
        await proxy_side.receive_some()
        await proxy_side.send_all(b"HTTP/1.1 200 Connection established\r\nVia: 1.1 test\r\n\r\n\x16\x03early")

    with trio.fail_after(5):
        tunnel, proxy_side = await tunnel_through(answer)
        assert await tunnel.receive_some(3) == b"\x16\x03e"
        assert await tunnel.receive_some() == b"arly"
        await proxy_side.send_all(b"later")
        assert await tunnel.receive_some() == b"later"
        await tunnel.send_all(b"up")
        assert await proxy_side.receive_some() == b"up"


# Replies a proxy may give that open the tunnel all the same: interim (1xx)
# responses first, which a client reads past (RFC 9110 15.2), and lines ended
# by a bare LF (RFC 9112 2.2); pgw took the first for a refusal and waited
# out its deadline for the second.
OPENING_REPLIES = {
    "100-then-200": [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 Connection established\r\n\r\n\x16early"],
    "103-and-200-apart": [b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n\x16early"],
    "bare-lf": [b"HTTP/1.1 200 Connection established\nVia: 1.1 lf\n\n\x16early"],
}


@pytest.mark.parametrize("reply", OPENING_REPLIES)
async def test_interim_replies_and_bare_lf_lines_still_open_the_tunnel(reply):
    async def answer(proxy_side):
        await proxy_side.receive_some()
        for data in OPENING_REPLIES[reply]:
            await proxy_side.send_all(data)
            await trio.sleep(0.01)

    with trio.fail_after(5):
        tunnel, _ = await tunnel_through(answer)
        assert not isinstance(tunnel, pgw.ProxyError), tunnel
        assert await tunnel.receive_some() == b"\x16early"


async def test_a_proxy_sending_endless_headers_is_cut_off_at_the_limit():
    sent = 0

    async def answer(proxy_side):
        nonlocal sent
        await proxy_side.send_all(b"HTTP/1.1 200 OK\r\n")
        while True:
            await proxy_side.send_all(b"X-Padding: " + b"a" * 1000 + b"\r\n")
            sent += 1012

    with trio.fail_after(5):
        failure, _ = await tunnel_through(answer)
    assert isinstance(failure, pgw.ProxyError) and "sent over 64 KiB without ending its reply" in str(failure)
    assert sent < 4 * pgw.PROXY_REPLY_MAX_BYTES


async def test_a_proxy_that_is_not_http_fails_at_once():
    async def answer(proxy_side):
        await proxy_side.send_all(b"SSH-2.0-OpenSSH_9.6\r\n")
        await trio.sleep_forever()

    with trio.fail_after(1):  # well before the 10 s deadline
        failure, _ = await tunnel_through(answer)
    assert "the proxy http://proxy.test:3128 does not answer in HTTP" in str(failure)


async def test_a_silent_proxy_fails_at_the_deadline(autojump_clock):
    async def answer(proxy_side):
        await trio.sleep_forever()

    started = trio.current_time()
    failure, _ = await tunnel_through(answer, deadline_s=15)
    assert str(failure) == "the proxy http://proxy.test:3128 did not answer CONNECT in time"
    assert trio.current_time() - started == pytest.approx(15)


async def test_a_proxy_that_hangs_up_is_named():
    async def answer(proxy_side):
        await proxy_side.send_all(b"HTTP/1.1 200")
        await proxy_side.aclose()

    with trio.fail_after(5):
        failure, _ = await tunnel_through(answer)
    assert "the proxy http://proxy.test:3128 closed the connection without answering CONNECT" in str(failure)


##############################################################################
# `pgw run` behind a proxy
##############################################################################

async def test_stage_runs_through_the_proxy_to_a_name_only_it_resolves(tmp_path, environ, stub_bin, caplog):
    caplog.set_level(logging.INFO, logger="pgw")
    write_stub_cli(stub_bin, "claude", "import sys; print('echo: ' + sys.stdin.read())")
    with trio.fail_after(10):
        async with open_backend() as backend, open_connect_proxy() as proxy:
            env = {**environ, "http_proxy": proxy.url}
            async with running_worker(backend, tmp_path / "home", env, server=backend_url(backend)):
                connection = await backend.next_connection()
                await connection.receive("hello")
                await connection.send(request("s1", stdin="héllo ✓"))
                result = await connection.stage_result("s1")
    assert result.returncode == 0 and result.stdout == "echo: héllo ✓\n"
    [(target, headers)] = proxy.requests
    assert target == headers["host"] == f"{BACKEND_NAME}:{backend.port}"
    assert "proxy-authorization" not in headers
    assert f"through the proxy {proxy.url}" in caplog.text


@pytest.mark.parametrize("where", ["environment", "config"])
async def test_credentials_in_the_proxy_url_reach_the_proxy_as_basic_auth(tmp_path, environ, caplog, where):
    caplog.set_level(logging.DEBUG, logger="pgw")
    with trio.fail_after(10):
        async with open_backend() as backend, open_connect_proxy(credentials=(USER, PASSWORD)) as proxy:
            if where == "environment":
                env, setting = {**environ, "HTTP_PROXY": proxy.url_with_credentials()}, {}
            else:
                env, setting = environ, {"proxy": proxy.url_with_credentials()}
            await say_hello(backend, tmp_path / "home", env, backend_url(backend), **setting)
    [(_, headers)] = proxy.requests
    assert headers["proxy-authorization"] == BASIC
    assert_no_secret(caplog.text)


async def test_no_proxy_sends_the_hosts_it_names_around_the_proxy(tmp_path, environ):
    with trio.fail_after(10):
        async with open_backend() as backend, open_connect_proxy() as proxy:
            env = {**environ, "HTTP_PROXY": proxy.url, "NO_PROXY": "example.org, 127.0.0.1"}
            await say_hello(backend, tmp_path / "home", env, backend_url(backend))  # not named: through the proxy
            assert proxy.accepted == 1
            await say_hello(backend, tmp_path / "home", env, backend.url)  # 127.0.0.1: around it
    assert proxy.accepted == 1


async def test_the_config_proxy_wins_over_the_environment_and_none_turns_proxies_off(tmp_path, environ):
    nowhere = f"http://127.0.0.1:{free_port()}"
    with trio.fail_after(10):
        async with open_backend() as backend, open_connect_proxy() as proxy:
            env = {**environ, "http_proxy": nowhere}
            await say_hello(backend, tmp_path / "home", env, backend_url(backend), proxy=proxy.url)
            assert proxy.accepted == 1
            env = {**environ, "http_proxy": proxy.url}
            await say_hello(backend, tmp_path / "home", env, backend.url, proxy="none")
    assert proxy.accepted == 1


async def test_a_proxy_answering_407_is_logged_once_without_the_password_and_retried(
    tmp_path, environ, caplog, capsys, monkeypatch
):
    caplog.set_level(logging.DEBUG, logger="pgw")
    home = tmp_path / "home"
    with trio.fail_after(10):
        async with open_backend() as backend, open_connect_proxy(credentials=(USER, "the right one")) as proxy:
            env = {**environ, "http_proxy": proxy.url_with_credentials()}
            async with running_worker(backend, home, env, server=backend_url(backend), timing=FAST_RETRIES):
                while proxy.accepted < 4:
                    await trio.sleep(0.01)
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"the proxy {proxy.url} refused the tunnel" in warnings[0] and "HTTP 407" in warnings[0]
    assert "did not accept the user and password" in warnings[0]
    assert_no_secret(caplog.text)
    state = (home / "state.json").read_text()
    assert "HTTP 407" in state
    assert_no_secret(state)
    monkeypatch.setenv("PGW_HOME", str(home))
    for argv in (["status"], ["status", "--json"]):
        _, out, _ = run(capsys, *argv)
        assert "HTTP 407" in out
        assert_no_secret(out)


async def test_an_unreachable_proxy_is_named_in_one_log_line_and_retried(tmp_path, environ, caplog):
    caplog.set_level(logging.DEBUG, logger="pgw")
    port = free_port()
    with trio.fail_after(10):
        async with open_backend() as backend:
            env = {**environ, "http_proxy": f"http://{PROXY_USERINFO}@127.0.0.1:{port}"}
            async with running_worker(backend, tmp_path / "home", env, server=backend_url(backend), timing=FAST_RETRIES):
                while caplog.text.count("cannot connect") < 3:
                    await trio.sleep(0.01)
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert f"cannot reach the proxy http://127.0.0.1:{port}: Connection refused" in warnings[0]
    assert_no_secret(caplog.text)


async def test_a_proxy_fixed_in_the_config_is_used_without_a_restart(tmp_path, environ, caplog):
    caplog.set_level(logging.INFO, logger="pgw")
    with trio.fail_after(10):
        async with open_backend() as backend, open_connect_proxy() as proxy:
            config = {"proxy": f"http://127.0.0.1:{free_port()}"}
            settings = pgw.Settings(server=backend_url(backend), token=backend.token, name="n", proxy=config["proxy"])
            worker = pgw.Daemon(
                settings, tmp_path / "home", environ=environ, timing=FAST_RETRIES,
                reread=lambda: attrs.evolve(settings, proxy=config["proxy"]),
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(worker.run)
                while "cannot reach the proxy" not in caplog.text:
                    await trio.sleep(0.01)
                config["proxy"] = proxy.url  # `pgw config set proxy URL` while it runs
                await (await backend.next_connection()).receive("hello")
                worker.hurry_shutdown()
    assert "the config's proxy setting changed" in caplog.text


def test_run_refuses_to_start_with_an_environment_proxy_it_cannot_use(pgw_home, monkeypatch):
    pgw.write_config(pgw_home / "config.json", {"server": "https://pg.example", "worker_id": "w", "token": "t"})
    monkeypatch.setenv("ALL_PROXY", f"socks5h://{PROXY_USERINFO}@127.0.0.1:1080")
    with pytest.raises(pgw.ConfigError, match=r"^all_proxy in the environment: the proxy is socks5h://") as caught:
        pgw.run_preflight(argparse.Namespace())
    assert_no_secret(str(caught.value))
    pgw.write_config(pgw_home / "config.json", {"server": "https://pg.example", "token": "t", "proxy": "none"})
    assert pgw.run_preflight(argparse.Namespace()).proxy == "none"  # `proxy none` is the way out


##############################################################################
# doctor behind a proxy
##############################################################################

@pytest.fixture
def backend_certificate(tmp_path):
    """A certificate for backend.invalid, its own CA: TLS checks the name the proxy resolved."""
    return self_signed_certificate(tmp_path, BACKEND_NAME, f"DNS:{BACKEND_NAME}")


async def test_https_server_through_the_proxy_with_tls_to_the_servers_name(backend_certificate, tmp_path, environ):
    with trio.fail_after(15):
        async with tls_backend(backend_certificate) as (url, accepted), open_connect_proxy() as proxy:
            port = urllib.parse.urlsplit(url).port
            server = f"https://{BACKEND_NAME}:{port}"
            settings = pgw.Settings(server=server, token="tok-tls", name="n", cafile=str(backend_certificate[0]))
            worker = pgw.Daemon(settings, tmp_path / "h", environ={**environ, "https_proxy": proxy.url})
            async with trio.open_nursery() as nursery:
                nursery.start_soon(worker.run)
                while not accepted:
                    await trio.sleep(0.02)
                worker.hurry_shutdown()
            # doctor, step by step through the same proxy, with credentials it ignores
            proxy_env = {"HTTPS_PROXY": proxy.url_with_credentials()}
            checks = by_name(await pgw.network_checks(settings, environ=proxy_env))
    assert proxy.targets == [f"{BACKEND_NAME}:{port}"] * 2
    assert {name: check.status for name, check in checks.items()} == {
        "proxy": "PASS", "dns": "SKIP", "tcp": "PASS", "tls": "PASS", "websocket": "PASS"
    }
    assert checks["proxy"].detail == f"{proxy.url} (https_proxy in the environment) is reachable"
    assert checks["dns"].detail == f"the proxy resolves {BACKEND_NAME}, not this host"
    assert checks["tcp"].detail == f"the proxy opened a tunnel to {BACKEND_NAME}:{port}"
    assert_no_secret(repr(checks))


async def test_doctor_says_which_step_the_proxy_failed_without_the_password():
    settings = pgw.Settings(server=f"http://{BACKEND_NAME}:8000", token="t", name="n")
    with trio.fail_after(10):
        async with open_connect_proxy(credentials=(USER, "the right one")) as proxy:
            refused = by_name(await pgw.network_checks(settings, environ={"http_proxy": proxy.url_with_credentials()}))
        closed = by_name(await pgw.network_checks(settings, environ={"http_proxy": proxy.url_with_credentials()}))
    assert [refused[name].status for name in pgw.NETWORK_CHECKS] == ["PASS", "SKIP", "FAIL", "SKIP", "SKIP"]
    assert f"the proxy {proxy.url} refused the tunnel to {BACKEND_NAME}:8000: HTTP 407" in refused["tcp"].detail
    assert [closed[name].status for name in pgw.NETWORK_CHECKS] == ["FAIL", "SKIP", "SKIP", "SKIP", "SKIP"]
    assert closed["proxy"].detail == f"cannot reach the proxy {proxy.url}: Connection refused"
    assert closed["dns"].detail == "not checked after the proxy check failed"
    assert_no_secret(repr(refused) + repr(closed))


def test_doctor_command_names_the_config_proxy_and_hides_its_password(capsys, pgw_home, stub_bin, monkeypatch):
    port = free_port()
    monkeypatch.setenv("https_proxy", "socks5h://127.0.0.1:1080")  # the config's proxy wins over it
    pgw.write_config(pgw_home / "config.json", {"server": "https://pg.example", "worker_id": "w", "token": "tok-secret"})
    assert run(capsys, "config", "set", "proxy", f"http://{PROXY_USERINFO}@127.0.0.1:{port}")[0] == 0
    status, out, _ = run(capsys, "doctor")
    lines = {line.split()[1]: line for line in out.splitlines()}
    assert status == 1 and lines["run"].startswith("PASS")
    assert lines["proxy"] == f"FAIL  proxy      cannot reach the proxy http://127.0.0.1:{port}: Connection refused"
    _, shown, _ = run(capsys, "config", "show")
    assert json.loads(shown)["proxy"] == f"http://{urllib.parse.quote(USER, safe='')}:<hidden>@127.0.0.1:{port}"
    assert_no_secret(out + shown)


##############################################################################
# pair and selftest
##############################################################################

def test_pair_with_proxy_none_ignores_the_environments_proxy(capsys, pgw_home, pair_server, monkeypatch):
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{free_port()}")  # nothing there
    pgw.write_config(pgw_home / "config.json", {"proxy": "none"})
    status, out, err = run(capsys, "pair", "123", "--server", pair_server.url)
    assert (status, err) == (0, "") and "paired worker w-1" in out


def test_selftest_keeps_to_the_loopback_when_a_proxy_is_set(capsys, monkeypatch):
    nowhere = f"http://127.0.0.1:{free_port()}"
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, nowhere)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    status, out, _ = run(capsys, "selftest")
    assert status == 0, out
