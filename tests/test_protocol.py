"""The wire records: round trips, and decode's strictness rule by rule."""

from __future__ import annotations

import json
import re

import pytest
import wsproto.connection
import wsproto.events
from hypothesis import given
from hypothesis import strategies as st

import pgw

text = st.text()
ints = st.integers(min_value=-(2**53), max_value=2**53)
str_maps = st.dictionaries(st.text(), st.text(), max_size=5)
json_values = st.recursive(
    st.none() | st.booleans() | ints | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children, max_size=3),
    max_leaves=10,
)

RECORDS = {
    pgw.StageRequest: st.builds(
        pgw.StageRequest,
        stage_run_id=text,
        job_id=text,
        cli=st.sampled_from(["codex", "claude", "deepseek"]),
        cli_args=st.lists(text, max_size=5),
        stdin=text,
        stdin_mode=st.sampled_from(["stdin", "argv_last"]),
        files=str_maps,
        timeout_s=ints,
        env=str_maps,
    ),
    pgw.StageCancel: st.builds(pgw.StageCancel, stage_run_id=text, signal=st.sampled_from(["SIGTERM", "SIGKILL"])),
    pgw.Pong: st.just(pgw.Pong()),
    pgw.Hello: st.builds(pgw.Hello, machine_name=text, capabilities=st.dictionaries(st.text(), json_values, max_size=5)),
    pgw.Ping: st.builds(pgw.Ping, ts=st.floats(allow_nan=False, allow_infinity=False)),
    pgw.StageAck: st.builds(pgw.StageAck, stage_run_id=text, pid=ints),
    pgw.StageStdout: st.builds(pgw.StageStdout, stage_run_id=text, seq=ints, data=text),
    pgw.StageStderr: st.builds(pgw.StageStderr, stage_run_id=text, seq=ints, data=text),
    pgw.StageExit: st.builds(pgw.StageExit, stage_run_id=text, returncode=ints, duration_ms=ints, error=st.none() | text),
}


def test_every_record_has_a_strategy():
    assert set(RECORDS) == set(pgw.RECORD_TYPES.values())


@pytest.mark.parametrize("record_type", RECORDS, ids=lambda t: t.TYPE)
def test_decode_inverts_encode(record_type):
    @given(RECORDS[record_type])
    def round_trip(record):
        wire = pgw.encode(record)
        assert json.loads(wire)["type"] == record_type.TYPE
        assert pgw.decode(wire) == record

    round_trip()


def minimal_request(**changes):
    message = {
        "type": "stage.request",
        "stage_run_id": "run-1",
        "job_id": "job-1",
        "cli": "claude",
        "cli_args": ["-p"],
        "stdin": "hello",
    }
    message.update(changes)
    return json.dumps(message)


def decode_error(wire) -> str:
    with pytest.raises(pgw.ProtocolError) as caught:
        pgw.decode(wire)
    return str(caught.value)


def test_request_defaults_are_those_of_the_protocol():
    request = pgw.decode(minimal_request())
    assert request.stdin_mode == "stdin"
    assert request.files == {}
    assert request.timeout_s == 7200
    assert request.env == {}
    assert pgw.decode('{"type":"stage.cancel","stage_run_id":"r"}').signal == "SIGTERM"
    assert pgw.decode('{"type":"stage.exit","stage_run_id":"r","returncode":0,"duration_ms":1}').error is None


def test_string_is_not_coerced_into_a_list():
    assert decode_error(minimal_request(cli_args="ls")) == (
        "stage.request: cli_args: expected an array, got a string 'ls'"
    )


def test_number_is_not_coerced_into_a_string():
    assert "stdin: expected a string, got a number 1" in decode_error(minimal_request(stdin=1))
    assert "cli_args[1]: expected a string, got a number 2" in decode_error(minimal_request(cli_args=["a", 2]))


@pytest.mark.parametrize("value", ["60", 1.5, True, None])
def test_timeout_must_be_an_integer(value):
    assert "timeout_s: expected an integer" in decode_error(minimal_request(timeout_s=value))


def test_boolean_is_not_a_number():
    assert "ts: expected a number, got a boolean true" in decode_error('{"type":"ping","ts":true}')


def test_ping_accepts_an_integer_timestamp():
    assert pgw.decode('{"type":"ping","ts":17}') == pgw.Ping(ts=17.0)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("cli", "rm", "cli: 'rm' is not one of codex, claude, deepseek"),
        ("stdin_mode", "pipe", "stdin_mode: 'pipe' is not one of stdin, argv_last"),
        ("cli", 3, "cli: 3 is not one of codex, claude, deepseek"),
    ],
)
def test_literals_are_checked(field, value, message):
    assert decode_error(minimal_request(**{field: value})) == f"stage.request: {message}"


def test_cancel_signal_is_checked():
    assert decode_error('{"type":"stage.cancel","stage_run_id":"r","signal":"SIGHUP"}') == (
        "stage.cancel: signal: 'SIGHUP' is not one of SIGTERM, SIGKILL"
    )


