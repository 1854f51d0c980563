"""Benchmark pgw against the reference worker, pgworker 0.1.2.

Run it with ``./build.sh bench [ARGS]`` (which builds pgw.pyz first); it is
not part of ``./build.sh test`` and pytest does not collect it (the name is
not ``test_*``, and importing it runs nothing).

    ./build.sh bench                  the full run: 3 rounds, about 9-10 minutes on 2 cores
    ./build.sh bench --quick          a sanity run in about 25 s (small sizes, 1 round)
    ./build.sh bench --only pgw       pgw alone, for quick iterations
    ./build.sh bench --pgw-source     run pgw.py with .venv's python instead of pgw.pyz
    ./build.sh bench --pgw-cmd CMD    run `CMD run` as pgw, e.g. a script that patches pgw and calls main
    ./build.sh bench --profile F.svg  py-spy (pip install py-spy into .venv) on pgw.py relaying the stream
    ./build.sh bench --json out.json  also save every figure of every round
    ./build.sh bench --link-mb-s 1    the uvicorn rows over a 1 MB/s link (default 4; 0: no link rows)
    ./build.sh bench --files-mib 8 --json-mib 16   smaller payloads for the uvicorn rows (default 16, 32)
    ./build.sh bench --no-uvicorn     only the websockets backend's rows (about 1.7 minutes less)

How it works
------------
Separate processes, so that no CPU is mixed up between them:

* the driver (this file, under .venv's python): starts everything, sends
  commands to the backends, samples the worker's /proc files, prints the table;
* two backends (``bench.py --serve``, each in its own process under the
  pgworker venv's python), WebSocket servers on 127.0.0.1 written for the
  benchmark.  They send the ``stage.request``s they are told to, answer
  ``ping`` with ``pong`` as the real server may, and check and time
  everything the workers send (seq order, byte counts and CRC-32 of each
  stage's output, arrival time of each message), reporting events to the
  driver as JSON lines.  All of that is one piece of code (``serve``); only
  the transport differs:

  - the ``websockets`` backend: the ``websockets`` library's own server, with
    no extension (no permessage-deflate unless ``--deflate``);
  - the ``uvicorn`` backend, what the real prove-graph backend runs (FastAPI
    is Starlette): a Starlette app with one ``WebSocketRoute`` at
    /api/local-worker/connect, served by
    ``uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0,
    log_level="warning"))`` and nothing else changed, on Starlette and
    uvicorn at the dev lock's versions (installed into the pgworker venv).
    uvicorn's default ``ws="auto"`` picks its websockets-based protocol when
    ``websockets`` is importable (here ``websockets_sansio_impl``, on
    pgworker's websockets), and ``ws_per_message_deflate=True`` is its
    default: it accepts permessage-deflate from any client that offers it,
    with ``server_max_window_bits=12``, ``client_max_window_bits=12`` and
    ``memLevel=5`` (uvicorn 0.54's source), so a compressing worker
    deflates in a 4 KiB window.  The backend checks both facts when it
    starts (the bench stops if either is not so) and the header of the
    table names the implementation.  Its endpoint reads raw ASGI messages
    (``websocket.receive()``) and hands their text to the same accounting,
    re-encoded as UTF-8 bytes, a copy the other backend does not make: its
    CPU is shown beside its rows.  Without uvloop and httptools (not in the
    lock) uvicorn runs on asyncio and h11;

* the link (``bench.py --link``, in its own process under .venv's python),
  used for the uvicorn rows "over the link": a TCP proxy in front of the
  uvicorn backend that lets ``--link-mb-s`` (4) MB per second through each
  way, a home uplink or a VPN rather than loopback.  One token bucket per
  direction, shared by all connections as a host's link is; reads of
  16 KiB and bursts of at most 64 KiB (16 ms at 4 MB/s), so a large
  message trickles through at the link's rate instead of in bursts.  It
  adds no delay of its own beyond the rate (no round-trip time is
  modelled).  It counts the bytes it forwards each way per worker (the
  token in the request line): TCP payload, that is the HTTP handshake and
  the WebSocket frames, not TCP/IP headers;
* the worker under test, with the stub CLI ``claude`` on PATH.  The stub
  reads its prompt (standard input) to the end before it writes, as a real
  CLI does (pgworker fails a stage whose CLI exits before its prompt is
  written: "ConnectionResetError").

Why the websockets backend is neutral: it is neither side's code (not
pgw's, not tests/backend.py), it speaks plain RFC 6455 with no extension
(so both workers send the same uncompressed frames), and it does the same
work for both.  ``websockets`` is what a Python backend most likely runs in
production (under uvicorn by default).  Its cost while a stream runs is kept
well below either worker's (C-accelerated unmasking; large messages are
copied aside and parsed after the stage's exit, see ``serve``) and is shown
in the table, so it can be judged: on 2 cores it shares the machine with the
worker and the stub.  It runs in its own process, so none of its CPU is
counted as the worker's.  The uvicorn backend is neutral the same way, but
deliberately not compression-blind: it compresses with whichever worker
offers permessage-deflate, as the real one does, so its rows compare what
users see (today pgworker offers it and pgw does not).

The text the uvicorn rows carry is generated once per run, from a fixed
seed, so both workers get identical bytes: text files (Lean sources, TeX
drafts, Markdown notes of 8-256 KiB) and codex-like ``exec --json`` event
lines (reasoning, agent messages, command runs with compiler output).  It
is made-up prose, not one repeated line: a Zipf vocabulary of 3,000 words,
a topic that wanders through it (a seeded random walk), sentences quoted
again a little later, and varying numbers, ids, paths, mathematics and
some non-ASCII (``∀ ℕ → ≤ ⟨⟩``, as Lean writes).  It compresses about
3.8x (files) and 4.3x (JSON lines) with zlib at its default level and
window, 3.0x and 3.3x in uvicorn's 4 KiB window; the bench prints these
ratios for the data it generated.  The stub's ``files`` mode prints one
line naming every file in its working directory (count, size, CRC-32 of
each path and contents), which the driver knows in advance; its ``cat``
mode writes the JSON lines from a file.

Both workers run on the same interpreter (``--python``, default python3,
resolved past pyenv shims): pgworker in its own venv
(build/bench-pgworker-venv), pgw.pyz on an empty venv (build/bench-python),
so that neither pays for packages or .pth files of the base site-packages.
Their environment has no PYTHON* variables (PYTHONDONTWRITEBYTECODE would
keep pgw's extracted pyz from ever caching its bytecode), no PGW_* or
SHIV_* variables, no *_proxy variables (the only proxy is the bench's
link), a HOME of their own, and the stub first on PATH.  pgw.pyz and pgw.py
are copied at the start, so a rebuild during the run changes nothing.

The workers run one after the other, never at once under load, and the order
alternates every round.  Per round: pgw is started once in a fresh
``SHIV_ROOT`` (first run after extraction: time to ``hello`` only); then
both workers are started (each one's time to ``hello`` is measured while the
other is not yet running) and left idle together for ``--idle-s``; an idle
worker uses no CPU, so sharing that wait costs the other nothing and saves
several minutes.  Then, one worker at a time: line latency, 50 concurrent
stages, and the big stream, started just before the worker's next heartbeat
is due so that the heartbeat gap says whether a ping gets out while the
stream runs.  Those two workers are then stopped, and for each worker in
the same order, one process at a time: a worker connected to the uvicorn
backend through the link (the files request, then the JSON lines), stopped;
then one connected to it directly (the loopback stream), stopped.

The uvicorn rows add about 30 s a round at the default sizes (pgw's 22 MB
request and 35 MB of output take about 6 and 9 s through 4 MB/s; pgworker,
compressing, about half that) and about 12 s once to generate the data and
its ratios: about 1.7 minutes of the full run, 8 s of ``--quick``.

Measurements
------------
* throughput: ``--stream-mib`` (200) MiB written to stdout by one stage,
  in codex-like JSON lines (so quotes need JSON escaping); MB/s = 10^6 bytes
  per second from the backend sending the request to it receiving the exit.
* CPU per GiB: utime+stime of the worker process itself from
  /proc/PID/stat, before the request and when the exit arrives; the stub
  CLI is a child and is not counted (children's times are not in those
  fields; threads are).  Split into user and system time.
* peak RSS while streaming: VmRSS sampled every 50 ms, and VmHWM after
  resetting it (``clear_refs``) just before the stream; the larger is shown.
* heartbeat: application pings' arrival times (``hello`` counts as the
  first); the largest gap between a ping arriving while the stream runs (or
  the first after it, if none did) and the one before it, and the silence
  from the last ping to the exit.
* line latency: a stage printing ``time.time()`` every 20 ms; the backend
  subtracts it from its own time.time() when the line arrives.
* 50 stages x 2,000 lines (one write each): wall time from the first request
  to the last exit, worker CPU (schedstat, to the nanosecond; for pgw the
  daemon and its stage spawner, the helper that forks the stage roots; the
  roots, which start the CLIs and wait for them as pgworker does in its own
  process, in a row of their own; the CLIs are not counted), sampled every
  10 ms so that a thread
  ending within the window (pgworker's per-CLI waiter threads, on Python
  3.11) keeps what it used, and whether every
  stage's output arrived whole, in seq order, after an ack, with returncode 0.
  Then the same again at once, ``--again`` (5) times, each figure the median
  of those runs (one such burst is a tenth of a second of CPU, noisy on a
  shared machine), as a daemon that has run stages before meets its next
  50: pgw's roots are reused then, where the first time the spawner forks
  one per concurrent stage (the line latency stage left it one).
* idle RSS: VmRSS after ``--idle-s`` (60) seconds connected, before any stage.
* idle CPU: from a few seconds after hello to the end of the idle time, per
  minute, read thread by thread (schedstat) so that a thread ending in
  between (trio ends idle worker threads after 10 s) does not take its past
  CPU out of the sum; pgw's stage spawner and roots are counted as pgw's own.
* start to hello: from just before the process is spawned to the backend
  receiving ``hello``; pgw both warm (already extracted) and fresh.

Against the uvicorn backend (``--no-uvicorn`` leaves these out):

* over the link, files request: one ``stage.request`` carrying
  ``--files-mib`` (16) MiB of text files (as base64, a third more), whose
  stub prints the line naming them; time from the backend starting to send
  the request to the ``stage.exit`` arriving, and the bytes through the link
  in that window, both ways (and of them, to the worker).  Intact: the
  stub's line names exactly the files sent, with an ack and returncode 0.
* over the link, JSON lines: ``--json-mib`` (32) MiB of the JSON lines
  written by the stub; time to the exit and bytes, as above (and of them,
  from the worker).  Intact: byte count and CRC-32 of the output, seq order,
  ack, returncode 0.
* on loopback (no link): the JSON lines 4 times over (128 MiB); throughput,
  worker CPU per GiB, the backend's CPU per GiB and peak RSS, as for the
  main stream, and whether the worker offered permessage-deflate (its
  handshake's ``Sec-WebSocket-Extensions``).  A worker that offers it
  compresses its output here, as it would for the real backend.

Every check of the output also counts U+FFFD, which the stubs never write.
pgworker 0.1.2 decodes each pipe read on its own (``errors="replace"``), so
a character cut between two reads arrives as U+FFFD: with the non-ASCII of
the generated JSON lines its output is usually not intact.  The "all"
targets judge pgw only; a list under the table says what was wrong with
any output, whichever worker's.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import zlib
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
PGWORKER_REQUIREMENT = "pgworker==0.1.2"
PGWORKER_VENV = ROOT / "build" / "bench-pgworker-venv"
BACKEND_PACKAGES = ("starlette", "uvicorn")  # installed into PGWORKER_VENV for the uvicorn backend
# pgw.pyz runs on this empty venv's python, not on the base interpreter: a
# base site-packages may run .pth files at every start (this machine's adds
# ~40 ms by importing certifi), which pgworker's venv would not pay.
CLEAN_VENV = ROOT / "build" / "bench-python"

HEARTBEAT_INTERVAL_S = 30.0  # both workers' application ping period
HEARTBEAT_LEAD_S = 0.6  # the stream starts this long before a ping is due
RSS_SAMPLE_S = 0.05
CPU_SAMPLE_S = 0.01  # threads and roots that end within a window lose at most this much
STOP_TIMEOUT_S = 15.0
EVENT_TIMEOUT_S = 600.0
MB = 1_000_000
DEFER_BYTES = 4096  # the backend parses larger messages later (see serve)
GIB = 1 << 30
CONNECT_PATH = "/api/local-worker/connect"  # PROTOCOL.md; the uvicorn backend routes only this path
# The link: reads of 16 KiB (4 ms at 4 MB/s) and a bucket of 64 KiB, so a
# message crosses it as a steady trickle (no second-long bursts and pauses)
# and a sleep that overshoots by a few ms loses no tokens.
LINK_CHUNK_BYTES = 16 * 1024
LINK_BURST_BYTES = 64 * 1024
# The uvicorn loopback stream is the JSON lines this many times over: 128 MiB
# by default, enough for /proc's 10 ms CPU ticks to be about 1% of pgw's CPU.
LOOPBACK_REPEATS = 4
DATA_SEED = 13  # the generated files and JSON lines; both workers get the same bytes

# The stub CLI, written to a temp bin/ as `claude`.  The driver exec()s the
# same source to know what each stage's output must be.
STUB_SOURCE = r'''
import os, sys, time, zlib

FLOOD_LINE = '{"type":"item.delta","seq":%08d,"text":"lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod"}\n'


def flood_block():
    """1 MiB of codex-like JSON lines: text that needs JSON escaping (quotes, newlines)."""
    lines, size, i = [], 0, 0
    while size < 1 << 20:
        line = FLOOD_LINE % i
        lines.append(line)
        size += len(line)
        i += 1
    return "".join(lines).encode()[: 1 << 20]


def flood_chunks(total):
    block = flood_block()
    while total > 0:
        yield block[:total]
        total -= len(block)


def line_chunks(count, tag):
    for i in range(count):
        yield b"%s line %05d the quick brown fox jumps over the lazy dog\n" % (tag.encode(), i)


def cat_chunks(data, repeats):
    """`data` (bytes) `repeats` times over, in pieces of at most 1 MiB."""
    view = memoryview(data)
    for _ in range(repeats):
        for start in range(0, len(view), 1 << 20):
            yield view[start:start + (1 << 20)]


def files_digest(files):
    """One line naming (relative path, contents) pairs: their count, total size and a
    CRC-32 over each path, a NUL and its contents, in path order."""
    crc, size = 0, 0
    for path, data in sorted(files):
        crc = zlib.crc32(data, zlib.crc32(path.encode() + b"\0", crc))
        size += len(data)
    return b"files %d %d %08x\n" % (len(files), size, crc)


def scratch_files(root):
    """Every file under `root` as (path relative to it, with /, contents)."""
    found = []
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as source:
                found.append((os.path.relpath(path, root).replace(os.sep, "/"), source.read()))
    return found


def write_all(chunk):
    view = memoryview(chunk)
    while view:
        view = view[os.write(1, view):]


def read_prompt():
    """All of standard input, as a real CLI reads its prompt before it answers."""
    try:
        while os.read(0, 65536):
            pass
    except OSError:
        pass


def main(argv):
    read_prompt()
    mode = argv[0]
    if mode == "flood":
        for chunk in flood_chunks(int(argv[1])):
            write_all(chunk)
    elif mode == "lines":
        for chunk in line_chunks(int(argv[1]), argv[2]):
            write_all(chunk)
    elif mode == "cat":
        with open(argv[1], "rb") as source:
            data = source.read()
        for chunk in cat_chunks(data, int(argv[2])):
            write_all(chunk)
    elif mode == "files":
        write_all(files_digest(scratch_files(".")))
    elif mode == "tick":
        count, interval = int(argv[1]), float(argv[2])
        start = time.monotonic()
        for i in range(count):
            delay = start + i * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            write_all(b"%.6f\n" % time.time())
    else:
        sys.exit("stub: unknown mode %r" % mode)


if __name__ == "__main__":
    main(sys.argv[1:])
'''


def _stub_namespace() -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "bench_stub"}
    exec(compile(STUB_SOURCE, "bench-stub", "exec"), namespace)
    return namespace


##############################################################################
# Text that compresses like real work: proof drafts, Lean files, agent output
##############################################################################


class Prose:
    """Deterministic made-up prose from one seed, compressing about as well as
    real English with zlib: no repeated line, but a Zipf vocabulary of a few
    thousand words, a topic that wanders through it (a seeded random walk: the
    same rare words come back for a while, then others do), and sentences
    quoted again a little later, as drafts and agents repeat themselves.
    Numbers, ids, paths and bits of mathematics vary throughout."""

    VOCABULARY_WORDS = 3000
    COMMON_WORDS = 100  # drawn by rank; the others come from around the topic
    TOPIC_WIDTH = 60  # the rare words within reach of the topic at a time
    TOPIC_STEP = 20  # how far the topic may move per sentence
    REQUOTE = 0.25  # share of sentences that repeat one of the last 64

    SYLLABLES = ("ka", "ri", "to", "ne", "sa", "mo", "lu", "pe", "di", "an", "or", "el", "is", "um", "ex", "co",
                 "ver", "tra", "pro", "gra", "ph", "th", "st", "ion", "al", "ed", "ing", "er", "ic", "ent")
    FUNCTION_WORDS = ("the of and a to in is that for it as with be by this we on are from at which if then so "
                      "let there not an or all any its each hence since thus where").split()
    VARIABLES = "abcfghkmnpqrstxyz"

    def __init__(self, seed: int) -> None:
        import itertools
        import random

        self.rng = random.Random(seed)
        vocabulary = list(self.FUNCTION_WORDS)
        known = set(vocabulary)
        while len(vocabulary) < self.VOCABULARY_WORDS:
            word = "".join(self.rng.choice(self.SYLLABLES) for _ in range(self.rng.choice((1, 2, 2, 3, 3, 4))))
            if word not in known:
                known.add(word)
                vocabulary.append(word)
        self.vocabulary = vocabulary
        self.cumulative = list(itertools.accumulate(1.0 / rank for rank in range(1, len(vocabulary) + 1)))
        self.topic = 0
        self.recent: list[str] = []
        self.spare: list[str] = []

    def words(self, count: int) -> list[str]:
        rng, vocabulary = self.rng, self.vocabulary
        self.topic = (self.topic + rng.randint(-self.TOPIC_STEP, self.TOPIC_STEP)) % len(vocabulary)
        ranks = rng.choices(range(len(vocabulary)), cum_weights=self.cumulative, k=count)
        near = rng.choices(range(self.TOPIC_WIDTH), k=count)
        return [vocabulary[rank] if rank < self.COMMON_WORDS else vocabulary[(self.topic + step) % len(vocabulary)]
                for rank, step in zip(ranks, near)]

    def word(self) -> str:
        """One word for a name or a path (drawn 1024 at a time: one call each is slow)."""
        if not self.spare:
            self.spare = self.words(1024)
        return self.spare.pop()

    def name(self) -> str:
        return f"{self.word()}_{self.word()}"

    def math(self) -> str:
        rng, v = self.rng, self.VARIABLES
        return rng.choice((
            lambda: f"${rng.choice(v)}_{{{rng.randint(0, 99)}}} \\le {rng.choice(v)}^{{{rng.randint(2, 9)}}}$",
            lambda: f"∀ {rng.choice(v)} ∈ ℕ, {self.word()} {rng.choice(v)} → {self.word()} {rng.choice(v)}",
            lambda: f"`{self.name()} (h{rng.randint(0, 20)} : {rng.choice(v)} ≤ {rng.randint(2, 999)})`",
            lambda: f"$\\sum_{{i=1}}^{{{rng.choice(v)}}} {rng.choice(v)}_i = {rng.randint(0, 9999)}$",
        ))()

    def sentence(self) -> str:
        rng = self.rng
        if self.recent and rng.random() < self.REQUOTE:
            return rng.choice(self.recent)
        words = self.words(rng.randint(4, 22))
        roll = rng.random()
        if roll < 0.15:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
        elif roll < 0.3:
            words.insert(rng.randrange(len(words)), self.math())
        text = " ".join(words)
        text = text[0].upper() + text[1:] + rng.choice(".....,;:?")
        self.recent.append(text)
        del self.recent[:-64]
        return text

    def paragraph(self) -> str:
        return " ".join(self.sentence() for _ in range(self.rng.randint(1, 6)))

    def tactic(self) -> str:
        rng, v = self.rng, self.VARIABLES
        return rng.choice((
            lambda: f"intro {rng.choice(v)}",
            lambda: f"simp [{self.name()}, {self.name()}]",
            lambda: "omega",
            lambda: f"exact {self.name()} h{rng.randint(0, 9)}",
            lambda: "constructor",
            lambda: "ring_nf",
            lambda: f"rcases h{rng.randint(0, 9)} with ⟨{rng.choice(v)}, h{rng.randint(0, 9)}⟩",
            lambda: f"-- {self.sentence()}",
        ))()

    def lean(self, size: int) -> str:
        rng, parts, length = self.rng, [f"import Graph.{self.word().capitalize()}\n\nnamespace Graph\n\n"], 0
        while length < size:
            x, n = rng.choice(self.VARIABLES), rng.randint(0, 999)
            tactics = [self.tactic() for _ in range(rng.randint(2, 12))]
            block = (f"/-- {self.sentence()} -/\ntheorem {self.name()}_{n} ({x} : ℕ) (h{n % 10} : {x} ≤ {n}) :\n"
                     f"    {x} + {rng.randint(0, 99)} ≥ {rng.randint(0, 99)} := by\n  " + "\n  ".join(tactics) + "\n\n")
            parts.append(block)
            length += len(block.encode())
        return "".join(parts)

    def tex(self, size: int) -> str:
        rng, parts, length = self.rng, ["\\section{" + self.sentence() + "}\n\n"], 0
        while length < size:
            label = f"{self.word()}-{rng.randint(0, 999)}"
            block = (f"\\begin{{lemma}}\\label{{lem:{label}}}\n{self.paragraph()}\n\\end{{lemma}}\n"
                     f"\\begin{{proof}}\n{self.paragraph()}\n\n{self.paragraph()}\n\\end{{proof}}\n\n")
            parts.append(block)
            length += len(block.encode())
        return "".join(parts)

    def markdown(self, size: int) -> str:
        rng, parts, length = self.rng, [], 0
        while length < size:
            block = (f"## {self.sentence()}\n\n{self.paragraph()}\n\n"
                     + "".join(f"- {self.sentence()}\n" for _ in range(rng.randint(0, 5))) + "\n")
            parts.append(block)
            length += len(block.encode())
        return "".join(parts)


def project_files(size: int, seed: int = DATA_SEED) -> dict[str, bytes]:
    """Text files of 8-256 KiB, `size` bytes in all (the last one cut to fit): Lean
    sources, TeX drafts and Markdown notes, as a stage.request's `files` carries."""
    prose, files, total = Prose(seed), {}, 0
    while total < size:
        kind = prose.rng.choice(("lean", "lean", "tex", "md"))
        length = min(prose.rng.randint(8 << 10, 256 << 10), size - total)
        index = len(files)
        path, text = {
            "lean": lambda: (f"Graph/{prose.word().capitalize()}{index:04d}.lean", prose.lean(length)),
            "tex": lambda: (f"drafts/lemma_{index:04d}.tex", prose.tex(length)),
            "md": lambda: (f"notes/{prose.word()}-{index:04d}.md", prose.markdown(length)),
        }[kind]()
        data = text.encode()[:length]
        files[path] = data
        total += len(data)
    return files


