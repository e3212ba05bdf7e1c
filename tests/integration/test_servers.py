"""Several servers on one database, session ownership, health and graceful shutdown."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pulse.v1 import profiling_service_pb2 as ppb
from tests.integration.conftest import Harness, RawAgent, eventually, get_request, submit_request


async def test_agent_on_server_a_gets_request_submitted_through_server_b(
    harness: Harness,
) -> None:
    server_a = await harness.server(sweep_interval=timedelta(seconds=30))
    server_b = await harness.server()
    agent, profiler = await harness.agent(server_a)
    ops_b = harness.operator(server_b)

    submitted = await ops_b.SubmitProfileRequest(submit_request(duration_seconds=1))

    assert submitted.targets[0].agent_id == agent.agent_id
    done = await eventually(
        lambda: get_request(ops_b, submitted.request_id),
        lambda r: r.state == ppb.REQUEST_STATE_SUCCEEDED,
        timeout=10,
    )
    assert profiler.runs[done.targets[0].command_id] == 1
    # Delivered by NOTIFY, not by server A's sweep (set to 30 s above).
    assert server_a.hub.dispatcher.pushed == 1
    assert server_b.hub.dispatcher.pushed == 0


async def test_newer_session_of_an_agent_replaces_the_older_one_across_servers(
    harness: Harness,
) -> None:
    # Raw agents send no heartbeats here: a longer interval keeps them from going silent.
    server_a = await harness.server(heartbeat_interval=timedelta(seconds=5))
    server_b = await harness.server(heartbeat_interval=timedelta(seconds=5))
    first = RawAgent(harness.agent_stub(server_a), "twin")
    await first.connect()
    second = RawAgent(harness.agent_stub(server_b), "twin")
    await second.connect()

    with pytest.raises(grpc.aio.AioRpcError) as error:
        await first.receive(timeout=10)
    assert error.value.code() == grpc.StatusCode.ABORTED
    assert "newer session" in (error.value.details() or "")

    ops = harness.operator(server_a)
    submitted = await ops.SubmitProfileRequest(submit_request(duration_seconds=1))
    pushed = await second.receive_alive()
    assert pushed.command.command_id == submitted.targets[0].command_id
    agents = await ops.ListAgents(ppb.ListAgentsRequest())
    assert [a.server_id for a in agents.agents] == [server_b.config.server_id]
    second.close()


async def test_sweep_delivers_when_a_notification_is_missed(harness: Harness) -> None:
    server = await harness.server()
    raw = RawAgent(harness.agent_stub(server))
    await raw.connect()
    server.hub.on_notify = lambda payload: None  # type: ignore[method-assign]
    ops = harness.operator(server)
    submitted = await ops.SubmitProfileRequest(submit_request(duration_seconds=1))
    pushed = await raw.receive_alive(timeout=5)  # sweep interval is 0.3 s here
    assert pushed.command.command_id == submitted.targets[0].command_id
    raw.close()


async def test_graceful_shutdown_drains_agents_and_requeues_unacknowledged(
    harness: Harness,
) -> None:
    server = await harness.server()
    health = health_pb2_grpc.HealthStub(harness.channel(server))
    serving = await health.Check(health_pb2.HealthCheckRequest(service="pulse.v1.AgentService"))
    assert serving.status == health_pb2.HealthCheckResponse.SERVING
    raw = RawAgent(harness.agent_stub(server))
    await raw.connect()
    ops = harness.operator(server)
    submitted = await ops.SubmitProfileRequest(submit_request(duration_seconds=1))
    assert (await raw.receive()).command.command_id == submitted.targets[0].command_id

    stopping = asyncio.create_task(server.stop())
    drain = await raw.receive()
    assert drain.WhichOneof("message") == "drain"
    assert drain.drain.reconnect_after.ToTimedelta().total_seconds() <= 0.2
    await stopping
    harness.servers.remove(server)

    other = await harness.server()
    state = await get_request(harness.operator(other), submitted.request_id)
    assert state.targets[0].command_state == 1  # pending again: re-sent on reconnect
    again = RawAgent(harness.agent_stub(other), raw.agent_id)
    await again.connect()
    assert (await again.receive()).command.command_id == submitted.targets[0].command_id
    again.close()


async def test_real_agent_follows_a_rolling_restart(harness: Harness) -> None:
    server = await harness.server()
    _, profiler = await harness.agent(server)
    port = server.port
    await server.stop()
    harness.servers.remove(server)
    replacement = await harness.server(listen=f"127.0.0.1:{port}")
    ops = harness.operator(replacement)
    await eventually(
        lambda: ops.ListAgents(ppb.ListAgentsRequest(online_only=True)),
        lambda r: [a.server_id for a in r.agents] == [replacement.config.server_id],
    )
    submitted = await ops.SubmitProfileRequest(submit_request(duration_seconds=1))
    done = await eventually(
        lambda: get_request(ops, submitted.request_id),
        lambda r: r.state == ppb.REQUEST_STATE_SUCCEEDED,
    )
    assert profiler.runs[done.targets[0].command_id] == 1
