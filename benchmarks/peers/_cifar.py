"""Shared by the CIFAR-10 peer scripts (pfl-research's framework-comparison workload, see
`fedjax_lm/bench/pfl_cifar10.py`): flags, the exported federation, the CNN, evaluation.

The data file (written by `fedjax_lm.bench.pfl_cifar10`) holds uint8 images, labels, the
client partition and the normalisation; a client's images are normalised when it trains, so a
worker holds the uint8 arrays only. The CNN is pfl-research's `simple_cnn` architecture, written
here in PyTorch: conv3x3·32, ReLU, conv3x3·64, ReLU, 2x2 max pool, dropout 0.25, fc128, ReLU,
dropout 0.5, fc10, Glorot-uniform weights and zero biases (as ours).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np
import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", required=True, help=".npz from fedjax_lm.bench.pfl_cifar10")
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--cohort", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--local-lr", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: cores)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


class Federation:
    """The exported arrays; `client(c)` = client c's normalised images (NCHW) and labels."""

    def __init__(self, path: str) -> None:
        with np.load(path) as z:
            self.train_images, self.train_labels = z["train_images"], z["train_labels"]
            self.test_images, self.test_labels = z["test_images"], z["test_labels"]
            self.partition, self.mean, self.std = z["partition"], z["mean"], z["std"]

    def normalize(self, images: np.ndarray) -> torch.Tensor:
        x = (images.astype(np.float32) / 255.0 - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

    def client(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.partition[c]
        return (self.normalize(self.train_images[idx]),
                torch.from_numpy(self.train_labels[idx].astype(np.int64)))

    @property
    def num_clients(self) -> int:
        return len(self.partition)


def simple_cnn() -> torch.nn.Module:
    nn = torch.nn
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Dropout(0.25), nn.Flatten(), nn.Linear(14 * 14 * 64, 128), nn.ReLU(),
        nn.Dropout(0.5), nn.Linear(128, 10))
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def train_local(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                args: argparse.Namespace, generator: torch.Generator) -> None:
    """`local_epochs` epochs of SGD over the client's data in shuffled batches."""
    opt = torch.optim.SGD(model.parameters(), lr=args.local_lr)
    model.train()
    for _ in range(args.local_epochs):
        order = torch.randperm(len(labels), generator=generator)
        for s in range(0, len(labels), args.batch_size):
            b = order[s:s + args.batch_size]
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(images[b]), labels[b]).backward()
            opt.step()


@torch.no_grad()
def evaluate(model: torch.nn.Module, fed: Federation, batch: int = 1000) -> tuple[float, float]:
    """(accuracy, mean loss) on the whole test set."""
    model.eval()
    correct = loss = 0.0
    for s in range(0, len(fed.test_labels), batch):
        x = fed.normalize(fed.test_images[s:s + batch])
        y = torch.from_numpy(fed.test_labels[s:s + batch].astype(np.int64))
        out = model(x)
        loss += float(torch.nn.functional.cross_entropy(out, y, reduction="sum"))
        correct += float((out.argmax(1) == y).sum())
    return correct / len(fed.test_labels), loss / len(fed.test_labels)


class Tracker:
    """Round times (training only) and evaluations with the training wall time so far."""

    def __init__(self, framework: str, args: argparse.Namespace, fed: Federation) -> None:
        self.framework, self.args, self.fed = framework, args, fed
        self.round_times: list[float] = []
        self.evals: list[dict[str, float]] = []

    def end_round(self, seconds: float, model: torch.nn.Module) -> None:
        self.round_times.append(seconds)
        r = len(self.round_times)
        if r % self.args.eval_every == 0 or r == self.args.rounds:
            acc, loss = evaluate(model, self.fed)
            self.evals.append({"round": r, "accuracy": acc, "loss": loss,
                               "train_s": sum(self.round_times)})
            print(f"[{self.framework}] round {r}: accuracy {acc:.4f} loss {loss:.4f} "
                  f"train {sum(self.round_times):.1f}s", file=sys.stderr, flush=True)

    def emit(self, **extra: Any) -> None:
        sys.stdout.write(json.dumps({
            "framework": self.framework, "round_times_s": self.round_times,
            "evals": self.evals, "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__, "loadavg": os.getloadavg(), **extra}) + "\n")
        sys.stdout.flush()


def now() -> float:
    return time.perf_counter()
