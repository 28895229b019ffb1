"""No method's training step reads a tensor's values on the host, unless its maths needs it.

On a GPU each such read is a host-device synchronization: the host waits for every queued
kernel, and the step can no longer run ahead of the device. ``tests/host_reads.py`` records the
reads on the CPU (``tests/gpu/test_syncs.py`` counts the synchronizations themselves on CUDA).
Only reads made by neurenix's code (a neurenix file on the call stack) count: under a Trainer,
Lightning's own bookkeeping outside our hooks is not ours.

What a step may read, and why:

- standalone, with each task registered before its steps (``register_task(task, loader)``), no
  step reads: the task's end (consolidation: the Fisher, the exemplars, the bias fit) runs in
  ``register_task``, where reading is fine. (A ``train_step`` with a new task id ends the task
  before it, in that step.)
- the first step of a task may read when the memory is balanced over tasks (A-GEM, GEM): the
  new task's share is made then (the others shrink and storage is compacted), once per task;
- GEM reads to solve its quadratic program on the host, in the steps where the gradient
  violates a constraint (the maths needs the host; test_rehearsal.py checks where);
- the class-balanced memory reads which classes a batch holds, once per insert;
- ``add_to_memory`` checks for NaN and infinities by reading on the CPU (free there); on an
  accelerator it flags them on the device instead (tested here by forcing that path).

The optimizer is SGD: Adam reads its step count on the CPU (its own read, not ours).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import neurenix
from neurenix.continual import (
    AGEM,
    ERACE,
    EWC,
    GEM,
    MAS,
    BiC,
    DarkExperienceReplay,
    ExperienceReplay,
    GDumb,
    ICaRL,
    KnowledgeDistillation,
    L2Regularization,
    RWalk,
    SynapticIntelligence,
)
from neurenix.data import TaskSequenceDataModule, fit_sequence, split_benchmark
from tests.helpers import lit_classifier, make_mlp, quiet_trainer
from tests.host_reads import HostReads, host_reads

NEURENIX = str(Path(neurenix.__file__).parent)

#: Every method whose steps read nothing (besides what the module docstring allows), built on a
#: model whose first layer is the features (iCaRL's and BiC's herding).
METHODS: dict[str, Callable[[nn.Module], Any]] = {
    "ewc": lambda model: EWC(model, fisher_sample_size=16, seed=0),
    "online_ewc": lambda model: EWC(model, fisher_sample_size=16, online=True, gamma=0.9, seed=0),
    "l2": lambda model: L2Regularization(model),
    "si": lambda model: SynapticIntelligence(model),
    "mas": lambda model: MAS(model),
    "rwalk": lambda model: RWalk(model),
    "distillation": lambda model: KnowledgeDistillation(model),
    "replay": lambda model: ExperienceReplay(model, memory_size=20, seed=0),
    "der": lambda model: DarkExperienceReplay(model, memory_size=20, seed=0, alpha=0.5),
    "der++": lambda model: DarkExperienceReplay(model, memory_size=20, seed=0, alpha=0.5, beta=0.5),
    "er_ace": lambda model: ERACE(model, memory_size=20, seed=0),
    "agem": lambda model: AGEM(model, memory_size=20, seed=0),
    "icarl": lambda model: ICaRL(model, memory_size=20, feature_extractor=model[0], seed=0),
    "bic": lambda model: BiC(model, memory_size=20, feature_extractor=model[0], seed=0),
}
#: Methods whose memory is balanced over tasks: a task's first step makes the new task's share.
TASK_BALANCED = ("agem", "gem")
def _task_batches(task: int, steps: int = 4, batch_size: int = 8) -> DataLoader:
    generator = torch.Generator().manual_seed(task)
    x = torch.randn(steps * batch_size, 6, dtype=torch.float64, generator=generator)
    return DataLoader(TensorDataset(x, torch.randint(0, 3, (steps * batch_size,), generator=generator)), batch_size=batch_size)


def _reads_of_standalone_steps(name: str, build: Callable[[nn.Module], Any], tasks: int = 3) -> list[tuple[int, int, HostReads]]:
    """``(task, step, reads)`` of every ``train_step`` (replay: and the ``add_to_memory`` of its batch)."""
    model = make_mlp()
    method = build(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    recorded = []
    for task in range(tasks):
        loader = _task_batches(task)
        method.register_task(task, loader)  # the previous task ends here, outside any step
        for step, (x, y) in enumerate(loader):
            with host_reads() as reads:
                method.train_step(optimizer, nn.functional.cross_entropy, x, y, task)
                if not getattr(method, "remembers_training_batches", True):
                    method.add_to_memory(x, y, task)  # the replay loop of the API's tutorial
            recorded.append((task, step, reads.made_in(NEURENIX)))
    return recorded


@pytest.fixture
def on_an_accelerator(monkeypatch):
    """add_to_memory takes its accelerator path (checks flagged on the device) on the CPU."""
    from neurenix.continual import _checks

    monkeypatch.setattr(_checks, "reads_cost_nothing", lambda tensor: False)


def _unexpected(name: str, recorded: list[tuple[int, int, HostReads]]) -> list[str]:
    """The reads that the module docstring does not allow, as ``"task t, step s: reads"``."""
    return [
        f"task {task}, step {step}:\n{reads}"
        for task, step, reads in recorded
        if reads and not (name in TASK_BALANCED and step == 0)
    ]


@pytest.mark.parametrize("name", list(METHODS))
def test_a_standalone_training_step_reads_nothing(name, on_an_accelerator):
    recorded = _reads_of_standalone_steps(name, METHODS[name])
    assert not _unexpected(name, recorded), "\n".join(_unexpected(name, recorded))
    if name in TASK_BALANCED:  # the new task's share: read in its first step, from task 1 on
        assert [bool(reads) for _, step, reads in recorded if step == 0] == [False, True, True]


def test_on_the_cpu_add_to_memory_checks_its_samples_at_once_which_reads():
    recorded = _reads_of_standalone_steps("replay", METHODS["replay"], tasks=1)
    assert all(any("_checks.py" in read for read in reads) for _, _, reads in recorded)


def test_the_class_balanced_memory_reads_the_classes_of_each_insert_once(on_an_accelerator):
    recorded = _reads_of_standalone_steps("replay", lambda model: ExperienceReplay(model, memory_size=20, seed=0, balance="classes"))
    for task, step, reads in recorded:
        if (task, step) != (0, 0):  # afterwards every class is known: no re-balancing
            assert [read.split(" at ")[0] for read in reads] == ["tolist"] and "continual/memory.py" in reads[0], str(reads)


class AnnouncesItsClasses(ExperienceReplay):
    """Class-balanced replay told each task's classes when the task starts, as a user would."""

    def _begin_task(self, task_id: int) -> None:
        super()._begin_task(task_id)
        self.announce_classes([0, 1, 2])


