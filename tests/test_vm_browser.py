"""End to end in a real browser against a real ASGI server: rent a GPU VM and watch it come up live.

A verified customer logs in, adds an SSH key, orders a "1× T4 · General" VM from /compute/, and —
without reloading — sees it go Provisioning → Starting → Running through the Channels push on
/ws/dashboard/; reveals the SSH command; stops the VM and sees Stopping and Stopped arrive live.
A second browser at phone width (390×844) follows the same VM page the whole time and never reloads.

The server is Daphne in a separate process, started the way channels.testing.ChannelsLiveServerTestCase
starts it (daphne.testing.DaphneProcess serving the project's ASGI application behind
ASGIStaticFilesHandler), so the page's WebSocket is real: nothing is stubbed. What that needs:

- a test database both processes can open: PostgreSQL, or SQLite in a file. pytest-django's SQLite
  test database lives in memory, private to this process, so there the test skips and says so;
- a channel layer both processes share: Redis. The test process runs the reconciler (as beat would)
  and its state changes reach the server's consumers through Redis, under a prefix of this run's own;
- the server is forked, so it inherits this process's settings: the test database's name, the
  settings fixture's overrides (the conftest's included) and Celery eager, so the provisioning task an
  order enqueues on commit runs inside the server process. The test's own settings (fast local cluster,
  the Redis layer, the host) are applied in both processes, in the server again just before it serves.

Screenshots of each step go to $PORTAL_ARTIFACTS/screenshots/vm-rental when that is set, else to tmp_path.
"""

import multiprocessing
import os
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from daphne.testing import DaphneProcess
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.db import connection, connections
from playwright.sync_api import expect, sync_playwright

from provisioning import services
from provisioning.backends import reset_backend_cache
from provisioning.models import VirtualMachine, VmState
from tenants.models import AuditEvent
from tenants.services import tenant_create_personal
from tests.conftest import CHROMIUM
from tests.factories import UserFactory

pytestmark = [
    pytest.mark.browser,
    pytest.mark.redis,
    pytest.mark.django_db(transaction=True, serialized_rollback=True),
]

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HOST = "127.0.0.1"
EMAIL = "renter@example.com"
PASSWORD = "correct-horse-battery"  # UserFactory's
PLAN_CODE = "t4-1x-general"
PLAN_NAME = "1× T4 · General"
VM_NAME = "train-01"
STEP_SECONDS = 1.0  # PORTAL_LOCAL_PROVISION_SECONDS and PORTAL_LOCAL_BOOT_SECONDS, and the reconciler's tick
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}
SSH_COMMAND = re.compile(r"^ssh -p \d+ ubuntu@127\.0\.0\.1$")

# Counts the page's WebSockets that opened, and marks the document, so the test can tell a reload apart
# from a live update (a reload starts a new document: the marker is gone).
INIT_SCRIPT = """
(() => {
  const Native = window.WebSocket;
  window.__socketsOpen = 0;
  window.WebSocket = class extends Native {
    constructor(...args) {
      super(...args);
      this.addEventListener("open", () => { window.__socketsOpen += 1; });
    }
  };
})();
"""


# --- The ASGI live server --------------------------------------------------------------------


class ForkedDaphneProcess(DaphneProcess):
    """DaphneProcess, always forked: the server inherits the test's database name and settings,
    whatever multiprocessing's default start method is (spawn on macOS, forkserver from Python 3.14)."""

    @staticmethod
    def _Popen(process_obj):  # multiprocessing's name
        return multiprocessing.get_context("fork").Process._Popen(process_obj)


def _make_application():
    """What ChannelsLiveServerTestCase serves: the project's ASGI application, static files included."""
    from channels.routing import get_default_application

    return ASGIStaticFilesHandler(get_default_application())


def _server_setup(overrides: dict, database_name: str) -> None:
    """Runs in the server process just before it serves: the same settings as the test process."""
    from channels.layers import channel_layers
    from django.conf import settings

    from portal.celery import app

    for name, value in overrides.items():
        setattr(settings, name, value)
    settings.DATABASES["default"]["NAME"] = database_name  # in place: connections share this dict
    app.conf.task_always_eager = True  # the order's provisioning task runs here, on commit
    app.conf.task_eager_propagates = True
    channel_layers.backends.clear()
    reset_backend_cache()
    # Threads do not survive a fork: executors created earlier in the test process (by an async test)
    # would wait forever for their dead worker thread, so the server starts with fresh ones.
    from concurrent.futures import ThreadPoolExecutor

    from asgiref.sync import SyncToAsync

    SyncToAsync.single_thread_executor = ThreadPoolExecutor(max_workers=1)


