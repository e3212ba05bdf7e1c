"""Many emulated agents (the real agent library, simulated profiler, one channel each) reconnect
at once after a server SIGKILL: reconnects spread over seconds, all are back within the backoff
cap, and the server keeps answering operators meanwhile.

The fleet size is PULSE_STORM_AGENTS (default 1000: about 40 s on 2 cores, most of it starting
the agents; the probe's latencies include this process's own event loop, shared with them)."""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent.client import AgentClient, AgentConfig
from agent.executor import Executor
from agent.profilers.simulated import SimulatedProfiler
from agent.state import AgentState
from pulse.v1 import profiling_service_pb2 as ppb
from pulse.v1 import profiling_service_pb2_grpc as ppb_grpc
from server.main import raise_file_limit
from tests.fault.conftest import Fleet, free_port
from tests.integration.conftest import eventually

pytestmark = pytest.mark.fault

AGENTS = int(os.environ.get("PULSE_STORM_AGENTS", "1000"))
MAX_BACKOFF = 8.0


def emulated_agent(port: int, i: int, tmp_path: Path) -> AgentClient:
    profiler = SimulatedProfiler(time_scale=0.1, write_files=False)
    state = AgentState(tmp_path / "storm" / f"a{i}")
    config = AgentConfig(
        server=f"127.0.0.1:{port}",
        service_name="storm",
        hostname=f"storm-{i}",
        max_backoff=MAX_BACKOFF,
        # One TCP connection per agent, as on a real fleet.
        channel_options=[("pulse.emulated_agent", i), ("grpc.use_local_subchannel_pool", 1)],
    )

    def executor(report: Any) -> Executor:
        return Executor(profiler, state, state.directory / "profiles", report)

    return AgentClient(config, executor, state, profiler.supported_modes)


class Responsiveness:
    """Asks the server for health and the agent list every half second; records what happens."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.latencies: list[float] = []
        self.failures: list[str] = []

    async def run(self) -> None:
        health = health_pb2_grpc.HealthStub(self.channel)
        ops = ppb_grpc.ProfilingServiceStub(self.channel)
        while True:
            started = time.monotonic()
            try:
                await health.Check(health_pb2.HealthCheckRequest(), timeout=20)
                await ops.ListAgents(ppb.ListAgentsRequest(service_name="storm"), timeout=20)
                self.latencies.append(time.monotonic() - started)
            except grpc.aio.AioRpcError as exc:
                self.failures.append(exc.code().name)
            await asyncio.sleep(0.5)


async def online(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            response = await ppb_grpc.ProfilingServiceStub(channel).ListAgents(
                ppb.ListAgentsRequest(service_name="storm", online_only=True), timeout=20
            )
        except grpc.aio.AioRpcError:
            return -1
        return len(response.agents)


@pytest.mark.timeout(300)
async def test_agents_reconnect_spread_out_after_a_server_crash(
    fleet: Fleet, tmp_path: Path
) -> None:
    raise_file_limit()  # each emulated agent holds a connection (and the server its end)
    port = free_port()
    server_args = ("--heartbeat-interval", "5", "--db-pool-size", "10")
    server = fleet.server(port, *server_args)
    clients = [emulated_agent(port, i, tmp_path) for i in range(AGENTS)]
    tasks = [asyncio.create_task(c.run()) for c in clients]
    try:
        await eventually(lambda: online(port), lambda n: n == AGENTS, timeout=120)
        assert all(c.sessions == 1 for c in clients)

        server.stop(signal.SIGKILL)
        crashed = time.monotonic()
        fleet.server(port, *server_args)
        probe = Responsiveness(port)
        prober = asyncio.create_task(probe.run())

        back: dict[int, float] = {}

        async def reconnected() -> int:
            now = time.monotonic()
            for i, client in enumerate(clients):
                if i not in back and client.sessions >= 2 and client.connected.is_set():
                    back[i] = now - crashed
            return len(back)

        await eventually(reconnected, lambda n: n == AGENTS, timeout=180)
        await eventually(lambda: online(port), lambda n: n == AGENTS, timeout=60)
        prober.cancel()
        await asyncio.gather(prober, return_exceptions=True)
        await probe.channel.close()

        times = sorted(back.values())
        spread = times[-1] - times[0]
        deciles = statistics.quantiles(times, n=10)
        print(
            f"{AGENTS} agents back after the crash: first {times[0]:.1f} s, "
            f"p10 {deciles[0]:.1f} s, median {statistics.median(times):.1f} s, "
            f"p90 {deciles[-1]:.1f} s, last "
            f"{times[-1]:.1f} s; operator calls: {len(probe.latencies)} ok (max "
            f"{max(probe.latencies, default=0):.2f} s), failures {probe.failures}"
        )
        # Spread: jittered backoff, not one synchronised wave.
        assert spread > 1.0, times
        # Within the backoff cap: once the server is back, each agent's next attempt comes within
        # one capped wait; allow the restart itself and generous slack for 2 shared cores.
        assert times[-1] < MAX_BACKOFF * 4 + 30, times
        # Responsive: once reachable again, every operator call was answered.
        assert probe.latencies, probe.failures
        assert set(probe.failures) <= {"UNAVAILABLE"}, probe.failures
        assert sum(c.sessions for c in clients) == 2 * AGENTS  # nobody flapped
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in clients:
            await client.shutdown(grace=0)
            client.state.close()
