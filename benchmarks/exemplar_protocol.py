"""The split Fashion-MNIST protocol that the iCaRL and BiC benchmarks share.

The network (the overhead benchmark's MLP 784-400-400-10 as ``nn.Sequential(backbone, head)``),
the 5 class-incremental tasks of a seed, the training through each method's plain-PyTorch door,
the accuracy over all 10 classes, the command line every such benchmark takes, and the per-seed
files, summary and table it writes. Imported by ``icarl_fashion_mnist.py`` and
``bic_fashion_mnist.py`` (run as scripts, their folder is on ``sys.path``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from neurenix.continual import ExperienceReplay
from neurenix.continual.base import evaluation_mode
from neurenix.data.benchmarks import split_benchmark

Tasks = list[tuple[Tensor, Tensor]]
#: ``(epochs, batch_size, lr, seed)``, as ``train`` and ``finetune`` take them.
Settings = tuple[int, int, float, int]


def network(seed: int, hidden: int = 400) -> nn.Sequential:
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
    return nn.Sequential(backbone, nn.Linear(hidden, 10))


def tensors(dataset: Any) -> tuple[Tensor, Tensor]:
    return dataset[:]


def split_tasks(seed: int, data_root: str) -> tuple[Tasks, Tasks]:
    """The seed's 5 class-incremental tasks of 2 classes: their training and test tensors."""
    benchmark = split_benchmark("fashion_mnist", 5, scenario="class", seed=seed, root=data_root)
    return [tensors(task) for task in benchmark.train], [tensors(task) for task in benchmark.test]


def accuracy(scores: Callable[[Tensor], Tensor], tests: Tasks) -> list[float]:
    """Accuracy on each task's test set, classes predicted among all output units."""
    result = []
    for x, y in tests:
        with torch.no_grad():
            predicted = torch.cat([scores(chunk).argmax(1) for chunk in x.split(2048)])
        result.append((predicted == y).double().mean().item())
    return result


def evaluated(scores: Callable[[Tensor], Tensor], model: Optional[nn.Module] = None) -> Callable[[Tensor], Tensor]:
    """``scores`` run with the network (``model``, else ``scores`` itself) in eval mode."""
    network_ = model if model is not None else scores

    def evaluate(x: Tensor) -> Tensor:
        with evaluation_mode(network_):
            return scores(x)

    return evaluate


def train(method: Any, model: nn.Module, trains: Tasks, epochs: int, batch_size: int, lr: float, seed: int) -> None:
    """Every task by ``train_step`` (the plain-PyTorch door), registered with its data at its end.

    Only a replay memory filled from the stream (no ``selection``) is offered the batches with
    ``add_to_memory``; the others choose their exemplars from the task's data at its end.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    remember = isinstance(method, ExperienceReplay) and method.selection is None
    for task_id, (x, y) in enumerate(trains):
        model.train()
        for _ in range(epochs):
            for batch in torch.randperm(x.shape[0], generator=order).split(batch_size):
                method.train_step(optimizer, nn.functional.cross_entropy, x[batch], y[batch], task_id=task_id)
                if remember:
                    method.add_to_memory(x[batch], y[batch], task_id)
        method.register_task(task_id, DataLoader(TensorDataset(x, y), batch_size=1024))


def finetune(model: nn.Module, trains: Tasks, epochs: int, batch_size: int, lr: float, seed: int) -> None:
    """Cross-entropy on each task in turn, no memory (the lower bound)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    for x, y in trains:
        model.train()
        for _ in range(epochs):
            for batch in torch.randperm(x.shape[0], generator=order).split(batch_size):
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
                optimizer.step()


def trained(build: Callable[[nn.Sequential], Any], trains: Tasks, settings: Settings) -> tuple[nn.Sequential, Any, float]:
    """A fresh seeded network, ``build(network)``'s method trained on it (fine-tuned when ``None``),
    and the seconds both took."""
    start = time.perf_counter()
    model = network(settings[-1])
    method = build(model)
    if method is None:
        finetune(model, trains, *settings)
    else:
        train(method, model, trains, *settings)
    return model, method, time.perf_counter() - start


def argument_parser(
    description: str,
    output: str,
    methods: Optional[list[str]] = None,
    method_options: tuple[tuple[str, type, Any], ...] = (),
) -> argparse.ArgumentParser:
    """The shared command line; ``--methods`` (default ``methods``) when given, and each
    ``(name, type, default)`` of ``method_options`` after ``--replay_ratio``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data_root", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    if methods is not None:
        parser.add_argument("--methods", nargs="+", default=methods)
    parser.add_argument("--memory", type=int, default=2000)
    parser.add_argument("--replay_ratio", type=float, default=0.5)
    for name, kind, default in method_options:
        parser.add_argument(f"--{name}", type=kind, default=default)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=Path(output))
    return parser


def run(options: argparse.Namespace, run_seed: Callable[[int, argparse.Namespace], dict[str, Any]]) -> dict[str, Any]:
    """Every seed by ``run_seed``, each written to ``seed{n}.json`` as soon as it ends, then
    ``summary.json`` and the docs' table (mean ± std over seeds of the average accuracy)."""
    torch.set_num_threads(options.threads)
    options.output.mkdir(parents=True, exist_ok=True)
    per_seed = {}
    for seed in options.seeds:
        per_seed[seed] = run_seed(seed, options)
        (options.output / f"seed{seed}.json").write_text(json.dumps(per_seed[seed], indent=1))
        print(f"seed {seed}: " + ", ".join(f"{name} {statistics.fmean(a):.3f}" for name, a in per_seed[seed]["accuracy_per_task"].items()), flush=True)
    names = list(next(iter(per_seed.values()))["accuracy_per_task"])
    averages = {name: [statistics.fmean(per_seed[s]["accuracy_per_task"][name]) for s in options.seeds] for name in names}
    report = {"options": {k: str(v) for k, v in vars(options).items()}, "per_seed": per_seed, "average_accuracy": averages}
    (options.output / "summary.json").write_text(json.dumps(report, indent=1))
    print(f"| method | average accuracy after 5 tasks (mean ± std, {len(options.seeds)} seeds) | per seed |")
    print("| --- | ---: | --- |")
    for name, values in averages.items():
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {name} | {statistics.fmean(values):.3f} ± {std:.3f} | {', '.join(f'{v:.3f}' for v in values)} |")
    return report