def test_announced_classes_are_stored_without_a_read_once_each_holds_its_share(on_an_accelerator):
    recorded = _reads_of_standalone_steps("replay", lambda model: AnnouncesItsClasses(model, memory_size=6, seed=0, balance="classes"))
    reads = [len(reads) for _, _, reads in recorded]
    filling = reads.index(0)  # task 0's first inserts read while its classes fill their shares of 2
    assert filling >= 1 and reads == [1] * filling + [0] * (len(reads) - filling), reads


def test_a_task_s_announcement_ends_with_it():
    model = make_mlp()
    replay = ExperienceReplay(model, memory_size=3, seed=0, balance="classes")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = next(iter(_task_batches(0)))
    assert set(y.tolist()) == {0, 1, 2}  # one batch fills every share of 1
    replay.train_step(optimizer, nn.functional.cross_entropy, x, y, 0)
    replay.announce_classes([0, 1, 2])
    replay.add_to_memory(x, y, 0)
    assert replay.memory.announced == frozenset({0, 1, 2}) and replay.memory._on_device is not None
    replay.register_task(1)
    assert replay.memory.announced is None and replay.memory.class_seen == {label: int((y == label).sum()) for label in range(3)}
    with pytest.raises(ValueError, match=r"classes must be class labels \(ints >= 0\), got \[0, -2\]"):
        replay.announce_classes([0, -2])
    ExperienceReplay(model, memory_size=6, seed=0).announce_classes([0, 1])  # a reservoir needs none: ignored


