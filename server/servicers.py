"""gRPC servicers: convert proto <-> domain and map domain errors to status codes. Nothing else."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from db.store import Store
from pulse.v1 import agent_service_pb2 as apb
from pulse.v1 import agent_service_pb2_grpc as apb_grpc
from pulse.v1 import profiling_service_pb2 as ppb
from pulse.v1 import profiling_service_pb2_grpc as ppb_grpc
from server import convert, preview, validation
from server.domain import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PulseError,
    Superseded,
    Unavailable,
)
from server.hub import Hub
from server.logs import ids
from server.sessions import AgentSession, CloseReason
from server.watch import RequestWatch

log = logging.getLogger(__name__)

_CODES: dict[type[PulseError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Superseded: grpc.StatusCode.ABORTED,
}

_R = TypeVar("_R")
Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[_R]]


def status_of(error: PulseError) -> grpc.StatusCode:
    for kind, code in _CODES.items():
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


def unary(handler: Handler[_R]) -> Handler[_R]:
    """Abort with the status of a domain error; anything else is a bug, logged as such."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> _R:
        try:
            return await handler(self, request, context)
        except PulseError as error:
            await context.abort(status_of(error), str(error))
            raise  # unreachable: abort raises

    return wrapper


class ProfilingServicer(ppb_grpc.ProfilingServiceServicer):
    def __init__(self, store: Store, watch: RequestWatch | None = None) -> None:
        self._store = store
        self._watch = watch or RequestWatch(store)

    @unary
    async def SubmitProfileRequest(
        self, request: ppb.SubmitProfileRequestRequest, context: grpc.aio.ServicerContext
    ) -> ppb.SubmitProfileRequestResponse:
        if request.dry_run:
            return await self._dry_run(request)
        result = await self._store.submit(convert.submit_from_proto(request))
        log.info(
            "request %s for service %s: %d targets%s",
            result.request_id,
            request.service_name,
            len(result.targets),
            " (deduplicated)" if result.deduplicated else "",
            extra=ids(request_id=result.request_id),
        )
        return ppb.SubmitProfileRequestResponse(
            request_id=str(result.request_id),
            targets=[convert.target_to_proto(t) for t in result.targets],
            deduplicated=result.deduplicated,
        )

    @unary
    async def GetProfileRequest(
        self, request: ppb.GetProfileRequestRequest, context: grpc.aio.ServicerContext
    ) -> ppb.GetProfileRequestResponse:
        request_id = validation.uuid_field(request.request_id, "request_id")
        view = await self._store.get_request(request_id)
        return ppb.GetProfileRequestResponse(request=convert.request_to_proto(view))

    @unary
    async def ListProfileRequests(
        self, request: ppb.ListProfileRequestsRequest, context: grpc.aio.ServicerContext
    ) -> ppb.ListProfileRequestsResponse:
        page_size = request.page_size or 50
        validation.in_range(page_size, "page_size", 1, 500)
        service = validation.service_name(request.service_name) if request.service_name else None
        page = await self._store.list_requests(
            service_name=service,
            state=convert.request_state_filter(request.state),
            page_size=page_size,
            page_token=validation.bounded_string(request.page_token, "page_token", 256),
        )
        return ppb.ListProfileRequestsResponse(
            requests=[convert.request_to_proto(v) for v in page.requests],
            next_page_token=page.next_token,
        )

    @unary
    async def CancelProfileRequest(
        self, request: ppb.CancelProfileRequestRequest, context: grpc.aio.ServicerContext
    ) -> ppb.CancelProfileRequestResponse:
        request_id = validation.uuid_field(request.request_id, "request_id")
        view = await self._store.cancel_request(request_id)
        log.info("request %s cancelled", request_id, extra=ids(request_id=request_id))
        return ppb.CancelProfileRequestResponse(request=convert.request_to_proto(view))

    @unary
    async def StopProfiling(
        self, request: ppb.StopProfilingRequest, context: grpc.aio.ServicerContext
    ) -> ppb.StopProfilingResponse:
        service = validation.service_name(request.service_name)
        hosts = validation.hostnames(list(request.hostnames))
        result = await self._store.stop_profiling(service, hosts)
        log.info(
            "stop profiling on %s %s: %d cancelled, %d stopping",
            service,
            list(hosts) or "(all hosts)",
            result.cancelled,
            result.stopping,
        )
        return ppb.StopProfilingResponse(
            cancelled_commands=result.cancelled, stopping_commands=result.stopping
        )

    @unary
    async def ListAgents(
        self, request: ppb.ListAgentsRequest, context: grpc.aio.ServicerContext
    ) -> ppb.ListAgentsResponse:
        service = validation.service_name(request.service_name) if request.service_name else None
        agents = await self._store.list_agents(
            service_name=service, online_only=request.online_only
        )
        return ppb.ListAgentsResponse(agents=[convert.agent_to_proto(a) for a in agents])

    async def _dry_run(
        self, request: ppb.SubmitProfileRequestRequest
    ) -> ppb.SubmitProfileRequestResponse:
        submit = convert.submit_from_proto(request)
        candidates = await self._store.preview_targets(submit)
        return ppb.SubmitProfileRequestResponse(
            dry_run_targets=[
                convert.dry_run_target_to_proto(
                    c, preview.verdict(c, submit.spec, submit.ttl_seconds)
                )
                for c in candidates
            ]
        )

    async def WatchProfileRequest(
        self, request: ppb.WatchProfileRequestRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ppb.WatchProfileRequestResponse]:
        try:
            request_id = validation.uuid_field(request.request_id, "request_id")
            async for view in self._watch.follow(request_id):
                yield ppb.WatchProfileRequestResponse(request=convert.request_to_proto(view))
        except PulseError as error:
            await context.abort(status_of(error), str(error))