def test_missing_required_fields_are_named():
    message = decode_error('{"type":"stage.request","stage_run_id":"r"}')
    for field in ("job_id", "cli", "cli_args", "stdin"):
        assert f"{field}: required field missing" in message
    assert "stage_run_id" not in message


def test_a_bad_array_or_object_names_its_first_bad_elements_and_counts_the_rest():
    assert decode_error(minimal_request(cli_args=["a", 2, "b", None, [], 5, 6])) == (
        "stage.request: cli_args[1]: expected a string, got a number 2; cli_args[3]: expected a string, got null; "
        "cli_args[4]: expected a string, got an array; cli_args: 2 more elements are not strings"
    )
    assert decode_error(minimal_request(env={"A": "x", "B": 1, "C": True})) == (
        "stage.request: env['B']: expected a string, got a number 1; env['C']: expected a string, got a boolean true"
    )


def test_maps_must_be_objects_of_strings():
    assert "files: expected an object, got an array" in decode_error(minimal_request(files=["a"]))
    assert "env['HOME']: expected a string, got null" in decode_error(minimal_request(env={"HOME": None}))


@pytest.mark.parametrize(
    "wire, message",
    [
        ('{"type":"stage.launch"}', "type: 'stage.launch' is not one of "),
        ('{"stage_run_id":"r"}', "type: required field missing"),
        ('{"type":7}', "type: 7 is not one of "),
        ("[1, 2]", "expected a JSON object, got an array"),
        ('"pong"', "expected a JSON object, got a string 'pong'"),
        ("{nope", "not JSON: "),
        ('{"type":"ping","ts":NaN}', "not JSON: NaN is not a JSON number"),
        ('{"type":"ping","ts":1' + "0" * 5000 + "}", "not JSON: a number of more digits than 4300"),
        (b"\xff\xfe{", "not JSON"),
    ],
)
def test_malformed_messages_are_protocol_errors(wire, message):
    assert message in decode_error(wire)


@pytest.mark.parametrize("wire, key", [
    ('{"type":"stage.request","type":"stage.cancel","stage_run_id":"x","signal":"SIGTERM"}', "type"),
    ('{"type":"stage.request","stage_run_id":"a","stage_run_id":"b","job_id":"j","cli":"claude","cli_args":[],'
     '"stdin":""}', "stage_run_id"),
    ('{"type":"stage.request","stage_run_id":"a","job_id":"j","cli":"claude","cli_args":[],"stdin":"",'
     '"files":{"a.txt":"aGk=","a.txt":"eW8="}}', "a.txt"),
])
def test_a_key_given_twice_is_a_protocol_error(wire, key):
    # json.loads let the last one win: a `type` given twice turned a request
    # into a cancel, and of two stage_run_ids the first got no exit.
    with pytest.raises(pgw.ProtocolError, match=f"'{re.escape(key)}' given twice in one object") as refused:
        pgw.decode(wire)
    assert refused.value.message["type"] in ("stage.request", "stage.cancel")


def test_unknown_extra_keys_are_ignored():
    request = pgw.decode(minimal_request(priority="high", files={"a.txt": "aGk="}))
    assert request.files == {"a.txt": "aGk="}
    assert pgw.decode('{"type":"pong","at":1}') == pgw.Pong()


@given(st.dictionaries(st.text(max_size=12), json_values, max_size=8))
def test_decode_raises_only_protocol_errors(message):
    for tag in list(pgw.RECORD_TYPES) + ["other"]:
        try:
            pgw.decode(json.dumps({**message, "type": tag}))
        except pgw.ProtocolError:
            pass


def test_encode_is_compact_and_keeps_non_ascii():
    wire = pgw.encode(pgw.StageStdout(stage_run_id="r", seq=1, data="证明 ✓"))
    assert wire == '{"type":"stage.stdout","stage_run_id":"r","seq":1,"data":"证明 ✓"}'


def test_encode_exit_writes_null_error():
    wire = pgw.encode(pgw.StageExit(stage_run_id="r", returncode=-1, duration_ms=0))
    assert json.loads(wire) == {"type": "stage.exit", "stage_run_id": "r", "returncode": -1, "duration_ms": 0, "error": None}


@given(st.sampled_from([pgw.StageStdout, pgw.StageStderr]), st.text(), ints, st.text())
def test_fast_output_frames_equal_the_generic_encoding(record_type, stage_run_id, seq, data):
    record = record_type(stage_run_id=stage_run_id, seq=seq, data=data)
    generic = {"type": record_type.TYPE, "stage_run_id": stage_run_id, "seq": seq, "data": data}
    assert pgw.encode(record) == json.dumps(generic, ensure_ascii=False, separators=(",", ":"))


@given(RECORDS[pgw.StageAck])
def test_fast_ack_equals_the_generic_encoding(record):
    assert pgw.ack_message(record.stage_run_id, record.pid) == pgw.wire(record)


