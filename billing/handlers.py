"""Signal receivers: what provisioning and task hosting tell billing, handed to Celery tasks.

Both signals are sent after commit. A receiver never lets a billing failure break the sender:
it logs, and the sweepers meter whatever was missed.
"""

import logging

from django.dispatch import receiver

from hosting.lifecycle import task_run_finished
from provisioning.lifecycle import vm_lifecycle

logger = logging.getLogger(__name__)


@receiver(vm_lifecycle, dispatch_uid="billing.vm_lifecycle")
def on_vm_lifecycle(sender, event, **kwargs):
    from billing import tasks

    try:
        tasks.bill_vm_event.delay(event.pk)
    except Exception:
        logger.exception("Billing could not take VM lifecycle event %s; the sweepers will", event.pk)


@receiver(task_run_finished, dispatch_uid="billing.task_run_finished")
def on_task_run_finished(sender, run, **kwargs):
    from billing import tasks

    try:
        tasks.meter_task_run.delay(run.pk)
    except Exception:
        logger.exception("Billing could not meter task run %s; the sweeper will", run.pk)
