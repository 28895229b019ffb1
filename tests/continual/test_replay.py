"""ExperienceReplay's training step: how many samples it replays, the loss, the API flow, Lightning."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from neurenix.continual import ContinualLossMixin, ExperienceReplay
from tests.helpers import Recorder, loader, make_mlp, make_task, saved_and_loaded


def recording_loss(log: list):
    def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log.append(targets.clone())
        return F.cross_entropy(outputs, targets)

    return loss_fn


def row_index(rows: torch.Tensor, table: torch.Tensor) -> list[int]:
    """For each row of ``rows``, the index of the equal row of ``table`` (exactly one must match)."""
    matches = (rows[:, None, :] == table[None, :, :]).all(-1)
    assert bool((matches.sum(1) == 1).all()), "a row is not (uniquely) among the stored samples"
    return matches.int().argmax(1).tolist()


def sgd_step(model: nn.Module, loss: torch.Tensor, lr: float) -> None:
    grads = torch.autograd.grad(loss, list(model.parameters()))
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p -= lr * g


# ------------------------------------------------------------------------------------ constructor


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"memory_size": -1}, ValueError, "memory_size must be >= 0, got -1"),
        ({"memory_size": 10.0}, TypeError, "memory_size must be an int, got float: 10.0"),
        ({"memory_size": "10"}, TypeError, "memory_size must be an int, got str"),
        ({"memory_size": True}, TypeError, "memory_size must be an int, got bool"),
        ({"replay_ratio": -0.5}, ValueError, "replay_ratio must be >= 0.0, got -0.5"),
        ({"replay_ratio": float("nan")}, ValueError, "replay_ratio must be finite, got nan"),
        ({"replay_ratio": "0.5"}, TypeError, "replay_ratio must be a real number, got str"),
        ({"seed": -2}, ValueError, "seed must be >= 0, got -2"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        ExperienceReplay(make_mlp(), **kwargs)


def test_documented_defaults():
    replay = ExperienceReplay(make_mlp())
    assert (replay.memory_size, replay.replay_ratio, len(replay.memory)) == (1000, 0.5, 0)


# ------------------------------------------------------------------------------------ train_step


@pytest.mark.parametrize(
    "replay_ratio, batch_size, stored, replayed",
    [
        (0.5, 8, 40, 4),
        (0.3, 10, 40, 3),  # round(3.0)
        (1.7, 3, 40, 5),  # round(5.1)
        (0.26, 10, 40, 3),  # round(2.6)
        (2.0, 8, 5, 5),  # 16 wanted, only 5 stored
        (0.04, 10, 40, 0),  # round(0.4) == 0: nothing replayed
        (0.0, 8, 40, 0),
    ],
)
def test_train_step_appends_round_ratio_times_batch_distinct_stored_samples(replay_ratio, batch_size, stored, replayed):
    recorder = Recorder(make_mlp())
    replay = ExperienceReplay(recorder, memory_size=100, replay_ratio=replay_ratio, seed=3)
    memory_x, memory_y = make_task(stored, seed=7).tensors
    replay.add_to_memory(memory_x, memory_y, task_id=0)
    recorder.inputs.clear()
    x, y = make_task(batch_size, seed=8).tensors
    targets_seen: list = []
    before = copy.deepcopy(recorder.net)
    optimizer = torch.optim.SGD(recorder.parameters(), lr=0.1)

    loss = replay.train_step(optimizer, recording_loss(targets_seen), x, y, task_id=1)

    (inputs,) = recorder.inputs
    (targets,) = targets_seen
    assert inputs.shape[0] == targets.shape[0] == batch_size + replayed
    assert torch.equal(inputs[:batch_size], x) and torch.equal(targets[:batch_size], y)
    rows = row_index(inputs[batch_size:], memory_x)
    assert len(set(rows)) == replayed  # no sample replayed twice
    assert torch.equal(targets[batch_size:], memory_y[rows])
    # The loss and the step are those of loss_fn on the concatenated batch.
    expected = F.cross_entropy(before(inputs), targets)
    assert torch.allclose(loss, expected.detach(), rtol=0, atol=1e-12)
    sgd_step(before, expected, lr=0.1)
    for p, q in zip(recorder.net.parameters(), before.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-12)


def test_train_step_with_empty_memory_trains_on_the_new_batch_only():
    recorder = Recorder(make_mlp())
    replay = ExperienceReplay(recorder, memory_size=100, replay_ratio=1.0, seed=0)
    x, y = make_task(8).tensors
    loss = replay.train_step(torch.optim.SGD(recorder.parameters(), lr=0.1), F.cross_entropy, x, y, task_id=0)
    assert [len(batch) for batch in recorder.inputs] == [8]
    assert torch.equal(recorder.inputs[0], x)
    assert loss.item() == pytest.approx(F.cross_entropy(make_mlp()(x), y).item(), abs=1e-12)


def test_train_step_does_not_add_to_memory():
    """The API document adds with add_to_memory; train_step adding too would store samples twice."""
    replay = ExperienceReplay(make_mlp(), memory_size=100, replay_ratio=0.5, seed=0)
    x, y = make_task(8).tensors
    replay.add_to_memory(x, y, task_id=0)
    replay.train_step(torch.optim.SGD(replay.model.parameters(), lr=0.1), F.cross_entropy, x, y, task_id=0)
    assert (len(replay.memory), replay.memory.num_seen) == (8, 8)


def test_api_document_flow_equals_a_hand_written_loop_with_get_replay_batch():
    """The document's loop (add_to_memory, then train_step) against the same loop written by hand."""
    model, reference = make_mlp(seed=4), make_mlp(seed=4)
    replay = ExperienceReplay(model, memory_size=12, replay_ratio=0.5, seed=21)
    sampler = ExperienceReplay(make_mlp(seed=99), memory_size=12, replay_ratio=0.5, seed=21)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    reference_optimizer = torch.optim.Adam(reference.parameters(), lr=0.01)
    tasks = {1: make_task(40, seed=1), 2: make_task(36, seed=2)}

    for task_id, data in tasks.items():
        for _ in range(2):
            for x, y in loader(data, batch_size=7):
                replay.add_to_memory(x, y, task_id=task_id)
                loss = replay.train_step(optimizer, nn.CrossEntropyLoss(), x, y, task_id=task_id)

                sampler.add_to_memory(x, y, task_id=task_id)
                count = round(0.5 * len(x))  # task 2's last batch has 1 sample: round(0.5) == 0
                if count:
                    old_x, old_y, _ = sampler.get_replay_batch(count)
                    x, y = torch.cat([x, old_x]), torch.cat([y, old_y])
                reference_optimizer.zero_grad()
                expected = F.cross_entropy(reference(x), y)
                expected.backward()
                reference_optimizer.step()
                assert loss.item() == pytest.approx(expected.item(), abs=1e-12)

    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-12)


