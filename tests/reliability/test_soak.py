"""Soak: a 20-task permuted sequence with every method, and what each keeps in memory as it grows.

Not part of the default run (marked ``soak``); run it with

    python -m pytest -m soak tests/reliability/test_soak.py -q -s

``-s`` prints the table that docs/reliability.md quotes. Each method trains the 20 tasks of
permuted digits (scikit-learn's, offline; ``NEURENIX_SOAK_SOURCE=fashion_mnist`` with
``NEURENIX_SOAK_ROOT`` for Fashion-MNIST) under one ``Trainer`` with ``fit_sequence`` and
``ForgettingCurves``. After every task it records the bytes of the method's ``state_dict``, the
bytes of every tensor storage the method object holds (what ``state_dict`` leaves out, such as
EWC's folded penalty, counted too) and the process's resident memory; after every batch, the
replay memory's size and storage.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any, Callable

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from neurenix.continual import EWC, ContinualLossMixin, ExperienceReplay, KnowledgeDistillation, L2Regularization, SynapticIntelligence
from neurenix.continual.footprint import held_bytes, state_bytes
from neurenix.data import TaskSequenceDataModule, fit_sequence, permuted_benchmark
from neurenix.metrics import ForgettingCurves

pytestmark = pytest.mark.soak

NUM_TASKS = 20
HIDDEN = 512  # ~0.3 M parameters, 1.15 MiB: large enough for growth to show in resident memory
MEMORY_SIZE = 500
MiB = 2**20

METHODS: dict[str, Callable[[nn.Module], Any]] = {
    "ewc": lambda net: EWC(net, importance=100.0, fisher_sample_size=200, seed=0),
    "online_ewc": lambda net: EWC(net, importance=100.0, fisher_sample_size=200, online=True, gamma=0.9, seed=0),
    "si": lambda net: SynapticIntelligence(net, importance=1.0),
    "l2": lambda net: L2Regularization(net, importance=1.0),
    "distillation": lambda net: KnowledgeDistillation(net, alpha=0.5),
    "replay": lambda net: ExperienceReplay(net, memory_size=MEMORY_SIZE, replay_ratio=0.5, seed=0),
}


@pytest.fixture(autouse=True, scope="module")
def only_when_asked(request):
    """Skipped unless selected with ``-m soak`` (pyproject's ``-m "not soak"`` deselects it too)."""
    expression = request.config.getoption("markexpr") or ""
    if "soak" not in expression or "not soak" in expression:
        pytest.skip("soak test: run with `python -m pytest -m soak tests/reliability/test_soak.py -s`")


class Classifier(ContinualLossMixin, L.LightningModule):
    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(features, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, classes))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def resident_bytes() -> int:
    """The process's resident set size (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Recorder(Callback):
    """After each task: the method's state and held bytes, resident memory; after each batch:
    the replay memory's size and storage."""

    def __init__(self, method: Any) -> None:
        self.method = method
        self.tasks: list[dict[str, int]] = []
        self.replay: list[tuple[int, int, int]] = []  # (samples held, storage bytes, storage address)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        memory = getattr(self.method, "memory", None)
        if memory is not None and memory._inputs is not None:
            storage = [memory._inputs, memory._targets, memory._task_ids]
            self.replay.append((len(memory), sum(state_bytes(t) for t in storage), memory._inputs.data_ptr()))

    def on_train_end(self, trainer, pl_module):  # listed after the method: the task is consolidated
        self.tasks.append({"state": state_bytes(self.method.state_dict()), "held": held_bytes(self.method), "rss": resident_bytes()})


