"""fit_sequence(keep_optimizer_state=...): a fresh optimizer per task, or one state for the sequence."""

from __future__ import annotations

import re
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from neurenix.data.datamodule import TaskSequenceDataModule
from neurenix.data.sequence import _first_difference, _layout, fit_sequence
from neurenix.data.tasks import TaskDataset
from tests.helpers import quiet_trainer

TASKS, SAMPLES, BATCH, EPOCHS = 3, 20, 6, 2  # 4 batches an epoch, 8 steps a task, 24 in all


def tasks(seed: int) -> list[TaskDataset]:
    generator = torch.Generator().manual_seed(seed)
    return [TaskDataset(torch.randn(SAMPLES, 4, generator=generator), torch.randint(0, 3, (SAMPLES,), generator=generator), t) for t in range(TASKS)]


class AdamClassifier(L.LightningModule):
    """A classifier trained with Adam, built afresh by each fit's ``configure_optimizers``."""

    def __init__(self, seed: int = 0, optimizer_at_task=None) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        self.optimizer_at_task = optimizer_at_task  # task -> optimizer, for a structure that changes

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        if self.optimizer_at_task is not None:
            return self.optimizer_at_task(self, self.trainer.datamodule.current_task)
        return torch.optim.Adam(self.parameters(), lr=0.01)


