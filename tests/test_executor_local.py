"""The local executor with real subprocesses: output protocol and batching, environment, limits, stopping,
GPU sampling (a fake NVML everywhere, the real one where a GPU and its driver are present).

Needs no database and no Django, so it also runs on a GPU machine that has only PyTorch."""

import json
import shlex
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from hosting.examples import EXAMPLES, inline_python
from hosting.executors.base import Line, Outcome, TaskLaunch
from hosting.executors.local import GIB, GpuSampler, Limits, LocalExecutor

PY = shlex.quote(sys.executable)
TASK_ID = "3f2a9c1e-5b7d-4e21-9a0c-1d2e3f405162"


class RecordingReporter:
    """Records every call; heartbeat() answers from `actions` in turn, then None."""

    def __init__(self, actions: list[str | None] | None = None):
        self.calls: list[str] = []
        self.batches: list[list[Line]] = []
        self.samples: list[dict[str, float]] = []
        self.outcomes: list[Outcome] = []
        self.heartbeats = 0
        self._actions = list(actions or [])

    def started(self) -> None:
        self.calls.append("started")

    def lines(self, lines: list[Line]) -> None:
        self.calls.append("lines")
        self.batches.append(list(lines))

    def metrics(self, values: dict[str, float]) -> None:
        self.calls.append("metrics")
        self.samples.append(dict(values))

    def heartbeat(self) -> str | None:
        self.heartbeats += 1
        return self._actions.pop(0) if self._actions else None

    def finished(self, outcome: Outcome) -> None:
        self.calls.append("finished")
        self.outcomes.append(outcome)

    @property
    def received(self) -> list[Line]:
        return [line for batch in self.batches for line in batch]

    def logs(self, stream: str) -> list[str]:
        return [line.text for line in self.received if line.kind == "log" and line.stream == stream]

    def progress(self) -> list[int]:
        return [line.progress for line in self.received if line.kind == "progress"]

    def metric(self, name: str) -> list[float]:
        return [line.metric[1] for line in self.received if line.kind == "metric" and line.metric[0] == name]


def launch(tmp_path: Path, command: str, **overrides) -> TaskLaunch:
    values = {
        "task_id": TASK_ID,
        "attempt": 1,
        "tenant_slug": "acme",
        "namespace": "t-acme",
        "tier": "standard",
        "name": "test task",
        "image": "python:3.12-slim",
        "command": command,
        "env": {},
        "gpu_model_resource": "",
        "gpus": 0,
        "vgpu_slices": 0,
        "gpu_indices": [],
        "vcpus": 1,
        "memory_gib": 1,
        "max_runtime_seconds": 30,
        "workdir": tmp_path / "attempt-1",
    }
    values.update(overrides)
    return TaskLaunch(**values)


def run(tmp_path: Path, command: str, *, executor: LocalExecutor | None = None, actions=None, **overrides):
    reporter = RecordingReporter(actions)
    executor = executor or LocalExecutor(grace_seconds=1, heartbeat_seconds=0.1)
    started = time.monotonic()
    outcome = executor.run(launch(tmp_path, command, **overrides), reporter)
    return outcome, reporter, time.monotonic() - started


# --- the progress protocol and batching ---------------------------------------------------------------


def test_progress_metrics_and_logs_are_parsed_and_stderr_is_log(tmp_path):
    command = (
        "echo '##progress 40'; echo '##metric loss=0.25'; echo 'hello world'; "
        "echo '##progress 99' >&2; echo 'a warning' >&2; echo '##metric name=not-a-number'"
    )
    outcome, reporter, _ = run(tmp_path, command)

    assert outcome == Outcome("succeeded", exit_code=0)
    assert reporter.calls[0] == "started" and reporter.calls[-1] == "finished"
    assert reporter.outcomes == [outcome]
    stdout = [line for line in reporter.received if line.stream == "stdout"]
    assert stdout == [
        Line(kind="progress", stream="stdout", progress=40),
        Line(kind="metric", stream="stdout", metric=("loss", 0.25)),
        Line(kind="log", stream="stdout", text="hello world"),
        Line(kind="log", stream="stdout", text="##metric name=not-a-number"),
    ]
    # On stderr the protocol does not apply: everything is a log line.
    assert reporter.logs("stderr") == ["##progress 99", "a warning"]


def test_hundreds_of_lines_arrive_in_batches_in_order_none_lost_or_repeated(tmp_path):
    command = (
        f'{PY} -c \'import sys\nfor i in range(1500): print(f"line {{i}}"); print(f"err {{i}}", file=sys.stderr)\''
    )
    outcome, reporter, elapsed = run(tmp_path, command)

    assert outcome.status == "succeeded"
    assert reporter.logs("stdout") == [f"line {i}" for i in range(1500)]
    assert reporter.logs("stderr") == [f"err {i}" for i in range(1500)]
    sizes = [len(batch) for batch in reporter.batches]
    assert max(sizes) == 100  # a chatty task is reported in batches of at most 100 lines …
    assert len(sizes) <= 3000 / 100 + 10  # … not one call per line
    assert elapsed < 5