class AsgiLiveServer:
    def __init__(self, process: DaphneProcess):
        self.process = process
        self.url = f"http://{HOST}:{process.port.value}"


@pytest.fixture
def asgi_live_server(transactional_db, settings):
    if connection.vendor == "sqlite" and connection.is_in_memory_db():
        pytest.skip(
            "needs a test database the server process can open: pytest-django's SQLite test database is "
            "in memory; set DATABASE_URL=postgres://… (as CI does)"
        )
    overrides = {
        "ALLOWED_HOSTS": [*settings.ALLOWED_HOSTS, HOST],
        "PORTAL_LOCAL_PROVISION_SECONDS": STEP_SECONDS,
        "PORTAL_LOCAL_BOOT_SECONDS": STEP_SECONDS,
        "PORTAL_CLUSTER_BACKEND": "local",
        "CELERY_TASK_ALWAYS_EAGER": True,
        "CHANNEL_LAYERS": {  # a prefix of this run's own, so parallel runs never cross
            "default": {
                "BACKEND": "channels_redis.core.RedisChannelLayer",
                # socket_timeout as the portal's settings have it: redis-py's default drops idle sockets.
                "CONFIG": {
                    "hosts": [{"address": settings.REDIS_URL, "socket_timeout": 30}],
                    "prefix": f"test-vm-{uuid.uuid4().hex[:8]}",
                },
            }
        },
    }  # the conftest's overrides (password hasher, email, billing enforcement…) come along with the fork
    for name, value in overrides.items():
        setattr(settings, name, value)  # this process too: the reconciler reads the same timings
    reset_backend_cache()
    # Never hand a live database connection to the child: both would talk over one socket.
    connections.close_all()
    process = ForkedDaphneProcess(
        HOST, _make_application, setup=partial(_server_setup, overrides, connection.settings_dict["NAME"])
    )
    started = time.monotonic()
    process.start()
    while not process.ready.wait(timeout=0.2):
        if not process.is_alive() or time.monotonic() - started > 30:
            error = "" if process.errors.empty() else process.errors.get_nowait()[1]
            process.terminate()
            raise RuntimeError(f"Daphne did not start:\n{error}")
    try:
        yield AsgiLiveServer(process)
    finally:
        process.terminate()
        process.join(timeout=10)
        reset_backend_cache()


# --- Browser helpers ----------------------------------------------------------------------------


def _screens_dir(tmp_path: Path) -> Path:
    root = os.environ.get("PORTAL_ARTIFACTS")
    folder = Path(root) / "screenshots" / "vm-rental" if root else tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _public_key() -> str:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    raw = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return f"{raw} renter@laptop"


class Screen:
    """One page in its own browser context, with console-error and WebSocket-frame collection."""

    def __init__(self, browser, base_url: str, errors: list[str], who: str, viewport: dict, **context_options):
        self.who = who
        self.context = browser.new_context(base_url=base_url, locale="en-US", viewport=viewport, **context_options)
        self.context.set_default_timeout(10_000)
        self.context.add_init_script(INIT_SCRIPT)
        self.frames: list[str] = []
        self.page = self.context.new_page()
        self.page.on(
            "console",
            lambda msg: msg.type == "error" and errors.append(f"[{who}] console: {msg.text} @ {msg.location}"),
        )
        self.page.on("pageerror", lambda exc: errors.append(f"[{who}] pageerror: {exc}"))
        self.page.on("websocket", self._watch_socket)

    def _watch_socket(self, socket):
        if socket.url.endswith("/ws/dashboard/"):
            socket.on("framereceived", lambda payload: self.frames.append(str(payload)))

    def shot(self, folder: Path, name: str):
        self.page.screenshot(path=str(folder / f"{name}-{self.who}.png"), full_page=True)

    def wait_for_socket(self):
        """The dashboard socket is open, so the consumer has joined the tenant's group."""
        self.page.wait_for_function("window.__socketsOpen > 0")

    def mark_document(self):
        self.page.evaluate("window.__sameDocument = true")

    def same_document(self) -> bool:
        return self.page.evaluate("window.__sameDocument === true")

    def pushed_states(self) -> list[str]:
        return re.findall(r'"state": ?"(\w+)"', " ".join(self.frames))


def _badge(page, vm_pk):
    return page.locator(f"#vm-state-{vm_pk}")


