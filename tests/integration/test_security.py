"""Security on real servers: mTLS with certificates made at test time, agent identity, operator
tokens and roles, limits, and the audit trail. Every refusal is checked twice: the status code,
and that nothing changed in the store."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from agent.client import AgentClient, AgentConfig
from agent.executor import Executor
from agent.state import AgentState
from pulse.v1 import agent_service_pb2 as apb
from pulse.v1 import agent_service_pb2_grpc as apb_grpc
from pulse.v1 import common_pb2 as cpb
from pulse.v1 import profiling_service_pb2 as ppb
from pulse.v1 import profiling_service_pb2_grpc as ppb_grpc
from server.app import PulseServer
from server.auth import Role, token_entry_toml
from server.tls import ClientTls, ServerTls, certificate_agent_id
from tests.certs import CertificateAuthority, Pem
from tests.integration.conftest import (
    CountingProfiler,
    Harness,
    RawAgent,
    eventually,
    get_request,
    submit_request,
)

Code = grpc.StatusCode


async def _count(server: PulseServer, table: str) -> int:
    async with server.engine.connect() as conn:
        return int(await conn.scalar(text(f"SELECT count(*) FROM {table}")) or 0)


async def _snapshot(server: PulseServer) -> dict[str, int]:
    tables = ("agents", "profile_requests", "commands", "audit_events")
    return {t: await _count(server, t) for t in tables}


async def _code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    return error.value.code()


# --- mTLS ---------------------------------------------------------------------------------------


class Pki:
    """A CA, the server's certificate files, and client credentials on demand."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca = CertificateAuthority()
        self.ca_path = self.ca.write(directory)
        self.server_cert, self.server_key = self.ca.server_cert().write(directory, "server")

    def tls(self) -> ServerTls:
        return ServerTls(self.server_cert, self.server_key, client_ca=self.ca_path)

    def credentials(
        self, client: Pem | None, trust: bytes | None = None
    ) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=trust or self.ca.pem,
            private_key=client.key if client else None,
            certificate_chain=client.cert if client else None,
        )


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


class SecureHarness:
    def __init__(self, harness: Harness, pki: Pki) -> None:
        self.harness = harness
        self.pki = pki

    def channel(
        self, server: PulseServer, credentials: grpc.ChannelCredentials
    ) -> grpc.aio.Channel:
        channel = grpc.aio.secure_channel(f"127.0.0.1:{server.port}", credentials)
        self.harness.channels.append(channel)
        return channel

    def operator(self, server: PulseServer, client: Pem | None) -> ppb_grpc.ProfilingServiceStub:
        return ppb_grpc.ProfilingServiceStub(self.channel(server, self.pki.credentials(client)))

    def agent_stub(self, server: PulseServer, client: Pem | None) -> apb_grpc.AgentServiceStub:
        return apb_grpc.AgentServiceStub(self.channel(server, self.pki.credentials(client)))

    def agent_files(self, agent_id: str, ca: CertificateAuthority | None = None) -> ClientTls:
        """The agent's files (CA bundle, certificate, key), as pulse-agent takes them."""
        directory = self.pki.directory / agent_id
        cert, key = (ca or self.pki.ca).agent_cert(agent_id).write(directory, "agent")
        return ClientTls(self.pki.ca_path, cert, key)

    async def agent(
        self, server: PulseServer, agent_id: str, hostname: str
    ) -> tuple[AgentClient, CountingProfiler]:
        """A real agent whose id comes from its certificate."""
        h = self.harness
        profiler = CountingProfiler()
        state = AgentState(h.tmp_path / f"agent-{agent_id}")
        tls = self.agent_files(agent_id)
        assert tls.cert is not None
        config = AgentConfig(
            server=f"127.0.0.1:{server.port}",
            service_name="checkout",
            hostname=hostname,
            max_backoff=1.0,
            backoff_multiplier=0.1,
            tls=tls,
            agent_id=certificate_agent_id(tls.cert.read_bytes()) or "",
        )

        def executor(report: Any) -> Executor:
            return Executor(profiler, state, state.directory / "profiles", report)

        client = AgentClient(config, executor, state, profiler.supported_modes)
        h.agents.append((client, asyncio.create_task(client.run())))
        await asyncio.wait_for(client.connected.wait(), 10)
        return client, profiler


