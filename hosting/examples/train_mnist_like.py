"""A small, real training run that speaks the portal's progress protocol (DESIGN.md section 6).

Each epoch it prints `##progress N`, `##metric loss=…` and `##metric accuracy=…`, and at the end it
writes results.json into $PORTAL_OUTPUT_DIR.

- With PyTorch and a CUDA GPU: a multi-layer perceptron (1024 → 8192 → 8192 → 10, bfloat16 autocast)
  learns to imitate a random linear "teacher" on fresh synthetic batches, for about --seconds in all:
  large matrix products on the GPU, with the achieved TFLOP/s as a metric.
- Otherwise, in pure Python (standard library only): a tiny MLP (2 → 12 → 1) learns to separate two
  interleaved half-moons by mini-batch gradient descent with hand-written backpropagation.
"""

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=30.0, help="GPU only: about how long to train in all")
    parser.add_argument("--cpu", action="store_true", help="train in pure Python even where a GPU is available")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    output = Path(os.environ.get("PORTAL_OUTPUT_DIR") or "output")
    output.mkdir(parents=True, exist_ok=True)

    torch = None if args.cpu else _cuda_torch()
    result = train_on_gpu(torch, args) if torch is not None else train_in_python(args)
    path = output / "results.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results written to {path}")
    return 0


def _report(epoch: int, epochs: int, loss: float, accuracy: float, **extra: float) -> None:
    print(f"##progress {round(100 * epoch / epochs)}")
    print(f"##metric loss={loss:.6f}")
    print(f"##metric accuracy={accuracy:.4f}")
    for name, value in extra.items():
        print(f"##metric {name}={value:.4f}")
    print(f"epoch {epoch}/{epochs}: loss {loss:.4f}, accuracy {accuracy:.3f}", flush=True)


# --- pure Python ------------------------------------------------------------------------------------


def half_moons(count: int, rng: random.Random, noise: float = 0.15) -> list[tuple[float, float, int]]:
    points = []
    for index in range(count):
        label = index % 2
        angle = rng.uniform(0.0, math.pi)
        if label == 0:
            x, y = math.cos(angle), math.sin(angle)
        else:
            x, y = 1.0 - math.cos(angle), 0.5 - math.sin(angle)
        points.append((x + rng.gauss(0.0, noise), y + rng.gauss(0.0, noise), label))
    return points


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


class TinyMlp:
    """2 inputs → `hidden` tanh units → 1 sigmoid output, trained on binary cross-entropy."""

    def __init__(self, hidden: int, rng: random.Random):
        scale = 1.0 / math.sqrt(2)
        self.w1 = [[rng.gauss(0.0, scale) for _ in range(2)] for _ in range(hidden)]
        self.b1 = [0.0] * hidden
        self.w2 = [rng.gauss(0.0, 1.0 / math.sqrt(hidden)) for _ in range(hidden)]
        self.b2 = 0.0

    def forward(self, x: float, y: float) -> tuple[list[float], float]:
        hidden = [math.tanh(w[0] * x + w[1] * y + b) for w, b in zip(self.w1, self.b1, strict=True)]
        return hidden, _sigmoid(sum(w * h for w, h in zip(self.w2, hidden, strict=True)) + self.b2)

    def step(self, batch: list[tuple[float, float, int]], learning_rate: float) -> float:
        """One gradient-descent step on the batch; returns its mean loss."""
        size = len(batch)
        g_w1 = [[0.0, 0.0] for _ in self.w1]
        g_b1 = [0.0] * len(self.b1)
        g_w2 = [0.0] * len(self.w2)
        g_b2 = 0.0
        loss = 0.0
        for x, y, label in batch:
            hidden, p = self.forward(x, y)
            p = min(max(p, 1e-12), 1.0 - 1e-12)
            loss -= math.log(p) if label else math.log(1.0 - p)
            d_out = p - label  # d loss / d pre-sigmoid
            g_b2 += d_out
            for j, h in enumerate(hidden):
                g_w2[j] += d_out * h
                d_hidden = d_out * self.w2[j] * (1.0 - h * h)
                g_w1[j][0] += d_hidden * x
                g_w1[j][1] += d_hidden * y
                g_b1[j] += d_hidden
        rate = learning_rate / size
        for j in range(len(self.w1)):
            self.w1[j][0] -= rate * g_w1[j][0]
            self.w1[j][1] -= rate * g_w1[j][1]
            self.b1[j] -= rate * g_b1[j]
            self.w2[j] -= rate * g_w2[j]
        self.b2 -= rate * g_b2
        return loss / size

    def accuracy(self, points: list[tuple[float, float, int]]) -> float:
        right = sum(1 for x, y, label in points if (self.forward(x, y)[1] >= 0.5) == bool(label))
        return right / len(points)


