"""Hostile input: fuzzed messages, path attacks, size limits, and the token.

Whatever the server sends, pgw must not crash, must not drop the
connection, and must answer every `stage.request` that carries a string
`stage_run_id` with exactly one `stage.exit`. File paths in a request must
never write outside the stage's scratch dir. The token must never show up in
anything pgw writes or sends, and pgw's files must be private.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import urllib.parse
import uuid
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pgw
from backend import BackendConnection, open_backend
from conftest import ROOT, PairServer, write_stub_cli
from test_faults import PgwCommand, assert_one_exit, pgw_daemon, pyz_pgw  # noqa: F401 - pyz_pgw is a fixture
from test_run import connected, environ, request, running_worker  # noqa: F401 - environ is a fixture

##############################################################################
# Fuzzing one running daemon
##############################################################################
# One backend and one pgw Daemon serve every hypothesis example: state that
# a bad message corrupts (the stage table, the outbox, the connection) is
# then seen by all the examples after it. They run in a trio loop on a
# thread of their own, so that the test body can stay synchronous and
# hypothesis drives examples one after another against the same daemon
# (pytest-trio's async fixtures do not mix with @given: STYLE.md).

EXIT_WAIT_S = 30.0


class ThreadedDaemon:
    """A backend plus a connected in-process pgw Daemon, in a trio loop on a thread."""

    def __init__(self, home: Path, environ: dict[str, str]) -> None:
        self.home = home
        self.environ = environ
        self.connection: BackendConnection | None = None
        self.crash: BaseException | None = None
        self.requests_answered = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="pgw-fuzz-daemon", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(30) or self.crash is not None or self.connection is None:
            raise RuntimeError(f"the fuzzed daemon did not start: {self.crash!r}")

    def stop(self) -> None:
        if self._thread.is_alive():
            trio.from_thread.run_sync(self._stop.set, trio_token=self._trio_token)
        self._thread.join(30)

    def alive(self) -> bool:
        return self._thread.is_alive() and self.crash is None

    def exchange(self, messages: list[tuple[object, bool]]) -> None:
        """Send the messages; check every owed exit comes exactly once and the connection stays."""
        assert self.alive(), f"the daemon's loop died: {self.crash!r}"
        trio.from_thread.run(self._exchange, messages, trio_token=self._trio_token)

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:  # noqa: BLE001 - reported by alive() and exchange()
            self.crash = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._trio_token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with open_backend() as backend:
            self.backend = backend
            async with running_worker(backend, self.home, self.environ):
                self.connection = await backend.next_connection()
                await self.connection.receive("hello")
                self._ready.set()
                await self._stop.wait()

    async def _exchange(self, messages: list[tuple[object, bool]]) -> None:
        with trio.fail_after(EXIT_WAIT_S):
            while self.connection.closed.is_set():  # an earlier example broke it: report there, go on here
                self.connection = await self.backend.next_connection()
            connection = self.connection
            connections_before = len(self.backend.connections)
            first_new = len(connection.received)
            owed: dict[str, int] = {}
            for value, as_binary in messages:
                text = str(value) if isinstance(value, Raw) else to_json(value)
                # PROTOCOL.md: messages are text frames; pgw runs no binary one, but
                # answers a request sent so, as it does any bad request.
                stage_run_id = owed_exit(text)
                if stage_run_id is not None:
                    owed[stage_run_id] = owed.get(stage_run_id, 0) + 1
                await connection.send(text.encode("utf-8") if as_binary else text)
            sentinel = f"sentinel-{uuid.uuid4().hex}"
            await connection.send(request(sentinel))
            owed[sentinel] = 1

            def exits_by_id() -> dict[str, int]:
                counts: dict[str, int] = {}
                for message in connection.received[first_new:]:
                    if message.get("type") == "stage.exit":
                        counts[message["stage_run_id"]] = counts.get(message["stage_run_id"], 0) + 1
                return counts

            while not all(exits_by_id().get(i, 0) >= n for i, n in owed.items()):
                if connection.closed.is_set():
                    break
                await trio.sleep(0.01)
            await trio.sleep(0.05)  # room for a duplicate to show itself
            assert not connection.closed.is_set(), f"pgw dropped the connection (close code {connection.close_code})"
            assert len(self.backend.connections) == connections_before, "pgw reconnected"
            assert exits_by_id() == owed, "stage.exit counts differ from the requests that are owed one"
            internal = [m for m in connection.received[first_new:]
                        if m.get("type") == "stage.exit" and (m.get("error") or "").startswith("internal error")]
            assert internal == [], "a request ended as an internal error of pgw's"
            self.requests_answered += len(owed)


class Raw(str):
    """A message sent as this exact text, not as a JSON value."""


def to_json(value: object) -> str:
    """As a server would write it: UTF-8 where it can, \\u escapes where it must (lone surrogates)."""
    text = json.dumps(value, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value)
    return text


def owed_exit(text: str) -> str | None:
    """The stage_run_id pgw owes a stage.exit for this message, if any (PROTOCOL.md)."""

    def reject_constant(name: str) -> None:
        raise ValueError(name)

    try:
        message = json.loads(text, parse_constant=reject_constant)
    except RecursionError:
        return None
    except ValueError:
        # Not JSON only by NaN, Infinity, a BOM or a number past Python's
        # digits limit (what json.dumps writes by default): answered all the same.
        try:
            message = json.loads(text.lstrip("\ufeff"), parse_int=lambda _: 0, parse_float=lambda _: 0.0)
        except (ValueError, RecursionError):
            return None
    if isinstance(message, dict) and message.get("type") == "stage.request" and isinstance(message.get("stage_run_id"), str):
        # An id too long to name in a message under 1 MiB gets no exit: a server would close on it.
        return message["stage_run_id"] if pgw.stage_id_fits(message["stage_run_id"]) else None
    return None


@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory):
    """One daemon for every example. A sync fixture running its own loop, not an async one."""
    root = tmp_path_factory.mktemp("fuzz")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    for cli in ("claude", "codex"):  # deepseek stays missing: "CLI not found" is an answer too
        (bin_dir / cli).write_text("#!/bin/sh\nexit 0\n")  # exits at once: thousands of stages run
        (bin_dir / cli).chmod(0o755)
    (root / "codex-home").mkdir()
    environ = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(root), "CODEX_HOME": str(root / "codex-home")}
    daemon = ThreadedDaemon(root / "home", environ)
    daemon.start()
    yield daemon
    daemon.stop()


# Strategies ------------------------------------------------------------------

ODD_STRINGS = [
    "", "\0", "a\0b", ".", "..", "/", "\\", "../x", "a/../../b", "C:\\x", "~", "$HOME", "%2e%2e",
    "\u202e", "\ufeff", "e\u0301", "😀", "\u2028", "\uffff", "\U0010ffff", "ＮＵＬ", " ", "\t\n\r",
    "\ud800", "a\udc80b", "\udfff\ud800",  # lone surrogates: valid JSON, not valid UTF-8
]
odd_text = st.one_of(
    st.text(max_size=30),  # all of unicode but lone surrogates, NUL included
    st.text(st.characters(blacklist_categories=()), max_size=5),  # lone surrogates too: valid JSON as \ud800
    st.sampled_from(ODD_STRINGS),
    st.builds(lambda unit, count: unit * count, st.sampled_from(["x", "\0", "é", "😀", "/", "../"]),
              st.sampled_from([100, 10_000, 300_000])),
)
odd_numbers = st.one_of(
    st.integers(),
    st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63), 2**64, 10**300, 10**309, -(10**309), 10**4000]),
    st.floats(allow_nan=False, allow_infinity=False),
)
json_scalars = st.one_of(st.none(), st.booleans(), odd_numbers, odd_text)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(odd_text, children, max_size=4),
    max_leaves=12,
)


def nested(value: object, depth: int) -> object:
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


# Deep, but within what json.dumps here can write; deeper ones come as raw text below.
deep_values = st.builds(nested, json_scalars, st.integers(min_value=1, max_value=300))
any_value = st.one_of(json_values, odd_text, odd_numbers, deep_values)

safe_names = st.text(alphabet="abcdefghij_-.", min_size=1, max_size=12).filter(lambda n: n not in (".", ".."))
valid_requests = st.fixed_dictionaries(
    {
        "type": st.just("stage.request"),
        "stage_run_id": st.one_of(
            st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=20), odd_text
        ),
        "job_id": st.text(max_size=10),
        "cli": st.sampled_from(["claude", "codex", "deepseek"]),
        "cli_args": st.lists(st.text(alphabet=st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=10), max_size=3),
        "stdin": st.text(max_size=50),
    },
    optional={
        "stdin_mode": st.sampled_from(["stdin", "argv_last"]),
        "files": st.dictionaries(
            st.lists(safe_names, min_size=1, max_size=3).map("/".join),
            st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
            max_size=3,
        ),
        "timeout_s": st.integers(min_value=1, max_value=30),
        "env": st.dictionaries(st.text(alphabet="ABCXYZ_", min_size=1, max_size=5), st.text(alphabet="abc123 ", max_size=10), max_size=2),
    },
)
REQUEST_KEYS = ["type", "stage_run_id", "job_id", "cli", "cli_args", "stdin", "stdin_mode", "files", "timeout_s", "env"]


# Values of the right JSON type with hostile contents: they get past the type
# checks, to the path checks, execve, the environment and the encoders.
WELL_TYPED_HOSTILE = {
    "stage_run_id": odd_text,
    "job_id": odd_text,
    "cli": st.sampled_from(["claude", "codex", "deepseek"]) | odd_text,
    "cli_args": st.lists(odd_text, max_size=3),
    "stdin": odd_text,
    "stdin_mode": st.sampled_from(["stdin", "argv_last"]) | odd_text,
    "files": st.dictionaries(odd_text, st.binary(max_size=16).map(lambda b: base64.b64encode(b).decode()) | odd_text, max_size=3),
    "timeout_s": odd_numbers,
    "env": st.dictionaries(odd_text, odd_text, max_size=3),
}


@st.composite
def mutated_requests(draw) -> dict:
    message = dict(draw(valid_requests))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        key = draw(st.sampled_from(REQUEST_KEYS + ["extra"]))
        action = draw(st.sampled_from(["drop", "any-value", "well-typed", "well-typed"]))
        if action == "drop" and key in message and key != "type":
            del message[key]
        elif action == "well-typed" and key in WELL_TYPED_HOSTILE:
            message[key] = draw(WELL_TYPED_HOSTILE[key])
        else:
            message[key] = draw(any_value)
    return message


cancels = st.fixed_dictionaries(
    {"type": st.just("stage.cancel"), "stage_run_id": odd_text}, optional={"signal": any_value}
)
other_types = st.fixed_dictionaries(
    {"type": st.sampled_from(["pong", "ping", "hello", "stage.exit", "stage.ack", "stage.stdout", "STAGE.REQUEST", ""])},
    optional={"stage_run_id": odd_text, "data": any_value},
)
too_deep_for_python = st.integers(min_value=1_000, max_value=100_000).map(
    lambda depth: '{"type":"stage.request","stage_run_id":"deep","job_id":' + "[" * depth + "]" * depth + "}"
)
not_json = st.one_of(
    too_deep_for_python,
    st.text(max_size=100),
    st.sampled_from(["", "{", "[1,", "NaN", '{"type": NaN}', '{"type":"stage.request","stage_run_id":"x","timeout_s":Infinity}', "null", "\0"]),
).map(Raw)
wire_messages = st.tuples(
    st.one_of(valid_requests, mutated_requests(), mutated_requests(), cancels, other_types, json_values, not_json),
    st.booleans(),  # as a binary frame
)


def unique_stage_ids(messages: list[tuple[object, bool]]) -> list[tuple[object, bool]]:
    """Repeated ids within one batch are ignored while running, by design: keep them apart."""
    seen: set[str] = set()
    unique = []
    for value, as_binary in messages:
        if isinstance(value, dict) and isinstance(value.get("stage_run_id"), str):
            stage_run_id = value["stage_run_id"]
            while stage_run_id in seen:
                stage_run_id += "~"
            seen.add(stage_run_id)
            value = {**value, "stage_run_id": stage_run_id}
        unique.append((value, as_binary))
    return unique


# 200 examples in CI (~15 s); PGW_FUZZ_EXAMPLES=2000 for a longer hunt (~2.5 min).
@pytest.mark.takes_s(17)
@settings(
    max_examples=int(os.environ.get("PGW_FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
@given(messages=st.lists(wire_messages, min_size=1, max_size=10).map(unique_stage_ids))
def test_fuzzed_messages_never_crash_drop_or_go_unanswered(fuzz_daemon, messages):
    fuzz_daemon.exchange(messages)
    assert fuzz_daemon.alive()
    assert len(fuzz_daemon.backend.connections) == 1


##############################################################################
# What Python's json cannot take, and fields pgw cannot pass to a process
##############################################################################


async def test_json_nested_too_deep_for_python_is_skipped_not_a_dropped_connection(tmp_path, environ, stub_bin):
    """100,000 levels of arrays: valid JSON that Python's parser refuses with RecursionError."""
    write_stub_cli(stub_bin, "claude", "print('fine')")
    deep = '{"type":"stage.request","stage_run_id":"deep","job_id":' + "[" * 100_000 + "]" * 100_000 + "}"
    with trio.fail_after(15):
        async with connected(tmp_path, environ) as (backend, _, connection):
            await connection.send(deep)
            await connection.send(request("after"))
            await connection.stage_result("after")
            assert len(backend.connections) == 1 and not connection.closed.is_set()


