"""pgw: the prove-graph worker.

The prove-graph backend drives AI command-line agents (codex, claude,
deepseek) that run on its users' own machines.  pgw is the program on such a
machine: it pairs the machine with the backend, keeps one WebSocket open to
it, runs each requested CLI in a scratch directory and streams its output
back.  It holds no state of its own beyond ``config.json`` and knows nothing
of what the stages mean.  It is wire-compatible with the reference worker,
``pgworker`` 0.1.2: same protocol (``shared/PROTOCOL.md``), same
``~/.pgworker/config.json``, so a paired machine just switches.

Theory of operation
-------------------
Every message is one of the frozen attrs records below.  What comes in
passes through one door, ``decode(text) -> record``: strict (no coercion,
literals checked, every failure one ``ProtocolError`` saying what and where)
but ignoring unknown extra keys, so a newer server does not break an older
worker.  What goes out passes through one door too, ``FrameWriter``
(``send_batch`` for messages, ``ping`` for the keepalive's WebSocket ping,
``answer_pings`` for the pongs to the server's):
the records pgw sends are encoded by ``encode``, except the three every
stage sends, built without a record and held equal to it by tests:
``ack_message``, ``exit_message``, and the stage output, nearly all pgw
sends, cut and escaped by ``escaped_read`` and wrapped by ``output_message``.

``open_websocket`` offers permessage-deflate (RFC 7692) in the opening
handshake unless the ``compression`` setting is off.  When the server
accepts, wsproto inflates what arrives before ``decode`` sees it (the
128 MiB limit counts the inflated text), and ``FrameWriter`` deflates every
message it sends with the connection's one compressor.  Beside its frames,
only trio-websocket's own writes go out (the handshake, the close frame),
never deflated.

The daemon is a tree of tasks, one class for each kind of node::

    run_until_signalled      SIGTERM/SIGINT stop with a grace (twice: at once), SIGQUIT at once; SIGHUP ignored
    └─ Daemon.run            reconnect loop with backoff; owns the stage table
       ├─ state writer       StateFile.writer: state.json for `pgw status`, at most twice a second
       ├─ stage spawner      a process of its own: forks the stage roots (see "Stage")
       ├─ root retirer       ends a stage root left free for root_idle_s
       ├─ orphan sweep       `pgw run` on Linux, a subreaper: kills what a dead spawner
       │                     passed to pgw, bar its roots (StageSpawner.sweep_orphans)
       └─ one connection     Daemon._connect: TCP or a proxy tunnel, TLS, WebSocket handshake (offers deflate)
          ├─ trio-websocket  its own reader task (close; pings to LatestPing; wsproto inflates there)
          └─ Connection.serve
             ├─ sender       the only writer of messages: Outbox -> FrameWriter
             ├─ pong sender  FrameWriter.answer_pings: the latest ping, once the sender lets go
             ├─ keepalive    app ping every 30 s, ahead of queued output; WebSocket
             │  │            pings and the verdict on a silent path (keepalive_step)
             │  └─ ws ping
             ├─ reader       the only reader: decode -> handler table
             └─ stages       StageRun.run, one cancel scope each
                └─ pumps     feed stdin; StageOutput.pump: stdout and stderr -> output messages

A stage is stopped one way only: its scope is cancelled (stage.cancel, its
timeout, the connection's loss, shutdown).  Its shielded cleanup tells its
stage root to SIGTERM the CLI, waits the grace, then closes the root's
command socket: the root kills every process the stage started (see "Stage").

Settings resolve flag > environment (``PGW_SERVER``, ``PGW_TOKEN``,
``PGW_NAME``) > config file > default.  The config lives in ``PGW_HOME``
(default ``~/.pgworker``), mode 0600 in a 0700 directory, written atomically.
The HTTP proxy is the config's ``proxy``, else the one the environment names
as urllib and curl read it (``choose_proxy``); ``run``, ``doctor`` and
``pair`` all use that one choice.  The backend's name then goes to the proxy
unresolved, in the CONNECT request.

The module reads top to bottom: constants (and ``Timing``, every wait of the
daemon), errors, protocol records, pure logic without I/O (URLs, proxies,
settings, frames, stage requests), config files, CLI probing, pairing,
housekeeping, the stage, the connection (and the proxy tunnel), the daemon,
logging, doctor, selftest, install, and the command line, ``main`` last.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import codecs
import collections
import concurrent.futures
import dataclasses
import datetime
import email.utils
import errno
import functools
import hashlib
import http
import json
import logging
import logging.handlers
import math
import os
import platform
import random
import re
import select
import shlex
import shutil
import signal
import socket
import stat
import struct
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import typing
import zlib

try:
    import fcntl
except ImportError:  # Windows: no flock; single-instance checks are skipped
    fcntl = None  # type: ignore[assignment]
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, ClassVar, Literal, Optional, Union

import attrs
import cattrs
import trio
import trio_websocket
import wsproto
import wsproto.connection
import wsproto.events
import wsproto.extensions
import wsproto.frame_protocol
import wsproto.utilities
from cattrs.errors import ClassValidationError, IterableValidationError, IterableValidationNote

__version__ = "0.1.0"

log = logging.getLogger("pgw")

##############################################################################
# Constants
##############################################################################

# PROTOCOL.md: the server only accepts workers speaking version >= 2.
PROTOCOL_VERSION = 2

# pgworker 0.1.2's default for `pair --server`; kept so its docs carry over.
DEFAULT_SERVER = "http://127.0.0.1:8000"

# PROTOCOL.md: machine_name falls back to this when the host has no name.
DEFAULT_MACHINE_NAME = "local-worker"

# PROTOCOL.md, "Files on the user's machine".
DEFAULT_HOME_DIRNAME = ".pgworker"
CONFIG_FILENAME = "config.json"

PAIR_PATH = "/api/local-worker/pair-confirm"
CONNECT_PATH = "/api/local-worker/connect"

# pgworker's pairing timeout (httpx.AsyncClient(timeout=30)).
PAIR_TIMEOUT_S = 30.0
# A pairing answer is a worker_id and a token: more than this is not one.
PAIR_ANSWER_MAX_BYTES = 1024 * 1024
# Far more than any config pgw writes; a bigger file is something else.
CONFIG_MAX_BYTES = 1024 * 1024

# `doctor`: each CLI's `--version` gets 10 s before it counts as hung.
VERSION_PROBE_TIMEOUT_S = 10.0

# The binary looked up on PATH for each CLI, and its key in capabilities.
CLI_CAPABILITY_KEYS = {"claude": "claude_code", "codex": "codex", "deepseek": "deepseek_tui"}

# Keys of config.json that pgworker itself writes; everything else in the
# file is a per-host setting of pgw's.
PAIRING_KEYS = ("server", "worker_id", "token")

# Environment variables that override the config file.
ENV_SERVER, ENV_TOKEN, ENV_NAME, ENV_HOME = "PGW_SERVER", "PGW_TOKEN", "PGW_NAME", "PGW_HOME"
ENV_CAFILE = "PGW_CAFILE"

# The config's `proxy` value that turns proxies off whatever the environment says.
PROXY_NONE = "none"
# An HTTP proxy's answer to CONNECT is a status line and a few headers, a few
# hundred bytes.  Past 64 KiB (http.client's limit for one header line) it is
# not a proxy answering: pgw stops reading rather than hold more.
PROXY_REPLY_MAX_BYTES = 64 * 1024

# How much of a server's error body is worth showing a user on one line.
SERVER_MESSAGE_MAX_CHARS = 200
# How much of a server-supplied string (an id, a bad field) is quoted back in a
# log line or an exit's error: a 5 MiB field must not become a 5 MB log line.
SHOWN_MAX_CHARS = 200
# How many bad elements of one array or object a bad message's error names; the
# rest are counted.  A million wrong elements would otherwise cost a million
# exceptions, gigabytes, and an error (and a log line) many times the message.
BAD_ELEMENTS_SHOWN = 3

# PROTOCOL.md: requests carry up to 50 MiB of files as base64 (~67 MiB).
MESSAGE_MAX_BYTES = 128 * 1024 * 1024
FILES_MAX_BYTES = 50 * 1024 * 1024

# PROTOCOL.md: one output frame carries at most 256 KiB of data.
FRAME_MAX_BYTES = 256 * 1024
# A whole message pgw sends stays under 1 MiB, the default limit of the
# `websockets` library (and so of uvicorn and FastAPI): 256 KiB of control
# bytes escape to 1.5 MiB, so data is also cut on its escaped size, with room
# for the rest of the message (a 200-character id escapes to 1.2 KiB at most).
OUTPUT_MESSAGE_MAX_BYTES = 1024 * 1024
OUTPUT_DATA_MAX_ESCAPED_BYTES = OUTPUT_MESSAGE_MAX_BYTES - 4096
# Pipe reads: a frame's worth, so a fast child costs one frame per read.
PIPE_READ_BYTES = FRAME_MAX_BYTES
# Frames waiting for the WebSocket.  When they are all queued the pumps stop
# reading, so a slow server slows the child: memory stays ~ this * 256 KiB.
# Measured: 4 relays as fast as 16 and keeps peak RSS under 40 MB.
OUTBOX_MAX_FRAMES = 4
# Messages waiting together go out in one write up to this much: acks, exits
# and short output share a syscall and a trip through the stream's lock,
# while 256 KiB output frames still go one at a time, so no more of them
# leaves the outbox at once than before.
SEND_BATCH_MAX_BYTES = 64 * 1024
# The child's stdout/stderr pipes are enlarged to this (Linux F_SETPIPE_SZ):
# with the default 64 KiB pipe a 256 KiB read returns 64 KiB, four times the
# frames and the per-frame work per byte (measured -8% CPU per GiB).
PIPE_BUFFER_BYTES = 1024 * 1024
F_SETPIPE_SZ = 1031

# What execve takes in arguments and environment together (Linux: a quarter of
# the stack limit, at least 128 KiB); a request past it is refused before a slot.
EXEC_MAX_BYTES = os.sysconf("SC_ARG_MAX") if hasattr(os, "sysconf") else 256 * 1024
# Linux also limits each one string, NAME=value or argument, with its NUL, to
# 32 pages (MAX_ARG_STRLEN): past it execve fails with E2BIG.
EXEC_STRING_MAX_BYTES = 32 * os.sysconf("SC_PAGE_SIZE") if sys.platform.startswith("linux") else None
# os.fsencode's codec, for a string it encodes.
FS_ENCODING, FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()

# The spawner reads each request at once; one it has not taken in this long is dead.
SPAWNER_SEND_TIMEOUT_S = 10.0
# At the end of file on its socket the spawner exits at once; this only bounds a stuck one.
SPAWNER_EXIT_WAIT_S = 2.0

# permessage-deflate (RFC 7692) for what pgw sends, when the server accepts it.
# Level 6 with memLevel 8 (zlib's defaults).  Measured on 64 MiB of codex-like
# JSON lines and prose as output messages, through FrameWriter: 3.78x for
# 58 ms of CPU per MiB (framing alone: 1.6).  pgworker (websockets: level 6,
# memLevel 5) gets 3.72x for 68 ms, so this is the cheapest setting that
# sends no more bytes than it; level 1 takes 11 ms but sends 27% more, which
# a slow uplink, the reason to deflate at all, pays for in time.  One
# compressor per connection: a 32 KiB window and about 256 KiB of state.
DEFLATE_LEVEL = 6
DEFLATE_MEM_LEVEL = 8

# Every process a stage starts carries its stage's id, for the CLI's own use
# and for anyone reading `ps e` (pgw itself finds them as the stage root's
# descendants, whatever their environment).
STAGE_ID_ENV = "PGW_STAGE_ID"

# A timeout_s beyond this (31 years) is taken as this: a float holds it.
TIMEOUT_MAX_S = 10**9

# A stage_run_id names a directory: keep it to one sane path component, within
# the 255 bytes a file name may take on Linux's and macOS's file systems.
STAGE_ID_MAX_CHARS = 200
NAME_MAX_BYTES = 255

# PROTOCOL.md: codex rollouts older than this are not read.
CODEX_ROLLOUT_MAX_AGE_S = 3600.0
CODEX_TRACE_HEADER = "=== CODEX TRACE (rollout extract) ==="
# Of a rollout, only its last 4 MiB are read: a long session's file grows to
# hundreds of MiB, and the trace is for the end of it (memory stays flat).
CODEX_ROLLOUT_TAIL_BYTES = 4 * 1024 * 1024

# Files of the daemon's in the pgw home, beside config.json and run.log.
RUN_LOG_FILENAME = "run.log"
LOCK_FILENAME = "run.lock"  # the pid of the one `pgw run` of this home (which flocks the home itself)
STATE_FILENAME = "state.json"  # what `pgw status` shows
SCRATCH_DIRNAME = "scratch"  # the stages' scratch directories (pgworker's too)
SHIV_DIRNAME = "shiv"  # where the pyz unpacks when started by a service (install)
LAUNCHD_LOG_FILENAME = "launchd.log"  # what launchd catches of a start that failed before the log
# A user's own pgw.pyz, an editor's backup, a core dump: a few files.  A
# directory as /etc or /usr/bin holds hundreds, and other directories.
HOME_OTHER_FILES_MAX = 10
STATE_MAX_BYTES = 1 << 20  # what `status` reads of it: the daemon's is under 2 KiB

# Tokens shorter than this are not hidden in the log (see RedactToken).
REDACT_MIN_CHARS = 6

# PROTOCOL.md: run.log is rotated at 1 MB with 5 backups.
LOG_MAX_BYTES = 1_000_000
LOG_BACKUPS = 5


@attrs.frozen
class Timing:
    """Every wait and limit of the daemon, in seconds: tests pass shorter ones."""

    # PROTOCOL.md: the server keeps a worker online for 45 s after each
    # application ping; one every 30 s leaves a 15 s margin.
    heartbeat_s: float = 30.0
    # Each heartbeat also asks whether the path is alive: anything arriving
    # after it is the answer.  Bytes, not pongs, are the evidence, since a 30 MB
    # request arriving at 1 MB/s delays the server's pong behind it but is
    # plainly alive.  An idle connection thus costs one exchange per heartbeat.
    # The server may leave a heartbeat unanswered, so after this long with
    # nothing arriving pgw sends a WebSocket ping, which must be answered ...
    heartbeat_answer_s: float = 4.0
    # ... and an idle connection is dead if nothing arrived this long after the
    # ping.  A path that goes silent is noticed within 30 + 4 + 9 = 43 s and
    # replaced within the 45 s the server keeps the worker online.
    ws_pong_wait_s: float = 9.0
    # While stages run, their kill grace comes before the reconnection, so the
    # path is asked sooner: a WebSocket ping after this long with nothing
    # arriving ...
    ws_ping_after_s: float = 15.0
    # ... and the connection is dead after this long: 30 s, plus the 10 s kill
    # grace and a 1 s retry, stays under 45 s.  A falsely dead connection
    # would kill the stages, so a live server gets 15 s to answer a ping, as
    # long as a full socket buffer may take to drain ahead of it on a slow link.
    silence_limit_s: float = 30.0
    # TCP+TLS and the WebSocket handshake.  Kept short: an untrusted
    # certificate or a black-holed port must not stall the reconnect loop.
    connect_timeout_s: float = 15.0
    # Closing the WebSocket politely at shutdown before dropping the stream.
    close_timeout_s: float = 3.0
    # Reconnect within 1 s of a loss, then double with jitter up to 60 s; a
    # connection that stayed up 60 s resets the schedule.
    reconnect_first_s: float = 1.0
    reconnect_cap_s: float = 60.0
    reconnect_reset_after_s: float = 60.0
    # While pgw cannot connect, the log says so when the cause changes, then
    # reminds at growing intervals (1 min, doubling to 1 h): a user reading the
    # log hours later sees it still tries, not a screenful of retries.
    reconnect_reminder_s: float = 60.0
    reconnect_reminder_cap_s: float = 3600.0
    # SIGTERM, then SIGKILL this much later (cancel, timeout, loss) ...
    cancel_grace_s: float = 10.0
    # ... and at shutdown, where a user or systemd is waiting.
    shutdown_grace_s: float = 5.0
    # After the CLI exits, what is left in its pipes gets this long; then the
    # stage's other processes die, so one holding a pipe cannot hold the stage.
    pipe_drain_grace_s: float = 2.0
    # After SIGKILL a process is gone at once unless the kernel is stuck on it.
    kill_wait_s: float = 5.0
    # A stage root reports its CLI's pid once the exec is done: a cold CLI on a
    # slow disk takes seconds; a spawner that has not forked one in this long
    # (stopped, stuck) is killed and the stage refused.
    spawner_answer_s: float = 30.0
    # A stage root runs stage after stage (a new one costs about 1 ms of CPU,
    # the spawner's fork and the root's first pages); one left without a stage
    # this long is ended, since its memory is the user's.
    root_idle_s: float = 30.0
    # How stale `pgw status` may be, at most.
    state_write_interval_s: float = 0.5
    # A state file write that failed (a full disk) is tried again this often.
    state_retry_s: float = 10.0
    # An idle daemon writes nothing: this often it looks (a stat) whether its
    # state file is still there, and writes it again if someone removed it.
    state_check_s: float = 30.0

##############################################################################
# Errors
##############################################################################


class PgwError(Exception):
    """Root of every error pgw reports to a user: one line, fact and fix."""

    exit_code = 1


class UsageError(PgwError):
    """The command line is wrong: a bad flag or a missing argument."""

    exit_code = 2


class ConfigError(PgwError):
    """The config file or a setting is unusable: fix it or pair again."""


class NotPairedError(PgwError):
    """No token anywhere: the user has to pair first."""


class PairingError(PgwError):
    """The pairing request failed; the old config is untouched."""


class ProtocolError(PgwError):
    """A message off the wire does not follow PROTOCOL.md.

    `message` is the decoded JSON object when there was one, so the reader
    can still answer a bad stage.request by its stage_run_id.
    """

    def __init__(self, text: str, message: Optional[dict[str, Any]] = None) -> None:
        super().__init__(text)
        self.message = message


class StageRejected(PgwError):
    """A stage.request that cannot be run; the text becomes its exit's error."""


class ConnectionLost(PgwError):
    """The WebSocket is gone or unusable; the worker reconnects."""


class ProxyError(PgwError):
    """The HTTP proxy cannot be reached or refused the tunnel; the worker retries.
    The message names the proxy as http://HOST:PORT, never its credentials."""


##############################################################################
# Protocol records
##############################################################################
# One frozen attrs class per message, grouped by direction.  The class
# attribute TYPE is the wire's `type` tag; it is not a field.

CliName = Literal["codex", "claude", "deepseek"]
StdinMode = Literal["stdin", "argv_last"]
CancelSignal = Literal["SIGTERM", "SIGKILL"]


# Server -> worker ------------------------------------------------------------


@attrs.frozen
class StageRequest:
    TYPE: ClassVar[str] = "stage.request"
    stage_run_id: str
    job_id: str
    cli: CliName
    cli_args: list[str]
    stdin: str
    stdin_mode: StdinMode = "stdin"
    files: dict[str, str] = attrs.field(factory=dict)
    timeout_s: int = 7200
    env: dict[str, str] = attrs.field(factory=dict)


@attrs.frozen
class StageCancel:
    TYPE: ClassVar[str] = "stage.cancel"
    stage_run_id: str
    signal: CancelSignal = "SIGTERM"


@attrs.frozen
class Pong:
    TYPE: ClassVar[str] = "pong"


# Worker -> server ------------------------------------------------------------


@attrs.frozen
class Hello:
    TYPE: ClassVar[str] = "hello"
    machine_name: str
    capabilities: dict[str, Any]


@attrs.frozen
class Ping:
    TYPE: ClassVar[str] = "ping"
    ts: float


@attrs.frozen
class StageAck:
    TYPE: ClassVar[str] = "stage.ack"
    stage_run_id: str
    pid: int


@attrs.frozen
class StageStdout:
    TYPE: ClassVar[str] = "stage.stdout"
    stage_run_id: str
    seq: int
    data: str


@attrs.frozen
class StageStderr:
    TYPE: ClassVar[str] = "stage.stderr"
    stage_run_id: str
    seq: int
    data: str


@attrs.frozen
class StageExit:
    TYPE: ClassVar[str] = "stage.exit"
    stage_run_id: str
    returncode: int
    duration_ms: int
    error: Optional[str] = None


Record = Union[
    StageRequest, StageCancel, Pong, Hello, Ping, StageAck, StageStdout, StageStderr, StageExit
]
RECORD_TYPES: dict[str, type] = {cls.TYPE: cls for cls in typing.get_args(Record)}


def _strict_converter() -> cattrs.Converter:
    """A converter that checks instead of coercing.

    cattrs' default hooks coerce (`"ls"` becomes `['l', 's']`, `1` becomes
    `"1"`) and let any value through a Literal with a vague message: every
    scalar, container and literal used by the records gets a strict hook.
    """
    converter = cattrs.Converter(detailed_validation=True)

    def structure_str(value: Any, _: type) -> str:
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {_json_kind(value)}")
        return value

    def structure_int(value: Any, _: type) -> int:
        if type(value) is not int:
            raise TypeError(f"expected an integer, got {_json_kind(value)}")
        return value

    def structure_float(value: Any, _: type) -> float:
        if type(value) not in (int, float):
            raise TypeError(f"expected a number, got {_json_kind(value)}")
        return float(value)

    def structure_any(value: Any, _: type) -> Any:
        return value

    def structure_literal(value: Any, literal: type) -> Any:
        allowed = typing.get_args(literal)
        if not isinstance(value, str) or value not in allowed:
            raise ValueError(f"{shown(value)} is not one of {', '.join(allowed)}")
        return value

    converter.register_structure_hook(str, structure_str)
    converter.register_structure_hook(int, structure_int)
    converter.register_structure_hook(float, structure_float)
    converter.register_structure_hook_func(lambda t: t is Any, structure_any)
    converter.register_structure_hook_func(
        lambda t: typing.get_origin(t) is Literal, structure_literal
    )
    for container, kind in ((list[str], list), (dict[str, str], dict), (dict[str, Any], dict)):
        _require_container(converter, container, kind)
    return converter


def _require_container(converter: cattrs.Converter, container: Any, kind: type) -> None:
    """Only a real JSON array/object passes for `container`, of strings where
    it says so (JSON keys are strings already); a bad one names its first
    BAD_ELEMENTS_SHOWN bad elements, as cattrs would, and counts the rest."""
    wanted = "an array" if kind is list else "an object"
    of_strings = typing.get_args(container)[-1] is str

    def structure(value: Any, _: type) -> Any:
        if not isinstance(value, kind):
            raise TypeError(f"expected {wanted}, got {_json_kind(value)}")
        if of_strings:
            items = enumerate(value) if kind is list else value.items()
            bad = [(index, element) for index, element in items if not isinstance(element, str)]
            if bad:
                raise _bad_elements(container, bad)
        return kind(value)

    converter.register_structure_hook_func(lambda t: t == container, structure)


def _bad_elements(container: Any, bad: list[tuple[Union[int, str], Any]]) -> IterableValidationError:
    errors: list[Exception] = []
    for index, element in bad[:BAD_ELEMENTS_SHOWN]:
        error = TypeError(f"expected a string, got {_json_kind(element)}")
        error.__notes__ = [IterableValidationNote(f"Structuring @ {index!r}", index, str)]
        errors.append(error)
    if len(bad) > BAD_ELEMENTS_SHOWN:
        errors.append(ValueError(f"{len(bad) - BAD_ELEMENTS_SHOWN} more elements are not strings"))
    return IterableValidationError(f"While structuring {container!r}", errors, container)


def shown(value: Any) -> str:
    """A server-supplied value as it may appear in a log line or an error: its
    repr (a newline in it cannot forge a log line), cut to SHOWN_MAX_CHARS."""
    if isinstance(value, str) and len(value) > SHOWN_MAX_CHARS:
        return f"{value[:SHOWN_MAX_CHARS]!r}... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= SHOWN_MAX_CHARS else f"{text[:SHOWN_MAX_CHARS]}... ({len(text)} characters)"


def whole_number(text: str) -> Optional[int]:
    """`text` as a whole number >= 0 if it is ASCII digits only, else None
    (str.isdigit() also takes "²", which int() does not)."""
    return int(text) if text.isascii() and text.isdigit() else None


def printable(text: str) -> str:
    """A server-supplied name for a terminal or a log line: as it is when every
    character prints, else `shown` (no escape sequence, no forged second line)."""
    return text if text.isprintable() and len(text) <= SHOWN_MAX_CHARS else shown(text)


