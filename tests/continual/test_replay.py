"""ExperienceReplay's training step: how many samples it replays, the loss, the API flow, Lightning."""

from __future__ import annotations

import copy
from collections import OrderedDict

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from neurenix.continual import ContinualLossMixin, ExperienceReplay
from neurenix.continual import functional as CF
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
        ({"offer": "twice"}, ValueError, "offer must be one of 'every_epoch', 'once'; got 'twice'"),
        ({"offer": None}, ValueError, "offer must be one of 'every_epoch', 'once'; got None"),
        ({"offer": "once", "selection": "random"}, ValueError, r"offer='once' says which training batches enter a memory filled from the stream; with selection='random'"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        ExperienceReplay(make_mlp(), **kwargs)


def test_documented_defaults():
    replay = ExperienceReplay(make_mlp())
    assert (replay.memory_size, replay.replay_ratio, len(replay.memory), replay.offer) == (1000, 0.5, 0, "every_epoch")


def test_offer_joins_the_state_key_only_when_not_the_default():
    # Checkpoints written before offer existed keep loading into the default.
    assert ExperienceReplay(make_mlp()).state_key == "ExperienceReplay{'memory_size': 1000, 'replay_ratio': 0.5}"
    once = ExperienceReplay(make_mlp(), offer="once")
    assert once.state_key == "ExperienceReplay{'memory_size': 1000, 'replay_ratio': 0.5, 'offer': 'once'}"


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


# ------------------------------------------------------------------------------------ exemplar selection


def backbone_net(seed: int = 0) -> nn.Sequential:
    """``backbone`` (6 -> 5, tanh) and ``head`` (5 -> 6 classes)."""
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(backbone=nn.Sequential(nn.Linear(6, 5), nn.Tanh()), head=nn.Linear(5, 6)))


def class_pair_task(task: int, samples: int = 24) -> TensorDataset:
    """Task ``task`` of a class-incremental split: classes ``2·task`` and ``2·task + 1``, float32."""
    x, y = make_task(samples, classes=2, seed=10 + task).tensors
    return TensorDataset(x.float(), y + 2 * task)


def by_hand_exemplars(model: nn.Module, data: TensorDataset, quota: int) -> dict[int, list]:
    """Each class's first ``quota`` herding picks on normalized backbone features, in pick order."""
    x, y = data.tensors
    with torch.no_grad():
        features = F.normalize(model.backbone(x), dim=1)
    picked = {}
    for label in sorted(y.unique().tolist()):
        positions = (y == label).nonzero().squeeze(1)
        picked[label] = x[positions[CF.herding_order(features[positions], quota)]].tolist()
    return picked


def memory_by_class(replay: ExperienceReplay) -> dict[int, list]:
    state = replay.memory.state_dict()
    order = torch.argsort(state["ranks"], stable=True)
    out: dict[int, list] = {}
    for i in order.tolist():
        out.setdefault(int(state["targets"][i]), []).append(state["inputs"][i].tolist())
    return {key: out[key] for key in sorted(out)}


def train_standalone(model: nn.Module, replay: ExperienceReplay, tasks: list[TensorDataset], checks=None) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for task, data in enumerate(tasks):
        replay.register_task(task, loader(data, batch_size=8))
        for x, y in loader(data, batch_size=8):
            replay.train_step(optimizer, F.cross_entropy, x, y, task_id=task)
        if checks:
            checks(task, copy.deepcopy(model))
    replay.finish_task()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"selection": "mean"}, ValueError, r"selection must be one of 'herding', 'closest', 'random'; got 'mean'"),
        ({"selection": "herding"}, ValueError, r"selection='herding' ranks samples by their features: give feature_extractor="),
        ({"feature_extractor": "backbone"}, ValueError, r"feature_extractor is used by exemplar selection only"),
        ({"selection": "closest", "feature_extractor": "encoder"}, ValueError, r"feature_extractor='encoder' names no submodule of Sequential"),
    ],
)
def test_selection_arguments_are_checked(kwargs, error, message):
    with pytest.raises(error, match=message):
        ExperienceReplay(backbone_net(), 8, **kwargs)


