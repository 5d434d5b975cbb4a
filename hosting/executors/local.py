"""The local executor: one attempt of a task as a subprocess on this machine (DESIGN.md section 6).

Like a CI runner, it runs the customer's own command (`/bin/bash -c`, no login shell) in the attempt's
working directory, in a process group of its own, with a clean environment, resource limits, a wall-time
limit, its stdout and stderr streamed line by line through the progress protocol, and GPU samples from
NVML. It is not a security boundary: production runs tasks on the cluster (hosting.executors.cluster).

Limits, set in the child between fork and exec. preexec_fn is unsafe in a threaded parent when the
function takes locks (imports, logging, allocation-heavy code); this one only calls setrlimit with
values worked out beforehand.
- RLIMIT_CPU: max runtime × vCPUs plus a margin. It is per process, so a task that forks can use more
  in all; it is the backstop that still holds if this executor dies. The wall-time limit is the real one.
- Memory, for a CPU task RLIMIT_AS (address space): the task's memory plus a margin, because address
  space is not memory in use: the shell, the interpreter and its shared libraries take some, and every
  thread reserves an 8 MiB stack and, under glibc, a malloc arena of 64 MiB of address space that it
  mostly never touches. A GPU task gets RLIMIT_DATA instead (private writable memory, Linux ≥ 4.7):
  the CUDA driver reserves address space for the whole GPU memory and more at initialisation, so an
  RLIMIT_AS of a realistic size makes CUDA fail to start, while its reservations are not data. Seen on
  an H200 with PyTorch 2.11/CUDA 13: RLIMIT_AS 17 GiB → CUDA initialisation fails, 256 GiB → works;
  RLIMIT_DATA 2 GiB → CUDA works, and RLIMIT_DATA 17 GiB still stops a 20 GiB allocation.
- RLIMIT_NOFILE: a sane number of open files.
"""

import contextlib
import logging
import os
import re
import resource
import selectors
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from hosting.executors.base import Line, Outcome, Reporter, TaskLaunch, parse_line

logger = logging.getLogger(__name__)

MIB = 1 << 20
GIB = 1 << 30
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CPU_TIME_MARGIN_SECONDS = 60
CPU_TIME_KILL_AFTER_SECONDS = 10  # SIGXCPU at the soft limit, SIGKILL this much later
MEMORY_MARGIN_BYTES = 512 * MIB
MEMORY_MARGIN_PER_VCPU_BYTES = 128 * MIB  # a thread per vCPU: stack and malloc arena
OPEN_FILES = 4096
READ_CHUNK = 64 * 1024
MAX_LINE_BYTES = 64 * 1024  # a longer "line" is cut into pieces (log lines are kept to 4000 characters)
EXIT_POLL_SECONDS = 0.05
OUTPUT_DRAIN_SECONDS = 2.0  # after the task exits, how long to wait for pipes a stray process holds open
STDERR_TAIL_LINES = 20
_OUT_OF_MEMORY = re.compile(r"MemoryError|bad_alloc|Cannot allocate memory|out of memory", re.IGNORECASE)

_STOP_REASONS = {
    "timed_out": "Stopped at its time limit of {limit} seconds.",
    "cancelled": "Cancelled on request.",
    "preempted": "Preempted to make room for higher-priority work.",
}
_HEARTBEAT_STOPS = {"cancel": "cancelled", "preempt": "preempted"}


# --- limits and environment ---------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Resource limits for one attempt, worked out in the parent; `apply` runs in the child."""

    cpu_seconds: int
    memory_bytes: int
    memory_resource: int  # resource.RLIMIT_AS or resource.RLIMIT_DATA
    open_files: int

    @classmethod
    def for_launch(cls, launch: TaskLaunch) -> "Limits":
        vcpus = max(1, launch.vcpus)
        return cls(
            cpu_seconds=launch.max_runtime_seconds * vcpus + CPU_TIME_MARGIN_SECONDS,
            memory_bytes=launch.memory_gib * GIB + MEMORY_MARGIN_BYTES + vcpus * MEMORY_MARGIN_PER_VCPU_BYTES,
            memory_resource=resource.RLIMIT_DATA if launch.gpu_indices else resource.RLIMIT_AS,
            open_files=OPEN_FILES,
        )

    @property
    def memory_limit_name(self) -> str:
        return "RLIMIT_DATA" if self.memory_resource == resource.RLIMIT_DATA else "RLIMIT_AS"

    def rlimits(self) -> list[tuple[int, tuple[int, int]]]:
        """(resource, (soft, hard)) pairs, never above the hard limits this process already has: an
        unprivileged process cannot raise them, and the child would fail to start."""
        wanted = [
            (resource.RLIMIT_CPU, self.cpu_seconds, self.cpu_seconds + CPU_TIME_KILL_AFTER_SECONDS),
            (self.memory_resource, self.memory_bytes, self.memory_bytes),
            (resource.RLIMIT_NOFILE, self.open_files, self.open_files),
        ]
        result = []
        for kind, soft, hard in wanted:
            current_hard = resource.getrlimit(kind)[1]
            if current_hard != resource.RLIM_INFINITY:
                soft, hard = min(soft, current_hard), min(hard, current_hard)
            result.append((kind, (soft, hard)))
        return result


