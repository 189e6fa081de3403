"""The control protocol's parsing, both ends, for any input (Hypothesis): never an exception out.

Server side: `parse_request` gets every request line the supervisor reads. Client side: a
`Client` reads whatever a real socket delivers, and prestop/status turn the fields into waits and
text. Real Unix sockets where a socket is involved; pure functions otherwise.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drainctl.control.client import Busy, Client, ControlError, error_of
from drainctl.control.prestop import time_left
from drainctl.control.render import status_text
from drainctl.control.server import parse_request

# A shared machine may be slow: no per-example deadline, no "generation is slow" failure.
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])

# Any JSON value Python's json module may produce, NaN and infinities included.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
# Requests that are nearly right: what a fuzzer would find first.
near_requests = st.fixed_dictionaries(
    {}, optional={"v": json_values | st.sampled_from([1, 1.0, True, "1"]),
                  "op": json_values | st.sampled_from(["status", "prestop", "STATUS"])},
)


def check_parsed(result: tuple[str | None, str]) -> None:
    op, error = result
    assert op in (None, "status", "prestop")
    assert (op is None) == bool(error)
    assert len(error) < 200 and "\n" not in error


@FUZZ
@given(st.binary(max_size=4096))
def test_any_request_bytes_give_an_op_or_an_error(line: bytes) -> None:
    check_parsed(parse_request(line))


@FUZZ
@given(near_requests)
def test_only_version_1_and_a_known_op_are_served(request: dict[str, object]) -> None:
    op, _error = parse_request(json.dumps(request).encode())
    valid = type(request.get("v")) is int and request.get("v") == 1 and request.get("op") in (
        "status", "prestop")
    assert (op is not None) == valid
    if valid:
        assert op == request["op"]


@pytest.mark.parametrize("line", [
    b"[" * 4095,  # nesting: json.loads raises RecursionError, not a ValueError
    b'{"v": 1, "op": ' + b"[" * 4000,
    b'{"v": 1' + b"0" * 4000 + b', "op": "status"}',  # a 4001-digit version
    b'{"v": 1, "op": "' + b"x" * 4000 + b'"}',
    b'{"v": 1, "op": "\xff\xfe"}',  # not UTF-8
    b'{"v": NaN, "op": "status"}',
    b'{"v": 1e999, "op": "status"}',
    b'{"v": true, "op": "status"}',
    b"\x00\xff\xfe garbage",
    b"",
])
def test_hostile_request_lines(line: bytes) -> None:
    op, error = parse_request(line)
    assert op is None and error
    check_parsed((op, error))


# ---- the client's side -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def listener() -> Iterator[tuple[str, socket.socket]]:
    address = f"@drainctl-test-parse-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(b"\0" + address[1:].encode())
    sock.listen(8)
    sock.settimeout(5)
    yield address, sock
    sock.close()


def served(listener: tuple[str, socket.socket], payload: bytes, timeout: float = 2.0) -> list[
        dict[str, object]]:
    """Connect a real Client, have the server side send `payload` and close; the messages."""
    address, sock = listener
    with Client(address) as client:
        server, _ = sock.accept()
        with server:
            server.sendall(payload)
        deadline = time.monotonic() + timeout
        return list(client.messages(lambda: deadline - time.monotonic()))


@FUZZ
@given(st.binary(max_size=2048) | st.lists(json_values, max_size=5).map(
    lambda values: b"".join(json.dumps(v).encode() + b"\n" for v in values)))
def test_any_reply_bytes_give_messages_or_a_control_error(
    listener: tuple[str, socket.socket], payload: bytes
) -> None:
    try:
        messages = served(listener, payload)
    except ControlError:
        return
    assert all(isinstance(m, dict) for m in messages)


def test_a_deeply_nested_reply_is_a_control_error(listener: tuple[str, socket.socket]) -> None:
    with pytest.raises(ControlError, match="not a JSON line"):
        served(listener, b"[" * 100_000 + b"\n")


def test_a_line_cut_by_the_close_is_a_control_error(listener: tuple[str, socket.socket]) -> None:
    with pytest.raises(ControlError, match="middle of a line"):
        served(listener, b'{"v": 1, "type": "result", "reason": "drained"')


def test_a_server_that_never_stops_talking_is_cut_at_the_deadline(
    listener: tuple[str, socket.socket],
) -> None:
    address, sock = listener
    with Client(address) as client:
        server, _ = sock.accept()
        with server:
            server.setblocking(False)
            server.send(b'{"v": 1, "type": "noise"}\n' * 100)
            deadline = time.monotonic() + 0.5
            got = 0
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                for _message in client.messages(lambda: deadline - time.monotonic()):
                    got += 1
                    try:
                        server.send(b'{"v": 1, "type": "noise"}\n' * 100)
                    except BlockingIOError:
                        pass
            assert time.monotonic() - started < 2
            assert got > 1000, "the server did keep talking until the deadline"


@FUZZ
@given(json_values)
def test_any_time_left_is_a_finite_bounded_wait(value: object) -> None:
    left = time_left(value, unknown=30.0)
    assert math.isfinite(left) and 0.0 <= left <= 24 * 3600.0
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        assert left == min(max(float(value), 0.0), 24 * 3600.0)


@pytest.mark.parametrize("value", [1e308, -5, float("nan"), float("inf"), "x", [1] * 10000, None,
                                   10**400, True])
def test_absurd_time_left(value: object) -> None:
    assert 0.0 <= time_left(value, unknown=30.0) <= 24 * 3600.0


@FUZZ
@given(st.dictionaries(st.text(max_size=10), json_values, max_size=8))
def test_any_error_message_is_one_bounded_line(message: dict[str, object]) -> None:
    error = error_of(message, "@x")
    assert isinstance(error, ControlError)
    assert "\n" not in str(error) and len(str(error)) < 400


def test_a_busy_error_is_told_apart() -> None:
    assert isinstance(error_of({"type": "error", "error": "busy: 32 clients", "busy": True}, "@x"),
                      Busy)
    assert not isinstance(error_of({"type": "error", "error": "refused: uid 5"}, "@x"), Busy)


status_fields = st.fixed_dictionaries({}, optional={
    key: json_values for key in ("state", "phase", "mode", "pid", "uptime_s", "trigger",
                                 "drain_elapsed_s", "outcome", "connections", "error",
                                 "established", "time_left_s")
})


@FUZZ
@given(status_fields)
def test_status_text_shows_any_reply(fields: dict[str, object]) -> None:
    text = status_text(fields)
    assert text.startswith("state:")


def test_status_text_with_absurd_numbers() -> None:
    text = status_text({"state": "running", "uptime_s": 1e308, "time_left_s": float("nan"),
                        "drain_elapsed_s": 10**400, "trigger": "prestop",
                        "outcome": {"elapsed_s": "x", "reason": None},
                        "connections": {"8080": 5, "9090": {"established": 2}}})
    assert "uptime:" in text and "8080: ?" in text and "9090: 2" in text
