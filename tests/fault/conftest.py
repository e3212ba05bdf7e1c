"""Fault injection with real processes: pulse-server and pulse-agent processes on a real
PostgreSQL, killed, restarted, drained, and cut off by a TCP proxy that can delay, blackhole or
reset traffic. Helpers shared with tests/e2e come from tests/e2e/conftest.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from pulse.v1 import common_pb2 as cpb
from pulse.v1 import profiling_service_pb2 as ppb
from pulse.v1 import profiling_service_pb2_grpc as ppb_grpc
from tests.e2e.conftest import Fleet, Process, free_port, wait_for

__all__ = [
    "TERMINAL",
    "Fleet",
    "Operator",
    "PrivatePostgres",
    "Process",
    "TcpProxy",
    "executions",
    "free_port",
    "wait_for",
]

pytestmark = pytest.mark.fault

TERMINAL = {
    cpb.COMMAND_STATE_SUCCEEDED,
    cpb.COMMAND_STATE_FAILED,
    cpb.COMMAND_STATE_REJECTED,
    cpb.COMMAND_STATE_CANCELLED,
    cpb.COMMAND_STATE_EXPIRED,
    cpb.COMMAND_STATE_TIMED_OUT,
}

# Server timings for fault tests: every threshold a few seconds, so that each scenario ends fast.
FAST_SERVER = (
    "--liveness-intervals", "3",
    "--ack-timeout", "3",
    "--completion-grace", "4",  # above the agents' --max-backoff (2 s): see README Guarantees
    "--shutdown-grace", "3",
)  # fmt: skip

_STARTING = re.compile(r"starting command ([0-9a-f-]{36})")


def executions(*processes: Process) -> Counter[str]:
    """How many times each command id was started, counted from the agents' own logs."""
    runs: Counter[str] = Counter()
    for process in processes:
        runs.update(_STARTING.findall(process.log()))
    return runs


def profile_files(directory: Path) -> Counter[str]:
    """Command ids with a profile file in an agent's --output-dir."""
    if not directory.exists():
        return Counter()
    return Counter(p.name.split(".")[0] for p in directory.iterdir())


