"""Host-device synchronizations in every method's training step on CUDA: none, unless the maths
needs one (the rules of tests/continual/test_host_reads_in_steps.py, which counts the host reads
behind them on the CPU).

PyTorch's own detector, ``torch.cuda.set_sync_debug_mode("warn")``, warns at each synchronizing
CUDA operation (``.item()``, ``nonzero``, a blocking copy between host and device, ...); each
warning is recorded with the Python stack that made it, so that only synchronizations made by
neurenix's code count (Lightning's own, outside our hooks, are not ours). Syncs made on the
autograd engine's own thread (inside ``backward``) reach no Python stack and are not seen here.

Marked ``gpu`` and skipped without CUDA; run them on a GPU machine with
``python -m pytest -q -m gpu tests/gpu``.
"""

from __future__ import annotations

import contextlib
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

import neurenix
from neurenix.continual import GEM, ExperienceReplay, GDumb
from neurenix.data import TaskSequenceDataModule, fit_sequence, split_benchmark
from tests.continual.test_host_reads_in_steps import METHODS, TASK_BALANCED, AnnouncesItsClasses
from tests.helpers import lit_classifier, quiet_trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda", 0)
NEURENIX = str(Path(neurenix.__file__).resolve().parent)
HERE = str(Path(__file__).resolve())


class Sync(str):
    """One synchronization, ``"file:line"`` of the Python line that made it, with the files of
    its whole stack (:attr:`stack_files`)."""

    stack_files: tuple[str, ...]

    def made_in(self, root: str) -> bool:
        return any(file.startswith(root) for file in self.stack_files)


