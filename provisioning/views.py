"""Pages for GPU VM rental: the catalogue, ordering, and each VM's status, actions and access. Thin: forms in,
services out."""

from collections.abc import Callable
from typing import NamedTuple

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.http import Http404
from django.shortcuts import redirect, render
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from provisioning import selectors, services
from provisioning.forms import ScaleUpForm, VmOrderForm
from provisioning.models import BillingMode, VirtualMachine, VmState
from tenants import selectors as tenant_selectors
from tenants.forms import add_service_errors
from tenants.roles import Capability, role_can
from tenants.views import run_action, tenant_page

VMS_PER_PAGE = 50

# The path an order walks to Running, shown as a stepper.
STEPS = [
    (VmState.REQUESTED, gettext_lazy("Requested")),
    (VmState.PROVISIONING, gettext_lazy("Provisioning")),
    (VmState.STARTING, gettext_lazy("Starting")),
    (VmState.RUNNING, gettext_lazy("Running")),
]
STEPPED_STATES = {VmState.QUEUED, *(state for state, _label in STEPS)}


class VmAction(NamedTuple):
    service: Callable
    allowed: set  # states the service accepts; the button shows only then
    label: str
    style: str  # Bootstrap button class
    confirm: str  # asked before submitting, or empty
    done: str  # flash message, with %(name)s


ACTIONS = {
    "start": VmAction(
        services.vm_start,
        services.STARTABLE,
        gettext_lazy("Start"),
        "btn-success",
        "",
        gettext_lazy("Starting %(name)s."),
    ),
    "stop": VmAction(
        services.vm_stop,
        services.STOPPABLE,
        gettext_lazy("Stop"),
        "btn-outline-secondary",
        "",
        gettext_lazy("Stopping %(name)s."),
    ),
    "restart": VmAction(
        services.vm_restart,
        services.RESTARTABLE,
        gettext_lazy("Restart"),
        "btn-outline-secondary",
        "",
        gettext_lazy("Restarting %(name)s."),
    ),
    "release": VmAction(
        services.vm_release,
        services.RELEASABLE,
        gettext_lazy("Release"),
        "btn-outline-danger",
        gettext_lazy("Release this VM? It is deleted with its disks and cannot be brought back."),
        gettext_lazy("%(name)s is being released."),
    ),
    "rotate-jupyter-token": VmAction(
        services.vm_rotate_jupyter_token,
        {VmState.RUNNING, VmState.STOPPED},
        gettext_lazy("Rotate Jupyter token"),
        "btn-outline-warning",
        gettext_lazy("Issue a new Jupyter token? The old link stops working and a running VM restarts."),
        gettext_lazy("New Jupyter token issued for %(name)s."),
    ),
}
LIFECYCLE_ACTIONS = ["start", "stop", "restart", "release"]


def _vm_or_404(request, pk) -> VirtualMachine:
    try:
        return selectors.vm_of(request.membership.tenant, pk)
    except VirtualMachine.DoesNotExist as exc:
        raise Http404 from exc


# --- Catalogue and the tenant's VMs ------------------------------------------------------


@tenant_page()
def compute_home(request):
    role = request.membership.role
    context = {
        "catalogue": selectors.plans_with_availability(),
        "can_order": role_can(role, Capability.USE_COMPUTE),
        "can_view_vms": role_can(role, Capability.VIEW_COMPUTE),
        "show_released": request.GET.get("released") == "1",
    }
    if context["can_view_vms"]:
        vms = selectors.vms_of(request.membership.tenant)
        if not context["show_released"]:
            vms = vms.exclude(state=VmState.RELEASED)
        context["page"] = Paginator(vms.prefetch_related(None), VMS_PER_PAGE).get_page(request.GET.get("page"))
    return render(request, "provisioning/compute.html", context)


@tenant_page(Capability.USE_COMPUTE)
def vm_order(request):
    tenant = request.membership.tenant
    ssh_keys = tenant_selectors.ssh_keys_of(tenant)
    form = VmOrderForm(
        request.POST or None,
        plans=selectors.active_plans(),
        ssh_keys=ssh_keys,
        initial={
            "plan": request.GET.get("plan"),
            "billing_mode": BillingMode.MONTHLY,
            "ssh_key_ids": [key.pk for key in ssh_keys if key.owner_id == request.user.pk],
        },
    )
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            vm = services.vm_order(
                membership=request.membership,
                actor=request.user,
                plan=data["plan"],
                name=data["name"],
                billing_mode=data["billing_mode"],
                ssh_key_ids=[key.pk for key in data["ssh_key_ids"]],
                cloud_init_extra=data["cloud_init_extra"],
                wait_if_full=data["wait_if_full"],
            )
        except ValidationError as exc:
            add_service_errors(form, exc)
        else:
            if vm.state == VmState.QUEUED:
                messages.info(
                    request,
                    _("No GPU is free right now: %(name)s waits in line and starts by itself.") % {"name": vm.name},
                )
            else:
                messages.success(request, _("%(name)s ordered: it is being set up.") % {"name": vm.name})
            return redirect("vm_detail", pk=vm.pk)
    return render(
        request,
        "provisioning/vm_order.html",
        {"form": form, "has_keys": ssh_keys.exists(), "catalogue": selectors.plans_with_availability()},
    )


