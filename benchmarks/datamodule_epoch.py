"""One epoch of a task through TaskSequenceDataModule's train loader vs a plain tensor-slicing loop.

Both sides build the same batches from the same in-memory ``uint8`` tensors with the same batch
transform (``uint8`` to ``float32 / 255``, flattened): the plain loop draws ``randperm`` and
slices it, the data module goes through ``DataLoader`` (sampler, ``__getitems__``, collate).
The ratio of the two epoch times is the cost of the data module's machinery; the target is
1.2x or less. Repetitions alternate the two sides (so drifts in machine speed hit both) and the
medians are compared.

With ``--train-step`` both sides also run one SGD step of a small MLP on every batch, which
shows what the loader's overhead amounts to in training.

    python benchmarks/datamodule_epoch.py [--source synthetic|digits] [--batch-size 128]
        [--samples 60000] [--repeats 7] [--num-workers 0] [--train-step] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from neurenix.data.benchmarks import split_benchmark
from neurenix.data.datamodule import TaskSequenceDataModule
from neurenix.data.tasks import Compose, Flatten, TaskDataset, ToFloat

#: Pixels of an MNIST image side: the synthetic task has MNIST's shape and dtype.
MNIST_SIDE = 28
#: Ten classes, as MNIST.
MNIST_CLASSES = 10
#: Hidden units of the MLP of --train-step (the size of classic permuted-MNIST MLPs).
HIDDEN = 100

Step = Optional[Callable[[Tensor, Tensor], None]]


def synthetic_task(samples: int, seed: int) -> TaskDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (samples, MNIST_SIDE, MNIST_SIDE), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, MNIST_CLASSES, (samples,), generator=generator)
    return TaskDataset(images, labels, 0, transform=Compose(ToFloat(), Flatten()))


def digits_task(seed: int) -> TaskDataset:
    return split_benchmark("digits", num_tasks=5, seed=seed).train[0]


def sgd_step(features: int, seed: int) -> Callable[[Tensor, Tensor], None]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(features, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, MNIST_CLASSES))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def step(x: Tensor, y: Tensor) -> None:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y % MNIST_CLASSES).backward()
        optimizer.step()

    return step


def loader_epoch(task: TaskDataset, batch_size: int, num_workers: int, seed: int, step: Step) -> Callable[[], int]:
    datamodule = TaskSequenceDataModule([task], [task], batch_size=batch_size, num_workers=num_workers, seed=seed)
    loader = datamodule.train_dataloader()

    def run() -> int:
        batches = 0
        for x, y in loader:
            if step is not None:
                step(x, y)
            batches += 1
        return batches

    return run


def plain_epoch(task: TaskDataset, batch_size: int, seed: int, step: Step) -> Callable[[], int]:
    generator = torch.Generator().manual_seed(seed)
    inputs, targets, transform = task.inputs, task.targets, task.transform

    def run() -> int:
        order = torch.randperm(inputs.shape[0], generator=generator)
        batches = 0
        for start in range(0, inputs.shape[0], batch_size):
            index = order[start : start + batch_size]
            x, y = transform(inputs[index]), targets[index]
            if step is not None:
                step(x, y)
            batches += 1
        return batches

    return run


def timed(run: Callable[[], int]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measure(task: TaskDataset, batch_size: int, repeats: int, num_workers: int, seed: int, train_step: bool) -> dict:
    features = task[0][0].numel()
    # Each side trains its own copy of the same model, so both do the same arithmetic.
    ours_step, plain_step = (sgd_step(features, seed), sgd_step(features, seed)) if train_step else (None, None)
    ours = loader_epoch(task, batch_size, num_workers, seed, ours_step)
    plain = plain_epoch(task, batch_size, seed, plain_step)
    if ours() != plain():  # also a warm-up of both
        raise RuntimeError("the two loops made different numbers of batches")
    ours_times, plain_times = [], []
    for repeat in range(repeats):
        pair = [(ours, ours_times), (plain, plain_times)]
        for run, times in pair if repeat % 2 == 0 else pair[::-1]:
            times.append(timed(run))
    ours_median, plain_median = statistics.median(ours_times), statistics.median(plain_times)
    return {
        "samples": len(task),
        "input_shape": list(task.inputs.shape[1:]),
        "batch_size": batch_size,
        "num_workers": num_workers,
        "train_step": train_step,
        "repeats": repeats,
        "datamodule_s": ours_times,
        "plain_s": plain_times,
        "datamodule_median_s": ours_median,
        "plain_median_s": plain_median,
        "ratio": ours_median / plain_median,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=("synthetic", "digits"), default="synthetic",
                        help="a synthetic 28x28 uint8 task (default) or the first split-digits task")
    parser.add_argument("--samples", type=int, default=60000, help="samples of the synthetic task (default 60000)")
    parser.add_argument("--batch-size", type=int, action="append",
                        help="batch size; repeat the option for several (default: 32 and 128)")
    parser.add_argument("--repeats", type=int, default=7, help="epochs timed per side (default 7)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default 0)")
    parser.add_argument("--train-step", action="store_true", help="one SGD step of a small MLP per batch, both sides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args()
    for name in ("samples", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")

    task = synthetic_task(args.samples, args.seed) if args.source == "synthetic" else digits_task(args.seed)
    results = []
    for batch_size in args.batch_size or [32, 128]:
        result = measure(task, batch_size, args.repeats, args.num_workers, args.seed, args.train_step)
        results.append(result)
        print(
            f"{args.source} task, {len(task)} samples, batch {batch_size}"
            f"{', with a train step' if args.train_step else ''}: data module "
            f"{result['datamodule_median_s'] * 1e3:.1f} ms/epoch, plain slicing {result['plain_median_s'] * 1e3:.1f} "
            f"ms/epoch, ratio {result['ratio']:.2f}x (target <= 1.2x)",
            flush=True,
        )
    if args.json:
        report = {
            "source": args.source,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.platform(),
            "results": results,
        }
        with open(args.json, "w") as file:
            json.dump(report, file, indent=2)


if __name__ == "__main__":
    main()
