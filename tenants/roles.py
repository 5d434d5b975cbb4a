"""What each tenant role may do. One table, checked by services, views and the API."""

from enum import StrEnum

from tenants.models import Role


class Capability(StrEnum):
    VIEW_TENANT = "view_tenant"  # tier, quotas, members
    VIEW_COMPUTE = "view_compute"  # VMs, tasks, their status
    USE_COMPUTE = "use_compute"  # order VMs, submit tasks, own SSH keys, see access secrets
    VIEW_BILLING = "view_billing"
    MANAGE_BILLING = "manage_billing"
    MANAGE_MEMBERS = "manage_members"
    MANAGE_KEYS = "manage_keys"  # everyone's SSH keys and API tokens in the tenant
    VIEW_AUDIT = "view_audit"
    MANAGE_TENANT = "manage_tenant"


_ALL = set(Capability)

ROLE_CAPABILITIES: dict[str, set[Capability]] = {
    Role.OWNER: _ALL,
    Role.ADMIN: _ALL - {Capability.MANAGE_TENANT},
    Role.MEMBER: {Capability.VIEW_TENANT, Capability.VIEW_COMPUTE, Capability.USE_COMPUTE},
    Role.BILLING: {Capability.VIEW_TENANT, Capability.VIEW_BILLING, Capability.MANAGE_BILLING},
    Role.VIEWER: {Capability.VIEW_TENANT, Capability.VIEW_COMPUTE, Capability.VIEW_BILLING},
}


def role_can(role: str, capability: Capability) -> bool:
    return capability in ROLE_CAPABILITIES.get(role, set())


def assignable_roles(actor_role: str) -> list[str]:
    """Roles an actor may hand out: only owners create or demote owners."""
    if actor_role == Role.OWNER:
        return list(Role.values)
    if actor_role == Role.ADMIN:
        return [r for r in Role.values if r != Role.OWNER]
    return []
