"""Task hosting through /api/v1/tasks/: submitting (JSON and multipart), refusals with field messages, roles,
tenant isolation, logs, events, results, cancelling, place in line, estimated start, usage and query counts.

Tasks run for real: the scheduling pass and the local executor run inline when the submission commits."""

import json
from datetime import timedelta
from decimal import Decimal

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from hosting import selectors, storage
from hosting.models import MAX_RUNTIME_SECONDS, EventKind, Task, TaskEvent, TaskRun, TaskState
from provisioning import services as provisioning_services
from provisioning.models import GpuModel
from tenants.models import Role, Tier
from tests.factories import UserFactory, make_tenant

pytestmark = pytest.mark.django_db

PRINTS = "python3 -c \"print('##progress 50'); print('##metric loss=0.5'); print('hi'); print('there')\""
WRITES = (
    "python3 -c \"import os, pathlib; out = pathlib.Path(os.environ['PORTAL_OUTPUT_DIR']); "
    "(out / 'model.txt').write_text('weights'); (out / 'logs').mkdir(); (out / 'logs' / 'a b.txt').write_text('x')\""
)


@pytest.fixture(autouse=True)
def hosting(settings, db):
    """Attempts run inline, on the local executor, with short grace and retry delays; no billing hooks."""
    settings.PORTAL_TASK_EXECUTE_INLINE = True
    settings.PORTAL_TASK_GRACE_SECONDS = 1
    settings.PORTAL_TASK_RETRY_BASE_SECONDS = 0
    settings.PORTAL_TASK_PAYMENT_CHECK = ""
    settings.PORTAL_PACKAGE_HOLDERS = ""
    settings.PORTAL_TASK_COST_ESTIMATOR = ""
    provisioning_services.inventory_sync()


@pytest.fixture
def submit(django_capture_on_commit_callbacks):
    """submit(client, run=True, fmt="json", **fields) → the response to POST /tasks/; with run, the task runs."""

    def post(client, run: bool = True, fmt: str = "json", **fields):
        body = {"name": "hello", "command": PRINTS} | fields
        if not run:
            return client.post("/api/v1/tasks/", body, format=fmt)
        with django_capture_on_commit_callbacks(execute=True):
            return client.post("/api/v1/tasks/", body, format=fmt)

    return post


@pytest.fixture
def finished(api, user, tenant, submit):
    response = submit(api(user))
    assert response.status_code == 201, response.json()
    task = Task.objects.get(pk=response.json()["id"])
    assert task.state == TaskState.SUCCEEDED, task.failure_reason
    return task


@pytest.fixture
def with_results(api, user, tenant, submit):
    response = submit(api(user), command=WRITES)
    task = Task.objects.get(pk=response.json()["id"])
    assert task.state == TaskState.SUCCEEDED, task.failure_reason
    return task


@pytest.fixture
def queued(api, user, tenant, submit):
    """A task that stays queued: its submission never commits, so no scheduling pass runs."""
    response = submit(api(user), run=False, name="waits")
    assert response.status_code == 201
    return Task.objects.get(pk=response.json()["id"])


def fake_cost(task) -> Decimal:
    return Decimal("12.34")