# --- One VM ------------------------------------------------------------------------------


def _stepper(vm: VirtualMachine) -> dict | None:
    if vm.state not in STEPPED_STATES:
        return None
    current = next((i for i, (state, _label) in enumerate(STEPS) if state == vm.state), -1)
    steps = []
    for i, (_state, label) in enumerate(STEPS):
        status = "done" if i < current or vm.state == VmState.RUNNING else "current" if i == current else "todo"
        steps.append({"label": label, "status": status})
    return {"steps": steps, "percent": round(100 * (current + 1) / len(STEPS))}


def _labelled(events) -> list:
    labels = dict(VmState.choices)
    events = list(events)
    for event in events:
        event.state_label = labels.get(event.to_state, event.to_state)
    return events


def _status_context(request, vm: VirtualMachine) -> dict:
    can_use = role_can(request.membership.role, Capability.USE_COMPUTE)
    actions = []
    if can_use:
        for name in LIFECYCLE_ACTIONS:
            if vm.state in ACTIONS[name].allowed:
                actions.append({"name": name, "action": ACTIONS[name]})
    return {
        "vm": vm,
        "events": _labelled(selectors.vm_events(vm)),
        "stepper": _stepper(vm),
        "queue_position": services.queue_position(vm),
        "can_use": can_use,
        "actions": actions,
        "can_rotate": can_use and vm.state in ACTIONS["rotate-jupyter-token"].allowed,
        "rotate": ACTIONS["rotate-jupyter-token"],
    }


def _side_context(request, vm: VirtualMachine, scale_up_form: ScaleUpForm | None = None) -> dict:
    """The details and scale-up column, which also changes with the VM's state (running since, the form)."""
    return {
        "scale_ups": selectors.scale_ups_of(vm),
        "can_scale_up": _can_scale_up(request, vm),
        "scale_up_form": scale_up_form or ScaleUpForm(),
    }


def _detail(request, vm: VirtualMachine, scale_up_form: ScaleUpForm | None = None, status: int = 200):
    context = (
        _status_context(request, vm)
        | _side_context(request, vm, scale_up_form)
        | {"live": {"id": str(vm.pk), "copy": _("Copy"), "copied": _("Copied")}}
    )
    return render(request, "provisioning/vm_detail.html", context, status=status)


def _can_scale_up(request, vm: VirtualMachine) -> bool:
    return (
        role_can(request.membership.role, Capability.USE_COMPUTE)
        and vm.billing_mode != BillingMode.ON_DEMAND
        and vm.state in (VmState.RUNNING, VmState.STOPPED)
    )


@tenant_page(Capability.VIEW_COMPUTE)
@require_GET
def vm_detail(request, pk):
    return _detail(request, _vm_or_404(request, pk))


@tenant_page(Capability.VIEW_COMPUTE)
@require_GET
def vm_status_partial(request, pk):
    """The VM's state, stepper, actions and history, for live refreshes (htmx); the details column
    comes along out of band, so "Running since" and the scale-up form follow the state too."""
    vm = _vm_or_404(request, pk)
    context = _status_context(request, vm) | _side_context(request, vm)
    return render(request, "provisioning/_vm_status_live.html", context)


@tenant_page(Capability.USE_COMPUTE)
@require_POST
def vm_action(request, pk, action: str):
    if action not in ACTIONS:
        raise Http404
    vm = _vm_or_404(request, pk)
    chosen = ACTIONS[action]
    run_action(
        request,
        lambda: chosen.service(membership=request.membership, actor=request.user, vm=vm),
        chosen.done % {"name": vm.name},
    )
    return redirect("vm_detail", pk=vm.pk)


@tenant_page(Capability.USE_COMPUTE)
@require_POST
@never_cache
def vm_access(request, pk):
    """The SSH command and the Jupyter link with its token. Audited by the service; never cached."""
    vm = _vm_or_404(request, pk)
    context = {"vm": vm}
    try:
        context["access"] = services.vm_reveal_access(membership=request.membership, actor=request.user, vm=vm)
    except ValidationError as exc:
        context["error"] = " ".join(exc.messages)
    template = "provisioning/_vm_access.html" if request.headers.get("HX-Request") else "provisioning/vm_access.html"
    return render(request, template, context)


@tenant_page(Capability.USE_COMPUTE)
@require_POST
def vm_scale_up(request, pk):
    vm = _vm_or_404(request, pk)
    form = ScaleUpForm(request.POST)
    if form.is_valid():
        try:
            scale_up = services.scale_up_add(
                membership=request.membership, actor=request.user, vm=vm, **form.cleaned_data
            )
        except ValidationError as exc:
            add_service_errors(form, exc)
        else:
            messages.success(
                request, _("Scaled up until %(end)s; the VM restarts to take it.") % {"end": scale_up.ends_at.date()}
            )
            return redirect("vm_detail", pk=vm.pk)
    return _detail(request, vm, scale_up_form=form)
