"""Task data kept on the training device against a CPU loader and a plain loop, in one run.

The protocol: split Fashion-MNIST (any MNIST-like IDX data with ``--data mnist --root DIR``),
class-incremental, 5 tasks of 2 classes, ``--epochs`` (1) per task, an MLP 784-400-400-10, batch
128, Adam (lr 1e-3, a fresh optimizer per task), on ``--accelerator`` (cpu or gpu). The same
sequence runs through

- **loop**: a plain PyTorch loop over device-resident tensors (the tasks' inputs transformed once,
  moved to the device before the timing; each epoch's order drawn on the CPU, copied to the device
  once and sliced): the limit, and the baseline of every ratio;
- **device/M**: our Lightning path, ``TaskSequenceDataModule(keep_on_device=True)`` +
  ``fit_sequence`` + method M's callback (``naive``: none): every batch built on the device;
- **host/M**: the same with ``keep_on_device=False``: batches built on the CPU and copied to the
  device by Lightning at every step (on the CPU there is no copy: the two differ by the lean path's
  bookkeeping only).

Methods: naive, EWC, L2, SI, replay, distillation, at continual_overhead.py's settings. A round runs
every variant once, in reversed order every other round (A B C, C B A, ...), as
``continual_overhead.py`` does; round ``r`` uses seed ``seed + r`` for the initial weights and the
shuffling, in every variant. Times are of the whole sequence (trainer and method built, every task
trained and consolidated), not of loading the data or moving it to the device before the run (a
data module with ``keep_on_device=True`` moves it inside the timing, at its first fit: counted).
The tables give medians over the rounds and their ratios to the loop of the same run, and, per
method, device against host. The largest difference between the final weights of ``device/M``
and ``host/M`` in the last round is recorded (0 on the CPU: the same batches, bit for bit). The load
average at the start and the end goes into the report.

    python benchmarks/device_data.py [--accelerator cpu|gpu] [--rounds 4] [--epochs 1]
        [--threads 2] [--data fashion_mnist|mnist|digits] [--root DIR]
        [--methods naive,ewc,l2,si,replay,distillation] [--quick] [--json PATH]

``--quick`` is a smoke mode (scikit-learn's digits, a 16-16 MLP, one round: seconds; the numbers
mean nothing).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts, run from anywhere
import continual_overhead as overhead  # noqa: E402
from versus_peers_avalanche import build_mlp  # noqa: E402

from neurenix.continual import EWC, ExperienceReplay, KnowledgeDistillation, L2Regularization, SynapticIntelligence  # noqa: E402
from neurenix.data import TaskSequenceDataModule, fit_sequence, split_benchmark  # noqa: E402

NUM_TASKS = 5
METHODS = ("naive", "ewc", "l2", "si", "replay", "distillation")
#: Methods whose LightningModule needs ContinualLossMixin (they change the batch or the loss).
NEEDS_MIXIN = ("replay", "distillation")


@dataclass(frozen=True)
class Setup:
    """Everything a run depends on (it goes into the JSON as is)."""

    data: str
    root: Optional[str]
    hidden: tuple[int, ...]
    batch_size: int
    epochs: int
    rounds: int
    threads: int
    methods: tuple[str, ...]
    accelerator: str = "cpu"
    learning_rate: float = overhead.LEARNING_RATE
    seed: int = 0  # the class order; round r also uses seed + r for weights and shuffling

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", 0) if self.accelerator == "gpu" else torch.device("cpu")


DEFAULT = Setup("fashion_mnist", overhead.FASHION_MNIST, (400, 400), 128, epochs=1, rounds=4, threads=2, methods=METHODS)
QUICK = dict(data="digits", root=None, hidden=(16, 16), rounds=1)


# ---------------------------------------------------------------------------- data and models
@dataclass
class Data:
    benchmark: Any  # the TaskSequence our Lightning path trains on (on the CPU; the data module moves it)
    train: list[tuple[Tensor, Tensor]]  # every task's samples as the model receives them, on the device
    inputs: int
    classes: int


def load_data(setup: Setup) -> Data:
    benchmark = split_benchmark(setup.data, NUM_TASKS, root=setup.root, scenario="class", seed=setup.seed)
    train = [tuple(part.to(setup.device) for part in task[:]) for task in benchmark.train]
    return Data(benchmark, train, benchmark.input_shape[0], benchmark.num_classes)  # type: ignore[arg-type]


def expected_steps(setup: Setup, data: Data) -> int:
    """Optimizer steps of a whole sequence: every batch of every epoch of every task."""
    return setup.epochs * sum(-(-len(y) // setup.batch_size) for _, y in data.train)


def initial_net(setup: Setup, data: Data, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return build_mlp(data.inputs, setup.hidden, data.classes).to(setup.device)


def make_method(method: str, net: nn.Module, seed: int) -> list[Any]:
    """``method``'s callback at continual_overhead.py's settings (``naive``: none)."""
    if method == "naive":
        return []
    if method == "ewc":
        return [EWC(net, importance=overhead.EWC_IMPORTANCE, fisher_sample_size=overhead.FISHER_SAMPLES, seed=seed)]
    if method == "l2":
        return [L2Regularization(net, importance=overhead.L2_IMPORTANCE)]
    if method == "si":
        return [SynapticIntelligence(net, importance=overhead.SI_IMPORTANCE, xi=overhead.SI_XI)]
    if method == "replay":
        return [ExperienceReplay(net, memory_size=overhead.MEMORY_SIZE, replay_ratio=overhead.REPLAY_RATIO, seed=seed)]
    if method == "distillation":
        return [KnowledgeDistillation(net, temperature=overhead.TEMPERATURE, alpha=overhead.ALPHA)]
    raise ValueError(f"unknown method {method!r}")


# ---------------------------------------------------------------------------- the variants
def run_loop(setup: Setup, data: Data, net: nn.Module, seed: int) -> int:
    """The plain loop over device-resident tensors: each epoch's order copied to the device once."""
    generator = torch.Generator().manual_seed(seed)
    steps = 0
    for x, y in data.train:
        optimizer = torch.optim.Adam(net.parameters(), lr=setup.learning_rate)
        for _ in range(setup.epochs):
            for index in torch.randperm(len(y), generator=generator).to(setup.device).split(setup.batch_size):
                optimizer.zero_grad()
                F.cross_entropy(net(x[index]), y[index]).backward()
                optimizer.step()
                steps += 1
    return steps


