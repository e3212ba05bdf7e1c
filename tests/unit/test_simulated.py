from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from agent.profilers.base import Job
from agent.profilers.simulated import SimulatedProfiler


def job(duration: int, mode: str = "cpu") -> Job:
    return Job(command_id="c1", duration_seconds=duration, frequency_hz=10, mode=mode, pids=())


async def test_writes_a_file_that_says_it_is_simulated(tmp_path: Path) -> None:
    profiler = SimulatedProfiler(time_scale=0.001)
    output = tmp_path / "c1.collapsed"
    result = await profiler.run(job(2), output, asyncio.Event())
    text = output.read_text()
    assert text.startswith("# simulated profile")
    assert "no process was sampled" in text
    assert "simulated;command c1 20" in text
    assert result.path == output
    assert result.samples == 20
    assert result.size_bytes == output.stat().st_size == len(text.encode())


async def test_stops_early_when_stop_is_set(tmp_path: Path) -> None:
    profiler = SimulatedProfiler()  # honours the full hour unless stopped
    output = tmp_path / "c1.collapsed"
    stop = asyncio.Event()
    started = time.monotonic()
    running = asyncio.create_task(profiler.run(job(3600), output, stop))
    await asyncio.sleep(0.005)
    assert not running.done()
    stop.set()
    result = await asyncio.wait_for(running, 1)
    assert time.monotonic() - started < 1
    assert output.exists()
    assert "simulated" in output.read_text()
    assert result.path == output
    assert result.samples < 3600 * job(3600).frequency_hz // 100  # only what it ran for


async def test_returns_at_once_when_already_stopped(tmp_path: Path) -> None:
    stop = asyncio.Event()
    stop.set()
    result = await asyncio.wait_for(
        SimulatedProfiler().run(job(3600), tmp_path / "c1.collapsed", stop), 1
    )
    assert result.path.exists()


async def test_without_files(tmp_path: Path) -> None:
    profiler = SimulatedProfiler(time_scale=0.001, write_files=False)
    output = tmp_path / "c1.collapsed"
    result = await profiler.run(job(1), output, asyncio.Event())
    assert not output.exists()
    assert result.samples == 10
    assert result.size_bytes > 0


@pytest.mark.parametrize("mode", ["cpu", "allocation", "none"])
def test_supports_every_mode(mode: str) -> None:
    assert SimulatedProfiler().admission_error(job(1, mode)) is None


def test_refuses_unknown_mode() -> None:
    reason = SimulatedProfiler().admission_error(job(1, "wallclock"))
    assert reason is not None
    assert "wallclock" in reason
