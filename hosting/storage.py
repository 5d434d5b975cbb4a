"""Each tenant's own storage for task inputs and results. A task's files live under
<root>/<tenant id>/tasks/<task id>/; every path is resolved inside that folder, so no tenant
can read another's, whatever name it asks for."""

from dataclasses import dataclass
from pathlib import Path

from django.conf import settings


def _root() -> Path:
    return Path(settings.PORTAL_TASK_STORAGE_ROOT or Path(settings.MEDIA_ROOT) / "tenants")


def task_dir(task) -> Path:
    return _root() / str(task.tenant_id) / "tasks" / str(task.pk)


def attempt_workdir(task) -> Path:
    """Where attempts run. Kept across attempts, so a retried or preempted task finds its checkpoints."""
    path = task_dir(task)
    (path / "output").mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class ResultFile:
    path: str  # relative to the task's output folder
    size: int


def result_files(task) -> list[ResultFile]:
    output = task_dir(task) / "output"
    if not output.is_dir():
        return []
    return sorted(
        (ResultFile(path=str(p.relative_to(output)), size=p.stat().st_size) for p in output.rglob("*") if p.is_file()),
        key=lambda f: f.path,
    )


def result_path(task, relative: str) -> Path:
    """The file of the task's results named `relative`; FileNotFoundError for anything outside or missing."""
    output = (task_dir(task) / "output").resolve()
    candidate = (output / relative).resolve()
    if output not in candidate.parents or not candidate.is_file():
        raise FileNotFoundError(relative)
    return candidate
