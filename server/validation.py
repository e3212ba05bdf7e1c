"""Checks of operator and agent input, producing domain objects or `InvalidArgument(field, ...)`."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence

from server.domain import InvalidArgument, ProfilingMode, ProfilingSpec, SubmitRequest

MAX_NAME = 128
MAX_HOSTNAME = 253
MAX_HOSTS_PER_REQUEST = 10_000
MAX_PIDS = 64
MAX_MAP_ENTRIES = 32
MAX_MAP_KEY = 64
MAX_MAP_VALUE = 1024
MAX_ERROR_MESSAGE = 4096
DEFAULT_FREQUENCY_HZ = 11
DEFAULT_TTL_SECONDS = 300

# Used with fullmatch: `$` would also accept a trailing newline.
_AGENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_SERVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")
_HOSTNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")
_MAP_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def uuid_field(value: str, field: str) -> uuid.UUID:
    if not value:
        raise InvalidArgument(field, "required")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgument(field, f"not a UUID: {value[:64]!r}") from None


def service_name(value: str, field: str = "service_name") -> str:
    if not value:
        raise InvalidArgument(field, "required")
    if not _SERVICE.fullmatch(value):
        raise InvalidArgument(
            field, "must be 1..128 characters of letters, digits and ._/- (starting alphanumeric)"
        )
    return value


def hostname(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(field, "required")
    if len(value) > MAX_HOSTNAME or not _HOSTNAME.fullmatch(value):
        raise InvalidArgument(field, "not a valid hostname (1..253 of letters, digits and ._-)")
    return value


def hostnames(values: Sequence[str], field: str = "hostnames") -> tuple[str, ...]:
    if len(values) > MAX_HOSTS_PER_REQUEST:
        raise InvalidArgument(field, f"at most {MAX_HOSTS_PER_REQUEST} hostnames")
    checked = [hostname(v, f"{field}[{i}]") for i, v in enumerate(values)]
    if len(set(checked)) != len(checked):
        raise InvalidArgument(field, "contains duplicates")
    return tuple(checked)


def agent_id(value: str, field: str = "agent_id") -> str:
    if not value:
        raise InvalidArgument(field, "required")
    if not _AGENT_ID.fullmatch(value):
        raise InvalidArgument(field, "must be 1..128 characters of letters, digits and ._:-")
    return value


def string_map(values: Mapping[str, str], field: str) -> dict[str, str]:
    if len(values) > MAX_MAP_ENTRIES:
        raise InvalidArgument(field, f"at most {MAX_MAP_ENTRIES} entries")
    for key, value in values.items():
        if not _MAP_KEY.fullmatch(key):
            raise InvalidArgument(f"{field}[{key[:64]!r}]", "key must be 1..64 of [A-Za-z0-9_.-]")
        if len(value) > MAX_MAP_VALUE:
            raise InvalidArgument(f"{field}[{key!r}]", f"value longer than {MAX_MAP_VALUE}")
    return dict(values)


def bounded_string(value: str, field: str, limit: int) -> str:
    if len(value) > limit:
        raise InvalidArgument(field, f"longer than {limit} characters")
    return value


def in_range(value: int, field: str, low: int, high: int) -> int:
    if not low <= value <= high:
        raise InvalidArgument(field, f"must be between {low} and {high}, got {value}")
    return value


def spec(
    *,
    duration_seconds: int,
    frequency_hz: int,
    mode: ProfilingMode,
    pids: Sequence[int],
    additional_args: Mapping[str, str],
    continuous: bool,
) -> ProfilingSpec:
    if duration_seconds == 0:
        raise InvalidArgument("duration_seconds", "required (1..3600)")
    in_range(duration_seconds, "duration_seconds", 1, 3600)
    frequency = DEFAULT_FREQUENCY_HZ if frequency_hz == 0 else frequency_hz
    in_range(frequency, "frequency_hz", 1, 1000)
    if len(pids) > MAX_PIDS:
        raise InvalidArgument("pids", f"at most {MAX_PIDS} pids")
    for i, pid in enumerate(pids):
        if pid <= 0:
            raise InvalidArgument(f"pids[{i}]", f"must be a positive process id, got {pid}")
    if len(set(pids)) != len(pids):
        raise InvalidArgument("pids", "contains duplicates")
    return ProfilingSpec(
        duration_seconds=duration_seconds,
        frequency_hz=frequency,
        mode=mode,
        pids=tuple(pids),
        additional_args=string_map(additional_args, "additional_args"),
        continuous=continuous,
    )


def submit(
    *,
    service: str,
    hosts: Sequence[str],
    profiling_spec: ProfilingSpec,
    max_hosts: int,
    ttl_seconds: int,
    idempotency_key: str,
) -> SubmitRequest:
    if max_hosts < 0:
        raise InvalidArgument("max_hosts", f"must be 0 (no cap) or positive, got {max_hosts}")
    ttl = DEFAULT_TTL_SECONDS if ttl_seconds == 0 else ttl_seconds
    in_range(ttl, "ttl_seconds", 1, 86400)
    return SubmitRequest(
        service_name=service_name(service),
        hostnames=hostnames(hosts),
        spec=profiling_spec,
        max_hosts=max_hosts,
        ttl_seconds=ttl,
        idempotency_key=bounded_string(idempotency_key, "idempotency_key", MAX_NAME) or None,
    )
