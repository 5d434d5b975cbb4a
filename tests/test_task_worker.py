"""End to end on the real services: a real Celery worker (Redis broker) schedules and runs a real
task through the local executor, and a WebSocket client on the Redis channel layer receives its
progress live, every event once."""

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.db import connection

from hosting import services
from hosting.models import Task, TaskState
from portal.routing import websocket_urlpatterns
from provisioning.services import inventory_sync
from tests.factories import UserFactory, make_tenant

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.redis,
    pytest.mark.django_db(transaction=True, serialized_rollback=True),
]

ROOT = Path(__file__).resolve().parent.parent
COMMAND = (
    'python3 -c "import time\n'
    "for i in range(1, 11):\n"
    "    print(f'##progress {i * 10}', flush=True); print(f'##metric loss={1 / i:.3f}', flush=True)\n"
    "    print(f'step {i}', flush=True); time.sleep(0.2)\""
)


@pytest.fixture
def worker(settings, tmp_path):
    """A Celery worker process on the test database and a queue of its own."""
    from portal.celery import app

    queue = f"test-{uuid.uuid4().hex[:8]}"
    db = connection.settings_dict
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}",
        "REDIS_URL": settings.REDIS_URL,
        "CELERY_TASK_ALWAYS_EAGER": "0",
        "CELERY_TASK_DEFAULT_QUEUE": queue,
        "MEDIA_ROOT": str(tmp_path / "media"),
        "PORTAL_TASK_GRACE_SECONDS": "1",
        "PORTAL_BILLING_ENFORCE": "0",  # as in every other test: money has its own tests
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "portal",
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
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    previous = (app.conf.task_always_eager, app.conf.task_default_queue)
    app.conf.task_always_eager = False
    app.conf.task_default_queue = queue
    settings.MEDIA_ROOT = tmp_path / "media"
    try:
        yield process
    finally:
        app.conf.task_always_eager, app.conf.task_default_queue = previous
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


async def test_real_worker_runs_a_task_and_the_browser_sees_its_progress(worker):
    await sync_to_async(inventory_sync)()
    owner = await sync_to_async(UserFactory)()
    tenant = await sync_to_async(make_tenant)(owner=owner)
    membership = await sync_to_async(lambda: tenant.memberships.get())()
    task = await sync_to_async(services.task_submit)(
        membership=membership,
        actor=owner,
        name="count",
        framework="custom",
        image="python:3.11",
        command=COMMAND,
        vcpus=1,
        memory_gib=1,
        max_runtime_seconds=120,
    )
    communicator = WebsocketCommunicator(URLRouter(websocket_urlpatterns), f"/ws/tasks/{task.pk}/")
    communicator.scope["user"] = owner
    connected, _ = await communicator.connect()
    assert connected

    events, deadline = [], time.monotonic() + 90
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            pytest.fail("the worker died:\n" + worker.stdout.read())
        # A timeout here ends the consumer (asgiref cancels it), so wait generously for each event.
        event = await communicator.receive_json_from(timeout=30)
        events.append(event)
        if event["kind"] == "state" and event["data"]["state"] in (TaskState.SUCCEEDED, TaskState.FAILED):
            break
    await communicator.disconnect()

    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), "every event once, in order"
    progress = [e["data"]["percent"] for e in events if e["kind"] == "progress"]
    assert progress == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    states = [e["data"]["state"] for e in events if e["kind"] == "state"]
    assert states[0] == TaskState.QUEUED and states[-1] == TaskState.SUCCEEDED
    assert "running" in states
    logs = [e["data"]["text"] for e in events if e["kind"] == "log"]
    assert logs == [f"step {i}" for i in range(1, 11)]
    stored = await sync_to_async(Task.objects.get)(pk=task.pk)
    assert stored.progress == 100 and stored.state == TaskState.SUCCEEDED
