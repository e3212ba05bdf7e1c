"""Conversions between pulse.v1 messages and domain objects, with input validation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from pulse.v1 import agent_service_pb2 as apb
from pulse.v1 import common_pb2 as cpb
from pulse.v1 import profiling_service_pb2 as ppb
from server import validation
from server.domain import (
    AgentView,
    AuditEvent,
    Candidate,
    CommandToSend,
    Completion,
    Hello,
    InvalidArgument,
    Outcome,
    ProfilingMode,
    ProfilingSpec,
    RequestView,
    SubmitRequest,
    Target,
)
from server.lifecycle import CommandState, RequestState
from server.preview import Verdict
from server.sessions import DrainRequest, Outbound, StopRequest

MODE_TO_PROTO = {
    ProfilingMode.CPU: cpb.PROFILING_MODE_CPU,
    ProfilingMode.ALLOCATION: cpb.PROFILING_MODE_ALLOCATION,
    ProfilingMode.NONE: cpb.PROFILING_MODE_NONE,
}
MODE_FROM_PROTO = {v: k for k, v in MODE_TO_PROTO.items()}
STATE_TO_PROTO = {
    state: cpb.CommandState.Value(f"COMMAND_STATE_{state.name}") for state in CommandState
}
REQUEST_STATE_TO_PROTO = {
    state: ppb.RequestState.Value(f"REQUEST_STATE_{state.name}") for state in RequestState
}
REQUEST_STATE_FROM_PROTO = {v: k for k, v in REQUEST_STATE_TO_PROTO.items()}
OUTCOME_FROM_PROTO = {
    apb.COMMAND_OUTCOME_SUCCEEDED: Outcome.SUCCEEDED,
    apb.COMMAND_OUTCOME_FAILED: Outcome.FAILED,
    apb.COMMAND_OUTCOME_CANCELLED: Outcome.CANCELLED,
}


def timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value.astimezone(UTC))
    return ts


def from_timestamp(message: Timestamp, present: bool) -> datetime | None:
    if not present:
        return None
    return message.ToDatetime(tzinfo=UTC)


def duration(value: timedelta) -> Duration:
    d = Duration()
    d.FromTimedelta(value)
    return d


def mode_from_proto(value: int, field: str, *, default: ProfilingMode | None) -> ProfilingMode:
    if value == cpb.PROFILING_MODE_UNSPECIFIED and default is not None:
        return default
    try:
        return MODE_FROM_PROTO[value]  # type: ignore[index]
    except KeyError:
        raise InvalidArgument(field, f"unknown profiling mode {value}") from None


# --- operators -----------------------------------------------------------------------------------


def submit_from_proto(message: ppb.SubmitProfileRequestRequest) -> SubmitRequest:
    profiling_spec = validation.spec(
        duration_seconds=message.duration_seconds,
        frequency_hz=message.frequency_hz,
        mode=mode_from_proto(message.profiling_mode, "profiling_mode", default=ProfilingMode.CPU),
        pids=list(message.pids),
        additional_args=dict(message.additional_args),
        continuous=message.continuous,
    )
    return validation.submit(
        service=message.service_name,
        hosts=list(message.hostnames),
        profiling_spec=profiling_spec,
        max_hosts=message.max_hosts,
        ttl_seconds=message.ttl_seconds,
        idempotency_key=message.idempotency_key,
    )


def spec_to_proto(spec: ProfilingSpec) -> cpb.ProfilingSpec:
    return cpb.ProfilingSpec(
        duration_seconds=spec.duration_seconds,
        frequency_hz=spec.frequency_hz,
        profiling_mode=MODE_TO_PROTO[spec.mode],
        pids=list(spec.pids),
        additional_args=spec.additional_args,
        continuous=spec.continuous,
    )


def target_to_proto(target: Target) -> ppb.Target:
    return ppb.Target(
        agent_id=target.agent_id or "",
        hostname=target.hostname,
        command_id=str(target.command_id),
        command_state=STATE_TO_PROTO[target.state],
        error_message=target.error_message,
        result=cpb.ProfileResult(
            location=target.result_location,
            samples=target.result_samples,
            size_bytes=target.result_bytes,
        ),
        delivery_attempts=target.attempts,
        sent_time=timestamp(target.sent_at),
        start_time=timestamp(target.started_at),
        finish_time=timestamp(target.finished_at),
        expire_time=timestamp(target.expires_at),
    )


def request_to_proto(view: RequestView) -> ppb.ProfileRequest:
    counts = {state.value: view.counts.get(state, 0) for state in CommandState}
    return ppb.ProfileRequest(
        request_id=str(view.request_id),
        service_name=view.service_name,
        hostnames=list(view.hostnames),
        spec=spec_to_proto(view.spec),
        max_hosts=view.max_hosts,
        ttl_seconds=view.ttl_seconds,
        idempotency_key=view.idempotency_key or "",
        state=REQUEST_STATE_TO_PROTO[view.state],
        counts=ppb.TargetCounts(total=sum(counts.values()), **counts),
        targets=[target_to_proto(t) for t in view.targets],
        create_time=timestamp(view.created_at),
        cancel_time=timestamp(view.cancelled_at),
    )


def agent_to_proto(view: AgentView) -> ppb.Agent:
    return ppb.Agent(
        agent_id=view.agent_id,
        hostname=view.hostname,
        ip_address=view.ip_address,
        service_name=view.service_name,
        labels=view.labels,
        agent_version=view.agent_version,
        supported_modes=[MODE_TO_PROTO[m] for m in view.supported_modes],
        online=view.online,
        last_heartbeat_time=timestamp(view.last_seen_at),
        connect_time=timestamp(view.connected_at),
        running_command_ids=[str(c) for c in view.running_command_ids],
        server_id=view.server_id or "",
    )


def dry_run_target_to_proto(candidate: Candidate, verdict: Verdict) -> ppb.DryRunTarget:
    return ppb.DryRunTarget(
        hostname=candidate.hostname,
        agent_id=candidate.agent_id or "",
        online=candidate.online,
        supported_modes=[MODE_TO_PROTO[m] for m in candidate.supported_modes],
        would_reject=verdict.would_reject,
        reason=verdict.reason,
    )


def request_state_filter(value: int) -> RequestState | None:
    if value == ppb.REQUEST_STATE_UNSPECIFIED:
        return None
    try:
        return REQUEST_STATE_FROM_PROTO[value]  # type: ignore[index]
    except KeyError:
        raise InvalidArgument("state", f"unknown request state {value}") from None


# --- agents --------------------------------------------------------------------------------------


def hello_from_proto(message: apb.AgentHello) -> Hello:
    modes = []
    for i, mode in enumerate(message.supported_modes):
        modes.append(mode_from_proto(mode, f"hello.supported_modes[{i}]", default=None))
    return Hello(
        agent_id=validation.agent_id(message.agent_id, "hello.agent_id"),
        hostname=validation.hostname(message.hostname, "hello.hostname"),
        ip_address=validation.bounded_string(message.ip_address, "hello.ip_address", 64),
        service_name=validation.service_name(message.service_name, "hello.service_name"),
        labels=validation.string_map(dict(message.labels), "hello.labels"),
        agent_version=validation.bounded_string(message.agent_version, "hello.agent_version", 64),
        supported_modes=tuple(dict.fromkeys(modes)),
        running_command_ids=tuple(message.running_command_ids[:64]),
        finished_command_ids=tuple(message.finished_command_ids[:256]),
    )


def outbound_to_proto(message: Outbound) -> apb.HeartbeatResponse:
    if isinstance(message, CommandToSend):
        return apb.HeartbeatResponse(
            command=apb.Command(
                command_id=str(message.command_id),
                request_id=str(message.request_id),
                spec=spec_to_proto(message.spec),
                expire_time=timestamp(message.expires_at),
            )
        )
    if isinstance(message, StopRequest):
        return apb.HeartbeatResponse(
            stop=apb.StopCommand(command_id=str(message.command_id), reason=message.reason)
        )
    assert isinstance(message, DrainRequest)
    return apb.HeartbeatResponse(drain=apb.Drain(reconnect_after=duration(message.reconnect_after)))


def completion_from_proto(message: apb.ReportCommandCompletionRequest) -> Completion:
    try:
        outcome = OUTCOME_FROM_PROTO[message.outcome]
    except KeyError:
        raise InvalidArgument("outcome", "must be SUCCEEDED, FAILED or CANCELLED") from None
    result = message.result
    if result.samples < 0 or result.size_bytes < 0:
        raise InvalidArgument("result", "samples and size_bytes must not be negative")
    return Completion(
        agent_id=validation.agent_id(message.agent_id),
        command_id=validation.uuid_field(message.command_id, "command_id"),
        outcome=outcome,
        started_at=from_timestamp(message.start_time, message.HasField("start_time")),
        finished_at=from_timestamp(message.finish_time, message.HasField("finish_time")),
        error_message=message.error_message[: validation.MAX_ERROR_MESSAGE],
        result_location=validation.bounded_string(result.location, "result.location", 4096),
        result_samples=result.samples,
        result_bytes=result.size_bytes,
    )


def audit_event_to_proto(event: AuditEvent) -> ppb.AuditEvent:
    return ppb.AuditEvent(
        sequence=event.event_id,
        time=timestamp(event.occurred_at),
        actor=event.actor,
        command_id=str(event.command_id) if event.command_id else "",
        hostname=event.hostname,
        agent_id=event.agent_id,
        action=event.action,
        from_state=event.from_state,
        to_state=event.to_state,
        detail=event.detail,
    )
