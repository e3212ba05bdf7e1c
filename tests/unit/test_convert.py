from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from pulse.v1 import agent_service_pb2 as apb
from pulse.v1 import common_pb2 as cpb
from pulse.v1 import profiling_service_pb2 as ppb
from server import convert
from server.domain import (
    CommandToSend,
    InvalidArgument,
    Outcome,
    ProfilingMode,
    ProfilingSpec,
    RequestView,
    Target,
)
from server.lifecycle import CommandState, RequestState
from server.sessions import DrainRequest, StopRequest

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def submit_message(**overrides: Any) -> ppb.SubmitProfileRequestRequest:
    fields: dict[str, Any] = {"service_name": "checkout", "duration_seconds": 30}
    fields.update(overrides)
    return ppb.SubmitProfileRequestRequest(**fields)


def hello_message(**overrides: Any) -> apb.AgentHello:
    fields: dict[str, Any] = {
        "agent_id": "agent-1",
        "hostname": "web-1",
        "ip_address": "10.0.0.1",
        "service_name": "checkout",
        "labels": {"zone": "a"},
        "agent_version": "0.1.0",
        "supported_modes": [cpb.PROFILING_MODE_CPU],
    }
    fields.update(overrides)
    return apb.AgentHello(**fields)


def completion_message(**overrides: Any) -> apb.ReportCommandCompletionRequest:
    fields: dict[str, Any] = {
        "agent_id": "agent-1",
        "command_id": str(uuid.uuid4()),
        "outcome": apb.COMMAND_OUTCOME_SUCCEEDED,
        "result": cpb.ProfileResult(location="/tmp/x.collapsed", samples=12, size_bytes=345),
    }
    fields.update(overrides)
    return apb.ReportCommandCompletionRequest(**fields)


def invalid_field(call: Any, message: Any) -> str:
    with pytest.raises(InvalidArgument) as info:
        call(message)
    return info.value.field


# --- submit --------------------------------------------------------------------------------------


def test_submit_from_proto_full() -> None:
    message = submit_message(
        hostnames=["web-1", "web-2"],
        frequency_hz=99,
        profiling_mode=cpb.PROFILING_MODE_ALLOCATION,
        pids=[10, 20],
        max_hosts=1,
        ttl_seconds=60,
        additional_args={"native": "true"},
        idempotency_key="key-1",
        continuous=True,
    )
    request = convert.submit_from_proto(message)
    assert request.service_name == "checkout"
    assert request.hostnames == ("web-1", "web-2")
    assert request.spec == ProfilingSpec(
        duration_seconds=30,
        frequency_hz=99,
        mode=ProfilingMode.ALLOCATION,
        pids=(10, 20),
        additional_args={"native": "true"},
        continuous=True,
    )
    assert (request.max_hosts, request.ttl_seconds, request.idempotency_key) == (1, 60, "key-1")


def test_submit_from_proto_defaults() -> None:
    request = convert.submit_from_proto(submit_message())
    assert request.spec.mode is ProfilingMode.CPU
    assert request.spec.frequency_hz == 11
    assert request.ttl_seconds == 300
    assert request.idempotency_key is None
    assert request.hostnames == ()
    assert request.spec.continuous is False


def test_submit_unknown_profiling_mode() -> None:
    assert invalid_field(convert.submit_from_proto, submit_message(profiling_mode=99)) == (
        "profiling_mode"
    )


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"duration_seconds": 0}, "duration_seconds"),
        ({"duration_seconds": 3601}, "duration_seconds"),
        ({"frequency_hz": 1001}, "frequency_hz"),
        ({"pids": [1, -2]}, "pids[1]"),
        ({"service_name": ""}, "service_name"),
        ({"hostnames": ["ok", "bad host"]}, "hostnames[1]"),
        ({"ttl_seconds": 86401}, "ttl_seconds"),
        ({"max_hosts": -1}, "max_hosts"),
        ({"idempotency_key": "k" * 129}, "idempotency_key"),
    ],
)
def test_submit_invalid_fields(overrides: dict[str, Any], field: str) -> None:
    assert invalid_field(convert.submit_from_proto, submit_message(**overrides)) == field


def test_mode_round_trip() -> None:
    for mode in ProfilingMode:
        value = convert.MODE_TO_PROTO[mode]
        assert convert.mode_from_proto(value, "m", default=None) is mode
    with pytest.raises(InvalidArgument):
        convert.mode_from_proto(cpb.PROFILING_MODE_UNSPECIFIED, "m", default=None)


# --- hello ---------------------------------------------------------------------------------------


