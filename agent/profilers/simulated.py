"""A profiler that only waits and writes a tiny file: for fleet emulation and benchmarks."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from agent.profilers.base import MODE_ALLOCATION, MODE_CPU, MODE_NONE, Job, ProfileOutput


class SimulatedProfiler:
    name = "simulated"
    supported_modes = frozenset({MODE_CPU, MODE_ALLOCATION, MODE_NONE})

    def __init__(self, time_scale: float = 1.0, write_files: bool = True) -> None:
        # time_scale < 1 shortens sessions (benchmarks); 1.0 honours the requested duration.
        self._time_scale = time_scale
        self._write_files = write_files

    def admission_error(self, job: Job) -> str | None:
        if job.mode not in self.supported_modes:
            return f"profiling mode {job.mode} not supported by the simulated profiler"
        return None

    async def run(self, job: Job, output: Path, stop: asyncio.Event) -> ProfileOutput:
        planned = job.duration_seconds * self._time_scale
        started = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), planned)
        # Samples a real profiler would have taken in the time it ran (all of them if not stopped).
        ran = min(1.0, (time.monotonic() - started) / planned) if planned else 1.0
        samples = round(job.duration_seconds * job.frequency_hz * ran)
        text = (
            "# simulated profile: no process was sampled (pulse-agent --profiler simulated)\n"
            f"simulated;command {job.command_id} {samples}\n"
        )
        if not self._write_files:
            return ProfileOutput(output, samples, len(text))
        await asyncio.to_thread(output.write_text, text)
        return ProfileOutput(output, samples, output.stat().st_size)