def test_herding_selection_fills_the_memory_at_each_tasks_end_from_its_data():
    model = backbone_net()
    replay = ExperienceReplay(model, memory_size=12, replay_ratio=0.5, seed=0, selection="herding", feature_extractor=model.backbone)
    tasks = [class_pair_task(0), class_pair_task(1)]
    at_task_end: dict[int, nn.Module] = {}
    sizes_during = []
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for task, data in enumerate(tasks):
        replay.register_task(task, loader(data, batch_size=8))
        for x, y in loader(data, batch_size=8):
            replay.train_step(optimizer, F.cross_entropy, x, y, task_id=task)
            sizes_during.append(len(replay.memory))
        at_task_end[task] = copy.deepcopy(model)
        if task == 0:
            replay.finish_task()
            # Task 0's classes, 6 exemplars each: herding on the features at task 0's end.
            first = by_hand_exemplars(at_task_end[0], tasks[0], 6)
            assert memory_by_class(replay) == first
    replay.finish_task()
    # Nothing entered during a task; task 0's exemplars were replayed throughout task 1.
    assert sizes_during == [0, 0, 0, 12, 12, 12]
    # Task 1: 3 per class; classes 0 and 1 keep their first 3 herding picks of task 0's end.
    second = memory_by_class(replay)
    assert second[0] == first[0][:3] and second[1] == first[1][:3]
    assert {k: v for k, v in second.items() if k >= 2} == by_hand_exemplars(at_task_end[1], tasks[1], 3)
    assert replay.memory.state_dict()["task_ids"].tolist().count(1) == 6


def test_selection_refuses_add_to_memory_and_warns_without_data():
    model = backbone_net()
    replay = ExperienceReplay(model, 8, seed=0, selection="random")
    x, y = class_pair_task(0).tensors
    with pytest.raises(ValueError, match=r"ExperienceReplay\(selection='random'\) chooses its exemplars from each task's data at the task's end.*register_task\(0, dataloader\)"):
        replay.add_to_memory(x, y, task_id=0)
    assert len(replay.memory) == 0 and replay.memory.num_seen == 0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    replay.train_step(optimizer, F.cross_entropy, x, y, task_id=0)
    with pytest.warns(UserWarning, match=r"ended task 0 without its data: no exemplar of it was kept"):
        replay.register_task(1)
    assert len(replay.memory) == 0


def test_selection_state_round_trip_weights_only_continues_identically():
    tasks = [class_pair_task(t) for t in range(3)]

    def run(stop_after: int | None, restore=None):
        model = backbone_net(seed=1)
        replay = ExperienceReplay(model, 10, 1.0, seed=3, selection="herding", feature_extractor="backbone")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        start = 0
        if restore is not None:
            model.load_state_dict(restore["model"])
            replay.load_state_dict(saved_and_loaded(restore["replay"]))
            start = restore["task"] + 1
        for task in range(start, 3):
            replay.register_task(task, loader(tasks[task], batch_size=8))
            for x, y in loader(tasks[task], batch_size=8):
                replay.train_step(optimizer, F.cross_entropy, x, y, task_id=task)
            if task == stop_after:
                replay.finish_task()
                return {"model": copy.deepcopy(model.state_dict()), "replay": replay.state_dict(), "task": task}
        replay.finish_task()
        return model, replay

    model, replay = run(None)
    resumed_model, resumed = run(None, restore=run(stop_after=1))
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    assert memory_by_class(resumed) == memory_by_class(replay) and len(replay.memory) == 10
    assert torch.equal(resumed.memory.state_dict()["ranks"], replay.memory.state_dict()["ranks"])


