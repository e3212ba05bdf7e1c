"""Versioned schema migrations: numbered SQL files applied once each, in order, under a lock."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Any constant works; it keeps two servers starting at once from applying the same migration twice.
_LOCK_KEY = 0x70756C7365  # "pulse"
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Every migration file, ordered by version; refuses gaps and duplicates."""
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if not match:
            raise ValueError(f"badly named migration file {path.name}")
        found.append(Migration(int(match[1]), match[2], path.read_text()))
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise ValueError(f"migration versions must be 1..n without gaps, got {versions}")
    return found


async def applied_versions(engine: AsyncEngine) -> list[int]:
    async with engine.connect() as conn:
        exists = await conn.scalar(text("SELECT to_regclass('schema_migrations') IS NOT NULL"))
        if not exists:
            return []
        rows = await conn.execute(text("SELECT version FROM schema_migrations ORDER BY version"))
        return [row.version for row in rows]


async def upgrade(engine: AsyncEngine, migrations: list[Migration] | None = None) -> list[int]:
    """Apply the pending migrations in one transaction; returns the versions applied."""
    migrations = available() if migrations is None else migrations
    async with engine.begin() as conn:
        await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
        await conn.execute(
            text(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
        )
        rows = await conn.execute(text("SELECT version FROM schema_migrations"))
        done = {row.version for row in rows}
        newer = sorted(done - {m.version for m in migrations})
        if newer:
            raise RuntimeError(
                f"database has migrations {newer} that this Pulse does not know; upgrade Pulse"
            )
        applied = []
        for migration in migrations:
            if migration.version in done:
                continue
            log.info("applying migration %04d_%s", migration.version, migration.name)
            await conn.exec_driver_sql(migration.sql)
            await conn.execute(
                text("INSERT INTO schema_migrations (version, name) VALUES (:v, :n)"),
                {"v": migration.version, "n": migration.name},
            )
            applied.append(migration.version)
    return applied
