"""TaskSequenceDataModule(training=...): the sequential run, and the cumulative and joint baselines."""

from __future__ import annotations

import math
import re

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import TensorDataset

from neurenix.continual import EWC
from neurenix.data.benchmarks import TaskSequence
from neurenix.data.datamodule import TaskSequenceDataModule
from neurenix.data.sequence import fit_sequence
from neurenix.data.tasks import ConcatTaskDataset, TaskDataset
from neurenix.metrics import ForgettingCurves
from tests.data.test_datamodule_resume import assert_equal, run
from tests.helpers import lit_classifier, lit_multi_head, quiet_trainer

SIZES = (5, 7, 9)  # samples of tasks 0, 1, 2


def numbered_tasks(offset: int = 0) -> list[TaskDataset]:
    """Tasks whose samples are numbered across the sequence (input = label = that number + offset),
    so the samples a loader serves can be counted by content."""
    tasks, start = [], offset
    for task, size in enumerate(SIZES):
        numbers = torch.arange(start, start + size)
        tasks.append(TaskDataset(numbers.float().unsqueeze(1), numbers, task, with_task_ids=True))
        start += size
    return tasks


def task_of(number: int, offset: int = 0) -> int:
    ends = torch.tensor(SIZES).cumsum(0) + offset
    return int(torch.searchsorted(ends, torch.tensor(number), right=True))


def served(loader) -> tuple[list[int], list[int], list[list[int]]]:
    """The sample numbers a loader serves in one epoch (sorted), their task ids (in that order), and
    the tasks each batch holds."""
    batches = list(loader)
    numbers = torch.cat([b[1] for b in batches])
    task_ids = torch.cat([b[2] for b in batches])
    order = numbers.argsort()
    return numbers[order].tolist(), task_ids[order].tolist(), [sorted(set(b[2].tolist())) for b in batches]


def test_cumulative_task_t_serves_tasks_0_to_t_once_per_epoch_shuffled_together():
    datamodule = TaskSequenceDataModule(numbered_tasks(), numbered_tasks(100), batch_size=4, training="cumulative")
    for task in range(3):
        datamodule.set_task(task)
        for _ in range(2):  # two epochs: each sample once in each
            numbers, task_ids, batch_tasks = served(datamodule.train_dataloader())
            assert numbers == list(range(sum(SIZES[: task + 1])))
            assert task_ids == [task_of(n) for n in numbers]
            if task > 0:  # the tasks are shuffled together, not served one after the other
                assert any(len(tasks) > 1 for tasks in batch_tasks)
    # a task's own data for the methods that read it, whatever the regime
    assert [int(b[1][0]) for b in datamodule.task_train_dataloader(2)] == [12, 16, 20]


def test_joint_starts_at_the_last_task_and_serves_every_task_with_its_own_task_id():
    datamodule = TaskSequenceDataModule(numbered_tasks(), numbered_tasks(100), batch_size=4, training="joint")
    assert datamodule.current_task == 2 and datamodule.tasks_seen == [2]
    numbers, task_ids, batch_tasks = served(datamodule.train_dataloader())
    assert numbers == list(range(sum(SIZES)))
    assert task_ids == [0] * 5 + [1] * 7 + [2] * 9
    assert any(len(tasks) == 3 for tasks in batch_tasks)
    assert len(datamodule.test_dataloader()) == 3  # test tasks stay one per task


def test_sequential_serves_the_task_alone_as_before():
    datamodule = TaskSequenceDataModule(numbered_tasks(), numbered_tasks(100), batch_size=4)
    datamodule.set_task(1)
    numbers, task_ids, _ = served(datamodule.train_dataloader())
    assert numbers == list(range(5, 12)) and task_ids == [1] * 7


def test_validation_follows_the_training_data():
    """Sequential: the current task's validation set; cumulative and joint: the union of the
    validation sets of the tasks trained on."""
    val = numbered_tasks(1000)
    expect = {"sequential": range(1005, 1012), "cumulative": range(1000, 1012), "joint": range(1000, 1021)}
    for training, numbers in expect.items():
        datamodule = TaskSequenceDataModule(numbered_tasks(), numbered_tasks(100), val, batch_size=4, training=training)
        if training != "joint":
            datamodule.set_task(1)
        got, task_ids, _ = served(datamodule.val_dataloader())
        assert got == list(numbers), training
        assert task_ids == [task_of(n, 1000) for n in got], training


