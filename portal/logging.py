"""Log records that say which request (or the task it enqueued), tenant and user they belong to.

`ContextFilter` (on the console handler, settings.LOGGING) adds request_id, tenant and user_id to
every record; `JsonFormatter` writes one JSON object per line (PORTAL_LOG_FORMAT=json, for log
shippers in production); `TextFormatter` (the default) shows the request id too.

The request id comes from portal.context (RequestContextMiddleware binds it; portal.celery carries it
in the task's headers and binds it again in the worker). Tenant and user come from the LogContext
bound here: the request being served, or the values a Celery task was published with.
"""

import json
import logging
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.utils.functional import LazyObject, empty

from portal.context import current


@dataclass(frozen=True)
class LogContext:
    request: Any = None  # the HttpRequest being served; read without causing any lookup
    tenant: str | None = None  # a Celery task's, from the publishing request
    user_id: int | None = None

    def subject(self) -> tuple[str | None, int | None]:
        """(tenant slug, user id), each None while unknown."""
        if self.request is None:
            return self.tenant, self.user_id
        tenant = _resolved(getattr(self.request, "tenant", None))
        user = _resolved(getattr(self.request, "user", None))
        return (
            getattr(tenant, "slug", None),
            user.pk if user is not None and getattr(user, "is_authenticated", False) else None,
        )


def _resolved(value):
    """The value, or None while it is a lazy object nobody has evaluated yet. Evaluating request.user
    or request.tenant here would run queries from inside logging (and log them, recursively)."""
    if isinstance(value, LazyObject):
        wrapped = value._wrapped
        return None if wrapped is empty else wrapped
    return value


_EMPTY = LogContext()
_log_context: ContextVar[LogContext | None] = ContextVar("portal_log_context", default=None)


def current_log_context() -> LogContext:
    return _log_context.get() or _EMPTY


def bind_log_context(context: LogContext):
    return _log_context.set(context)


def reset_log_context(token) -> None:
    _log_context.reset(token)


class ContextFilter(logging.Filter):
    """Adds request_id, tenant and user_id to each record (values passed in `extra` win)."""

    def filter(self, record: logging.LogRecord) -> bool:
        tenant, user_id = current_log_context().subject()
        for name, value in (("request_id", current().request_id or None), ("tenant", tenant), ("user_id", user_id)):
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


class TextFormatter(logging.Formatter):
    """Time, level, logger, [request id or -], message: for a terminal (make run)."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_label)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.request_label = getattr(record, "request_id", None) or "-"
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp (UTC, ISO 8601), level, logger, message, request_id,
    tenant, user_id, and exception (the formatted traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "timestamp": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
            "tenant": getattr(record, "tenant", None),
            "user_id": getattr(record, "user_id", None),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)
