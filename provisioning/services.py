"""Writes for GPU VM rental: ordering, the lifecycle, access handoff, scale-ups and reconciliation.

The rules live here; views, API views and Celery tasks only call these functions. Every
transition is guarded by the VM's current state (so a retried task or a racing worker does
nothing twice), audited, pushed to the tenant's dashboards after commit, and — where money is
concerned — recorded as a lifecycle event for billing.
"""

import logging
import re
from datetime import timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.urls import reverse
from django.utils import timezone
from django.utils.module_loading import import_string
from django.utils.translation import gettext as _

from notifications.models import NotificationKind
from notifications.services import MANAGER_ROLES, notify, tenant_people
from portal import metrics
from portal.events import emit_dashboard_event
from provisioning import capacity, manifests, secrets
from provisioning.backends import get_backend
from provisioning.backends.base import BackendError, Phase, TenantSpec, VmRef, VmSpec, VmStatus
from provisioning.lifecycle import emit_lifecycle
from provisioning.models import (
    BillingMode,
    LifecycleKind,
    Node,
    Plan,
    ScaleUp,
    ScaleUpState,
    VirtualMachine,
    VmEvent,
    VmState,
)
from tenants.audit import audit_record
from tenants.models import Membership, SshKey, Tenant
from tenants.roles import Capability
from tenants.services import ResourceDemand, quota_release, quota_reserve, require

logger = logging.getLogger(__name__)

VM_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")
HOLDER = "vm"
SCALE_UP_HOLDER = "scaleup"

# What the customer may do from each state.
STARTABLE = {VmState.STOPPED}
STOPPABLE = {VmState.RUNNING, VmState.STARTING}
RESTARTABLE = {VmState.RUNNING}
RELEASABLE = {
    VmState.QUEUED,
    VmState.REQUESTED,
    VmState.PROVISIONING,
    VmState.STARTING,
    VmState.RUNNING,
    VmState.STOPPING,
    VmState.STOPPED,
    VmState.FAILED,
}


def vm_ref(vm: VirtualMachine) -> VmRef:
    return VmRef(namespace=manifests.tenant_namespace(vm.tenant.slug), name=manifests.vm_resource_name(vm))


def _quota_demand(plan: Plan) -> ResourceDemand:
    return ResourceDemand(
        gpu_model=plan.gpu_model.code if plan.gpu_model_id else None,
        gpus=plan.gpu_count,
        vcpus=plan.vcpus,
        memory_gib=plan.memory_gib,
        hugepages_gib=plan.hugepages_gib,
        vms=1,
        storage_gib=plan.total_disk_gib,
    )


def _transition(vm: VirtualMachine, to_state: str, message: str = "", *, actor=None, audit: bool = True) -> VmEvent:
    """Move the VM to a new state, record it in its history and the audit log, push it live."""
    from_state = vm.state
    now = timezone.now()
    vm.state = to_state
    vm.state_changed_at = now
    fields = ["state", "state_changed_at"]
    if to_state == VmState.FAILED:
        vm.failure_reason = message
        fields.append("failure_reason")
    vm.save(update_fields=fields)
    event = VmEvent.objects.create(vm=vm, at=now, from_state=from_state, to_state=to_state, message=message)
    if audit:
        audit_record(
            actor=actor,
            tenant=vm.tenant,
            action=f"vm.{to_state}",
            target=vm,
            before={"state": from_state},
            after={"state": to_state, "message": message} if message else {"state": to_state},
        )
    emit_dashboard_event(
        vm.tenant_id,
        "vm.state",
        {
            "id": str(vm.pk),
            "name": vm.name,
            "state": to_state,
            "state_label": str(VmState(to_state).label),
            "message": message,
        },
    )
    return event


def _release_holdings(vm: VirtualMachine) -> None:
    quota_release(holder_type=HOLDER, holder_id=str(vm.pk))
    capacity.release_placement(holder_type=HOLDER, holder_id=str(vm.pk))
    for scale_up in vm.scale_ups.filter(state=ScaleUpState.ACTIVE):
        quota_release(holder_type=SCALE_UP_HOLDER, holder_id=str(scale_up.pk))
        capacity.release_placement(holder_type=SCALE_UP_HOLDER, holder_id=str(scale_up.pk))


# --- Ordering ------------------------------------------------------------------------------


def run_order_checks(*, tenant: Tenant, plan: Plan, billing_mode: str) -> None:
    """The one place other modules veto an order (the billing module checks the customer can pay).

    Each dotted path in settings.PORTAL_ORDER_CHECKS names a callable(tenant=, plan=, billing_mode=)
    that raises ValidationError with a message for the customer.
    """
    for path in settings.PORTAL_ORDER_CHECKS:
        import_string(path)(tenant=tenant, plan=plan, billing_mode=billing_mode)