def soak(name: str, benchmark: Any) -> dict[str, Any]:
    module = Classifier(benchmark.train[0].inputs[0].numel(), benchmark.num_classes)
    method = METHODS[name](module.net)
    recorder = Recorder(method)
    curves = ForgettingCurves()
    trainer = L.Trainer(
        accelerator="cpu", callbacks=[method, recorder, curves], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    datamodule = TaskSequenceDataModule.from_benchmark(benchmark, batch_size=64)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit_sequence(trainer, module, datamodule, epochs_per_task=1)
    parameters = sum(p.numel() * p.element_size() for p in module.net.parameters())
    return {"recorder": recorder, "seconds": time.perf_counter() - start, "parameters": parameters,
            "average_accuracy": float(curves.matrix.average_accuracy(NUM_TASKS - 1)), "method": method}


@pytest.fixture(scope="module")
def soaked(only_when_asked) -> dict[str, dict[str, Any]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two busy-waiting threads on two shared cores run ten times slower
    source = os.environ.get("NEURENIX_SOAK_SOURCE", "digits")
    benchmark = permuted_benchmark(source, NUM_TASKS, seed=0, root=os.environ.get("NEURENIX_SOAK_ROOT"))
    try:
        results = {name: soak(name, benchmark) for name in METHODS}
    finally:
        torch.set_num_threads(threads)
    _print_table(results, source)
    return results


def _print_table(results: dict[str, dict[str, Any]], source: str) -> None:
    parameters = next(iter(results.values()))["parameters"]
    print(f"\n{NUM_TASKS}-task permuted {source}, MLP of {parameters / MiB:.2f} MiB of parameters, 1 epoch per task")
    print(f"{'method':<14}{'state after 1':>15}{'after 10':>10}{'after 20':>10}{'held 20':>10}"
          f"{'RSS growth 5->20':>18}{'avg acc':>9}{'time':>8}")
    for name, result in results.items():
        tasks = result["recorder"].tasks
        print(f"{name:<14}{tasks[0]['state'] / MiB:>13.2f}Mi{tasks[9]['state'] / MiB:>8.2f}Mi{tasks[-1]['state'] / MiB:>8.2f}Mi"
              f"{tasks[-1]['held'] / MiB:>8.2f}Mi{(tasks[-1]['rss'] - tasks[4]['rss']) / MiB:>16.1f}Mi"
              f"{result['average_accuracy']:>9.3f}{result['seconds']:>7.1f}s")


def _states(result: dict[str, Any], key: str = "state") -> list[int]:
    return [task[key] for task in result["recorder"].tasks]


def test_every_method_trains_all_tasks(soaked):
    for name, result in soaked.items():
        assert len(result["recorder"].tasks) == NUM_TASKS, name
        assert result["method"].finished_tasks == list(range(NUM_TASKS)), name


def test_replay_memory_never_exceeds_its_bytes(soaked):
    """Preallocated once on the first batch: never more samples, never more bytes, never moved."""
    replay = soaked["replay"]
    records = replay["recorder"].replay
    sample = replay["method"].memory
    budget = MEMORY_SIZE * (sample._inputs[0].numel() * sample._inputs.element_size() + sample._targets.element_size() + 8)
    assert max(count for count, _, _ in records) == MEMORY_SIZE
    assert {size for _, size, _ in records} == {budget}  # the storage, from the first batch to the last
    assert len({address for _, _, address in records}) == 1  # never reallocated
    saved = state_bytes(replay["method"].state_dict()["memory"])
    assert saved == budget + state_bytes(sample._generator.get_state())  # the samples held, and the generator


@pytest.mark.parametrize("name", ["online_ewc", "si", "l2", "distillation", "replay"])
def test_state_does_not_grow_with_the_task_count(soaked, name):
    """From the first consolidated task on, the state and everything held are the same size."""
    result = soaked[name]
    assert len(set(_states(result)[1:])) == 1, _states(result)
    assert len(set(_states(result, "held")[1:])) == 1, _states(result, "held")


def test_separate_penalty_ewc_grows_linearly(soaked):
    """One Fisher and one anchor per task: exactly two parameter copies more per task."""
    result = soaked["ewc"]
    states = _states(result)
    steps = {b - a for a, b in zip(states, states[1:])}
    assert steps == {2 * result["parameters"]}, steps
    held = _states(result, "held")
    assert {b - a for a, b in zip(held, held[1:])} == {2 * result["parameters"]}


def test_resident_memory_stays_bounded(soaked):
    """Beyond what the method's state explains, the process grows by less than 32 MiB between
    task 5 and task 20 (allocator noise; a leak of a batch per step would be far more)."""
    for name, result in soaked.items():
        tasks = result["recorder"].tasks
        explained = tasks[-1]["held"] - tasks[4]["held"]
        assert tasks[-1]["rss"] - tasks[4]["rss"] - explained < 32 * MiB, name
