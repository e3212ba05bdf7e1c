from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.executor import Admission, Executor, cancel_and_wait
from agent.profilers.base import Job, ProfileOutput, ProfilerError
from agent.state import AgentState


class FakeProfiler:
    name = "fake"
    supported_modes = frozenset({"cpu"})

    def __init__(self) -> None:
        self.session_seconds = 0.002  # how long one run lasts unless stopped
        self.block = False  # run until stopped
        self.error: Exception | None = None
        self.calls: list[str] = []
        self.outputs: list[Path] = []
        self.active = 0
        self.max_active = 0

    def admission_error(self, job: Job) -> str | None:
        if job.mode not in self.supported_modes:
            return f"mode {job.mode} is not supported"
        return None

    async def run(self, job: Job, output: Path, stop: asyncio.Event) -> ProfileOutput:
        self.calls.append(job.command_id)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.error is not None:
                raise self.error
            if self.block:
                await stop.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.session_seconds)
            output.write_text(f"main;work {job.command_id} 3\n")
            self.outputs.append(output)
            return ProfileOutput(output, 3, output.stat().st_size)
        finally:
            self.active -= 1


@dataclass
class Harness:
    executor: Executor
    profiler: FakeProfiler
    state: AgentState
    output_dir: Path
    tasks: list[asyncio.Task[None]]
    reports: list[dict[str, Any]] = field(default_factory=list)

    def start(self) -> None:
        self.tasks.append(asyncio.create_task(self.executor.run()))

    def by_id(self) -> dict[str, dict[str, Any]]:
        return {r["command_id"]: r for r in self.reports}


def job(command_id: str, mode: str = "cpu", duration: int = 1) -> Job:
    return Job(
        command_id=command_id, duration_seconds=duration, frequency_hz=11, mode=mode, pids=()
    )


async def until(condition: Callable[[], bool]) -> None:
    """Poll `condition` every millisecond for up to about two seconds."""
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition not met in time")


@pytest.fixture
async def make_harness(tmp_path: Path) -> AsyncIterator[Callable[..., Harness]]:
    tasks: list[asyncio.Task[None]] = []
    states: list[AgentState] = []

    def factory(start: bool = True, state: AgentState | None = None) -> Harness:
        profiler = FakeProfiler()
        if state is None:
            state = AgentState(tmp_path / "state")
        states.append(state)
        reports: list[dict[str, Any]] = []
        executor = Executor(profiler, state, tmp_path / "out", reports.append)
        harness = Harness(executor, profiler, state, tmp_path / "out", tasks, reports)
        if start:
            harness.start()
        return harness

    yield factory
    for task in tasks:
        await cancel_and_wait(task)
    for state in states:
        state.close()


async def test_runs_one_at_a_time_in_order(make_harness: Callable[..., Harness]) -> None:
    h = make_harness()
    for command_id in ("c1", "c2", "c3"):
        assert h.executor.admit(job(command_id), continuous=False) == Admission(True)
    await until(lambda: len(h.reports) == 3)
    assert h.profiler.calls == ["c1", "c2", "c3"]
    assert [r["command_id"] for r in h.reports] == ["c1", "c2", "c3"]
    assert h.profiler.max_active == 1
    assert h.executor.executions == 3
    for report in h.reports:
        assert report["outcome"] == "succeeded"
        assert report["samples"] == 3
        assert report["error_message"] == ""
        assert report["location"] == str(h.output_dir / f"{report['command_id']}.collapsed")
        assert report["size_bytes"] == Path(report["location"]).stat().st_size
        assert report["start_time"] <= report["finish_time"]
    assert h.state.unreported()[0].completion["outcome"] == "succeeded"
    assert h.state.interrupted() == []


async def test_same_command_twice_runs_once(make_harness: Callable[..., Harness]) -> None:
    h = make_harness()
    assert h.executor.admit(job("c1"), continuous=False).accepted
    assert h.executor.admit(job("c1"), continuous=False).accepted  # still queued
    await until(lambda: len(h.reports) == 1)
    assert h.executor.admit(job("c1"), continuous=False).accepted  # already run
    await h.executor.idle()
    await asyncio.sleep(0.005)
    assert h.profiler.calls == ["c1"]
    assert len(h.reports) == 1
    assert h.executor.executions == 1


async def test_command_started_before_a_restart_is_accepted_but_never_run(
    tmp_path: Path, make_harness: Callable[..., Harness]
) -> None:
    earlier = AgentState(tmp_path / "state")
    assert earlier.mark_started("c1")
    earlier.close()

    h = make_harness(state=AgentState(tmp_path / "state"))
    assert h.executor.admit(job("c1"), continuous=False) == Admission(True)
    assert h.executor.running_ids() == []
    h.executor.admit(job("c2"), continuous=False)
    await until(lambda: len(h.reports) == 1)
    await h.executor.idle()
    assert h.profiler.calls == ["c2"]
    assert [r["command_id"] for r in h.reports] == ["c2"]


async def test_queued_command_started_elsewhere_is_skipped(
    make_harness: Callable[..., Harness],
) -> None:
    h = make_harness(start=False)
    assert h.executor.admit(job("c1"), continuous=False).accepted
    assert h.state.mark_started("c1")  # e.g. another run of the agent got there first
    h.start()
    await asyncio.wait_for(h.executor.idle(), 1)
    assert h.profiler.calls == []
    assert h.reports == []
    assert h.executor.executions == 0