def _json_kind(value: Any) -> str:
    """Name a decoded JSON value as the server's developers would: `a string 'x'`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"a number {value!r}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"a string {shown!r}"
    return "an array" if isinstance(value, list) else "an object"


_converter = _strict_converter()


def _validation_messages(exc: BaseException, path: str = "") -> list[str]:
    """Flatten a cattrs validation error into `where: what` lines."""
    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        with_notes, without = exc.group_exceptions()
        messages = []
        for inner, note in with_notes:
            if isinstance(exc, ClassValidationError):
                where = f"{path}.{note.name}" if path else note.name
            else:
                where = f"{path}[{shown(note.index)}]"
            messages.extend(_validation_messages(inner, where))
        for inner in without:
            messages.extend(_validation_messages(inner, path))
        return messages
    what = "required field missing" if isinstance(exc, KeyError) else str(exc)
    return [f"{path}: {what}" if path else what]


def encode(record: Record) -> str:
    """A record as compact JSON, non-ASCII kept as UTF-8.

    Output messages, nearly all pgw sends, are made without the record or
    cattrs by `output_message` (a test holds the two equal).
    """
    if type(record) is StageStdout or type(record) is StageStderr:
        return output_message(type(record), record.stage_run_id, record.seq, _json_string(record.data).encode()).decode()
    message = {"type": record.TYPE, **_converter.unstructure(record)}
    text = json.dumps(message, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text if _utf8_encodable(text) else json.dumps(message, separators=(",", ":"), allow_nan=False)


def wire(record: Record) -> bytes:
    """`encode(record)` as the WebSocket carries it: UTF-8."""
    return encode(record).encode("utf-8")


def escaped_output(text: str) -> list[bytes]:
    """A stream's text as the `data` of output messages: JSON string literals
    (UTF-8), each of at most 256 KiB of text and at most
    OUTPUT_DATA_MAX_ESCAPED_BYTES escaped, never cutting a character."""
    pieces: list[bytes] = []
    for piece in split_text(text):
        _escape_into(piece, pieces)
    return pieces


def _escape_into(piece: str, pieces: list[bytes]) -> None:
    escaped = _json_string(piece).encode("utf-8")
    if len(escaped) <= OUTPUT_DATA_MAX_ESCAPED_BYTES or len(piece) < 2:
        pieces.append(escaped)
    else:  # control characters escape to six bytes each: halve until it fits
        half = len(piece) // 2
        _escape_into(piece[:half], pieces)
        _escape_into(piece[half:], pieces)


def escaped_utf8(data: bytes) -> list[bytes]:
    """`escaped_output(data.decode())`, done on the bytes; UnicodeDecodeError
    when `data` is not UTF-8.

    JSON escapes only `"`, `\\` and the bytes below 0x20, and none of them
    occurs inside a multi-byte UTF-8 character: read as Latin-1 (one byte per
    character, the json module's fastest case), escaped and written back as
    Latin-1, the UTF-8 comes out escaped and otherwise untouched.  For output
    full of non-ASCII characters (Lean's, TeX's) this costs about a third of
    decoding and encoding it.
    """
    if not data.isascii():
        data.decode("utf-8")  # only the check: a message carries valid UTF-8
    pieces: list[bytes] = []
    start = 0
    while start < len(data):
        end = utf8_boundary(data, start + FRAME_MAX_BYTES)
        _escape_bytes_into(data[start:end], pieces)
        start = end
    return pieces


def escaped_read(data: bytes, ended: bool) -> tuple[list[bytes], bytes]:
    """A pipe read (after what the last one cut off) as escaped pieces, and the
    character cut off at its end, which waits for the next read; at the end of
    the stream nothing waits.  Bytes that are not UTF-8 become U+FFFD, as a
    decoder's "replace" makes them."""
    cut_off = b""
    if not ended and not data.isascii():
        whole = utf8_cut_off(data)
        data, cut_off = data[:whole], data[whole:]
    try:
        return escaped_utf8(data), cut_off
    except UnicodeDecodeError:
        return escaped_output(data.decode("utf-8", "replace")), cut_off


def utf8_boundary(data: bytes, end: int) -> int:
    """`end` (at most len(data)), moved back to the start of the character it falls in."""
    end = min(end, len(data))
    while 0 < end < len(data) and data[end] & 0xC0 == 0x80:  # a continuation byte
        end -= 1
    return end


def utf8_cut_off(data: bytes) -> int:
    """Where a character cut off at the end of `data` starts; len(data) if none is."""
    for back in range(1, min(3, len(data)) + 1):
        lead = data[-back]
        if lead & 0xC0 != 0x80:
            size = 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 else 1
            return len(data) - back if size > back else len(data)
    return len(data)


def _escape_bytes_into(piece: bytes, pieces: list[bytes]) -> None:
    escaped = json_string_bytes(piece)
    if len(escaped) <= OUTPUT_DATA_MAX_ESCAPED_BYTES or len(piece) < 8:
        pieces.append(escaped)
    else:  # control characters escape to six bytes each: halve until it fits
        half = utf8_boundary(piece, len(piece) // 2)
        _escape_bytes_into(piece[:half], pieces)
        _escape_bytes_into(piece[half:], pieces)


def output_message(record_type: type, stage_run_id: str, seq: int, data: bytes) -> bytes:
    """A stage.stdout/stderr message as sent, around `data` from `escaped_output`:
    equal to `wire(record_type(stage_run_id, seq, text))`."""
    head = f'{{"type":"{record_type.TYPE}","stage_run_id":{_json_string(stage_run_id)},"seq":{int(seq)},"data":'
    return b"".join((head.encode("utf-8"), data, b"}"))


def ack_message(stage_run_id: str, pid: int) -> bytes:
    """`wire(StageAck(stage_run_id, pid))` without cattrs, a dict or json.dumps:
    sent once per stage (a test holds the two equal)."""
    if not _utf8_encodable(stage_run_id):  # json.dumps' other way, which escapes all non-ASCII
        return wire(StageAck(stage_run_id, pid))
    return f'{{"type":"stage.ack","stage_run_id":{_encode_basestring(stage_run_id)},"pid":{pid}}}'.encode("utf-8")


def stage_id_fits(stage_run_id: str) -> bool:
    """Whether a message naming `stage_run_id` stays under 1 MiB whatever else
    it says: its JSON form leaves the room an output message's data does."""
    encoded = json.dumps(stage_run_id, ensure_ascii=not _utf8_encodable(stage_run_id)).encode("utf-8")
    return len(encoded) <= OUTPUT_DATA_MAX_ESCAPED_BYTES


def exit_message_within_limit(record: StageExit) -> bytes:
    """`exit_message(record)`, its error cut short (ending "...") where the whole
    would pass the 1 MiB a server may take: a refused request's error can name
    the server's own oversized fields.  (Its id was checked to leave room.)"""
    message = exit_message(record)
    if len(message) <= OUTPUT_MESSAGE_MAX_BYTES or not record.error:
        return message
    error, fits, over = record.error, 0, len(record.error)  # keeping `fits` characters fits, `over` does not
    while over - fits > 1:  # a character escapes to up to 12 bytes: search, not estimate
        middle = (fits + over) // 2
        if len(exit_message(attrs.evolve(record, error=error[:middle] + "..."))) <= OUTPUT_MESSAGE_MAX_BYTES:
            fits = middle
        else:
            over = middle
    return exit_message(attrs.evolve(record, error=error[:fits] + "..."))


def exit_message(record: StageExit) -> bytes:
    """`wire(record)` without cattrs, a dict or json.dumps: sent once per stage
    (a test holds the two equal)."""
    error = record.error
    if not (_utf8_encodable(record.stage_run_id) and (error is None or _utf8_encodable(error))):
        return wire(record)
    return (
        f'{{"type":"stage.exit","stage_run_id":{_encode_basestring(record.stage_run_id)},'
        f'"returncode":{record.returncode},"duration_ms":{record.duration_ms},'
        f'"error":{"null" if error is None else _encode_basestring(error)}}}'
    ).encode("utf-8")


# json.dumps(text, ensure_ascii=False) without its per-call Python overhead.
_encode_basestring = json.encoder.encode_basestring  # type: ignore[attr-defined]

# The bytes JSON escapes as \u00XX (or \b, \f): rare in a CLI's output, unlike
# the newline, the tab and the carriage return, which bytes.replace escapes.
_RARE_CONTROLS = [bytes((byte,)) for byte in range(0x20) if byte not in b"\t\n\r"]
# Below this the json module's loop is as fast as the 29 scans alone (measured).
JSON_REPLACE_MIN_BYTES = 4096


def json_string_bytes(data: bytes) -> bytes:
    """`_encode_basestring(data.decode("latin-1")).encode("latin-1")`: `data` as a
    JSON string literal, byte for byte (a test holds the two equal).

    Without a rare control character, five bytes.replace and 29 memchr scans
    do it in about a quarter of the time of the json module's per-character
    loop (90 against 370 us for 120 KiB of lines).  The scans cost a few
    microseconds whatever the size: short output goes the json module's way.
    """
    if len(data) < JSON_REPLACE_MIN_BYTES or any(control in data for control in _RARE_CONTROLS):
        return _encode_basestring(data.decode("latin-1")).encode("latin-1")
    escaped = data.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
    escaped = escaped.replace(b"\n", b"\\n").replace(b"\r", b"\\r").replace(b"\t", b"\\t")
    return b"".join((b'"', escaped, b'"'))


def _utf8_encodable(text: str) -> bool:
    """False for a string with a lone surrogate, which JSON allows (as `\\ud800`)
    and a server may send, but which cannot go out as UTF-8 unescaped."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_string(text: str) -> str:
    if _utf8_encodable(text):
        return _encode_basestring(text)
    return json.dumps(text)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _leniently(text: Union[str, bytes]) -> Optional[dict[str, Any]]:
    """A message that is not JSON only by a BOM, NaN or Infinity (Python's
    json.dumps writes them by default) or a number past Python's 4,300 digits,
    read as far as it goes: never run, only to name the request to refuse."""
    try:
        loose = json.loads(
            text.lstrip("\ufeff") if isinstance(text, str) else text.removeprefix(codecs.BOM_UTF8),
            parse_int=lambda _: 0, parse_float=lambda _: 0.0,
        )
    except (ValueError, RecursionError):
        return None
    return loose if isinstance(loose, dict) else None


def decode(text: Union[str, bytes]) -> Record:
    """A wire message as its record, or ProtocolError."""
    repeated: list[str] = []  # keys given twice in one object, which json.loads lets the last of win

    def object_noting_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen: set[str] = set()
            repeated.extend(key for key, _ in pairs if key in seen or seen.add(key))  # type: ignore[func-returns-value]
        return obj

    try:
        message = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=object_noting_repeats)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", _leniently(text)) from None
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"not JSON: {exc}", _leniently(text)) from None
    except ValueError as exc:  # NaN, or a number of more digits than Python converts
        reason = "a number of more digits than 4300" if "digits" in str(exc) else str(exc)
        raise ProtocolError(f"not JSON: {reason}", _leniently(text)) from None
    except RecursionError:
        raise ProtocolError("not JSON that pgw can read: nested too deep") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"expected a JSON object, got {_json_kind(message)}")
    if repeated:  # `type` twice made a request a cancel; which of two values the server meant is not pgw's guess
        raise ProtocolError(f"{shown(repeated[0])} given twice in one object", message)
    if "type" not in message:
        raise ProtocolError("type: required field missing", message)
    tag = message["type"]
    record_type = RECORD_TYPES.get(tag) if isinstance(tag, str) else None
    if record_type is None:
        raise ProtocolError(f"type: {shown(tag)} is not one of {', '.join(RECORD_TYPES)}", message)
    try:
        return _converter.structure(message, record_type)
    except (ClassValidationError, IterableValidationError) as exc:
        details = "; ".join(_validation_messages(exc))
        raise ProtocolError(f"{tag}: {details}", message) from None


##############################################################################
# Pure logic: URLs, settings, config contents
##############################################################################


def normalise_server_url(url: str) -> str:
    """The server URL as stored: http(s) only, host required, no trailing `/`."""
    cleaned = url.strip().rstrip("/")
    if any(char.isspace() or not char.isprintable() for char in cleaned):  # urllib would send it, or cut it
        raise ConfigError(f"bad server URL {shown(url)}: it holds a space or a control character")
    # The part before the host's end, however many slashes (`http:/u:p@h`, `//u:p@h`).
    authority = re.split(r"[/?#]", re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*:)?/*", "", cleaned), maxsplit=1)[0]
    if "@" in authority:  # not quoted back: it may hold a password, which pgw would show everywhere
        raise ConfigError("bad server URL: it names a user (USER@ or USER:PASSWORD@), which pgw never sends; drop it")
    try:
        parsed = urllib.parse.urlsplit(cleaned)
    except ValueError as exc:  # "Invalid IPv6 URL": a `[` without its `]`
        raise ConfigError(f"bad server URL {shown(url)}: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(
            f"bad server URL {shown(url)}: expected http://HOST[:PORT] or https://HOST[:PORT]"
        )
    try:
        parsed.port
    except ValueError:
        raise ConfigError(f"bad server URL {shown(url)}: the port is not a number from 0 to 65535") from None
    if parsed.query or parsed.fragment:
        raise ConfigError(f"bad server URL {shown(url)}: drop the part after `?` or `#`")
    return cleaned


def websocket_resource(server: str, token: str) -> str:
    """PROTOCOL.md: what the handshake asks for: the server URL's own path (a
    prefix a reverse proxy serves the backend under, which pairing's URL keeps
    too), the connect path, the quoted token."""
    prefix = urllib.parse.quote(urllib.parse.urlsplit(server).path.rstrip("/"), safe="/%:@!$&'()*+,;=~")
    return f"{prefix}{CONNECT_PATH}?token={urllib.parse.quote(token, safe='')}"


@attrs.frozen
class Proxy:
    """An HTTP proxy to reach the server through, with a CONNECT tunnel."""

    host: str
    port: int
    source: str  # where it was named, for messages: "the config's `proxy`", "https_proxy in the environment"
    # The Proxy-Authorization value when the URL carries USER:PASSWORD.  It is
    # as good as the password: out of repr, so no message or traceback shows it.
    authorization: Optional[str] = attrs.field(default=None, repr=False)

    @property
    def url(self) -> str:
        """http://HOST:PORT: the only form of the proxy pgw ever shows."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def parse_proxy_url(text: str, source: str) -> Proxy:
    """An http://[USER:PASSWORD@]HOST[:PORT] proxy, or ConfigError naming
    `source`.  No message quotes the URL: it may carry a password."""
    expected = "expected http://[USER:PASSWORD@]HOST:PORT"
    cleaned = text.strip()
    # A bare HOST:PORT is an http:// proxy to urllib and curl alike.
    try:
        parsed = urllib.parse.urlsplit(cleaned if "://" in cleaned else "http://" + cleaned)
    except ValueError as exc:  # "Invalid IPv6 URL"
        raise ConfigError(f"{source}: {exc}: {expected}") from None
    if parsed.scheme != "http":
        raise ConfigError(
            f"{source}: the proxy is {parsed.scheme}://, but pgw talks to proxies in plain HTTP only: {expected}"
        )
    try:
        port = parsed.port
    except ValueError:
        raise ConfigError(f"{source}: the proxy's port is not a number from 0 to 65535: {expected}") from None
    if not parsed.hostname:
        raise ConfigError(f"{source}: the proxy URL names no host: {expected}")
    if parsed.path not in ("", "/") or parsed.query or parsed.fragment:
        raise ConfigError(f"{source}: a proxy URL has no path, `?` or `#`: {expected}")
    authorization = None
    if parsed.username is not None:
        # Percent-decoded, as urllib and curl do: `p%40ss` is the password `p@ss`.
        credentials = f"{urllib.parse.unquote(parsed.username)}:{urllib.parse.unquote(parsed.password or '')}"
        authorization = "Basic " + base64.b64encode(credentials.encode("utf-8")).decode("ascii")
    return Proxy(parsed.hostname, 80 if port is None else port, source, authorization)


def environment_proxies(environ: typing.Mapping[str, str]) -> dict[str, str]:
    """`scheme -> proxy URL` from the *_proxy variables (`no`: no_proxy), read
    as urllib's getproxies_environment reads os.environ (it takes no mapping):
    lower case wins over upper case, an empty lower-case one unsets both, and
    under CGI (REQUEST_METHOD set) HTTP_PROXY may come from a client's header."""
    proxies: dict[str, str] = {}
    for name, value in environ.items():
        if value and name[-6:].lower() == "_proxy":
            proxies[name[:-6].lower()] = value
    if "REQUEST_METHOD" in environ:
        proxies.pop("http", None)
    for name, value in environ.items():
        if name[-6:] == "_proxy":
            if value:
                proxies[name[:-6].lower()] = value
            else:
                proxies.pop(name[:-6].lower(), None)
    return proxies


def choose_proxy(server: str, setting: Optional[str], environ: typing.Mapping[str, str]) -> Optional[Proxy]:
    """The HTTP proxy to reach `server` through; None: connect directly.

    The config's `proxy` wins: a URL is always used, `none` never.  Else the
    environment, as urllib and curl read it: https_proxy for an https://
    server, http_proxy for http://, all_proxy for either; no_proxy (`*`, a
    host, a domain suffix with or without its leading dot, host:port, an IP
    address) names the servers reached directly, matched by urllib itself.
    """
    if setting == PROXY_NONE:
        return None
    if setting:
        return parse_proxy_url(setting, "the config's `proxy`")
    parsed = urllib.parse.urlsplit(server)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    proxies = environment_proxies(environ)
    # With the port always given, a no_proxy entry host:443 matches https://host too.
    if urllib.request.proxy_bypass_environment(f"{parsed.hostname}:{port}", proxies):
        return None
    for scheme in (parsed.scheme, "all"):
        if proxies.get(scheme):
            return parse_proxy_url(proxies[scheme], f"{scheme}_proxy in the environment")
    return None


def proxy_setting(value: str) -> str:
    """`pgw config set proxy VALUE`: `none`, or a proxy URL as stored (scheme included)."""
    cleaned = value.strip()
    if cleaned.lower() == PROXY_NONE:
        return PROXY_NONE
    try:
        parse_proxy_url(cleaned, "proxy")
    except ConfigError as exc:
        raise UsageError(f"{exc} (or `none` to connect directly)") from None
    return cleaned if "://" in cleaned else "http://" + cleaned


def without_password(setting: str) -> str:
    """A proxy setting as `config show` prints it: the password hidden."""
    parsed = urllib.parse.urlsplit(setting if "://" in setting else "http://" + setting)
    if parsed.password is None:
        return setting
    netloc = f"{parsed.username}:<hidden>@{parsed.netloc.rpartition('@')[2]}"
    return urllib.parse.urlunsplit(parsed._replace(netloc=netloc))


@attrs.frozen
class Settings:
    """What a command runs with, resolved from flags, environment, config and defaults."""

    server: str
    token: Optional[str] = None
    worker_id: Optional[str] = None
    name: str = DEFAULT_MACHINE_NAME
    cafile: Optional[str] = None
    max_stages: int = 0
    stage_env: dict[str, str] = attrs.field(factory=dict)  # config `env`, under each request's own
    # config `proxy`: a proxy URL, `none`, or None to follow the environment (see
    # choose_proxy).  It may carry a password: out of repr.
    proxy: Optional[str] = attrs.field(default=None, repr=False)
    compression: bool = True  # offer permessage-deflate (config `compression`: on or off)
    # Where each setting taken from a flag, the environment or config.json
    # came from, for the message that says it is wrong: a PGW_SERVER set in a
    # crontab long ago is not where a user looks.
    given_by: dict[str, str] = attrs.field(factory=dict, repr=False, eq=False)


def cli_search_path(stage_env: typing.Mapping[str, str], environ: typing.Mapping[str, str]) -> str:
    """Where the CLIs are looked up: the config's env.PATH, else pgw's own PATH."""
    return stage_env.get("PATH") or environ.get("PATH") or os.defpath


def resolve_settings(
    flags: dict[str, Any],
    environ: typing.Mapping[str, str],
    config: dict[str, Any],
    hostname: str,
) -> Settings:
    """flag > environment > config file > default, for each setting."""

    given_by: dict[str, str] = {}

    def pick(key: str, env_name: Optional[str]) -> Any:
        from_env = environ.get(env_name) if env_name else None
        sources = (f"--{key.replace('_', '-')}", env_name or "", f"`{key}` in {CONFIG_FILENAME}")
        for candidate, source in zip((flags.get(key), from_env, config.get(key)), sources):
            if candidate is not None and candidate != "":
                given_by[key] = source
                # Bytes that are not UTF-8 (an argument or variable in another
                # encoding) can go neither to the server nor into the config;
                # a CA file's path only goes to the OS, which takes them.
                if key != "cafile" and isinstance(candidate, str) and not _utf8_encodable(candidate):
                    given = "" if key == "token" else f", {shown(candidate)},"  # a secret is not echoed
                    raise ConfigError(f"the {key} given{given} is not valid UTF-8 text")
                return candidate
        return None

    try:
        server = normalise_server_url(pick("server", ENV_SERVER) or DEFAULT_SERVER)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (the server URL set by {given_by['server']})") from None
    name = pick("name", ENV_NAME) or hostname or DEFAULT_MACHINE_NAME
    if holds_control_character(name):  # the server shows it, and a newline there could forge a line
        raise ConfigError(f"the name {shown(name)} holds a control character (a newline, say): use a plain name")
    return Settings(
        server=server,
        token=pick("token", ENV_TOKEN),
        worker_id=config.get("worker_id"),
        name=name,
        cafile=pick("cafile", ENV_CAFILE),
        max_stages=pick("max_stages", None) or 0,
        stage_env=dict(config.get("env") or {}),
        proxy=config.get("proxy"),
        compression=config.get("compression", "on") == "on",
        given_by=given_by,
    )


# Marks that reorder the text after them (U+202E and its kin).
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def holds_control_character(text: str) -> bool:
    """A newline or another control character; U+2028, U+2029 and U+0085 too,
    where Python's splitlines (and some editors) also end a line; and the
    marks that reorder text (U+202E), which make a shown line lie."""
    return any(unicodedata.category(char) in ("Cc", "Zl", "Zp") or char in BIDI_CONTROLS for char in text)


def parse_config(text: str, path: Path, checked: bool = True) -> dict[str, Any]:
    """A config file's contents: a JSON object, its settings checked (`check_config`) unless not `checked`."""
    fix = "fix it, or delete it and pair again with `pgw pair CODE --server URL`"
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON (line {exc.lineno}): {fix}") from None
    except ValueError as exc:  # a number of more digits than Python converts (4300)
        raise ConfigError(f"{path} is no config of pgw's ({exc}): {fix}") from None
    except RecursionError:
        raise ConfigError(f"{path} is nested too deep to be a config: {fix}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a JSON object: {fix}")
    if checked:
        check_config(config, path)
    return config


def check_config(config: dict[str, Any], path: Path) -> None:
    """ConfigError naming the first setting of `config` pgw cannot use, and the way to fix it."""
    for key in PAIRING_KEYS + ("name", "cafile", "proxy"):
        if key in config and not isinstance(config[key], str):
            raise ConfigError(f"{path}: {key!r} must be a string: {_config_fix(key)}")
    if config.get("proxy", PROXY_NONE) != PROXY_NONE:
        parse_proxy_url(config["proxy"], f"{path}: 'proxy'")
    max_stages = config.get("max_stages", 0)
    if type(max_stages) is not int or max_stages < 0:
        raise ConfigError(f"{path}: 'max_stages' must be a whole number >= 0: {_config_fix('max_stages')}")
    env = config.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise ConfigError(f"{path}: 'env' must be an object of strings: {_config_fix('env')}")
    for name, value in env.items():  # what no process can be started with: every stage would fail
        if not name or "=" in name or "\0" in name + value or not (_fs_encodable(name) and _fs_encodable(value)):
            raise ConfigError(
                f"{path}: 'env': {shown(name)} is not a variable a program can be started with "
                f"(empty, or holding `=`, a NUL, or what this system cannot encode): {_config_fix('env.' + name)}"
            )
    if config.get("compression", "on") not in COMPRESSION_VALUES:
        raise ConfigError(f"{path}: 'compression' must be \"on\" or \"off\": {_config_fix('compression')}")


def _config_fix(key: str) -> str:
    """How to fix a config's `key`: a host setting with `pgw config`, a pairing by pairing again."""
    if key in PAIRING_KEYS[1:]:
        return "fix it, or delete it and pair again with `pgw pair CODE --server URL`"
    return f"`pgw config set {key} VALUE` or `pgw config unset {key}` fixes it"


# `pgw config set KEY VALUE`: the per-host settings and how each is checked.
HOST_SETTINGS = ("server", "name", "cafile", "max_stages", "proxy", "compression", "env.NAME")
# `compression off` makes pgw offer no permessage-deflate, for a host whose
# CPU is scarcer than its bandwidth.
COMPRESSION_VALUES = ("on", "off")


def set_host_setting(config: dict[str, Any], key: str, value: str) -> dict[str, Any]:
    """The config with KEY set to VALUE, checked; UsageError names what is wrong."""
    if not (_utf8_encodable(key) and _utf8_encodable(value)):  # the config is UTF-8 JSON
        raise UsageError(f"{shown(key)} = {shown(value)}: not valid UTF-8 text, which the config cannot hold")
    updated = dict(config)
    if key == "server":
        try:
            updated["server"] = normalise_server_url(value)
        except ConfigError as exc:  # a value given wrong is a usage error, as for every other key
            raise UsageError(f"server: {exc}") from None
    elif key == "name":
        if holds_control_character(value):
            raise UsageError(f"name: {shown(value)} holds a control character (a newline, say): use a plain name")
        updated["name"] = value
    elif key == "cafile":
        cafile = Path(value).expanduser().resolve()
        if not cafile.is_file():
            raise UsageError(f"cafile: {value!r} is not a file")
        try:  # saved, one that is not would stop `run` from starting, even for an http:// server
            make_ssl_context(str(cafile), "the file given")
        except ConfigError as exc:
            raise UsageError(f"cafile: {exc}") from None
        updated["cafile"] = str(cafile)
    elif key == "max_stages":
        max_stages = whole_number(value)
        if max_stages is None:
            raise UsageError(f"max_stages: expected a whole number >= 0, got {value!r}")
        updated["max_stages"] = max_stages
    elif key == "proxy":
        updated["proxy"] = proxy_setting(value)
    elif key == "compression":
        if value not in COMPRESSION_VALUES:
            raise UsageError(f"compression: expected on or off, got {value!r}")
        updated["compression"] = value
    elif key.startswith("env."):
        check_stage_env_name(key[4:])
        if "\0" in value:
            raise UsageError(f"{key}: the value contains a NUL character, which no environment can hold")
        updated["env"] = {**config.get("env", {}), key[4:]: value}
    else:
        raise UsageError(f"unknown setting {key!r}: use one of {', '.join(HOST_SETTINGS)}")
    return updated


def check_stage_env_name(name: str) -> None:
    """UsageError unless NAME can be set in a stage's environment by `env.NAME`.

    PGW_ names are pgw's own: the stage id and tag it gives each child, and
    the settings a stage must not see changed.
    """
    if not name:
        raise UsageError("env.NAME needs a NAME: e.g. `pgw config set env.PATH /opt/bin:/usr/bin:/bin`")
    if "=" in name:
        raise UsageError(
            f"env.{name}: a variable name cannot contain `=`: use `pgw config set env.{name.split('=')[0]} VALUE`"
        )
    if "\0" in name:
        raise UsageError(f"env.{name!r}: a variable name cannot contain a NUL character")
    if name.upper().startswith("PGW_"):
        raise UsageError(f"env.{name}: names starting with PGW_ are pgw's own: pick another name")


def unset_host_setting(config: dict[str, Any], key: str) -> dict[str, Any]:
    """The config without KEY; the same config when KEY is valid but not set."""
    updated = dict(config)
    if key.startswith("env.") and key[4:]:
        updated["env"] = {k: v for k, v in config.get("env", {}).items() if k != key[4:]}
        if updated["env"] == config.get("env", {}):
            return config
    elif key in ("server", "name", "cafile", "max_stages", "proxy", "compression", "env"):
        updated.pop(key, None)
    else:
        raise UsageError(f"unknown setting {key!r}: use one of {', '.join(HOST_SETTINGS)}")
    return updated


def make_ssl_context(cafile: Optional[str], given_by: str = f"`cafile`, --cafile or {ENV_CAFILE}") -> ssl.SSLContext:
    """The TLS context for the server: the CA file if one is set, else the
    system's trust store (which honours SSL_CERT_FILE and SSL_CERT_DIR).
    `given_by`: where the CA file was set, which a bad one's message names."""
    try:
        if cafile is not None:
            open_regular_file(Path(cafile), follow=True).close()  # ssl would wait on a FIFO for ever
    except FileNotFoundError:
        raise ConfigError(f"CA file {cafile} does not exist: fix {given_by}") from None
    except OSError as exc:
        raise ConfigError(f"CA file {cafile} cannot be read: {exc.strerror or exc}; fix {given_by}") from None
    try:
        return ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"CA file {cafile} is not a usable PEM bundle: {exc}; fix {given_by}") from None


def server_message(body: bytes) -> str:
    """The human part of a server's error answer, on one short line."""
    text = body.decode("utf-8", "replace").strip()
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):
        parsed = None
    if isinstance(parsed, dict):
        for key in ("detail", "message", "error"):
            if isinstance(parsed.get(key), str):
                text = parsed[key]
                break
    text = " ".join(text.split())
    if not text.isprintable():  # an escape sequence would reach the user's terminal as a command
        text = "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)
    if len(text) > SERVER_MESSAGE_MAX_CHARS:
        text = text[: SERVER_MESSAGE_MAX_CHARS - 3] + "..."
    return text


##############################################################################
# Pure logic: reconnect schedule, frames, stage requests
##############################################################################


class Backoff:
    """Reconnect delays: the first within 1 s, then doubling to 60 s, jittered.

    Each delay is drawn from [ceiling/2, ceiling] so that workers cut off by
    one server restart do not all come back in the same second.
    """

    def __init__(
        self,
        first_s: float = Timing().reconnect_first_s,
        cap_s: float = Timing().reconnect_cap_s,
        random_fraction: typing.Callable[[], float] = random.random,
    ) -> None:
        self.first_s = first_s
        self.cap_s = cap_s
        self._random = random_fraction
        self.failures = 0

    def next_delay_s(self) -> float:
        ceiling = min(self.cap_s, self.first_s * 2 ** min(self.failures, 30))
        self.failures += 1
        return ceiling * (0.5 + 0.5 * self._random())

    def reset(self) -> None:
        self.failures = 0


def split_text(text: str, limit: int = FRAME_MAX_BYTES) -> list[str]:
    """`text` cut into pieces of at most `limit` UTF-8 bytes, never inside a character."""
    if len(text) * 4 <= limit or (text.isascii() and len(text) <= limit):  # isascii is O(1)
        return [text]
    encoded = text.encode("utf-8")
    if len(encoded) <= limit:
        return [text]
    pieces, start = [], 0
    while start < len(encoded):
        end = min(start + limit, len(encoded))
        while end < len(encoded) and encoded[end] & 0xC0 == 0x80:  # continuation byte
            end -= 1
        pieces.append(encoded[start:end].decode("utf-8"))
        start = end
    return pieces


def check_stage_id(stage_run_id: str) -> None:
    """A stage_run_id must be usable as one directory name under scratch/."""
    if (
        not stage_run_id
        or stage_run_id in (".", "..")
        or len(stage_run_id) > STAGE_ID_MAX_CHARS
        or any(bad in stage_run_id for bad in ("/", "\\", "\0"))
        or not _utf8_encodable(stage_run_id)  # `é` and its surrogate-escaped bytes would name one directory
        or not _fs_encodable(stage_run_id)  # a name and a variable the OS takes (in a Latin-1 locale, not `日本`)
        or len(os.fsencode(stage_run_id)) > NAME_MAX_BYTES  # 200 characters of `ü` are 400 bytes
    ):
        raise StageRejected(f"bad request: stage_run_id {shown(stage_run_id)} cannot name a scratch directory")


def check_file_path(name: str) -> tuple[str, ...]:
    """The parts of a relative file path, or StageRejected if it could escape."""
    unsafe = f"unsafe file path {name[:100]!r}"
    if not name or "\0" in name:
        raise StageRejected(f"{unsafe}: empty or contains NUL")
    if not _fs_encodable(name):
        raise StageRejected(f"{unsafe}: not valid Unicode")
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or name.startswith(("/", "\\")):
        raise StageRejected(f"{unsafe}: absolute paths are not allowed")
    parts = tuple(part for part in name.replace("\\", "/").split("/") if part not in ("", "."))
    if ".." in parts:
        raise StageRejected(f"{unsafe}: `..` is not allowed")
    if not parts:
        raise StageRejected(f"{unsafe}: names no file")
    return parts


def _fs_encodable(text: str) -> bool:
    """Whether the OS can take `text` as a name or an argument (surrogateescape'd bytes pass)."""
    try:
        os.fsencode(text)
    except UnicodeEncodeError:
        return False
    return True


def check_stage_arguments(request: StageRequest) -> None:
    """What goes to execve and to the child's stdin must be something the OS can take."""
    arguments = [*request.cli_args] + ([request.stdin] if request.stdin_mode == "argv_last" else [])
    for number, argument in enumerate(arguments):
        where = "the prompt (argv_last)" if number == len(request.cli_args) else f"cli_args[{number}]"
        if "\0" in argument or not _fs_encodable(argument):
            raise StageRejected(f"bad request: {where} contains NUL or is not valid Unicode")
    for name, value in request.env.items():
        if not name or "=" in name or "\0" in name or "\0" in value or not (_fs_encodable(name) and _fs_encodable(value)):
            raise StageRejected(f"bad request: env {name[:60]!r} is not a valid environment variable")
    if request.stdin_mode == "stdin" and not _utf8_encodable(request.stdin):
        raise StageRejected("bad request: the prompt is not valid Unicode (a lone surrogate)")


