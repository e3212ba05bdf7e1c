"""Unit tests of `pulsectl`: the CLI runs in a thread against a grpc_testing channel."""

from __future__ import annotations

import io
import json
import threading
from typing import Any

import grpc
import grpc_testing
import pytest
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from google.protobuf.timestamp_pb2 import Timestamp

from ctl import render
from ctl.main import build_parser, run
from pulse.v1 import common_pb2 as cpb
from pulse.v1 import profiling_service_pb2 as ppb
from pulse.v1 import profiling_service_pb2_grpc as ppb_grpc

SERVICE = ppb.DESCRIPTOR.services_by_name["ProfilingService"]
REQUEST_ID = "6f1c3a52-0d5e-4c61-9a57-3c1d2b7e8f90"
CREATED = Timestamp(seconds=1_714_564_800)  # 2024-05-01 12:00:00 UTC
FAST_POLL = ["--poll-interval", "0.01"]


class Cli:
    """One `run(argv)` in a background thread; the test plays the server."""

    def __init__(self, argv: list[str], err: io.StringIO | None = None) -> None:
        self.channel = grpc_testing.channel(
            ppb.DESCRIPTOR.services_by_name.values(), grpc_testing.strict_real_time()
        )
        self.out = io.StringIO()
        self.err = err if err is not None else io.StringIO()
        self.code: int | None = None
        self._thread = threading.Thread(target=self._run, args=(argv,), daemon=True)
        self._thread.start()

    def _run(self, argv: list[str]) -> None:
        stub = ppb_grpc.ProfilingServiceStub(self.channel)
        self.code = run(argv, stub=stub, out=self.out, err=self.err)

    def answer(self, method: str, response: Message) -> Any:
        """Takes the next call of `method`, answers it with OK and returns what the CLI sent."""
        _, request, rpc = self.channel.take_unary_unary(SERVICE.methods_by_name[method])
        rpc.terminate(response, (), grpc.StatusCode.OK, "")
        return request

    def stream(
        self,
        method: str,
        responses: list[Message],
        code: grpc.StatusCode = grpc.StatusCode.OK,
        details: str = "",
    ) -> Any:
        """Takes the next call of a server-streaming `method`, sends `responses`, then ends it
        with `code`; returns what the CLI sent."""
        _, request, rpc = self.channel.take_unary_stream(SERVICE.methods_by_name[method])
        for response in responses:
            rpc.send_response(response)
        rpc.terminate((), code, details)
        return request

    def fail(self, method: str, code: grpc.StatusCode, details: str) -> Any:
        _, request, rpc = self.channel.take_unary_unary(SERVICE.methods_by_name[method])
        response_class = GetMessageClass(SERVICE.methods_by_name[method].output_type)
        rpc.terminate(response_class(), (), code, details)
        return request

    def finish(self) -> int:
        self._thread.join(timeout=10)
        assert not self._thread.is_alive(), "pulsectl did not finish"
        assert self.code is not None, "run() raised instead of returning an exit code"
        return self.code


def target(
    host: str,
    state: cpb.CommandState.ValueType,
    *,
    error: str = "",
    location: str = "",
    samples: int = 0,
) -> ppb.Target:
    t = ppb.Target(
        agent_id=f"agent-{host}",
        hostname=host,
        command_id=f"cmd-{host}",
        command_state=state,
        error_message=error,
    )
    if location:
        t.result.CopyFrom(cpb.ProfileResult(location=location, samples=samples))
    return t


def profile_request(
    state: ppb.RequestState.ValueType, counts: ppb.TargetCounts, *targets: ppb.Target
) -> ppb.ProfileRequest:
    return ppb.ProfileRequest(
        request_id=REQUEST_ID,
        service_name="checkout",
        spec=cpb.ProfilingSpec(
            duration_seconds=30, frequency_hz=11, profiling_mode=cpb.PROFILING_MODE_CPU
        ),
        state=state,
        counts=counts,
        targets=targets,
        create_time=CREATED,
    )


