"""Quotas: defaults by tier, reservations that refuse clearly, staff edits, and safety under concurrent orders."""

import threading

import pytest
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import connection

from tenants import selectors, services
from tenants.models import AuditEvent, QuotaReservation
from tenants.services import QuotaExceeded, ResourceDemand
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


def lines(tenant) -> dict:
    return {line.key: (line.used, line.limit) for line in selectors.quota_usage(tenant)}


def test_reservation_counts_as_use_until_released(tenant):
    demand = ResourceDemand(gpu_model="A100", gpus=2, vcpus=16, memory_gib=128, hugepages_gib=128, vms=1)
    services.quota_reserve(tenant=tenant, holder_type="vm", holder_id="1", demand=demand)
    use = lines(tenant)
    assert use["gpu:A100"] == (2, 2) and use["vcpus"] == (16, 64) and use["vms"] == (1, 2)
    assert services.quota_release(holder_type="vm", holder_id="1") == 1
    assert services.quota_release(holder_type="vm", holder_id="1") == 0  # idempotent
    assert lines(tenant)["gpu:A100"] == (0, 2)


def test_over_quota_is_refused_with_every_shortfall_and_nothing_held(tenant):
    with pytest.raises(QuotaExceeded) as exc:
        services.quota_reserve(
            tenant=tenant, holder_type="vm", holder_id="1", demand=ResourceDemand(gpu_model="A100", gpus=3, vcpus=100)
        )
    messages = exc.value.message_dict["quota"]
    assert "vCPUs: 100 requested, 64 of 64 free" in messages
    assert "A100 GPUs: 3 requested, 2 of 2 free" in messages
    assert not QuotaReservation.objects.exists()


def test_h100_needs_staff_to_raise_the_standard_limit(tenant):
    with pytest.raises(QuotaExceeded, match="H100 GPUs: 1 requested, 0 of 0 free"):
        services.quota_reserve(
            tenant=tenant, holder_type="task", holder_id="7", demand=ResourceDemand(gpu_model="H100", gpus=1, tasks=1)
        )


def test_unknown_gpu_model_is_a_field_error(tenant):
    with pytest.raises(ValidationError) as exc:
        services.quota_reserve(
            tenant=tenant, holder_type="task", holder_id="7", demand=ResourceDemand(gpu_model="Z9", gpus=1)
        )
    assert "gpu_model" in exc.value.message_dict


def test_staff_change_quotas_and_it_is_audited(tenant, user):
    staff = UserFactory(is_staff=True)
    services.quota_update(tenant=tenant, actor=staff, limits={"vcpus": 128}, gpus={"H100": 4})
    assert lines(tenant)["vcpus"] == (0, 128) and lines(tenant)["gpu:H100"] == (0, 4)
    event = AuditEvent.objects.get(action="quota.updated")
    assert event.before["vcpus"] == 64 and event.after["vcpus"] == 128
    assert event.before["gpus"]["H100"] == 0 and event.after["gpus"]["H100"] == 4
    with pytest.raises(PermissionDenied):
        services.quota_update(tenant=tenant, actor=user, limits={"vcpus": 1000}, gpus={})
    with pytest.raises(ValidationError) as exc:
        services.quota_update(tenant=tenant, actor=staff, limits={"vcpus": -1, "bogus": 1}, gpus={"Z9": 1})
    assert {"vcpus", "bogus", "gpu_Z9"} <= set(exc.value.message_dict)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_concurrent_orders_never_exceed_the_quota(tenant):
    """20 threads race to reserve 1 A100 each against a limit of 2: exactly 2 win."""
    barrier = threading.Barrier(20)
    outcomes = []

    def order(n):
        try:
            barrier.wait()
            services.quota_reserve(
                tenant=tenant,
                holder_type="vm",
                holder_id=str(n),
                demand=ResourceDemand(gpu_model="A100", gpus=1, vcpus=8, vms=1),
            )
            outcomes.append("ok")
        except QuotaExceeded:
            outcomes.append("refused")
        finally:
            connection.close()

    threads = [threading.Thread(target=order, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("ok") == 2 and outcomes.count("refused") == 18
    assert QuotaReservation.objects.filter(released_at__isnull=True).count() == 2
    assert lines(tenant)["gpu:A100"] == (2, 2)