def vm_order(
    *,
    membership: Membership,
    actor,
    plan: Plan,
    name: str,
    billing_mode: str,
    ssh_key_ids: list[int],
    cloud_init_extra: str = "",
    wait_if_full: bool = False,
) -> VirtualMachine:
    """Order a VM: check role, input, payment, quota and capacity; then hand it to the cluster.

    With no free capacity the order either waits in line (wait_if_full) or is refused; in both
    refusals nothing is created and nothing is held.
    """
    require(membership, Capability.USE_COMPUTE)
    tenant = membership.tenant
    errors: dict[str, str] = {}
    name = (name or "").strip()
    if not VM_NAME.match(name):
        errors["name"] = _("Use 1–40 lowercase letters, digits and hyphens, starting with a letter.")
    elif (
        VirtualMachine.objects.filter(tenant=tenant, name=name)
        .exclude(state__in=[VmState.RELEASED, VmState.FAILED])
        .exists()
    ):
        errors["name"] = _("You already have a VM called %(name)s.") % {"name": name}
    if billing_mode not in BillingMode.values:
        errors["billing_mode"] = _("Choose monthly, yearly or on_demand.")
    if not plan.is_active:
        errors["plan"] = _("This plan is no longer offered.")
    elif not plan.prices.filter(effective_from__lte=timezone.now()).exists():
        errors["plan"] = _("This plan has no price yet and cannot be ordered.")
    keys = list(SshKey.objects.filter(tenant=tenant, pk__in=ssh_key_ids or []))
    if not ssh_key_ids:
        errors["ssh_key_ids"] = _("Pick at least one SSH key to log in with.")
    elif len(keys) != len(set(ssh_key_ids)):
        errors["ssh_key_ids"] = _("Unknown SSH key.")
    if len(cloud_init_extra or "") > 16384:
        errors["cloud_init_extra"] = _("Keep cloud-init extras under 16 KiB.")
    else:
        try:
            manifests.validate_cloud_init_extra(cloud_init_extra or "")
        except ValueError as exc:
            errors["cloud_init_extra"] = str(exc)
    if errors:
        raise ValidationError(errors)
    run_order_checks(tenant=tenant, plan=plan, billing_mode=billing_mode)

    with transaction.atomic():
        vm = VirtualMachine(
            tenant=tenant,
            created_by=actor,
            plan=plan,
            name=name,
            billing_mode=billing_mode,
            ssh_public_keys=[k.public_key for k in keys],
            ssh_key_names=[k.name for k in keys],
            cloud_init_extra=cloud_init_extra or "",
            jupyter_token_encrypted=secrets.encrypt(secrets.new_jupyter_token()),
        )
        quota_reserve(tenant=tenant, holder_type=HOLDER, holder_id=str(vm.pk), demand=_quota_demand(plan))
        # Orders waiting in line for this shape get freed GPUs first: a newcomer never jumps the queue.
        line_ahead = VirtualMachine.objects.filter(
            state=VmState.QUEUED, plan__gpu_model_id=plan.gpu_model_id, plan__profile=plan.profile
        ).exists()
        placement = (
            None
            if line_ahead
            else capacity.place(demand=capacity.plan_demand(plan), holder_type=HOLDER, holder_id=str(vm.pk))
        )
        if placement is None and not wait_if_full:
            raise ValidationError(
                {
                    "plan": _(
                        "No %(plan)s is free right now. Order again and choose to wait in "
                        "line: it starts as soon as a GPU frees up."
                    )
                    % {"plan": plan.name}
                }
            )
        if placement is None:
            vm.state = VmState.QUEUED
            vm.queued_at = timezone.now()
        else:
            vm.node_name = placement.node.name
        try:
            with transaction.atomic():
                vm.save(force_insert=True)
        except IntegrityError as exc:  # the same name ordered twice at the same moment
            raise ValidationError({"name": _("You already have a VM called %(name)s.") % {"name": name}}) from exc
        VmEvent.objects.create(vm=vm, to_state=vm.state, message="" if placement else _("Waiting for a free GPU."))
        audit_record(
            actor=actor,
            tenant=tenant,
            action="vm.ordered",
            target=vm,
            after={
                "plan": plan.code,
                "billing_mode": billing_mode,
                "state": vm.state,
                "ssh_keys": vm.ssh_key_names,
            },
        )
        emit_dashboard_event(
            tenant.pk,
            "vm.state",
            {
                "id": str(vm.pk),
                "name": vm.name,
                "state": vm.state,
                "state_label": str(VmState(vm.state).label),
                "message": "",
            },
        )
        if placement is not None:
            _enqueue_provision(vm)
    return vm


