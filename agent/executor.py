"""Runs accepted commands one at a time, never the same command id twice."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.profilers.base import Job, Profiler, ProfilerError
from agent.state import RunRecord
from server.logs import ids

log = logging.getLogger("pulse.agent")

SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"


@dataclass(frozen=True)
class Admission:
    accepted: bool
    reason: str = ""


@dataclass
class _Work:
    job: Job
    continuous: bool
    stop: asyncio.Event
    stop_reason: str = ""
    stop_outcome: str = CANCELLED


class Executor:
    def __init__(
        self,
        profiler: Profiler,
        state: RunRecord,
        output_dir: Path,
        report: Callable[[dict[str, Any]], None],
    ) -> None:
        self._profiler = profiler
        self._state = state
        self._output_dir = output_dir.resolve()
        self._report = report
        self._queue: asyncio.Queue[_Work] = asyncio.Queue()
        self._queued: dict[str, _Work] = {}
        self._current: _Work | None = None
        self.executions = 0
        output_dir.mkdir(parents=True, exist_ok=True)

    def running_ids(self) -> list[str]:
        ids = [self._current.job.command_id] if self._current else []
        return ids + list(self._queued)

    def admit(self, job: Job, continuous: bool) -> Admission:
        """Decide on a pushed command. One already started (or queued) is accepted again but
        not run again: the server re-sends when it never saw the ack."""
        command_id = job.command_id
        if command_id in self._queued or self._state.has_run(command_id):
            return Admission(True)
        reason = self._profiler.admission_error(job)
        if reason:
            return Admission(False, reason)
        work = _Work(job, continuous, asyncio.Event())
        self._queued[command_id] = work
        self._queue.put_nowait(work)
        return Admission(True)

    def stop(self, command_id: str, reason: str, outcome: str = CANCELLED) -> None:
        """Stop a running or queued command; it is reported with `outcome`."""
        work = self._queued.get(command_id)
        if self._current is not None and self._current.job.command_id == command_id:
            work = self._current
        if work is None or work.stop.is_set():
            return
        log.info("stopping command %s: %s", command_id, reason, extra=ids(command_id=command_id))
        work.stop_reason = reason
        work.stop_outcome = outcome
        work.stop.set()  # a queued one is dropped when dequeued

    def stop_all(self, reason: str) -> None:
        """Agent shutdown: what was accepted and not finished is reported failed."""
        for command_id in self.running_ids():
            self.stop(command_id, reason, FAILED)

    async def idle(self) -> None:
        """Wait until nothing is queued or running."""
        await self._queue.join()

    async def run(self) -> None:
        while True:
            work = await self._queue.get()
            self._queued.pop(work.job.command_id, None)
            self._current = work
            try:
                await self._execute(work)
            finally:
                self._current = None
                self._queue.task_done()

    async def _execute(self, work: _Work) -> None:
        job = work.job
        if not self._state.mark_started(job.command_id):
            return  # started before, by this agent or an earlier run of it
        started = time.time()
        completion: dict[str, Any] = {"command_id": job.command_id, "start_time": started}
        if work.stop.is_set():
            completion.update(outcome=work.stop_outcome, error_message=work.stop_reason)
        else:
            self.executions += 1
            log.info(
                "starting command %s",
                job.command_id,
                extra=ids(command_id=job.command_id),
            )
            completion.update(await self._profile(work))
        completion["finish_time"] = time.time()
        self._state.mark_finished(job.command_id, completion)
        log.info(
            "command %s finished: %s",
            job.command_id,
            completion["outcome"],
            extra=ids(command_id=job.command_id),
        )
        self._report(completion)

    async def _profile(self, work: _Work) -> dict[str, Any]:
        job = work.job
        samples = size = 0
        location = ""
        try:
            if not work.continuous:
                out = await self._profiler.run(
                    job, self._output_dir / f"{job.command_id}.collapsed", work.stop
                )
                samples, size, location = out.samples, out.size_bytes, str(out.path)
            else:
                session = 0
                while not work.stop.is_set():
                    path = self._output_dir / f"{job.command_id}.{session:05d}.collapsed"
                    out = await self._profiler.run(job, path, work.stop)
                    samples, size = samples + out.samples, size + out.size_bytes
                    session += 1
                location = str(self._output_dir / f"{job.command_id}.*.collapsed")
        except ProfilerError as exc:
            return {"outcome": FAILED, "error_message": str(exc), "location": location}
        except Exception as exc:
            log.exception("profiling command %s failed", job.command_id)
            return {"outcome": FAILED, "error_message": f"agent error: {exc!r}"}
        outcome = work.stop_outcome if work.stop.is_set() else SUCCEEDED
        return {
            "outcome": outcome,
            "error_message": work.stop_reason,
            "location": location,
            "samples": samples,
            "size_bytes": size,
        }


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