def get_response(
    state: ppb.RequestState.ValueType, counts: ppb.TargetCounts, *targets: ppb.Target
) -> ppb.GetProfileRequestResponse:
    return ppb.GetProfileRequestResponse(request=profile_request(state, counts, *targets))


def watch_response(
    state: ppb.RequestState.ValueType, counts: ppb.TargetCounts
) -> ppb.WatchProfileRequestResponse:
    return ppb.WatchProfileRequestResponse(request=profile_request(state, counts))


def submitted(*hosts: str) -> ppb.SubmitProfileRequestResponse:
    return ppb.SubmitProfileRequestResponse(
        request_id=REQUEST_ID,
        targets=[target(h, cpb.COMMAND_STATE_PENDING) for h in hosts],
    )


# --- submit ---------------------------------------------------------------------------------


def test_submit_sends_every_option_and_prints_the_id_then_the_targets() -> None:
    cli = Cli(
        [
            "submit",
            "--service=checkout",
            "--host=web-1",
            "--host=web-2",
            "--duration=30",
            "--mode=allocation",
            "--pid=101",
            "--pid=202",
            "--max-hosts=2",
            "--ttl=60",
            "--arg=native=true",
            "--arg=filter=a=b",
            "--idempotency-key=deploy-42",
            "--continuous",
        ]
    )
    sent = cli.answer("SubmitProfileRequest", submitted("web-1", "web-2"))

    assert cli.finish() == 0
    assert sent == ppb.SubmitProfileRequestRequest(
        service_name="checkout",
        hostnames=["web-1", "web-2"],
        duration_seconds=30,
        frequency_hz=0,
        profiling_mode=cpb.PROFILING_MODE_ALLOCATION,
        pids=[101, 202],
        max_hosts=2,
        ttl_seconds=60,
        additional_args={"native": "true", "filter": "a=b"},
        idempotency_key="deploy-42",
        continuous=True,
    )
    lines = cli.out.getvalue().splitlines()
    assert lines[0] == REQUEST_ID
    assert lines[1].split() == ["HOST", "AGENT", "COMMAND", "STATE"]
    assert lines[2].split() == ["web-1", "agent-web-1", "cmd-web-1", "PENDING"]
    assert lines[3].split() == ["web-2", "agent-web-2", "cmd-web-2", "PENDING"]
    assert cli.err.getvalue() == ""


@pytest.mark.parametrize(
    ("mode_args", "expected"),
    [
        ([], cpb.PROFILING_MODE_UNSPECIFIED),
        (["--mode", "cpu"], cpb.PROFILING_MODE_CPU),
        (["--mode", "allocation"], cpb.PROFILING_MODE_ALLOCATION),
        (["--mode", "none"], cpb.PROFILING_MODE_NONE),
    ],
)
def test_submit_maps_modes_and_leaves_defaults_to_the_server(
    mode_args: list[str], expected: cpb.ProfilingMode.ValueType
) -> None:
    cli = Cli(["submit", "--service", "checkout", "--duration", "5", *mode_args])
    sent = cli.answer("SubmitProfileRequest", submitted("web-1"))

    assert cli.finish() == 0
    assert sent.profiling_mode == expected
    assert sent.frequency_hz == 0
    assert sent.ttl_seconds == 0
    assert list(sent.hostnames) == []
    assert not sent.continuous


def test_submit_passes_an_explicit_frequency() -> None:
    cli = Cli(["submit", "--service", "checkout", "--duration", "5", "--frequency", "99"])
    sent = cli.answer("SubmitProfileRequest", submitted("web-1"))

    assert cli.finish() == 0
    assert sent.frequency_hz == 99


def test_submit_json_prints_the_response() -> None:
    cli = Cli(["submit", "--service", "checkout", "--duration", "5", "-o", "json"])
    cli.answer("SubmitProfileRequest", submitted("web-1"))

    assert cli.finish() == 0
    body = json.loads(cli.out.getvalue())
    assert body["request_id"] == REQUEST_ID
    assert body["targets"][0]["hostname"] == "web-1"


