"""`pulse-agent`: holds a heartbeat stream to a Pulse server and runs the profiles it is sent."""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from agent.client import AgentClient, AgentConfig
from agent.executor import Executor
from agent.profilers.base import Profiler
from agent.profilers.pyspy import PySpyProfiler
from agent.profilers.simulated import SimulatedProfiler
from agent.state import AgentState
from server import logs
from server.tls import ClientTls, certificate_agent_id

log = logging.getLogger("pulse.agent")


def _label(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {value!r}")
    return key, val


def _regex(value: str) -> re.Pattern[str]:
    try:
        return re.compile(value)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"bad regular expression: {exc}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pulse-agent", description="Pulse profiler agent")
    p.add_argument("--server", default="127.0.0.1:50051", help="host:port of a Pulse server")
    p.add_argument("--service", required=True, help="service this host belongs to")
    p.add_argument("--hostname", default=socket.gethostname(), help="default: this host's name")
    p.add_argument("--ip-address", default="", help="address to report (default: resolved)")
    p.add_argument("--label", action="append", type=_label, default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".pulse-agent"),
        help="where the agent id and the record of run commands live",
    )
    p.add_argument(
        "--output-dir",
        type=Path,
        default=Path("profiles"),
        help="where profiles are written, one file per command",
    )
    p.add_argument("--profiler", choices=["py-spy", "simulated"], default="py-spy")
    p.add_argument(
        "--target-pid",
        type=int,
        action="append",
        default=[],
        help="a process to profile when a request names no pids (repeatable)",
    )
    p.add_argument(
        "--target-cmdline",
        type=_regex,
        help="profile processes whose command line matches this regex",
    )
    p.add_argument(
        "--max-backoff",
        type=float,
        default=30.0,
        help="cap of the reconnect backoff in seconds (default 30)",
    )
    p.add_argument("--ca", type=Path, help="CA bundle of the server's certificate; enables TLS")
    p.add_argument("--cert", type=Path, help="agent certificate (PEM) for mTLS; names the agent")
    p.add_argument("--key", type=Path, help="agent private key (PEM)")
    p.add_argument(
        "--keepalive-time",
        type=float,
        default=20.0,
        help="seconds between keepalive pings on the channel (default 20; servers refuse pings "
        "more often than every 5 s)",
    )
    p.add_argument(
        "--keepalive-timeout",
        type=float,
        default=10.0,
        help="seconds without a ping answer before the connection is dropped (default 10)",
    )
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--log-format", choices=logs.FORMATS, default="text", help="default %(default)s")
    return p


def tls_settings(args: argparse.Namespace) -> tuple[ClientTls | None, str]:
    """TLS files (None: plaintext) and the agent id its certificate names ("")."""
    if args.ca is None and args.cert is None and args.key is None:
        return None, ""
    try:
        tls = ClientTls(args.ca, args.cert, args.key)
        tls.credentials()  # fail now on unreadable files
    except (OSError, ValueError) as exc:
        raise SystemExit(f"pulse-agent: {exc}") from None
    agent_id = ""
    if args.cert is not None:
        agent_id = certificate_agent_id(args.cert.read_bytes()) or ""
        if not agent_id:
            raise SystemExit(f"pulse-agent: {args.cert} names no agent (URI SAN or CN)")
    return tls, agent_id


def resolve_ip(hostname: str) -> str:
    try:
        return socket.gethostbyname(hostname)
    except OSError:
        return ""


def make_profiler(args: argparse.Namespace) -> Profiler:
    if args.profiler == "simulated":
        log.warning("simulated profiler: sessions only wait and write a placeholder file")
        return SimulatedProfiler()
    return PySpyProfiler(watch_pids=args.target_pid, watch_cmdline=args.target_cmdline)


async def run(args: argparse.Namespace) -> None:
    tls, agent_id = tls_settings(args)
    state = AgentState(args.state_dir)
    logs.stamp(agent_id=state.agent_id())  # every line of this agent carries its id
    profiler = make_profiler(args)
    config = AgentConfig(
        server=args.server,
        service_name=args.service,
        hostname=args.hostname,
        ip_address=args.ip_address or resolve_ip(args.hostname),
        labels=dict(args.label),
        max_backoff=args.max_backoff,
        tls=tls,
        agent_id=agent_id,
        keepalive_time_ms=int(args.keepalive_time * 1000),
        keepalive_timeout_ms=int(args.keepalive_timeout * 1000),
    )

    def executor(report: Any) -> Executor:
        return Executor(profiler, state, args.output_dir, report)

    client = AgentClient(config, executor, state, profiler.supported_modes)
    log.info("agent %s (%s, service %s) starting", client.agent_id, args.hostname, args.service)
    main = asyncio.create_task(client.run())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait([main, stopper], return_when=asyncio.FIRST_COMPLETED)
    if main.done():
        main.result()  # surfaces a crash
    log.info("agent shutting down")
    await client.shutdown()
    main.cancel()
    await asyncio.gather(main, return_exceptions=True)
    state.close()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
