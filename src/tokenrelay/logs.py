"""How ``tokenrelay serve`` logs: uvicorn's text lines, or JSON lines with request ids.

Every request gets an id (``api/tracking.py``), kept in ``REQUEST_ID`` for the task serving it
and the tasks it starts (a generation logs under the request that began it), and returned as
``X-Request-Id``. ``log_config`` is the ``logging.config.dictConfig`` that ``serve`` hands to
uvicorn, which applies it in every worker process.

What never reaches a log: a key or a prompt. tokenrelay's own records never hold request or
answer text, and the access log loses the query string (``GET /api/ask?prompt=...``).
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import orjson

from tokenrelay.config import Settings

__all__ = ["REQUEST_ID", "AccessPaths", "JsonFormatter", "RequestIds", "log_config"]

REQUEST_ID: ContextVar[str | None] = ContextVar("tokenrelay_request_id", default=None)
"""The id of the request the current task serves (None outside a request)."""

_ACCESS_ARGS = 5  # uvicorn's access record: client, method, path with query, HTTP version, status


class RequestIds(logging.Filter):
    """Gives every record the ``request_id`` of the request being served, if any."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class AccessPaths(logging.Filter):
    """uvicorn's access records with the path only: a query string may carry a prompt."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == _ACCESS_ARGS:
            path = args[2]
            if isinstance(path, str) and "?" in path:
                record.args = (args[0], args[1], path.partition("?")[0], args[3], args[4])
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, with named fields only.

    Written out rather than taken from a library formatter: those add every extra attribute a
    record carries, and what a log line may hold should be a list someone can read.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
            "pid": record.process,
        }
        args = record.args
        if (
            record.name == "uvicorn.access"
            and isinstance(args, tuple)
            and len(args) == _ACCESS_ARGS
        ):
            entry["client"], entry["method"], entry["path"], _, entry["status"] = args
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def log_config(settings: Settings) -> dict[str, Any]:
    """uvicorn's logging, plus tokenrelay's own records, request ids and paths without queries."""
    if settings.log_format == "json":
        json_formatter = {"()": f"{__name__}.JsonFormatter"}
        formatters: dict[str, Any] = {"default": json_formatter, "access": json_formatter}
    else:  # uvicorn's own (``uvicorn.config.LOGGING_CONFIG``), also used for our records
        formatters = {
            "default": {
                "()": "uvicorn.logging.DefaultFormatter",
                "fmt": "%(levelprefix)s %(message)s",
                "use_colors": None,
            },
            "access": {
                "()": "uvicorn.logging.AccessFormatter",
                "fmt": '%(levelprefix)s %(client_addr)s - "%(request_line)s" %(status_code)s',
            },
        }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {
            "request_ids": {"()": f"{__name__}.RequestIds"},
            "access_paths": {"()": f"{__name__}.AccessPaths"},
        },
        "formatters": formatters,
        "handlers": {
            "default": {
                "formatter": "default",
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "filters": ["request_ids"],
            },
            "access": {
                "formatter": "access",
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stdout",
                "filters": ["access_paths", "request_ids"],
            },
        },
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
            "tokenrelay": {
                "handlers": ["default"],
                "level": settings.log_level.upper(),
                "propagate": False,
            },
        },
    }
