"""The whole product, end to end, as a new customer walks it (issue 7), in a real browser.

1. Sign up, open the verification link from the email, land on the dashboard.
2. Buy a compute package; the offline provider shows bank-transfer instructions. A finance member of
   staff logs in with TOTP, confirms the transfer under /console/billing/, and the customer sees the
   package credit on the billing page and the dashboard.
3. Submit a task from /tasks/new/ (starting from the training example, with a command that prints
   `##progress N` with small sleeps, on 4 A10 GPUs) and watch its progress reach 100 % live on the task
   page, without a reload; then its cost.
4. Add an SSH key under Settings, order an on-demand VM from /compute/; the order is refused (package
   credit pays for tasks only), so top up by bank transfer (staff confirm it), order again, watch it
   reach Running and copy its SSH command with the Copy button (read back from the clipboard).
5. The usage and the charge: the dashboard (spend chart and table, GPU-hours, package credit gone down
   by the task's cost) and the billing page's CSV statement, whose task lines add up to that cost.

What runs, and where; nothing is stubbed:
- web: Daphne serving the real ASGI app in a forked process (tests/test_vm_browser.py's
  `asgi_live_server`), on the test database, with the Redis channel layer. Here its Celery is not eager:
  it publishes to a Redis queue of this test's own.
- worker: a real Celery worker process (solo pool) on that queue, the same database and the same
  channel layer: it schedules the task, runs it with the local executor (a real subprocess), pushes
  its events, meters the finished run and rates it (billing's Celery tasks, enqueued by the signals).
  No beat tick is needed for billing: metering and rating follow the run's end through the queue.
- beat: only the VM reconciler, ticked from a thread of this process by `_drive_until`, as beat would;
  what it enqueues (billing of lifecycle events) goes to the same worker.
- email: the server writes it to files (Django's file-based backend); the test opens the message
  and follows its link, as the customer would.
- billing enforcement is on (PORTAL_BILLING_ENFORCE) in all three processes: the customer pays
  for the task with package credit and for the VM with cash.

Screenshots of each step go to $PORTAL_ARTIFACTS/screenshots/journey when that is set, else to tmp_path.
"""

import csv
import email
import email.policy
import io
import json
import os
import re
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from functools import partial
from pathlib import Path

import pytest
from django.db import connection, connections
from playwright.sync_api import expect, sync_playwright

from billing.models import LedgerEntry, LedgerKind
from billing.money import seconds_between, to_fen
from billing.pricing import PriceBook
from billing.selectors import today_of
from crm.models import StaffRole
from hosting.forms import TaskForm
from hosting.models import Task, TaskRun, TaskState
from notifications.models import Notification, NotificationKind
from provisioning import services as provisioning_services
from provisioning.models import VirtualMachine, VmState
from tenants.models import Tenant, User
from tests import test_vm_browser
from tests.conftest import CHROMIUM
from tests.test_console import make_staff
from tests.test_console_browser import _log_in_with_totp
from tests.test_dashboard_browser import CANVAS_DRAWN
from tests.test_vm_browser import (  # noqa: F401  (asgi_live_server: a fixture, by name)
    CHROMIUM_ARGS,
    DESKTOP,
    SSH_COMMAND,
    Screen,
    _drive_until,
    _public_key,
    asgi_live_server,
)

ROOT = Path(__file__).resolve().parent.parent
EMAIL = "newcomer@example.com"
PASSWORD = "Plum-Ledger-Quasar-42"
PACKAGE = "pkg-1000"
PACKAGE_NAME = "Compute package 1,000"
TOP_UP = "100"
PLAN_CODE = "t4-1x-general"
VM_NAME = "dev-box"
TASK_NAME = "journey-train"
GPU_MODEL, GPUS = "A10", 4
# Ten steps of training, 0.4 s apart: long enough to watch, short enough for the suite.
COMMAND = (
    "for i in $(seq 1 10); do\n"
    '  echo "##progress $((i * 10))"\n'
    '  echo "##metric loss=0.$((100 - i * 9))"\n'
    '  echo "epoch $i/10"\n'
    "  sleep 0.4\n"
    "done\n"
)
# Records every value the task page's progress label shows, so the test can tell a live climb from
# a page that only ever showed the end.
PROGRESS_WATCH = """
document.addEventListener("DOMContentLoaded", () => {
  const label = document.getElementById("task-progress-label");
  if (!label) return;
  window.__progress = [label.textContent.trim()];
  new MutationObserver(() => window.__progress.push(label.textContent.trim()))
    .observe(label, {childList: true, characterData: true, subtree: true});
});
"""
# Runs a real Celery worker, after pointing its channel layer at the live server's (a prefix of this
# run's own, which no environment variable carries).
WORKER_BOOT = """
import json, os, sys
import django
django.setup()
from django.conf import settings
settings.CHANNEL_LAYERS = json.loads(os.environ["JOURNEY_CHANNEL_LAYERS"])
from portal.celery import app
app.worker_main(sys.argv[1:])
"""