def test_gdumb_s_training_on_its_memory_reads_once_at_the_end(on_an_accelerator):
    model = make_mlp()
    gdumb = GDumb(model, memory_size=20, seed=0)
    for x, y in _task_batches(0):
        gdumb.add_to_memory(x, y, 0)
    with host_reads() as reads:
        losses = gdumb.train_on_memory(lambda p: torch.optim.SGD(p, lr=0.1), nn.functional.cross_entropy, epochs=3, batch_size=4)
    reads = reads.made_in(NEURENIX)
    assert len(reads) == 1 and reads[0].startswith("cpu at continual/gdumb.py"), str(reads)  # the losses, once
    assert losses.shape == (3,) and losses.dtype == torch.float64 and losses.device.type == "cpu"
    assert torch.isfinite(losses).all() and bool(losses[-1] < losses[0])


# ---------------------------------------------------------------------------------------------- under a Trainer
class _StartsRecording(Callback):
    """First among the trainer's callbacks: records the host reads from each training batch's start."""

    def __init__(self) -> None:
        self.recorded: list[tuple[int, int, HostReads]] = []
        self._context: Any = None
        self._reads: HostReads = HostReads()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._context = host_reads()
        self._reads = self._context.__enter__()

    def stop(self, trainer, batch_idx: int) -> None:
        self._context.__exit__(None, None, None)
        self.recorded.append((trainer.datamodule.current_task, batch_idx, self._reads.made_in(NEURENIX)))


class _StopsRecording(Callback):
    """Last among the trainer's callbacks: ends the recording at the batch's end (every method's
    ``on_train_batch_end`` has run: A-GEM and GEM store the batch there)."""

    def __init__(self, start: _StartsRecording) -> None:
        self.start = start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.start.stop(trainer, batch_idx)


def _digits_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))


def _reads_of_lightning_steps(build: Callable[[nn.Module], Any]) -> list[tuple[int, int, HostReads]]:
    """``(task, batch, reads)`` of every training batch of a 2-task class-incremental digits sequence
    (3 batches a task; GDumb's fit trains on its memory of 20 samples: 2 batches)."""
    benchmark = split_benchmark("digits", num_tasks=2, scenario="class", seed=0)
    module = lit_classifier(_digits_net())
    method = build(module.net)
    start = _StartsRecording()
    trainer = quiet_trainer(callbacks=[start, method, _StopsRecording(start)], max_epochs=1, limit_train_batches=3)
    fit_sequence(trainer, module, TaskSequenceDataModule.from_benchmark(benchmark, batch_size=16), epochs_per_task=1)
    batches = 2 if isinstance(method, GDumb) else 3
    assert [(task, batch) for task, batch, _ in start.recorded] == [(t, b) for t in range(2) for b in range(batches)]
    return start.recorded


def test_class_balanced_replay_under_a_trainer_reads_only_while_the_fit_s_classes_fill_their_shares():
    recorded = _reads_of_lightning_steps(lambda model: ExperienceReplay(model, memory_size=10, seed=0, balance="classes"))
    # Each fit announces its task's classes at its start; its first insert fills their shares
    # (one read), and the steps after it read nothing.
    for task in range(2):
        assert [len(reads) for t, _, reads in recorded if t == task] == [1, 0, 0], recorded


@pytest.mark.parametrize("name", [*METHODS, "gdumb"])
def test_a_training_step_under_a_trainer_reads_nothing(name):
    build = METHODS.get(name, lambda model: GDumb(model, memory_size=20, seed=0))
    recorded = _reads_of_lightning_steps(build)
    assert not _unexpected(name, recorded), "\n".join(_unexpected(name, recorded))


def test_gem_under_a_trainer_reads_only_for_its_quadratic_program_and_the_new_task_s_share():
    recorded = _reads_of_lightning_steps(lambda model: GEM(model, memory_size=20, seed=0))
    for task, batch, reads in recorded:
        outside = [read for read in reads if "continual/functional.py" not in read]
        assert not outside or (task, batch) == (1, 0), str(outside)  # the task's first step: its share
    assert not any(reads for task, _, reads in recorded if task == 0)  # no constraint before a task has ended
