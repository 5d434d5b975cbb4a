"""A fake Kubernetes API server for tests: the real `kubernetes` client talks HTTP to it.

It keeps objects in memory, answers the way kube-apiserver and KubeVirt's virt-api do for what the
portal uses (create, read, list with label selectors, merge/strategic/apply patches, delete, the VM
start/stop/restart subresources, /version, nodes, batch/v1 Jobs and their pods' `log` subresource as
text/plain), records every request, and lets a test script failures (`fail_next`) and cluster-side
state changes (`set_status`, `put`; for Jobs `add_job_pod`, `set_job_status`, `set_pod_status`,
`append_log`).

Simplifications, on purpose: apply patches are applied as JSON merge patches (no field ownership),
strategic merge knows only the list merge keys in STRATEGIC_MERGE_KEYS, deletes are immediate (a Job's
pods go with it unless propagationPolicy is Orphan), NodePort Services get their nodePorts on create,
and no controller runs Jobs: the test plays the Job controller and the kubelet with the helpers.
"""

import copy
import itertools
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import yaml

KUBEVIRT_PREFIX = "/apis/kubevirt.io/v1"
PLURALS = {
    "Namespace": "namespaces",
    "Node": "nodes",
    "ResourceQuota": "resourcequotas",
    "LimitRange": "limitranges",
    "ServiceAccount": "serviceaccounts",
    "Secret": "secrets",
    "Service": "services",
    "NetworkPolicy": "networkpolicies",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "VirtualMachine": "virtualmachines",
    "VirtualMachineInstance": "virtualmachineinstances",
    "Job": "jobs",
    "Pod": "pods",
}
KINDS = {plural: kind for kind, plural in PLURALS.items()}
CLUSTER_SCOPED = {"namespaces", "nodes"}
_SUBRESOURCE = re.compile(
    r"^/apis/subresources\.kubevirt\.io/v1/namespaces/(?P<ns>[^/]+)/virtualmachines/(?P<name>[^/]+)"
    r"/(?P<action>start|stop|restart)$"
)
_POD_LOG = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods/(?P<name>[^/]+)/log$")
# The labels the Job controller puts on its pods.
JOB_UID_LABEL = "batch.kubernetes.io/controller-uid"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
# The client's VersionInfo model requires every field, as kube-apiserver always sends them.
VERSION = {
    "major": "1",
    "minor": "33",
    "emulationMajor": "1",
    "emulationMinor": "33",
    "gitVersion": "v1.33.0",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2025-04-23T00:00:00Z",
    "goVersion": "go1.24.2",
    "compiler": "gc",
    "platform": "linux/amd64",
}
_STATUS_REASONS = {
    400: "BadRequest",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
}


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    content_type: str
    body: object
    authorization: str = ""


@dataclass
class _Failure:
    method: str
    path: re.Pattern
    status: int
    body: dict
    headers: dict
    times: int


@dataclass
class _Stall:
    method: str
    path: re.Pattern
    seconds: float
    times: int


@dataclass(frozen=True)
class _Target:
    """Where a path points: the API prefix (/api/v1, /apis/<group>/<version>), namespace, plural, name."""

    prefix: str
    namespace: str | None
    plural: str
    name: str | None

    def key(self, name: str | None = None) -> tuple:
        namespace = "" if self.plural in CLUSTER_SCOPED else self.namespace
        return (self.prefix, namespace, self.plural, name or self.name)


def status_body(code: int, message: str, reason: str = "", **extra) -> dict:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason or _STATUS_REASONS.get(code, "Unknown"),
        "code": code,
        **extra,
    }


def merge_patch(target: object, patch: object) -> object:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# Lists that strategic merge patches merge by a key (the rest are replaced, as in a merge patch):
# only those the portal's objects use.
STRATEGIC_MERGE_KEYS = {("spec", "ports"): "port"}


