"""Live task events end to end: WebSocket subscribers on the Redis channel layer, loss, duplicates, latency.

    .venv/bin/python bench/live.py                                    # 1,000 subscribers, 100 tasks, 10 ev/s, 30 s
    .venv/bin/python bench/live.py --clients 100 --tasks 10 --seconds 10    # a smoke run

What runs, each its own process:

* the portal's real ASGI application (portal.asgi:application) under Daphne, --servers processes
  on free ports, with REDIS_URL set so the Redis channel layer carries the events, under a
  channel-layer prefix of the run's own (bench/live_settings.py), on a PostgreSQL database the
  script drops and creates afresh (portal_bench_live unless --database-url names another);
* --client-procs aiohttp client processes holding --clients WebSockets at /ws/tasks/<id>/, spread
  evenly over --tasks tasks (10 a task by default), each logged in as its own user, a member of
  the task's tenant, through a session cookie made with Django's SessionStore; each socket goes
  to a server picked at random, as a load balancer would. A --reconnect fraction of them close
  mid-run, stay away a moment and come back with ?after=<last seq seen>, as the task page does;
  a few --outsiders (members of another tenant) try to subscribe and must be refused;
* --producers processes emitting --rate events a second for each task for --seconds through the
  real path, hosting.services._events(task, [(kind, data)]): it keeps the TaskEvent row and pushes
  it with group_send after commit. Each event carries its send time (time.time() just before the
  call, same host clock as the clients) in its data.
  --push-mode loop (default): the emitting threads are sync_to_async workers of an asyncio loop,
  as a Django view under ASGI is, so _push's async_to_sync runs group_send on that loop and its
  Redis connections are reused. --push-mode thread: plain threads, as the task executors and
  Celery workers call it, where each _push makes a thread, an event loop and a Redis connection.

When the producers are done the script reads each task's last_seq, lets the clients drain (until
every socket has seen its task's last event, or --drain seconds), and prints per socket lost (a seq
in 1..last_seq never received), duplicated (received more than once) and out-of-order deliveries,
the latency from send to receipt over live deliveries (p50/p95/p99/max; replays after a reconnect
are counted apart), delivered events/s, the producers' achieved rate and lag, the CPU each part
used and what the server and producer logs said (channels_redis logs "over capacity" when a
group_send was dropped), the deepest server inbox in Redis, and the group memberships left behind
once every socket closed. It exits 1 when any event was lost or duplicated or an outsider got in.

By default it measures the portal as configured. --sticky puts all sockets of a task on one server;
--capacity, --redis-max-connections and --db-conn-max-age try other settings side by side with the
same load: see bench/live_settings.py.
"""

import argparse
import asyncio
import heapq
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/portal_bench_live"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def setup_django() -> None:
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()


# --- Producer ------------------------------------------------------------------------------------


