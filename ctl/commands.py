"""The `pulsectl` subcommands: each turns parsed arguments into one or more RPCs and prints."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TextIO

import grpc
from google.protobuf.json_format import MessageToJson
from google.protobuf.message import Message

from ctl import render
from pulse.v1 import common_pb2 as cpb
from pulse.v1 import profiling_service_pb2 as ppb
from pulse.v1 import profiling_service_pb2_grpc as ppb_grpc

EXIT_OK = 0
EXIT_NOT_SUCCEEDED = 1
EXIT_INTERRUPTED = 130

MODES = {
    "cpu": cpb.PROFILING_MODE_CPU,
    "allocation": cpb.PROFILING_MODE_ALLOCATION,
    "none": cpb.PROFILING_MODE_NONE,
}

REQUEST_STATES = {
    "pending": ppb.REQUEST_STATE_PENDING,
    "running": ppb.REQUEST_STATE_RUNNING,
    "succeeded": ppb.REQUEST_STATE_SUCCEEDED,
    "partially-succeeded": ppb.REQUEST_STATE_PARTIALLY_SUCCEEDED,
    "failed": ppb.REQUEST_STATE_FAILED,
    "cancelled": ppb.REQUEST_STATE_CANCELLED,
}


@dataclass(frozen=True)
class Context:
    stub: ppb_grpc.ProfilingServiceStub
    timeout: float
    output: str
    out: TextIO
    err: TextIO
    # True when stderr is a terminal: progress redraws one line instead of printing many.
    live: bool = False

    def emit(self, message: Message, as_text: Callable[[], str]) -> None:
        if self.output == "json":
            text = MessageToJson(message, preserving_proto_field_name=True)
        else:
            text = as_text()
        print(text, file=self.out)

    def note(self, text: str) -> None:
        print(text, file=self.err)


Command = Callable[[Context, argparse.Namespace], int]


def submit_request(args: argparse.Namespace) -> ppb.SubmitProfileRequestRequest:
    return ppb.SubmitProfileRequestRequest(
        service_name=args.service,
        hostnames=args.hosts,
        duration_seconds=args.duration,
        frequency_hz=args.frequency,
        profiling_mode=MODES[args.mode] if args.mode else cpb.PROFILING_MODE_UNSPECIFIED,
        pids=args.pids,
        max_hosts=args.max_hosts,
        ttl_seconds=args.ttl,
        additional_args=dict(args.args),
        idempotency_key=args.idempotency_key,
        continuous=args.continuous,
    )


def submit(ctx: Context, args: argparse.Namespace) -> int:
    request = submit_request(args)
    if args.dry_run:
        request.dry_run = True
        preview = ctx.stub.SubmitProfileRequest(request, timeout=ctx.timeout)
        ctx.emit(preview, lambda: render.dry_run(preview))
        return EXIT_OK
    resp = ctx.stub.SubmitProfileRequest(request, timeout=ctx.timeout)
    if not args.wait:
        ctx.emit(resp, lambda: render.submitted(resp))
        return EXIT_OK
    if ctx.output != "json":
        print(render.submitted(resp), file=ctx.out, flush=True)
    return follow(ctx, resp.request_id, args.poll_interval, "\n")


def watch(ctx: Context, args: argparse.Namespace) -> int:
    """Follows an existing request to its end, like `submit --wait`."""
    return follow(ctx, args.request_id, args.poll_interval, "")


def follow(ctx: Context, request_id: str, poll_interval: float, separator: str) -> int:
    """Shows live progress on stderr, then the request with its targets (problems first); the
    exit status says whether it SUCCEEDED."""
    try:
        final = wait_until_finished(ctx, request_id, poll_interval)
    except KeyboardInterrupt:
        ctx.note(
            f"interrupted; request {request_id} keeps running "
            f"(stop it with: pulsectl cancel {request_id})"
        )
        return EXIT_INTERRUPTED
    ctx.emit(final, lambda: separator + render.request_detail(final.request))
    return EXIT_OK if final.request.state == ppb.REQUEST_STATE_SUCCEEDED else EXIT_NOT_SUCCEEDED


def wait_until_finished(
    ctx: Context, request_id: str, poll_interval: float
) -> ppb.GetProfileRequestResponse:
    """Follows the request with WatchProfileRequest (polling GetProfileRequest on a server that
    does not implement it), drawing progress on stderr; returns the final request with its
    targets."""
    progress = Progress(ctx)
    try:
        for req in _snapshots(ctx, request_id, poll_interval):
            progress.show(req)
    finally:
        progress.close()
    return ctx.stub.GetProfileRequest(
        ppb.GetProfileRequestRequest(request_id=request_id), timeout=ctx.timeout
    )


MAX_WATCH_RECONNECTS = 5


def _snapshots(ctx: Context, request_id: str, poll_interval: float) -> Iterator[ppb.ProfileRequest]:
    """Every snapshot until a terminal one. A watch broken by UNAVAILABLE (e.g. a server
    restarting) is opened again, a few times."""
    reconnects = 0
    received = False
    while True:
        try:
            # No deadline: a watch lasts as long as the request (Ctrl-C ends it).
            for resp in ctx.stub.WatchProfileRequest(
                ppb.WatchProfileRequestRequest(request_id=request_id)
            ):
                reconnects = 0
                received = True
                yield resp.request
                if resp.request.state in render.TERMINAL_REQUEST_STATES:
                    return
        except grpc.RpcError as exc:
            code = exc.code() if callable(getattr(exc, "code", None)) else None
            if code == grpc.StatusCode.UNIMPLEMENTED:
                yield from _polled(ctx, request_id, poll_interval)
                return
            retry = code == grpc.StatusCode.UNAVAILABLE and received
            if not retry or reconnects >= MAX_WATCH_RECONNECTS:
                raise
            reconnects += 1
            time.sleep(min(poll_interval * reconnects, 5.0))
            continue
        return  # the stream ended before a terminal state: nothing more will come


def _polled(ctx: Context, request_id: str, poll_interval: float) -> Iterator[ppb.ProfileRequest]:
    get = ppb.GetProfileRequestRequest(request_id=request_id)
    while True:
        req = ctx.stub.GetProfileRequest(get, timeout=ctx.timeout).request
        yield req
        if req.state in render.TERMINAL_REQUEST_STATES:
            return
        time.sleep(poll_interval)


class Progress:
    """Progress on stderr: a bar redrawn in place on a terminal, else one line per change."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._last: tuple[int, bytes] | None = None
        self._drawn = False

    def show(self, req: ppb.ProfileRequest) -> None:
        seen = (req.state, req.counts.SerializeToString(deterministic=True))
        if seen == self._last:
            return
        self._last = seen
        line = render.progress(req)
        if self._ctx.live:
            self._ctx.err.write("\r\x1b[2K" + line)
            self._ctx.err.flush()
            self._drawn = True
        else:
            self._ctx.note(line)

    def close(self) -> None:
        if self._drawn:
            self._ctx.err.write("\n")
            self._ctx.err.flush()


