"""Continual learning in a plain PyTorch loop: every method through ``train_step``, no Lightning.

    python examples/plain_pytorch.py              # split digits, 5 tasks, 4 epochs per task
    python examples/plain_pytorch.py --fast       # CI: 1 epoch per task
    python examples/plain_pytorch.py --methods none ewc replay --epochs 8

The Neurenix continual-learning API (docs/continual-api.md), in a loop you own. Per task, the same three lines for
every method:

    method.register_task(task_id, dataloader=loader)      # EWC reads the task's data here
    for inputs, targets in loader:
        method.train_step(optimizer, loss_fn, inputs, targets, task_id=task_id)

(plus ``method.add_to_memory(inputs, targets, task_id=task_id)`` for experience replay, which
offers each batch to the memory after it is trained on). A new ``task_id`` consolidates the
previous task at the parameters it ended with.

Data: scikit-learn's 8x8 handwritten digits (offline), five tasks of two digits each sharing
one two-way output layer (domain-incremental). Each method, and plain fine-tuning ("none"),
trains the same MLP from the same seed on the same batches; the table gives every task's test
accuracy after the last task. One seed is one sample: differences of a few points are noise.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader

from neurenix.continual import EWC, ExperienceReplay, KnowledgeDistillation, L2Regularization, SynapticIntelligence
from neurenix.data import collate_batch, split_benchmark

#: Hyper-parameters as the ``neurenix`` command's defaults (chosen on other seeds of this benchmark).
METHODS = {
    "none": None,
    "ewc": lambda model: EWC(model, importance=2000.0, fisher_sample_size=200),
    "si": lambda model: SynapticIntelligence(model, importance=200.0, xi=0.1),
    "l2": lambda model: L2Regularization(model, importance=1.0),
    "distillation": lambda model: KnowledgeDistillation(model, temperature=2.0, alpha=0.7),
    "replay": lambda model: ExperienceReplay(model, memory_size=200, replay_ratio=1.0),
}


def make_model(inputs: int, classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(inputs, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, classes))


@torch.no_grad()
def accuracy(model: nn.Module, dataset) -> float:
    model.eval()
    inputs, targets = dataset[:]
    correct = (model(inputs).argmax(dim=1) == targets).double().mean().item()
    model.train()
    return correct


def train_sequence(name: str, benchmark, epochs: int, seed: int) -> list[float]:
    """Train the tasks in order with method ``name``; each task's test accuracy after the last."""
    torch.manual_seed(seed)  # the same initialization and batch order for every method
    model = make_model(benchmark.input_shape[0], benchmark.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    method = METHODS[name](model) if METHODS[name] is not None else None
    for task_id, task in enumerate(benchmark.train):
        loader = DataLoader(task, batch_size=32, shuffle=True, collate_fn=collate_batch)
        if method is not None:
            method.register_task(task_id, dataloader=loader)
        for _ in range(epochs):
            for inputs, targets in loader:
                if method is None:  # plain fine-tuning: the loop train_step replaces
                    optimizer.zero_grad()
                    loss_fn(model(inputs), targets).backward()
                    optimizer.step()
                    continue
                method.train_step(optimizer, loss_fn, inputs, targets, task_id=task_id)
                if isinstance(method, ExperienceReplay):
                    method.add_to_memory(inputs, targets, task_id=task_id)
    return [accuracy(model, test) for test in benchmark.test]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods to run")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per task (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the class order, initialization and batches")
    parser.add_argument("--fast", action="store_true", help="a smoke run: 1 epoch per task")
    args = parser.parse_args()
    epochs = 1 if args.fast else args.epochs
    torch.set_num_threads(1)  # fastest for a small MLP, and polite on a shared machine

    benchmark = split_benchmark("digits", num_tasks=5, scenario="domain", seed=args.seed)
    classes = " | ".join(",".join(map(str, group)) for group in benchmark.task_classes)
    print(f"split digits, domain-incremental, 5 tasks (digits {classes}), {epochs} epoch(s) per task, seed {args.seed}")
    print("accuracy on each task after the last one:")
    print(f"{'method':<14}" + "".join(f"{f'task {t}':>8}" for t in range(benchmark.num_tasks)) + f"{'average':>9}{'time':>8}")
    for name in args.methods:
        start = time.perf_counter()
        accuracies = train_sequence(name, benchmark, epochs, args.seed)
        row = "".join(f"{a:>8.3f}" for a in accuracies)
        print(f"{name:<14}{row}{sum(accuracies) / len(accuracies):>9.3f}{time.perf_counter() - start:>7.1f}s")


if __name__ == "__main__":
    main()
