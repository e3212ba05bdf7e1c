"""Pulse benchmark: a real pulse-server process, a fleet of emulated agents, five scenarios.

    python -m bench.run --agents 10000            (make bench)

Prints one table and one JSON line with every figure. The server runs in its own process, so its
RSS and CPU are its own; PostgreSQL (given with --database-url, or embedded) and the emulator
share the same machine, as they would in a small deployment.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import make_url

from bench.fleet import Fleet
from db.engine import libpq_url, start_embedded
from pulse.v1 import profiling_service_pb2 as ppb
from pulse.v1 import profiling_service_pb2_grpc as ppb_grpc
from server.gcstats import GcFreezer

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
TERMINAL = "('succeeded', 'failed', 'rejected', 'cancelled', 'expired', 'timed_out')"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class ServerProcess:
    pid: int
    proc: subprocess.Popen[bytes]
    stats_file: Path

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def stats(self) -> dict[str, float]:
        return dict(json.loads(self.stats_file.read_text()))


@dataclass
class Results:
    figures: dict[str, Any] = field(default_factory=dict)
    rows: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, scenario: str, name: str, value: Any, unit: str = "") -> None:
        self.figures[name] = value
        if isinstance(value, float):
            shown = f"{value:,.1f}" if abs(value) >= 1 or value == 0 else f"{value:.4f}"
        else:
            shown = f"{value:,}"
        self.rows.append((scenario, name, f"{shown} {unit}".strip()))

    def table(self) -> str:
        width = [max(len(r[i]) for r in self.rows) for i in range(3)]
        lines = [f"{'scenario':<{width[0]}}  {'figure':<{width[1]}}  value"]
        lines += [f"{a:<{width[0]}}  {b:<{width[1]}}  {c}" for a, b, c in self.rows]
        return "\n".join(lines)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.results = Results()
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.tmp = Path(tempfile.mkdtemp(prefix="pulse-bench-"))

    # --- setup ----------------------------------------------------------------------------------

    def database(self) -> str:
        base = self.args.database_url or start_embedded(Path(self.args.data_dir))
        name = f"pulse_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(libpq_url(base), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.db_name, self.db_base = name, base
        return make_url(base).set(database=name).render_as_string(hide_password=False)

    def drop_database(self) -> None:
        with psycopg.connect(libpq_url(self.db_base), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')

    def start_server(self, url: str) -> ServerProcess:
        stats = self.tmp / "stats.json"
        argv = [
            str(Path(sys.executable).parent / "pulse-server"),
            "--listen", self.address, "--database-url", url,
            "--heartbeat-interval", str(self.args.heartbeat_interval),
            "--stats-file", str(stats), "--log-level", "WARNING",
        ]  # fmt: skip
        log = (self.tmp / "server.log").open("w")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        return ServerProcess(proc.pid, proc, stats)

    async def wait_serving(self, server: ServerProcess) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for _ in range(600):
                if server.proc.poll() is not None:
                    raise SystemExit(f"pulse-server exited; see {self.tmp / 'server.log'}")
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.2)
        while not server.stats_file.exists():
            await asyncio.sleep(0.1)

    def sql(self, query: str, *params: Any) -> Any:
        with psycopg.connect(libpq_url(self.url)) as conn:
            return conn.execute(query, params).fetchone()

    async def poll(self, query: str, done: Any, timeout: float, *params: Any) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            row = await asyncio.to_thread(self.sql, query, *params)
            if done(row) or time.monotonic() > deadline:
                return row
            await asyncio.sleep(0.05)

    # --- scenarios ------------------------------------------------------------------------------

    async def connect(self, server: ServerProcess, fleet: Fleet) -> None:
        n = self.args.agents
        await asyncio.sleep(1)
        base_rss = server.rss_bytes()
        started = time.monotonic()
        await fleet.start()
        row = await self.poll(
            "SELECT count(*) FROM agents WHERE session_id IS NOT NULL",
            lambda r: r[0] >= n,
            self.args.connect_timeout,
        )
        elapsed = time.monotonic() - started
        fleet.settle_gc()
        await asyncio.sleep(3)
        per_agent = (server.rss_bytes() - base_rss) / max(row[0], 1)
        self.results.add("1 connect", "agents_online", int(row[0]))
        self.results.add("1 connect", "connect_all_s", elapsed, "s")
        self.results.add("1 connect", "server_rss_mb", server.rss_bytes() / 2**20, "MB")
        self.results.add("1 connect", "server_rss_per_agent_kb", per_agent / 1024, "KB")

    async def steady(self, server: ServerProcess) -> None:
        seconds = self.args.steady_seconds
        upd = "SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'agents'"
        before, cpu0, rows0 = server.stats(), server.cpu_seconds(), self.sql(upd)[0]
        await asyncio.sleep(seconds)
        after, cpu1, rows1 = server.stats(), server.cpu_seconds(), self.sql(upd)[0]
        span = after["time"] - before["time"]
        beats = after["heartbeats"] - before["heartbeats"]
        statements = after["statements"] - before["statements"]
        self.results.add("2 steady", "heartbeats_per_s", beats / span, "/s")
        self.results.add("2 steady", "server_cpu_pct", 100 * (cpu1 - cpu0) / seconds, "% of a core")
        self.results.add(
            "2 steady", "db_statements_per_heartbeat", round(statements / max(beats, 1), 4)
        )
        self.results.add(
            "2 steady", "db_rows_written_per_heartbeat", round((rows1 - rows0) / max(beats, 1), 3)
        )

    async def dispatch(self, stub: ppb_grpc.ProfilingServiceStub) -> None:
        count = self.args.dispatch_requests
        hosts = random.sample(range(self.args.agents), min(count, self.args.agents))
        returned: dict[str, float] = {}
        for index in hosts:
            reply = await stub.SubmitProfileRequest(
                ppb.SubmitProfileRequestRequest(
                    service_name="bench", hostnames=[Fleet.hostname(index)], duration_seconds=1
                )
            )
            returned[reply.request_id] = time.time()
            await asyncio.sleep(1 / self.args.dispatch_rate)
        ids = list(returned)
        await self.poll(
            "SELECT count(*) FROM commands WHERE request_id = ANY(%s::uuid[]) "
            "AND started_at IS NOT NULL",
            lambda r: r[0] >= len(ids),
            60,
            ids,
        )
        with psycopg.connect(libpq_url(self.url)) as conn:
            rows = conn.execute(
                "SELECT request_id::text, extract(epoch FROM started_at) FROM commands "
                "WHERE request_id = ANY(%s::uuid[]) AND started_at IS NOT NULL",
                (ids,),
            ).fetchall()
        latencies = [(float(started) - returned[rid]) * 1000 for rid, started in rows]
        self.results.add("3 dispatch", "dispatch_requests", len(latencies))
        self.results.add("3 dispatch", "dispatch_p50_ms", percentile(latencies, 50), "ms")
        self.results.add("3 dispatch", "dispatch_p99_ms", percentile(latencies, 99), "ms")
        self.results.add("3 dispatch", "dispatch_max_ms", max(latencies), "ms")
        await self.wait_idle()

    async def wait_idle(self) -> None:
        await self.poll(
            "SELECT count(*) FROM commands WHERE state IN ('pending', 'sent', 'running')",
            lambda r: r[0] == 0,
            300,
        )

    async def fanout(self, stub: ppb_grpc.ProfilingServiceStub) -> None:
        reply = await stub.SubmitProfileRequest(
            ppb.SubmitProfileRequestRequest(
                service_name="bench", duration_seconds=self.args.fanout_duration
            )
        )
        t0 = time.time()
        n = len(reply.targets)
        query = (
            f"SELECT count(*) FILTER (WHERE started_at IS NOT NULL), "
            f"count(*) FILTER (WHERE state IN {TERMINAL}), "
            f"extract(epoch FROM max(started_at)), extract(epoch FROM max(finished_at)), "
            f"count(*) FILTER (WHERE state = 'succeeded'), extract(epoch FROM max(sent_at)) "
            f"FROM commands WHERE request_id = %s"
        )
        row = await self.poll(query, lambda r: r[1] >= n, 300, reply.request_id)
        self.results.add("4 fan-out", "fanout_targets", n)
        self.results.add("4 fan-out", "fanout_all_sent_s", float(row[5]) - t0, "s")
        self.results.add("4 fan-out", "fanout_all_acked_s", float(row[2]) - t0, "s")
        self.results.add("4 fan-out", "fanout_all_succeeded_s", float(row[3]) - t0, "s")
        self.results.add("4 fan-out", "fanout_succeeded", int(row[4]))

    async def sustained(self, stub: ppb_grpc.ProfilingServiceStub) -> None:
        rounds = self.args.sustained_rounds
        ids = []
        for _ in range(rounds):
            reply = await stub.SubmitProfileRequest(
                ppb.SubmitProfileRequestRequest(service_name="bench", duration_seconds=1)
            )
            ids.append(reply.request_id)
        query = (
            f"SELECT count(*), count(*) FILTER (WHERE state IN {TERMINAL}), "
            f"extract(epoch FROM min(finished_at)), extract(epoch FROM max(finished_at)) "
            f"FROM commands WHERE request_id = ANY(%s::uuid[])"
        )
        row = await self.poll(query, lambda r: r[1] >= r[0], 600, ids)
        span = float(row[3]) - float(row[2])
        self.results.add("5 completions", "completions_recorded", int(row[1]))
        self.results.add("5 completions", "completions_per_s", row[1] / max(span, 1e-6), "/s")

    async def soak(self, server: ServerProcess, fleet: Fleet) -> None:
        minutes = self.args.soak_minutes
        samples = [server.rss_bytes()]
        for _ in range(minutes):
            chosen = random.sample(sorted(fleet.agents), max(1, fleet.size // 10))
            await fleet.restart(chosen)
            await asyncio.sleep(60)
            gc.collect()
            samples.append(server.rss_bytes())
        self.results.add("6 soak", "soak_minutes", minutes)
        self.results.add("6 soak", "soak_rss_start_mb", samples[0] / 2**20, "MB")
        self.results.add("6 soak", "soak_rss_end_mb", samples[-1] / 2**20, "MB")
        self.results.add("6 soak", "soak_rss_max_mb", max(samples) / 2**20, "MB")
        self.results.figures["soak_rss_per_minute_mb"] = [round(s / 2**20, 1) for s in samples]

    @contextlib.asynccontextmanager
    async def gc_during(self, scenario: str, server: ServerProcess) -> AsyncIterator[None]:
        """Full collections in the server while a scenario ran, and their total pause."""
        before = server.stats()
        yield
        await asyncio.sleep(1.1)  # the stats file is rewritten every second
        after = server.stats()
        key = scenario.split(" ", 1)[1].replace("-", "")
        self.results.add(
            scenario,
            f"{key}_server_gc_full",
            int(after["gc_full_collections"] - before["gc_full_collections"]),
        )
        self.results.add(
            scenario,
            f"{key}_server_gc_pause_ms",
            after["gc_total_pause_ms"] - before["gc_total_pause_ms"],
            "ms",
        )

    # --- run ------------------------------------------------------------------------------------

    async def run(self) -> Results:
        self.url = self.database()
        server = self.start_server(self.url)
        fleet = Fleet(self.address, self.args.agents, service="bench")
        # The emulator holds as many streams as the server: same collector policy.
        freezing = asyncio.create_task(GcFreezer(freeze_every=5.0, thaw_every=3600).run())
        try:
            await self.wait_serving(server)
            async with self.gc_during("1 connect", server):
                await self.connect(server, fleet)
            async with self.gc_during("2 steady", server):
                await self.steady(server)
            async with grpc.aio.insecure_channel(self.address) as channel:
                stub = ppb_grpc.ProfilingServiceStub(channel)
                async with self.gc_during("3 dispatch", server):
                    await self.dispatch(stub)
                async with self.gc_during("4 fan-out", server):
                    await self.fanout(stub)
                await self.wait_idle()
                async with self.gc_during("5 completions", server):
                    await self.sustained(stub)
            if self.args.soak_minutes:
                await self.soak(server, fleet)
            stats = server.stats()
            self.results.add("all", "server_gc_full_collections", int(stats["gc_full_collections"]))
            self.results.add(
                "all", "server_gc_max_full_pause_ms", stats["gc_max_full_pause_ms"], "ms"
            )
            self.results.figures["executions"] = fleet.executions()
        finally:
            freezing.cancel()
            await fleet.stop()
            server.proc.send_signal(signal.SIGTERM)
            try:
                server.proc.wait(30)
            except subprocess.TimeoutExpired:
                server.proc.kill()
            if self.args.keep_database:
                print(f"kept database {self.db_name}; server log in {self.tmp}", file=sys.stderr)
            else:
                self.drop_database()
        return self.results


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("--agents", type=int, default=10_000, help="emulated agents (default 10000)")
    p.add_argument("--heartbeat-interval", type=float, default=10.0)
    p.add_argument("--steady-seconds", type=float, default=30.0)
    p.add_argument("--dispatch-requests", type=int, default=200)
    p.add_argument("--dispatch-rate", type=float, default=20.0, help="single-target submits/s")
    p.add_argument("--fanout-duration", type=int, default=1, help="profile length in fan-out")
    p.add_argument(
        "--sustained-rounds",
        type=int,
        default=3,
        help="back-to-back fleet-wide requests for the completions/s figure",
    )
    p.add_argument(
        "--soak-minutes",
        type=int,
        default=0,
        help="also soak: 10%% of agents reconnect every minute (default: skip)",
    )
    p.add_argument("--connect-timeout", type=float, default=300.0)
    p.add_argument(
        "--database-url",
        default=os.environ.get("PULSE_DATABASE_URL"),
        help="PostgreSQL server to create a scratch database on (default: embedded)",
    )
    p.add_argument("--keep-database", action="store_true", help="keep the scratch database")
    p.add_argument("--data-dir", default=".pulse-bench", help="embedded PostgreSQL's directory")
    return p


def main() -> int:
    args = parser().parse_args()
    gc.freeze()
    results = asyncio.run(Bench(args).run())
    results.figures["machine"] = machine()
    results.figures["agents"] = args.agents
    print(f"Pulse benchmark: {args.agents} agents, heartbeat every {args.heartbeat_interval} s")
    print(f"machine: {results.figures['machine']}")
    print(results.table())
    print(json.dumps(results.figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
