from __future__ import annotations

import asyncio
import os
import re
import stat
from pathlib import Path

import pytest

from agent.profilers import pyspy
from agent.profilers.base import Job, ProfilerError
from agent.profilers.pyspy import PySpyProfiler, count_samples, matching_pids


def job(
    mode: str = "cpu",
    pids: tuple[int, ...] = (),
    args: dict[str, str] | None = None,
    duration: int = 5,
) -> Job:
    return Job(
        command_id="c1",
        duration_seconds=duration,
        frequency_hz=99,
        mode=mode,
        pids=pids,
        additional_args=args or {},
    )


def profiler(
    watch_pids: tuple[int, ...] = (),
    existing: frozenset[int] = frozenset({10, 20}),
    watch_cmdline: re.Pattern[str] | None = None,
) -> PySpyProfiler:
    return PySpyProfiler(
        watch_pids=watch_pids,
        watch_cmdline=watch_cmdline,
        executable="/bin/true",
        pid_exists=lambda pid: pid in existing,
    )


# --- count_samples -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 0),
        ("main;work 12\n", 12),
        ("main;work 12\nmain;idle 3\n", 15),
        ("a frame with spaces;leaf 7\r\nother 1", 8),
        ("main;work\n\nmain;idle x\n", 0),
        ("main;work -4\nmain;idle 2", 2),
    ],
)
def test_count_samples(text: str, expected: int) -> None:
    assert count_samples(text) == expected


# --- matching_pids -------------------------------------------------------------------------------


def fake_proc(root: Path, entries: dict[str, bytes | None]) -> Path:
    """A /proc-like tree: name -> cmdline bytes (None: a process directory without cmdline)."""
    root.mkdir()
    for name, cmdline in entries.items():
        directory = root / name
        directory.mkdir()
        if cmdline is not None:
            (directory / "cmdline").write_bytes(cmdline)
    return root


def test_matching_pids(tmp_path: Path) -> None:
    proc = fake_proc(
        tmp_path / "proc",
        {
            "100": b"python\0-m\0myapp.server\0",
            "20": b"/usr/bin/python3\0/srv/myapp/run.py\0",
            "1000": b"gunicorn myapp:app\0",
            "200": b"/usr/bin/bash\0",
            "300": b"",  # kernel thread
            "400": None,  # vanished / unreadable
            "self": b"python\0myapp\0",
            str(os.getpid()): b"python\0myapp\0",  # this agent
        },
    )
    (proc / "uptime").write_text("1 1\n")  # a plain file
    assert matching_pids(re.compile("myapp"), proc) == [20, 100, 1000]
    assert matching_pids(re.compile(r"bash$"), proc) == []  # the joined cmdline ends in a space
    assert matching_pids(re.compile(r"bin/bash"), proc) == [200]
    assert matching_pids(re.compile("nothing-matches"), proc) == []


def test_matching_pids_joins_arguments_with_spaces(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path / "proc", {"7": b"python\0-m\0app\0"})
    assert matching_pids(re.compile(r"python -m app"), proc) == [7]


# --- admission -----------------------------------------------------------------------------------


def test_good_job_is_accepted() -> None:
    assert profiler().admission_error(job(pids=(10, 20), args={"native": "true"})) is None


def test_allocation_mode_refused() -> None:
    reason = profiler().admission_error(job(mode="allocation", pids=(10,)))
    assert reason is not None
    assert "allocation" in reason


def test_no_pids_and_nothing_watched_refused() -> None:
    reason = profiler().admission_error(job())
    assert reason is not None
    assert "no pids" in reason


def test_watched_pids_used_when_job_has_none() -> None:
    p = profiler(watch_pids=(10,))
    assert p.target_pids(job()) == [10]
    assert p.target_pids(job(pids=(20,))) == [20]
    assert p.admission_error(job()) is None


def test_watched_cmdline_adds_matching_pids(monkeypatch: pytest.MonkeyPatch) -> None:
    pattern = re.compile("myapp")
    seen: list[re.Pattern[str]] = []

    def fake_matching(p: re.Pattern[str], proc: Path = Path("/proc")) -> list[int]:
        seen.append(p)
        return [10, 20]

    monkeypatch.setattr(pyspy, "matching_pids", fake_matching)
    p = profiler(watch_pids=(20,), watch_cmdline=pattern)
    assert p.target_pids(job()) == [20, 10]
    assert seen == [pattern]
    assert p.admission_error(job()) is None