def producer(spec: dict, part: int) -> None:
    """Emit rate events a second for this part's tasks from t0 for `seconds`, through hosting.services._events."""
    setup_django()
    from asgiref.sync import sync_to_async

    from hosting import services
    from hosting.models import EventKind, Task

    rate, seconds, t0 = spec["rate"], spec["seconds"], spec["t0"]
    per_task = round(rate * seconds)
    n_tasks = len(spec["tasks"])
    mine = [i for i in range(n_tasks) if i % spec["producers"] == part]
    tasks = {i: Task(pk=uuid.UUID(spec["tasks"][i])) for i in mine}
    # Spread the tasks' ticks evenly over each 1/rate interval instead of bursting on the second.
    heap = [(t0 + (i / n_tasks) / rate, i, 1) for i in mine]
    heapq.heapify(heap)
    lock = threading.Lock()
    lags, calls, pushes, errors = [], [], [], []
    push = services._push

    def timed_push(task_id, events) -> None:  # _events calls it after commit: time the group_send apart
        started = time.perf_counter()
        push(task_id, events)
        pushes.append(time.perf_counter() - started)

    services._push = timed_push

    def emit(i: int, k: int, due: float) -> None:
        started = time.perf_counter()
        sent = time.time()
        if k % 50:
            item = (EventKind.LOG, {"sent": sent, "stream": "stdout", "text": f"step {k} loss {1 / k:.6f}"})
        else:
            item = (EventKind.PROGRESS, {"sent": sent, "percent": k * 100 // per_task})
        try:
            services._events(tasks[i], [item])
        except Exception as exc:  # a failed write is an event never kept: count it, carry on
            errors.append(repr(exc))
            return
        calls.append(time.perf_counter() - started)
        lags.append(sent - due)

    def next_item():
        with lock:
            if not heap:
                return None
            due, i, k = heapq.heappop(heap)
            if k < per_task:  # schedule the next one now: a late task may emit from two threads at once
                heapq.heappush(heap, (t0 + (i / n_tasks + k) / rate, i, k + 1))
            return due, i, k

    threads = spec["producer_threads"]
    cpu0 = cpu_seconds()
    if spec["push_mode"] == "thread":

        def worker():
            while (item := next_item()) is not None:
                due, i, k = item
                if (delay := due - time.time()) > 0:
                    time.sleep(delay)
                emit(i, k, due)

        pool = [threading.Thread(target=worker) for _ in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
    else:
        from concurrent.futures import ThreadPoolExecutor

        executor = ThreadPoolExecutor(threads)
        emit_async = sync_to_async(emit, thread_sensitive=False, executor=executor)

        async def worker():
            while (item := next_item()) is not None:
                due, i, k = item
                if (delay := due - time.time()) > 0:
                    await asyncio.sleep(delay)
                await emit_async(i, k, due)

        async def run():
            await asyncio.gather(*(worker() for _ in range(threads)))

        asyncio.run(run())
    ended = time.time()
    print(
        json.dumps(
            {
                "emitted": len(calls),
                "errors": errors[:5],
                "error_count": len(errors),
                "ended": ended,
                "lags": [round(lag, 6) for lag in lags],
                "calls": [round(call, 6) for call in calls],
                "pushes": [round(push, 6) for push in pushes],
                "cpu": cpu_seconds() - cpu0,
            }
        ),
        flush=True,
    )


# --- Clients -------------------------------------------------------------------------------------


class Subscriber:
    def __init__(self, row: dict):
        self.index = row["index"]
        self.task = row["task"]
        self.url = row["url"]
        self.origin = row["origin"]
        self.cookie = row["cookie"]
        self.reconnect = row.get("reconnect")  # (seconds after t0, seconds away) or None
        self.counts = bytearray(1024)  # counts[seq]: how often seq arrived
        self.received = 0
        self.last = 0  # the highest seq seen: what ?after= asks from on a reconnect
        self.out_of_order = 0
        self.latencies: list[float] = []
        self.replayed = 0
        self.connects = 0
        self.unplanned_closes = 0
        self.failed_connects = 0
        self.first_at = None
        self.last_at = None
        self.target = None  # the task's last seq, once the producers are done
        self.reached = asyncio.Event()
        self.ws = None
        self.planned_close = False

    def take(self, event: dict, now: float, opened: float) -> None:
        seq = event["seq"]
        if seq >= len(self.counts):
            self.counts.extend(bytearray(max(seq + 1 - len(self.counts), len(self.counts))))
        self.counts[seq] = min(self.counts[seq] + 1, 255)
        self.received += 1
        if seq != self.last + 1:
            self.out_of_order += 1
        self.last = max(self.last, seq)
        self.first_at = self.first_at or now
        self.last_at = now
        sent = event["data"]["sent"]
        if sent >= opened:
            self.latencies.append(now - sent)
        else:  # emitted while this socket was away: a replay from what is kept
            self.replayed += 1
        if self.target is not None and self.last >= self.target:
            self.reached.set()

    def report(self) -> dict:
        target = self.target or 0
        seen = self.counts[1 : target + 1]
        return {
            "index": self.index,
            "task": self.task,
            "received": self.received,
            "lost": sum(1 for c in seen if c == 0) + max(0, target + 1 - len(self.counts)),
            "missing": [seq for seq in range(1, target + 1) if seq >= len(self.counts) or not self.counts[seq]][:5],
            "duplicated": sum(c - 1 for c in self.counts if c > 1),
            "beyond": sum(self.counts[target + 1 :]),
            "out_of_order": self.out_of_order,
            "replayed": self.replayed,
            "connects": self.connects,
            "unplanned_closes": self.unplanned_closes,
            "failed_connects": self.failed_connects,
            "reconnect": self.reconnect is not None,
            "first_at": self.first_at,
            "last_at": self.last_at,
        }


async def client_process(spec: dict, part: int, out: Path) -> None:
    import aiohttp

    rows = [row for row in spec["subscribers"] if row["index"] % spec["client_procs"] == part]
    subs = [Subscriber(row) for row in rows]
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), cookie_jar=aiohttp.DummyCookieJar())
    gate = asyncio.Semaphore(spec["connect_concurrency"])
    stop = asyncio.Event()
    connect_errors: dict[str, int] = {}
    cpu0 = cpu_seconds()

    async def open_socket(sub: Subscriber):
        for attempt in range(20):
            try:
                async with gate:
                    return await session.ws_connect(
                        f"{sub.url}?after={sub.last}",
                        headers={"Cookie": sub.cookie},
                        origin=sub.origin,
                        autoping=True,
                        timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=10),
                        max_msg_size=0,
                    )
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                sub.failed_connects += 1
                if isinstance(exc, aiohttp.WSServerHandshakeError):
                    reason = f"HTTP {exc.status}"
                else:
                    reason = f"{type(exc).__name__}: {str(exc)[:60]}"
                connect_errors[reason] = connect_errors.get(reason, 0) + 1
                await asyncio.sleep(0.2 * (attempt + 1))
        raise RuntimeError(f"subscriber {sub.index} could not connect")

    async def listen(sub: Subscriber, first_ws) -> None:
        ws = first_ws
        while True:
            opened = time.time()
            sub.ws, sub.connects, sub.planned_close = ws, sub.connects + 1, False
            async for message in ws:
                if message.type == aiohttp.WSMsgType.TEXT:
                    sub.take(json.loads(message.data), time.time(), opened)
            if stop.is_set():
                return
            if sub.planned_close:
                await asyncio.sleep(sub.reconnect[1])
            else:
                sub.unplanned_closes += 1
            ws = await open_socket(sub)

    async def planned_reconnect(sub: Subscriber, t0: float) -> None:
        await asyncio.sleep(max(0.0, t0 + sub.reconnect[0] - time.time()))
        sub.planned_close = True
        await sub.ws.close()

    first = await asyncio.gather(*(open_socket(sub) for sub in subs))
    outsiders = {"refused": 0, "accepted": 0, "events": 0}
    for row in spec["outsiders"] if part == 0 else []:
        try:
            ws = await session.ws_connect(row["url"], headers={"Cookie": row["cookie"]}, origin=row["origin"])
        except aiohttp.WSServerHandshakeError as exc:
            outsiders["refused"] += exc.status == 403
        else:
            outsiders["accepted"] += 1
            with_events = await ws.receive(timeout=2)
            outsiders["events"] += with_events.type == aiohttp.WSMsgType.TEXT
            await ws.close()

    reader = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    listeners = [asyncio.create_task(listen(sub, ws)) for sub, ws in zip(subs, first, strict=True)]
    print(f"READY {len(subs)}", flush=True)

    t0 = json.loads(await reader.readline())["t0"]
    reconnects = [asyncio.create_task(planned_reconnect(sub, t0)) for sub in subs if sub.reconnect]
    targets = json.loads(await reader.readline())["last_seq"]  # the producers are done
    end_signal = time.time()
    for sub in subs:
        sub.target = targets[sub.task]
        if sub.last >= sub.target:
            sub.reached.set()
    await asyncio.gather(*reconnects)
    drained = True
    try:
        await asyncio.wait_for(asyncio.gather(*(sub.reached.wait() for sub in subs)), spec["drain"])
    except TimeoutError:
        drained = False
    caught_up = time.time()
    await asyncio.sleep(spec["grace"])  # anything arriving twice late still counts
    stop.set()
    await asyncio.gather(*(sub.ws.close() for sub in subs), return_exceptions=True)
    await asyncio.gather(*listeners, return_exceptions=True)
    await session.close()
    latencies = [lat for sub in subs for lat in sub.latencies]
    out.write_text(
        json.dumps(
            {
                "subscribers": [sub.report() for sub in subs],
                "latencies": latencies,
                "outsiders": outsiders,
                "connect_errors": connect_errors,
                "drained": drained,
                "catch_up": caught_up - end_signal,
                "cpu": cpu_seconds() - cpu0,
            }
        )
    )