class TestSubmit:
    def test_submit_runs_and_reports(self, api, user, tenant, submit):
        client = api(user)
        response = submit(client, env={"EPOCHS": "3"}, priority=7, max_retries=1)
        assert response.status_code == 201
        body = response.json()
        assert body["state"] == "queued" and body["name"] == "hello" and body["priority"] == 7
        assert body["env_names"] == ["EPOCHS"] and "env" not in body  # values may be secrets
        assert body["image"].startswith("pytorch/") and body["created_by"] == user.email

        detail = client.get(f"/api/v1/tasks/{body['id']}/").json()
        assert detail["state"] == "succeeded" and detail["progress"] == 100 and detail["exit_code"] == 0
        assert detail["latest_metrics"] == {"loss": 0.5}
        assert detail["queue_position"] is None and detail["estimated_start"] is None
        assert detail["last_seq"] == Task.objects.get(pk=body["id"]).last_seq
        [run] = detail["usage"]["runs"]
        assert run["attempt"] == 1 and run["outcome"] == "succeeded" and run["chargeable"] is True
        assert run["vcpus"] == 2 and run["memory_gib"] == 8 and run["gpu_model"] == ""
        assert detail["usage"]["cost"] is None and detail["usage"]["currency"] == "CNY"

    def test_vgpu_slice_task_runs_on_the_general_pool(self, api, user, tenant, submit):
        response = submit(api(user), gpu_model="T4", vgpu_slices=2)
        assert response.status_code == 201, response.json()
        detail = api(user).get(f"/api/v1/tasks/{response.json()['id']}/").json()
        assert detail["state"] == "succeeded", detail["failure_reason"]
        [run] = detail["usage"]["runs"]
        assert run["gpu_model"] == "T4" and Decimal(run["gpus"]) == Decimal("0.25")  # 2 of 8 slices

    def test_multipart_with_an_uploaded_input_and_env(self, api, user, tenant, submit):
        command = (
            "python3 -c \"import os; print(open(os.environ['PORTAL_INPUT']).read().strip()); "
            "print(os.environ['GREETING'])\""
        )
        response = submit(
            api(user),
            fmt="multipart",
            command=command,
            env=json.dumps({"GREETING": "bonjour"}),
            input_file=SimpleUploadedFile("data.csv", b"a,b\n1,2\n"),
        )
        assert response.status_code == 201, response.json()
        assert response.json()["input_file"] == "data.csv"
        log = b"".join(api(user).get(f"/api/v1/tasks/{response.json()['id']}/logs/").streaming_content)
        assert log.decode().splitlines() == ["a,b", "1,2", "bonjour"]

    def test_cost_so_far_comes_from_the_billing_hook(self, api, user, tenant, finished, settings):
        client = api(user)
        assert client.get(f"/api/v1/tasks/{finished.pk}/").json()["usage"]["cost"] is None
        settings.PORTAL_TASK_COST_ESTIMATOR = "tests.test_task_api.fake_cost"
        assert client.get(f"/api/v1/tasks/{finished.pk}/").json()["usage"]["cost"] == "12.34"


class TestRefusals:
    @pytest.mark.parametrize(
        ("fields", "field"),
        [
            ({"command": ""}, "command"),
            ({"command": "   "}, "command"),
            ({"max_runtime_seconds": MAX_RUNTIME_SECONDS + 1}, "max_runtime_seconds"),
            ({"max_retries": 4}, "max_retries"),
            ({"gpu_model": "T4", "gpus": 1, "vgpu_slices": 2}, "vgpu_slices"),
            ({"gpu_model": "Z99", "gpus": 1}, "gpu_model"),
            ({"env": {"PATH": "/tmp"}}, "env"),
            ({"env": {"PORTAL_TASK_ID": "x"}}, "env"),
            ({"input_url": "https://example.com/data.csv"}, "input_url"),
            ({"framework": "caffe"}, "framework"),
            ({"gpus": "many"}, "gpus"),
        ],
    )
    def test_bad_input_is_a_400_with_field_messages(self, api, user, tenant, submit, fields, field):
        response = submit(api(user), **fields)
        assert response.status_code == 400
        assert response.json()[field] and all(isinstance(m, str) for m in response.json()[field])
        assert not Task.objects.exists()

    def test_missing_command(self, api, user, tenant):
        response = api(user).post("/api/v1/tasks/", {"name": "x"}, format="json")
        assert response.status_code == 400 and "command" in response.json()

    def test_upload_too_big(self, api, user, tenant, submit, settings):
        settings.PORTAL_TASK_UPLOAD_MAX_BYTES = 10
        response = submit(api(user), fmt="multipart", input_file=SimpleUploadedFile("big.bin", b"x" * 100))
        assert response.status_code == 400 and "input_file" in response.json()

    def test_env_that_is_not_an_object(self, api, user, tenant, submit):
        response = submit(api(user), fmt="multipart", env="EPOCHS=3")
        assert response.status_code == 400 and "env" in response.json()

    @pytest.mark.parametrize(
        ("fields", "field"),
        [
            ({"gpu_model": "A100", "gpus": 4}, "gpus"),  # Standard tier: 2 A100s
            ({"gpu_model": "H100", "gpus": 1}, "gpus"),  # Standard tier: no H100
            ({"memory_gib": 300}, "memory_gib"),  # Standard tier: 256 GiB in all
        ],
    )
    def test_a_task_over_the_whole_quota_can_never_start(self, api, user, tenant, submit, fields, field):
        response = submit(api(user), **fields)
        assert response.status_code == 400
        assert "never start" in " ".join(response.json()[field])