def test_a_quiet_task_is_reported_within_the_flush_interval_and_the_last_line_is_kept(tmp_path):
    command = "echo first; sleep 0.6; printf 'second\\nlast line without a newline'"
    outcome, reporter, _ = run(tmp_path, command)

    assert outcome.status == "succeeded"
    assert [[line.text for line in batch] for batch in reporter.batches] == [
        ["first"],  # flushed while the task slept, not at its end
        ["second", "last line without a newline"],
    ]


def test_a_progress_bar_redrawn_with_carriage_returns_is_one_line_in_its_last_state(tmp_path):
    command = "for i in 1 2 3; do printf 'epoch %s/3 [%s]\\r' $i $i >&2; sleep 0.01; done; printf '\\n' >&2; echo ok"
    outcome, reporter, _ = run(tmp_path, command)

    assert outcome.status == "succeeded"
    assert reporter.logs("stderr") == ["epoch 3/3 [3]"]
    assert reporter.logs("stdout") == ["ok"]


def test_processes_left_behind_are_ended_with_the_task(tmp_path):
    marker = tmp_path / "stray-survived"
    command = f"(sleep 0.6; touch {shlex.quote(str(marker))}) & echo done"
    outcome, reporter, elapsed = run(tmp_path, command)

    assert outcome.status == "succeeded"
    assert reporter.logs("stdout") == ["done"]
    assert elapsed < 1.5  # the stray held stdout open: it was killed, not waited for (2 s)
    time.sleep(0.8)
    assert not marker.exists()


# --- environment and working directory -------------------------------------------------------------


def test_environment_is_clean_and_carries_the_gpus_the_task_and_its_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("PORTAL_WORKER_SECRET", "must-not-leak")
    command = (
        'echo "cuda=[$CUDA_VISIBLE_DEVICES] order=$CUDA_DEVICE_ORDER"; echo "home=$HOME"; echo "pwd=$(pwd)"; '
        'echo "task=$PORTAL_TASK_ID"; echo "output=$PORTAL_OUTPUT_DIR"; echo "input=$PORTAL_INPUT"; '
        'echo "own=$EPOCHS unbuffered=$PYTHONUNBUFFERED"; echo "secret=${PORTAL_WORKER_SECRET:-unset}"'
    )
    outcome, reporter, _ = run(
        tmp_path,
        command,
        gpu_indices=[2, 3],
        env={"EPOCHS": "5", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"},
        input_url="s3://bucket/data.tar",
    )

    workdir = tmp_path / "attempt-1"
    assert outcome.status == "succeeded"
    assert reporter.logs("stdout") == [
        "cuda=[2,3] order=PCI_BUS_ID",  # the portal's assignment wins over the task's own variable
        f"home={workdir}",
        f"pwd={workdir}",
        f"task={TASK_ID}",
        f"output={workdir / 'output'}",
        "input=s3://bucket/data.tar",
        "own=5 unbuffered=1",
        "secret=unset",
    ]


def test_a_cpu_task_sees_no_gpu(tmp_path):
    outcome, reporter, _ = run(tmp_path, 'echo "cuda=[${CUDA_VISIBLE_DEVICES-unset}]"')
    assert outcome.status == "succeeded"
    assert reporter.logs("stdout") == ["cuda=[]"]  # set and empty: CUDA shows no device at all


def test_results_land_in_the_output_folder_and_an_uploaded_input_is_named(tmp_path):
    data = tmp_path / "input.csv"
    data.write_text("1,2,3\n")
    command = 'cp "$PORTAL_INPUT" "$PORTAL_OUTPUT_DIR/copy.csv" && echo 42 > "$PORTAL_OUTPUT_DIR/answer.txt"'
    outcome, _, _ = run(tmp_path, command, input_path=data)

    assert outcome.status == "succeeded"
    output = tmp_path / "attempt-1" / "output"
    assert (output / "answer.txt").read_text() == "42\n"
    assert (output / "copy.csv").read_text() == "1,2,3\n"


# --- exit codes and limits ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "exit_code", "reason"),
    [
        ("exit 3", 3, "exited with code 3"),
        ("kill -KILL $$", 137, "killed by SIGKILL (out of memory?)"),
        ("sleep 5 & kill -SEGV $!; wait $!", 139, "exited with code 139 (killed by SIGSEGV"),
    ],
)
def test_a_non_zero_exit_fails_with_the_code_and_a_reason(tmp_path, command, exit_code, reason):
    outcome, _, _ = run(tmp_path, command)
    assert outcome.status == "failed"
    assert outcome.exit_code == exit_code
    assert outcome.reason.startswith(reason)