def _enqueue_provision(vm: VirtualMachine) -> None:
    from provisioning.tasks import provision_vm

    transaction.on_commit(lambda: provision_vm.delay(str(vm.pk)))


def queue_position(vm: VirtualMachine) -> int | None:
    """1 for the next VM to start when a matching GPU frees up."""
    if vm.state != VmState.QUEUED:
        return None
    ahead = VirtualMachine.objects.filter(
        state=VmState.QUEUED,
        plan__gpu_model_id=vm.plan.gpu_model_id,
        plan__profile=vm.plan.profile,
        queued_at__lt=vm.queued_at,
    ).count()
    return ahead + 1


@transaction.atomic
def queue_advance() -> int:
    """Start waiting orders, oldest first, as capacity allows. Returns how many started."""
    started = 0
    blocked: set[tuple] = set()  # a shape that did not fit keeps its place: later orders of it wait too
    waiting = (
        VirtualMachine.objects.select_for_update(skip_locked=True, of=("self",))
        .select_related("plan", "tenant")
        .filter(state=VmState.QUEUED)
        .order_by("queued_at", "requested_at")
    )
    for vm in waiting:
        shape = (vm.plan.gpu_model_id, vm.plan.profile, vm.plan_id)
        if shape in blocked:
            continue
        placement = capacity.place(demand=capacity.plan_demand(vm.plan), holder_type=HOLDER, holder_id=str(vm.pk))
        if placement is None:
            blocked.add(shape)
            continue
        vm.node_name = placement.node.name
        vm.save(update_fields=["node_name"])
        _transition(vm, VmState.REQUESTED, _("A GPU is free: starting."))
        _enqueue_provision(vm)
        started += 1
    return started


# --- Provisioning and status -------------------------------------------------------------


def _tenant_spec(tenant: Tenant) -> TenantSpec:
    shape = manifests.tenant_shape(tenant)
    return TenantSpec(namespace=shape.namespace, manifests=manifests.tenant_manifests(shape))


def _vm_spec(vm: VirtualMachine) -> VmSpec:
    token = secrets.decrypt(vm.jupyter_token_encrypted)
    shape = manifests.vm_shape(vm, jupyter_token=token)
    return VmSpec(
        ref=vm_ref(vm),
        manifests=manifests.vm_manifests(shape, storage_class=settings.KUBEVIRT_STORAGE_CLASS),
        node_name=vm.node_name,
        jupyter_token=token,
    )


def vm_provision(vm_id) -> None:
    """Hand a requested VM to the cluster. Safe to run twice: only a REQUESTED VM is provisioned."""
    with transaction.atomic():
        vm = (
            VirtualMachine.objects.select_for_update(skip_locked=True, of=("self",))
            .select_related("tenant", "plan__gpu_model")
            .filter(pk=vm_id, state=VmState.REQUESTED)
            .first()
        )
        if vm is None:
            return
        backend = get_backend()
        try:
            backend.ensure_tenant(_tenant_spec(vm.tenant))
            backend.apply_vm(_vm_spec(vm))
        except BackendError as exc:
            if exc.retryable:
                logger.warning("Provisioning %s will be retried: %s", vm.pk, exc.message)
                return  # the reconciler tries again until the provisioning deadline
            _fail(vm, exc.message)
            return
        _transition(vm, VmState.PROVISIONING, _("The cluster accepted the VM."))


def _fail(vm: VirtualMachine, reason: str, *, was_running: bool = False) -> None:
    """Mark failed, give back quota and capacity, and clean the cluster. A boot that never ran costs nothing."""
    event = _transition(vm, VmState.FAILED, reason)
    if was_running:
        emit_lifecycle(vm=vm, kind=LifecycleKind.STOPPED, at=event.at, key=str(event.pk), details={"reason": reason})
    _release_holdings(vm)
    _advance_queue_on_commit()
    ref = vm_ref(vm)
    transaction.on_commit(lambda: _delete_quietly(ref))
    transaction.on_commit(lambda: _notify(vm, _("VM %(name)s failed") % {"name": vm.name}, reason))
    transaction.on_commit(lambda model=vm.plan.gpu_model: metrics.provisioning_failed(gpu_model=model))


def _delete_quietly(ref: VmRef) -> None:
    try:
        get_backend().delete_vm(ref)
    except BackendError as exc:  # the reconciler removes leftovers later
        logger.warning("Could not delete %s yet: %s", ref, exc.message)


def _notify(vm: VirtualMachine, subject: str, body: str) -> None:
    send_mail(
        subject=f"[GPU Portal] {subject}",
        message=body,
        from_email=None,
        recipient_list=[vm.created_by.email],
        fail_silently=True,
    )


