"""Example tasks for the submission form: real programs that speak the progress protocol.

Each command carries its script inline (a quoted here-document fed to `python3 -`), so it runs the same
on the local executor and in any cluster image that has python3, without the portal's files."""

from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parent
_DELIMITER = "PORTAL_EXAMPLE"


def inline_python(script: str, arguments: str = "") -> str:
    """A shell command that runs `script` (a file in this folder) with python3, the code inline."""
    code = (EXAMPLES_DIR / script).read_text()
    if _DELIMITER in code:
        raise ValueError(f"{script} contains the here-document delimiter {_DELIMITER}.")
    head = f"python3 - {arguments}".rstrip()
    return f"{head} <<'{_DELIMITER}'\n{code}{_DELIMITER}\n"


EXAMPLES = {
    "train": {
        "name": "train-mnist-like",
        "framework": "pytorch",
        "image": "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime",
        "description": (
            "Trains a classifier and reports progress, loss and accuracy every epoch, then writes "
            "results.json to $PORTAL_OUTPUT_DIR. On a GPU it trains an MLP with PyTorch for about "
            "30 seconds of real matrix work; without one, a tiny MLP in pure Python."
        ),
        "command": inline_python("train_mnist_like.py", "--epochs 20 --seconds 30"),
        "max_runtime_seconds": 600,
    },
    "fail": {
        "name": "failing-task",
        "framework": "custom",
        "image": "python:3.12-slim",
        "description": "Reports some progress, then fails with a Python exception (exit code 1).",
        "command": inline_python("failing_task.py"),
        "max_runtime_seconds": 300,
    },
}
