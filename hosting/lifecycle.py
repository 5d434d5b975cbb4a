"""What task hosting tells billing: a signal after each run (attempt) of a task ends.

Billing meters from TaskRun rows (started_at → ended_at, per second, only when `chargeable`),
listening to this signal and also sweeping for finished runs it has not metered yet, so a
lost signal never loses usage.
"""

from django.db import transaction
from django.dispatch import Signal

from hosting.models import TaskRun

# Sent after commit with run=<TaskRun> once ended_at and outcome are set.
task_run_finished = Signal()


def announce_run_finished(run: TaskRun) -> None:
    transaction.on_commit(lambda: task_run_finished.send(sender=TaskRun, run=run))
