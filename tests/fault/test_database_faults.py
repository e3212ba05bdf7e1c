"""PostgreSQL restarted in immediate mode under load, on a private cluster (not the shared one)."""

from __future__ import annotations

import threading
import time
from collections import Counter

import grpc
import pytest
from grpc_health.v1 import health_pb2

from pulse.v1 import common_pb2 as cpb
from pulse.v1 import profiling_service_pb2 as ppb
from tests.fault.conftest import (
    FAST_SERVER,
    Fleet,
    Operator,
    PrivatePostgres,
    check_exactly_once,
    executions,
    free_port,
    start_agents,
    wait_for,
    wait_health,
)

pytestmark = pytest.mark.fault


class Prober:
    """Calls the operator API in a loop from a thread and counts the status codes it gets."""

    def __init__(self, ops: Operator, request_id: str) -> None:
        self.ops = ops
        self.request_id = request_id
        self.codes: Counter[str] = Counter()
        self.details: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _call(self, fn: object) -> None:
        try:
            fn()  # type: ignore[operator]
            self.codes["OK"] += 1
        except grpc.RpcError as exc:
            self.codes[exc.code().name] += 1
            self.details[exc.code().name] = exc.details() or ""

    def _run(self) -> None:
        while not self._stop.is_set():
            self._call(lambda: self.ops.get(self.request_id))
            self._call(lambda: self.ops.agents("shop"))
            self._call(
                lambda: self.ops.stub.ListProfileRequests(
                    ppb.ListProfileRequestsRequest(service_name="shop"), timeout=10
                )
            )
            time.sleep(0.1)

    def stop(self) -> Counter[str]:
        self._stop.set()
        self._thread.join(30)
        return self.codes


def test_postgres_immediate_restart_under_load(
    fleet: Fleet, private_postgres: PrivatePostgres
) -> None:
    fleet.database_url = private_postgres.url
    port = free_port()
    server = fleet.server(port, *FAST_SERVER)
    agents = start_agents(fleet, port, 3)
    ops = Operator(port)
    wait_for(lambda: ops.online("shop") == 3, "three agents online")
    wait_health(port, health_pb2.HealthCheckResponse.SERVING)

    request_ids = [ops.submit("shop", duration_seconds=1).request_id for _ in range(5)]
    wait_for(lambda: len(executions(*agents)) >= 2, "some commands running", timeout=30)

    prober = Prober(ops, request_ids[0])
    private_postgres.stop("immediate")
    try:
        wait_health(port, health_pb2.HealthCheckResponse.NOT_SERVING, timeout=30)
        # Submitting during the outage is refused as UNAVAILABLE, and creates nothing.
        with pytest.raises(grpc.RpcError) as refused:
            ops.submit("shop", duration_seconds=1)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
        time.sleep(3)  # completions and acks keep failing meanwhile; the prober keeps calling
    finally:
        private_postgres.start()
    wait_health(port, health_pb2.HealthCheckResponse.SERVING, timeout=60)
    codes = prober.stop()

    assert codes["UNAVAILABLE"] > 0, codes
    assert set(codes) <= {"OK", "UNAVAILABLE"}, (codes, prober.details)
    assert "LISTEN connection lost" in server.log()
    # The LISTEN connection comes back, and runs its catch-up sweep.
    wait_for(lambda: server.log().count("listening for") >= 2, "LISTEN reconnected")

    # New work after the outage is delivered by NOTIFY again, and the backlog drains.
    request_ids.append(ops.submit("shop", duration_seconds=1).request_id)
    states = check_exactly_once(fleet, ops, request_ids, agents)
    assert len(states) == 18
    assert set(states) == {cpb.COMMAND_STATE_SUCCEEDED}, states
    assert server.proc.poll() is None
    assert "Traceback" not in server.log()
    assert "-> timed_out" not in server.log()  # completions sent during the outage count
    ops.close()