def _running_since(page):
    return page.locator("#vm-side dt:has-text('Running since') + dd")


def _drive_until(reconciler: ThreadPoolExecutor, screens: list[Screen], vm_pk, state: str, on_state=None):
    """Tick the reconciler once a second, as beat does, until every page shows `state` (pushed, not
    reloaded). `on_state(state)` sees each state the first page shows on the way."""
    deadline = time.monotonic() + 15
    seen = set()
    while True:
        reconciler.submit(services.reconcile).result()
        try:
            for screen in screens:
                expect(_badge(screen.page, vm_pk)).to_have_attribute("data-state", state, timeout=STEP_SECONDS * 1000)
            return
        except AssertionError:
            current = _badge(screens[0].page, vm_pk).get_attribute("data-state")
            if on_state and current not in seen:
                seen.add(current)
                on_state(current)
            if time.monotonic() > deadline:
                raise


# --- The test -------------------------------------------------------------------------------------


def test_order_a_vm_and_watch_it_run_then_stop_live(asgi_live_server, monkeypatch, tmp_path):
    # Playwright's sync API keeps an event loop in this thread; the ORM reads below are synchronous.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    services.inventory_sync()
    user = UserFactory(email=EMAIL)
    tenant_create_personal(user=user)
    folder = _screens_dir(tmp_path)
    errors: list[str] = []
    url = asgi_live_server.url
    # The reconciler runs in a thread of its own: async_to_sync (its live pushes) refuses a thread
    # whose event loop is running, as Playwright's is here.
    reconciler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reconciler")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            desk = Screen(browser, url, errors, "desktop", DESKTOP)
            page = desk.page

            # 1. Log in.
            page.goto("/accounts/login/")
            page.fill("#id_login", EMAIL)
            page.fill("#id_password", PASSWORD)
            page.locator("main form button[type=submit]").click()
            page.wait_for_url(f"{url}/")

            # 2. Add an SSH key.
            page.goto("/settings/ssh-keys/")
            form = page.locator("#ssh-key-form")
            form.get_by_label("Name").fill("laptop")
            form.get_by_label("Public key").fill(_public_key())
            form.get_by_role("button", name="Add key").click()
            page.wait_for_url("**/settings/ssh-keys/")
            expect(page.locator("#messages")).to_contain_text("Key laptop added.")
            expect(page.locator('#ssh-keys tr[data-key="laptop"]')).to_contain_text("ssh-ed25519")
            desk.shot(folder, "01-ssh-key")

            # The phone shares the desktop's session.
            phone = Screen(
                browser,
                url,
                errors,
                "phone",
                PHONE,
                storage_state=desk.context.storage_state(),
                is_mobile=True,
                has_touch=True,
                device_scale_factor=2,
            )

            # 3. The catalogue.
            for screen in (desk, phone):
                screen.page.goto("/compute/")
                expect(screen.page.locator(f'#plans [data-plan="{PLAN_CODE}"]')).to_contain_text(PLAN_NAME)
                expect(screen.page.locator("#vms")).to_contain_text("No VMs yet.")
                screen.shot(folder, "02-compute")

            # 4. Order a 1× T4 · General VM, monthly, through the form.
            page.locator(f'#plans [data-plan="{PLAN_CODE}"]').get_by_role("link", name="Order").click()
            page.wait_for_url(f"**/compute/order/?plan={PLAN_CODE}")
            phone.page.goto(f"/compute/order/?plan={PLAN_CODE}")
            order = page.locator("#vm-order-form")
            order.get_by_label("Plan").select_option(label=PLAN_NAME)
            order.get_by_label("Name").fill(VM_NAME)
            order.get_by_label("Monthly").check()
            expect(order.locator("#ssh-key-choices input[type=checkbox]")).to_be_checked()  # the key just added
            for screen in (desk, phone):
                screen.shot(folder, "03-order-form")
            order.get_by_role("button", name="Order").click()

            # 5. The VM's page: ordered, and already handed to the cluster by the task the order enqueued.
            page.wait_for_url(re.compile(r"/compute/vms/[0-9a-f-]{36}/$"))
            vm = VirtualMachine.objects.get(name=VM_NAME)
            assert (vm.plan.code, vm.billing_mode, vm.ssh_key_names) == (PLAN_CODE, "monthly", ["laptop"])
            expect(page.locator("#messages")).to_contain_text(f"{VM_NAME} ordered")
            expect(page.locator("main h1")).to_have_text(VM_NAME)
            expect(_badge(page, vm.pk)).to_have_attribute("data-state", VmState.PROVISIONING)
            phone.page.goto(f"/compute/vms/{vm.pk}/")
            for screen in (desk, phone):
                expect(_badge(screen.page, vm.pk)).to_have_text("Provisioning")
                expect(_running_since(screen.page)).to_have_text("—")
                expect(screen.page.locator("#scale-up-form")).to_have_count(0)
                screen.wait_for_socket()
                screen.mark_document()
                screen.shot(folder, "04-provisioning")

            # 6. The reconciler moves it on; the pages follow through the push, without reloading.
            started = time.monotonic()

            def on_state(state):
                if state == VmState.STARTING:
                    for screen in (desk, phone):
                        screen.shot(folder, "05-starting")

            _drive_until(reconciler, [desk, phone], vm.pk, VmState.RUNNING, on_state=on_state)
            running_after = time.monotonic() - started
            for screen in (desk, phone):
                spage = screen.page
                assert screen.same_document(), f"the {screen.who} page reloaded"
                assert {"starting", "running"} <= set(screen.pushed_states()), screen.frames
                expect(_badge(spage, vm.pk)).to_have_text("Running")
                expect(spage.locator("#vm-stepper [data-step-status=done]")).to_have_count(4)
                expect(spage.locator("#vm-state-message")).to_have_text("Ready: SSH and Jupyter are available.")
                expect(spage.locator("#vm-history")).to_contain_text("Running")
                expect(spage.locator('#vm-actions [data-action="stop"]')).to_be_visible()
                # The details column follows too (out of band with the status partial).
                expect(_running_since(spage)).to_have_text(re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d$"))
                expect(spage.locator("#scale-up-form")).to_be_visible()
                screen.shot(folder, "06-running")

            # 7. The SSH command (and the Jupyter link where the VM has one).
            for screen in (desk, phone):
                screen.page.get_by_role("button", name="Show SSH command and Jupyter link").click()
                expect(screen.page.locator("#ssh-command")).to_have_text(SSH_COMMAND)
                screen.shot(folder, "07-access")
            vm.refresh_from_db()
            expect(page.locator("#ssh-command")).to_have_text(f"ssh -p {vm.ssh_port} ubuntu@127.0.0.1")
            assert AuditEvent.objects.filter(action="vm.access_revealed", target_id=str(vm.pk)).count() == 2

            # 8. Stop it from the desktop page. The phone, untouched, sees Stopping arrive by push.
            page.locator('#vm-actions [data-action="stop"]').click()
            expect(page.locator("#messages")).to_contain_text(f"Stopping {VM_NAME}.")
            expect(_badge(page, vm.pk)).to_have_attribute("data-state", VmState.STOPPING)
            expect(_badge(phone.page, vm.pk)).to_have_attribute("data-state", VmState.STOPPING)
            expect(phone.page.locator("#vm-handoff")).to_have_count(0)  # no access details while stopping
            desk.wait_for_socket()
            desk.mark_document()
            for screen in (desk, phone):
                screen.shot(folder, "08-stopping")

            # 9. Stopped, live on both.
            _drive_until(reconciler, [desk, phone], vm.pk, VmState.STOPPED)
            for screen in (desk, phone):
                spage = screen.page
                assert screen.same_document(), f"the {screen.who} page reloaded"
                expect(_badge(spage, vm.pk)).to_have_text("Stopped")
                expect(spage.locator("#vm-status")).to_contain_text("Stopped: its disks are kept.")
                expect(spage.locator('#vm-actions [data-action="start"]')).to_be_visible()
                expect(spage.locator("#scale-up-form")).to_be_visible()
                screen.shot(folder, "09-stopped")
            assert phone.pushed_states()[-2:] == ["stopping", "stopped"], phone.frames
            vm.refresh_from_db()
            assert vm.state == VmState.STOPPED

            # 10. The catalogue again, with the VM in the list.
            for screen in (desk, phone):
                screen.page.goto("/compute/")
                expect(screen.page.locator(f'#vms tr[data-vm="{vm.pk}"]')).to_contain_text("Stopped")
                screen.shot(folder, "10-compute-with-vm")
        finally:
            browser.close()
            reconciler.submit(connections.close_all).result()
            reconciler.shutdown()

    print(f"Running {running_after:.1f} s after the first reconcile; screenshots in {folder}")
    errors = [e for e in errors if "favicon.ico" not in e]  # base.html names no icon; Chromium asks anyway
    assert errors == [], "\n".join(errors)
