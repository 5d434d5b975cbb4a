"""Pages for the team, the tenant's plan and quotas, and personal settings. Thin: forms in, services out."""

from functools import wraps

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.paginator import Paginator
from django.http import Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.translation import gettext as _
from django.views.decorators.http import require_POST

from tenants import selectors, services
from tenants.forms import (
    ApiTokenForm,
    InvitationForm,
    ProfileForm,
    RoleForm,
    SshKeyForm,
    TenantCreateForm,
    TenantRenameForm,
    add_service_errors,
)
from tenants.middleware import ACTIVE_TENANT_SESSION_KEY
from tenants.models import Membership, Role
from tenants.roles import Capability, assignable_roles, role_can


def tenant_page(capability: Capability | None = Capability.VIEW_TENANT):
    """Signed in, a member of the active tenant, and allowed `capability` (else 403)."""

    def decorator(view):
        @login_required
        @wraps(view)
        def wrapper(request, *args, **kwargs):
            if not request.membership:
                raise Http404
            if capability is not None and not role_can(request.membership.role, capability):
                raise PermissionDenied(_("Your role in this tenant does not allow this."))
            return view(request, *args, **kwargs)

        return wrapper

    return decorator


def _back(request, default: str):
    target = request.POST.get("next") or request.GET.get("next")
    if target and url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()}):
        return redirect(target)
    return redirect(default)


# --- Tenant: plan, quotas, switching, creating --------------------------------


@tenant_page()
def tenant_overview(request):
    membership = request.membership
    rename_form = TenantRenameForm(initial={"name": membership.tenant.name})
    if request.method == "POST":
        rename_form = TenantRenameForm(request.POST)
        if rename_form.is_valid():
            try:
                services.tenant_rename(membership=membership, actor=request.user, name=rename_form.cleaned_data["name"])
            except ValidationError as exc:
                add_service_errors(rename_form, exc)
            else:
                messages.success(request, _("Renamed."))
                return redirect("tenant_overview")
    from tenants.models import Tier

    return render(
        request,
        "tenants/overview.html",
        {
            "quota_lines": selectors.quota_usage(membership.tenant),
            "tiers": Tier.objects.all(),
            "rename_form": rename_form,
        },
    )


@login_required
def tenant_create(request):
    form = TenantCreateForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            tenant = services.tenant_create(name=form.cleaned_data["name"], owner=request.user)
        except ValidationError as exc:
            add_service_errors(form, exc)
        else:
            request.session[ACTIVE_TENANT_SESSION_KEY] = tenant.pk
            messages.success(request, _("Organisation %(name)s created. Invite your team.") % {"name": tenant.name})
            return redirect("team")
    return render(request, "tenants/tenant_create.html", {"form": form})


@login_required
@require_POST
def tenant_switch(request):
    membership = Membership.objects.filter(user=request.user, tenant__slug=request.POST.get("tenant")).first()
    if membership is None:
        raise Http404
    request.session[ACTIVE_TENANT_SESSION_KEY] = membership.tenant_id
    return _back(request, "dashboard")


# --- Team ---------------------------------------------------------------------


@tenant_page()
def team(request):
    membership = request.membership
    can_manage = role_can(membership.role, Capability.MANAGE_MEMBERS)
    assignable = assignable_roles(membership.role)
    invite_form = InvitationForm(assignable=assignable)
    if request.method == "POST":
        if not can_manage:
            raise PermissionDenied
        invite_form = InvitationForm(request.POST, assignable=assignable)
        if invite_form.is_valid():
            try:
                services.invitation_create(membership=membership, actor=request.user, **invite_form.cleaned_data)
            except ValidationError as exc:
                add_service_errors(invite_form, exc)
            else:
                messages.success(
                    request, _("Invitation sent to %(email)s.") % {"email": invite_form.cleaned_data["email"]}
                )
                return redirect("team")
    return render(
        request,
        "tenants/team.html",
        {
            "members": selectors.members_of(membership.tenant),
            "invitations": selectors.pending_invitations_of(membership.tenant) if can_manage else [],
            "invite_form": invite_form,
            "can_manage": can_manage,
            "assignable_roles": [(v, label) for v, label in RoleForm.base_fields["role"].choices if v in assignable],
        },
    )


def _member_or_404(request, pk) -> Membership:
    return get_object_or_404(Membership.objects.select_related("user"), pk=pk, tenant=request.membership.tenant)


def run_action(request, action, success: str) -> bool:
    """Run a service call for a page; put its refusal or the success message on the next page."""
    try:
        action()
    except ValidationError as exc:
        for message in exc.messages:
            messages.error(request, message)
        return False
    except PermissionDenied as exc:
        messages.error(request, str(exc) or _("Your role in this tenant does not allow this."))
        return False
    messages.success(request, success)
    return True


@tenant_page(Capability.MANAGE_MEMBERS)
@require_POST
def member_role(request, pk):
    target = _member_or_404(request, pk)
    form = RoleForm(request.POST)
    if not form.is_valid():
        messages.error(request, _("Choose a valid role."))
        return redirect("team")
    run_action(
        request,
        lambda: services.membership_change_role(
            membership=request.membership, actor=request.user, target=target, role=form.cleaned_data["role"]
        ),
        _("%(email)s is now %(role)s.") % {"email": target.user.email, "role": Role(form.cleaned_data["role"]).label},
    )
    return redirect("team")


