"""JSON log lines, id stamping, dry-run verdicts and the metrics address parser."""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import Iterator

import pytest

from server import logs
from server.domain import Candidate, ProfilingMode, ProfilingSpec
from server.metrics import parse_listen
from server.preview import verdict


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = io.StringIO()
    logs.configure("debug", "json", stream)
    yield logging.getLogger("pulse.test"), stream
    root.handlers[:], root.level = saved[0], saved[1]


def lines(stream: io.StringIO) -> list[dict[str, str]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_the_ids_given_as_extra(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    log, stream = captured
    command = uuid.uuid4()
    log.info("sent %s", command, extra=logs.ids(command_id=command, agent_id="a1", request_id=None))

    (line,) = lines(stream)
    assert line["message"] == f"sent {command}"
    assert line["level"] == "INFO" and line["logger"] == "pulse.test"
    assert line["command_id"] == str(command) and line["agent_id"] == "a1"
    assert "request_id" not in line
    assert line["time"].endswith("+00:00")


def test_json_lines_keep_exceptions_and_odd_text(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    log, stream = captured
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception('failed "quoted"\nsecond line')

    (line,) = lines(stream)
    assert line["message"] == 'failed "quoted"\nsecond line'
    assert "ValueError: boom" in line["exception"]


def test_stamp_adds_an_id_to_every_line_unless_it_has_its_own(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    log, stream = captured
    logs.stamp(agent_id="agent-7")
    log.warning("plain")
    log.info("other", extra=logs.ids(agent_id="agent-8"))

    assert [line["agent_id"] for line in lines(stream)] == ["agent-7", "agent-8"]


def test_text_format_is_the_classic_line() -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = io.StringIO()
    try:
        logs.configure("info", "text", stream)
        logging.getLogger("pulse.test").info("hello", extra=logs.ids(agent_id="a1"))
        logging.getLogger("pulse.test").debug("hidden")
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
    (line,) = stream.getvalue().splitlines()
    assert line.endswith(" INFO pulse.test: hello")


SPEC = ProfilingSpec(duration_seconds=5, frequency_hz=11, mode=ProfilingMode.ALLOCATION)


def test_verdict_rejects_a_mode_the_agent_did_not_announce() -> None:
    v = verdict(Candidate("web-1", "a1", True, (ProfilingMode.CPU,)), SPEC, 300)
    assert v.would_reject
    assert v.reason == "mode allocation not supported by this agent (supports: cpu)"


def test_verdict_of_an_unknown_host_and_an_offline_agent_is_a_wait() -> None:
    unknown = verdict(Candidate("web-9", None, False, ()), SPEC, 60)
    assert not unknown.would_reject and "60s" in unknown.reason
    offline = verdict(Candidate("web-2", "a2", False, (ProfilingMode.ALLOCATION,)), SPEC, 60)
    assert not offline.would_reject and "offline" in offline.reason


def test_verdict_of_a_ready_agent_is_empty() -> None:
    v = verdict(Candidate("web-1", "a1", True, (ProfilingMode.ALLOCATION,)), SPEC, 300)
    assert (v.would_reject, v.reason) == (False, "")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        (":9464", ("0.0.0.0", 9464)),
        ("[::1]:0", ("::1", 0)),
    ],
)
def test_parse_listen(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value) == expected


@pytest.mark.parametrize("value", ["9464", "localhost:", "host:port"])
def test_parse_listen_refuses_garbage(value: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        parse_listen(value)
