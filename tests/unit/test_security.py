"""Unit tests of the security pieces: tokens, roles, rate limits, certificate identities, the
token helper of pulse-server and the pulsectl side (TLS flags, token, history)."""

from __future__ import annotations

import argparse
import io
import logging
from contextlib import redirect_stderr, redirect_stdout
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from ctl import commands
from ctl.main import build_parser, read_token
from pulse.v1 import profiling_service_pb2 as ppb
from server import main as server_main
from server.app import ServerConfig, is_loopback, warn_about_security
from server.auth import (
    ANONYMOUS,
    Authorizer,
    Role,
    TokenFile,
    TokenFileError,
    bearer_token,
    check_service,
    hash_token,
    parse_tokens,
    token_entry_toml,
)
from server.domain import PermissionDenied, ResourceExhausted, Unauthenticated
from server.ratelimit import RateLimiter
from server.tls import ServerTls, agent_id_from_uris, certificate_agent_id, peer_agent_id
from tests.certs import CertificateAuthority

NOW = datetime(2026, 1, 1, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _entry(
    name: str,
    token: str,
    role: Role,
    services: tuple[str, ...] = (),
    expires: datetime | None = None,
) -> str:
    return token_entry_toml(name, token, role, services, expires)


# --- tokens file --------------------------------------------------------------------------------


def test_tokens_file_holds_hashes_roles_services_and_expiry() -> None:
    expires = NOW + timedelta(days=1)
    text = "\n".join(
        [
            _entry("alice", "t-alice", Role.OPERATOR, services=("a", "b"), expires=expires),
            _entry("vera", "t-vera", Role.VIEWER),
        ]
    )
    entries = parse_tokens(text)
    alice = entries[hash_token("t-alice")]
    assert (alice.name, alice.role, alice.services) == ("alice", Role.OPERATOR, {"a", "b"})
    assert alice.expires_at == expires
    assert "t-alice" not in text  # only the hash is written
    assert entries[hash_token("t-vera")].expires_at is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[tokens]]\nsha256 = "abc"\nrole = "viewer"', "sha256"),
        (f'[[tokens]]\nsha256 = "{"0" * 64}"\nrole = "admin"', "role"),
        (f'[[tokens]]\nsha256 = "{"0" * 64}"\nrole = "viewer"\nservices = "a"', "services"),
        (f'[[tokens]]\nsha256 = "{"0" * 64}"\nrole = "viewer"\nexpires = "soon"', "expires"),
        (
            f'[[tokens]]\nsha256 = "{"0" * 64}"\nrole = "viewer"\n'
            f'[[tokens]]\nsha256 = "{"0" * 64}"\nrole = "operator"',
            "twice",
        ),
        ("[[tokens]\n", "tokens file"),
    ],
)
def test_malformed_tokens_files_are_refused(text: str, message: str) -> None:
    with pytest.raises(TokenFileError, match=message):
        parse_tokens(text)


def test_naive_expiry_is_utc() -> None:
    text = f'[[tokens]]\nsha256 = "{"1" * 64}"\nrole = "viewer"\nexpires = 2026-01-01T00:00:00'
    assert parse_tokens(text)["1" * 64].expires_at == NOW


