import os

from celery import Celery
from celery.signals import before_task_publish, task_prerun

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

app = Celery("portal")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@before_task_publish.connect
def _carry_request_id(headers=None, **_):
    """Carry the web request's id into the task, so logs and audit events of both join up."""
    from portal.context import current

    if headers is not None and current().request_id:
        headers.setdefault("portal_request_id", current().request_id)


@task_prerun.connect
def _restore_request_id(task=None, **_):
    from portal.context import RequestContext, bind

    request_id = getattr(task.request, "portal_request_id", None) if task else None
    bind(RequestContext(request_id=request_id or "", source_ip=None, via="system"))
