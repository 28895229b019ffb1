"""Continual learning on real handwritten digits, offline: every method against plain fine-tuning.

scikit-learn's ``load_digits`` (1,797 8×8 images) is split into five tasks of two digits each;
within a task the label is which of its two digits it is (domain-incremental "split digits").
One small MLP learns the tasks one after the other with a Lightning ``Trainer`` per task, with
no method and with each neurenix method as a callback. After the last task, each task's test
accuracy shows what was remembered.

    python examples/split_digits.py [--epochs 4] [--seeds 3]
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from neurenix.continual import (
    EWC,
    ContinualLossMixin,
    ExperienceReplay,
    KnowledgeDistillation,
    L2Regularization,
    SynapticIntelligence,
)

TASKS = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]


class DigitClassifier(ContinualLossMixin, L.LightningModule):
    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 2))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def split_digits(seed: int) -> list[tuple[TensorDataset, TensorDataset]]:
    """(train, test) per task; 80/20 split of each task's samples, inputs scaled to [0, 1]."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    generator = torch.Generator().manual_seed(seed)
    tasks = []
    for first, second in TASKS:
        index = torch.nonzero((y == first) | (y == second)).squeeze(1)
        index = index[torch.randperm(len(index), generator=generator)]
        cut = int(0.8 * len(index))
        labels = (y[index] == second).long()
        tasks.append((TensorDataset(x[index[:cut]], labels[:cut]), TensorDataset(x[index[cut:]], labels[cut:])))
    return tasks


def accuracy(model: nn.Module, dataset: TensorDataset) -> float:
    x, y = dataset.tensors
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def methods_for(module: DigitClassifier) -> dict[str, list]:
    return {
        "none": [],
        "EWC": [EWC(module.net, importance=5000.0, fisher_sample_size=200)],
        "online EWC": [EWC(module.net, importance=5000.0, fisher_sample_size=200, online=True, gamma=0.9)],
        "SI": [SynapticIntelligence(module.net, importance=50.0, xi=0.1)],
        "L2": [L2Regularization(module.net, importance=1.0)],
        "distillation": [KnowledgeDistillation(module.net, temperature=2.0, alpha=0.7)],
        "replay": [ExperienceReplay(module.net, memory_size=200, replay_ratio=1.0)],
    }


def run(name: str, seed: int, epochs: int, tasks) -> tuple[list[float], float]:
    L.seed_everything(seed, verbose=False)
    module = DigitClassifier()
    callbacks = methods_for(module)[name]
    start = time.perf_counter()
    for train, _ in tasks:
        trainer = L.Trainer(
            max_epochs=epochs,
            callbacks=[*callbacks],  # a new list each time: Trainer appends its defaults to it
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, DataLoader(train, batch_size=32, shuffle=True))
    elapsed = time.perf_counter() - start
    return [accuracy(module, test) for _, test in tasks], elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per task (default 4)")
    parser.add_argument("--seeds", type=int, default=3, help="runs per method, seeds 0..N-1, averaged (default 3)")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # one table, no fit banners
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning's, about a newer PyTorch
    for name, value in (("--epochs", args.epochs), ("--seeds", args.seeds)):
        if value < 1:
            parser.error(f"{name} must be >= 1, got {value}")

    splits = [split_digits(seed) for seed in range(args.seeds)]
    print(
        f"Split digits, {len(TASKS)} tasks, {args.epochs} epochs each, mean of {args.seeds} seeds: "
        "test accuracy of each task after the last one"
    )
    print("method".ljust(14) + "".join(f"task {i + 1}".rjust(8) for i in range(len(TASKS))) + "average".rjust(9) + "time".rjust(8))
    for name in methods_for(DigitClassifier()):
        runs = [run(name, seed, args.epochs, tasks) for seed, tasks in enumerate(splits)]
        accuracies = [sum(column) / len(runs) for column in zip(*(accuracies for accuracies, _ in runs))]
        elapsed = sum(seconds for _, seconds in runs) / len(runs)
        row = name.ljust(14) + "".join(f"{a:8.3f}" for a in accuracies)
        print(row + f"{sum(accuracies) / len(accuracies):9.3f}{elapsed:7.1f}s", flush=True)


if __name__ == "__main__":
    main()