def test_missing_pid_refused() -> None:
    reason = profiler().admission_error(job(pids=(10, 42, 43)))
    assert reason is not None
    assert reason.endswith(": 42, 43")  # only the missing ones are listed


def test_missing_watched_pid_refused() -> None:
    reason = profiler(watch_pids=(99,)).admission_error(job())
    assert reason is not None
    assert "99" in reason


def test_unknown_additional_args_refused() -> None:
    reason = profiler().admission_error(job(pids=(10,), args={"native": "1", "rm-rf": "1"}))
    assert reason is not None
    assert "rm-rf" in reason
    assert "native" not in reason


def test_missing_executable_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pyspy, "find_py_spy", lambda: None)
    p = PySpyProfiler(pid_exists=lambda pid: True)
    reason = p.admission_error(job(pids=(10,)))
    assert reason is not None
    assert "not installed" in reason


def test_default_pid_exists_uses_proc() -> None:
    p = PySpyProfiler(executable="/bin/true")
    assert p.admission_error(job(pids=(os.getpid(),))) is None
    assert p.admission_error(job(pids=(2**22 + 12345,))) is not None


# --- run, against a fake py-spy ------------------------------------------------------------------

FAKE_PY_SPY = """#!/bin/sh
echo "$*" >> "$FAKE_PY_SPY_LOG"
out=""
pid=""
while [ $# -gt 0 ]; do
  case "$1" in
    --output) out="$2"; shift ;;
    --pid) pid="$2"; shift ;;
  esac
  shift
done
case "$FAKE_PY_SPY_MODE" in
  ok)
    printf 'main;work %s\\nmain;idle 2\\n' "$pid" > "$out"
    ;;
  fail)
    echo "Error: failed to open process $pid" >&2
    exit 3
    ;;
  wait)
    trap 'printf "main;stopped 4\\n" > "$out"; kill $child 2>/dev/null; exit 0' INT
    sleep 5 &
    child=$!
    touch "$out.ready"
    wait $child
    ;;
esac
"""


@pytest.fixture
def fake_py_spy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    script = tmp_path / "py-spy"
    script.write_text(FAKE_PY_SPY)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "calls.log"
    monkeypatch.setenv("FAKE_PY_SPY_LOG", str(log))
    return str(script), log


async def test_run_merges_outputs_of_every_pid(
    tmp_path: Path, fake_py_spy: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    executable, log = fake_py_spy
    monkeypatch.setenv("FAKE_PY_SPY_MODE", "ok")
    p = PySpyProfiler(executable=executable, pid_exists=lambda pid: True)
    output = tmp_path / "c1.collapsed"
    result = await p.run(
        job(pids=(10, 20), args={"native": "yes", "idle": "no"}), output, asyncio.Event()
    )
    assert result.path == output
    assert result.samples == 10 + 2 + 20 + 2
    assert result.size_bytes == output.stat().st_size
    assert "main;work 10" in output.read_text()
    assert list(tmp_path.glob("*.part")) == []  # partial files are removed
    calls = log.read_text().splitlines()
    assert len(calls) == 2
    for call in calls:
        assert "record" in call
        assert "--rate 99" in call
        assert "--duration 5" in call
        assert "--format raw" in call
        assert "--native" in call
        assert "--idle" not in call


async def test_run_failure_raises_profiler_error(
    tmp_path: Path, fake_py_spy: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    executable, _ = fake_py_spy
    monkeypatch.setenv("FAKE_PY_SPY_MODE", "fail")
    p = PySpyProfiler(executable=executable, pid_exists=lambda pid: True)
    output = tmp_path / "c1.collapsed"
    with pytest.raises(ProfilerError) as info:
        await p.run(job(pids=(42,)), output, asyncio.Event())
    assert "pid 42 exited 3" in str(info.value)
    assert "failed to open process 42" in str(info.value)
    assert not output.exists()


async def test_run_stop_interrupts_and_keeps_samples(
    tmp_path: Path, fake_py_spy: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    executable, _ = fake_py_spy
    monkeypatch.setenv("FAKE_PY_SPY_MODE", "wait")
    p = PySpyProfiler(executable=executable, pid_exists=lambda pid: True)
    output = tmp_path / "c1.collapsed"
    stop = asyncio.Event()
    running = asyncio.create_task(p.run(job(pids=(42,), duration=3600), output, stop))
    for _ in range(1000):
        if list(tmp_path.glob("*.ready")):
            break
        await asyncio.sleep(0.002)
    stop.set()
    result = await asyncio.wait_for(running, 2)
    assert result.samples == 4
    assert output.read_text() == "main;stopped 4\n"