def strategic_merge_patch(target: object, patch: object, path: tuple = ()) -> object:
    """Kubernetes' strategic merge patch for the lists in STRATEGIC_MERGE_KEYS: items are matched by the
    key and merged, unmatched existing items stay (so server-set fields like a Service's nodePort survive)."""
    key = STRATEGIC_MERGE_KEYS.get(path)
    if key and isinstance(target, list) and isinstance(patch, list):
        merged = [dict(item) for item in target]
        for item in patch:
            match = next((i for i, old in enumerate(merged) if old.get(key) == item.get(key)), None)
            if match is None:
                merged.append(item)
            else:
                merged[match] = strategic_merge_patch(merged[match], item, (*path, "[]"))
        return merged
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = strategic_merge_patch(result.get(name), value, (*path, name))
    return result


def matches_selector(labels: dict, selector: str) -> bool:
    for requirement in filter(None, (part.strip() for part in selector.split(","))):
        if "!=" in requirement:
            key, value = requirement.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in requirement:
            key, value = requirement.replace("==", "=").split("=", 1)
            if labels.get(key) != value:
                return False
        elif requirement.startswith("!"):
            if requirement[1:] in labels:
                return False
        elif requirement not in labels:
            return False
    return True


class KubeFake:
    def __init__(self):
        self.objects: dict[tuple, dict] = {}
        self.logs: dict[tuple[str, str], str] = {}  # (namespace, pod) → what its container printed
        self._pod_suffixes = itertools.count(1)
        self.requests: list[Request] = []
        self._failures: list[_Failure] = []
        self._stalls: list[_Stall] = []
        self._lock = threading.Lock()
        self._versions = itertools.count(1)
        self._node_ports = itertools.count(30000)
        self._server: ThreadingHTTPServer | None = None
        self.url = ""

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> "KubeFake":
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}"
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # --- scripting ------------------------------------------------------------------------------

    def fail_next(
        self,
        method: str,
        path_regex: str,
        status: int,
        body_dict: dict | None = None,
        times: int = 1,
        headers: dict | None = None,
    ) -> None:
        """The next `times` requests with this method and a path matching path_regex (re.search) get
        this status and body (a Status with a fitting reason when not given), before anything else."""
        body = body_dict if body_dict is not None else status_body(status, f"scripted failure {status}")
        with self._lock:
            self._failures.append(_Failure(method.upper(), re.compile(path_regex), status, body, headers or {}, times))

    def stall_next(self, method: str, path_regex: str, seconds: float, times: int = 1) -> None:
        """The next `times` matching requests are answered only after `seconds` (to trip client timeouts)."""
        with self._lock:
            self._stalls.append(_Stall(method.upper(), re.compile(path_regex), seconds, times))

    def put(self, obj: dict) -> dict:
        """Store an object as if the cluster had it already (not recorded as a request)."""
        obj = json.loads(json.dumps(obj))
        with self._lock:
            self._store(_target_of(obj), obj)
        return obj

    def get(self, kind: str, name: str, namespace: str = "") -> dict | None:
        for key, obj in self.objects.items():
            if (
                key[2] == PLURALS[kind]
                and key[3] == name
                and key[1] == ("" if PLURALS[kind] in CLUSTER_SCOPED else namespace)
            ):
                return obj
        return None

    def set_status(self, namespace: str, name: str, *, vm: dict | None = None, vmi: dict | None = None) -> None:
        """Play KubeVirt's controllers: set a VirtualMachine's status and/or create or update its VMI with
        this status (a VM is created bare if missing). `vmi={}` with no phase still creates the VMI."""
        with self._lock:
            if vm is not None:
                key = (KUBEVIRT_PREFIX, namespace, "virtualmachines", name)
                stored = self.objects.get(key) or self._store(
                    _Target(KUBEVIRT_PREFIX, namespace, "virtualmachines", name),
                    {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": name}, "spec": {}},
                )
                stored["status"] = vm
            if vmi is not None:
                key = (KUBEVIRT_PREFIX, namespace, "virtualmachineinstances", name)
                stored = self.objects.get(key) or self._store(
                    _Target(KUBEVIRT_PREFIX, namespace, "virtualmachineinstances", name),
                    {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance", "metadata": {"name": name}},
                )
                stored["status"] = vmi

    def add_job_pod(self, namespace: str, job_name: str, status: dict, *, node_name: str = "") -> str:
        """Play the Job controller: create a pod for the Job (labelled and owned as the controller does,
        with the Job template's containers) with this status; returns the pod's name."""
        with self._lock:
            job = self.objects[("/apis/batch/v1", namespace, "jobs", job_name)]
            uid = job["metadata"]["uid"]
            template = copy.deepcopy(job["spec"]["template"])
            name = f"{job_name}-{next(self._pod_suffixes):05d}"
            labels = {
                **(template.get("metadata", {}).get("labels") or {}),
                JOB_UID_LABEL: uid,
                JOB_NAME_LABEL: job_name,
                "controller-uid": uid,
                "job-name": job_name,
            }
            owner = {"apiVersion": "batch/v1", "kind": "Job", "name": job_name, "uid": uid, "controller": True}
            spec = template["spec"]
            if node_name:
                spec["nodeName"] = node_name
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "labels": labels, "ownerReferences": [owner]},
                "spec": spec,
                "status": status,
            }
            self._store(_Target("/api/v1", namespace, "pods", name), pod)
        return name

    def set_job_status(self, namespace: str, name: str, status: dict) -> None:
        with self._lock:
            self.objects[("/apis/batch/v1", namespace, "jobs", name)]["status"] = status

    def set_pod_status(self, namespace: str, name: str, status: dict) -> None:
        with self._lock:
            self.objects[("/api/v1", namespace, "pods", name)]["status"] = status

    def append_log(self, namespace: str, pod_name: str, text: str) -> None:
        """Play the kubelet: the pod's container printed `text`."""
        with self._lock:
            self.logs[(namespace, pod_name)] = self.logs.get((namespace, pod_name), "") + text

    def delete(self, kind: str, name: str, namespace: str = "") -> None:
        """Remove an object as the cluster would on its own (a pod gone with its node); not a request."""
        with self._lock:
            plural = PLURALS[kind]
            scope = "" if plural in CLUSTER_SCOPED else namespace
            self._remove(next(key for key in self.objects if key[1:] == (scope, plural, name)))

    def requests_to(self, method: str, path_regex: str) -> list[Request]:
        pattern = re.compile(path_regex)
        return [r for r in self.requests if r.method == method.upper() and pattern.search(r.path)]

    # --- the API ----------------------------------------------------------------------------------

    def handle(
        self, method: str, raw_path: str, content_type: str, raw_body: bytes, authorization: str = ""
    ) -> tuple[int, dict | str, dict]:
        """The status, the body (a dict sent as JSON, or a str sent as text/plain) and extra headers."""
        split = urlsplit(raw_path)
        path, query = split.path, {k: v[0] for k, v in parse_qs(split.query).items()}
        body = _parse_body(content_type, raw_body)
        with self._lock:
            self.requests.append(Request(method, path, query, content_type, copy.deepcopy(body), authorization))
            stall = _take(self._stalls, method, path)
        if stall is not None:
            time.sleep(stall.seconds)
        with self._lock:
            failure = _take(self._failures, method, path)
            if failure is not None:
                return failure.status, failure.body, failure.headers
            return (*self._answer(method, path, query, content_type, body), {})

    def _answer(self, method, path, query, content_type, body) -> tuple[int, dict | str]:
        if path.rstrip("/") == "/version" and method == "GET":  # the client asks for /version/
            return 200, VERSION
        if log := _POD_LOG.match(path):
            if method != "GET":
                return 405, status_body(405, f"{method} not allowed on pods/log", "MethodNotAllowed")
            if self.objects.get(("/api/v1", log["ns"], "pods", log["name"])) is None:
                return 404, status_body(404, f'pods "{log["name"]}" not found')
            return 200, self.logs.get((log["ns"], log["name"]), "")
        if action := _SUBRESOURCE.match(path):
            return self._vm_action(action["ns"], action["name"], action["action"]) if method == "PUT" else (405, {})
        target = _parse_path(path)
        if target is None:
            return 404, status_body(404, f"the server could not find the requested resource ({path})")
        if target.name is None:
            if method == "GET":
                return self._list(target, query)
            if method == "POST":
                return self._create(target, body)
            return 405, status_body(405, f"{method} not allowed on a collection", "MethodNotAllowed")
        stored = self.objects.get(target.key())
        missing = 404, status_body(404, f'{target.plural} "{target.name}" not found', "NotFound")
        if method == "GET":
            return (200, stored) if stored is not None else missing
        if method == "DELETE":
            if stored is None:
                return missing
            self._remove(target.key(), cascade=query.get("propagationPolicy") != "Orphan")
            return 200, stored
        if method == "PATCH":
            return self._patch(target, stored, content_type, body)
        if method == "PUT":
            if stored is None:
                return missing
            return 200, self._store(target, body)
        return 405, status_body(405, f"{method} not allowed", "MethodNotAllowed")

    def _create(self, target: _Target, body: dict) -> tuple[int, dict]:
        name = body.get("metadata", {}).get("name")
        if self.objects.get(target.key(name)) is not None:
            return 409, status_body(
                409,
                f'{target.plural} "{name}" already exists',
                "AlreadyExists",
                details={"name": name, "kind": target.plural},
            )
        return 201, self._store(_Target(target.prefix, target.namespace, target.plural, name), body)

    def _patch(self, target: _Target, stored: dict | None, content_type: str, body) -> tuple[int, dict]:
        kind = content_type.split(";")[0].strip()
        if kind == "application/apply-patch+yaml":
            # Server-side apply creates what is missing.
            if stored is None:
                return 201, self._store(target, body)
        elif kind not in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            return 415, status_body(
                415, f"the body of the request was in an unknown format - accepted media types include: {kind}"
            )
        if stored is None:
            return 404, status_body(404, f'{target.plural} "{target.name}" not found')
        merge = strategic_merge_patch if kind == "application/strategic-merge-patch+json" else merge_patch
        return 200, self._store(target, merge(stored, body), existing=stored)

    def _list(self, target: _Target, query: dict) -> tuple[int, dict]:
        selector = query.get("labelSelector", "")
        items = [
            obj
            for key, obj in sorted(self.objects.items())
            if key[0] == target.prefix
            and key[2] == target.plural
            and (target.namespace is None or key[1] == target.namespace)
            and matches_selector(obj.get("metadata", {}).get("labels") or {}, selector)
        ]
        start = int(query.get("continue") or 0)
        limit = int(query.get("limit") or 0) or len(items)
        page, rest = items[start : start + limit], items[start + limit :]
        kind = KINDS.get(target.plural, target.plural)
        metadata = {"resourceVersion": str(next(self._versions))}
        if rest:
            metadata["continue"] = str(start + limit)
        api_version = target.prefix.removeprefix("/api/").removeprefix("/apis/")
        return 200, {"kind": f"{kind}List", "apiVersion": api_version, "metadata": metadata, "items": page}

    def _vm_action(self, namespace: str, name: str, action: str) -> tuple[int, dict]:
        # virt-api's answers: 202, or 409 when the VM is already in the asked-for state.
        vm = self.objects.get((KUBEVIRT_PREFIX, namespace, "virtualmachines", name))
        if vm is None:
            return 404, status_body(404, f'virtualmachines.kubevirt.io "{name}" not found')
        spec = vm.setdefault("spec", {})
        running = spec.get("runStrategy", "Halted") != "Halted"
        conflict = {"start": "VM is already running", "stop": "VM is not running", "restart": "VM is not running"}
        if (action == "start") == running:
            return 409, status_body(
                409, f'Operation cannot be fulfilled on virtualmachine.kubevirt.io "{name}": {conflict[action]}'
            )
        if action != "restart":
            spec["runStrategy"] = "Always" if action == "start" else "Halted"
            vm["metadata"]["resourceVersion"] = str(next(self._versions))
        return 202, {}

    def _remove(self, key: tuple, cascade: bool = True) -> None:
        removed = self.objects.pop(key)
        if key[2] == "pods":
            self.logs.pop((key[1], key[3]), None)
        if key[2] == "jobs" and cascade:  # the garbage collector deletes the Job's pods
            uid = removed["metadata"]["uid"]
            for pod_key, pod in list(self.objects.items()):
                if pod_key[2] == "pods" and (pod["metadata"].get("labels") or {}).get(JOB_UID_LABEL) == uid:
                    self._remove(pod_key)

    def _store(self, target: _Target, obj: dict, existing: dict | None = None) -> dict:
        metadata = obj.setdefault("metadata", {})
        if target.plural not in CLUSTER_SCOPED and target.namespace:
            metadata["namespace"] = target.namespace
        original = (existing or {}).get("metadata", {})
        metadata["uid"] = original.get("uid") or f"uid-{next(self._versions)}"
        metadata["creationTimestamp"] = original.get("creationTimestamp") or "2025-01-01T00:00:00Z"
        metadata["resourceVersion"] = str(next(self._versions))
        obj.setdefault("kind", KINDS.get(target.plural, ""))
        if target.plural == "services":
            for port in obj.get("spec", {}).get("ports", []):
                if obj["spec"].get("type") in ("NodePort", "LoadBalancer"):
                    port.setdefault("nodePort", next(self._node_ports))
        self.objects[target.key(metadata.get("name"))] = obj
        return obj


