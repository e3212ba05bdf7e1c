"""`pulse-server`: run the server, or `pulse-server db upgrade` to apply migrations."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import signal
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from db import migrate
from db.engine import DATABASE_URL_ENV, create_engine
from server import logs
from server.app import PulseServer, ServerConfig, resolve_database_url
from server.auth import Role, TokenFile, TokenFileError, new_token, token_entry_toml
from server.gcstats import GcFreezer
from server.metrics import parse_listen
from server.tls import RotatingCertificates, ServerTls

TOKENS_FILE_ENV = "PULSE_TOKENS_FILE"

log = logging.getLogger("pulse.server")


def _seconds(value: str) -> timedelta:
    seconds = float(value)
    if seconds <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return timedelta(seconds=seconds)


def _metrics_listen(value: str) -> str:
    try:
        parse_listen(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pulse-server", description="Pulse control-plane server")
    p.add_argument("--listen", default="127.0.0.1:50051", help="host:port (default %(default)s)")
    p.add_argument(
        "--database-url",
        default=os.environ.get(DATABASE_URL_ENV),
        help=f"PostgreSQL URL (env {DATABASE_URL_ENV}); without it an embedded PostgreSQL runs",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".pulse"),
        help="embedded PostgreSQL's directory (default %(default)s)",
    )
    p.add_argument("--server-id", help="name of this process in agent records (default: host-pid)")
    p.add_argument(
        "--heartbeat-interval",
        type=_seconds,
        default=timedelta(seconds=10),
        help="seconds between agent heartbeats (default 10)",
    )
    p.add_argument(
        "--liveness-intervals",
        type=int,
        default=3,
        help="missed heartbeat intervals before an agent is offline (default 3)",
    )
    p.add_argument(
        "--ack-timeout",
        type=_seconds,
        default=timedelta(seconds=30),
        help="seconds before an unacknowledged command is re-queued (default 30)",
    )
    p.add_argument(
        "--completion-grace",
        type=_seconds,
        default=timedelta(seconds=30),
        help="seconds past start + duration before a command times out (default 30)",
    )
    p.add_argument(
        "--sweep-interval",
        type=_seconds,
        default=timedelta(seconds=5),
        help="seconds between fallback sweeps (default 5)",
    )
    p.add_argument(
        "--shutdown-grace",
        type=_seconds,
        default=timedelta(seconds=10),
        help="seconds in-flight RPCs get on shutdown (default 10)",
    )
    p.add_argument(
        "--max-connection-age",
        type=_seconds,
        default=None,
        help="rotate client connections after this many seconds (default: never)",
    )
    p.add_argument(
        "--max-heartbeat-rate",
        type=float,
        default=1000.0,
        help="heartbeats/s this server accepts; with more agents than rate x interval, "
        "new sessions get a longer interval (default 1000)",
    )
    p.add_argument(
        "--gc-freeze-interval",
        type=_seconds,
        default=timedelta(seconds=10),
        help="seconds between gc.freeze() calls (default 10)",
    )
    p.add_argument(
        "--gc-thaw-interval",
        type=_seconds,
        default=timedelta(seconds=600),
        help="seconds between full collections of frozen objects (default 600)",
    )
    p.add_argument("--max-message-bytes", type=int, default=4 * 1024 * 1024)
    p.add_argument("--db-pool-size", type=int, default=10)
    p.add_argument(
        "--stats-file",
        type=Path,
        help="write a JSON snapshot of the server's counters here every second",
    )
    p.add_argument(
        "--metrics-listen",
        type=_metrics_listen,
        default=None,
        metavar="HOST:PORT",
        help="serve Prometheus metrics over HTTP here, e.g. 127.0.0.1:9464 (default: off)",
    )
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--log-format", choices=logs.FORMATS, default="text", help="default %(default)s")
    _add_security_flags(p)
    sub = p.add_subparsers(dest="command")
    db = sub.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    db_sub.add_parser("upgrade", help="apply pending migrations and exit")
    token = sub.add_parser("token", help="operator tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    create = token_sub.add_parser(
        "create", help="print a new token (stderr) and its tokens-file entry (stdout)"
    )
    create.add_argument("--name", required=True, help="principal name (shown in the audit trail)")
    create.add_argument("--role", choices=[r.value for r in Role], default=Role.VIEWER.value)
    create.add_argument("--services", default="", help="comma-separated; default: every service")
    create.add_argument("--expires-in-days", type=float, default=None, help="default: never")
    return p


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return number


def _add_security_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("security (see README, Security)")
    g.add_argument("--tls-cert", type=Path, help="server certificate chain (PEM); enables TLS")
    g.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    g.add_argument(
        "--client-ca",
        type=Path,
        help="CA bundle for client certificates; enables mTLS (agents identified by certificate)",
    )
    g.add_argument(
        "--tokens-file",
        type=Path,
        default=os.environ.get(TOKENS_FILE_ENV) or None,
        help=f"operator tokens (TOML of sha256 hashes; env {TOKENS_FILE_ENV}); without it "
        "operator RPCs are open",
    )
    g.add_argument(
        "--submit-rate",
        type=float,
        default=0.0,
        help="submits per second per principal, 0 = unlimited (default %(default)s)",
    )
    g.add_argument(
        "--submit-burst", type=int, default=20, help="submit burst size (default %(default)s)"
    )
    g.add_argument(
        "--max-targets-per-request",
        type=_non_negative_int,
        default=0,
        help="refuse requests resolving to more targets, 0 = unlimited (default %(default)s)",
    )
    g.add_argument(
        "--max-concurrent-per-service",
        type=_non_negative_int,
        default=0,
        help="at most this many hosts of one service profiled at once; the rest wait "
        "(0 = unlimited, default %(default)s)",
    )


def tls_from(args: argparse.Namespace) -> ServerTls | None:
    if args.tls_cert is None and args.tls_key is None:
        if args.client_ca is not None:
            raise SystemExit("pulse-server: --client-ca needs --tls-cert and --tls-key")
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise SystemExit("pulse-server: --tls-cert and --tls-key go together")
    return ServerTls(cert=args.tls_cert, key=args.tls_key, client_ca=args.client_ca)


def config_from(args: argparse.Namespace) -> ServerConfig:
    config = ServerConfig(
        listen=args.listen,
        database_url=args.database_url,
        data_dir=args.data_dir,
        heartbeat_interval=args.heartbeat_interval,
        liveness_intervals=args.liveness_intervals,
        ack_timeout=args.ack_timeout,
        completion_grace=args.completion_grace,
        sweep_interval=args.sweep_interval,
        shutdown_grace=args.shutdown_grace,
        max_connection_age=args.max_connection_age,
        max_message_bytes=args.max_message_bytes,
        max_heartbeat_rate=args.max_heartbeat_rate,
        stats_file=args.stats_file,
        gc_freeze_interval=args.gc_freeze_interval,
        gc_thaw_interval=args.gc_thaw_interval,
        db_pool_size=args.db_pool_size,
        metrics_listen=args.metrics_listen,
        tls=tls_from(args),
        tokens_file=args.tokens_file,
        submit_rate=args.submit_rate,
        submit_burst=args.submit_burst,
        max_targets_per_request=args.max_targets_per_request,
        max_concurrent_per_service=args.max_concurrent_per_service,
    )
    if args.server_id:
        config.server_id = args.server_id
    return config


def check_security_files(config: ServerConfig) -> None:
    """Refuse to start, with one line, on an unreadable or malformed tokens file or TLS files."""
    try:
        if config.tokens_file is not None:
            TokenFile(config.tokens_file)
    except (OSError, TokenFileError) as exc:
        raise SystemExit(f"pulse-server: --tokens-file: {exc}") from None
    try:
        if config.tls is not None:
            RotatingCertificates(config.tls)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"pulse-server: TLS files: {exc}") from None


def create_token(args: argparse.Namespace) -> None:
    token = new_token()
    services = [s.strip() for s in args.services.split(",") if s.strip()]
    expires = None
    if args.expires_in_days is not None:
        expires = datetime.now(UTC) + timedelta(days=args.expires_in_days)
    print(f"token (give it to {args.name}; it is not stored anywhere): {token}", file=sys.stderr)
    print(token_entry_toml(args.name, token, Role(args.role), services, expires))


async def upgrade(config: ServerConfig) -> None:
    url = await asyncio.to_thread(resolve_database_url, config)
    engine = create_engine(url, pool_size=1)
    try:
        applied = await migrate.upgrade(engine)
        print(f"applied migrations: {applied}" if applied else "database is up to date")
    finally:
        await engine.dispose()


def raise_file_limit() -> int:
    """Each agent stream holds a socket: allow as many as the hard limit permits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def serve(config: ServerConfig) -> None:
    log.info("open file limit: %d", raise_file_limit())
    server = PulseServer(config)
    await server.start()
    freezer = GcFreezer(
        config.gc_freeze_interval.total_seconds(), config.gc_thaw_interval.total_seconds()
    )
    freezing = asyncio.create_task(freezer.run(), name="gc-freeze")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"pulse-server listening on {config.listen}", flush=True)
    await stop.wait()
    log.info("shutting down")
    freezing.cancel()
    await server.stop()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    if args.command == "token":
        create_token(args)
        return 0
    config = config_from(args)
    if args.command == "db":
        asyncio.run(upgrade(config))
        return 0
    check_security_files(config)
    asyncio.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