@pytest.fixture
def secure(harness: Harness, pki: Pki) -> SecureHarness:
    return SecureHarness(harness, pki)


async def test_agents_with_certificates_profile_end_to_end(
    harness: Harness, secure: SecureHarness
) -> None:
    server = await harness.server(tls=secure.pki.tls())
    _, profiler = await secure.agent(server, "agent-a", "web-1")
    ops = secure.operator(server, secure.pki.ca.issue("ops-console"))

    submitted = await ops.SubmitProfileRequest(submit_request(duration_seconds=1))

    assert [t.agent_id for t in submitted.targets] == ["agent-a"]
    done = await eventually(
        lambda: get_request(ops, submitted.request_id),
        lambda r: r.state == ppb.REQUEST_STATE_SUCCEEDED,
    )
    assert profiler.runs[done.targets[0].command_id] == 1
    history = await ops.GetRequestHistory(
        ppb.GetRequestHistoryRequest(request_id=submitted.request_id)
    )
    steps = [(e.actor, e.action, e.to_state) for e in history.events]
    assert steps[:2] == [("anonymous", "submitted", ""), ("anonymous", "created", "pending")]
    assert ("system", "state_changed", "sent") in steps
    assert ("agent:agent-a", "state_changed", "running") in steps
    assert steps[-1] == ("agent:agent-a", "state_changed", "succeeded")


@pytest.mark.parametrize("client", ["none", "foreign-ca", "expired"])
async def test_clients_without_a_valid_certificate_are_refused(
    harness: Harness, secure: SecureHarness, client: str
) -> None:
    server = await harness.server(tls=secure.pki.tls())
    before = await _snapshot(server)
    pem: Pem | None = None
    if client == "foreign-ca":
        pem = CertificateAuthority("Someone else's CA").agent_cert("agent-a")
    elif client == "expired":
        past = datetime.now(UTC) - timedelta(days=10)
        pem = secure.pki.ca.issue(
            "agent-a",
            uris=("spiffe://pulse.test/agent/agent-a",),
            valid_from=past,
            valid_until=past + timedelta(days=1),
        )
    credentials = secure.pki.credentials(pem)
    channel = secure.channel(server, credentials)
    raw = RawAgent(apb_grpc.AgentServiceStub(channel), "agent-a")
    assert await _code_of(raw.connect()) == Code.UNAVAILABLE
    ops = ppb_grpc.ProfilingServiceStub(channel)
    call = ops.SubmitProfileRequest(submit_request(hostnames=["web-1"]), timeout=10)
    assert await _code_of(call) == Code.UNAVAILABLE
    assert await _snapshot(server) == before


async def test_plaintext_client_cannot_talk_to_a_tls_server(
    harness: Harness, secure: SecureHarness
) -> None:
    server = await harness.server(tls=secure.pki.tls())
    ops = harness.operator(server)  # insecure channel
    call = ops.SubmitProfileRequest(submit_request(hostnames=["web-1"]), timeout=10)
    assert await _code_of(call) == Code.UNAVAILABLE
    assert await _count(server, "profile_requests") == 0


async def test_an_agent_cannot_pose_as_another(harness: Harness, secure: SecureHarness) -> None:
    server = await harness.server(tls=secure.pki.tls())
    stub = secure.agent_stub(server, secure.pki.ca.agent_cert("agent-a"))
    impostor = RawAgent(stub, "agent-b")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await impostor.connect()
    assert error.value.code() == Code.PERMISSION_DENIED
    assert "agent-a" in (error.value.details() or "")
    assert await _count(server, "agents") == 0
    # The same certificate, with its own id, is welcome.
    honest = RawAgent(stub, "agent-a")
    await honest.connect()
    honest.close()


async def test_a_certificate_naming_no_agent_cannot_hold_a_stream(
    harness: Harness, secure: SecureHarness
) -> None:
    server = await harness.server(tls=secure.pki.tls())
    pem = secure.pki.ca.issue("ops", uris=("spiffe://pulse.test/operator/ops",))
    raw = RawAgent(secure.agent_stub(server, pem), "ops")
    assert await _code_of(raw.connect()) == Code.PERMISSION_DENIED
    assert await _count(server, "agents") == 0


