"""End to end in a real browser: sign up, verify the email, log in, create an organisation,
invite a colleague, and the colleague signs up and accepts.

Drives Debian's Chromium through Playwright against pytest-django's live server. Screenshots of
each step go to $PORTAL_ARTIFACTS/screenshots/foundation when that is set, else to tmp_path.
"""

import os
import re
from pathlib import Path

import pytest
from django.core import mail
from playwright.sync_api import expect, sync_playwright

from tenants.models import Membership, Role, Tenant, TenantKind, User

pytestmark = [pytest.mark.browser]

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
FOUNDER = "founder@example.com"
COLLEAGUE = "colleague@example.com"
PASSWORD = "Plum-Ledger-Quasar-42"
ORG = "Deep Learning Lab"


def _screens_dir(tmp_path: Path) -> Path:
    root = os.environ.get("PORTAL_ARTIFACTS")
    folder = Path(root) / "screenshots" / "foundation" if root else tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _mail_to(address: str, pattern: str) -> tuple[mail.EmailMessage, str]:
    """The latest email to `address` whose body holds a link matching `pattern`; returns it and the path."""
    for message in reversed(mail.outbox):
        if address in message.to:
            found = re.search(pattern, message.body)
            if found:
                return message, found.group(0)
    sent = [(m.to, m.subject) for m in mail.outbox]
    raise AssertionError(f"no email to {address} with a link like {pattern}; sent: {sent}")