def test_datasets_other_than_task_datasets_are_joined_too():
    tasks = [TensorDataset(torch.arange(k * 10, k * 10 + 3).float().unsqueeze(1), torch.arange(k * 10, k * 10 + 3)) for k in range(3)]
    datamodule = TaskSequenceDataModule(tasks, tasks, batch_size=2, training="cumulative")
    datamodule.set_task(1)
    assert sorted(torch.cat([b[1] for b in datamodule.train_dataloader()]).tolist()) == [0, 1, 2, 10, 11, 12]


def test_from_benchmark_passes_the_regime_through():
    benchmark = TaskSequence(numbered_tasks(), numbered_tasks(100), "task", 21, list(range(21)), [list(range(21))] * 3)
    datamodule = TaskSequenceDataModule.from_benchmark(benchmark, training="joint")
    assert datamodule.training == "joint" and datamodule.current_task == 2
    assert "training='joint'" in repr(datamodule)


def test_a_method_serving_its_own_data_sees_the_regime_s_data():
    """The methods' ``training_dataset`` hook gets what the regime serves (tasks 0..t together)."""
    seen = []

    class Watching(EWC):
        def training_dataset(self, task, dataset):
            seen.append((task, dataset))
            return None

    torch.manual_seed(0)
    module = lit_classifier(nn.Linear(1, 21))
    trainer = quiet_trainer(callbacks=[Watching(module.net)])
    datamodule = TaskSequenceDataModule(numbered_tasks(), numbered_tasks(100), batch_size=4, training="cumulative")
    fit_sequence(trainer, module, datamodule, epochs_per_task=1)
    task, dataset = seen[-1]
    assert task == 2 and isinstance(dataset, ConcatTaskDataset) and dataset.task_ids == [0, 1, 2]
    assert trainer.global_step == 2 + 3 + 6  # ceil(5/4) + ceil(12/4) + ceil(21/4)


# ---------------------------------------------------------------------------- joint training
class Heads(nn.Module):
    """One linear head per task over a shared input: ``model(x, task_ids)``."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(1, 21) for _ in SIZES)

    def forward(self, x, task_ids):
        out = torch.stack([head(x) for head in self.heads], 1)
        return out[torch.arange(len(x)), task_ids]


def multi_head_module(heads: Heads, lr: float = 0.1):
    """``lit_multi_head`` with a ``forward(x, task_ids)``, which ForgettingCurves calls."""
    module = lit_multi_head(heads, lr)
    type(module).forward = lambda self, x, task_ids: self.model(x, task_ids)  # its class is its own
    return module


class BatchTaskIds(Callback):
    def __init__(self) -> None:
        self.fits, self.pairs = 0, set()

    def on_train_start(self, trainer, pl_module):
        self.fits += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.pairs.update(zip(batch[1].tolist(), batch[2].tolist()))


def test_a_multi_head_model_trains_every_head_under_joint_training():
    torch.manual_seed(0)
    heads = Heads()
    before = [head.weight.detach().clone() for head in heads.heads]
    recorder = BatchTaskIds()
    trainer = quiet_trainer(callbacks=[recorder])
    datamodule = TaskSequenceDataModule(numbered_tasks(), numbered_tasks(100), batch_size=4, training="joint")
    fit_sequence(trainer, lit_multi_head(heads), datamodule, epochs_per_task=1)
    assert recorder.fits == 1 and trainer.global_step == 6  # one fit, ceil(21 / 4) batches
    assert recorder.pairs == {(n, task_of(n)) for n in range(21)}  # each sample with its own task id
    assert all(not torch.equal(head.weight, old) for head, old in zip(heads.heads, before))


def test_joint_training_fills_only_the_last_row_of_the_accuracy_matrix():
    torch.manual_seed(0)
    curves = ForgettingCurves()
    trainer = quiet_trainer(callbacks=[curves])
    tasks = numbered_tasks()
    datamodule = TaskSequenceDataModule(tasks, tasks, batch_size=4, training="joint")
    fit_sequence(trainer, multi_head_module(Heads(), lr=1.0), datamodule, epochs_per_task=3)
    matrix = curves.matrix.accuracies()
    assert torch.isnan(matrix[:2]).all() and not torch.isnan(matrix[2]).any()
    assert math.isclose(float(curves.matrix.average_accuracy(2)), float(matrix[2].mean()), rel_tol=1e-6)
    assert math.isnan(float(curves.matrix.backward_transfer(2))) and math.isnan(float(curves.matrix.forgetting(2)))


# ---------------------------------------------------------------------------- checkpoints
def test_a_cumulative_run_resumed_in_its_last_task_equals_the_uninterrupted_run(tmp_path):
    """Steps 1-8 are task 0 (4 batches x 2 epochs), 9-22 task 1 (7 x 2), 23-42 task 2 (10 x 2):
    step 30 is batch 7 of task 2's first epoch, step 35 batch 2 of its second."""
    uninterrupted = run(tmp_path, training="cumulative")
    assert uninterrupted["step"] == 42
    for step in (30, 35):
        checkpoint = torch.load(tmp_path / f"step={step}.ckpt", weights_only=True)
        assert checkpoint["TaskSequenceDataModule"]["current_task"] == 2
        assert checkpoint["TaskSequenceDataModule"]["training"] == "cumulative"
        assert_equal(run(tmp_path, ckpt_path=str(tmp_path / f"step={step}.ckpt"), training="cumulative"), uninterrupted, f"from step {step}")


