"""TaskSequenceDataModule and fit_sequence: one Trainer, one fit per task, one timeline."""

from __future__ import annotations

import csv
import logging
import math
import re
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from neurenix.continual import EWC
from neurenix.data.benchmarks import split_benchmark
from neurenix.data.datamodule import TaskSequenceDataModule
from neurenix.data.sequence import fit_sequence
from neurenix.data.tasks import TaskDataset
from tests.helpers import lit_classifier, quiet_trainer

BATCH = 64


@pytest.fixture(scope="module")
def split_digits():
    return split_benchmark("digits", 3, classes_per_task=2, scenario="task", seed=0)


def make_model(outputs: int = 2):
    torch.manual_seed(0)
    return lit_classifier(nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, outputs)))


def tiny_tasks(count: int, samples: int = 10) -> list[TaskDataset]:
    return [TaskDataset(torch.full((samples, 2), float(t)), torch.zeros(samples, dtype=torch.long), t) for t in range(count)]


class Recorder(Callback):
    """Counts the hooks of each fit and records the task and global step each fit starts with."""

    def __init__(self) -> None:
        self.starts, self.ends, self.batch_task_ids = [], 0, []

    def on_train_start(self, trainer, pl_module):
        self.starts.append((trainer.datamodule.current_task, trainer.global_step))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch_task_ids.append(set(batch[2].tolist()))

    def on_train_end(self, trainer, pl_module):
        self.ends += 1


# ---------------------------------------------------------------------------- the data module
def test_current_task_and_loaders(split_digits):
    datamodule = TaskSequenceDataModule.from_benchmark(split_digits, batch_size=BATCH, eval_batch_size=50)
    assert (datamodule.num_tasks, datamodule.current_task, datamodule.tasks_seen) == (3, 0, [0])
    assert (datamodule.num_classes, datamodule.scenario) == (2, "task")
    datamodule.set_task(2)
    datamodule.set_task(1)
    assert datamodule.current_task == 1 and datamodule.tasks_seen == [0, 2, 1]
    loader = datamodule.train_dataloader()
    assert loader.dataset is split_digits.train[1] and len(loader) == math.ceil(len(split_digits.train[1]) / BATCH)
    x, y, t = next(iter(loader))
    assert x.shape == (BATCH, 64) and torch.equal(t, torch.ones(BATCH, dtype=torch.long))
    tests = datamodule.test_dataloader()
    assert [loader.dataset for loader in tests] == split_digits.test and tests[0].batch_size is None
    assert [len(batch[0]) for batch in tests[0]] == [50, len(split_digits.test[0]) - 50]
    assert datamodule.val_dataloader is None  # no validation: Lightning skips the val loop quietly


def test_validation_tasks_follow_the_current_task():
    tasks = tiny_tasks(2)
    datamodule = TaskSequenceDataModule(tasks, tasks, val_tasks=tasks[::-1])
    datamodule.set_task(1)
    assert datamodule.val_dataloader().dataset is tasks[0]


def test_other_datasets_use_pytorch_collation():
    tasks = [torch.utils.data.TensorDataset(torch.randn(6, 2), torch.arange(6))]
    batch = next(iter(TaskSequenceDataModule(tasks, tasks, batch_size=4, shuffle=False).train_dataloader()))
    assert torch.equal(batch[1], torch.arange(4))


def test_shuffle_is_seeded():
    def order(seed):
        loader = TaskSequenceDataModule(tiny_tasks(1, 30), tiny_tasks(1, 30), batch_size=30, seed=seed).train_dataloader()
        tasks = loader.dataset
        return next(iter(loader.batch_sampler)).tolist(), len(tasks)

    assert order(1) == order(1) and order(1) != order(2)
    unshuffled = TaskSequenceDataModule(tiny_tasks(1, 30), tiny_tasks(1, 30), batch_size=30, shuffle=False)
    assert next(iter(unshuffled.train_dataloader().batch_sampler)).tolist() == list(range(30))


