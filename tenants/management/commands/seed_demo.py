"""Seed the demo logins (a customer and a staff account manager) and the cluster inventory, and print them.

The catalogue itself (GPU models, tiers, VM plans and prices) is seeded by migrations. Safe to run again.
"""

from allauth.account.models import EmailAddress
from allauth.mfa.models import Authenticator
from allauth.mfa.totp.internal.auth import TOTP
from django.core.management.base import BaseCommand
from django.db import transaction

from crm.models import CustomerAccount, StaffProfile, StaffRole
from tenants import services
from tenants.models import Membership, Tenant, User

CUSTOMER = ("demo@example.com", "demo-password-123")
STAFF = ("manager@example.com", "manager-password-123")
# A second staff login for the console's maker-checker: finance approves credits the manager proposes.
FINANCE = ("finance@example.com", "finance-password-123")
# A fixed TOTP secret so the demo staff login can pass MFA: add it to an authenticator app.
STAFF_TOTP_SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"


def _user(email: str, password: str, **extra) -> tuple[User, bool]:
    user = User.objects.filter(email=email).first()
    created = user is None
    if created:
        user = User.objects.create_user(email=email, password=password, **extra)
    EmailAddress.objects.update_or_create(user=user, email=email, defaults={"verified": True, "primary": True})
    return user, created


class Command(BaseCommand):
    help = "Create the demo customer and staff logins (idempotent) and print them."

    @transaction.atomic
    def handle(self, *args, **options):
        customer, created = _user(*CUSTOMER, display_name="Demo Customer")
        if not Membership.objects.filter(user=customer).exists():
            services.tenant_create_personal(user=customer)
        if created:
            team = services.tenant_create(name="Demo AI Lab", owner=customer)
            self.stdout.write(f"Created organisation {team.name}")
        staff, _ = _user(*STAFF, display_name="Demo Account Manager", is_staff=True)
        if not Membership.objects.filter(user=staff).exists():
            services.tenant_create_personal(user=staff)
        if not Authenticator.objects.filter(user=staff, type=Authenticator.Type.TOTP).exists():
            TOTP.activate(staff, STAFF_TOTP_SECRET)
        StaffProfile.objects.get_or_create(user=staff, defaults={"role": StaffRole.ACCOUNT_MANAGER})
        for tenant in Tenant.objects.filter(memberships__user=customer, account__isnull=True):
            CustomerAccount.objects.create(tenant=tenant)
        CustomerAccount.objects.filter(tenant__memberships__user=customer, account_manager__isnull=True).update(
            account_manager=staff
        )
        finance, _ = _user(*FINANCE, display_name="Demo Finance", is_staff=True)
        StaffProfile.objects.get_or_create(user=finance, defaults={"role": StaffRole.FINANCE})
        if not Authenticator.objects.filter(user=finance, type=Authenticator.Type.TOTP).exists():
            TOTP.activate(finance, STAFF_TOTP_SECRET)
        from provisioning.services import inventory_sync

        nodes = inventory_sync()
        self.stdout.write(f"Cluster inventory: {nodes} nodes")
        self.stdout.write(self.style.SUCCESS("Demo logins:"))
        self.stdout.write(f"  customer: {CUSTOMER[0]} / {CUSTOMER[1]}")
        self.stdout.write(f"  staff account manager: {STAFF[0]} / {STAFF[1]}")
        self.stdout.write(f"    TOTP secret for the console (add to an authenticator app): {STAFF_TOTP_SECRET}")
        self.stdout.write("    or print the current code with: python manage.py demo_totp")
        self.stdout.write(f"  staff finance (approves credits above the threshold): {FINANCE[0]} / {FINANCE[1]}")
        self.stdout.write("    same TOTP secret as the account manager (python manage.py demo_totp)")
