"""HTTP proxies: which one pgw uses (as urllib and curl choose), the CONNECT
tunnel, and `run`, `doctor`, `pair` and `selftest` on a host behind a proxy.

The proxy here is a small CONNECT-only HTTP proxy written for these tests. It
resolves names from a table of its own: the backend is `backend.invalid`, a
name no DNS resolves (RFC 6761), so a worker that does not go through the
proxy, or that resolves the name itself, cannot reach the backend at all.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.parse
import urllib.request

import pytest

import pgw
from test_cli import assert_one_line_error, run

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
