"""`pulsectl`: the operator CLI of Pulse (submit, follow and cancel profiling requests)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import grpc

from ctl import commands
from pulse.v1 import profiling_service_pb2_grpc as ppb_grpc

SERVER_ENV = "PULSE_SERVER"
TOKEN_ENV = "PULSE_TOKEN"
DEFAULT_SERVER = "127.0.0.1:50051"
EXIT_RPC_ERROR = 2

EXIT_CODES = """\
exit status:
  0  success
  1  submit --wait: the request finished in a state other than SUCCEEDED
  2  bad usage, or the server returned an error
"""

SUBMIT_EPILOG = """\
With --wait, progress goes to stderr (a bar redrawn in place on a terminal,
otherwise one line per change); stdout gets the request id and its targets,
then the final request with failed and timed-out targets listed first
(-o json: only the final GetProfileRequest response).

With --dry-run nothing is created: stdout shows which agents the request
resolves to and which of them would reject it.

exit status with --wait: 0 only if the request ends SUCCEEDED; 1 if it ends
PARTIALLY_SUCCEEDED, FAILED or CANCELLED; 2 on an RPC error.
"""

WATCH_EPILOG = """\
Progress goes to stderr; stdout gets the final request with its targets
(failed and timed-out first; -o json: the final GetProfileRequest response).

exit status: 0 only if the request ends SUCCEEDED; 1 if it ends
PARTIALLY_SUCCEEDED, FAILED or CANCELLED; 2 on an RPC error.
"""


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {value}")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, not {value}")
    return number


def _key_value(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, not {value!r}")
    return key, val


def _add_output_option(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "-o",
        "--output",
        choices=("table", "json"),
        default=default,
        help="output format (default: table)",
    )


def _subparser(
    subs: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    handler: commands.Command,
    help_text: str,
    epilog: str | None = None,
) -> argparse.ArgumentParser:
    p = subs.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # SUPPRESS keeps the global `-o` value unless the option is repeated after the subcommand.
    _add_output_option(p, default=argparse.SUPPRESS)
    p.set_defaults(handler=handler)
    return p


def _add_submit(subs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = _subparser(subs, "submit", commands.submit, "submit a profiling request", SUBMIT_EPILOG)
    p.add_argument("--service", required=True, help="service whose agents are profiled")
    p.add_argument(
        "--host",
        dest="hosts",
        action="append",
        default=[],
        metavar="HOST",
        help="host to profile (repeatable; default: every online agent of the service)",
    )
    p.add_argument(
        "--duration", type=_positive_int, required=True, metavar="SECONDS", help="session length"
    )
    p.add_argument(
        "--frequency", type=_positive_int, default=0, metavar="HZ", help="default: server's (11)"
    )
    p.add_argument("--mode", choices=tuple(commands.MODES), help="profile kind (default: cpu)")
    p.add_argument(
        "--pid",
        dest="pids",
        type=_positive_int,
        action="append",
        default=[],
        metavar="PID",
        help="process to profile (repeatable; default: what each agent watches)",
    )
    p.add_argument(
        "--max-hosts", type=_positive_int, default=0, metavar="N", help="at most N random targets"
    )
    p.add_argument(
        "--ttl",
        type=_positive_int,
        default=0,
        metavar="SECONDS",
        help="how long an undelivered target waits for its agent (default: server's, 300)",
    )
    p.add_argument(
        "--arg",
        dest="args",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra profiler option (repeatable)",
    )
    p.add_argument("--idempotency-key", default="", metavar="K", help="makes retries safe")
    p.add_argument(
        "--continuous", action="store_true", help="back-to-back sessions until cancelled"
    )
    p.add_argument("--wait", action="store_true", help="follow the request until it finishes")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="show the agents it would reach and which would reject it; create nothing",
    )
    _add_poll_interval(p)


def _add_poll_interval(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--poll-interval",
        type=_positive_float,
        default=1.0,
        metavar="S",
        help="seconds between polls when the server cannot stream progress, and between "
        "reconnects of a broken watch (default: %(default)s)",
    )


def _add_list(subs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = _subparser(subs, "list", commands.list_requests, "list profiling requests, newest first")
    p.add_argument("--service", default="", help="only this service's requests")
    p.add_argument("--state", choices=tuple(commands.REQUEST_STATES), help="only this state")
    p.add_argument(
        "--page-size", type=_positive_int, default=0, metavar="N", help="default: server's (50)"
    )
    p.add_argument("--page-token", default="", metavar="T", help="from a previous page")
    p.add_argument("--all", action="store_true", help="follow page tokens to the last page")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pulsectl",
        description="Operator CLI for the Pulse profiling control plane.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--server",
        default=os.environ.get(SERVER_ENV) or DEFAULT_SERVER,
        metavar="ADDR",
        help=f"host:port of a Pulse server (env {SERVER_ENV}, default {DEFAULT_SERVER})",
    )
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=10.0,
        metavar="SECONDS",
        help="deadline of each RPC (default: %(default)s)",
    )
    _add_output_option(p, default="table")
    p.add_argument("--ca", type=Path, help="CA bundle of the server's certificate; enables TLS")
    p.add_argument("--cert", type=Path, help="client certificate (PEM) when the server wants mTLS")
    p.add_argument("--key", type=Path, help="client private key (PEM)")
    p.add_argument(
        "--token-file",
        type=Path,
        metavar="PATH",
        help=f"file holding the bearer token (default: env {TOKEN_ENV})",
    )
    subs = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_submit(subs)
    get = _subparser(subs, "get", commands.get, "show one request and its targets")
    get.add_argument("request_id", metavar="ID")
    _add_list(subs)
    cancel = _subparser(subs, "cancel", commands.cancel, "cancel a request")
    cancel.add_argument("request_id", metavar="ID")
    stop = _subparser(
        subs, "stop", commands.stop, "cancel every queued and running command of a service"
    )
    stop.add_argument("--service", required=True, help="service whose commands are stopped")
    stop.add_argument(
        "--host", dest="hosts", action="append", default=[], metavar="HOST", help="repeatable"
    )
    watch = _subparser(
        subs, "watch", commands.watch, "follow a request live until it finishes", WATCH_EPILOG
    )
    watch.add_argument("request_id", metavar="ID")
    _add_poll_interval(watch)
    agents = _subparser(subs, "agents", commands.agents, "list agents and their liveness")
    agents.add_argument("--service", default="", help="only this service's agents")
    agents.add_argument(
        "--state", choices=("online", "offline"), help="only online or only offline agents"
    )
    agents.add_argument("--online", action="store_true", help="same as --state online")
    history = _subparser(
        subs, "history", commands.history, "audit trail of a request: who changed what, when"
    )
    history.add_argument("request_id", metavar="ID")
    return p


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call (unary, and the watch stream)."""

    def __init__(self, token: str) -> None:
        self._metadata = ("authorization", f"Bearer {token}")

    def _with_token(self, details: Any) -> Any:
        return details._replace(metadata=[*(details.metadata or ()), self._metadata])

    def intercept_unary_unary(
        self, continuation: Callable[[Any, Any], Any], details: Any, request: Any
    ) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(
        self, continuation: Callable[[Any, Any], Any], details: Any, request: Any
    ) -> Any:
        return continuation(self._with_token(details), request)