async def test_stop_running_command_is_cancelled(make_harness: Callable[..., Harness]) -> None:
    h = make_harness()
    h.profiler.block = True
    h.executor.admit(job("c1", duration=3600), continuous=False)
    await until(lambda: h.profiler.calls == ["c1"])
    assert h.executor.running_ids() == ["c1"]
    h.executor.stop("c1", "cancelled by operator")
    await until(lambda: len(h.reports) == 1)
    (report,) = h.reports
    assert report["outcome"] == "cancelled"
    assert report["error_message"] == "cancelled by operator"
    assert h.executor.running_ids() == []


async def test_stop_queued_command_is_reported_without_running(
    make_harness: Callable[..., Harness],
) -> None:
    h = make_harness()
    h.profiler.block = True
    h.executor.admit(job("c1"), continuous=False)
    h.executor.admit(job("c2"), continuous=False)
    await until(lambda: h.profiler.calls == ["c1"])
    assert h.executor.running_ids() == ["c1", "c2"]
    h.executor.stop("c2", "cancelled by operator")
    h.executor.stop("c1", "cancelled by operator")
    await until(lambda: len(h.reports) == 2)
    assert h.profiler.calls == ["c1"]
    assert h.by_id()["c2"]["outcome"] == "cancelled"
    assert h.by_id()["c2"]["error_message"] == "cancelled by operator"
    assert h.executor.executions == 1


async def test_stop_unknown_command_is_harmless(make_harness: Callable[..., Harness]) -> None:
    h = make_harness()
    h.executor.stop("nope", "whatever")
    h.executor.admit(job("c1"), continuous=False)
    await until(lambda: len(h.reports) == 1)
    assert h.reports[0]["outcome"] == "succeeded"


async def test_stop_all_reports_failed(make_harness: Callable[..., Harness]) -> None:
    h = make_harness()
    h.profiler.block = True
    h.executor.admit(job("c1"), continuous=False)
    h.executor.admit(job("c2"), continuous=False)
    await until(lambda: h.profiler.calls == ["c1"])
    h.executor.stop_all("agent shutting down")
    await until(lambda: len(h.reports) == 2)
    for command_id in ("c1", "c2"):
        assert h.by_id()[command_id]["outcome"] == "failed"
        assert h.by_id()[command_id]["error_message"] == "agent shutting down"
    assert h.profiler.calls == ["c1"]


async def test_stop_all_after_stop_keeps_cancelled(make_harness: Callable[..., Harness]) -> None:
    h = make_harness()
    h.profiler.block = True
    h.executor.admit(job("c1"), continuous=False)
    await until(lambda: h.profiler.calls == ["c1"])
    h.executor.stop("c1", "operator")
    h.executor.stop_all("shutdown")
    await until(lambda: len(h.reports) == 1)
    assert h.reports[0]["outcome"] == "cancelled"
    assert h.reports[0]["error_message"] == "operator"


async def test_profiler_error_fails_with_message(make_harness: Callable[..., Harness]) -> None:
    h = make_harness()
    h.profiler.error = ProfilerError("py-spy on pid 42 exited 1: Permission denied")
    h.executor.admit(job("c1"), continuous=False)
    await until(lambda: len(h.reports) == 1)
    (report,) = h.reports
    assert report["outcome"] == "failed"
    assert report["error_message"] == "py-spy on pid 42 exited 1: Permission denied"
    assert h.state.interrupted() == []
    assert h.state.unreported()[0].completion["outcome"] == "failed"


async def test_unexpected_error_fails_and_executor_goes_on(
    make_harness: Callable[..., Harness],
) -> None:
    h = make_harness()
    h.profiler.error = RuntimeError("boom")
    h.executor.admit(job("c1"), continuous=False)
    await until(lambda: len(h.reports) == 1)
    assert h.reports[0]["outcome"] == "failed"
    assert "boom" in h.reports[0]["error_message"]

    h.profiler.error = None
    h.executor.admit(job("c2"), continuous=False)
    await until(lambda: len(h.reports) == 2)
    assert h.reports[1]["outcome"] == "succeeded"


async def test_unsupported_mode_is_rejected(make_harness: Callable[..., Harness]) -> None:
    h = make_harness()
    admission = h.executor.admit(job("c1", mode="allocation"), continuous=False)
    assert admission.accepted is False
    assert "allocation" in admission.reason
    assert h.executor.running_ids() == []
    await asyncio.sleep(0.005)
    assert h.profiler.calls == []
    assert not h.state.has_run("c1")


async def test_continuous_runs_sessions_until_stopped(
    make_harness: Callable[..., Harness],
) -> None:
    h = make_harness()
    h.executor.admit(job("c1"), continuous=True)
    await until(lambda: len(h.profiler.calls) >= 3)
    h.executor.stop("c1", "cancelled by operator")
    await until(lambda: len(h.reports) == 1)
    (report,) = h.reports
    sessions = len(h.profiler.calls)
    assert sessions >= 3
    assert h.executor.executions == 1
    assert report["outcome"] == "cancelled"
    assert report["samples"] == 3 * sessions
    assert report["location"] == str(h.output_dir / "c1.*.collapsed")
    files = sorted(h.output_dir.glob("c1.*.collapsed"))
    assert len(files) == sessions
    assert files == sorted(set(h.profiler.outputs))
    assert files[0].name == "c1.00000.collapsed"
    assert report["size_bytes"] == sum(f.stat().st_size for f in files)
