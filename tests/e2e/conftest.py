"""Real processes: pulse-server, pulse-agent, a profiled Python program, grpcurl and pulsectl."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Process:
    def __init__(self, argv: list[str], log: Path, **kwargs: Any) -> None:
        self.argv = argv
        self.log_path = log
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, **kwargs
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class Fleet:
    """Starts processes for one test and stops every one of them at the end."""

    def __init__(self, tmp_path: Path, database_url: str) -> None:
        self.tmp_path = tmp_path
        self.database_url = database_url
        self.processes: list[Process] = []

    def start(self, name: str, argv: list[str], **kwargs: Any) -> Process:
        process = Process(argv, self.tmp_path / f"{name}.log", **kwargs)
        self.processes.append(process)
        return process

    def server(self, port: int, *extra: str) -> Process:
        return self.start(
            f"server-{port}",
            [
                str(BIN / "pulse-server"),
                "--listen", f"127.0.0.1:{port}",
                "--database-url", self.database_url,
                "--heartbeat-interval", "1",
                "--sweep-interval", "1",
                *extra,
            ],
        )  # fmt: skip

    def agent(self, port: int, name: str, *extra: str) -> Process:
        return self.start(
            name,
            [
                str(BIN / "pulse-agent"),
                "--server", f"127.0.0.1:{port}",
                "--state-dir", str(self.tmp_path / name / "state"),
                "--output-dir", str(self.tmp_path / name / "profiles"),
                "--max-backoff", "2",
                *extra,
            ],
        )  # fmt: skip

    def grpcurl(self, port: int, method: str, body: dict[str, Any] | None = None) -> Any:
        argv = [str(BIN / "grpcurl"), "-plaintext", "-max-time", "10"]
        if body is not None:
            argv += ["-d", json.dumps(body)]
        result = subprocess.run(
            [*argv, f"127.0.0.1:{port}", method], capture_output=True, text=True, timeout=30
        )
        if result.returncode != 0:
            raise AssertionError(f"grpcurl {method} failed: {result.stderr}")
        return json.loads(result.stdout) if result.stdout.strip() else {}

    def pulsectl(self, port: int, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "pulsectl"), "--server", f"127.0.0.1:{port}", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            process.stop()


def wait_for(probe: Any, what: str, timeout: float = 30.0, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except AssertionError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last: {last}")


@pytest.fixture
def fleet(tmp_path: Path, database_url: str) -> Iterator[Fleet]:
    f = Fleet(tmp_path, database_url)
    yield f
    f.stop_all()
    if os.environ.get("PULSE_E2E_SHOW_LOGS"):
        for process in f.processes:
            print(f"==== {process.log_path.name}\n{process.log()}")