# --- Orchestration -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"daphne on port {port} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    sys.exit(f"daphne on port {port} did not start")


def recreate_database() -> None:
    import psycopg
    from django.conf import settings

    db = settings.DATABASES["default"]
    with psycopg.connect(
        host=db["HOST"], port=db["PORT"] or 5432, user=db["USER"], password=db["PASSWORD"] or None,
        dbname="postgres", autocommit=True,
    ) as conn:  # fmt: skip
        conn.execute(f'DROP DATABASE IF EXISTS "{db["NAME"]}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{db["NAME"]}"')


def seed(args, ports: list[int]) -> dict:
    """Tenants, tasks, one user and session per subscriber; the spec the other processes work from."""
    from importlib import import_module

    from django.conf import settings
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
    from django.contrib.auth.hashers import make_password

    from hosting.models import Framework, Task, TaskState
    from tenants import services as tenant_services
    from tenants.models import Membership, Role, User

    rng = random.Random(args.seed)
    store = import_module(settings.SESSION_ENGINE).SessionStore
    backend = "django.contrib.auth.backends.ModelBackend"
    n_tenants = max(1, args.tasks // 2)
    tenants = []
    for t in range(n_tenants):
        owner = User.objects.create_user(email=f"owner{t}@bench.local")
        tenants.append(tenant_services.tenant_create(name=f"Live {t}", owner=owner))
    tasks = Task.objects.bulk_create(
        Task(
            tenant=tenants[i % n_tenants],
            created_by_id=tenants[i % n_tenants].memberships.get().user_id,
            name=f"live-{i}",
            framework=Framework.PYTORCH,
            image="pytorch/pytorch:latest",
            command="python train.py",
            state=TaskState.RUNNING,
        )
        for i in range(args.tasks)
    )
    users = User.objects.bulk_create(
        User(email=f"sub{i}@bench.local", password=make_password(None)) for i in range(args.clients)
    )
    roles = [Role.MEMBER, Role.VIEWER, Role.ADMIN]
    Membership.objects.bulk_create(
        Membership(tenant=tasks[i % args.tasks].tenant, user=user, role=roles[i % len(roles)])
        for i, user in enumerate(users)
    )

    def cookie(user) -> str:
        session = store()
        session[SESSION_KEY] = str(user.pk)
        session[BACKEND_SESSION_KEY] = backend
        session[HASH_SESSION_KEY] = user.get_session_auth_hash()
        session.create()
        return f"{settings.SESSION_COOKIE_NAME}={session.session_key}"

    def where(i: int) -> tuple[str, str]:
        port = ports[i % len(ports)] if args.sticky else rng.choice(ports)
        task_id = tasks[i % args.tasks].pk
        return f"ws://127.0.0.1:{port}/ws/tasks/{task_id}/", f"http://127.0.0.1:{port}"

    reconnecting = set(rng.sample(range(args.clients), round(args.reconnect * args.clients)))
    subscribers = []
    for i, user in enumerate(users):
        url, origin = where(i)
        row = {"index": i, "task": i % args.tasks, "url": url, "origin": origin, "cookie": cookie(user)}
        if i in reconnecting:  # away for a moment somewhere in the middle of the run
            row["reconnect"] = (rng.uniform(0.2, 0.6) * args.seconds, rng.uniform(0.5, 2.0))
        subscribers.append(row)
    outsiders = []
    if args.outsiders and args.tasks >= 2:
        stranger = User.objects.create_user(email="stranger@bench.local")
        other = tenant_services.tenant_create(name="Outsiders", owner=stranger)
        for j in range(args.outsiders):
            user = User.objects.create_user(email=f"outsider{j}@bench.local")
            Membership.objects.create(tenant=other, user=user, role=Role.ADMIN)
            url, origin = where(j)
            outsiders.append({"url": url, "origin": origin, "cookie": cookie(user)})
    return {
        "tasks": [str(task.pk) for task in tasks],
        "subscribers": subscribers,
        "outsiders": outsiders,
        "rate": args.rate,
        "seconds": args.seconds,
        "producers": args.producers,
        "producer_threads": args.producer_threads,
        "push_mode": args.push_mode,
        "client_procs": args.client_procs,
        "connect_concurrency": args.connect_concurrency,
        "drain": args.drain,
        "grace": args.grace,
    }


def proc_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> tuple[float, float]:
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / os.sysconf("SC_CLK_TCK"), sum(values) / os.sysconf("SC_CLK_TCK")


def count_log(path: Path) -> dict:
    text = path.read_text(errors="replace") if path.exists() else ""
    dropped = [int(m.group(1)) for m in re.finditer(r"(\d+) of \d+ channels over capacity", text)]
    return {
        "over_capacity_sends": len(dropped),
        "over_capacity_channels": sum(dropped),
        "push_failed": text.count("Pushing events of task"),
        "tracebacks": text.count("Traceback"),
        "too_many_connections": text.count("MaxConnectionsError"),
        "killed": text.count("took too long to shut down and was killed"),
    }


def layer_config(settings) -> str:
    config = settings.CHANNEL_LAYERS["default"]["CONFIG"]
    host = config["hosts"][0]
    return (
        f"capacity {config.get('capacity', 100)}, expiry {config.get('expiry', 60)} s, "
        f"group_expiry {config.get('group_expiry', 86400)} s, socket_timeout {host.get('socket_timeout')}, "
        f"max_connections {host.get('max_connections', 'redis-py default (100)')}, "
        f"DB_CONN_MAX_AGE {settings.DATABASES['default']['CONN_MAX_AGE']}"
    )


def orchestrate(args) -> int:
    work = Path(tempfile.mkdtemp(prefix="bench-live-"))
    prefix = f"bench-live-{uuid.uuid4().hex[:8]}"
    os.environ["DATABASE_URL"] = args.database_url
    os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/0")
    os.environ["DJANGO_SETTINGS_MODULE"] = "bench.live_settings"
    os.environ["BENCH_LIVE_CHANNEL_PREFIX"] = prefix
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("LOG_LEVEL", "INFO")  # channels_redis says "over capacity" at INFO
    if args.capacity:
        os.environ["BENCH_LIVE_CAPACITY"] = str(args.capacity)
    if args.redis_max_connections:
        os.environ["BENCH_LIVE_REDIS_MAX_CONNECTIONS"] = str(args.redis_max_connections)
    if args.db_conn_max_age is not None:
        os.environ["DB_CONN_MAX_AGE"] = str(args.db_conn_max_age)
    setup_django()
    from django.conf import settings

    if settings.DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
        sys.exit("bench/live.py needs PostgreSQL: --database-url postgres://…")
    from django.core.management import call_command
    from django.db import connections

    print(
        f"bench/live.py: {args.clients} subscribers on {args.tasks} tasks, {args.rate:g} events/s per task for "
        f"{args.seconds:g} s ({args.tasks * args.rate:g} events/s, {args.clients * args.rate:g} deliveries/s); "
        f"{round(args.reconnect * args.clients)} reconnect mid-run; {args.outsiders} outsiders",
        flush=True,
    )
    print(
        f"  {args.servers} daphne ({'sockets of a task on one' if args.sticky else 'each socket on a random one'}), "
        f"{args.client_procs} client, {args.producers} producer processes ({args.producer_threads} threads each, "
        f"push from {args.push_mode}); {os.cpu_count()} CPUs\n"
        f"  database {settings.DATABASES['default']['NAME']}, Redis {os.environ['REDIS_URL']} prefix {prefix}\n"
        f"  channel layer {layer_config(settings)}",
        flush=True,
    )
    started = time.time()
    recreate_database()
    call_command("migrate", verbosity=0)
    ports = [free_port() for _ in range(args.servers)]
    spec = seed(args, ports)
    connections.close_all()
    print(f"  database seeded in {time.time() - started:.1f} s", flush=True)

    daphne = shutil.which("daphne", path=str(Path(sys.executable).parent)) or "daphne"
    children: list[subprocess.Popen] = []

    def spawn(command, **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(command, cwd=ROOT, **kwargs)
        children.append(proc)
        return proc

    server_logs = [work / f"daphne-{port}.log" for port in ports]
    servers = [
        spawn(
            [daphne, "-b", "127.0.0.1", "-p", str(port), "portal.asgi:application"],
            stdout=subprocess.DEVNULL,
            stderr=log.open("w"),
        )
        for port, log in zip(ports, server_logs, strict=True)
    ]
    try:
        for port, proc in zip(ports, servers, strict=True):
            wait_for_port(port, proc)
        spec_path = work / "spec.json"
        spec_path.write_text(json.dumps(spec))
        me = [sys.executable, str(Path(__file__).resolve())]
        clients = [
            spawn(
                [*me, "--role", "client", "--spec", str(spec_path), "--part", str(p)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for p in range(args.client_procs)
        ]
        connect_started = time.time()
        for proc in clients:
            line = proc.stdout.readline()
            if not line.startswith("READY"):
                sys.exit(f"a client process failed before connecting all its sockets (exit {proc.wait()})")
        connect_time = time.time() - connect_started
        print(f"  {args.clients} sockets open in {connect_time:.1f} s", flush=True)

        t0 = time.time() + 1.0
        spec["t0"] = t0
        spec_path.write_text(json.dumps(spec))
        producer_logs = [work / f"producer-{p}.log" for p in range(args.producers)]
        busy0 = machine_busy()
        server_cpu0 = [proc_cpu(proc.pid) for proc in servers]
        inboxes = InboxWatch(prefix)
        producers = [
            spawn(
                [*me, "--role", "producer", "--spec", str(spec_path), "--part", str(p)],
                stdout=subprocess.PIPE,
                stderr=log.open("w"),
                text=True,
            )
            for p, log in enumerate(producer_logs)
        ]
        for proc in clients:
            proc.stdin.write(json.dumps({"t0": t0}) + "\n")
            proc.stdin.flush()
        produced = []
        for proc in producers:
            out, _ = proc.communicate()
            if proc.returncode:
                sys.exit(f"a producer failed (exit {proc.returncode}); see {producer_logs}")
            produced.append(json.loads(out.strip().splitlines()[-1]))
        busy1 = machine_busy()  # the machine while the producers ran
        server_cpu = [proc_cpu(proc.pid) - c for proc, c in zip(servers, server_cpu0, strict=True)]
        from hosting.models import Task

        last_seq = dict(Task.objects.values_list("pk", "last_seq"))
        connections.close_all()
        targets = [last_seq[uuid.UUID(task)] for task in spec["tasks"]]
        for proc in clients:
            proc.stdin.write(json.dumps({"last_seq": targets}) + "\n")
            proc.stdin.flush()
        results = []
        for p, proc in enumerate(clients):
            proc.wait(timeout=args.drain + args.grace + args.seconds + 120)
            if proc.returncode:
                sys.exit(f"client process {p} failed (exit {proc.returncode})")
            results.append(json.loads((work / f"client-{p}.json").read_text()))
            (work / f"client-{p}.json").unlink()
        inboxes.stop()
        stale = stale_members(prefix, spec["tasks"], args.stale_wait)
    finally:
        for proc in reversed(children):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in children:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()

        forget(prefix)
    inbox = inboxes.describe(settings.CHANNEL_LAYERS["default"]["CONFIG"].get("capacity", 100))
    print(f"  server and producer logs: {work}")
    return summarise(
        args, spec, targets, produced, results, server_cpu, busy0, busy1, server_logs, producer_logs, stale, inbox
    )


class InboxWatch(threading.Thread):
    """Samples, twice a second, how many messages wait in each server process's channel-layer inbox."""

    def __init__(self, prefix: str):
        super().__init__(daemon=True)
        import redis

        self.client = redis.Redis.from_url(os.environ["REDIS_URL"])
        self.pattern = f"{prefix}specific.*!"
        self.started = time.time()
        self.deepest = 0
        self.samples: list[tuple[float, int]] = []  # (seconds since start, deepest inbox then)
        self.done = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.done.wait(0.5):
            depths = [self.client.zcard(key) for key in self.client.scan_iter(match=self.pattern, count=1000)]
            self.samples.append((time.time() - self.started, max(depths, default=0)))
            self.deepest = max(self.deepest, *depths, 0)

    def stop(self) -> None:
        self.done.set()
        self.join()
        self.client.close()

    def describe(self, capacity: int) -> str:
        full = [at for at, depth in self.samples if depth >= capacity]
        when = f"; at capacity ({capacity}) first {full[0]:.1f} s in, {len(full) / 2:.1f} s in all" if full else ""
        return f"deepest {self.deepest} messages{when}"


def stale_members(prefix: str, tasks: list[str], wait: float) -> tuple[int, float]:
    """Group members still in Redis once every socket is closed (each consumer's disconnect discards its own)."""
    import redis

    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    started = time.time()
    while True:
        left = sum(client.zcard(f"{prefix}:group:task.{task}") for task in tasks)
        if not left or time.time() - started >= wait:
            client.close()
            return left, time.time() - started
        time.sleep(0.5)


def forget(prefix: str) -> None:
    """Delete whatever the run left under its channel-layer prefix."""
    import redis

    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start : start + 500])
    client.close()


def summarise(
    args, spec, targets, produced, results, server_cpu, busy0, busy1, server_logs, producer_logs, stale, inbox
) -> int:
    t0 = spec["t0"]
    subs = [sub for result in results for sub in result["subscribers"]]
    latencies = [lat for result in results for lat in result["latencies"]]
    emitted = sum(p["emitted"] for p in produced)
    expected = sum(targets[sub["task"]] for sub in subs)
    delivered = sum(sub["received"] for sub in subs)
    lost = sum(sub["lost"] for sub in subs)
    duplicated = sum(sub["duplicated"] for sub in subs)
    beyond = sum(sub["beyond"] for sub in subs)
    out_of_order = sum(sub["out_of_order"] for sub in subs)
    produced_end = max(p["ended"] for p in produced)
    last_delivery = max((sub["last_at"] or 0) for sub in subs)
    reconnecting = [sub for sub in subs if sub["reconnect"]]
    outsiders = {key: sum(r["outsiders"][key] for r in results) for key in ("refused", "accepted", "events")}
    wall = busy1[1] - busy0[1]
    logs = [count_log(path) for path in server_logs + producer_logs]
    log_total = {key: sum(log[key] for log in logs) for key in logs[0]}

    span = max(last_delivery - t0, 1e-9)
    catch_up = max(r["catch_up"] for r in results)
    drained = all(r["drained"] for r in results)

    connect_errors: dict[str, int] = {}
    for result in results:
        for reason, count in result["connect_errors"].items():
            connect_errors[reason] = connect_errors.get(reason, 0) + count

    def total(rows: list[dict], key: str) -> int:
        return sum(row[key] for row in rows)

    def ms(value: float) -> str:
        return f"{value * 1000:9.1f} ms"

    def spread(values: list[float]) -> str:
        return " / ".join(f"{quantile(values, q) * 1000:.1f}" for q in (0.5, 0.99, 1.0)) + " ms"

    rows = [
        ("events emitted", f"{emitted} (expected {args.tasks * round(args.rate * args.seconds)}; kept {sum(targets)})"),
        (
            "producer rate",
            f"{emitted / max(produced_end - t0, 1e-9):.0f} events/s over {produced_end - t0:.1f} s "
            f"(target {args.tasks * args.rate:g}/s over {args.seconds:g} s)",
        ),
        ("producer lag p50/p99/max", spread([lag for p in produced for lag in p["lags"]])),
        ("_events call p50/p99/max", spread([call for p in produced for call in p["calls"]])),
        ("  of which _push p50/p99/max", spread([push for p in produced for push in p["pushes"]])),
        ("producer write errors", str(sum(p["error_count"] for p in produced))),
        ("deliveries expected", str(expected)),
        ("deliveries received", f"{delivered} ({len(latencies)} live, {sum(s['replayed'] for s in subs)} replayed)"),
        ("delivered rate", f"{delivered / span:.0f} events/s (t0 → last delivery {span:.1f} s)"),
        ("catch-up after last emit", f"{catch_up:.2f} s; drained: {drained}"),
        ("latency p50", ms(quantile(latencies, 0.5))),
        ("latency p95", ms(quantile(latencies, 0.95))),
        ("latency p99", ms(quantile(latencies, 0.99))),
        ("latency p99.9", ms(quantile(latencies, 0.999))),
        ("latency max", ms(max(latencies, default=float("nan")))),
        ("latency mean", ms(statistics.fmean(latencies) if latencies else float("nan"))),
        ("LOST events", f"{lost} in {sum(1 for s in subs if s['lost'])} sockets"),
        ("DUPLICATED events", f"{duplicated} in {sum(1 for s in subs if s['duplicated'])} sockets"),
        ("events beyond last_seq", str(beyond)),
        ("out-of-order deliveries", str(out_of_order)),
        (
            "reconnecting sockets",
            f"{len(reconnecting)}: lost {total(reconnecting, 'lost')}, "
            f"duplicated {total(reconnecting, 'duplicated')}, replayed {total(reconnecting, 'replayed')}",
        ),
        (
            "unplanned closes / failed connects",
            f"{total(subs, 'unplanned_closes')} / {total(subs, 'failed_connects')} {connect_errors or ''}",
        ),
        (
            "outsiders refused/accepted",
            f"{outsiders['refused']} / {outsiders['accepted']} (events to them: {outsiders['events']})",
        ),
        ("server inboxes (Redis)", inbox),
        (
            "group_send over capacity",
            f"{log_total['over_capacity_sends']} sends, {log_total['over_capacity_channels']} inboxes skipped "
            f"(push failures {log_total['push_failed']})",
        ),
        ("group members left after close", f"{stale[0]} (waited {stale[1]:.1f} s after the last socket closed)"),
        (
            "server log",
            f"{log_total['tracebacks']} tracebacks, {log_total['too_many_connections']} redis MaxConnectionsError, "
            f"{log_total['killed']} consumers killed after not stopping within 10 s of a disconnect",
        ),
        (
            "CPU s, emitting: servers / producers",
            f"{' + '.join(f'{c:.1f}' for c in server_cpu)} / {sum(p['cpu'] for p in produced):.1f} (clients, whole "
            f"run: {sum(r['cpu'] for r in results):.1f}); machine busy {100 * (busy1[0] - busy0[0]) / wall:.0f}% of "
            f"{os.cpu_count()} CPUs over {wall / os.cpu_count():.1f} s",
        ),
    ]
    width = max(len(label) for label, _ in rows)
    print()
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    worst = sorted((s for s in subs if s["lost"] or s["duplicated"]), key=lambda s: -(s["lost"] + s["duplicated"]))
    for sub in worst[:5]:
        print(
            f"    socket {sub['index']} (task {sub['task']}): lost {sub['lost']}, duplicated {sub['duplicated']}, "
            f"received {sub['received']}, connects {sub['connects']}, task's last seq {targets[sub['task']]}, "
            f"missing {sub['missing']}"
        )
    failed = lost or duplicated or beyond or outsiders["accepted"] or outsiders["events"]
    verdict = "FAIL: not every socket got" if failed else "OK: every socket got"
    print(f"\n  {verdict} every event exactly once")
    if stale[0]:
        print(f"  WARNING: {stale[0]} group memberships outlived their sockets (Redis keeps them for group_expiry)")
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000, help="WebSocket subscribers")
    parser.add_argument("--tasks", type=int, default=100, help="tasks emitting events (subscribers spread evenly)")
    parser.add_argument("--rate", type=float, default=10.0, help="events a second per task")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the producers emit")
    parser.add_argument("--reconnect", type=float, default=0.05, help="fraction of sockets that reconnect mid-run")
    parser.add_argument("--outsiders", type=int, default=10, help="non-members who try to subscribe")
    parser.add_argument("--servers", type=int, default=2, help="daphne processes")
    parser.add_argument(
        "--sticky", action="store_true", help="all sockets of a task on one server (else each picks one at random)"
    )
    parser.add_argument("--client-procs", type=int, default=2, help="client processes")
    parser.add_argument("--producers", type=int, default=2, help="producer processes")
    parser.add_argument("--producer-threads", type=int, default=8, help="emitting threads per producer process")
    parser.add_argument("--push-mode", choices=["loop", "thread"], default="loop")
    parser.add_argument("--connect-concurrency", type=int, default=32, help="handshakes in flight per client process")
    parser.add_argument("--drain", type=float, default=60.0, help="seconds the clients wait to catch up at the end")
    parser.add_argument("--grace", type=float, default=1.0, help="seconds listened for stragglers once caught up")
    parser.add_argument("--capacity", type=int, help="try another channels_redis capacity (the portal's: 1000)")
    parser.add_argument(
        "--redis-max-connections", type=int, help="try another redis-py pool size per process (the portal's: 1000)"
    )
    parser.add_argument("--db-conn-max-age", type=int, help="DB_CONN_MAX_AGE for every process (the portal's: 0)")
    parser.add_argument("--stale-wait", type=float, default=15.0, help="seconds to wait for consumers to leave")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_LIVE_DATABASE_URL", DEFAULT_DATABASE_URL),
        help="PostgreSQL database to drop and create afresh",
    )
    parser.add_argument("--role", choices=["main", "client", "producer"], default="main", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--part", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "client":
        spec_path = Path(args.spec)
        out = spec_path.with_name(f"client-{args.part}.json")
        asyncio.run(client_process(json.loads(spec_path.read_text()), args.part, out))
    elif args.role == "producer":
        producer(json.loads(Path(args.spec).read_text()), args.part)
    else:
        sys.exit(orchestrate(args))


if __name__ == "__main__":
    main()
