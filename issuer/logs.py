"""Structured logging: one JSON object per line, through the standard ``logging`` module.

Audit events are ordinary log records on the ``issuer.audit`` logger whose ``extra`` carries ``event``
and identifiers (user, family, kid, ip, user agent). Callers never pass a password or a token; the
formatter also drops any extra whose name suggests one, as a second line of defence.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}
_SECRET_HINTS = ("password", "token", "secret", "authorization", "cookie", "kek")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name in _STANDARD or name.startswith("_"):
                continue
            if any(hint in name.lower() for hint in _SECRET_HINTS):
                continue
            entry[name] = value if isinstance(value, str | int | float | bool | type(None)) else str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        # ASCII only: a client's user agent or email may hold U+0085, U+2028 or U+2029, which some log
        # readers (Python's splitlines among them) take for line breaks, splitting one entry in two.
        return json.dumps(entry, ensure_ascii=True)


def uvicorn_log_config(level: str = "INFO") -> dict[str, Any]:
    """uvicorn's ``log_config``: JSON lines on stderr for uvicorn's and the issuer's loggers."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "issuer.logs.JsonFormatter"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "loggers": {
            "issuer": {"handlers": ["stderr"], "level": level, "propagate": False},
            "uvicorn": {"handlers": ["stderr"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": ["stderr"], "level": level, "propagate": False},
        },
    }