def test_state_round_trip_continues_training_identically():
    model = make_mlp(seed=2)
    replay = ExperienceReplay(model, memory_size=10, replay_ratio=1.0, seed=5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = list(loader(make_task(48, seed=3), batch_size=6))
    for x, y in data[:4]:
        replay.add_to_memory(x, y, task_id=0)
        replay.train_step(optimizer, F.cross_entropy, x, y, task_id=0)

    twin = copy.deepcopy(model)
    restored = ExperienceReplay(twin, memory_size=10, replay_ratio=1.0, seed=77)
    restored.load_state_dict(saved_and_loaded(replay.state_dict()))
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.1)

    for x, y in data[4:]:
        for method, opt in ((replay, optimizer), (restored, twin_optimizer)):
            method.add_to_memory(x, y, task_id=0)
            method.train_step(opt, F.cross_entropy, x, y, task_id=0)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


# ------------------------------------------------------------------------------------ Lightning


def fit(module: pl.LightningModule, callbacks: list, data: TensorDataset, batch_size: int = 8) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    trainer.fit(module, loader(data, batch_size=batch_size))
    return trainer


class RecordingModule(ContinualLossMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_mlp()
        self.batches: list[list[torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        self.batches.append([item.clone() for item in batch])
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class PlainModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_mlp()

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("with_task_ids", [False, True])
def test_lightning_training_step_receives_the_extended_batch(with_task_ids):
    x, y = make_task(40, seed=1).tensors
    task_ids = torch.arange(40) % 3 + 5
    data = TensorDataset(x, y, task_ids) if with_task_ids else TensorDataset(x, y)
    module = RecordingModule()
    replay = ExperienceReplay(module.net, memory_size=100, replay_ratio=0.5, seed=0)
    fit(module, [replay], data)

    # The memory is empty for the first batch; afterwards 4 = round(0.5·8) samples join each.
    assert [len(batch[0]) for batch in module.batches] == [8, 12, 12, 12, 12]
    for step, batch in enumerate(module.batches):
        assert len(batch) == (3 if with_task_ids else 2)
        assert torch.equal(batch[0][:8], x[8 * step : 8 * step + 8])
        rows = row_index(batch[0][8:], x)
        assert len(set(rows)) == len(rows)
        assert all(row < 8 * step for row in rows)  # replayed: from earlier batches only
        assert torch.equal(batch[1][8:], y[rows])
        if with_task_ids:
            assert torch.equal(batch[2][:8], task_ids[8 * step : 8 * step + 8])
            assert torch.equal(batch[2][8:], task_ids[rows])
    # Every new batch was offered to the memory, tagged with its task ids (task 0 without ids).
    assert len(replay.memory) == 40
    stored = replay.memory.state_dict()
    rows = row_index(stored["inputs"], x)
    assert stored["task_ids"].tolist() == (task_ids[rows].tolist() if with_task_ids else [0] * 40)


def test_lightning_without_the_mixin_is_refused_at_setup():
    module = PlainModule()
    with pytest.raises(TypeError, match=r"ExperienceReplay.*must inherit neurenix\.continual\.ContinualLossMixin.*PlainModule"):
        fit(module, [ExperienceReplay(module.net, memory_size=10, seed=0)], make_task(16))