@pytest.mark.parametrize("field", ["cli_args", "env"])
async def test_a_request_with_a_million_bad_elements_gets_a_short_exit_at_once(tmp_path, environ, stub_bin, caplog, field):
    """Its error names a few bad elements and counts the rest: one error per
    element made an exit 17 times the request, which a server at the usual
    1 MiB limit refuses (dropping the connection), and cost gigabytes."""
    write_stub_cli(stub_bin, "claude", "print('fine')")
    bad = [1] * 1_000_000 if field == "cli_args" else {f"V{n}": n for n in range(1_000_000)}
    with trio.fail_after(30):
        async with connected(tmp_path, environ) as (backend, _, connection):
            await connection.send(json.dumps(request("bad", **{field: bad})))
            result = await connection.stage_result("bad")
            await connection.send(request("after"))
            assert (await connection.stage_result("after")).stdout == "fine\n"
            assert len(backend.connections) == 1
    first = "cli_args[0]: expected a string, got a number 1" if field == "cli_args" else "env['V0']: expected a string, got a number 0"
    assert result.error.startswith(f"bad request: stage.request: {first}; "), result.error
    assert result.error.endswith("999997 more elements are not strings"), result.error
    assert len(result.error) < 1000
    assert max(len(record.getMessage()) for record in caplog.records) < 1000