def check_stage_files(files: dict[str, str]) -> list[tuple[tuple[str, ...], bytes]]:
    """Decode a request's files: safe relative paths, base64, 50 MiB at most."""
    paths = {name: check_file_path(name) for name in files}
    _check_no_aliases(paths)
    # base64 is 4 characters per 3 bytes, less at most 2 of padding: a
    # request that is too large whatever its padding is refused undecoded.
    _check_files_size(sum(len(value) * 3 // 4 - 2 for value in files.values()))
    checked, total = [], 0
    for name, value in files.items():
        try:
            content = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise StageRejected(f"bad request: file {name[:100]!r} is not valid base64") from None
        total += len(content)
        checked.append((paths[name], content))
    _check_files_size(total)
    return checked


def _check_no_aliases(paths: dict[str, tuple[str, ...]]) -> None:
    """Two names for one file (`a/b`, `a//b`, `./a/b`, `a\\b`; on macOS, whose
    file system folds case and Unicode normalisation by default, `A` and `a`
    too) would leave the last one's content without a word; a file that
    another's path takes for a directory could not be written."""
    folded = sys.platform == "darwin"
    named: dict[tuple[str, ...], str] = {}
    for name, parts in paths.items():
        if folded:
            parts = tuple(unicodedata.normalize("NFD", part).casefold() for part in parts)
        if parts in named:
            raise StageRejected(f"bad request: files {named[parts][:100]!r} and {name[:100]!r} name the same file")
        named[parts] = name
    for parts, name in named.items():
        for depth in range(1, len(parts)):
            if parts[:depth] in named:
                raise StageRejected(
                    f"bad request: file {named[parts[:depth]][:100]!r} is a directory in the path of {name[:100]!r}"
                )


def _check_files_size(decoded_bytes: int) -> None:
    if decoded_bytes > FILES_MAX_BYTES:
        raise StageRejected(
            f"files too large: {decoded_bytes:,} bytes decoded, over the limit of {FILES_MAX_BYTES:,} ({FILES_MAX_BYTES // 2**20} MiB)"
        )


def stage_environment(
    worker_environ: typing.Mapping[str, str], request_env: dict[str, str], stage_run_id: str
) -> dict[str, str]:
    """pgw's environment less its own PGW_* settings, plus the request's env and the stage's id."""
    environ = {key: value for key, value in worker_environ.items() if not key.startswith("PGW_")}
    environ.update(request_env)
    environ[STAGE_ID_ENV] = stage_run_id
    return environ


def codex_trace(records: typing.Iterable[Any], source: str) -> str:
    """The rollout extract of PROTOCOL.md from a codex session's JSONL records.

    Earlier assistant messages and reasoning summaries, under a header; the
    last assistant message is left out since codex already printed it.
    Empty when there is nothing codex did not print.
    """
    messages, summaries = [], []
    for record in records:
        if not isinstance(record, dict) or record.get("type") != "response_item":
            continue
        payload = record.get("payload")
        if not isinstance(payload, dict):
            continue
        if payload.get("type") == "message" and payload.get("role") == "assistant":
            parts = [
                part.get("text") or part.get("output_text") or ""
                for part in payload.get("content") or []
                if isinstance(part, dict)
            ]
            joined = "".join(p for p in parts if isinstance(p, str)).strip()
            if joined:
                messages.append(joined)
        elif payload.get("type") == "reasoning":
            for summary in payload.get("summary") or []:
                text = summary.get("text") if isinstance(summary, dict) else None
                if isinstance(text, str) and text.strip():
                    summaries.append(text)
    partial = messages[:-1]
    if not partial and not summaries:
        return ""
    lines = ["", CODEX_TRACE_HEADER]
    for title, items in (("partial assistant message", partial), ("reasoning summary", summaries)):
        if items:
            lines.append("")
        for number, item in enumerate(items, 1):
            lines += [f"--- {title} [{number}/{len(items)}] ---", item, ""]
    lines += [f"--- rollout source: {source} ---", ""]
    return "\n".join(lines)


##############################################################################
# Config files
##############################################################################


def absolute_home(home: str, given_as: str) -> Path:
    """`home` (`~` expanded) made absolute from the current directory, its `..`
    left for the kernel: after a symlink it leads elsewhere than the text says."""
    home = os.path.expanduser(home)
    if os.path.isabs(home):
        return Path(home)
    try:
        return Path(os.getcwd(), home)
    except FileNotFoundError:
        raise ConfigError(f"{given_as}{home} is relative, and the current directory no longer exists") from None


def user_home() -> Path:
    """The user's home directory: HOME, else (unset, or empty as `env HOME=`
    leaves it) the password database's; RuntimeError, as Path.home() raises,
    when neither tells.  Path.home() took an empty HOME for `/`.  A relative
    one is taken from the current directory, its `..` left for the kernel."""
    home = os.environ.get("HOME")
    if not home:
        try:
            import pwd

            home = pwd.getpwuid(os.getuid()).pw_dir
        except (ImportError, KeyError):
            home = ""
    if not home:
        raise RuntimeError("no home directory")
    if os.path.isabs(home):
        return Path(home)
    try:
        return Path(os.getcwd(), home)
    except FileNotFoundError:
        raise RuntimeError("HOME is relative, and the current directory no longer exists") from None


def pgw_home(environ: typing.Mapping[str, str] = os.environ) -> Path:
    """PGW_HOME, else ~/.pgworker (PROTOCOL.md); absolute, so that what pgw
    says names it wherever it is read (a relative one is taken from the
    current directory, its `..` left for the kernel)."""
    if environ.get(ENV_HOME):
        return absolute_home(environ[ENV_HOME], f"{ENV_HOME}=")
    try:
        return user_home() / DEFAULT_HOME_DIRNAME
    except RuntimeError:
        raise ConfigError(f"cannot tell the home directory: set HOME or {ENV_HOME}") from None


def read_config(path: Path, checked: bool = True) -> dict[str, Any]:
    """The config file's contents, {} when there is none."""
    try:
        with open_regular_file(path, follow=True) as config_file:  # a FIFO would hang every command
            data = config_file.read(CONFIG_MAX_BYTES + 1)
        if len(data) > CONFIG_MAX_BYTES:
            raise ConfigError(
                f"cannot read {path}: over {CONFIG_MAX_BYTES // 1024} KiB, no config of pgw's; fix it or delete it and pair again"
            )
        text = data.decode("utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        if isinstance(exc, NotADirectoryError):  # PGW_HOME names a file: that, not the config, is to fix
            refuse_unfit_home(path.parent)
        if isinstance(exc, PermissionError):  # the file is fine: deleting it would spend a pairing for nothing
            raise ConfigError(f"cannot read {path}: {exc.strerror}; {_whose_file(path)}") from None
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot read {path}: {reason}; fix it or delete it and pair again") from None
    return parse_config(text, path, checked)


def _whose_file(path: Path) -> str:
    """What to do about a file of pgw's this user may not read: the file's
    mode, or its home's (which kept the file from even a stat), or its owner."""
    for blocked, mode in ((path, "600"), (path.parent, "700")):
        try:
            owner = blocked.stat().st_uid
        except OSError:
            continue
        if owner == os.geteuid():
            return f"give it back its mode: chmod {mode} {shlex.quote(str(blocked))}"
        return f"it belongs to {user_name(owner)}: run pgw as {user_name(owner)}, or set {ENV_HOME} to a directory of your own"
    return f"run pgw as the user who paired, or set {ENV_HOME} to a directory of your own"


def make_private_dirs(directory: Path) -> None:
    """`directory` and any missing parent, each new one mode 0700 whatever the
    umask (Path.mkdir(parents=True) leaves the parents 0777 less the umask)."""
    for each in [*reversed(directory.parents), directory]:
        try:
            os.mkdir(each, 0o700)
        except (FileExistsError, IsADirectoryError):  # macOS says the second of "/"
            pass


def writable_by_us_alone(directory: Path) -> bool:
    """Whether `directory` is ours and no other user can put anything in it
    (a symlink, say): where a file may be opened by its name without a doubt."""
    try:
        info = os.stat(directory)
    except OSError:
        return False
    unsafe = stat.S_ISVTX | stat.S_IWGRP | stat.S_IWOTH
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() and not info.st_mode & unsafe


def refuse_unfit_home(home: Path) -> None:
    """pgw makes its home private (mode 0700): a directory shared with other
    users (sticky, or writable by them, as /tmp is) would break for them, and
    so would a directory that holds the user's whole home.  A home not made
    yet is checked for what it would be."""
    try:
        info: Optional[os.stat_result] = home.stat()
    except FileNotFoundError:
        info = None
    except OSError as exc:
        raise unreadable_home(home, exc) from None
    if info is not None and not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{home} is not a directory: set {ENV_HOME} to a directory of pgw's own")
    if info is not None and hasattr(os, "geteuid") and info.st_uid != os.geteuid():
        # As root, in a service account's home: config.json and scratch/ became
        # root's, and that account's pgw could no longer read or use them.
        owner = user_name(info.st_uid)
        raise ConfigError(
            f"{home} belongs to {owner}: run pgw as {owner}, whose files these are, or set {ENV_HOME} to a directory of your own"
        )
    mode = stat.S_IMODE(info.st_mode) if info is not None else 0
    if mode & (stat.S_ISVTX | stat.S_IWOTH):
        raise ConfigError(
            f"{home} is shared with other users (mode {mode:o}): set {ENV_HOME} to a directory of pgw's own"
        )
    try:
        yours: Optional[str] = os.path.realpath(user_home())
    except RuntimeError:
        yours = None
    real = os.path.realpath(home)
    holds_yours = yours is not None and (yours == real or yours.startswith(real.rstrip("/") + "/"))
    if real == "/" or holds_yours:
        what = "the root directory" if real == "/" else "your home directory itself" if real == yours else "a directory that holds your home directory"
        raise ConfigError(
            f"{home} is {what}, which pgw would make private (mode 700): set {ENV_HOME} to a directory of"
            f" pgw's own, such as ~/{DEFAULT_HOME_DIRNAME}"
        )
    # Open to others, it is made private: only if it is pgw's (or pgworker's)
    # home.  As root, `PGW_HOME=/home` or `/etc` locked every other user out.
    others = not_kept_in_a_home(home) if mode & 0o077 else []
    if others:
        raise ConfigError(
            f"{home} holds more than pgw's files ({shown(others[0])}{', ...' if len(others) > 1 else ''}) and other"
            f" users can enter it (mode {mode:o}), so pgw will not make it private (mode 700): set {ENV_HOME} to"
            f" a directory of pgw's own, or make this one private yourself (chmod 700)"
        )


def user_name(uid: int) -> str:
    """The login name of `uid`, else `uid N`."""
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return f"uid {uid}"


def unreadable_home(home: Path, exc: OSError) -> ConfigError:
    return ConfigError(f"cannot look into the pgw home {home}: {exc.strerror}; set {ENV_HOME} to a directory you own")


def not_kept_in_a_home(home: Path) -> list[str]:
    """The directories in `home` that are not pgw's, or all its entries that
    are not when there are more than a few: what says it is no pgw home."""
    try:
        with os.scandir(home) as entries:
            others = sorted((entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries if not kept_in_a_home(entry.name))
    except OSError as exc:
        raise unreadable_home(home, exc) from None
    directories = [name for name, is_dir in others if is_dir]
    return directories or ([name for name, _ in others] if len(others) > HOME_OTHER_FILES_MAX else [])


def kept_in_a_home(name: str) -> bool:
    """Whether `name` is one pgw or pgworker keeps in its home: run.log's
    rotations and atomic writes' temporary files too."""
    kept = (CONFIG_FILENAME, RUN_LOG_FILENAME, LOCK_FILENAME, STATE_FILENAME, SCRATCH_DIRNAME, SHIV_DIRNAME, LAUNCHD_LOG_FILENAME)
    rotated = name.startswith(f"{RUN_LOG_FILENAME}.") and name[len(RUN_LOG_FILENAME) + 1 :].isdigit()
    temporary = name.endswith(".tmp") and any(name.startswith(f".{each}.") for each in (CONFIG_FILENAME, STATE_FILENAME, LOCK_FILENAME))
    return name in kept or name == ".DS_Store" or rotated or temporary


def write_config(path: Path, config: dict[str, Any]) -> None:
    """Replace the config atomically and durably, mode 0600 in a 0700 directory
    (said on stderr when the directory was open to others before)."""
    directory = path.parent
    try:
        refuse_unfit_home(directory)
        make_private_dirs(directory)
        opened = stat.S_IMODE(directory.stat().st_mode) & 0o077
        if opened:
            os.chmod(directory, 0o700)
    except OSError as exc:
        raise ConfigError(f"cannot write to {directory}: {exc.strerror}") from None
    if opened:
        print(f"pgw: made {directory} private (mode 700): other users could read what pgw keeps there", file=sys.stderr)
    text = json_text(config)
    if len(text.encode("utf-8")) > CONFIG_MAX_BYTES:  # which no command could read back, `config unset` included
        raise ConfigError(f"not saved: {path} would pass the {CONFIG_MAX_BYTES // 1024} KiB pgw reads of it")
    try:
        write_atomically(path, text, durable=True)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None


def write_private_text(path: Path, text: str) -> None:
    """Replace `path` with `text`, mode 0600 whatever the umask or its mode before."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        os.fchmod(fd, 0o600)
        file.write(text)


def write_json_atomically(path: Path, value: Any, durable: bool = False) -> None:
    """Replace `path` with `value` as JSON, as write_atomically does."""
    write_atomically(path, json_text(value), durable)


def json_text(value: Any) -> str:
    """How pgw writes JSON files: indented, for the users who read them."""
    return json.dumps(value, ensure_ascii=False, indent=2) + "\n"


def write_atomically(path: Path, text: str, durable: bool = False) -> None:
    """Replace `path` with `text`, mode 0600 whatever the umask: readers see the
    old file or the new one; `durable` also survives a power cut.  Whatever
    stood at `path` (a symlink, a FIFO) is replaced, never written through."""
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as temp:
            temp.write(text)
            if durable:
                temp.flush()
                os.fsync(temp.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


##############################################################################
# Capabilities and CLI probing
##############################################################################


def probe_capabilities(search_path: Optional[str] = None) -> dict[str, Any]:
    """PROTOCOL.md's capabilities: which CLIs are on PATH, and this host."""
    capabilities: dict[str, Any] = {}
    for binary, key in CLI_CAPABILITY_KEYS.items():
        found = shutil.which(binary, path=search_path)
        capabilities[key] = {"available": found is not None, "path": found}
    capabilities["protocol_version"] = PROTOCOL_VERSION
    capabilities["platform"] = platform.system().lower()
    capabilities["python"] = platform.python_version()
    return capabilities


def unrunnable_on_path(binary: str, search_path: str) -> Optional[str]:
    """The first file named `binary` on `search_path` that this user may not
    run, which `which` passes over in silence: a CLI "not found" that is there."""
    for directory in search_path.split(os.pathsep):
        candidate = os.path.join(directory or os.curdir, binary)
        if os.path.isfile(candidate) and not os.access(candidate, os.X_OK):
            return candidate
    return None


def probe_cli_version(path: str, timeout_s: Optional[float] = None) -> tuple[Optional[str], Optional[str]]:
    """(first line of `PATH --version`, None) or (None, why not).

    The CLI runs in its own session, and its group dies when it exits or
    its time is up.  What it wrote is read once it has exited, not to the
    pipes' end of file: a process it started in a session of its own (an
    updater) holds them open, and made `doctor` wait for as long as that
    process ran.
    """
    timeout_s = VERSION_PROBE_TIMEOUT_S if timeout_s is None else timeout_s
    try:
        process = subprocess.Popen(
            [path, "--version"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        return None, f"cannot run: {exc.strerror}"
    answered = False
    try:
        process.wait(timeout=timeout_s)
        answered = True
    except subprocess.TimeoutExpired:
        pass
    finally:
        kill_process_group(process.pid, signal.SIGKILL)
        process.wait()
        out, err = (written_so_far(typing.cast(typing.BinaryIO, pipe)) for pipe in (process.stdout, process.stderr))
    if not answered:
        return None, f"`--version` gave no answer within {timeout_s:g} s"
    text = (out or err).decode("utf-8", "replace").strip()
    if process.returncode != 0 or not text:
        return None, f"`--version` failed with exit status {process.returncode}"
    return text.splitlines()[0], None


def written_so_far(pipe: typing.BinaryIO) -> bytes:
    """What waits in `pipe` (a --version's line or two: one read), and close it."""
    with pipe:
        os.set_blocking(pipe.fileno(), False)
        try:
            return os.read(pipe.fileno(), 65536)
        except BlockingIOError:
            return b""


def kill_process_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def probe_cli_versions(capabilities: dict[str, Any]) -> dict[str, tuple[Optional[str], Optional[str]]]:
    """Probe every available CLI at once, so three hung CLIs cost 10 s, not 30."""
    paths = {
        binary: capabilities[key]["path"]
        for binary, key in CLI_CAPABILITY_KEYS.items()
        if capabilities[key]["available"]
    }
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(paths) or 1) as pool:
        futures = {binary: pool.submit(probe_cli_version, path) for binary, path in paths.items()}
        return {binary: future.result() for binary, future in futures.items()}


##############################################################################
# Pairing
##############################################################################


class _RefuseRedirect(urllib.request.HTTPRedirectHandler):
    """Turn a redirect into an HTTPError: the URL to pair with, and to save,
    is the one that answers, so the user has to be told the new one."""

    def http_error_302(self, req: Any, fp: Any, code: int, msg: str, headers: Any) -> typing.NoReturn:
        # Before urllib's own, which parses the Location first: ValueError on `http://[::1`.
        raise urllib.error.HTTPError(req.full_url, code, msg, headers, fp)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


REDIRECT_STATUSES = (301, 302, 303, 307, 308)


def request_pairing(
    server: str,
    body: dict[str, Any],
    timeout_s: float = PAIR_TIMEOUT_S,
    cafile: Optional[str] = None,
    server_is_default: bool = False,
    proxy: Optional[Proxy] = None,
) -> dict[str, str]:
    """POST pair-confirm; the server's {worker_id, token}, or PairingError.

    `server_is_default`: no --server, PGW_SERVER or config server was given,
    so a server that cannot be reached most likely means a missing flag.
    `proxy`: the one `run` would use (choose_proxy); None: directly.
    """
    import http.client

    def unreachable(reason: Any) -> PairingError:
        return pairing_unreachable(server, reason, server_is_default, proxy)

    request = urllib.request.Request(
        server + PAIR_PATH,
        data=json.dumps(body, ensure_ascii=False).encode("utf-8"),
        headers={"Content-Type": "application/json", "User-Agent": f"pgw/{__version__}"},
        method="POST",
    )
    if proxy is not None and proxy.authorization:
        # urllib sends it to the proxy only: with the CONNECT of an https tunnel, or to the proxy forwarding http.
        request.add_header("Proxy-Authorization", proxy.authorization)
    # The proxy choice is pgw's (choose_proxy, shared with `run`), not urllib's own.
    proxies = {urllib.parse.urlsplit(server).scheme: proxy.url} if proxy else {}
    try:
        context = make_ssl_context(cafile) if server.startswith("https:") else None
        opener = urllib.request.build_opener(
            _RefuseRedirect, urllib.request.HTTPSHandler(context=context), urllib.request.ProxyHandler(proxies)
        )

        def fetch() -> bytes:
            with opener.open(request, timeout=timeout_s) as response:
                return response.read(PAIR_ANSWER_MAX_BYTES)

        answer = within(timeout_s, fetch)
    except urllib.error.HTTPError as exc:
        if exc.code in REDIRECT_STATUSES and exc.headers.get("Location"):
            raise PairingError(redirect_failure(server, exc.code, exc.headers["Location"])) from None
        message = server_message(exc.read()) or exc.reason
        raise PairingError(f"pairing failed: {server} answered {exc.code}: {message}") from None
    except urllib.error.URLError as exc:
        raise unreachable(exc.reason) from None
    except (socket.timeout, TimeoutError):
        raise PairingError(f"pairing failed: {server} gave no answer within {timeout_s:g} s") from None
    except (http.client.HTTPException, OSError) as exc:
        raise unreachable(exc) from None
    return pairing_answer(server, answer)


T = typing.TypeVar("T")


def within(timeout_s: float, work: typing.Callable[[], T]) -> T:
    """`work()`, or TimeoutError after `timeout_s` in all.  A socket's timeout
    bounds each read, not a server that answers a byte every few seconds; the
    thread left behind ends with the command, which exits on the error."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((True, work()))
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            outcome.append((False, exc))

    worker = threading.Thread(target=run, name="pgw-within", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not outcome:
        raise TimeoutError(f"no answer within {timeout_s:g} s")
    done, value = outcome[0]
    if not done:
        raise value
    return value


def pairing_unreachable(server: str, reason: Any, server_is_default: bool, proxy: Optional[Proxy]) -> PairingError:
    """Why pair-confirm got no HTTP answer, in the words a user can act on."""
    import http.client

    if isinstance(reason, http.client.HTTPException) or (
        isinstance(reason, ConnectionError) and not isinstance(reason, ConnectionRefusedError)
    ):
        # Something listens there but does not speak HTTP (an SSH banner,
        # a database): it hung up (reset, broken pipe), or its answer is not HTTP.
        return PairingError(
            f"pairing failed: {server} did not answer in HTTP: is this the web address of the prove-graph server?"
        )
    if server_is_default:
        refused = isinstance(reason, ConnectionRefusedError)
        what = "connection refused" if refused else connection_failure(server, reason)
        return PairingError(
            f"pairing failed: no server given: pass --server URL (tried the default {server}: {what})"
        )
    through = f" (through the proxy {proxy.url})" if proxy else ""
    return PairingError(f"pairing failed: {connection_failure(server, reason)}{through}")


def pairing_answer(server: str, answer: bytes) -> dict[str, str]:
    """The {worker_id, token} in pair-confirm's answer, or PairingError."""
    try:
        pairing = json.loads(answer)
    except (ValueError, RecursionError):
        raise PairingError(
            f"pairing failed: {server}'s answer is not JSON: is this the prove-graph server?"
        ) from None
    if not (
        isinstance(pairing, dict)
        and isinstance(pairing.get("worker_id"), str)
        and isinstance(pairing.get("token"), str)
        and pairing["worker_id"]
        and pairing["token"]
    ):
        raise PairingError(f"pairing failed: {server}'s answer lacks a worker_id or a token")
    return {"worker_id": pairing["worker_id"], "token": pairing["token"]}


def redirect_failure(server: str, status: int, location: str) -> str:
    """A redirect in words, with the --server that pairs without one.

    Following it would pair, but save the old URL, on which `run` then fails.
    """
    try:
        target = urllib.parse.urljoin(server + PAIR_PATH, location)
        parsed = urllib.parse.urlsplit(target)
    except ValueError:  # "Invalid IPv6 URL"
        return f"pairing failed: {server} redirects ({status}) to {shown(location)}, which is not a URL"
    base = parsed.path[: -len(PAIR_PATH)] if parsed.path.endswith(PAIR_PATH) else ""
    suggested = urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, base, "", "")).rstrip("/")
    if suggested == server.rstrip("/"):  # pairing with it again would meet the same redirect
        return f"pairing failed: {server} redirects ({status}) to {target}, not to another server (a login page, or a proxy in the way?)"
    return f"pairing failed: {server} redirects ({status}) to {target}: pair with --server {suggested}"


# What OpenSSL 3.0 (and 3.2 on) says when the first bytes back are not a
# TLS record, as when an https:// URL names a plain-HTTP port.
NOT_TLS_REASONS = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE")


def connection_failure(server: str, reason: BaseException) -> str:
    """Why a connection failed or ended, in plain words naming the likely
    cause; `reason` may be an exception group, or carry a cause.  Never the token."""
    host = urllib.parse.urlsplit(server).netloc
    chain = list(_exception_chain(reason))
    for current in chain:
        if isinstance(current, trio_websocket.ConnectionRejected):
            if current.status_code in (401, 403):
                return (
                    f"the server rejected the token (HTTP {current.status_code}{refusal_reason(current)}): "
                    "run `pgw pair CODE --server URL` again"
                )
            location = next((value for name, value in current.headers or () if name.lower() == b"location"), None)
            if current.status_code in REDIRECT_STATUSES and location:
                # Without query or fragment: a server may echo the URL back, token and all.
                target = location.decode("latin-1").split("?")[0].split("#")[0]
                try:
                    target = urllib.parse.urljoin(server, target)
                except ValueError:  # "Invalid IPv6 URL": named as it came
                    pass
                return (
                    f"the server redirects the WebSocket (HTTP {current.status_code}) to {shown(target)}: "
                    "if that is where it moved, `pgw config set server URL`"
                )
            return f"the server refused the WebSocket (HTTP {current.status_code}{refusal_reason(current)})"
        if isinstance(current, (ConnectionLost, ProxyError, ConfigError)):
            return str(current)
        if isinstance(current, wsproto.utilities.RemoteProtocolError):
            return f"the server's WebSocket handshake is not one pgw can accept: {current}"
        if isinstance(current, UnicodeDecodeError):  # wsproto reads Connection and Sec-WebSocket-* as ASCII
            return "the server's WebSocket handshake is not one pgw can accept: a header that is not ASCII"
    for current in chain:
        if isinstance(current, ConnectionRefusedError):
            return f"{host} refused the connection: is the server running, and is the port right?"
        if isinstance(current, socket.gaierror):
            return f"cannot resolve {host!r}: check the server name and the network"
        if isinstance(current, ssl.SSLCertVerificationError):
            return f"{host}'s TLS certificate is not trusted: {current.verify_message}"
        if isinstance(current, ssl.SSLError) and current.reason in NOT_TLS_REASONS:
            return f"{host} does not speak TLS: if the server speaks plain HTTP, try http://{host}"
        if isinstance(current, ssl.SSLError):
            return f"TLS with {host} failed: {current.reason or current}"
        if isinstance(current, (socket.timeout, TimeoutError)):
            return f"{host} did not answer in time"
        if isinstance(current, trio.TooSlowError):
            return f"{host} did not complete the connection in time"
    for current in chain:
        if isinstance(current, OSError) and current.strerror:
            return f"cannot reach {host}: {current.strerror}"
    for current in chain:
        if isinstance(current, INTERNAL_ERRORS):
            return f"{INTERNAL_FAILURE}: {type(current).__name__}: {current}"
    # A group names only how many it holds: the first of them says more.
    leaf = next((current for current in chain if not hasattr(current, "exceptions")), reason)
    return f"cannot reach {host}: {type(leaf).__name__}: {leaf}"


def refusal_reason(rejected: trio_websocket.ConnectionRejected) -> str:
    """What a refusal's body says, as `: reason` (a Starlette 409's `detail`), or ""."""
    reason = server_message(rejected.body or b"")
    return f": {reason}" if reason else ""


# What a mistake in pgw's own code raises, never the network: the log then
# needs the traceback, and the user needs to know it is not their server.
INTERNAL_ERRORS = (ArithmeticError, AssertionError, AttributeError, LookupError, NameError, TypeError)
INTERNAL_FAILURE = "an internal error in pgw (its traceback is in run.log)"


# A Retry-After beyond this is taken as this: a typo or a proxy's must not park pgw for days.
RETRY_AFTER_MAX_S = 3600.0


def retry_after_s(exc: BaseException, now_unix: float) -> Optional[float]:
    """How long a refusal of the handshake (HTTP 429 or 503) asks pgw to wait,
    from its Retry-After (RFC 9110 10.2.3: seconds, or a date); None if it does not."""
    for current in _exception_chain(exc):
        if isinstance(current, trio_websocket.ConnectionRejected) and current.status_code in (429, 503):
            value = next((v for name, v in current.headers or () if name.lower() == b"retry-after"), b"")
            text = value.decode("latin-1").strip()
            seconds = whole_number(text)
            if seconds is not None:
                return float(min(seconds, RETRY_AFTER_MAX_S))
            try:
                return max(email.utils.parsedate_to_datetime(text).timestamp() - now_unix, 0.0)
            except (TypeError, ValueError, IndexError, OverflowError):
                return None
    return None


def _exception_chain(exc: BaseException) -> typing.Iterator[BaseException]:
    """`exc`, the leaves of any exception group in it, and their causes."""
    seen: set[int] = set()
    pending = [exc]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending.extend(getattr(current, "exceptions", ()))
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)


##############################################################################
# Daemon housekeeping: one instance per home, the state file
##############################################################################
# `status` reads what the daemon publishes here and never talks to it
# otherwise.


def acquire_instance_lock(home: Path) -> tuple[Optional[int], Optional[int]]:
    """(fd holding the lock, None), or (None, pid of the pgw that holds it).

    The lock is flock on the home directory itself: a user or a clean-up can
    unlink a lock file from under a running daemon (then a cron watchdog's
    `pgw run` would lock a new one and run a second daemon on the same token),
    but not the directory.  run.lock holds the daemon's pid for `status` and
    `stop`.  flock is released by the kernel when pgw dies, however it dies.
    """
    make_private_dirs(home)
    fd = os.open(home, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    if fcntl is None:
        return fd, None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None, _read_pid_file(home / LOCK_FILENAME)
    try:  # a FIFO put there held the open (and the daemon) for ever; a symlink had it write elsewhere
        write_atomically(home / LOCK_FILENAME, f"{os.getpid()}\n")
    except OSError as exc:
        os.close(fd)
        raise ConfigError(f"cannot write {home / LOCK_FILENAME}: {exc.strerror}; remove it, or set {ENV_HOME} to a directory you own") from None
    return fd, None


def instance_lock_holder(home: Path) -> Optional[int]:
    """The pid of the `pgw run` holding this home's lock (-1 if it cannot be
    read), or None if none runs; ConfigError when this user cannot tell (a
    home of another user's, say: "not running" would be a guess)."""
    try:
        fd = os.open(home, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise ConfigError(f"cannot tell whether pgw runs for {home}: {exc.strerror}") from None
    if fcntl is None:
        os.close(fd)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _read_pid_file(home / LOCK_FILENAME) or -1
    finally:
        os.close(fd)
    return None


def _read_pid_file(path: Path) -> Optional[int]:
    try:
        with open_regular_file(path) as pid_file:  # a FIFO there would hold `status` and `stop`
            text = pid_file.read(32).decode("ascii", "replace").strip()
    except OSError:
        return None
    return whole_number(text)


def read_state(home: Path) -> Optional[dict[str, Any]]:
    try:  # a FIFO put in its place would hold the read, and `status` with it
        with open_regular_file(home / STATE_FILENAME) as file:
            state = json.loads(file.read(STATE_MAX_BYTES).decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return state if isinstance(state, dict) else None


def _duration(seconds: float) -> str:
    """`45 s`, `9 min`, `3 h 20 min`: how long, as a person says it."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds // 3600:.0f} h {seconds % 3600 / 60:.0f} min"


def iso_time(stamp: Optional[float]) -> Optional[str]:
    if stamp is None:
        return None
    return datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc).isoformat(timespec="seconds")


##############################################################################
# Stage: prepare, the stage root, the run, the exit
##############################################################################
# A stage is prepared (every check, no I/O but the CLI lookup), then waits for
# a slot, then runs under its stage root, then its outcome becomes its exit.
#
# The stage root is a tiny process of pgw's own between pgw and the CLI.  On
# Linux it is a child subreaper (PR_SET_CHILD_SUBREAPER, which survives
# execve), so every orphan of the stage -- double-forked, setsid'd, its
# environment emptied -- is reparented to the root instead of to init: the
# stage's processes are exactly the root's descendants, whatever they do.
# The root starts the CLI in a session of its own (posix_spawn, which copies
# nothing of the root: a fork and exec where the C library cannot start a
# session that way), reports its pid and its exit on a pipe, reaps every
# orphan, and relays pgw's SIGTERM to the CLI's group.  When its command socket closes -- pgw ending the stage, or pgw dying,
# however it dies -- it kills its descendants until a pass finds none, then
# closes the stage's pipes: their end of file tells pgw that nothing of the
# stage is left.  Elsewhere (macOS) there is no subreaper: the root kills the
# CLI's process group.  A root left with no child at all (the CLI ended, and
# no process of the stage is left to reparent to it) has nothing to kill: it
# ends the stage at once, and pgw reads its end of file without waiting.
#
# Roots are forked by the spawner, one process per daemon (this Python,
# `-I -S`, the code below), started at the first stage.  A root runs stage
# after stage, one at a time, and pgw keeps a Unix socket to each: a stage
# goes straight to the root free the shortest time, and only when none is
# free does pgw ask the spawner to fork one (about 0.65 ms of the spawner's
# CPU; starting a Python per stage cost about 15 ms, and forking pgw itself,
# which trio does from a worker thread, about 1 ms of pgw's; passing each
# stage through the spawner cost it 0.15 ms, most of it a wake-up).
# pgw ends a root left free for Timing.root_idle_s by closing its socket, and
# takes no root again whose spawner died.  A root holds only the pipes of
# the stage it runs, and a stage's processes are all dead before its root
# takes another, so the end of a command socket still means exactly "pgw is
# done with this stage", and no stage sees another's processes.  A root that
# could not kill everything (a process stuck in the kernel) exits instead of
# taking another stage.  The spawner is a subreaper too: a root killed early
# (by its own CLI, say) hands the stage's processes to the spawner rather
# than to init, and the spawner, woken by the root's SIGCHLD, kills every
# child of its that is not a root, with its tree.
#
# Requests, pgw -> root: a 4-byte big-endian length, then that much JSON
# {"argv", "env", "cwd", "umask"}, with the fds [commands, reports, stdin,
# stdout, stderr] on its first byte; end of file: the root exits (a busy one
# ends its stage first, when its command socket closes).  pgw -> spawner: the
# same, with the new root's socket as a sixth fd; end of file: the spawner
# reaps the roots that exit with it, and exits.  Commands, pgw -> root: b"T"
# (SIGTERM the CLI's group); end of file (kill everything, end the stage).
# Reports, root -> pgw, one line each: `pid N` or `error ERRNO` (the CLI
# could not be started), then `exit RETURNCODE`, then `free` once nothing of
# the stage is left.  Both go over socket pairs (see stage_pipes for why not
# pipes): about 13 us more a stage, to make.

# The spawner's command line, which its roots keep: the source comes on its
# standard input, not in its argv, where `ps` would show all of it for every
# stage root.
STAGE_SPAWNER_LOADER = "import sys; exec(sys.stdin.buffer.read())  # pgw's stage spawner"

STAGE_SPAWNER_SOURCE = r"""
import errno, gc, json, os, resource, select, signal, socket, struct, sys, time

LINUX = sys.platform.startswith("linux")
if LINUX:
    import ctypes
    PRCTL = ctypes.CDLL(None, use_errno=True).prctl

def descendants(root):
    # The kernel's list of each task's children where it keeps one, else every
    # process's parent from /proc/PID/stat.  A process that ends meanwhile is
    # passed over: the next pass finds what it left.
    if os.path.exists("/proc/%d/task/%d/children" % (root, root)):
        found, todo = [], [root]
        while todo:
            pid = todo.pop()
            try:
                tasks = os.listdir("/proc/%d/task" % pid)
            except OSError:
                continue
            for task in tasks:
                try:
                    with open("/proc/%d/task/%s/children" % (pid, task)) as f:
                        kids = [int(k) for k in f.read().split()]
                except OSError:
                    continue
                found += kids
                todo += kids
        return found
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name, "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            parents.setdefault(int(stat[stat.rindex(b")") + 2:].split()[1]), []).append(int(name))
    found, todo = [], [root]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found

RLIMITS = [getattr(resource, name) for name in dir(resource) if name.startswith("RLIMIT_")]

def inherited():
    # What a process of the stage's user can change in its root from outside,
    # which every later CLI of the root would inherit, and which the root
    # cannot always undo (a hard limit lowered, a nice value raised).
    state = [os.getpriority(os.PRIO_PROCESS, 0)]
    for limit in RLIMITS:
        try:
            state.append(resource.getrlimit(limit))
        except (OSError, ValueError):
            state.append(None)
    if LINUX:
        state += [os.sched_getaffinity(0), os.sched_getscheduler(0), os.sched_getparam(0)]
        try:
            with open("/proc/self/oom_score_adj", "rb") as f:
                state.append(f.read())
        except OSError:
            pass
    return state

def stage_root(link, request, fds):
    # In a root, forked from the spawner; never returns.  It runs stages one
    # after another, each sent by pgw on `link`, until its end of file, or
    # until a stage changed what the next would inherit from it.
    if LINUX:
        PRCTL(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)  # full: a wake is pending already
    signal.signal(signal.SIGCHLD, lambda *_: None)
    born = inherited()
    while True:
        commands, reports, *stdio = fds
        if not run_stage(json.loads(request), commands, reports, stdio, wake_r, born):
            os._exit(0)  # what is left of the stage, if anything, the spawner sweeps
        try:
            received = receive(link, 5)
        except OSError:
            received = None
        if received is None:
            os._exit(0)
        request, fds = received

# Signals the root ignores or catches, at their defaults again for the CLI (a
# caught one is reset by exec anyway, but an ignored one would be inherited).
CLI_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE, signal.SIGXFSZ)

def start_cli(request, stdio):
    # The CLI's pid, or OSError.  posix_spawn (vfork underneath) copies nothing
    # of the root's memory: 0.07 ms of the root's CPU against 0.3 for a fork
    # and exec, measured.  The directory and umask it cannot set are the
    # root's own for that moment.
    os.chdir(request["cwd"])
    umask = request["umask"]
    before = os.umask(umask) if umask is not None else None
    try:
        return os.posix_spawn(
            request["argv"][0], request["argv"], request["env"], setsid=True, setsigdef=CLI_SIGNALS,
            file_actions=[(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(stdio)],
        )
    except NotImplementedError:  # a C library without setsid for posix_spawn
        return fork_cli(request, stdio)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return fork_cli(request, stdio)  # a system older than its headers: macOS before 10.15
    finally:
        if before is not None:
            os.umask(before)
        os.chdir("/")  # not left in a scratch directory that pgw removes

def fork_cli(request, stdio):
    failed_r, failed_w = os.pipe()
    try:
        cli = os.fork()
    except OSError:  # the root lives on, stage after stage: nothing of this one may stay open
        os.close(failed_r)
        os.close(failed_w)
        raise
    if cli == 0:
        try:
            os.setsid()
            for signum in CLI_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            for fd, target in zip(stdio, (0, 1, 2)):
                os.dup2(fd, target)  # inheritable: the CLI's own
            os.execve(request["argv"][0], request["argv"], request["env"])
        except OSError as exc:
            os.write(failed_w, b"%d" % exc.errno)
        os._exit(127)
    os.close(failed_w)
    failure = os.read(failed_r, 16)
    os.close(failed_r)
    if failure:
        os.waitpid(cli, 0)
        raise OSError(int(failure), os.strerror(int(failure)))
    return cli

def kill_all(cli, reap):
    # Kill the root's descendants until a pass finds none; True if some are
    # left (a process stuck in the kernel; pgw's own wait for the root is 5 s).
    deadline = time.monotonic() + 5.0
    left = reap()
    while left and time.monotonic() < deadline:
        for pid in descendants(os.getpid()) if LINUX else []:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if not LINUX and cli is not None:
            try:
                os.killpg(cli, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.001)
        left = reap()
    return left

def run_stage(request, commands, reports, stdio, wake_r, born):
    # One stage, in its root; True if the root may take another: no process of
    # the stage is left, and it inherits now what it did when `born`.
    def report(line):
        try:
            os.write(reports, line)
        except OSError:
            pass  # pgw is gone: the stage is killed all the same

    try:
        cli = start_cli(request, stdio)
        report(b"pid %d\n" % cli)
    except OSError as exc:
        cli = None
        report(b"error %d\n" % (exc.errno or 0))
    finally:
        for fd in stdio:
            os.close(fd)  # the pipes' end of file is the stage's alone

    def reap():
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            if pid == 0:
                return True
            if pid == cli:
                report(b"exit %d\n" % os.waitstatus_to_exitcode(status))

    poller = select.poll()  # not select(), which fails on a descriptor numbered over 1024
    poller.register(commands, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while cli is not None:
        ready = [fd for fd, _ in poller.poll()]
        if wake_r in ready:
            os.read(wake_r, 512)
            if not reap():
                break  # no process of the stage is left: nothing to kill, so pgw need not wait for one
        if commands in ready:
            command = os.read(commands, 64)
            if not command:
                break
            if b"T" in command:
                for signum in (signal.SIGTERM, signal.SIGCONT):  # a stopped process takes SIGTERM once it goes on
                    try:
                        os.killpg(cli, signum)
                    except OSError:
                        pass
    left = kill_all(cli, reap)
    os.close(commands)
    reusable = not left and inherited() == born
    if reusable:
        report(b"free\n")  # pgw may send the next stage on the link
    os.close(reports)  # its end of file tells pgw the stage's processes are gone
    return reusable

# Received fds close on exec (until a CLI takes its own as 0, 1, 2), in the
# same recvmsg where the system can do it.  (socket.recv_fds of Python 3.11
# never passes its flags on to recvmsg: recvmsg is called here directly.)
RECV_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
INT_BYTES = struct.calcsize("i")

def receive(control, count):
    # One request, its JSON unparsed, and its `count` fds; or None at end of file.
    header, ancillary, _, _ = control.recvmsg(4, socket.CMSG_LEN(count * INT_BYTES), RECV_CLOEXEC)
    fds = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            whole = len(data) - len(data) % INT_BYTES
            fds += struct.unpack("%di" % (whole // INT_BYTES), data[:whole])
    if not RECV_CLOEXEC:
        for fd in fds:
            os.set_inheritable(fd, False)
    while header and len(header) < 4:
        more = control.recv(4 - len(header))
        header = header + more if more else b""
    if len(header) < 4 or len(fds) != count:
        for fd in fds:
            os.close(fd)
        return None
    size, body = struct.unpack("!I", header)[0], bytearray()
    while len(body) < size:
        chunk = control.recv(min(size - len(body), 1 << 20))
        if not chunk:
            return None
        body += chunk
    return body, fds

def children(pid):
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            return [int(kid) for kid in f.read().split()]
    except OSError:
        return [kid for kid in descendants(pid) if parent(kid) == pid]

def parent(pid):
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[1])

def sweep(roots):
    # The spawner is a subreaper as well: the processes of a stage whose root
    # died early (its CLI killed it, or the OOM killer did) come here rather
    # than to init, and die here, hoppers included.  Roots that ended are
    # reaped.  A stopped root could neither kill its stage nor report on it:
    # it is killed, and its stage with it (roots are in a session of their
    # own, so no terminal's Ctrl-Z stops one: a CLI or a user did).
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        try:
            while True:
                pid, status = os.waitpid(-1, os.WNOHANG | os.WUNTRACED)
                if pid == 0:
                    break
                if os.WIFSTOPPED(status):
                    os.kill(pid, signal.SIGKILL)  # reaped at a later pass, or at its SIGCHLD
                    continue
                roots.discard(pid)
        except ChildProcessError:
            pass
        strays = [pid for pid in children(os.getpid()) if pid not in roots] if LINUX else []
        if not strays:
            return
        for pid in strays + [kid for stray in strays for kid in descendants(stray)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.001)

def end(roots):
    # pgw closed the socket of every free root before this one: they exit at
    # once, and are reaped here rather than left to init.  A busy one (with a
    # child) ends with its stage, later: not waited for.
    waiting = {root for root in roots if not LINUX or not children(root)}
    deadline = time.monotonic() + 1.0
    while waiting & roots and time.monotonic() < deadline:
        sweep(roots)
        time.sleep(0.001)

def main():
    control = socket.socket(fileno=int(sys.argv[1]))
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)  # only pgw, by closing the socket, ends the spawner
    if LINUX:
        PRCTL(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
        # PR_SET_DUMPABLE 0, kept by the roots it forks: a stage's process, of
        # the same user, can then open none of their descriptors through
        # /proc (their signal pipes, say).  What pgw reads of /proc, the
        # children and stat files, stays readable.
        PRCTL(4, 0, 0, 0, 0)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)  # full: a wake is pending already
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a root ended: sweep
    # Every page the spawner writes while a root lives is copied, at its
    # expense: the collector leaves the objects of the start alone, and the
    # request is parsed in the root.
    gc.freeze()
    poller = select.poll()
    poller.register(control.fileno(), select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    roots = set()  # every root's pid, for the sweep
    while True:
        ready = [fd for fd, _ in poller.poll()]
        if wake_r in ready:
            os.read(wake_r, 512)
            sweep(roots)
        if control.fileno() not in ready:
            continue
        received = receive(control, 6)
        if received is None:
            end(roots)
            return
        body, fds = received
        root = os.fork()
        if root == 0:
            control.close()
            os.close(wake_r)
            os.close(wake_w)
            stage_root(socket.socket(fileno=fds.pop()), body, fds)
        roots.add(root)
        for fd in fds:
            os.close(fd)

main()
"""


@attrs.frozen
class PreparedStage:
    """A stage.request checked and turned into what the OS takes."""

    request: StageRequest
    scratch_dir: Path
    argv: list[str]
    environ: dict[str, str]
    files: list[tuple[tuple[str, ...], bytes]]


def prepare_stage(
    request: StageRequest, scratch_root: Path, worker_environ: typing.Mapping[str, str], stage_env: dict[str, str]
) -> PreparedStage:
    """Check everything about a request before it takes a slot; StageRejected says what is wrong."""
    check_stage_id(request.stage_run_id)
    check_stage_arguments(request)
    files = check_stage_files(request.files)
    search_path = cli_search_path(stage_env, worker_environ)
    binary = shutil.which(request.cli, path=search_path)
    if binary is None:
        raise StageRejected(f"CLI not found: {request.cli!r} is not on PATH ({search_path})")
    argv = [binary, *request.cli_args] + ([request.stdin] if request.stdin_mode == "argv_last" else [])
    environ = stage_environment({**worker_environ, **stage_env}, request.env, request.stage_run_id)
    # What execve copies: each argument and each NAME=value with its NUL, encoded as
    # os.fsencode does (one encode of it all: the same bytes, without a call per string).
    strings = [*argv, *[f"{name}={value}" for name, value in environ.items()]]
    exec_bytes = len("\0".join(strings).encode(FS_ENCODING, FS_ERRORS)) + 1
    if exec_bytes > EXEC_MAX_BYTES:
        raise StageRejected(
            f"the arguments and environment come to {exec_bytes} bytes, more than the {EXEC_MAX_BYTES} "
            "this system lets a program start with: send a long prompt on standard input"
        )
    if EXEC_STRING_MAX_BYTES is not None and exec_bytes > EXEC_STRING_MAX_BYTES:  # else none can be
        longest = max(len(string.encode(FS_ENCODING, FS_ERRORS)) + 1 for string in strings)
        if longest > EXEC_STRING_MAX_BYTES:
            raise StageRejected(
                f"one argument or environment variable comes to {longest} bytes, more than the "
                f"{EXEC_STRING_MAX_BYTES} this system lets one be: send a long prompt on standard input"
            )
    # The files go on decoded only: their base64 too would hold a third as much
    # again in memory for as long as the stage waits for a slot.
    request = attrs.evolve(request, files={}) if request.files else request
    return PreparedStage(request, scratch_root / request.stage_run_id, argv, environ, files)


@attrs.frozen
class StageOutcome:
    """What happened to a stage, for `stage_exit`."""

    timeout_s: int
    duration_ms: int
    returncode: Optional[int] = None  # the CLI's, once it was reaped
    started: bool = False  # the CLI ran (its pid was acked)
    stopped: bool = False  # its scope was cancelled: a stop or its timeout
    stop_error: Optional[str] = None  # why it was stopped, when not its timeout
    rejected: Optional[str] = None  # why it could not run
    root_lost: bool = False  # its stage root was killed while the CLI ran


def stage_internal_error(exc: BaseException) -> str:
    """A stage's exit error for a bug in pgw (its traceback goes to run.log)."""
    return f"internal error in pgw: {type(exc).__name__}"


def stage_exit(stage_run_id: str, outcome: StageOutcome) -> StageExit:
    """The stage.exit that PROTOCOL.md owes the server for what happened."""
    error = outcome.rejected
    if error is None and outcome.stopped:
        error = outcome.stop_error or f"timed out after {max(outcome.timeout_s, 0)} s"  # a negative one is none at all
        if not outcome.started and outcome.stop_error is not None:
            error += ", before it started"
    if error is None and outcome.root_lost:
        error = "its stage root was killed: the CLI's exit status is unknown, and every process of the stage was killed"
    # A CLI that never got its ack reports -1, as PROTOCOL.md says of one that did not run.
    returncode = outcome.returncode if outcome.started and outcome.returncode is not None else -1
    return StageExit(stage_run_id, returncode, outcome.duration_ms, error)


class Link:
    """pgw's end of the Unix socket to the spawner or to one stage root, which
    exits at its end of file: `socket` for a send that does not wait, `stream`
    (the same socket) for one that does."""

    def __init__(self, sock: socket.socket, spawner: int) -> None:
        self.socket = sock
        self.stream = trio.socket.from_stdlib_socket(sock)  # which makes it non-blocking
        self.spawner = spawner  # which spawner it leads to: a root of one that died is contained no more
        self.served = False  # it ran a stage: a free root's, not one the spawner forked for this request

    def send_now(self, message: bytes, fds: list[int]) -> int:
        """What the socket takes of `message` at once, `fds` with its first byte."""
        return self.socket.sendmsg([message], fd_rights(fds))

    async def send(self, message: bytes, fds: list[int], sent: int = 0) -> None:
        """`message` from byte `sent` on, waiting as the socket needs (`fds` with byte 0)."""
        if sent == 0:
            sent = await self.stream.sendmsg([message], fd_rights(fds))
        view = memoryview(message)
        while sent < len(view):
            sent += await self.stream.send(view[sent:])

    def close(self) -> None:
        self.stream.close()


def fd_rights(fds: list[int]) -> list[tuple[int, int, bytes]]:
    """sendmsg's ancillary data passing `fds` (SCM_RIGHTS)."""
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]


class FreeRoots:
    """The stage roots waiting for a stage; the one freed last goes first (its
    pages are the likeliest still in memory), one left free for idle_s ends."""

    def __init__(self, idle_s: float) -> None:
        self._idle_s = idle_s
        self._since: dict[Link, float] = {}  # oldest first
        self._freed = trio.Event()

    def __len__(self) -> int:
        return len(self._since)

    def put(self, link: Link) -> None:
        self._since[link] = trio.current_time()
        self._freed.set()

    def take(self) -> Optional[Link]:
        return self._since.popitem()[0] if self._since else None

    def clear(self) -> None:
        for link in self._since:
            link.close()
        self._since.clear()

    async def retire_idle(self) -> None:
        """Idle, this task sleeps.  Woken by the first root freed, it sleeps its
        idle time out before it looks again: roots freed meanwhile cost it no
        wake-up."""
        while True:
            self._freed = trio.Event()
            await self._freed.wait()
            await trio.sleep(self._idle_s)
            while self._since:
                oldest, since = next(iter(self._since.items()))
                if since + self._idle_s > trio.current_time():
                    await trio.sleep_until(since + self._idle_s)
                else:
                    del self._since[oldest]
                    oldest.close()


def feed_source(pipe: typing.BinaryIO, source: bytes) -> None:
    """Write the spawner's source to its standard input, and close it."""
    try:
        with pipe:
            pipe.write(source)
    except OSError:  # it died before reading: the request sent to it next fails, and says so
        pass


class StageSpawner:
    """pgw's end of the spawner, started at the first stage (again if it died),
    and of the stage roots it forked: a stage goes straight to a free root,
    and only when none is free does the spawner fork one."""

    def __init__(self, root_idle_s: float, subreaper: bool = False) -> None:
        self.free = FreeRoots(root_idle_s)
        self._subreaper = subreaper  # pgw is to become one before its first spawner starts
        self._process: Optional[subprocess.Popen[bytes]] = None
        self._control: Optional[Link] = None
        self._lock = trio.Lock()  # one request at a time on the stream
        self._started = 0  # how many spawners were started: which one a root came from
        self._sessions: set[int] = set()  # every spawner's, which its roots keep: see sweep_orphans

    def _start(self) -> Link:
        if self._subreaper:  # here, not at pgw's start: ctypes costs a few ms before the hello
            self._subreaper = not become_subreaper()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with theirs:
            # Started once, between stages: a plain fork here costs less than trio's thread
            # hop, and close_fds keeps every pipe of a running stage out of it.
            self._process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", STAGE_SPAWNER_LOADER, str(theirs.fileno())],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, pass_fds=(theirs.fileno(),),
                start_new_session=True,  # a terminal's Ctrl-C is pgw's to handle, not the stages'
                # The roots it forks are the CLIs' parents: pgw's settings (the token) stay out
                # of their environment, as out of the CLIs'.
                env={name: value for name, value in os.environ.items() if not name.startswith("PGW_")},
            )
        # From a thread: a pipe may hold less than the 13 KB (8 KiB, once a
        # user's pipes pass pipe-user-pages-soft, which 32 stages' enlarged
        # pipes do), and the event loop must not wait for the new Python to
        # start and read them.
        threading.Thread(
            target=feed_source, args=(self._process.stdin, STAGE_SPAWNER_SOURCE.encode("ascii")), daemon=True
        ).start()
        self._started += 1
        self._sessions.add(self._process.pid)  # start_new_session: its pid names its session
        self._control = Link(ours, self._started)
        return self._control

    async def sweep_orphans(self) -> None:
        """Where pgw is a subreaper (`pgw run` on Linux), what a spawner that died
        (or was stopped, and so killed) held passes to pgw: its roots, which run
        their stages on, and the processes of any stage whose root died after
        it.  A root is known by its session, a spawner's, which nothing of a
        stage can join (every CLI starts a session of its own); every other
        child pgw did not start dies here, with its descendants.  A stopped
        spawner (its stop is a SIGCHLD too) is killed at once: what it held
        passes to pgw, where a root a stage has stopped as well dies, before
        a hopper under it piles up zombies that nothing reaps."""
        with trio.open_signal_receiver(signal.SIGCHLD) as arrivals:
            async for _ in arrivals:
                self.replace_if_stopped()
                deadline = trio.current_time() + SWEEP_S
                while (strays := self._strays()) and trio.current_time() < deadline:
                    for pid in strays + [kid for stray in strays for kid in descendants(stray)]:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except OSError:
                            pass
                    await trio.sleep(0.001)  # a hopper's next fork, reaped or killed at the next pass

    def _strays(self) -> list[int]:
        # The spawner of now: one may be started again between two passes.
        return stray_children(self._process.pid if self._process is not None else None, self._sessions)

    async def spawn(self, prepared: PreparedStage, prompt: Optional[bytes], umask: Optional[int]) -> "StageRoot":
        """A stage root running `prepared`, `prompt` on its standard input (None:
        not connected); the caller owns the result at once."""
        body = json.dumps(
            {"argv": prepared.argv, "env": prepared.environ, "cwd": str(prepared.scratch_dir), "umask": umask}
        ).encode("utf-8", "surrogateescape")
        message = struct.pack("!I", len(body)) + body
        theirs, root = stage_pipes(prompt)
        try:
            root.link = await self._hand_over(message, theirs)
        except BaseException:
            root.discard()
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        return root

    async def _hand_over(self, message: bytes, fds: list[int]) -> Link:
        """The request sent to a free root, else to the spawner with a new
        root's socket; that root's link."""
        # Stopped, it would take the request and never answer; and it is the free
        # roots' subreaper, which keeps a stage whose root dies: none is taken again.
        self.replace_if_stopped()
        while (link := self.free.take()) is not None:
            try:
                sent = link.send_now(message, fds)
                if sent < len(message):
                    with trio.CancelScope(shield=True), trio.fail_after(SPAWNER_SEND_TIMEOUT_S):
                        await link.send(message, fds, sent)
            except (OSError, trio.TooSlowError):  # it ended meanwhile, or takes nothing: the next one
                link.close()
                continue
            return link
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with theirs:
                sent_to, sent = self._control, self._send_now(message, [*fds, theirs.fileno()])
                if sent < len(message):
                    # Shielded: half a request would leave the stream out of step for every later stage.
                    with trio.CancelScope(shield=True):
                        async with self._lock:
                            await self._send(message, [*fds, theirs.fileno()], sent, sent_to)
        except BaseException:
            ours.close()
            raise
        return Link(ours, self._started)

    def _spawner_runs(self) -> bool:
        """Whether the spawner is alive and not stopped.  pgw, its parent, looks
        without reaping it (a stop is not poll()'s); macOS has no waitid, and
        no subreaper behind its roots either."""
        if self._process is None:
            return False
        if not hasattr(os, "waitid"):
            return self._process.poll() is None
        try:
            changed = os.waitid(os.P_PID, self._process.pid, os.WEXITED | os.WSTOPPED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return False
        return changed is None

    def _send_now(self, message: bytes, fds: list[int]) -> int:
        """As much of the request as the socket takes without waiting (nearly
        always all of it: a task switch and two cancel scopes fewer per stage)."""
        if self._control is None or self._lock.locked():
            return 0
        try:
            return self._control.send_now(message, fds)
        except OSError:  # full (BlockingIOError), or the spawner died: `_send` waits, or starts it again
            return 0

    async def _send(self, message: bytes, fds: list[int], sent: int = 0, sent_to: Optional[Link] = None) -> None:
        """The request from byte `sent` on (its fds went with byte 0) if those
        went to the spawner still running, else all of it."""
        for attempt in (1, 2):  # a spawner that died (killed by hand, OOM) is started again, once
            try:
                control = self._control or self._start()
                if control is not sent_to:  # started again meanwhile, by another stage: it saw none of it
                    sent = 0
                with trio.fail_after(SPAWNER_SEND_TIMEOUT_S):
                    await control.send(message, fds, sent)
                return
            except (OSError, trio.TooSlowError, trio.ClosedResourceError) as exc:  # closed: discarded meanwhile
                sent = 0  # a spawner started again has seen nothing of it
                self.discard()
                if attempt == 2:
                    reason = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else "it took no request"
                    raise StageRejected(f"cannot start the stage: the stage spawner ({sys.executable}) failed: {reason}") from None

    def replace_if_stopped(self) -> None:
        """Kill a spawner that is stopped (or died); the next stage starts another.
        After a root was killed from outside, a stopped spawner would keep what
        the stage left alive (it went to the spawner); killed, the spawner hands
        it to pgw, which, as a subreaper, kills it."""
        if self._process is not None and not self._spawner_runs():
            self.discard()

    def release(self, root: "StageRoot") -> None:
        """A root whose stage has ended: free for the next, if it said so and
        the spawner that forked it (the subreaper behind it) still runs."""
        link, root.link = root.link, None
        if link is None:
            return
        if root.free and link.spawner == self._started and self._control is not None:
            link.served = True
            self.free.put(link)
        else:
            link.close()

    async def failure(self, link: Optional[Link] = None) -> Optional[str]:
        """Why the spawner ended, if it did (the next stage starts it again).  Its
        end of file comes before its exit status: it gets a moment to exit.
        A free root (`link`) that died while the spawner still holds its socket
        was killed from outside: no wait.  (A root forked for the request gives
        no such sign: the spawner may die of that request, its end of file
        coming after the root's.)"""
        process = self._process
        if process is None or (link is not None and link.served and not self._hung_up()):
            return None
        with trio.move_on_after(SPAWNER_EXIT_WAIT_S):
            while process.poll() is None:
                await trio.sleep(0.01)
        if process.returncode is None:
            return None
        if self._process is process:  # not one another stage has started since
            self.close()
        why = f"the stage spawner ({sys.executable}) exited with status {process.returncode}"
        log.warning("%s; what it said went to pgw's standard error", why)
        return why

    def _hung_up(self) -> bool:
        """Whether the spawner closed its end of the socket (it never writes on
        it: a peek that would not block finds its end of file, or an error)."""
        if self._control is None:
            return True
        try:
            self._control.socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True
        return True

    def discard(self) -> None:
        """Kill the spawner, which the next stage starts again (running roots live on)."""
        if self._process is not None:
            self._process.kill()  # SIGKILL: reaped at once, even when stopped
        self.close()

    def close(self) -> None:
        """End the spawner and its free roots (running roots live on until their
        stage ends, and are not taken again)."""
        self.free.clear()  # first: the spawner reaps them as it exits
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._process is not None:
            try:
                self._process.wait(SPAWNER_EXIT_WAIT_S)  # it exits at end of file on its socket
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None


def stage_pipes(prompt: Optional[bytes]) -> tuple[list[int], "StageRoot"]:
    """A new stage's pipes: the ends its root takes (commands, reports, and the
    CLI's stdin, stdout and stderr), and pgw's StageRoot over the others;
    `prompt` is written into the stdin pipe as far as it fits (None: /dev/null).
    Nothing stays open when one cannot be made (too many open files).

    Commands and reports go over socket pairs, not pipes: a process of the
    stage could open /proc/ROOT/fd/N of a pipe for writing, and, holding a
    second write end, keep its root from ever seeing the end of file that
    tells it to kill the stage (or fill the reports with bytes that never
    end a line).  A socket cannot be opened through /proc."""
    opened: list[int] = []

    def pipe() -> tuple[int, int]:
        ends = os.pipe()
        opened.extend(ends)
        return ends

    def socket_pair() -> tuple[int, int]:
        one, other = socket.socketpair()
        ends = one.detach(), other.detach()
        opened.extend(ends)
        return ends

    try:
        commands_r, commands_w = socket_pair()
        reports_r, reports_w = socket_pair()
        stdin_w: Optional[int] = None
        unwritten = b""
        if prompt is None:
            stdin_r = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            opened.append(stdin_r)
        else:
            stdin_r, stdin_w = pipe()
            unwritten = write_prompt(stdin_w, prompt)
            if not unwritten:  # the whole prompt waits in the pipe: the CLI reads it, then end of file
                opened.remove(stdin_w)
                os.close(stdin_w)
                stdin_w = None
        stdout_r, stdout_w = pipe()
        stderr_r, stderr_w = pipe()
    except BaseException:
        for fd in opened:
            os.close(fd)
        raise
    root = StageRoot(commands_w, reports_r, stdin_w, unwritten, stdout_r, stderr_r)
    return [commands_r, reports_w, stdin_r, stdout_w, stderr_w], root


# What a stage root reports, a line each: the CLI's pid, why it could not
# start it (an errno), its exit status, and that it can take another stage.
_REPORT_LINE = re.compile(rb"(pid [0-9]{1,10}|error [0-9]{1,5}|exit -?[0-9]{1,5}|free)")
REPORT_LINE_MAX_BYTES = 64


class StageRoot:
    """pgw's end of a stage root: its command and report pipes, the CLI's stdio pipes."""

    def __init__(
        self, commands: int, reports: int, stdin: Optional[int], unwritten: bytes, stdout: int, stderr: int
    ) -> None:
        self._commands: Optional[int] = commands
        self._reports = trio.lowlevel.FdStream(reports)
        # The pipe of the part of the prompt that did not fit in it at the start, if any.
        self.stdin = trio.lowlevel.FdStream(stdin) if stdin is not None else None
        self.unwritten = unwritten
        self.stdout = trio.lowlevel.FdStream(stdout)
        self.stderr = trio.lowlevel.FdStream(stderr)
        self._pending = b""
        self._ended = False  # the report pipe's end of file: the root is gone
        self._waited = False  # kill() waited for that, or gave up
        self.cli_pid: Optional[int] = None
        self.returncode: Optional[int] = None
        self.lost = False  # the root died before the CLI's exit: killed from outside
        self.free = False  # it said it can take another stage: nothing of this one is left
        self.link: Optional[Link] = None  # its socket, which the spawner takes back at the end

    async def _report(self) -> Optional[bytes]:
        """The root's next line; None once it has gone, or once what it says
        is no report of its (`pid N`, `error N`, `exit N`, `free`): a root that
        says that is out of pgw's hands, and is taken for killed."""
        while b"\n" not in self._pending:
            chunk = await receive_now(self._reports, 4096) if not self._ended else b""
            if not chunk or len(self._pending) > REPORT_LINE_MAX_BYTES:
                self._ended = True
                return None
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        if not _REPORT_LINE.fullmatch(line):
            self._pending, self._ended = b"", True
            return None
        self.free = self.free or line == b"free"  # its last line, which whoever reads on may meet
        return line

    async def started(
        self, cli: str, spawner_failure: typing.Callable[[Optional[Link]], typing.Awaitable[Optional[str]]]
    ) -> int:
        """The CLI's pid, or StageRejected when it could not be started."""
        line = await self._report()
        if line is None:  # the root never said a word: the spawner may have died before forking it
            raise StageRejected(f"cannot start {cli}: {await spawner_failure(self.link) or 'the stage root failed'}")
        kind, _, value = line.partition(b" ")
        if kind != b"pid":
            reason = os.strerror(int(value)) if kind == b"error" and int(value) else "the stage root failed"
            raise StageRejected(f"cannot start {cli}: {reason}")
        self.cli_pid = int(value)
        return self.cli_pid

    async def exited(self) -> int:
        """Until the CLI has exited; its return code (negative for a signal)."""
        while self.returncode is None:
            line = await self._report()
            if line is None:
                self.returncode, self.lost = -1, True  # the root died without saying: status unknown
            elif line.startswith(b"exit "):
                self.returncode = int(line[5:])
        return self.returncode

    def terminate(self) -> None:
        """SIGTERM the CLI's process group (the root relays it)."""
        if self._commands is not None:
            try:
                os.write(self._commands, b"T")
            except OSError:
                pass

    @property
    def ended(self) -> bool:
        """Its report pipe's end of file came: nothing of its stage is left."""
        return self._ended

    def close_commands(self) -> None:
        if self._commands is not None:
            os.close(self._commands)
            self._commands = None

    async def kill(self, wait_s: float) -> None:
        """Kill everything the stage started and wait for the root to go (once:
        a wait cancelled from outside is waited out again by the next call)."""
        self.close_commands()
        if self._waited:
            return
        with trio.move_on_after(wait_s):
            await self.exited()
            while await self._report() is not None:
                pass
        if not self._ended:
            log.warning("a stage root did not end within %.0f s; it goes on killing the stage's processes", wait_s)
        self._waited = True
        self._reports.close()

    def close_pipes(self) -> None:
        """Close pgw's ends of the CLI's pipes: at once, no checkpoint (a
        task still reading one gets ClosedResourceError)."""
        for pipe in (self.stdin, self.stdout, self.stderr):
            if pipe is not None:
                pipe.close()

    def discard(self) -> None:
        """Close every pipe of a root that never started."""
        self.close_commands()
        self._reports.close()
        self.close_pipes()
        if self.link is not None:
            self.link.close()
            self.link = None


class StageRun:
    """One stage from its request to its exit: waiting for a slot, running, being stopped."""

    def __init__(self, prepared: PreparedStage, daemon: "Daemon") -> None:
        self.prepared = prepared
        self.request = prepared.request
        self.id = prepared.request.stage_run_id
        self.daemon = daemon
        self.scope = trio.CancelScope()
        self.stop_error: Optional[str] = None  # why it was stopped, for its exit
        self.grace_s = daemon.timing.cancel_grace_s  # SIGTERM -> SIGKILL once stopped
        self.grace_scope: Optional[trio.CancelScope] = None
        # The wait for the CLI's exit, once it runs: what a stop (or the timeout) ends then.
        self.running_scope: Optional[trio.CancelScope] = None
        self.root: Optional[StageRoot] = None
        self.owns_scratch = False  # its scratch dir is its own to remove: it made it
        self.began = time.time()  # when it left the queue: the codex session it runs starts after
        self.output = StageOutput(self.id)

    @property
    def running(self) -> bool:
        return self.root is not None

    @property
    def stopped(self) -> bool:
        """Whether a stop or the timeout ended it, before its CLI ran or while it did."""
        return self.scope.cancelled_caught or (self.running_scope is not None and self.running_scope.cancelled_caught)

    def stop(self, error: str, grace_s: float) -> None:
        """Stop the stage; a shorter grace than before takes effect at once, and
        its reason is the one the exit gives (the stop that ended it).  Once the
        CLI runs this ends the wait for its exit, not the pumps: what it wrote
        before, and while it goes, still reaches the server."""
        if self.stop_error is None or grace_s < self.grace_s:
            self.stop_error = error
        self.grace_s = min(self.grace_s, grace_s)
        if self.grace_s == 0 and self.grace_scope is not None:
            self.grace_scope.cancel()
        (self.running_scope or self.scope).cancel()

    async def run(self, outbox: Outbox, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Wait for a slot, run, send the exit; the slot is freed only after that,
        so the server never sees more than --max-stages stages between ack and exit."""
        daemon, request = self.daemon, self.request
        slots = daemon.slots
        holds_slot = False
        started = time.monotonic()
        rejected: Optional[str] = None
        ending = "killed: the connection was lost"
        task_status.started()
        try:
            try:
                with self.scope:
                    await self._write_files()
                    if slots is not None:
                        await slots.acquire()  # cancelled here: never started
                        holds_slot = True
                    started, self.began = time.monotonic(), time.time()
                    self.scope.deadline = trio.current_time() + min(max(request.timeout_s, 0), TIMEOUT_MAX_S)
                    await self._execute(outbox)
                if request.cli == "codex" and self.root is not None and self.root.cli_pid is not None:
                    await self._send_codex_trace(outbox)
                ending = "ok"
            except StageRejected as exc:
                rejected = str(exc)
            except Exception as exc:  # noqa: BLE001 - a bug must not leave the server waiting
                log.exception("stage %r: internal error", self.id)
                rejected = stage_internal_error(exc)
            finally:
                try:
                    if self.owns_scratch and not remove_empty_scratch(self.prepared.scratch_dir):
                        with trio.CancelScope(shield=True):
                            await trio.to_thread.run_sync(remove_scratch, self.prepared.scratch_dir)
                except Exception:  # noqa: BLE001 - the stage's exit goes out all the same
                    log.exception("stage %r: internal error removing its scratch dir", self.id)
                del daemon.stages[self.id]
                daemon.state_file.publish()
                outcome = StageOutcome(
                    timeout_s=request.timeout_s,
                    duration_ms=int((time.monotonic() - started) * 1000),
                    returncode=self.root.returncode if self.root is not None else None,
                    started=self.root is not None and self.root.cli_pid is not None,
                    stopped=self.stopped,
                    stop_error=self.stop_error,
                    rejected=rejected,
                    root_lost=self.root is not None and self.root.lost,
                )
                exit_record = stage_exit(self.id, outcome)
                if exit_record.error is not None:
                    ending = f"error={exit_record.error!r}"
                log.info(
                    "stage %r: ended cli=%s returncode=%d duration=%.1fs bytes_out=%d %s",
                    self.id, request.cli, exit_record.returncode, exit_record.duration_ms / 1000, self.output.bytes_out,
                    ending,
                )
            await outbox.put(lambda: exit_message_within_limit(exit_record))
        finally:
            if holds_slot and slots is not None:
                slots.release()

    async def _write_files(self) -> None:
        """The scratch dir and the request's files, before the stage waits for a
        slot: a queue of requests then holds their files on disk, not in memory."""
        prepared = self.prepared
        if os.path.lexists(prepared.scratch_dir):  # left by a stage of this id, or another's
            for other in self.daemon.stages.values():
                # On a file system blind to case (macOS's) or to Unicode normalisation,
                # `Job1` names `job1`'s directory, which write_scratch would empty.
                if other is not self and other.owns_scratch and _same_file(prepared.scratch_dir, other.prepared.scratch_dir):
                    raise StageRejected(
                        f"bad request: stage_run_id {shown(self.id)} names the scratch directory of the running "
                        f"stage {shown(other.id)} on this file system"
                    )
        self.owns_scratch = True
        try:
            if prepared.files:
                await write_scratch_stoppably(prepared.scratch_dir, prepared.files)
            else:  # a mkdir or two: not worth a thread's round trip
                write_scratch(prepared.scratch_dir, [])
        except OSError as exc:
            raise StageRejected(f"cannot write the stage's files: {exc.strerror or exc}") from None
        finally:  # on disk now, or never
            if prepared.files:
                self.prepared = attrs.evolve(prepared, files=[])

    async def _execute(self, outbox: Outbox) -> None:
        """Start the root, relay the output until the CLI and its pipes are done."""
        prepared, timing = self.prepared, self.daemon.timing
        await trio.lowlevel.checkpoint_if_cancelled()  # a stage stopped (or out of time) by now never starts
        try:
            prompt = self.request.stdin.encode("utf-8") if self.request.stdin_mode == "stdin" else None
            root = await self.daemon.spawner.spawn(prepared, prompt, self.daemon.stage_umask)
        except OSError as exc:
            raise StageRejected(f"cannot start the stage: {exc.strerror or exc}") from None
        self.root = root
        try:
            with trio.move_on_after(timing.spawner_answer_s) as waiting:
                pid = await root.started(self.request.cli, self.daemon.spawner.failure)
            if waiting.cancelled_caught:  # it took the request but does nothing: stopped, or stuck
                self.daemon.spawner.discard()
                raise StageRejected(
                    f"cannot start the stage: the stage spawner did not answer in {timing.spawner_answer_s:g} s"
                )
            for pipe in (root.stdout, root.stderr):
                enlarge_pipe(pipe)
            self.daemon.state_file.publish()
            log.info("stage %r: started cli=%s pid=%d", self.id, self.request.cli, pid)
            # From here a stop (or the timeout) ends only the wait for the CLI's
            # exit: the ack, and what the CLI writes before and while it goes,
            # still reach the server.
            self.running_scope = trio.CancelScope(deadline=self.scope.deadline)
            self.scope.deadline = math.inf
            await outbox.put(lambda: ack_message(self.id, pid))
            async with trio.open_nursery() as pumps:
                if root.stdin is not None:
                    pumps.start_soon(feed_stdin, root.stdin, root.unwritten)
                self.output.pump_both(pumps, root, outbox)
                await self._until_the_cli_ends(root)
                await self.output.drain(root, timing)
                pumps.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                if root.cli_pid is not None and root.returncode is None and self.grace_s > 0:
                    root.terminate()
                    with trio.move_on_after(self.grace_s) as self.grace_scope:
                        await root.exited()
                await root.kill(timing.kill_wait_s)
                root.close_pipes()
                self.daemon.spawner.release(root)
                if root.lost or not root.ended:  # killed, or stopped: by the stage, or with the spawner
                    self.daemon.spawner.replace_if_stopped()

    async def _until_the_cli_ends(self, root: StageRoot) -> None:
        """Until the CLI exits or the stage is stopped (cancel, timeout,
        shutdown); stopped: SIGTERM, its grace, then every process of the stage
        killed.  The pumps read on throughout."""
        with typing.cast(trio.CancelScope, self.running_scope):
            await root.exited()
        if root.returncode is not None:
            return
        if self.grace_s > 0:
            root.terminate()
            with trio.move_on_after(self.grace_s) as self.grace_scope:
                await root.exited()
        if root.returncode is None:
            await root.kill(self.daemon.timing.kill_wait_s)

    async def _send_codex_trace(self, outbox: Outbox) -> None:
        trace = await trio.to_thread.run_sync(
            read_codex_trace, self.prepared.scratch_dir,
            codex_sessions_dir(self.prepared.environ, self.prepared.scratch_dir), self.began, time.time(),
        )
        for data in escaped_output(trace) if trace else ():
            await outbox.put(lambda data=data: output_message(StageStdout, self.id, self.output.next_seq(), data))


class StageOutput:
    """A stage's output on its way to the server: a pump for each of the CLI's
    stdout and stderr, each read escaped into the stage's numbered messages."""

    def __init__(self, stage_run_id: str) -> None:
        self.id = stage_run_id
        self.seq = 0
        self.bytes_out = 0
        self.pumps_running = 0
        self.pumps_done = trio.Event()
        self.pumps_waiting_on_server = 0  # parked in Outbox.put: backpressure, not idleness

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def pump_both(self, nursery: trio.Nursery, root: StageRoot, outbox: Outbox) -> None:
        self.pumps_running = 2
        for pipe, record_type in ((root.stdout, StageStdout), (root.stderr, StageStderr)):
            nursery.start_soon(self.pump, pipe, record_type, outbox)

    async def drain(self, root: StageRoot, timing: Timing) -> None:
        """After the CLI's exit: what is left in the pipes gets a grace, then the
        stage's other processes die (one holding a pipe cannot hold the stage
        open), and what they left in the pipes is read while it keeps coming."""
        if self.pumps_done.is_set():  # the usual case: no grace to wait out
            return
        with trio.move_on_after(timing.pipe_drain_grace_s):
            await self.pumps_done.wait()
        if self.pumps_done.is_set():
            return
        await root.kill(timing.kill_wait_s)
        while True:
            before = self.bytes_out
            with trio.move_on_after(timing.pipe_drain_grace_s):
                await self.pumps_done.wait()
            if self.pumps_done.is_set():  # read to the end, if only just (an end of file adds no byte)
                return
            # Output or an end of file waiting in a pipe is a pump not run yet (a
            # busy machine: the grace ran out before the scheduler got to it), not
            # a process holding the pipe; stopping then would lose that output.
            if self.bytes_out == before and not self.pumps_waiting_on_server and not readable(root.stdout, root.stderr):
                log.warning("stage %r: a process outside the stage holds its pipes; stopped reading", self.id)
                return

    async def pump(self, pipe: trio.lowlevel.FdStream, record_type: type, outbox: Outbox) -> None:
        """Child output -> output messages, never splitting a character.

        Each read is escaped as bytes (`escaped_utf8`), without decoding it; a
        character cut off at its end waits for the next read.  Bytes that are
        not UTF-8 are replaced with U+FFFD, as a decoder would.
        """
        cut_off = b""
        try:
            while True:
                # With a cut-off character in front, one frame still holds the read.
                chunk = await receive_now(pipe, PIPE_READ_BYTES - len(cut_off))
                self.bytes_out += len(chunk)
                ended = not chunk
                pieces, cut_off = escaped_read(cut_off + chunk if cut_off else chunk, ended)
                del chunk  # only the escaped pieces wait for the outbox: memory while parked
                for data in pieces:
                    self.pumps_waiting_on_server += 1
                    try:
                        await outbox.put(lambda data=data: output_message(record_type, self.id, self.next_seq(), data))
                    finally:
                        self.pumps_waiting_on_server -= 1
                if ended:
                    return
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return
        finally:
            # Closed once read to its end: an open pipe whose writers are gone
            # reads as ready for ever, which drain would take for output coming.
            pipe.close()
            self.pumps_running -= 1
            if self.pumps_running == 0:
                self.pumps_done.set()


# How long one sweep of pgw's orphans may go on killing (a hopper forks anew).
SWEEP_S = 5.0


def become_subreaper() -> bool:
    """Make pgw a child subreaper (Linux): what a dead spawner held, and the
    processes of a stage whose root died after it, then pass to pgw, not to
    init.  True if it is one."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


PR_SET_CHILD_SUBREAPER = 36


def child_pids(pid: int) -> list[int]:
    """`pid`'s children, from each of its threads' /proc children list (Linux)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", "rb") as children:
                found += [int(kid) for kid in children.read().split()]
        except OSError:
            continue
    return found


def process_state(pid: int) -> Optional[str]:
    """The state letter in /proc/PID/stat (R, S, T, Z...), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            return stat_file.read().rpartition(b")")[2].split()[0].decode()
    except (OSError, IndexError):
        return None


def stray_children(spawner: Optional[int], sessions: set[int]) -> list[int]:
    """pgw's children neither its `spawner` (its Popen reaps it) nor a working
    root (one in a spawner's session; a stopped one could kill nothing: the
    spawner killed those), reaping those that ended."""
    strays = []
    for pid in child_pids(os.getpid()):
        if pid == spawner:
            continue
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                continue
            if os.getsid(pid) in sessions and process_state(pid) not in ("T", "t"):
                continue
        except (ChildProcessError, ProcessLookupError):
            continue
        strays.append(pid)
    return strays


def descendants(pid: int) -> list[int]:
    found, pending = [], [pid]
    while pending:
        kids = child_pids(pending.pop())
        found += kids
        pending += kids
    return found


def readable(*pipes: trio.lowlevel.FdStream) -> bool:
    """Whether a read of one of `pipes` that are open would not wait: output, or its end."""
    poller = select.poll()
    for pipe in pipes:
        if pipe.fileno() >= 0:
            poller.register(pipe.fileno(), select.POLLIN)
    return bool(poller.poll(0))


def write_prompt(fd: int, prompt: bytes) -> bytes:
    """Write what the new pipe `fd` takes of the prompt without waiting; the rest."""
    os.set_blocking(fd, False)
    view = memoryview(prompt)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            break
    return bytes(view)


async def receive_now(pipe: trio.lowlevel.FdStream, max_bytes: int) -> bytes:
    """`pipe.receive_some(max_bytes)` without its schedule point when bytes are
    waiting (a trip through trio's scheduler on every read, the price of a
    task switch).  Cancellation still lands here, and a wait is a real one.
    A producer cannot hog the loop: each read is queued in the outbox, which
    parks it when full."""
    await trio.lowlevel.checkpoint_if_cancelled()
    while True:
        try:
            return os.read(pipe.fileno(), max_bytes)  # -1 once closed: EBADF
        except BlockingIOError:
            await trio.lowlevel.wait_readable(pipe.fileno())
        except OSError as exc:
            if exc.errno == errno.EBADF:
                raise trio.ClosedResourceError("file was already closed") from None
            raise trio.BrokenResourceError from exc


async def feed_stdin(pipe: trio.abc.SendStream, prompt: bytes) -> None:
    """Write the prompt and close; a child that exits early or never reads is normal."""
    try:
        await pipe.send_all(prompt)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        with trio.CancelScope(shield=True):
            try:
                await pipe.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass


def enlarge_pipe(pipe: Any) -> None:
    """Ask Linux for a bigger pipe buffer; where that fails, the pipe stays as it is."""
    if fcntl is None or not sys.platform.startswith("linux"):
        return
    try:
        fcntl.fcntl(pipe.fileno(), F_SETPIPE_SZ, PIPE_BUFFER_BYTES)
    except (OSError, AttributeError):  # over /proc/sys/fs/pipe-max-size, or not a pipe
        pass


def private_dir(path: Path) -> Path:
    """`path` as a real directory of pgw's, mode 0700, never followed through a
    symlink: a stage can swap scratch/ for a link to another directory, which a
    later stage's cleanup would then empty.  What stands there instead is removed."""
    try:
        info: Optional[os.stat_result] = os.lstat(path)
    except FileNotFoundError:
        info = None
    if info is not None and not stat.S_ISDIR(info.st_mode):
        os.unlink(path)
        info = None
    if info is None:
        os.mkdir(path, 0o700)
    elif stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


async def write_scratch_stoppably(scratch_dir: Path, files: list[tuple[tuple[str, ...], bytes]]) -> None:
    """write_scratch in a thread, which a stage stopped meanwhile (cancel,
    timeout, shutdown) ends after the file it is writing, not after thousands
    more; what it wrote is on disk, for the stage's cleanup, once this ends."""
    stop, done = threading.Event(), threading.Event()

    def write() -> None:
        try:
            write_scratch(scratch_dir, files, stop)
        finally:
            done.set()

    try:
        await trio.to_thread.run_sync(write, abandon_on_cancel=True)
    except trio.Cancelled:
        stop.set()
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(done.wait)
        raise


def _same_file(one: Path, other: Path) -> bool:
    try:
        return os.path.samefile(one, other)
    except OSError:
        return False


def write_scratch(
    scratch_dir: Path, files: list[tuple[tuple[str, ...], bytes]], stop: Optional[threading.Event] = None
) -> None:
    """A fresh scratch dir holding the request's files; ECANCELED once `stop`
    is set, between two files (it runs in a thread trio cannot cancel)."""
    private_dir(scratch_dir.parent)
    try:
        scratch_dir.mkdir(mode=0o700)
    except FileExistsError:  # left by an earlier stage of the same id
        remove_scratch(scratch_dir)
        try:
            scratch_dir.mkdir(mode=0o700)
        except FileExistsError:
            raise OSError(errno.EEXIST, f"an earlier stage's {scratch_dir} is left, and cannot be removed (see run.log)") from None
    root = os.open(scratch_dir, _DIRECTORY_FLAGS | os.O_NOFOLLOW)
    try:
        for parts, content in files:
            if stop is not None and stop.is_set():
                raise OSError(errno.ECANCELED, os.strerror(errno.ECANCELED))
            path = os.path.join(scratch_dir, *parts)
            if len(os.fsencode(path)) >= PATH_MAX_BYTES:  # written a directory at a time, it would be; no CLI could open it
                raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), path[:100] + "...")
            write_under(root, parts, content)
    finally:
        os.close(root)


def write_under(root: int, parts: tuple[str, ...], content: bytes) -> None:
    """`content` as the new file `parts` under the directory `root`: each
    directory on the way made or opened without following a symlink, and the
    file made anew (check_stage_files refuses two names for one file).  A
    link or a file that a process of another stage put on the way (its
    scratch dir is a sibling) makes this fail, where a path would have led
    the write out of the scratch dir."""
    opened: list[int] = []
    directory = root
    try:
        for part in parts[:-1]:
            try:
                os.mkdir(part, dir_fd=directory)
            except FileExistsError:
                pass
            directory = os.open(part, _DIRECTORY_FLAGS | os.O_NOFOLLOW, dir_fd=directory)
            opened.append(directory)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        with open(os.open(parts[-1], flags, 0o666, dir_fd=directory), "wb") as file:
            file.write(content)
    finally:
        for fd in opened:
            os.close(fd)


def remove_scratch(scratch_dir: Path) -> None:
    """Remove a stage's scratch dir, unless its parent is no longer pgw's own
    directory; what cannot be removed is named in the log."""
    if not is_real_dir(scratch_dir.parent):
        return
    try:  # its mode given back first: a stage may have run `chmod 0 ..`
        private_dir(scratch_dir.parent)
    except OSError:
        pass  # remove_tree names what it then cannot remove
    failure = remove_tree(str(scratch_dir))
    if failure is not None:
        # The name is relative to the directory it was in (the tree is walked by descriptors).
        what = f"{shown(failure.filename)} in {scratch_dir}" if failure.filename else str(scratch_dir)
        log.warning("cannot remove %s: %s", what, failure.strerror or failure)


_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)
# The longest path, with its NUL, that Linux (and macOS's 1024, shorter) lets a
# program open.
PATH_MAX_BYTES = 1024 if sys.platform == "darwin" else 4096


def files_out(fd: int, failures: list[OSError]) -> list[str]:
    """Unlink what the directory `fd` holds but directories; their names.
    What cannot be unlinked goes to `failures`."""
    directories = []
    with os.scandir(fd) as entries:
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    directories.append(entry.name)
                else:
                    os.unlink(entry.name, dir_fd=fd)
            except FileNotFoundError:
                continue
            except OSError as exc:
                failures.append(exc)
    return directories


def remove_tree(top: str) -> Optional[OSError]:
    """`rm -rf top`, as a stage may have left it: at any depth (no recursion,
    where shutil.rmtree before Python 3.12 recursed once a level, and no path
    longer than a name: one directory open at a time), each directory listed
    once, never through a symlink, giving a directory back the rights its
    owner took away (mode 000 or 0500).  What kept something from going, if
    anything."""
    failures: list[OSError] = []
    try:
        fd = _open_dir(top, None)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            return exc
        try:  # a symlink or a file in its place: that goes, never what it points to
            os.unlink(top)
        except OSError as unlinked:
            return unlinked
        return None
    # Each level below `top` down to `fd`: its name, and its parent's directories left to do.
    levels: list[tuple[str, list[str]]] = []
    try:
        pending = files_out(fd, failures)
        while True:
            if pending:
                name = pending.pop()
                try:
                    child = _open_dir(name, fd)
                except OSError as exc:
                    failures.append(exc)
                    continue
                os.close(fd)
                fd = child
                levels.append((name, pending))
                pending = files_out(fd, failures)
                continue
            if not levels:
                break
            (name, pending), here = levels.pop(), os.fstat(fd)
            parent = os.open("..", _DIRECTORY_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = parent
            there = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if (there.st_ino, there.st_dev) != (here.st_ino, here.st_dev):
                raise OSError(errno.ESTALE, "the tree changed while it was being removed", top)
            try:
                os.rmdir(name, dir_fd=fd)
            except OSError as exc:
                failures.append(exc)
    except OSError as exc:
        failures.append(exc)
    finally:
        os.close(fd)
    if not failures:
        try:
            os.rmdir(top)
        except OSError as exc:
            failures.append(exc)
    return failures[0] if failures else None


def _open_dir(name: str, parent: Optional[int]) -> int:
    """The directory `name` (in `parent`, else a path) opened, never through a
    symlink, with its owner's rights given back if it lacked them."""
    flags = _DIRECTORY_FLAGS | os.O_NOFOLLOW
    try:
        fd = os.open(name, flags, dir_fd=parent)
    except PermissionError:
        info = os.stat(name, dir_fd=parent, follow_symlinks=False)
        if not stat.S_ISDIR(info.st_mode):
            raise
        os.chmod(name, stat.S_IMODE(info.st_mode) | stat.S_IRWXU, dir_fd=parent)
        fd = os.open(name, flags, dir_fd=parent)
    try:
        mode = os.fstat(fd).st_mode
        if mode & stat.S_IRWXU != stat.S_IRWXU:  # readable, but not writable: nothing in it could go
            os.fchmod(fd, stat.S_IMODE(mode) | stat.S_IRWXU)
    except OSError:
        os.close(fd)
        raise
    return fd


def remove_empty_scratch(scratch_dir: Path) -> bool:
    """Remove the scratch dir if the stage left nothing in it: one rmdir, no thread."""
    if not is_real_dir(scratch_dir.parent):
        return True  # not pgw's own directory any more: nothing of it to remove
    try:
        os.rmdir(scratch_dir)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def is_real_dir(path: Path) -> bool:
    """A directory, and not through a symlink."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def read_codex_trace(scratch_dir: Path, sessions_dir: Path, since: float, now: float) -> str:
    """Find the rollout of the codex session that ran in `scratch_dir` from
    `since` on, and extract it."""
    wanted = str(scratch_dir.resolve())
    candidates = []
    # Only the days it can be filed under: a user's years of sessions (10^5
    # rollouts) cost every codex stage 3 s of stat calls before its exit.
    for path in (rollout for day in codex_days(sessions_dir, since, now) for rollout in day.glob("rollout-*.jsonl")):
        try:
            modified = path.stat().st_mtime
        except OSError:
            continue
        if -CODEX_ROLLOUT_MAX_AGE_S <= now - modified <= CODEX_ROLLOUT_MAX_AGE_S:  # dated ahead: no rollout either
            candidates.append((modified, path))
    for _, path in sorted(candidates, reverse=True):
        try:
            with open_regular_file(path) as rollout:
                first = json.loads(rollout.readline(CODEX_ROLLOUT_TAIL_BYTES) or b"null")
                if not (
                    isinstance(first, dict)
                    and first.get("type") == "session_meta"
                    and isinstance(first.get("payload"), dict)
                    and first["payload"].get("cwd") == wanted
                ):
                    continue
                start = os.fstat(rollout.fileno()).st_size - CODEX_ROLLOUT_TAIL_BYTES
                if start > rollout.tell():  # a long session: its last records only
                    rollout.seek(start - 1)
                    rollout.readline()  # to the start of the next whole record
                lines = (line.decode("utf-8", "replace") for line in rollout)
                # JSON lets a rollout hold a lone surrogate (`\\ud800`), which is
                # no text to send: U+FFFD, as for bytes that are not UTF-8.
                return _LONE_SURROGATE.sub("\ufffd", codex_trace(_json_lines(lines), str(path)))
        except (OSError, ValueError, RecursionError):  # a file any process of the user may have written
            continue
    return ""


def codex_days(sessions_dir: Path, since: float, now: float) -> typing.Iterator[Path]:
    """The directories (sessions/YYYY/MM/DD) where codex files a session started
    between `since` and `now`: by the day it started, in codex's local time,
    which may be a day off this process's."""
    one_day = datetime.timedelta(days=1)
    day = datetime.date.fromtimestamp(min(since, now)) - one_day
    while day <= datetime.date.fromtimestamp(now) + one_day:
        yield sessions_dir / f"{day:%Y}" / f"{day:%m}" / f"{day:%d}"
        day += one_day


def open_regular_file(path: Path, follow: bool = False) -> typing.BinaryIO:
    """`path` opened to read if it is a regular file, through a symlink only if
    `follow`; OSError otherwise.  A FIFO put where a file is expected would
    block the open until a writer came, and a device (/dev/zero) never ends."""
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    # Outside the `try`: once the file object holds the descriptor it closes it
    # itself, and a Ctrl-C landing in fdopen must not close it twice (the
    # second close failing with EBADF, or closing another thread's new file).
    return os.fdopen(fd, "rb")


def _json_lines(lines: typing.Iterable[str]) -> typing.Iterator[Any]:
    for line in lines:
        try:
            yield json.loads(line)
        except (ValueError, RecursionError):  # a line nested too deep for Python's parser is no event either
            continue


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # in a str, every surrogate is alone: pairs were joined


def codex_sessions_dir(environ: typing.Mapping[str, str], cwd: Path) -> Path:
    """Where codex, run with `environ` in `cwd`, writes its rollouts: the
    stage's own CODEX_HOME or HOME (the config's `env` or the request's may set
    them), not pgw's."""
    codex_home = environ.get("CODEX_HOME")
    if codex_home:
        return cwd / codex_home / "sessions"  # a relative one is codex's cwd's
    return Path(environ.get("HOME") or user_home()) / ".codex" / "sessions"


##############################################################################
# Connection: the outbox, the frame writer, one WebSocket
##############################################################################


class Outbox:
    """The one queue in front of the WebSocket, drained by the sender task.

    Messages (UTF-8 JSON) wait in a bounded FIFO: a producer finding it full
    parks, so a slow server slows the pumps and memory stays bounded.  Urgent
    messages (heartbeats) jump the queue.  A message is made by `make` at the
    moment it is queued, so the `seq` it carries follows queue order.
    """

    def __init__(self, max_frames: int = OUTBOX_MAX_FRAMES) -> None:
        self._max_frames = max_frames
        self._urgent: collections.deque[bytes] = collections.deque()
        self._frames: collections.deque[bytes] = collections.deque()
        self._has_items = trio.lowlevel.ParkingLot()
        self._has_space = trio.lowlevel.ParkingLot()
        self._drained = trio.lowlevel.ParkingLot()
        self._sending = False

    def put_urgent(self, message: bytes) -> None:
        self._urgent.append(message)
        self._has_items.unpark()

    async def put(self, make: typing.Callable[[], bytes]) -> None:
        while len(self._frames) >= self._max_frames:
            await self._has_space.park()
        self._frames.append(make())
        self._has_items.unpark()
        if len(self._frames) < self._max_frames:
            self._has_space.unpark()  # pass the turn on: FIFO among producers

    async def get(self) -> bytes:
        self._sending = False
        while not (self._urgent or self._frames):
            self._drained.unpark_all()
            await self._has_items.park()
        self._sending = True
        if self._urgent:
            return self._urgent.popleft()
        message = self._frames.popleft()
        self._has_space.unpark()
        return message

    async def get_batch(self, max_bytes: int) -> list[bytes]:
        """What `get` would return over several calls, while they add up to at
        most `max_bytes` (the first goes whatever its size)."""
        batch = [await self.get()]
        size = len(batch[0])
        while self._urgent or self._frames:
            queue = self._urgent or self._frames
            size += len(queue[0])
            if size > max_bytes:
                break
            batch.append(queue.popleft())
            if queue is self._frames:
                self._has_space.unpark()
        return batch

    @property
    def drained(self) -> bool:
        """Everything queued has been handed to the WebSocket."""
        return not (self._urgent or self._frames or self._sending)

    async def wait_drained(self) -> None:
        """Until everything queued so far has been handed to the WebSocket."""
        while not self.drained:
            await self._drained.park()


# RFC 6455 5.3: a client masks each frame with a fresh random 32-bit key,
# byte i XOR key[i % 4]; done as bytes.translate over the 4 lanes.  Each table
# is made as one XOR of two 256-byte integers: a byte at a time cost 3 ms of
# every start.
_IDENTITY = int.from_bytes(bytes(range(256)), "big")
_XOR_TABLES = [(_IDENTITY ^ int.from_bytes(bytes((key,)) * 256, "big")).to_bytes(256, "big") for key in range(256)]


# RFC 6455 5.2: FIN and the text opcode; RFC 7692 6: RSV1 marks a deflated message.
TEXT_FRAME, DEFLATED_TEXT_FRAME = 0x81, 0xC1
# FIN and the ping and close opcodes (RFC 6455 5.5); control frames are never deflated.
PING_FRAME, PONG_FRAME, CLOSE_FRAME = 0x89, 0x8A, 0x88
# How long the Close of a connection pgw fails may wait for room in the socket.
FAIL_CLOSE_SEND_S = 1.0


def masked_text_frame(message: Union[bytes, memoryview], deflated: bool = False) -> bytearray:
    """`message` (UTF-8, or its deflated form) as one whole, masked client text
    frame (RFC 6455 5.2), with RSV1 set when `deflated` (RFC 7692 6)."""
    return masked_frame(DEFLATED_TEXT_FRAME if deflated else TEXT_FRAME, message)


def masked_frame(first: int, message: Union[bytes, memoryview]) -> bytearray:
    """A masked client frame: `first` (FIN, RSV, opcode), the length, a fresh key, `message`."""
    size = len(message)
    if size < 126:
        header = bytes((first, 0x80 | size))
    elif size < 1 << 16:
        header = struct.pack("!BBH", first, 0x80 | 126, size)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, size)
    key = os.urandom(4)
    frame = bytearray().join((header, key, message))
    start = len(header) + 4
    for lane in range(4):
        frame[start + lane :: 4] = frame[start + lane :: 4].translate(_XOR_TABLES[key[lane]])
    return frame


# trio-websocket 0.12.2 (pinned in requirements.lock) serialises its own
# writes (the handshake, the close frame) with this lock; it has no public way to send
# a frame made elsewhere.  A test fails by this name if an upgrade drops it.
TRIO_WEBSOCKET_STREAM_LOCK = "_stream_lock"
# ... and keeps its wsproto connection here, whose state tells a close the
# server sent from one wsproto made up on finding the server's frames broken.
TRIO_WEBSOCKET_WSPROTO = "_wsproto"

# RFC 7692 7.2.1: a deflated message is sent without the 4 bytes that end
# every sync (or full) flush, and the receiver appends them again.
DEFLATE_FLUSH_TAIL = b"\x00\x00\xff\xff"


class FrameWriter:
    """The one door from pgw's messages to the socket.

    pgw frames and masks its messages itself (trio-websocket's send_message
    goes through wsproto, which copies a 256 KiB output frame six times on
    the way) and writes them to the connection's stream under the lock that
    trio-websocket's own writes take, so frames never interleave.

    When the server accepted permessage-deflate, every message is deflated
    here, by the connection's one compressor, within the parameters the
    server chose.  pgw sends no data message any other way, so this
    compressor's context is the only one the server's inflater follows.
    """

    def __init__(
        self, ws: trio_websocket.WebSocketConnection, stream: trio.abc.Stream, deflate: Optional[Deflate] = None
    ) -> None:
        lock = getattr(ws, TRIO_WEBSOCKET_STREAM_LOCK, None)
        if not isinstance(lock, trio.StrictFIFOLock):
            raise PgwError(f"this trio-websocket has no {TRIO_WEBSOCKET_STREAM_LOCK}: pgw needs the version in requirements.lock")
        self._ws, self._stream, self._lock = ws, stream, lock
        self._failed = False  # pgw has sent the Close of a connection it failed
        self._compressor: Optional[typing.Any] = None  # zlib's Compress, which has no public name
        if deflate is not None:
            self._compressor = zlib.compressobj(
                DEFLATE_LEVEL, zlib.DEFLATED, -deflate.client_max_window_bits, DEFLATE_MEM_LEVEL
            )
            # A full flush also forgets what came before: each message then
            # inflates on its own, as client_no_context_takeover asks.
            self._flush = zlib.Z_FULL_FLUSH if deflate.client_no_context_takeover else zlib.Z_SYNC_FLUSH

    async def send_batch(self, messages: list[bytes]) -> None:
        """Each message as its own frame, all in one write."""
        if self._ws.closed is not None:
            raise ConnectionLost(await self.why_closed())
        try:
            async with self._lock:
                # Deflated only once the lock is held: past this point the one
                # way out is a send cut short, after which the connection is
                # abandoned anyway, so the compressor never gets ahead of what
                # the server has seen.
                if len(messages) == 1:
                    await self._stream.send_all(self._frame(messages[0]))
                else:
                    await self._stream.send_all(b"".join([self._frame(message) for message in messages]))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionLost(await self.why_closed() if self._ws.closed else "the connection broke") from exc

    async def answer_pings(self, pings: "LatestPing") -> None:
        """Answer the server's WebSocket pings, the latest one each time the
        lock comes free (the reader only notes them: see LatestPing)."""
        while True:
            await pings.arrived.wait()
            try:
                async with self._lock:
                    # Only now: pings that came while the lock was busy get this one
                    # pong, and one after pgw's own Close gets none.
                    state = getattr(getattr(self._ws, TRIO_WEBSOCKET_WSPROTO, None), "state", None)
                    if self._ws.closed is not None or state is not wsproto.connection.ConnectionState.OPEN:
                        return  # closing: the close handshake is what the server waits for now
                    await self._stream.send_all(masked_frame(PONG_FRAME, pings.take()))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the reader and the keepalive see the loss

    async def ping(self) -> None:
        """A WebSocket ping, for its pong to prove the link alive.  trio-websocket's
        reader drops a pong it did not ask for, so nothing waits for this one:
        the bytes arriving are the keepalive's evidence."""
        if self._ws.closed is None:
            try:
                async with self._lock:
                    await self._stream.send_all(masked_frame(PING_FRAME, b""))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the reader and the keepalive see the loss

    async def why_closed(self) -> str:
        """Why the WebSocket ended, in words.  Where wsproto found the server's
        frames broken, it made up a close with the connection still open, which
        trio-websocket answers with nothing: pgw sends the Close frame that an
        endpoint failing the connection should (RFC 6455 7.1.7), once."""
        reason = self._ws.closed
        state = getattr(getattr(self._ws, TRIO_WEBSOCKET_WSPROTO, None), "state", None)
        if reason is None or reason.code == 1006 or state is not wsproto.connection.ConnectionState.OPEN:
            return close_description(reason)
        if not self._failed:
            self._failed = True
            # Shielded: the sender and the reader both end here, and the one that
            # does not send would otherwise cancel the other's send at once.
            with trio.CancelScope(shield=True), trio.move_on_after(FAIL_CLOSE_SEND_S):
                try:
                    async with self._lock:
                        await self._stream.send_all(masked_frame(CLOSE_FRAME, struct.pack("!H", reason.code)))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        return f"pgw closed the connection ({reason.code}): the server sent {printable(reason.reason or 'a frame RFC 6455 forbids')}"

    def _frame(self, message: bytes) -> bytearray:
        if self._compressor is None:
            return masked_text_frame(message)
        deflated = self._compressor.compress(message) + self._compressor.flush(self._flush)
        return masked_text_frame(memoryview(deflated)[: -len(DEFLATE_FLUSH_TAIL)], deflated=True)


class LatestPing:
    """The server's last WebSocket ping, for FrameWriter.answer_pings.

    trio-websocket's reader answers each ping itself, under the lock pgw's
    sends hold: behind a send that crawls (a server reading slowly) it waits
    a whole send per ping, and a server pinging often left everything after
    its pings unread, stage.cancel included, until the keepalive, seeing
    nothing read, gave the connection up.  Installed as the reader's ping
    handler, this notes the ping and returns at once; RFC 6455 5.5.3 lets one
    pong answer only the latest of the pings not answered yet."""

    def __init__(self) -> None:
        self.payload = b""
        self.arrived = trio.Event()

    async def note(self, event: wsproto.events.Ping) -> None:
        self.payload = bytes(event.payload)
        self.arrived.set()

    def take(self) -> bytes:
        """The latest ping's payload, which the pong about to go answers."""
        self.arrived = trio.Event()
        return self.payload


class ActivityStream(trio.abc.Stream):
    """A stream that notes when bytes last arrived: the keepalive's evidence of life."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.last_receive = trio.current_time()
        self._waiting = trio.lowlevel.ParkingLot()

    async def send_all(self, data: Union[bytes, bytearray, memoryview]) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: Optional[int] = None) -> bytes:
        data = await self.inner.receive_some(max_bytes)
        self.last_receive = trio.current_time()
        if self._waiting:
            self._waiting.unpark_all()
        return data

    async def arrival_after(self, moment: float) -> None:
        """Return once bytes have arrived after `moment` (trio's clock)."""
        while self.last_receive <= moment:
            await self._waiting.park()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def open_stream(
    server: str, cafile: Optional[str], timeout_s: float, proxy: Optional[Proxy] = None
) -> ActivityStream:
    """TCP to the server, or a tunnel to it through `proxy`, then TLS for https;
    all within `timeout_s`."""
    parsed = urllib.parse.urlsplit(server)
    host, secure = parsed.hostname or "", parsed.scheme == "https"
    port = parsed.port or (443 if secure else 80)
    deadline = trio.current_time() + timeout_s
    stream: trio.abc.Stream
    if proxy is None:
        with trio.fail_at(deadline):
            stream = await trio.open_tcp_stream(host, port)
    else:
        stream = await reach_proxy(proxy, deadline)
    try:
        if proxy is not None:
            stream = await request_tunnel(stream, proxy, host, port, deadline)
        if secure:
            stream = trio.SSLStream(stream, make_ssl_context(cafile), server_hostname=host, https_compatible=True)
            with trio.fail_at(deadline):
                await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return ActivityStream(stream)


# The tunnel: TCP to the proxy, CONNECT, its answer --------------------------
# Each step raises ProxyError naming the proxy, so that the reconnect log and
# doctor say which hop failed.  The backend's name goes to the proxy as it is:
# resolving it is the proxy's job (it may be a name only the proxy knows).


async def reach_proxy(proxy: Proxy, deadline: float) -> trio.SocketStream:
    """TCP to the proxy by `deadline`, or ProxyError."""
    with trio.move_on_at(deadline):
        try:
            return await trio.open_tcp_stream(proxy.host, proxy.port)
        except OSError as exc:
            raise ProxyError(f"cannot reach the proxy {proxy.url}: {_os_reason(exc)}") from None
    raise ProxyError(f"cannot reach the proxy {proxy.url}: no answer in time")


def _os_reason(exc: OSError) -> str:
    """The system's words for a failed connect ("Connection refused"), without
    trio's wrapping of them; a name that does not resolve says so."""
    for current in _exception_chain(exc):
        if isinstance(current, socket.gaierror):
            return f"cannot resolve its name ({current.strerror})"
        if isinstance(current, OSError) and current.errno:
            return os.strerror(current.errno)
    return str(exc)


async def request_tunnel(
    stream: trio.abc.Stream, proxy: Proxy, host: str, port: int, deadline: float
) -> trio.abc.Stream:
    """CONNECT host:port over `stream`, open to the proxy, by `deadline`: the
    tunnel, or ProxyError.  The caller closes `stream` on failure."""
    target = tunnel_target(host, port)
    with trio.move_on_at(deadline):
        try:
            await stream.send_all(connect_request(proxy, target))
            head, early = await _read_reply_head(stream, proxy)
            while _INTERIM_STATUS_LINE.fullmatch(_status_line(head)):  # 100 Continue and the like: read past them
                head, early = await _read_reply_head(UnreadStream(early, stream) if early else stream, proxy)
        except trio.BrokenResourceError:
            raise ProxyError(f"the proxy {proxy.url} broke the connection before answering CONNECT") from None
        check_proxy_reply(head, proxy, target)
        # Bytes after the reply's blank line are the server's: keep them.
        return UnreadStream(early, stream) if early else stream
    raise ProxyError(f"the proxy {proxy.url} did not answer CONNECT in time")


def tunnel_target(host: str, port: int) -> str:
    """host:port as CONNECT names it (RFC 9110): brackets for IPv6, IDNA for other scripts."""
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host if host.isascii() else host.encode('idna').decode('ascii')}:{port}"


def connect_request(proxy: Proxy, target: str) -> bytes:
    """The CONNECT request for `target`, with the proxy's credentials when it has some."""
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}", f"User-Agent: pgw/{__version__}"]
    if proxy.authorization:
        lines.append(f"Proxy-Authorization: {proxy.authorization}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


async def _read_reply_head(stream: trio.abc.Stream, proxy: Proxy) -> tuple[bytes, bytes]:
    """The proxy's reply up to its blank line, and the bytes after it; at most
    PROXY_REPLY_MAX_BYTES are held, and a reply that is not HTTP fails at once."""
    buffer = bytearray()
    while True:
        searched = max(0, len(buffer) - 3)
        data = await stream.receive_some(PROXY_REPLY_MAX_BYTES)
        if not data:
            raise ProxyError(f"the proxy {proxy.url} closed the connection without answering CONNECT")
        buffer += data
        if not b"HTTP/".startswith(bytes(buffer[:5])):
            raise ProxyError(f"the proxy {proxy.url} does not answer in HTTP: is it an HTTP proxy?")
        end = _HEAD_END.search(buffer, searched)
        if end:
            return bytes(buffer[: end.start()]), bytes(buffer[end.end() :])
        if len(buffer) > PROXY_REPLY_MAX_BYTES:
            raise ProxyError(
                f"the proxy {proxy.url} sent over {PROXY_REPLY_MAX_BYTES // 1024} KiB without ending its reply to CONNECT"
            )


# RFC 9112 2.2: a recipient may take a bare LF for the end of a line, as
# some proxies end theirs.
_HEAD_END = re.compile(rb"\r?\n\r?\n")


def _status_line(head: bytes) -> bytes:
    return re.split(rb"\r?\n", head, maxsplit=1)[0]


def check_proxy_reply(head: bytes, proxy: Proxy, target: str) -> None:
    """Nothing when the reply head opens the tunnel (2xx); else ProxyError with
    the status and what a user can do about it."""
    status_line = _status_line(head).decode("latin-1")
    version, _, rest = status_line.partition(" ")
    code = rest[:3]
    if version not in ("HTTP/1.0", "HTTP/1.1") or not (code.isascii() and code.isdigit()) or rest[3:4] not in ("", " "):
        raise ProxyError(f"the proxy {proxy.url} does not answer in HTTP: is it an HTTP proxy?")
    status = int(code)
    if 200 <= status < 300:
        return
    if status == 407 and proxy.authorization:
        hint = "it did not accept the user and password in the proxy URL"
    elif status == 407:
        hint = "it wants a user and password: give the proxy as http://USER:PASSWORD@HOST:PORT"
    elif status == 403:
        hint = f"it does not allow tunnels to {target}: ask its administrators to allow it"
    elif status in (502, 503, 504):
        hint = f"it could not reach {target}: check the server's name and that it is up"
    else:
        hint = ""
    try:
        phrase = " " + http.HTTPStatus(status).phrase  # the standard one: the proxy's own text is not shown
    except ValueError:
        phrase = ""
    raise ProxyError(f"the proxy {proxy.url} refused the tunnel to {target}: HTTP {status}{phrase}" + (f"; {hint}" if hint else ""))


class UnreadStream(trio.abc.Stream):
    """A stream some of whose bytes were read already (a proxy's reply may
    carry the server's first bytes): they come out first."""

    def __init__(self, unread: bytes, inner: trio.abc.Stream) -> None:
        self.unread, self.inner = unread, inner

    async def send_all(self, data: Union[bytes, bytearray, memoryview]) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: Optional[int] = None) -> bytes:
        if not self.unread:
            return await self.inner.receive_some(max_bytes)
        await trio.lowlevel.checkpoint()
        size = len(self.unread) if max_bytes is None else max_bytes
        data, self.unread = self.unread[:size], self.unread[size:]
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


class Deflate(wsproto.extensions.PerMessageDeflate):
    """permessage-deflate (RFC 7692) as pgw offers it.

    wsproto's own offer (client_max_window_bits=15, so the server may lower
    it); once the server accepts, wsproto inflates what arrives and this
    object holds the parameters the server chose, which FrameWriter follows.
    """

    # zlib has no raw deflate with an 8-bit window, and wsproto refuses 8.
    # 9 stands in for it both ways: a 9-bit inflater reads what an 8-bit
    # deflater wrote, and a 9-bit deflater never refers back more than 250
    # bytes (its 512-byte window less zlib's 262-byte lookahead), which an
    # 8-bit inflater can follow.
    _WINDOW_BITS = ("server_max_window_bits", "client_max_window_bits")
    _NO_CONTEXT_TAKEOVER = ("server_no_context_takeover", "client_no_context_takeover")
    _WINDOW_SIZES = tuple(str(bits) for bits in range(8, 16))  # 7.1.2.1: 8 to 15, no leading zeros

    def finalize(self, offer: str) -> None:
        """The server's answer (RFC 7692 7.1): the extension once, each known
        parameter at most once, a window of 8 to 15 bits (RFC 6455 9.1 lets it
        be quoted), the rest without a value.  Anything else fails the
        handshake, as 7.1 says a client must, naming what was wrong; wsproto
        alone raised IndexError or ValueError on some, and took the rest."""
        if self._enabled:
            raise self._refused("accepted twice")
        params: dict[str, Optional[str]] = {}
        for param in offer.split(";")[1:]:
            key, equals, value = (part.strip() for part in param.partition("="))
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            if key in params:
                raise self._refused(f"{key} given twice")
            if key in self._NO_CONTEXT_TAKEOVER and not equals:
                params[key] = None
            elif key in self._WINDOW_BITS and value in self._WINDOW_SIZES:
                params[key] = "9" if value == "8" else value
            elif key in self._NO_CONTEXT_TAKEOVER + self._WINDOW_BITS:
                raise self._refused(f"{key}={value!r}" if equals else f"{key} without a value")
            else:
                raise self._refused(f"unknown parameter {shown(key)}")
        super().finalize("; ".join([self.name] + [key if value is None else f"{key}={value}" for key, value in params.items()]))

    # RFC 7692 7.2.3.4: a server that cannot flush may end each message's
    # deflate stream with a BFINAL block, and start the next message with a new
    # stream, which (unless it agreed to server_no_context_takeover) may still
    # refer back to what came before (7.2.2).  wsproto fed the next message to
    # the ended stream, which inflated it to nothing: pgw failed it with 1007.
    # Here an ended stream is followed by a new one primed with the last
    # window of what was inflated.  And a control frame may come between a
    # message's fragments (RFC 6455 5.4): wsproto took a ping there for the
    # message's end, and read the fragments after it as plain text, which
    # failed the connection (1007); here a control frame leaves the message
    # as it was.  These hooks read wsproto 1.3.2's own state of the message
    # (WSPROTO_INFLATE_STATE), pinned by a test.
    _window = b""
    _control = False  # the frame being read is a control frame, never deflated (RFC 7692 6.1)

    def frame_inbound_header(self, proto: Any, opcode: Any, rsv: Any, payload_length: int) -> Any:
        self._control = opcode.iscontrol()
        if not self._control:
            return super().frame_inbound_header(proto, opcode, rsv, payload_length)
        if rsv.rsv1:
            return wsproto.frame_protocol.CloseReason.PROTOCOL_ERROR
        return wsproto.frame_protocol.RsvBits(False, False, False)

    def frame_inbound_payload_data(self, proto: Any, data: bytes) -> Any:
        if self._control or not self._inbound_compressed or not self._inbound_is_compressible:
            return data
        return self._inflate(bytes(data))

    def frame_inbound_complete(self, proto: Any, fin: bool) -> Any:
        if self._control:
            return None
        inflated = super().frame_inbound_complete(proto, fin)  # the flush tail: after a BFINAL block, left unread
        if isinstance(inflated, bytes):
            self._remember(inflated)
        return inflated

    def _inflate(self, data: bytes) -> Any:
        pieces = []
        try:
            while True:
                if self._decompressor is None or self._decompressor.eof:
                    self._decompressor = zlib.decompressobj(-self.server_max_window_bits, zdict=self._window)
                pieces.append(self._decompressor.decompress(data))
                data = self._decompressor.unused_data
                if not data:
                    break
        except zlib.error:
            return wsproto.frame_protocol.CloseReason.INVALID_FRAME_PAYLOAD_DATA
        inflated = b"".join(pieces)
        self._remember(inflated)
        return inflated

    def _remember(self, inflated: bytes) -> None:
        size = 1 << self.server_max_window_bits
        self._window = inflated[-size:] if len(inflated) >= size else (self._window + inflated)[-size:]

    def _refused(self, why: str) -> wsproto.utilities.RemoteProtocolError:
        return wsproto.utilities.RemoteProtocolError(
            f"its {self.name} is not one RFC 7692 allows: {why}", event_hint=wsproto.events.RejectConnection()
        )

    def __str__(self) -> str:
        """As the response header names it, with the window sizes in use."""
        return f"{self.name}; {self.offer()}"


# wsproto's PerMessageDeflate keeps the message being read in these; Deflate's
# hooks, which inflate a stream ended with a BFINAL block, read them too.
WSPROTO_INFLATE_STATE = ("_inbound_compressed", "_inbound_is_compressible", "_decompressor")


# trio-websocket 0.12.2 (pinned in requirements.lock) has no parameter for
# WebSocket extensions, and its wrap_client_stream builds the opening request
# itself.  open_websocket does what wrap_client_stream does, with pgw's offer
# put in the request, through these names: the request, the reader task that
# sends it, and the event set when the server has answered.  A test fails by
# these names if an upgrade renames one.
TRIO_WEBSOCKET_HANDSHAKE = ("_initial_request", "_reader_task", "_open_handshake")
# The reader's handler of a ping, which LatestPing.note replaces.
TRIO_WEBSOCKET_PING_HANDLER = "_handle_ping_event"


# RFC 9110 15.2: a client reads past the interim (1xx) responses it did not ask
# for, such as 100 Continue or 103 Early Hints, to the one that answers, which
# for an Upgrade is 101.  wsproto takes any 1xx for that answer, and the
# handshake for refused.
_INTERIM_STATUS_LINE = re.compile(rb"HTTP/\d\.\d 1(?!01)\d\d(?: [^\r\n]*)?")
_SWITCHING_STATUS_LINE = re.compile(rb"HTTP/\d\.\d 101(?: [^\r\n]*)?")
_REFUSAL_STATUS_LINE = re.compile(rb"HTTP/\d\.\d [2-9]\d\d(?: [^\r\n]*)?")
# RFC 9112 2.2: a line may end in a bare LF, which h11 takes too.
_LINE_END = re.compile(rb"\r?\n")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
# Past this, a head is no interim response worth waiting for: h11 judges it.
INTERIM_HEAD_MAX_BYTES = 64 * 1024
# How much of a refusal's body pgw keeps for its reason (a JSON `detail`, say).
REFUSAL_BODY_MAX_BYTES = 4096


class HandshakeAnswer(trio.abc.Stream):
    """The server's bytes without the interim responses that may come before
    its answer to the opening handshake, and with that answer's header
    fields given once each (`merged_fields`).  A refusal ends with its head:
    pgw tells the user its status and headers, never its body, which only
    held the connection for as long as the server kept sending it (a 503
    whose body never came lost its Retry-After to the connect timeout), only
    as much of the body as came with the head, for the reason it may give."""

    def __init__(self, inner: trio.abc.Stream, token: Optional[str] = None) -> None:
        self.inner = inner
        self._secrets = token_forms(token)  # which a refusal's body may echo, and pgw must not show
        self._head: Optional[bytearray] = bytearray()  # None once past the interim responses
        self._unread = b""
        self._ended = False  # a refusal's head was all: nothing more is read

    async def send_all(self, data: Union[bytes, bytearray, memoryview]) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: Optional[int] = None) -> bytes:
        while self._head is not None:
            chunk = await self.inner.receive_some()
            self._head += chunk
            if not chunk or not self._more_may_be_interim():
                self._unread, self._head = bytes(self._head), None
        if not self._unread:
            return b"" if self._ended else await self.inner.receive_some(max_bytes)
        size = len(self._unread) if max_bytes is None else max_bytes
        data, self._unread = self._unread[:size], self._unread[size:]
        return data

    def _more_may_be_interim(self) -> bool:
        """Drop the whole interim responses at the front of what was read, and
        merge the fields of a whole 101; whether what follows must be read
        further first."""
        head = typing.cast(bytearray, self._head)
        while True:
            line_end = _LINE_END.search(head)
            if line_end is None:
                return len(head) < INTERIM_HEAD_MAX_BYTES
            status_line = bytes(head[: line_end.start()])
            interim = _INTERIM_STATUS_LINE.fullmatch(status_line)
            refusal = _REFUSAL_STATUS_LINE.fullmatch(status_line)
            if not (interim or refusal or _SWITCHING_STATUS_LINE.fullmatch(status_line)):
                return False  # not HTTP: h11 judges it as it came
            head_end = _HEAD_END.search(head)
            if head_end is None:
                return len(head) < INTERIM_HEAD_MAX_BYTES
            if interim:
                del head[: head_end.end()]
                continue
            if refusal:
                head[:] = merged_fields(bytes(head[: head_end.start()]), bytes(head[head_end.end():]), self._secrets)
                self._ended = True
                return False
            # What follows a 101 is the server's first frames.
            head[: head_end.end()] = merged_fields(bytes(head[: head_end.start()]))
            return False

    async def aclose(self) -> None:
        await self.inner.aclose()


def merged_fields(head: bytes, arrived: Optional[bytes] = None, secrets: typing.Sequence[str] = ()) -> bytes:
    """A response's head (its status line and fields, without the blank line
    after them) with each field given on several lines given once, its values
    joined by commas, as RFC 9110 5.3 says the lines mean, its lines ending
    in CRLF, and the blank line.  wsproto keeps only the last line of each:
    `Connection: Upgrade` then `Connection: keep-alive` failed the handshake,
    an extension accepted on a line of its own went unseen, and of two
    Sec-WebSocket-Accept lines (which RFC 6455 11.3.3 forbids) the last
    passed alone.

    `arrived`: a refusal's, what came after its head; the head then says its
    body is what of that its Content-Length covers (at most
    REFUSAL_BODY_MAX_BYTES), which follows it, each of `secrets` in it
    replaced (a body echoing the request would show the token): nothing
    more is waited for."""
    status_line, *lines = _LINE_END.split(head)
    fields: list[list[bytes]] = []
    where: dict[bytes, int] = {}  # a field's name, lower case -> its place in `fields`
    for line in lines:
        if line[:1] in (b" ", b"\t") and fields:  # obsolete line folding: more of the value before
            fields[-1][1] += b" " + line.strip(b" \t")
            continue
        name, colon, value = line.partition(b":")
        if not colon:
            return head + b"\r\n\r\n"  # not a field: h11 judges the head as it came
        key = name.lower()
        if key in where:
            fields[where[key]][1] += b", " + value.strip(b" \t")
        else:
            where[key] = len(fields)
            fields.append([name, value.strip(b" \t")])
    body = b""
    if arrived is not None:
        value = fields[where[b"content-length"]][1] if b"content-length" in where else b""
        length = whole_number(value.decode("latin-1")) if len(value) <= 12 else None  # int() takes 4300 digits at most
        kept = min(length, REFUSAL_BODY_MAX_BYTES) if length is not None else 0
        if b"transfer-encoding" not in where and len(arrived) >= kept:  # chunked, it would need unframing
            body = arrived[:length]
            for secret in secrets:  # before the cut: a token across it would keep its first part
                body = body.replace(secret.encode("utf-8", "surrogateescape"), b"<token>")
            body = body[:kept]
        fields = [field for field in fields if field[0].lower() not in (b"content-length", b"transfer-encoding")]
        fields.append([b"Content-Length", str(len(body)).encode("ascii")])
    return b"\r\n".join([status_line, *(name + b": " + value for name, value in fields)]) + b"\r\n\r\n" + body


async def open_websocket(
    nursery: trio.Nursery, stream: trio.abc.Stream, settings: Settings, timeout_s: float,
    pings: Optional[LatestPing] = None, **options: Any,
) -> tuple[trio_websocket.WebSocketConnection, Optional[Deflate]]:
    """The opening handshake over `stream`, presenting the token (PROTOCOL.md)
    and offering permessage-deflate unless the `compression` setting is off;
    the extension comes back when the server accepted it.  `pings`: the
    server's pings go there, for FrameWriter.answer_pings to answer."""
    ws = trio_websocket.WebSocketConnection(
        HandshakeAnswer(stream, settings.token), wsproto.WSConnection(wsproto.ConnectionType.CLIENT),
        host=urllib.parse.urlsplit(settings.server).netloc, path=websocket_resource(settings.server, settings.token or ""),
        **options,
    )
    request_name = TRIO_WEBSOCKET_HANDSHAKE[0]
    request, reader_task, opened = (getattr(ws, name, None) for name in TRIO_WEBSOCKET_HANDSHAKE)
    if not isinstance(request, wsproto.events.Request) or not callable(reader_task) or not isinstance(opened, trio.Event):
        raise PgwError(
            f"this trio-websocket lacks one of {', '.join(TRIO_WEBSOCKET_HANDSHAKE)}: "
            "pgw needs the version in requirements.lock"
        )
    if pings is not None:  # before the reader starts: it takes its handlers then
        if not callable(getattr(ws, TRIO_WEBSOCKET_PING_HANDLER, None)):
            raise PgwError(f"this trio-websocket has no {TRIO_WEBSOCKET_PING_HANDLER}: pgw needs the version in requirements.lock")
        setattr(ws, TRIO_WEBSOCKET_PING_HANDLER, pings.note)
    deflate = Deflate() if settings.compression else None
    setattr(ws, request_name, dataclasses.replace(request, extensions=[deflate] if deflate else []))
    reader_ended: list[bool] = []
    with trio.move_on_after(timeout_s) as waiting:
        nursery.start_soon(_read_then_wake, reader_task, opened, reader_ended)
        await opened.wait()
    if waiting.cancelled_caught:  # "did not complete the connection" sent users looking for a firewall
        raise ConnectionLost(
            f"the server took the connection but gave no answer to the WebSocket handshake in {timeout_s:g} s:"
            " does it speak what the URL says (http:// or https://)?"
        )
    if reader_ended and ws.closed is not None:  # the stream ended before the server's answer did
        raise ConnectionLost("the server closed the connection during the WebSocket handshake")
    return ws, deflate if deflate is not None and deflate.enabled() else None


async def _read_then_wake(
    reader_task: typing.Callable[[], typing.Awaitable[None]], opened: trio.Event, ended: list[bool]
) -> None:
    """trio-websocket's reader, then a wake-up for whoever waits for the
    handshake: where the stream ends before the server's answer, trio-websocket
    leaves that wait to its timeout.  (What it raises reaches the waiter
    through the nursery instead.)"""
    await reader_task()
    ended.append(True)
    opened.set()


def keepalive_step(
    timing: Timing, now: float, last: float, heartbeat_at: float, pinged_at: float, busy: bool
) -> tuple[str, float]:
    """What the keepalive does at `now`: ("heartbeat" | "ping" | "dead", now), or
    ("wait", until when).  `last` is when bytes last arrived; anything arriving
    after a heartbeat or a WebSocket ping answers it.  `busy`: stages are running."""
    next_heartbeat = heartbeat_at + timing.heartbeat_s
    ping_at = dead_at = math.inf
    if last <= heartbeat_at and pinged_at < heartbeat_at:
        ping_at = heartbeat_at + timing.heartbeat_answer_s
    if busy:
        if pinged_at < last:
            ping_at = min(ping_at, last + timing.ws_ping_after_s)
        dead_at = last + timing.silence_limit_s
    elif last <= pinged_at:
        dead_at = pinged_at + timing.ws_pong_wait_s
    for action, moment in (("dead", dead_at), ("heartbeat", next_heartbeat), ("ping", ping_at)):
        if now >= moment:
            return action, now
    return "wait", min(next_heartbeat, ping_at, dead_at)


# A server may send bad or stray messages at will, a log line each: at most
# this many such lines a minute, so that a flood of them cannot rotate the
# log's history away (30,000 stray cancels replaced every log file in 3 s).
STRAY_LINES_PER_MINUTE = 100


class LineBudget:
    """The log lines of bad or stray messages from the server: at most
    `per_minute` a minute; the rest are counted, and the count logged when
    lines are let through again."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._window_start = -math.inf
        self._lines = self._held = 0

    def log(self, level: int, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._window_start >= 60.0:
            if self._held:
                log.warning("%d more lines about bad or stray messages from the server were left out of the log", self._held)
            self._window_start, self._lines, self._held = now, 0, 0
        self._lines += 1
        if self._lines <= self.per_minute:
            log.log(level, message, *args)
            return
        if not self._held:
            log.warning("the server keeps sending bad or stray messages: until the minute is out they are counted, not logged")
        self._held += 1


class Connection:
    """One WebSocket: the sender, the keepalive and the single reader."""

    def __init__(
        self, daemon: "Daemon", ws: trio_websocket.WebSocketConnection, stream: ActivityStream,
        deflate: Optional[Deflate] = None, pings: Optional[LatestPing] = None,
    ) -> None:
        self.daemon, self.timing = daemon, daemon.timing
        self.ws, self.stream, self.pings = ws, stream, pings
        self.outbox = Outbox()
        self.frames = FrameWriter(ws, stream, deflate)
        self.reading = trio.CancelScope()  # cancelled by a shutdown: read no more requests
        self.strays = LineBudget(STRAY_LINES_PER_MINUTE)  # the log lines of bad or stray messages
        self._keepalive_wait = trio.CancelScope()  # cancelled when the keepalive must think again
        self._stages: trio.Nursery  # set by serve() before the reader starts
        self._handlers: dict[type, typing.Callable[[Any], typing.Awaitable[None]]] = {
            StageRequest: self._on_stage_request,
            StageCancel: self._on_stage_cancel,
            Pong: self._on_pong,
        }

    async def serve(self) -> None:
        """Until the connection is lost (ConnectionLost) or a shutdown has sent every exit."""
        daemon = self.daemon
        self.outbox.put_urgent(wire(Hello(machine_name=daemon.settings.name, capabilities=daemon.capabilities())))
        async with trio.open_nursery() as tasks:
            tasks.start_soon(self._sender)
            tasks.start_soon(self._keepalive, tasks)
            if self.pings is not None:
                tasks.start_soon(self.frames.answer_pings, self.pings)
            async with trio.open_nursery() as stages:
                self._stages = stages
                with self.reading:
                    await self._reader()
            # Only a shutdown gets here with the connection alive: every stage
            # has ended and queued its exit.
            with trio.move_on_after(self.timing.close_timeout_s):
                await self.outbox.wait_drained()
            with trio.move_on_after(self.timing.close_timeout_s):
                await self.ws.aclose(1001, "worker shutting down")
            tasks.cancel_scope.cancel()

    async def _sender(self) -> None:
        while True:
            messages = await self.outbox.get_batch(SEND_BATCH_MAX_BYTES)
            await self.frames.send_batch(messages)
            if log.isEnabledFor(logging.DEBUG):
                for message in messages:
                    log.debug("sent %s", describe_wire_text(message))

    async def _keepalive(self, tasks: trio.Nursery) -> None:
        """The heartbeat, and the WebSocket pings and the verdict `keepalive_step`
        decides.  Idle, that is one timer a heartbeat: the answer wakes this task
        where the reader already runs."""
        timing, stream = self.timing, self.stream
        heartbeat_at = pinged_at = -math.inf
        while True:
            now, last = trio.current_time(), stream.last_receive
            action, wake_at = keepalive_step(timing, now, last, heartbeat_at, pinged_at, busy=bool(self.daemon.stages))
            if action == "dead":
                raise ConnectionLost(f"nothing arrived from the server for {now - last:.0f} s")
            if action == "heartbeat":
                heartbeat_at = now
                self.outbox.put_urgent(wire(Ping(ts=time.time())))
            elif action == "ping":
                pinged_at = now
                tasks.start_soon(self._ws_ping)
            else:
                with trio.CancelScope(deadline=wake_at) as self._keepalive_wait:
                    if last <= max(heartbeat_at, pinged_at):  # asked: an answer changes the plan
                        await stream.arrival_after(last)
                    else:
                        await trio.sleep_forever()

    async def _ws_ping(self) -> None:
        with trio.move_on_after(self.timing.silence_limit_s):  # a send stuck behind a full socket
            await self.frames.ping()

    async def _reader(self) -> None:
        """The only reader: each message to its handler, in arrival order."""
        while True:
            try:
                text = await self.ws.get_message()
            except trio_websocket.ConnectionClosed:
                raise ConnectionLost(await self.frames.why_closed()) from None
            if isinstance(text, bytes):  # PROTOCOL.md: messages are text frames; a request sent so is still answered
                self._on_bad_message(ProtocolError(
                    f"a binary message of {len(text)} bytes: the protocol's messages are text frames", _leniently(text)
                ))
                continue
            try:
                message = decode(text)
            except ProtocolError as exc:
                self._on_bad_message(exc)
                continue
            if log.isEnabledFor(logging.DEBUG):
                log.debug("received %s", describe_wire_text(text))
            handler = self._handlers.get(type(message))
            if handler is None:
                self.strays.log(logging.WARNING, "skipped a %s message: the server is not expected to send it", message.TYPE)
            else:
                await handler(message)

    def _on_bad_message(self, exc: ProtocolError) -> None:
        raw = exc.message or {}
        stage_run_id = raw.get("stage_run_id")
        if raw.get("type") != "stage.request" or not isinstance(stage_run_id, str):
            self.strays.log(logging.WARNING, "skipped a bad message: %s", exc)
            return
        if stage_run_id in self.daemon.stages:
            self.strays.log(logging.WARNING, "stage %s: a bad duplicate request was ignored: %s", shown(stage_run_id), exc)
            return
        self.strays.log(logging.WARNING, "stage %s: refused a bad request (its exit says why): %s", shown(stage_run_id), exc)
        self._send_soon(StageExit(stage_run_id=stage_run_id, returncode=-1, duration_ms=0, error=f"bad request: {exc}"))

    def _send_soon(self, record: StageExit) -> None:
        """The exit of a request refused as it came, unless its stage_run_id
        alone could take it over the 1 MiB a server may take (the server sent
        that id, and would close the connection, and every stage's output with it)."""
        if not stage_id_fits(record.stage_run_id):
            log.warning("stage %s: its stage.exit would be over 1 MiB; not sent", shown(record.stage_run_id))
            return
        self._stages.start_soon(self.outbox.put, lambda: exit_message_within_limit(record))

    async def _on_stage_request(self, request: StageRequest) -> None:
        daemon = self.daemon
        if request.stage_run_id in daemon.stages:
            self.strays.log(logging.WARNING, "stage %s: already running; the repeated request was ignored", shown(request.stage_run_id))
            return
        try:
            prepared = daemon.prepare(request)
        except StageRejected as exc:
            self.strays.log(logging.INFO, "stage %s: refused cli=%s error=%s", shown(request.stage_run_id), request.cli, shown(str(exc)))
            self._send_soon(StageExit(request.stage_run_id, -1, 0, str(exc)))
            return
        except Exception as exc:  # noqa: BLE001 - a request pgw's checks did not foresee costs it alone, not the connection
            log.exception("stage %s: internal error", shown(request.stage_run_id))
            self._send_soon(StageExit(request.stage_run_id, -1, 0, stage_internal_error(exc)))
            return
        stage = StageRun(prepared, daemon)
        daemon.stages[stage.id] = stage
        if len(daemon.stages) == 1:
            self._keepalive_wait.cancel()  # the first stage: the path is watched more closely from now
        daemon.state_file.publish()
        if daemon.slots is None:
            # No queue for slots, whose order trio's shuffled start of tasks
            # could change: start_soon, without start's temporary nursery.
            self._stages.start_soon(stage.run, self.outbox)
        else:
            await self._stages.start(stage.run, self.outbox)

    async def _on_stage_cancel(self, cancel: StageCancel) -> None:
        stage = self.daemon.stages.get(cancel.stage_run_id)
        if stage is None:
            self.strays.log(logging.INFO, "stage %s: cancel for no running stage ignored", shown(cancel.stage_run_id))
            return
        log.info("stage %r: cancelled by the server with %s", stage.id, cancel.signal)
        grace_s = 0 if cancel.signal == "SIGKILL" else self.timing.cancel_grace_s
        stage.stop(f"cancelled by the server ({cancel.signal})", grace_s)

    async def _on_pong(self, _: Pong) -> None:
        log.debug("pong")


def describe_wire_text(text: Union[str, bytes]) -> str:
    """A message for the -v log: its type, stage and sizes, never its contents
    (a request's env and files, and a CLI's output, may hold secrets)."""
    try:
        message = json.loads(text)
    except (ValueError, RecursionError):
        return f"{len(text)} bytes, not JSON"
    if not isinstance(message, dict):
        return f"{len(text)} bytes, not an object"
    # Each as printable: the server's text, which a newline would make a forged line.
    parts = [printable(str(message.get("type"))), printable(str(message.get("stage_run_id", "")))]
    parts += [f"{key}={printable(str(message[key]))}" for key in ("seq", "pid", "returncode", "signal", "cli") if key in message]
    return " ".join(part for part in parts if part) + f" ({len(text)} bytes)"


# trio-websocket 0.12.2 closes the connection itself (1009) on a message
# past max_message_size, counted after wsproto inflated it, with this reason.
TRIO_WEBSOCKET_TOO_BIG_REASON = "Exceeded maximum message size: {} bytes"


def close_description(reason: Any) -> str:
    if reason is None:
        return "the connection closed"
    if reason.code == 1009 and reason.reason == TRIO_WEBSOCKET_TOO_BIG_REASON.format(MESSAGE_MAX_BYTES):
        return (
            f"pgw refused a message from the server of more than {MESSAGE_MAX_BYTES // 2**20} MiB "
            "(the limit, counted after inflation) and closed the connection (1009)"
        )
    if reason.code == 1006:  # RFC 6455 7.1.5: no Close frame came
        return "the connection was lost without a WebSocket close (1006)"
    text = f"the server closed the connection ({reason.code}"
    return text + (f": {printable(reason.reason)})" if reason.reason else ")")


##############################################################################
# Daemon: the reconnect loop, the state file, shutdown
##############################################################################


@attrs.define
class Shutdown:
    """How hurried the daemon's end is: not asked for, asked (stages get the
    shutdown grace), or hurried by a second signal (no grace at all)."""

    requested: bool = False
    hurried: bool = False

    def stage_grace_s(self, timing: Timing) -> float:
        return 0.0 if self.hurried else timing.shutdown_grace_s


@attrs.define
class LinkState:
    """Whether pgw is connected, since when, and the last failure: what the
    state file, `status` and the reconnect log all read."""

    connected: bool = False
    since: Optional[float] = None  # trio clock: how long the connection lasted
    since_unix: Optional[float] = None  # for `pgw status`
    last_error: Optional[str] = None
    tries: int = 0  # failed attempts since the last connection (or the start)
    failing_since: Optional[float] = None  # trio clock, of the first of them
    next_try_unix: Optional[float] = None  # while waiting to try again



class StateFile:
    """state.json, what `pgw status` reads: written by one task, off the event
    loop, at most once an interval (50 stages starting at once cost one
    write, not a hundred).  One that cannot be written (a full disk) is
    removed rather than left saying what no longer holds (connected, say),
    and written again once there may be room."""

    def __init__(self, path: Path, timing: Timing, state: typing.Callable[[], dict[str, Any]]) -> None:
        self.path, self._timing, self._state = path, timing, state
        self._changed = trio.Event()

    def publish(self) -> None:
        """Note a change; the writer writes it soon."""
        self._changed.set()

    def write_now(self) -> bool:
        return self._write(self._state())

    def _write(self, state: dict[str, Any]) -> bool:
        try:
            write_json_atomically(self.path, state)
            return True
        except OSError as exc:  # removing it takes no space; `status` then says it cannot tell
            log.debug("cannot write the state file: %s", exc)
            try:
                self.path.unlink(missing_ok=True)
            except OSError:
                pass
            return False

    async def writer(self) -> None:
        while True:
            with trio.move_on_after(self._timing.state_check_s) as idle:
                await self._changed.wait()
            if idle.cancelled_caught and os.path.lexists(self.path):
                continue
            self._changed = trio.Event()
            if not await trio.to_thread.run_sync(self._write, self._state()):
                self.publish()  # again once there may be room: an idle daemon changes nothing
                await trio.sleep(self._timing.state_retry_s)
            await trio.sleep(self._timing.state_write_interval_s)


class ConfigWatch:
    """config.json as a running daemon reads it again: before each connection
    attempt (a user who pairs again must not have to restart pgw), and before
    a stage when it changed (one stat a stage)."""

    def __init__(self, path: Path, reread: Optional[typing.Callable[[], Settings]]) -> None:
        self.path = path
        self._reread = reread  # the settings as they are now; None: never read again
        self._problem: Optional[str] = None  # the last read's, logged once
        self._seen = self._identity()

    def _identity(self) -> Optional[tuple[int, int, int]]:
        try:
            info = os.stat(self.path)
        except OSError:
            return None
        return info.st_ino, info.st_mtime_ns, info.st_size

    def changed(self) -> bool:
        """Whether config.json changed since it was last read."""
        return self._reread is not None and self._identity() != self._seen

    def read_again(self, current: Settings) -> Settings:
        """`current` with what config.json says now where a running pgw can
        take it: new credentials (hidden in the log from now on), the proxy,
        compression, the stages' env and the name.  Whatever a file edited
        by hand holds, the settings in use stay on a failure, said once."""
        if self._reread is None:
            return current
        self._seen = self._identity()  # before the read: a change after it is read again
        try:
            fresh = self._reread()
        except (PgwError, OSError, ValueError) as exc:
            if str(exc) != self._problem:
                log.warning("cannot read the settings again; keeping the ones in use: %s", exc)
            self._problem = str(exc)
            return current
        self._problem = None
        settings = current
        if fresh.token and (fresh.server, fresh.token) != (current.server, current.token):
            redact_also(fresh.token)
            log.info("the credentials changed (paired again?): now worker %s on %s", printable(fresh.worker_id or "?"), fresh.server)
            settings = attrs.evolve(settings, server=fresh.server, token=fresh.token, worker_id=fresh.worker_id)
        # Changed without a restart: a proxy that refuses us fixed, compression
        # turned off on a host short of CPU, the CLIs' PATH fixed.
        for name, key, when in (
            ("proxy", "proxy", "connecting with the new one"),
            ("compression", "compression", "connecting with the new one"),
            ("stage_env", "env", "the next stage gets the new one"),
            ("name", "name", "the next hello says the new one"),
        ):
            if getattr(fresh, name) != getattr(current, name):
                log.info("the config's %s setting changed: %s", key, when)
                settings = attrs.evolve(settings, **{name: getattr(fresh, name)})
        return settings


class Daemon:
    """`pgw run`: one connection at a time, reconnecting, until shut down."""

    def __init__(
        self,
        settings: Settings,
        home: Path,
        environ: Optional[typing.Mapping[str, str]] = None,
        timing: Timing = Timing(),
        reread: Optional[typing.Callable[[], Settings]] = None,
        stage_umask: Optional[int] = None,
        subreaper: bool = False,
    ) -> None:
        self.settings, self.home, self.timing = settings, home, timing
        # Every token it has used: a server's words (a close reason) may echo
        # one, and the state file keeps them for `status`.
        self.secrets = token_forms(settings.token)
        self.subreaper = subreaper and sys.platform.startswith("linux")  # `pgw run`: see sweep_orphans
        self.config = ConfigWatch(home / CONFIG_FILENAME, reread)
        self._last_failure: Optional[str] = None  # the reconnect log's: said once per cause
        self._reminder_s, self._next_reminder = self.timing.reconnect_reminder_s, math.inf
        self.stage_umask = stage_umask  # None: the stages get pgw's own
        self.environ = dict(os.environ if environ is None else environ)
        # Absolute: a stage root that ran a stage before has its working directory at /.
        self.scratch_root = Path(os.path.abspath(home / SCRATCH_DIRNAME))
        self.stages: dict[str, StageRun] = {}
        self.spawner = StageSpawner(self.timing.root_idle_s, subreaper=self.subreaper)
        self.slots = trio.Semaphore(settings.max_stages) if settings.max_stages > 0 else None
        self.shutdown = Shutdown()
        self.link = LinkState()
        self.connection: Optional[Connection] = None
        self._idle_scope: Optional[trio.CancelScope] = None  # connecting or backing off
        self.state_file = StateFile(home / STATE_FILENAME, timing, self.state)
        self._started_unix = time.time()

    def prepare(self, request: StageRequest) -> PreparedStage:
        # `config set env.PATH ...` (the fix doctor names for a CLI not found)
        # counts from the next stage, not from the next start.  A stat a stage.
        if self.config.changed():
            self._read_settings_again()
        return prepare_stage(request, self.scratch_root, self.environ, self.settings.stage_env)

    def capabilities(self) -> dict[str, Any]:
        return probe_capabilities(cli_search_path(self.settings.stage_env, self.environ))

    # Shutdown --------------------------------------------------------------

    def request_shutdown(self) -> None:
        """First SIGTERM/SIGINT: stop reading, stop stages with the shutdown grace, close 1001.
        A second one: no grace, every stage is killed now."""
        if self.shutdown.requested:
            log.info("killing every stage now")
            self.shutdown.hurried = True
            self._connection_ends_within(self.timing.close_timeout_s)
        else:
            log.info("shutting down: stopping %d stage(s)", len(self.stages))
            self.shutdown.requested = True
            if self.connection is not None:
                self.connection.reading.cancel()
                # The grace, then the exits' way out and the close: a server that
                # reads nothing more would otherwise hold them, and pgw, for ever.
                self._connection_ends_within(self.timing.shutdown_grace_s + 2 * self.timing.close_timeout_s)
            elif self._idle_scope is not None:
                self._idle_scope.cancel()
        for stage in list(self.stages.values()):
            stage.stop("worker shutting down", self.shutdown.stage_grace_s(self.timing))

    def _connection_ends_within(self, seconds: float) -> None:
        if self.connection is not None and self._idle_scope is not None:
            self._idle_scope.deadline = min(self._idle_scope.deadline, trio.current_time() + seconds)

    def hurry_shutdown(self) -> None:
        """As two signals would: shut down, killing every stage at once."""
        if not self.shutdown.requested:
            self.request_shutdown()
        self.request_shutdown()

    # State file ------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What `pgw status` reads (the state file)."""
        running = sum(1 for stage in self.stages.values() if stage.running)
        return {
            "pid": os.getpid(),
            "started_at": iso_time(self._started_unix),
            "server": self.settings.server,
            "connected": self.link.connected,
            "connected_since": iso_time(self.link.since_unix),
            "last_error": self.link.last_error,
            "tries": self.link.tries,
            "next_try_at": iso_time(self.link.next_try_unix),
            # Which `pair` cannot change: PGW_TOKEN (or --token) outranks config.json.
            "token_from_environment": bool(os.environ.get(ENV_TOKEN)),
            "stages_running": running,
            "stages_queued": len(self.stages) - running,
            "updated_at": iso_time(time.time()),
        }

    # Reconnect loop --------------------------------------------------------

    async def run(self) -> None:
        """Connect, run stages, reconnect, until a shutdown is requested."""
        await trio.to_thread.run_sync(self._empty_scratch)
        self.state_file.publish()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.state_file.writer)
                nursery.start_soon(self.spawner.free.retire_idle)
                if self.subreaper:
                    nursery.start_soon(self.spawner.sweep_orphans)
                await self._reconnect_loop()
                nursery.cancel_scope.cancel()
        finally:
            self.spawner.close()
            self.link.connected, self.link.since_unix = False, None
            self.state_file.write_now()
        log.info("stopped")

    def _empty_scratch(self) -> None:
        make_private_dirs(self.home)
        if is_real_dir(self.scratch_root):
            remove_scratch(self.scratch_root)
        private_dir(self.scratch_root)

    async def _reconnect_loop(self) -> None:
        backoff = Backoff(self.timing.reconnect_first_s, self.timing.reconnect_cap_s)
        while not self.shutdown.requested:
            self.link.since = None
            self._read_settings_again()
            asked_s: Optional[float] = None
            try:
                with trio.CancelScope() as self._idle_scope:
                    await self._connect()
                if self._idle_scope.cancelled_caught and self.connection is not None:
                    if self.stages or not self.connection.outbox.drained:
                        log.warning("the server read nothing more: pgw stopped without sending every stage's exit")
                    else:
                        log.info("every stage's exit was sent; the server did not answer the close in time")
                failure = None
            except Exception as exc:  # noqa: BLE001 - every failure is logged and retried
                failure = connection_failure(self.settings.server, exc)
                asked_s = retry_after_s(exc, time.time())
                if failure.startswith(INTERNAL_FAILURE):
                    log.error("the connection ended on an internal error", exc_info=exc)
            finally:
                self.connection = None
                self.link.connected, self.link.since_unix = False, None
            if self.shutdown.requested:
                break
            lasted = self.link.since
            if lasted is not None and trio.current_time() - lasted >= self.timing.reconnect_reset_after_s:
                backoff.reset()
            delay = backoff.next_delay_s()
            if asked_s is not None:  # the server said when: not sooner, and not past an hour
                delay = max(delay, min(asked_s, RETRY_AFTER_MAX_S))
            self._note_failure(lasted is not None, failure, delay)
            with trio.CancelScope() as self._idle_scope:
                await trio.sleep(delay)
            self.link.next_try_unix = None

    def _note_failure(self, was_connected: bool, failure: Optional[str], delay: float) -> None:
        """Count and log a lost connection or a failed attempt, for the log and `status`."""
        link, now = self.link, trio.current_time()
        link.next_try_unix = time.time() + delay
        if was_connected:
            link.tries, link.failing_since, self._reminder_s = 0, now, self.timing.reconnect_reminder_s
            link.last_error = without_secrets(failure, self.secrets) if failure else link.last_error
            log.warning("disconnected: %s; reconnecting in %.1f s", failure or "closed", delay)
        else:
            link.tries += 1
            if link.failing_since is None:
                link.failing_since = now
            if failure != self._last_failure:
                self._reminder_s, self._next_reminder = self.timing.reconnect_reminder_s, now + self.timing.reconnect_reminder_s
                log.warning("cannot connect: %s; retrying in %.1f s", failure, delay)
            elif now >= self._next_reminder:
                self._reminder_s = min(self._reminder_s * 2, self.timing.reconnect_reminder_cap_s)
                self._next_reminder = now + self._reminder_s
                log.warning(
                    "still cannot connect after %d tries over %s: %s; next try in %.0f s",
                    link.tries, _duration(now - link.failing_since), failure, delay,
                )
            else:
                log.debug("cannot connect: %s; retrying in %.1f s", failure, delay)
            link.last_error = without_secrets(failure, self.secrets) if failure else failure
        self._last_failure = None if was_connected else failure
        self.state_file.publish()

    def _read_settings_again(self) -> None:
        """A user who pairs again while pgw runs must not have to restart it:
        the server and token are read again before each connection attempt."""
        settings = self.config.read_again(self.settings)
        if settings.token != self.settings.token:
            self.secrets += token_forms(settings.token)
        self.settings = settings

    async def _connect(self) -> None:
        """One connection, from TCP to its end; every stream opened here is closed here."""
        settings, timing = self.settings, self.timing
        proxy = choose_proxy(settings.server, settings.proxy, self.environ)
        stream = await open_stream(settings.server, settings.cafile, timing.connect_timeout_s, proxy)
        try:
            async with trio.open_nursery() as nursery:
                pings = LatestPing()
                ws, deflate = await open_websocket(
                    nursery, stream, settings, timing.connect_timeout_s, pings,
                    max_message_size=MESSAGE_MAX_BYTES, message_queue_size=1, receive_buffer_size=None,
                )
                self.connection = Connection(self, ws, stream, deflate, pings)
                self.link.connected, self.link.since, self.link.since_unix = True, trio.current_time(), time.time()
                self.link.tries, self.link.failing_since = 0, None
                self.state_file.publish()
                log.info(
                    "connected to %s as %s%s%s", settings.server + CONNECT_PATH, shown(settings.name),
                    f" through the proxy {proxy.url}" if proxy else "",
                    f", {deflate}" if deflate else ", uncompressed",
                )
                try:
                    await self.connection.serve()
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            # trio-websocket leaves the socket open when a handshake is
            # rejected or the peer resets: a reconnect loop running for
            # weeks must close every stream it opened itself.
            await trio.aclose_forcefully(stream)


##############################################################################
# Logging
##############################################################################


def token_forms(token: Optional[str]) -> list[str]:
    """How a token may show in text (as it is, and URL-quoted as the handshake
    sends it); none for one too short to be a real secret, which would turn
    every line it is hidden in to mush."""
    return [token, urllib.parse.quote(token, safe="")] if token and len(token) >= REDACT_MIN_CHARS else []


def without_secrets(text: str, secrets: typing.Iterable[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "<token>")
    return text


class RedactToken(logging.Filter):
    """Belt and braces: the token never reaches a log line, whatever logged it."""

    def __init__(self, token: str) -> None:
        super().__init__()
        self.secrets: list[str] = []
        self.add(token)

    def add(self, token: str) -> None:
        self.secrets = list(dict.fromkeys([*self.secrets, *token_forms(token)]))

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "pgw_redacted", False):  # one record passes every handler
            return True
        record.pgw_redacted = True
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = without_secrets(record.exc_text, self.secrets)
        record.msg, record.args = without_secrets(record.getMessage(), self.secrets), ()
        return True


class LogFile(logging.handlers.RotatingFileHandler):
    """run.log, rotated at 1 MB, mode 0600; reopened when the file at its path is
    no longer the one open (logrotate moved it, or a user deleted it), as
    logging's WatchedFileHandler does, so later lines are not lost."""

    def _open(self) -> typing.TextIO:
        # O_NONBLOCK: a FIFO put at the log's path (a stage can reach the home)
        # would hold the open, and with it the whole daemon, until a reader came.
        # A file, or a device such as /dev/null; anything else loses its lines,
        # said once on stderr (emit's handleError).
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.baseFilename, flags, 0o600)
        except OSError as exc:  # ENXIO: a FIFO without a reader, or a socket ("No such device or address")
            if exc.errno != errno.ENXIO:
                raise
            raise OSError(errno.EINVAL, "not a regular file", self.baseFilename) from None
        try:
            info = os.fstat(fd)
            self._regular = stat.S_ISREG(info.st_mode)  # /dev/null is never rolled over
            if not (self._regular or stat.S_ISCHR(info.st_mode)):
                raise OSError(errno.EINVAL, "not a regular file", self.baseFilename)
            if self._regular:  # a log made by pgworker may be world-readable; a device is not pgw's to change
                os.fchmod(fd, 0o600)
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        self._identity = (info.st_dev, info.st_ino)
        return typing.cast(typing.TextIO, os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors))

    _failure: Optional[str] = None  # the last write's, said once on stderr
    _failed = False  # the record being written was lost

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is not None:
            try:
                info = os.stat(self.baseFilename)
                replaced = (info.st_dev, info.st_ino) != self._identity
            except OSError:
                replaced = True
            if replaced:
                self.stream.close()
                self.stream = None  # type: ignore[assignment]  # emit opens it again
        failed_before, self._failed = self._failure, False
        super().emit(record)
        if not self._failed and failed_before is not None:
            self._failure = None

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        # logging's own prints a traceback on stderr at every line a full disk
        # loses: one line instead, until a line is written again.
        self._failed = True
        exc = sys.exc_info()[1]
        failure = f"pgw: cannot write the log {self.baseFilename}: {getattr(exc, 'strerror', None) or exc}"
        if failure != self._failure:
            self._failure = failure
            try:
                sys.stderr.write(failure + "\n")
                sys.stderr.flush()
            except (OSError, ValueError):
                pass

    def shouldRollover(self, record: logging.LogRecord) -> bool:  # noqa: N802 (logging's name)
        # The file's size, one lseek: logging's own check formats every record a
        # second time and stats the path twice, a third of a log line's cost;
        # whether it is a regular file is known since it was opened.
        if self.stream is None:
            self.stream = self._open()
        return self.maxBytes > 0 and self._regular and self.stream.seek(0, 2) >= self.maxBytes


