import os

from celery import Celery, states
from celery.signals import (
    before_task_publish,
    setup_logging,
    task_postrun,
    task_prerun,
    worker_init,
)

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

app = Celery("portal")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@setup_logging.connect
def _use_django_logging(loglevel=None, **_):
    """Workers and beat log through settings.LOGGING (JSON with PORTAL_LOG_FORMAT=json), not Celery's
    own format; --loglevel still sets the level."""
    import logging
    from logging.config import dictConfig

    from django.conf import settings

    dictConfig(settings.LOGGING)
    if loglevel:
        logging.getLogger().setLevel(loglevel)


@before_task_publish.connect
def _carry_request_id(headers=None, **_):
    """Carry the web request's id (and its tenant and user, for the logs) into the task, so logs and
    audit events of both join up."""
    from portal.context import current
    from portal.logging import current_log_context

    if headers is None:
        return
    if current().request_id:
        headers.setdefault("portal_request_id", current().request_id)
    tenant, user_id = current_log_context().subject()
    if tenant:
        headers.setdefault("portal_tenant", tenant)
    if user_id is not None:
        headers.setdefault("portal_user_id", user_id)


# Context tokens of the tasks running in this process, by task id, to restore what was there before.
_bound: dict[str, tuple] = {}


def _header(task, name: str):
    request = task.request
    return getattr(request, name, None) or (request.headers or {}).get(name)


@task_prerun.connect
def _restore_request_id(task_id=None, task=None, **_):
    """Bind the publishing request's id (from the task's headers) for the task's run. A task run inline
    (eager: the embedded default, tests) was never published: it keeps the id, tenant and user of the
    request running it. In a worker nothing is bound between tasks, so a task without headers has none."""
    from portal import metrics
    from portal.context import RequestContext, bind, current
    from portal.logging import LogContext, bind_log_context, current_log_context

    metrics.task_started(task_id)
    tenant, user_id = current_log_context().subject()
    request_id = _header(task, "portal_request_id") or current().request_id
    _bound[task_id] = (
        bind(RequestContext(request_id=request_id, source_ip=None, via="system")),
        bind_log_context(
            LogContext(
                tenant=_header(task, "portal_tenant") or tenant, user_id=_header(task, "portal_user_id") or user_id
            )
        ),
    )


@task_postrun.connect
def _clear_request_id(task_id=None, task=None, state=None, **_):
    """Time the task and count it when it failed; put back what was bound before it, so the next task on
    this worker starts without an id."""
    from portal import metrics
    from portal.context import reset
    from portal.logging import reset_log_context

    # A task run inline with eager_propagates re-raises to its caller before Celery records a state
    # (task_failure is not sent then either): no state means it raised.
    metrics.task_finished(task_id, task.name, failed=state in (states.FAILURE, None))
    tokens = _bound.pop(task_id, None)
    if tokens is not None:
        context_token, log_token = tokens
        reset_log_context(log_token)
        reset(context_token)


@worker_init.connect
def _serve_worker_metrics(**_):
    from django.conf import settings

    from portal import metrics

    if settings.PORTAL_WORKER_METRICS_PORT:
        metrics.start_worker_exporter(settings.PORTAL_WORKER_METRICS_PORT, settings.PORTAL_WORKER_METRICS_ADDR)
