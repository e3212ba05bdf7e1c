"""Agents killed mid-profile, and networks that drop, delay or reset traffic."""

from __future__ import annotations

import signal

import pytest

from pulse.v1 import common_pb2 as cpb
from tests.fault.conftest import (
    FAST_SERVER,
    TERMINAL,
    Fleet,
    Operator,
    agent_args,
    check_exactly_once,
    executions,
    free_port,
    wait_for,
)

pytestmark = pytest.mark.fault


def target_state(ops: Operator, request_id: str) -> cpb.CommandState.ValueType | None:
    view = ops.try_get(request_id)
    return view.targets[0].command_state if view is not None else None


def test_agent_killed_while_profiling_times_out_and_never_runs_it_again(fleet: Fleet) -> None:
    port = free_port()
    fleet.server(port, *FAST_SERVER)
    agent = fleet.agent(port, "agent-0", *agent_args(0))
    ops = Operator(port)
    wait_for(lambda: ops.online("shop") == 1, "agent online")

    first = ops.submit("shop", duration_seconds=3)
    command_id = first.targets[0].command_id
    wait_for(lambda: executions(agent)[command_id] == 1, "command started")
    agent.stop(signal.SIGKILL)

    # Restarted at once with the same state directory: it must not run the command again.
    state_dir = fleet.tmp_path / "agent-0" / "state"
    restarted = fleet.agent(
        port, "agent-0-restarted", *agent_args(0), "--state-dir", str(state_dir)
    )
    wait_for(lambda: ops.online("shop") == 1, "restarted agent online")
    assert ops.agents("shop")[0].agent_id == first.targets[0].agent_id  # same identity

    done = wait_for(
        lambda: target_state(ops, first.request_id) in TERMINAL and ops.get(first.request_id),
        "the killed command to end",
        timeout=60,
    )
    target = done.targets[0]
    assert target.command_state == cpb.COMMAND_STATE_TIMED_OUT, target
    assert "duration + grace" in target.error_message

    # The agent is free again and runs new work; the killed command never ran a second time.
    second = ops.submit("shop", duration_seconds=1)
    check_exactly_once(fleet, ops, [second.request_id], [restarted])
    assert target_state(ops, second.request_id) == cpb.COMMAND_STATE_SUCCEEDED
    assert executions(agent, restarted)[command_id] == 1
    assert executions(restarted)[command_id] == 0
    ops.close()


def test_blackholed_network_is_noticed_on_both_sides_and_nothing_is_lost(
    fleet: Fleet, proxy_factory: object
) -> None:
    port = free_port()
    server = fleet.server(port, *FAST_SERVER)
    proxy = proxy_factory(port)  # type: ignore[operator]
    agent = fleet.agent(
        proxy.port, "agent-0", *agent_args(0), "--keepalive-time", "6", "--keepalive-timeout", "2"
    )
    ops = Operator(port)
    wait_for(lambda: ops.online("shop") == 1, "agent online")

    assert proxy.blackhole() >= 1
    # The server still believes the agent is online and sends it a command into the void.
    submitted = ops.submit("shop", duration_seconds=1)
    command_id = submitted.targets[0].command_id

    # The server notices the silence (3 x 1 s heartbeat interval): offline, command re-queued.
    wait_for(lambda: ops.online("shop") == 0, "agent offline on the server", timeout=20)
    wait_for(
        lambda: "closed: no heartbeat within the liveness threshold" in server.log(),
        "silent stream closed",
    )
    # The agent notices through keepalive (6 s + 2 s), reconnects through a fresh connection,
    # and gets the command again, with the same id.
    wait_for(lambda: agent.log().count("connected to") >= 2, "agent reconnected", timeout=40)
    states = check_exactly_once(fleet, ops, [submitted.request_id], [agent])
    assert states == [cpb.COMMAND_STATE_SUCCEEDED]
    assert ops.get(submitted.request_id).targets[0].delivery_attempts >= 2
    assert executions(agent)[command_id] == 1
    ops.close()


def test_slow_and_resetting_network_loses_nothing(fleet: Fleet, proxy_factory: object) -> None:
    port = free_port()
    fleet.server(port, *FAST_SERVER)
    proxy = proxy_factory(port)  # type: ignore[operator]
    proxy.latency = 0.05
    agents = [fleet.agent(proxy.port, f"agent-{i}", *agent_args(i)) for i in range(2)]
    ops = Operator(port)
    wait_for(lambda: ops.online("shop") == 2, "agents online")

    request_ids = [ops.submit("shop", duration_seconds=1).request_id for _ in range(4)]
    for round_ in range(3):
        wait_for(lambda r=round_: len(executions(*agents)) > r * 2, "progress", timeout=40)
        proxy.reset()  # RST on every open connection, in the middle of the work
    states = check_exactly_once(fleet, ops, request_ids, agents)
    assert set(states) == {cpb.COMMAND_STATE_SUCCEEDED}, states
    for agent in agents:
        assert agent.log().count("connected to") >= 2
    ops.close()