async def test_a_refused_requests_exit_is_cut_to_1_mib_however_long_its_id_and_its_bad_fields(tmp_path, environ, stub_bin):
    # The id leaves 4 KiB for the rest, and the error names up to three bad
    # keys per field, each escaped to six bytes a control character: the exit
    # went over 1 MiB, a server at that limit closed the connection, and
    # every running stage was killed with it.
    write_stub_cli(stub_bin, "claude", "import time; print('ready', flush=True); time.sleep(2); print('done')")
    key = "\x01" * 200
    bad = {key + str(n): n for n in range(4)}
    long_id = "a" * (pgw.OUTPUT_DATA_MAX_ESCAPED_BYTES - 2)
    with trio.fail_after(30):
        async with open_backend(max_message_size=1 << 20) as backend:
            async with running_worker(backend, tmp_path / "home", environ):
                connection = await backend.next_connection()
                await connection.send(request("running"))
                await connection.receive("stage.stdout", "running")
                await connection.send(json.dumps({**request(long_id), "env": bad, "files": bad}))
                refused = await connection.stage_result(long_id)
                assert (await connection.stage_result("running")).stdout == "ready\ndone\n"
                assert len(backend.connections) == 1
    assert refused.returncode == -1 and refused.error.startswith("bad request: ") and refused.error.endswith("...")
    assert len(pgw.exit_message(pgw.StageExit(long_id, -1, 0, refused.error))) <= 1 << 20