async def test_an_agent_cannot_complete_a_foreign_command(
    harness: Harness, secure: SecureHarness
) -> None:
    server = await harness.server(tls=secure.pki.tls())
    ops = secure.operator(server, secure.pki.ca.issue("ops"))
    owner = RawAgent(secure.agent_stub(server, secure.pki.ca.agent_cert("agent-a")), "agent-a")
    await owner.connect(hostname="web-1")
    other_stub = secure.agent_stub(server, secure.pki.ca.agent_cert("agent-b"))
    other = RawAgent(other_stub, "agent-b")
    await other.connect(hostname="web-2")
    submitted = await ops.SubmitProfileRequest(submit_request(hostnames=["web-1"]))
    command = (await owner.receive_alive()).command
    await owner.ack(command.command_id)
    await eventually(
        lambda: get_request(ops, submitted.request_id),
        lambda r: r.state == ppb.REQUEST_STATE_RUNNING,
    )
    before = await _snapshot(server)

    # Claiming to be the owner: the certificate says otherwise.
    forged = apb.ReportCommandCompletionRequest(
        agent_id="agent-a", command_id=command.command_id, outcome=apb.COMMAND_OUTCOME_FAILED
    )
    assert await _code_of(other_stub.ReportCommandCompletion(forged)) == Code.PERMISSION_DENIED
    # Honest about itself, but the command is not its own.
    assert await _code_of(other.complete(command.command_id)) == Code.PERMISSION_DENIED

    assert await _snapshot(server) == before
    request = await get_request(ops, submitted.request_id)
    assert request.targets[0].command_state == cpb.COMMAND_STATE_RUNNING
    assert request.state == ppb.REQUEST_STATE_RUNNING
    await owner.complete(command.command_id)
    owner.close()
    other.close()


def _bump_mtime(*paths: Path) -> None:
    """Make the change visible even on file systems with coarse modification times."""
    for path in paths:
        stamp = path.stat().st_mtime + 5
        os.utime(path, (stamp, stamp))


async def test_certificates_rotate_without_a_restart(
    harness: Harness, secure: SecureHarness
) -> None:
    pki = secure.pki
    server = await harness.server(tls=pki.tls())
    old_client = pki.ca.issue("ops")
    await secure.operator(server, old_client).ListAgents(ppb.ListAgentsRequest())

    # Everything moves to a new CA: server certificate and the CA that signs clients.
    new_ca = CertificateAuthority("Rotated CA")
    rotated = new_ca.server_cert()
    new_client = new_ca.issue("ops")

    # Halfway (new key, old certificate): inconsistent, so the old files stay in use.
    pki.server_key.write_bytes(rotated.key)
    _bump_mtime(pki.server_key)
    await secure.operator(server, old_client).ListAgents(ppb.ListAgentsRequest(), timeout=10)
    assert server.certificates is not None and server.certificates.reloads == 0

    pki.server_cert.write_bytes(rotated.cert)
    pki.ca_path.write_bytes(new_ca.pem)
    _bump_mtime(pki.server_cert, pki.ca_path)
    fresh = ppb_grpc.ProfilingServiceStub(
        secure.channel(server, pki.credentials(new_client, trust=new_ca.pem))
    )
    await fresh.ListAgents(ppb.ListAgentsRequest(), timeout=10)
    assert server.certificates.reloads == 1
    stale_trust = secure.channel(server, pki.credentials(new_client))
    stale_client = secure.channel(server, pki.credentials(old_client, trust=new_ca.pem))
    for channel in (stale_trust, stale_client):
        stub = ppb_grpc.ProfilingServiceStub(channel)
        assert await _code_of(stub.ListAgents(ppb.ListAgentsRequest(), timeout=10)) == (
            Code.UNAVAILABLE
        )


