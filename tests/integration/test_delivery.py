"""Delivery semantics: push, ack, re-delivery, one session at a time, cancel, expiry, timeouts."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pulse.v1 import agent_service_pb2 as apb
from pulse.v1 import common_pb2 as cpb
from pulse.v1 import profiling_service_pb2 as ppb
from tests.integration.conftest import (
    CountingProfiler,
    Harness,
    RawAgent,
    eventually,
    get_request,
    submit_request,
)

SUCCEEDED = ppb.REQUEST_STATE_SUCCEEDED


async def test_request_runs_on_connected_agent_and_succeeds(harness: Harness) -> None:
    server = await harness.server()
    agent, profiler = await harness.agent(server)
    ops = harness.operator(server)

    submitted = await ops.SubmitProfileRequest(submit_request(duration_seconds=2))

    assert len(submitted.targets) == 1
    assert submitted.targets[0].agent_id == agent.agent_id
    done = await eventually(
        lambda: get_request(ops, submitted.request_id), lambda r: r.state == SUCCEEDED
    )
    target = done.targets[0]
    assert target.command_state == cpb.COMMAND_STATE_SUCCEEDED
    assert target.delivery_attempts == 1
    assert target.result.location.endswith(f"{target.command_id}.collapsed")
    assert target.result.samples == 2 * 11
    assert target.start_time.seconds and target.finish_time.seconds
    assert profiler.runs == {target.command_id: 1}
    assert done.counts.total == 1 and done.counts.succeeded == 1


async def test_commands_for_one_agent_run_one_at_a_time_in_order(harness: Harness) -> None:
    server = await harness.server()
    await harness.agent(server, profiler=CountingProfiler(time_scale=1.0))
    ops = harness.operator(server)

    ids = [
        (await ops.SubmitProfileRequest(submit_request(duration_seconds=d))).request_id
        for d in (3, 1, 1)
    ]

    first = await eventually(
        lambda: get_request(ops, ids[0]),
        lambda r: r.targets[0].command_state == cpb.COMMAND_STATE_RUNNING,
    )
    assert first.state == ppb.REQUEST_STATE_RUNNING
    queued = [await get_request(ops, i) for i in ids[1:]]
    assert [r.targets[0].command_state for r in queued] == [cpb.COMMAND_STATE_PENDING] * 2
    finished = [
        await eventually(lambda i=i: get_request(ops, i), lambda r: r.state == SUCCEEDED)
        for i in ids
    ]
    starts = [r.targets[0].start_time.ToDatetime() for r in finished]
    ends = [r.targets[0].finish_time.ToDatetime() for r in finished]
    assert starts == sorted(starts)
    assert starts[1] >= ends[0] and starts[2] >= ends[1]


async def test_unacknowledged_command_is_resent_after_the_stream_drops(harness: Harness) -> None:
    server = await harness.server()
    ops = harness.operator(server)
    raw = RawAgent(harness.agent_stub(server))
    await raw.connect()
    submitted = await ops.SubmitProfileRequest(submit_request(duration_seconds=1))

    first = await raw.receive()
    command_id = first.command.command_id
    assert command_id == submitted.targets[0].command_id
    raw.close()  # lost before the ack

    await eventually(
        lambda: get_request(ops, submitted.request_id),
        lambda r: r.targets[0].command_state == cpb.COMMAND_STATE_PENDING,
    )
    again = RawAgent(harness.agent_stub(server), raw.agent_id)
    await again.connect()
    resent = await again.receive()
    assert resent.command.command_id == command_id
    await again.ack(command_id)
    running = await eventually(
        lambda: get_request(ops, submitted.request_id),
        lambda r: r.targets[0].command_state == cpb.COMMAND_STATE_RUNNING,
    )
    assert running.targets[0].delivery_attempts == 2
    response = await again.complete(command_id)
    assert response.command_state == cpb.COMMAND_STATE_SUCCEEDED
    again.close()


async def test_unacknowledged_command_is_resent_on_a_live_stream_after_ack_timeout(
    harness: Harness,
) -> None:
    server = await harness.server()
    ops = harness.operator(server)
    raw = RawAgent(harness.agent_stub(server))
    await raw.connect()
    submitted = await ops.SubmitProfileRequest(submit_request(duration_seconds=1))
    first = await raw.receive()
    second = await raw.receive_alive(timeout=10)  # ack timeout is 1.5 s in these tests
    assert second.command.command_id == first.command.command_id
    await raw.ack(second.command.command_id)
    await eventually(
        lambda: get_request(ops, submitted.request_id),
        lambda r: r.targets[0].command_state == cpb.COMMAND_STATE_RUNNING,
    )
    raw.close()


async def test_agent_never_runs_a_command_twice_across_restarts(harness: Harness) -> None:
    server = await harness.server()
    state_dir = harness.tmp_path / "persistent-agent"
    agent, profiler = await harness.agent(server, state_dir=state_dir)
    ops = harness.operator(server)
    submitted = await ops.SubmitProfileRequest(submit_request(duration_seconds=1))
    command_id = submitted.targets[0].command_id
    await eventually(lambda: get_request(ops, submitted.request_id), lambda r: r.state == SUCCEEDED)
    await harness.stop_agent(agent)

    # The same host comes back (same state directory) and is sent the same command again,
    # as happens when an ack is lost: it acknowledges but does not profile again.
    restarted, profiler2 = await harness.agent(server, state_dir=state_dir)
    assert restarted.agent_id == agent.agent_id
    job_ack = restarted._on_command(
        apb.Command(
            command_id=command_id,
            request_id=submitted.request_id,
            spec=cpb.ProfilingSpec(duration_seconds=1, frequency_hz=11, profiling_mode=1),
        )
    )
    assert job_ack.ack.result == apb.ACK_RESULT_ACCEPTED
    await asyncio.sleep(0.3)
    assert profiler.runs[command_id] == 1
    assert profiler2.runs[command_id] == 0


async def test_rejected_command_records_the_reason(harness: Harness) -> None:
    server = await harness.server()
    ops = harness.operator(server)
    raw = RawAgent(harness.agent_stub(server))
    await raw.connect()
    submitted = await ops.SubmitProfileRequest(submit_request(duration_seconds=1))
    command = (await raw.receive()).command
    await raw.ack(command.command_id, accepted=False, reason="mode not supported here")
    done = await eventually(
        lambda: get_request(ops, submitted.request_id),
        lambda r: r.state == ppb.REQUEST_STATE_FAILED,
    )
    assert done.targets[0].command_state == cpb.COMMAND_STATE_REJECTED
    assert done.targets[0].error_message == "mode not supported here"
    raw.close()


class CpuOnlyProfiler(CountingProfiler):
    supported_modes = frozenset({"cpu"})


async def test_unsupported_mode_is_rejected_by_the_real_agent(harness: Harness) -> None:
    server = await harness.server()
    _, profiler = await harness.agent(server, profiler=CpuOnlyProfiler())
    ops = harness.operator(server)
    agents = await ops.ListAgents(ppb.ListAgentsRequest(service_name="checkout"))
    assert list(agents.agents[0].supported_modes) == [cpb.PROFILING_MODE_CPU]
    submitted = await ops.SubmitProfileRequest(
        submit_request(duration_seconds=1, profiling_mode=cpb.PROFILING_MODE_ALLOCATION)
    )
    done = await eventually(
        lambda: get_request(ops, submitted.request_id),
        lambda r: r.state == ppb.REQUEST_STATE_FAILED,
    )
    assert done.targets[0].command_state == cpb.COMMAND_STATE_REJECTED
    assert "allocation" in done.targets[0].error_message
    assert not profiler.runs


async def test_duplicate_completion_is_a_no_op_and_foreign_ones_are_refused(
    harness: Harness,
) -> None:
    server = await harness.server()
    ops = harness.operator(server)
    stub = harness.agent_stub(server)
    raw = RawAgent(stub)
    await raw.connect()
    submitted = await ops.SubmitProfileRequest(submit_request(duration_seconds=1))
    command_id = (await raw.receive()).command.command_id
    await raw.ack(command_id)
    await raw.ack(command_id)  # duplicate ack: no-op

    first = await raw.complete(command_id)
    again = await raw.complete(command_id, apb.COMMAND_OUTCOME_FAILED)
    assert first.command_state == again.command_state == cpb.COMMAND_STATE_SUCCEEDED

    intruder = RawAgent(stub, "intruder")
    with pytest.raises(grpc.aio.AioRpcError) as foreign:
        await intruder.complete(command_id)
    assert foreign.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await raw.complete("00000000-0000-4000-8000-000000000000")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    done = await get_request(ops, submitted.request_id)
    assert done.targets[0].command_state == cpb.COMMAND_STATE_SUCCEEDED
    raw.close()


async def test_completion_for_an_undelivered_command_is_refused(harness: Harness) -> None:
    server = await harness.server()
    ops = harness.operator(server)
    submitted = await ops.SubmitProfileRequest(
        submit_request(hostnames=["nobody-here"], duration_seconds=1)
    )
    raw = RawAgent(harness.agent_stub(server), "some-agent")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await raw.complete(submitted.targets[0].command_id)
    # The command has no agent yet: it is not this agent's.
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_cancel_stops_running_and_drops_queued_commands(harness: Harness) -> None:
    server = await harness.server()
    _, profiler = await harness.agent(server, profiler=CountingProfiler(time_scale=1.0))
    ops = harness.operator(server)
    running = await ops.SubmitProfileRequest(submit_request(duration_seconds=60))
    queued = await ops.SubmitProfileRequest(submit_request(duration_seconds=60))
    await eventually(
        lambda: get_request(ops, running.request_id),
        lambda r: r.targets[0].command_state == cpb.COMMAND_STATE_RUNNING,
    )

    cancelled_queued = await ops.CancelProfileRequest(
        ppb.CancelProfileRequestRequest(request_id=queued.request_id)
    )
    assert cancelled_queued.request.state == ppb.REQUEST_STATE_CANCELLED
    assert cancelled_queued.request.targets[0].command_state == cpb.COMMAND_STATE_CANCELLED
    await ops.CancelProfileRequest(ppb.CancelProfileRequestRequest(request_id=running.request_id))

    done = await eventually(
        lambda: get_request(ops, running.request_id),
        lambda r: r.state == ppb.REQUEST_STATE_CANCELLED,
        timeout=10,
    )
    target = done.targets[0]
    assert target.command_state == cpb.COMMAND_STATE_CANCELLED
    assert done.cancel_time.seconds > 0
    assert target.result.location  # the partial profile is kept
    assert profiler.runs[queued.targets[0].command_id] == 0
    # Cancelling again is fine and changes nothing.
    again = await ops.CancelProfileRequest(
        ppb.CancelProfileRequestRequest(request_id=running.request_id)
    )
    assert again.request.targets[0].command_state == cpb.COMMAND_STATE_CANCELLED


async def test_stop_profiling_cancels_everything_on_a_host(harness: Harness) -> None:
    server = await harness.server()
    await harness.agent(server, hostname="web-1", profiler=CountingProfiler(time_scale=1.0))
    await harness.agent(server, hostname="web-2", profiler=CountingProfiler(time_scale=1.0))
    ops = harness.operator(server)
    submitted = await ops.SubmitProfileRequest(submit_request(duration_seconds=60))
    queued = await ops.SubmitProfileRequest(submit_request(duration_seconds=60))
    assert len(submitted.targets) == 2
    await eventually(
        lambda: get_request(ops, submitted.request_id),
        lambda r: r.counts.running == 2,
    )

    stopped = await ops.StopProfiling(
        ppb.StopProfilingRequest(service_name="checkout", hostnames=["web-1"])
    )
    assert (stopped.stopping_commands, stopped.cancelled_commands) == (1, 1)
    done = await eventually(
        lambda: get_request(ops, submitted.request_id), lambda r: r.counts.cancelled == 1
    )
    states = {t.hostname: t.command_state for t in done.targets}
    assert states["web-1"] == cpb.COMMAND_STATE_CANCELLED
    assert states["web-2"] == cpb.COMMAND_STATE_RUNNING
    other = await get_request(ops, queued.request_id)
    other_states = {t.hostname: t.command_state for t in other.targets}
    assert other_states == {
        "web-1": cpb.COMMAND_STATE_CANCELLED,
        "web-2": cpb.COMMAND_STATE_PENDING,
    }


async def test_named_host_waits_for_its_agent_then_runs(harness: Harness) -> None:
    server = await harness.server()
    ops = harness.operator(server)
    submitted = await ops.SubmitProfileRequest(
        submit_request(hostnames=["late-host"], duration_seconds=1, ttl_seconds=60)
    )
    assert submitted.targets[0].agent_id == ""
    assert submitted.targets[0].command_state == cpb.COMMAND_STATE_PENDING

    agent, profiler = await harness.agent(server, hostname="late-host")
    done = await eventually(
        lambda: get_request(ops, submitted.request_id), lambda r: r.state == SUCCEEDED
    )
    assert done.targets[0].agent_id == agent.agent_id
    assert sum(profiler.runs.values()) == 1


async def test_undelivered_target_expires_and_never_runs_late(harness: Harness) -> None:
    server = await harness.server()
    ops = harness.operator(server)
    submitted = await ops.SubmitProfileRequest(
        submit_request(hostnames=["gone-host"], duration_seconds=1, ttl_seconds=1)
    )
    done = await eventually(
        lambda: get_request(ops, submitted.request_id),
        lambda r: r.state == ppb.REQUEST_STATE_FAILED,
    )
    assert done.targets[0].command_state == cpb.COMMAND_STATE_EXPIRED
    assert "ttl" in done.targets[0].error_message

    _, profiler = await harness.agent(server, hostname="gone-host")
    await asyncio.sleep(1.0)  # several sweeps
    assert sum(profiler.runs.values()) == 0


async def test_running_command_without_completion_times_out(harness: Harness) -> None:
    server = await harness.server()
    ops = harness.operator(server)
    raw = RawAgent(harness.agent_stub(server))
    await raw.connect()
    submitted = await ops.SubmitProfileRequest(submit_request(duration_seconds=1))
    command_id = (await raw.receive()).command.command_id
    await raw.ack(command_id)
    # duration 1 s + grace 1 s; the raw agent keeps its stream but never reports.
    await raw.stay_alive(3.0)
    done = await eventually(
        lambda: get_request(ops, submitted.request_id),
        lambda r: r.state == ppb.REQUEST_STATE_FAILED,
    )
    assert done.targets[0].command_state == cpb.COMMAND_STATE_TIMED_OUT
    late = await raw.complete(command_id)
    assert late.command_state == cpb.COMMAND_STATE_TIMED_OUT  # terminal states never change
    raw.close()


async def test_continuous_request_runs_sessions_until_cancelled(harness: Harness) -> None:
    server = await harness.server()
    _, profiler = await harness.agent(server, profiler=CountingProfiler(time_scale=0.1))
    ops = harness.operator(server)
    submitted = await ops.SubmitProfileRequest(submit_request(duration_seconds=1, continuous=True))
    command_id = submitted.targets[0].command_id
    await eventually(lambda: asyncio.sleep(0.05, profiler.runs[command_id]), lambda n: n >= 3)
    assert (await get_request(ops, submitted.request_id)).state == ppb.REQUEST_STATE_RUNNING
    await ops.CancelProfileRequest(ppb.CancelProfileRequestRequest(request_id=submitted.request_id))
    done = await eventually(
        lambda: get_request(ops, submitted.request_id),
        lambda r: r.state == ppb.REQUEST_STATE_CANCELLED,
    )
    target = done.targets[0]
    assert target.command_state == cpb.COMMAND_STATE_CANCELLED
    assert target.result.location.endswith(f"{command_id}.*.collapsed")
    assert target.result.samples >= 3 * 11


async def test_late_ack_and_completion_of_a_requeued_command_are_kept(harness: Harness) -> None:
    """The agent got the command, but the server saw the stream end before the ack (so the
    command went back to pending): the agent's late ack and completion still count, and the
    command is not sent again."""
    server = await harness.server()
    ops = harness.operator(server)
    raw = RawAgent(harness.agent_stub(server))
    await raw.connect()
    first = await ops.SubmitProfileRequest(submit_request(duration_seconds=1))
    command_id = (await raw.receive()).command.command_id
    raw.close()  # the ack never made it
    await eventually(
        lambda: get_request(ops, first.request_id),
        lambda r: r.targets[0].command_state == cpb.COMMAND_STATE_PENDING,
    )
    done = await raw.complete(command_id)  # ... but the agent ran it
    assert done.command_state == cpb.COMMAND_STATE_SUCCEEDED

    second = await ops.SubmitProfileRequest(
        submit_request(hostnames=["host-1"], duration_seconds=1)
    )
    again = RawAgent(harness.agent_stub(server), raw.agent_id)
    await again.connect()
    other = (await again.receive_alive()).command.command_id
    assert other == second.targets[0].command_id  # the finished one is not re-sent
    again.close()
    await eventually(
        lambda: get_request(ops, second.request_id),
        lambda r: r.targets[0].command_state == cpb.COMMAND_STATE_PENDING,
    )
    late = RawAgent(harness.agent_stub(server), raw.agent_id)
    await late.connect()
    resent = (await late.receive_alive()).command.command_id
    assert resent == other
    await late.ack(other)
    running = await eventually(
        lambda: get_request(ops, second.request_id),
        lambda r: r.targets[0].command_state == cpb.COMMAND_STATE_RUNNING,
    )
    assert running.targets[0].delivery_attempts == 2
    late.close()