# --- Processes --------------------------------------------------------------------------------------


def _screens_dir(tmp_path: Path) -> Path:
    root = os.environ.get("PORTAL_ARTIFACTS")
    folder = Path(root) / "screenshots" / "journey" if root else tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _patient_layers(layers: dict) -> dict:
    """The live server's channel layer with the read timeout portal/settings.py gives Redis: without it an
    idle consumer's 5 s blocking receive meets redis-py's 5 s socket timeout and the socket drops."""
    config = layers["default"]["CONFIG"]
    hosts = [{"address": host, "socket_timeout": 30} if isinstance(host, str) else host for host in config["hosts"]]
    return {"default": {**layers["default"], "CONFIG": {**config, "hosts": hosts}}}


def _journey_server_setup(original, queue: str, *args) -> None:
    """The live server's own setup, then Celery publishing to the worker's queue instead of running
    inline, and the patient channel layer."""
    from channels.layers import channel_layers
    from django.conf import settings

    from portal.celery import app

    original(*args)
    app.conf.task_always_eager = False
    app.conf.task_default_queue = queue
    settings.CHANNEL_LAYERS = _patient_layers(settings.CHANNEL_LAYERS)
    channel_layers.backends.clear()


@pytest.fixture
def queue():
    return f"test-journey-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def mailbox(settings, tmp_path) -> Path:
    folder = tmp_path / "mail"
    folder.mkdir()
    settings.EMAIL_BACKEND = "django.core.mail.backends.filebased.EmailBackend"
    settings.EMAIL_FILE_PATH = str(folder)
    return folder


@pytest.fixture
def server(request, settings, monkeypatch, mailbox, queue):
    """tests/test_vm_browser.py's live server with billing enforced, mail to files, Celery to `queue`.
    Settings made here reach the server through the fork."""
    from channels.layers import channel_layers

    settings.PORTAL_BILLING_ENFORCE = True
    monkeypatch.setattr(
        test_vm_browser, "_server_setup", partial(_journey_server_setup, test_vm_browser._server_setup, queue)
    )
    live = request.getfixturevalue("asgi_live_server")
    settings.CHANNEL_LAYERS = _patient_layers(settings.CHANNEL_LAYERS)  # this process, as in the server
    channel_layers.backends.clear()
    return live


@pytest.fixture
def worker(server, settings, queue, tmp_path):
    """A Celery worker process on the test database, the server's queue and its channel layer.
    This process publishes to the same queue (what the reconciler enqueues)."""
    from portal.celery import app

    db = connection.settings_dict
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}",
        "REDIS_URL": settings.REDIS_URL,
        "CELERY_TASK_ALWAYS_EAGER": "0",
        "CELERY_TASK_DEFAULT_QUEUE": queue,
        "MEDIA_ROOT": str(settings.MEDIA_ROOT),  # where the server looks for the task's results
        "PORTAL_TASK_GRACE_SECONDS": "1",
        "PORTAL_BILLING_ENFORCE": "1",
        "PORTAL_LOCAL_PROVISION_SECONDS": str(settings.PORTAL_LOCAL_PROVISION_SECONDS),
        "PORTAL_LOCAL_BOOT_SECONDS": str(settings.PORTAL_LOCAL_BOOT_SECONDS),
        "JOURNEY_CHANNEL_LAYERS": json.dumps(settings.CHANNEL_LAYERS),
    }
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER_BOOT,
                "worker",
                "--pool",
                "solo",
                "-Q",
                queue,
                "--without-heartbeat",
                "--without-gossip",
                "--without-mingle",
                "--loglevel",
                "WARNING",
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    previous = (app.conf.task_always_eager, app.conf.task_default_queue)
    app.conf.task_always_eager = False
    app.conf.task_default_queue = queue
    process.log = log
    try:
        yield process
    finally:
        app.conf.task_always_eager, app.conf.task_default_queue = previous
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        print("--- worker log (last 40 lines) ---\n" + "\n".join(log.read_text().splitlines()[-40:]))


