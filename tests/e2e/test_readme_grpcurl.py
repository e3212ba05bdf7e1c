"""Runs every grpcurl recipe of the README exactly as written (address and ids substituted)
against a real pulse-server with a real agent, and checks the server's metrics endpoint and the
JSON logs of both processes."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.e2e.conftest import BIN, Fleet, free_port, wait_for

pytestmark = pytest.mark.e2e

README_ADDRESS = "127.0.0.1:50051"
ID_PLACEHOLDER = "<id>"
REQUIRED = {
    "SubmitProfileRequest",
    "GetProfileRequest",
    "ListProfileRequests",
    "CancelProfileRequest",
    "ListAgents",
    "WatchProfileRequest",
}


def readme_recipes() -> list[str]:
    """The commands of the first code block under `### grpcurl`, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### grpcurl", 1)[1]
    block = re.search(r"```\n(.*?)```", section, re.DOTALL)
    assert block, "no code block under ### grpcurl"
    joined = block.group(1).replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip().startswith("grpcurl ")]


def json_messages(stdout: str) -> list[dict[str, Any]]:
    """grpcurl prints one JSON object per response message (a stream prints several)."""
    decoder = json.JSONDecoder()
    messages, index = [], 0
    while index < len(stdout):
        if stdout[index].isspace():
            index += 1
            continue
        message, index = decoder.raw_decode(stdout, index)
        messages.append(message)
    return messages


def run_recipe(recipe: str, address: str, request_id: str | None) -> list[dict[str, Any]]:
    argv = shlex.split(recipe)
    assert argv[0] == "grpcurl" and README_ADDRESS in argv, recipe
    argv[0] = str(BIN / "grpcurl")
    argv = [address if arg == README_ADDRESS else arg for arg in argv]
    if any(ID_PLACEHOLDER in arg for arg in argv):
        assert request_id, f"{recipe} needs the id of a submitted request"
        argv = [arg.replace(ID_PLACEHOLDER, request_id) for arg in argv]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{recipe}\n{result.stderr}"
    return json_messages(result.stdout)


def json_lines(log: str) -> list[dict[str, Any]]:
    # The server also prints one plain line on stdout ("pulse-server listening on ...").
    lines = [line for line in log.splitlines() if line and not line.startswith("pulse-server ")]
    return [json.loads(line) for line in lines]


def test_readme_grpcurl_recipes_work_as_written(fleet: Fleet, tmp_path: Path) -> None:
    recipes = readme_recipes()
    methods = {recipe.rsplit("/", 1)[1] for recipe in recipes}
    assert methods >= REQUIRED, REQUIRED - methods

    port, metrics_port = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    server = fleet.server(
        port, "--log-format", "json", "--metrics-listen", f"127.0.0.1:{metrics_port}"
    )
    agent = fleet.agent(
        port, "agent", "--service", "shop", "--hostname", "web-1", "--profiler", "simulated",
        "--log-format", "json",
    )  # fmt: skip
    wait_for(
        lambda: fleet.grpcurl(
            port, "pulse.v1.ProfilingService/ListAgents", {"service_name": "shop"}
        ).get("agents"),
        "the agent to connect",
    )

    request_id: str | None = None
    seen: dict[str, list[dict[str, Any]]] = {}
    for recipe in recipes:
        method = recipe.rsplit("/", 1)[1]
        messages = run_recipe(recipe, address, request_id)
        if method == "SubmitProfileRequest" and '"dry_run": true' in recipe:
            (preview,) = messages
            assert "request_id" not in preview
            (only,) = preview["dry_run_targets"]
            assert only["hostname"] == "web-1" and only["online"] is True
            assert "would_reject" not in only  # the simulated profiler supports cpu
            continue
        seen[method] = messages
        if method == "SubmitProfileRequest":
            request_id = messages[0]["request_id"]
            assert messages[0]["targets"][0]["hostname"] == "web-1"
            # Let the agent start it, so that the cancel below stops a running command.
            get = {"request_id": request_id}
            wait_for(
                lambda get=get: fleet.grpcurl(
                    port, "pulse.v1.ProfilingService/GetProfileRequest", get
                )["request"]["counts"].get("running"),
                "the command to run",
            )

    assert seen["GetProfileRequest"][0]["request"]["request_id"] == request_id
    (listed,) = seen["ListProfileRequests"]
    assert [r["request_id"] for r in listed["requests"]] == [request_id]  # dry run made none
    (agents,) = seen["ListAgents"]
    assert agents["agents"][0]["hostname"] == "web-1" and agents["agents"][0]["online"]
    assert seen["CancelProfileRequest"][0]["request"]["cancel_time"]
    watched = [m["request"] for m in seen["WatchProfileRequest"]]
    assert watched[-1]["state"] == "REQUEST_STATE_CANCELLED"
    assert all(m["request_id"] == request_id for m in watched)
    assert seen["Check"] == [{"status": "SERVING"}]

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    assert (
        'pulse_rpcs_total{code="OK",method="/pulse.v1.ProfilingService/WatchProfileRequest"}'
        in metrics
    )
    assert "pulse_agents_connected 1.0" in metrics

    assert agent.stop() == 0
    assert server.stop() == 0
    server_lines = json_lines(server.log())
    agent_lines = json_lines(agent.log())
    assert any(
        line.get("request_id") == request_id and line["logger"] == "server.servicers"
        for line in server_lines
    )
    sent = [line for line in server_lines if line["logger"] == "server.dispatcher"]
    assert sent and sent[0]["request_id"] == request_id and sent[0]["command_id"]
    assert agent_lines and all("agent_id" in line for line in agent_lines)
    assert any(line.get("command_id") == sent[0]["command_id"] for line in agent_lines)
