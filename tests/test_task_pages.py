"""The task pages: the list with live badges, the submission form with examples and errors, and a task's
live page (progress, metrics, log, usage, results, cancel) rendered up to the sequence number its socket
resumes after."""

import json
import re
from datetime import timedelta

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from hosting.examples import EXAMPLES
from hosting.models import Task, TaskState
from provisioning import services as provisioning_services
from tenants.models import Role
from tests.factories import UserFactory, make_tenant

pytestmark = pytest.mark.django_db

PRINTS = (
    "python3 -c \"import os, pathlib; print('##progress 50'); print('##metric loss=0.5'); "
    "print('##metric accuracy=0.75'); print('hi'); print('there'); "
    "(pathlib.Path(os.environ['PORTAL_OUTPUT_DIR']) / 'model.txt').write_text('weights')\""
)


@pytest.fixture(autouse=True)
def hosting(settings, db):
    settings.PORTAL_TASK_EXECUTE_INLINE = True
    settings.PORTAL_TASK_GRACE_SECONDS = 1
    settings.PORTAL_TASK_RETRY_BASE_SECONDS = 0
    settings.PORTAL_TASK_PAYMENT_CHECK = ""
    settings.PORTAL_PACKAGE_HOLDERS = ""
    settings.PORTAL_TASK_COST_ESTIMATOR = ""
    provisioning_services.inventory_sync()


def form_data(**fields) -> dict:
    return {
        "name": "hello",
        "framework": "pytorch",
        "image": "",
        "command": PRINTS,
        "env": "",
        "input_url": "",
        "gpu_model": "",
        "gpus": 0,
        "vgpu_slices": 0,
        "vcpus": 2,
        "memory_gib": 8,
        "max_runtime_seconds": 3600,
        "max_retries": 0,
        "priority": 5,
    } | fields


@pytest.fixture
def post_task(client, user, tenant, django_capture_on_commit_callbacks):
    """post_task(run=True, **fields) → the response to the submission form; with run, the task runs."""

    def post(run: bool = True, **fields):
        client.force_login(user)
        if not run:
            return client.post("/tasks/new/", form_data(**fields))
        with django_capture_on_commit_callbacks(execute=True):
            return client.post("/tasks/new/", form_data(**fields))

    return post


@pytest.fixture
def finished(post_task):
    response = post_task()
    assert response.status_code == 302
    task = Task.objects.get()
    assert task.state == TaskState.SUCCEEDED, task.failure_reason
    return task


@pytest.fixture
def queued(post_task):
    post_task(run=False, name="waits")
    return Task.objects.get(name="waits")


def live_data(html: str) -> dict:
    found = re.search(r'<script id="task-live" type="application/json">(.*?)</script>', html, re.S)
    return json.loads(found.group(1))


class TestList:
    def test_tasks_with_live_badges_progress_and_place_in_line(self, client, user, finished, queued):
        client.force_login(user)
        html = client.get("/tasks/").content.decode()
        assert f'href="/tasks/{finished.pk}/"' in html and f'href="/tasks/{queued.pk}/"' in html
        assert f'id="task-state-{finished.pk}" data-state="succeeded">Succeeded<' in html
        assert f'id="task-state-{queued.pk}" data-state="queued">Queued<' in html
        assert re.search(rf'aria-valuenow="100"[^>]*id="task-progress-{finished.pk}"', html)
        assert "#1 in line" in html
        assert "/ws/dashboard/" in html and '"task.state"' in html
        assert 'href="/tasks/new/"' in html

    def test_state_filter(self, client, user, finished, queued):
        client.force_login(user)
        html = client.get("/tasks/", {"state": "queued"}).content.decode()
        assert f"/tasks/{queued.pk}/" in html and f"/tasks/{finished.pk}/" not in html

    def test_viewer_sees_tasks_but_no_submit_button_and_billing_is_refused(self, client, tenant, member_of, finished):
        client.force_login(member_of(tenant, Role.VIEWER))
        html = client.get("/tasks/").content.decode()
        assert f"/tasks/{finished.pk}/" in html and "/tasks/new/" not in html
        client.force_login(member_of(tenant, Role.BILLING))
        assert client.get("/tasks/").status_code == 403

    def test_list_query_count_does_not_grow_with_tasks(self, client, user, tenant):
        client.force_login(user)

        def add(count, start):
            Task.objects.bulk_create(
                Task(
                    tenant=tenant,
                    created_by=user,
                    name=f"bulk-{n}",
                    framework="pytorch",
                    image="img",
                    command="true",
                    state=[TaskState.QUEUED, TaskState.RUNNING][n % 2],
                    queued_since=timezone.now() - timedelta(seconds=n),
                )
                for n in range(start, start + count)
            )

        add(5, 0)
        client.get("/tasks/")
        with CaptureQueriesContext(connection) as few:
            client.get("/tasks/")
        add(45, 5)
        with CaptureQueriesContext(connection) as many:
            html = client.get("/tasks/").content.decode()
        assert html.count('class="badge') >= 50
        assert len(many) == len(few)