def test_limits_follow_the_launch():
    cpu = Limits.for_launch(launch(Path("/tmp"), "true", vcpus=4, memory_gib=8, max_runtime_seconds=600))
    assert cpu.cpu_seconds == 600 * 4 + 60
    assert 8 * GIB < cpu.memory_bytes <= 8 * GIB + GIB + 4 * 128 * 2**20
    assert cpu.memory_limit_name == "RLIMIT_AS"
    gpu = Limits.for_launch(launch(Path("/tmp"), "true", gpu_indices=[0], memory_gib=8))
    assert gpu.memory_limit_name == "RLIMIT_DATA"  # CUDA reserves address space far beyond memory


def test_the_limits_are_set_in_the_task(tmp_path):
    outcome, reporter, _ = run(
        tmp_path, 'echo "$(ulimit -t) $(ulimit -v) $(ulimit -d) $(ulimit -n)"', vcpus=2, max_runtime_seconds=100
    )
    limits = Limits.for_launch(launch(tmp_path, "", vcpus=2, max_runtime_seconds=100))
    assert outcome.status == "succeeded"
    cpu, address_space, data, files = reporter.logs("stdout")[0].split()
    assert int(cpu) == 100 * 2 + 60
    assert int(address_space) * 1024 == limits.memory_bytes
    assert data == "unlimited"
    assert int(files) <= 4096


def test_a_task_that_allocates_more_than_its_memory_fails_with_a_clear_reason(tmp_path):
    command = f"{PY} -c 'data = bytearray(4 * 1024**3)'"
    outcome, reporter, elapsed = run(tmp_path, command, memory_gib=1)

    assert outcome.status == "failed"
    assert outcome.exit_code == 1
    assert "out of memory" in outcome.reason and "1 GiB" in outcome.reason
    assert reporter.logs("stderr")[-1] == "MemoryError"
    assert elapsed < 5  # refused at once, nothing was touched


# --- stopping ----------------------------------------------------------------------------------------


def test_time_limit_sends_sigterm_first_and_a_task_that_exits_on_it_ends_at_once(tmp_path):
    command = "trap 'echo \"got TERM\"; exit 0' TERM; echo working; while true; do sleep 0.05; done"
    outcome, reporter, elapsed = run(tmp_path, command, max_runtime_seconds=1)

    assert outcome.status == "timed_out"
    assert outcome.reason == "Stopped at its time limit of 1 seconds."
    assert reporter.logs("stdout") == ["working", "got TERM"]
    assert 1 <= elapsed < 1.9  # no grace period (1 s) waited out


def test_time_limit_kills_a_task_that_ignores_sigterm_after_the_grace_period(tmp_path):
    command = "trap 'echo \"got TERM, carrying on\"' TERM; while true; do sleep 0.05; done"
    executor = LocalExecutor(grace_seconds=0.5, heartbeat_seconds=0.1)
    outcome, reporter, elapsed = run(tmp_path, command, executor=executor, max_runtime_seconds=1)

    assert outcome.status == "timed_out"
    assert outcome.exit_code == 137  # SIGKILL
    assert reporter.logs("stdout") == ["got TERM, carrying on"]
    assert 1.5 <= elapsed < 3


@pytest.mark.parametrize(("action", "status"), [("cancel", "cancelled"), ("preempt", "preempted")])
def test_heartbeat_cancel_or_preempt_stops_the_task(tmp_path, action, status):
    command = "trap 'echo \"saving a checkpoint\"; exit 0' TERM; echo started; sleep 30 & wait"
    outcome, reporter, elapsed = run(tmp_path, command, actions=[None, action])

    assert outcome.status == status
    assert reporter.logs("stdout") == ["started", "saving a checkpoint"]
    assert reporter.heartbeats >= 2
    assert elapsed < 1.5  # the task exited on SIGTERM: no grace period (1 s) waited out


# --- the example tasks -------------------------------------------------------------------------------------


def test_the_training_example_completes_with_falling_loss_and_writes_results(tmp_path):
    outcome, reporter, elapsed = run(tmp_path, EXAMPLES["train"]["command"])

    assert outcome.status == "succeeded", reporter.logs("stderr")
    progress = reporter.progress()
    assert progress == sorted(progress) and progress[-1] == 100
    losses = reporter.metric("loss")
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 * 0.6
    assert reporter.metric("accuracy")[-1] > 0.85
    results = json.loads((tmp_path / "attempt-1" / "output" / "results.json").read_text())
    assert results["device"] == "cpu" and results["final_loss"] == pytest.approx(losses[-1], abs=1e-6)
    assert elapsed < 5