def test_state_dict_round_trip():
    datamodule = TaskSequenceDataModule(tiny_tasks(4, 30), tiny_tasks(4, 30), batch_size=30)
    datamodule.set_task(2)
    list(datamodule.train_dataloader())  # advance the shuffling generator by one epoch
    state = datamodule.state_dict()
    restored = TaskSequenceDataModule(tiny_tasks(4, 30), tiny_tasks(4, 30), batch_size=30)
    restored.load_state_dict(state)
    assert (restored.current_task, restored.tasks_seen, restored.task_start) == (2, [0, 2], {"epoch": 0, "step": 0})
    next_epoch = [b.tolist() for b in datamodule.train_dataloader().batch_sampler]
    assert [b.tolist() for b in restored.train_dataloader().batch_sampler] == next_epoch
    restored.load_state_dict({"current_task": 1})  # an older state without the later keys
    assert restored.tasks_seen == [0, 1]


# ---------------------------------------------------------------------------- fit_sequence
def test_fit_sequence_one_fit_per_task_on_one_timeline(split_digits, tmp_path):
    model, datamodule, recorder = make_model(), TaskSequenceDataModule.from_benchmark(split_digits, batch_size=BATCH), Recorder()
    ewc = EWC(model.net, importance=10.0, fisher_sample_size=32)
    logger = CSVLogger(tmp_path, name="run")
    trainer = quiet_trainer(callbacks=[recorder, ewc], logger=logger, log_every_n_steps=1)
    fit_sequence(trainer, model, datamodule, epochs_per_task=2)

    steps = [2 * math.ceil(len(task) / BATCH) for task in split_digits.train]
    assert recorder.starts == [(0, 0), (1, steps[0]), (2, steps[0] + steps[1])]
    assert recorder.ends == 3 and trainer.global_step == sum(steps) and trainer.current_epoch == 6
    assert recorder.batch_task_ids == [{0}] * steps[0] + [{1}] * steps[1] + [{2}] * steps[2]
    assert datamodule.current_task == 2 and datamodule.tasks_seen == [0, 1, 2]
    assert ewc.finished_tasks == [0, 1, 2]
    assert [path.name for path in (tmp_path / "run").iterdir()] == ["version_0"]  # one timeline, one log


def test_fit_sequence_logs_one_continuous_timeline(split_digits, tmp_path):
    class Logging(type(make_model())):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("train_loss", loss)
            return loss

    model = Logging()
    trainer = quiet_trainer(logger=CSVLogger(tmp_path, name="run"), log_every_n_steps=1)
    fit_sequence(trainer, model, TaskSequenceDataModule.from_benchmark(split_digits, batch_size=BATCH), steps_per_task=3)
    assert trainer.global_step == 9
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as file:
        logged = [int(row["step"]) for row in csv.DictReader(file) if row.get("train_loss")]
    assert logged == list(range(9))  # the step never restarts at a new task