def redact_also(token: str) -> None:
    """Hide a new token (a re-pairing) in the log as the first one is."""
    for handler in log.handlers:
        for log_filter in handler.filters:
            if isinstance(log_filter, RedactToken):
                log_filter.add(token)


def setup_logging(home: Path, token: str, verbose: bool) -> Path:
    """run.log rotated at 1 MB (5 kept); stderr too when it is a terminal or -v."""
    # No log line names its caller, thread or process: logging's HOWTO
    # ("Optimization") turns their gathering off, a third of a line's cost.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    make_private_dirs(home)
    path = home / RUN_LOG_FILENAME
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    try:
        log_file = LogFile(
            path, maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS, encoding="utf-8", errors="backslashreplace"
        )
    except OSError as exc:
        raise ConfigError(
            f"cannot write the log {path}: {exc.strerror}; fix or remove it, or set {ENV_HOME} to a directory you own"
        ) from None
    handlers: list[logging.Handler] = [log_file]
    if verbose or sys.stderr.isatty():
        handlers.append(logging.StreamHandler(sys.stderr))
    redact = RedactToken(token)
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(redact)
    log.handlers[:] = handlers
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False
    return path


# What `pgw run` catches, from its first line on: SIGTERM and SIGINT stop it
# (twice: at once), SIGQUIT at once, and SIGHUP is ignored.
DAEMON_SIGNALS = [signal.SIGTERM, signal.SIGINT] + [getattr(signal, name) for name in ("SIGQUIT", "SIGHUP") if hasattr(signal, name)]


