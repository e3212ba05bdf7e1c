"""Shared fixtures: a real PostgreSQL (PULSE_TEST_DATABASE_URL, or an embedded one) with one
fresh database per test, cloned from a migrated template."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
TEST_DATABASE_URL_ENV = "PULSE_TEST_DATABASE_URL"


def _with_database(url: str, name: str) -> str:
    return make_url(url).set(database=name).render_as_string(hide_password=False)


def _admin(url: str) -> psycopg.Connection:
    return psycopg.connect(_with_database(url, "postgres"), autocommit=True)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """URL of a PostgreSQL server the tests may create databases on."""
    url = os.environ.get(TEST_DATABASE_URL_ENV)
    if url:
        yield url
        return
    from db.engine import start_embedded

    yield start_embedded(ROOT / ".pulse-test")


@pytest.fixture(scope="session")
def template_database(pg_url: str) -> Iterator[str]:
    """A database with every migration applied, cloned for each test."""
    import asyncio

    from db import migrate
    from db.engine import create_engine

    name = f"pulse_tmpl_{os.getpid()}"
    with _admin(pg_url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')

    async def upgrade() -> None:
        engine = create_engine(_with_database(pg_url, name), pool_size=1)
        await migrate.upgrade(engine)
        await engine.dispose()

    asyncio.run(upgrade())
    yield name
    with _admin(pg_url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def empty_database_url(pg_url: str) -> Iterator[str]:
    """A fresh database with no schema at all (for migration tests)."""
    name = f"pulse_t_{uuid.uuid4().hex[:12]}"
    with _admin(pg_url) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield _with_database(pg_url, name)
    with _admin(pg_url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database_url(pg_url: str, template_database: str) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    name = f"pulse_t_{uuid.uuid4().hex[:12]}"
    with _admin(pg_url) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    yield _with_database(pg_url, name)
    with _admin(pg_url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[object]:
    from db.engine import create_engine
    from db.store import Store

    engine = create_engine(database_url, pool_size=4)
    yield Store(engine)
    await engine.dispose()
