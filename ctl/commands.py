"""The `pulsectl` subcommands: each turns parsed arguments into one or more RPCs and prints."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TextIO

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
    resp = ctx.stub.SubmitProfileRequest(submit_request(args), timeout=ctx.timeout)
    if not args.wait:
        ctx.emit(resp, lambda: render.submitted(resp))
        return EXIT_OK
    if ctx.output != "json":
        print(render.submitted(resp), file=ctx.out, flush=True)
    try:
        final = wait_until_finished(ctx, resp.request_id, args.poll_interval)
    except KeyboardInterrupt:
        ctx.note(
            f"interrupted; request {resp.request_id} keeps running "
            f"(stop it with: pulsectl cancel {resp.request_id})"
        )
        return EXIT_INTERRUPTED
    ctx.emit(final, lambda: "\n" + render.request_detail(final.request))
    return EXIT_OK if final.request.state == ppb.REQUEST_STATE_SUCCEEDED else EXIT_NOT_SUCCEEDED


def wait_until_finished(
    ctx: Context, request_id: str, poll_interval: float
) -> ppb.GetProfileRequestResponse:
    """Polls the request, writing a progress line to stderr each time its state or counts move."""
    get = ppb.GetProfileRequestRequest(request_id=request_id)
    last: tuple[int, ppb.TargetCounts] | None = None
    while True:
        resp = ctx.stub.GetProfileRequest(get, timeout=ctx.timeout)
        req = resp.request
        seen = (req.state, req.counts)
        if seen != last:
            ctx.note(render.progress(req))
            last = seen
        if req.state in render.TERMINAL_REQUEST_STATES:
            return resp
        time.sleep(poll_interval)


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
    resp = ctx.stub.ListAgents(
        ppb.ListAgentsRequest(service_name=args.service, online_only=args.online),
        timeout=ctx.timeout,
    )
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
