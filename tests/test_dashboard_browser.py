"""The dashboard, the notification centre and the email preferences in a real browser at phone width
(375×800), in English and in Chinese, against the real ASGI server (tests/test_vm_browser.py's forked
Daphne, Redis channel layer): no console or page errors, no horizontal scrolling, both charts drawn;
and, without a reload, the bell's count goes up when the server notifies, and a task's badge follows
its state.

Screenshots go to $PORTAL_ARTIFACTS/screenshots/dashboard when that is set, else to tmp_path.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import connections
from django.test import Client
from django.utils import timezone
from playwright.sync_api import expect, sync_playwright

from hosting import services as hosting_services
from hosting.models import Task
from notifications import services as notification_services
from notifications.models import NotificationKind
from provisioning.models import VmState
from tests.conftest import CHROMIUM
from tests.factories import UserFactory, make_tenant
from tests.test_billing_helpers import make_vm, meter_and_rate, task_run, top_up
from tests.test_vm_browser import CHROMIUM_ARGS, INIT_SCRIPT, asgi_live_server  # noqa: F401  (a fixture, by name)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.redis,
    pytest.mark.django_db(transaction=True, serialized_rollback=True),
]

PHONE = {"width": 375, "height": 800}
PAGES = [("dashboard", "/"), ("notifications", "/notifications/"), ("settings", "/settings/notifications/")]
CANVAS_DRAWN = """(id) => {
  const canvas = document.getElementById(id);
  if (!canvas || canvas.dataset.drawn !== "true" || !canvas.width || !canvas.height) return false;
  const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  for (let i = 3; i < pixels.length; i += 4) if (pixels[i] !== 0) return true;
  return false;
}"""
OVERFLOW = "() => document.documentElement.scrollWidth - window.innerWidth"


def _screens_dir(tmp_path: Path) -> Path:
    root = os.environ.get("PORTAL_ARTIFACTS")
    folder = Path(root) / "screenshots" / "dashboard" if root else tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _session_cookie(user, url: str) -> dict:
    client = Client()
    client.force_login(user)
    return {"name": "sessionid", "value": client.cookies["sessionid"].value, "url": url}


def _customer():
    """A tenant with money, a month of usage on two GPU models, a running VM, a queued task and a notification."""
    user = UserFactory(email="dash@example.com")
    tenant = make_tenant(owner=user, name="Lab of Very Long Names for Narrow Phones")
    top_up(tenant, "20000")
    now = timezone.now()
    for day, gpu in enumerate(["A100", "T4", "A100", "T4", "A100"]):
        start = now - timedelta(days=day * 4 + 1, hours=3)
        meter_and_rate(task_run(tenant, start=start, end=start + timedelta(hours=2), gpu=gpu))
    make_vm(tenant, plan="t4-1x-general", name="notebook-with-a-long-name-01", state=VmState.RUNNING)
    queued = Task.objects.create(
        tenant=tenant, created_by=user, name="queued-finetune", framework="pytorch", image="pytorch", command="true"
    )
    notification_services.notify(
        kind=NotificationKind.TASK_FINISHED, tenant=tenant, users=[user], params={"task": "resnet-50-imagenet"}
    )
    return user, tenant, queued


def test_dashboard_notifications_and_settings_at_phone_width_live(request, monkeypatch, tmp_path):
    server = request.getfixturevalue("asgi_live_server")
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")  # Playwright's loop runs in this thread
    user, tenant, queued = _customer()
    folder = _screens_dir(tmp_path)
    errors: list[str] = []
    url = server.url
    # Server-side changes run on a thread of their own: async_to_sync (the live push) refuses a thread
    # whose event loop is running, as Playwright's is here.
    server_side = ThreadPoolExecutor(max_workers=1, thread_name_prefix="server-side")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for language in ("en", "zh-hans"):
                user.language = language
                user.save(update_fields=["language"])
                context = browser.new_context(
                    base_url=url, viewport=PHONE, is_mobile=True, has_touch=True, device_scale_factor=2, locale=language
                )
                context.set_default_timeout(10_000)
                context.add_init_script(INIT_SCRIPT)
                context.add_cookies([_session_cookie(user, url)])
                page = context.new_page()
                page.on(
                    "console",
                    lambda msg, lang=language: (
                        msg.type == "error" and errors.append(f"[{lang}] console: {msg.text} @ {msg.location}")
                    ),
                )
                page.on("pageerror", lambda exc, lang=language: errors.append(f"[{lang}] pageerror: {exc}"))

                for name, path in PAGES:
                    page.goto(path)
                    expect(page.locator("html")).to_have_attribute("lang", language)
                    if name == "dashboard":
                        for canvas in ("spend-chart", "gpu-chart"):
                            page.wait_for_function(CANVAS_DRAWN, arg=canvas)
                        expect(page.locator("#gpu-table tbody tr")).to_have_count(2)  # A100 and T4
                        if language == "en":  # cancelled live below, so not listed any more in Chinese
                            expect(page.locator(f"#task-state-{queued.pk}")).to_have_attribute("data-state", "queued")
                    if name == "notifications":
                        expect(page.locator("#notifications li[data-unread=true]")).not_to_have_count(0)
                    if name == "settings":
                        expect(page.locator("#email-preferences input[type=checkbox]")).to_have_count(
                            10
                        )  # every customer kind but the invitation (its own email)
                    assert page.evaluate(OVERFLOW) <= 0, f"{path} in {language} scrolls sideways"
                    page.screenshot(path=str(folder / f"{language}-{name}.png"), full_page=True)

                # Live, on the dashboard: a notification raises the bell's count; a task's badge follows.
                page.goto("/")
                page.wait_for_function("window.__socketsOpen > 0")
                page.evaluate("window.__sameDocument = true")
                count = page.locator("#notification-bell").get_attribute("data-unread")
                server_side.submit(
                    notification_services.notify,
                    kind=NotificationKind.LOW_BALANCE,
                    tenant=tenant,
                    users=[user],
                    params={"balance": "9.00", "threshold": "100.00"},
                ).result()
                expect(page.locator("#notification-bell")).to_have_attribute("data-unread", str(int(count) + 1))
                expect(page.locator("#notification-count")).to_have_text(str(int(count) + 1))
                if language == "en":
                    membership = tenant.memberships.get(user=user)
                    server_side.submit(
                        hosting_services.task_cancel, membership=membership, actor=user, task=queued
                    ).result()
                    expect(page.locator(f"#task-state-{queued.pk}")).to_have_attribute("data-state", "cancelled")
                    expect(page.locator(f"#task-state-{queued.pk}")).to_have_text("Cancelled")
                assert page.evaluate("window.__sameDocument === true"), "the dashboard reloaded"
                assert page.evaluate("window.__socketsOpen") == 1  # one socket: the page's own
                assert page.evaluate(OVERFLOW) <= 0
                page.screenshot(path=str(folder / f"{language}-dashboard-live.png"), full_page=True)
                context.close()
        finally:
            browser.close()
            server_side.submit(connections.close_all).result()
            server_side.shutdown()

    errors = [e for e in errors if "favicon.ico" not in e]
    assert errors == [], "\n".join(errors)