def test_submit_marks_a_deduplicated_request() -> None:
    cli = Cli(["submit", "--service", "checkout", "--duration", "5", "--idempotency-key", "k"])
    response = submitted("web-1")
    response.deduplicated = True
    cli.answer("SubmitProfileRequest", response)

    assert cli.finish() == 0
    assert cli.out.getvalue().splitlines()[0].startswith(f"{REQUEST_ID} (deduplicated")


def test_submit_wait_follows_the_watch_until_succeeded_and_exits_0() -> None:
    cli = Cli(["submit", "--service", "checkout", "--duration", "5", "--wait", *FAST_POLL])
    cli.answer("SubmitProfileRequest", submitted("web-1", "web-2"))
    running = ppb.TargetCounts(total=2, running=1, succeeded=1)
    watched = cli.stream(
        "WatchProfileRequest",
        [
            watch_response(ppb.REQUEST_STATE_RUNNING, running),
            watch_response(ppb.REQUEST_STATE_RUNNING, running),
            watch_response(ppb.REQUEST_STATE_SUCCEEDED, ppb.TargetCounts(total=2, succeeded=2)),
        ],
    )
    fetched = cli.answer(
        "GetProfileRequest",
        get_response(
            ppb.REQUEST_STATE_SUCCEEDED,
            ppb.TargetCounts(total=2, succeeded=2),
            target("web-1", cpb.COMMAND_STATE_SUCCEEDED, location="/tmp/p1.json", samples=7),
            target("web-2", cpb.COMMAND_STATE_SUCCEEDED, location="/tmp/p2.json"),
        ),
    )

    assert cli.finish() == 0
    assert watched.request_id == REQUEST_ID
    assert fetched.request_id == REQUEST_ID
    # One progress line per change, not per message (stderr is not a terminal here).
    assert cli.err.getvalue().splitlines() == [
        "[############............] 1/2 done  RUNNING  1 running, 1 succeeded",
        "[########################] 2/2 done  SUCCEEDED  2 succeeded",
    ]
    out = cli.out.getvalue()
    assert out.splitlines()[0] == REQUEST_ID
    assert "STATE:" in out and "SUCCEEDED" in out
    assert "/tmp/p1.json (7 samples)" in out


def test_submit_wait_exits_1_when_the_request_fails() -> None:
    cli = Cli(["submit", "--service", "checkout", "--duration", "5", "--wait", *FAST_POLL])
    cli.answer("SubmitProfileRequest", submitted("web-1"))
    cli.stream(
        "WatchProfileRequest",
        [
            watch_response(ppb.REQUEST_STATE_PENDING, ppb.TargetCounts(total=1, pending=1)),
            watch_response(ppb.REQUEST_STATE_FAILED, ppb.TargetCounts(total=1, failed=1)),
        ],
    )
    cli.answer(
        "GetProfileRequest",
        get_response(
            ppb.REQUEST_STATE_FAILED,
            ppb.TargetCounts(total=1, failed=1),
            target("web-1", cpb.COMMAND_STATE_FAILED, error="py-spy: permission denied"),
        ),
    )

    assert cli.finish() == 1
    assert cli.err.getvalue().splitlines()[-1] == (
        "[########################] 1/1 done  FAILED  1 failed"
    )
    assert "py-spy: permission denied" in cli.out.getvalue()


def test_submit_wait_json_prints_only_the_final_request() -> None:
    argv = ["-o", "json", "submit", "--service", "checkout", "--duration", "5", "--wait"]
    cli = Cli(argv + FAST_POLL)
    cli.answer("SubmitProfileRequest", submitted("web-1"))
    final_counts = ppb.TargetCounts(total=2, succeeded=1, expired=1)
    cli.stream(
        "WatchProfileRequest",
        [watch_response(ppb.REQUEST_STATE_PARTIALLY_SUCCEEDED, final_counts)],
    )
    cli.answer(
        "GetProfileRequest", get_response(ppb.REQUEST_STATE_PARTIALLY_SUCCEEDED, final_counts)
    )

    assert cli.finish() == 1
    body = json.loads(cli.out.getvalue())
    assert body["request"]["state"] == "REQUEST_STATE_PARTIALLY_SUCCEEDED"
    assert body["request"]["counts"]["expired"] == 1


