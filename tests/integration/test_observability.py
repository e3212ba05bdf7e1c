"""WatchProfileRequest, dry-run submits, the metrics endpoint and JSON logs, on an in-process
server over the real PostgreSQL."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import logging
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pulse.v1 import common_pb2 as cpb
from pulse.v1 import profiling_service_pb2 as ppb
from server import logs
from tests.integration.conftest import Harness, RawAgent, eventually, get_request, submit_request

TERMINAL = {
    ppb.REQUEST_STATE_SUCCEEDED,
    ppb.REQUEST_STATE_PARTIALLY_SUCCEEDED,
    ppb.REQUEST_STATE_FAILED,
    ppb.REQUEST_STATE_CANCELLED,
}


async def next_message(call: Any, raw: RawAgent | None = None, timeout: float = 15.0) -> Any:
    """The watch's next message (EOF at its end), keeping the raw agent's stream alive."""
    pending = asyncio.ensure_future(call.read())
    try:
        async with asyncio.timeout(timeout):
            while True:
                done, _ = await asyncio.wait([pending], timeout=0.3)
                if done:
                    return pending.result()
                if raw is not None:
                    await raw.heartbeat()
    finally:
        pending.cancel()


async def read_until(call: Any, raw: RawAgent, seen: list[Any], check: Any) -> Any:
    while True:
        message = await next_message(call, raw)
        assert message is not grpc.aio.EOF, f"watch ended early after {seen}"
        seen.append(message.request)
        if check(message.request):
            return message.request


# --- WatchProfileRequest ----------------------------------------------------------------------


async def test_watch_sees_pending_running_succeeded_and_ends(harness: Harness) -> None:
    server = await harness.server()
    ops = harness.operator(server)
    submitted = await ops.SubmitProfileRequest(
        submit_request(hostnames=["host-1"], duration_seconds=30)
    )
    call = ops.WatchProfileRequest(ppb.WatchProfileRequestRequest(request_id=submitted.request_id))
    first = await next_message(call)
    assert first.request.request_id == submitted.request_id
    assert first.request.state == ppb.REQUEST_STATE_PENDING
    assert first.request.counts == ppb.TargetCounts(total=1, pending=1)
    assert not first.request.targets

    seen = [first.request]
    raw = RawAgent(harness.agent_stub(server))
    await raw.connect(hostname="host-1")
    command_id = (await raw.receive_alive()).command.command_id
    await raw.ack(command_id)
    running = await read_until(call, raw, seen, lambda r: r.counts.running == 1)
    assert running.state == ppb.REQUEST_STATE_RUNNING

    await raw.complete(command_id)
    done = await read_until(call, raw, seen, lambda r: r.state in TERMINAL)
    assert done.state == ppb.REQUEST_STATE_SUCCEEDED
    assert done.counts == ppb.TargetCounts(total=1, succeeded=1)
    assert await next_message(call, raw) is grpc.aio.EOF  # the stream ends with the request
    assert await call.code() == grpc.StatusCode.OK

    states = [r.state for r in seen]
    assert states[0] == ppb.REQUEST_STATE_PENDING and states[-1] == ppb.REQUEST_STATE_SUCCEEDED
    assert set(states) == {
        ppb.REQUEST_STATE_PENDING,
        ppb.REQUEST_STATE_RUNNING,
        ppb.REQUEST_STATE_SUCCEEDED,
    }
    # Only changes are sent: no two consecutive snapshots are equal.
    assert all((a.state, a.counts) != (b.state, b.counts) for a, b in itertools.pairwise(seen))
    raw.close()


async def test_watch_of_a_finished_request_sends_it_once_and_ends(harness: Harness) -> None:
    server = await harness.server()
    ops = harness.operator(server)
    submitted = await ops.SubmitProfileRequest(submit_request(hostnames=["nowhere"]))
    await ops.CancelProfileRequest(ppb.CancelProfileRequestRequest(request_id=submitted.request_id))

    call = ops.WatchProfileRequest(ppb.WatchProfileRequestRequest(request_id=submitted.request_id))
    messages = [m async for m in call]
    assert [m.request.state for m in messages] == [ppb.REQUEST_STATE_CANCELLED]


async def test_watch_of_a_real_agent_run_ends_succeeded(harness: Harness) -> None:
    server = await harness.server()
    ops = harness.operator(server)
    await harness.agent(server)
    submitted = await ops.SubmitProfileRequest(submit_request(duration_seconds=2))
    call = ops.WatchProfileRequest(ppb.WatchProfileRequestRequest(request_id=submitted.request_id))
    messages = [m.request async for m in call]
    assert messages[-1].state == ppb.REQUEST_STATE_SUCCEEDED
    assert all(m.state not in TERMINAL for m in messages[:-1])


@pytest.mark.parametrize(
    ("request_id", "code"),
    [
        (str(uuid.uuid4()), grpc.StatusCode.NOT_FOUND),
        ("not-a-uuid", grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
async def test_watch_of_a_bad_id_fails_clearly(
    harness: Harness, request_id: str, code: grpc.StatusCode
) -> None:
    server = await harness.server()
    call = harness.operator(server).WatchProfileRequest(
        ppb.WatchProfileRequestRequest(request_id=request_id)
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == code
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert caught.value.details().startswith("request_id:")


# --- dry run --------------------------------------------------------------------------------------


async def test_dry_run_shows_targets_and_rejections_and_creates_nothing(harness: Harness) -> None:
    server = await harness.server()
    ops = harness.operator(server)
    cpu_only = RawAgent(harness.agent_stub(server), "agent-cpu")
    await cpu_only.connect(hostname="web-1")
    gone = RawAgent(harness.agent_stub(server), "agent-gone")
    await gone.connect(hostname="web-2")
    gone.close()
    await eventually(
        lambda: ops.ListAgents(ppb.ListAgentsRequest(service_name="checkout", online_only=True)),
        lambda r: [a.agent_id for a in r.agents] == ["agent-cpu"],
    )

    preview = await ops.SubmitProfileRequest(
        submit_request(profiling_mode=cpb.PROFILING_MODE_ALLOCATION, max_hosts=1, dry_run=True)
    )
    assert preview.request_id == "" and not preview.targets
    (only,) = preview.dry_run_targets
    assert (only.hostname, only.agent_id, only.online) == ("web-1", "agent-cpu", True)
    assert list(only.supported_modes) == [cpb.PROFILING_MODE_CPU]
    assert only.would_reject
    assert "allocation" in only.reason and "not supported" in only.reason

    named = await ops.SubmitProfileRequest(
        submit_request(hostnames=["web-1", "web-2", "web-9"], dry_run=True)
    )
    by_host = {t.hostname: t for t in named.dry_run_targets}
    assert [t.hostname for t in named.dry_run_targets] == ["web-1", "web-2", "web-9"]
    assert not by_host["web-1"].would_reject and by_host["web-1"].reason == ""
    assert by_host["web-2"].agent_id == "agent-gone" and not by_host["web-2"].online
    assert not by_host["web-2"].would_reject and "offline" in by_host["web-2"].reason
    assert by_host["web-9"].agent_id == "" and "no agent" in by_host["web-9"].reason

    # Same checks as a real submit: bad fields and no online agent at all.
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await ops.SubmitProfileRequest(submit_request(duration_seconds=0, dry_run=True))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as nobody:
        await ops.SubmitProfileRequest(submit_request("empty-service", dry_run=True))
    assert nobody.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    listed = await ops.ListProfileRequests(ppb.ListProfileRequestsRequest())
    assert list(listed.requests) == []
    # Nothing reached the agent either.
    with pytest.raises(TimeoutError):
        await cpu_only.receive(timeout=0.5)
    cpu_only.close()


# --- metrics --------------------------------------------------------------------------------------


def scrape(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body = response.read().decode()
    return {family.name: family for family in text_string_to_metric_families(body)}


def value(families: dict[str, Any], name: str, sample: str | None = None, **labels: str) -> float:
    family = families[name]
    for s in family.samples:
        if (sample is None or s.name == sample) and all(
            s.labels.get(k) == v for k, v in labels.items()
        ):
            return float(s.value)
    raise AssertionError(f"no sample {sample or name} {labels} in {family.samples}")


EXPECTED_FAMILIES = {
    "pulse_agents_connected",
    "pulse_heartbeats",
    "pulse_commands",
    "pulse_dispatch_latency_seconds",
    "pulse_command_run_seconds",
    "pulse_rpcs",
    "pulse_database_errors",
    "pulse_db_pool_connections",
    "pulse_db_pool_size",
    "pulse_notify_wakeups",
    "pulse_sweeps",
    "pulse_sweep_wakeups",
    "pulse_dispatch_claims",
    "pulse_commands_pushed",
}


async def test_metrics_endpoint_serves_every_family_after_traffic(harness: Harness) -> None:
    server = await harness.server(metrics_listen="127.0.0.1:0")
    assert server.metrics_port
    ops = harness.operator(server)
    await harness.agent(server)
    submitted = await ops.SubmitProfileRequest(submit_request(duration_seconds=1))
    await eventually(
        lambda: get_request(ops, submitted.request_id),
        lambda r: r.state == ppb.REQUEST_STATE_SUCCEEDED,
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await ops.GetProfileRequest(ppb.GetProfileRequestRequest(request_id=str(uuid.uuid4())))

    families = await eventually(
        lambda: asyncio.to_thread(scrape, server.metrics_port),
        lambda f: value(f, "pulse_sweeps") >= 1 and value(f, "pulse_heartbeats") >= 1,
    )
    assert set(families) >= EXPECTED_FAMILIES, EXPECTED_FAMILIES - set(families)
    assert value(families, "pulse_agents_connected") == 1
    assert value(families, "pulse_commands", state="succeeded") == 1
    assert value(families, "pulse_commands", state="pending") == 0
    submit = "/pulse.v1.ProfilingService/SubmitProfileRequest"
    get = "/pulse.v1.ProfilingService/GetProfileRequest"
    assert value(families, "pulse_rpcs", "pulse_rpcs_total", method=submit, code="OK") == 1
    assert value(families, "pulse_rpcs", "pulse_rpcs_total", method=get, code="NOT_FOUND") == 1
    assert value(
        families, "pulse_rpcs", "pulse_rpcs_total",
        method="/pulse.v1.AgentService/ReportCommandCompletion", code="OK",
    ) >= 1  # fmt: skip
    latency = value(
        families, "pulse_dispatch_latency_seconds", "pulse_dispatch_latency_seconds_count"
    )
    assert latency >= 1  # one per ack (a re-send under heavy load would add one)
    assert (
        value(families, "pulse_dispatch_latency_seconds", "pulse_dispatch_latency_seconds_sum") > 0
    )
    assert (
        value(
            families,
            "pulse_command_run_seconds",
            "pulse_command_run_seconds_count",
            outcome="succeeded",
        )
        >= 1
    )
    # A small submit names its targets in the NOTIFY (kind "t").
    assert value(families, "pulse_notify_wakeups", kind="t") >= 1
    assert value(families, "pulse_commands_pushed") >= 1
    assert value(families, "pulse_db_pool_size") == server.config.db_pool_size
    assert value(families, "pulse_database_errors", kind="unavailable") == 0


async def test_no_metrics_endpoint_by_default(harness: Harness) -> None:
    server = await harness.server()
    assert server.metrics_port is None


# --- JSON logs ------------------------------------------------------------------------------------


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    root.setLevel(previous)


async def test_json_log_lines_parse_and_carry_ids(harness: Harness, json_log: io.StringIO) -> None:
    server = await harness.server()
    ops = harness.operator(server)
    client, _ = await harness.agent(server)
    submitted = await ops.SubmitProfileRequest(submit_request(duration_seconds=1))
    request_id = submitted.request_id
    command_id = submitted.targets[0].command_id
    await eventually(
        lambda: get_request(ops, request_id), lambda r: r.state == ppb.REQUEST_STATE_SUCCEEDED
    )

    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)

    def about(command: str) -> list[dict[str, Any]]:
        return [line for line in lines if line.get("command_id") == command]

    submit_lines = [line for line in lines if line.get("request_id") == request_id]
    assert any(line["logger"] == "server.servicers" for line in submit_lines)
    sent = [line for line in about(command_id) if line["logger"] == "server.dispatcher"]
    assert sent and sent[0]["request_id"] == request_id
    assert sent[0]["agent_id"] == client.agent_id
    acked = [line for line in about(command_id) if line["logger"] == "server.hub"]
    assert acked and acked[0]["agent_id"] == client.agent_id
    assert any(line["logger"] == "pulse.agent" for line in about(command_id))
    # Every state change of the command has its INFO line: sent, running, succeeded.
    server_lines = [line for line in about(command_id) if line["logger"].startswith("server.")]
    assert {line["level"] for line in server_lines} == {"INFO"}
    messages = " | ".join(line["message"] for line in server_lines)
    assert "sending command" in messages
    assert "accepted command" in messages and "-> running" in messages
    assert "succeeded -> succeeded" in messages


async def test_sweeps_and_cancels_log_one_line_per_command(
    harness: Harness, json_log: io.StringIO
) -> None:
    server = await harness.server()
    ops = harness.operator(server)
    expiring = await ops.SubmitProfileRequest(
        submit_request(hostnames=["gone-1", "gone-2"], ttl_seconds=1)
    )
    cancelled = await ops.SubmitProfileRequest(submit_request(hostnames=["later-1"]))
    await ops.CancelProfileRequest(ppb.CancelProfileRequestRequest(request_id=cancelled.request_id))
    await eventually(
        lambda: get_request(ops, expiring.request_id),
        lambda r: r.state == ppb.REQUEST_STATE_FAILED,
    )

    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    moved = [line for line in lines if line["logger"] == "db.store"]
    expired = {
        line["command_id"]
        for line in moved
        if line.get("request_id") == expiring.request_id and "-> expired" in line["message"]
    }
    assert expired == {t.command_id for t in expiring.targets}
    (cancel_line,) = [line for line in moved if line.get("request_id") == cancelled.request_id]
    assert cancel_line["command_id"] == cancelled.targets[0].command_id
    assert "-> cancelled" in cancel_line["message"] and cancel_line["level"] == "INFO"
