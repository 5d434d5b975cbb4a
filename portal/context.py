"""Who is acting and from where, for the current request or task.

Set once by RequestContextMiddleware (or by a Celery task) and read by the
audit log, so services record the source IP and request id without every
caller passing them along.
"""

from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True)
class RequestContext:
    request_id: str = ""
    source_ip: str | None = None
    via: str = "system"


_EMPTY = RequestContext()
_current: ContextVar[RequestContext | None] = ContextVar("portal_request_context", default=None)


def current() -> RequestContext:
    return _current.get() or _EMPTY


def bind(context: RequestContext):
    return _current.set(context)


def reset(token) -> None:
    _current.reset(token)