class TestRoles:
    def test_viewer_reads_but_cannot_submit_cancel_or_download(self, api, tenant, member_of, with_results, submit):
        viewer = api(member_of(tenant, Role.VIEWER))
        assert viewer.get("/api/v1/tasks/").json()["count"] == 1
        assert viewer.get(f"/api/v1/tasks/{with_results.pk}/").status_code == 200
        assert viewer.get(f"/api/v1/tasks/{with_results.pk}/logs/").status_code == 200
        assert viewer.get(f"/api/v1/tasks/{with_results.pk}/events/").status_code == 200
        assert viewer.get(f"/api/v1/tasks/{with_results.pk}/results/").status_code == 200
        assert viewer.get(f"/api/v1/tasks/{with_results.pk}/results/model.txt").status_code == 403
        assert submit(viewer).status_code == 403
        assert viewer.post(f"/api/v1/tasks/{with_results.pk}/cancel/").status_code == 403
        assert Task.objects.count() == 1

    def test_billing_cannot_see_tasks(self, api, tenant, member_of, finished):
        billing = api(member_of(tenant, Role.BILLING))
        assert billing.get("/api/v1/tasks/").status_code == 403
        assert billing.get(f"/api/v1/tasks/{finished.pk}/").status_code == 403

    def test_member_submits_with_a_token(self, api, tenant, member_of, submit):
        from tenants import services as tenant_services
        from tenants.models import Membership

        member = member_of(tenant, Role.MEMBER)
        membership = Membership.objects.get(user=member, tenant=tenant)
        secret = tenant_services.api_token_create(membership=membership, actor=member, name="ci").secret
        response = submit(api(token=secret))
        assert response.status_code == 201 and response.json()["created_by"] == member.email


class TestIsolation:
    def test_another_tenants_task_is_404_everywhere(self, api, with_results):
        stranger = UserFactory()
        make_tenant(owner=stranger, name="Other Co")
        client = api(stranger)
        base = f"/api/v1/tasks/{with_results.pk}/"
        for url in (
            base,
            f"{base}logs/",
            f"{base}logs/?format=json",
            f"{base}events/",
            f"{base}results/",
            f"{base}results/model.txt",
        ):
            assert client.get(url).status_code == 404, url
        assert client.post(f"{base}cancel/").status_code == 404
        assert client.get("/api/v1/tasks/").json()["count"] == 0

    def test_not_a_uuid_is_404(self, api, user, tenant):
        assert api(user).get("/api/v1/tasks/not-a-task/").status_code == 404


class TestLogsAndEvents:
    def test_logs_are_the_printed_lines_in_order(self, api, user, finished):
        response = api(user).get(f"/api/v1/tasks/{finished.pk}/logs/")
        assert response.status_code == 200 and response["Content-Type"] == "text/plain; charset=utf-8"
        assert b"".join(response.streaming_content).decode() == "hi\nthere\n"  # progress and metrics are not log

    def test_logs_as_json_after_a_sequence_number(self, api, user, finished):
        client = api(user)
        page = client.get(f"/api/v1/tasks/{finished.pk}/logs/", {"format": "json"}).json()
        assert [e["data"]["text"] for e in page["events"]] == ["hi", "there"]
        assert {e["kind"] for e in page["events"]} == {"log"} and page["more"] is False
        first = page["events"][0]["seq"]
        later = client.get(f"/api/v1/tasks/{finished.pk}/logs/", {"format": "json", "after": first}).json()
        assert [e["data"]["text"] for e in later["events"]] == ["there"]

    def test_events_after_n_are_only_the_later_ones(self, api, user, finished):
        client = api(user)
        everything = client.get(f"/api/v1/tasks/{finished.pk}/events/").json()
        seqs = [e["seq"] for e in everything["events"]]
        assert seqs == list(range(1, finished.last_seq + 1)) and everything["last_seq"] == finished.last_seq
        kinds = [e["kind"] for e in everything["events"]]
        assert kinds[0] == "state" and kinds[-1] == "state" and {"progress", "metric", "log"} <= set(kinds)
        assert everything["events"][-1]["data"]["state"] == "succeeded"
        later = client.get(f"/api/v1/tasks/{finished.pk}/events/", {"after": 3}).json()
        assert [e["seq"] for e in later["events"]] == seqs[3:]
        assert client.get(f"/api/v1/tasks/{finished.pk}/events/", {"after": finished.last_seq}).json()["events"] == []
        assert client.get(f"/api/v1/tasks/{finished.pk}/events/", {"after": "x"}).status_code == 400

    def test_events_come_in_pages(self, api, user, finished, monkeypatch):
        from hosting.api import views

        monkeypatch.setattr(views, "EVENTS_PER_PAGE", 2)
        page = api(user).get(f"/api/v1/tasks/{finished.pk}/events/", {"after": 1}).json()
        assert [e["seq"] for e in page["events"]] == [2, 3] and page["more"] is True