class AdamSteps(Callback):
    """Adam's step count after each training step."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        optimizer = trainer.optimizers[0]
        self.steps.append(int(optimizer.state[optimizer.param_groups[0]["params"][0]]["step"]))


def sequence(keep: bool, *, callbacks=(), ckpt_path=None, seed: int = 0, model=None, **trainer_options):
    model = model or AdamClassifier(seed)
    trainer = quiet_trainer(callbacks=list(callbacks), **trainer_options)
    datamodule = TaskSequenceDataModule(tasks(1), tasks(2), batch_size=BATCH, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's notes about few batches and workers
        fit_sequence(trainer, model, datamodule, epochs_per_task=EPOCHS, keep_optimizer_state=keep, ckpt_path=ckpt_path)
    return model, trainer


def test_by_default_each_task_starts_with_a_fresh_optimizer():
    counter = AdamSteps()
    sequence(False, callbacks=[counter])
    assert counter.steps == list(range(1, 9)) * TASKS


def test_kept_the_optimizer_state_runs_on_across_tasks():
    counter = AdamSteps()
    _, trainer = sequence(True, callbacks=[counter])
    assert counter.steps == list(range(1, 25))
    assert [type(c) for c in trainer.callbacks] == [type(c) for c in quiet_trainer(callbacks=[counter]).callbacks]  # nothing left behind


def plain_loop() -> list[torch.Tensor]:
    """The same batches through one Adam that is never rebuilt, without Lightning."""
    model = AdamClassifier(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    datamodule = TaskSequenceDataModule(tasks(1), tasks(2), batch_size=BATCH, seed=0)
    for task in range(TASKS):
        datamodule.set_task(task)
        loader = datamodule.train_dataloader()
        for _ in range(EPOCHS):
            for batch in loader:
                optimizer.zero_grad()
                model.training_step(batch, 0).backward()
                optimizer.step()
    return [p.detach() for p in model.parameters()]


def test_kept_state_trains_as_one_optimizer_over_the_whole_sequence():
    reference = plain_loop()
    kept, _ = sequence(True)
    assert all(torch.equal(a, b) for a, b in zip(kept.parameters(), reference))
    fresh, _ = sequence(False)  # the reference tells the two apart
    assert not all(torch.equal(a, b) for a, b in zip(fresh.parameters(), reference))


def test_the_learning_rate_and_other_hyper_parameters_are_carried():
    class Decaying(Callback):
        def on_train_end(self, trainer, pl_module):
            trainer.optimizers[0].param_groups[0]["lr"] *= 0.5

    seen = []

    class Rate(Callback):
        def on_train_start(self, trainer, pl_module):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    sequence(True, callbacks=[Decaying(), Rate()])
    assert seen == [0.01, 0.005, 0.0025]


def test_optimizers_of_another_structure_are_refused_at_the_next_task():
    def sgd_from_task_1(module, task):
        kind = torch.optim.Adam if task == 0 else torch.optim.SGD
        return kind(module.parameters(), lr=0.01)

    message = (
        "fit_sequence(keep_optimizer_state=True) cannot carry task 0's optimizer state into task 1: optimizer 0 is "
        "Adam at task 0 and SGD at task 1; configure_optimizers must return optimizers of the same number, types, "
        "param groups and parameter shapes at every task, or use keep_optimizer_state=False"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        sequence(True, model=AdamClassifier(0, sgd_from_task_1))
    sequence(False, model=AdamClassifier(0, sgd_from_task_1))  # fresh optimizers: nothing to carry

    def head_only_from_task_1(module, task):
        params = module.parameters() if task == 0 else module.net[2].parameters()
        return torch.optim.Adam(params, lr=0.01)

    with pytest.raises(ValueError, match=re.escape("param group 0 of optimizer 0 holds 4 parameters at task 0 and 2 at task 1")):
        sequence(True, model=AdamClassifier(0, head_only_from_task_1))

    def two_groups_from_task_2(module, task):
        if task < 2:
            return torch.optim.Adam(module.parameters(), lr=0.01)
        return torch.optim.Adam([{"params": module.net[0].parameters()}, {"params": module.net[2].parameters()}], lr=0.01)

    with pytest.raises(ValueError, match=re.escape("task 2: optimizer 0 has 1 param group(s) at task 1 and 2 at task 2")):
        sequence(True, model=AdamClassifier(0, two_groups_from_task_2))

    def reordered_from_task_1(module, task):  # the state would land on parameters of other shapes
        params = list(module.parameters())
        return torch.optim.Adam(params if task == 0 else params[2:] + params[:2], lr=0.01)

    with pytest.raises(ValueError, match=re.escape("parameter 0 of param group 0 of optimizer 0 has shape (8, 4) at task 0 and (3, 8) at task 1")):
        sequence(True, model=AdamClassifier(0, reordered_from_task_1))


def test_a_different_number_of_optimizers_is_said_so():
    # (Lightning's automatic optimization takes one optimizer: the count is checked on the layouts.)
    adam = torch.optim.Adam(nn.Linear(2, 1).parameters())
    layout = _layout([adam])
    assert _first_difference(layout, layout + layout, "at task 1", "at task 2") == (
        "configure_optimizers returned 1 optimizer(s) at task 1 and 2 at task 2"
    )
    assert _first_difference(layout, layout, "at task 1", "at task 2") is None


@pytest.mark.parametrize("keep_optimizer_state", [1, "yes", None])
def test_a_keep_optimizer_state_that_is_not_a_bool_is_refused(keep_optimizer_state):
    model = AdamClassifier(0)
    datamodule = TaskSequenceDataModule(tasks(1), tasks(2))
    message = f"keep_optimizer_state must be a bool, got {type(keep_optimizer_state).__name__}: {keep_optimizer_state!r}"
    with pytest.raises(TypeError, match=re.escape(message)):
        fit_sequence(quiet_trainer(), model, datamodule, epochs_per_task=1, keep_optimizer_state=keep_optimizer_state)


def test_a_resumed_sequence_carries_the_state_the_uninterrupted_one_did(tmp_path):
    """Checkpoints at task 0's last epoch end (step 8) and inside task 1 (step 10, batch 1 of
    its first epoch); resumed from other weights and seeds, the run ends where the uninterrupted one did."""
    checkpoints = [
        ModelCheckpoint(dirpath=tmp_path / "epochs", filename="{step}", every_n_epochs=1, save_top_k=-1),
        ModelCheckpoint(dirpath=tmp_path / "steps", filename="{step}", every_n_train_steps=5, save_top_k=-1),
    ]
    counter = AdamSteps()
    uninterrupted, _ = sequence(True, callbacks=[*checkpoints, counter], enable_checkpointing=True)
    want = [p.detach() for p in uninterrupted.parameters()]
    assert counter.steps == list(range(1, 25))
    for path in (tmp_path / "epochs" / "step=8.ckpt", tmp_path / "steps" / "step=10.ckpt"):
        assert torch.load(path, weights_only=True)["TaskSequenceDataModule"]["current_task"] == (0 if "epochs" in str(path) else 1)
        counter = AdamSteps()
        resumed, _ = sequence(True, callbacks=[counter], ckpt_path=str(path), seed=100)
        assert counter.steps == list(range(9 if "epochs" in str(path) else 11, 25)), path
        assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), want)), path
