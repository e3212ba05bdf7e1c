"""Operator RPCs: targeting, idempotency, parallel submissions, listing, and bad input."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import grpc
import pytest
from sqlalchemy import text

from pulse.v1 import agent_service_pb2 as apb
from pulse.v1 import profiling_service_pb2 as ppb
from server.app import PulseServer
from tests.integration.conftest import Harness, RawAgent, eventually, submit_request

BAD_UUID = "not-a-uuid"
UNKNOWN_UUID = "6f1c1d7e-3f2a-4d6b-9c1e-000000000000"


async def _rows(server: PulseServer, sql: str) -> int:
    async with server.engine.connect() as conn:
        return int(await conn.scalar(text(sql)) or 0)


async def test_service_wide_request_targets_online_agents_only(harness: Harness) -> None:
    server = await harness.server()
    ops = harness.operator(server)
    a, _ = await harness.agent(server, hostname="a")
    b, _ = await harness.agent(server, hostname="b")
    await harness.agent(server, service="other", hostname="c")
    gone, _ = await harness.agent(server, hostname="gone")
    await harness.stop_agent(gone)
    await eventually(
        lambda: ops.ListAgents(ppb.ListAgentsRequest(service_name="checkout", online_only=True)),
        lambda r: len(r.agents) == 2,
    )

    submitted = await ops.SubmitProfileRequest(submit_request(duration_seconds=1))

    assert {t.agent_id for t in submitted.targets} == {a.agent_id, b.agent_id}
    assert {t.hostname for t in submitted.targets} == {"a", "b"}


async def test_service_wide_request_with_no_online_agent_creates_nothing(harness: Harness) -> None:
    server = await harness.server()
    ops = harness.operator(server)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await ops.SubmitProfileRequest(submit_request("nobody", duration_seconds=1))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no online agent" in (error.value.details() or "")
    assert await _rows(server, "SELECT count(*) FROM profile_requests") == 0
    assert await _rows(server, "SELECT count(*) FROM commands") == 0


async def test_max_hosts_caps_targets(harness: Harness) -> None:
    server = await harness.server()
    ops = harness.operator(server)
    hosts = [f"h{i}" for i in range(6)]
    submitted = await ops.SubmitProfileRequest(
        submit_request(hostnames=hosts, duration_seconds=1, max_hosts=2)
    )
    assert len(submitted.targets) == 2
    assert {t.hostname for t in submitted.targets} <= set(hosts)


async def test_idempotency_key_returns_the_same_request_even_in_parallel(
    harness: Harness,
) -> None:
    server = await harness.server()
    ops = harness.operator(server)
    request = submit_request(hostnames=["x", "y"], duration_seconds=5, idempotency_key="deploy-42")

    responses = await asyncio.gather(*(ops.SubmitProfileRequest(request) for _ in range(8)))

    assert len({r.request_id for r in responses}) == 1
    assert sum(not r.deduplicated for r in responses) == 1
    assert all(len(r.targets) == 2 for r in responses)
    assert await _rows(server, "SELECT count(*) FROM commands") == 2
    changed = submit_request(hostnames=["x"], duration_seconds=5, idempotency_key="deploy-42")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await ops.SubmitProfileRequest(changed)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_parallel_submissions_never_lose_or_merge_targets(harness: Harness) -> None:
    server = await harness.server()
    ops = harness.operator(server)
    agents = [await harness.agent(server, hostname=f"node-{i}") for i in range(3)]
    agent_ids = {client.agent_id for client, _ in agents}

    responses = await asyncio.gather(
        *(ops.SubmitProfileRequest(submit_request(duration_seconds=1)) for _ in range(20))
    )

    assert len({r.request_id for r in responses}) == 20
    command_ids = [t.command_id for r in responses for t in r.targets]
    assert len(command_ids) == len(set(command_ids)) == 60
    for response in responses:
        assert {t.agent_id for t in response.targets} == agent_ids
        stored = await ops.GetProfileRequest(
            ppb.GetProfileRequestRequest(request_id=response.request_id)
        )
        assert {t.command_id for t in stored.request.targets} == {
            t.command_id for t in response.targets
        }


async def test_list_requests_filters_and_paginates(harness: Harness) -> None:
    server = await harness.server()
    ops = harness.operator(server)
    created = []
    for i in range(7):
        response = await ops.SubmitProfileRequest(
            submit_request("svc-a" if i % 2 else "svc-b", hostnames=["h"], duration_seconds=1)
        )
        created.append(response.request_id)
    await ops.CancelProfileRequest(ppb.CancelProfileRequestRequest(request_id=created[0]))

    seen: list[str] = []
    token = ""
    while True:
        page = await ops.ListProfileRequests(
            ppb.ListProfileRequestsRequest(page_size=3, page_token=token)
        )
        assert len(page.requests) <= 3
        seen += [r.request_id for r in page.requests]
        token = page.next_page_token
        if not token:
            break
    assert seen == list(reversed(created))  # newest first, each exactly once

    only_a = await ops.ListProfileRequests(ppb.ListProfileRequestsRequest(service_name="svc-a"))
    assert {r.service_name for r in only_a.requests} == {"svc-a"}
    assert len(only_a.requests) == 3
    cancelled = await ops.ListProfileRequests(
        ppb.ListProfileRequestsRequest(state=ppb.REQUEST_STATE_CANCELLED)
    )
    assert [r.request_id for r in cancelled.requests] == [created[0]]
    pending = await ops.ListProfileRequests(
        ppb.ListProfileRequestsRequest(state=ppb.REQUEST_STATE_PENDING)
    )
    assert len(pending.requests) == 6
    assert all(not r.targets for r in pending.requests)


async def test_list_agents_shows_liveness_and_running_commands(harness: Harness) -> None:
    # The raw agent sends no heartbeats: a longer interval keeps it online while the test looks.
    server = await harness.server(heartbeat_interval=timedelta(seconds=5))
    ops = harness.operator(server)
    raw = RawAgent(harness.agent_stub(server), "agent-live")
    await raw.connect(hostname="live")
    submitted = await ops.SubmitProfileRequest(submit_request(duration_seconds=30))
    command_id = (await raw.receive()).command.command_id
    await raw.ack(command_id)

    listed = await eventually(
        lambda: ops.ListAgents(ppb.ListAgentsRequest(service_name="checkout")),
        lambda r: list(r.agents[0].running_command_ids) == [command_id],
    )
    agent = listed.agents[0]
    assert agent.online and agent.agent_id == "agent-live" and agent.hostname == "live"
    assert agent.server_id == server.config.server_id
    assert agent.last_heartbeat_time.seconds > 0
    assert submitted.targets[0].agent_id == "agent-live"

    raw.close()  # stream gone: offline at once
    listed = await eventually(
        lambda: ops.ListAgents(ppb.ListAgentsRequest(service_name="checkout")),
        lambda r: not r.agents[0].online,
    )
    assert listed.agents[0].server_id == ""
    online = await ops.ListAgents(ppb.ListAgentsRequest(online_only=True))
    assert not online.agents


async def test_silent_agent_is_disconnected_and_offline(harness: Harness) -> None:
    server = await harness.server()
    ops = harness.operator(server)
    raw = RawAgent(harness.agent_stub(server), "agent-silent")
    await raw.connect()
    # No heartbeats: after 3 intervals (1.5 s here) the server ends the stream.
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await raw.receive(timeout=10)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    listed = await ops.ListAgents(ppb.ListAgentsRequest())
    assert not listed.agents[0].online


async def test_heartbeats_are_written_in_batches(harness: Harness) -> None:
    server = await harness.server()
    raws = [RawAgent(harness.agent_stub(server), f"hb-{i}") for i in range(5)]
    for raw in raws:
        await raw.connect()
    flushes_before = server.hub.heartbeats.flushes
    beats_before = server.hub.heartbeats.heartbeats
    for _ in range(10):
        for raw in raws:
            await raw.heartbeat()
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    beats = server.hub.heartbeats.heartbeats - beats_before
    flushes = server.hub.heartbeats.flushes - flushes_before
    assert beats == 50
    assert 1 <= flushes <= 5  # one statement per flush interval, not one per heartbeat
    for raw in raws:
        raw.close()


BAD_SUBMITS: list[tuple[dict[str, Any], str]] = [
    ({"service_name": ""}, "service_name"),
    ({"service_name": "bad name!"}, "service_name"),
    ({"duration_seconds": 0}, "duration_seconds"),
    ({"duration_seconds": 3601}, "duration_seconds"),
    ({"frequency_hz": 1001}, "frequency_hz"),
    ({"frequency_hz": -1}, "frequency_hz"),
    ({"profiling_mode": 42}, "profiling_mode"),
    ({"pids": [1, -5]}, "pids[1]"),
    ({"max_hosts": -1}, "max_hosts"),
    ({"ttl_seconds": -3}, "ttl_seconds"),
    ({"hostnames": ["ok", ""]}, "hostnames[1]"),
    ({"hostnames": ["dup", "dup"]}, "hostnames"),
    ({"additional_args": {"bad key": "v"}}, "additional_args"),
    ({"idempotency_key": "k" * 200}, "idempotency_key"),
]


@pytest.mark.parametrize(("fields", "field"), BAD_SUBMITS)
async def test_bad_submit_names_the_field(
    harness: Harness, fields: dict[str, Any], field: str
) -> None:
    server = await harness.server()
    ops = harness.operator(server)
    request = {"service_name": "checkout", "hostnames": ["h"], "duration_seconds": 10, **fields}
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await ops.SubmitProfileRequest(ppb.SubmitProfileRequestRequest(**request))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.value.details() or "").startswith(field)
    assert await _rows(server, "SELECT count(*) FROM profile_requests") == 0


async def test_bad_ids_and_filters_on_every_operator_rpc(harness: Harness) -> None:
    server = await harness.server()
    ops = harness.operator(server)
    cases = [
        (ops.GetProfileRequest(ppb.GetProfileRequestRequest(request_id=BAD_UUID)), "request_id"),
        (ops.GetProfileRequest(ppb.GetProfileRequestRequest()), "request_id"),
        (
            ops.CancelProfileRequest(ppb.CancelProfileRequestRequest(request_id=BAD_UUID)),
            "request_id",
        ),
        (ops.ListProfileRequests(ppb.ListProfileRequestsRequest(page_size=501)), "page_size"),
        (ops.ListProfileRequests(ppb.ListProfileRequestsRequest(page_token="@@")), "page_token"),
        (ops.ListProfileRequests(ppb.ListProfileRequestsRequest(state=77)), "state"),
        (ops.ListAgents(ppb.ListAgentsRequest(service_name="no spaces")), "service_name"),
        (ops.StopProfiling(ppb.StopProfilingRequest()), "service_name"),
        (
            ops.StopProfiling(ppb.StopProfilingRequest(service_name="s", hostnames=["a b"])),
            "hostnames[0]",
        ),
    ]
    for call, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert (error.value.details() or "").startswith(field), error.value.details()
    for call in (
        ops.GetProfileRequest(ppb.GetProfileRequestRequest(request_id=UNKNOWN_UUID)),
        ops.CancelProfileRequest(ppb.CancelProfileRequestRequest(request_id=UNKNOWN_UUID)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call
        assert error.value.code() == grpc.StatusCode.NOT_FOUND


async def test_bad_agent_input_is_refused_with_the_field(harness: Harness) -> None:
    server = await harness.server()
    stub = harness.agent_stub(server)
    completions = [
        (apb.ReportCommandCompletionRequest(command_id=UNKNOWN_UUID, outcome=1), "agent_id"),
        (apb.ReportCommandCompletionRequest(agent_id="a", command_id=BAD_UUID, outcome=1),
         "command_id"),
        (apb.ReportCommandCompletionRequest(agent_id="a", command_id=UNKNOWN_UUID), "outcome"),
    ]  # fmt: skip
    for request, field in completions:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.ReportCommandCompletion(request)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (error.value.details() or "").startswith(field)

    hellos = [
        (apb.HeartbeatRequest(heartbeat=apb.AgentHeartbeat()), "hello"),
        (apb.HeartbeatRequest(hello=apb.AgentHello(hostname="h", service_name="s")),
         "hello.agent_id"),
        (apb.HeartbeatRequest(hello=apb.AgentHello(agent_id="a", service_name="s")),
         "hello.hostname"),
        (apb.HeartbeatRequest(hello=apb.AgentHello(agent_id="a", hostname="h")),
         "hello.service_name"),
        (apb.HeartbeatRequest(hello=apb.AgentHello(agent_id="a", hostname="h", service_name="s",
                                                  supported_modes=[9])),
         "hello.supported_modes[0]"),
    ]  # fmt: skip
    for first, field in hellos:
        call = stub.Heartbeat()
        await call.write(first)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call.read()
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (error.value.details() or "").startswith(field), error.value.details()
    assert await _rows(server, "SELECT count(*) FROM agents") == 0