def agent_json_lines(size: int, seed: int = DATA_SEED + 1) -> bytes:
    """Codex-like `exec --json` events, whole lines, `size` bytes or a line more:
    reasoning, agent messages and command runs with their output, UTF-8 unescaped
    as codex writes it, quotes and newlines escaped inside the JSON."""
    prose, lines, total, item = Prose(seed), [], 0, 0
    rng = prose.rng
    while total < size:
        item += 1
        roll = rng.random()
        if roll < 0.35:
            record: dict[str, Any] = {"type": "item.completed", "item": {
                "id": f"item_{item}", "type": "reasoning", "text": f"**{prose.sentence()}**\n\n{prose.paragraph()}"}}
        elif roll < 0.6:
            text = "\n\n".join(prose.paragraph() for _ in range(rng.randint(1, 3)))
            record = {"type": "item.completed", "item": {"id": f"item_{item}", "type": "agent_message", "text": text}}
        elif roll < 0.95:
            module = f"Graph/{prose.word().capitalize()}{rng.randint(0, 9999):04d}"
            output = "\n".join(
                f"{rng.choice(('info', 'warning', 'error'))}: ./{module}.lean:{rng.randint(1, 900)}:{rng.randint(0, 80)}: "
                f"{prose.sentence()}" for _ in range(rng.randint(1, 12)))
            record = {"type": "item.completed", "item": {
                "id": f"item_{item}", "type": "command_execution", "command": f"bash -lc 'lake build {module}'",
                "aggregated_output": output, "exit_code": rng.choice((0, 0, 0, 1)), "status": "completed"}}
        else:
            record = {"type": "turn.completed", "usage": {
                "input_tokens": rng.randint(1000, 200000), "cached_input_tokens": rng.randint(0, 100000),
                "output_tokens": rng.randint(10, 9000)}}
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        lines.append(line)
        total += len(line)
    return b"".join(lines)


