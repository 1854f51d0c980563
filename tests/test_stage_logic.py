"""The daemon's pure parts: backoff, frame splitting, request checks, codex trace, outbox."""

from __future__ import annotations

import base64
import datetime
import errno
import json
import logging
import os
import re
import subprocess
import time

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

import pgw

# Backoff ---------------------------------------------------------------------


def test_backoff_first_retry_within_one_second_then_doubles_to_cap():
    highest = pgw.Backoff(random_fraction=lambda: 1.0)
    lowest = pgw.Backoff(random_fraction=lambda: 0.0)
    assert [highest.next_delay_s() for _ in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert [lowest.next_delay_s() for _ in range(3)] == [0.5, 1, 2]


def test_backoff_reset_starts_over():
    backoff = pgw.Backoff(random_fraction=lambda: 1.0)
    for _ in range(20):
        backoff.next_delay_s()
    backoff.reset()
    assert backoff.next_delay_s() == 1


def test_backoff_never_overflows_after_days_of_failures():
    backoff = pgw.Backoff()
    delays = [backoff.next_delay_s() for _ in range(100_000)]
    assert max(delays) <= 60 and min(delays[10:]) >= 30


# Frames ----------------------------------------------------------------------


def read_in_pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` as escaped_read sends it when a pipe hands it over cut at `cuts`."""
    cuts = sorted({cut for cut in cuts if 0 < cut < len(data)})  # an empty read is the end of the stream
    reads = [data[start:end] for start, end in zip([0, *cuts], [*cuts, len(data)])] + [b""]
    pieces, cut_off = [], b""
    for read in reads:
        escaped, cut_off = pgw.escaped_read(cut_off + read, ended=not read)
        pieces += escaped
    assert cut_off == b""
    return pieces


UTF8_EDGES = st.sampled_from([b"a", b'"', b"\\", b"\x00", b"\x1f", b"\x7f", "é".encode(), "∀".encode(), "🙂".encode(),
                              b"\xff", b"\xc3", b"\xe2\x88", b"\xf0\x9f\x99", b"\xed\xa0\x80", b"\x80"])


@given(st.lists(UTF8_EDGES | st.binary(max_size=8), max_size=60), st.data())
def test_reads_escaped_as_bytes_carry_what_a_decoder_makes_of_the_whole(parts, draw):
    data = b"".join(parts)
    cuts = draw.draw(st.lists(st.integers(min_value=0, max_value=len(data)), max_size=20))
    pieces = read_in_pieces(data, cuts)
    assert "".join(json.loads(piece) for piece in pieces) == data.decode("utf-8", "replace")
    for piece in pieces:
        piece.decode("utf-8")  # every message is valid UTF-8


@pytest.mark.parametrize("text", ["∀ x ≤ y → " * 40_000, "\x01é" * 150_000, "\"🙂" * 100_000])
def test_a_read_escaped_as_bytes_stays_within_a_frame_and_a_message(text):
    data = text.encode()
    pieces = read_in_pieces(data, list(range(0, len(data), pgw.PIPE_READ_BYTES)))
    assert "".join(json.loads(piece) for piece in pieces) == text
    for piece in pieces:
        assert len(json.loads(piece).encode()) <= pgw.FRAME_MAX_BYTES
        assert len(piece) <= pgw.OUTPUT_DATA_MAX_ESCAPED_BYTES


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=300), st.integers(min_value=4, max_value=64))
def test_split_text_keeps_characters_whole_and_pieces_small(text, limit):
    pieces = pgw.split_text(text, limit)
    assert "".join(pieces) == text
    assert all(len(piece.encode()) <= limit for piece in pieces)
    assert all(pieces) or pieces == [""]


def test_split_text_a_full_frame_of_multibyte_characters():
    text = "证" * (pgw.FRAME_MAX_BYTES // 3 + 10)  # 3 bytes each: just over one frame
    pieces = pgw.split_text(text)
    assert len(pieces) == 2 and "".join(pieces) == text
    assert len(pieces[0].encode()) <= pgw.FRAME_MAX_BYTES


# Request checks --------------------------------------------------------------


@pytest.mark.parametrize(
    "name, why",
    [
        ("/etc/passwd", "absolute"),
        ("\\\\server\\share\\x", "absolute"),
        ("C:\\x", "absolute"),
        ("../x", "`..`"),
        ("a/../../x", "`..`"),
        ("a\\..\\..\\x", "`..`"),
        ("", "empty"),
        ("a\0b", "NUL"),
        ("./", "names no file"),
    ],
)
def test_unsafe_file_paths_are_rejected(name, why):
    with pytest.raises(pgw.StageRejected, match="unsafe file path") as caught:
        pgw.check_file_path(name)
    assert why in str(caught.value)


def test_safe_file_paths_keep_subfolders():
    assert pgw.check_file_path("src/main.py") == ("src", "main.py")
    assert pgw.check_file_path("./a//b") == ("a", "b")


def encode_b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_files_are_decoded():
    assert pgw.check_stage_files({"a/b.txt": encode_b64(b"hi")}) == [(("a", "b.txt"), b"hi")]


@pytest.mark.parametrize("first, second", [
    ("a/b", "a//b"), ("a/b", "./a/b"), ("a/b", "a\\b"), ("a/b", "a/./b/"), ("x", "x/"),
])
def test_two_names_for_one_file_make_the_request_bad(first, second):
    # The last one's content won without a word: the other file was lost.
    files = {first: encode_b64(b"one"), second: encode_b64(b"two")}
    with pytest.raises(pgw.StageRejected, match=f"bad request: files {re.escape(repr(first))} and {re.escape(repr(second))} name the same file"):
        pgw.check_stage_files(files)


@pytest.mark.parametrize("platform, aliases", [("darwin", True), ("linux", False)])
def test_names_one_file_only_on_a_file_system_that_folds_them(monkeypatch, platform, aliases):
    # macOS's default file system takes `Job/A.txt` and `job/a.txt`, or é as
    # one character and as e and its accent, for one file; Linux's do not.
    monkeypatch.setattr(pgw.sys, "platform", platform)
    for first, second in (("Job/A.txt", "job/a.txt"), ("caf\u00e9", "cafe\u0301")):
        files = {first: encode_b64(b"one"), second: encode_b64(b"two")}
        if aliases:
            with pytest.raises(pgw.StageRejected, match="name the same file"):
                pgw.check_stage_files(files)
        else:
            assert len(pgw.check_stage_files(files)) == 2


@pytest.mark.parametrize("names", [["a", "a/b"], ["a/b/c", "a/b"], ["d/e", "d/e/f/g"]])
def test_a_file_that_is_a_directory_of_another_makes_the_request_bad(names):
    with pytest.raises(pgw.StageRejected, match="is a directory in the path of"):
        pgw.check_stage_files({name: encode_b64(b"x") for name in names})
    assert len(pgw.check_stage_files({"a/b": encode_b64(b"x"), "a/c": encode_b64(b"y"), "ab": encode_b64(b"z")})) == 3


def test_invalid_base64_makes_the_request_bad():
    with pytest.raises(pgw.StageRejected, match="'x.bin' is not valid base64"):
        pgw.check_stage_files({"x.bin": "not base64!"})


def test_files_over_50_mib_in_total_are_refused():
    half = encode_b64(b"\0" * (25 * 2**20))
    assert len(pgw.check_stage_files({"a": half, "b": half})) == 2
    with pytest.raises(pgw.StageRejected, match="files too large"):
        pgw.check_stage_files({"a": half, "b": half, "c": encode_b64(b"x")})


# 128 `ü` or 100 emoji are 256 and 400 bytes: within 200 characters, over the
# 255 bytes of a file name, which failed as "cannot write the stage's files".
@pytest.mark.parametrize("stage_run_id", ["", ".", "..", "a/b", "a\\b", "x\0", "y" * 201, "\u00fc" * 128, "\U0001f600" * 64])
def test_stage_ids_that_cannot_name_a_directory(stage_run_id):
    with pytest.raises(pgw.StageRejected, match="cannot name a scratch directory"):
        pgw.check_stage_id(stage_run_id)


@pytest.mark.parametrize("stage_run_id", ["y" * 200, "\u00fc" * 127, "\U0001f600" * 63])
def test_stage_ids_up_to_255_bytes_name_a_directory(stage_run_id, tmp_path):
    pgw.check_stage_id(stage_run_id)
    (tmp_path / stage_run_id).mkdir()


def test_stage_environment_drops_pgw_settings_and_names_the_stage():
    worker = {"PATH": "/bin", "PGW_TOKEN": "secret", "PGW_SERVER": "http://s", "HOME": "/h"}
    environ = pgw.stage_environment(worker, {"HOME": "/other", "X": "1", "PGW_STAGE_ID": "forged"}, "run-7")
    assert environ == {"PATH": "/bin", "HOME": "/other", "X": "1", "PGW_STAGE_ID": "run-7"}


# Codex trace -----------------------------------------------------------------


def rollout_records(cwd: str) -> list[dict]:
    def assistant(text):
        return {"type": "response_item", "payload": {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}}

    return [
        {"type": "session_meta", "payload": {"cwd": cwd}},
        assistant("looking at the graph"),
        {"type": "response_item", "payload": {"type": "reasoning", "summary": [{"text": "check lemma 3"}]}},
        {"type": "response_item", "payload": {"type": "message", "role": "user", "content": [{"text": "ignored"}]}},
        assistant("final answer"),
    ]


def test_codex_trace_leaves_out_the_last_message():
    trace = pgw.codex_trace(rollout_records("/x")[1:], "rollout.jsonl")
    assert pgw.CODEX_TRACE_HEADER in trace
    assert "looking at the graph" in trace and "check lemma 3" in trace
    assert "final answer" not in trace and "ignored" not in trace


def test_codex_trace_empty_when_nothing_new():
    assert pgw.codex_trace(rollout_records("/x")[-1:], "r") == ""


def today(sessions):
    """Where codex files a session started now: by its day, in local time."""
    return sessions.joinpath(*time.strftime("%Y %m %d").split())


def write_rollout(sessions, name, records, age_s=0.0, day=None):
    day = day or today(sessions)
    day.mkdir(parents=True, exist_ok=True)
    path = day / name
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def test_read_codex_trace_finds_the_rollout_of_this_scratch_dir(tmp_path):
    scratch, sessions = tmp_path / "scratch" / "s1", tmp_path / "sessions"
    scratch.mkdir(parents=True)
    write_rollout(sessions, "rollout-other.jsonl", rollout_records("/elsewhere"))
    path = write_rollout(sessions, "rollout-mine.jsonl", rollout_records(str(scratch.resolve())))
    trace = pgw.read_codex_trace(scratch, sessions, time.time() - 60, time.time())
    assert "looking at the graph" in trace and str(path) in trace


def test_a_rollout_nested_too_deep_for_the_parser_is_passed_over(tmp_path):
    # Any process of the user may write a rollout; one that Python's parser
    # cannot take (RecursionError) must not fail every codex stage after it.
    scratch, sessions = tmp_path / "s1", tmp_path / "sessions"
    scratch.mkdir()
    day = today(sessions)
    day.mkdir(parents=True)
    (day / "rollout-deep.jsonl").write_text("[" * 100_000 + "\n")
    mine = rollout_records(str(scratch.resolve()))
    (day / "rollout-mine.jsonl").write_text(
        json.dumps(mine[0]) + "\n" + "[" * 100_000 + "\n" + "\n".join(json.dumps(r) for r in mine[1:]) + "\n"
    )
    os.utime(day / "rollout-deep.jsonl")  # the newest: read first
    assert "looking at the graph" in pgw.read_codex_trace(scratch, sessions, time.time() - 60, time.time())


def test_read_codex_trace_ignores_rollouts_older_than_an_hour(tmp_path):
    scratch, sessions = tmp_path / "s1", tmp_path / "sessions"
    scratch.mkdir()
    write_rollout(sessions, "rollout-old.jsonl", rollout_records(str(scratch.resolve())), age_s=3700)
    assert pgw.read_codex_trace(scratch, sessions, time.time() - 60, time.time()) == ""


def test_only_the_days_a_session_of_the_stage_can_be_filed_under_are_read(tmp_path):
    # Every rollout of the user's was looked at: years of sessions (10^5 files)
    # cost each codex stage seconds before its exit.  Codex files a session by
    # the local day it started: one that started before midnight is still found.
    scratch, sessions = tmp_path / "s1", tmp_path / "sessions"
    scratch.mkdir()
    mine = rollout_records(str(scratch.resolve()))
    write_rollout(sessions, "rollout-filed-long-ago.jsonl", mine, day=sessions / "2020" / "01" / "01")
    assert pgw.read_codex_trace(scratch, sessions, time.time() - 60, time.time()) == ""
    midnight = datetime.datetime.combine(datetime.date.today(), datetime.time()).timestamp()
    yesterday = sessions.joinpath(*time.strftime("%Y %m %d", time.localtime(midnight - 60)).split())
    write_rollout(sessions, "rollout-before-midnight.jsonl", mine, day=yesterday)
    assert "looking at the graph" in pgw.read_codex_trace(scratch, sessions, midnight - 60, time.time())
    assert [day.name for day in pgw.codex_days(sessions, midnight - 60, midnight + 60)] == [
        f"{datetime.date.today() + datetime.timedelta(days=offset):%d}" for offset in (-2, -1, 0, 1)
    ]


@pytest.fixture
def stuck_scratch(tmp_path):
    """A scratch dir holding a file nothing can remove (`chattr +i`) for the test's length."""
    scratch = tmp_path / "scratch" / "job-7"
    scratch.mkdir(parents=True)
    stuck = scratch / "f"
    stuck.write_text("x")
    if subprocess.run(["chattr", "+i", str(stuck)], capture_output=True, check=False).returncode != 0:
        pytest.skip("no chattr +i on this file system")
    try:
        yield scratch
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], check=True)


def test_what_cleanup_cannot_remove_is_named_with_its_scratch_dir(stuck_scratch, caplog):
    # It said "cannot remove f": neither where f was nor which stage's it was.
    with caplog.at_level(logging.WARNING, logger="pgw"):
        pgw.remove_scratch(stuck_scratch)
    assert f"cannot remove 'f' in {stuck_scratch}: Operation not permitted" in caplog.text


def test_a_scratch_dir_left_for_good_refuses_its_id_saying_so(stuck_scratch):
    # A later request of the same id was refused with a bare "File exists".
    with pytest.raises(OSError) as refused:
        pgw.write_scratch(stuck_scratch, [])
    assert refused.value.strerror == f"an earlier stage's {stuck_scratch} is left, and cannot be removed (see run.log)"


# Outbox ----------------------------------------------------------------------


async def test_outbox_is_bounded_fifo_and_heartbeats_jump_the_queue():
    outbox = pgw.Outbox(max_frames=2)
    counter = iter(range(1, 100))
    order = []

    async def producer(name):
        for _ in range(3):
            await outbox.put(lambda: f"{name}{next(counter)}".encode())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(producer, "a")
        nursery.start_soon(producer, "b")
        await trio.testing.wait_all_tasks_blocked()
        assert len(outbox._frames) == 2  # the producers are parked: bounded
        outbox.put_urgent(b"ping")
        for _ in range(7):
            order.append(await outbox.get())
    assert order[0] == b"ping"
    numbers = [int(text[1:]) for text in order[1:]]
    assert numbers == sorted(numbers), "the text made at enqueue follows queue order"


async def test_outbox_wait_drained_returns_once_everything_is_taken():
    outbox = pgw.Outbox()
    await outbox.put(lambda: b"x")
    drained = False

    async def waiter():
        nonlocal drained
        await outbox.wait_drained()
        drained = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert not drained
        assert await outbox.get() == b"x"
        nursery.start_soon(outbox.get)  # the sender coming back for more
        await trio.testing.wait_all_tasks_blocked()
        assert drained
        nursery.cancel_scope.cancel()


# Logging ---------------------------------------------------------------------


def test_log_filter_hides_the_token_even_url_quoted():
    record = logging.LogRecord("pgw", logging.INFO, __file__, 1, "url %s and %s", ("ws://h/?token=ab/c d", "ab%2Fc%20d"), None)
    pgw.RedactToken("ab/c d").filter(record)
    assert record.getMessage() == "url ws://h/?token=<token> and <token>"


def test_log_filter_redacts_once_however_many_handlers():
    redact = pgw.RedactToken("tok-secret")
    record = logging.LogRecord("pgw", logging.INFO, __file__, 1, "token tok-secret", (), None)
    assert redact.filter(record) and redact.filter(record)
    assert record.getMessage() == "token <token>"


def test_log_filter_leaves_a_degenerate_short_token_alone():
    record = logging.LogRecord("pgw", logging.INFO, __file__, 1, "started: server=http://h", (), None)
    pgw.RedactToken("t").filter(record)
    assert record.getMessage() == "started: server=http://h"


# The exit a stage owes -----------------------------------------------------------


def test_a_negative_timeout_is_named_as_the_zero_it_was_taken_for():
    record = pgw.stage_exit("s1", pgw.StageOutcome(timeout_s=-5, duration_ms=0, stopped=True))
    assert record.error == "timed out after 0 s"


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        (dict(returncode=0, started=True), (0, None)),
        (dict(returncode=-15, started=True, stopped=True, stop_error="cancelled by the server (SIGTERM)"),
         (-15, "cancelled by the server (SIGTERM)")),
        (dict(returncode=-9, started=True, stopped=True), (-9, "timed out after 30 s")),
        (dict(stopped=True, stop_error="worker shutting down"), (-1, "worker shutting down, before it started")),
        (dict(returncode=-9, stopped=True), (-1, "timed out after 30 s")),  # killed before its ack: -1
        (dict(rejected="CLI not found: 'codex' is not on PATH (/bin)"), (-1, "CLI not found: 'codex' is not on PATH (/bin)")),
    ],
)
def test_stage_exit_says_what_happened(outcome, expected):
    record = pgw.stage_exit("s1", pgw.StageOutcome(timeout_s=30, duration_ms=5, **outcome))
    assert (record.returncode, record.error) == expected and record.duration_ms == 5


# The keepalive's decisions, on a simulated clock ----------------------------

def simulate_keepalive(busy: bool, silent_from: float, answer_delay: dict[str, float], until: float = 300.0):
    """Run `keepalive_step` against a server that answers heartbeats after
    answer_delay["heartbeat"] seconds and WebSocket pings after
    answer_delay["ping"] (None: never), on a path that carries nothing from
    `silent_from` on.  Returns when the connection was found dead, or None."""
    timing = pgw.Timing()
    now, last, heartbeat_at, pinged_at = 0.0, 0.0, -float("inf"), -float("inf")
    arrivals: list[float] = []
    while now < until:
        action, wake_at = pgw.keepalive_step(timing, now, last, heartbeat_at, pinged_at, busy)
        if action == "dead":
            return now
        if action in ("heartbeat", "ping"):
            if action == "heartbeat":
                heartbeat_at = now
            else:
                pinged_at = now
            delay = answer_delay[action]
            if delay is not None and now + delay < silent_from:
                arrivals.append(now + delay)
            continue
        assert wake_at > now, (action, wake_at, now)
        pending = sorted(arrival for arrival in arrivals if arrival > now)
        now = min([wake_at, *pending[:1]])
        last = max([last, *(arrival for arrival in arrivals if arrival <= now)])
    return None


@given(
    busy=st.booleans(),
    heartbeat_answer=st.one_of(st.none(), st.floats(0.001, 3.9)),
    ping_answer=st.floats(0.001, 8.9),
)
def test_a_live_server_is_never_judged_dead(busy, heartbeat_answer, ping_answer):
    # It may leave every heartbeat unanswered, but answers WebSocket pings (RFC 6455 says it must).
    assert simulate_keepalive(busy, float("inf"), {"heartbeat": heartbeat_answer, "ping": ping_answer}) is None


@given(
    busy=st.booleans(),
    silent_from=st.floats(0.0, 120.0),
    heartbeat_answer=st.one_of(st.none(), st.floats(0.001, 3.9)),
    ping_answer=st.floats(0.001, 8.9),
)
def test_a_silent_path_is_found_dead_in_time_to_reconnect_within_45_s(busy, silent_from, heartbeat_answer, ping_answer):
    # Idle, a reconnection follows at once (1 s retry); with stages, after their 10 s kill grace.
    dead_at = simulate_keepalive(busy, silent_from, {"heartbeat": heartbeat_answer, "ping": ping_answer})
    assert dead_at is not None
    limit = 45 - 1 - (pgw.Timing().cancel_grace_s if busy else 0)
    assert dead_at - silent_from <= limit, f"found dead {dead_at - silent_from:.1f} s after the path went silent"


def test_an_idle_connection_whose_server_answers_heartbeats_is_woken_once_per_heartbeat():
    timing = pgw.Timing()
    # Answered heartbeat: nothing to do until the next one.
    assert pgw.keepalive_step(timing, 0.1, 0.05, 0.0, -float("inf"), busy=False) == ("wait", timing.heartbeat_s)
    # Unanswered: a WebSocket ping once its answer is overdue, and no sooner.
    assert pgw.keepalive_step(timing, 0.1, -1.0, 0.0, -float("inf"), busy=False) == ("wait", timing.heartbeat_answer_s)
    assert pgw.keepalive_step(timing, timing.heartbeat_answer_s, -1.0, 0.0, -float("inf"), busy=False)[0] == "ping"


@pytest.mark.parametrize("prompt, failing", [(None, n) for n in (1, 2, 3, 4)] + [(b"x" * 10, n) for n in (1, 2, 3, 4, 5)]
                         + [(b"x" * (1 << 20), 5)])
def test_a_stage_whose_pipes_cannot_all_be_made_leaves_none_open(monkeypatch, tmp_path, prompt, failing):
    # Out of file descriptors at the second pipe, the first one's two ends
    # stayed open for the daemon's life, one more each time.
    made = []
    real_pipe, real_socketpair = pgw.os.pipe, pgw.socket.socketpair

    def made_unless_failing(make):
        def make_or_fail(*args):
            if len(made) + 1 == failing:
                raise OSError(errno.EMFILE, "Too many open files")
            made.append(make(*args))
            return made[-1]
        return make_or_fail

    request = pgw.StageRequest(stage_run_id="s", job_id="j", cli="claude", cli_args=[], stdin="")
    prepared = pgw.PreparedStage(request, tmp_path / "s", ["/bin/true"], {}, [])
    spawner = pgw.StageSpawner(root_idle_s=1.0)

    async def spawn_short_of_descriptors():
        # Only now: trio's own start makes a socket pair too.
        monkeypatch.setattr(pgw.os, "pipe", made_unless_failing(real_pipe))
        monkeypatch.setattr(pgw.socket, "socketpair", made_unless_failing(real_socketpair))
        try:
            await spawner.spawn(prepared, prompt, None)
        finally:
            monkeypatch.undo()

    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError, match="Too many open files"):
        trio.run(spawn_short_of_descriptors)
    assert set(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize("garbage", [b"\0" * (1 << 20), b"exit abc\n", b"pid 12\nexit 1e9\n", b"free\n"])
def test_a_root_that_says_what_no_root_says_is_taken_for_lost(garbage):
    # Bytes without a newline were gathered for as long as they came, the
    # event loop never yielding (heartbeats, timeouts, SIGTERM all stopped),
    # and `exit abc` was an internal error.
    import socket

    ours, theirs = socket.socketpair()

    async def no_failure(link):
        return None

    async def main():
        root = pgw.StageRoot(os.open(os.devnull, os.O_WRONLY), ours.detach(), None, b"", *os.pipe())
        with trio.fail_after(5):
            theirs.setblocking(False)
            theirs.send(garbage)  # what the socket takes: far more than a line
            theirs.shutdown(socket.SHUT_WR)  # and then the root goes
            if garbage.startswith(b"pid"):
                assert await root.started("claude", no_failure) == 12
            else:
                with pytest.raises(pgw.StageRejected, match="cannot start claude: the stage root failed"):
                    await root.started("claude", no_failure)
            assert await root.exited() == -1 and root.lost
        root.discard()

    try:
        trio.run(main)
    finally:
        theirs.close()


@pytest.mark.parametrize("planted", ["symlink-to-a-directory", "symlink-to-a-file", "hard-link"])
def test_a_stages_files_are_never_written_through_what_another_stage_planted(tmp_path, planted):
    # A process of another stage (its scratch dir is a sibling) that put a
    # link on the way while the files were written sent them out of the
    # scratch dir: `mkdir` took the link for the directory it meant to make.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"untouched")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    if planted == "symlink-to-a-directory":
        (scratch / "sub").symlink_to(outside)
        parts = ("sub", "victim")
    elif planted == "symlink-to-a-file":
        (scratch / "victim").symlink_to(outside / "victim")
        parts = ("victim",)
    else:
        os.link(outside / "victim", scratch / "victim")
        parts = ("victim",)
    root = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError):
            pgw.write_under(root, parts, b"written through")
    finally:
        os.close(root)
    assert (outside / "victim").read_bytes() == b"untouched"
    assert sorted(os.listdir(outside)) == ["victim"]



def test_a_link_planted_while_the_files_are_written_sends_none_out_of_the_scratch_dir(tmp_path, monkeypatch):
    # The race won: another stage's process puts the link in just before the
    # directory is made.
    outside = tmp_path / "outside"
    outside.mkdir()
    scratch = tmp_path / "scratch" / "s"
    real_mkdir = os.mkdir

    def planting_mkdir(path, *args, **kwargs):
        if os.fspath(path) in ("sub", str(scratch / "sub")):
            (scratch / "sub").symlink_to(outside)
            raise FileExistsError(errno.EEXIST, "File exists")
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", planting_mkdir)
    with pytest.raises(OSError):
        pgw.write_scratch(scratch, [(("sub", "pwn"), b"written through")])
    assert os.listdir(outside) == []