async def run_until_signalled(daemon: Daemon, early: typing.Sequence[int] = ()) -> None:
    """Run the daemon; SIGTERM/SIGINT stop it (twice: at once), SIGQUIT (Ctrl-\\)
    at once, SIGHUP is ignored.  `early`: those that came before this could
    receive them (each counts)."""
    wanted = DAEMON_SIGNALS

    def obey(signum: int, when: str) -> None:
        if signum == getattr(signal, "SIGHUP", None):
            log.info("SIGHUP ignored: pgw stops on SIGTERM or SIGINT")
        elif signum == getattr(signal, "SIGQUIT", None):
            # Python's default would end pgw there and then: no log line, and no
            # exit for the stages it ran.  Quit as a second SIGTERM does.
            log.info("received SIGQUIT%s: quitting now", when)
            daemon.hurry_shutdown()
        else:
            log.info("received %s%s", signal.Signals(signum).name, when)
            daemon.request_shutdown()

    with trio.open_signal_receiver(*wanted) as signals:
        for signum in early:
            obey(signum, " while starting")
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                async for signum in signals:
                    obey(signum, "")

            nursery.start_soon(watch_signals)
            await daemon.run()
            nursery.cancel_scope.cancel()


##############################################################################
# Doctor: every check a user needs before asking for help
##############################################################################
# Each check is one line, PASS/WARN/FAIL with a one-line explanation.  The
# network checks stop at the first failure: a TLS check after a refused TCP
# connect only repeats it.