def _deadline_passed(vm: VirtualMachine) -> bool:
    return (timezone.now() - vm.state_changed_at).total_seconds() > settings.PORTAL_PROVISION_DEADLINE_SECONDS


def vm_sync(vm_id) -> VirtualMachine | None:
    """Bring the portal's record of one VM in line with the cluster; emit billing events on the way."""
    with transaction.atomic():
        vm = (
            VirtualMachine.objects.select_for_update(skip_locked=True, of=("self",))
            .select_related("tenant", "plan__gpu_model", "created_by")
            .filter(pk=vm_id)
            .first()
        )
        if vm is None or vm.state in (VmState.QUEUED, VmState.RELEASED, VmState.FAILED):
            return vm
        if vm.state == VmState.REQUESTED:
            if _deadline_passed(vm):
                _fail(vm, _("The cluster could not be reached to create the VM in time. You were not charged."))
            return vm
        try:
            status = get_backend().vm_status(vm_ref(vm))
        except BackendError as exc:
            logger.warning("Status of %s unavailable: %s", vm.pk, exc.message)
            return vm
        _apply_status(vm, status)
        return vm


def _apply_status(vm: VirtualMachine, status: VmStatus) -> None:
    state = vm.state
    if state == VmState.RELEASING:
        if status.phase == Phase.MISSING:
            _finish_release(vm)
        return
    if status.phase == Phase.MISSING:
        if state == VmState.PROVISIONING:
            # A worker died between creating and confirming: apply again, the order is not lost.
            _transition(vm, VmState.REQUESTED, _("Re-submitting to the cluster."), audit=False)
            _enqueue_provision(vm)
        else:
            _fail(vm, _("The VM disappeared from the cluster."), was_running=state == VmState.RUNNING)
        return
    if status.phase == Phase.FAILED:
        _fail(vm, status.reason or _("The VM failed."), was_running=state == VmState.RUNNING)
        return
    _update_access(vm, status)
    if status.phase == Phase.RUNNING and state != VmState.RUNNING:
        event = _transition(vm, VmState.RUNNING, _("Ready: SSH and Jupyter are available."))
        vm.running_since = event.at
        vm.idle_since = None
        vm.idle_warned_at = None
        vm.save(update_fields=["running_since", "idle_since", "idle_warned_at"])
        emit_lifecycle(vm=vm, kind=LifecycleKind.STARTED, at=event.at, key=str(event.pk), details=_billing_details(vm))
        return
    if state == VmState.RUNNING and status.phase in (Phase.STOPPING, Phase.STOPPED, Phase.STARTING):
        # Stopped from inside the guest, or restarting: not billable until Running again.
        event = _transition(vm, VmState.STOPPED if status.phase == Phase.STOPPED else VmState.STARTING, status.reason)
        emit_lifecycle(vm=vm, kind=LifecycleKind.STOPPED, at=event.at, key=str(event.pk))
        return
    if state == VmState.RUNNING:
        _track_idle(vm, status)
        return
    if state == VmState.PROVISIONING and status.phase == Phase.STARTING:
        _transition(vm, VmState.STARTING, status.reason)
    elif state == VmState.STOPPING and status.phase == Phase.STOPPED:
        _transition(vm, VmState.STOPPED)
    elif state in (VmState.PROVISIONING, VmState.STARTING) and _deadline_passed(vm):
        minutes = settings.PORTAL_PROVISION_DEADLINE_SECONDS // 60
        reason = _("The VM did not become ready within %(minutes)s minutes") % {"minutes": minutes}
        if status.reason:
            reason += f": {status.reason}"
        _fail(vm, reason + ". " + _("You were not charged."))


def _billing_details(vm: VirtualMachine) -> dict:
    extras = vm.scale_ups.filter(state=ScaleUpState.ACTIVE)
    return {
        "plan": vm.plan.code,
        "billing_mode": vm.billing_mode,
        "gpu_model": vm.plan.gpu_model.code if vm.plan.gpu_model_id else None,
        "gpus": vm.plan.gpu_count + sum(s.extra_gpus for s in extras),
        "vcpus": vm.plan.vcpus + sum(s.extra_vcpus for s in extras),
        "memory_gib": vm.plan.memory_gib + sum(s.extra_memory_gib for s in extras),
    }


def _update_access(vm: VirtualMachine, status: VmStatus) -> None:
    fields = {
        "node_name": status.node_name,
        "ssh_host": status.ssh_host,
        "ssh_port": status.ssh_port,
        "jupyter_url": status.jupyter_url,
    }
    changed = [f for f, value in fields.items() if value and getattr(vm, f) != value]
    for f in changed:
        setattr(vm, f, fields[f])
    if changed:
        vm.save(update_fields=changed)


# --- Customer actions ------------------------------------------------------------------