def run_ours(method: str, keep_on_device: bool) -> Callable[[Setup, Data, nn.Module, int], int]:
    """Our Lightning path with ``method``'s callback, the data on the device or served from the CPU."""

    def run(setup: Setup, data: Data, net: nn.Module, seed: int) -> int:
        module = overhead.ContinualClassifier(net) if method in NEEDS_MIXIN else overhead.Classifier(net)
        datamodule = TaskSequenceDataModule.from_benchmark(data.benchmark, batch_size=setup.batch_size, seed=seed,
                                                           keep_on_device=keep_on_device)
        trainer = L.Trainer(accelerator=setup.accelerator, callbacks=make_method(method, net, seed), **overhead.TRAINER_OPTIONS)
        fit_sequence(trainer, module, datamodule, epochs_per_task=setup.epochs)
        return trainer.global_step

    return run


def variant(setup: Setup, data: Data, name: str, runner: Callable[[Setup, Data, nn.Module, int], int],
            finals: dict[str, list[Tensor]]) -> Callable[[], overhead.Timing]:
    """A run of ``runner`` for ``overhead.interleaved``; its ``r``-th call uses seed ``seed + r``.
    Each run must make the sequence's steps; its final weights go into ``finals[name]``."""
    rounds = [0]

    def run() -> overhead.Timing:
        seed = setup.seed + rounds[0]
        rounds[0] += 1
        net = initial_net(setup, data, seed)
        start = overhead.clock()
        steps = runner(setup, data, net, seed)
        seconds = overhead.since(start)
        if steps != expected_steps(setup, data):
            raise RuntimeError(f"{name}: the sequence made {steps} steps, not {expected_steps(setup, data)}")
        finals[name] = [p.detach().to("cpu", copy=True) for p in net.parameters()]
        return seconds

    return run


def variants(setup: Setup, data: Data, finals: dict[str, list[Tensor]]) -> dict[str, Callable[[], overhead.Timing]]:
    """Every variant's run, in the order of a round: the loop, then each method on the device and from the host."""
    runners: dict[str, Callable[[Setup, Data, nn.Module, int], int]] = {"loop": run_loop}
    for method in setup.methods:
        runners[f"device/{method}"] = run_ours(method, keep_on_device=True)
        runners[f"host/{method}"] = run_ours(method, keep_on_device=False)
    return {name: variant(setup, data, name, runner, finals) for name, runner in runners.items()}


# ---------------------------------------------------------------------------- report
def weight_difference(a: list[Tensor], b: list[Tensor]) -> float:
    """The largest absolute difference between two runs' final weights."""
    return max(float((u.double() - v.double()).abs().max()) for u, v in zip(a, b))


def summarize(setup: Setup, times: dict[str, list[overhead.Timing]], finals: dict[str, list[Tensor]]) -> dict[str, Any]:
    """Per variant: the rounds' times, medians and ratios to the loop; per method, device against host."""
    result: dict[str, Any] = {name: overhead.summary(measured, times["loop"]) for name, measured in times.items()}
    for method in setup.methods:
        device, host = overhead.median(times[f"device/{method}"]), overhead.median(times[f"host/{method}"])
        result[f"device/{method}"].update(
            versus_host=device.wall / host.wall, cpu_versus_host=device.cpu / host.cpu,
            weight_difference_to_host=weight_difference(finals[f"device/{method}"], finals[f"host/{method}"]),
        )
    return result