def _alive(worker) -> None:
    if worker.poll() is not None:
        pytest.fail("the Celery worker died:\n" + worker.log.read_text()[-4000:])


# --- Helpers ----------------------------------------------------------------------------------------


def _verification_link(mailbox: Path, address: str) -> str:
    """The confirmation link in the latest email to `address`, read from the file-based backend's files."""
    links = []
    for path in sorted(mailbox.glob("*.log")):
        for chunk in path.read_bytes().split(b"-" * 79):
            message = email.message_from_bytes(chunk.strip(b"\n"), policy=email.policy.default)
            if address not in str(message.get("To", "")):
                continue
            body = message.get_body(preferencelist=("plain",)).get_content()
            links += re.findall(r"https?://\S+/accounts/confirm-email/[^/\s]+/", body)
    assert links, f"no verification email to {address} in {sorted(p.name for p in mailbox.iterdir())}"
    return links[-1]


def _money(amount: Decimal) -> str:
    """As the pages show it (floatformat:"2g" in English): 1,049.93."""
    return f"{amount:,.2f}"


def _wait_for(condition, what: str, worker, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _alive(worker)
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}\n" + worker.log.read_text()[-4000:])


def _payment_id(page) -> str:
    found = re.search(r"/billing/payments/([0-9a-f-]{36})/$", page.url)
    assert found, page.url
    return found.group(1)


def _confirm_transfer(staff: Screen, folder: Path, payment_id: str, amount: str, shot: str) -> None:
    """Finance, already logged in with TOTP, marks the bank transfer as received."""
    page = staff.page
    page.goto("/console/billing/")
    row = page.locator(f'#pending-payments tr[data-payment="{payment_id}"]')
    expect(row).to_contain_text(f"¥{amount}")
    staff.shot(folder, f"{shot}-pending")
    row.get_by_role("button", name="Transfer received").click()
    page.wait_for_url("**/console/billing/")
    expect(page.locator("#messages")).to_contain_text("confirmed")
    expect(page.locator(f'#pending-payments tr[data-payment="{payment_id}"]')).to_have_count(0)
    staff.shot(folder, f"{shot}-confirmed")


# --- The journey ------------------------------------------------------------------------------------