async def test_an_agent_picks_up_its_renewed_certificate_when_it_reconnects(
    harness: Harness, secure: SecureHarness
) -> None:
    pki = secure.pki
    server = await harness.server(tls=pki.tls())
    port = server.port
    agent, _ = await secure.agent(server, "agent-a", "web-1")
    assert agent.sessions == 1

    # The fleet moves to a new client CA: the agent's files are renewed, then the server restarts
    # trusting only the new CA. Only a renewed certificate can get the agent back in.
    new_ca = CertificateAuthority("New client CA")
    renewed = secure.agent_files("agent-a", ca=new_ca)
    assert renewed.cert is not None and renewed.key is not None
    _bump_mtime(renewed.cert, renewed.key)
    await server.stop()
    harness.servers.remove(server)
    client_ca = new_ca.write(pki.directory, "client-ca")
    tls = ServerTls(pki.server_cert, pki.server_key, client_ca=client_ca)
    restarted = await harness.server(tls=tls, listen=f"127.0.0.1:{port}")

    await eventually(lambda: asyncio.sleep(0, agent.sessions), lambda n: n == 2, timeout=30)
    ops = secure.operator(restarted, new_ca.issue("ops"))
    listed = await ops.ListAgents(ppb.ListAgentsRequest(online_only=True))
    assert [a.agent_id for a in listed.agents] == ["agent-a"]


# --- operator tokens ----------------------------------------------------------------------------