@attrs.frozen
class Check:
    name: str
    status: Literal["PASS", "WARN", "FAIL", "SKIP"]
    detail: str


# How long doctor waits for the server to answer its close, once the token is accepted.
DOCTOR_CLOSE_WAIT_S = 2.0

# The network checks in order; after a failure the rest are listed as skipped.
# Through a proxy, `tcp` is its CONNECT tunnel to the server.
NETWORK_CHECKS = ("proxy", "dns", "tcp", "tls", "websocket")


def shiv_root(environ: typing.Mapping[str, str] = os.environ) -> Path:
    return Path(environ.get("SHIV_ROOT") or Path.home() / ".shiv").expanduser()


def current_extraction() -> Optional[Path]:
    """The shiv extraction this pgw runs from (…/pgw.pyz_<id>/site-packages/pgw.py), if any."""
    here = Path(__file__).resolve().parent
    return here.parent if here.name == "site-packages" and "_" in here.parent.name else None


def old_extractions(root: Path, current: Optional[Path]) -> list[Path]:
    """Extractions of pgw under the shiv root other than the running one: named
    as shiv names this pyz's (its file name, `_`, a sha256 build id), real
    directories, holding pgw.  The root is shared with every other shiv app,
    one of which may be called `pgw_tools.pyz`."""
    if current is None:
        return []
    name = re.compile(re.escape(current.name.rsplit("_", 1)[0]) + "_[0-9a-f]{64}")
    try:
        entries = list(root.iterdir())
    except OSError:
        return []
    return [
        entry for entry in entries
        if name.fullmatch(entry.name) and entry.name != current.name and _is_extraction_of_pgw(entry)
    ]


def _is_extraction_of_pgw(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode) and stat.S_ISREG(os.lstat(path / "site-packages" / "pgw.py").st_mode)
    except OSError:
        return False


def directory_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for filename in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, filename)).st_size
            except OSError:
                pass
    return total


def local_checks(home: Path, config_path: Path, settings: Optional[Settings], config_error: Optional[str],
                 capabilities: dict[str, Any], versions: dict[str, tuple[Optional[str], Optional[str]]],
                 search_path: str) -> list[Check]:
    checks = [Check("python", "PASS", f"Python {platform.python_version()} ({sys.executable})")]
    current = current_extraction()
    checks.append(Check("pgw", "PASS", f"pgw {__version__} from {os.path.abspath(sys.argv[0] if current else __file__)}"))
    root = shiv_root()
    if current is not None:
        writable = os.access(root, os.W_OK)
        old = old_extractions(root, current)
        old_mb = sum(directory_bytes(path) for path in old) / 2**20
        detail = f"{root} {'writable' if writable else 'NOT writable'}; {len(old)} old extraction(s), {old_mb:.1f} MB"
        checks.append(Check("extraction", "PASS" if writable else "WARN", detail))
    if config_error:
        checks.append(Check("config", "FAIL", config_error))
    elif settings is None or not settings.token:
        checks.append(Check("config", "FAIL", f"not paired: no token in {config_path}; run `pgw pair CODE --server URL`"))
    elif not config_path.exists():
        checks.append(Check("config", "PASS", f"no {config_path}: the token comes from ${ENV_TOKEN} or --token"))
    else:
        mode = stat.S_IMODE(config_path.stat().st_mode)
        if mode & 0o077:
            could = "read the token and change the server it goes to" if mode & 0o022 else "read the token"
            checks.append(Check("config", "WARN", f"{config_path} is mode {mode:o}: others may {could}; chmod 600 it"))
        else:
            checks.append(Check("config", "PASS", f"{config_path}, mode 600, worker {printable(settings.worker_id or '?')}, server {settings.server}"))
    found = 0
    for binary, key in CLI_CAPABILITY_KEYS.items():
        cli = capabilities[key]
        if not cli["available"]:
            blocked = unrunnable_on_path(binary, search_path)
            checks.append(Check(binary, "WARN", f"{blocked} is on PATH, but this user may not run it (not executable, or on "
                                "a file system mounted noexec): `chmod +x` it" if blocked else
                                "not found on PATH (set `pgw config set env.PATH ...` if it is installed)"))
            continue
        found += 1
        version, problem = versions.get(binary, (None, None))
        checks.append(Check(binary, "PASS" if version else "WARN", f"{cli['path']} ({version or problem})"))
    if not found:
        checks.append(Check("clis", "FAIL", "none of claude, codex, deepseek is on PATH: no stage can run"))
    try:
        holder, _, connected = daemon_report(home)
    except PgwError as exc:
        checks.append(Check("daemon", "WARN", str(exc)))
        return checks
    if holder is None:
        checks.append(Check("daemon", "WARN", "`pgw run` is not running for this home"))
    else:
        checks.append(Check("daemon", "PASS", f"`pgw run` is running (pid {holder}), {connection_words(connected)}"))
    return checks


async def network_checks(
    settings: Settings, timing: Timing = Timing(), daemon: Optional[str] = None,
    environ: typing.Mapping[str, str] = os.environ,
) -> list[Check]:
    """The proxy `run` would use (from the config or `environ`), DNS, TCP (through
    a proxy: its tunnel), TLS and the WebSocket handshake with the stored token;
    nothing is started.  `daemon` says a daemon runs for this home: no handshake then."""
    try:
        proxy = choose_proxy(settings.server, settings.proxy, environ)
    except ConfigError as exc:
        checks = [Check("proxy", "FAIL", str(exc))]
    else:
        checks = await _network_checks(settings, timing, daemon, proxy)
    done = {check.name for check in checks}
    failed = next((check.name for check in checks if check.status == "FAIL"), None)
    for name in NETWORK_CHECKS:
        if name == "tls" and not settings.server.startswith("https:"):
            checks.append(Check(name, "SKIP", "not needed for an http:// server"))
        elif name not in done:
            checks.append(Check(name, "SKIP", f"not checked after the {failed} check failed"))
    return sorted(checks, key=lambda check: NETWORK_CHECKS.index(check.name))


async def _network_checks(settings: Settings, timing: Timing, daemon: Optional[str], proxy: Optional[Proxy]) -> list[Check]:
    parsed = urllib.parse.urlsplit(settings.server)
    host, secure = parsed.hostname or "", parsed.scheme == "https"
    port = parsed.port or (443 if secure else 80)
    timeout_s = timing.connect_timeout_s
    if proxy is None:
        checks, stream = await _reach_directly(settings.server, host, port, timeout_s)
        why = "`proxy none` in the config" if settings.proxy == PROXY_NONE else f"no proxy for {host} in the config or the environment"
        checks.append(Check("proxy", "SKIP", f"{why}: connecting directly"))
    else:
        checks, stream = await _reach_through_proxy(proxy, host, port, timeout_s)
    if stream is None:
        return checks
    try:
        if secure:
            try:
                context = make_ssl_context(settings.cafile, settings.given_by.get("cafile", "`cafile`"))
                stream = trio.SSLStream(stream, context, server_hostname=host, https_compatible=True)
                with trio.fail_after(timeout_s):
                    await stream.do_handshake()
                checks.append(Check("tls", "PASS", f"certificate of {host} trusted" + (f" (CA file {settings.cafile})" if settings.cafile else "")))
            except (OSError, trio.BrokenResourceError, trio.TooSlowError, ConfigError) as exc:
                detail = str(exc) if isinstance(exc, ConfigError) else connection_failure(settings.server, exc)
                if "certificate" in detail and not settings.cafile:
                    detail += "; if the server uses an internal CA: `pgw config set cafile FILE`"
                return checks + [Check("tls", "FAIL", detail)]
        if daemon is not None:
            checks.append(Check("websocket", "SKIP", f"{daemon}: its connection says more than a second one would"))
        else:
            checks.append(await _websocket_check(stream, settings, timeout_s))
    finally:
        await trio.aclose_forcefully(stream)
    return checks


async def _reach_directly(server: str, host: str, port: int, timeout_s: float) -> tuple[list[Check], Optional[trio.abc.Stream]]:
    """The DNS and TCP checks, and the stream when both pass."""
    checks: list[Check] = []
    try:
        with trio.fail_after(timeout_s):
            addresses = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        checks.append(Check("dns", "PASS", f"{host} is {addresses[0][4][0]}"))
    except (OSError, trio.TooSlowError) as exc:
        return checks + [Check("dns", "FAIL", connection_failure(server, exc))], None
    try:
        with trio.fail_after(timeout_s):
            stream = await trio.open_tcp_stream(host, port)
        checks.append(Check("tcp", "PASS", f"connected to {host}:{port}"))
    except (OSError, trio.TooSlowError) as exc:
        return checks + [Check("tcp", "FAIL", connection_failure(server, exc))], None
    return checks, stream


async def _reach_through_proxy(proxy: Proxy, host: str, port: int, timeout_s: float) -> tuple[list[Check], Optional[trio.abc.Stream]]:
    """The proxy and its tunnel to the server (the `tcp` check), and the tunnel
    when both pass; DNS for the server is the proxy's."""
    try:
        stream: trio.abc.Stream = await reach_proxy(proxy, trio.current_time() + timeout_s)
    except ProxyError as exc:
        return [Check("proxy", "FAIL", str(exc))], None
    checks = [
        Check("proxy", "PASS", f"{proxy.url} ({proxy.source}) is reachable"),
        Check("dns", "SKIP", f"the proxy resolves {host}, not this host"),
    ]
    try:
        stream = await request_tunnel(stream, proxy, host, port, trio.current_time() + timeout_s)
    except BaseException as exc:
        await trio.aclose_forcefully(stream)
        if isinstance(exc, ProxyError):
            return checks + [Check("tcp", "FAIL", str(exc))], None
        raise
    return checks + [Check("tcp", "PASS", f"the proxy opened a tunnel to {tunnel_target(host, port)}")], stream


