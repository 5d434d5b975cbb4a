"""Each tenant's own storage for task results, local and S3-compatible: listing and downloads through the
storage module, the API and the pages; paths that leave the results refused on both; no tenant reaching
another's objects whatever path it crafts; results on S3 outliving the local working directory; and a
task run on S3 storage publishing its output.

The S3 tests talk to a real S3-compatible server: moto's, started in this process on 127.0.0.1."""

import os
import shutil
import uuid

import pytest
from django.core.exceptions import ImproperlyConfigured

from hosting import services, storage
from hosting.models import Task, TaskState
from provisioning.services import inventory_sync
from tests.factories import UserFactory, make_tenant

pytestmark = pytest.mark.django_db

WRITES = (
    "python3 -c \"import os, pathlib; out = pathlib.Path(os.environ['PORTAL_OUTPUT_DIR']); "
    "(out / 'model.txt').write_text('weights'); (out / 'logs').mkdir(exist_ok=True); "
    "(out / 'logs' / 'a b.txt').write_text('x')\""
)
CRAFTED = [
    "../secret.txt",
    "../../x",
    "..",
    ".",
    "",
    "/etc/passwd",
    "a/../../secret.txt",
    "logs/../../secret.txt",
    "../output/model.txt/..",
    "..\\secret.txt",
    "model.txt\x00.png",
]


