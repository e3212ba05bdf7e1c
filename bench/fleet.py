"""A fleet of emulated agents in one process, built on the real agent library.

Each emulated agent is a real `agent.client.AgentClient` (the same stream loop, acks, executor and
completion reporter as pulse-agent) with the `simulated` profiler and an in-memory run record, on
its own channel and TCP connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from agent.client import AgentClient, AgentConfig, channel_options
from agent.executor import Executor
from agent.profilers.simulated import SimulatedProfiler
from agent.state import MemoryAgentState
from server.main import raise_file_limit


@dataclass
class EmulatedAgent:
    index: int
    client: AgentClient
    channel: grpc.aio.Channel
    task: asyncio.Task[None]


class Fleet:
    def __init__(
        self,
        server: str,
        size: int,
        *,
        service: str = "bench",
        time_scale: float = 1.0,
        max_backoff: float = 30.0,
    ) -> None:
        self.server = server
        self.size = size
        self.service = service
        self.profiler = SimulatedProfiler(time_scale=time_scale, write_files=False)
        self.max_backoff = max_backoff
        self.agents: dict[int, EmulatedAgent] = {}
        # Named in results only: the simulated profiler here writes no files.
        self.output_dir = Path(tempfile.gettempdir()) / "pulse-bench-profiles"

    @staticmethod
    def hostname(index: int) -> str:
        return f"emu-host-{index:05d}"

    def _start_one(self, index: int) -> EmulatedAgent:
        config = AgentConfig(
            server=self.server,
            service_name=self.service,
            hostname=self.hostname(index),
            max_backoff=self.max_backoff,
            # A distinct argument per agent: otherwise channels with identical arguments share
            # one TCP connection, and the server would see far fewer connections than agents.
            channel_options=[("grpc.use_local_subchannel_pool", 1), ("pulse.emulated", index)],
        )
        channel = grpc.aio.insecure_channel(self.server, options=channel_options(config))
        state = MemoryAgentState(f"emu-{index:05d}")

        def executor(report: Any) -> Executor:
            return Executor(self.profiler, state, self.output_dir, report)

        client = AgentClient(config, executor, state, self.profiler.supported_modes, channel)
        task = asyncio.create_task(client.run(), name=f"agent-{index}")
        agent = EmulatedAgent(index, client, channel, task)
        self.agents[index] = agent
        return agent

    async def start(self, *, wave: int = 250, pause: float = 0.05) -> None:
        """Start every agent, in waves, so connection set-up does not all land at once."""
        raise_file_limit()
        for first in range(0, self.size, wave):
            for index in range(first, min(first + wave, self.size)):
                self._start_one(index)
            await asyncio.sleep(pause)

    def connected(self) -> int:
        return sum(1 for a in self.agents.values() if a.client.connected.is_set())

    async def restart(self, indexes: list[int]) -> None:
        """Drop these agents' connections and start them again with the same identity."""
        for index in indexes:
            await self._stop_one(self.agents.pop(index))
        self.collect_dropped()
        for index in indexes:
            self._start_one(index)

    @staticmethod
    def collect_dropped() -> None:
        """Closed channels keep their sockets until the collector frees them; frozen ones never
        are, so unfreeze, collect and freeze again (emulator hygiene after dropping agents)."""
        frozen = gc.get_freeze_count() > 0
        if frozen:
            gc.unfreeze()
        gc.collect()
        if frozen:
            gc.freeze()

    async def _stop_one(self, agent: EmulatedAgent) -> None:
        agent.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await agent.task
        await agent.channel.close()

    async def stop(self) -> None:
        agents = list(self.agents.values())
        self.agents.clear()
        for agent in agents:
            agent.task.cancel()
        await asyncio.gather(*(a.task for a in agents), return_exceptions=True)
        await asyncio.gather(*(a.channel.close() for a in agents), return_exceptions=True)

    def executions(self) -> int:
        return sum(a.client.executor.executions for a in self.agents.values())

    @staticmethod
    def settle_gc() -> None:
        """Move the fleet's long-lived objects out of the collector's generations."""
        gc.collect()
        gc.freeze()
