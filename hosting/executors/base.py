"""The executor interface: run one attempt of a task somewhere, and report what it prints.

Every executor speaks the same progress protocol (DESIGN.md section 6): a stdout line
`##progress N` (percent), `##metric name=value`, anything else is a log line.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class TaskLaunch:
    """Everything an executor needs; no ORM objects."""

    task_id: str
    attempt: int
    tenant_slug: str
    namespace: str  # the tenant's Kubernetes namespace (cluster executor)
    tier: str  # standard | gold | diamond: priority class on the cluster
    name: str
    image: str
    command: str
    env: dict[str, str]
    gpu_model_resource: str  # Kubernetes resource name, "" for none
    gpus: int
    vgpu_slices: int
    gpu_indices: list[int]  # the node's GPUs assigned (CUDA_VISIBLE_DEVICES for the local executor)
    vcpus: int
    memory_gib: int
    max_runtime_seconds: int
    workdir: Path  # where the attempt runs and leaves its results (local executor)
    input_path: Path | None = None  # the uploaded input, copied in by the caller
    input_url: str = ""
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Line:
    """One parsed line of output."""

    kind: str  # "progress" | "metric" | "log"
    stream: str  # "stdout" | "stderr"
    text: str = ""  # the log line
    progress: int | None = None
    metric: tuple[str, float] | None = None


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended."""

    status: str  # "succeeded" | "failed" | "timed_out" | "cancelled" | "preempted" | "lost"
    exit_code: int | None = None
    reason: str = ""


class Reporter(Protocol):
    """What the executor calls while the attempt runs (hosting.services implements it)."""

    def started(self) -> None: ...

    def lines(self, lines: list[Line]) -> None: ...

    def metrics(self, values: dict[str, float]) -> None:
        """Samples the executor takes itself (GPU utilisation, GPU memory)."""

    def heartbeat(self) -> str | None:
        """Called every few seconds; returns "cancel" or "preempt" when the attempt must stop gracefully."""

    def finished(self, outcome: Outcome) -> None: ...


def parse_line(raw: str, stream: str = "stdout") -> Line:
    """`##progress 42` → progress; `##metric loss=0.31` → metric; anything else is a log line."""
    text = raw.rstrip("\r\n")
    if stream == "stdout" and text.startswith("##progress"):
        value = text[len("##progress") :].strip()
        try:
            percent = int(float(value))
        except ValueError:
            return Line(kind="log", stream=stream, text=text)
        return Line(kind="progress", stream=stream, progress=max(0, min(100, percent)))
    if stream == "stdout" and text.startswith("##metric"):
        name, sep, value = text[len("##metric") :].strip().partition("=")
        try:
            number = float(value)
        except ValueError:
            return Line(kind="log", stream=stream, text=text)
        if sep and name.strip():
            return Line(kind="metric", stream=stream, metric=(name.strip()[:64], number))
    return Line(kind="log", stream=stream, text=text[:4000])