@pytest.mark.browser
@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_a_new_customer_signs_up_pays_runs_a_task_rents_a_vm_and_reads_the_bill(
    server, worker, monkeypatch, tmp_path, mailbox
):
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")  # Playwright's sync API runs a loop here
    provisioning_services.inventory_sync()
    finance, finance_secret = make_staff(StaffRole.FINANCE, email="finance@example.com")
    folder = _screens_dir(tmp_path)
    errors: list[str] = []
    url = server.url
    # The reconciler runs on a thread of its own: async_to_sync (its live pushes) refuses a thread whose
    # event loop is running, as Playwright's is here.
    reconciler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reconciler")
    started = time.monotonic()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            customer = Screen(
                browser, url, errors, "customer", DESKTOP, permissions=["clipboard-read", "clipboard-write"]
            )
            customer.context.add_init_script(PROGRESS_WATCH)
            page = customer.page

            # 1. Sign up; the email's link verifies the address and signs in; the dashboard.
            page.goto("/")
            page.locator("header, nav").get_by_role("link", name="Sign up").first.click()
            page.wait_for_url("**/accounts/signup/")
            page.fill("#id_email", EMAIL)
            page.fill("#id_password1", PASSWORD)
            page.fill("#id_password2", PASSWORD)
            page.locator("main form button[type=submit]").click()
            page.wait_for_url("**/accounts/confirm-email/")
            expect(page.locator("main")).to_contain_text(EMAIL)
            customer.shot(folder, "01-signed-up")
            link = _verification_link(mailbox, EMAIL)
            assert link.startswith(url), link  # built from the request: points at this server
            page.goto(link)
            expect(page.locator("main")).to_contain_text(EMAIL)
            page.locator("main form button[type=submit]").click()
            page.wait_for_url(f"{url}/")
            user = User.objects.get(email=EMAIL)
            assert user.emailaddress_set.get().verified
            tenant = Tenant.objects.get(memberships__user=user)
            expect(page.locator("main h1")).to_have_text(tenant.name)
            expect(page.locator("#dashboard-wallet [data-balance]")).to_have_text("¥0.00")
            customer.shot(folder, "02-dashboard")

            # 2. Buy a compute package: bank-transfer instructions.
            page.get_by_role("link", name="Billing", exact=True).first.click()
            page.wait_for_url("**/billing/")
            card = page.locator(f'#packages [data-package="{PACKAGE}"]')
            expect(card).to_contain_text(PACKAGE_NAME)
            card.get_by_role("button", name="Buy").click()
            page.wait_for_url(re.compile(r"/billing/payments/[0-9a-f-]{36}/$"))
            package_payment = _payment_id(page)
            transfer = page.locator("#bank-transfer")
            expect(transfer).to_contain_text("Pay by bank transfer")
            expect(transfer).to_contain_text("¥1,000.00")
            expect(page.locator("#payment-status")).to_have_attribute("data-status", "pending")
            customer.shot(folder, "03-package-bank-transfer")

            # Finance confirms the transfer in the console (password, then TOTP).
            staff = Screen(browser, url, errors, "finance", DESKTOP)
            _log_in_with_totp(staff, finance.email, finance_secret)
            _confirm_transfer(staff, folder, package_payment, "1,000.00", "04-console")

            # The customer sees the credit: ¥1,000 and the 5 % bonus.
            page.goto("/billing/")
            expect(page.locator("#grants")).to_contain_text(PACKAGE_NAME)
            expect(page.locator("#grants")).to_contain_text("¥1,050.00")
            expect(page.locator("#wallet [data-balance]")).to_have_text("¥1,050.00")
            customer.shot(folder, "05-billing-package-credit")
            page.get_by_role("link", name="Dashboard").click()
            page.wait_for_url(f"{url}/")
            expect(page.locator("#dashboard-packages")).to_contain_text(f"{PACKAGE_NAME}: ¥1,050.00 left")
            customer.shot(folder, "06-dashboard-package-credit")

            # 3. Submit a task, starting from the training example.
            page.get_by_role("link", name="Tasks", exact=True).click()
            page.wait_for_url("**/tasks/")
            page.get_by_role("link", name="Submit a task").first.click()
            page.wait_for_url("**/tasks/new/")
            page.select_option("#task-example", "train")
            form = page.locator("#task-form")
            expect(form.get_by_label("Name")).to_have_value("train-mnist-like")
            expect(form.get_by_label("Command")).to_have_value(re.compile("train_mnist_like|##progress"))
            form.get_by_label("Name").fill(TASK_NAME)
            form.get_by_label("Command").fill(COMMAND)
            form.get_by_label("GPU model").select_option(GPU_MODEL)
            form.get_by_label("Whole GPUs").fill(str(GPUS))
            customer.shot(folder, "07-task-form")
            _alive(worker)
            form.get_by_role("button", name="Submit").click()
            page.wait_for_url(re.compile(r"/tasks/[0-9a-f-]{36}/$"))
            task = Task.objects.get(name=TASK_NAME)
            customer.mark_document()
            expect(page.locator("#messages")).to_contain_text(f"{TASK_NAME} submitted")

            # Live: the worker schedules and runs it; its progress arrives over the task's socket.
            page.wait_for_function(
                "() => { const p = parseInt(document.getElementById('task-progress-label').textContent);"
                " return p >= 30 && p < 100; }",
                timeout=30_000,
            )
            expect(page.locator(f"#task-state-{task.pk}")).to_have_attribute("data-state", TaskState.RUNNING)
            expect(page.locator("#task-log")).to_contain_text("epoch 3/10")
            customer.shot(folder, "08-task-running")
            expect(page.locator(f"#task-state-{task.pk}")).to_have_attribute(
                "data-state", TaskState.SUCCEEDED, timeout=30_000
            )
            expect(page.locator("#task-progress-label")).to_have_text("100%")
            expect(page.locator("#task-progress")).to_have_attribute("aria-valuenow", "100")
            expect(page.locator("#task-finished")).to_be_visible()
            expect(page.locator('#task-metrics tr[data-metric="loss"]')).to_contain_text("0.1")
            assert customer.same_document(), "the task page reloaded"
            seen = [int(value.rstrip("%")) for value in page.evaluate("window.__progress")]
            climbing = [value for value in seen if 0 < value < 100]
            assert len(set(climbing)) >= 3 and seen == sorted(seen) and seen[-1] == 100, seen
            customer.shot(folder, "09-task-succeeded")

            # Its cost, after the reload the page offers. The run is metered and rated by the worker.
            run = TaskRun.objects.get(task=task)
            seconds = seconds_between(run.started_at, run.ended_at)  # metered to the whole second
            book = PriceBook()
            prices = {
                f"gpu:{GPU_MODEL}": (book.item(f"task_gpu_hour:{GPU_MODEL}", run.started_at).unit_price, GPUS),
                "cpu": (book.item("task_cpu_core_hour", run.started_at).unit_price, task.vcpus),
                "memory": (book.item("task_memory_gib_hour", run.started_at).unit_price, task.memory_gib),
            }
            # One invoice line per resource, each rounded once (DESIGN.md section 7).
            lines = {resource: to_fen(price * count * seconds / 3600) for resource, (price, count) in prices.items()}
            cost = sum(lines.values(), Decimal("0.00"))
            assert lines[f"gpu:{GPU_MODEL}"] > 0, (seconds, lines)
            page.locator("#task-finished").get_by_role("link").click()
            page.wait_for_load_state()
            expect(page.locator("#task-cost")).to_have_text(f"¥{_money(cost)} so far")
            expect(page.locator('#task-runs tr[data-attempt="1"]')).to_contain_text(f"{GPUS} × {GPU_MODEL}")
            customer.shot(folder, "10-task-cost")

            def charged() -> bool:
                amounts = LedgerEntry.objects.filter(tenant=tenant, kind=LedgerKind.CHARGE).values_list(
                    "amount", flat=True
                )
                return -sum(amounts, Decimal("0.00")) == cost

            _wait_for(charged, f"the task's charge of ¥{cost} in the ledger", worker)
            assert all(
                entry.grant is not None
                for entry in LedgerEntry.objects.filter(tenant=tenant, kind=LedgerKind.CHARGE).select_related("grant")
            ), "the task was paid with package credit"

            # 4. An SSH key, under Settings.
            page.get_by_role("link", name="Settings", exact=True).click()
            page.locator(".nav-tabs").get_by_role("link", name="SSH keys").click()
            page.wait_for_url("**/settings/ssh-keys/")
            keys = page.locator("#ssh-key-form")
            keys.get_by_label("Name").fill("laptop")
            keys.get_by_label("Public key").fill(_public_key())
            keys.get_by_role("button", name="Add key").click()
            page.wait_for_url("**/settings/ssh-keys/")
            expect(page.locator("#messages")).to_contain_text("Key laptop added.")
            customer.shot(folder, "11-ssh-key")

            # Order an on-demand VM: package credit pays for tasks only, so it is refused.
            def order_vm():
                page.get_by_role("link", name="Compute", exact=True).click()
                page.wait_for_url("**/compute/")
                page.locator(f'#plans [data-plan="{PLAN_CODE}"]').get_by_role("link", name="Order").click()
                page.wait_for_url(f"**/compute/order/?plan={PLAN_CODE}")
                order = page.locator("#vm-order-form")
                order.get_by_label("Name").fill(VM_NAME)
                order.get_by_label("On demand (per second)").check()
                expect(order.locator("#ssh-key-choices input[type=checkbox]")).to_be_checked()
                order.get_by_role("button", name="Order").click()

            order_vm()
            expect(page.locator("#vm-order-form")).to_contain_text("compute packages pay for tasks only")
            assert not VirtualMachine.objects.filter(tenant=tenant).exists()
            customer.shot(folder, "12-order-refused")

            # Top up ¥100 by bank transfer; finance confirms it.
            page.get_by_role("link", name="Billing", exact=True).first.click()
            page.wait_for_url("**/billing/")
            page.fill("#top-up-amount", TOP_UP)
            page.get_by_role("button", name="Top up").click()
            page.wait_for_url(re.compile(r"/billing/payments/[0-9a-f-]{36}/$"))
            expect(page.locator("#bank-transfer")).to_contain_text("¥100.00")
            top_up_payment = _payment_id(page)
            customer.shot(folder, "13-top-up-bank-transfer")
            _confirm_transfer(staff, folder, top_up_payment, "100.00", "14-console")

            # Order again: accepted. The worker provisions it; the reconciler brings it up; the page follows.
            _alive(worker)
            order_vm()
            page.wait_for_url(re.compile(r"/compute/vms/[0-9a-f-]{36}/$"))
            vm = VirtualMachine.objects.get(tenant=tenant, name=VM_NAME)
            assert vm.billing_mode == "on_demand"
            expect(page.locator("#messages")).to_contain_text(f"{VM_NAME} ordered")
            customer.wait_for_socket()
            customer.mark_document()
            _drive_until(reconciler, [customer], vm.pk, VmState.RUNNING)
            assert customer.same_document(), "the VM page reloaded"
            expect(page.locator(f"#vm-state-{vm.pk}")).to_have_text("Running")

            # The SSH command, copied with the Copy button and read back from the clipboard.
            page.get_by_role("button", name="Show SSH command and Jupyter link").click()
            expect(page.locator("#ssh-command")).to_have_text(SSH_COMMAND)
            copy = page.locator('[data-copy="ssh-command"]')
            copy.click()
            expect(copy).to_have_text("Copied")
            vm.refresh_from_db()
            clipboard = page.evaluate("navigator.clipboard.readText()")
            assert clipboard == f"ssh -p {vm.ssh_port} ubuntu@127.0.0.1", clipboard
            customer.shot(folder, "15-vm-ssh-copied")

            # 5. The usage and the charge on the dashboard: spend, GPU-hours, package credit gone down.
            today = today_of(tenant)  # the tenant's calendar day, as the dashboard and statement count
            left = Decimal("1050.00") - cost
            page.get_by_role("link", name="Dashboard").click()
            page.wait_for_url(f"{url}/")
            for canvas in ("spend-chart", "gpu-chart"):
                page.wait_for_function(CANVAS_DRAWN, arg=canvas)
            expect(page.locator(f'#spend-table tr[data-day="{today:%Y-%m-%d}"]')).to_contain_text(_money(cost))
            expect(page.locator("main")).to_contain_text(f"¥{_money(cost)} in all")
            expect(page.locator(f'#gpu-table tr[data-model="{GPU_MODEL}"]')).to_be_attached()
            expect(page.locator("#dashboard-packages")).to_contain_text(f"{PACKAGE_NAME}: ¥{_money(left)} left")
            expect(page.locator("#dashboard-wallet")).to_contain_text(f"Cash ¥100.00 · package credit ¥{_money(left)}")
            customer.shot(folder, "16-dashboard-usage")

            # The billing page: the charge in the ledger, paid from the package; the CSV statement.
            page.get_by_role("link", name="Billing", exact=True).first.click()
            page.wait_for_url("**/billing/")
            charge_row = page.locator("#ledger tbody tr", has_text="Task hosting").first
            expect(charge_row).to_contain_text(PACKAGE_NAME)
            expect(page.locator("#grants")).to_contain_text(f"¥{_money(left)}")
            customer.shot(folder, "17-billing-ledger")
            with page.expect_download() as download:
                page.locator("#statement-form").get_by_role("button", name="Download CSV").click()
            statement = Path(download.value.path()).read_text()
            rows = list(csv.DictReader(io.StringIO(statement)))
            task_rows = [row for row in rows if row["kind"] == "task"]
            assert {row["resource"]: Decimal(row["amount"]) for row in task_rows} == lines, statement
            assert sum((Decimal(row["amount"]) for row in rows), Decimal("0.00")) == cost, statement
            assert {row["period_start"] for row in task_rows} == {f"{today:%Y-%m-%d}"}, statement
            (folder / "18-statement.csv").write_text(statement)

            # Paying for a package, spending it and topping up never told the customer credit ran out.
            assert not Notification.objects.filter(user=user, kind=NotificationKind.CREDIT_EXHAUSTED).exists()
        finally:
            browser.close()
            reconciler.submit(connections.close_all).result()
            reconciler.shutdown()

    print(f"journey: {time.monotonic() - started:.1f} s in the browser; task cost ¥{cost}; screenshots in {folder}")
    errors = [e for e in errors if "favicon.ico" not in e]  # base.html names no icon; Chromium asks anyway
    assert errors == [], "\n".join(errors)


def test_the_task_form_hands_bash_the_command_with_unix_line_breaks():
    """Browsers submit a textarea's line breaks as CRLF; bash would choke on the CRs (found by the journey)."""
    as_submitted = {
        "name": "loop",
        "framework": "custom",
        "image": "python:3.12-slim",
        "command": COMMAND.replace("\n", "\r\n"),
        "gpus": 0,
        "vgpu_slices": 0,
        "vcpus": 1,
        "memory_gib": 1,
        "max_runtime_seconds": 60,
        "max_retries": 0,
        "priority": 5,
    }
    form = TaskForm(as_submitted, gpu_models=[])
    assert form.is_valid(), form.errors
    assert form.cleaned_data["command"] == COMMAND
    quick = form.cleaned_data["command"].replace("sleep 0.4", "true")
    done = subprocess.run(["/bin/bash", "-c", quick], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.count("##progress") == 10, done
