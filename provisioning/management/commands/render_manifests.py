"""Print the Kubernetes objects the portal would apply for a new VM, for review (DESIGN.md section 6).

    python manage.py render_manifests --tenant acme-ai --plan a100-2x-training [--profile database]
        [--name train-01] [--validate]

The tenant's namespace and isolation objects come first, then the VM's Secret, VirtualMachine and
Service, as one multi-document YAML stream that `kubectl apply --dry-run=server -f -` accepts. Ids and
the Jupyter token are placeholders; nothing is created or stored.
"""

import uuid

import kubernetes_validate
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from provisioning import manifests, validation
from provisioning.models import Plan, Profile
from tenants.models import Tenant

# Fixed placeholders, so two renders of the same inputs can be diffed.
PLACEHOLDER_VM_ID = str(uuid.UUID(int=1))
PLACEHOLDER_ORDER_ID = str(uuid.UUID(int=2))
PLACEHOLDER_JUPYTER_TOKEN = "rendered-for-review-not-a-real-token"


class Command(BaseCommand):
    help = "Print, as YAML, the tenant objects and the VM objects the portal would apply for a new VM of a plan."

    def add_arguments(self, parser):
        parser.add_argument("--tenant", required=True, help="Tenant slug.")
        parser.add_argument("--plan", required=True, help="Plan code, e.g. a100-2x-training.")
        parser.add_argument("--profile", choices=Profile.values, help="Render with this workload profile instead.")
        parser.add_argument("--name", default="example-vm", help="The VM's name (default: example-vm).")
        parser.add_argument(
            "--validate", action="store_true", help="Validate every object strictly before printing it."
        )

    def handle(self, *args, **options):
        tenant = Tenant.objects.filter(slug=options["tenant"]).first()
        if tenant is None:
            raise CommandError(f"No tenant with slug {options['tenant']!r}.")
        plan = Plan.objects.select_related("gpu_model").filter(code=options["plan"]).first()
        if plan is None:
            known = ", ".join(Plan.objects.values_list("code", flat=True))
            raise CommandError(f"No plan with code {options['plan']!r}. Plans: {known}.")
        if not hasattr(tenant, "quota"):
            raise CommandError(f"Tenant {tenant.slug!r} has no quota, so it has no ResourceQuota to render.")

        key = tenant.ssh_keys.order_by("name", "id").first()
        shape = manifests.VmShape(
            tenant_slug=tenant.slug,
            namespace=manifests.tenant_namespace(tenant.slug),
            vm_id=PLACEHOLDER_VM_ID,
            order_id=PLACEHOLDER_ORDER_ID,
            name=options["name"],
            plan=manifests.plan_shape(plan, profile=options["profile"]),
            ssh_public_keys=[key.public_key] if key else [],
            ssh_user="ubuntu",
            cloud_init_extra="",
            jupyter_token=PLACEHOLDER_JUPYTER_TOKEN,
        )
        try:
            objects = manifests.tenant_manifests(manifests.tenant_shape(tenant)) + manifests.vm_manifests(
                shape, storage_class=settings.KUBEVIRT_STORAGE_CLASS
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from exc

        header = [
            f"# Tenant {tenant.slug}, new VM {shape.name!r} of plan {plan.code} (profile {shape.plan.profile}).",
            f"# Placeholders: VM id {PLACEHOLDER_VM_ID}, order id {PLACEHOLDER_ORDER_ID}, Jupyter token.",
        ]
        if key:
            header.append(f"# SSH key: the tenant's key {key.name!r} as an example.")
        else:
            header.append(
                "# SSH key: the tenant has none yet, so ssh_authorized_keys is empty; orders add the chosen keys."
            )
        if options["validate"]:
            header += self._validate(objects)
        self.stdout.write("\n".join(header))
        self.stdout.write(manifests.to_yaml_documents(objects), ending="")

    def _validate(self, objects: list[dict]) -> list[str]:
        """Validate every object; the header lines saying against what. Invalid objects end the command."""
        skipped = 0
        for obj in objects:
            if validation.uses_kubevirt_schema(obj) and not validation.schema_available():
                skipped += 1
                continue
            try:
                validation.validate_manifest(obj)
            except validation.ManifestInvalid as exc:
                raise CommandError(f"Invalid manifest: {exc}") from exc
        lines = [f"# validated against Kubernetes {kubernetes_validate.latest_version()} (kubernetes-validate, strict)"]
        if skipped:
            self.stderr.write(
                f"{skipped} KubeVirt object(s) not validated: the schema {validation.schema_path()} is missing "
                "(settings.PORTAL_KUBEVIRT_SCHEMA)."
            )
        else:
            lines.append(f"# validated against {validation.schema_path()} (KubeVirt, unknown fields refused)")
        return lines