async def test_a_stage_id_too_long_to_echo_under_1_mib_gets_no_exit_and_costs_no_connection(tmp_path, environ, stub_bin, caplog):
    write_stub_cli(stub_bin, "claude", "print('fine')")
    huge = "x" * (1 << 20)
    with trio.fail_after(30):
        async with connected(tmp_path, environ) as (backend, _, connection):
            await connection.send(json.dumps(request(huge)))
            await connection.send(json.dumps({**request("bad-too"), "stage_run_id": huge + "y", "cli": 3}))
            await connection.send(request("after"))
            assert (await connection.stage_result("after")).stdout == "fine\n"
            await trio.sleep(0.3)
            assert [m for m in connection.received if m.get("stage_run_id", "").startswith("x")] == []
            assert len(backend.connections) == 1
    warnings = [r.getMessage() for r in caplog.records if "would be over 1 MiB; not sent" in r.getMessage()]
    assert len(warnings) == 2 and all(len(w) < 1000 for w in warnings)


@pytest.mark.parametrize("surrogate", ["\ud800", "\udc80"], ids=["ud800", "udc80"])
async def test_lone_surrogate_in_a_stage_id_is_answered_not_a_dropped_connection(tmp_path, environ, stub_bin, surrogate):
    """`"\\ud800"` is valid JSON (RFC 8259 leaves lone surrogates to the parser); Python accepts it."""
    write_stub_cli(stub_bin, "claude", "print('fine')")
    with trio.fail_after(15):
        async with connected(tmp_path, environ) as (backend, _, connection):
            await connection.send(json.dumps(request(f"bad-{surrogate}")))  # ensure_ascii: on the wire as \\u escapes
            await connection.send(request("after"))
            odd = await connection.stage_result(f"bad-{surrogate}")  # \udc80 names a directory (byte 0x80) and runs
            await connection.stage_result("after")
            await assert_one_exit(connection, f"bad-{surrogate}")
            assert len(backend.connections) == 1 and not connection.closed.is_set()
    assert not (odd.error or "").startswith("internal error"), odd.error


UNUSABLE_FIELDS = {
    "nul-in-env-value": pytest.param({"env": {"X": "a\0b"}}),
    "equals-in-env-name": pytest.param({"env": {"A=B": "x"}}),
    "empty-env-name": pytest.param({"env": {"": "x"}}),
    "nul-in-cli-args": pytest.param({"cli_args": ["a\0b"]}),
    "nul-in-argv-last-prompt": pytest.param({"stdin": "a\0b", "stdin_mode": "argv_last"}),
    "nul-in-prompt-on-stdin": pytest.param({"stdin": "a\0b"}),
    # \udc80 passes to the OS as the byte 0x80 (surrogateescape); \ud800 does not.
    "surrogate-escape-in-cli-args": pytest.param({"cli_args": ["\udc80"]}),
    "surrogate-escape-in-env": pytest.param({"env": {"X": "\udc80"}}),
    "surrogate-in-cli-args": pytest.param({"cli_args": ["\ud800"]}),
    "surrogate-in-prompt": pytest.param({"stdin": "\udc80"}),
    "surrogate-in-file-name": pytest.param({"files": {"\ud800": "aGk="}}),
    "timeout-beyond-a-float": pytest.param({"timeout_s": 10**309}),
    "timeout-of-a-googol": pytest.param({"timeout_s": 10**100}),
    "negative-timeout": pytest.param({"timeout_s": -5}),
}


@pytest.mark.parametrize("fields", UNUSABLE_FIELDS.values(), ids=list(UNUSABLE_FIELDS))
async def test_field_values_the_os_cannot_take_get_a_plain_exit_not_an_internal_error(tmp_path, environ, stub_bin, fields):
    """README: a bad request is answered with an error saying what was wrong, and nothing starts.
    Values the OS can take may run; either way the answer is one exit, never an internal error."""
    write_stub_cli(stub_bin, "claude", "print('started')")
    with trio.fail_after(15):
        async with connected(tmp_path, environ) as (backend, _, connection):
            await connection.send(json.dumps(request("s1", **fields)))
            result = await connection.stage_result("s1")
            await assert_one_exit(connection, "s1")
            assert len(backend.connections) == 1
    assert not (result.error or "").startswith("internal error"), result.error
    if result.ack is None:
        assert result.returncode == -1 and result.error
    else:
        assert result.error is None or result.error.startswith("timed out"), result.error


