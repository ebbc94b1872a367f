"""Structured logging: one JSON object per line on stderr, in the Elastic Common Schema (ECS).

Every line, the issuer's and uvicorn's, has the shape of the ecs-logging specification
(https://github.com/elastic/ecs-logging/tree/main/spec): ``@timestamp``, ``log.level`` and ``message`` first,
in that order, then ``ecs.version``, then everything else. The shape is deliberate:

- The four header keys are dotted top-level keys, as the specification writes them (its ``spec.json`` says
  ``log.level`` may not be nested). They come first, so a person reading the raw stream sees the time, the
  level and the sentence before the detail.
- Every other field is a nested JSON object (``"log": {"logger": ...}``, ``"event": {"action": ...}``,
  ``"user": {"id": ...}``): the form in which ECS defines its documents and Elasticsearch stores them, so
  ``jq '.event.action'`` works on the raw file and no pipeline has to expand dotted keys. Elastic's own ECS
  loggers emit exactly this mix, and Filebeat's and Elastic Agent's ECS log parsing read it as it is.
- Fields that ECS does not define live under the ``issuer`` namespace (``issuer.session_id``,
  ``issuer.kid``): ECS reserves its top-level names, and a namespace of our own cannot collide with a field
  a later ECS version adds.

Audit events (``issuer.audit``) are rendered by :mod:`issuer.audit`, which writes the finished line straight
to the stream of a :class:`JsonStreamHandler` (the cheap path, taken in production) or, for any other
handler, hands it a record carrying that line. Callers never pass a password or a token; both this
formatter and the audit renderer also drop any field whose name suggests one, as a second line of defence.
"""

from __future__ import annotations

import logging
import time
from json.encoder import encode_basestring_ascii
from typing import Any

ECS_VERSION = "8.11.0"

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}
_SECRET_HINTS = ("password", "token", "secret", "authorization", "cookie", "kek")
# The attribute on which issuer.audit hands a pre-rendered ECS line to handlers other than JsonStreamHandler.
ECS_LINE = "ecs_line"


def secret_named(name: str) -> bool:
    """Whether a field's name suggests it holds a secret; such fields are never written."""
    lowered = name.lower()
    return any(hint in lowered for hint in _SECRET_HINTS)


def json_string(value: str) -> str:
    """``value`` as a JSON string, ASCII only.

    ASCII only: a client's user agent or email may hold U+0085, U+2028 or U+2029, which some log readers
    (Python's splitlines among them) take for line breaks, splitting one entry in two."""
    return encode_basestring_ascii(value)


def json_scalar(value: object) -> str:
    """A field's value as JSON: strings, numbers, booleans and null as themselves, anything else as its str."""
    if isinstance(value, str):
        return encode_basestring_ascii(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value == value and value not in (float("inf"), float("-inf")):
        return repr(value)
    return encode_basestring_ascii(str(value))


class _SecondCache:
    """The ``YYYY-MM-DDTHH:MM:SS`` part of a timestamp, formatted once per second: ``strftime`` costs more
    than the rest of an audit line's rendering."""

    __slots__ = ("prefix", "second")

    def __init__(self) -> None:
        self.second = -1
        self.prefix = ""


_seconds = _SecondCache()


def timestamp(created: float) -> str:
    """``created`` (seconds since the epoch) as ECS's ``@timestamp``: UTC, milliseconds, ``Z``."""
    second = int(created)
    cache = _seconds
    if second != cache.second:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        cache.second, cache.prefix = second, prefix  # a thread reading between the two sees a stale second once
    else:
        prefix = cache.prefix
    millis = int((created - second) * 1000)
    return f"{prefix}.{millis:03d}Z"


def ecs_header(level: str, message_json: str) -> str:
    """The ecs-logging header after ``@timestamp``: level and message (already JSON), then ``ecs.version``."""
    return f',"log.level":{json_string(level)},"message":{message_json},"ecs.version":"{ECS_VERSION}"'


class JsonFormatter(logging.Formatter):
    """Any record as one ECS line: the header, ``log.logger``, ``error.*`` for an exception, and the record's
    extra attributes (those not named like a secret) under ``issuer``. A record from :mod:`issuer.audit`
    already carries its line, which is returned as it is."""

    def format(self, record: logging.LogRecord) -> str:
        line = getattr(record, ECS_LINE, None)
        if isinstance(line, str):
            return line
        parts = [
            '{"@timestamp":"',
            timestamp(record.created),
            '"',
            ecs_header(record.levelname.lower(), json_string(record.getMessage())),
            ',"log":{"logger":',
            json_string(record.name),
            "}",
        ]
        if record.exc_info:
            kind = record.exc_info[0]
            parts += [
                ',"error":{"type":',
                json_string(kind.__name__ if kind is not None else "Exception"),
                ',"message":',
                json_string(str(record.exc_info[1])),
                ',"stack_trace":',
                json_string(self.formatException(record.exc_info)),
                "}",
            ]
        extras = [
            f"{json_string(name)}:{json_scalar(value)}"
            for name, value in vars(record).items()
            if name not in _STANDARD and not name.startswith("_") and not secret_named(name)
        ]
        if extras:
            parts += [',"issuer":{', ",".join(extras), "}"]
        parts.append("}")
        return "".join(parts)


class JsonStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The stderr handler of ``issuer serve``. :mod:`issuer.audit` writes its finished lines through
    :meth:`write_line`, under the same lock and to the same stream as every record this handler formats, so
    audit lines and uvicorn's stay whole and in order."""

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self.setFormatter(JsonFormatter())

    def write_line(self, line: str) -> bool:
        """Write one finished line; ``False`` when the stream failed (the caller reports it as ``emit``
        would, through ``handleError``)."""
        self.acquire()
        try:
            self.stream.write(line + self.terminator)
            self.flush()
        except Exception:  # a log write must never break a request; the caller reports it
            return False
        finally:
            self.release()
        return True


def uvicorn_log_config(level: str = "INFO") -> dict[str, Any]:
    """uvicorn's ``log_config``: JSON lines on stderr for uvicorn's and the issuer's loggers."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {"stderr": {"class": "issuer.logs.JsonStreamHandler", "stream": "ext://sys.stderr"}},
        "loggers": {
            "issuer": {"handlers": ["stderr"], "level": level, "propagate": False},
            "uvicorn": {"handlers": ["stderr"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": ["stderr"], "level": level, "propagate": False},
        },
    }