def train_in_python(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)  # noqa: S311 - synthetic data, not security
    train, test = half_moons(300, rng), half_moons(200, rng)
    model = TinyMlp(hidden=12, rng=rng)
    print(f"training a 2-12-1 MLP in pure Python (Python {sys.version.split()[0]}), {args.epochs} epochs")
    history = []
    started = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        rng.shuffle(train)
        losses = [model.step(train[i : i + 20], learning_rate=1.0) for i in range(0, len(train), 20)]
        loss, accuracy = sum(losses) / len(losses), model.accuracy(test)
        history.append({"epoch": epoch, "loss": loss, "accuracy": accuracy})
        _report(epoch, args.epochs, loss, accuracy)
    return {
        "device": "cpu",
        "framework": "python",
        "epochs": args.epochs,
        "seconds": round(time.perf_counter() - started, 3),
        "final_loss": history[-1]["loss"],
        "final_accuracy": history[-1]["accuracy"],
        "history": history,
    }


# --- PyTorch on a GPU -------------------------------------------------------------------------------


def _cuda_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def train_on_gpu(torch, args: argparse.Namespace) -> dict:
    device = torch.device("cuda")
    gpu_name = torch.cuda.get_device_name(device)
    print(f"##metric gpu_name={gpu_name}")  # not a number: the portal keeps it as a log line
    print(f"training on {gpu_name} with PyTorch {torch.__version__}, about {args.seconds:g} s", flush=True)
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    inputs, width, classes, batch = 1024, 8192, 10, 4096
    teacher = torch.randn(inputs, classes, device=device)

    def make_batch(size: int):
        x = torch.randn(size, inputs, device=device)
        return x, (x @ teacher).argmax(dim=1)

    model = torch.nn.Sequential(
        torch.nn.Linear(inputs, width),
        torch.nn.GELU(),
        torch.nn.Linear(width, width),
        torch.nn.GELU(),
        torch.nn.Linear(width, classes),
    ).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-4)
    parameters = sum(p.numel() for p in model.parameters())
    flops_per_step = 6 * batch * parameters  # forward and backward through the linear layers
    x_test, y_test = make_batch(8192)
    per_epoch = args.seconds / args.epochs
    history = []
    started = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        epoch_started = time.perf_counter()
        steps, loss_sum = 0, torch.zeros((), device=device)
        while True:
            x, y = make_batch(batch)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            loss_sum += loss.detach()
            steps += 1
            if steps % 10 == 0:
                torch.cuda.synchronize()
                if time.perf_counter() - epoch_started >= per_epoch:
                    break
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            accuracy = (model(x_test).argmax(dim=1) == y_test).float().mean().item()
        elapsed = time.perf_counter() - epoch_started
        mean_loss = (loss_sum / steps).item()
        tflops = steps * flops_per_step / elapsed / 1e12
        history.append({"epoch": epoch, "loss": mean_loss, "accuracy": accuracy, "steps": steps, "tflops": tflops})
        _report(epoch, args.epochs, mean_loss, accuracy, tflops=tflops)
    return {
        "device": gpu_name,
        "framework": f"torch {torch.__version__}",
        "epochs": args.epochs,
        "parameters": parameters,
        "seconds": round(time.perf_counter() - started, 3),
        "max_memory_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3),
        "final_loss": history[-1]["loss"],
        "final_accuracy": history[-1]["accuracy"],
        "history": history,
    }


if __name__ == "__main__":
    sys.exit(main())
