"""py-spy: samples Python processes and writes collapsed stacks ("frame;frame;frame count")."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from agent.profilers.base import MODE_CPU, Job, ProfileOutput, ProfilerError

# Request `additional_args` keys that map to py-spy flags; anything else is refused.
FLAGS = {
    "idle": "--idle",
    "native": "--native",
    "gil": "--gil",
    "subprocesses": "--subprocesses",
    "threads": "--threads",
    "nonblocking": "--nonblocking",
}
_TRUE = {"1", "true", "yes", "on"}


def find_py_spy() -> str | None:
    """py-spy from PATH, or installed beside this Python (the project depends on it)."""
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


def matching_pids(pattern: re.Pattern[str], proc: Path = Path("/proc")) -> list[int]:
    """Pids whose command line matches `pattern` (this agent excluded)."""
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmdline and pattern.search(cmdline):
            found.append(int(entry.name))
    return sorted(found)


def count_samples(collapsed: str) -> int:
    total = 0
    for line in collapsed.splitlines():
        _, _, count = line.rpartition(" ")
        if count.isdigit():
            total += int(count)
    return total


class PySpyProfiler:
    name = "py-spy"
    supported_modes = frozenset({MODE_CPU})

    def __init__(
        self,
        watch_pids: Sequence[int] = (),
        watch_cmdline: re.Pattern[str] | None = None,
        executable: str | None = None,
        pid_exists: Callable[[int], bool] | None = None,
    ) -> None:
        self._watch_pids = tuple(watch_pids)
        self._watch_cmdline = watch_cmdline
        self._executable = executable or find_py_spy()
        self._pid_exists = pid_exists or (lambda pid: Path(f"/proc/{pid}").exists())

    def target_pids(self, job: Job) -> list[int]:
        if job.pids:
            return list(job.pids)
        pids = list(self._watch_pids)
        if self._watch_cmdline is not None:
            pids += [p for p in matching_pids(self._watch_cmdline) if p not in pids]
        return pids

    def admission_error(self, job: Job) -> str | None:
        if job.mode not in self.supported_modes:
            return f"profiling mode {job.mode} not supported by py-spy (it supports: cpu)"
        if self._executable is None:
            return "py-spy is not installed on this host"
        unknown = sorted(set(job.additional_args) - set(FLAGS))
        if unknown:
            return f"unsupported additional_args for py-spy: {', '.join(unknown)}"
        pids = self.target_pids(job)
        if not pids:
            return (
                "no pids in the request and this agent watches no process "
                "(start it with --target-pid or --target-cmdline)"
            )
        missing = [pid for pid in pids if not self._pid_exists(pid)]
        if missing:
            return f"no such process on this host: {', '.join(map(str, missing))}"
        return None

    async def run(self, job: Job, output: Path, stop: asyncio.Event) -> ProfileOutput:
        assert self._executable is not None
        extra = [flag for key, flag in FLAGS.items() if job.additional_args.get(key, "") in _TRUE]
        parts = []
        procs: list[tuple[int, asyncio.subprocess.Process]] = []
        for pid in self.target_pids(job):
            part = output.with_name(f"{output.name}.{pid}.part")
            parts.append(part)
            argv = [
                self._executable, "record", "--pid", str(pid), "--rate", str(job.frequency_hz),
                "--duration", str(job.duration_seconds), "--format", "raw",
                "--output", str(part), "--nonblocking", *extra,
            ]  # fmt: skip
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
            )
            procs.append((pid, proc))
        try:
            errors = await self._wait_all(procs, stop)
            stacks = "".join(p.read_text() for p in parts if p.exists())
        finally:
            for part in parts:
                part.unlink(missing_ok=True)
        samples = count_samples(stacks)
        if errors and not samples:
            raise ProfilerError("; ".join(errors))
        output.write_text(stacks)
        return ProfileOutput(output, samples, output.stat().st_size)

    @staticmethod
    async def _wait_all(
        procs: list[tuple[int, asyncio.subprocess.Process]], stop: asyncio.Event
    ) -> list[str]:
        """Wait for every py-spy; on `stop`, interrupt them (py-spy saves its samples on SIGINT)."""
        waits = [asyncio.ensure_future(proc.communicate()) for _, proc in procs]
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([*waits, stopper], return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                for _, proc in procs:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGINT)
            results = await asyncio.gather(*waits)
        finally:
            stopper.cancel()
        errors = []
        for (pid, proc), (_, stderr) in zip(procs, results, strict=True):
            if proc.returncode not in (0, -signal.SIGINT):
                tail = stderr.decode(errors="replace").strip().splitlines()[-3:]
                errors.append(f"py-spy on pid {pid} exited {proc.returncode}: {' '.join(tail)}")
        return errors