##############################################################################
# Path attacks in files
##############################################################################


def tree(root: Path) -> dict[str, tuple[str, int]]:
    """Every path under root: (kind, size) - what a write outside scratch would change."""
    found = {}
    for path in root.rglob("*"):
        relative = str(path.relative_to(root))
        kind = "link" if path.is_symlink() else "dir" if path.is_dir() else "file"
        found[relative] = (kind, 0 if kind == "dir" else path.lstat().st_size)
    return found


# What pgw itself keeps in its home; everything else new must be under scratch/.
PGW_BOOKKEEPING = ("home/run.log", "home/run.lock", "home/state", "home/stages", "home/scratch")


def written_outside_scratch(before: dict, after: dict) -> set[str]:
    new = set(after) - set(before)
    return {path for path in new if path != "home" and not path.startswith(PGW_BOOKKEEPING)}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


LIST_TREE = """
import json, os
found = []
for directory, _, files in os.walk("."):
    for name in files:
        path = os.path.join(directory, name)
        found.append([os.path.realpath(path), os.path.getsize(path)])
print(json.dumps({"cwd": os.path.realpath("."), "files": found}))
"""


async def test_path_attacks_write_nothing_outside_the_scratch_dir(tmp_path, environ, stub_bin):
    write_stub_cli(stub_bin, "claude", LIST_TREE)
    home = tmp_path / "home"
    escape = f"pgw-escape-{uuid.uuid4().hex}"
    payload = b64(b"owned")
    refused = {
        "absolute": {f"/tmp/{escape}": payload},
        "absolute-double-slash": {f"//tmp/{escape}": payload},
        "absolute-backslash": {f"\\tmp\\{escape}": payload},
        "drive": {f"C:\\{escape}": payload},
        "drive-relative": {f"C:{escape}": payload},
        "unc": {f"\\\\server\\share\\{escape}": payload},
        "dotdot": {"..": payload},
        "dotdot-first": {f"../{escape}": payload},
        "dotdot-middle": {f"a/../../{escape}": payload},
        "dotdot-last": {"a/b/..": payload},
        "dotdot-deep": {f"a/b/c/../../../../{escape}": payload},
        "dotdot-backslash": {f"..\\{escape}": payload},
        "dotdot-mixed": {f"a\\..\\../{escape}": payload},
        "dot-then-dotdot": {f"./../{escape}": payload},
        "dotdot-alongside-a-good-file": {"good.txt": payload, f"../../{escape}": payload},
        "nul": {f"a\0/../../{escape}": payload},
        "empty": {"": payload},
        "only-dots-and-slashes": {"./././": payload},
        "file-then-dir-same-name": {"x": payload, "x/y": payload},
        "dir-then-file-same-name": {"x/y": payload, "x": payload},
        "name-of-256-bytes": {"n" * 256: payload},
        "path-of-6000-bytes": {"/".join(["d" * 200] * 30): payload},
        "name-of-100000-chars": {"é" * 100_000: payload},
    }
    accepted = {
        # Odd but inside: written where they say, under the scratch dir.
        "dot-segments": {"./a/./b": payload},
        "double-slashes": {"a//b": payload},
        "trailing-slash": {"t/": payload},
        "backslashes-are-separators": {"p\\q": payload},
        "tilde-and-dollar": {"~/x": payload, "$HOME/y": payload},
        "lookalike-dots": {"\u2024\u2024/x": payload, "\uff0e\uff0e/y": payload, "..\u200b/z": payload},
        "three-dots": {".../x": payload},
        "percent-encoded": {"%2e%2e/%2e%2e/x": payload},
        "name-of-255-bytes": {"n" * 255: payload},
    }
    outside_before = tree(tmp_path)
    with trio.fail_after(60):
        async with connected(tmp_path, environ) as (_, _, connection):
            for name, files in {**refused, **accepted}.items():
                await connection.send(request(name, files=files))
            results = {name: await connection.stage_result(name) for name in {**refused, **accepted}}
            many = {f"d{n % 100}/f{n}.txt": b64(str(n).encode()) for n in range(10_000)}
            await connection.send(request("ten-thousand-files", files=many))
            results["ten-thousand-files"] = await connection.stage_result("ten-thousand-files")
            for name in results:
                await assert_one_exit(connection, name, settle_s=0)
    for name in refused:
        result = results[name]
        assert (result.ack, result.returncode) == (None, -1), name
        assert result.error.startswith(("unsafe file path", "cannot write the stage's files", "bad request")), (name, result.error)
        assert len(result.error) < 400, f"{name}: the error quotes too much"
    for name in [*accepted, "ten-thousand-files"]:
        result = results[name]
        assert (result.returncode, result.error) == (0, None), (name, result.error)
        listing = json.loads(result.stdout)
        scratch = listing["cwd"]
        assert scratch == str((home / "scratch" / name).resolve())
        assert all(path.startswith(scratch + "/") for path, _ in listing["files"]), name
    assert len(json.loads(results["ten-thousand-files"].stdout)["files"]) == 10_000
    assert len(json.loads(results["tilde-and-dollar"].stdout)["files"]) == 2
    assert not Path("/tmp", escape).exists() and not Path("/", escape).exists()
    outside_after = tree(tmp_path)
    assert written_outside_scratch(outside_before, outside_after) == set()
    assert [path for path in outside_after if path.startswith("home/scratch/")] == [], "a scratch dir was left"
    assert not any(escape in path for path in outside_after)