def test_a_sequence_of_many_tasks_is_one_tensorboard_event_file_with_every_point(split_digits, tmp_path):
    """Lightning closes a TensorBoard writer at the end of each fit; a new event file per task,
    named within the same second, sorts ``...10`` before ``...9`` and TensorBoard drops points.
    fit_sequence keeps the loggers open until the sequence ends."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tasks = 12
    train, test = split_digits.train, split_digits.test
    datamodule = TaskSequenceDataModule([train[t % 3] for t in range(tasks)], [test[t % 3] for t in range(tasks)], batch_size=BATCH)

    class Logging(type(make_model())):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("train_loss", loss)
            return loss

    logger = TensorBoardLogger(tmp_path, name="run", default_hp_metric=False)
    trainer = quiet_trainer(logger=logger, log_every_n_steps=1)
    fit_sequence(trainer, Logging(), datamodule, steps_per_task=2)
    files = list(Path(logger.log_dir).glob("events.out.tfevents.*"))
    assert len(files) == 1, files
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert [event.step for event in events.Scalars("train_loss")] == list(range(2 * tasks))
    assert logger._experiment is None or logger._experiment.file_writer is None  # finalized at the end


def test_a_failing_sequence_still_finalizes_its_loggers(split_digits, tmp_path):
    finalized = []

    class Recording(CSVLogger):
        def finalize(self, status):
            finalized.append(status)
            super().finalize(status)

    class Failing(Callback):
        def on_train_end(self, trainer, pl_module):
            if trainer.datamodule.current_task == 1:
                raise RuntimeError("task 1 failed")

    trainer = quiet_trainer(logger=Recording(tmp_path, name="run"), callbacks=[Failing()])
    with pytest.raises(RuntimeError, match="task 1 failed"):
        fit_sequence(trainer, make_model(), TaskSequenceDataModule.from_benchmark(split_digits, batch_size=BATCH), steps_per_task=2)
    assert finalized == ["failed"]  # once, at the end, not after task 0
    assert "finalize" not in trainer.logger.__dict__  # the logger is as it was


def test_fit_sequence_by_steps_starts_each_task_on_a_fresh_epoch(split_digits):
    recorder = Recorder()
    datamodule = TaskSequenceDataModule.from_benchmark(split_digits, batch_size=BATCH)
    trainer = quiet_trainer(callbacks=[recorder])
    fit_sequence(trainer, make_model(), datamodule, steps_per_task=7)  # 7 = one epoch (5) and 2 steps
    assert recorder.starts == [(0, 0), (1, 7), (2, 14)] and trainer.global_step == 21
    assert recorder.batch_task_ids == [{0}] * 7 + [{1}] * 7 + [{2}] * 7


def test_fit_sequence_continues_from_the_current_task(split_digits):
    recorder = Recorder()
    datamodule = TaskSequenceDataModule.from_benchmark(split_digits, batch_size=BATCH)
    datamodule.set_task(1)
    fit_sequence(quiet_trainer(callbacks=[recorder]), make_model(), datamodule, epochs_per_task=1)
    assert [task for task, _ in recorder.starts] == [1, 2] and recorder.ends == 2


@pytest.mark.filterwarnings("ignore:.*Checkpoint directory .* exists and is not empty")
@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint need to be provided")
def test_fit_sequence_resumes_from_a_checkpoint_exactly(split_digits, tmp_path):
    def run(ckpt_path=None, checkpoints=False):
        model = make_model()
        ewc = EWC(model.net, importance=10.0, fisher_sample_size=32)
        callbacks = [ewc] + ([ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1)] if checkpoints else [])
        trainer = quiet_trainer(callbacks=callbacks, enable_checkpointing=checkpoints)
        datamodule = TaskSequenceDataModule.from_benchmark(split_digits, batch_size=BATCH)
        fit_sequence(trainer, model, datamodule, epochs_per_task=2, ckpt_path=ckpt_path)
        return model, ewc, trainer

    uninterrupted, _, trainer = run(checkpoints=True)
    middle_of_task_1 = next(tmp_path.glob("epoch=2-*.ckpt"))  # after 3 of the 6 epochs
    resumed, ewc, resumed_trainer = run(ckpt_path=str(middle_of_task_1))
    assert resumed_trainer.global_step == trainer.global_step and ewc.finished_tasks == [0, 1, 2]
    for a, b in zip(uninterrupted.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_test_loaders_measure_every_task(split_digits):
    class Evaluated(type(make_model())):
        def test_step(self, batch, batch_idx, dataloader_idx=0):
            x, y, t = batch
            self.log("task_id", t.float().mean())
            self.log("accuracy", (self(x).argmax(1) == y).float().mean())

    datamodule = TaskSequenceDataModule.from_benchmark(split_digits, batch_size=BATCH)
    results = quiet_trainer().test(Evaluated(), datamodule=datamodule, verbose=False)
    assert [r[f"task_id/dataloader_idx_{i}"] for i, r in enumerate(results)] == [0.0, 1.0, 2.0]


# ---------------------------------------------------------------------------- bad input
def test_bad_task_lists_name_the_argument():
    with pytest.raises(ValueError, match=r"train_tasks must hold at least one task, got \[\]"):
        TaskSequenceDataModule([], [])
    with pytest.raises(ValueError, match=r"test_tasks must hold one dataset per training task \(3\), got 2"):
        TaskSequenceDataModule(tiny_tasks(3), tiny_tasks(2))
    with pytest.raises(ValueError, match=r"val_tasks must hold one dataset per training task \(2\), got 1"):
        TaskSequenceDataModule(tiny_tasks(2), tiny_tasks(2), val_tasks=tiny_tasks(1))
    with pytest.raises(TypeError, match="train_tasks must be a list of datasets, one per task, got TaskDataset"):
        TaskSequenceDataModule(tiny_tasks(1)[0], tiny_tasks(1))
    with pytest.raises(ValueError, match=r"test_tasks\[0\] is empty"):
        TaskSequenceDataModule(tiny_tasks(1), [torch.utils.data.TensorDataset(torch.zeros(0))])
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        TaskSequenceDataModule(tiny_tasks(1), tiny_tasks(1), batch_size=0)
    with pytest.raises(ValueError, match=r"task must be in 0..1 \(2 tasks\), got 2"):
        TaskSequenceDataModule(tiny_tasks(2), tiny_tasks(2)).set_task(2)


def test_bad_fit_sequence_arguments(split_digits):
    datamodule = TaskSequenceDataModule.from_benchmark(split_digits)
    trainer, model = quiet_trainer(), make_model()
    with pytest.raises(ValueError, match="exactly one of epochs_per_task and steps_per_task.*None.*None"):
        fit_sequence(trainer, model, datamodule)
    with pytest.raises(ValueError, match="epochs_per_task=1 and steps_per_task=5"):
        fit_sequence(trainer, model, datamodule, epochs_per_task=1, steps_per_task=5)
    with pytest.raises(ValueError, match="epochs_per_task must be >= 1, got 0"):
        fit_sequence(trainer, model, datamodule, epochs_per_task=0)
    with pytest.raises(TypeError, match="steps_per_task must be an int, got float: 2.5"):
        fit_sequence(trainer, model, datamodule, steps_per_task=2.5)
    with pytest.raises(TypeError, match="datamodule must be a TaskSequenceDataModule, got LightningDataModule"):
        fit_sequence(trainer, model, L.LightningDataModule(), epochs_per_task=1)


class _SilentSecondTask(TaskSequenceDataModule):
    """Task 1's training loader yields nothing (a custom loader, a sampler that filters everything)."""

    def train_dataloader(self):
        if self.current_task == 1:
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(0, 2)), batch_size=4)
        return super().train_dataloader()


