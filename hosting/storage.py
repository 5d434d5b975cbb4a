"""Each tenant's own storage for task inputs and results.

Attempts always run in a local working directory, <root>/<tenant id>/tasks/<task id>/, kept across
attempts so a retried or preempted task finds its checkpoints; a task leaves its results in the
`output` folder there. Where the results are kept for listing and download is chosen by
settings.PORTAL_TASK_STORAGE:

* "local" (the default): the output folder itself is the task's results.
* "s3": when an attempt ends, the output folder is uploaded to an S3-compatible bucket under
  tenants/<tenant id>/tasks/<task id>/output/<path>; listing and downloads read the bucket, so the
  results outlive the working directory and the machine it was on.

No tenant can read another's: the folder and the key prefix are built by the portal from the task's
own ids, and the only part a caller names, the path inside the results, is normalised and refused
when it would leave them.
"""

import logging
import os
import posixpath
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction

logger = logging.getLogger(__name__)

BACKENDS = ("local", "s3")


@dataclass(frozen=True)
class ResultFile:
    path: str  # relative to the task's output folder, "/"-separated
    size: int


@dataclass
class ResultDownload:
    """One result file opened for reading: stream `file` (then close it) as `name`, `size` bytes."""

    name: str
    size: int
    file: BinaryIO


@dataclass(frozen=True)
class _TaskIds:
    """What storage needs of a task: its ids."""

    pk: object
    tenant_id: int


def clean_relative(relative: str) -> str:
    """The path inside a task's results, normalised ("a/./b" is "a/b"); FileNotFoundError when it is
    empty, absolute, leaves the results ("..") or holds a NUL or a backslash."""
    if not isinstance(relative, str) or not relative or "\x00" in relative or "\\" in relative:
        raise FileNotFoundError(relative)
    if relative.startswith("/"):
        raise FileNotFoundError(relative)
    normal = posixpath.normpath(relative)
    if normal in (".", "..") or normal.startswith(("../", "/")):
        raise FileNotFoundError(relative)
    return normal


class TaskStorage(ABC):
    """Where a task's attempts run and where its results are kept."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def task_dir(self, task) -> Path:
        """The task's local working directory (ids only: nothing a user typed)."""
        return self.root / str(task.tenant_id) / "tasks" / str(task.pk)

    def attempt_workdir(self, task) -> Path:
        """Where attempts run. Kept across attempts, so a retried or preempted task finds its checkpoints."""
        path = self.task_dir(task)
        (path / "output").mkdir(parents=True, exist_ok=True)
        return path

    def local_files(self, task) -> list[tuple[ResultFile, Path]]:
        """The files in the task's local output folder, by relative path, with their local paths.
        Links are left out (and never followed): a task could point one anywhere on the machine."""
        output = self.task_dir(task) / "output"
        if output.is_symlink() or not output.is_dir():
            return []
        found = []
        for folder, _folders, names in os.walk(output):  # does not descend into linked folders
            for name in names:
                path = Path(folder) / name
                if path.is_symlink() or not path.is_file():
                    continue
                relative = path.relative_to(output).as_posix()
                try:
                    clean_relative(relative)
                except FileNotFoundError:
                    continue  # a name no download could ask for (a backslash in it)
                found.append((ResultFile(path=relative, size=path.stat().st_size), path))
        return sorted(found, key=lambda pair: pair[0].path)

    @abstractmethod
    def publish_results(self, task) -> None:
        """An attempt of the task ended: make what it left in its output folder the task's results."""

    @abstractmethod
    def result_files(self, task) -> list[ResultFile]:
        """The task's results, by relative path."""

    @abstractmethod
    def open_result(self, task, relative: str) -> ResultDownload:
        """The result file named `relative`; FileNotFoundError for anything outside the results or missing."""


class LocalStorage(TaskStorage):
    """The local output folder is the results."""

    def publish_results(self, task) -> None:
        return None  # they are already where downloads read them

    def result_files(self, task) -> list[ResultFile]:
        return [file for file, _path in self.local_files(task)]

    def result_path(self, task, relative: str) -> Path:
        output = (self.task_dir(task) / "output").resolve()
        candidate = (output / clean_relative(relative)).resolve()
        if output not in candidate.parents or not candidate.is_file():
            raise FileNotFoundError(relative)
        return candidate

    def open_result(self, task, relative: str) -> ResultDownload:
        path = self.result_path(task, relative)
        handle = path.open("rb")
        return ResultDownload(name=path.name, size=path.stat().st_size, file=handle)


