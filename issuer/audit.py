"""The audit trail: one ECS line per security-relevant event, with an action and an outcome.

Call :func:`audit` where the event happened::

    audit("refresh", "success", user_id=user.id, ip=ip, user_agent=agent, session_id=family_id)

Every line carries ``event.action`` (one of :data:`Action`), ``event.outcome`` (``success``, ``failure`` or
``unknown``), ``event.kind``/``event.category``/``event.type`` as ECS defines them for that action, and the
identifiers given: ``user.id``, ``source.ip``, ``user_agent.original``, ``event.reason``, and under the
``issuer`` namespace the session (a refresh-token family: ECS has no session field) and any other keyword
(``issuer.kid``, ``issuer.route``, ...). The README's "Audit log" section lists every field. The line shape
(ecs-logging header, nested objects) is explained in :mod:`issuer.logs`.

Every refresh is audited, so a line must cost little next to a refresh (``make bench`` measures it; see
``docs/performance.md``). Hence:

- the constant part of each (action, outcome) pair (level, logger, ecs.version and the whole ``event``
  object up to ``outcome``) is rendered once, and each line joins it with the few strings that vary, each
  escaped by the C JSON encoder: no dictionary, no ``json.dumps`` of an object;
- no ``logging.LogRecord`` is built for a :class:`~issuer.logs.JsonStreamHandler` (``issuer serve``'s stderr
  handler): the finished line is written to its stream under its lock, so it stays in order with uvicorn's
  lines on the same stream. Any other handler (pytest's capture, the CLI's plain-text ``basicConfig``, an
  operator's own) gets an ordinary record whose ``ecs_line`` attribute holds the line (the JSON formatter
  returns it as it is) and whose attributes ``event``, ``outcome`` and the keywords given describe it.

The logger's level, ``disabled`` flag, filters and propagation are honoured as ``logging`` would honour them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal

from issuer.logs import (
    ECS_LINE,
    JsonFormatter,
    JsonStreamHandler,
    ecs_header,
    json_scalar,
    json_string,
    secret_named,
    timestamp,
)

Outcome = Literal["success", "failure", "unknown"]
Action = Literal[
    "register",
    "login",
    "login_locked",
    "rate_limited",
    "refresh",
    "refresh_reuse",
    "refresh_suspicious",
    "logout",
    "logout_all",
    "session_revoked",
    "account_deleted",
    "account_delete_locked",
    "key_created",
    "key_rotated",
    "key_revoked",
    "client_auth",
    "token_revoked",
]
Scalar = str | int | bool | None
_Fields = tuple[tuple[str, Scalar], ...]  # what a record for another handler carries as attributes

LOGGER = "issuer.audit"


@dataclass(frozen=True)
class _Kind:
    """What ECS says about an action (its categorization fields), and how it is logged by default."""

    category: tuple[str, ...]
    type: tuple[str, ...]
    message: str
    level: int = logging.INFO
    kind: str = "event"


# ECS categorization: https://www.elastic.co/guide/en/ecs/current/ecs-allowed-values-event-category.html and
# ...-event-type.html. Each type is one ECS lists as expected for its categories.
_KINDS: dict[str, _Kind] = {
    "register": _Kind(("iam",), ("user", "creation"), "account registered"),
    "login": _Kind(("authentication", "session"), ("start",), "login"),
    "login_locked": _Kind(("authentication",), ("start",), "login refused: account locked"),
    "rate_limited": _Kind(("network",), ("denied",), "rate limited"),
    "refresh": _Kind(("authentication", "session"), ("info",), "refresh"),
    "refresh_reuse": _Kind(
        ("authentication", "session"),
        ("end",),
        "refresh token reuse detected; session revoked",
        logging.WARNING,
        "alert",
    ),
    "refresh_suspicious": _Kind(
        ("authentication", "session"), ("info",), "suspicious refresh", logging.WARNING, "alert"
    ),
    "logout": _Kind(("session",), ("end",), "logout"),
    "logout_all": _Kind(("session",), ("end",), "logout everywhere"),
    "session_revoked": _Kind(("session",), ("end",), "session revoked"),
    "account_deleted": _Kind(("iam",), ("user", "deletion"), "account deleted"),
    "account_delete_locked": _Kind(("iam",), ("user", "deletion"), "account deletion refused: account locked"),
    "client_auth": _Kind(("authentication",), ("info",), "client authentication"),
    "token_revoked": _Kind(("session",), ("end",), "token revocation (RFC 7009)"),
    "key_created": _Kind(("configuration",), ("creation",), "signing key created", logging.WARNING),
    "key_rotated": _Kind(("configuration",), ("creation",), "signing key published", logging.WARNING),
    "key_revoked": _Kind(("configuration",), ("deletion",), "signing key revoked", logging.WARNING),
}


@dataclass(frozen=True)
class _Template:
    level: int
    action: str
    outcome: str
    header: str  # from ``,"log.level"`` up to the message, without it: ``,"log.level":"info","message":``
    message: str  # the default message, as JSON
    middle: str  # after the message: ecs.version, log.logger, and the event object up to its outcome


def _template(action: str, outcome: str, level: int | None) -> _Template:
    kind = _KINDS[action]
    level = kind.level if level is None else level
    levelname = logging.getLevelName(level).lower()
    header = ecs_header(levelname, "\x00")
    head, _, tail = header.partition("\x00")
    event = (
        f',"event":{{"kind":{json_string(kind.kind)},"category":[{",".join(map(json_string, kind.category))}],'
        f'"type":[{",".join(map(json_string, kind.type))}],"action":{json_string(action)},'
        f'"outcome":{json_string(outcome)}'
    )
    middle = f'{tail},"log":{{"logger":"{LOGGER}"}}{event}'
    return _Template(level, action, outcome, head, json_string(kind.message), middle)


class AuditLog:
    """The renderer and writer behind :func:`audit`; one per process, on the ``issuer.audit`` logger."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._templates: dict[tuple[str, str, int | None], _Template] = {}

    def __call__(
        self,
        action: Action,
        outcome: Outcome,
        message: str | None = None,
        *,
        user_id: str | None = None,
        ip: str | None = None,
        user_agent: str | None = None,
        session_id: str | None = None,
        reason: str | None = None,
        level: int | None = None,
        **fields: Scalar,
    ) -> None:
        template = self._templates.get((action, outcome, level))
        if template is None:
            template = self._templates[(action, outcome, level)] = _template(action, outcome, level)
        logger = self._logger
        if logger.disabled or not logger.isEnabledFor(template.level):
            return
        parts = [
            '{"@timestamp":"',
            timestamp(time.time()),
            '"',
            template.header,
            template.message if message is None else json_string(message),
            template.middle,
        ]
        if reason is not None:
            parts += (',"reason":', json_string(reason))
        parts.append("}")
        if user_id is not None:
            parts += (',"user":{"id":', json_string(user_id), "}")
        if ip is not None:
            parts += (',"source":{"ip":', json_string(ip), "}")
        if user_agent is not None:
            parts += (',"user_agent":{"original":', json_string(user_agent), "}")
        if session_id is not None or fields:
            custom = [] if session_id is None else [f'"session_id":{json_string(session_id)}']
            custom += [
                f"{json_string(name)}:{json_scalar(value)}"
                for name, value in fields.items()
                if value is not None and not secret_named(name)
            ]
            parts += (',"issuer":{', ",".join(custom), "}")
        parts.append("}")
        given = (("user_id", user_id), ("ip", ip), ("user_agent", user_agent), ("session_id", session_id))
        self._deliver(template, "".join(parts), message, (*given, ("reason", reason), *fields.items()))

    def _deliver(self, template: _Template, line: str, message: str | None, fields: _Fields) -> None:
        """``Logger.callHandlers``, with the finished line written straight to every JSON stream handler."""
        logger = self._logger
        record: logging.LogRecord | None = None
        if logger.filters:  # a filter on the logger itself sees every record: take the ordinary path
            logger.handle(self._record(template, line, message, fields))
            return
        found = False
        node: logging.Logger | None = logger
        while node is not None:
            for handler in node.handlers:
                found = True
                if template.level < handler.level:
                    continue
                if (
                    isinstance(handler, JsonStreamHandler)
                    and not handler.filters
                    and type(handler.formatter) is JsonFormatter
                ):
                    if not handler.write_line(line):
                        handler.handleError(record or self._record(template, line, message, fields))
                    continue
                if record is None:
                    record = self._record(template, line, message, fields)
                handler.handle(record)
            node = node.parent if node.propagate else None
        last_resort = logging.lastResort
        if not found and last_resort is not None and template.level >= last_resort.level:
            last_resort.handle(record or self._record(template, line, message, fields))

    def _record(self, template: _Template, line: str, message: str | None, fields: _Fields) -> logging.LogRecord:
        attributes: dict[str, object] = {ECS_LINE: line, "event": template.action, "outcome": template.outcome}
        attributes.update(
            (name, value)
            for name, value in fields
            if value is not None and name not in _RECORD_ATTRIBUTES and not secret_named(name)
        )
        text = message if message is not None else _KINDS[template.action].message
        return self._logger.makeRecord(self._logger.name, template.level, __file__, 0, text, (), None, extra=attributes)


_RECORD_ATTRIBUTES = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}

audit = AuditLog(logging.getLogger(LOGGER))
"""Write one audit line: ``audit(action, outcome, message=None, *, user_id=, ip=, user_agent=, session_id=,
reason=, level=, **fields)``. ``fields`` land under ``issuer``; ``None`` values are left out."""