class _FitCounter(Callback):
    def __init__(self) -> None:
        self.fits = 0

    def on_fit_start(self, trainer, pl_module):
        self.fits += 1


def test_fit_sequence_refuses_a_task_without_batches_before_its_fit():
    model = lit_classifier(nn.Linear(2, 2))
    ewc, counter = EWC(model.net), _FitCounter()
    datamodule = _SilentSecondTask(tiny_tasks(3), tiny_tasks(3), batch_size=4)
    message = "task 1's training loader yields no batches (train_dataloader() has length 0)"
    with pytest.raises(ValueError, match=re.escape(message)):
        fit_sequence(quiet_trainer(callbacks=[ewc, counter]), model, datamodule, epochs_per_task=1)
    assert counter.fits == 1 and ewc.finished_tasks == [0] and ewc.active_task is None
    assert datamodule.current_task == 1


def test_fit_sequence_refuses_a_trainer_that_limits_training_to_no_batches():
    counter = _FitCounter()
    message = "task 0's training loader yields no batches: the Trainer was built with limit_train_batches=0.0"
    with pytest.raises(ValueError, match=re.escape(message)):
        fit_sequence(quiet_trainer(callbacks=[counter], limit_train_batches=0.0), lit_classifier(nn.Linear(2, 2)),
                     TaskSequenceDataModule(tiny_tasks(2), tiny_tasks(2)), epochs_per_task=1)  # fmt: skip
    assert counter.fits == 0