def read_token(args: argparse.Namespace) -> str:
    if args.token_file is not None:
        try:
            return args.token_file.read_text().strip()
        except OSError as exc:
            raise SystemExit(f"pulsectl: cannot read --token-file: {exc}") from None
    return os.environ.get(TOKEN_ENV, "").strip()


def open_channel(args: argparse.Namespace) -> grpc.Channel:
    if args.ca is None and args.cert is None and args.key is None:
        channel = grpc.insecure_channel(args.server)
    else:
        if (args.cert is None) != (args.key is None):
            raise SystemExit("pulsectl: --cert and --key go together")
        try:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=args.ca.read_bytes() if args.ca else None,
                private_key=args.key.read_bytes() if args.key else None,
                certificate_chain=args.cert.read_bytes() if args.cert else None,
            )
        except OSError as exc:
            raise SystemExit(f"pulsectl: {exc}") from None
        channel = grpc.secure_channel(args.server, credentials)
    token = read_token(args)
    return grpc.intercept_channel(channel, _BearerToken(token)) if token else channel


def rpc_error_line(exc: grpc.RpcError, args: argparse.Namespace) -> str:
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    details = exc.details() if callable(getattr(exc, "details", None)) else None
    name = code.name if code is not None else "UNKNOWN"
    line = f"error: {name}: {' '.join(str(details or exc).split())}"
    if code == grpc.StatusCode.UNAVAILABLE:
        line += f" (the server at {args.server} is unreachable; see --server or ${SERVER_ENV})"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        line += f" (no answer within {args.timeout:g}s; see --timeout)"
    return line


def run(
    argv: list[str],
    stub: ppb_grpc.ProfilingServiceStub | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Runs one command and returns the exit status; a stub is given by tests."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_RPC_ERROR
    try:
        if stub is not None:
            return _dispatch(args, stub, out, err)
        with open_channel(args) as channel:
            return _dispatch(args, ppb_grpc.ProfilingServiceStub(channel), out, err)
    except grpc.RpcError as exc:
        print(rpc_error_line(exc, args), file=err)
        return EXIT_RPC_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=err)
        return commands.EXIT_INTERRUPTED


def _dispatch(
    args: argparse.Namespace, stub: ppb_grpc.ProfilingServiceStub, out: TextIO, err: TextIO
) -> int:
    live = bool(getattr(err, "isatty", lambda: False)())
    ctx = commands.Context(
        stub=stub, timeout=args.timeout, output=args.output, out=out, err=err, live=live
    )
    handler: commands.Command = args.handler
    return handler(ctx, args)


def main() -> None:
    try:
        status = run(sys.argv[1:])
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. `pulsectl list --all | head`
        # Python would report the pipe again when flushing stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = 1
    sys.exit(status)


if __name__ == "__main__":
    main()