class Tokens:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: list[str] = []
        self.path.write_text("")

    def add(
        self,
        name: str,
        role: Role,
        services: tuple[str, ...] = (),
        expires: datetime | None = None,
    ) -> str:
        token = f"pulse_test_{name}_{uuid.uuid4().hex}"
        self.entries.append(token_entry_toml(name, token, role, services, expires))
        self.path.write_text("\n\n".join(self.entries) + "\n")
        return token


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def test_operator_rpcs_need_a_valid_token_with_the_right_role(
    harness: Harness, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    tokens = Tokens(tmp_path / "tokens.toml")
    alice = tokens.add("alice", Role.OPERATOR)
    viewer = tokens.add("vera", Role.VIEWER)
    expired = tokens.add("old", Role.OPERATOR, expires=datetime.now(UTC) - timedelta(minutes=1))
    scoped = tokens.add("sam", Role.OPERATOR, services=("search",))
    server = await harness.server(tokens_file=tokens.path)
    ops = harness.operator(server)
    request = submit_request(hostnames=["web-1"])

    refusals: list[tuple[Any, grpc.StatusCode]] = [
        (ops.SubmitProfileRequest(request), Code.UNAUTHENTICATED),
        (ops.SubmitProfileRequest(request, metadata=_bearer("pulse_nope")), Code.UNAUTHENTICATED),
        (ops.SubmitProfileRequest(request, metadata=_bearer(expired)), Code.UNAUTHENTICATED),
        (
            ops.SubmitProfileRequest(request, metadata=(("authorization", alice),)),
            Code.UNAUTHENTICATED,
        ),
        (ops.SubmitProfileRequest(request, metadata=_bearer(viewer)), Code.PERMISSION_DENIED),
        (ops.SubmitProfileRequest(request, metadata=_bearer(scoped)), Code.PERMISSION_DENIED),
        (ops.ListProfileRequests(ppb.ListProfileRequestsRequest()), Code.UNAUTHENTICATED),
        (ops.ListAgents(ppb.ListAgentsRequest(), metadata=_bearer(scoped)), Code.PERMISSION_DENIED),
        (
            ops.StopProfiling(
                ppb.StopProfilingRequest(service_name="checkout"), metadata=_bearer(viewer)
            ),
            Code.PERMISSION_DENIED,
        ),
    ]
    for call, code in refusals:
        assert await _code_of(call) == code
    assert await _snapshot(server) == {
        "agents": 0,
        "profile_requests": 0,
        "commands": 0,
        "audit_events": 0,
    }

    submitted = await ops.SubmitProfileRequest(request, metadata=_bearer(alice))
    # Viewers read; operators limited to other services see nothing of it.
    get = ppb.GetProfileRequestRequest(request_id=submitted.request_id)
    assert (await ops.GetProfileRequest(get, metadata=_bearer(viewer))).request.service_name
    assert await _code_of(ops.GetProfileRequest(get, metadata=_bearer(scoped))) == (
        Code.PERMISSION_DENIED
    )
    cancel = ppb.CancelProfileRequestRequest(request_id=submitted.request_id)
    for token in (viewer, scoped):
        assert await _code_of(ops.CancelProfileRequest(cancel, metadata=_bearer(token))) == (
            Code.PERMISSION_DENIED
        )
    await ops.CancelProfileRequest(cancel, metadata=_bearer(alice))
    history = await ops.GetRequestHistory(
        ppb.GetRequestHistoryRequest(request_id=submitted.request_id), metadata=_bearer(viewer)
    )
    actors = {(e.action, e.to_state): e.actor for e in history.events}
    assert actors[("submitted", "")] == "operator:alice"
    assert actors[("cancelled", "")] == "operator:alice"
    assert actors[("state_changed", "cancelled")] == "operator:alice"
    assert await _count(server, "profile_requests") == 1
    for token in (alice, viewer, expired, scoped):
        assert token not in caplog.text
    assert "operator:alice" in caplog.text


async def test_a_token_added_to_the_file_works_without_a_restart(
    harness: Harness, tmp_path: Path
) -> None:
    tokens = Tokens(tmp_path / "tokens.toml")
    tokens.add("alice", Role.VIEWER)
    server = await harness.server(tokens_file=tokens.path)
    ops = harness.operator(server)
    bob = tokens.add("bob", Role.VIEWER)
    future = datetime.now().timestamp() + 5
    os.utime(tokens.path, (future, future))
    await eventually(
        lambda: _listed(ops, bob),
        lambda ok: ok,
    )


async def _listed(ops: ppb_grpc.ProfilingServiceStub, token: str) -> bool:
    try:
        await ops.ListAgents(ppb.ListAgentsRequest(), metadata=_bearer(token))
    except grpc.aio.AioRpcError:
        return False
    return True


# --- limits -------------------------------------------------------------------------------------


async def test_submit_flood_is_rate_limited_per_principal(harness: Harness, tmp_path: Path) -> None:
    tokens = Tokens(tmp_path / "tokens.toml")
    alice = tokens.add("alice", Role.OPERATOR)
    bob = tokens.add("bob", Role.OPERATOR)
    server = await harness.server(tokens_file=tokens.path, submit_rate=0.01, submit_burst=3)
    ops = harness.operator(server)
    request = submit_request(hostnames=["web-1"])
    for _ in range(3):
        await ops.SubmitProfileRequest(request, metadata=_bearer(alice))

    call = ops.SubmitProfileRequest(request, metadata=_bearer(alice))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    assert error.value.code() == Code.RESOURCE_EXHAUSTED
    assert "retry in" in (error.value.details() or "")
    trailing = dict(error.value.trailing_metadata() or ())
    assert int(trailing["retry-after-ms"]) > 1000
    assert await _count(server, "profile_requests") == 3
    # Another principal has its own bucket.
    await ops.SubmitProfileRequest(request, metadata=_bearer(bob))
    assert await _count(server, "profile_requests") == 4


async def test_oversized_message_is_refused(harness: Harness) -> None:
    server = await harness.server(max_message_bytes=16 * 1024)
    ops = harness.operator(server)
    huge = submit_request(hostnames=["web-1"], additional_args={"blob": "x" * 32 * 1024})
    assert await _code_of(ops.SubmitProfileRequest(huge)) == Code.RESOURCE_EXHAUSTED
    assert await _count(server, "profile_requests") == 0
    await ops.SubmitProfileRequest(submit_request(hostnames=["web-1"]))  # normal size still fine


async def test_too_many_targets_per_request_is_refused(harness: Harness) -> None:
    server = await harness.server(max_targets_per_request=2)
    ops = harness.operator(server)
    for i in range(3):
        await harness.agent(server, hostname=f"h{i}")
    many = submit_request(hostnames=["a", "b", "c"])
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await ops.SubmitProfileRequest(many)
    assert error.value.code() == Code.INVALID_ARGUMENT
    assert (error.value.details() or "").startswith("hostnames:")
    service_wide = submit_request()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await ops.SubmitProfileRequest(service_wide)
    assert (error.value.details() or "").startswith("max_hosts:")
    assert await _count(server, "profile_requests") == 0
    capped = await ops.SubmitProfileRequest(submit_request(max_hosts=2))
    assert len(capped.targets) == 2


async def test_requests_over_the_service_budget_wait_their_turn(harness: Harness) -> None:
    server = await harness.server(max_concurrent_per_service=1)
    ops = harness.operator(server)
    for i in range(3):
        await harness.agent(server, hostname=f"h{i}", profiler=CountingProfiler(time_scale=0.2))
    submitted = await ops.SubmitProfileRequest(submit_request(duration_seconds=1))
    assert len(submitted.targets) == 3
    await eventually(
        lambda: get_request(ops, submitted.request_id),
        lambda r: r.state == ppb.REQUEST_STATE_SUCCEEDED,
        timeout=30,
    )
    # Replay the audit trail: never more than one command of the service sent or running.
    history = await ops.GetRequestHistory(
        ppb.GetRequestHistoryRequest(request_id=submitted.request_id)
    )
    busy: set[str] = set()
    peak = 0
    for event in history.events:
        if event.action != "state_changed":
            continue
        if event.to_state in ("sent", "running"):
            busy.add(event.command_id)
        else:
            busy.discard(event.command_id)
        peak = max(peak, len(busy))
    assert peak == 1


async def test_clients_pinging_too_often_are_cut_off(harness: Harness) -> None:
    """gRPC's own policy (min ping interval 5 s, 2 strikes): a client pinging every 100 ms on an
    idle stream gets GOAWAY (too_many_pings) and its stream fails."""
    # Long heartbeat interval: the server must not close the silent stream for another reason.
    server = await harness.server(heartbeat_interval=timedelta(seconds=60))
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{server.port}",
        options=[
            ("grpc.keepalive_time_ms", 100),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ],
    )
    harness.channels.append(channel)
    raw = RawAgent(apb_grpc.AgentServiceStub(channel))
    await raw.connect()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await raw.receive(timeout=20)
    assert error.value.code() == Code.UNAVAILABLE
    assert "too many pings" in (error.value.details() or "").lower()
    raw.close()