def test_hello_from_proto() -> None:
    hello = convert.hello_from_proto(
        hello_message(
            supported_modes=[
                cpb.PROFILING_MODE_CPU,
                cpb.PROFILING_MODE_NONE,
                cpb.PROFILING_MODE_CPU,
            ],
            running_command_ids=["a", "b"],
            finished_command_ids=["c"],
        )
    )
    assert hello.agent_id == "agent-1"
    assert hello.hostname == "web-1"
    assert hello.ip_address == "10.0.0.1"
    assert hello.service_name == "checkout"
    assert hello.labels == {"zone": "a"}
    assert hello.agent_version == "0.1.0"
    assert hello.supported_modes == (ProfilingMode.CPU, ProfilingMode.NONE)  # deduplicated
    assert hello.running_command_ids == ("a", "b")
    assert hello.finished_command_ids == ("c",)


def test_hello_caps_command_id_lists() -> None:
    hello = convert.hello_from_proto(
        hello_message(
            running_command_ids=[str(i) for i in range(100)],
            finished_command_ids=[str(i) for i in range(300)],
        )
    )
    assert len(hello.running_command_ids) == 64
    assert len(hello.finished_command_ids) == 256


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"agent_id": ""}, "hello.agent_id"),
        ({"agent_id": "bad id"}, "hello.agent_id"),
        ({"hostname": ""}, "hello.hostname"),
        ({"service_name": ""}, "hello.service_name"),
        ({"ip_address": "1" * 65}, "hello.ip_address"),
        ({"agent_version": "v" * 65}, "hello.agent_version"),
        ({"supported_modes": [cpb.PROFILING_MODE_CPU, 0]}, "hello.supported_modes[1]"),
        ({"supported_modes": [42]}, "hello.supported_modes[0]"),
    ],
)
def test_hello_invalid_fields(overrides: dict[str, Any], field: str) -> None:
    assert invalid_field(convert.hello_from_proto, hello_message(**overrides)) == field


def test_hello_bad_label_key() -> None:
    field = invalid_field(convert.hello_from_proto, hello_message(labels={"bad key": "x"}))
    assert field.startswith("hello.labels[")


# --- completion ----------------------------------------------------------------------------------


def test_completion_from_proto() -> None:
    command_id = uuid.uuid4()
    start = Timestamp()
    start.FromDatetime(T0)
    message = completion_message(
        command_id=str(command_id),
        outcome=apb.COMMAND_OUTCOME_FAILED,
        start_time=start,
        error_message="e" * 5000,
    )
    completion = convert.completion_from_proto(message)
    assert completion.agent_id == "agent-1"
    assert completion.command_id == command_id
    assert completion.outcome is Outcome.FAILED
    assert completion.started_at == T0
    assert completion.finished_at is None  # absent, not the epoch
    assert len(completion.error_message) == 4096
    assert completion.result_location == "/tmp/x.collapsed"
    assert (completion.result_samples, completion.result_bytes) == (12, 345)


@pytest.mark.parametrize(
    ("value", "outcome"),
    [
        (apb.COMMAND_OUTCOME_SUCCEEDED, Outcome.SUCCEEDED),
        (apb.COMMAND_OUTCOME_FAILED, Outcome.FAILED),
        (apb.COMMAND_OUTCOME_CANCELLED, Outcome.CANCELLED),
    ],
)
def test_completion_outcomes(value: int, outcome: Outcome) -> None:
    assert convert.completion_from_proto(completion_message(outcome=value)).outcome is outcome


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"outcome": apb.COMMAND_OUTCOME_UNSPECIFIED}, "outcome"),
        ({"outcome": 17}, "outcome"),
        ({"command_id": "not-a-uuid"}, "command_id"),
        ({"command_id": ""}, "command_id"),
        ({"agent_id": ""}, "agent_id"),
        ({"result": cpb.ProfileResult(samples=-1)}, "result"),
        ({"result": cpb.ProfileResult(size_bytes=-1)}, "result"),
        ({"result": cpb.ProfileResult(location="x" * 4097)}, "result.location"),
    ],
)
def test_completion_invalid_fields(overrides: dict[str, Any], field: str) -> None:
    assert invalid_field(convert.completion_from_proto, completion_message(**overrides)) == field


# --- outbound and views --------------------------------------------------------------------------


