import factory
from allauth.account.models import EmailAddress
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from tenants import services
from tenants.models import Membership, Role, Tenant, User


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = User
        skip_postgeneration_save = True

    email = factory.Sequence(lambda n: f"user{n}@example.com")
    display_name = factory.Faker("name")
    password = factory.django.Password("correct-horse-battery")

    @factory.post_generation
    def verified(self, create, extracted, **kwargs):
        if create and extracted is not False:
            EmailAddress.objects.create(user=self, email=self.email, verified=True, primary=True)


def make_tenant(*, owner: User | None = None, name: str = "Acme AI") -> Tenant:
    """A tenant made the way the product makes them: through the service, with quotas and an owner."""
    return services.tenant_create(name=name, owner=owner or UserFactory())


def add_member(tenant: Tenant, role: str = Role.MEMBER, user: User | None = None) -> Membership:
    return Membership.objects.create(tenant=tenant, user=user or UserFactory(), role=role)


def new_public_key() -> str:
    """A fresh ed25519 public key line, as a customer would paste it."""
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def staff_with_role(role: str, **fields) -> User:
    """A staff member with a console role (crm.models.StaffRole). Staff without a profile only read
    (settings.PORTAL_STAFF_DEFAULT_ROLE is support): anyone who changes things needs a role."""
    from crm.models import StaffProfile

    user = UserFactory(is_staff=True, **fields)
    StaffProfile.objects.create(user=user, role=role)
    return user
