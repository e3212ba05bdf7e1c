"""The agent's long-lived channel: the heartbeat stream (re-opened with capped, jittered
exponential backoff) and completion reports (retried until the server records them)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    retry_if_exception_type,
    wait_random_exponential,
)

from agent.executor import CANCELLED, FAILED, SUCCEEDED, Executor
from agent.profilers.base import MODE_ALLOCATION, MODE_CPU, MODE_NONE, Job
from agent.state import RunRecord
from pulse.v1 import agent_service_pb2 as apb
from pulse.v1 import agent_service_pb2_grpc as apb_grpc
from pulse.v1 import common_pb2 as cpb
from server.logs import ids
from server.tls import ClientTls

log = logging.getLogger("pulse.agent")

MODE_TO_PROTO = {
    MODE_CPU: cpb.PROFILING_MODE_CPU,
    MODE_ALLOCATION: cpb.PROFILING_MODE_ALLOCATION,
    MODE_NONE: cpb.PROFILING_MODE_NONE,
}
MODE_FROM_PROTO = {v: k for k, v in MODE_TO_PROTO.items()}
OUTCOME_TO_PROTO = {
    SUCCEEDED: apb.COMMAND_OUTCOME_SUCCEEDED,
    FAILED: apb.COMMAND_OUTCOME_FAILED,
    CANCELLED: apb.COMMAND_OUTCOME_CANCELLED,
}
# Statuses after which repeating the same completion cannot succeed.
PERMANENT = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNIMPLEMENTED,
}


@dataclass
class AgentConfig:
    server: str
    service_name: str
    hostname: str
    ip_address: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    agent_version: str = "0.1.0"
    max_backoff: float = 30.0
    backoff_multiplier: float = 0.5
    keepalive_time_ms: int = 20_000
    keepalive_timeout_ms: int = 10_000
    rpc_timeout: float = 10.0
    # Extra channel arguments; the fleet emulator sets a distinct one per agent so that agents
    # do not share one TCP connection.
    channel_options: list[tuple[str, Any]] = field(default_factory=list)
    # TLS (None: plaintext). The files are re-read before a reconnect when they changed.
    tls: ClientTls | None = None
    # With mTLS the agent's id is its certificate's identity; empty: the id in the state dir.
    agent_id: str = ""


class SessionFailed(Exception):
    """The stream could not be (re)established; retried with backoff."""


def channel_options(config: AgentConfig) -> list[tuple[str, Any]]:
    return [
        ("grpc.keepalive_time_ms", config.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", config.keepalive_timeout_ms),
        # Without this, a ping that is never answered (a network that silently drops packets)
        # is only given up after gRPC's default of one minute, whatever keepalive_timeout says.
        ("grpc.http2.ping_timeout_ms", config.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Reconnect attempts are paced by our own backoff, not only gRPC's.
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", int(config.max_backoff * 1000)),
        *config.channel_options,
    ]


def _open_channel(config: AgentConfig) -> grpc.aio.Channel:
    if config.tls is not None:
        return grpc.aio.secure_channel(
            config.server, config.tls.credentials(), options=channel_options(config)
        )
    return grpc.aio.insecure_channel(config.server, options=channel_options(config))


def _timestamp(seconds: float | None) -> Timestamp | None:
    if not seconds:
        return None
    ts = Timestamp()
    ts.FromDatetime(datetime.fromtimestamp(seconds, UTC))
    return ts


def completion_to_proto(agent_id: str, c: dict[str, Any]) -> apb.ReportCommandCompletionRequest:
    return apb.ReportCommandCompletionRequest(
        agent_id=agent_id,
        command_id=c["command_id"],
        outcome=OUTCOME_TO_PROTO[c["outcome"]],
        start_time=_timestamp(c.get("start_time")),
        finish_time=_timestamp(c.get("finish_time")),
        error_message=c.get("error_message", ""),
        result=cpb.ProfileResult(
            location=c.get("location", ""),
            samples=c.get("samples", 0),
            size_bytes=c.get("size_bytes", 0),
        ),
    )


def job_from_proto(command: apb.Command) -> Job:
    spec = command.spec
    return Job(
        command_id=command.command_id,
        duration_seconds=spec.duration_seconds,
        frequency_hz=spec.frequency_hz,
        mode=MODE_FROM_PROTO.get(spec.profiling_mode, "unknown"),
        pids=tuple(spec.pids),
        additional_args=dict(spec.additional_args),
    )


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() not in PERMANENT


class CompletionReporter:
    """Sends completions in order, each retried until the server answers (any answer but a
    transient error); what is answered is marked reported in the agent's state."""

    def __init__(
        self,
        stub: apb_grpc.AgentServiceStub,
        state: RunRecord,
        agent_id: str,
        config: AgentConfig,
    ) -> None:
        self._stub = stub
        self._state = state
        self._agent_id = agent_id
        self._config = config
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._retry_now = asyncio.Event()
        self.reported = 0

    def retry_now(self) -> None:
        """A session was (re)established, so the server is back: a report waiting out its
        backoff is retried at once (the server only times commands out after a grace that
        starts when it comes back)."""
        self._retry_now.set()

    async def _sleep(self, seconds: float) -> None:
        self._retry_now.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._retry_now.wait(), seconds)

    def submit(self, completion: dict[str, Any]) -> None:
        self._queue.put_nowait(completion)

    def use(self, stub: apb_grpc.AgentServiceStub) -> None:
        """Send from now on through `stub` (a channel with renewed certificates)."""
        self._stub = stub

    async def join(self) -> None:
        """Wait until every submitted completion has been answered."""
        await self._queue.join()

    async def run(self) -> None:
        while True:
            completion = await self._queue.get()
            await self._report(completion)
            self._queue.task_done()

    async def _report(self, completion: dict[str, Any]) -> None:
        request = completion_to_proto(self._agent_id, completion)
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(_retryable),
                wait=wait_random_exponential(
                    multiplier=self._config.backoff_multiplier, max=self._config.max_backoff
                ),
                before_sleep=_log_retry("completion report"),
                sleep=self._sleep,
            ):
                with attempt:
                    response = await self._stub.ReportCommandCompletion(
                        request, timeout=self._config.rpc_timeout
                    )
            log.info(
                "completion of %s recorded: %s",
                request.command_id,
                cpb.CommandState.Name(response.command_state),
                extra=ids(command_id=request.command_id),
            )
        except grpc.aio.AioRpcError as exc:
            log.error(
                "server refused completion of %s: %s %s",
                request.command_id,
                exc.code().name,
                exc.details(),
            )
        self._state.mark_reported(request.command_id)
        self.reported += 1


