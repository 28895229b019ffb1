"""iCaRL on split Fashion-MNIST (class-incremental): its NCM next to its own head, replay and fine-tuning.

Each seed draws the class order of the 5 tasks (2 classes each), the network's initial weights and
the batch order; every method starts from the same weights. The network is the overhead
benchmark's MLP 784-400-400-10, as ``nn.Sequential(backbone, head)``: iCaRL's features are the
backbone's output (400 units after a ReLU). Training goes through each method's plain-PyTorch door
(``train_step``, ``register_task`` at each task's end with the task's data), with Adam and the
command's batch size. After the last task every test sample of the 10 classes is classified among
all 10 (class-incremental), and the table reports the accuracy per seed (mean ± std):

- ``finetune``: cross-entropy, no memory;
- ``replay``: ``ExperienceReplay(memory_size, replay_ratio)``, a reservoir;
- ``icarl head``: iCaRL's network, arg max of its own outputs (its sigmoid head);
- ``icarl ncm``: iCaRL's prediction, the nearest mean of exemplars;
- ``replay ncm`` (diagnostic): NCM over a herded exemplar memory of the *replay* network, chosen
  after training, to tell what the classifier brings from what iCaRL's loss brings.

The docs' table::

    python benchmarks/icarl_fashion_mnist.py --seeds 0 1 2 --epochs 1 --output runs/icarl
    python benchmarks/icarl_fashion_mnist.py --seeds 0 1 2 --epochs 5 --output runs/icarl-5ep
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from neurenix.continual import ExperienceReplay
from neurenix.continual.base import evaluation_mode
from neurenix.continual.exemplars import (
    FeatureExtractor,
    NearestMeanClassifier,
    select_exemplars,
)
from neurenix.continual.icarl import ICaRL
from neurenix.continual.memory import ExemplarMemory
from neurenix.data.benchmarks import split_benchmark

Tasks = list[tuple[Tensor, Tensor]]


def network(seed: int, hidden: int = 400) -> nn.Sequential:
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
    return nn.Sequential(backbone, nn.Linear(hidden, 10))


def tensors(dataset: Any) -> tuple[Tensor, Tensor]:
    return dataset[:]


def accuracy(scores: Callable[[Tensor], Tensor], tests: Tasks) -> list[float]:
    """Accuracy on each task's test set, classes predicted among all output units."""
    result = []
    for x, y in tests:
        with torch.no_grad():
            predicted = torch.cat([scores(chunk).argmax(1) for chunk in x.split(2048)])
        result.append((predicted == y).double().mean().item())
    return result


def train(method: Any, model: nn.Module, trains: Tasks, epochs: int, batch_size: int, lr: float, seed: int) -> None:
    """Every task by ``train_step`` (the plain-PyTorch door), registered with its data at its end."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    remember = isinstance(method, ExperienceReplay)  # its loop stores batches with add_to_memory
    for task_id, (x, y) in enumerate(trains):
        model.train()
        for _ in range(epochs):
            for batch in torch.randperm(x.shape[0], generator=order).split(batch_size):
                method.train_step(optimizer, nn.functional.cross_entropy, x[batch], y[batch], task_id=task_id)
                if remember:
                    method.add_to_memory(x[batch], y[batch], task_id)
        method.register_task(task_id, DataLoader(TensorDataset(x, y), batch_size=1024))


def finetune(model: nn.Module, trains: Tasks, epochs: int, batch_size: int, lr: float, seed: int) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    for x, y in trains:
        model.train()
        for _ in range(epochs):
            for batch in torch.randperm(x.shape[0], generator=order).split(batch_size):
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
                optimizer.step()


def herded_ncm(model: nn.Sequential, trains: Tasks, memory_size: int, seed: int) -> NearestMeanClassifier:
    """NCM over exemplars herded task by task from a finished network (the replay diagnostic)."""
    memory = ExemplarMemory(memory_size, torch.device("cpu"), seed)
    features = FeatureExtractor(model, model[0])
    for task_id, (x, y) in enumerate(trains):
        select_exemplars(memory, features, (x, y), task_id, "herding")
    classifier = NearestMeanClassifier(model, features, memory)
    classifier.update_means()
    return classifier


def run_seed(seed: int, options: argparse.Namespace) -> dict[str, list[float]]:
    benchmark = split_benchmark("fashion_mnist", 5, scenario="class", seed=seed, root=options.data_root)
    trains = [tensors(task) for task in benchmark.train]
    tests = [tensors(task) for task in benchmark.test]
    settings = (options.epochs, options.batch_size, options.lr, seed)
    rows: dict[str, list[float]] = {}
    times: dict[str, float] = {}

    start = time.perf_counter()
    model = network(seed)
    finetune(model, trains, *settings)
    times["finetune"] = time.perf_counter() - start
    rows["finetune"] = accuracy(_eval(model), tests)

    start = time.perf_counter()
    model = network(seed)
    replay = ExperienceReplay(model, memory_size=options.memory, replay_ratio=options.replay_ratio, seed=seed)
    train(replay, model, trains, *settings)
    times["replay"] = time.perf_counter() - start
    rows["replay"] = accuracy(_eval(model), tests)
    rows["replay ncm"] = accuracy(_eval(herded_ncm(model, trains, options.memory, seed), model), tests)

    start = time.perf_counter()
    model = network(seed)
    icarl = ICaRL(model, memory_size=options.memory, feature_extractor=model[0], replay_ratio=options.replay_ratio, seed=seed)
    train(icarl, model, trains, *settings)
    times["icarl"] = time.perf_counter() - start
    rows["icarl head"] = accuracy(_eval(model), tests)
    rows["icarl ncm"] = accuracy(_eval(icarl.classifier, model), tests)
    return {"accuracy_per_task": rows, "wall_time_s": times}


def _eval(scores: Callable[[Tensor], Tensor], model: nn.Module | None = None) -> Callable[[Tensor], Tensor]:
    """``scores`` run with the network in eval mode."""
    network_ = model if model is not None else scores

    def evaluate(x: Tensor) -> Tensor:
        with evaluation_mode(network_):
            return scores(x)

    return evaluate


def main(arguments: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_root", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--memory", type=int, default=2000)
    parser.add_argument("--replay_ratio", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=Path("runs/icarl"))
    options = parser.parse_args(arguments)
    torch.set_num_threads(options.threads)
    options.output.mkdir(parents=True, exist_ok=True)
    per_seed = {}
    for seed in options.seeds:  # each seed's results written as soon as it ends
        per_seed[seed] = run_seed(seed, options)
        (options.output / f"seed{seed}.json").write_text(json.dumps(per_seed[seed], indent=1))
        print(f"seed {seed}: " + ", ".join(f"{name} {statistics.fmean(a):.3f}" for name, a in per_seed[seed]["accuracy_per_task"].items()), flush=True)
    names = list(next(iter(per_seed.values()))["accuracy_per_task"])
    averages = {name: [statistics.fmean(per_seed[s]["accuracy_per_task"][name]) for s in options.seeds] for name in names}
    report = {"options": {k: str(v) for k, v in vars(options).items()}, "per_seed": per_seed, "average_accuracy": averages}
    options.output.mkdir(parents=True, exist_ok=True)
    (options.output / "summary.json").write_text(json.dumps(report, indent=1))
    print(f"| method | average accuracy after 5 tasks (mean ± std, {len(options.seeds)} seeds) | per seed |")
    print("| --- | ---: | --- |")
    for name, values in averages.items():
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {name} | {statistics.fmean(values):.3f} ± {std:.3f} | {', '.join(f'{v:.3f}' for v in values)} |")
    return report


if __name__ == "__main__":
    main()