# A CLI runs as pgw's user and can reach pgw's home: a FIFO at the log's path
# held the daemon's next open of its log, and with it everything (exits,
# heartbeats, other stages) until a reader came.
FIFO_FOR_THE_LOG = (
    "import os\nos.rename('../../run.log', '../../run.log.moved')\nos.mkfifo('../../run.log')\nprint('done', flush=True)\n"
)


async def test_a_stage_that_puts_a_fifo_at_the_log_does_not_hold_the_daemon(tmp_path, stub_bin, pyz_pgw):
    write_stub_cli(stub_bin, "claude", FIFO_FOR_THE_LOG)
    home = tmp_path / "home"
    with trio.fail_after(30):
        async with open_backend() as backend:
            async with pgw_daemon(pyz_pgw, home, stub_bin, server=backend.url, token=backend.token,
                                  stderr=subprocess.PIPE) as daemon:
                connection = await backend.next_connection()
                await connection.send(request("fifo"))
                with trio.fail_after(10):
                    first = await connection.stage_result("fifo")
                write_stub_cli(stub_bin, "claude", "print('after')")
                await connection.send(request("after"))
                with trio.fail_after(10):
                    after = await connection.stage_result("after")
                daemon.send_signal(signal.SIGTERM)
                with trio.fail_after(10):
                    await daemon.wait()
                said = await daemon.stderr.receive_some(65536)
    assert (first.returncode, first.stdout, after.stdout) == (0, "done\n", "after\n")
    assert stat.S_ISFIFO(os.lstat(home / "run.log").st_mode) and daemon.returncode == 0
    assert said.decode().count("cannot write the log") == 1, said


async def test_stage_ids_that_are_not_one_directory_name_are_refused(tmp_path, environ, stub_bin):
    write_stub_cli(stub_bin, "claude", "print('ran')")
    bad_ids = ["", ".", "..", "a/b", "/abs", "x\\y", "\0", "n" * 201, "../../home"]
    before = tree(tmp_path)
    with trio.fail_after(20):
        async with connected(tmp_path, environ) as (_, _, connection):
            for stage_run_id in bad_ids:
                await connection.send(request(stage_run_id, files={"f": b64(b"x")}))
            results = [await connection.stage_result(stage_run_id) for stage_run_id in bad_ids]
            for stage_run_id in bad_ids:
                await assert_one_exit(connection, stage_run_id, settle_s=0)
    for stage_run_id, result in zip(bad_ids, results):
        assert (result.ack, result.returncode) == (None, -1), stage_run_id
        assert "cannot name a scratch directory" in result.error
    after = tree(tmp_path)
    assert written_outside_scratch(before, after) == set()
    assert [path for path in after if path.startswith("home/scratch/")] == []


##############################################################################
# Sizes
##############################################################################

FILES_LIMIT = 50 * 2**20
SIZE_AND_DIGEST = """
import hashlib, os, sys
total = hashlib.sha256()
size = 0
for name in sorted(os.listdir(".")):
    data = open(name, "rb").read()
    size += len(data)
    total.update(data)
prompt = sys.stdin.buffer.read()
print(size, total.hexdigest(), len(prompt), hashlib.sha256(prompt).hexdigest())
"""


async def test_fifty_mib_of_files_are_accepted_and_one_byte_more_refused(tmp_path, environ, stub_bin):
    write_stub_cli(stub_bin, "claude", SIZE_AND_DIGEST)
    chunk = os.urandom(10 * 2**20)
    exact = {f"part-{n}": chunk for n in range(5)}  # 50 MiB exactly
    over = {**exact, "part-4": chunk + b"!"}
    digest = hashlib.sha256(b"".join(exact[name] for name in sorted(exact))).hexdigest()
    with trio.fail_after(60):
        async with connected(tmp_path, environ) as (backend, _, connection):
            await connection.send(request("exact", files={k: b64(v) for k, v in exact.items()}))
            accepted = await connection.stage_result("exact")
            await connection.send(request("over", files={k: b64(v) for k, v in over.items()}))
            refused = await connection.stage_result("over")
            await connection.send(request("one-file-over", files={"big": b64(b"\0" * (FILES_LIMIT + 1))}))
            refused_one = await connection.stage_result("one-file-over")
            assert len(backend.connections) == 1
    assert (accepted.returncode, accepted.error) == (0, None)
    assert accepted.stdout.split()[:2] == [str(FILES_LIMIT), digest]
    for result in (refused, refused_one):
        assert (result.ack, result.returncode) == (None, -1)
        # "50.0 MiB decoded, the limit is 50 MiB" said it was not over at all
        assert result.error == f"files too large: {FILES_LIMIT + 1:,} bytes decoded, over the limit of {FILES_LIMIT:,} (50 MiB)"