class SelectionModule(ContinualLossMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = backbone_net()

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("selection", ["herding", "random"])
def test_selection_under_a_trainer_equals_standalone(selection):
    tasks = [class_pair_task(0), class_pair_task(1)]
    module = SelectionModule()
    extractor = {"feature_extractor": module.net.backbone} if selection == "herding" else {}
    lightning = ExperienceReplay(module.net, 12, 0.5, seed=2, selection=selection, **extractor)
    for data in tasks:
        fit(module, [lightning], data)

    model = backbone_net()
    extractor = {"feature_extractor": "backbone"} if selection == "herding" else {}
    standalone = ExperienceReplay(model, 12, 0.5, seed=2, selection=selection, **extractor)
    train_standalone(model, standalone, tasks)

    for p, q in zip(module.net.parameters(), model.parameters()):
        assert torch.equal(p, q)
    assert memory_by_class(lightning) == memory_by_class(standalone)
    assert len(lightning.memory) == 12 and lightning.finished_tasks == [0, 1]


@pytest.mark.parametrize("precision, dtype", [("bf16-true", torch.bfloat16), ("64-true", torch.float64), ("bf16-mixed", torch.float32)])
def test_selection_under_lightning_precisions_stores_inputs_as_the_fit_feeds_them(precision, dtype):
    # The exemplars are the fit's own inputs, converted as its batches are (bf16-true: bfloat16),
    # and the second task replays them into batches of that dtype.
    tasks = [class_pair_task(0), class_pair_task(1)]
    module = SelectionModule()
    replay = ExperienceReplay(module.net, 8, 0.5, seed=2, selection="herding", feature_extractor="backbone")
    for data in tasks:
        trainer = pl.Trainer(
            max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, precision=precision,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[replay],
        )  # fmt: skip
        trainer.fit(module, loader(data, batch_size=8))
    stored = replay.memory.state_dict()
    assert stored["inputs"].dtype == dtype and len(replay.memory) == 8
    assert sorted(stored["targets"].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    # Each exemplar is one of the task's samples (in the fit's dtype).
    x = torch.cat([t.tensors[0] for t in tasks]).to(dtype)
    assert all(any(torch.equal(row, candidate) for candidate in x) for row in stored["inputs"])


def test_selection_refuses_targets_that_are_not_class_labels_at_the_first_batch():
    module = SelectionModule()
    replay = ExperienceReplay(module.net, 8, seed=0, selection="random")
    x, y = class_pair_task(0).tensors
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ValueError, match=r"ExperienceReplay needs class labels as targets \(a 1-D integer tensor: its exemplars are chosen per class\), got targets of shape \(8, 2\)"):
        fit(module, [replay], TensorDataset(x, F.one_hot(y, 2).float()))
    assert all(torch.equal(p, q) for p, q in zip(before, module.parameters())) and len(replay.memory) == 0
    assert replay.finished_tasks == []


def fit_epochs(module, callbacks, data, epochs, *, ckpt_path=None, enable_checkpointing=False) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, enable_checkpointing=enable_checkpointing,
    )  # fmt: skip
    trainer.fit(module, loader(data, batch_size=8), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint need to be provided")
@pytest.mark.parametrize("where", ["mid-task", "task-end"])
def test_selection_resumes_from_a_lightning_checkpoint_to_the_uninterrupted_run(tmp_path, where):
    # Task-end: the checkpoint of task 1's last epoch end, written before the task's exemplars are
    # chosen; the resumed fit skips training and must still choose them, from the fit's data.
    from lightning.pytorch.callbacks import ModelCheckpoint

    tasks = [class_pair_task(0), class_pair_task(1)]

    def methods(net, seed):
        return [ExperienceReplay(net, 8, 0.5, seed=seed, selection="herding", feature_extractor="backbone")]

    module = SelectionModule()
    (replay,) = uninterrupted = methods(module.net, 1)
    fit_epochs(module, uninterrupted, tasks[0], 1)
    fit_epochs(module, uninterrupted, tasks[1], 2)

    stopped = SelectionModule()
    stopped_methods = methods(stopped.net, 1)
    fit_epochs(stopped, stopped_methods, tasks[0], 1)
    saver = ModelCheckpoint(dirpath=tmp_path, save_on_train_epoch_end=True, save_top_k=-1)
    fit_epochs(stopped, [*stopped_methods, saver], tasks[1], 1 if where == "mid-task" else 2, enable_checkpointing=True)
    checkpoint = sorted(tmp_path.glob("*.ckpt"))[-1]
    saved = torch.load(checkpoint, weights_only=True)["callbacks"][replay.state_key]
    assert saved["active_task"] == 1 and saved["memory"]["inputs"].shape[0] == 8  # task 0's exemplars only

    resumed_module = SelectionModule()
    torch.nn.init.zeros_(resumed_module.net.head.weight)  # other weights: the checkpoint's must win
    (resumed,) = resumed_methods = methods(resumed_module.net, 9)
    fit_epochs(resumed_module, resumed_methods, tasks[1], 2, ckpt_path=checkpoint)
    for p, q in zip(module.net.parameters(), resumed_module.net.parameters()):
        assert torch.equal(p, q)
    assert resumed.finished_tasks == [0, 1] and memory_by_class(resumed) == memory_by_class(replay)
    assert {k: len(v) for k, v in memory_by_class(resumed).items()} == {0: 2, 1: 2, 2: 2, 3: 2}


# ------------------------------------------------------------------------------------ offer


def stored_rows(replay: ExperienceReplay, x: torch.Tensor) -> list[int]:
    """The row of ``x`` each stored sample is, sorted (a sample stored twice appears twice)."""
    stored = replay.memory.state_dict()["inputs"][: len(replay.memory)]
    matches = (stored[:, None, :] == x[None, :, :]).all(-1)
    assert bool((matches.sum(1) == 1).all())
    return sorted(matches.int().argmax(1).tolist())


@pytest.mark.parametrize("offer, offers", [("once", 1), ("every_epoch", 3)])
def test_three_epochs_of_a_task_offer_each_sample_once_or_every_epoch(offer, offers):
    x, y = make_task(24, seed=1).tensors
    module = RecordingModule()
    replay = ExperienceReplay(module.net, memory_size=72, replay_ratio=0.5, seed=0, offer=offer)
    fit_epochs(module, [replay], TensorDataset(x, y), 3)
    assert replay.memory.num_seen == 24 * offers
    assert stored_rows(replay, x) == sorted(list(range(24)) * offers)
    # Later epochs still replay: every step after the first appends round(0.5 * 8) samples.
    assert [len(batch[0]) for batch in module.batches] == [8] + [12] * 8


def offer_once_run(tasks, callbacks=(), ckpt_path=None):
    """Two tasks under fit_sequence, three epochs of three batches each, offer='once'."""
    from neurenix.data import TaskSequenceDataModule, fit_sequence
    from tests.helpers import lit_classifier, quiet_trainer

    module = lit_classifier(make_mlp())
    replay = ExperienceReplay(module.net, memory_size=10, replay_ratio=0.5, seed=4, offer="once")
    datamodule = TaskSequenceDataModule(tasks, tasks, batch_size=4, seed=5)
    trainer = quiet_trainer(callbacks=[replay, *callbacks], enable_checkpointing=bool(callbacks))
    fit_sequence(trainer, module, datamodule, epochs_per_task=3, ckpt_path=ckpt_path)
    return module, replay


@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint need to be provided")
@pytest.mark.parametrize("task, step", [(0, 4), (1, 14)])
def test_offer_once_resumed_in_a_task_s_second_epoch_equals_the_uninterrupted_run(tmp_path, task, step):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from neurenix.data import TaskDataset

    tasks = [TaskDataset(*make_task(12, seed=s).tensors, task_id=t) for t, s in enumerate((1, 2))]
    saving = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=2, save_top_k=-1)
    uninterrupted, replay = offer_once_run(tasks, callbacks=[saving])
    assert replay.memory.num_seen == 24  # each task's 12 samples once, not 3 times
    # Three steps an epoch, nine a task: steps 4 and 14 are the first and second batches of the
    # second epochs of tasks 0 and 1 (Lightning resumes those epochs without on_train_epoch_start).
    path = tmp_path / f"step={step}.ckpt"
    saved = torch.load(path, weights_only=True)["callbacks"][replay.state_key]
    assert saved["active_task"] == task and saved["memory"]["num_seen"] == 12 * (task + 1)
    assert saved["task_first_epoch"] == 3 * task

    resumed, resumed_replay = offer_once_run(tasks, ckpt_path=str(path))
    for name, value in uninterrupted.net.state_dict().items():
        assert torch.equal(resumed.net.state_dict()[name], value), name
    assert resumed_replay.memory.num_seen == 24 and resumed_replay.finished_tasks == [0, 1]
    resumed_memory = resumed_replay.memory.state_dict()
    for name, value in replay.memory.state_dict().items():
        same = torch.equal(resumed_memory[name], value) if isinstance(value, torch.Tensor) else resumed_memory[name] == value
        assert same, name