@tenant_page(Capability.MANAGE_MEMBERS)
@require_POST
def member_remove(request, pk):
    target = _member_or_404(request, pk)
    if target.pk == request.membership.pk:
        return team_leave(request)
    run_action(
        request,
        lambda: services.membership_remove(membership=request.membership, actor=request.user, target=target),
        _("%(email)s was removed.") % {"email": target.user.email},
    )
    return redirect("team")


@tenant_page()
@require_POST
def team_leave(request):
    name = request.membership.tenant.name
    left = run_action(
        request,
        lambda: services.membership_remove(
            membership=request.membership, actor=request.user, target=request.membership
        ),
        _("You left %(name)s.") % {"name": name},
    )
    if left:
        request.session.pop(ACTIVE_TENANT_SESSION_KEY, None)
        return redirect("dashboard")
    return redirect("team")


@tenant_page(Capability.MANAGE_MEMBERS)
@require_POST
def invitation_revoke(request, pk):
    invitation = get_object_or_404(selectors.pending_invitations_of(request.membership.tenant), pk=pk)
    run_action(
        request,
        lambda: services.invitation_revoke(membership=request.membership, actor=request.user, invitation=invitation),
        _("Invitation to %(email)s withdrawn.") % {"email": invitation.email},
    )
    return redirect("team")


def invitation_accept(request, key):
    invitation = services.invitation_for_key(key)
    if invitation is None:
        raise Http404
    if request.method == "POST":
        if not request.user.is_authenticated:
            return redirect(f"/accounts/login/?next={request.path}")
        try:
            membership = services.invitation_accept(key=key, user=request.user)
        except ValidationError as exc:
            for message in exc.messages:
                messages.error(request, message)
        else:
            request.session[ACTIVE_TENANT_SESSION_KEY] = membership.tenant_id
            messages.success(request, _("Welcome to %(name)s.") % {"name": membership.tenant.name})
            return redirect("dashboard")
    return render(request, "tenants/invitation.html", {"invitation": invitation})


# --- Personal settings: profile, SSH keys, API tokens, audit -----------------------


@login_required
def settings_profile(request):
    form = ProfileForm(request.POST or None, instance=request.user)
    if request.method == "POST" and form.is_valid():
        form.save()
        messages.success(request, _("Profile saved."))
        return redirect("settings")
    return render(request, "tenants/settings_profile.html", {"form": form})


@tenant_page(Capability.VIEW_COMPUTE)
def ssh_keys(request):
    form = SshKeyForm()
    if request.method == "POST":
        form = SshKeyForm(request.POST)
        if form.is_valid():
            try:
                key = services.ssh_key_add(membership=request.membership, actor=request.user, **form.cleaned_data)
            except ValidationError as exc:
                add_service_errors(form, exc)
            except PermissionDenied:
                form.add_error(None, _("Your role does not allow adding SSH keys."))
            else:
                messages.success(request, _("Key %(name)s added.") % {"name": key.name})
                return redirect("ssh_keys")
    return render(
        request,
        "tenants/ssh_keys.html",
        {
            "keys": selectors.ssh_keys_of(request.membership.tenant),
            "form": form,
            "can_add": role_can(request.membership.role, Capability.USE_COMPUTE),
            "can_manage_all": role_can(request.membership.role, Capability.MANAGE_KEYS),
        },
    )


@tenant_page(Capability.VIEW_COMPUTE)
@require_POST
def ssh_key_delete(request, pk):
    key = get_object_or_404(selectors.ssh_keys_of(request.membership.tenant), pk=pk)
    run_action(
        request,
        lambda: services.ssh_key_delete(membership=request.membership, actor=request.user, key=key),
        _("Key %(name)s deleted.") % {"name": key.name},
    )
    return redirect("ssh_keys")


@tenant_page()
def api_tokens(request):
    membership = request.membership
    form = ApiTokenForm()
    issued = None
    if request.method == "POST":
        form = ApiTokenForm(request.POST)
        if form.is_valid():
            try:
                issued = services.api_token_create(membership=membership, actor=request.user, **form.cleaned_data)
            except ValidationError as exc:
                add_service_errors(form, exc)
            else:
                form = ApiTokenForm()
    sees_all = role_can(membership.role, Capability.MANAGE_KEYS)
    return render(
        request,
        "tenants/api_tokens.html",
        {
            "tokens": selectors.api_tokens_of(membership.tenant, user=None if sees_all else request.user),
            "form": form,
            "issued": issued,
            "sees_all": sees_all,
        },
    )


@tenant_page()
@require_POST
def api_token_revoke(request, pk):
    sees_all = role_can(request.membership.role, Capability.MANAGE_KEYS)
    tokens = selectors.api_tokens_of(request.membership.tenant, user=None if sees_all else request.user)
    token = get_object_or_404(tokens, pk=pk)
    run_action(
        request,
        lambda: services.api_token_revoke(membership=request.membership, actor=request.user, token=token),
        _("Token %(name)s revoked.") % {"name": token.name},
    )
    return redirect("api_tokens")


@tenant_page(Capability.VIEW_AUDIT)
def audit_log(request):
    events = selectors.audit_events_of(request.membership.tenant)
    action = request.GET.get("action", "").strip()
    if action:
        events = events.filter(action__startswith=action)
    page = Paginator(events, 50).get_page(request.GET.get("page"))
    return render(request, "tenants/audit_log.html", {"page": page, "action": action})


@tenant_page()
def tenant_quota_panel(request):
    """The quota table alone, for live refreshes of the dashboard (htmx)."""
    return render(
        request, "portal/_quota_table.html", {"quota_lines": selectors.quota_usage(request.membership.tenant)}
    )