class AgentServicer(apb_grpc.AgentServiceServicer):
    def __init__(self, hub: Hub, hello_timeout: float = 30.0) -> None:
        self._hub = hub
        self._hello_timeout = hello_timeout

    async def Heartbeat(
        self,
        request_iterator: AsyncIterator[apb.HeartbeatRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[apb.HeartbeatResponse]:
        try:
            first = await asyncio.wait_for(anext(request_iterator), self._hello_timeout)
        except (StopAsyncIteration, TimeoutError):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "hello: required first message")
        if first.WhichOneof("message") != "hello":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "hello: the first message must be a hello"
            )
        try:
            session = await self._hub.open_session(convert.hello_from_proto(first.hello))
        except PulseError as error:
            await context.abort(status_of(error), str(error))
        yield apb.HeartbeatResponse(
            settings=apb.SessionSettings(
                heartbeat_interval=convert.duration(session.interval),
                session_id=str(session.session_id),
                server_id=self._hub.settings.server_id,
            )
        )
        reader = asyncio.create_task(self._read(request_iterator, session))
        try:
            while (message := await session.next_outbound()) is not None:
                yield convert.outbound_to_proto(message)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            try:
                await self._hub.close_session(session)
            except Unavailable as exc:
                log.warning("closing session of %s: %s", session.agent_id, exc)
        if session.close_reason == CloseReason.SUPERSEDED:
            await context.abort(grpc.StatusCode.ABORTED, session.close_reason)
        if session.close_reason == CloseReason.SILENT:
            await context.abort(grpc.StatusCode.UNAVAILABLE, session.close_reason)

    async def _read(
        self, request_iterator: AsyncIterator[apb.HeartbeatRequest], session: AgentSession
    ) -> None:
        """Handle the agent's messages until its stream ends; then close the session."""
        try:
            async for message in request_iterator:
                kind = message.WhichOneof("message")
                if kind == "heartbeat":
                    self._hub.heartbeat(session)
                elif kind == "ack":
                    await self._ack(session, message.ack)
                else:
                    log.warning("agent %s sent an unexpected %s; ignored", session.agent_id, kind)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the stream broke: the session ends either way
            log.info("stream of agent %s ended: %s", session.agent_id, exc)
        session.close(CloseReason.CLIENT)

    async def _ack(self, session: AgentSession, ack: apb.CommandAck) -> None:
        try:
            command_id = validation.uuid_field(ack.command_id, "ack.command_id")
            if ack.result not in (apb.ACK_RESULT_ACCEPTED, apb.ACK_RESULT_REJECTED):
                raise InvalidArgument("ack.result", "must be ACCEPTED or REJECTED")
            await self._hub.ack(
                session,
                command_id,
                ack.result == apb.ACK_RESULT_ACCEPTED,
                ack.reject_reason[: validation.MAX_ERROR_MESSAGE],
            )
        except (InvalidArgument, NotFound, PermissionDenied) as error:
            log.warning("agent %s sent a bad ack: %s", session.agent_id, error)
        except Unavailable as error:
            # Not recorded: the command stays sent, and is re-sent after the ack timeout.
            log.warning("ack from agent %s not recorded: %s", session.agent_id, error)

    @unary
    async def ReportCommandCompletion(
        self, request: apb.ReportCommandCompletionRequest, context: grpc.aio.ServicerContext
    ) -> apb.ReportCommandCompletionResponse:
        completion = convert.completion_from_proto(request)
        state = await self._hub.complete(completion)
        log.info(
            "agent %s reported command %s %s -> %s",
            completion.agent_id,
            completion.command_id,
            completion.outcome,
            state,
            extra=ids(agent_id=completion.agent_id, command_id=completion.command_id),
        )
        if self._hub.metrics is not None and state.value == completion.outcome.value:
            self._hub.metrics.completed(completion)
        return apb.ReportCommandCompletionResponse(command_state=convert.STATE_TO_PROTO[state])
