"""`pulsectl watch`, live progress, dry runs and the agents filter (grpc_testing channel)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable

import grpc

from ctl import render
from pulse.v1 import common_pb2 as cpb
from pulse.v1 import profiling_service_pb2 as ppb
from tests.unit.test_ctl import (
    FAST_POLL,
    REQUEST_ID,
    SERVICE,
    Cli,
    get_response,
    target,
    watch_response,
)

WATCH = SERVICE.methods_by_name["WatchProfileRequest"]


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.01)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_watch_lists_failed_and_timed_out_targets_first_and_exits_1() -> None:
    cli = Cli(["watch", REQUEST_ID])
    counts = ppb.TargetCounts(total=5, succeeded=2, failed=1, timed_out=1, expired=1)
    watched = cli.stream(
        "WatchProfileRequest", [watch_response(ppb.REQUEST_STATE_PARTIALLY_SUCCEEDED, counts)]
    )
    cli.answer(
        "GetProfileRequest",
        get_response(
            ppb.REQUEST_STATE_PARTIALLY_SUCCEEDED,
            counts,
            target("a-ok", cpb.COMMAND_STATE_SUCCEEDED, location="/p/a.txt"),
            target("b-expired", cpb.COMMAND_STATE_EXPIRED, error="ttl passed"),
            target("c-ok", cpb.COMMAND_STATE_SUCCEEDED, location="/p/c.txt"),
            target("d-timeout", cpb.COMMAND_STATE_TIMED_OUT, error="no completion"),
            target("e-failed", cpb.COMMAND_STATE_FAILED, error="py-spy crashed"),
        ),
    )

    assert cli.finish() == 1
    assert watched == ppb.WatchProfileRequestRequest(request_id=REQUEST_ID)
    _, table = cli.out.getvalue().split("\n\n")
    rows = table.splitlines()
    assert rows[0].split() == ["HOST", "AGENT", "COMMAND", "STATE", "ERROR", "RESULT"]
    hosts = [row.split()[0] for row in rows[1:]]
    assert hosts == ["d-timeout", "e-failed", "b-expired", "a-ok", "c-ok"]
    assert "py-spy crashed" in rows[2]
    assert rows[4].endswith("/p/a.txt")
    assert cli.err.getvalue().splitlines() == [
        "[########################] 5/5 done  PARTIALLY_SUCCEEDED  "
        "2 succeeded, 1 failed, 1 expired, 1 timed out"
    ]


def test_watch_on_a_terminal_redraws_one_line() -> None:
    cli = Cli(["watch", REQUEST_ID], err=Terminal())
    cli.stream(
        "WatchProfileRequest",
        [
            watch_response(ppb.REQUEST_STATE_PENDING, ppb.TargetCounts(total=4, pending=4)),
            watch_response(ppb.REQUEST_STATE_RUNNING, ppb.TargetCounts(total=4, running=4)),
            watch_response(ppb.REQUEST_STATE_SUCCEEDED, ppb.TargetCounts(total=4, succeeded=4)),
        ],
    )
    cli.answer(
        "GetProfileRequest",
        get_response(ppb.REQUEST_STATE_SUCCEEDED, ppb.TargetCounts(total=4, succeeded=4)),
    )

    assert cli.finish() == 0
    err = cli.err.getvalue()
    assert err.count("\r\x1b[2K") == 3  # three redraws of the same line
    assert err.endswith("4/4 done  SUCCEEDED  4 succeeded\n")
    assert err.count("\n") == 1


def test_watch_reopens_a_stream_broken_by_unavailable() -> None:
    cli = Cli(["watch", REQUEST_ID, *FAST_POLL])
    running = ppb.TargetCounts(total=1, running=1)
    _, first, rpc = cli.channel.take_unary_stream(WATCH)
    rpc.send_response(watch_response(ppb.REQUEST_STATE_RUNNING, running))
    wait_until(lambda: "RUNNING" in cli.err.getvalue())  # the CLI has read the first snapshot
    rpc.terminate((), grpc.StatusCode.UNAVAILABLE, "server restarting")
    second = cli.stream(
        "WatchProfileRequest",
        [watch_response(ppb.REQUEST_STATE_SUCCEEDED, ppb.TargetCounts(total=1, succeeded=1))],
    )
    cli.answer(
        "GetProfileRequest",
        get_response(ppb.REQUEST_STATE_SUCCEEDED, ppb.TargetCounts(total=1, succeeded=1)),
    )

    assert cli.finish() == 0
    assert first.request_id == second.request_id == REQUEST_ID
    assert cli.err.getvalue().splitlines()[-1].endswith("1/1 done  SUCCEEDED  1 succeeded")


def test_watch_unavailable_before_any_progress_is_an_error() -> None:
    cli = Cli(["watch", REQUEST_ID, *FAST_POLL])
    cli.stream("WatchProfileRequest", [], grpc.StatusCode.UNAVAILABLE, "connection refused")

    assert cli.finish() == 2
    assert cli.err.getvalue().startswith("error: UNAVAILABLE: connection refused")


def test_watch_polls_a_server_without_the_streaming_rpc() -> None:
    cli = Cli(["watch", REQUEST_ID, *FAST_POLL])
    cli.stream("WatchProfileRequest", [], grpc.StatusCode.UNIMPLEMENTED, "unknown method")
    cli.answer(
        "GetProfileRequest",
        get_response(ppb.REQUEST_STATE_RUNNING, ppb.TargetCounts(total=1, running=1)),
    )
    done = get_response(ppb.REQUEST_STATE_SUCCEEDED, ppb.TargetCounts(total=1, succeeded=1))
    cli.answer("GetProfileRequest", done)
    cli.answer("GetProfileRequest", done)  # the final fetch of the targets

    assert cli.finish() == 0
    assert len(cli.err.getvalue().splitlines()) == 2


def test_watch_not_found_exits_2() -> None:
    cli = Cli(["watch", REQUEST_ID])
    cli.stream("WatchProfileRequest", [], grpc.StatusCode.NOT_FOUND, "no such request")

    assert cli.finish() == 2
    assert cli.err.getvalue() == "error: NOT_FOUND: no such request\n"


def test_watch_json_prints_the_final_request() -> None:
    cli = Cli(["watch", REQUEST_ID, "-o", "json"])
    counts = ppb.TargetCounts(total=1, succeeded=1)
    cli.stream("WatchProfileRequest", [watch_response(ppb.REQUEST_STATE_SUCCEEDED, counts)])
    cli.answer(
        "GetProfileRequest",
        get_response(
            ppb.REQUEST_STATE_SUCCEEDED, counts, target("web-1", cpb.COMMAND_STATE_SUCCEEDED)
        ),
    )

    assert cli.finish() == 0
    body = json.loads(cli.out.getvalue())
    assert body["request"]["targets"][0]["hostname"] == "web-1"


# --- dry run ------------------------------------------------------------------------------------


def dry_run_response() -> ppb.SubmitProfileRequestResponse:
    return ppb.SubmitProfileRequestResponse(
        dry_run_targets=[
            ppb.DryRunTarget(
                hostname="web-1",
                agent_id="a1",
                online=True,
                supported_modes=[cpb.PROFILING_MODE_CPU],
            ),
            ppb.DryRunTarget(
                hostname="web-2",
                agent_id="a2",
                online=True,
                supported_modes=[cpb.PROFILING_MODE_CPU, cpb.PROFILING_MODE_NONE],
                would_reject=True,
                reason="mode allocation not supported by this agent (supports: cpu, none)",
            ),
            ppb.DryRunTarget(hostname="web-3", reason="no agent of this host has connected yet"),
        ]
    )


def test_dry_run_sends_the_flag_and_shows_rejections_first() -> None:
    cli = Cli(["submit", "--service", "checkout", "--duration", "5", "--mode", "allocation",
               "--dry-run", "--wait"])  # fmt: skip
    sent = cli.answer("SubmitProfileRequest", dry_run_response())

    assert cli.finish() == 0  # --wait has nothing to follow: nothing was created
    assert sent.dry_run is True
    assert sent.profiling_mode == cpb.PROFILING_MODE_ALLOCATION
    lines = cli.out.getvalue().splitlines()
    assert lines[0] == "dry run (nothing created): 3 targets, 1 would reject"
    assert lines[1].split() == ["HOST", "AGENT", "STATE", "MODES", "VERDICT", "REASON"]
    assert lines[2].split()[:5] == ["web-2", "a2", "online", "cpu,none", "REJECT"]
    assert "mode allocation not supported" in lines[2]
    assert lines[3].split() == ["web-1", "a1", "online", "cpu", "ok", "-"]
    assert lines[4].split()[:5] == ["web-3", "-", "-", "-", "waits"]


def test_dry_run_json_is_the_response() -> None:
    cli = Cli(["submit", "--service", "checkout", "--duration", "5", "--dry-run", "-o", "json"])
    cli.answer("SubmitProfileRequest", dry_run_response())

    assert cli.finish() == 0
    body = json.loads(cli.out.getvalue())
    assert [t["hostname"] for t in body["dry_run_targets"]] == ["web-1", "web-2", "web-3"]
    assert body["dry_run_targets"][1]["would_reject"] is True


# --- agents -------------------------------------------------------------------------------------


def fleet() -> ppb.ListAgentsResponse:
    return ppb.ListAgentsResponse(
        agents=[
            ppb.Agent(agent_id="a1", hostname="web-1", service_name="checkout", online=True),
            ppb.Agent(agent_id="a2", hostname="web-2", service_name="checkout"),
        ]
    )


def test_agents_state_offline_keeps_only_offline_agents() -> None:
    cli = Cli(["agents", "--service", "checkout", "--state", "offline"])
    sent = cli.answer("ListAgents", fleet())

    assert cli.finish() == 0
    assert sent == ppb.ListAgentsRequest(service_name="checkout", online_only=False)
    rows = cli.out.getvalue().splitlines()[1:]
    assert [row.split()[0] for row in rows] == ["a2"]


def test_agents_state_online_asks_the_server_to_filter() -> None:
    cli = Cli(["agents", "--state", "online", "-o", "json"])
    sent = cli.answer("ListAgents", ppb.ListAgentsResponse(agents=fleet().agents[:1]))

    assert cli.finish() == 0
    assert sent.online_only is True
    assert [a["agent_id"] for a in json.loads(cli.out.getvalue())["agents"]] == ["a1"]


def test_agents_offline_json_is_filtered_too() -> None:
    cli = Cli(["-o", "json", "agents", "--state", "offline"])
    cli.answer("ListAgents", fleet())

    assert cli.finish() == 0
    assert [a["agent_id"] for a in json.loads(cli.out.getvalue())["agents"]] == ["a2"]


# --- rendering ----------------------------------------------------------------------------------


def test_bar_is_empty_at_zero_and_full_when_done() -> None:
    assert render.bar(0, 15_000, width=10) == "[..........]"
    assert render.bar(14_991, 15_000, width=10) == "[#########.]"
    assert render.bar(15_000, 15_000, width=10) == "[##########]"
    assert render.bar(0, 0, width=4) == "[####]"