def get(ctx: Context, args: argparse.Namespace) -> int:
    resp = ctx.stub.GetProfileRequest(
        ppb.GetProfileRequestRequest(request_id=args.request_id), timeout=ctx.timeout
    )
    ctx.emit(resp, lambda: render.request_detail(resp.request))
    return EXIT_OK


def list_requests(ctx: Context, args: argparse.Namespace) -> int:
    query = ppb.ListProfileRequestsRequest(
        service_name=args.service,
        state=REQUEST_STATES[args.state] if args.state else ppb.REQUEST_STATE_UNSPECIFIED,
        page_size=args.page_size,
        page_token=args.page_token,
    )
    resp = ctx.stub.ListProfileRequests(query, timeout=ctx.timeout)
    if args.all:
        resp = _remaining_pages(ctx, query, resp)
    ctx.emit(resp, lambda: _list_text(resp))
    return EXIT_OK


def _remaining_pages(
    ctx: Context, query: ppb.ListProfileRequestsRequest, first: ppb.ListProfileRequestsResponse
) -> ppb.ListProfileRequestsResponse:
    merged = ppb.ListProfileRequestsResponse(requests=first.requests)
    token = first.next_page_token
    while token:
        next_query = ppb.ListProfileRequestsRequest()
        next_query.CopyFrom(query)
        next_query.page_token = token
        page = ctx.stub.ListProfileRequests(next_query, timeout=ctx.timeout)
        merged.requests.extend(page.requests)
        token = page.next_page_token
    return merged


def _list_text(resp: ppb.ListProfileRequestsResponse) -> str:
    text = render.request_list(resp.requests)
    if resp.next_page_token:
        text += f"\nnext page token: {resp.next_page_token}"
    return text


def cancel(ctx: Context, args: argparse.Namespace) -> int:
    resp = ctx.stub.CancelProfileRequest(
        ppb.CancelProfileRequestRequest(request_id=args.request_id), timeout=ctx.timeout
    )
    ctx.emit(resp, lambda: render.cancelled(resp.request))
    return EXIT_OK


def stop(ctx: Context, args: argparse.Namespace) -> int:
    resp = ctx.stub.StopProfiling(
        ppb.StopProfilingRequest(service_name=args.service, hostnames=args.hosts),
        timeout=ctx.timeout,
    )
    ctx.emit(resp, lambda: render.stopped(resp))
    return EXIT_OK


def agents(ctx: Context, args: argparse.Namespace) -> int:
    state = "online" if args.online else args.state
    resp = ctx.stub.ListAgents(
        ppb.ListAgentsRequest(service_name=args.service, online_only=state == "online"),
        timeout=ctx.timeout,
    )
    if state == "offline":  # the server filters online only; offline is the rest
        kept = [a for a in resp.agents if not a.online]
        del resp.agents[:]
        resp.agents.extend(kept)
    ctx.emit(resp, lambda: render.agents(resp.agents))
    return EXIT_OK


def history(ctx: Context, args: argparse.Namespace) -> int:
    resp = ctx.stub.GetRequestHistory(
        ppb.GetRequestHistoryRequest(request_id=args.request_id), timeout=ctx.timeout
    )
    ctx.emit(resp, lambda: history_text(resp.events))
    return EXIT_OK


def history_text(events: Iterable[ppb.AuditEvent]) -> str:
    """One line per change: time, actor, what changed (command-level: host and states)."""
    rows = []
    for e in events:
        if e.command_id:
            what = f"{e.action} {e.hostname} {e.command_id[:8]}"
            change = f"{e.from_state} -> {e.to_state}" if e.from_state else e.to_state
        else:
            what, change = f"request {e.action}", ""
        rows.append((render.timestamp(e.time), e.actor, what, change, e.detail))
    return render.table(("TIME", "ACTOR", "EVENT", "STATE", "DETAIL"), rows)