class Operator:
    """A synchronous ProfilingService client for one server port."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = ppb_grpc.ProfilingServiceStub(self.channel)

    def submit(self, service: str, **fields: Any) -> ppb.SubmitProfileRequestResponse:
        fields.setdefault("duration_seconds", 1)
        return self.stub.SubmitProfileRequest(
            ppb.SubmitProfileRequestRequest(service_name=service, **fields), timeout=10
        )

    def get(self, request_id: str) -> ppb.ProfileRequest:
        return self.stub.GetProfileRequest(
            ppb.GetProfileRequestRequest(request_id=request_id), timeout=10
        ).request

    def try_get(self, request_id: str) -> ppb.ProfileRequest | None:
        """The request, or None while the server is unreachable."""
        try:
            return self.get(request_id)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return None
            raise

    def agents(self, service: str = "", online_only: bool = False) -> list[ppb.Agent]:
        return list(
            self.stub.ListAgents(
                ppb.ListAgentsRequest(service_name=service, online_only=online_only), timeout=10
            ).agents
        )

    def online(self, service: str = "") -> int:
        try:
            return len(self.agents(service, online_only=True))
        except grpc.RpcError:
            return 0

    def ready(self) -> bool:
        """The server answers (it has started)."""
        try:
            self.agents()
        except grpc.RpcError:
            return False
        return True

    def all_terminal(self, request_ids: list[str]) -> list[ppb.ProfileRequest] | None:
        """Every request, when every target of every one is terminal; else None."""
        views = []
        for request_id in request_ids:
            view = self.try_get(request_id)
            if view is None or any(t.command_state not in TERMINAL for t in view.targets):
                return None
            views.append(view)
        return views

    def close(self) -> None:
        self.channel.close()


FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[FAILED] = report.failed
    return report


@pytest.fixture
def fleet(tmp_path: Path, database_url: str, request: pytest.FixtureRequest) -> Iterator[Fleet]:
    f = Fleet(tmp_path, database_url)
    yield f
    f.stop_all()
    if os.environ.get("PULSE_E2E_SHOW_LOGS") or request.node.stash.get(FAILED, False):
        for process in f.processes:  # the logs of a failed test, for its report
            print(f"==== {process.log_path.name}\n{process.log()}")


def agent_args(i: int, service: str = "shop") -> list[str]:
    return ["--service", service, "--hostname", f"web-{i}", "--profiler", "simulated"]


def start_agents(fleet: Fleet, port: int, count: int, *extra: str) -> list[Process]:
    return [fleet.agent(port, f"agent-{i}", *agent_args(i), *extra) for i in range(count)]


def check_exactly_once(
    fleet: Fleet, ops: Operator, request_ids: list[str], agents: list[Process]
) -> list[cpb.CommandState.ValueType]:
    """Every target terminal, no command started twice on its agent, and every SUCCEEDED one
    started exactly once with its profile on disk. Returns the final states."""
    views = wait_for(lambda: ops.all_terminal(request_ids), "every target terminal", timeout=90)
    runs = executions(*agents)
    files = profile_files(fleet.tmp_path / "none")
    for agent in agents:
        files.update(profile_files(fleet.tmp_path / agent.log_path.stem / "profiles"))
    twice = {command: n for command, n in runs.items() if n > 1}
    assert not twice, f"commands started more than once: {twice}"
    states = []
    for view in views:
        for target in view.targets:
            states.append(target.command_state)
            if target.command_state == cpb.COMMAND_STATE_SUCCEEDED:
                assert runs[target.command_id] == 1, target
                assert files[target.command_id] == 1, target
            if target.command_state in (cpb.COMMAND_STATE_EXPIRED, cpb.COMMAND_STATE_REJECTED):
                assert runs[target.command_id] == 0, target
    return states


# --- a TCP proxy that misbehaves on demand ---------------------------------------------------


class TcpProxy:
    """A small asyncio TCP proxy in a thread, between agents and a server.

    Modes: `pass` (forward), `blackhole` (open connections silently drop everything in both
    directions, with no FIN or RST, and stay dead; new connections are forwarded), and
    `reset()` (abort every open connection with RST). `latency` delays every chunk.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.latency = 0.0
        self.connections = 0
        self._dead: set[int] = set()
        self._open: dict[int, tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = {}
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._accept, "127.0.0.1", self.port)
        )
        self._ready.set()
        self._loop.run_forever()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = self.connections
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        self._open[conn] = (writer, up_writer)
        await asyncio.gather(
            self._pipe(conn, reader, up_writer), self._pipe(conn, up_reader, writer)
        )
        self._open.pop(conn, None)

    async def _pipe(
        self, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while data := await reader.read(65536):
                if self.latency:
                    await asyncio.sleep(self.latency)
                if conn in self._dead:
                    continue  # swallowed: no data, no FIN, no RST
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        if conn not in self._dead:
            with contextlib.suppress(Exception):
                writer.close()

    def blackhole(self) -> int:
        """Silently drop all traffic on every open connection; returns how many."""
        open_now = set(self._open)
        self._dead |= open_now
        return len(open_now)

    def reset(self) -> None:
        """Abort every open connection (RST to both sides)."""

        def abort() -> None:
            for a, b in list(self._open.values()):
                for w in (a, b):
                    with contextlib.suppress(Exception):
                        w.transport.abort()

        self._loop.call_soon_threadsafe(abort)

    def close(self) -> None:
        def shutdown() -> None:
            self._server.close()
            for a, b in list(self._open.values()):
                for w in (a, b):
                    with contextlib.suppress(Exception):
                        w.transport.abort()
            self._loop.stop()

        self._loop.call_soon_threadsafe(shutdown)
        self._thread.join(10)


@pytest.fixture
def proxy_factory() -> Iterator[Any]:
    proxies: list[TcpProxy] = []

    def make(upstream_port: int) -> TcpProxy:
        proxy = TcpProxy(upstream_port)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()


# --- a private PostgreSQL that a test may crash ----------------------------------------------

PG_BIN = Path("/usr/lib/postgresql/15/bin")


class PrivatePostgres:
    """A throw-away PostgreSQL cluster in a temp dir on a free port, run as the `postgres` user
    when the tests run as root (PostgreSQL refuses to run as root)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="pulse-pg-"))
        self.data = self.dir / "data"
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run(PG_BIN / "initdb", "-D", self.data, "-U", "postgres", "-A", "trust", "-E", "UTF8")
        self.start()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: Any) -> None:
        cmd = [str(a) for a in argv]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._run(
            PG_BIN / "pg_ctl", "-D", self.data, "-l", self.dir / "pg.log", "-w", "-t", "60",
            "-o", f"-p {self.port} -h 127.0.0.1 -k {self.dir} -c fsync=off", "start",
        )  # fmt: skip

    def stop(self, mode: str = "immediate") -> None:
        self._run(PG_BIN / "pg_ctl", "-D", self.data, "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"no PostgreSQL binaries under {PG_BIN}")
    pg = PrivatePostgres()
    yield pg
    pg.destroy()


def wait_health(port: int, expected: int, timeout: float = 30.0) -> None:
    """Wait until grpc.health.v1 reports `expected` (a HealthCheckResponse status)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    def probe() -> bool:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                status = (
                    health_pb2_grpc.HealthStub(channel)
                    .Check(health_pb2.HealthCheckRequest(), timeout=3)
                    .status
                )
            except grpc.RpcError:
                return False
            return bool(status == expected)

    wait_for(probe, f"health status {expected} on port {port}", timeout=timeout)