class TestSubmit:
    def test_form_offers_examples_gpu_models_slices_env_and_upload(self, client, user, tenant):
        client.force_login(user)
        html = client.get("/tasks/new/").content.decode()
        assert 'enctype="multipart/form-data"' in html and 'type="file" name="input_file"' in html
        assert '<option value="" selected>None (CPU only)</option>' in html
        assert '<option value="A100">' in html and 'name="vgpu_slices"' in html
        assert '<textarea name="env"' in html
        for key, example in EXAMPLES.items():
            assert f'<option value="{key}">{example["name"]}</option>' in html
        examples = json.loads(
            re.search(r'<script id="task-examples-data" type="application/json">(.*?)</script>', html, re.S).group(1)
        )
        assert set(examples) == set(EXAMPLES) and examples["train"]["command"] == EXAMPLES["train"]["command"]

    def test_an_example_fills_the_form_without_javascript(self, client, user, tenant):
        client.force_login(user)
        html = client.get("/tasks/new/", {"example": "fail"}).content.decode()
        assert f'value="{EXAMPLES["fail"]["name"]}"' in html and 'value="300"' in html

    def test_submit_redirects_to_the_task_which_runs(self, client, user, post_task):
        response = post_task(env="EPOCHS=3\n# a comment\n\nMODE = fast=yes\n", priority=8)
        task = Task.objects.get()
        assert response.status_code == 302 and response["Location"] == f"/tasks/{task.pk}/"
        assert task.env == {"EPOCHS": "3", "MODE": " fast=yes"} and task.priority == 8
        assert task.state == TaskState.SUCCEEDED, task.failure_reason
        html = client.get(response["Location"]).content.decode()
        assert "hello submitted" in html

    def test_upload_through_the_form(self, client, user, tenant, django_capture_on_commit_callbacks):
        client.force_login(user)
        command = "python3 -c \"import os; print(open(os.environ['PORTAL_INPUT']).read())\""
        data = form_data(command=command) | {"input_file": SimpleUploadedFile("in.txt", b"uploaded!")}
        with django_capture_on_commit_callbacks(execute=True):
            assert client.post("/tasks/new/", data).status_code == 302
        task = Task.objects.get()
        assert b"".join(client.get(f"/tasks/{task.pk}/log/").streaming_content) == b"uploaded!\n"

    @pytest.mark.parametrize(
        ("fields", "field", "message"),
        [
            ({"command": ""}, "command", "Give the command to run"),
            ({"max_runtime_seconds": 72 * 3600 + 1}, "max_runtime_seconds", "Choose between 60 and 259200"),
            ({"env": "NOVALUE"}, "env", "Line 1: write NAME=value."),
            ({"env": "A=1\nA=2"}, "env", "Line 2: A is set twice."),
            ({"env": "HOME=/root"}, "env", "HOME is not a name you can set."),
            ({"gpu_model": "A100", "gpus": 4}, "gpus", "this task can never start"),
            ({"gpu_model": "T4", "gpus": 1, "vgpu_slices": 2}, "vgpu_slices", "not both"),
            ({"input_url": "ftp://x/y"}, "input_url", "s3://"),
        ],
    )
    def test_refusals_land_on_their_field(self, post_task, fields, field, message):
        response = post_task(**fields)
        assert response.status_code == 200
        form = response.context["form"]
        assert any(message in error for error in form.errors[field]), form.errors
        assert 'class="invalid-feedback d-block"' in response.content.decode()
        assert not Task.objects.exists()

    def test_viewer_cannot_open_the_form(self, client, tenant, member_of):
        client.force_login(member_of(tenant, Role.VIEWER))
        assert client.get("/tasks/new/").status_code == 403
        assert client.post("/tasks/new/", form_data()).status_code == 403