def test_a_joint_run_resumed_inside_its_one_fit_equals_the_uninterrupted_run(tmp_path):
    """One fit on the 60 samples of the three tasks: 10 batches an epoch, 2 epochs, 20 steps; step 5
    is inside the first epoch, step 15 inside the second."""
    uninterrupted = run(tmp_path, training="joint")
    assert uninterrupted["step"] == 20
    for step in (5, 15):
        checkpoint = torch.load(tmp_path / f"step={step}.ckpt", weights_only=True)
        assert checkpoint["TaskSequenceDataModule"]["current_task"] == 2  # joint trains as the last task
        assert_equal(run(tmp_path, ckpt_path=str(tmp_path / f"step={step}.ckpt"), training="joint"), uninterrupted, f"from step {step}")


def test_a_checkpoint_of_another_regime_is_refused_before_anything_changes(tmp_path):
    run(tmp_path, training="cumulative")
    datamodule = TaskSequenceDataModule(numbered_tasks(), numbered_tasks(100))
    message = (
        "the checkpoint was written with TaskSequenceDataModule(training='cumulative'), but this data module has "
        "training='sequential': resume it with training='cumulative', or start the 'sequential' run afresh"
    )
    torch.manual_seed(0)
    module = lit_classifier(nn.Linear(1, 21))
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ValueError, match=re.escape(message)):
        fit_sequence(quiet_trainer(), module, datamodule, epochs_per_task=1, ckpt_path=str(tmp_path / "step=30.ckpt"))
    assert datamodule.current_task == 0 and all(torch.equal(a, b) for a, b in zip(module.parameters(), before))


def test_state_holds_the_regime_and_old_states_load_as_sequential():
    joint = TaskSequenceDataModule(numbered_tasks(), numbered_tasks(100), training="joint")
    assert joint.state_dict()["training"] == "joint"
    old = {key: value for key, value in TaskSequenceDataModule(numbered_tasks(), numbered_tasks(100)).state_dict().items() if key != "training"}
    old["current_task"] = 1
    sequential = TaskSequenceDataModule(numbered_tasks(), numbered_tasks(100))
    sequential.load_state_dict(old)
    assert sequential.current_task == 1
    with pytest.raises(ValueError, match=re.escape("checkpoint was written with TaskSequenceDataModule(training='sequential')")):
        joint.load_state_dict(old)
    assert joint.current_task == 2


@pytest.mark.parametrize("training", ["offline", "Joint", None, 1])
def test_an_unknown_regime_is_refused(training):
    message = f"training must be one of 'sequential', 'cumulative', 'joint', got {training!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        TaskSequenceDataModule(numbered_tasks(), numbered_tasks(100), training=training)