# --- get --------------------------------------------------------------------------------------


def test_get_lists_problem_targets_before_the_others() -> None:
    cli = Cli(["get", REQUEST_ID])
    sent = cli.answer(
        "GetProfileRequest",
        get_response(
            ppb.REQUEST_STATE_RUNNING,
            ppb.TargetCounts(total=4, running=1, succeeded=1, failed=1, expired=1),
            target("a-ok", cpb.COMMAND_STATE_SUCCEEDED, location="/p/a.json", samples=12),
            target("b-run", cpb.COMMAND_STATE_RUNNING),
            target("c-failed", cpb.COMMAND_STATE_FAILED, error="process\n101 exited"),
            target("d-expired", cpb.COMMAND_STATE_EXPIRED, error="ttl passed"),
        ),
    )

    assert cli.finish() == 0
    assert sent.request_id == REQUEST_ID
    out = cli.out.getvalue()
    header, table = out.split("\n\n")
    fields = dict(line.split(": ", 1) for line in header.splitlines())
    assert {label: value.strip() for label, value in fields.items()} == {
        "ID": REQUEST_ID,
        "SERVICE": "checkout",
        "STATE": "RUNNING",
        "SPEC": "cpu 30s @ 11 Hz",
        "CREATED": "2024-05-01 12:00:00Z",
        "COUNTS": "4 targets: 1 running, 1 succeeded, 1 failed, 1 expired",
    }
    rows = table.splitlines()
    assert rows[0].split() == ["HOST", "AGENT", "COMMAND", "STATE", "ERROR", "RESULT"]
    assert [row.split()[0] for row in rows[1:]] == ["c-failed", "d-expired", "a-ok", "b-run"]
    assert "process 101 exited" in rows[1]  # multi-line errors stay on their row
    assert rows[3].endswith("/p/a.json (12 samples)")
    # Columns line up: every row's STATE cell starts where the header's does.
    state_col = rows[0].index("STATE")
    assert rows[1][state_col:].startswith("FAILED")
    assert rows[4][state_col:].startswith("RUNNING")


def test_get_accepts_output_after_the_subcommand() -> None:
    cli = Cli(["get", REQUEST_ID, "-o", "json"])
    cli.answer(
        "GetProfileRequest",
        get_response(
            ppb.REQUEST_STATE_SUCCEEDED,
            ppb.TargetCounts(total=1, succeeded=1),
            target("web-1", cpb.COMMAND_STATE_SUCCEEDED),
        ),
    )

    assert cli.finish() == 0
    body = json.loads(cli.out.getvalue())
    assert body["request"]["request_id"] == REQUEST_ID
    assert body["request"]["targets"][0]["command_state"] == "COMMAND_STATE_SUCCEEDED"


def test_get_not_found_prints_one_error_line_and_exits_2() -> None:
    cli = Cli(["get", "nope"])
    cli.fail("GetProfileRequest", grpc.StatusCode.NOT_FOUND, "no request nope")

    assert cli.finish() == 2
    assert cli.err.getvalue() == "error: NOT_FOUND: no request nope\n"
    assert cli.out.getvalue() == ""


# --- errors -----------------------------------------------------------------------------------


def test_submit_invalid_argument_is_one_line_on_stderr() -> None:
    cli = Cli(["submit", "--service", "checkout", "--duration", "9999"])
    cli.fail(
        "SubmitProfileRequest",
        grpc.StatusCode.INVALID_ARGUMENT,
        "duration_seconds: must be 1..3600\n(got 9999)",
    )

    assert cli.finish() == 2
    assert cli.err.getvalue().splitlines() == [
        "error: INVALID_ARGUMENT: duration_seconds: must be 1..3600 (got 9999)"
    ]
    assert cli.out.getvalue() == ""


