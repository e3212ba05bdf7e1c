"""In-process Pulse servers (grpc.aio, port 0, real PostgreSQL) and agents."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from agent.client import AgentClient, AgentConfig
from agent.executor import Executor
from agent.profilers.base import Job, ProfileOutput
from agent.profilers.simulated import SimulatedProfiler
from agent.state import AgentState
from pulse.v1 import agent_service_pb2 as apb
from pulse.v1 import agent_service_pb2_grpc as apb_grpc
from pulse.v1 import common_pb2 as cpb
from pulse.v1 import profiling_service_pb2 as ppb
from pulse.v1 import profiling_service_pb2_grpc as ppb_grpc
from server.app import PulseServer, ServerConfig

T = TypeVar("T")

FAST = {
    "heartbeat_interval": timedelta(seconds=0.5),
    "sweep_interval": timedelta(seconds=0.3),
    "ack_timeout": timedelta(seconds=1.5),
    "completion_grace": timedelta(seconds=1),
    "heartbeat_flush_interval": timedelta(seconds=0.2),
    "shutdown_grace": timedelta(seconds=1),
    "drain_spread": timedelta(seconds=0.2),
}


async def eventually(
    probe: Callable[[], Awaitable[T]], check: Callable[[T], bool], timeout: float = 15.0
) -> T:
    """Poll `probe` until `check` holds; fail with the last value otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if check(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s; last value: {value}")
        await asyncio.sleep(0.05)


class CountingProfiler(SimulatedProfiler):
    """The simulated profiler, fast, counting how often each command actually ran."""

    def __init__(self, time_scale: float = 0.05) -> None:
        super().__init__(time_scale=time_scale)
        self.runs: Counter[str] = Counter()

    async def run(self, job: Job, output: Path, stop: asyncio.Event) -> ProfileOutput:
        self.runs[job.command_id] += 1
        return await super().run(job, output, stop)


class Harness:
    def __init__(self, database_url: str, tmp_path: Path) -> None:
        self.database_url = database_url
        self.tmp_path = tmp_path
        self.servers: list[PulseServer] = []
        self.agents: list[tuple[AgentClient, asyncio.Task[None]]] = []
        self.channels: list[grpc.aio.Channel] = []

    async def server(self, **overrides: Any) -> PulseServer:
        options: dict[str, Any] = {"listen": "127.0.0.1:0", **FAST, **overrides}
        config = ServerConfig(database_url=self.database_url, **options)
        server = PulseServer(config)
        await server.start()
        self.servers.append(server)
        return server

    def address(self, server: PulseServer) -> str:
        return f"127.0.0.1:{server.port}"

    def channel(self, server: PulseServer) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(self.address(server))
        self.channels.append(channel)
        return channel

    def operator(self, server: PulseServer) -> ppb_grpc.ProfilingServiceStub:
        return ppb_grpc.ProfilingServiceStub(self.channel(server))

    def agent_stub(self, server: PulseServer) -> apb_grpc.AgentServiceStub:
        return apb_grpc.AgentServiceStub(self.channel(server))

    async def agent(
        self,
        server: PulseServer,
        *,
        service: str = "checkout",
        hostname: str = "host-1",
        profiler: CountingProfiler | None = None,
        state_dir: Path | None = None,
        wait_connected: bool = True,
    ) -> tuple[AgentClient, CountingProfiler]:
        profiler = profiler or CountingProfiler()
        state = AgentState(state_dir or self.tmp_path / f"agent-{uuid.uuid4().hex[:8]}")
        config = AgentConfig(
            server=self.address(server),
            service_name=service,
            hostname=hostname,
            max_backoff=1.0,
            backoff_multiplier=0.1,
        )
        output = state.directory / "profiles"

        def executor(report: Any) -> Executor:
            return Executor(profiler, state, output, report)

        client = AgentClient(config, executor, state, profiler.supported_modes)
        task = asyncio.create_task(client.run())
        self.agents.append((client, task))
        if wait_connected:
            await asyncio.wait_for(client.connected.wait(), 10)
        return client, profiler

    async def stop_agent(self, client: AgentClient) -> None:
        for entry in list(self.agents):
            if entry[0] is client:
                self.agents.remove(entry)
                entry[1].cancel()
                await asyncio.gather(entry[1], return_exceptions=True)
                client.state.close()

    async def close(self) -> None:
        for client, task in self.agents:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            client.state.close()
        for channel in self.channels:
            await channel.close()
        for server in self.servers:
            await server.stop()


@pytest.fixture
async def harness(database_url: str, tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(database_url, tmp_path)
    yield h
    await h.close()


def submit_request(service: str = "checkout", **fields: Any) -> ppb.SubmitProfileRequestRequest:
    fields.setdefault("duration_seconds", 1)
    return ppb.SubmitProfileRequestRequest(service_name=service, **fields)


async def get_request(stub: ppb_grpc.ProfilingServiceStub, request_id: str) -> ppb.ProfileRequest:
    response = await stub.GetProfileRequest(ppb.GetProfileRequestRequest(request_id=request_id))
    return response.request


def hello(agent_id: str, service: str = "checkout", hostname: str = "host-1") -> Any:
    return apb.HeartbeatRequest(
        hello=apb.AgentHello(
            agent_id=agent_id,
            hostname=hostname,
            service_name=service,
            supported_modes=[cpb.PROFILING_MODE_CPU],
        )
    )


class RawAgent:
    """A hand-driven heartbeat stream, for tests that need to misbehave precisely."""

    def __init__(self, stub: apb_grpc.AgentServiceStub, agent_id: str | None = None) -> None:
        self.stub = stub
        self.agent_id = agent_id or f"raw-{uuid.uuid4().hex[:8]}"
        self.call: Any = None

    async def connect(self, service: str = "checkout", hostname: str = "host-1") -> Any:
        self.call = self.stub.Heartbeat()
        await self.call.write(hello(self.agent_id, service, hostname))
        first = await asyncio.wait_for(self.call.read(), 10)
        assert first.WhichOneof("message") == "settings", first
        return first.settings

    async def receive(self, timeout: float = 10.0) -> Any:
        return await asyncio.wait_for(self.call.read(), timeout)

    async def ack(self, command_id: str, accepted: bool = True, reason: str = "") -> None:
        result = apb.ACK_RESULT_ACCEPTED if accepted else apb.ACK_RESULT_REJECTED
        await self.call.write(
            apb.HeartbeatRequest(
                ack=apb.CommandAck(command_id=command_id, result=result, reject_reason=reason)
            )
        )

    async def receive_alive(self, timeout: float = 10.0, every: float = 0.3) -> Any:
        """Receive the next message while sending heartbeats, as a live agent would."""
        pending = asyncio.ensure_future(self.call.read())
        try:
            async with asyncio.timeout(timeout):
                while True:
                    done, _ = await asyncio.wait([pending], timeout=every)
                    if done:
                        return pending.result()
                    await self.heartbeat()
        finally:
            pending.cancel()

    async def stay_alive(self, seconds: float, every: float = 0.3) -> None:
        for _ in range(int(seconds / every)):
            await self.heartbeat()
            await asyncio.sleep(every)

    async def heartbeat(self) -> None:
        await self.call.write(apb.HeartbeatRequest(heartbeat=apb.AgentHeartbeat()))

    async def complete(self, command_id: str, outcome: int = apb.COMMAND_OUTCOME_SUCCEEDED) -> Any:
        return await self.stub.ReportCommandCompletion(
            apb.ReportCommandCompletionRequest(
                agent_id=self.agent_id, command_id=command_id, outcome=outcome
            )
        )

    def close(self) -> None:
        if self.call is not None:
            self.call.cancel()
