"""Pages for task hosting: the tenant's tasks, submitting one, and each task's live progress, metrics, log,
usage and results. Thin: forms in, services out."""

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.http import FileResponse, Http404, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.utils.translation import gettext as _
from django.views.decorators.http import require_GET, require_POST

from hosting import selectors, services, storage
from hosting.examples import EXAMPLES
from hosting.forms import TaskForm
from hosting.models import FINISHED_TASK_STATES, Task, TaskState
from provisioning.models import GpuModel
from tenants.forms import add_service_errors
from tenants.roles import Capability, role_can
from tenants.views import run_action, tenant_page

TASKS_PER_PAGE = 50
LOG_LINES = 2000  # the page shows (and keeps, as lines arrive) the last this many lines; the full log is a link
CHART_POINTS = 2000


def _duration(seconds: int) -> str:
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def _task_or_404(request, pk) -> Task:
    try:
        return selectors.task_of(request.membership.tenant, pk)
    except Task.DoesNotExist as exc:
        raise Http404 from exc


# --- The tenant's tasks ---------------------------------------------------------------------------


@tenant_page(Capability.VIEW_COMPUTE)
@require_GET
def task_list(request):
    tasks = selectors.tasks_of(request.membership.tenant)
    state = request.GET.get("state")
    if state in TaskState.values:
        tasks = tasks.filter(state=state)
    page = Paginator(tasks, TASKS_PER_PAGE).get_page(request.GET.get("page"))
    positions = selectors.queue_positions(page.object_list)
    for task in page:
        task.queue_position = positions.get(task.pk)
    return render(
        request,
        "hosting/task_list.html",
        {
            "page": page,
            "state": state if state in TaskState.values else "",
            "states": TaskState.choices,
            "can_submit": role_can(request.membership.role, Capability.USE_COMPUTE),
        },
    )


@tenant_page(Capability.USE_COMPUTE)
def task_new(request):
    example = EXAMPLES.get(request.GET.get("example", ""))
    initial = {key: value for key, value in (example or {}).items() if key in TaskForm.base_fields}
    if isinstance(initial.get("env"), dict):
        initial["env"] = "\n".join(f"{name}={value}" for name, value in initial["env"].items())
    form = TaskForm(request.POST or None, request.FILES or None, gpu_models=GpuModel.objects.all(), initial=initial)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            task = services.task_submit(
                membership=request.membership,
                actor=request.user,
                **{name: data[name] for name in TaskForm.base_fields},
            )
        except ValidationError as exc:
            add_service_errors(form, exc)
        else:
            messages.success(request, _("%(name)s submitted: it starts as soon as it can.") % {"name": task.name})
            return redirect("task_detail", pk=task.pk)
    examples = {key: {**example, "key": key} for key, example in EXAMPLES.items()}
    return render(request, "hosting/task_new.html", {"form": form, "examples": examples})


# --- One task ---------------------------------------------------------------------------------------


@tenant_page(Capability.VIEW_COMPUTE)
@require_GET
def task_detail(request, pk):
    task = _task_or_404(request, pk)
    # Everything below is read up to this sequence number; the page's socket asks for what follows it,
    # so no event is lost between the render and the connection, and none is shown twice.
    upto = task.last_seq
    can_use = role_can(request.membership.role, Capability.USE_COMPUTE)
    waiting = task.state in selectors.WAITING_STATES
    log = selectors.log_tail(task, upto=upto, lines=LOG_LINES)
    usage = selectors.task_usage(task)
    context = {
        "task": task,
        "message": selectors.state_message(task),
        "queue_position": selectors.queue_position(task) if waiting else None,
        "estimated_start": selectors.estimated_start(task) if waiting else None,
        "metrics": selectors.latest_metrics(task, upto=upto),
        "log": log,
        "log_truncated": bool(log) and log[0].seq > 1 and len(log) >= LOG_LINES,
        "usage": usage,
        "runs": [(run, _duration(run.seconds)) for run in usage.runs],
        "usage_duration": _duration(usage.seconds),
        "results": storage.result_files(task),
        "env_names": sorted(task.env),
        "can_use": can_use,
        "can_cancel": can_use and task.state in selectors.CANCELLABLE_STATES,
        "live": {
            "id": str(task.pk),
            "after": upto,
            "maxLines": LOG_LINES,
            "maxPoints": CHART_POINTS,
            "series": selectors.metric_series(task, upto=upto, points=CHART_POINTS),
            "waiting": list(selectors.WAITING_STATES),
            "cancellable": list(selectors.CANCELLABLE_STATES),
            "finished": list(FINISHED_TASK_STATES),
            "labels": dict(TaskState.choices),
        },
    }
    return render(request, "hosting/task_detail.html", context)


@tenant_page(Capability.USE_COMPUTE)
@require_POST
def task_cancel(request, pk):
    task = _task_or_404(request, pk)
    run_action(
        request,
        lambda: services.task_cancel(membership=request.membership, actor=request.user, task=task),
        _("Cancelling %(name)s.") % {"name": task.name},
    )
    return redirect("task_detail", pk=task.pk)


@tenant_page(Capability.VIEW_COMPUTE)
@require_GET
def task_log(request, pk):
    """The whole log as text, streamed."""
    task = _task_or_404(request, pk)
    response = StreamingHttpResponse(selectors.full_log(task), content_type="text/plain; charset=utf-8")
    if request.GET.get("download") == "1":
        response["Content-Disposition"] = f'attachment; filename="task-{task.pk}.log"'
    return response


@tenant_page(Capability.USE_COMPUTE)
@require_GET
def task_result(request, pk, path: str):
    task = _task_or_404(request, pk)
    try:
        file = storage.open_result(task, path)
    except FileNotFoundError as exc:
        raise Http404 from exc
    response = FileResponse(file.file, as_attachment=True, filename=file.name)
    response["Content-Length"] = file.size
    return response