class TestResults:
    def test_results_are_listed_and_downloaded(self, api, user, with_results):
        client = api(user)
        files = client.get(f"/api/v1/tasks/{with_results.pk}/results/").json()
        assert [(f["path"], f["size"]) for f in files] == [("logs/a b.txt", 1), ("model.txt", 7)]
        assert files[1]["url"].endswith(f"/api/v1/tasks/{with_results.pk}/results/model.txt")
        response = client.get(files[1]["url"])
        assert response.status_code == 200 and b"".join(response.streaming_content) == b"weights"
        assert response["Content-Disposition"] == 'attachment; filename="model.txt"'
        nested = client.get(files[0]["url"])
        assert nested.status_code == 200 and nested["Content-Disposition"] == 'attachment; filename="a b.txt"'

    @pytest.mark.parametrize(
        "path", ["../../x", "..%2f..%2fx", "%2e%2e/%2e%2e/x", "../output/model.txt/..", "/etc/passwd", "missing.txt"]
    )
    def test_paths_outside_the_results_are_404(self, api, user, with_results, path):
        outside = storage.task_dir(with_results) / "secret.txt"
        outside.write_text("not a result")
        response = api(user).get(f"/api/v1/tasks/{with_results.pk}/results/{path}")
        assert response.status_code == 404

    def test_another_tasks_file_of_the_same_tenant_is_not_reachable(self, api, user, with_results, queued):
        assert (storage.task_dir(with_results) / "output" / "model.txt").is_file()
        url = f"/api/v1/tasks/{queued.pk}/results/../../{with_results.pk}/output/model.txt"
        assert api(user).get(url).status_code == 404


class TestCancel:
    def test_cancel_a_queued_task(self, api, user, queued):
        response = api(user).post(f"/api/v1/tasks/{queued.pk}/cancel/")
        assert response.status_code == 202
        assert response.json()["state"] == "cancelled"
        queued.refresh_from_db()
        assert queued.state == TaskState.CANCELLED and queued.finished_at is not None

    def test_a_finished_task_cannot_be_cancelled(self, api, user, finished):
        response = api(user).post(f"/api/v1/tasks/{finished.pk}/cancel/")
        assert response.status_code == 400 and response.json()["non_field_errors"]


class TestList:
    def test_state_filter(self, api, user, finished, queued):
        client = api(user)
        assert [t["id"] for t in client.get("/api/v1/tasks/", {"state": "queued"}).json()["results"]] == [
            str(queued.pk)
        ]
        assert client.get("/api/v1/tasks/").json()["count"] == 2
        assert client.get("/api/v1/tasks/", {"state": "nope"}).status_code == 400

    def test_list_query_count_is_constant(self, api, user, tenant):
        client = api(user)
        t4 = GpuModel.objects.get(code="T4")

        def add(count, start):
            Task.objects.bulk_create(
                Task(
                    tenant=tenant,
                    created_by=user,
                    name=f"bulk-{n}",
                    framework="pytorch",
                    image="img",
                    command="true",
                    gpu_model=t4 if n % 2 else None,
                    gpus=n % 2,
                    state=[TaskState.QUEUED, TaskState.RUNNING, TaskState.SUCCEEDED][n % 3],
                    queued_since=timezone.now() - timedelta(seconds=n),
                )
                for n in range(start, start + count)
            )

        add(5, 0)
        client.get("/api/v1/tasks/")
        with CaptureQueriesContext(connection) as few:
            assert client.get("/api/v1/tasks/").json()["count"] == 5
        add(195, 5)
        with CaptureQueriesContext(connection) as many:
            body = client.get("/api/v1/tasks/", {"limit": 200}).json()
        assert body["count"] == 200 and len(body["results"]) == 200
        assert len(many) == len(few)
        queued = [t for t in body["results"] if t["state"] == "queued"]
        assert queued and all(t["queue_position"] for t in queued)


def _task(tenant, user, *, state=TaskState.QUEUED, gpus=8, runtime=3600, queued_since=None, model="A100"):
    return Task.objects.create(
        tenant=tenant,
        created_by=user,
        name="t",
        framework="pytorch",
        image="img",
        command="true",
        gpu_model=GpuModel.objects.get(code=model),
        gpus=gpus,
        max_runtime_seconds=runtime,
        state=state,
        queued_since=queued_since or timezone.now(),
    )


def _running(tenant, user, *, started, runtime, gpus=8):
    task = _task(tenant, user, state=TaskState.RUNNING, gpus=gpus, runtime=runtime)
    task.attempts = 1
    task.save(update_fields=["attempts"])
    TaskRun.objects.create(
        task=task,
        tenant=tenant,
        attempt=1,
        node_name="a100-node-1",
        gpus=gpus,
        vcpus=1,
        memory_gib=1,
        started_at=started,
    )
    return task