def _locked_vm(membership: Membership | None, vm: VirtualMachine) -> VirtualMachine:
    """The VM locked for a change. A member needs USE_COMPUTE in its tenant; None is the system
    itself (billing stopping work when credit runs out, idle release)."""
    query = VirtualMachine.objects.select_for_update(of=("self",)).select_related(
        "tenant", "plan__gpu_model", "created_by"
    )
    if membership is None:
        return query.get(pk=vm.pk)
    require(membership, Capability.USE_COMPUTE)
    return query.get(pk=vm.pk, tenant_id=membership.tenant_id)


def _refuse(vm: VirtualMachine, action: str) -> None:
    raise ValidationError(
        _("A VM that is %(state)s cannot be %(action)s.") % {"state": VmState(vm.state).label.lower(), "action": action}
    )


def _call_backend(call, ref: VmRef) -> None:
    try:
        call(ref)
    except BackendError as exc:
        raise ValidationError(exc.message) from exc


@transaction.atomic
def vm_start(*, membership: Membership, actor, vm: VirtualMachine) -> VirtualMachine:
    vm = _locked_vm(membership, vm)
    if vm.state not in STARTABLE:
        _refuse(vm, _("started"))
    _call_backend(get_backend().start_vm, vm_ref(vm))
    _transition(vm, VmState.STARTING, actor=actor)
    return vm


@transaction.atomic
def vm_stop(*, membership: Membership | None, actor, vm: VirtualMachine, reason: str = "") -> VirtualMachine:
    vm = _locked_vm(membership, vm)
    if vm.state not in STOPPABLE:
        _refuse(vm, _("stopped"))
    _call_backend(get_backend().stop_vm, vm_ref(vm))
    was_running = vm.state == VmState.RUNNING
    event = _transition(vm, VmState.STOPPING, reason, actor=actor)
    if was_running:
        emit_lifecycle(vm=vm, kind=LifecycleKind.STOPPED, at=event.at, key=str(event.pk))
    return vm


@transaction.atomic
def vm_restart(*, membership: Membership, actor, vm: VirtualMachine) -> VirtualMachine:
    vm = _locked_vm(membership, vm)
    if vm.state not in RESTARTABLE:
        _refuse(vm, _("restarted"))
    _call_backend(get_backend().restart_vm, vm_ref(vm))
    event = _transition(vm, VmState.STARTING, _("Restarting."), actor=actor)
    emit_lifecycle(vm=vm, kind=LifecycleKind.STOPPED, at=event.at, key=str(event.pk))
    return vm


def vm_release(*, membership: Membership | None, actor, vm: VirtualMachine, reason: str = "") -> VirtualMachine:
    """Give the VM back: it is deleted from the cluster and stops costing money. Irreversible."""
    with transaction.atomic():
        if membership is not None:
            vm = _locked_vm(membership, vm)
        else:  # the system (idle release, credit exhausted)
            vm = (
                VirtualMachine.objects.select_for_update(of=("self",))
                .select_related("tenant", "plan", "created_by")
                .get(pk=vm.pk)
            )
        if vm.state not in RELEASABLE:
            _refuse(vm, _("released"))
        was_running = vm.state == VmState.RUNNING
        if vm.state in (VmState.QUEUED, VmState.FAILED):
            _finish_release(vm, actor=actor, message=reason)
            return vm
        event = _transition(vm, VmState.RELEASING, reason, actor=actor)
        if was_running:
            emit_lifecycle(vm=vm, kind=LifecycleKind.STOPPED, at=event.at, key=str(event.pk))
        ref = vm_ref(vm)
    try:
        get_backend().delete_vm(ref)
    except BackendError as exc:  # the reconciler finishes the release
        logger.warning("Release of %s continues later: %s", vm.pk, exc.message)
        return vm
    return vm_sync(vm.pk) or vm


def _finish_release(vm: VirtualMachine, *, actor=None, message: str = "") -> None:
    was_failed = vm.state == VmState.FAILED
    event = _transition(vm, VmState.RELEASED, message, actor=actor)
    vm.released_at = event.at
    vm.save(update_fields=["released_at"])
    if was_failed:
        return  # its holdings went back when it failed
    _release_holdings(vm)
    _advance_queue_on_commit()
    # A VM that never ran was never billable, so billing hears nothing of its release.
    if vm.lifecycle_events.filter(kind=LifecycleKind.STARTED).exists():
        emit_lifecycle(vm=vm, kind=LifecycleKind.RELEASED, at=event.at, key=str(event.pk))


def _advance_queue_on_commit() -> None:
    """Freed capacity goes to the orders waiting in line now, not at the next reconcile."""
    transaction.on_commit(queue_advance)


# --- Access handoff ----------------------------------------------------------------------