def zlib_ratio(data: bytes, window_bits: int = 15, mem_level: int = 8) -> float:
    """Size before / after raw deflate at zlib's default level, one stream as
    permessage-deflate with context takeover keeps it."""
    compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -window_bits, mem_level)
    return len(data) / max(1, len(compressor.compress(data)) + len(compressor.flush()))


##############################################################################
# The backends (bench.py --serve, under the pgworker venv's python)
##############################################################################


def serve(transport: str, deflate: bool, arena_bytes: int) -> int:
    """A WebSocket server on 127.0.0.1 (a free port); commands on stdin, events on stdout.

    The transport is the only thing that differs between the two backends:
    `websockets` (the library's own server) or `uvicorn` (a Starlette
    WebSocket endpoint under uvicorn at its defaults).  Each hands every
    message it receives, as bytes, to the same `on_message`, and sends what
    `commands` and `on_message` give it through one `send(text)`.
    """
    import asyncio

    connections: dict[str, Callable[[str], Any]] = {}  # label -> its transport's send(text)
    stages: dict[tuple[str, str], dict[str, Any]] = {}

    def emit(event: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()

    def stage_state(label: str, stage_id: str) -> dict[str, Any]:
        key = (label, stage_id)
        if key not in stages:
            stages[key] = {
                "frames": 0, "bytes": 0, "crc": 0, "replaced": 0, "stderr_bytes": 0, "seq": 0, "seq_ok": True,
                "ack": False, "lat": [] if stage_id.startswith("lat-") else None, "partial": "",
            }
        return stages[key]

    # Parsing a 256 KiB output frame full of escaped quotes costs json.loads
    # about 1.5 s per GiB, as much as a worker's own relaying: done as the
    # frames arrive, it would make the backend compete with the worker for
    # the CPU.  So a large message is only timed and copied into an arena
    # as it arrives, and parsed (in order, with its arrival time) when a
    # stage.exit arrives or the arena is full.  The arena is allocated and
    # touched up front: storing 200 MiB in fresh memory would cost the
    # backend a page fault per 4 KiB while the stream runs.  Small messages
    # (hello, ping, ack, exit, latency lines) are parsed at once, and queued
    # too while anything is pending, to keep each stage's order.
    arena = bytearray(arena_bytes)
    arena[::4096] = b"\x01" * len(range(0, arena_bytes, 4096))
    arena_used = 0
    pending: list[tuple[str, Any, float]] = []  # (label, message or (offset, length), arrival)

    def on_message(label: str, raw: bytes, arrived: float) -> Optional[str]:
        nonlocal arena_used
        if len(raw) > DEFER_BYTES:
            if arena_used + len(raw) > arena_bytes:
                flush()
            if len(raw) > arena_bytes:
                pending.append((label, raw, arrived))
            else:
                arena[arena_used:arena_used + len(raw)] = raw
                pending.append((label, (arena_used, len(raw)), arrived))
                arena_used += len(raw)
            return None
        try:
            message = json.loads(raw)
            kind = message["type"]
        except (ValueError, KeyError, TypeError):
            emit({"ev": "bad", "worker": label, "t": arrived, "what": "not a JSON object with a type"})
            return None
        if kind == "ping":
            emit({"ev": "ping", "worker": label, "t": arrived})
            return '{"type":"pong"}'
        if kind == "hello":
            emit({"ev": "hello", "worker": label, "t": arrived})
            return None
        if kind == "stage.exit":
            message["backend_cpu_s"] = time.process_time()  # before the deferred parsing
        if pending:
            pending.append((label, message, arrived))
            if kind == "stage.exit":
                flush()
        else:
            on_stage_message(label, message, kind, arrived)
        return None

    def flush() -> None:
        nonlocal arena_used
        view = memoryview(arena)
        for label, item, arrived in pending:
            try:
                if isinstance(item, tuple):
                    item = json.loads(bytes(view[item[0]:item[0] + item[1]]))
                elif isinstance(item, bytes):
                    item = json.loads(item)
                on_stage_message(label, item, item["type"], arrived)
            except (ValueError, KeyError, TypeError):
                emit({"ev": "bad", "worker": label, "t": arrived, "what": "not a JSON object with a type"})
        view.release()
        pending.clear()
        arena_used = 0

    def on_stage_message(label: str, message: dict[str, Any], kind: str, arrived: float) -> None:
        stage_id = message.get("stage_run_id")
        if not isinstance(stage_id, str):
            emit({"ev": "bad", "worker": label, "t": arrived, "what": f"{kind} without stage_run_id"})
            return
        state = stage_state(label, stage_id)
        if kind == "stage.ack":
            state["ack"] = True
        elif kind in ("stage.stdout", "stage.stderr"):
            state["frames"] += 1
            if message.get("seq") != state["seq"] + 1:
                state["seq_ok"] = False
            state["seq"] = message.get("seq", state["seq"])
            data = message.get("data", "")
            encoded = data.encode("utf-8")
            if kind == "stage.stderr":
                state["stderr_bytes"] += len(encoded)
                return
            state["bytes"] += len(encoded)
            state["crc"] = zlib.crc32(encoded, state["crc"])
            state["replaced"] += data.count("\ufffd")  # the stubs never write one (free on an ASCII str)
            if state["lat"] is not None:
                lines = (state["partial"] + data).split("\n")
                state["partial"] = lines.pop()
                state["lat"].extend(arrived - float(line) for line in lines if line)
        elif kind == "stage.exit":
            del stages[(label, stage_id)]
            state.pop("partial")
            emit({
                "ev": "exit", "worker": label, "stage": stage_id, "t": arrived,
                "returncode": message.get("returncode"), "error": message.get("error"),
                "backend_cpu_s": message.get("backend_cpu_s"), **state,
            })
        else:
            emit({"ev": "bad", "worker": label, "t": arrived, "what": f"unexpected {kind}"})

    async def session(target: str, offered: str, receive: Callable[[], Any], send: Callable[[str], Any],
                      closed: tuple[type[BaseException], ...]) -> None:
        """One worker's connection: `receive()` gives each message as bytes, None once
        closed; `target` is the request's path and query, `offered` its extensions header."""
        path, _, query = target.partition("?")
        label = urllib.parse.parse_qs(query).get("token", ["?"])[0]
        connections[label] = send
        emit({"ev": "connect", "worker": label, "t": time.time(), "path": path,
              "deflate_offered": "permessage-deflate" in offered})
        try:
            while (raw := await receive()) is not None:
                reply = on_message(label, raw, time.time())
                if reply is not None:
                    await send(reply)
        except closed:
            pass
        finally:
            if connections.get(label) is send:
                del connections[label]
            emit({"ev": "closed", "worker": label, "t": time.time()})

    async def commands(queue: asyncio.Queue) -> None:
        while True:
            line = await queue.get()
            if not line:
                return
            command = json.loads(line)
            send = connections.get(command["worker"])
            if send is None:
                emit({"ev": "bad", "worker": command["worker"], "t": time.time(), "what": "not connected"})
                continue
            texts = [json.dumps(request) for request in command["requests"]]
            started, cpu = time.time(), time.process_time()
            for text in texts:
                await send(text)
            emit({"ev": "sent", "worker": command["worker"], "t": started, "t_last": time.time(), "id": command["id"],
                  "backend_cpu_s": cpu})

    async def websockets_transport(queue: asyncio.Queue) -> None:
        from websockets.asyncio.server import serve as ws_serve
        from websockets.exceptions import ConnectionClosed

        async def handler(ws: Any) -> None:
            async def receive() -> Optional[bytes]:
                try:
                    return await ws.recv(decode=False)
                except ConnectionClosed:
                    return None

            offered = ws.request.headers.get("Sec-WebSocket-Extensions", "")
            await session(ws.request.path, offered, receive, ws.send, (ConnectionClosed,))

        async with ws_serve(
            handler, "127.0.0.1", 0,
            compression="deflate" if deflate else None,
            max_size=None,
            ping_interval=None,  # the workers keep the connection alive themselves
        ) as server:
            port = server.sockets[0].getsockname()[1]
            emit({"ev": "listening", "port": port, "server": f"websockets {metadata.version('websockets')}, "
                  + ("permessage-deflate accepted" if deflate else "no compression")})
            await commands(queue)

    async def uvicorn_transport(queue: asyncio.Queue) -> None:
        import uvicorn
        from starlette.applications import Starlette
        from starlette.routing import WebSocketRoute
        from starlette.websockets import WebSocket, WebSocketDisconnect

        async def endpoint(websocket: WebSocket) -> None:
            await websocket.accept()

            async def receive() -> Optional[bytes]:
                message = await websocket.receive()  # a raw ASGI message
                if message["type"] == "websocket.disconnect":
                    return None
                text = message.get("text")
                return text.encode() if text is not None else message.get("bytes") or b""

            target = f"{websocket.url.path}?{websocket.url.query}"
            offered = websocket.headers.get("sec-websocket-extensions", "")
            await session(target, offered, receive, websocket.send_text, (WebSocketDisconnect,))

        app = Starlette(routes=[WebSocketRoute(CONNECT_PATH, endpoint)])
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")  # its defaults otherwise
        config.load()  # picks the ws implementation ("auto"), as serve() would
        ws_class = config.ws_protocol_class
        ws_impl = f"{ws_class.__module__}.{ws_class.__qualname__}" if ws_class else "none"
        server = uvicorn.Server(config)
        serving = asyncio.create_task(server.serve())
        while not server.started:
            if serving.done():
                serving.result()
                raise SystemExit("uvicorn stopped before it started")
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        emit({"ev": "listening", "port": port, "ws_impl": ws_impl, "ws_per_message_deflate": config.ws_per_message_deflate,
              "server": f"Starlette {metadata.version('starlette')} on uvicorn {metadata.version('uvicorn')} at its defaults "
                        f"(ws {ws_impl.rpartition('.')[0].rpartition('.')[2]} on websockets {metadata.version('websockets')}, "
                        f"ws_per_message_deflate={config.ws_per_message_deflate})"})
        try:
            await commands(queue)
        finally:
            server.should_exit = True
            await serving

    async def main() -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def read_stdin() -> None:
            for line in sys.stdin:
                loop.call_soon_threadsafe(queue.put_nowait, line)
            loop.call_soon_threadsafe(queue.put_nowait, "")

        threading.Thread(target=read_stdin, daemon=True).start()
        await (uvicorn_transport if transport == "uvicorn" else websockets_transport)(queue)

    asyncio.run(main())
    return 0


def serve_link(target_port: int, rate_bytes_s: float) -> int:
    """bench.py --link: a TCP proxy from 127.0.0.1 (a free port) to `target_port`
    that lets through at most `rate_bytes_s` each way, as one host's link does,
    and counts the bytes each way per worker (the token in its request line).
    Commands on stdin ({"id": N}) get the counts so far on stdout."""
    import asyncio

    counts: dict[str, list[int]] = {}  # label -> [to the backend, to the worker]

    def emit(event: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()

    class TokenBucket:
        """Bytes may pass at `rate_bytes_s`, bursting to LINK_BURST_BYTES after a pause."""

        def __init__(self) -> None:
            self.tokens = float(LINK_BURST_BYTES)
            self.refilled = time.monotonic()

        async def take(self, size: int) -> None:
            while True:
                now = time.monotonic()
                self.tokens = min(LINK_BURST_BYTES, self.tokens + (now - self.refilled) * rate_bytes_s)
                self.refilled = now
                if self.tokens >= size:
                    self.tokens -= size
                    return
                await asyncio.sleep((size - self.tokens) / rate_bytes_s)

    # One bucket per direction for all connections: the host's link, shared.
    to_backend, to_worker = TokenBucket(), TokenBucket()

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, bucket: TokenBucket,
                   tally: list[int], direction: int) -> None:
        try:
            while chunk := await reader.read(LINK_CHUNK_BYTES):
                await bucket.take(len(chunk))
                tally[direction] += len(chunk)  # counted before it can arrive
                writer.write(chunk)
                await writer.drain()
            writer.write_eof()
        except OSError:
            writer.close()

    async def on_connect(worker_reader: asyncio.StreamReader, worker_writer: asyncio.StreamWriter) -> None:
        writers = [worker_writer]
        try:
            request_line = await worker_reader.readuntil(b"\r\n")  # GET /...?token=LABEL HTTP/1.1
            target = request_line.split(b" ")[1].decode("latin-1") if request_line.count(b" ") >= 2 else ""
            label = urllib.parse.parse_qs(target.partition("?")[2]).get("token", ["?"])[0]
            tally = counts.setdefault(label, [0, 0])
            backend_reader, backend_writer = await asyncio.open_connection("127.0.0.1", target_port)
            writers.append(backend_writer)
            await to_backend.take(len(request_line))
            tally[0] += len(request_line)
            backend_writer.write(request_line)
            await asyncio.gather(
                pump(worker_reader, backend_writer, to_backend, tally, 0),
                pump(backend_reader, worker_writer, to_worker, tally, 1),
            )
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            for writer in writers:
                writer.close()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def report(command_id: Any) -> None:
            emit({"ev": "counts", "id": command_id, "counts": counts})

        def read_stdin() -> None:
            for line in sys.stdin:
                loop.call_soon_threadsafe(report, json.loads(line)["id"])
            loop.call_soon_threadsafe(done.set)

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        threading.Thread(target=read_stdin, daemon=True).start()
        emit({"ev": "listening", "port": server.sockets[0].getsockname()[1]})
        await done.wait()
        server.close()

    asyncio.run(main())
    return 0


##############################################################################
# The driver: processes, /proc, the backend's events
##############################################################################


class Helper:
    """A helper process (a backend, the link): JSON lines of commands on its
    stdin, of events on its stdout (read by a thread); its first event says
    which port it listens on."""

    what = "helper"

    def __init__(self, argv: list[str], stderr_path: Path) -> None:
        self.stderr = open(stderr_path, "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self.events: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self._ids = 0
        threading.Thread(target=self._read, daemon=True).start()
        self.listening = self.wait_for(lambda e: e["ev"] == "listening", 30)
        self.port: int = self.listening["port"]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            event = json.loads(line)
            with self.cond:
                self.events.append(event)
                self.cond.notify_all()
        with self.cond:
            self.events.append({"ev": "helper-died", "worker": None, "t": time.time()})
            self.cond.notify_all()

    def wait_for(self, match: Callable[[dict[str, Any]], bool], timeout_s: float, start: int = 0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while True:
                for event in self.events[start:]:
                    if match(event):
                        return event
                    if event["ev"] == "helper-died":
                        raise BenchError(f"the {self.what} died (see {self.stderr.name})")
                start = len(self.events)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"timed out waiting for the {self.what}")
                self.cond.wait(left)

    def mark(self) -> int:
        with self.cond:
            return len(self.events)

    def since(self, start: int, match: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        with self.cond:
            return [event for event in self.events[start:] if match(event)]

    def command(self, command: dict[str, Any]) -> int:
        """Write `command` with a fresh "id"; that id."""
        self._ids += 1
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({**command, "id": self._ids}) + "\n")
        self.proc.stdin.flush()
        return self._ids

    def close(self) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


class Backend(Helper):
    """A backend process (``bench.py --serve``) with one transport."""

    def __init__(self, python: Path, transport: str, deflate: bool, arena_mib: int, log_dir: Path) -> None:
        self.what = f"{transport} backend"
        argv = [str(python), str(Path(__file__).resolve()), "--serve", f"--transport={transport}",
                f"--arena-mib={arena_mib}"]
        argv += ["--deflate"] if deflate else []
        super().__init__(argv, log_dir / f"backend-{transport}.stderr")
        self.description: str = self.listening["server"]

    def send(self, worker: str, requests: list[dict[str, Any]]) -> dict[str, Any]:
        """Have the backend send `requests`; its `sent` event (backend's clock)."""
        start = self.mark()
        command_id = self.command({"worker": worker, "requests": requests})
        # A large request over a slow link may take a while to be written.
        return self.wait_for(
            lambda e: (e["ev"] == "sent" and e.get("id") == command_id) or (e["ev"] == "bad" and e["worker"] == worker),
            EVENT_TIMEOUT_S, start,
        )


class Link(Helper):
    """The throttling TCP proxy (``bench.py --link``) in front of a backend."""

    what = "link proxy"

    def __init__(self, target_port: int, rate_mb_s: float, log_dir: Path) -> None:
        argv = [sys.executable, str(Path(__file__).resolve()), "--link", f"--link-target={target_port}",
                f"--link-mb-s={rate_mb_s}"]
        super().__init__(argv, log_dir / "link.stderr")

    def counts(self, label: str) -> tuple[int, int]:
        """Bytes through the link so far for worker `label`: (to the backend, to the worker)."""
        start = self.mark()
        command_id = self.command({})
        event = self.wait_for(lambda e: e["ev"] == "counts" and e["id"] == command_id, 30, start)
        up, down = event["counts"].get(label, (0, 0))
        return up, down


class BenchError(Exception):
    pass


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of the process itself: all its threads, none of its children."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    return sum(cpu_times(pid))


def cpu_run_by_thread(pid: int) -> dict[str, int]:
    """Each thread's CPU time in nanoseconds (schedstat): an idle worker uses
    less than the 10 ms tick /proc/PID/stat counts in."""
    times = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as schedstat:
                times[f"{pid}/{task}"] = int(schedstat.read().split()[0])
        except OSError:  # a thread that ended meanwhile
            continue
    return times


# pgw forks its stage roots from a helper process of its own, the stage
# spawner, a child of the worker: what the spawner costs is the worker's.
# The roots (the spawner's children, forked from it, so with its command
# line) start the CLIs and wait for them, as pgworker does in its own
# process; they are read too, and shown in a row of their own.
# In its command line: pgw.STAGE_SPAWNER_LOADER's comment, or (a pgw before
# the spawner read its source on stdin, run with --pgw-cmd) the source itself.
SPAWNER_MARKS = (b"# pgw's stage spawner", b"def stage_root(")
ROOT_PREFIX = "root "  # own_threads' key for a root's thread


def children_marked(pid: int) -> list[int]:
    """The children of `pid` that run pgw's spawner code: its spawner, or its roots."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                parent = int(stat.read().rpartition(b")")[2].split()[1])
            if parent == pid:
                with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                    command_line = cmdline.read()
                    if any(mark in command_line for mark in SPAWNER_MARKS):
                        found.append(int(entry))
        except (OSError, ValueError):  # not a pid, or gone meanwhile
            continue
    return found


def own_threads(pid: int) -> dict[str, int]:
    """cpu_run_by_thread of the worker and of its stage spawner, if it has
    one, and of the spawner's stage roots (keys starting ROOT_PREFIX); not of
    the CLIs they run."""
    times = cpu_run_by_thread(pid)
    for spawner in children_marked(pid):
        try:
            times.update(cpu_run_by_thread(spawner))
            for root in children_marked(spawner):
                times.update({ROOT_PREFIX + key: spent for key, spent in cpu_run_by_thread(root).items()})
        except OSError:  # gone meanwhile
            continue
    return times


def cpu_run_since(before: dict[str, int], after: dict[str, int], roots: bool = False) -> float:
    """Seconds of CPU between two readings, thread by thread (of pgw's stage
    roots, or of the rest): a thread that ended in between (trio ends idle
    worker threads after 10 s) takes its whole past with it from a plain
    sum, which could then even fall."""
    return sum(
        spent - before.get(thread, 0) for thread, spent in after.items() if thread.startswith(ROOT_PREFIX) == roots
    ) / 1e9


def status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise BenchError(f"no {key} in /proc/{pid}/status")


class CpuSampler:
    """own_threads every CPU_SAMPLE_S, each thread's latest reading kept: a
    thread that ends inside the window keeps the CPU it had used by its last
    sample.  pgworker on Python 3.11 waits for each CLI in a thread of its
    own (asyncio's ThreadedChildWatcher), which ends with the stage; read
    only at both ends of the window, those threads' CPU would be lost."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.seen = own_threads(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(CPU_SAMPLE_S):
            try:
                self.seen.update(own_threads(self.pid))
            except OSError:  # the worker is gone
                return

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        self.seen.update(own_threads(self.pid))
        return self.seen


class RssSampler:
    """VmRSS every RSS_SAMPLE_S, plus VmHWM reset at the start (when allowed)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kib = 0
        self._stop = threading.Event()
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as clear:
                clear.write("5")  # reset VmHWM to the current RSS
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_kib = max(self.peak_kib, status_kib(self.pid, "VmRSS"))
            except (OSError, BenchError):
                return
            self._stop.wait(RSS_SAMPLE_S)

    def stop(self) -> int:
        """Peak RSS in bytes."""
        self._stop.set()
        self._thread.join()
        peak = self.peak_kib
        if self.hwm_reset:
            peak = max(peak, status_kib(self.pid, "VmHWM"))
        return peak * 1024


class Worker:
    """One worker under test, as one process's lifetime."""

    def __init__(self, name: str, label: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.label = label
        self.argv = argv
        self.env = env
        self.log = log
        self.proc: Optional[subprocess.Popen] = None
        self.hello_t = 0.0

    def start(self, backend: Backend) -> float:
        """Spawn it; seconds from just before the spawn to `hello` at the backend."""
        start = backend.mark()
        with open(self.log, "ab") as log:
            t0 = time.time()
            self.proc = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            hello = backend.wait_for(lambda e: e["ev"] == "hello" and e["worker"] == self.label, 60, start)
        except BenchError:
            raise BenchError(f"{self.name} said no hello within 60 s (see {self.log})") from None
        self.hello_t = hello["t"]
        return hello["t"] - t0

    @property
    def pid(self) -> int:
        """The worker's own pid (under `py-spy record --`, py-spy's child)."""
        assert self.proc is not None
        if self.argv[0].endswith("py-spy"):
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            return int(children[0])
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT if self.argv[0].endswith("py-spy") else signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


##############################################################################
# The measurements
##############################################################################


def stage_request(stage_id: str, args: list[str], timeout_s: int = 1800) -> dict[str, Any]:
    return {
        "type": "stage.request", "stage_run_id": stage_id, "job_id": "bench", "cli": "claude",
        "cli_args": args, "stdin": "", "timeout_s": timeout_s,
    }


def wait_exits(backend: Backend, worker: Worker, stage_ids: set[str], start: int, timeout_s: float) -> dict[str, dict]:
    exits: dict[str, dict] = {}
    deadline = time.monotonic() + timeout_s
    while len(exits) < len(stage_ids):
        if worker.proc is not None and worker.proc.poll() is not None:
            raise BenchError(f"{worker.name} exited with {worker.proc.returncode} (see {worker.log})")
        event = backend.wait_for(
            lambda e: e["worker"] == worker.label and e["ev"] in ("exit", "closed") and e.get("stage") not in exits,
            max(0.1, deadline - time.monotonic()), start,
        )
        if event["ev"] == "closed":
            raise BenchError(f"{worker.name} closed its connection (see {worker.log})")
        if event["stage"] in stage_ids:
            exits[event["stage"]] = event
    return exits


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def measure_latency(backend: Backend, worker: Worker, tag: str, lines: int) -> dict[str, Any]:
    stage_id = f"lat-{tag}"
    start = backend.mark()
    backend.send(worker.label, [stage_request(stage_id, ["tick", str(lines), "0.02"])])
    event = wait_exits(backend, worker, {stage_id}, start, lines * 0.02 + 60)[stage_id]
    latencies = event["lat"]
    ok = len(latencies) == lines and event["returncode"] == 0
    return {
        "lat_p50_ms": percentile(latencies, 0.50) * 1000 if latencies else None,
        "lat_p99_ms": percentile(latencies, 0.99) * 1000 if latencies else None,
        "lat_max_ms": max(latencies) * 1000 if latencies else None,
        "lat_intact": ok,
    }


def measure_concurrent(backend: Backend, worker: Worker, tag: str, stages: int, lines: int,
                       expected: Callable[[int, str], tuple[int, int]]) -> dict[str, Any]:
    stage_ids = [f"conc-{tag}-{i:02d}" for i in range(stages)]
    sampler = CpuSampler(worker.pid)
    cpu0 = dict(sampler.seen)
    start = backend.mark()
    sent = backend.send(worker.label, [stage_request(s, ["lines", str(lines), s]) for s in stage_ids])
    exits = wait_exits(backend, worker, set(stage_ids), start, 300)
    cpu1 = sampler.stop()
    problems = [f"{s}: {p}" for s, e in sorted(exits.items()) for p in stage_problems(e, expected(lines, s))]
    return {
        "conc_frames": sum(e["frames"] for e in exits.values()),
        "conc_wall_s": max(e["t"] for e in exits.values()) - sent["t"],
        "conc_cpu_s": cpu_run_since(cpu0, cpu1),
        "conc_roots_cpu_s": cpu_run_since(cpu0, cpu1, roots=True) if worker.name == "pgw" else None,
        "conc_intact": not problems,
        "conc_problems": problems[:10],
    }


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """measure_concurrent's figures over several runs: each number's median;
    intact only if every run was, and every run's problems."""
    merged: dict[str, Any] = {}
    for key, value in runs[0].items():
        values = [run[key] for run in runs if run[key] is not None]
        if not values:
            merged[key] = None
        elif isinstance(value, bool):
            merged[key] = all(values)
        elif isinstance(value, list):
            merged[key] = [item for each in values for item in each][:10]
        else:
            merged[key] = statistics.median(values)
    return merged


def stage_problems(exit_event: dict[str, Any], expected: tuple[int, int]) -> list[str]:
    """What is wrong with a stage's output as the backend saw it, if anything."""
    problems = []
    if exit_event["bytes"] != expected[0]:
        problems.append(f"{exit_event['bytes']} bytes of stdout, expected {expected[0]}")
    elif exit_event["crc"] != expected[1]:
        problems.append("stdout differs from what the stub wrote")
    if exit_event.get("replaced"):
        problems.append(f"{exit_event['replaced']} U+FFFD in stdout, which the stub never writes "
                        "(a UTF-8 character cut between two reads and decoded in halves?)")
    if not exit_event["seq_ok"]:
        problems.append("seq not 1, 2, 3, ...")
    if not exit_event["ack"]:
        problems.append("no stage.ack")
    if exit_event["returncode"] != 0 or exit_event["error"] is not None:
        problems.append(f"returncode {exit_event['returncode']}, error {exit_event['error']!r}")
    return problems


# pgw's two steps per byte, timed alone on the stream's own output in a
# process of their own (CPU seconds per GiB, best of 3): JSON-escaping it
# (json_string_bytes: bytes.replace for long output, else the json module's C
# encoder) and masking it (RFC 6455 5.3, masked_text_frame).  Their sum is a
# floor under pgw's user CPU per GiB, to set beside the target.
FLOOR_SCRIPT = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import bench, pgw
block = bench._stub_namespace()["flood_block"]()
pieces = [block[i:i + 256 * 1024] for i in range(0, len(block), 256 * 1024)]
escaped = [pgw.json_string_bytes(piece) for piece in pieces]

def per_gib(work, items):
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        for _ in range(64):
            for item in items:
                work(item)
        best = min(best, time.process_time() - start)
    return best * (1 << 30) / (64 * sum(map(len, pieces)))

print(json.dumps({
    "floor_escape_s_per_gib": per_gib(pgw.json_string_bytes, pieces),
    "floor_mask_s_per_gib": per_gib(pgw.masked_text_frame, escaped),
}))
"""


def measure_floor(pgw_dir: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent)}
    out = subprocess.run([sys.executable, "-c", FLOOR_SCRIPT, str(pgw_dir)],
                         capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out)


def measure_stream(backend: Backend, worker: Worker, tag: str, size: int, cli_args: list[str],
                   expected: tuple[int, int], align: bool) -> dict[str, Any]:
    def pings() -> list[float]:
        return [worker.hello_t] + [
            e["t"] for e in backend.since(0, lambda e: e["ev"] == "ping" and e["worker"] == worker.label)
            if e["t"] >= worker.hello_t
        ]

    if align:  # start HEARTBEAT_LEAD_S before the next ping is due
        seen = pings()
        due = seen[-1] + HEARTBEAT_INTERVAL_S
        while due - HEARTBEAT_LEAD_S < time.time() + 0.05:
            due += HEARTBEAT_INTERVAL_S
        time.sleep(max(0.0, due - HEARTBEAT_LEAD_S - time.time()))

    stage_id = f"flood-{tag}"
    sampler = RssSampler(worker.pid)
    cpu0 = cpu_times(worker.pid)
    start = backend.mark()
    sent = backend.send(worker.label, [stage_request(stage_id, cli_args)])
    event = wait_exits(backend, worker, {stage_id}, start, EVENT_TIMEOUT_S)[stage_id]
    cpu1 = cpu_times(worker.pid)
    peak = sampler.stop()
    elapsed = event["t"] - sent["t"]

    t_sent, t_exit = sent["t"], event["t"]
    if align and not any(t_sent < p <= t_exit for p in pings()):
        try:  # no ping during the stream: the first one after it closes the gap
            backend.wait_for(
                lambda e: e["ev"] == "ping" and e["worker"] == worker.label and e["t"] > t_exit,
                HEARTBEAT_INTERVAL_S + 15, start,
            )
        except BenchError:
            pass
    # Each ping that arrived while the stream ran (else the first one after
    # it) against the ping before it, and the silence from the last ping to
    # the exit: a starved heartbeat shows in one of them.
    seen = pings()
    closing = [j for j, p in enumerate(seen) if t_sent < p <= t_exit]
    if not closing:
        closing = [j for j, p in enumerate(seen) if p > t_exit][:1]
    gaps = [seen[j] - seen[j - 1] for j in closing if j > 0]
    gaps.append(t_exit - max(p for p in seen if p <= t_exit))
    hb_gap = max(gaps) if closing else None
    return {
        "throughput_mb_s": size / elapsed / MB,
        "stream_s": elapsed,
        "cpu_s_per_gib": (sum(cpu1) - sum(cpu0)) / (size / GIB),
        "cpu_user_s_per_gib": (cpu1[0] - cpu0[0]) / (size / GIB),
        "cpu_sys_s_per_gib": (cpu1[1] - cpu0[1]) / (size / GIB),
        "backend_cpu_s_per_gib": (event["backend_cpu_s"] - sent["backend_cpu_s"]) / (size / GIB),
        "peak_rss_mb": peak / MB,
        "stream_intact": not stage_problems(event, expected),
        "stream_problems": stage_problems(event, expected),
        "stream_frames": event["frames"],
        "hb_gap_s": hb_gap,
    }


class RealisticData:
    """The generated text files (for one stage.request) and JSON lines (a file
    the stub writes out), and what the backend must see of each."""

    def __init__(self, tmp: Path, files_mib: int, json_mib: int) -> None:
        stub = _stub_namespace()
        files = project_files(files_mib << 20)
        self.files_b64 = {path: base64.b64encode(data).decode() for path, data in files.items()}
        digest = stub["files_digest"](list(files.items()))
        self.files_expected = (len(digest), zlib.crc32(digest))  # the stub's one line of stdout
        lines = agent_json_lines(json_mib << 20)
        self.json_path = tmp / "agent-output.jsonl"
        self.json_path.write_bytes(lines)
        self.json_bytes = len(lines)
        self.json_expected = (len(lines), zlib.crc32(lines))
        self.loopback_bytes = len(lines) * LOOPBACK_REPEATS
        crc = 0
        for chunk in stub["cat_chunks"](lines, LOOPBACK_REPEATS):
            crc = zlib.crc32(chunk, crc)
        self.loopback_expected = (self.loopback_bytes, crc)
        text = b"".join(files.values())
        request = json.dumps(self.files_b64).encode()
        self.description = (
            f"{files_mib} MiB of text files ({len(files)} files; zlib {zlib_ratio(text):.1f}x, "
            f"{zlib_ratio(text, 12, 5):.1f}x in uvicorn's 4 KiB window, {zlib_ratio(request, 12, 5):.1f}x as the "
            f"request's base64), {len(lines) / (1 << 20):.0f} MiB of JSON lines (zlib {zlib_ratio(lines):.1f}x, "
            f"{zlib_ratio(lines, 12, 5):.1f}x in the 4 KiB window)"
        )


def measure_link(backend: Backend, link: Link, worker: Worker, tag: str, data: RealisticData) -> dict[str, Any]:
    """The files request, then the JSON lines, through the link: time from the
    backend sending the request to the exit arriving, and the bytes each way."""
    results: dict[str, Any] = {}
    for kind, cli_args, files, expected in (
        ("files", ["files"], data.files_b64, data.files_expected),
        ("json", ["cat", str(data.json_path), "1"], {}, data.json_expected),
    ):
        stage_id = f"link-{kind}-{tag}"
        up0, down0 = link.counts(worker.label)
        start = backend.mark()
        sent = backend.send(worker.label, [{**stage_request(stage_id, cli_args), "files": files}])
        event = wait_exits(backend, worker, {stage_id}, start, EVENT_TIMEOUT_S)[stage_id]
        up1, down1 = link.counts(worker.label)
        problems = stage_problems(event, expected)
        results.update({
            f"link_{kind}_s": event["t"] - sent["t"],
            f"link_{kind}_wire_mb": (up1 - up0 + down1 - down0) / MB,
            f"link_{kind}_down_mb": (down1 - down0) / MB,
            f"link_{kind}_up_mb": (up1 - up0) / MB,
            f"link_{kind}_intact": not problems,
            f"link_{kind}_problems": problems,
        })
    return results


def measure_uvicorn(setup: Setup, name: str, number: int, say: Callable[[str], None]) -> dict[str, Any]:
    """One worker against the uvicorn backend: over the link (a worker of its
    own, connected through it), then on loopback (another, connected directly)."""
    uvicorn_backend, link, data = setup.uvicorn, setup.link, setup.data
    assert uvicorn_backend is not None and data is not None
    results: dict[str, Any] = {}
    tag = f"{name}-r{number}"
    if link is not None:
        say(f"{name}: uvicorn backend over a {setup.args.link_mb_s:g} MB/s link: {setup.args.files_mib} MiB of files, "
            f"{setup.args.json_mib} MiB of JSON lines")
        worker = setup.worker(name, f"{name}-link-r{number}", f"http://127.0.0.1:{link.port}")
        try:
            worker.start(uvicorn_backend)
            results.update(measure_link(uvicorn_backend, link, worker, tag, data))
        finally:
            worker.stop()
    say(f"{name}: uvicorn backend on loopback: {data.loopback_bytes >> 20} MiB of JSON lines")
    worker = setup.worker(name, f"{name}-uv-r{number}", f"http://127.0.0.1:{uvicorn_backend.port}")
    try:
        worker.start(uvicorn_backend)
        connects = uvicorn_backend.since(0, lambda e: e["ev"] == "connect" and e["worker"] == worker.label)
        results["uv_deflate_offered"] = bool(connects) and connects[-1]["deflate_offered"]
        stream = measure_stream(uvicorn_backend, worker, f"uv-{tag}", data.loopback_bytes,
                                ["cat", str(data.json_path), str(LOOPBACK_REPEATS)], data.loopback_expected, False)
        if worker.proc is not None and worker.proc.poll() is not None:
            raise BenchError(f"{name} died (see {worker.log})")
    finally:
        worker.stop()
    for key in ("throughput_mb_s", "cpu_s_per_gib", "cpu_user_s_per_gib", "cpu_sys_s_per_gib",
                "backend_cpu_s_per_gib", "peak_rss_mb"):
        results[f"uv_{key}"] = stream[key]
    results["uv_intact"], results["uv_problems"] = stream["stream_intact"], stream["stream_problems"]
    return results


##############################################################################
# Setup: the pgworker venv, homes, the stub CLI
##############################################################################


BASE_PYTHON_CODE = "import os, sys; print(os.path.realpath(sys._base_executable or sys.executable))"


def real_python(python: str) -> str:
    """The interpreter itself, not a pyenv shim or a venv link (no shell in front of it)."""
    found = shutil.which(python) or python
    return subprocess.run([found, "-c", BASE_PYTHON_CODE], capture_output=True, text=True, check=True).stdout.strip()


def backend_requirements() -> str:
    """The dev lock's starlette and uvicorn lines, markers kept, hashes dropped:
    pip picks the line for the venv's Python, and the rest of what they need
    (anyio, h11, websockets) is pgworker's own or resolved by pip."""
    lines = [line.rstrip("\\ ").strip() for line in (ROOT / "requirements-dev.lock").read_text().splitlines()
             if line.startswith(tuple(f"{name}==" for name in BACKEND_PACKAGES))]
    if not lines:
        raise BenchError(f"requirements-dev.lock pins none of {', '.join(BACKEND_PACKAGES)}")
    return "\n".join(lines) + "\n"


def ensure_pgworker_venv(python: str) -> Path:
    """pgworker 0.1.2 in its own venv on `python`, plus what the backends run on
    (Starlette and uvicorn at the dev lock's versions; websockets is pgworker's)."""
    venv_python = PGWORKER_VENV / "bin" / "python"
    check = [str(venv_python), "-c", f"import importlib.metadata as m, websockets; print(m.version('pgworker')); {BASE_PYTHON_CODE}"]
    found = subprocess.run(check, capture_output=True, text=True) if venv_python.exists() else None
    if not (found and found.returncode == 0 and found.stdout.split() == [PGWORKER_REQUIREMENT.split("==")[1], python]):
        print(f"bench: installing {PGWORKER_REQUIREMENT} into {PGWORKER_VENV.relative_to(ROOT)}", file=sys.stderr)
        shutil.rmtree(PGWORKER_VENV, ignore_errors=True)
        subprocess.run([python, "-m", "venv", str(PGWORKER_VENV)], check=True)
        subprocess.run([str(venv_python), "-m", "pip", "install", "-qq", "--disable-pip-version-check",
                        PGWORKER_REQUIREMENT], check=True)
        subprocess.run(check, check=True, capture_output=True)
    wanted = backend_requirements()
    stamp = PGWORKER_VENV / "bench-backend-requirements.txt"  # written once they are installed
    if not stamp.exists() or stamp.read_text() != wanted:
        print(f"bench: installing {' and '.join(BACKEND_PACKAGES)} (the dev lock's versions) into "
              f"{PGWORKER_VENV.relative_to(ROOT)}", file=sys.stderr)
        requirements = PGWORKER_VENV / "bench-backend-requirements.in"
        requirements.write_text(wanted)
        subprocess.run([str(venv_python), "-m", "pip", "install", "-qq", "--disable-pip-version-check",
                        "-r", str(requirements)], check=True)
        stamp.write_text(wanted)
    return PGWORKER_VENV


def ensure_clean_venv(python: str) -> Path:
    """An empty venv (no pip, no packages) on `python`; its bin/python."""
    venv_python = CLEAN_VENV / "bin" / "python"
    probe = [str(venv_python), "-c", BASE_PYTHON_CODE]
    if venv_python.exists():
        found = subprocess.run(probe, capture_output=True, text=True)
        if found.returncode == 0 and found.stdout.strip() == python:
            return venv_python
    shutil.rmtree(CLEAN_VENV, ignore_errors=True)
    subprocess.run([python, "-m", "venv", "--without-pip", str(CLEAN_VENV)], check=True)
    return venv_python


def write_config(path: Path, server: str, token: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_text(json.dumps({"server": server, "worker_id": token, "token": token}))
    path.chmod(0o600)


def base_env(stub_bin: Path, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PGW_", "SHIV_", "PYTHON", "VIRTUAL_ENV")) and not k.lower().endswith("_proxy")}
    env["PATH"] = f"{stub_bin}{os.pathsep}{env.get('PATH', os.defpath)}"
    env["HOME"] = str(home)
    home.mkdir(parents=True, exist_ok=True)
    return env


class Setup:
    def __init__(self, args: argparse.Namespace, tmp: Path, backend: Backend, python: str,
                 uvicorn: Optional[Backend] = None, link: Optional[Link] = None,
                 data: Optional[RealisticData] = None) -> None:
        self.args = args
        self.tmp = tmp
        self.backend = backend
        self.uvicorn, self.link, self.data = uvicorn, link, data  # None: no uvicorn rows (or no link rows)
        self.python = python
        self.server = f"http://127.0.0.1:{backend.port}"
        self.stub_bin = tmp / "bin"
        self.stub_bin.mkdir()
        stub = self.stub_bin / "claude"
        stub.write_text(f"#!{python} -SE\n{STUB_SOURCE}")
        stub.chmod(0o755)
        self.warm_shiv = tmp / "shiv-warm"
        # Snapshots: another build during the run must not change what is measured.
        for name in ("pgw.py", "pgw.pyz"):
            if (ROOT / name).exists():
                shutil.copy2(ROOT / name, tmp / name)
        self.pyz_sha256 = hashlib.sha256((tmp / "pgw.pyz").read_bytes()).hexdigest() if (tmp / "pgw.pyz").exists() else "-"

    def worker(self, name: str, label: str, server: str) -> Worker:
        return self.pgw(label, self.warm_shiv, server) if name == "pgw" else self.pgworker(label, server)

    def pgw(self, label: str, shiv_root: Path, server: Optional[str] = None) -> Worker:
        home = self.tmp / label
        write_config(home / "pgworker-home" / "config.json", server or self.server, label)
        env = base_env(self.stub_bin, home / "user")
        env["PGW_HOME"] = str(home / "pgworker-home")
        env["SHIV_ROOT"] = str(shiv_root)
        if self.args.pgw_cmd:
            argv = [*shlex.split(self.args.pgw_cmd), "run"]
        elif self.args.pgw_source:
            argv = [str(ROOT / ".venv" / "bin" / "python"), str(self.tmp / "pgw.py"), "run"]
        else:
            argv = [self.python, str(self.tmp / "pgw.pyz"), "run"]
        if self.args.profile and label.startswith("pgw-r"):
            spy = shutil.which("py-spy") or str(ROOT / ".venv" / "bin" / "py-spy")
            out = self.args.profile
            fmt = {".txt": "raw", ".json": "speedscope"}.get(out.suffix, "flamegraph")
            argv = [spy, "record", "--rate", "200", "--format", fmt, "--output", str(out), "--", *argv]
        return Worker("pgw", label, argv, env, self.tmp / f"{label}.log")

    def pgworker(self, label: str, server: Optional[str] = None) -> Worker:
        home = self.tmp / label
        write_config(home / ".pgworker" / "config.json", server or self.server, label)
        env = base_env(self.stub_bin, home)
        argv = [str(PGWORKER_VENV / "bin" / "pgworker"), "run"]
        return Worker("pgworker", label, argv, env, self.tmp / f"{label}.log")


##############################################################################
# One round, the whole run, the table
##############################################################################


IDLE_SETTLE_S = 5.0


def run_round(setup: Setup, number: int, names: list[str], expected_stream: tuple[int, int],
              expected_lines: Callable[[int, str], tuple[int, int]]) -> dict[str, dict[str, Any]]:
    args, backend = setup.args, setup.backend
    results: dict[str, dict[str, Any]] = {name: {} for name in names}

    def say(text: str) -> None:
        print(f"bench: round {number}: {text}", file=sys.stderr, flush=True)

    if "pgw" in names and not (args.pgw_source or args.pgw_cmd or args.profile):
        fresh = setup.pgw(f"pgw-fresh-r{number}", setup.tmp / f"shiv-fresh-r{number}")
        results["pgw"]["hello_fresh_s"] = fresh.start(backend)
        fresh.stop()
        shutil.rmtree(setup.tmp / f"shiv-fresh-r{number}", ignore_errors=True)

    workers = {
        name: setup.pgw(f"pgw-r{number}", setup.warm_shiv) if name == "pgw" else setup.pgworker(f"pgworker-r{number}")
        for name in names
    }
    try:
        for name in names:
            results[name]["hello_warm_s"] = workers[name].start(backend)
        say(f"{' and '.join(names)} connected; idle for {args.idle_s:g} s")
        # Idle CPU is counted from a few seconds after the last hello (start-up
        # work done) to the end of the idle time, per minute.
        time.sleep(IDLE_SETTLE_S)
        idle_from = {name: (time.time(), own_threads(workers[name].pid)) for name in names}
        for name in names:
            time.sleep(max(0.0, workers[name].hello_t + args.idle_s - time.time()))
            if not args.profile:
                results[name]["idle_rss_mb"] = status_kib(workers[name].pid, "VmRSS") * 1024 / MB
                since, cpu = idle_from[name]
                if time.time() - since >= IDLE_SETTLE_S:
                    per_s = cpu_run_since(cpu, own_threads(workers[name].pid)) / (time.time() - since)
                    results[name]["idle_cpu_ms_per_min"] = per_s * 60_000
        for name in names:
            worker, tag = workers[name], f"{name}-r{number}"
            if not args.profile:
                say(f"{name}: line latency, {args.stages} x {args.lines} lines, {args.stream_mib} MiB stream")
                results[name].update(measure_latency(backend, worker, tag, args.latency_lines))
                results[name].update(measure_concurrent(backend, worker, tag, args.stages, args.lines, expected_lines))
                again = [measure_concurrent(backend, worker, f"{tag}-again{n}", args.stages, args.lines, expected_lines)
                         for n in range(args.again)]
                results[name].update({key.replace("conc_", "conc_again_"): value for key, value in median_of(again).items()})
            elif args.profile_stages:
                say(f"{name}: 5 x {args.stages} x {args.lines} lines under py-spy")
                for run in range(5):
                    results[name].update(measure_concurrent(
                        backend, worker, f"{tag}-{run}", args.stages, args.lines, expected_lines,
                    ))
                continue
            else:
                say(f"{name}: {args.stream_mib} MiB stream under py-spy")
            results[name].update(measure_stream(
                backend, worker, tag, args.stream_mib << 20, ["flood", str(args.stream_mib << 20)], expected_stream,
                not args.no_align,
            ))
            if worker.proc is not None and worker.proc.poll() is not None:
                raise BenchError(f"{name} died (see {worker.log})")
            if name == "pgw" and not args.profile:
                results[name].update(measure_floor(setup.tmp))
    finally:
        for worker in workers.values():
            worker.stop()
    if setup.uvicorn is not None:
        for name in names:
            results[name].update(measure_uvicorn(setup, name, number, say))
    return results


METRICS = [
    # key, label, format, target (kind, value) or None
    ("throughput_mb_s", "relay throughput, {stream} MiB stream (MB/s)", "{:.1f}", ("ratio>=", 1.5)),
    ("cpu_s_per_gib", "worker CPU per GiB relayed (s)", "{:.2f}", ("ratio<=", 0.5)),
    ("cpu_user_s_per_gib", "  of which user (s)", "{:.2f}", None),
    ("cpu_sys_s_per_gib", "  of which system (s)", "{:.2f}", None),
    ("floor_escape_s_per_gib", "  floor: JSON-escaping this output, json_string_bytes (s)", "{:.2f}", None),
    ("floor_mask_s_per_gib", "  floor: masking it, masked_text_frame (s)", "{:.2f}", None),
    ("backend_cpu_s_per_gib", "  (backend's CPU per GiB, for scale) (s)", "{:.2f}", None),
    ("peak_rss_mb", "peak RSS while streaming (MB)", "{:.1f}", ("pgw<=", 40.0)),
    ("hb_gap_s", "largest heartbeat gap while streaming (s)", "{:.2f}", ("pgw<=", 31.0)),
    ("stream_intact", "stream arrived intact (rounds)", None, ("all", None)),
    ("lat_p50_ms", "line latency p50 (ms)", "{:.2f}", None),
    ("lat_p99_ms", "line latency p99 (ms)", "{:.2f}", ("ratio<=", 1.0)),
    ("lat_intact", "line latency: every line arrived (rounds)", None, ("all", None)),
    ("conc_wall_s", "{stages} stages x {lines} lines: wall (s)", "{:.2f}", None),
    ("conc_frames", "{stages} stages x {lines} lines: output messages", "{:.0f}", None),
    ("conc_cpu_s", "{stages} stages x {lines} lines: worker CPU (s)", "{:.3f}", ("ratio<=", 1.0)),
    ("conc_roots_cpu_s", "  and pgw's stage roots' (s)", "{:.3f}", None),
    ("conc_intact", "{stages} stages x {lines} lines: all intact (rounds)", None, ("all", None)),
    ("conc_again_frames", "the same again at once: output messages", "{:.0f}", None),
    ("conc_again_cpu_s", "the same again at once, median of {again}: worker CPU (s)", "{:.3f}", ("ratio<=", 1.0)),
    ("conc_again_roots_cpu_s", "  and pgw's stage roots' (s)", "{:.3f}", None),
    ("conc_again_intact", "the same again at once: all intact (rounds)", None, ("all", None)),
    ("idle_rss_mb", "idle RSS after {idle} s connected (MB)", "{:.1f}", ("ratio<=", 1.0)),
    ("idle_cpu_ms_per_min", "idle CPU while connected (ms per minute)", "{:.1f}", ("ratio<=", 1.0)),
    ("hello_warm_s", "start to hello, warm (s)", "{:.3f}", ("pgw<=", 0.3)),
    ("hello_fresh_s", "start to hello, first run after extraction (s)", "{:.3f}", None),
    # Against Starlette on uvicorn at its defaults (permessage-deflate when offered):
    ("link_files_s", "uvicorn, {link} MB/s link: {files} MiB files request, to exit (s)", "{:.2f}", ("ratio<=", 1.0)),
    ("link_files_wire_mb", "  bytes on the wire, both ways (MB)", "{:.1f}", ("ratio<=", 1.0)),
    ("link_files_down_mb", "  of which to the worker (MB)", "{:.1f}", None),
    ("link_files_intact", "  files arrived intact (rounds)", None, ("all", None)),
    ("link_json_s", "uvicorn, {link} MB/s link: {json} MiB of JSON lines, to exit (s)", "{:.2f}", ("ratio<=", 1.0)),
    ("link_json_wire_mb", "  bytes on the wire, both ways (MB)", "{:.1f}", ("ratio<=", 1.0)),
    ("link_json_up_mb", "  of which from the worker (MB)", "{:.1f}", None),
    ("link_json_intact", "  output arrived intact (rounds)", None, ("all", None)),
    ("uv_throughput_mb_s", "uvicorn, loopback: relay throughput, {loop} MiB of JSON lines (MB/s)", "{:.1f}",
     ("ratio>=", 1.0)),
    ("uv_cpu_s_per_gib", "  worker CPU per GiB relayed (s)", "{:.2f}", ("ratio<=", 1.0)),
    ("uv_cpu_user_s_per_gib", "    of which user (s)", "{:.2f}", None),
    ("uv_backend_cpu_s_per_gib", "  (backend's CPU per GiB, for scale) (s)", "{:.2f}", None),
    ("uv_peak_rss_mb", "  peak RSS while streaming (MB)", "{:.1f}", None),
    ("uv_intact", "  output arrived intact (rounds)", None, ("all", None)),
    ("uv_deflate_offered", "  worker offered permessage-deflate (rounds)", None, None),
]


def summarise(rounds: list[dict[str, dict[str, Any]]], names: list[str]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for key, *_ in METRICS:
        summary[key] = {}
        for name in names:
            values = [r[name][key] for r in rounds if r[name].get(key) is not None]
            if not values:
                continue
            if isinstance(values[0], bool):
                summary[key][name] = {"ok": sum(values), "of": len(values)}
            else:
                summary[key][name] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return summary


def table(summary: dict[str, dict[str, Any]], names: list[str], args: argparse.Namespace) -> str:
    header = ["metric"] + [f"{n} median [min-max]" for n in names]
    if len(names) == 2:
        header += ["pgw/pgworker"]
    header += ["target"]
    rows = [header]
    for key, label, fmt, target in METRICS:
        cells = [label.format(stream=args.stream_mib, stages=args.stages, lines=f"{args.lines:,}", idle=f"{args.idle_s:g}",
                              link=f"{args.link_mb_s:g}", files=args.files_mib, json=args.json_mib,
                              loop=args.json_mib * LOOPBACK_REPEATS, again=args.again)]
        figures = summary.get(key, {})
        if not figures:
            continue
        for name in names:
            figure = figures.get(name)
            if figure is None:
                cells.append("-")
            elif fmt is None:
                cells.append(f"{figure['ok']}/{figure['of']}")
            else:
                cells.append(f"{fmt.format(figure['median'])} [{fmt.format(figure['min'])}-{fmt.format(figure['max'])}]")
        ratio = None
        if len(names) == 2 and fmt is not None and "pgw" in figures and "pgworker" in figures and figures["pgworker"]["median"]:
            ratio = figures["pgw"]["median"] / figures["pgworker"]["median"]
        if len(names) == 2:
            cells.append(f"{ratio:.2f}" if ratio is not None else "")
        cells.append(verdict(target, figures, ratio))
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


PROBLEM_KEYS = {
    "stream_problems": "the stream",
    "conc_problems": "the concurrent stages",
    "conc_again_problems": "the concurrent stages, again",
    "link_files_problems": "uvicorn, the files request over the link",
    "link_json_problems": "uvicorn, the JSON lines over the link",
    "uv_problems": "uvicorn, the JSON lines on loopback",
}


def problem_notes(rounds: list[dict[str, dict[str, Any]]]) -> list[str]:
    """What was wrong with each output that did not arrive intact, round by round."""
    notes = []
    for number, figures in enumerate(rounds, 1):
        for name, results in figures.items():
            for key, what in PROBLEM_KEYS.items():
                if results.get(key):
                    notes.append(f"round {number}, {name}, {what}: {'; '.join(results[key][:3])}")
    return notes


def verdict(target: Optional[tuple[str, Any]], figures: dict[str, Any], ratio: Optional[float]) -> str:
    if target is None:
        return ""
    kind, value = target
    pgw = figures.get("pgw")
    if kind == "all":
        return "all: " + ("met" if pgw and pgw["ok"] == pgw["of"] else "MISSED") if pgw else ""
    if kind.startswith("ratio"):
        text = f"{kind[5:].replace('>=', '>=').replace('<=', '<=')} {value:g}x"
        if ratio is None:
            return text
        met = ratio >= value if kind == "ratio>=" else ratio <= value
        return f"{text}: {'met' if met else 'MISSED'}"
    text = f"<= {value:g}"
    if pgw is None:
        return text
    return f"{text}: {'met' if pgw['median'] <= value else 'MISSED'}"


def machine_description(python: str) -> dict[str, Any]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    version = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"],
                             capture_output=True, text=True).stdout.strip()
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": model,
        "kernel": os.uname().release,
        "python": f"{version} ({python})",
    }


def git_head() -> str:
    out = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return out.stdout.strip() or "?"


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench.py", description="Benchmark pgw against pgworker 0.1.2 on a loopback backend.",
    )
    parser.add_argument("--rounds", type=int, help="rounds, alternating the order (default 3; 1 with --quick)")
    parser.add_argument("--only", choices=["pgw", "pgworker"], help="run one worker only")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every round's figures to FILE")
    parser.add_argument("--quick", action="store_true",
                        help="a sanity run: 1 round, 5 s idle, 32 MiB, 100 ticks, 10 x 500 lines, no heartbeat alignment, "
                             "2 MiB of files and 4 MiB of JSON lines for uvicorn")
    parser.add_argument("--idle-s", type=float, help="seconds connected before idle RSS is read (default 60)")
    parser.add_argument("--stream-mib", type=int, help="MiB written by the stream stage (default 200)")
    parser.add_argument("--latency-lines", type=int, help="timestamped lines, one every 20 ms (default 1000)")
    parser.add_argument("--stages", type=int, help="concurrent stages (default 50)")
    parser.add_argument("--lines", type=int, help="lines per concurrent stage (default 2000)")
    parser.add_argument("--again", type=int,
                        help="how many times the concurrent stages run again at once, their median taken (default 5; 1 "
                             "with --quick)")
    parser.add_argument("--no-align", action="store_true",
                        help="do not wait for a heartbeat to be due during the stream (heartbeat gap may be missing)")
    parser.add_argument("--files-mib", type=int,
                        help="MiB of text files in the stage.request sent over the link (default 16)")
    parser.add_argument("--json-mib", type=int,
                        help=f"MiB of JSON lines written over the link; {LOOPBACK_REPEATS} times that on loopback "
                             "(default 32)")
    parser.add_argument("--link-mb-s", type=float, default=4.0,
                        help="the link's rate each way, in MB/s, for the uvicorn rows over a link (default 4; 0: "
                             "no link rows)")
    parser.add_argument("--no-uvicorn", action="store_true",
                        help="no uvicorn backend: none of its rows (link or loopback)")
    parser.add_argument("--deflate", action="store_true",
                        help="the backend accepts permessage-deflate (pgworker then compresses; pgw does not offer it)")
    parser.add_argument("--pgw-source", action="store_true",
                        help="run pgw.py with .venv's python instead of pgw.pyz (no fresh-extraction figure)")
    parser.add_argument("--pgw-cmd", metavar="CMD",
                        help="run pgw as CMD run (shell words), e.g. '.venv/bin/python variant.py' to try a change "
                             "(no fresh-extraction figure)")
    parser.add_argument("--profile", type=Path, metavar="FILE",
                        help="profile pgw.py (as --pgw-source) relaying the stream alone, under `py-spy record` "
                             "(pip install py-spy into .venv), into FILE: .svg flamegraph, .json speedscope, .txt raw "
                             "(collapsed stacks); implies --only pgw --rounds 1 --idle-s 0 --no-align")
    parser.add_argument("--profile-stages", action="store_true",
                        help="with --profile: profile 5 runs of the concurrent stages test instead of the stream")
    parser.add_argument("--python", default="python3",
                        help="interpreter for pgw.pyz and the pgworker venv (default: python3, resolved past shims)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--transport", choices=["websockets", "uvicorn"], default="websockets", help=argparse.SUPPRESS)
    parser.add_argument("--link", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--link-target", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--arena-mib", type=int, default=256, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = {"rounds": 1, "idle_s": 5.0, "stream_mib": 32, "latency_lines": 100, "stages": 10, "lines": 500,
             "again": 1, "files_mib": 2, "json_mib": 4}
    # 1000 ticks (20 s) give p99 ten samples to stand on, and still end with
    # the 50 stages before the heartbeat the stream waits for is due.
    full = {"rounds": 3, "idle_s": 60.0, "stream_mib": 200, "latency_lines": 1000, "stages": 50, "lines": 2000,
            "again": 5, "files_mib": 16, "json_mib": 32}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:
        args.no_align = True
    if args.profile:
        args.only, args.rounds, args.idle_s, args.no_align, args.pgw_source = "pgw", 1, 0.0, True, True
        args.no_uvicorn = True
    if args.link_mb_s < 0 or args.files_mib < 1 or args.json_mib < 1 or args.again < 1:
        parser.error("--link-mb-s must be 0 or more, --files-mib, --json-mib and --again 1 or more")
        args.profile = args.profile.resolve()
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.serve:
        return serve(args.transport, args.deflate, args.arena_mib << 20)
    if args.link:
        return serve_link(args.link_target, args.link_mb_s * MB)
    if not sys.platform.startswith("linux"):
        print("bench: needs Linux (/proc)", file=sys.stderr)
        return 2
    if not args.pgw_source and not (ROOT / "pgw.pyz").exists():
        print("bench: no pgw.pyz: run ./build.sh bench (it builds it first)", file=sys.stderr)
        return 2
    python = real_python(args.python)
    names = [args.only] if args.only else ["pgw", "pgworker"]
    command = os.environ.get("PGW_BENCH_COMMAND") or shlex.join(["python", "tests/bench.py", *sys.argv[1:]])
    venv = ensure_pgworker_venv(python)  # the backend runs on its websockets too
    clean_python = str(ensure_clean_venv(python))

    stub = _stub_namespace()
    crc, length = 0, 0
    for chunk in stub["flood_chunks"](args.stream_mib << 20):
        crc, length = zlib.crc32(chunk, crc), length + len(chunk)
    expected_stream = (length, crc)

    def expected_lines(count: int, tag: str) -> tuple[int, int]:
        data = b"".join(stub["line_chunks"](count, tag))
        return len(data), zlib.crc32(data)

    tmp = Path(tempfile.mkdtemp(prefix="pgw-bench-"))
    started = time.monotonic()
    data: Optional[RealisticData] = None
    if not args.no_uvicorn:
        print(f"bench: generating {args.files_mib} MiB of text files and {args.json_mib} MiB of JSON lines",
              file=sys.stderr, flush=True)
        data = RealisticData(tmp, args.files_mib, args.json_mib)
        print(f"bench: data: {data.description}", file=sys.stderr, flush=True)
    # Room for the whole stream as JSON (escapes make it ~10% larger).
    backend = Backend(venv / "bin" / "python", "websockets", args.deflate, args.stream_mib * 5 // 4 + 16, tmp)
    uvicorn_backend: Optional[Backend] = None
    link: Optional[Link] = None
    failed = True
    try:
        if data is not None:
            uvicorn_backend = Backend(venv / "bin" / "python", "uvicorn", False,
                                      (data.loopback_bytes >> 20) * 5 // 4 + 16, tmp)
            impl = uvicorn_backend.listening
            if "websockets" not in impl["ws_impl"].split(".")[-2] or not impl["ws_per_message_deflate"]:
                raise BenchError(f"uvicorn's default WebSocket here is {impl['ws_impl']} with ws_per_message_deflate="
                                 f"{impl['ws_per_message_deflate']}, not websockets with permessage-deflate: "
                                 "the uvicorn rows would not measure what the real backend runs")
            if args.link_mb_s > 0:
                link = Link(uvicorn_backend.port, args.link_mb_s, tmp)
        setup = Setup(args, tmp, backend, clean_python, uvicorn_backend, link, data)
        # Warm-ups, not measured: extract pgw.pyz into the warm SHIV_ROOT and
        # bring both workers' files into the page cache.
        warmups = []
        if "pgw" in names:
            warmups.append(setup.pgw("pgw-warmup", setup.warm_shiv))
        if "pgworker" in names:
            warmups.append(setup.pgworker("pgworker-warmup"))
        for worker in warmups:
            worker.start(backend)
            worker.stop()
        rounds = []
        for number in range(1, args.rounds + 1):
            order = names if number % 2 else names[::-1]
            rounds.append(run_round(setup, number, order, expected_stream, expected_lines))
        failed = False
    except BenchError as exc:
        print(f"bench: {exc}; logs kept in {tmp}", file=sys.stderr)
        return 1
    finally:
        for helper in (link, uvicorn_backend, backend):
            if helper is not None:
                helper.close()
        if not failed:
            shutil.rmtree(tmp, ignore_errors=True)

    summary = summarise(rounds, names)
    machine = machine_description(python)
    print()
    print(f"command: {command}")
    print(f"machine: {machine['nproc']} CPUs ({machine['cpu']}), Linux {machine['kernel']}, Python {machine['python']}")
    what = (f"`{args.pgw_cmd}`" if args.pgw_cmd else "pgw.py from source" if args.pgw_source
            else f"pgw.pyz sha256 {setup.pyz_sha256[:16]}")
    print(f"pgw: {what} at {git_head()}; pgworker: {PGWORKER_REQUIREMENT}; backend: websockets, "
          f"{'permessage-deflate offered' if args.deflate else 'no compression'}")
    if uvicorn_backend is not None and data is not None:
        print(f"uvicorn backend: {uvicorn_backend.description}; "
              + (f"link: {args.link_mb_s:g} MB/s each way (a throttling TCP proxy)" if link else "no link rows"))
        print(f"data: {data.description}")
    print(f"{args.rounds} round(s), median [min-max]; MB = 10^6 bytes; took {time.monotonic() - started:.0f} s")
    print()
    print(table(summary, names, args))
    notes = problem_notes(rounds)
    if notes:
        print("\nnot intact:")
        print("\n".join(f"  {note}" for note in notes))
    if args.json:
        args.json.write_text(json.dumps({
            "command": command, "machine": machine, "pgw": what, "git": git_head(),
            "uvicorn_backend": uvicorn_backend.description if uvicorn_backend else None,
            "data": data.description if data else None,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "rounds": rounds, "summary": summary,
        }, indent=2) + "\n")
        print(f"\nbench: figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
