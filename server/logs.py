"""Log set-up for pulse-server and pulse-agent: the classic text lines, or one JSON object per
line (`--log-format json`) carrying the ids a line is about as fields of their own.

Callers attach ids with `extra=ids(request_id=..., command_id=..., agent_id=...)`.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")
# Record attributes copied into JSON lines when a caller set them (via `extra=`).
ID_FIELDS = ("request_id", "command_id", "agent_id", "session_id", "server_id")


def ids(**values: object) -> dict[str, str]:
    """`extra=` for a log call: the given ids as strings, None values left out."""
    return {key: str(value) for key, value in values.items() if value is not None}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the ids, and any exception."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ID_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                line[key] = str(value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class _Stamp(logging.Filter):
    def __init__(self, values: dict[str, str]) -> None:
        super().__init__()
        self._values = values

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in self._values.items():
            if getattr(record, key, None) is None:
                setattr(record, key, value)
        return True


def stamp(**values: object) -> None:
    """Give every record from now on these ids unless it has its own (e.g. the agent's id)."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(_Stamp(ids(**values)))


def configure(level: str, fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send every log record to stderr (or `stream`) in the chosen format."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