def table(report: dict[str, Any]) -> str:
    """The markdown table: per method, data on the device and from the host, each against the loop."""
    m = report["measurements"]
    lines = [
        "| method | data on the device s (x loop) | CPU loader s (x loop) | device / CPU loader | weights differ by |",
        "| --- | --- | --- | --- | --- |",
        f"| plain loop, device-resident tensors | {m['loop']['median_s']:.2f} (1.00x) | - | - | - |",
    ]
    for method in report["setup"]["methods"]:
        device, host = m[f"device/{method}"], m[f"host/{method}"]
        lines.append(f"| {method} | {device['median_s']:.2f} ({device['ratio']:.2f}x) | {host['median_s']:.2f} "
                     f"({host['ratio']:.2f}x) | {device['versus_host']:.2f} | {device['weight_difference_to_host']:.1e} |")
    return "\n".join(lines)


def parse_setup(argv: Optional[Sequence[str]]) -> tuple[Setup, Optional[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), help="where the model trains and the data is kept (default cpu)")
    parser.add_argument("--rounds", type=int, help=f"interleaved rounds, one seed each (default {DEFAULT.rounds})")
    parser.add_argument("--epochs", type=int, help=f"epochs per task (default {DEFAULT.epochs})")
    parser.add_argument("--threads", type=int, help=f"torch CPU threads (default {DEFAULT.threads})")
    parser.add_argument("--data", choices=("fashion_mnist", "mnist", "digits"), help="the source (default fashion_mnist)")
    parser.add_argument("--root", help=f"the folder of the IDX files (default {overhead.FASHION_MNIST})")
    parser.add_argument("--methods", help=f"comma-separated, of {','.join(METHODS)} (default all)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: digits, a 16-16 MLP, one round (seconds)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)

    setup = replace(DEFAULT, **QUICK) if args.quick else DEFAULT
    overrides = {"rounds": args.rounds, "epochs": args.epochs, "threads": args.threads, "data": args.data, "root": args.root,
                 "accelerator": args.accelerator}
    setup = replace(setup, **{k: v for k, v in overrides.items() if v is not None})
    if setup.data == "digits":
        setup = replace(setup, root=None)
    for name in ("rounds", "epochs", "threads"):
        if getattr(setup, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(setup, name)}")
    if setup.accelerator == "gpu" and not torch.cuda.is_available():
        parser.error("--accelerator gpu needs a CUDA device, and torch sees none")
    if args.methods is not None:
        methods = tuple(name.strip() for name in args.methods.split(",") if name.strip())
        unknown = [name for name in methods if name not in METHODS]
        if unknown or not methods:
            parser.error(f"--methods must list some of {','.join(METHODS)}, got {args.methods!r}")
        setup = replace(setup, methods=methods)
    return setup, args.json


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    setup, json_path = parse_setup(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(setup.threads)
    finals: dict[str, list[Tensor]] = {}
    try:
        with overhead.quiet_lightning():
            data = load_data(setup)
            load_start = overhead._load_average()
            started = time.perf_counter()
            runs = variants(setup, data, finals)
            times = overhead.interleaved({name: overhead.reported(name, run, started) for name, run in runs.items()}, setup.rounds)
            elapsed = time.perf_counter() - started
            load_end = overhead._load_average()
    finally:
        torch.set_num_threads(threads)
    report = {
        "benchmark": "device_data",
        "setup": asdict(setup),
        "steps_per_sequence": expected_steps(setup, data),
        "machine": {**overhead.machine(), "load_average_start": load_start, "load_average_end": load_end},
        "commit": overhead.git_commit(),
        "command": " ".join(["python", "benchmarks/device_data.py", *(sys.argv[1:] if argv is None else argv)]),
        "wall_time_s": elapsed,
        "measurements": summarize(setup, times, finals),
    }
    report["table"] = table(report)
    device = report["machine"]["gpu"] if setup.accelerator == "gpu" else report["machine"]["cpu"]
    print(f"\n{setup.data}, {NUM_TASKS} tasks class-incremental, {setup.epochs} epoch(s) per task, MLP "
          f"{data.inputs}-{'-'.join(map(str, setup.hidden))}-{data.classes}, batch {setup.batch_size}, on {setup.accelerator} "
          f"({device}), {setup.threads} threads, medians of {setup.rounds} interleaved rounds (seeds {setup.seed}.."
          f"{setup.seed + setup.rounds - 1}); load average {load_start} -> {load_end}; whole run {elapsed:.0f} s\n")
    print(report["table"])
    if json_path:
        with open(json_path, "w") as file:
            json.dump(report, file, indent=2)
    return report


if __name__ == "__main__":
    main()
