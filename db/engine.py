"""Database URLs, the async engine, and the embedded PostgreSQL used when no URL is given."""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

log = logging.getLogger(__name__)

DATABASE_URL_ENV = "PULSE_DATABASE_URL"


def libpq_url(url: str) -> str:
    """The URL as libpq/psycopg want it (no SQLAlchemy driver suffix)."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def sqlalchemy_url(url: str) -> str:
    """The URL for SQLAlchemy's async psycopg 3 dialect."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def start_embedded(data_dir: Path) -> str:
    """Start (or join) a private PostgreSQL under `data_dir` and return its URL.

    pgserver ships PostgreSQL binaries in a wheel, so this works with no system install. The server
    keeps running while any process holds it and stops when the last one exits.
    """
    import pgserver  # imported lazily: only needed without a database URL

    logging.getLogger("pgserver").setLevel(logging.WARNING)

    pgdata = data_dir / "pgdata"
    pgdata.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(str(pgdata), cleanup_mode="stop")
    url: str = server.get_uri()
    log.info("started embedded PostgreSQL in %s", pgdata)
    return url


def create_engine(
    url: str, *, pool_size: int = 10, statement_timeout_ms: int = 15000
) -> AsyncEngine:
    """An async engine on psycopg 3.

    `prepare_threshold=None` turns off server-side prepared statements: the claim's best plan
    depends on the data, and a cached generic plan was measured far slower than a custom one.
    """
    return create_async_engine(
        sqlalchemy_url(url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_timeout=10,
        connect_args={
            "prepare_threshold": None,
            "connect_timeout": 5,
            "options": f"-c statement_timeout={statement_timeout_ms}",
        },
    )
