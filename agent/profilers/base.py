"""The small interface every profiler implements."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

MODE_CPU = "cpu"
MODE_ALLOCATION = "allocation"
MODE_NONE = "none"


class ProfilerError(Exception):
    """Profiling failed; the message goes into the command's completion."""


@dataclass(frozen=True)
class Job:
    """One profiling session, as the agent's profilers see it."""

    command_id: str
    duration_seconds: int
    frequency_hz: int
    mode: str
    pids: tuple[int, ...]
    additional_args: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ProfileOutput:
    path: Path
    samples: int
    size_bytes: int


class Profiler(Protocol):
    name: str
    supported_modes: frozenset[str]

    def admission_error(self, job: Job) -> str | None:
        """Why this job cannot run here (the command is then rejected), or None."""
        ...

    async def run(self, job: Job, output: Path, stop: asyncio.Event) -> ProfileOutput:
        """Profile for the job's duration (or until `stop` is set) and write `output`."""
        ...