def test_tokens_file_is_reloaded_when_it_changes_and_kept_when_it_breaks(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(_entry("alice", "t1", Role.VIEWER))
    clock = Clock()
    tokens = TokenFile(path, recheck_seconds=1.0, clock=clock)
    assert set(tokens.entries()) == {hash_token("t1")}
    path.write_text(_entry("alice", "t1", Role.VIEWER) + "\n" + _entry("bob", "t2", Role.VIEWER))
    _touch_later(path, 1)
    assert set(tokens.entries()) == {hash_token("t1")}  # not re-checked within a second
    clock.now += 1.5
    assert set(tokens.entries()) == {hash_token("t1"), hash_token("t2")}
    path.write_text("not [ toml")
    _touch_later(path, 2)
    clock.now += 1.5
    assert set(tokens.entries()) == {hash_token("t1"), hash_token("t2")}


def _touch_later(path: Path, seconds: int) -> None:
    import os

    stamp = path.stat().st_mtime + seconds
    os.utime(path, (stamp, stamp))


# --- authorizer ---------------------------------------------------------------------------------


@pytest.fixture
def authorizer(tmp_path: Path) -> Authorizer:
    path = tmp_path / "tokens.toml"
    path.write_text(
        "\n".join(
            [
                _entry("alice", "t-op", Role.OPERATOR, services=("checkout",)),
                _entry("vera", "t-view", Role.VIEWER),
                _entry("old", "t-old", Role.OPERATOR, expires=NOW - timedelta(seconds=1)),
            ]
        )
    )
    return Authorizer(TokenFile(path), now=lambda: NOW)


def _md(value: str) -> list[tuple[str, str]]:
    return [("x-other", "1"), ("authorization", value)]


def test_without_tokens_everyone_is_the_anonymous_operator() -> None:
    assert Authorizer(None).require([], Role.OPERATOR) is ANONYMOUS
    assert ANONYMOUS.actor == "anonymous"


def test_bad_credentials_are_unauthenticated(authorizer: Authorizer) -> None:
    for metadata in ([], _md("t-op"), _md("Bearer"), _md("Bearer nope"), _md("Bearer t-old")):
        with pytest.raises(Unauthenticated):
            authorizer.require(metadata, Role.VIEWER)


def test_expired_token_says_so_without_the_token(authorizer: Authorizer) -> None:
    with pytest.raises(Unauthenticated, match="expired") as error:
        authorizer.require(_md("Bearer t-old"), Role.VIEWER)
    assert "t-old" not in str(error.value)


def test_roles_and_services(authorizer: Authorizer) -> None:
    alice = authorizer.require(_md("bearer t-op"), Role.OPERATOR)
    assert (alice.name, alice.actor) == ("alice", "operator:alice")
    check_service(alice, "checkout")
    with pytest.raises(PermissionDenied, match="search"):
        check_service(alice, "search")
    vera = authorizer.require(_md("Bearer t-view"), Role.VIEWER)
    check_service(vera, "anything")
    with pytest.raises(PermissionDenied, match="needs role operator"):
        authorizer.require(_md("Bearer t-view"), Role.OPERATOR)


def test_bearer_token_reads_bytes_and_any_case() -> None:
    assert bearer_token([("Authorization", b"BEARER abc ")]) == "abc"
    assert bearer_token([("x", "y")]) is None


# --- rate limiter -------------------------------------------------------------------------------


def test_token_bucket_allows_bursts_then_paces() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=2.0, burst=3, clock=clock)
    for _ in range(3):
        limiter.acquire("alice")
    with pytest.raises(ResourceExhausted, match="retry in 501 ms") as error:
        limiter.acquire("alice")
    assert error.value.retry_after_seconds == pytest.approx(0.5)
    limiter.acquire("bob")  # its own bucket
    clock.now += 0.5
    limiter.acquire("alice")
    with pytest.raises(ResourceExhausted):
        limiter.acquire("alice")
    clock.now += 100
    for _ in range(3):
        limiter.acquire("alice")  # refilled, but never above the burst
    with pytest.raises(ResourceExhausted):
        limiter.acquire("alice")


def test_disabled_limiter_never_refuses() -> None:
    limiter = RateLimiter(rate=0, burst=1)
    for _ in range(1000):
        limiter.acquire("x")


def test_idle_buckets_are_forgotten() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=1.0, burst=2, clock=clock)
    for i in range(100):
        limiter.acquire(f"p{i}")
    clock.now += 10
    limiter.acquire("new")
    assert len(limiter._buckets) == 1


# --- certificate identities ---------------------------------------------------------------------


def test_agent_id_from_spiffe_uris() -> None:
    assert agent_id_from_uris(["spiffe://prod/agent/web-1"]) == "web-1"
    assert agent_id_from_uris(["https://x/agent/a", "spiffe://prod/agent/b"]) == "b"
    assert agent_id_from_uris(["spiffe://prod/operator/a"]) is None
    assert agent_id_from_uris(["spiffe://prod/agent/a/b", "spiffe://prod/agent/"]) is None


def test_peer_agent_id_from_the_auth_context() -> None:
    ssl = {"transport_security_type": [b"ssl"]}
    assert peer_agent_id({}) is None
    assert peer_agent_id({**ssl, "x509_common_name": [b"cn-agent"]}) == "cn-agent"
    uri = {**ssl, "peer_uri": [b"spiffe://td/agent/a1"], "x509_common_name": [b"cn"]}
    assert peer_agent_id(uri) == "a1"
    other = {**ssl, "peer_uri": [b"spiffe://td/operator/o"], "x509_common_name": [b"cn"]}
    assert peer_agent_id(other) is None
    assert peer_agent_id({"x509_common_name": [b"cn"]}) is None  # not TLS


def test_agent_reads_its_id_from_its_certificate() -> None:
    ca = CertificateAuthority()
    assert certificate_agent_id(ca.agent_cert("agent-9").cert) == "agent-9"
    assert certificate_agent_id(ca.issue("plain-cn").cert) == "plain-cn"
    assert certificate_agent_id(ca.issue("x", uris=("spiffe://t/svc/x",)).cert) is None


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("localhost:1", True),
        ("[::1]:50051", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        ("10.1.2.3:50051", False),
        ("pulse.example.com:50051", False),
    ],
)
def test_loopback_detection(listen: str, loopback: bool) -> None:
    assert is_loopback(listen) is loopback


# --- pulse-server token create ------------------------------------------------------------------