@given(RECORDS[pgw.StageExit])
def test_fast_exit_equals_the_generic_encoding(record):
    assert pgw.exit_message(record) == pgw.wire(record)


@pytest.mark.parametrize("character", ["x", "\x01", "\u00e9", "\U0001f600", "\ud800"])
@pytest.mark.parametrize("id_length", [5, pgw.OUTPUT_DATA_MAX_ESCAPED_BYTES - 2])
def test_an_exit_is_cut_to_1_mib_at_its_error_and_left_whole_below(character, id_length):
    record = pgw.StageExit("a" * id_length, -1, 0, "bad request: " + character * (1 << 20))
    message = pgw.exit_message_within_limit(record)
    assert len(message) <= pgw.OUTPUT_MESSAGE_MAX_BYTES < len(pgw.exit_message(record))
    sent = json.loads(message)
    assert sent["stage_run_id"] == record.stage_run_id and sent["error"].startswith("bad request: ")
    assert sent["error"].endswith("...") and len(message) > pgw.OUTPUT_MESSAGE_MAX_BYTES - 16
    small = pgw.StageExit("a" * id_length, -1, 0, "bad request: " + character * 100)
    assert pgw.exit_message_within_limit(small) == pgw.exit_message(small)


# Long enough for bytes.replace's way; text with escapes, control characters and non-ASCII.
long_output = st.lists(
    st.text(alphabet=st.characters(max_codepoint=0x2FF) | st.sampled_from('\n\t\r"\\\x01\x1f')), min_size=1, max_size=8
).map(lambda parts: "".join(part * (pgw.JSON_REPLACE_MIN_BYTES // max(len(part), 1) + 1) for part in parts))


@given(long_output | st.text() | st.binary(min_size=pgw.JSON_REPLACE_MIN_BYTES, max_size=3 * pgw.JSON_REPLACE_MIN_BYTES))
def test_json_string_bytes_equals_the_json_module(data):
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    assert pgw.json_string_bytes(raw) == json.encoder.encode_basestring(raw.decode("latin-1")).encode("latin-1")


@given(st.sampled_from([pgw.StageStdout, pgw.StageStderr]), st.text(), ints, st.text())
def test_output_messages_as_sent_carry_the_text_whole(record_type, stage_run_id, seq, data):
    pieces = pgw.escaped_output(data)
    messages = [pgw.output_message(record_type, stage_run_id, seq, piece) for piece in pieces]
    decoded = [json.loads(message) for message in messages]
    assert all(d == {"type": record_type.TYPE, "stage_run_id": stage_run_id, "seq": seq, "data": d["data"]} for d in decoded)
    assert "".join(d["data"] for d in decoded) == data
    assert all(len(message) <= pgw.OUTPUT_MESSAGE_MAX_BYTES for message in messages)


@pytest.mark.parametrize("text", ["\x01" * (256 * 1024), "\"" * (256 * 1024), "é\x00" * (100 * 1024)])
def test_output_messages_never_exceed_a_mebibyte_whatever_escapes(text):
    pieces = pgw.escaped_output(text)
    messages = [pgw.output_message(pgw.StageStdout, "s" * 200, 2**40, piece) for piece in pieces]
    assert all(len(message) <= pgw.OUTPUT_MESSAGE_MAX_BYTES for message in messages)
    assert all(len(json.loads(m)["data"].encode()) <= 256 * 1024 for m in messages)
    assert "".join(json.loads(m)["data"] for m in messages) == text


def unmask_text_frames(wire: bytes, server: "wsproto.connection.Connection | None" = None) -> list[str]:
    """The text messages in `wire`, read as a server reads a client's frames
    (wsproto; `server` when it must inflate as it agreed to)."""
    server = server or wsproto.connection.Connection(wsproto.connection.ConnectionType.SERVER)
    server.receive_data(wire)
    messages, parts = [], []
    for event in server.events():
        assert isinstance(event, wsproto.events.TextMessage), event  # a protocol error would close
        parts.append(event.data)
        if event.message_finished:
            messages.append("".join(parts))
            parts = []
    assert not parts
    return messages


# Each payload-length encoding (RFC 6455 5.2: 7 bits, 16 bits, 64 bits) at its edges, and an output frame's size.
@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 65537, 256 * 1024 + 100])
def test_masked_text_frames_read_back_whole(size):
    message = ("é" + "x" * size)[-size:] if size else ""
    frames = [pgw.masked_text_frame(message.encode()) for _ in range(3)]
    assert unmask_text_frames(b"".join(frames)) == [message] * 3
    if size >= 8:
        assert len({bytes(frame) for frame in frames}) == 3, "a fresh random key per frame"


@given(st.text())
def test_masked_text_frames_carry_any_text(message):
    assert unmask_text_frames(bytes(pgw.masked_text_frame(message.encode()))) == [message]