def test_unavailable_hints_at_the_server_address() -> None:
    cli = Cli(["--server", "pulse.example:7000", "agents"])
    cli.fail("ListAgents", grpc.StatusCode.UNAVAILABLE, "connection refused")

    assert cli.finish() == 2
    lines = cli.err.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: UNAVAILABLE: connection refused")
    assert "pulse.example:7000" in lines[0]


def test_an_error_while_waiting_exits_2() -> None:
    cli = Cli(["submit", "--service", "checkout", "--duration", "5", "--wait", *FAST_POLL])
    cli.answer("SubmitProfileRequest", submitted("web-1"))
    cli.stream("WatchProfileRequest", [], grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")

    assert cli.finish() == 2
    assert cli.err.getvalue().splitlines()[-1].startswith("error: DEADLINE_EXCEEDED: ")


@pytest.mark.parametrize(
    "argv",
    [
        ["submit", "--service", "checkout"],  # --duration is required
        ["submit", "--service", "checkout", "--duration", "0"],
        ["submit", "--service", "checkout", "--duration", "5", "--arg", "novalue"],
        ["submit", "--service", "checkout", "--duration", "5", "--mode", "wall"],
        ["list", "--state", "done"],
        ["get"],
        ["frobnicate"],
    ],
)
def test_bad_usage_exits_2_without_calling_the_server(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(argv, stub=None) == 2
    assert "usage: pulsectl" in capsys.readouterr().err


def test_server_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PULSE_SERVER", "pulse.internal:443")
    assert build_parser().parse_args(["agents"]).server == "pulse.internal:443"
    monkeypatch.delenv("PULSE_SERVER")
    assert build_parser().parse_args(["agents"]).server == "127.0.0.1:50051"


# --- list -------------------------------------------------------------------------------------


def listed(request_id: str, counts: ppb.TargetCounts) -> ppb.ProfileRequest:
    r = profile_request(ppb.REQUEST_STATE_RUNNING, counts)
    r.request_id = request_id
    return r


def test_list_json_is_valid_json_with_the_requests() -> None:
    cli = Cli(["list", "--service", "checkout", "--state", "partially-succeeded", "-o", "json"])
    sent = cli.answer(
        "ListProfileRequests",
        ppb.ListProfileRequestsResponse(
            requests=[
                listed("r1", ppb.TargetCounts(total=1, succeeded=1)),
                listed("r2", ppb.TargetCounts(total=2, running=2)),
            ],
            next_page_token="tok",
        ),
    )

    assert cli.finish() == 0
    assert sent.service_name == "checkout"
    assert sent.state == ppb.REQUEST_STATE_PARTIALLY_SUCCEEDED
    body = json.loads(cli.out.getvalue())
    assert [r["request_id"] for r in body["requests"]] == ["r1", "r2"]
    assert body["next_page_token"] == "tok"


def test_list_table_shows_done_over_total_and_the_next_token() -> None:
    cli = Cli(["list", "--page-size", "2"])
    sent = cli.answer(
        "ListProfileRequests",
        ppb.ListProfileRequestsResponse(
            requests=[
                listed("r1", ppb.TargetCounts(total=3, succeeded=1, failed=1, running=1)),
            ],
            next_page_token="tok-2",
        ),
    )

    assert cli.finish() == 0
    assert sent.page_size == 2
    assert sent.state == ppb.REQUEST_STATE_UNSPECIFIED
    lines = cli.out.getvalue().splitlines()
    assert lines[0].split() == ["ID", "SERVICE", "STATE", "TARGETS", "CREATED"]
    assert lines[1].split() == ["r1", "checkout", "RUNNING", "2/3", "2024-05-01", "12:00:00Z"]
    assert lines[2] == "next page token: tok-2"


def test_list_all_follows_page_tokens() -> None:
    cli = Cli(["list", "--all"])
    first = cli.answer(
        "ListProfileRequests",
        ppb.ListProfileRequestsResponse(
            requests=[listed("r1", ppb.TargetCounts(total=1))], next_page_token="p2"
        ),
    )
    second = cli.answer(
        "ListProfileRequests",
        ppb.ListProfileRequestsResponse(requests=[listed("r2", ppb.TargetCounts(total=1))]),
    )

    assert cli.finish() == 0
    assert (first.page_token, second.page_token) == ("", "p2")
    lines = cli.out.getvalue().splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["r1", "r2"]
    assert "next page token" not in cli.out.getvalue()


# --- cancel, stop, agents ---------------------------------------------------------------------


def test_cancel_prints_the_resulting_state() -> None:
    cli = Cli(["cancel", REQUEST_ID])
    sent = cli.answer(
        "CancelProfileRequest",
        ppb.CancelProfileRequestResponse(
            request=profile_request(
                ppb.REQUEST_STATE_CANCELLED, ppb.TargetCounts(total=2, cancelled=2)
            )
        ),
    )

    assert cli.finish() == 0
    assert sent.request_id == REQUEST_ID
    assert cli.out.getvalue() == f"{REQUEST_ID}  CANCELLED  (2 targets: 2 cancelled)\n"


def test_cancel_of_running_targets_says_they_were_told_to_stop() -> None:
    cli = Cli(["cancel", REQUEST_ID])
    cli.answer(
        "CancelProfileRequest",
        ppb.CancelProfileRequestResponse(
            request=profile_request(ppb.REQUEST_STATE_RUNNING, ppb.TargetCounts(total=1, running=1))
        ),
    )

    assert cli.finish() == 0
    assert "RUNNING" in cli.out.getvalue()
    assert "told to stop" in cli.out.getvalue()


def test_stop_sends_service_and_hosts_and_prints_counts() -> None:
    cli = Cli(["stop", "--service", "checkout", "--host", "web-1", "--host", "web-2"])
    sent = cli.answer(
        "StopProfiling", ppb.StopProfilingResponse(cancelled_commands=3, stopping_commands=1)
    )

    assert cli.finish() == 0
    assert sent == ppb.StopProfilingRequest(service_name="checkout", hostnames=["web-1", "web-2"])
    assert cli.out.getvalue() == (
        "cancelled 3 queued command(s); told 1 running command(s) to stop\n"
    )


def test_agents_table_shows_online_and_offline() -> None:
    cli = Cli(["agents", "--service", "checkout", "--online"])
    sent = cli.answer(
        "ListAgents",
        ppb.ListAgentsResponse(
            agents=[
                ppb.Agent(
                    agent_id="a1",
                    hostname="web-1",
                    service_name="checkout",
                    online=True,
                    last_heartbeat_time=CREATED,
                    running_command_ids=["c1", "c2"],
                    agent_version="0.1.0",
                ),
                ppb.Agent(agent_id="a2", hostname="web-2", service_name="checkout"),
            ]
        ),
    )

    assert cli.finish() == 0
    assert sent == ppb.ListAgentsRequest(service_name="checkout", online_only=True)
    lines = cli.out.getvalue().splitlines()
    assert lines[0].split() == [
        "AGENT", "HOST", "SERVICE", "STATE", "LAST", "HEARTBEAT", "RUNNING", "VERSION",
    ]  # fmt: skip
    assert lines[1].split() == [
        "a1", "web-1", "checkout", "online", "2024-05-01", "12:00:00Z", "c1", "+1", "0.1.0",
    ]  # fmt: skip
    assert lines[2].split() == ["a2", "web-2", "checkout", "offline", "-", "-", "-"]


# --- render -----------------------------------------------------------------------------------


def test_table_pads_columns_to_the_widest_cell() -> None:
    text = render.table(("A", "LONG HEADER"), [("wide cell", "x"), ("y", "")])
    assert text.splitlines() == [
        "A          LONG HEADER",
        "wide cell  x",
        "y          -",
    ]


def test_unknown_enum_values_are_shown_as_numbers() -> None:
    assert render.request_state(ppb.RequestState.ValueType(42)) == "42"
    assert render.command_state(cpb.COMMAND_STATE_TIMED_OUT) == "TIMED_OUT"