class _Handler(BaseHTTPRequestHandler):
    fake: KubeFake
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    disable_nagle_algorithm = True  # headers and body go out in two writes: don't wait for delayed ACKs

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw_body = self.rfile.read(length) if length else b""
        try:
            status, body, headers = self.fake.handle(
                self.command,
                self.path,
                self.headers.get("Content-Type", ""),
                raw_body,
                self.headers.get("Authorization", ""),
            )
        except Exception as exc:  # a bug in the fake shows up as a 500 the test can read, not a hang
            status, body, headers = 500, status_body(500, f"kube_fake crashed: {exc!r}"), {}
        if isinstance(body, str):  # pods/log
            payload, media_type = body.encode(), "text/plain; charset=utf-8"
        else:
            payload, media_type = json.dumps(body).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", media_type)
        self.send_header("Content-Length", str(len(payload)))
        for name, value in headers.items():
            self.send_header(name, str(value))
        self.end_headers()
        try:
            self.wfile.write(payload)
        except ConnectionError:
            self.close_connection = True  # the client gave up (a test of timeouts): nobody to answer

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

    def log_message(self, format, *args):
        pass  # tests read fake.requests instead of the console


def _take(scripted: list, method: str, path: str):
    """The first scripted entry for this request, used up once."""
    for entry in scripted:
        if entry.method == method and entry.path.search(path):
            entry.times -= 1
            if entry.times <= 0:
                scripted.remove(entry)
            return entry
    return None


def _parse_body(content_type: str, raw: bytes) -> object:
    if not raw:
        return None
    if "yaml" in content_type:  # apply patches are YAML (the client sends JSON, which is YAML too)
        return yaml.safe_load(raw)
    return json.loads(raw)


def _parse_path(path: str) -> _Target | None:
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["api", "v1"]:
        prefix, rest = "/api/v1", parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        prefix, rest = f"/apis/{parts[1]}/{parts[2]}", parts[3:]
    else:
        return None
    if not rest:
        return None
    if rest[0] == "namespaces" and len(rest) >= 3:
        return _Target(prefix, rest[1], rest[2], rest[3] if len(rest) > 3 else None)
    return _Target(prefix, None, rest[0], rest[1] if len(rest) > 1 else None)


def _target_of(obj: dict) -> _Target:
    api_version = obj["apiVersion"]
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return _Target(prefix, obj["metadata"].get("namespace"), PLURALS[obj["kind"]], obj["metadata"]["name"])


@contextmanager
def running_fake() -> Iterator[KubeFake]:
    fake = KubeFake().start()
    try:
        yield fake
    finally:
        fake.stop()
