"""What the agent persists on its host: its id, and every command it has started.

A command is recorded as started (and the write is durable) before profiling begins, so the agent
never runs one command id twice, across reconnects, crashes and restarts. Finished commands keep
their completion until the server has recorded it, so a restart re-sends unreported completions.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

# A command can be delivered for at most its TTL (<= 1 day) after it was created, so records of
# reported commands older than this can never be needed again to refuse a second run.
KEEP_REPORTED_SECONDS = 3 * 86400


@dataclass(frozen=True)
class PendingReport:
    command_id: str
    completion: dict[str, object]


class RunRecord(Protocol):
    """What the agent remembers: its id and the commands it has started and finished."""

    def agent_id(self) -> str: ...
    def has_run(self, command_id: str) -> bool: ...
    def mark_started(self, command_id: str) -> bool: ...
    def mark_finished(self, command_id: str, completion: dict[str, object]) -> None: ...
    def mark_reported(self, command_id: str) -> None: ...
    def unreported(self) -> list[PendingReport]: ...
    def recently_finished(self, limit: int = 32) -> list[str]: ...
    def close(self) -> None: ...


class AgentState:
    """The durable record, in SQLite under the agent's state directory."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._lock = threading.Lock()
        self._db = sqlite3.connect(directory / "runs.sqlite3", check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            """
            CREATE TABLE IF NOT EXISTS runs (
                command_id TEXT PRIMARY KEY,
                started_at REAL NOT NULL,
                finished INTEGER NOT NULL DEFAULT 0,
                completion TEXT,
                reported INTEGER NOT NULL DEFAULT 0
            )
            """
        )
        self._db.commit()

    def agent_id(self) -> str:
        """The host's stable agent id, created on first use."""
        path = self.directory / "agent_id"
        if path.exists():
            value = path.read_text().strip()
            if value:
                return value
        value = str(uuid.uuid4())
        tmp = path.with_suffix(".tmp")
        tmp.write_text(value + "\n")
        tmp.replace(path)
        return value

    def has_run(self, command_id: str) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM runs WHERE command_id = ?", (command_id,)
            ).fetchone()
        return row is not None

    def mark_started(self, command_id: str) -> bool:
        """Record a start; False if this command was started before (it must not run again)."""
        with self._lock:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO runs (command_id, started_at) VALUES (?, ?)",
                (command_id, time.time()),
            )
            self._db.commit()
            return cursor.rowcount == 1

    def mark_finished(self, command_id: str, completion: dict[str, object]) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE runs SET finished = 1, completion = ? WHERE command_id = ?",
                (json.dumps(completion), command_id),
            )
            self._db.commit()

    def mark_reported(self, command_id: str) -> None:
        with self._lock:
            self._db.execute("UPDATE runs SET reported = 1 WHERE command_id = ?", (command_id,))
            self._db.execute(
                "DELETE FROM runs WHERE reported = 1 AND started_at < ?",
                (time.time() - KEEP_REPORTED_SECONDS,),
            )
            self._db.commit()

    def unreported(self) -> list[PendingReport]:
        with self._lock:
            rows = self._db.execute(
                "SELECT command_id, completion FROM runs WHERE finished = 1 AND reported = 0 "
                "ORDER BY started_at"
            ).fetchall()
        return [PendingReport(command_id, json.loads(blob)) for command_id, blob in rows]

    def interrupted(self) -> list[str]:
        """Commands started by an earlier run of the agent that never finished."""
        with self._lock:
            rows = self._db.execute(
                "SELECT command_id FROM runs WHERE finished = 0 ORDER BY started_at"
            ).fetchall()
        return [row[0] for row in rows]

    def recently_finished(self, limit: int = 32) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT command_id FROM runs WHERE finished = 1 ORDER BY started_at DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [row[0] for row in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class MemoryAgentState:
    """The same record kept in memory: for the fleet emulator, where thousands of agents share
    one process and none of them outlives it. Not for real agents (nothing survives a restart)."""

    def __init__(self, agent_id: str) -> None:
        self._agent_id = agent_id
        self._started: dict[str, float] = {}
        self._finished: dict[str, dict[str, object]] = {}
        self._reported: set[str] = set()

    def agent_id(self) -> str:
        return self._agent_id

    def has_run(self, command_id: str) -> bool:
        return command_id in self._started

    def mark_started(self, command_id: str) -> bool:
        if command_id in self._started:
            return False
        self._started[command_id] = time.time()
        return True

    def mark_finished(self, command_id: str, completion: dict[str, object]) -> None:
        self._finished[command_id] = completion

    def mark_reported(self, command_id: str) -> None:
        self._reported.add(command_id)
        self._finished.pop(command_id, None)

    def unreported(self) -> list[PendingReport]:
        return [PendingReport(c, done) for c, done in self._finished.items()]

    def recently_finished(self, limit: int = 32) -> list[str]:
        done = [c for c in self._started if c in self._reported or c in self._finished]
        return done[-limit:]

    def close(self) -> None:
        pass
