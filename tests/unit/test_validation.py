from __future__ import annotations

import uuid
from typing import Any

import pytest

from server import validation
from server.domain import InvalidArgument, ProfilingMode, ProfilingSpec


def make_spec(**overrides: Any) -> ProfilingSpec:
    fields: dict[str, Any] = {
        "duration_seconds": 10,
        "frequency_hz": 0,
        "mode": ProfilingMode.CPU,
        "pids": (),
        "additional_args": {},
        "continuous": False,
    }
    fields.update(overrides)
    return validation.spec(**fields)


def make_submit(**overrides: Any) -> Any:
    fields: dict[str, Any] = {
        "service": "checkout",
        "hosts": ["web-1"],
        "profiling_spec": make_spec(),
        "max_hosts": 0,
        "ttl_seconds": 0,
        "idempotency_key": "",
    }
    fields.update(overrides)
    return validation.submit(**fields)


def field_of(call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(InvalidArgument) as info:
        call(*args, **kwargs)
    assert str(info.value).startswith(f"{info.value.field}: ")
    assert info.value.reason
    return info.value.field


# --- spec ----------------------------------------------------------------------------------------


def test_spec_applies_defaults_and_keeps_values() -> None:
    spec = make_spec(pids=[7, 9], additional_args={"native": "true"}, continuous=True)
    assert spec == ProfilingSpec(
        duration_seconds=10,
        frequency_hz=validation.DEFAULT_FREQUENCY_HZ,
        mode=ProfilingMode.CPU,
        pids=(7, 9),
        additional_args={"native": "true"},
        continuous=True,
    )
    assert spec.frequency_hz == 11
    assert isinstance(spec.pids, tuple)


@pytest.mark.parametrize("duration", [1, 3600])
def test_duration_boundaries_accepted(duration: int) -> None:
    assert make_spec(duration_seconds=duration).duration_seconds == duration


@pytest.mark.parametrize("duration", [0, -1, 3601, 2**31 - 1])
def test_duration_out_of_range_refused(duration: int) -> None:
    assert field_of(make_spec, duration_seconds=duration) == "duration_seconds"


@pytest.mark.parametrize("frequency", [1, 1000])
def test_frequency_boundaries_accepted(frequency: int) -> None:
    assert make_spec(frequency_hz=frequency).frequency_hz == frequency


@pytest.mark.parametrize("frequency", [-1, 1001])
def test_frequency_out_of_range_refused(frequency: int) -> None:
    assert field_of(make_spec, frequency_hz=frequency) == "frequency_hz"


def test_pid_must_be_positive_and_is_named_by_index() -> None:
    assert field_of(make_spec, pids=[10, 0]) == "pids[1]"
    assert field_of(make_spec, pids=[-5]) == "pids[0]"


def test_duplicate_pids_refused() -> None:
    assert field_of(make_spec, pids=[10, 11, 10]) == "pids"


def test_too_many_pids_refused() -> None:
    assert len(make_spec(pids=range(1, validation.MAX_PIDS + 1)).pids) == validation.MAX_PIDS
    assert field_of(make_spec, pids=range(1, validation.MAX_PIDS + 2)) == "pids"


def test_additional_args_bad_key_names_the_key() -> None:
    field = field_of(make_spec, additional_args={"ok": "1", "bad key": "1"})
    assert field.startswith("additional_args[")
    assert "bad key" in field


def test_additional_args_value_too_long() -> None:
    long_value = "x" * (validation.MAX_MAP_VALUE + 1)
    field = field_of(make_spec, additional_args={"native": long_value})
    assert field == "additional_args['native']"
    ok = make_spec(additional_args={"native": "x" * validation.MAX_MAP_VALUE})
    assert len(ok.additional_args["native"]) == validation.MAX_MAP_VALUE


def test_additional_args_too_many_entries() -> None:
    args = {f"k{i}": "v" for i in range(validation.MAX_MAP_ENTRIES + 1)}
    assert field_of(make_spec, additional_args=args) == "additional_args"


def test_additional_args_is_copied() -> None:
    args = {"native": "1"}
    spec = make_spec(additional_args=args)
    args["idle"] = "1"
    assert spec.additional_args == {"native": "1"}


# --- submit --------------------------------------------------------------------------------------


def test_submit_applies_defaults() -> None:
    request = make_submit()
    assert request.ttl_seconds == validation.DEFAULT_TTL_SECONDS == 300
    assert request.idempotency_key is None
    assert request.service_name == "checkout"
    assert request.hostnames == ("web-1",)
    assert request.max_hosts == 0


def test_submit_keeps_explicit_values() -> None:
    request = make_submit(ttl_seconds=60, idempotency_key="k-1", max_hosts=5, hosts=[])
    assert (request.ttl_seconds, request.idempotency_key, request.max_hosts) == (60, "k-1", 5)
    assert request.hostnames == ()


@pytest.mark.parametrize("ttl", [1, 86400])
def test_ttl_boundaries_accepted(ttl: int) -> None:
    assert make_submit(ttl_seconds=ttl).ttl_seconds == ttl


@pytest.mark.parametrize("ttl", [-1, 86401])
def test_ttl_out_of_range_refused(ttl: int) -> None:
    assert field_of(make_submit, ttl_seconds=ttl) == "ttl_seconds"


def test_negative_max_hosts_refused() -> None:
    assert field_of(make_submit, max_hosts=-1) == "max_hosts"


def test_idempotency_key_length() -> None:
    key = "k" * validation.MAX_NAME
    assert make_submit(idempotency_key=key).idempotency_key == key
    assert field_of(make_submit, idempotency_key=key + "k") == "idempotency_key"


@pytest.mark.parametrize("name", ["", "-leading-dash", "has space", "a" * 129, "ünï"])
def test_bad_service_name_refused(name: str) -> None:
    assert field_of(make_submit, service=name) == "service_name"


@pytest.mark.parametrize("name", ["a", "checkout", "team/checkout-api_v2.1", "a" * 128])
def test_good_service_names(name: str) -> None:
    assert validation.service_name(name) == name


def test_bad_hostname_is_named_by_index() -> None:
    assert field_of(make_submit, hosts=["web-1", "web 2"]) == "hostnames[1]"
    assert field_of(make_submit, hosts=[""]) == "hostnames[0]"
    assert field_of(make_submit, hosts=["-web"]) == "hostnames[0]"
    assert field_of(make_submit, hosts=["a" * 254]) == "hostnames[0]"


def test_longest_hostname_accepted() -> None:
    assert make_submit(hosts=["a" * 253]).hostnames == ("a" * 253,)


def test_duplicate_hostnames_refused() -> None:
    assert field_of(make_submit, hosts=["web-1", "web-2", "web-1"]) == "hostnames"


def test_too_many_hostnames_refused() -> None:
    hosts = [f"h{i}" for i in range(validation.MAX_HOSTS_PER_REQUEST + 1)]
    assert field_of(validation.hostnames, hosts) == "hostnames"


@pytest.mark.parametrize(
    ("call", "value"),
    [
        (validation.hostname, "web-1\n"),
        (validation.service_name, "checkout\n"),
        (validation.agent_id, "agent-1\n"),
        (lambda key, field: validation.string_map({key: "1"}, field), "native\n"),
    ],
)
def test_trailing_newline_refused(call: Any, value: str) -> None:
    with pytest.raises(InvalidArgument):
        call(value, "field")


# --- single fields -------------------------------------------------------------------------------


def test_uuid_field_parses() -> None:
    value = uuid.uuid4()
    assert validation.uuid_field(str(value), "command_id") == value


@pytest.mark.parametrize("value", ["", "not-a-uuid", "1234", "x" * 500])
def test_uuid_field_refuses_malformed(value: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validation.uuid_field(value, "request_id")
    assert info.value.field == "request_id"
    assert len(str(info.value)) < 200  # a long value is cut in the message


def test_uuid_field_empty_says_required() -> None:
    with pytest.raises(InvalidArgument) as info:
        validation.uuid_field("", "request_id")
    assert info.value.reason == "required"


@pytest.mark.parametrize("value", ["a", "host-1.example:abc_9", "x" * 128])
def test_agent_id_accepted(value: str) -> None:
    assert validation.agent_id(value) == value


@pytest.mark.parametrize("value", ["", "x" * 129, "a b", "a/b"])
def test_agent_id_refused(value: str) -> None:
    assert field_of(validation.agent_id, value, "hello.agent_id") == "hello.agent_id"


def test_bounded_string() -> None:
    assert validation.bounded_string("abc", "f", 3) == "abc"
    assert field_of(validation.bounded_string, "abcd", "f", 3) == "f"


def test_in_range() -> None:
    assert validation.in_range(5, "f", 5, 5) == 5
    assert field_of(validation.in_range, 4, "f", 5, 6) == "f"
    assert field_of(validation.in_range, 7, "f", 5, 6) == "f"