def test_outbound_command() -> None:
    command = CommandToSend(
        command_id=uuid.uuid4(),
        request_id=uuid.uuid4(),
        spec=ProfilingSpec(
            duration_seconds=5,
            frequency_hz=50,
            mode=ProfilingMode.CPU,
            pids=(3,),
            additional_args={"idle": "1"},
            continuous=True,
        ),
        expires_at=T0,
    )
    message = convert.outbound_to_proto(command)
    assert message.WhichOneof("message") == "command"
    assert message.command.command_id == str(command.command_id)
    assert message.command.request_id == str(command.request_id)
    spec = message.command.spec
    assert (spec.duration_seconds, spec.frequency_hz) == (5, 50)
    assert spec.profiling_mode == cpb.PROFILING_MODE_CPU
    assert list(spec.pids) == [3]
    assert dict(spec.additional_args) == {"idle": "1"}
    assert spec.continuous is True
    assert message.command.expire_time.ToDatetime(tzinfo=UTC) == T0


def test_outbound_stop() -> None:
    command_id = uuid.uuid4()
    message = convert.outbound_to_proto(StopRequest(command_id, "cancelled by operator"))
    assert message.WhichOneof("message") == "stop"
    assert message.stop.command_id == str(command_id)
    assert message.stop.reason == "cancelled by operator"


def test_outbound_drain() -> None:
    message = convert.outbound_to_proto(DrainRequest(timedelta(seconds=2, milliseconds=500)))
    assert message.WhichOneof("message") == "drain"
    assert message.drain.reconnect_after.ToTimedelta() == timedelta(seconds=2.5)


def make_view(counts: dict[CommandState, int], targets: tuple[Target, ...] = ()) -> RequestView:
    return RequestView(
        request_id=uuid.uuid4(),
        service_name="checkout",
        hostnames=("web-1", "web-2"),
        spec=ProfilingSpec(duration_seconds=10, frequency_hz=11, mode=ProfilingMode.NONE),
        max_hosts=0,
        ttl_seconds=300,
        idempotency_key=None,
        created_at=T0,
        cancelled_at=None,
        counts=counts,
        state=RequestState.PARTIALLY_SUCCEEDED,
        targets=targets,
    )


def test_request_to_proto_counts_and_total() -> None:
    counts = {
        CommandState.PENDING: 1,
        CommandState.RUNNING: 2,
        CommandState.SUCCEEDED: 3,
        CommandState.TIMED_OUT: 4,
    }
    message = convert.request_to_proto(make_view(counts))
    assert message.counts.total == 10
    assert message.counts.pending == 1
    assert message.counts.running == 2
    assert message.counts.succeeded == 3
    assert message.counts.timed_out == 4
    assert message.counts.sent == message.counts.failed == message.counts.expired == 0
    assert message.state == ppb.REQUEST_STATE_PARTIALLY_SUCCEEDED
    assert message.spec.profiling_mode == cpb.PROFILING_MODE_NONE
    assert message.idempotency_key == ""
    assert not message.HasField("cancel_time")
    assert message.create_time.ToDatetime(tzinfo=UTC) == T0


def test_request_to_proto_every_state_counted() -> None:
    counts = {state: i + 1 for i, state in enumerate(CommandState)}
    message = convert.request_to_proto(make_view(counts))
    for state, n in counts.items():
        assert getattr(message.counts, state.value) == n
    assert message.counts.total == sum(counts.values())


def test_request_to_proto_targets() -> None:
    local = timezone(timedelta(hours=2))
    target = Target(
        command_id=uuid.uuid4(),
        agent_id=None,
        hostname="web-1",
        state=CommandState.SENT,
        attempts=2,
        sent_at=T0.astimezone(local),
    )
    message = convert.request_to_proto(make_view({CommandState.SENT: 1}, (target,)))
    (out,) = message.targets
    assert out.agent_id == ""
    assert out.command_id == str(target.command_id)
    assert out.command_state == cpb.COMMAND_STATE_SENT
    assert out.delivery_attempts == 2
    assert out.sent_time.ToDatetime(tzinfo=UTC) == T0
    assert not out.HasField("start_time")


def test_state_tables_are_complete() -> None:
    assert set(convert.STATE_TO_PROTO) == set(CommandState)
    assert set(convert.REQUEST_STATE_TO_PROTO) == set(RequestState)
    assert cpb.COMMAND_STATE_UNSPECIFIED not in convert.STATE_TO_PROTO.values()


def test_request_state_filter() -> None:
    assert convert.request_state_filter(ppb.REQUEST_STATE_UNSPECIFIED) is None
    assert convert.request_state_filter(ppb.REQUEST_STATE_FAILED) is RequestState.FAILED
    with pytest.raises(InvalidArgument) as info:
        convert.request_state_filter(99)
    assert info.value.field == "state"