# ---------------------------------------------------------------------------- seen classes
class RecordSeen(Callback):
    """The mask's seen classes at each fit's first batch and at its end."""

    def __init__(self, mask) -> None:
        self.mask, self.at_start, self.at_end = mask, [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0 and trainer.current_epoch == trainer.datamodule.task_start["epoch"]:
            self.at_start.append(self.mask.seen_classes)

    def on_train_end(self, trainer, pl_module) -> None:
        self.at_end.append(self.mask.seen_classes)


def class_tasks() -> list[TaskDataset]:
    """Three tasks of two classes each (0-1, 2-3, 4-5), as a class-incremental split labels them."""
    generator = torch.Generator().manual_seed(0)
    return [TaskDataset(torch.randn(8, 4, generator=generator), torch.tensor([2 * t, 2 * t + 1] * 4), t) for t in range(3)]


@pytest.mark.parametrize(
    ("training", "expected"),
    [
        ("sequential", [[0, 1], [0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]),
        ("cumulative", [[0, 1], [0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]),
        ("joint", [[0, 1, 2, 3, 4, 5]]),
    ],
)
def test_each_fit_marks_the_classes_it_trains_on_seen_before_its_first_step(training, expected):
    from neurenix.continual import SeenClassMask

    torch.manual_seed(0)
    mask = SeenClassMask(6)
    model = lit_classifier(nn.Sequential(nn.Linear(4, 6), mask))
    datamodule = TaskSequenceDataModule(class_tasks(), class_tasks(), batch_size=4, training=training)
    record = RecordSeen(mask)
    fit_sequence(quiet_trainer(callbacks=[record]), model, datamodule, epochs_per_task=1)
    assert record.at_start == expected  # marked before the fit's first step
    assert record.at_end == expected
    assert mask.seen_classes == [0, 1, 2, 3, 4, 5]


def masked_distillation_run(directory, ckpt_path=None) -> dict:
    """Three class-incremental tasks (classes 0-1, 2-3, 4-5) through a SeenClassMask, with
    distillation (its teacher a copy of the model, mask included); checkpoints every 3 steps."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from neurenix.continual import KnowledgeDistillation, SeenClassMask

    torch.manual_seed(100 if ckpt_path else 0)  # a resumed run starts from other weights
    mask = SeenClassMask(6)
    model = lit_classifier(nn.Sequential(nn.Linear(4, 6), mask))
    distillation = KnowledgeDistillation(model.net, alpha="1-1/t")
    checkpoints = [] if ckpt_path else [ModelCheckpoint(dirpath=directory, filename="{step}", every_n_train_steps=3, save_top_k=-1)]
    teachers = TeacherMasks(distillation)
    trainer = quiet_trainer(callbacks=[distillation, teachers, *checkpoints], enable_checkpointing=not ckpt_path)
    datamodule = TaskSequenceDataModule(class_tasks(), class_tasks(), batch_size=4)
    fit_sequence(trainer, model, datamodule, epochs_per_task=2, ckpt_path=ckpt_path)
    return {"params": [p.detach().clone() for p in model.parameters()], "seen": mask.seen.clone(),
            "teacher_seen": teachers.seen, "step": trainer.global_step}


class TeacherMasks(Callback):
    """The seen classes of the distillation teacher's mask during each fit, read at its last batch
    (the fit's end makes the task's own teacher)."""

    def __init__(self, distillation) -> None:
        self.distillation, self.seen = distillation, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        teacher = self.distillation.teacher
        self.last = None if teacher is None else teacher.state_dict()["1.seen"].nonzero().flatten().tolist()

    def on_train_end(self, trainer, pl_module) -> None:
        self.seen.append(self.last)


def test_a_masked_run_resumed_mid_task_keeps_its_seen_classes_and_its_teachers(tmp_path):
    """Steps 1-4 are task 0 (2 batches x 2 epochs), 5-8 task 1, 9-12 task 2: step 6 is inside task 1
    (classes 0-3 marked, the teacher's 0-1), step 9 inside task 2."""
    uninterrupted = masked_distillation_run(tmp_path)
    assert uninterrupted["step"] == 12
    assert uninterrupted["seen"].tolist() == [True] * 6
    assert uninterrupted["teacher_seen"] == [None, [0, 1], [0, 1, 2, 3]]  # each teacher knows its own classes
    for step in (6, 9):
        resumed = masked_distillation_run(tmp_path, ckpt_path=str(tmp_path / f"step={step}.ckpt"))
        resumed_tasks = len(resumed["teacher_seen"])  # the resumed run's fits: from its checkpoint's task on
        assert resumed["teacher_seen"] == uninterrupted["teacher_seen"][-resumed_tasks:], f"from step {step}"
        assert_equal({k: resumed[k] for k in ("params", "seen", "step")}, {k: uninterrupted[k] for k in ("params", "seen", "step")}, f"from step {step}")