def _log_retry(what: str) -> Callable[[RetryCallState], None]:
    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0
        detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else exc
        log.warning("%s failed (%s); retrying in %.1f s", what, detail, delay)

    return before_sleep


class AgentClient:
    def __init__(
        self,
        config: AgentConfig,
        executor_factory: Callable[[Callable[[dict[str, Any]], None]], Executor],
        state: RunRecord,
        supported_modes: frozenset[str],
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        self.config = config
        self.state = state
        self.agent_id = config.agent_id or state.agent_id()
        self._channel = channel or _open_channel(config)
        self._tls_stamp = config.tls.stamp() if config.tls and channel is None else None
        self._old_channels: set[asyncio.Task[None]] = set()
        self._stub = apb_grpc.AgentServiceStub(self._channel)
        self.reporter = CompletionReporter(self._stub, state, self.agent_id, config)
        self.executor = executor_factory(self.reporter.submit)
        self._supported_modes = supported_modes
        self.connected = asyncio.Event()
        self.sessions = 0
        self.session_id = ""
        self._tasks: list[asyncio.Task[None]] = []

    # --- life -----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until cancelled: executor, completion reports, and the heartbeat stream."""
        for pending in self.state.unreported():
            self.reporter.submit(pending.completion)
        self._tasks = [
            asyncio.create_task(self.executor.run(), name="executor"),
            asyncio.create_task(self.reporter.run(), name="reporter"),
        ]
        try:
            await self._stream_forever()
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def shutdown(self, grace: float = 5.0) -> None:
        """Stop profiling and give pending completion reports a moment to go out."""
        self.executor.stop_all("agent shutting down")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained(), grace)
        await self._channel.close()

    async def _drained(self) -> None:
        await self.executor.idle()
        await self.reporter.join()

    async def _stream_forever(self) -> None:
        while True:
            delay = 0.0
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(SessionFailed),
                wait=wait_random_exponential(
                    multiplier=self.config.backoff_multiplier, max=self.config.max_backoff
                ),
                before_sleep=_log_retry("heartbeat stream"),
            ):
                with attempt:
                    delay = await self._session()
            # An established session ended: reconnect after a short jittered pause (or the
            # server's drain delay), with the backoff reset.
            await asyncio.sleep(delay or random.uniform(0, 1.0))

    # --- one session ----------------------------------------------------------------------------

    def _hello(self) -> apb.HeartbeatRequest:
        config = self.config
        return apb.HeartbeatRequest(
            hello=apb.AgentHello(
                agent_id=self.agent_id,
                hostname=config.hostname,
                ip_address=config.ip_address,
                service_name=config.service_name,
                labels=config.labels,
                agent_version=config.agent_version,
                supported_modes=[MODE_TO_PROTO[m] for m in sorted(self._supported_modes)],
                running_command_ids=self.executor.running_ids(),
                finished_command_ids=self.state.recently_finished(),
            )
        )

    async def _session(self) -> float:
        """One stream: returns the delay before reconnecting once an established session ends;
        raises SessionFailed when it could not be established or was refused."""
        self._reopen_if_rotated()
        call = self._stub.Heartbeat()
        outbound: asyncio.Queue[apb.HeartbeatRequest] = asyncio.Queue()
        writer = asyncio.create_task(self._write(call, outbound))
        heartbeats: asyncio.Task[None] | None = None
        try:
            await outbound.put(self._hello())
            first = await call.read()
            if first is grpc.aio.EOF or first.WhichOneof("message") != "settings":
                raise SessionFailed("server ended the stream before the session settings")
            settings = first.settings
            interval = settings.heartbeat_interval.ToTimedelta().total_seconds()
            self.session_id = settings.session_id
            self.sessions += 1
            self.connected.set()
            self.reporter.retry_now()
            log.info(
                "connected to %s (server %s), heartbeat every %.1f s",
                self.config.server,
                settings.server_id,
                interval,
            )
            heartbeats = asyncio.create_task(self._heartbeat(outbound, interval))
            return await self._read(call, outbound)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.ABORTED:
                log.warning("session refused: %s", exc.details())
            raise SessionFailed(f"{exc.code().name}: {exc.details()}") from exc
        finally:
            self.connected.clear()
            for task in (heartbeats, writer):
                if task is not None:
                    task.cancel()
            call.cancel()

    def _reopen_if_rotated(self) -> None:
        """New certificate files (renewed by the operator or a cert manager): use them from the
        next connection on. An open connection keeps going: TLS checked it when it began."""
        tls = self.config.tls
        if tls is None or self._tls_stamp is None:
            return
        try:
            stamp = tls.stamp()
            if stamp == self._tls_stamp:
                return
            channel = _open_channel(self.config)
        except (OSError, ValueError) as exc:
            log.warning("certificate files changed but cannot be read: %s", exc)
            return
        self._tls_stamp = stamp
        old, self._channel = self._channel, channel
        self._stub = apb_grpc.AgentServiceStub(channel)
        self.reporter.use(self._stub)
        closing = asyncio.create_task(old.close(grace=5.0))
        self._old_channels.add(closing)
        closing.add_done_callback(self._old_channels.discard)
        log.info("certificate files changed: reconnecting with them")

    async def _read(
        self, call: grpc.aio.StreamStreamCall, outbound: asyncio.Queue[apb.HeartbeatRequest]
    ) -> float:
        while True:
            message = await call.read()
            if message is grpc.aio.EOF:
                log.info("server closed the stream")
                return 0.0
            kind = message.WhichOneof("message")
            if kind == "command":
                await outbound.put(self._on_command(message.command))
            elif kind == "stop":
                self.executor.stop(message.stop.command_id, message.stop.reason)
            elif kind == "drain":
                delay = message.drain.reconnect_after.ToTimedelta().total_seconds()
                log.info("server is draining; reconnecting in %.1f s", delay)
                return delay

    def _on_command(self, command: apb.Command) -> apb.HeartbeatRequest:
        admission = self.executor.admit(job_from_proto(command), command.spec.continuous)
        if admission.accepted:
            result = apb.ACK_RESULT_ACCEPTED
        else:
            result = apb.ACK_RESULT_REJECTED
            log.warning(
                "rejecting command %s: %s",
                command.command_id,
                admission.reason,
                extra=ids(command_id=command.command_id, request_id=command.request_id),
            )
        return apb.HeartbeatRequest(
            ack=apb.CommandAck(
                command_id=command.command_id, result=result, reject_reason=admission.reason
            )
        )

    async def _heartbeat(
        self, outbound: asyncio.Queue[apb.HeartbeatRequest], interval: float
    ) -> None:
        while True:
            await asyncio.sleep(interval)
            now = Timestamp()
            now.GetCurrentTime()
            await outbound.put(
                apb.HeartbeatRequest(
                    heartbeat=apb.AgentHeartbeat(
                        send_time=now, running_command_ids=self.executor.running_ids()
                    )
                )
            )

    @staticmethod
    async def _write(
        call: grpc.aio.StreamStreamCall, outbound: asyncio.Queue[apb.HeartbeatRequest]
    ) -> None:
        """The only writer of the stream (gRPC allows one write at a time)."""
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            while True:
                await call.write(await outbound.get())
