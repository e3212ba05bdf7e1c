"""Server crashes, rolling restarts and connection rotation, with real processes."""

from __future__ import annotations

import signal
import time

import pytest
from grpc_health.v1 import health_pb2

from pulse.v1 import common_pb2 as cpb
from tests.fault.conftest import (
    FAST_SERVER,
    Fleet,
    Operator,
    check_exactly_once,
    executions,
    free_port,
    start_agents,
    wait_for,
    wait_health,
)

pytestmark = pytest.mark.fault


def test_server_sigkill_while_dispatching_loses_nothing_and_runs_nothing_twice(
    fleet: Fleet,
) -> None:
    port = free_port()
    server = fleet.server(port, *FAST_SERVER)
    agents = start_agents(fleet, port, 3)
    ops = Operator(port)
    wait_for(lambda: ops.online("shop") == 3, "three agents online")

    request_ids = [ops.submit("shop", duration_seconds=1).request_id for _ in range(6)]
    # Kill the server while commands are queued, sent, running and being reported.
    wait_for(lambda: len(executions(*agents)) >= 2, "some commands running", timeout=30)
    server.stop(signal.SIGKILL)
    assert server.proc.returncode == -signal.SIGKILL
    time.sleep(1.5)  # agents finish what they run and retry their reports meanwhile
    restarted = fleet.server(port, *FAST_SERVER)
    wait_for(lambda: ops.online("shop") == 3, "agents reconnected", timeout=30)

    states = check_exactly_once(fleet, ops, request_ids, agents)
    assert len(states) == 18
    # With an agent alive throughout, nothing may be lost: every command succeeds.
    assert set(states) == {cpb.COMMAND_STATE_SUCCEEDED}, states
    for agent in agents:
        assert "connected to" in agent.log()
        assert agent.log().count("connected to") >= 2, agent.log_path  # it reconnected
    assert restarted.proc.poll() is None
    ops.close()


def test_rolling_restart_drains_agents_and_loses_nothing(fleet: Fleet) -> None:
    port = free_port()
    server = fleet.server(port, *FAST_SERVER)
    agents = start_agents(fleet, port, 3)
    ops = Operator(port)
    wait_for(lambda: ops.online("shop") == 3, "three agents online")
    request_ids = [ops.submit("shop", duration_seconds=1).request_id for _ in range(4)]
    wait_for(lambda: len(executions(*agents)) >= 2, "some commands running", timeout=30)

    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    # Health is NOT_SERVING before the process is gone (the drain spread keeps it up briefly).
    server.proc.wait(timeout=3 + 10)  # shutdown grace (3 s) plus generous slack
    stopped_after = time.monotonic() - started
    assert server.proc.returncode == 0, server.log()
    log = server.log()
    assert "shutting down" in log
    for agent in agents:
        assert "server is draining; reconnecting in" in agent.log(), agent.log_path
    delays = sorted(
        float(line.rsplit("in ", 1)[1].split(" s")[0])
        for agent in agents
        for line in agent.log().splitlines()
        if "server is draining; reconnecting in" in line
    )
    assert len(set(delays)) > 1, f"reconnects not spread: {delays}"

    fleet.server(port, *FAST_SERVER)
    wait_for(lambda: ops.online("shop") == 3, "agents back", timeout=30)
    states = check_exactly_once(fleet, ops, request_ids, agents)
    assert set(states) == {cpb.COMMAND_STATE_SUCCEEDED}, states
    print(f"server exited {stopped_after:.1f} s after SIGTERM (grace 3 s)")
    ops.close()


def test_health_turns_not_serving_before_a_draining_server_exits(fleet: Fleet) -> None:
    port = free_port()
    # A long shutdown grace and an open stream keep the draining server up long enough to look.
    server = fleet.server(port, "--shutdown-grace", "8")
    (agent,) = start_agents(fleet, port, 1)
    ops = Operator(port)
    wait_for(lambda: ops.online("shop") == 1, "agent online")
    wait_health(port, health_pb2.HealthCheckResponse.SERVING)
    server.proc.send_signal(signal.SIGTERM)
    wait_health(port, health_pb2.HealthCheckResponse.NOT_SERVING, timeout=8)
    server.proc.wait(timeout=30)
    assert server.proc.returncode == 0
    assert "server is draining" in agent.log()
    ops.close()


def test_short_max_connection_age_rotates_streams_without_losing_commands(fleet: Fleet) -> None:
    port = free_port()
    fleet.server(port, *FAST_SERVER, "--max-connection-age", "2")
    agents = start_agents(fleet, port, 2)
    ops = Operator(port)
    wait_for(lambda: ops.online("shop") == 2, "agents online")
    request_ids = [ops.submit("shop", duration_seconds=1).request_id for _ in range(3)]
    # Streams rotate every 2 s + the 3 s grace: keep submitting while they do.
    for agent in agents:
        wait_for(lambda a=agent: a.log().count("connected to") >= 3, "rotations", timeout=60)
    request_ids += [ops.submit("shop", duration_seconds=1).request_id for _ in range(3)]

    states = check_exactly_once(fleet, ops, request_ids, agents)
    assert set(states) == {cpb.COMMAND_STATE_SUCCEEDED}, states
    ops.close()
