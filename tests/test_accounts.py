"""Sign-up, email verification, login, password reset, MFA, and the staff console's MFA gate."""

import re
import time

import pytest
from allauth.mfa.models import Authenticator
from allauth.mfa.totp.internal.auth import TOTP, format_hotp_value, generate_totp_secret, hotp_value
from django.core import mail

from tenants.models import AuditEvent, Membership, Role, TenantKind, User
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

PASSWORD = "a-long-Passw0rd-for-tests"


def signup(client, email="new@example.com"):
    return client.post("/accounts/signup/", {"email": email, "password1": PASSWORD, "password2": PASSWORD})


def confirmation_link() -> str:
    body = mail.outbox[-1].body
    return re.search(r"https?://[^/\s]+(/accounts/confirm-email/[^\s]+)", body).group(1)


def test_signup_creates_a_personal_tenant_owned_by_the_user(client):
    response = signup(client)
    assert response.status_code == 302
    user = User.objects.get(email="new@example.com")
    membership = Membership.objects.get(user=user)
    assert membership.role == Role.OWNER
    assert membership.tenant.kind == TenantKind.PERSONAL
    assert membership.tenant.tier.code == "standard"
    assert membership.tenant.quota.vcpus == membership.tenant.tier.default_vcpus
    assert AuditEvent.objects.filter(tenant=membership.tenant, action="tenant.created", actor=user).exists()


def test_email_must_be_verified_before_login_and_the_link_logs_in(client):
    signup(client)
    assert mail.outbox[-1].to == ["new@example.com"]
    client.logout()
    refused = client.post("/accounts/login/", {"login": "new@example.com", "password": PASSWORD})
    assert refused.status_code == 302 and "confirm-email" in refused["Location"]
    assert client.get("/").status_code == 302  # not logged in

    link = confirmation_link()
    assert client.get(link).status_code == 200
    confirmed = client.post(link)
    assert confirmed.status_code == 302
    assert client.get("/").status_code == 200

    client.post("/accounts/logout/")
    assert client.get("/").status_code == 302
    login = client.post("/accounts/login/", {"login": "new@example.com", "password": PASSWORD})
    assert login.status_code == 302 and login["Location"] == "/"


def test_duplicate_email_does_not_reveal_the_account_and_weak_password_is_a_form_error(client):
    UserFactory(email="taken@example.com")
    response = client.post(
        "/accounts/signup/", {"email": "taken@example.com", "password1": PASSWORD, "password2": PASSWORD}
    )
    # Same answer as a fresh sign-up (no account enumeration); the owner is told by email instead.
    assert response.status_code == 302 and response["Location"] == "/accounts/confirm-email/"
    assert User.objects.filter(email="taken@example.com").count() == 1
    assert mail.outbox[-1].to == ["taken@example.com"]
    weak = client.post("/accounts/signup/", {"email": "x@example.com", "password1": "123", "password2": "123"})
    assert weak.status_code == 200 and weak.context["form"].errors["password1"]
    assert not User.objects.filter(email="x@example.com").exists()
    assert not Membership.objects.filter(user__email="x@example.com").exists()


def test_password_reset_sends_a_working_link(client):
    UserFactory(email="forgot@example.com")
    client.post("/accounts/password/reset/", {"email": "forgot@example.com"})
    link = re.search(r"https?://[^/\s]+(/accounts/password/reset/key/[^\s]+)", mail.outbox[-1].body).group(1)
    form_page = client.get(link, follow=True)
    assert form_page.status_code == 200
    changed = client.post(
        form_page.redirect_chain[-1][0] if form_page.redirect_chain else link,
        {"password1": "Another-long-pass-42", "password2": "Another-long-pass-42"},
    )
    assert changed.status_code == 302
    assert User.objects.get(email="forgot@example.com").check_password("Another-long-pass-42")


def current_code(secret: str) -> str:
    return format_hotp_value(hotp_value(secret, int(time.time()) // 30))


def test_user_can_turn_on_totp(client):
    user = UserFactory(email="mfa@example.com")
    client.post("/accounts/login/", {"login": "mfa@example.com", "password": "correct-horse-battery"})
    # Security-sensitive changes ask for the password again first.
    assert client.get("/accounts/2fa/totp/activate/")["Location"].startswith("/accounts/reauthenticate/")
    client.post("/accounts/reauthenticate/", {"password": "correct-horse-battery"})
    page = client.get("/accounts/2fa/totp/activate/")
    assert page.status_code == 200
    secret = page.context["form"].secret
    response = client.post("/accounts/2fa/totp/activate/", {"code": current_code(secret)})
    assert response.status_code == 302
    assert Authenticator.objects.filter(user=user, type=Authenticator.Type.TOTP).exists()


class TestConsoleNeedsStaffWithMfa:
    def test_anonymous_is_sent_to_login(self, client):
        response = client.get("/console/")
        assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")

    def test_customer_is_refused(self, client):
        client.force_login(UserFactory())
        assert client.get("/console/").status_code == 403
        assert client.get("/admin/").status_code == 403

    def test_staff_without_mfa_is_sent_to_set_it_up(self, client):
        client.force_login(UserFactory(is_staff=True))
        response = client.get("/console/")
        assert response.status_code == 302 and response["Location"] == "/accounts/2fa/totp/activate/"

    def test_staff_with_mfa_must_use_it_in_this_session(self, client):
        staff = UserFactory(is_staff=True, email="am@example.com")
        TOTP.activate(staff, generate_totp_secret())
        client.force_login(staff)  # a login without the second factor
        response = client.get("/console/")
        assert response.status_code == 302 and response["Location"].startswith("/accounts/2fa/reauthenticate/")

    def test_staff_who_logged_in_with_totp_gets_in(self, client):
        staff = UserFactory(is_staff=True, email="am@example.com")
        secret = generate_totp_secret()
        TOTP.activate(staff, secret)
        first = client.post("/accounts/login/", {"login": "am@example.com", "password": "correct-horse-battery"})
        assert first["Location"] == "/accounts/2fa/authenticate/"
        second = client.post("/accounts/2fa/authenticate/", {"code": current_code(secret)})
        assert second.status_code == 302
        page = client.get("/console/")
        assert page.status_code == 200
        assert "Console" in page.content.decode()