@pytest.fixture(scope="module")
def s3_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def use_s3(settings, s3_server, monkeypatch):
    """use_s3() switches task storage to a fresh bucket on the local S3 server and returns the storage."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)

    def switch() -> storage.S3Storage:
        settings.PORTAL_TASK_STORAGE = "s3"
        settings.PORTAL_S3_ENDPOINT_URL = s3_server
        settings.PORTAL_S3_BUCKET = f"results-{uuid.uuid4().hex[:12]}"
        settings.PORTAL_S3_ACCESS_KEY_ID = "test-key"
        settings.PORTAL_S3_SECRET_ACCESS_KEY = "test-secret"
        settings.PORTAL_S3_REGION = "us-east-1"
        backend = storage.backend()
        assert isinstance(backend, storage.S3Storage)
        backend.client.create_bucket(Bucket=settings.PORTAL_S3_BUCKET)
        return backend

    return switch


@pytest.fixture(params=["local", "s3"])
def kind(request, settings, use_s3):
    """Each test that takes it runs on local storage and on S3 storage."""
    if request.param == "s3":
        use_s3()
    else:
        settings.PORTAL_TASK_STORAGE = "local"
    return request.param


def make_task(tenant) -> Task:
    return Task.objects.create(
        tenant=tenant,
        created_by=tenant.memberships.get(role="owner").user,
        name="train",
        framework="custom",
        image="python:3.11",
        command="true",
        state=TaskState.SUCCEEDED,
    )


def leave_results(task, files: dict[str, bytes], django_capture_on_commit_callbacks) -> None:
    """What an attempt does: write in the output folder, then end (which publishes)."""
    output = storage.attempt_workdir(task) / "output"
    for name, content in files.items():
        (output / name).parent.mkdir(parents=True, exist_ok=True)
        (output / name).write_bytes(content)
    with django_capture_on_commit_callbacks(execute=True):
        storage.publish_results(task)


def read(download: storage.ResultDownload) -> bytes:
    try:
        return download.file.read()
    finally:
        download.file.close()


@pytest.fixture
def task(tenant, kind, django_capture_on_commit_callbacks):
    task = make_task(tenant)
    leave_results(task, {"model.txt": b"weights", "logs/a b.txt": b"x"}, django_capture_on_commit_callbacks)
    (storage.task_dir(task) / "secret.txt").write_text("beside the results, not one of them")
    if kind == "s3":
        backend = storage.backend()
        beside = f"tenants/{task.tenant_id}/tasks/{task.pk}/secret.txt"
        backend.client.put_object(Bucket=backend.bucket, Key=beside, Body=b"beside the results")
    return task


# --- Listing and downloads --------------------------------------------------------------------------


def test_listing_and_download_through_the_module(task, kind):
    assert [(f.path, f.size) for f in storage.result_files(task)] == [("logs/a b.txt", 1), ("model.txt", 7)]
    download = storage.open_result(task, "model.txt")
    assert download.name == "model.txt" and download.size == 7 and read(download) == b"weights"
    nested = storage.open_result(task, "logs/./a b.txt")
    assert nested.name == "a b.txt" and read(nested) == b"x"
    with pytest.raises(FileNotFoundError):
        storage.open_result(task, "missing.txt")


def test_listing_and_download_through_the_api_and_pages(task, kind, api, client, user):
    files = api(user).get(f"/api/v1/tasks/{task.pk}/results/").json()
    assert [(f["path"], f["size"]) for f in files] == [("logs/a b.txt", 1), ("model.txt", 7)]
    response = api(user).get(files[1]["url"])
    assert response.status_code == 200 and b"".join(response.streaming_content) == b"weights"
    assert response["Content-Disposition"] == 'attachment; filename="model.txt"'
    assert response["Content-Length"] == "7"
    client.force_login(user)
    page = client.get(f"/tasks/{task.pk}/")
    assert page.status_code == 200 and "model.txt" in page.content.decode()
    download = client.get(f"/tasks/{task.pk}/results/logs/a%20b.txt")
    assert download.status_code == 200 and b"".join(download.streaming_content) == b"x"
    assert download["Content-Disposition"] == 'attachment; filename="a b.txt"'


@pytest.mark.parametrize("path", CRAFTED)
def test_paths_that_leave_the_results_are_refused(task, kind, path):
    with pytest.raises(FileNotFoundError):
        storage.open_result(task, path)


@pytest.mark.parametrize(
    "path", ["../secret.txt", "..%2fsecret.txt", "%2e%2e/secret.txt", "a/../../secret.txt", "/etc/passwd"]
)
def test_paths_that_leave_the_results_are_404_on_the_api_and_pages(task, kind, api, client, user, path):
    assert api(user).get(f"/api/v1/tasks/{task.pk}/results/{path}").status_code == 404
    client.force_login(user)
    assert client.get(f"/tasks/{task.pk}/results/{path}").status_code == 404


def test_clean_relative_normalises_inside_and_refuses_outside():
    assert storage.clean_relative("a/./b//c") == "a/b/c"
    assert storage.clean_relative("a/../b") == "b"
    for path in CRAFTED:
        with pytest.raises(FileNotFoundError):
            storage.clean_relative(path)


# --- Tenant isolation ---------------------------------------------------------------------------------


def test_a_tenant_cannot_fetch_another_tenants_results(
    task, kind, api, client, user, django_capture_on_commit_callbacks
):
    stranger = UserFactory()
    other = make_tenant(owner=stranger, name="Other Co")
    theirs = make_task(other)
    leave_results(theirs, {"model.txt": b"their weights"}, django_capture_on_commit_callbacks)
    assert read(storage.open_result(theirs, "model.txt")) == b"their weights"
    crafted = [
        f"../../../{other.pk}/tasks/{theirs.pk}/output/model.txt",
        f"../../../../tenants/{other.pk}/tasks/{theirs.pk}/output/model.txt",
        f"/tenants/{other.pk}/tasks/{theirs.pk}/output/model.txt",
        f"tenants/{other.pk}/tasks/{theirs.pk}/output/model.txt",
        f"../../{theirs.pk}/output/model.txt",
    ]
    for path in crafted:
        with pytest.raises(FileNotFoundError):
            storage.open_result(task, path)
        assert api(user).get(f"/api/v1/tasks/{task.pk}/results/{path}").status_code == 404
    # Their task, asked for by id, is not ours to see at all.
    assert api(user).get(f"/api/v1/tasks/{theirs.pk}/results/model.txt").status_code == 404
    assert api(user).get(f"/api/v1/tasks/{theirs.pk}/results/").status_code == 404
    client.force_login(user)
    assert client.get(f"/tasks/{theirs.pk}/results/model.txt").status_code == 404
    # And each listing holds only its own task's files.
    assert [f.path for f in storage.result_files(theirs)] == ["model.txt"]
    assert [f.path for f in storage.result_files(task)] == ["logs/a b.txt", "model.txt"]
    assert api(stranger).get(f"/api/v1/tasks/{theirs.pk}/results/model.txt").status_code == 200


def test_s3_keys_are_built_from_ids(tenant, use_s3):
    backend = use_s3()
    task = make_task(tenant)
    assert backend.key(task, "logs/./a.txt") == f"tenants/{tenant.pk}/tasks/{task.pk}/output/logs/a.txt"
    with pytest.raises(FileNotFoundError):
        backend.key(task, "../../x")


# --- S3: publishing ------------------------------------------------------------------------------------


def test_results_on_s3_survive_the_working_directory_being_removed(
    tenant, use_s3, api, user, django_capture_on_commit_callbacks
):
    use_s3()
    task = make_task(tenant)
    leave_results(task, {"model.txt": b"weights", "ckpt/step-1.pt": b"\x00\x01"}, django_capture_on_commit_callbacks)
    shutil.rmtree(storage.task_dir(task))
    assert [(f.path, f.size) for f in storage.result_files(task)] == [("ckpt/step-1.pt", 2), ("model.txt", 7)]
    response = api(user).get(f"/api/v1/tasks/{task.pk}/results/ckpt/step-1.pt")
    assert response.status_code == 200 and b"".join(response.streaming_content) == b"\x00\x01"
    with pytest.raises(FileNotFoundError):
        storage.result_path(task, "model.txt")  # the local working copy is gone


def test_local_results_go_with_the_working_directory(tenant, settings, django_capture_on_commit_callbacks):
    settings.PORTAL_TASK_STORAGE = "local"
    task = make_task(tenant)
    leave_results(task, {"model.txt": b"weights"}, django_capture_on_commit_callbacks)
    assert storage.result_path(task, "model.txt").read_bytes() == b"weights"
    shutil.rmtree(storage.task_dir(task))
    assert storage.result_files(task) == []


def test_publishing_uploads_after_commit_and_only_what_changed(
    tenant, use_s3, monkeypatch, django_capture_on_commit_callbacks
):
    backend = use_s3()
    task = make_task(tenant)
    output = storage.attempt_workdir(task) / "output"
    (output / "a.txt").write_text("one")
    (output / "b.txt").write_text("two")
    uploads = []
    real_upload = backend.client.upload_file
    monkeypatch.setattr(backend.client, "upload_file", lambda *a, **kw: (uploads.append(a[2]), real_upload(*a, **kw)))
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        storage.publish_results(task)
    assert storage.result_files(task) == [] and uploads == []  # nothing travels inside the transaction
    for callback in callbacks:
        callback()
    assert sorted(uploads) == [backend.key(task, "a.txt"), backend.key(task, "b.txt")]
    uploads.clear()
    (output / "b.txt").write_text("two, longer")
    (output / "c.txt").write_text("three")
    with django_capture_on_commit_callbacks(execute=True):
        storage.publish_results(task)
    assert sorted(uploads) == [backend.key(task, "b.txt"), backend.key(task, "c.txt")]
    assert read(storage.open_result(task, "b.txt")) == b"two, longer"
    # Nothing is deleted: a later attempt never loses an earlier one's results.
    (output / "a.txt").unlink()
    with django_capture_on_commit_callbacks(execute=True):
        storage.publish_results(task)
    assert [f.path for f in storage.result_files(task)] == ["a.txt", "b.txt", "c.txt"]


def test_links_in_the_output_are_never_published(tenant, use_s3, tmp_path, django_capture_on_commit_callbacks):
    use_s3()
    task = make_task(tenant)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "private.key").write_text("not a result")
    output = storage.attempt_workdir(task) / "output"
    (output / "model.txt").write_text("weights")
    os.symlink(outside / "private.key", output / "key.txt")
    os.symlink(outside, output / "dir")
    with django_capture_on_commit_callbacks(execute=True):
        storage.publish_results(task)
    assert [f.path for f in storage.result_files(task)] == ["model.txt"]


def test_an_unreachable_bucket_does_not_break_the_end_of_an_attempt(
    tenant, use_s3, settings, caplog, django_capture_on_commit_callbacks
):
    use_s3()
    settings.PORTAL_S3_BUCKET = "no-such-bucket"
    task = make_task(tenant)
    (storage.attempt_workdir(task) / "output" / "model.txt").write_text("weights")
    with django_capture_on_commit_callbacks(execute=True):
        storage.publish_results(task)
    assert "could not be uploaded" in caplog.text
    assert (storage.task_dir(task) / "output" / "model.txt").is_file()  # the working copy stays


def test_storage_settings_are_checked(settings):
    settings.PORTAL_TASK_STORAGE = "ftp"
    with pytest.raises(ImproperlyConfigured):
        storage.backend()
    settings.PORTAL_TASK_STORAGE = "s3"
    settings.PORTAL_S3_BUCKET = ""
    with pytest.raises(ImproperlyConfigured):
        storage.backend()


# --- A whole task on S3 storage ----------------------------------------------------------------------------


def test_a_task_run_on_s3_storage_publishes_its_output(
    settings, use_s3, owner_membership, api, user, django_capture_on_commit_callbacks
):
    backend = use_s3()
    settings.PORTAL_TASK_EXECUTE_INLINE = True
    settings.PORTAL_TASK_GRACE_SECONDS = 1
    settings.PORTAL_TASK_RETRY_BASE_SECONDS = 0
    inventory_sync()
    with django_capture_on_commit_callbacks(execute=True):
        task = services.task_submit(
            membership=owner_membership,
            actor=owner_membership.user,
            name="writes",
            framework="custom",
            image="python:3.11",
            command=WRITES,
            vcpus=1,
            memory_gib=1,
            max_runtime_seconds=120,
        )
    task.refresh_from_db()
    assert task.state == TaskState.SUCCEEDED, task.failure_reason
    prefix = f"tenants/{task.tenant_id}/tasks/{task.pk}/output/"
    listed = backend.client.list_objects_v2(Bucket=backend.bucket, Prefix="tenants/")
    assert sorted(item["Key"] for item in listed["Contents"]) == [prefix + "logs/a b.txt", prefix + "model.txt"]
    shutil.rmtree(storage.task_dir(task))
    files = api(user).get(f"/api/v1/tasks/{task.pk}/results/").json()
    assert [(f["path"], f["size"]) for f in files] == [("logs/a b.txt", 1), ("model.txt", 7)]
    response = api(user).get(files[1]["url"])
    assert response.status_code == 200 and b"".join(response.streaming_content) == b"weights"