async def _websocket_check(stream: trio.abc.Stream, settings: Settings, timeout_s: float) -> Check:
    if not settings.token:
        return Check("websocket", "FAIL", "not paired: no token to present")
    accepted = False
    try:
        async with trio.open_nursery() as nursery:
            ws, deflate = await open_websocket(nursery, stream, settings, timeout_s)
            accepted = True  # what is checked; the close is a courtesy, whatever the server does then
            with trio.move_on_after(DOCTOR_CLOSE_WAIT_S):
                await ws.aclose(1000, "pgw doctor")
            nursery.cancel_scope.cancel()
    except Exception as exc:  # noqa: BLE001 - every failure is reported as a FAIL line
        # After the handshake: a ping the server sends while pgw closes, which
        # trio-websocket's reader fails to answer, or a server that never answers the close.
        if not accepted:
            return Check("websocket", "FAIL", connection_failure(settings.server, exc))
    if deflate is not None:
        compression = f"compressed: {deflate}"
    else:
        compression = "uncompressed: " + ("the server declined permessage-deflate" if settings.compression else "compression is off")
    return Check("websocket", "PASS", f"the server accepted the token; {compression}")


##############################################################################
# Selftest: the whole path on this host, with no server and no network
##############################################################################
# A loopback backend inside this process (HTTP for pairing, a WebSocket for
# the stages), a temporary home, stub CLIs that run with this very Python:
# what a user runs after copying pgw.pyz onto an air-gapped host.

SELFTEST_STEP_TIMEOUT_S = 15.0
SELFTEST_STREAM_BYTES = 4 * 1024 * 1024

SELFTEST_STUB = """#!{python}
import os, sys, time
mode = sys.argv[1] if len(sys.argv) > 1 else "echo"
if mode == "echo":
    sys.stdout.write("echo: " + sys.stdin.read())
elif mode == "stream":
    line = "x" * 1023 + "\\n"
    for _ in range({stream_bytes} // 1024):
        sys.stdout.write(line)
elif mode == "sleep":
    print("sleeping", flush=True)
    time.sleep(60)
"""


class SelftestFailure(PgwError):
    """A selftest step whose outcome is not what it must be."""


def require(condition: bool, failure: str) -> None:
    """A selftest check that `python -O` keeps (it drops `assert`)."""
    if not condition:
        raise SelftestFailure(failure)


class SelftestBackend:
    """Just enough of the prove-graph backend to drive one worker."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.arrived = trio.lowlevel.ParkingLot()
        self.connection: Optional[trio_websocket.WebSocketConnection] = None
        self.connected = trio.Event()

    async def handler(self, request: trio_websocket.WebSocketRequest) -> None:
        self.connection = await request.accept()
        self.connected.set()
        try:
            while True:
                self.messages.append(json.loads(await self.connection.get_message()))
                self.arrived.unpark_all()
        except trio_websocket.ConnectionClosed:
            pass

    async def send(self, message: dict[str, Any]) -> None:
        if self.connection is None:
            raise SelftestFailure("the worker never connected")
        await self.connection.send_message(json.dumps(message))

    async def wait_for(self, kind: str, stage_run_id: Optional[str] = None) -> dict[str, Any]:
        while True:
            for message in self.messages:
                if message.get("type") == kind and stage_run_id in (None, message.get("stage_run_id")):
                    return message
            await self.arrived.park()

    def output(self, stage_run_id: str) -> tuple[str, list[int]]:
        frames = [m for m in self.messages if m.get("stage_run_id") == stage_run_id and m["type"] in ("stage.stdout", "stage.stderr")]
        return "".join(m["data"] for m in frames), [m["seq"] for m in frames]


def _selftest_pair_server() -> tuple[Any, str]:
    """A pair-confirm endpoint on 127.0.0.1, in a thread."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = json.dumps({"worker_id": "selftest", "token": "selftest-token"}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


# What stops a selftest, its temporary directory and processes removed first:
# a SIGTERM (a `timeout`, a CI job cancelled) left them behind.
SELFTEST_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


async def selftest(work_dir: Path, say: typing.Callable[[str, bool, str], None]) -> tuple[bool, Optional[int]]:
    """Run every step, reporting each with say(step, passed, detail): whether
    all passed, and the signal that stopped it, if one did."""
    test = Selftest(work_dir, say)
    passed, stopped_by = False, None
    with trio.open_signal_receiver(*SELFTEST_STOP_SIGNALS) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                nonlocal stopped_by
                signum: int
                async for signum in signals:
                    stopped_by = signum
                    nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_signal)
            passed = await test.run()
            nursery.cancel_scope.cancel()
    return passed and stopped_by is None, stopped_by


class Selftest:
    """The selftest's steps, in order, against one loopback backend and stub CLIs."""

    def __init__(self, work_dir: Path, say: typing.Callable[[str, bool, str], None]) -> None:
        self.home, self.bin_dir = work_dir / "home", work_dir / "bin"
        self.say = say
        self.backend = SelftestBackend()
        self.server_url = self.pair_url = ""
        self.nursery: trio.Nursery

    async def run(self) -> bool:
        self.bin_dir.mkdir()
        for cli in CLI_CAPABILITY_KEYS:
            stub = self.bin_dir / cli
            stub.write_text(SELFTEST_STUB.format(python=sys.executable, stream_bytes=SELFTEST_STREAM_BYTES))
            stub.chmod(0o755)
        steps = (("pair", self.pair), ("connect", self.connect), ("echo", self.echo), ("stream", self.stream),
                 ("cancel", self.cancel), ("timeout", self.timeout), ("bad request", self.bad_request))
        results: list[bool] = []
        pair_server, self.pair_url = _selftest_pair_server()
        try:
            async with trio.open_nursery() as self.nursery:
                ws_server = await self.nursery.start(
                    trio_websocket.serve_websocket, self.backend.handler, "127.0.0.1", 0, None
                )
                self.server_url = f"http://127.0.0.1:{ws_server.port}"
                for name, body in steps:
                    results.append(await self.step(name, body))
                    if not results[-1] and name in ("pair", "connect"):
                        break
                self.nursery.cancel_scope.cancel()
        finally:
            pair_server.shutdown()
            pair_server.server_close()
        return len(results) == len(steps) and all(results)

    async def step(self, name: str, body: typing.Callable[[], typing.Awaitable[str]]) -> bool:
        try:
            with trio.fail_after(SELFTEST_STEP_TIMEOUT_S):
                detail = await body()
            passed = True
        except trio.TooSlowError:
            passed, detail = False, f"no answer within {SELFTEST_STEP_TIMEOUT_S:g} s"
        except (PgwError, OSError) as exc:
            passed, detail = False, str(exc) or type(exc).__name__
        self.say(name, passed, detail)
        return passed

    async def request(self, stage_run_id: str, cli: str, *cli_args: str, **fields: Any) -> None:
        await self.backend.send({"type": "stage.request", "stage_run_id": stage_run_id, "job_id": "selftest",
                                 "cli": cli, "cli_args": list(cli_args), "stdin": "", **fields})

    async def pair(self) -> str:
        body = {"pair_code": "SELFTEST", "machine_name": "selftest", "capabilities": probe_capabilities(str(self.bin_dir))}
        pairing = await trio.to_thread.run_sync(request_pairing, self.pair_url, body)
        write_config(self.home / CONFIG_FILENAME, {"server": self.server_url, **pairing})
        mode = stat.S_IMODE((self.home / CONFIG_FILENAME).stat().st_mode)
        require(mode == 0o600, f"config.json is mode {mode:o}, not 600")
        return f"paired with a loopback server; config.json mode 600 in {self.home}"

    async def connect(self) -> str:
        config = read_config(self.home / CONFIG_FILENAME)
        # The backend is on this host's loopback, which no proxy can reach.
        settings = Settings(server=self.server_url, token=config["token"], name="selftest", proxy=PROXY_NONE)
        self.nursery.start_soon(Daemon(settings, self.home, environ={**os.environ, "PATH": str(self.bin_dir)}).run)
        hello = await self.backend.wait_for("hello")
        found = [key for key in ("claude_code", "codex", "deepseek_tui") if hello["capabilities"][key]["available"]]
        require(len(found) == 3, f"stub CLIs not found: {hello['capabilities']}")
        return "`pgw run` connected and said hello with 3 CLIs"

    async def echo(self) -> str:
        await self.request("echo", "claude", "echo", stdin="héllo ✓")
        end = await self.backend.wait_for("stage.exit", "echo")
        text, _ = self.backend.output("echo")
        require(end["returncode"] == 0 and text == "echo: héllo ✓", f"got {text!r}, exit {end}")
        return "the prompt went in on stdin and came back"

    async def stream(self) -> str:
        started = trio.current_time()
        await self.request("stream", "codex", "stream")
        end = await self.backend.wait_for("stage.exit", "stream")
        text, seqs = self.backend.output("stream")
        require(end["returncode"] == 0 and len(text) == SELFTEST_STREAM_BYTES, f"{len(text)} bytes arrived")
        require(seqs == list(range(1, len(seqs) + 1)), "frames out of order")
        elapsed = trio.current_time() - started
        return f"{SELFTEST_STREAM_BYTES // 2**20} MiB in {len(seqs)} frames, {SELFTEST_STREAM_BYTES / 2**20 / elapsed:.0f} MiB/s"

    async def cancel(self) -> str:
        await self.request("cancel", "deepseek", "sleep")
        pid = (await self.backend.wait_for("stage.ack", "cancel"))["pid"]
        await self.backend.wait_for("stage.stdout", "cancel")
        await self.backend.send({"type": "stage.cancel", "stage_run_id": "cancel", "signal": "SIGTERM"})
        end = await self.backend.wait_for("stage.exit", "cancel")
        require(end["returncode"] == -signal.SIGTERM, f"exit {end}")
        try:
            os.killpg(pid, 0)
            alive = sys.platform != "linux" or _group_has_live_member(pid)
        except ProcessLookupError:
            alive = False
        require(not alive, f"process group {pid} survived the cancel")
        return "SIGTERM reached the stage's process group; nothing left running"

    async def timeout(self) -> str:
        await self.request("timeout", "claude", "sleep", timeout_s=1)
        end = await self.backend.wait_for("stage.exit", "timeout")
        require(end["error"] == "timed out after 1 s", f"exit {end}")
        return "a 1 s timeout stopped the stage"

    async def bad_request(self) -> str:
        await self.request("bad", "claude", files={"../escape": "aGk="})
        end = await self.backend.wait_for("stage.exit", "bad")
        require(end["returncode"] == -1 and "unsafe file path" in (end["error"] or ""), f"exit {end}")
        require(not (self.home / "escape").exists(), "a file was written outside the scratch dir")
        return "an unsafe file path was refused with an error exit"


def _group_has_live_member(pgid: int) -> bool:
    """Whether a non-zombie process is in group `pgid` (Linux /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_line = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat_line[stat_line.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


##############################################################################
# Install: cron, systemd --user, launchd; pruning old extractions
##############################################################################
# What `install` writes starts pgw with absolute paths (cron's PATH is
# /usr/bin:/bin, and a unit has no shell), carries a PATH on which the CLIs
# are found, and points SHIV_ROOT into the pgw home.

CRON_BEGIN = "# >>> pgw: managed by `pgw install cron`; remove with `pgw uninstall cron` >>>"
CRON_END = "# <<< pgw <<<"
SYSTEMD_UNIT = "pgw.service"
LAUNCHD_LABEL = "dev.pgw.worker"
INSTALL_KINDS = ("cron", "systemd", "launchd")

# Several pgw homes on one host (PGW_HOME) each get a service of their own:
# the default home keeps the names above, which installs made before share;
# another home's unit and label carry a digest of its path.  A crontab block
# belongs to the home its command runs, so the markers stay the same for all.


def home_identity(home: Path) -> str:
    """The directory `home` is, whatever path names it (a symlink, `..`):
    one home, one service."""
    return os.path.realpath(home)


def is_default_home(home: Path) -> bool:
    try:
        return home_identity(home) == home_identity(user_home() / DEFAULT_HOME_DIRNAME)
    except RuntimeError:  # no home directory to tell: no default home either
        return False


def home_suffix(home: Path) -> str:
    """"" for the default home, else "-" and 12 hex digits naming it."""
    if is_default_home(home):
        return ""
    return "-" + hashlib.sha256(os.fsencode(home_identity(home))).hexdigest()[:12]


def systemd_unit_name(home: Path) -> str:
    return f"pgw{home_suffix(home)}.service"


def launchd_label(home: Path) -> str:
    return LAUNCHD_LABEL + home_suffix(home).replace("-", ".")


def home_in_environment(environ: typing.Mapping[str, str]) -> str:
    """The pgw home (its home_identity) that a service started with `environ`
    runs; a relative PGW_HOME is taken from the user's home directory, where
    cron and systemd start a user's commands."""
    try:
        home = user_home()
    except RuntimeError:
        home = Path("/")
    value = environ.get(ENV_HOME)
    return home_identity(home / os.path.expanduser(value) if value else home / DEFAULT_HOME_DIRNAME)


@attrs.frozen
class Launch:
    """How a service manager starts `pgw run` on this host."""

    argv: list[str]
    environ: dict[str, str]


def launch_for_this_host(home: Path, environ: typing.Mapping[str, str], search_path: str) -> Launch:
    """The interpreter and the pyz (or pgw.py) as absolute paths, and the env to give them."""
    home = Path(home_identity(home))  # a relative PGW_HOME means nothing to cron or systemd
    pyz = Path(sys.argv[0]).resolve() if current_extraction() is not None else Path(__file__).resolve()
    path_dirs = [str(Path(found).parent) for found in (shutil.which(cli, path=search_path) for cli in CLI_CAPABILITY_KEYS) if found]
    path_dirs += [d for d in search_path.split(os.pathsep) if d]
    path_dirs += ["/usr/local/bin", "/usr/bin", "/bin"]
    launch_env = {"PATH": os.pathsep.join(dict.fromkeys(path_dirs)), "SHIV_ROOT": str(home / SHIV_DIRNAME)}
    if environ.get(ENV_HOME):
        launch_env[ENV_HOME] = str(home)
    return Launch([sys.executable, str(pyz), "run"], launch_env)


def cron_block(launch: Launch) -> str:
    command = " ".join(
        [f"{key}={shlex.quote(value)}" for key, value in launch.environ.items()] + [shlex.quote(a) for a in launch.argv]
    ).replace("%", "\\%")  # cron turns a bare % into a newline
    command += " >/dev/null 2>&1"  # pgw logs to run.log; cron would mail anything printed
    return "\n".join([CRON_BEGIN, f"@reboot {command}", f"*/5 * * * * {command}", CRON_END]) + "\n"


def replace_cron_block(crontab: str, block: str, home: Path) -> tuple[str, bool]:
    """`crontab` with the marked block that runs `home` replaced by `block`
    ("" removes it), and whether there was one; every other line stays as it
    was.  A begin marker without its end (a hand edit) goes alone: the lines
    after it are the user's."""
    kept: list[str] = []
    inside: Optional[list[str]] = None  # the lines of an open block, while one is open
    found = False
    for line in crontab.split("\n"):  # cron's lines: a form feed or U+2028 ends none
        marker = line.rstrip()
        if marker == CRON_BEGIN:
            kept += inside or []
            inside = []
        elif marker == CRON_END and inside is not None:
            if cron_block_home(inside) == home_identity(home):
                found = True
            else:
                kept += [CRON_BEGIN, *inside, CRON_END]
            inside = None
        elif inside is not None:
            inside.append(line)
        else:
            kept.append(line)
    kept += inside or []
    text = "\n".join(kept).strip("\n")
    return (text + "\n" if text else "") + block, found


def cron_block_home(lines: list[str]) -> Optional[str]:
    """The pgw home (home_identity) that the command of a block of pgw's runs:
    the PGW_HOME its first job sets, before the command or through `env`; None
    if no line of it reads as a job."""
    for line in lines:
        try:  # cron turns \% into %, before the shell reads the line
            words = shlex.split(line.replace("\\%", "%"))
        except ValueError:
            continue
        if not words or words[0].startswith("#"):
            continue
        words = words[1:] if words[0].startswith("@") else words[5:]  # the schedule
        environ: dict[str, str] = {}
        through_env = False
        for word in words:  # the assignments before the command, and env's
            name, is_assignment, value = word.partition("=")
            if is_assignment and name.isidentifier():
                environ[name] = value
            elif word == "env" and not through_env:
                through_env = True
            else:
                break
        if words:
            return home_in_environment(environ)
    return None


def systemd_unit(launch: Launch) -> str:
    # systemd expands %X specifiers everywhere and $VAR in ExecStart: double them.
    # Inside its double quotes a backslash escapes, and a quote ends the value.
    environment = "\n".join(
        'Environment="{}={}"'.format(key, value.replace("\\", "\\\\").replace('"', '\\"')).replace("%", "%%")
        for key, value in launch.environ.items()
    )
    exec_start = " ".join(shlex.quote(a) for a in launch.argv).replace("%", "%%").replace("$", "$$")
    return f"""[Unit]
Description=pgw, the prove-graph worker
Wants=network-online.target
After=network-online.target

[Service]
ExecStart={exec_start}
{environment}
Restart=always
RestartSec=5
# pgw stops its stages on SIGTERM (5 s grace) and sends their exits.
KillMode=mixed
TimeoutStopSec=20

[Install]
WantedBy=default.target
"""


def launchd_plist(launch: Launch, home: Path) -> str:
    import plistlib

    return plistlib.dumps({
        "Label": launchd_label(home),
        "ProgramArguments": launch.argv,
        "EnvironmentVariables": launch.environ,
        "RunAtLoad": True,
        "KeepAlive": True,
        "StandardErrorPath": str(home / LAUNCHD_LOG_FILENAME),
    }).decode()


def install_target(kind: str, home: Path) -> Optional[Path]:
    """The file `install KIND` writes for `home`; None for cron, which lives in the crontab."""
    if kind == "systemd":
        return systemd_user_dir() / systemd_unit_name(home)
    if kind == "launchd":
        return user_home() / "Library" / "LaunchAgents" / f"{launchd_label(home)}.plist"
    return None


def systemd_user_dir() -> Path:
    # The XDG spec: a relative XDG_CONFIG_HOME is invalid, and ignored.
    config_home = os.environ.get("XDG_CONFIG_HOME", "")
    return (Path(config_home) if os.path.isabs(config_home) else user_home() / ".config") / "systemd" / "user"


def unit_home(unit: str) -> str:
    """The pgw home (home_identity) a systemd unit runs, from its Environment=
    lines: each holds assignments, quoted or not, as systemd reads them."""
    environ = {}
    for line in unit.split("\n"):
        if line.startswith("Environment="):
            try:
                words = shlex.split(line[len("Environment="):].replace("%%", "%"))
            except ValueError:
                continue
            environ.update(word.split("=", 1) for word in words if "=" in word)
    return home_in_environment(environ)


# The one platform on which each service manager exists.
INSTALL_PLATFORMS = {"systemd": ("linux", "Linux"), "launchd": ("darwin", "macOS")}


def wrong_platform(kind: str) -> Optional[str]:
    """Why KIND cannot be installed on this host, or None if it can."""
    if kind not in INSTALL_PLATFORMS or sys.platform == INSTALL_PLATFORMS[kind][0]:
        return None
    others = [k for k, (platform_id, _) in INSTALL_PLATFORMS.items() if platform_id == sys.platform] + ["cron"]
    instead = " or ".join(f"`pgw install {other} --apply`" for other in others)
    return f"{kind} exists only on {INSTALL_PLATFORMS[kind][1]} and this host is {sys.platform}: use {instead}"


def tool_failure(argv: list[str], done: subprocess.CompletedProcess[str]) -> str:
    """A failed crontab, systemctl or launchctl in words, on one line (a tool may
    say it in several), with the fix when it is a known one."""
    detail = " ".join(done.stderr.split()) or f"exit status {done.returncode}"
    failure = f"`{' '.join(argv)}` failed: {detail}"
    if argv[:2] == ["systemctl", "--user"] and ("connect to bus" in detail or "D-Bus connection" in detail):
        # No user manager for this login: `su` and `sudo -u` do not start one.
        import getpass

        user = getpass.getuser()
        failure += (
            f": this login has no systemd user session: log in as {user} directly (ssh or the console, not `su`),"
            f" or run `loginctl enable-linger {user}`, then try again"
        )
    return failure


# How long crontab, systemctl or launchctl may take.
TOOL_TIMEOUT_S = 30.0


def _run_tool(argv: list[str], stdin: Optional[str] = None, timeout_s: float = TOOL_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    # Bytes, decoded here: text mode would turn a crontab's \r into \n, and a
    # byte that is not UTF-8 into an error.  In a session of its own, so that
    # a tool that hangs goes with whatever it started (a crontab wrapper's
    # child outlived it).
    try:
        process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
        )
    except FileNotFoundError:
        raise PgwError(f"`{argv[0]}` is not installed on this host") from None
    try:
        out, err = process.communicate(None if stdin is None else stdin.encode("utf-8", "surrogateescape"), timeout=timeout_s)
    except BaseException as exc:  # its time is up, or Ctrl-C, which its own session no longer gets
        kill_process_group(process.pid, signal.SIGKILL)
        for pipe in (process.stdin, process.stdout, process.stderr):
            if pipe is not None:  # not read to their end: what left the group may hold them for ever
                pipe.close()
        process.wait()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise PgwError(f"`{' '.join(argv)}` gave no answer within {timeout_s:g} s") from None
        raise
    return subprocess.CompletedProcess(argv, process.returncode, out.decode("utf-8", "surrogateescape"), err.decode("utf-8", "replace"))


def read_crontab() -> str:
    done = _run_tool(["crontab", "-l"])
    if done.returncode != 0:
        if "no crontab" in done.stderr.lower():
            return ""
        raise PgwError(tool_failure(["crontab", "-l"], done))
    return done.stdout


def write_crontab(text: str) -> None:
    done = _run_tool(["crontab", "-"], stdin=text)
    if done.returncode != 0:
        raise PgwError(tool_failure(["crontab", "-"], done))


def in_use_lock(root: Path, extraction: Path) -> Path:
    """The file every pgw command run from `extraction` holds a shared flock on
    while it runs, from before it is unpacked (the pyz's start code, `hold`, in
    build.sh): a `logs -f`, `doctor` or `selftest` of one build may import from
    it while another build's `run` prunes."""
    return root / f".{extraction.name}_in_use"