def test_fit_sequence_refuses_a_checkpoint_of_a_longer_sequence_before_loading_it(tmp_path):
    trainer = quiet_trainer()
    fit_sequence(trainer, lit_classifier(nn.Linear(2, 2)), TaskSequenceDataModule(tiny_tasks(3), tiny_tasks(3)), epochs_per_task=1)
    path = tmp_path / "three-tasks.ckpt"
    trainer.save_checkpoint(path)
    datamodule = TaskSequenceDataModule(tiny_tasks(2), tiny_tasks(2))
    before = datamodule.state_dict()
    message = (
        f"ckpt_path={str(path)!r} was saved in task 2, but the datamodule has 2 tasks (0..1): the checkpoint "
        "was written by a sequence with more tasks than this datamodule has"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        fit_sequence(quiet_trainer(), lit_classifier(nn.Linear(2, 2)), datamodule, epochs_per_task=1, ckpt_path=str(path))
    after = datamodule.state_dict()
    assert after.pop("shuffle_generator").equal(before.pop("shuffle_generator")) and after == before


# ---------------------------------------------------------------------------- output
class _SameWarningEveryTask(Callback):
    def on_train_start(self, trainer, pl_module):
        warnings.warn("not Lightning's: shown every time")


def _sequence_output(tmp_path: Path, run: int, stale_checkpoint: bool = True) -> tuple[list[str], list[str]]:
    """Lightning's log lines and every warning shown over a 3-task sequence; warnings are shown
    every time they are issued (as under ``-W always``), so only fit_sequence can drop repeats."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    if stale_checkpoint:
        (tmp_path / "checkpoints").mkdir(exist_ok=True)
        (tmp_path / "checkpoints" / "old.ckpt").touch()  # "Checkpoint directory ... exists and is not empty"
    sizes = [8, 12, 16]  # 2, 3 and 4 batches: "The number of training batches (N) ..." differs by task
    tasks = [TaskDataset(torch.randn(n, 2), torch.zeros(n, dtype=torch.long), t) for t, n in enumerate(sizes)]
    trainer = quiet_trainer(
        callbacks=[_SameWarningEveryTask(), ModelCheckpoint(dirpath=tmp_path / "checkpoints")], enable_checkpointing=True,
        enable_model_summary=True, logger=CSVLogger(tmp_path, name=f"run{run}"), log_every_n_steps=50,
    )  # fmt: skip
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit_sequence(trainer, lit_classifier(nn.Linear(2, 2)), TaskSequenceDataModule(tasks, tasks, batch_size=4), epochs_per_task=1)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    return [record.getMessage() for record in records], [str(warning.message) for warning in caught]


def test_lightning_notes_are_shown_once_per_sequence_and_notes_that_differ_each_time(tmp_path):
    for run in range(2):  # a second sequence shows them again, once
        lines, shown = _sequence_output(tmp_path, run)
        assert sum("Trainable params" in line for line in lines) == 1  # the model summary
        assert [line for line in lines if "`Trainer.fit` stopped" in line] == [
            f"`Trainer.fit` stopped: `max_epochs={epoch}` reached." for epoch in (1, 2, 3)
        ]
        assert sum("exists and is not empty" in text for text in shown) == 1
        assert [re.search(r"training batches \((\d)\)", text)[1] for text in shown if "training batches" in text] == ["2", "3", "4"]
        assert shown.count("not Lightning's: shown every time") == 3


def test_a_sequence_does_not_remark_on_the_checkpoints_it_wrote_itself(tmp_path):
    # Task 0's fit writes a checkpoint; ModelCheckpoint then warned at task 1 that the folder "exists
    # and is not empty", about the sequence's own file.
    _, shown = _sequence_output(tmp_path, 0, stale_checkpoint=False)
    assert list((tmp_path / "checkpoints").iterdir())  # the sequence did write there
    assert not [text for text in shown if "exists and is not empty" in text]


def test_task_train_dataloader_reads_a_task_in_order_whatever_the_current_task():
    tasks = tiny_tasks(2)
    datamodule = TaskSequenceDataModule(tasks, tasks, batch_size=3, eval_batch_size=4)
    batches = list(datamodule.task_train_dataloader(1))
    assert [len(b[0]) for b in batches] == [4, 4, 2] and datamodule.current_task == 0
    assert torch.equal(torch.cat([b[0] for b in batches]), tasks[1][:][0])
    with pytest.raises(ValueError, match=r"task must be in 0..1 \(2 tasks\), got 2"):
        datamodule.task_train_dataloader(2)


def test_a_method_on_the_trainer_can_serve_the_training_data_in_place_of_the_task():
    """The ``training_dataset`` hook of the neurenix methods (GDumb's memory): the fit trains on
    what the method serves; a method that serves nothing leaves the task's own data."""
    tasks = tiny_tasks(1, samples=10)
    served = TaskDataset(tasks[0].inputs[:4], tasks[0].targets[:4], 0)

    class Serving(EWC):
        def training_dataset(self, task, dataset):
            assert task == 0 and dataset is tasks[0]
            return served

    for method, steps in ((EWC, 4), (Serving, 2)):  # ceil(10 / 3) batches of the task, ceil(4 / 3) of the served data
        torch.manual_seed(0)
        module = lit_classifier(nn.Linear(2, 2))
        trainer = quiet_trainer(callbacks=[method(module.net)])
        fit_sequence(trainer, module, TaskSequenceDataModule(tasks, tasks, batch_size=3), epochs_per_task=1)
        assert trainer.global_step == steps
