"""The whole loop with real processes: grpcurl submits, pulse-agent runs py-spy on a real Python
process, the request ends SUCCEEDED with a non-empty profile."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import Fleet, free_port, wait_for

pytestmark = pytest.mark.e2e

BUSY_PROGRAM = """
import time

def busy_loop():
    total = 0
    while True:
        total += sum(i * i for i in range(5000))

time.sleep(0.1)
busy_loop()
"""


def _request(fleet: Fleet, port: int, request_id: str) -> dict:
    response = fleet.grpcurl(
        port, "pulse.v1.ProfilingService/GetProfileRequest", {"request_id": request_id}
    )
    return response["request"]


def _finished(fleet: Fleet, port: int, request_id: str) -> dict:
    return wait_for(
        lambda: (
            (r := _request(fleet, port, request_id))["state"] != "REQUEST_STATE_PENDING"
            and r["state"] != "REQUEST_STATE_RUNNING"
            and r
        ),
        f"request {request_id} to finish",
        timeout=60,
    )


def test_grpcurl_request_profiles_a_real_process_with_py_spy(fleet: Fleet, tmp_path: Path) -> None:
    port = free_port()
    program = tmp_path / "busy_target.py"
    program.write_text(BUSY_PROGRAM)
    target = fleet.start("target", [sys.executable, str(program)])
    server = fleet.server(port)
    agent = fleet.agent(
        port, "agent", "--service", "e2e-shop", "--hostname", "e2e-host",
        "--profiler", "py-spy", "--target-cmdline", "busy_target\\.py",
    )  # fmt: skip

    agents = wait_for(
        lambda: fleet.grpcurl(
            port, "pulse.v1.ProfilingService/ListAgents", {"service_name": "e2e-shop"}
        ).get("agents"),
        "the agent to connect",
    )
    assert agents[0]["online"] is True
    assert agents[0]["supported_modes"] == ["PROFILING_MODE_CPU"]

    # 1. Explicit pid, submitted with grpcurl (server reflection, no proto files).
    submitted = fleet.grpcurl(
        port,
        "pulse.v1.ProfilingService/SubmitProfileRequest",
        {
            "service_name": "e2e-shop",
            "duration_seconds": 2,
            "frequency_hz": 50,
            "profiling_mode": "PROFILING_MODE_CPU",
            "pids": [target.pid],
        },
    )
    request_id = submitted["request_id"]
    command_id = submitted["targets"][0]["command_id"]
    done = _finished(fleet, port, request_id)
    assert done["state"] == "REQUEST_STATE_SUCCEEDED", done
    result = done["targets"][0]["result"]
    profile = Path(result["location"])
    assert profile.parent == tmp_path / "agent" / "profiles"
    assert profile.name.startswith(command_id)
    stacks = profile.read_text()
    assert "busy_loop" in stacks
    assert int(result["samples"]) > 0 and int(result["size_bytes"]) == len(stacks.encode())

    # 2. No pid: the agent profiles what it watches (--target-cmdline). Followed with pulsectl.
    watched = fleet.pulsectl(
        port, "-o", "json", "submit", "--service", "e2e-shop", "--duration", "1", "--wait",
        "--poll-interval", "0.2",
    )  # fmt: skip
    assert watched.returncode == 0, watched.stderr
    assert '"REQUEST_STATE_SUCCEEDED"' in watched.stdout

    # 3. A mode py-spy cannot do is rejected with a clear reason.
    rejected = fleet.grpcurl(
        port,
        "pulse.v1.ProfilingService/SubmitProfileRequest",
        {
            "service_name": "e2e-shop",
            "duration_seconds": 1,
            "profiling_mode": "PROFILING_MODE_ALLOCATION",
        },
    )
    refused = _finished(fleet, port, rejected["request_id"])
    assert refused["targets"][0]["command_state"] == "COMMAND_STATE_REJECTED"
    assert "not supported by py-spy" in refused["targets"][0]["error_message"]

    assert agent.stop(signal.SIGTERM) == 0
    assert server.stop(signal.SIGTERM) == 0
    target.stop(signal.SIGKILL)
    log = agent.log()
    assert log.count(f"starting command {command_id}") == 1
    assert "listening on" in server.log()


def test_bad_input_through_grpcurl_is_invalid_argument(fleet: Fleet) -> None:
    import json
    import subprocess

    from tests.e2e.conftest import BIN

    port = free_port()
    fleet.server(port)
    wait_for(
        lambda: fleet.grpcurl(port, "grpc.health.v1.Health/Check", {}).get("status") == "SERVING",
        "the server to serve",
    )
    result = subprocess.run(
        [
            str(BIN / "grpcurl"), "-plaintext", "-d",
            json.dumps({"service_name": "shop", "duration_seconds": 0}),
            f"127.0.0.1:{port}", "pulse.v1.ProfilingService/SubmitProfileRequest",
        ],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode != 0
    assert "InvalidArgument" in result.stderr
    assert "duration_seconds" in result.stderr
