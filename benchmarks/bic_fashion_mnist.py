"""BiC on split Fashion-MNIST (class-incremental): its corrected prediction next to replay at equal memory.

Each seed draws the class order of the 5 tasks (2 classes each), the network's initial weights and
the batch order; every method starts from the same weights. The network, the training (each
method's plain-PyTorch door: ``train_step``, ``register_task`` at each task's end with its data;
Adam, batch 128) and the measurement (after the last task, every test sample classified among all
10 classes) are those of ``benchmarks/icarl_fashion_mnist.py``. Rows (mean ± std over seeds):

- ``finetune``: cross-entropy, no memory;
- ``replay``: ``ExperienceReplay(memory_size, replay_ratio)``, a reservoir of ``memory_size`` samples;
- ``replay herding``: ``ExperienceReplay(..., selection="herding")``: the same class-balanced,
  herded exemplar memory as BiC's, cross-entropy on new data and exemplars (BiC without its
  distillation or correction);
- ``bic head``: BiC's network, arg max of its own (uncorrected) outputs;
- ``bic``: BiC's prediction, ``bic.classifier`` (the bias-corrected logits).

All memories hold ``memory_size`` samples in all (BiC's includes its held-out part). The docs' table::

    python benchmarks/bic_fashion_mnist.py --seeds 0 1 2 --epochs 1 --output runs/bic
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark, run as a script

from icarl_fashion_mnist import _eval, accuracy, finetune, network, tensors  # noqa: E402

from neurenix.continual import ExperienceReplay  # noqa: E402
from neurenix.continual.bic import BiC  # noqa: E402
from neurenix.data.benchmarks import split_benchmark  # noqa: E402

Tasks = list[tuple[torch.Tensor, torch.Tensor]]


def train(method: Any, model: nn.Module, trains: Tasks, epochs: int, batch_size: int, lr: float, seed: int) -> None:
    """Every task by ``train_step``, registered with its data at its end (as the iCaRL benchmark;
    only a replay memory filled from the stream is offered the batches with ``add_to_memory``)."""
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


def run_seed(seed: int, options: argparse.Namespace) -> dict[str, Any]:
    benchmark = split_benchmark("fashion_mnist", 5, scenario="class", seed=seed, root=options.data_root)
    trains = [tensors(task) for task in benchmark.train]
    tests = [tensors(task) for task in benchmark.test]
    settings = (options.epochs, options.batch_size, options.lr, seed)
    rows: dict[str, list[float]] = {}
    times: dict[str, float] = {}
    extra: dict[str, Any] = {}

    def timed(name: str, build: Any) -> tuple[nn.Sequential, Any]:
        start = time.perf_counter()
        model = network(seed)
        method = build(model)
        if method is None:
            finetune(model, trains, *settings)
        else:
            train(method, model, trains, *settings)
        times[name] = time.perf_counter() - start
        return model, method

    if "finetune" in options.methods:
        model, _ = timed("finetune", lambda model: None)
        rows["finetune"] = accuracy(_eval(model), tests)
    if "replay" in options.methods:
        model, _ = timed("replay", lambda model: ExperienceReplay(model, options.memory, options.replay_ratio, seed=seed))
        rows["replay"] = accuracy(_eval(model), tests)
    if "replay-herding" in options.methods:
        model, _ = timed(
            "replay herding",
            lambda model: ExperienceReplay(model, options.memory, options.replay_ratio, seed=seed, selection="herding", feature_extractor=model[0]),
        )
        rows["replay herding"] = accuracy(_eval(model), tests)
    if "bic" in options.methods:
        model, bic = timed(
            "bic",
            lambda model: BiC(
                model, options.memory, model[0], options.replay_ratio, seed=seed, held_out=options.held_out, temperature=options.temperature
            ),
        )
        rows["bic head"] = accuracy(_eval(model), tests)
        rows["bic"] = accuracy(_eval(bic.classifier, model), tests)
        extra["bic corrections (task, alpha, beta)"] = bic.corrections
    return {"accuracy_per_task": rows, "wall_time_s": times, **extra}


def main(arguments: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_root", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["finetune", "replay", "replay-herding", "bic"])
    parser.add_argument("--memory", type=int, default=2000)
    parser.add_argument("--replay_ratio", type=float, default=0.5)
    parser.add_argument("--held_out", type=float, default=0.1)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=Path("runs/bic"))
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
    (options.output / "summary.json").write_text(json.dumps(report, indent=1))
    print(f"| method | average accuracy after 5 tasks (mean ± std, {len(options.seeds)} seeds) | per seed |")
    print("| --- | ---: | --- |")
    for name, values in averages.items():
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {name} | {statistics.fmean(values):.3f} ± {std:.3f} | {', '.join(f'{v:.3f}' for v in values)} |")
    return report


if __name__ == "__main__":
    main()
