"""fit_sequence resumed from a checkpoint written anywhere in an epoch; checkpoints it cannot read.

The end-to-end kill-and-resume matrix over every method is tests/reliability/test_resume.py; here
one short sequence checks each kind of training loader the data module builds.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from torch import nn
from torch.utils.data import TensorDataset

from neurenix.continual import EWC, ExperienceReplay
from neurenix.data.datamodule import TaskSequenceDataModule
from neurenix.data.sequence import fit_sequence
from neurenix.data.tasks import TaskDataset
from tests.helpers import lit_classifier, quiet_trainer

TASKS, SAMPLES, BATCH, EPOCHS = 3, 20, 6, 2  # four batches an epoch (the last one short), 24 steps
EVERY = 5  # checkpoints at steps 5, 10, 15, 20: batch 0, 1, 2 and 3 (the last) of an epoch


def tasks(seed: int, tensor_dataset: bool) -> list:
    generator = torch.Generator().manual_seed(seed)
    made = []
    for task in range(TASKS):
        x = torch.randn(SAMPLES, 4, generator=generator)
        y = torch.randint(0, 3, (SAMPLES,), generator=generator)
        made.append(TensorDataset(x, y) if tensor_dataset else TaskDataset(x, y, task))
    return made


def run(directory: Path, ckpt_path=None, *, tensor_dataset=False, steps_per_task=None, **options):
    """The sequence with EWC and replay; checkpoints every EVERY steps unless resuming."""
    shift = 100 if ckpt_path else 0  # a resumed run starts from other weights and seeds
    torch.manual_seed(shift)
    model = lit_classifier(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)))
    methods = [EWC(model.net, importance=10.0, fisher_sample_size=8, seed=shift), ExperienceReplay(model.net, memory_size=6, seed=shift)]
    checkpoints = [] if ckpt_path else [ModelCheckpoint(dirpath=directory, filename="{step}", every_n_train_steps=EVERY, save_top_k=-1)]
    trainer = quiet_trainer(callbacks=[*methods, *checkpoints], enable_checkpointing=not ckpt_path)
    datamodule = TaskSequenceDataModule(tasks(1, tensor_dataset), tasks(2, tensor_dataset), batch_size=BATCH, seed=shift, **options)
    budget = dict(steps_per_task=steps_per_task) if steps_per_task else dict(epochs_per_task=EPOCHS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_sequence(trainer, model, datamodule, ckpt_path=ckpt_path, **budget)
    assert not [w for w in caught if "dataloader is" in str(w.message) and "not resumable" in str(w.message)]
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "methods": [method.state_dict() for method in methods],
        "step": trainer.global_step,
    }


def assert_equal(got, want, path="") -> None:
    if isinstance(want, dict):
        assert got.keys() == want.keys(), path
        for key in want:
            assert_equal(got[key], want[key], f"{path}/{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), path
        for index, (a, b) in enumerate(zip(got, want)):
            assert_equal(a, b, f"{path}[{index}]")
    elif isinstance(want, torch.Tensor):
        assert torch.equal(got, want), f"{path}: largest difference {(got.double() - want.double()).abs().max()}"
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


CASES = {
    "shuffled": ({}, [5, 10, 15, 20]),
    "unshuffled": ({"shuffle": False}, [10]),
    "workers": ({"num_workers": 2}, [10]),
    "per_sample_datasets": ({"tensor_dataset": True}, [10]),
    "by_steps": ({"steps_per_task": 7}, [5, 10, 15]),  # tasks end inside an epoch
}


@pytest.mark.parametrize("options,steps", CASES.values(), ids=CASES.keys())
def test_a_checkpoint_written_anywhere_in_an_epoch_resumes_exactly(tmp_path, options, steps):
    """Parameters and every method's state (the replay memory, its generator, EWC's Fisher)
    equal the uninterrupted run's, bit for bit."""
    uninterrupted = run(tmp_path, **options)
    for step in steps:
        resumed = run(tmp_path, ckpt_path=str(tmp_path / f"step={step}.ckpt"), **options)
        assert_equal(resumed, uninterrupted, f"from step {step}")


def test_the_checkpoint_holds_where_the_epoch_stood(tmp_path):
    run(tmp_path)
    checkpoint = torch.load(tmp_path / "step=10.ckpt", weights_only=True)
    (loader,) = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader["batches"] == 2  # step 10 is batch 1 of epoch 2: two batches served
    assert set(loader["sampler"]) == {"generator"}
    assert checkpoint["TaskSequenceDataModule"]["current_task"] == 1


