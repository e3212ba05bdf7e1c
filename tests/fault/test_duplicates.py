"""Duplicates against a real server process: repeated acks and completions, a command re-sent
after a lost ack, and two processes claiming one agent id. Every repeat is a no-op."""

from __future__ import annotations

import asyncio
import shutil

import grpc
import pytest

from pulse.v1 import agent_service_pb2 as apb
from pulse.v1 import agent_service_pb2_grpc as apb_grpc
from pulse.v1 import common_pb2 as cpb
from pulse.v1 import profiling_service_pb2 as ppb
from pulse.v1 import profiling_service_pb2_grpc as ppb_grpc
from tests.fault.conftest import (
    FAST_SERVER,
    TERMINAL,
    Fleet,
    Operator,
    agent_args,
    executions,
    free_port,
    wait_for,
)
from tests.integration.conftest import RawAgent, eventually

pytestmark = pytest.mark.fault


class Remote:
    """Async stubs on one server process."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.ops = ppb_grpc.ProfilingServiceStub(self.channel)
        self.agents = apb_grpc.AgentServiceStub(self.channel)

    async def submit(self, **fields: object) -> ppb.SubmitProfileRequestResponse:
        fields.setdefault("duration_seconds", 1)
        return await self.ops.SubmitProfileRequest(
            ppb.SubmitProfileRequestRequest(service_name="shop", **fields)  # type: ignore[arg-type]
        )

    async def target(self, request_id: str) -> ppb.Target:
        response = await self.ops.GetProfileRequest(
            ppb.GetProfileRequestRequest(request_id=request_id)
        )
        return response.request.targets[0]

    async def state_is(self, request_id: str, state: int, agent: RawAgent | None = None) -> None:
        async def probe() -> ppb.Target:
            if agent is not None:
                await agent.heartbeat()
            return await self.target(request_id)

        await eventually(probe, lambda t: t.command_state == state, timeout=30)


async def start_server(fleet: Fleet) -> tuple[int, Remote]:
    port = free_port()
    fleet.server(port, *FAST_SERVER)
    ops = Operator(port)
    await asyncio.to_thread(wait_for, ops.ready, "server up")
    ops.close()
    return port, Remote(port)


async def test_resent_acked_and_completed_twice_changes_nothing(fleet: Fleet) -> None:
    _, remote = await start_server(fleet)
    raw = RawAgent(remote.agents, "dup-agent")
    await raw.connect(service="shop", hostname="web-0")
    submitted = await remote.submit()
    command_id = submitted.targets[0].command_id

    first = await raw.receive_alive()
    assert first.command.command_id == command_id
    # No ack (as if it were lost): after the ack timeout (3 s) the same command comes again.
    again = await raw.receive_alive(timeout=30)
    assert again.command.command_id == command_id
    assert (await remote.target(submitted.request_id)).delivery_attempts == 2

    await raw.ack(command_id)
    await raw.ack(command_id)  # duplicate ack
    await remote.state_is(submitted.request_id, cpb.COMMAND_STATE_RUNNING, raw)
    done = await raw.complete(command_id)
    assert done.command_state == cpb.COMMAND_STATE_SUCCEEDED
    repeat = await raw.complete(command_id, apb.COMMAND_OUTCOME_FAILED)  # duplicate, other outcome
    assert repeat.command_state == cpb.COMMAND_STATE_SUCCEEDED
    await raw.ack(command_id, accepted=False, reason="late duplicate")
    await raw.stay_alive(0.6)
    target = await remote.target(submitted.request_id)
    assert target.command_state == cpb.COMMAND_STATE_SUCCEEDED
    assert target.error_message == ""

    other = RawAgent(remote.agents, "someone-else")
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await other.complete(command_id)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await raw.complete("00000000-0000-4000-8000-000000000000")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    raw.close()
    await remote.channel.close()


async def test_completion_after_the_stream_was_lost_before_the_ack_counts(fleet: Fleet) -> None:
    _, remote = await start_server(fleet)
    raw = RawAgent(remote.agents, "lost-ack")
    await raw.connect(service="shop", hostname="web-0")
    submitted = await remote.submit(ttl_seconds=2)
    command_id = (await raw.receive_alive()).command.command_id
    raw.close()  # the stream breaks after the agent started the command, before its ack
    await remote.state_is(submitted.request_id, cpb.COMMAND_STATE_PENDING)

    done = await raw.complete(command_id)  # the agent's completion report still counts
    assert done.command_state == cpb.COMMAND_STATE_SUCCEEDED
    assert (await raw.complete(command_id)).command_state == cpb.COMMAND_STATE_SUCCEEDED


async def test_a_delivered_command_times_out_instead_of_expiring(fleet: Fleet) -> None:
    _, remote = await start_server(fleet)
    raw = RawAgent(remote.agents, "gone-agent")
    await raw.connect(service="shop", hostname="web-0")
    delivered = await remote.submit(ttl_seconds=2)
    await raw.receive_alive()
    raw.close()  # it may be running on the agent, which never comes back
    never = await remote.submit(hostnames=["web-9"], ttl_seconds=2)

    await remote.state_is(never.request_id, cpb.COMMAND_STATE_EXPIRED)
    # TTL 2 s passed, then last send + duration 1 s + grace 4 s: timed out, not expired.
    await remote.state_is(delivered.request_id, cpb.COMMAND_STATE_TIMED_OUT)
    late = await raw.complete((await remote.target(delivered.request_id)).command_id)
    assert late.command_state == cpb.COMMAND_STATE_TIMED_OUT  # terminal states absorb
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await raw.complete((await remote.target(never.request_id)).command_id)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED  # never delivered to it
    await remote.channel.close()


def test_two_processes_with_one_agent_id(fleet: Fleet) -> None:
    port = free_port()
    fleet.server(port, *FAST_SERVER)
    first = fleet.agent(port, "twin-a", *agent_args(0))
    ops = Operator(port)
    wait_for(lambda: ops.online("shop") == 1, "first twin online")
    # A cloned host: same agent id (state directory copied), its own run record from now on.
    clone = fleet.tmp_path / "twin-b" / "state"
    clone.mkdir(parents=True)
    shutil.copy(fleet.tmp_path / "twin-a" / "state" / "agent_id", clone / "agent_id")
    second = fleet.agent(port, "twin-b", *agent_args(0))
    wait_for(
        lambda: "superseded by a newer session" in first.log() + second.log(),
        "the older session told why it ended",
    )
    assert len(ops.agents("shop")) == 1  # one agent record, one live session at a time

    request_ids = [ops.submit("shop", hostnames=["web-0"]).request_id for _ in range(3)]
    views = wait_for(lambda: ops.all_terminal(request_ids), "every target terminal", timeout=90)
    states = [v.targets[0].command_state for v in views]
    assert all(s in TERMINAL for s in states)
    for twin in (first, second):
        twice = {c: n for c, n in executions(twin).items() if n > 1}
        assert not twice, f"{twin.log_path.name} ran commands twice: {twice}"
    runs = executions(first, second)
    for view in views:
        if view.targets[0].command_state == cpb.COMMAND_STATE_SUCCEEDED:
            assert runs[view.targets[0].command_id] >= 1
    print(f"twins: states {states}, runs across both processes {dict(runs)}")
    ops.close()
