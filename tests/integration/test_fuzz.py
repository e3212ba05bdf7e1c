"""Bad input on every RPC: Hypothesis-generated messages (oversized strings and lists, unknown
enum values, missing fields, wrong ids) against an in-process server on a real PostgreSQL.

Every answer is OK or a clear client error, never UNKNOWN or INTERNAL; the server stays healthy
and what was stored before is untouched. The examples run in a worker thread on synchronous
channels, so the server keeps running on the test's event loop."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pulse.v1 import agent_service_pb2 as apb
from pulse.v1 import agent_service_pb2_grpc as apb_grpc
from pulse.v1 import common_pb2 as cpb
from pulse.v1 import profiling_service_pb2 as ppb
from pulse.v1 import profiling_service_pb2_grpc as ppb_grpc
from tests.integration.conftest import Harness, eventually, get_request, submit_request

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
}
MAX_MESSAGE = 64 * 1024
FUZZ = settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# --- strategies -----------------------------------------------------------------------------

oversized = st.sampled_from([300, 5_000, 70_000]).map(lambda n: "x" * n)
texts = st.one_of(st.text(max_size=40), oversized, st.just(""), st.just("checkout"))
ids = st.one_of(st.uuids().map(str), st.text(max_size=40), st.just(""), oversized)
ints = st.integers(-(2**31), 2**31 - 1)
enums = st.integers(-3, 40)  # proto3 enums are open: unknown values arrive as numbers
string_lists = st.one_of(
    st.lists(texts, max_size=8), st.integers(0, 20_000).map(lambda n: [f"h{i}" for i in range(n)])
)
string_maps = st.dictionaries(texts, texts, max_size=5)
timestamps = st.one_of(
    st.none(), st.integers(-(10**10), 10**11).map(lambda s: {"seconds": s, "nanos": 0})
)


def submits() -> st.SearchStrategy[ppb.SubmitProfileRequestRequest]:
    return st.builds(
        lambda service, hosts, duration, freq, mode, pids, max_hosts, ttl, args, key, cont: (
            ppb.SubmitProfileRequestRequest(
                service_name=service,
                hostnames=hosts,
                duration_seconds=duration,
                frequency_hz=freq,
                profiling_mode=mode,
                pids=pids,
                max_hosts=max_hosts,
                ttl_seconds=ttl,
                additional_args=args,
                idempotency_key=key,
                continuous=cont,
            )
        ),
        texts,
        string_lists,
        st.one_of(ints, st.integers(0, 4000)),
        ints,
        enums,
        st.lists(ints, max_size=100),
        ints,
        ints,
        string_maps,
        texts,
        st.booleans(),
    )


def completions(known: list[str]) -> st.SearchStrategy[apb.ReportCommandCompletionRequest]:
    return st.builds(
        lambda agent, command, outcome, start, finish, error, location, samples: (
            apb.ReportCommandCompletionRequest(
                agent_id=agent,
                command_id=command,
                outcome=outcome,
                start_time=start,
                finish_time=finish,
                error_message=error,
                result=cpb.ProfileResult(location=location, samples=samples),
            )
        ),
        st.one_of(ids, st.sampled_from(known)),
        st.one_of(ids, st.sampled_from(known)),
        enums,
        timestamps,
        timestamps,
        texts,
        texts,
        st.integers(-(2**63), 2**63 - 1),
    )


def hellos() -> st.SearchStrategy[apb.HeartbeatRequest]:
    hello = st.builds(
        lambda agent, host, service, labels, modes, running, finished: apb.HeartbeatRequest(
            hello=apb.AgentHello(
                agent_id=agent,
                hostname=host,
                service_name=service,
                labels=labels,
                supported_modes=modes,
                running_command_ids=running,
                finished_command_ids=finished,
            )
        ),
        ids,
        texts,
        texts,
        string_maps,
        st.lists(enums, max_size=5),
        st.lists(ids, max_size=5),
        st.lists(ids, max_size=5),
    )
    others = st.sampled_from(
        [apb.HeartbeatRequest(), apb.HeartbeatRequest(heartbeat=apb.AgentHeartbeat())]
    )
    return st.one_of(hello, others)


acks = st.builds(
    lambda command, result, reason: apb.HeartbeatRequest(
        ack=apb.CommandAck(command_id=command, result=result, reject_reason=reason)
    ),
    ids,
    enums,
    texts,
)


# --- the fuzzing ----------------------------------------------------------------------------


class Calls:
    def __init__(self) -> None:
        self.codes: Counter[str] = Counter()
        self.bad: list[tuple[str, str, str]] = []

    def call(self, name: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
            code = grpc.StatusCode.OK
            details = ""
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
        self.codes[code.name] += 1
        if code not in ALLOWED:
            self.bad.append((name, code.name, details[:200]))


def fuzz_everything(address: str, known_ids: list[str]) -> Calls:
    calls = Calls()
    channel = grpc.insecure_channel(
        address,
        options=[
            ("grpc.max_send_message_length", 8 * MAX_MESSAGE),
            ("grpc.max_receive_message_length", 8 * MAX_MESSAGE),
        ],
    )
    ops = ppb_grpc.ProfilingServiceStub(channel)
    agents = apb_grpc.AgentServiceStub(channel)
    rpc_ids = st.one_of(ids, st.sampled_from(known_ids))

    @FUZZ
    @given(submits())
    def submit(message: ppb.SubmitProfileRequestRequest) -> None:
        calls.call("Submit", lambda: ops.SubmitProfileRequest(message, timeout=20))

    @FUZZ
    @given(rpc_ids, rpc_ids)
    def by_id(request_id: str, other: str) -> None:
        calls.call(
            "Get",
            lambda: ops.GetProfileRequest(
                ppb.GetProfileRequestRequest(request_id=request_id), timeout=20
            ),
        )
        calls.call(
            "Cancel",
            lambda: ops.CancelProfileRequest(
                ppb.CancelProfileRequestRequest(request_id=other), timeout=20
            ),
        )

    @FUZZ
    @given(texts, enums, ints, st.one_of(texts, ids), string_lists, st.booleans())
    def lists(
        service: str, state: int, size: int, token: str, hosts: list[str], online: bool
    ) -> None:
        calls.call(
            "List",
            lambda: ops.ListProfileRequests(
                ppb.ListProfileRequestsRequest(
                    service_name=service, state=state, page_size=size, page_token=token
                ),
                timeout=20,
            ),
        )
        calls.call(
            "ListAgents",
            lambda: ops.ListAgents(
                ppb.ListAgentsRequest(service_name=service, online_only=online), timeout=20
            ),
        )
        calls.call(
            "Stop",
            lambda: ops.StopProfiling(
                ppb.StopProfilingRequest(service_name=service + "-fuzz", hostnames=hosts),
                timeout=20,
            ),
        )

    @FUZZ
    @given(completions(known_ids))
    def complete(message: apb.ReportCommandCompletionRequest) -> None:
        calls.call("Complete", lambda: agents.ReportCommandCompletion(message, timeout=20))

    @FUZZ
    @given(hellos(), st.lists(acks, max_size=4))
    def heartbeat(first: apb.HeartbeatRequest, rest: list[apb.HeartbeatRequest]) -> None:
        def stream() -> None:
            for _ in agents.Heartbeat(iter([first, *rest]), timeout=20):
                pass

        calls.call("Heartbeat", stream)

    for test in (submit, by_id, lists, complete, heartbeat):
        test()
    channel.close()
    return calls


async def test_fuzzed_rpcs_get_clear_errors_and_change_nothing_stored(harness: Harness) -> None:
    server = await harness.server(max_message_bytes=MAX_MESSAGE)
    ops = harness.operator(server)
    agent, _ = await harness.agent(server)
    done = await ops.SubmitProfileRequest(submit_request(duration_seconds=1))
    before = await eventually(
        lambda: get_request(ops, done.request_id),
        lambda r: r.state == ppb.REQUEST_STATE_SUCCEEDED,
    )
    waiting = await ops.SubmitProfileRequest(
        submit_request(hostnames=["not-yet"], ttl_seconds=3600)
    )
    waiting_before = await get_request(ops, waiting.request_id)
    known = [
        done.request_id,
        waiting.request_id,
        before.targets[0].command_id,
        waiting.targets[0].command_id,
        agent.agent_id,
        str(uuid.uuid4()),
    ]

    calls = await asyncio.to_thread(fuzz_everything, harness.address(server), known)

    print(dict(calls.codes))
    assert not calls.bad, calls.bad
    assert calls.codes["INVALID_ARGUMENT"] > 0 and calls.codes["OK"] > 0
    health = health_pb2_grpc.HealthStub(harness.channel(server))
    status = await health.Check(health_pb2.HealthCheckRequest())
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    # What was stored before is untouched (the waiting request may only have been cancelled by
    # a fuzzed cancel of its id, which is a legitimate operator call; nothing else).
    assert await get_request(ops, done.request_id) == before
    waiting_after = await get_request(ops, waiting.request_id)
    if waiting_after.state != ppb.REQUEST_STATE_CANCELLED:
        assert waiting_after == waiting_before
    # The real agent is still connected and works.
    again = await ops.SubmitProfileRequest(submit_request(duration_seconds=1))
    await eventually(
        lambda: get_request(ops, again.request_id),
        lambda r: r.state == ppb.REQUEST_STATE_SUCCEEDED,
    )


async def test_messages_over_the_size_limit_are_refused(harness: Harness) -> None:
    server = await harness.server(max_message_bytes=MAX_MESSAGE)
    channel = grpc.aio.insecure_channel(
        harness.address(server), options=[("grpc.max_send_message_length", 8 * MAX_MESSAGE)]
    )
    huge = submit_request(additional_args={"blob": "x" * (2 * MAX_MESSAGE)})
    try:
        await ppb_grpc.ProfilingServiceStub(channel).SubmitProfileRequest(huge)
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
    else:
        raise AssertionError("an oversized message was accepted")
    finally:
        await channel.close()
    listed = await harness.operator(server).ListProfileRequests(ppb.ListProfileRequestsRequest())
    assert list(listed.requests) == []  # nothing was stored


async def test_cancelling_a_finished_request_keeps_its_outcome(harness: Harness) -> None:
    server = await harness.server()
    ops = harness.operator(server)
    await harness.agent(server)
    done = await ops.SubmitProfileRequest(submit_request(duration_seconds=1))
    before = await eventually(
        lambda: get_request(ops, done.request_id),
        lambda r: r.state == ppb.REQUEST_STATE_SUCCEEDED,
    )
    for _ in range(2):
        response = await ops.CancelProfileRequest(
            ppb.CancelProfileRequestRequest(request_id=done.request_id)
        )
        assert response.request == before
    assert not (await get_request(ops, done.request_id)).HasField("cancel_time")