# --- audit trail --------------------------------------------------------------------------------


async def test_audit_trail_is_append_only(harness: Harness) -> None:
    server = await harness.server()
    ops = harness.operator(server)
    await ops.SubmitProfileRequest(submit_request(hostnames=["web-1"]))
    before = await _count(server, "audit_events")
    assert before == 2
    for statement in (
        "UPDATE audit_events SET actor = 'nobody'",
        "DELETE FROM audit_events",
        "TRUNCATE audit_events",
    ):
        with pytest.raises(DBAPIError, match="append-only"):
            async with server.engine.begin() as conn:
                await conn.execute(text(statement))
    assert await _count(server, "audit_events") == before


async def test_sweeps_are_recorded_as_system(harness: Harness) -> None:
    server = await harness.server()
    ops = harness.operator(server)
    submitted = await ops.SubmitProfileRequest(submit_request(hostnames=["nobody"], ttl_seconds=1))
    await eventually(
        lambda: get_request(ops, submitted.request_id),
        lambda r: r.state == ppb.REQUEST_STATE_FAILED,
    )
    history = await ops.GetRequestHistory(
        ppb.GetRequestHistoryRequest(request_id=submitted.request_id)
    )
    last = history.events[-1]
    assert (last.actor, last.from_state, last.to_state) == ("system", "pending", "expired")
    assert "ttl_seconds" in last.detail
    unknown = ppb.GetRequestHistoryRequest(request_id=str(uuid.uuid4()))
    assert await _code_of(ops.GetRequestHistory(unknown)) == Code.NOT_FOUND
    assert await _code_of(ops.GetRequestHistory(ppb.GetRequestHistoryRequest())) == (
        Code.INVALID_ARGUMENT
    )


# --- one stream per agent identity --------------------------------------------------------------


async def test_a_stale_session_notification_does_not_close_the_current_session(
    harness: Harness,
) -> None:
    """`s:<agent>:<older session>` delivered late (after the agent reconnected here) must not
    end the newer session: only the session the database names as owner survives."""
    server = await harness.server()
    ops = harness.operator(server)
    agent = RawAgent(harness.agent_stub(server), "twin")
    await agent.connect()
    server.hub.on_notify(f"s:twin:{uuid.uuid4()}")
    submitted = await ops.SubmitProfileRequest(submit_request(duration_seconds=1))
    pushed = await agent.receive_alive()
    assert pushed.command.command_id == submitted.targets[0].command_id
    agent.close()
