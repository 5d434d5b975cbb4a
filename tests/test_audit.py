"""The audit log: who, tenant, what, before/after, source IP and time — and it cannot be rewritten."""

import pytest
from django.core.exceptions import ValidationError
from django.db import DatabaseError, connection, transaction

from tenants.models import AuditEvent, Role
from tests.factories import add_member

pytestmark = pytest.mark.django_db


def test_page_action_records_actor_ip_request_id_and_change(client, tenant, user):
    target = add_member(tenant, Role.MEMBER)
    client.force_login(user)
    response = client.post(
        f"/team/members/{target.pk}/role/",
        {"role": "viewer"},
        REMOTE_ADDR="203.0.113.7",
        HTTP_X_REQUEST_ID="req-abc123",
    )
    assert response.status_code == 302
    event = AuditEvent.objects.get(action="member.role_changed")
    assert (event.actor, event.tenant, event.source_ip, event.request_id, event.via) == (
        user,
        tenant,
        "203.0.113.7",
        "req-abc123",
        "web",
    )
    assert event.before == {"role": "member"} and event.after == {"role": "viewer", "user": target.user.email}
    assert event.target_type == "membership" and event.target_id == str(target.pk)
    assert response["X-Request-ID"] == "req-abc123"


def test_api_action_is_marked_api_and_forwarded_ip_is_trusted_only_behind_a_proxy(api, user, tenant, settings):
    client = api(user)
    client.post(
        "/api/v1/tokens/", {"name": "a"}, format="json", REMOTE_ADDR="10.0.0.2", HTTP_X_FORWARDED_FOR="198.51.100.9"
    )
    first = AuditEvent.objects.get(action="api_token.created")
    assert first.via == "api" and first.source_ip == "10.0.0.2"  # no proxy configured: header ignored
    settings.TRUSTED_PROXY_COUNT = 1
    client.post(
        "/api/v1/tokens/", {"name": "b"}, format="json", REMOTE_ADDR="10.0.0.2", HTTP_X_FORWARDED_FOR="198.51.100.9"
    )
    assert AuditEvent.objects.filter(action="api_token.created").latest("id").source_ip == "198.51.100.9"


def test_events_cannot_be_edited_or_deleted_through_the_model(tenant):
    event = AuditEvent.objects.filter(tenant=tenant).first()
    event.action = "tampered"
    with pytest.raises(ValidationError):
        event.save()
    with pytest.raises(ValidationError):
        event.delete()


@pytest.mark.postgres
def test_database_refuses_update_and_delete_on_postgresql(tenant):
    event_id = AuditEvent.objects.filter(tenant=tenant).values_list("id", flat=True).first()
    for statement in (
        "UPDATE tenants_auditevent SET action = 'x' WHERE id = %s",
        "DELETE FROM tenants_auditevent WHERE id = %s",
    ):
        with pytest.raises(DatabaseError, match="append-only"), transaction.atomic(), connection.cursor() as cur:
            cur.execute(statement, [event_id])
    assert AuditEvent.objects.filter(pk=event_id).exclude(action="x").exists()


def test_customer_audit_page_shows_their_tenant_only(client, tenant, user, member_of):
    from tests.factories import make_tenant

    make_tenant(name="Someone else")
    client.force_login(user)
    page = client.get("/settings/audit/")
    assert page.status_code == 200
    events = list(page.context["page"])
    assert events and all(e.tenant_id == tenant.pk for e in events)
    member = member_of(tenant, Role.MEMBER)
    client.force_login(member)
    assert client.get("/settings/audit/").status_code == 403