def ssh_command(vm: VirtualMachine) -> str:
    if not vm.ssh_host or not vm.ssh_port:
        return ""
    return f"ssh -p {vm.ssh_port} {vm.ssh_user}@{vm.ssh_host}"


@transaction.atomic
def vm_reveal_access(*, membership: Membership, actor, vm: VirtualMachine) -> dict:
    """The SSH command and the Jupyter URL with its token, for members who may use compute. Audited."""
    vm = _locked_vm(membership, vm)
    if vm.state != VmState.RUNNING:
        raise ValidationError(_("Access details are available while the VM is running."))
    token = secrets.decrypt(vm.jupyter_token_encrypted)
    audit_record(actor=actor, tenant=vm.tenant, action="vm.access_revealed", target=vm)
    jupyter = f"{vm.jupyter_url.rstrip('/')}/lab?token={token}" if vm.jupyter_url else ""
    return {"ssh_command": ssh_command(vm), "jupyter_url": jupyter, "jupyter_token": token}


@transaction.atomic
def vm_rotate_jupyter_token(*, membership: Membership, actor, vm: VirtualMachine) -> VirtualMachine:
    """A new Jupyter token. The guest reads it at boot, so a running VM restarts to take it."""
    vm = _locked_vm(membership, vm)
    if vm.state not in (VmState.RUNNING, VmState.STOPPED):
        raise ValidationError(_("Rotate the token when the VM is running or stopped."))
    vm.jupyter_token_encrypted = secrets.encrypt(secrets.new_jupyter_token())
    vm.save(update_fields=["jupyter_token_encrypted"])
    backend = get_backend()
    try:
        backend.apply_vm(_vm_spec(vm))
        if vm.state == VmState.RUNNING:
            backend.restart_vm(vm_ref(vm))
    except BackendError as exc:
        raise ValidationError(exc.message) from exc
    audit_record(actor=actor, tenant=vm.tenant, action="vm.jupyter_token_rotated", target=vm)
    if vm.state == VmState.RUNNING:
        event = _transition(vm, VmState.STARTING, _("Restarting with the new Jupyter token."), actor=actor)
        emit_lifecycle(vm=vm, kind=LifecycleKind.STOPPED, at=event.at, key=str(event.pk))
    return vm


# --- Elastic scale-ups ------------------------------------------------------------------


def scale_up_add(
    *,
    membership: Membership,
    actor,
    vm: VirtualMachine,
    extra_gpus: int = 0,
    extra_vcpus: int = 0,
    extra_memory_gib: int = 0,
    days: int,
) -> ScaleUp:
    """Extra resources on a subscribed VM for N days. The VM restarts to take them (GPUs are not hot-pluggable)."""
    errors = {}
    if not 1 <= days <= 365:
        errors["days"] = _("Choose between 1 and 365 days.")
    if min(extra_gpus, extra_vcpus, extra_memory_gib) < 0 or not (extra_gpus or extra_vcpus or extra_memory_gib):
        errors["extra_gpus"] = _("Add at least one GPU, vCPU or GiB of memory.")
    if errors:
        raise ValidationError(errors)
    with transaction.atomic():
        vm = _locked_vm(membership, vm)
        if vm.billing_mode == BillingMode.ON_DEMAND:
            raise ValidationError(_("Elastic scale-ups are for monthly and yearly subscriptions."))
        if vm.state not in (VmState.RUNNING, VmState.STOPPED):
            raise ValidationError(_("Scale up a VM that is running or stopped."))
        if extra_gpus and not vm.plan.gpu_count:
            raise ValidationError({"extra_gpus": _("This plan has no GPUs to add to.")})
        now = timezone.now()
        scale_up = ScaleUp.objects.create(
            vm=vm,
            created_by=actor,
            extra_gpus=extra_gpus,
            extra_vcpus=extra_vcpus,
            extra_memory_gib=extra_memory_gib,
            days=days,
            starts_at=now,
            ends_at=now + timedelta(days=days),
        )
        plan = vm.plan
        quota_reserve(
            tenant=vm.tenant,
            holder_type=SCALE_UP_HOLDER,
            holder_id=str(scale_up.pk),
            demand=ResourceDemand(
                gpu_model=plan.gpu_model.code if extra_gpus else None,
                gpus=extra_gpus,
                vcpus=extra_vcpus,
                memory_gib=extra_memory_gib,
                hugepages_gib=extra_memory_gib if plan.hugepage_size else 0,
            ),
        )
        if not _place_extra_on_node(vm, scale_up):
            raise ValidationError(_("The VM's node has no room for this scale-up right now."))
        _reapply_and_restart(vm, actor, _("Scaled up until %(end)s.") % {"end": scale_up.ends_at.date()})
        audit_record(
            actor=actor,
            tenant=vm.tenant,
            action="vm.scaled_up",
            target=vm,
            after={
                "extra_gpus": extra_gpus,
                "extra_vcpus": extra_vcpus,
                "extra_memory_gib": extra_memory_gib,
                "days": days,
                "ends_at": scale_up.ends_at.isoformat(),
            },
        )
    return scale_up