def prune_old_extractions(root: Path, current: Optional[Path]) -> list[Path]:
    """Remove the other extractions of this pyz that no running pgw holds
    (never the running one); what was removed."""
    removed = []
    for old in old_extractions(root, current):
        lock = in_use_lock(root, old)
        fd = None
        if fcntl is not None:
            try:
                fd = os.open(lock, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except FileNotFoundError:
                fd = None
            except OSError:  # held: a pgw runs from it
                if fd is not None:
                    os.close(fd)
                continue
        try:
            remove_tree(str(old))
            (root / f".{old.name}_lock").unlink(missing_ok=True)
            lock.unlink(missing_ok=True)
        finally:
            if fd is not None:
                os.close(fd)
        if not old.exists():
            removed.append(old)
    return removed


##############################################################################
# Command line
##############################################################################


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and a UsageError (exit 2)."""

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(f"{message}; see `{self.prog} --help`")

    def print_help(self, file: Optional[typing.TextIO] = None) -> None:
        # argparse's own ignores a failed write: help sent to a full disk ended
        # with status 0 and nothing said.
        (file or sys.stdout).write(self.format_help())


def _machine_name() -> str:
    return platform.node()


def _load(args: argparse.Namespace) -> tuple[Path, dict[str, Any], Settings]:
    """The config path, its contents and the resolved settings for a command."""
    path = pgw_home() / CONFIG_FILENAME
    config = read_config(path)
    flags = {key: getattr(args, key, None) for key in ("server", "token", "name", "cafile", "max_stages")}
    return path, config, resolve_settings(flags, os.environ, config, _machine_name())


def _print_json(value: Any) -> None:
    # JSON's own escapes where stdout's encoding cannot hold every character:
    # the backslashreplace of other output would make it no JSON.
    utf8 = codecs.lookup(getattr(sys.stdout, "encoding", None) or "ascii").name == "utf-8"
    print(json.dumps(value, ensure_ascii=not utf8, indent=2))


# What a pairing needs free where it is saved: its config (a few hundred
# bytes), and the temporary file it is written through, with room to spare.
PAIRING_ROOM_BYTES = 16 * 1024


def probe_room(directory: Path, size: int) -> None:
    """OSError unless a file of `size` bytes can be written in `directory`
    now: the permissions, a read-only mount, a full disk or a quota."""
    fd, name = tempfile.mkstemp(prefix=".pgw-room-", dir=directory)
    try:
        unwritten = memoryview(bytes(size))
        while unwritten:  # a disk nearly full takes part of a write, then refuses the rest
            unwritten = unwritten[os.write(fd, unwritten) :]
    finally:
        os.close(fd)
        os.unlink(name)


def _cmd_pair(args: argparse.Namespace) -> int:
    path, config, settings = _load(args)
    # Before the code goes to the server, which spends it: a pairing that
    # cannot be saved would cost the user a new code for nothing.
    home = path.parent
    refuse_unfit_home(home)
    existing = home  # what is there already must take the home, or the config in it
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not os.path.isdir(existing):
        raise ConfigError(f"cannot write to {existing}, where pgw would keep {path}: it is no directory; set {ENV_HOME}")
    try:
        probe_room(existing, PAIRING_ROOM_BYTES)
    except OSError as exc:  # permissions, a read-only mount, a full disk or quota: the code would be spent for nothing
        raise ConfigError(
            f"cannot write to {existing}, where pgw would keep {path}: {exc.strerror or exc}; the pairing code was not"
            f" sent: fix that, or set {ENV_HOME}"
        ) from None
    if settings.cafile and (args.cafile or settings.server.startswith("https:")):
        # A bad one named with where it was set; and a --cafile, saved with the
        # pairing, would stop `run` from starting, even for an http:// server.
        make_ssl_context(settings.cafile, settings.given_by["cafile"])
    body = {
        "pair_code": args.code,
        "machine_name": settings.name,
        "capabilities": probe_capabilities(cli_search_path(settings.stage_env, os.environ)),
    }
    server_is_default = "server" not in settings.given_by
    pairing = trio.run(
        functools.partial(
            trio.to_thread.run_sync,
            functools.partial(
                request_pairing, settings.server, body, cafile=settings.cafile, server_is_default=server_is_default,
                proxy=choose_proxy(settings.server, settings.proxy, os.environ),
            ),
            abandon_on_cancel=True,
        )
    )
    # The name given here is the one the server shows: `run` says hello with it
    # too; and the CA file that let pair reach the server lets `run` reach it
    # (unsaved, `run` met an untrusted certificate at every try).
    named = {"name": args.name} if args.name else {}
    if args.cafile:
        named["cafile"] = str(Path(args.cafile).expanduser().resolve())
    write_config(path, {**config, "server": settings.server, **pairing, **named})
    print(f"paired worker {printable(pairing['worker_id'])} with {settings.server}; config saved to {path}")
    if os.environ.get(ENV_TOKEN):  # as `revoke` warns: it outranks config.json
        print(f"pgw: warning: {ENV_TOKEN} is set here; a pgw started with it uses that token, not the one just saved:"
              " unset it", file=sys.stderr)
    pid, state, connected = daemon_report(path.parent)
    if pid is None:
        return 0
    running = f"the running pgw (pid {pid if pid > 0 else '?'})"
    if state.get("pid") == pid and state.get("token_from_environment"):
        print(
            f"pgw: warning: {running} takes its token from {ENV_TOKEN} (or --token), which outranks"
            " config.json: stop it (`pgw stop`) and start it again without, to use the new one",
            file=sys.stderr,
        )
    elif connected:  # it reads the credentials again before each connection, not while one lasts
        print(
            f"pgw: warning: {running} stays connected with the previous credentials until its connection ends:"
            " run `pgw stop` and start it again to use the new ones now",
            file=sys.stderr,
        )
    elif connected is None:
        print(
            f"pgw: warning: {running} may be connected with the previous credentials (its state file cannot tell);"
            " it uses the new ones at its next connection attempt: `pgw stop` and start it again to be sure",
            file=sys.stderr,
        )
    else:
        print(f"{running} uses the new credentials at its next connection attempt")
    return 0


def _restart_without_token_in_ps(token: str, early: typing.Sequence[int] = ()) -> None:
    """`--token` would stay in /proc/PID/cmdline, which every local user can
    read, for the daemon's whole life: start again with the token in the
    environment instead (readable by this user only; stages never get PGW_*).
    The signals `early` noted, and any that comes now, stay pending across
    the exec, blocked, for the new process to take once it can."""
    arguments = sys.argv[1:]
    if token not in arguments and f"--token={token}" not in arguments:
        return  # not this process's command line (main called with its own argv)
    kept, skip = [], False
    for argument in arguments:
        if skip or argument == "--token":
            skip = not skip
            continue
        if not argument.startswith("--token="):
            kept.append(argument)
    interpreter = sys.orig_argv[: len(sys.orig_argv) - len(arguments)]
    os.environ[ENV_TOKEN] = token
    sys.stdout.flush()
    sys.stderr.flush()
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, DAEMON_SIGNALS)
        for signum in dict.fromkeys(early):
            os.kill(os.getpid(), signum)
    os.execv(sys.executable, [*interpreter, *kept])


def run_preflight(args: argparse.Namespace) -> Settings:
    """What `pgw run` checks before it starts; `doctor` runs the same, so that
    when doctor finds nothing wrong, run starts.  PgwError says what is wrong."""
    home = pgw_home()
    refuse_unfit_home(home)
    _, _, settings = _load(args)
    if not settings.token:
        raise NotPairedError("not paired yet: run `pgw pair CODE --server URL` (or pass --token)")
    if settings.cafile:
        make_ssl_context(settings.cafile, settings.given_by["cafile"])  # a bad CA file is the user's to fix, not a retry
    choose_proxy(settings.server, settings.proxy, os.environ)  # so is a proxy URL pgw cannot use
    try:
        make_private_dirs(home)
    except OSError as exc:
        raise ConfigError(f"cannot make the pgw home {home}: {exc.strerror}; set {ENV_HOME} to a directory you own") from None
    if not os.access(home, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write to the pgw home {home}; set {ENV_HOME} to a directory you own")
    return settings


def _cmd_run(args: argparse.Namespace) -> int:
    # From the first line on, a SIGTERM, SIGINT or SIGQUIT (a watchdog, a test
    # that read the log) stops the daemon as one once it runs would, instead of
    # killing it mid-start; a SIGHUP (a closing terminal) is ignored, as later.
    early: list[int] = []
    before = {signum: signal.getsignal(signum) for signum in DAEMON_SIGNALS}
    for signum in DAEMON_SIGNALS:
        signal.signal(signum, signal.SIG_IGN if signum == getattr(signal, "SIGHUP", None) else lambda signum, _: early.append(signum))
    if hasattr(signal, "pthread_sigmask"):  # blocked by the pyz's start code, or across a --token restart
        signal.pthread_sigmask(signal.SIG_UNBLOCK, DAEMON_SIGNALS)
    try:
        if args.token:
            _restart_without_token_in_ps(args.token, early)
        home = pgw_home()
        try:
            return _start_daemon(args, home, early)
        except PgwError as exc:
            leave_reason(home, str(exc))
            raise
    finally:  # main may be called again in this process (the tests do)
        for signum, handler in before.items():
            if handler is not None:  # None: set outside Python, and not ours to change back
                signal.signal(signum, handler)


def leave_reason(home: Path, reason: str) -> None:
    """Why `run` refused to start, in run.log and the state file where they can
    be written: under cron nobody sees stderr, and `status` and `logs` read these."""
    try:
        refuse_unfit_home(home)  # nothing goes into a home refused as shared, or as the user's own
    except (ConfigError, OSError):
        return
    if not os.path.lexists(home):  # a first `run` before `pair`: `status` must have the reason all the same
        try:
            os.mkdir(home, 0o700)  # itself only: a mistyped PGW_HOME makes no chain of directories
        except OSError:
            return
    try:
        if not writable_by_us_alone(home) or instance_lock_holder(home) is not None:
            return  # another user's `run.log` could name any file of ours; a running daemon's files are its own
    except ConfigError:
        return
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    try:
        # O_NONBLOCK: a FIFO there would wait for a reader; a regular file is written as ever.
        fd = os.open(home / RUN_LOG_FILENAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace") as log_file:
            log_file.write(f"{stamp} ERROR pgw {__version__} did not start: {reason}\n")
    except OSError:
        pass  # run.log may be why it was refused: the state file still tells `status`
    try:
        write_json_atomically(home / STATE_FILENAME, {"pid": None, "last_error": reason, "updated_at": iso_time(time.time())})
    except OSError:
        pass  # stderr has it; nothing else can be written


def _start_daemon(args: argparse.Namespace, home: Path, early: list[int]) -> int:
    settings = run_preflight(args)
    # Everything the daemon makes (home, lock, log, state, scratch) is private
    # whatever the umask; its stages get the caller's umask back.
    callers_umask = os.umask(0o077)
    home_was_open = stat.S_IMODE(home.stat().st_mode) & 0o077
    try:
        lock_fd, holder = acquire_instance_lock(home)
    except OSError as exc:
        raise ConfigError(f"cannot lock {home}: {exc.strerror}") from None
    if lock_fd is None:
        print(f"pgw already running (pid {holder or '?'})")
        given = [f"--{key.replace('_', '-')}" for key in ("server", "token", "name", "max_stages", "cafile", "verbose")
                 if getattr(args, key, None) not in (None, False)]
        if given:  # exit 0 all the same: the watchdog's cron line runs this every 5 minutes
            print(f"pgw: {', '.join(given)} not taken: the running pgw keeps its own settings;"
                  " `pgw stop`, then start it with them", file=sys.stderr)
        return 0
    try:  # let go as soon as it is refused: leave_reason writes into no home a pgw runs in
        if home_was_open:
            os.chmod(home, 0o700)
        log_path = setup_logging(home, settings.token, args.verbose)
        if home_was_open:
            log.info("made %s private (mode 700): other users could read the log and the scratch files", home)
        log.info(
            "pgw %s started: server=%s name=%s max_stages=%s log=%s",
            __version__, settings.server, shown(settings.name), settings.max_stages or "unlimited", log_path,
        )
        for old in prune_old_extractions(shiv_root(), current_extraction()):
            log.info("removed an older extraction of pgw no pgw runs from: %s", old)
        daemon = Daemon(settings, home, reread=lambda: _load(args)[2], stage_umask=callers_umask, subreaper=True)
        trio.run(run_until_signalled, daemon, early)
    finally:
        os.close(lock_fd)
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    wanted = {"show": (False, False), "set": (True, True), "unset": (True, False)}[args.action]
    if (bool(args.key), args.value is not None) != wanted:
        needs = {"show": "takes no KEY or VALUE", "set": "needs a KEY and a VALUE", "unset": "needs a KEY and no VALUE"}
        raise UsageError(f"config {args.action} {needs[args.action]}; see `pgw config --help`")
    path = pgw_home() / CONFIG_FILENAME
    # A setting broken by hand is what `set` and `unset` are there to fix:
    # checked once changed, not before.
    config = read_config(path, checked=args.action == "show")
    if args.action == "show":
        shown = {
            key: "<hidden>" if key == "token" else without_password(value) if key == "proxy" else value
            for key, value in config.items()
        }
        _print_json(shown)
        return 0
    if args.action == "set":
        config = set_host_setting(config, args.key, args.value)
    else:
        updated = unset_host_setting(config, args.key)
        if updated == config:  # nothing to do is what the user wanted: exit 0, as `revoke` does
            print(f"{args.key} is not set in {path}; nothing changed")
            return 0
        config = updated
    check_config(config, path)
    write_config(path, config)
    print(f"{args.action} {args.key} in {path}")
    return 0


def _cmd_selftest(args: argparse.Namespace) -> int:
    if not log.handlers:
        log.addHandler(logging.NullHandler())  # the steps report; the worker's log is not wanted here
        log.propagate = False
    failures = 0

    def say(step: str, passed: bool, detail: str) -> None:
        nonlocal failures
        failures += not passed
        print(f"{'PASS' if passed else 'FAIL'}  {step:<12} {detail}", flush=True)

    started = time.monotonic()
    refused = []  # the directories tried where no program may run
    for parent in selftest_parents():
        try:
            work_dir = tempfile.mkdtemp(prefix="pgw-selftest-", dir=parent)
        except OSError:  # a directory this user cannot write in: the next, if any
            continue
        try:
            if not programs_can_run_in(Path(work_dir)):
                refused.append(os.path.dirname(work_dir))
                continue
            if refused:
                print(f"selftest: programs may not run in {refused[-1]} (mounted noexec?): working in {parent}")
            passed, stopped_by = trio.run(selftest, Path(work_dir), say)
            break
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
    else:
        where = " or ".join(refused) or "a temporary directory"
        say("setup", False, f"the stub CLIs cannot run from {where} (mounted noexec?): set TMPDIR to a directory where programs may run")
        passed, stopped_by = False, None
    if stopped_by is not None:
        print(f"selftest: stopped by {signal.Signals(stopped_by).name}; nothing of it is left")
        return 128 + stopped_by
    verdict = "all steps passed" if passed else f"{failures or 'some'} step(s) failed"
    print(f"selftest: {verdict} in {time.monotonic() - started:.1f} s (pgw {__version__}, Python {platform.python_version()})")
    return 0 if passed else 1


def selftest_parents() -> list[Optional[str]]:
    """Where the selftest may work: the temporary directory (TMPDIR), else,
    where that lets no program run (a /tmp mounted noexec, as hardened hosts
    have it), the user's home directory, from which its stub CLIs can run."""
    parents: list[Optional[str]] = [None]
    try:
        parents.append(str(user_home()))
    except RuntimeError:
        pass
    return parents


def programs_can_run_in(directory: Path) -> bool:
    """Whether a program written in `directory` could run: a file system
    mounted noexec lets none, though its files are marked executable."""
    probe = directory / "probe"
    try:
        probe.write_bytes(b"#!/bin/sh\n")
        probe.chmod(0o700)
        return os.access(probe, os.X_OK)
    except OSError:  # a full disk, say: nothing of the selftest could be written there either
        return False
    finally:
        probe.unlink(missing_ok=True)


def _install_plan(args: argparse.Namespace) -> tuple[Launch, Path, dict[str, Any]]:
    home = Path(home_identity(pgw_home()))
    config = read_config(home / CONFIG_FILENAME)
    search_path = cli_search_path(config.get("env") or {}, os.environ)
    launch = launch_for_this_host(home, os.environ, search_path)
    named = [("the pgw home", str(home)), *(("the command", part) for part in launch.argv), *launch.environ.items()]
    for name, value in named:
        # A newline would end the crontab's or the unit's line and start one of
        # its own: whatever followed it would run at boot.
        if holds_control_character(value):
            raise PgwError(f"cannot install: {name} holds a control character (a newline, say): {shown(value)}")
        if args.kind == "cron" and "\\%" in value:
            # cron ends the command at a % its backslash does not escape, and a
            # backslash written before pgw's own escaping one escapes that instead.
            raise PgwError(f"cannot install cron: {name} holds a backslash before a %, which no crontab line can carry: {shown(value)}")
    return launch, home, config


def _cmd_install(args: argparse.Namespace) -> int:
    launch, home, config = _install_plan(args)
    target = install_target(args.kind, home)
    if args.kind == "cron":
        text = cron_block(launch)
    elif args.kind == "systemd":
        text = systemd_unit(launch)
    else:
        text = launchd_plist(launch, home)
    if not args.apply:
        where = "your crontab" if target is None else str(target)
        print(f"# `pgw install {args.kind} --apply` would put this in {where}:")
        print(text, end="")
        return 0
    refusal = wrong_platform(args.kind)
    if refusal:
        raise PgwError(refusal)
    # Refused at every start, with its output gone to /dev/null, no reason
    # would ever show: refused here instead.
    refuse_unfit_home(home)
    if not (config.get("token") or os.environ.get(ENV_TOKEN) or args.force):
        # An unpaired `pgw run` fails at every start: at boot and every 5 minutes.
        raise NotPairedError(
            "not paired yet: run `pgw pair CODE --server URL` first (or pass --force to install anyway)"
        )
    if not config.get("token") and not args.force:
        # The lines pgw writes hold no token (a secret in a crontab or a unit
        # is one more place to read it from): the service's pgw has one only
        # if its own environment sets PGW_TOKEN too.
        print(f"pgw: warning: this home is not paired, and the token in {ENV_TOKEN} here is not in what pgw installs:"
              f" the service's pgw gets one only if its environment sets {ENV_TOKEN} (or run `pgw pair`)", file=sys.stderr)
    if args.kind == "cron":
        write_crontab(replace_cron_block(read_crontab(), text, home)[0])
        print(f"installed pgw's @reboot and */5 watchdog lines in your crontab (home {home})")
        return 0
    if target is None:
        raise UsageError(f"unknown install kind {args.kind!r}: use one of {', '.join(INSTALL_KINDS)}")
    other = service_of_another_home(args.kind, target, home)
    if other is not None:
        raise PgwError(
            f"cannot install: {target} runs another pgw home, {other}: install that home's again first"
            f" (`{ENV_HOME}={shlex.quote(other)} pgw install {args.kind} --apply`), which gives it a name of its own"
        )
    existed = os.path.lexists(target)
    try:
        make_private_dirs(target.parent)
        write_private_text(target, text)
    except OSError as exc:
        why = "it is a symbolic link, which pgw does not write through" if exc.errno == errno.ELOOP else exc.strerror
        raise PgwError(f"cannot write {target}: {why}") from None
    print(f"wrote {target}")
    old = older_service_of_this_home(args.kind, home)  # only now: this home always has one of the two
    if old is not None:
        if not _unload_service(args.kind, old):
            raise PgwError(
                f"cannot remove {old}, which an older pgw installed for this home: its service still runs;"
                f" run `pgw install {args.kind} --apply` again once the service manager works"
            )
        print(f"removed {old}, which an older pgw installed for this home")
    tool = (
        [["systemctl", "--user", "daemon-reload"], ["systemctl", "--user", "enable", "--now", target.name]]
        if args.kind == "systemd"
        else [["launchctl", "load", "-w", str(target)]]
    )
    for argv in tool:
        try:
            done = _run_tool(argv)
            failure = tool_failure(argv, done) if done.returncode != 0 else None
        except PgwError as exc:  # not installed, or no answer
            failure = str(exc)
        if failure is not None:
            # Nothing was enabled: a unit left behind would only stand in `uninstall`'s way.
            if not existed and _removed(target):
                failure += f"; {target} is removed again"
            raise PgwError(failure)
    print(f"enabled and started ({' then '.join(' '.join(a) for a in tool)})")
    return 0


def _removed(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except OSError:
        return False


def service_home(kind: str, path: Path) -> Optional[str]:
    """The absolute pgw home the unit or agent at `path` runs; None if there is
    none there, or it cannot be read (a file of pgw's is always readable)."""
    try:
        with open_regular_file(path, follow=True) as file:
            data = file.read(1 << 20)
    except OSError:
        return None
    if kind == "systemd":
        return unit_home(data.decode("utf-8", "replace"))
    import plistlib

    try:
        agent = plistlib.loads(data)
        return home_in_environment(agent.get("EnvironmentVariables") or {})
    except Exception:  # noqa: BLE001 - plistlib raises whatever its parsers do on a bad file
        return None


def service_of_another_home(kind: str, target: Path, home: Path) -> Optional[str]:
    """The home that the unit or agent at `target` runs if not `home`: the
    default home's name, taken by an older pgw for another home."""
    installed = service_home(kind, target)
    return installed if installed is not None and installed != home_identity(home) else None


def older_service_of_this_home(kind: str, home: Path) -> Optional[Path]:
    """The unit or agent an older pgw installed for `home` under the default
    home's name, if `home` is another and that is still there."""
    if is_default_home(home):
        return None
    try:
        older = install_target(kind, user_home() / DEFAULT_HOME_DIRNAME)
    except RuntimeError:  # no home directory: nothing was installed in it
        return None
    return older if older is not None and service_home(kind, older) == home_identity(home) else None


def _unload_service(kind: str, target: Path) -> bool:
    """Stop and disable the unit or agent at `target`, then remove it; False,
    said on stderr, and the file kept for a later try, if the service manager
    failed (the service may still run)."""
    if target.is_dir() and not target.is_symlink():
        raise PgwError(f"cannot remove {target}: it is a directory, not a unit or agent pgw wrote")
    tool = (
        ["systemctl", "--user", "disable", "--now", target.name] if kind == "systemd"
        else ["launchctl", "unload", "-w", str(target)]
    )
    done = _run_tool(tool)
    if done.returncode != 0:
        print(
            f"pgw: warning: {tool_failure(tool, done)}: the service may still run;"
            f" {target} is kept, for `pgw uninstall {kind}` to try again",
            file=sys.stderr,
        )
        return False
    try:
        target.unlink()
    except OSError as exc:
        raise PgwError(f"cannot remove {target}: {exc.strerror}") from None
    if kind == "systemd":  # else systemd keeps the removed unit loaded until its next reload
        reload = ["systemctl", "--user", "daemon-reload"]
        done = _run_tool(reload)
        if done.returncode != 0:
            print(f"pgw: warning: {tool_failure(reload, done)}", file=sys.stderr)
    return True


def _cmd_uninstall(args: argparse.Namespace) -> int:
    home = Path(home_identity(pgw_home()))
    if args.kind == "cron":
        if shutil.which("crontab") is None:  # no cron here: nothing of pgw's in one either
            print("nothing to remove: this host has no crontab")
            return 0
        crontab, found = replace_cron_block(read_crontab(), "", home)
        if not found:
            print(f"nothing to remove: no pgw lines for the home {home} in your crontab")
            return 0
        write_crontab(crontab)
        print(f"removed pgw's lines for the home {home} from your crontab")
        return _cmd_stop(args)  # for good, as `systemctl disable --now` stops the service
    target = install_target(args.kind, home)
    if target is None:
        raise UsageError(f"unknown install kind {args.kind!r}: use one of {', '.join(INSTALL_KINDS)}")
    if wrong_platform(args.kind):  # a file left by an install on the wrong OS: no service to stop
        if not target.exists():
            print(f"nothing to remove: no {target}")
            return 0
        target.unlink()
        print(f"removed {target} ({args.kind} does not run on this host: nothing to stop)")
        return 0
    other = service_of_another_home(args.kind, target, home)
    if other is not None:
        print(f"nothing to remove: {target} runs another pgw home, {other}")
        return 0
    targets = [path for path in (target, older_service_of_this_home(args.kind, home)) if path is not None and os.path.lexists(path)]
    if not targets:
        print(f"nothing to remove: no {target}")
        return 0
    removed_all = True
    for path in targets:
        if _unload_service(args.kind, path):
            print(f"removed {path}")
        else:
            removed_all = False
    return 0 if removed_all else 1


def _cmd_status(args: argparse.Namespace) -> int:
    """Exit 0: running and connected; 3: running, not connected; 1: not
    running; 4: this user cannot tell (a home it cannot read)."""
    home = pgw_home()
    try:
        pid, state, connected = daemon_report(home)
    except ConfigError as exc:  # "not running" would be a guess, and a script would start a second pgw
        return _status_unknown(args, home, str(exc))
    if pid is not None and state.get("pid") != pid:  # an earlier run's: nothing of it is about this one
        state = {}
    problem = None
    try:
        paired: Optional[bool] = bool(resolve_settings({}, os.environ, read_config(home / CONFIG_FILENAME), "").token)
    except ConfigError as exc:  # the config, or a setting from the environment
        paired, problem = None, str(exc)
    refused = None  # why `run` is refused here, which it cannot write into a home it refused
    if pid is None:
        try:
            refuse_unfit_home(home)
        except ConfigError as exc:
            refused = str(exc)
    # A daemon started with PGW_TOKEN (or --token) runs paired whatever config.json says.
    by_environment = pid is not None and not paired and bool(state.get("token_from_environment"))
    if by_environment:
        paired = True
    report = {
        "version": __version__,
        "running": pid is not None,
        "pid": pid if pid is None or pid > 0 else None,  # running, but which process is not known
        "started_at": state.get("started_at") if pid else None,
        "connected": connected,  # null: the state file cannot tell, nor anything below
        "connected_since": state.get("connected_since") if connected else None,
        "server": state.get("server"),
        "tries": state.get("tries", 0) if pid and connected is False else 0,
        "next_try_at": state.get("next_try_at") if pid and connected is False else None,
        "stages_running": (state.get("stages_running", 0) if pid else 0) if connected is not None else None,
        "stages_queued": (state.get("stages_queued", 0) if pid else 0) if connected is not None else None,
        "last_error": refused or (state.get("last_error") if connected is not None else None),
        "paired": paired,
        "stopped": pid is not None and pid > 0 and is_stopped(pid),
        "home": str(home),
        "log": str(home / RUN_LOG_FILENAME),
    }
    if args.json:
        _print_json(report)
        return 1 if pid is None else 0 if connected else 3
    if pid is None:
        print(f"running    no (pgw is not running for {home})")
    else:
        shown_pid = pid if pid > 0 else f"unknown: {home / LOCK_FILENAME} does not name the process holding the lock"
        print(f"running    yes, pid {shown_pid}, since {report['started_at'] or '?'}")
        if report["stopped"]:
            print(f"connected  no: pgw is stopped (SIGSTOP, Ctrl-Z or a debugger); `kill -CONT {pid}` lets it go on")
        elif connected:
            print(f"connected  yes, to {report['server']} since {report['connected_since']}")
        elif connected is None and pid < 0:
            print("connected  cannot tell: which process is pgw is not known")
        elif connected is None and state.get("pid") != pid:
            print(f"connected  cannot tell: no state file of this run in {home} yet (it is written within a second;"
                  " later, a full disk stops it)")
        elif connected is None:
            print(f"connected  cannot tell: {home} cannot be written, so its state file may be out of date")
        else:
            tries = f"; {report['tries']} failed tries, next at {report['next_try_at'] or 'once the current try ends'}"
            print(f"connected  no (server {report['server'] or '?'}{tries if report['tries'] else ''})")
        if connected is not None:
            print(f"stages     {report['stages_running']} running, {report['stages_queued']} queued")
    if connected is not None:
        print(f"last error {report['last_error'] or '-'}")
    if by_environment:
        print(f"paired     yes: the running pgw has its token from {ENV_TOKEN} (or --token), not from config.json")
    else:
        print(f"paired     {'yes' if paired else 'no: run `pgw pair CODE --server URL`' if paired is False else f'cannot tell: {problem}'}")
    print(f"log        {report['log']}")
    print(f"version    pgw {__version__}")
    return 1 if pid is None else 0 if connected else 3


def _status_unknown(args: argparse.Namespace, home: Path, reason: str) -> int:
    """`status` where this user cannot tell whether pgw runs: the report with
    every fact it depends on null, and exit 4."""
    if args.json:
        facts = ("running", "pid", "started_at", "connected", "connected_since", "server", "tries", "next_try_at",
                 "stages_running", "stages_queued", "last_error", "paired", "stopped")
        _print_json({"version": __version__, **dict.fromkeys(facts), "error": reason, "home": str(home),
                     "log": str(home / RUN_LOG_FILENAME)})
    else:
        print(f"running    {reason}")
        print(f"log        {home / RUN_LOG_FILENAME}")
        print(f"version    pgw {__version__}")
    return 4


def connection_words(connected: Optional[bool]) -> str:
    return "connected" if connected else "not connected" if connected is False else "connected or not (its state file cannot tell)"


def daemon_report(home: Path) -> tuple[Optional[int], dict[str, Any], Optional[bool]]:
    """(pid of the running daemon or None, its state file, whether it is
    connected, None when the state file cannot tell: missing, another run's,
    or in a home the daemon can no longer rewrite it in): the one place that
    judges "connected", for `status`, `doctor` and `pair`."""
    pid = instance_lock_holder(home)
    state = read_state(home) or {}
    if not pid:
        return pid, state, False
    if pid < 0 or _holds_open(pid, home) is False:  # run.lock replaced by hand, or by a stage: not the holder's
        claimed = state.get("pid")
        pid = claimed if type(claimed) is int and claimed > 0 and _holds_open(claimed, home) else -1
    if pid > 0 and is_stopped(pid):  # it answers no ping: the server has let go of it, whatever the file says
        return pid, state, False
    if state.get("pid") != pid or not os.access(home, os.W_OK):
        return pid, state, None
    return pid, state, bool(state.get("connected"))


def is_stopped(pid: int) -> bool:
    """Whether the process is stopped (SIGSTOP, Ctrl-Z, a debugger); False where /proc cannot tell."""
    return process_state(pid) in ("T", "t")


def _count(text: str) -> int:
    """argparse type for a whole number >= 0."""
    count = whole_number(text)
    if count is None:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return count


def _cmd_capabilities(args: argparse.Namespace) -> int:
    """As `run` finds the CLIs: on the config's env.PATH, else PATH."""
    try:
        stage_env = _load(args)[2].stage_env
    except ConfigError:  # a broken config is for `run` and `doctor` to name
        stage_env = {}
    _print_json(probe_capabilities(cli_search_path(stage_env, os.environ)))
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    home = pgw_home()
    path = home / CONFIG_FILENAME
    config_problem = None
    try:
        config = read_config(path)
        settings: Optional[Settings] = resolve_settings(
            {"cafile": getattr(args, "cafile", None)}, os.environ, config, _machine_name()
        )
    except ConfigError as exc:
        config, settings, config_problem = {}, None, str(exc)
    search_path = cli_search_path(settings.stage_env if settings else {}, os.environ)
    capabilities = probe_capabilities(search_path)
    versions = probe_cli_versions(capabilities)
    for binary, key in CLI_CAPABILITY_KEYS.items():
        version, problem = versions.get(binary, (None, None))
        capabilities[key]["version"] = version
        if problem:
            capabilities[key]["problem"] = problem
    checks = local_checks(home, path, settings, config_problem, capabilities, versions, search_path)
    try:
        run_preflight(args)
        checks.append(Check("run", "PASS", "`pgw run` would start: paired, CA file and home usable"))
    except PgwError as exc:
        checks.append(Check("run", "FAIL", f"`pgw run` would refuse to start: {exc}"))
    try:
        holder, _, connected = daemon_report(home)
    except PgwError:  # said by the daemon check
        holder, connected = None, None
    if settings is None:
        checks += [Check(name, "SKIP", "the settings cannot be used (see the config check)") for name in NETWORK_CHECKS]
    else:
        # A second WebSocket with the daemon's own token may look to the server
        # like the worker reconnecting, and cost the daemon its connection.
        beside = f"the running pgw (pid {holder}) is {connection_words(connected)}" if holder else None
        checks += trio.run(network_checks, settings, Timing(), beside)
    # Doctor's report is pasted into bug reports: a server's words (a redirect's
    # Location, a refusal's detail) may carry the token, as the log hides it.
    secrets = token_forms(settings.token if settings else None)
    checks = [attrs.evolve(check, detail=without_secrets(check.detail, secrets)) for check in checks]
    failed = any(check.status == "FAIL" for check in checks)
    if args.json:
        _print_json({
            "ok": not failed,
            "checks": [attrs.asdict(check) for check in checks],
            "config_path": str(path),
            "config_error": config_problem,
            "paired": bool(settings and settings.token),
            "server": settings.server if settings else None,
            "worker_id": settings.worker_id if settings else None,
            "capabilities": capabilities,
        })
    else:
        for check in checks:
            print(f"{check.status}  {check.name:<10} {check.detail}")
    return 1 if failed else 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    path = pgw_home() / CONFIG_FILENAME
    config = read_config(path)
    if os.environ.get(ENV_TOKEN):  # which outranks config.json: a `run` from here stays paired
        print(f"pgw: warning: {ENV_TOKEN} is set here; a pgw started with it still uses that token: unset it",
              file=sys.stderr)
    if not config.get("token"):
        print(f"not paired: no token in {path}; nothing removed")
        return 0
    server = re.sub(r"(//)[^/?#]*@", r"\1", str(config.get("server", "?")))  # a password an older pgw took
    who = f"worker {printable(str(config.get('worker_id', '?')))} on {printable(server)}"
    settings = {key: value for key, value in config.items() if key not in PAIRING_KEYS}
    if settings:
        write_config(path, settings)
        print(f"removed the token of {who} from {path} (host settings kept)")
    else:
        path.unlink()
        print(f"removed {path} ({who})")
    running = instance_lock_holder(path.parent)
    if running is not None:  # the daemon read its token at start and keeps using it
        pid = running if running > 0 else "?"
        print(f"pgw: warning: the running pgw (pid {pid}) still holds the old token: run `pgw stop`", file=sys.stderr)
    return 0


# `pgw logs`: the file setup_logging writes in the home, how many of its last
# lines a plain `pgw logs` shows (a screenful), and how often `-f` looks for more.
LOG_TAIL_LINES = 50
LOG_FOLLOW_POLL_S = 0.25


def _cmd_logs(args: argparse.Namespace) -> int:
    path = pgw_home() / RUN_LOG_FILENAME
    try:
        log_file = _open_log(path, args.follow)
    except KeyboardInterrupt:
        return 130  # Ctrl-C is how `logs -f` ends: no message, as with tail -f
    decoder = codecs.getincrementaldecoder("utf-8")("replace")  # -f may read half a character

    def show(chunk: bytes) -> None:
        sys.stdout.write(decoder.decode(chunk))
        sys.stdout.flush()

    try:
        with log_file:
            show(b"".join(collections.deque(log_file, maxlen=min(args.lines, sys.maxsize))))
            if args.follow:
                follow_log(path, log_file, show)
    except KeyboardInterrupt:
        return 130  # Ctrl-C is how `logs -f` ends: no message, as with tail -f
    except BrokenPipeError:
        # The reader went away (`pgw logs | head`): stop quietly, and let the
        # interpreter's last flush of stdout go nowhere instead of complaining.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # no real stdout (captured)
            pass
    return 0


def _open_log(path: Path, follow: bool) -> typing.BinaryIO:
    """The log, opened to read; with `follow`, once it exists (`logs -f` just
    after `install`, before `run` wrote a line), as tail -F waits."""
    said = False
    while True:
        try:
            return open_regular_file(path, follow=True)  # a FIFO there would hang `logs`
        except FileNotFoundError:
            if not follow:
                raise PgwError(f"no log yet at {path}: pgw run writes it") from None
            if not said:  # as tail -F says it; otherwise a wait looks like a hang
                print(f"pgw: no log yet at {path}: waiting for pgw run to write it", file=sys.stderr, flush=True)
                said = True
            time.sleep(LOG_FOLLOW_POLL_S)
        except OSError as exc:
            raise PgwError(f"cannot read {path}: {exc.strerror}") from None


def follow_log(path: Path, log_file: typing.BinaryIO, show: typing.Callable[[bytes], None]) -> None:
    """Show what is appended to the log until Ctrl-C, going on into the new file
    when the daemon rotates it (run.log renamed to run.log.1, a new run.log made)."""
    try:
        while True:
            chunk = log_file.read()
            if chunk:
                show(chunk)
                continue
            try:
                at_path = os.stat(path)
            except FileNotFoundError:
                at_path = None  # between the rename and the new file
            reading = os.fstat(log_file.fileno())
            if at_path is not None and (at_path.st_ino, at_path.st_dev) != (reading.st_ino, reading.st_dev):
                show(log_file.read())  # a last line may have landed just before the rename
                try:
                    new_file = open_regular_file(path, follow=True)
                except OSError:  # not there yet, or something else took its place: keep reading what was
                    continue
                log_file.close()
                log_file = new_file
                continue
            if at_path is not None and at_path.st_size < log_file.tell():
                log_file.seek(0)  # truncated in place
            time.sleep(LOG_FOLLOW_POLL_S)
    finally:
        log_file.close()


# `pgw stop` waits this long for the daemon's lock to be released: its clean
# shutdown takes up to 5 s (stage grace) + 5 s (a SIGKILLed stage going away)
# + 3 s (closing the WebSocket); a little more is spare.
STOP_WAIT_S = 15.0
STOP_POLL_S = 0.1
# A pgw that has just taken the lock writes its pid into the file right after:
# give it this long before calling the lock file inconsistent.
LOCK_PID_SETTLE_S = 1.0


def _cmd_stop(args: argparse.Namespace) -> int:
    home = pgw_home()
    lock_path = home / LOCK_FILENAME
    pid = lock_holder_to_signal(home)
    if pid is None:
        print(f"pgw is not running (home {home})")
        return 0
    if pid < 0:
        raise PgwError(
            f"cannot tell which process holds the lock on {home} (the pid in {lock_path} is missing or not the"
            f" holder's): nothing signalled; find it with `fuser -v {home}`"
        )
    try:
        os.kill(pid, signal.SIGTERM)
        # A stopped pgw (Ctrl-Z, SIGSTOP) takes its SIGTERM only once it goes
        # on: `stop` waited out its 15 s and advised SIGKILL, which skips the
        # stages' exits.  To a running one SIGCONT is nothing.
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass  # it ended between the look and the signal: the wait below sees the lock free
    except PermissionError:
        raise PgwError(
            f"not allowed to signal pgw (pid {pid}): it runs as another user; stop it as that user"
        ) from None
    deadline = time.monotonic() + STOP_WAIT_S
    while instance_lock_holder(home) == pid:
        if time.monotonic() > deadline:
            raise PgwError(
                f"pgw (pid {pid}) did not stop within {STOP_WAIT_S:g} s: see `pgw logs`;"
                f" `kill -KILL {pid}` ends it at once"
            )
        time.sleep(STOP_POLL_S)
    print(f"stopped pgw (pid {pid})")
    return 0


def lock_holder_to_signal(home: Path) -> Optional[int]:
    """The pid that holds HOME's lock, None if none does, -1 if the pid in the
    file cannot be shown to be the holder's (then nothing may be signalled).

    The file names the last pgw that took the lock; one that took it a moment
    ago has not written its own pid yet, and the old pid may be anyone's now.
    So the pid must read the same twice with the lock held in between, and,
    where /proc shows it, have the home directory (the lock) open.
    """
    deadline = time.monotonic() + LOCK_PID_SETTLE_S
    while True:
        pid = instance_lock_holder(home)
        if pid is None:
            return None
        if pid > 0 and _holds_open(pid, home) is not False:
            time.sleep(STOP_POLL_S)
            if instance_lock_holder(home) == pid:
                return pid
        if time.monotonic() > deadline:
            return -1
        time.sleep(STOP_POLL_S)


def _holds_open(pid: int, path: Path) -> Optional[bool]:
    """Whether process PID has PATH open; None where /proc cannot tell (not
    Linux, another user's process)."""
    fd_dir = Path("/proc") / str(pid) / "fd"
    try:
        wanted = os.stat(path)
        fds = list(fd_dir.iterdir())
    except FileNotFoundError:
        return False if Path("/proc/self/fd").is_dir() else None  # no such process
    except OSError:
        return None
    for fd in fds:
        try:
            opened = os.stat(fd)
        except OSError:
            continue
        if (opened.st_ino, opened.st_dev) == (wanted.st_ino, wanted.st_dev):
            return True
    return False


def _cmd_version() -> str:
    from importlib import metadata

    parts = []
    for dist in ("trio", "trio-websocket", "attrs", "cattrs"):
        try:
            parts.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{dist} (version unknown)")
    return (
        f"pgw {__version__} (protocol {PROTOCOL_VERSION})\n"
        f"{', '.join(parts)}\n"
        f"Python {platform.python_version()} ({sys.executable})"
    )


class _VersionAction(argparse.Action):
    """`--version`, worked out only when asked (reading metadata costs time)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> typing.NoReturn:
        print(_cmd_version())
        parser.exit()


HELP_EPILOG = f"""\
start here: `pgw selftest`, then `pgw pair CODE --server URL`, then `pgw install cron --apply`
(`pgw COMMAND --help` tells more; with no COMMAND pgw prints this and exits 2, as nothing was done)

environment:
  {ENV_HOME}     the pgw home: config.json, run.log (default ~/{DEFAULT_HOME_DIRNAME}; --home sets it)
  {ENV_SERVER}   server URL, over the config, under --server
  {ENV_TOKEN}    worker token, over the config, under --token
  {ENV_NAME}     machine name, over the config, under --name
  {ENV_CAFILE}   PEM bundle of CAs for an https server, over the config, under --cafile
  SHIV_ROOT    where pgw.pyz unpacks itself (default ~/.shiv)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pgw",
        description="The prove-graph worker: runs the backend's CLI stages on this machine.",
        epilog=HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_VersionAction, help="print the versions of pgw, its libraries and Python")
    parser.add_argument(
        "--home", metavar="DIR",
        help=f"the pgw home to use, as ${ENV_HOME} does (default: ${ENV_HOME}, ~/{DEFAULT_HOME_DIRNAME})",
    )
    commands = _Commands(parser.add_subparsers(dest="command", metavar="COMMAND"))
    _add_setup_commands(commands)
    _add_daemon_commands(commands)
    _add_check_commands(commands)
    parser.commands = commands.parsers  # type: ignore[attr-defined]  # for misplaced_arguments
    return parser


class _Commands:
    """add_parser, with the one-line help shown as the command's own description too."""

    def __init__(self, subparsers: Any) -> None:
        self._subparsers = subparsers
        self.parsers: dict[str, argparse.ArgumentParser] = {}

    def add_parser(self, name: str, help: str, **kwargs: Any) -> argparse.ArgumentParser:
        kwargs.setdefault("description", help[0].upper() + help[1:] + ".")
        self.parsers[name] = self._subparsers.add_parser(name, help=help, **kwargs)
        return self.parsers[name]


def _add_setup_commands(commands: _Commands) -> None:
    pair = commands.add_parser("pair", help="pair this machine with the server")
    pair.add_argument("code", help="the pairing code shown by the server")
    pair.add_argument("--server", help=f"server URL (default: ${ENV_SERVER}, the config, {DEFAULT_SERVER})")
    pair.add_argument("--name", help=f"machine name (default: ${ENV_NAME}, the config, the host name)")
    pair.add_argument("--cafile", help=f"PEM bundle of CAs for an https server (default: ${ENV_CAFILE}, the config)")
    pair.set_defaults(func=_cmd_pair)

    config = commands.add_parser(
        "config",
        help="show or change per-host settings in config.json",
        description="Show or change per-host settings in config.json. "
        f"Per-host settings: {', '.join(HOST_SETTINGS)}. `env.NAME` adds NAME to every "
        "stage's environment (under the request's own env); env.PATH is also where the CLIs are looked up.",
    )
    config.add_argument("action", choices=("show", "set", "unset"))
    config.add_argument("key", nargs="?", default="", help=f"one of {', '.join(HOST_SETTINGS)}")
    config.add_argument("value", nargs="?", help="the new value (set only)")
    config.set_defaults(func=_cmd_config)

    install = commands.add_parser(
        "install", help="print (or with --apply, install) what starts `pgw run` at boot: cron, systemd or launchd"
    )
    install.add_argument("kind", choices=INSTALL_KINDS)
    install.add_argument("--apply", action="store_true", help="install it (idempotent) instead of printing it")
    install.add_argument("--force", action="store_true", help="install even though this host is not paired yet")
    install.set_defaults(func=_cmd_install)
    uninstall = commands.add_parser("uninstall", help="remove what `pgw install KIND --apply` installed")
    uninstall.add_argument("kind", choices=INSTALL_KINDS)
    uninstall.set_defaults(func=_cmd_uninstall)

    revoke = commands.add_parser("revoke", help="delete the stored token")
    revoke.set_defaults(func=_cmd_revoke)


def _add_daemon_commands(commands: _Commands) -> None:
    # No abbreviations: `--tok T` would keep the token in the process list.
    run = commands.add_parser("run", help="connect to the server and run its stages until stopped", allow_abbrev=False)
    run.add_argument("--server", help=f"server URL (default: ${ENV_SERVER}, the config, {DEFAULT_SERVER})")
    run.add_argument("--token", help=f"worker token (default: ${ENV_TOKEN}, the config)")
    run.add_argument("--name", help=f"machine name (default: ${ENV_NAME}, the config, the host name)")
    run.add_argument(
        "--max-stages", type=_count, metavar="N",
        help="run at most N stages at once; later ones wait in arrival order (default: the config, 0: no limit)",
    )
    run.add_argument("--cafile", help=f"PEM bundle of CAs for an https server (default: ${ENV_CAFILE}, the config)")
    run.add_argument("-v", "--verbose", action="store_true", help="log frame-level detail, and to stderr too")
    run.set_defaults(func=_cmd_run)

    status = commands.add_parser(
        "status", help="is `pgw run` running and connected? (exit 0 yes, 3 not connected, 1 not running, 4 cannot tell)"
    )
    status.add_argument("--json", action="store_true", help="print JSON instead of lines")
    status.set_defaults(func=_cmd_status)

    logs = commands.add_parser("logs", help=f"print the end of the daemon's log, {RUN_LOG_FILENAME} in the pgw home")
    logs.add_argument(
        "-n", "--lines", type=_count, default=LOG_TAIL_LINES, metavar="N",
        help=f"print the last N lines (default: {LOG_TAIL_LINES})",
    )
    logs.add_argument("-f", "--follow", action="store_true", help="then print new lines as they come, until Ctrl-C")
    logs.set_defaults(func=_cmd_logs)

    stop = commands.add_parser(
        "stop",
        help=f"stop the `pgw run` of this home and wait up to {STOP_WAIT_S:g} s for its clean shutdown",
        epilog="Exit 0 when stopped or not running, 1 if it did not stop in time. What `pgw install` set up "
        "starts it again (systemd at once, cron within 5 minutes): `pgw uninstall KIND` stops it for good.",
    )
    stop.set_defaults(func=_cmd_stop)


def _add_check_commands(commands: _Commands) -> None:
    selftest_parser = commands.add_parser(
        "selftest", help="prove pgw works on this host: a loopback server, stub CLIs, no network (exit 0 if all pass)"
    )
    selftest_parser.set_defaults(func=_cmd_selftest)

    capabilities = commands.add_parser("capabilities", help="print what this machine offers, as JSON")
    capabilities.set_defaults(func=_cmd_capabilities)

    doctor = commands.add_parser(
        "doctor", help="check this host, the config, the CLIs and the server (exit 1 on any FAIL)"
    )
    doctor.add_argument("--json", action="store_true", help="print JSON instead of lines")
    doctor.add_argument("--cafile", help=f"PEM bundle of CAs for an https server (default: ${ENV_CAFILE}, the config)")
    doctor.set_defaults(func=_cmd_doctor)


def open_missing_stdio() -> None:
    """/dev/null for standard input, output and error where they are closed
    (`pgw run <&- >&- 2>&-` from a script).  Python leaves sys.stdout None
    then, and the next file pgw opens would take the number: its log would
    get whatever is written to "standard error"."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        if getattr(sys, name) is not None:
            continue
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: `fd`, the lower ones open by now
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            setattr(sys, name, open(fd, mode, closefd=False))
        else:  # a file opened since (the pyz's start code puts /dev/null there first)
            setattr(sys, name, open(os.devnull, mode))
    for stream in (sys.stdout, sys.stderr):
        # Under PYTHONIOENCODING=ascii, or a Latin-1 locale, a home or a name
        # the encoding lacks raised UnicodeEncodeError: a traceback, and after
        # `pair` had saved the pairing, an exit saying it failed.
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")


def _only_interrupts(exc: BaseException) -> bool:
    """Ctrl-C, alone or as each exception of the group a trio nursery raises
    when it reached several tasks at once."""
    inner = getattr(exc, "exceptions", None)  # a BaseExceptionGroup's
    return isinstance(exc, KeyboardInterrupt) or (inner is not None and all(_only_interrupts(each) for each in inner))


def main(argv: Optional[list[str]] = None) -> int:
    """Run one pgw command; the exit status: 0 done, 1 failed, 2 usage."""
    open_missing_stdio()
    try:
        parser = build_parser()
        try:
            args, extras = parser.parse_known_args(argv)
        except SystemExit:  # --help, --version, or a usage error argparse has printed
            sys.stdout.flush()
            raise
        if extras:  # argparse's own message sends to `pgw --help`, which lists no command's flags
            raise UsageError(misplaced_arguments(parser, args.command, extras))
        help_hint = f"see `pgw {args.command} --help`"
        for flag in ("server", "token", "name", "cafile"):
            if getattr(args, flag, None) == "":  # `--name "$NAME"` with NAME unset: not the default, unasked
                raise UsageError(f"--{flag} is empty (an unset shell variable?): give a value, or leave it out; {help_hint}")
        if getattr(args, "code", None) is not None:
            args.code = args.code.strip()  # a code pasted with the spaces around it
            if not args.code:
                raise UsageError(f"the pairing code is empty: give the one the server shows; {help_hint}")
        if args.command != "run" and hasattr(signal, "pthread_sigmask"):
            # The pyz's start code blocks them until pgw can take them (run's
            # handlers, in _cmd_run); any other command is signalled as usual.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, DAEMON_SIGNALS)
        if args.home == "":  # `--home "$DIR"` with DIR unset: not the default home, unasked
            parser.error("argument --home: expected a directory, not an empty string")
        if args.home:  # every command finds its home in the environment, as with PGW_HOME
            os.environ[ENV_HOME] = str(absolute_home(args.home, "--home "))
        if args.command is None:
            print(parser.format_help(), end="")
            return 2
        status = args.func(args)
        sys.stdout.flush()  # here, where a full disk under stdout is still one line, not a traceback at exit
        return status
    except PgwError as exc:
        # A usage error quotes what it could not place, which may be the value
        # of a --token put where it does not go (`pgw --token T run`).
        print(f"pgw: {without_secrets(str(exc), command_line_tokens(sys.argv[1:] if argv is None else argv))}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        return _unforeseen(exc)
    except BaseException as exc:
        if _only_interrupts(exc):
            print("pgw: interrupted", file=sys.stderr)
            return 130
        alone = _lone_exception(exc)  # selftest's output fails inside trio.run, in a group
        if isinstance(alone, OSError):
            return _unforeseen(alone)
        raise


def command_line_tokens(argv: list[str]) -> list[str]:
    """The forms (token_forms) of each value given to --token in `argv`."""
    values = [value for flag, value in zip(argv, argv[1:]) if flag == "--token"]
    values += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--token=")]
    return [form for value in values for form in token_forms(value)]


def misplaced_arguments(parser: argparse.ArgumentParser, command: Optional[str], extras: list[str]) -> str:
    """What is wrong with the arguments argparse could not place, and where a
    flag in the wrong place goes: `pgw -v run` is `pgw run -v`, and `pgw
    status --home DIR` is `pgw --home DIR status`."""
    first = extras[0].split("=", 1)[0]
    commands = getattr(parser, "commands", {})
    if command and first in commands[command]._option_string_actions:
        return f"{printable(first)} goes after the command: `pgw {command} {printable(first)} ...`"
    if command and first in parser._option_string_actions:
        return f"{printable(first)} goes before the command: `pgw {printable(first)} ... {command}`"
    where = f"pgw {command}" if command else "pgw"
    return f"unrecognized arguments: {' '.join(printable(extra) for extra in extras)}; see `{where} --help`"


def _unforeseen(exc: OSError) -> int:
    """What no command could foresee: its output on a full disk or a broken
    pipe, mostly.  Whatever is left for stdout goes nowhere."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    if not isinstance(exc, BrokenPipeError):  # the reader went away: nothing to tell it
        print(f"pgw: {f'{exc.filename}: ' if exc.filename else ''}{exc.strerror or exc}", file=sys.stderr)
    return 1


def _lone_exception(exc: BaseException) -> BaseException:
    """The one exception inside groups of one, as a trio nursery wraps it."""
    inner = getattr(exc, "exceptions", None)
    return _lone_exception(inner[0]) if inner is not None and len(inner) == 1 else exc


if __name__ == "__main__":
    sys.exit(main())