class TestDetail:
    def test_finished_task_page(self, client, user, finished):
        client.force_login(user)
        html = client.get(f"/tasks/{finished.pk}/").content.decode()
        live = live_data(html)
        assert live["id"] == str(finished.pk) and live["after"] == finished.last_seq
        assert live["maxLines"] == 2000
        assert [(p["name"], p["value"]) for p in live["series"]] == [("loss", 0.5), ("accuracy", 0.75)]
        assert 'aria-valuenow="100"' in html and 'data-state="succeeded"' in html
        row = '<tr data-metric="accuracy"><th scope="row">accuracy</th><td class="text-end font-monospace">0.75</td>'
        assert row in html
        assert '<canvas id="task-chart"' in html
        log = html[html.index('id="task-log"') :]
        assert log.index("<div>hi</div>") < log.index("<div>there</div>")
        assert "##progress" not in log[: log.index("</div></div>")]
        assert f'href="/tasks/{finished.pk}/log/"' in html
        assert f'href="/tasks/{finished.pk}/results/model.txt"' in html
        assert 'data-attempt="1"' in html and "succeeded" in html
        assert 'id="task-cancel"' not in html  # finished: nothing to cancel
        assert "/ws/tasks/${live.id}/?after=${last}" in html

    def test_the_page_renders_up_to_the_sequence_its_socket_resumes_after(self, client, user, finished):
        """Events written after the read of last_seq are left to the socket, not rendered twice."""
        from hosting.models import EventKind, TaskEvent

        late = {"stream": "stdout", "text": "written-after-the-read"}
        TaskEvent.objects.create(task=finished, seq=finished.last_seq + 1, kind=EventKind.LOG, data=late)
        client.force_login(user)
        html = client.get(f"/tasks/{finished.pk}/").content.decode()
        assert live_data(html)["after"] == finished.last_seq and "written-after-the-read" not in html

    def test_running_progress_is_rendered(self, client, user, finished):
        Task.objects.filter(pk=finished.pk).update(state=TaskState.RUNNING, progress=42)
        client.force_login(user)
        html = client.get(f"/tasks/{finished.pk}/").content.decode()
        assert 'aria-valuenow="42"' in html and 'style="width: 42%"' in html and ">42%<" in html
        assert 'id="task-cancel"' in html and "data-confirm=" in html

    def test_queued_task_shows_its_place_and_estimated_start(self, client, user, queued):
        client.force_login(user)
        html = client.get(f"/tasks/{queued.pk}/").content.decode()
        assert "Number 1 in line" in html and "Enough capacity for it frees up by" in html
        assert live_data(html)["after"] == 1 and 'id="task-cancel"' in html

    def test_cancel_a_queued_task(self, client, user, queued):
        client.force_login(user)
        response = client.post(f"/tasks/{queued.pk}/cancel/", follow=True)
        assert response.redirect_chain[-1][0] == f"/tasks/{queued.pk}/"
        queued.refresh_from_db()
        assert queued.state == TaskState.CANCELLED
        assert "Cancelling waits." in response.content.decode()

    def test_full_log_is_text(self, client, user, finished):
        client.force_login(user)
        response = client.get(f"/tasks/{finished.pk}/log/")
        assert response["Content-Type"] == "text/plain; charset=utf-8"
        assert b"".join(response.streaming_content) == b"hi\nthere\n"
        download = client.get(f"/tasks/{finished.pk}/log/", {"download": "1"})
        assert download["Content-Disposition"] == f'attachment; filename="task-{finished.pk}.log"'

    def test_result_download_and_traversal(self, client, user, finished):
        client.force_login(user)
        response = client.get(f"/tasks/{finished.pk}/results/model.txt")
        assert response["Content-Disposition"] == 'attachment; filename="model.txt"'
        assert b"".join(response.streaming_content) == b"weights"
        assert client.get(f"/tasks/{finished.pk}/results/../../x").status_code == 404
        assert client.get(f"/tasks/{finished.pk}/results/%2e%2e/input").status_code == 404

    def test_viewer_reads_but_cannot_cancel_or_download(self, client, tenant, member_of, finished, queued):
        client.force_login(member_of(tenant, Role.VIEWER))
        html = client.get(f"/tasks/{finished.pk}/").content.decode()
        assert "model.txt" in html and f"/tasks/{finished.pk}/results/model.txt" not in html
        assert 'id="task-cancel"' not in client.get(f"/tasks/{queued.pk}/").content.decode()
        assert client.get(f"/tasks/{finished.pk}/results/model.txt").status_code == 403
        assert client.post(f"/tasks/{queued.pk}/cancel/").status_code == 403
        assert client.get(f"/tasks/{finished.pk}/log/").status_code == 200

    def test_another_tenants_task_is_404(self, client, finished):
        stranger = UserFactory()
        make_tenant(owner=stranger, name="Other Co")
        client.force_login(stranger)
        for url in ("", "log/", "results/model.txt"):
            assert client.get(f"/tasks/{finished.pk}/{url}").status_code == 404
        assert client.post(f"/tasks/{finished.pk}/cancel/").status_code == 404

    def test_cost_so_far_when_billing_estimates_it(self, client, user, finished, settings):
        settings.PORTAL_TASK_COST_ESTIMATOR = "tests.test_task_api.fake_cost"
        client.force_login(user)
        assert "¥12.34 so far" in client.get(f"/tasks/{finished.pk}/").content.decode()