def test_an_exception_checkpoint_neither_resumes_each_task_nor_is_lost(tmp_path):
    """Given an OnExceptionCheckpoint, Lightning resumes every fit(ckpt_path=None) from the last
    checkpoint; fit_sequence's later tasks must start from the state in memory."""

    class Failing(EWC):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 17:
                raise RuntimeError("stop in task 2")

    plain = run(tmp_path / "plain")
    torch.manual_seed(0)
    model = lit_classifier(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)))
    methods = [EWC(model.net, importance=10.0, fisher_sample_size=8, seed=0), ExperienceReplay(model.net, memory_size=6, seed=0)]
    callbacks = [*methods, ModelCheckpoint(dirpath=tmp_path, save_last=True), OnExceptionCheckpoint(tmp_path)]
    trainer = quiet_trainer(callbacks=callbacks, enable_checkpointing=True)
    datamodule = TaskSequenceDataModule(tasks(1, False), tasks(2, False), batch_size=BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit_sequence(trainer, model, datamodule, epochs_per_task=EPOCHS)
    assert [method.finished_tasks for method in methods] == [[0, 1, 2]] * 2
    assert_equal([p.detach() for p in model.parameters()], plain["params"])
    assert trainer.callbacks[-1] is callbacks[-1]  # the user's callback is back in its place

    failing = quiet_trainer(callbacks=[Failing(model.net, importance=1.0), OnExceptionCheckpoint(tmp_path, "failed")], enable_checkpointing=True)
    with pytest.raises(RuntimeError, match="stop in task 2"):
        fit_sequence(failing, model, TaskSequenceDataModule(tasks(1, False), tasks(2, False), batch_size=BATCH), epochs_per_task=EPOCHS)
    assert torch.load(tmp_path / "failed.ckpt", weights_only=True)["global_step"] == 17


# ---------------------------------------------------------------------------- unreadable checkpoints
@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A real checkpoint of a one-task sequence."""
    directory = tmp_path_factory.mktemp("saved")
    trainer = quiet_trainer()
    fit_sequence(trainer, lit_classifier(nn.Linear(4, 3)), TaskSequenceDataModule(tasks(1, False)[:1], tasks(2, False)[:1]), epochs_per_task=1)
    trainer.save_checkpoint(directory / "good.ckpt")
    return directory / "good.ckpt"


def _unreadable(kind: str, saved: Path, directory: Path) -> Path:
    path = directory / f"{kind}.ckpt"
    if kind == "truncated":
        path.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    elif kind == "random_bytes":
        path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes())
    elif kind == "text":
        path.write_text("epoch=3 step=120\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "directory":
        path.mkdir()
    return path


UNREADABLE = ["truncated", "random_bytes", "text", "empty"]


def _fresh():
    return lit_classifier(nn.Linear(4, 3)), TaskSequenceDataModule(tasks(1, False)[:2], tasks(2, False)[:2])


@pytest.mark.parametrize("kind", UNREADABLE)
def test_an_unreadable_checkpoint_is_named_and_called_unreadable(saved, tmp_path, kind):
    path = _unreadable(kind, saved, tmp_path)
    model, datamodule = _fresh()
    before = [p.detach().clone() for p in model.parameters()]
    message = f"ckpt_path={str(path)!r} cannot be read as a checkpoint: the file is truncated or corrupt, or is not a checkpoint"
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        fit_sequence(quiet_trainer(), model, datamodule, epochs_per_task=1, ckpt_path=str(path))
    assert "weights_only" not in str(caught.value) and caught.value.__cause__ is None
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before)) and datamodule.current_task == 0


def test_a_directory_is_not_a_checkpoint_file(saved, tmp_path):
    path = _unreadable("directory", saved, tmp_path)
    message = f"ckpt_path={str(path)!r} is a directory, not a checkpoint file"
    with pytest.raises(IsADirectoryError, match=re.escape(message)):
        fit_sequence(quiet_trainer(), *_fresh(), epochs_per_task=1, ckpt_path=str(path))


def test_a_missing_checkpoint_is_said_not_to_exist(tmp_path):
    path = tmp_path / "nowhere" / "last.ckpt"
    with pytest.raises(FileNotFoundError, match=re.escape(f"ckpt_path={str(path)!r} does not exist")):
        fit_sequence(quiet_trainer(), *_fresh(), epochs_per_task=1, ckpt_path=str(path))


def test_a_file_of_other_tensors_is_not_a_lightning_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(nn.Linear(4, 3).state_dict(), path)
    message = f"ckpt_path={str(path)!r} is not a Lightning checkpoint (it holds a dict with keys ['weight', 'bias'])"
    with pytest.raises(ValueError, match=re.escape(message)):
        fit_sequence(quiet_trainer(), *_fresh(), epochs_per_task=1, ckpt_path=str(path))


class Unlisted:
    """An object torch.load does not unpickle by default."""


def test_a_checkpoint_of_unlisted_objects_says_how_to_allow_them(saved, tmp_path):
    checkpoint = torch.load(saved, weights_only=True)
    checkpoint["hyper_parameters"] = {"extra": Unlisted()}
    path = tmp_path / "objects.ckpt"
    torch.save(checkpoint, path)
    message = (
        f"ckpt_path={str(path)!r} holds Python objects that torch.load does not load by default "
        f"({__name__}.Unlisted); if you trust the file, allow them with torch.serialization.add_safe_globals"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        fit_sequence(quiet_trainer(), *_fresh(), epochs_per_task=1, ckpt_path=str(path))


def test_a_readable_checkpoint_still_resumes(saved):
    model, datamodule = _fresh()
    fit_sequence(quiet_trainer(), model, datamodule, epochs_per_task=1, ckpt_path=str(saved))
    assert datamodule.current_task == 1


def test_a_file_without_read_permission(saved, tmp_path, monkeypatch):
    path = tmp_path / "locked.ckpt"
    path.write_bytes(saved.read_bytes())
    path.chmod(0)
    trainer = quiet_trainer()
    if os.geteuid() == 0:  # root reads any file: let the strategy's reader meet what others would
        def refuse(checkpoint_path, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(checkpoint_path))

        monkeypatch.setattr(trainer.strategy, "load_checkpoint", refuse)
    with pytest.raises(PermissionError, match=re.escape(f"ckpt_path={str(path)!r} cannot be read: permission denied")):
        fit_sequence(trainer, *_fresh(), epochs_per_task=1, ckpt_path=str(path))