def _preexec(rlimits: list[tuple[int, tuple[int, int]]]) -> Callable[[], None]:
    def apply() -> None:  # in the child, after fork: no imports, no logging, no locks
        for kind, values in rlimits:
            resource.setrlimit(kind, values)

    return apply


def default_path() -> str:
    """The worker's PATH: where the machine's tools (python3, nvidia-smi …) are."""
    return os.environ.get("PATH") or DEFAULT_PATH


def output_dir(launch: TaskLaunch) -> Path:
    return Path(launch.workdir) / "output"


def task_environment(launch: TaskLaunch, path: str) -> dict[str, str]:
    """A clean, minimal environment, then the task's own variables, then the portal's (which win)."""
    env = {"PATH": path, "HOME": str(launch.workdir), "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}
    env.update({str(key): str(value) for key, value in launch.env.items()})
    env.update(
        {
            # Empty for a CPU task: CUDA then sees no GPU at all, not every GPU of the machine.
            "CUDA_VISIBLE_DEVICES": ",".join(str(index) for index in launch.gpu_indices),
            # CUDA numbers GPUs fastest first unless told otherwise; NVML and nvidia-smi by PCI bus.
            # The assigned indices are NVML's, so CUDA must count the same way.
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "PORTAL_TASK_ID": launch.task_id,
            "PORTAL_OUTPUT_DIR": str(output_dir(launch)),
        }
    )
    if launch.input_path is not None:
        env["PORTAL_INPUT"] = str(launch.input_path)
    elif launch.input_url:
        env["PORTAL_INPUT"] = launch.input_url
    return env


# --- GPU sampling -------------------------------------------------------------------------------

_nvml_unavailable_logged = False


def _log_nvml_unavailable(why: str) -> None:
    global _nvml_unavailable_logged
    if not _nvml_unavailable_logged:
        _nvml_unavailable_logged = True
        logger.info("GPU sampling is off: NVML is unavailable (%s)", why)


class GpuSampler:
    """Utilisation and memory of the task's GPUs from NVML, averaged over them.

    `nvml` is the pynvml module (nvidia-ml-py); tests pass a fake with the same functions. Where NVML is
    missing or fails (no driver, no GPU) the sampler turns itself off, and says so in the log once."""

    def __init__(self, indices: list[int], nvml: ModuleType | None = None):
        self.indices = list(indices)
        self._nvml = nvml
        self._handles: list = []
        self._initialised = False

    def open(self) -> bool:
        """Start NVML and find the GPUs; False when there is nothing to sample."""
        if not self.indices:
            return False
        if self._nvml is None:
            try:
                import pynvml
            except ImportError:
                _log_nvml_unavailable("nvidia-ml-py is not installed")
                return False
            self._nvml = pynvml
        try:
            self._nvml.nvmlInit()
        except Exception as error:  # NVMLError_LibraryNotFound, _DriverNotLoaded …: no GPUs to watch here
            _log_nvml_unavailable(str(error) or type(error).__name__)
            return False
        self._initialised = True
        try:
            self._handles = [self._nvml.nvmlDeviceGetHandleByIndex(index) for index in self.indices]
        except Exception as error:
            _log_nvml_unavailable(f"GPUs {self.indices}: {error}")
            self.close()
            return False
        return True

    def sample(self) -> dict[str, float] | None:
        if not self._handles:
            return None
        try:
            utilisation, memory_percent, memory_mib = [], [], []
            for handle in self._handles:
                utilisation.append(float(self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu))
                memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
                memory_percent.append(100.0 * memory.used / memory.total if memory.total else 0.0)
                memory_mib.append(memory.used / MIB)
        except Exception as error:  # a GPU that fell off the bus: stop sampling, the task goes on
            logger.warning("GPU sampling stopped: %s", error)
            self.close()
            return None
        count = len(self._handles)
        return {
            "gpu_util_percent": round(sum(utilisation) / count, 1),
            "gpu_memory_percent": round(sum(memory_percent) / count, 1),
            "gpu_memory_used_mib": round(sum(memory_mib) / count, 1),
        }

    def close(self) -> None:
        if self._initialised:
            self._initialised = False
            try:
                self._nvml.nvmlShutdown()
            except Exception as error:
                logger.debug("nvmlShutdown: %s", error)
        self._handles = []


# --- the executor -------------------------------------------------------------------------------


class LocalExecutor:
    """Runs an attempt as a local subprocess. `run` blocks until it ends; the caller picks the thread.

    It calls reporter.started() once the process runs, reporter.lines() with what it printed (batched:
    every flush_seconds or flush_lines lines, whichever comes first), reporter.heartbeat() every
    heartbeat_seconds (cancel/preempt → SIGTERM to the process group, SIGKILL after grace_seconds),
    reporter.metrics() with GPU samples every sample_seconds, and reporter.finished(outcome) once,
    before returning the outcome.
    """

    name = "local"

    def __init__(
        self,
        *,
        grace_seconds: float = 30,
        heartbeat_seconds: float = 2,
        sample_seconds: float = 5,
        flush_seconds: float = 0.2,
        flush_lines: int = 100,
        path: str | None = None,
        nvml: ModuleType | None = None,
    ):
        self.grace_seconds = grace_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.sample_seconds = sample_seconds
        self.flush_seconds = flush_seconds
        self.flush_lines = flush_lines
        self.path = path or default_path()  # a deployment may pin the tasks' own PATH
        self.nvml = nvml

    def run(self, launch: TaskLaunch, reporter: Reporter) -> Outcome:
        limits = Limits.for_launch(launch)
        try:
            output_dir(launch).mkdir(parents=True, exist_ok=True)
            process = subprocess.Popen(  # noqa: S603 - the customer's own command, as a CI runner runs it
                ["/bin/bash", "-c", launch.command],
                cwd=launch.workdir,
                env=task_environment(launch, self.path),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                preexec_fn=_preexec(limits.rlimits()),
                close_fds=True,
            )
        except (OSError, subprocess.SubprocessError) as error:
            outcome = Outcome("failed", reason=f"The task could not be started: {error}")
        else:
            attempt = _Attempt(self, launch, reporter, process, limits)
            try:
                outcome = attempt.follow()
            finally:
                attempt.clean_up()
        reporter.finished(outcome)
        return outcome


class _Attempt:
    """One running process being followed: its output, its clocks, how it is being stopped."""

    def __init__(
        self, executor: LocalExecutor, launch: TaskLaunch, reporter: Reporter, process: subprocess.Popen, limits: Limits
    ):
        self.executor = executor
        self.launch = launch
        self.reporter = reporter
        self.process = process
        self.limits = limits
        self.selector = selectors.DefaultSelector()
        self.partial: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        self.pending: list[Line] = []
        self.pending_since = 0.0
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self.stop: str | None = None  # timed_out | cancelled | preempted, once stopping
        self.kill_at: float | None = None
        self.sampler = GpuSampler(launch.gpu_indices, executor.nvml)

    def follow(self) -> Outcome:
        ex = self.executor
        for stream, pipe in (("stdout", self.process.stdout), ("stderr", self.process.stderr)):
            os.set_blocking(pipe.fileno(), False)
            self.selector.register(pipe, selectors.EVENT_READ, stream)
        self.reporter.started()
        sampling = self.sampler.open()
        started = time.monotonic()
        deadline = started + self.launch.max_runtime_seconds
        next_heartbeat = started + ex.heartbeat_seconds
        next_sample = started + ex.sample_seconds
        exited_at: float | None = None
        while True:
            now = time.monotonic()
            wake = [now + EXIT_POLL_SECONDS]  # checking whether the process has ended
            if self.pending:
                wake.append(self.pending_since + ex.flush_seconds)
            if exited_at is None:
                wake.append(next_heartbeat)
                if self.stop is None:
                    wake.append(deadline)
                if self.kill_at is not None:
                    wake.append(self.kill_at)
                if sampling:
                    wake.append(next_sample)
            self._read(self.selector.select(max(0.0, min(wake) - now)))
            now = time.monotonic()
            if self.pending and now - self.pending_since >= ex.flush_seconds:
                self._flush()
            if exited_at is None and self._exited():
                exited_at = now
                # Whatever the task left running in its group goes with it (and frees the GPU).
                self._signal_group(signal.SIGKILL)
                self.process.wait()
                self.kill_at = None
            if exited_at is not None:
                if not self.selector.get_map() or now - exited_at > OUTPUT_DRAIN_SECONDS:
                    break
                continue
            if self.stop is None and now >= deadline:
                self._begin_stop("timed_out", now)
            if now >= next_heartbeat:
                next_heartbeat = now + ex.heartbeat_seconds
                action = self.reporter.heartbeat()  # also while stopping: it says the worker is alive
                if self.stop is None and action in _HEARTBEAT_STOPS:
                    self._begin_stop(_HEARTBEAT_STOPS[action], now)
            if self.kill_at is not None and now >= self.kill_at:
                self._signal_group(signal.SIGKILL)
                self.kill_at = None
            if sampling and now >= next_sample:
                next_sample = now + ex.sample_seconds
                values = self.sampler.sample()
                if values is None:
                    sampling = False
                else:
                    self.reporter.metrics(values)
        self._end_partial_lines()
        self._flush()
        return self._outcome()

    def clean_up(self) -> None:
        """Also after an error (a reporter that raised): no process, pipe or NVML handle outlives run()."""
        if self.process.returncode is None:
            self._signal_group(signal.SIGKILL)
            self.process.wait()
        self.sampler.close()
        self.selector.close()
        for pipe in (self.process.stdout, self.process.stderr):
            pipe.close()

    # --- output -----------------------------------------------------------------------------

    def _read(self, ready) -> None:
        for key, _ in ready:
            stream = key.data
            try:
                chunk = os.read(key.fd, READ_CHUNK)
            except BlockingIOError:
                continue
            if not chunk:
                self.selector.unregister(key.fileobj)
                self._end_partial_line(stream)
                continue
            buffer = self.partial[stream]
            buffer += chunk
            *complete, rest = bytes(buffer).split(b"\n")
            for raw in complete:
                self._add_line(raw, stream)
            # A line rewritten in place (a progress bar: "10%\r20%\r…") keeps only its latest state.
            rewritten = rest.rstrip(b"\r").rfind(b"\r")
            if rewritten >= 0:
                rest = rest[rewritten + 1 :]
            while len(rest) > MAX_LINE_BYTES:
                self._add_line(rest[:MAX_LINE_BYTES], stream)
                rest = rest[MAX_LINE_BYTES:]
            self.partial[stream] = bytearray(rest)

    def _add_line(self, raw: bytes, stream: str) -> None:
        shown = raw.rstrip(b"\r")
        text = shown[shown.rfind(b"\r") + 1 :].decode("utf-8", "replace")  # what a terminal would show
        if not self.pending:
            self.pending_since = time.monotonic()
        self.pending.append(parse_line(text, stream))
        if stream == "stderr":
            self.stderr_tail.append(text)
        if len(self.pending) >= self.executor.flush_lines:
            self._flush()

    def _end_partial_line(self, stream: str) -> None:
        if self.partial[stream]:
            self._add_line(bytes(self.partial[stream]), stream)
            self.partial[stream].clear()

    def _end_partial_lines(self) -> None:
        for stream in self.partial:
            self._end_partial_line(stream)

    def _flush(self) -> None:
        if self.pending:
            lines, self.pending = self.pending, []
            self.reporter.lines(lines)

    # --- the process --------------------------------------------------------------------------

    def _exited(self) -> bool:
        """Whether the task's process has ended, leaving it a zombie: while it is one, its pid (the
        group's id) cannot be reused, so signalling the group cannot reach a stranger."""
        try:
            return os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):  # nobody left in the group
            os.killpg(self.process.pid, signum)

    def _begin_stop(self, stop: str, now: float) -> None:
        self.stop = stop
        self._signal_group(signal.SIGTERM)
        self.kill_at = now + self.executor.grace_seconds

    def _outcome(self) -> Outcome:
        code = self.process.returncode
        exit_code = 128 - code if code < 0 else code  # a signal death reads as a shell reports it
        if self.stop is not None:
            reason = _STOP_REASONS[self.stop].format(limit=self.launch.max_runtime_seconds)
            return Outcome(self.stop, exit_code=exit_code, reason=reason)
        if code == 0:
            return Outcome("succeeded", exit_code=0)
        return Outcome("failed", exit_code=exit_code, reason=self._failure_reason(code))

    def _failure_reason(self, code: int) -> str:
        signum = -code if code < 0 else (code - 128 if 128 < code < 128 + signal.NSIG else None)
        described = _describe_signal(signum, self.limits) if signum else ""
        if code < 0:
            reason = described or f"killed by signal {signum}"
        else:
            reason = f"exited with code {code}" + (f" ({described})" if described else "")
        if any(_OUT_OF_MEMORY.search(line) for line in self.stderr_tail):
            memory = f"{self.launch.memory_gib} GiB ({self.limits.memory_limit_name})"
            reason += f": out of memory, the task may use {memory}"
        return reason


def _describe_signal(signum: int, limits: Limits) -> str:
    try:
        name = signal.Signals(signum).name
    except ValueError:
        return ""
    if signum == signal.SIGKILL:
        return f"killed by {name} (out of memory?)"
    if signum == signal.SIGXCPU:
        return f"killed by {name}: it used up its CPU time limit of {limits.cpu_seconds} seconds"
    if signum == signal.SIGSEGV:
        return f"killed by {name} (a crash; running out of memory can also cause it)"
    return f"killed by {name}"