class S3Storage(TaskStorage):
    """Results in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW …), uploaded when an attempt ends.

    Downloads are streamed through the portal rather than redirected to a presigned URL: every
    download is authorised by the portal at the moment it is made (a presigned URL is a bearer token
    for anyone it leaks to until it expires), the bucket's endpoint may be on a network only the portal
    reaches, and API clients get the same response whichever storage is in use.
    """

    PREFIX = "tenants"

    def __init__(self, root: Path, *, bucket: str, endpoint_url: str, region: str, access_key_id: str, secret: str):
        super().__init__(root)
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        self.bucket = bucket
        self._errors = (BotoCoreError, ClientError)
        self._client_error = ClientError
        self.client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url or None,
            region_name=region or None,
            aws_access_key_id=access_key_id or None,
            aws_secret_access_key=secret or None,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},  # works for MinIO and endpoints without wildcard DNS
                retries={"max_attempts": 4, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
            ),
        )

    def prefix(self, task) -> str:
        """tenants/<tenant id>/tasks/<task id>/output/ — from the task's ids only."""
        return f"{self.PREFIX}/{int(task.tenant_id)}/tasks/{task.pk}/output/"

    def key(self, task, relative: str) -> str:
        return self.prefix(task) + clean_relative(relative)

    def _objects(self, task) -> dict[str, dict]:
        prefix = self.prefix(task)
        objects = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                relative = item["Key"][len(prefix) :]
                try:
                    if clean_relative(relative) != relative:
                        continue
                except FileNotFoundError:
                    continue  # a folder marker or a key no download could ask for
                objects[relative] = item
        return objects

    def publish_results(self, task) -> None:
        """Upload the output folder after the attempt's transaction commits, so no row lock or database
        transaction is held while files travel. Files already there (same size, not changed since) are
        skipped; nothing is deleted from the bucket, so a later attempt never loses an earlier one's
        results."""
        tenant_id, task_id = task.tenant_id, task.pk
        transaction.on_commit(lambda: self._upload(tenant_id, task_id))

    def _upload(self, tenant_id: int, task_id) -> None:
        task = _TaskIds(pk=task_id, tenant_id=tenant_id)
        files = self.local_files(task)
        if not files:
            return  # nothing here (another machine ran it, or it left nothing)
        try:
            existing = self._objects(task)
            uploaded = 0
            for file, path in files:
                there = existing.get(file.path)
                # Like `aws s3 sync`: same size and not changed since the upload (S3 keeps whole seconds).
                changed = datetime.fromtimestamp(int(path.stat().st_mtime), tz=UTC)
                if there is not None and there["Size"] == file.size and there["LastModified"] >= changed:
                    continue
                self.client.upload_file(str(path), self.bucket, self.key(task, file.path))
                uploaded += 1
            logger.info("Task %s: %s of %s result files uploaded to %s", task_id, uploaded, len(files), self.bucket)
        except (*self._errors, OSError):
            logger.exception("Task %s: results could not be uploaded to s3://%s", task_id, self.bucket)

    def result_files(self, task) -> list[ResultFile]:
        return sorted(
            (ResultFile(path=relative, size=item["Size"]) for relative, item in self._objects(task).items()),
            key=lambda f: f.path,
        )

    def open_result(self, task, relative: str) -> ResultDownload:
        key = self.key(task, relative)
        try:
            found = self.client.get_object(Bucket=self.bucket, Key=key)
        except self._client_error as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(relative) from exc
            raise
        return ResultDownload(name=posixpath.basename(key), size=found["ContentLength"], file=found["Body"])


# --- The storage in use, and the module's functions ---------------------------------------------

_cache: dict[tuple, TaskStorage] = {}


def _root() -> Path:
    return Path(settings.PORTAL_TASK_STORAGE_ROOT or Path(settings.MEDIA_ROOT) / "tenants")


def backend() -> TaskStorage:
    """The storage settings.PORTAL_TASK_STORAGE names (one instance per configuration)."""
    kind = getattr(settings, "PORTAL_TASK_STORAGE", "local") or "local"
    if kind not in BACKENDS:
        raise ImproperlyConfigured(f"PORTAL_TASK_STORAGE must be one of {', '.join(BACKENDS)}, not {kind!r}.")
    root = _root()
    if kind == "local":
        config: tuple = (kind, str(root))
    else:
        config = (
            kind,
            str(root),
            settings.PORTAL_S3_BUCKET,
            settings.PORTAL_S3_ENDPOINT_URL,
            settings.PORTAL_S3_REGION,
            settings.PORTAL_S3_ACCESS_KEY_ID,
            settings.PORTAL_S3_SECRET_ACCESS_KEY,
        )
    storage = _cache.get(config)
    if storage is None:
        if kind == "local":
            storage = LocalStorage(root)
        else:
            if not settings.PORTAL_S3_BUCKET:
                raise ImproperlyConfigured('PORTAL_TASK_STORAGE is "s3" but PORTAL_S3_BUCKET is not set.')
            storage = S3Storage(
                root,
                bucket=settings.PORTAL_S3_BUCKET,
                endpoint_url=settings.PORTAL_S3_ENDPOINT_URL,
                region=settings.PORTAL_S3_REGION,
                access_key_id=settings.PORTAL_S3_ACCESS_KEY_ID,
                secret=settings.PORTAL_S3_SECRET_ACCESS_KEY,
            )
        _cache.clear()  # settings changed (tests): the previous client is not needed any more
        _cache[config] = storage
    return storage


def task_dir(task) -> Path:
    return backend().task_dir(task)


def attempt_workdir(task) -> Path:
    return backend().attempt_workdir(task)


def publish_results(task) -> None:
    backend().publish_results(task)


def result_files(task) -> list[ResultFile]:
    return backend().result_files(task)


def open_result(task, relative: str) -> ResultDownload:
    return backend().open_result(task, relative)


def result_path(task, relative: str) -> Path:
    """The local file of the task's results named `relative` (its working copy, under either storage);
    FileNotFoundError for anything outside or missing. Downloads use open_result, which reads the
    storage in use."""
    return LocalStorage(_root()).result_path(task, relative)