async def test_a_120_mib_message_is_answered_on_the_same_connection(tmp_path, environ, stub_bin):
    write_stub_cli(stub_bin, "claude", SIZE_AND_DIGEST)
    prompt = "y" * (120 * 2**20 - 300)  # the whole message is about 120 MiB
    message = json.dumps(request("huge", stdin=prompt))
    assert 120 * 2**20 - 1000 < len(message) <= 120 * 2**20
    with trio.fail_after(60):
        async with connected(tmp_path, environ) as (backend, _, connection):
            await connection.send(message)
            huge = await connection.stage_result("huge")
            await connection.send(request("after"))
            after = await connection.stage_result("after")
            assert len(backend.connections) == 1 and not connection.closed.is_set()
    assert (huge.returncode, huge.error) == (0, None)
    assert huge.stdout.split()[2:] == [str(len(prompt)), hashlib.sha256(prompt.encode()).hexdigest()]
    assert after.returncode == 0


##############################################################################
# Secrets and permissions (pgw as a process: the built pyz)
##############################################################################

ENV_DUMP = """
import json, os, sys
print(json.dumps({"environ": dict(os.environ), "proc": open("/proc/self/environ", "rb").read().decode("utf-8", "replace"),
                  "argv": sys.argv}))
print(json.dumps(dict(os.environ)), file=sys.stderr)
"""
WAITS = "import time; print('ready', flush=True); time.sleep(60)"


