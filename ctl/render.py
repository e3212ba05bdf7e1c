"""Plain-text rendering of Pulse messages for `pulsectl` (fixed-width columns, no colours)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC

from google.protobuf.timestamp_pb2 import Timestamp

from pulse.v1 import common_pb2 as cpb
from pulse.v1 import profiling_service_pb2 as ppb

EMPTY = "-"
COLUMN_GAP = "  "

TERMINAL_REQUEST_STATES = frozenset(
    {
        ppb.REQUEST_STATE_SUCCEEDED,
        ppb.REQUEST_STATE_PARTIALLY_SUCCEEDED,
        ppb.REQUEST_STATE_FAILED,
        ppb.REQUEST_STATE_CANCELLED,
    }
)

# Targets that need the operator's attention; `get` lists them first.
PROBLEM_COMMAND_STATES = frozenset(
    {
        cpb.COMMAND_STATE_FAILED,
        cpb.COMMAND_STATE_TIMED_OUT,
        cpb.COMMAND_STATE_REJECTED,
        cpb.COMMAND_STATE_EXPIRED,
    }
)

MODE_NAMES = {
    cpb.PROFILING_MODE_UNSPECIFIED: "cpu",
    cpb.PROFILING_MODE_CPU: "cpu",
    cpb.PROFILING_MODE_ALLOCATION: "allocation",
    cpb.PROFILING_MODE_NONE: "none",
}

# (field of TargetCounts, label) in the order a progress line shows them.
_COUNT_FIELDS = (
    ("pending", "pending"),
    ("sent", "sent"),
    ("running", "running"),
    ("succeeded", "succeeded"),
    ("failed", "failed"),
    ("rejected", "rejected"),
    ("cancelled", "cancelled"),
    ("expired", "expired"),
    ("timed_out", "timed out"),
)


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns as wide as their widest cell; the last column is not padded."""
    cells = [list(headers)] + [[_cell(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        padded = [value.ljust(width) for value, width in zip(row, widths, strict=True)]
        lines.append(COLUMN_GAP.join(padded).rstrip())
    return "\n".join(lines)


def _cell(value: str) -> str:
    flat = " ".join(value.split())
    return flat or EMPTY


def timestamp(ts: Timestamp) -> str:
    if ts.seconds == 0 and ts.nanos == 0:
        return EMPTY
    return ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def request_state(state: ppb.RequestState.ValueType) -> str:
    try:
        return ppb.RequestState.Name(state).removeprefix("REQUEST_STATE_")
    except ValueError:  # a state newer than this client
        return str(state)


def command_state(state: cpb.CommandState.ValueType) -> str:
    try:
        return cpb.CommandState.Name(state).removeprefix("COMMAND_STATE_")
    except ValueError:
        return str(state)


def done_count(counts: ppb.TargetCounts) -> int:
    return (
        counts.succeeded
        + counts.failed
        + counts.rejected
        + counts.cancelled
        + counts.expired
        + counts.timed_out
    )


def counts(c: ppb.TargetCounts) -> str:
    """E.g. `3 targets: 1 running, 2 succeeded` (zero counts left out)."""
    parts = [f"{getattr(c, field)} {label}" for field, label in _COUNT_FIELDS if getattr(c, field)]
    noun = "target" if c.total == 1 else "targets"
    return f"{c.total} {noun}" + (": " + ", ".join(parts) if parts else "")


def spec(s: cpb.ProfilingSpec) -> str:
    parts = [MODE_NAMES.get(s.profiling_mode, str(s.profiling_mode))]
    parts.append(f"{s.duration_seconds}s")
    if s.frequency_hz:
        parts.append(f"@ {s.frequency_hz} Hz")
    if s.continuous:
        parts.append("continuous")
    if s.pids:
        parts.append("pids " + ",".join(str(pid) for pid in s.pids))
    if s.additional_args:
        args = ",".join(f"{k}={v}" for k, v in sorted(s.additional_args.items()))
        parts.append(f"args {args}")
    return " ".join(parts)


def result(r: cpb.ProfileResult) -> str:
    if not r.location:
        return EMPTY
    return f"{r.location} ({r.samples} samples)" if r.samples else r.location


def submitted(resp: ppb.SubmitProfileRequestResponse) -> str:
    """The request id alone on the first line (scripts read it), then one line per target."""
    first = resp.request_id + (" (deduplicated: existing request)" if resp.deduplicated else "")
    rows = [
        (t.hostname, t.agent_id, t.command_id, command_state(t.command_state)) for t in resp.targets
    ]
    if not rows:
        return first
    return first + "\n" + table(("HOST", "AGENT", "COMMAND", "STATE"), rows)


BAR_WIDTH = 24


def bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    filled = width if total <= 0 else min(width, done * width // total)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def progress(req: ppb.ProfileRequest) -> str:
    """E.g. `[############............] 1/2 done  RUNNING  1 running, 1 succeeded`."""
    c = req.counts
    done = done_count(c)
    parts = [f"{getattr(c, field)} {label}" for field, label in _COUNT_FIELDS if getattr(c, field)]
    line = f"{bar(done, c.total)} {done}/{c.total} done  {request_state(req.state)}"
    return line + ("  " + ", ".join(parts) if parts else "")


def targets(items: Iterable[ppb.Target]) -> str:
    ordered = sorted(items, key=_target_order)
    rows = [
        (
            t.hostname,
            t.agent_id,
            t.command_id,
            command_state(t.command_state),
            t.error_message,
            result(t.result),
        )
        for t in ordered
    ]
    return table(("HOST", "AGENT", "COMMAND", "STATE", "ERROR", "RESULT"), rows)


# Listed first of all: targets that ran and broke.
FAILED_COMMAND_STATES = frozenset({cpb.COMMAND_STATE_FAILED, cpb.COMMAND_STATE_TIMED_OUT})


def _target_order(t: ppb.Target) -> tuple[int, str, str]:
    if t.command_state in FAILED_COMMAND_STATES:
        rank = 0
    elif t.command_state in PROBLEM_COMMAND_STATES:
        rank = 1
    else:
        rank = 2
    return (rank, t.hostname, t.agent_id)


def request_detail(req: ppb.ProfileRequest) -> str:
    fields = [
        ("ID", req.request_id),
        ("SERVICE", req.service_name),
        ("STATE", request_state(req.state)),
        ("SPEC", spec(req.spec)),
    ]
    if req.hostnames:
        fields.append(("HOSTS", ", ".join(req.hostnames)))
    if req.max_hosts:
        fields.append(("MAX HOSTS", str(req.max_hosts)))
    if req.idempotency_key:
        fields.append(("IDEMPOTENCY KEY", req.idempotency_key))
    fields.append(("CREATED", timestamp(req.create_time)))
    if req.HasField("cancel_time"):
        fields.append(("CANCELLED", timestamp(req.cancel_time)))
    fields.append(("COUNTS", counts(req.counts)))
    width = max(len(label) for label, _ in fields) + 1
    header = "\n".join(f"{label + ':':<{width}} {value or EMPTY}" for label, value in fields)
    if not req.targets:
        return header
    return header + "\n\n" + targets(req.targets)


def request_list(requests: Iterable[ppb.ProfileRequest]) -> str:
    rows = [
        (
            r.request_id,
            r.service_name,
            request_state(r.state),
            f"{done_count(r.counts)}/{r.counts.total}",
            timestamp(r.create_time),
        )
        for r in requests
    ]
    return table(("ID", "SERVICE", "STATE", "TARGETS", "CREATED"), rows)


def running(ids: Sequence[str]) -> str:
    """The command an agent runs (it runs one at a time), `+N` when more are sent to it."""
    if not ids:
        return EMPTY
    return ids[0] + (f" +{len(ids) - 1}" if len(ids) > 1 else "")


def agents(items: Iterable[ppb.Agent]) -> str:
    rows = [
        (
            a.agent_id,
            a.hostname,
            a.service_name,
            "online" if a.online else "offline",
            timestamp(a.last_heartbeat_time),
            running(a.running_command_ids),
            a.agent_version,
        )
        for a in items
    ]
    headers = ("AGENT", "HOST", "SERVICE", "STATE", "LAST HEARTBEAT", "RUNNING", "VERSION")
    return table(headers, rows)


def modes(values: Iterable[cpb.ProfilingMode.ValueType]) -> str:
    return ",".join(MODE_NAMES.get(m, str(m)) for m in values)


def dry_run(resp: ppb.SubmitProfileRequestResponse) -> str:
    """A summary line, then one row per target the request would get (rejections first)."""
    found = list(resp.dry_run_targets)
    rejecting = sum(1 for t in found if t.would_reject)
    noun = "target" if len(found) == 1 else "targets"
    head = f"dry run (nothing created): {len(found)} {noun}, {rejecting} would reject"
    ordered = sorted(found, key=lambda t: (not t.would_reject, t.hostname, t.agent_id))
    rows = [
        (
            t.hostname,
            t.agent_id,
            ("online" if t.online else "offline") if t.agent_id else EMPTY,
            modes(t.supported_modes),
            "REJECT" if t.would_reject else ("ok" if not t.reason else "waits"),
            t.reason,
        )
        for t in ordered
    ]
    headers = ("HOST", "AGENT", "STATE", "MODES", "VERDICT", "REASON")
    return head + ("\n" + table(headers, rows) if rows else "")


def stopped(resp: ppb.StopProfilingResponse) -> str:
    return (
        f"cancelled {resp.cancelled_commands} queued command(s); "
        f"told {resp.stopping_commands} running command(s) to stop"
    )


def cancelled(req: ppb.ProfileRequest) -> str:
    line = f"{req.request_id}  {request_state(req.state)}  ({counts(req.counts)})"
    if req.state not in TERMINAL_REQUEST_STATES:
        line += "; running targets were told to stop"
    return line
