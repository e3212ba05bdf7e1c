"""The README's Security section with real processes: certificates made with the README's openssl
commands, a token from `pulse-server token create`, a TLS + mTLS + tokens server, an agent
identified by its certificate, and pulsectl submitting and reading the audit trail."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.e2e.conftest import BIN, Fleet, free_port, wait_for

pytestmark = pytest.mark.e2e


def readme_openssl_script() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Certificates with openssl, step by step", 1)[1]
    match = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert match, "the README's openssl block is missing"
    return match.group(1)


def make_certificates(directory: Path) -> None:
    directory.mkdir()
    subprocess.run(
        ["bash", "-euo", "pipefail", "-c", readme_openssl_script()],
        cwd=directory,
        check=True,
        capture_output=True,
        timeout=60,
    )


def create_token(directory: Path, name: str, role: str) -> tuple[str, str]:
    result = subprocess.run(
        [str(BIN / "pulse-server"), "token", "create", "--name", name, "--role", role],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    token = result.stderr.strip().rsplit(" ", 1)[-1]
    (directory / f"{name}.token").write_text(token + "\n")
    return token, result.stdout


def test_readme_mtls_and_token_setup_works_end_to_end(fleet: Fleet, tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    make_certificates(pki)
    alice_token, alice_entry = create_token(pki, "alice", "operator")
    vera_token, vera_entry = create_token(pki, "vera", "viewer")
    (pki / "tokens.toml").write_text(alice_entry + "\n" + vera_entry)
    port = free_port()
    server = fleet.server(
        port,
        "--tls-cert", str(pki / "pulse-server.crt"), "--tls-key", str(pki / "pulse-server.key"),
        "--client-ca", str(pki / "ca.crt"), "--tokens-file", str(pki / "tokens.toml"),
    )  # fmt: skip
    agent = fleet.agent(
        port, "agent", "--service", "checkout", "--hostname", "web-1", "--profiler", "simulated",
        "--ca", str(pki / "ca.crt"), "--cert", str(pki / "web-1.crt"),
        "--key", str(pki / "web-1.key"),
    )  # fmt: skip
    tls = ["--ca", str(pki / "ca.crt"), "--cert", str(pki / "alice.crt")]
    tls += ["--key", str(pki / "alice.key")]
    alice = [*tls, "--token-file", str(pki / "alice.token")]

    def pulsectl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "pulsectl"), "--server", f"localhost:{port}", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    listed = wait_for(
        lambda: (
            (r := pulsectl(*alice, "-o", "json", "agents")).returncode == 0
            and '"web-1"' in r.stdout
            and r
        ),
        "the agent to connect over mTLS",
    )
    assert '"agent_id": "web-1"' in listed.stdout  # the id from its certificate

    submitted = pulsectl(
        *alice, "-o", "json", "submit", "--service", "checkout", "--duration", "1", "--wait",
        "--poll-interval", "0.2",
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    request_id = re.search(r'"request_id": "([0-9a-f-]+)"', submitted.stdout)
    assert request_id is not None

    history = pulsectl(*alice, "history", request_id.group(1))
    assert history.returncode == 0, history.stderr
    assert "operator:alice" in history.stdout and "agent:web-1" in history.stdout
    assert "running -> succeeded" in history.stdout

    no_token = pulsectl(*tls, "agents")
    assert no_token.returncode == 2 and "UNAUTHENTICATED" in no_token.stderr
    viewer = subprocess.run(
        [str(BIN / "pulsectl"), "--server", f"localhost:{port}", *tls, "submit",
         "--service", "checkout", "--duration", "1"],
        capture_output=True, text=True, timeout=60, env={"PULSE_TOKEN": vera_token},
    )  # fmt: skip
    assert viewer.returncode == 2 and "PERMISSION_DENIED" in viewer.stderr
    no_cert = pulsectl(
        "--ca", str(pki / "ca.crt"), "--token-file", str(pki / "alice.token"), "agents"
    )
    assert no_cert.returncode == 2 and "UNAVAILABLE" in no_cert.stderr

    assert agent.stop() == 0
    assert server.stop() == 0
    for token in (alice_token, vera_token):
        assert token not in server.log()