class TestPlaceInLine:
    """Every A100 (3 nodes × 8) is taken by tasks that end, at the latest, in 1, 2 and 3 hours."""

    @pytest.fixture
    def full_pool(self, tenant, user, settings):
        now = timezone.now()
        for hours in (1, 2, 3):
            _running(tenant, user, started=now - timedelta(hours=1), runtime=(hours + 1) * 3600)
        return now

    def test_queue_position_and_estimated_start(self, api, user, tenant, full_pool, settings):
        grace = timedelta(seconds=settings.PORTAL_TASK_GRACE_SECONDS)
        first = _task(tenant, user, queued_since=full_pool - timedelta(minutes=5), runtime=7200)
        second = _task(tenant, user, queued_since=full_pool - timedelta(minutes=1))
        assert selectors.queue_position(first) == 1 and selectors.queue_position(second) == 2
        assert selectors.queue_positions([first, second]) == {first.pk: 1, second.pk: 2}
        # first takes the GPUs freed in 1 h (and holds them 2 h); second the ones freed in 2 h.
        assert abs(selectors.estimated_start(first, now=full_pool) - (full_pool + timedelta(hours=1) + grace)) < (
            timedelta(seconds=1)
        )
        assert abs(selectors.estimated_start(second, now=full_pool) - (full_pool + timedelta(hours=2) + grace)) < (
            timedelta(seconds=1)
        )
        body = api(user).get(f"/api/v1/tasks/{second.pk}/").json()
        assert body["queue_position"] == 2 and body["estimated_start"]

    def test_a_higher_tier_goes_ahead(self, tenant, user, full_pool):
        mine = _task(tenant, user, queued_since=full_pool - timedelta(hours=1))
        diamond = make_tenant(name="Core Co")
        diamond.tier = Tier.objects.get(code="diamond")
        diamond.save(update_fields=["tier"])
        theirs = _task(diamond, diamond.memberships.get().user, queued_since=full_pool)
        assert selectors.queue_position(theirs) == 1 and selectors.queue_position(mine) == 2
        assert selectors.queue_positions([mine]) == {mine.pk: 2}

    def test_other_gpu_models_are_another_line(self, tenant, user, full_pool):
        _task(tenant, user, queued_since=full_pool - timedelta(hours=1))
        t4 = _task(tenant, user, model="T4", gpus=1)
        assert selectors.queue_position(t4) == 1
        assert selectors.estimated_start(t4, now=full_pool) == full_pool  # T4s are free now

    def test_no_estimate_for_more_than_the_pool_has_and_it_holds_nobody_up(self, tenant, user, full_pool, settings):
        too_big = _task(tenant, user, gpus=32, queued_since=full_pool - timedelta(hours=1))
        assert selectors.estimated_start(too_big, now=full_pool) is None
        behind = _task(tenant, user)
        grace = timedelta(seconds=settings.PORTAL_TASK_GRACE_SECONDS)
        assert selectors.queue_position(behind) == 2
        assert selectors.estimated_start(behind, now=full_pool) == full_pool + timedelta(hours=1) + grace

    def test_nothing_for_a_task_that_does_not_wait(self, tenant, user, full_pool):
        running = Task.objects.filter(state=TaskState.RUNNING).first()
        assert selectors.queue_position(running) is None and selectors.estimated_start(running) is None


class TestSelectors:
    def test_full_log_streams_in_sequence_order(self, tenant, user):
        task = _task(tenant, user)
        TaskEvent.objects.bulk_create(
            TaskEvent(task=task, seq=seq, kind=EventKind.LOG, data={"stream": "stdout", "text": f"line {seq}"})
            for seq in (3, 1, 2)
        )
        assert list(selectors.full_log(task)) == ["line 1\n", "line 2\n", "line 3\n"]

    def test_latest_metrics_takes_each_metrics_last_value(self, tenant, user):
        task = _task(tenant, user)
        rows = [("loss", 0.9), ("acc", 0.1), ("loss", 0.5), ("acc", 0.7), ("loss", 0.3)]
        TaskEvent.objects.bulk_create(
            TaskEvent(task=task, seq=i, kind=EventKind.METRIC, data={"name": name, "value": value})
            for i, (name, value) in enumerate(rows, start=1)
        )
        assert selectors.latest_metrics(task) == {"acc": 0.7, "loss": 0.3}
        assert selectors.latest_metrics(task, upto=3) == {"acc": 0.1, "loss": 0.5}