@contextlib.contextmanager
def cuda_syncs() -> Iterator[list[Sync]]:
    """Record every synchronizing CUDA operation made on this thread meanwhile."""
    syncs: list[Sync] = []
    previous = torch.cuda.get_sync_debug_mode()

    def record(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if "synchronizing CUDA operation" not in str(message):
            return
        stack = traceback.extract_stack()[:-1]
        sync = Sync(f"{'/'.join(filename.rsplit('/', 2)[-2:])}:{lineno}")
        sync.stack_files = tuple(str(Path(frame.filename).resolve()) for frame in stack)
        syncs.append(sync)

    torch.cuda.synchronize()  # nothing queued before counts
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # every sync, not the first per line
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield syncs
        finally:
            torch.cuda.set_sync_debug_mode(previous)


def ours(syncs: list[Sync]) -> list[Sync]:
    return [sync for sync in syncs if sync.made_in(NEURENIX)]


def test_the_recorder_sees_a_sync_with_its_stack_and_nothing_else():
    x = torch.ones(3, device=CUDA)
    with cuda_syncs() as syncs:
        y = x * 2 + 1  # kernels only
    assert syncs == []
    with cuda_syncs() as syncs:
        value = (y.sum()).item()
    assert value == 9.0 and len(syncs) == 1 and syncs[0].made_in(HERE) and not ours(syncs)


# ---------------------------------------------------------------------------------------------- standalone
def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(CUDA)


def _task_batches(task: int, steps: int = 4, batch_size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The task's batches, already on the device (made before any step is recorded)."""
    generator = torch.Generator().manual_seed(task)
    x = torch.randn(steps * batch_size, 6, generator=generator)
    y = torch.randint(0, 3, (steps * batch_size,), generator=generator)
    return list(zip(x.to(CUDA).split(batch_size), y.to(CUDA).split(batch_size)))


def _syncs_of_standalone_steps(build: Callable[[nn.Module], Any], tasks: int = 3) -> list[tuple[int, int, list[Sync]]]:
    """``(task, step, syncs)`` of every ``train_step`` (replay: and the ``add_to_memory`` of its batch)."""
    model = _net()
    method = build(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # Adam reads its step count on the CPU
    recorded = []
    for task in range(tasks):
        batches = _task_batches(task)
        method.register_task(task, batches)  # the previous task ends here, outside any step
        for step, (x, y) in enumerate(batches):
            with cuda_syncs() as syncs:
                method.train_step(optimizer, nn.functional.cross_entropy, x, y, task)
                if not getattr(method, "remembers_training_batches", True):
                    method.add_to_memory(x, y, task)  # on CUDA: checked on the device, no sync
            recorded.append((task, step, ours(syncs)))
    return recorded


def _unexpected(name: str, recorded: list[tuple[int, int, list[Sync]]]) -> list[str]:
    return [
        f"task {task}, step {step}: {syncs}"
        for task, step, syncs in recorded
        if syncs and not (name in TASK_BALANCED and step == 0)
    ]


@pytest.mark.parametrize("name", list(METHODS))
def test_a_standalone_training_step_on_cuda_does_not_synchronize(name):
    recorded = _syncs_of_standalone_steps(METHODS[name])
    assert not _unexpected(name, recorded), "\n".join(_unexpected(name, recorded))


def test_gem_synchronizes_only_to_solve_its_quadratic_program():
    recorded = _syncs_of_standalone_steps(lambda model: GEM(model, memory_size=20, seed=0))
    for task, step, syncs in recorded:
        outside = [sync for sync in syncs if "continual/functional.py" not in "/".join(sync.stack_files)]
        assert not outside or step == 0, f"task {task}, step {step}: {outside}"
    assert not any(syncs for task, _, syncs in recorded if task == 0)  # no constraint yet


def test_the_class_balanced_memory_synchronizes_once_per_insert():
    recorded = _syncs_of_standalone_steps(lambda model: ExperienceReplay(model, memory_size=20, seed=0, balance="classes"))
    for task, step, syncs in recorded[1:]:  # after the first insert every class is known
        assert len(syncs) == 1 and any(file.endswith("continual/memory.py") for file in syncs[0].stack_files), (task, step, syncs)


def test_announced_classes_are_stored_without_a_sync_once_each_holds_its_share():
    recorded = _syncs_of_standalone_steps(lambda model: AnnouncesItsClasses(model, memory_size=6, seed=0, balance="classes"))
    syncs = [len(syncs) for _, _, syncs in recorded]
    filling = syncs.index(0)  # task 0's first inserts sync while its classes fill their shares
    assert filling >= 1 and not any(syncs[filling:]), syncs


def test_class_balanced_replay_under_a_trainer_syncs_only_while_the_fit_s_classes_fill_their_shares():
    recorded = _syncs_of_lightning_steps(lambda model: ExperienceReplay(model, memory_size=10, seed=0, balance="classes"))
    for task in range(2):
        syncs = [bool(syncs) for t, _, syncs in recorded if t == task]
        assert syncs[0] and not any(syncs[1:]), recorded  # the fit's classes were announced at its start


def test_gdumb_s_training_on_its_memory_synchronizes_once_at_the_end():
    model = _net()
    gdumb = GDumb(model, memory_size=20, seed=0)
    for x, y in _task_batches(0):
        gdumb.add_to_memory(x, y, 0)
    with cuda_syncs() as syncs:
        losses = gdumb.train_on_memory(lambda p: torch.optim.SGD(p, lr=0.1), nn.functional.cross_entropy, epochs=3, batch_size=4)
    assert len(ours(syncs)) == 1 and losses.device.type == "cpu" and torch.isfinite(losses).all()


def test_non_finite_samples_on_cuda_are_flagged_without_a_sync_and_raised_by_state_dict():
    model = _net()
    replay = ExperienceReplay(model, memory_size=20, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = _task_batches(0)
    for x, y in batches[:2]:
        replay.train_step(optimizer, nn.functional.cross_entropy, x, y, 0)
        replay.add_to_memory(x, y, 0)
    bad = batches[2][0].clone()
    bad[3, 1] = float("nan")
    with cuda_syncs() as syncs:
        replay.add_to_memory(bad, batches[2][1], 0)
    assert not ours(syncs), syncs
    with pytest.raises(ValueError, match="add_to_memory got NaN or infinite values in 1 call on cuda, the first being call 3 of task 0"):
        replay.state_dict()


# ---------------------------------------------------------------------------------------------- under a Trainer
class _StartsRecording(Callback):
    """First among the trainer's callbacks: records the syncs from each training batch's start."""

    def __init__(self) -> None:
        self.recorded: list[tuple[int, int, list[Sync]]] = []
        self._context: Any = None
        self._syncs: list[Sync] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._context = cuda_syncs()
        self._syncs = self._context.__enter__()

    def stop(self, trainer, batch_idx: int) -> None:
        self._context.__exit__(None, None, None)
        self.recorded.append((trainer.datamodule.current_task, batch_idx, ours(self._syncs)))


class _StopsRecording(Callback):
    """Last among the trainer's callbacks: every method's ``on_train_batch_end`` has run."""

    def __init__(self, start: _StartsRecording) -> None:
        self.start = start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.start.stop(trainer, batch_idx)


def _syncs_of_lightning_steps(build: Callable[[nn.Module], Any]) -> list[tuple[int, int, list[Sync]]]:
    benchmark = split_benchmark("digits", num_tasks=2, scenario="class", seed=0)
    torch.manual_seed(0)
    module = lit_classifier(nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)))
    method = build(module.net)
    start = _StartsRecording()
    trainer = quiet_trainer(
        callbacks=[start, method, _StopsRecording(start)],
        max_epochs=1,
        limit_train_batches=3,
        accelerator="gpu",
        devices=1,
        deterministic=False,  # cuBLAS has no deterministic mode without CUBLAS_WORKSPACE_CONFIG
    )
    fit_sequence(trainer, module, TaskSequenceDataModule.from_benchmark(benchmark, batch_size=16), epochs_per_task=1)
    assert {task for task, _, _ in start.recorded} == {0, 1}
    return start.recorded


@pytest.mark.parametrize("name", [*METHODS, "gdumb"])
def test_a_training_step_under_a_trainer_on_cuda_does_not_synchronize(name):
    build = METHODS.get(name, lambda model: GDumb(model, memory_size=20, seed=0))
    recorded = _syncs_of_lightning_steps(build)
    assert not _unexpected(name, recorded), "\n".join(_unexpected(name, recorded))
