"""Celery tasks: thin wrappers that take ids and call one service each."""

from celery import shared_task

from hosting import services


@shared_task
def schedule_tasks() -> int:
    result = services.schedule_pass()
    return len(result.assignments) if result else 0


@shared_task(acks_late=True)
def execute_task(task_id: str, attempt: int) -> None:
    services.execute(task_id, attempt)


@shared_task
def reap_tasks() -> dict:
    return services.tasks_reap()