def pyz_command_line(pyz: PgwCommand, home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {"PATH": "/usr/bin:/bin", "HOME": str(home.parent), "PGW_HOME": str(home), **pyz.env, **env}
    return subprocess.run([*pyz.argv, *args], env=full_env, capture_output=True, text=True, timeout=60, check=False)


def hostile_umask() -> None:
    os.umask(0)  # whatever pgw makes private, it must make so itself


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_the_token_never_leaves_the_config(tmp_path, stub_bin, pyz_pgw):
    """Pair, connect (after a 403), run stages good and bad, lose the connection, stop,
    run every read-only command; then grep everything captured for the token."""
    secret_core = uuid.uuid4().hex
    token = f"tok_{secret_core}/+="  # characters that the URL must quote
    home = tmp_path / "home"
    captured: dict[str, str] = {}
    write_stub_cli(stub_bin, "claude", ENV_DUMP)
    write_stub_cli(stub_bin, "codex", WAITS)
    pair_server = PairServer()
    try:
        pair_server.reply(200, json.dumps({"worker_id": "w-9", "token": token}).encode())
        with trio.fail_after(60):
            done = await trio.to_thread.run_sync(
                lambda: pyz_command_line(pyz_pgw, home, "pair", "123-456", "--server", pair_server.url)
            )
    finally:
        pair_server.close()
    assert done.returncode == 0, done.stderr
    captured["pair output"] = done.stdout + done.stderr
    assert json.loads((home / "config.json").read_text())["token"] == token
    daemon_out, daemon_err = tmp_path / "daemon.out", tmp_path / "daemon.err"
    with trio.fail_after(60):
        async with open_backend(token=token) as backend:
            backend.reject_next(403)
            with daemon_out.open("wb") as out, daemon_err.open("wb") as err:
                async with pgw_daemon(
                    pyz_pgw, home, stub_bin, "-v", server=backend.url, token=token,
                    extra_env={"PGW_SERVER": backend.url, "PGW_TOKEN": token}, stdout=out, stderr=err,
                ) as daemon:
                    connection = await backend.next_connection()
                    await connection.send(request("env-dump", env={"EXTRA": "1"}))
                    await connection.send(request("bad-base64", files={"f": "%%%"}))
                    await connection.send(request("internal", env={"X": "a\0b"}))
                    await connection.send(request("waits", cli="codex"))
                    dump = await connection.stage_result("env-dump")
                    for stage_run_id in ("bad-base64", "internal"):
                        await connection.stage_result(stage_run_id)
                    await connection.receive("stage.stdout", "waits")
                    for command in (["status"], ["status", "--json"], ["doctor"], ["doctor", "--json"],
                                    ["config", "show"], ["capabilities"], ["install", "systemd"], ["install", "cron"]):
                        done = await trio.to_thread.run_sync(lambda: pyz_command_line(pyz_pgw, home, *command))
                        captured[f"pgw {' '.join(command)}"] = done.stdout + done.stderr
                    await connection.abort()  # logged as a loss, then a reconnect
                    again = await backend.next_connection()
                    await again.receive("hello")
                    daemon.send_signal(signal.SIGTERM)
                    assert await daemon.wait() == 0
    captured["daemon stdout"] = daemon_out.read_text(errors="replace")
    captured["daemon stderr"] = daemon_err.read_text(errors="replace")
    for path in home.rglob("*"):
        if path.is_file() and path.name != "config.json":
            captured[str(path.relative_to(home))] = path.read_text(errors="replace")
    for number, each in enumerate(backend.connections):
        captured[f"frames on connection {number}"] = "\n".join(json.dumps(m) for m in each.received)
    environ_seen = json.loads(dump.stdout)
    # Not vacuous: the log has the -v frame lines, the loss, the 403 and a refused request.
    log_text = captured["run.log"]
    for expected in ("HTTP 403", "stage 'env-dump': started", "received stage.request env-dump", "disconnected",
                     "is not a valid environment variable"):
        assert expected in log_text, expected
    assert environ_seen["environ"]["PGW_STAGE_ID"] == "env-dump" and environ_seen["environ"]["EXTRA"] == "1"
    assert {"PGW_TOKEN", "PGW_SERVER", "PGW_HOME"}.isdisjoint(environ_seen["environ"]), "pgw's own settings reached a child"
    needles = [secret_core, token, urllib.parse.quote(token, safe="")]
    leaks = [where for where, text in captured.items() if any(needle in text for needle in needles)]
    assert leaks == [], f"the token shows in: {leaks}"


async def test_config_home_and_scratch_are_private_even_under_umask_0(tmp_path, stub_bin, pyz_pgw):
    home = tmp_path / "home"
    write_stub_cli(stub_bin, "claude", WAITS)
    pair_server = PairServer()
    try:
        pair_server.reply(200, json.dumps({"worker_id": "w-9", "token": "tok-private"}).encode())
        with trio.fail_after(60):
            done = await trio.to_thread.run_sync(
                lambda: subprocess.run(
                    [*pyz_pgw.argv, "pair", "1-2", "--server", pair_server.url],
                    env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PGW_HOME": str(home), **pyz_pgw.env},
                    capture_output=True, text=True, timeout=60, check=False, preexec_fn=hostile_umask,
                )
            )
    finally:
        pair_server.close()
    assert done.returncode == 0, done.stderr
    assert (mode(home), mode(home / "config.json")) == (0o700, 0o600)
    with trio.fail_after(30):
        async with open_backend(token="tok-private") as backend:
            async with pgw_daemon(
                pyz_pgw, home, stub_bin, server=backend.url, token="tok-private",
                extra_env={"PGW_SERVER": backend.url}, preexec_fn=hostile_umask,
            ):
                connection = await backend.next_connection()
                await connection.send(request("private", files={"sub/dir/f.txt": b64(b"x")}))
                await connection.receive("stage.stdout", "private")
                modes = {
                    "home": mode(home),
                    "config": mode(home / "config.json"),
                    "scratch": mode(home / "scratch"),
                    "stage dir": mode(home / "scratch" / "private"),
                }
                await connection.send({"type": "stage.cancel", "stage_run_id": "private", "signal": "SIGKILL"})
                await connection.stage_result("private")
    assert modes == {"home": 0o700, "config": 0o600, "scratch": 0o700, "stage dir": 0o700}


async def test_doctor_warns_about_a_config_others_can_read(tmp_path, pyz_pgw):
    home = tmp_path / "home"
    pgw.write_config(home / "config.json", {"server": "http://127.0.0.1:9", "worker_id": "w-1", "token": "tok-wide"})
    with trio.fail_after(60):
        quiet = await trio.to_thread.run_sync(lambda: pyz_command_line(pyz_pgw, home, "doctor"))
        (home / "config.json").chmod(0o644)
        loud = await trio.to_thread.run_sync(lambda: pyz_command_line(pyz_pgw, home, "doctor"))
    [line] = [line for line in loud.stdout.splitlines() if re.search(r"\bconfig\b", line) and "644" in line]
    assert "WARN" in line and "chmod 600" in line
    assert "644" not in quiet.stdout and "tok-wide" not in loud.stdout + loud.stderr


STAGE_TAKES_ITS_RIGHTS = """
import os, sys
sys.path.insert(0, sys.argv[1])
import pgw
from pathlib import Path
scratch = Path(sys.argv[2]) / "scratch"
os.mkdir(scratch, 0o700)
stage = scratch / "s1"
for directory in ("zero/deep", "locked/inner", "open"):
    os.makedirs(stage / directory)
for name in ("zero/deep/f", "locked/inner/g", "open/h"):
    (stage / name).write_text("job data")
os.symlink("/etc", stage / "open" / "etc")  # never followed: /etc keeps its mode
os.chmod(stage / "zero" / "deep", 0)
os.chmod(stage / "zero", 0)
os.chmod(stage / "locked", 0o500)
if sys.argv[3:] == ["parent too"]:
    os.chmod(scratch, 0)  # `chmod 0 ..` from the stage's own directory
if not pgw.remove_empty_scratch(stage):
    pgw.remove_scratch(stage)
print(sorted(os.listdir(scratch)), oct(os.stat(scratch).st_mode & 0o777))
"""


@pytest.mark.parametrize("also", [[], ["parent too"]])
def test_a_scratch_dir_whose_stage_took_its_own_rights_away_is_removed_all_the_same(also):
    """As an unprivileged user (root passes over modes): a stage left directories
    of mode 000 and 0500, which rmtree alone could neither list nor empty, and
    kept them, the job's files in them, for good.  A stage that took the
    rights of scratch/ itself (`chmod 0 ..`) left its files there until the
    next `pgw run`."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root, to run this as nobody")
    etc_mode = os.stat("/etc").st_mode
    base = Path(tempfile.mkdtemp(prefix="pgw-scratch-"))
    try:
        base.chmod(0o777)
        done = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", STAGE_TAKES_ITS_RIGHTS,
             str(ROOT), str(base), *also],
            capture_output=True, text=True, timeout=60, cwd="/",
        )
        assert (done.returncode, done.stdout) == (0, "[] 0o700\n"), done.stderr
        assert os.stat("/etc").st_mode == etc_mode
    finally:
        subprocess.run(["chmod", "-R", "u+rwx", str(base)], check=False)
        shutil.rmtree(base, ignore_errors=True)