def test_token_create_prints_the_token_and_a_valid_entry() -> None:
    out, err = io.StringIO(), io.StringIO()
    argv = ["token", "create", "--name", "ci", "--role", "operator", "--services", "a, b"]
    with redirect_stdout(out), redirect_stderr(err):
        assert server_main.main([*argv, "--expires-in-days", "1"]) == 0
    token = err.getvalue().strip().rsplit(" ", 1)[-1]
    assert token.startswith("pulse_") and token not in out.getvalue()
    entry = parse_tokens(out.getvalue())[hash_token(token)]
    assert (entry.name, entry.role, entry.services) == ("ci", Role.OPERATOR, {"a", "b"})
    assert entry.expires_at is not None and entry.expires_at > datetime.now(UTC)


def test_server_tls_flags_go_together() -> None:
    args = server_main.parser().parse_args(["--tls-cert", "c.pem"])
    with pytest.raises(SystemExit, match="go together"):
        server_main.tls_from(args)
    args = server_main.parser().parse_args(["--client-ca", "ca.pem"])
    with pytest.raises(SystemExit, match="needs --tls-cert"):
        server_main.tls_from(args)
    args = server_main.parser().parse_args(["--tls-cert", "c", "--tls-key", "k"])
    tls = server_main.tls_from(args)
    assert tls is not None and not tls.mutual


# --- pulsectl -----------------------------------------------------------------------------------


def test_pulsectl_reads_the_token_from_a_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PULSE_TOKEN", "from-env")
    args = build_parser().parse_args(["agents"])
    assert read_token(args) == "from-env"
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    args = build_parser().parse_args(["--token-file", str(token_file), "agents"])
    assert read_token(args) == "from-file"


def test_history_text_shows_actor_event_and_states() -> None:
    def at(seconds: int) -> Timestamp:
        return Timestamp(seconds=1_714_564_800 + seconds)

    events = [
        ppb.AuditEvent(sequence=1, time=at(0), actor="operator:alice", action="submitted"),
        ppb.AuditEvent(
            sequence=2,
            time=at(1),
            actor="system",
            action="state_changed",
            command_id="6f1c3a52-0d5e-4c61-9a57-3c1d2b7e8f90",
            hostname="web-1",
            from_state="pending",
            to_state="expired",
            detail="not delivered",
        ),
    ]
    lines = commands.history_text(events).splitlines()
    assert lines[0].split() == ["TIME", "ACTOR", "EVENT", "STATE", "DETAIL"]
    assert "operator:alice" in lines[1] and "request submitted" in lines[1]
    assert "pending -> expired" in lines[2] and "web-1 6f1c3a52" in lines[2]
    assert "2024-05-01 12:00:01Z" in lines[2]


def test_history_is_a_pulsectl_command() -> None:
    args = build_parser().parse_args(["history", "abc"])
    assert isinstance(args, argparse.Namespace)
    assert args.handler is commands.history and args.request_id == "abc"


# --- start-up warnings --------------------------------------------------------------------------


def _warnings(caplog: pytest.LogCaptureFixture, config: ServerConfig) -> str:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="server.app"):
        warn_about_security(config)
    return caplog.text


def test_server_warns_about_what_is_not_secured(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    local = _warnings(caplog, ServerConfig(listen="127.0.0.1:50051"))
    assert "WITHOUT TLS" not in local and "no --tokens-file" in local
    exposed = _warnings(caplog, ServerConfig(listen="0.0.0.0:50051"))
    assert "WITHOUT TLS" in exposed
    tls_only = ServerTls(tmp_path / "c", tmp_path / "k")
    text = _warnings(caplog, ServerConfig(listen="0.0.0.0:1", tls=tls_only))
    assert "WITHOUT TLS" not in text and "agents are not authenticated" in text
    locked = ServerConfig(
        listen="0.0.0.0:1",
        tls=ServerTls(tmp_path / "c", tmp_path / "k", client_ca=tmp_path / "ca"),
        tokens_file=tmp_path / "tokens.toml",
    )
    assert _warnings(caplog, locked) == ""


def test_server_refuses_to_start_with_bad_security_files(tmp_path: Path) -> None:
    bad_tokens = tmp_path / "tokens.toml"
    bad_tokens.write_text('[[tokens]]\nsha256 = "short"\nrole = "viewer"\n')
    with pytest.raises(SystemExit, match=r"--tokens-file: .*sha256"):
        server_main.check_security_files(ServerConfig(tokens_file=bad_tokens))
    with pytest.raises(SystemExit, match=r"--tokens-file: .*No such file"):
        server_main.check_security_files(ServerConfig(tokens_file=tmp_path / "missing"))
    ca = CertificateAuthority()
    cert, _ = ca.server_cert().write(tmp_path, "server")
    _, other_key = ca.server_cert().write(tmp_path, "other")
    with pytest.raises(SystemExit, match=r"TLS files: .*is not the key of"):
        server_main.check_security_files(ServerConfig(tls=ServerTls(cert, other_key)))
