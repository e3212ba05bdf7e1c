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
from server.auth import ANONYMOUS, Authorizer, Principal, Role, check_service
from server.domain import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PulseError,
    ResourceExhausted,
    SubmitRequest,
    Superseded,
    Unauthenticated,
    Unavailable,
)
from server.hub import Hub
from server.logs import ids
from server.ratelimit import RateLimiter
from server.sessions import AgentSession, CloseReason
from server.tls import peer_agent_id
from server.watch import RequestWatch

log = logging.getLogger(__name__)

_CODES: dict[type[PulseError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Superseded: grpc.StatusCode.ABORTED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
RETRY_AFTER_KEY = "retry-after-ms"

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
            if isinstance(error, ResourceExhausted) and error.retry_after_seconds > 0:
                retry_ms = int(error.retry_after_seconds * 1000) + 1
                context.set_trailing_metadata(((RETRY_AFTER_KEY, str(retry_ms)),))
            await context.abort(status_of(error), str(error))
            raise  # unreachable: abort raises

    return wrapper


def _peer_host(context: grpc.aio.ServicerContext) -> str:
    """`ipv4:1.2.3.4:5678` -> `1.2.3.4` (the rate-limit key of unauthenticated callers)."""
    peer = context.peer() or "unknown"
    return peer.split(":", 1)[-1].rsplit(":", 1)[0]


class ProfilingServicer(ppb_grpc.ProfilingServiceServicer):
    def __init__(
        self,
        store: Store,
        watch: RequestWatch | None = None,
        authorizer: Authorizer | None = None,
        submit_limiter: RateLimiter | None = None,
    ) -> None:
        self._store = store
        self._watch = watch or RequestWatch(store)
        self._auth = authorizer or Authorizer(None)
        self._submit_limiter = submit_limiter or RateLimiter(0, 1)

    def _caller(self, context: grpc.aio.ServicerContext, role: Role) -> Principal:
        return self._auth.require(context.invocation_metadata() or (), role)

    async def _check_request_service(self, principal: Principal, request_id: Any) -> None:
        """A token limited to some services only sees and changes their requests."""
        if principal.services:
            view = await self._store.get_request(request_id)
            check_service(principal, view.service_name)

    @staticmethod
    def _service_filter(principal: Principal, service: str | None) -> None:
        if principal.services and service is None:
            raise PermissionDenied(
                f"{principal.name} is limited to services {sorted(principal.services)}: "
                "name one in service_name"
            )
        if service is not None:
            check_service(principal, service)

    @unary
    async def SubmitProfileRequest(
        self, request: ppb.SubmitProfileRequestRequest, context: grpc.aio.ServicerContext
    ) -> ppb.SubmitProfileRequestResponse:
        if request.dry_run:
            viewer = self._caller(context, Role.VIEWER)
            submit = convert.submit_from_proto(request)
            check_service(viewer, submit.service_name)
            return await self._dry_run(submit)
        principal = self._caller(context, Role.OPERATOR)
        submit = convert.submit_from_proto(request)
        check_service(principal, submit.service_name)
        limit_key = principal.name if principal is not ANONYMOUS else _peer_host(context)
        self._submit_limiter.acquire(limit_key, "submits")
        result = await self._store.submit(submit, actor=principal.actor)
        log.info(
            "request %s for service %s by %s: %d targets%s",
            result.request_id,
            request.service_name,
            principal.actor,
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
        principal = self._caller(context, Role.VIEWER)
        request_id = validation.uuid_field(request.request_id, "request_id")
        view = await self._store.get_request(request_id)
        check_service(principal, view.service_name)
        return ppb.GetProfileRequestResponse(request=convert.request_to_proto(view))

    @unary
    async def ListProfileRequests(
        self, request: ppb.ListProfileRequestsRequest, context: grpc.aio.ServicerContext
    ) -> ppb.ListProfileRequestsResponse:
        principal = self._caller(context, Role.VIEWER)
        page_size = request.page_size or 50
        validation.in_range(page_size, "page_size", 1, 500)
        service = validation.service_name(request.service_name) if request.service_name else None
        self._service_filter(principal, service)
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
        principal = self._caller(context, Role.OPERATOR)
        request_id = validation.uuid_field(request.request_id, "request_id")
        await self._check_request_service(principal, request_id)
        view = await self._store.cancel_request(request_id, actor=principal.actor)
        log.info(
            "request %s cancelled by %s",
            request_id,
            principal.actor,
            extra=ids(request_id=request_id),
        )
        return ppb.CancelProfileRequestResponse(request=convert.request_to_proto(view))

    @unary
    async def StopProfiling(
        self, request: ppb.StopProfilingRequest, context: grpc.aio.ServicerContext
    ) -> ppb.StopProfilingResponse:
        principal = self._caller(context, Role.OPERATOR)
        service = validation.service_name(request.service_name)
        hosts = validation.hostnames(list(request.hostnames))
        check_service(principal, service)
        result = await self._store.stop_profiling(service, hosts, actor=principal.actor)
        log.info(
            "stop profiling on %s %s by %s: %d cancelled, %d stopping",
            service,
            list(hosts) or "(all hosts)",
            principal.actor,
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
        principal = self._caller(context, Role.VIEWER)
        service = validation.service_name(request.service_name) if request.service_name else None
        self._service_filter(principal, service)
        agents = await self._store.list_agents(
            service_name=service, online_only=request.online_only
        )
        return ppb.ListAgentsResponse(agents=[convert.agent_to_proto(a) for a in agents])

    async def _dry_run(self, submit: SubmitRequest) -> ppb.SubmitProfileRequestResponse:
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
            principal = self._caller(context, Role.VIEWER)
            request_id = validation.uuid_field(request.request_id, "request_id")
            await self._check_request_service(principal, request_id)
            async for view in self._watch.follow(request_id):
                yield ppb.WatchProfileRequestResponse(request=convert.request_to_proto(view))
        except PulseError as error:
            await context.abort(status_of(error), str(error))

    @unary
    async def GetRequestHistory(
        self, request: ppb.GetRequestHistoryRequest, context: grpc.aio.ServicerContext
    ) -> ppb.GetRequestHistoryResponse:
        principal = self._caller(context, Role.VIEWER)
        request_id = validation.uuid_field(request.request_id, "request_id")
        await self._check_request_service(principal, request_id)
        events = await self._store.request_history(request_id)
        return ppb.GetRequestHistoryResponse(
            events=[convert.audit_event_to_proto(e) for e in events]
        )


class AgentServicer(apb_grpc.AgentServiceServicer):
    def __init__(self, hub: Hub, hello_timeout: float = 30.0, mutual_tls: bool = False) -> None:
        self._hub = hub
        self._hello_timeout = hello_timeout
        self._mutual_tls = mutual_tls

    def _check_identity(self, context: grpc.aio.ServicerContext, agent_id: str) -> None:
        """With mTLS an agent is who its certificate says, whatever id it sends."""
        if not self._mutual_tls:
            return
        identity = peer_agent_id(context.auth_context())
        if identity is None:
            raise PermissionDenied(
                "the client certificate names no agent (expected a URI SAN "
                "spiffe://<trust-domain>/agent/<id>, or a common name)"
            )
        if identity != agent_id:
            log.warning("refused agent %r presenting the certificate of %r", agent_id, identity)
            raise PermissionDenied(
                f"agent_id: {agent_id!r} does not match the client certificate ({identity!r})"
            )

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
            hello = convert.hello_from_proto(first.hello)
            self._check_identity(context, hello.agent_id)
            session = await self._hub.open_session(hello)
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
        self._check_identity(context, completion.agent_id)
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