def _place_extra_on_node(vm: VirtualMachine, scale_up: ScaleUp) -> bool:
    node = Node.objects.select_for_update().filter(name=vm.node_name).first()
    if node is None:
        return False
    free = capacity.free_capacity([node])[0]
    hugepage = vm.plan.hugepage_size
    hp_free = free.hugepages_2mi_gib if hugepage == "2Mi" else free.hugepages_1gi_gib
    extra_memory = 0 if hugepage else scale_up.extra_memory_gib
    extra_hugepages = scale_up.extra_memory_gib if hugepage else 0
    cpus = -(-scale_up.extra_vcpus * 100 // int(vm.plan.cpu_overcommit * 100))  # ceil division, no float
    if (
        free.gpus < scale_up.extra_gpus
        or free.cpus < cpus
        or free.memory_gib < extra_memory
        or (extra_hugepages and hp_free < extra_hugepages)
    ):
        return False
    from provisioning.models import Placement

    Placement.objects.create(
        node=node,
        holder_type=SCALE_UP_HOLDER,
        holder_id=str(scale_up.pk),
        profile="",
        gpus=scale_up.extra_gpus,
        cpus=cpus,
        memory_gib=extra_memory,
        hugepage_size=hugepage if extra_hugepages else "",
        hugepages_gib=extra_hugepages,
    )
    return True


def _reapply_and_restart(vm: VirtualMachine, actor, message: str) -> None:
    backend = get_backend()
    try:
        backend.apply_vm(_vm_spec(vm))
        if vm.state == VmState.RUNNING:
            backend.restart_vm(vm_ref(vm))
    except BackendError as exc:
        raise ValidationError(exc.message) from exc
    at = timezone.now()
    if vm.state == VmState.RUNNING:
        event = _transition(vm, VmState.STARTING, message, actor=actor)
        at = event.at
        emit_lifecycle(vm=vm, kind=LifecycleKind.STOPPED, at=at, key=str(event.pk))
    emit_lifecycle(vm=vm, kind=LifecycleKind.RESIZED, at=at, key=f"{at.isoformat()}", details=_billing_details(vm))


def scale_ups_revert_due() -> int:
    """Scale-ups past their end go back by themselves. Returns how many reverted."""
    reverted = 0
    due = ScaleUp.objects.filter(state=ScaleUpState.ACTIVE, ends_at__lte=timezone.now()).values_list("pk", flat=True)
    for pk in list(due):
        with transaction.atomic():
            scale_up = (
                ScaleUp.objects.select_for_update(skip_locked=True, of=("self",))
                .select_related("vm__tenant", "vm__plan__gpu_model", "vm__created_by")
                .filter(pk=pk, state=ScaleUpState.ACTIVE)
                .first()
            )
            if scale_up is None:
                continue
            scale_up.state = ScaleUpState.REVERTED
            scale_up.reverted_at = timezone.now()
            scale_up.save(update_fields=["state", "reverted_at"])
            quota_release(holder_type=SCALE_UP_HOLDER, holder_id=str(scale_up.pk))
            capacity.release_placement(holder_type=SCALE_UP_HOLDER, holder_id=str(scale_up.pk))
            vm = VirtualMachine.objects.select_for_update().get(pk=scale_up.vm_id)
            if vm.state in (VmState.RUNNING, VmState.STOPPED):
                try:
                    _reapply_and_restart(vm, None, _("The scale-up ended; back to the plan's size."))
                except ValidationError:
                    logger.warning("Reverting scale-up %s: cluster unavailable, retried on the next pass", pk)
                    transaction.set_rollback(True)
                    continue
            audit_record(
                actor=None, tenant=vm.tenant, action="vm.scale_up_reverted", target=vm, after={"scale_up": scale_up.pk}
            )
            reverted += 1
    return reverted


# --- Idle release of on-demand VMs -----------------------------------------------------------


def _track_idle(vm: VirtualMachine, status: VmStatus) -> None:
    plan = vm.plan
    if vm.billing_mode != BillingMode.ON_DEMAND or not plan.idle_release_minutes:
        return
    if status.gpu_utilisation_percent is None:
        return  # no sample: never release on a guess
    now = timezone.now()
    if status.gpu_utilisation_percent >= plan.idle_gpu_percent:
        if vm.idle_since or vm.idle_warned_at:
            vm.idle_since = vm.idle_warned_at = None
            vm.save(update_fields=["idle_since", "idle_warned_at"])
        return
    if vm.idle_since is None:
        vm.idle_since = now
        vm.save(update_fields=["idle_since"])
        return
    idle_minutes = (now - vm.idle_since).total_seconds() / 60
    warn_at = max(plan.idle_release_minutes - settings.PORTAL_IDLE_WARNING_MINUTES, 0)
    if idle_minutes >= plan.idle_release_minutes:
        reason = _("Released after %(minutes)s minutes with GPU utilisation under %(percent)s%%.") % {
            "minutes": plan.idle_release_minutes,
            "percent": plan.idle_gpu_percent,
        }
        transaction.on_commit(lambda: vm_release(membership=None, actor=None, vm=vm, reason=reason))
    elif idle_minutes >= warn_at and vm.idle_warned_at is None:
        vm.idle_warned_at = now
        vm.save(update_fields=["idle_warned_at"])
        left = plan.idle_release_minutes - int(idle_minutes)
        message = _(
            "VM %(name)s has been idle (GPU under %(percent)s%%) and will be released in about "
            "%(left)s minutes unless it gets busy."
        ) % {"name": vm.name, "percent": plan.idle_gpu_percent, "left": left}
        audit_record(actor=None, tenant=vm.tenant, action="vm.idle_warning", target=vm, after={"minutes_left": left})
        emit_dashboard_event(vm.tenant_id, "vm.idle_warning", {"id": str(vm.pk), "name": vm.name, "message": message})
        notify(
            kind=NotificationKind.VM_IDLE_WARNING,
            tenant=vm.tenant,
            users=tenant_people(vm.tenant, roles=MANAGER_ROLES, also=[vm.created_by]),
            params={"vm": vm.name, "minutes": left},
            url=reverse("vm_detail", args=[vm.pk]),
            dedupe_key=f"vm_idle:{vm.pk}:{vm.idle_since.isoformat()}",
        )


# --- Reconciler ------------------------------------------------------------------------------


def inventory_sync() -> int:
    """Bring the node table in line with the backend's nodes. Returns the number of nodes seen."""
    from provisioning.models import GpuModel

    models_by_resource = {m.resource_name: m for m in GpuModel.objects.all()}
    seen = []
    for capacity_row in get_backend().list_nodes():
        Node.objects.update_or_create(
            name=capacity_row.name,
            defaults={
                "pool": capacity_row.pool,
                "gpu_model": models_by_resource.get(capacity_row.gpu_model_resource),
                "gpus": capacity_row.gpus if capacity_row.gpu_model_resource in models_by_resource else 0,
                "vgpu_slices_per_gpu": capacity_row.vgpu_slices_per_gpu,
                "cpus": capacity_row.cpus,
                "memory_gib": capacity_row.memory_gib,
                "hugepages_2mi_gib": capacity_row.hugepages_2mi_gib,
                "hugepages_1gi_gib": capacity_row.hugepages_1gi_gib,
                "dedicated": capacity_row.dedicated,
                "schedulable": capacity_row.schedulable,
                "labels": capacity_row.labels,
            },
        )
        seen.append(capacity_row.name)
    Node.objects.exclude(name__in=seen).update(schedulable=False)
    return len(seen)


RECONCILED_STATES = [
    VmState.REQUESTED,
    VmState.PROVISIONING,
    VmState.STARTING,
    VmState.RUNNING,
    VmState.STOPPING,
    VmState.STOPPED,
    VmState.RELEASING,
]


def reconcile() -> dict:
    """Compare the portal with the cluster and repair drift. Run by beat every few seconds, and on demand."""
    backend = get_backend()
    counts = {"synced": 0, "reprovisioned": 0, "leftovers_deleted": 0, "queue_started": 0}
    requested = list(VirtualMachine.objects.filter(state=VmState.REQUESTED).values_list("pk", flat=True))
    for vm_id in requested:  # a worker may have died before handing these over: hand them over now
        vm_provision(vm_id)
        counts["reprovisioned"] += 1
    for vm_id in VirtualMachine.objects.filter(state__in=RECONCILED_STATES).values_list("pk", flat=True):
        vm_sync(vm_id)
        counts["synced"] += 1
    try:
        in_cluster = set(backend.list_vms())
    except BackendError as exc:
        logger.warning("Cannot list cluster VMs: %s", exc.message)
        in_cluster = set()
    live = {
        VmRef(namespace=manifests.tenant_namespace(slug), name=name)
        for slug, name in VirtualMachine.objects.filter(state__in=RECONCILED_STATES).values_list("tenant__slug", "name")
    }
    for ref in in_cluster - live:  # left behind by a half-finished release or a failed order
        _delete_quietly(ref)
        counts["leftovers_deleted"] += 1
    counts["queue_started"] = queue_advance()
    return counts