class Browser:
    """One browser context (one person) with console-error collection."""

    def __init__(self, browser, base_url: str, errors: list[str], who: str):
        self.base_url = base_url
        self.context = browser.new_context(base_url=base_url, locale="en-US", viewport={"width": 1280, "height": 900})
        self.context.set_default_timeout(15_000)
        # The live server speaks WSGI only, so the dashboard's live-update socket (/ws/dashboard/,
        # served by Channels under ASGI) cannot connect there and Chromium would log a failed
        # handshake. Answer it in the browser instead; the consumer has its own tests.
        self.sockets: list[str] = []
        self.context.route_web_socket(re.compile(r"/ws/"), lambda ws: self.sockets.append(ws.url))
        self.page = self.context.new_page()
        self.page.on(
            "console",
            lambda msg: msg.type == "error" and errors.append(f"[{who}] console: {msg.text} @ {msg.location}"),
        )
        self.page.on("pageerror", lambda exc: errors.append(f"[{who}] pageerror: {exc}"))

    def sign_up(self, email: str, path: str = "/accounts/signup/"):
        page = self.page
        page.goto(path)
        page.fill("#id_email", email)
        page.fill("#id_password1", PASSWORD)
        page.fill("#id_password2", PASSWORD)
        page.locator("main form button[type=submit]").click()
        # allauth's "verify your email" page.
        page.wait_for_url("**/accounts/confirm-email/")

    def confirm_email(self, email: str):
        _, link = _mail_to(email, r"/accounts/confirm-email/[^/\s]+/")
        page = self.page
        page.goto(link)
        expect(page.locator("main")).to_contain_text(email)
        page.locator("main form button[type=submit]").click()
        page.wait_for_load_state()
        if "/accounts/login/" in page.url:  # not logged in on confirmation: do it by hand
            self.log_in(email)

    def log_in(self, email: str):
        page = self.page
        page.goto("/accounts/login/")
        page.fill("#id_login", email)
        page.fill("#id_password", PASSWORD)
        page.locator("main form button[type=submit]").click()
        page.wait_for_url(f"{self.base_url}/")

    def log_out(self):
        page = self.page
        page.get_by_role("button", name="Log out").click()
        page.wait_for_load_state()
        expect(page.get_by_role("link", name="Log in")).to_be_visible()

    def shot(self, folder: Path, name: str):
        self.page.screenshot(path=str(folder / name), full_page=True)


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_sign_up_create_organisation_invite_and_join(live_server, monkeypatch, tmp_path, settings):
    # Playwright's sync API runs an asyncio loop in this thread; the ORM checks below are synchronous.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    settings.PORTAL_BASE_URL = live_server.url  # so emailed invitation links point at this server
    mail.outbox.clear()
    screens = _screens_dir(tmp_path)
    errors: list[str] = []

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            founder = Browser(browser, live_server.url, errors, "founder")
            page = founder.page

            # 1. Sign up.
            founder.sign_up(FOUNDER)
            expect(page.locator("main")).to_contain_text(FOUNDER)
            founder.shot(screens, "01-signup.png")
            user = User.objects.get(email=FOUNDER)
            assert not user.emailaddress_set.get().verified

            # 2. Verify the email, then log out and back in with the password.
            founder.confirm_email(FOUNDER)
            assert user.emailaddress_set.get().verified
            founder.shot(screens, "02-verified.png")
            founder.log_out()
            founder.log_in(FOUNDER)

            # 3. The dashboard shows the personal workspace made at sign-up.
            personal = Tenant.objects.get(memberships__user=user, kind=TenantKind.PERSONAL)
            expect(page.locator("main h1")).to_have_text(personal.name)
            expect(page.locator("#tenant-switch option:checked")).to_have_text(personal.name)
            expect(page.locator("#quota-panel")).to_be_visible()
            founder.shot(screens, "03-dashboard.png")

            # 4. Create an organisation; it becomes the active tenant and we land on the team page.
            page.goto("/tenants/new/")
            page.get_by_label("Organisation name").fill(ORG)
            page.get_by_role("button", name="Create").click()
            page.wait_for_url("**/team/")
            expect(page.locator("#messages")).to_contain_text(ORG)
            expect(page.locator("main h1")).to_have_text(ORG)
            expect(page.locator(f'tr[data-member="{FOUNDER}"]')).to_contain_text("Owner")
            expect(page.locator("#tenant-switch option:checked")).to_have_text(ORG)
            founder.shot(screens, "04-organisation.png")

            # 5. Invite a colleague as Member.
            form = page.locator("#invite-form")
            form.get_by_label("Email").fill(COLLEAGUE)
            form.get_by_label("Role").select_option(Role.MEMBER)
            form.get_by_role("button", name="Send invitation").click()
            page.wait_for_url("**/team/")
            expect(page.locator("#messages")).to_contain_text(f"Invitation sent to {COLLEAGUE}")
            row = page.locator(f'tr[data-invitation="{COLLEAGUE}"]')
            expect(row).to_be_visible()
            expect(row).to_contain_text("Member")
            invitation_mail, invitation_url = _mail_to(COLLEAGUE, r"https?://\S+/invitations/[\w-]+/")
            assert ORG in invitation_mail.subject
            assert invitation_url.startswith(live_server.url)
            founder.shot(screens, "05-invited.png")

            # 6. The colleague, in a browser of their own, signs up from the invitation and accepts it.
            colleague = Browser(browser, live_server.url, errors, "colleague")
            cpage = colleague.page
            cpage.goto(invitation_url)
            expect(cpage.locator("main h1")).to_have_text(f"Join {ORG}")
            colleague.shot(screens, "06-invitation-anonymous.png")
            cpage.locator("main").get_by_role("link", name="Sign up").click()
            cpage.wait_for_url("**/accounts/signup/**")
            cpage.fill("#id_email", COLLEAGUE)
            cpage.fill("#id_password1", PASSWORD)
            cpage.fill("#id_password2", PASSWORD)
            cpage.locator("main form button[type=submit]").click()
            cpage.wait_for_url("**/accounts/confirm-email/")
            colleague.confirm_email(COLLEAGUE)
            # Signed in on confirmation and sent back to the invitation (?next= survives verification).
            expect(cpage.get_by_role("button", name="Log out")).to_be_visible()
            expect(cpage).to_have_url(invitation_url)
            colleague.shot(screens, "07-colleague-verified.png")

            cpage.get_by_role("button", name="Accept invitation").click()
            cpage.wait_for_url(f"{live_server.url}/")
            expect(cpage.locator("#messages")).to_contain_text(f"Welcome to {ORG}")
            expect(cpage.locator("#tenant-switch option:checked")).to_have_text(ORG)
            expect(cpage.locator("#tenant-switch option", has_text=ORG)).to_have_count(1)
            expect(cpage.locator("main h1")).to_have_text(ORG)
            colleague.shot(screens, "08-colleague-joined.png")
            assert Membership.objects.get(tenant__name=ORG, user__email=COLLEAGUE).role == Role.MEMBER

            # The founder sees the colleague as a member and the invitation no longer pending.
            page.goto("/team/")
            member_row = page.locator(f'tr[data-member="{COLLEAGUE}"]')
            expect(member_row).to_be_visible()
            expect(member_row.locator("select")).to_have_value(Role.MEMBER)
            expect(page.locator(f'tr[data-invitation="{COLLEAGUE}"]')).to_have_count(0)
            founder.shot(screens, "09-team.png")

            # The dashboard tried its live-update socket (answered in the browser, see Browser).
            assert any(url.endswith("/ws/dashboard/") for url in founder.sockets + colleague.sockets)
        finally:
            browser.close()

    errors = [e for e in errors if "favicon.ico" not in e]
    assert errors == [], "\n".join(errors)
