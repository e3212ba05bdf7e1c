"""Operator authentication and authorization: bearer tokens with a role and optional services.

The tokens file (TOML) holds only SHA-256 hashes of the tokens:

    [[tokens]]
    name = "alice"                      # the principal, as it appears in the audit trail
    sha256 = "9f86d08...."              # hex SHA-256 of the token
    role = "operator"                   # viewer | operator
    services = ["checkout", "search"]   # optional: only these services
    expires = 2027-01-01T00:00:00Z      # optional

`pulse-server token create` prints a new token and its entry. The file is re-read when it
changes. Tokens themselves are never logged: only principal names are.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from server.domain import PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)

TOKEN_PREFIX = "pulse_"
BEARER = "bearer "


class Role(StrEnum):
    VIEWER = "viewer"  # read: get, list, agents, history (and watch)
    OPERATOR = "operator"  # everything a viewer can, plus submit, cancel, stop


_RANK = {Role.VIEWER: 1, Role.OPERATOR: 2}


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role
    services: frozenset[str] = frozenset()  # empty: every service
    authenticated: bool = True

    @property
    def actor(self) -> str:
        """How the audit trail names this caller."""
        return f"operator:{self.name}" if self.authenticated else self.name

    def may_use(self, service: str) -> bool:
        return not self.services or service in self.services


# Local mode (no tokens configured): every operator RPC is open and recorded as `anonymous`.
ANONYMOUS = Principal("anonymous", Role.OPERATOR, authenticated=False)


@dataclass(frozen=True)
class TokenEntry:
    name: str
    sha256: str
    role: Role
    services: frozenset[str] = frozenset()
    expires_at: datetime | None = None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


class TokenFileError(ValueError):
    pass


def parse_tokens(text: str, source: str = "tokens file") -> dict[str, TokenEntry]:
    """Entries by hash; refuses anything malformed (a typo must not open or close access)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TokenFileError(f"{source}: {exc}") from exc
    entries: dict[str, TokenEntry] = {}
    for i, raw in enumerate(data.get("tokens", [])):
        where = f"{source}: tokens[{i}]"
        digest = str(raw.get("sha256", "")).lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise TokenFileError(f"{where}.sha256: must be 64 hex digits")
        try:
            role = Role(raw.get("role", ""))
        except ValueError:
            raise TokenFileError(
                f"{where}.role: must be one of {[r.value for r in Role]}"
            ) from None
        name = str(raw.get("name", "")) or f"token-{digest[:8]}"
        services = raw.get("services", [])
        if not isinstance(services, list) or not all(isinstance(s, str) for s in services):
            raise TokenFileError(f"{where}.services: must be a list of service names")
        expires = raw.get("expires")
        if expires is not None and not isinstance(expires, datetime):
            raise TokenFileError(f"{where}.expires: must be a TOML date-time")
        if expires is not None and expires.tzinfo is None:
            expires = expires.replace(tzinfo=UTC)
        if digest in entries:
            raise TokenFileError(f"{where}: the same token is listed twice")
        entries[digest] = TokenEntry(name, digest, role, frozenset(services), expires)
    return entries


class TokenFile:
    """The tokens file, re-read when its modification time changes (checked at most once per
    `recheck_seconds`). A file that became malformed keeps the previous tokens, with an error
    in the log."""

    def __init__(
        self,
        path: Path,
        recheck_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._recheck = recheck_seconds
        self._clock = clock
        self._stamp = os.stat(path).st_mtime_ns
        self._entries = parse_tokens(path.read_text(), str(path))
        self._checked = clock()

    def entries(self) -> dict[str, TokenEntry]:
        now = self._clock()
        if now - self._checked >= self._recheck:
            self._checked = now
            self._reload_if_changed()
        return self._entries

    def _reload_if_changed(self) -> None:
        try:
            stamp = os.stat(self.path).st_mtime_ns
            if stamp == self._stamp:
                return
            self._entries = parse_tokens(self.path.read_text(), str(self.path))
            self._stamp = stamp
            log.info("tokens file %s reloaded: %d tokens", self.path, len(self._entries))
        except (OSError, TokenFileError) as exc:
            log.error("tokens file not reloaded, keeping the previous tokens: %s", exc)


def bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    for key, value in metadata:
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            if text.lower().startswith(BEARER):
                return text[len(BEARER) :].strip()
            return ""
    return None


class Authorizer:
    """Who is calling, and may they? `tokens` None means local mode: everything is open."""

    def __init__(
        self,
        tokens: TokenFile | None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.tokens = tokens
        self._now = now

    @property
    def enabled(self) -> bool:
        return self.tokens is not None

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]]) -> Principal:
        if self.tokens is None:
            return ANONYMOUS
        token = bearer_token(metadata)
        if token is None:
            raise Unauthenticated(
                "missing credentials: send metadata 'authorization: Bearer <token>'"
            )
        if not token:
            raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
        entry = self.tokens.entries().get(hash_token(token))
        if entry is None:
            raise Unauthenticated("unknown token")
        if entry.expires_at is not None and entry.expires_at <= self._now():
            raise Unauthenticated(
                f"token of {entry.name} expired at {entry.expires_at.isoformat()}"
            )
        return Principal(entry.name, entry.role, entry.services)

    def require(self, metadata: Iterable[tuple[str, str | bytes]], role: Role) -> Principal:
        """Authenticate, then check the role: UNAUTHENTICATED, then PERMISSION_DENIED."""
        principal = self.authenticate(metadata)
        if _RANK[principal.role] < _RANK[role]:
            raise PermissionDenied(
                f"{principal.name} has role {principal.role}; this call needs role {role}"
            )
        return principal


def check_service(principal: Principal, service: str) -> None:
    if not principal.may_use(service):
        raise PermissionDenied(f"{principal.name} may not act on service {service!r}")


def token_entry_toml(
    name: str, token: str, role: Role, services: Sequence[str], expires: datetime | None
) -> str:
    lines = [
        "[[tokens]]",
        f"name = {json.dumps(name)}",
        f'sha256 = "{hash_token(token)}"',
        f'role = "{role}"',
    ]
    if services:
        lines.append(f"services = {json.dumps(list(services))}")
    if expires is not None:
        lines.append(f"expires = {expires.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}")
    return "\n".join(lines)