def test_the_failing_example_reports_progress_then_fails(tmp_path):
    outcome, reporter, _ = run(tmp_path, EXAMPLES["fail"]["command"])

    assert outcome == Outcome("failed", exit_code=1, reason="exited with code 1")
    assert reporter.progress() == [10, 20, 30]
    assert reporter.logs("stderr")[-1].startswith("RuntimeError: shard 3")


# --- GPU sampling ----------------------------------------------------------------------------------------


def fake_nvml(gpus: dict[int, tuple[int, int, int]], *, init_error: Exception | None = None) -> SimpleNamespace:
    """A stand-in for pynvml: index → (utilisation %, MiB used, MiB total)."""
    state = SimpleNamespace(inits=0, shutdowns=0)

    def init():
        if init_error:
            raise init_error
        state.inits += 1

    def shutdown():
        state.shutdowns += 1

    def handle(index):
        return gpus[index]

    def utilisation(handle):
        return SimpleNamespace(gpu=handle[0], memory=0)

    def memory(handle):
        return SimpleNamespace(used=handle[1] * 2**20, total=handle[2] * 2**20, free=(handle[2] - handle[1]) * 2**20)

    return SimpleNamespace(
        state=state,
        nvmlInit=init,
        nvmlShutdown=shutdown,
        nvmlDeviceGetHandleByIndex=handle,
        nvmlDeviceGetUtilizationRates=utilisation,
        nvmlDeviceGetMemoryInfo=memory,
    )


def test_gpu_sampler_averages_the_assigned_gpus():
    nvml = fake_nvml({0: (99, 1, 10), 1: (50, 1024, 4096), 3: (70, 3072, 4096)})
    sampler = GpuSampler([1, 3], nvml)

    assert sampler.open()
    assert sampler.sample() == {"gpu_util_percent": 60.0, "gpu_memory_percent": 50.0, "gpu_memory_used_mib": 2048.0}
    sampler.close()
    assert (nvml.state.inits, nvml.state.shutdowns) == (1, 1)
    assert sampler.sample() is None


def test_gpu_sampler_turns_itself_off_without_nvml(caplog):
    nvml = fake_nvml({}, init_error=RuntimeError("NVML Shared Library Not Found"))
    sampler = GpuSampler([0], nvml)

    assert not sampler.open()
    assert sampler.sample() is None
    sampler.close()
    assert nvml.state.shutdowns == 0
    assert not GpuSampler([], fake_nvml({})).open()  # a CPU task samples nothing


def test_the_executor_reports_gpu_samples_while_the_task_runs(tmp_path):
    nvml = fake_nvml({0: (80, 2048, 8192)})
    executor = LocalExecutor(grace_seconds=1, heartbeat_seconds=0.1, sample_seconds=0.1, nvml=nvml)
    outcome, reporter, _ = run(tmp_path, "sleep 0.45", executor=executor, gpu_indices=[0])

    assert outcome.status == "succeeded"
    assert 3 <= len(reporter.samples) <= 5
    assert reporter.samples[0] == {"gpu_util_percent": 80.0, "gpu_memory_percent": 25.0, "gpu_memory_used_mib": 2048.0}
    assert nvml.state.shutdowns == 1


def _real_nvml():
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    pynvml.nvmlShutdown()
    return pynvml


def test_real_nvml_is_sampled_where_there_is_a_gpu():
    nvml = _real_nvml()
    if nvml is None:
        pytest.skip("no NVIDIA GPU/driver here: NVML unavailable")
    sampler = GpuSampler([0])  # imports pynvml itself

    assert sampler.open()
    values = sampler.sample()
    sampler.close()
    assert 0 <= values["gpu_util_percent"] <= 100
    assert 0 < values["gpu_memory_percent"] <= 100
    assert values["gpu_memory_used_mib"] > 0


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda_available(), reason="no CUDA GPU with PyTorch here")
def test_the_training_example_trains_on_the_gpu(tmp_path):
    executor = LocalExecutor(grace_seconds=5, heartbeat_seconds=0.5, sample_seconds=0.5)
    command = inline_python("train_mnist_like.py", "--epochs 5 --seconds 5")
    outcome, reporter, _ = run(tmp_path, command, executor=executor, gpu_indices=[0], memory_gib=16, vcpus=4)

    assert outcome.status == "succeeded", reporter.logs("stderr")[-20:]
    assert reporter.progress()[-1] == 100
    losses = reporter.metric("loss")
    assert losses[-1] < losses[0]
    assert min(reporter.metric("tflops")) > 1
    assert any(text.startswith("##metric gpu_name=") for text in reporter.logs("stdout"))
    results = json.loads((tmp_path / "attempt-1" / "output" / "results.json").read_text())
    assert results["device"] != "cpu"
    if _real_nvml() is not None:
        assert max(sample["gpu_util_percent"] for sample in reporter.samples) > 0
