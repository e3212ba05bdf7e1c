"""Dry-run submits: would each resolved target accept the request? (Pure rules, no grpc.)"""

from __future__ import annotations

from dataclasses import dataclass

from server.domain import Candidate, ProfilingSpec


@dataclass(frozen=True)
class Verdict:
    would_reject: bool
    reason: str


def verdict(candidate: Candidate, spec: ProfilingSpec, ttl_seconds: int) -> Verdict:
    """What the server can tell before sending: the agent's announced modes and its liveness.
    (An agent may still refuse for reasons only it knows, e.g. no process to profile.)"""
    if candidate.agent_id is None:
        return Verdict(
            False,
            f"no agent of this host has connected yet; the target waits up to {ttl_seconds}s",
        )
    if spec.mode not in candidate.supported_modes:
        announced = ", ".join(m.value for m in candidate.supported_modes) or "none"
        return Verdict(
            True, f"mode {spec.mode.value} not supported by this agent (supports: {announced})"
        )
    if not candidate.online:
        return Verdict(False, f"agent is offline; the target waits up to {ttl_seconds}s")
    return Verdict(False, "")
