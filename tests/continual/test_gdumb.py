"""GDumb: the memory's contents and balance, the reset, the epochs, Lightning equal to standalone,
resume, precisions and bad input."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from neurenix.continual import EWC
from neurenix.continual.gdumb import GDumb
from neurenix.data import TaskDataset, TaskSequenceDataModule, fit_sequence
from neurenix.metrics import ForgettingCurves
from tests.helpers import lit_classifier, quiet_trainer, saved_and_loaded

SGD = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731 - the optimizer factory of the standalone runs


def net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4))


def class_incremental_tasks(samples: int = 10) -> list[TaskDataset]:
    """Two tasks, classes {0, 1} then {2, 3}, random inputs."""
    generator = torch.Generator().manual_seed(3)
    tasks = []
    for task in range(2):
        x = torch.randn(samples, 4, generator=generator)
        y = torch.arange(samples) % 2 + 2 * task
        tasks.append(TaskDataset(x, y, task))
    return tasks


def standalone(tasks: list[TaskDataset], memory_size: int, epochs: int, batch_size: int, order_seed: int, add_batch: int = 4):
    """GDumb's standalone door on ``tasks``: what each Lightning test must equal."""
    model = net()
    gdumb = GDumb(model, memory_size=memory_size, seed=1)
    order = torch.Generator().manual_seed(order_seed)  # the datamodule's shuffling generator
    for task_id, task in enumerate(tasks):
        for start in range(0, len(task), add_batch):
            gdumb.add_to_memory(*task[start : start + add_batch], task_id)
        gdumb.train_on_memory(SGD, nn.functional.cross_entropy, epochs=epochs, batch_size=batch_size, generator=order)
    return model, gdumb


def lightning_run(tasks, memory_size=6, epochs=2, callbacks=(), ckpt_path=None, **trainer_options):
    module = lit_classifier(net(), lr=0.1, mixin=False)
    gdumb = GDumb(module.net, memory_size=memory_size, seed=1)
    datamodule = TaskSequenceDataModule(tasks, tasks, batch_size=3, eval_batch_size=4, seed=5)
    trainer = quiet_trainer(callbacks=[gdumb, *callbacks], **trainer_options)
    fit_sequence(trainer, module, datamodule, epochs_per_task=epochs, ckpt_path=ckpt_path)
    return module, gdumb, trainer


# ---------------------------------------------------------------------------- the memory
def test_memory_is_class_balanced_by_hand():
    # memory_size 5: classes 0 and 1 get ceil/floor(5/2) = 3 and 2; with class 2, 2, 2, 1.
    gdumb = GDumb(net(), memory_size=5, seed=0)
    x = torch.arange(12.0).repeat(4, 1).T  # sample i's inputs are all i
    gdumb.add_to_memory(x[:8], torch.tensor([0, 1] * 4), task_id=0)
    assert gdumb.memory.class_sizes() == {0: 3, 1: 2}
    gdumb.add_to_memory(x[8:], torch.tensor([2, 2, 2, 2]), task_id=1)
    assert gdumb.memory.class_sizes() == {0: 2, 1: 2, 2: 1}
    inputs, targets, task_ids = gdumb.get_replay_batch(5)
    for row, label, task in zip(inputs.tolist(), targets.tolist(), task_ids.tolist()):
        sample = int(row[0])
        assert label == ([0, 1] * 4 + [2] * 4)[sample] and task == (sample >= 8)  # each stored as offered


def test_memory_larger_than_the_stream_keeps_every_sample():
    gdumb = GDumb(net(), memory_size=100, seed=0)
    tasks = class_incremental_tasks()
    for task_id, task in enumerate(tasks):
        gdumb.add_to_memory(*task[:], task_id)
    stored = gdumb.memory.state_dict()["inputs"]
    offered = torch.cat([task.inputs for task in tasks])
    assert sorted(map(tuple, stored.tolist())) == sorted(map(tuple, offered.tolist()))


# ---------------------------------------------------------------------------- training on the memory
def test_train_on_memory_starts_from_the_initial_weights_every_time():
    model = net()
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    gdumb = GDumb(model, memory_size=6, seed=0)
    gdumb.add_to_memory(*class_incremental_tasks()[0][:], task_id=0)
    first = gdumb.train_on_memory(SGD, nn.functional.cross_entropy, epochs=3, batch_size=4, generator=torch.Generator().manual_seed(7))
    trained = {name: value.clone() for name, value in model.state_dict().items()}
    assert not torch.equal(trained["0.weight"], initial["0.weight"])
    again = gdumb.train_on_memory(SGD, nn.functional.cross_entropy, epochs=3, batch_size=4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, again)  # the same run from the same start, not a continuation
    assert all(torch.equal(model.state_dict()[name], trained[name]) for name in trained)
    gdumb.reset_model()
    assert all(torch.equal(model.state_dict()[name], initial[name]) for name in initial)
    assert gdumb.memory_trainings == 2


def test_train_on_memory_runs_the_epochs_over_every_sample():
    # 10 samples, batches of 4: ceil(10/4) = 3 steps per epoch, each sample once per epoch.
    model = net()
    gdumb = GDumb(model, memory_size=10, seed=0)
    gdumb.add_to_memory(*class_incremental_tasks()[0][:], task_id=0)
    batches = []
    model.register_forward_pre_hook(lambda module, args: batches.append(args[0].clone()))
    steps = []
    factory = lambda params: _Counting(params, steps)  # noqa: E731
    model.eval()
    losses = gdumb.train_on_memory(factory, nn.functional.cross_entropy, epochs=3, batch_size=4)
    assert losses.shape == (3,) and len(steps) == 9 and [b.shape[0] for b in batches] == [4, 4, 2] * 3
    stored = gdumb.memory.state_dict()["inputs"]
    for epoch in range(3):
        seen = torch.cat(batches[3 * epoch : 3 * epoch + 3])
        assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, stored.tolist()))
    assert not model.training  # the caller's mode is back


class _Counting(torch.optim.SGD):
    def __init__(self, params, steps: list) -> None:
        super().__init__(params, lr=0.1)
        self.steps = steps

    def step(self, closure=None):
        self.steps.append(1)
        return super().step(closure)


def test_one_step_matches_the_hand_computed_sgd_update():
    # One epoch, one batch of the whole memory: w = w0 - lr * grad of the mean cross-entropy at w0.
    model = net()
    reference = net()
    gdumb = GDumb(model, memory_size=4, seed=0)
    x, y = class_incremental_tasks(4)[0][:]
    gdumb.add_to_memory(x, y, task_id=0)
    gdumb.train_on_memory(SGD, nn.functional.cross_entropy, epochs=1, batch_size=4)
    nn.functional.cross_entropy(reference(x), y).backward()  # the order of a full batch does not matter
    for trained, start in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(trained, start.detach() - 0.1 * start.grad, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- Lightning
def test_lightning_equals_standalone_and_forgetting_curves_measure_the_retrained_model():
    tasks = class_incremental_tasks()
    curves = ForgettingCurves()
    module, gdumb, trainer = lightning_run(tasks, callbacks=[curves])
    model, reference = standalone(tasks, memory_size=6, epochs=2, batch_size=3, order_seed=5)
    assert trainer.global_step == 2 * 2 * 2  # 2 tasks x 2 epochs x ceil(6 / 3) batches of the memory
    assert gdumb.memory.class_sizes() == {0: 2, 1: 2, 2: 1, 3: 1}
    assert torch.equal(gdumb.memory.state_dict()["inputs"], reference.memory.state_dict()["inputs"])
    for name, value in model.state_dict().items():
        assert torch.equal(module.net.state_dict()[name], value), name
    with torch.no_grad():
        expected = [float((model(task.inputs).argmax(1) == task.targets).float().mean()) for task in tasks]
    torch.testing.assert_close(curves.matrix.accuracies()[1].double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-6)


class _WeightsAtTrainStart(Callback):
    def __init__(self) -> None:
        self.weights = []

    def on_train_start(self, trainer, pl_module):
        self.weights.append({name: value.clone() for name, value in pl_module.net.state_dict().items()})


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_precisions_reset_to_the_initial_weights_and_train(precision):
    tasks = class_incremental_tasks()
    starts = _WeightsAtTrainStart()
    module, gdumb, _ = lightning_run(tasks, callbacks=[starts], precision=precision)
    initial = net().state_dict()
    for weights in starts.weights:  # each task's fit starts from the initial weights (cast as the precision casts)
        for name, value in weights.items():
            assert torch.equal(value, initial[name].to(value.dtype)), name
    final = module.net.state_dict()
    assert all(torch.isfinite(v.float()).all() for v in final.values())
    assert not torch.equal(final["0.weight"].float(), initial["0.weight"].to(final["0.weight"].dtype).float())
    assert gdumb.memory_trainings == 2 and gdumb.finished_tasks == [0, 1]


@pytest.mark.parametrize("resume_step", [6, 4])  # mid-way through task 1's memory training; task 0's end
def test_resume_is_exact(tmp_path, resume_step):
    tasks = class_incremental_tasks()
    saving = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=2, save_top_k=-1)
    uninterrupted, _, _ = lightning_run(tasks, callbacks=[saving], enable_checkpointing=True)
    path = tmp_path / f"step={resume_step}.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    state = next(value for key, value in checkpoint["callbacks"].items() if key.startswith("GDumb"))
    assert state["filled_task"] == (1 if resume_step > 4 else 0)
    resumed, gdumb, _ = lightning_run(tasks, ckpt_path=str(path))
    for name, value in uninterrupted.net.state_dict().items():
        assert torch.equal(resumed.net.state_dict()[name], value), name
    assert gdumb.finished_tasks == [0, 1]


def test_a_checkpoint_of_other_hyperparameters_is_refused(tmp_path):
    tasks = class_incremental_tasks()
    saving = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=2, save_top_k=-1)
    lightning_run(tasks, callbacks=[saving], enable_checkpointing=True)
    with pytest.raises(ValueError, match=r"memory_size.*6.*memory_size.*5|hyper-parameters"):
        lightning_run(tasks, memory_size=5, ckpt_path=str(tmp_path / "step=6.ckpt"))


def test_state_round_trips_weights_only():
    gdumb = GDumb(net(), memory_size=6, seed=0)
    gdumb.add_to_memory(*class_incremental_tasks()[0][:], task_id=0)
    gdumb.train_on_memory(SGD, nn.functional.cross_entropy, epochs=1, batch_size=4)
    other = GDumb(net(seed=9), memory_size=6, seed=0)
    other.load_state_dict(saved_and_loaded(gdumb.state_dict()))
    other.reset_model()
    assert all(torch.equal(other.model.state_dict()[n], v) for n, v in net().state_dict().items())  # seed 0's, not 9's
    assert torch.equal(other.memory.state_dict()["inputs"], gdumb.memory.state_dict()["inputs"])
    assert other.memory_trainings == 1


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"memory_size": 0}, ValueError, "memory_size must be >= 1, got 0"),
        ({"memory_size": 2.5}, TypeError, "memory_size must be an int"),
        ({"seed": -1}, ValueError, "seed must be >= 0"),
    ],
)
def test_constructor_refuses(kwargs, error, message):
    with pytest.raises(error, match=message):
        GDumb(net(), **kwargs)


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ((SGD, nn.functional.cross_entropy, 0, 4), ValueError, "epochs must be >= 1, got 0"),
        ((SGD, nn.functional.cross_entropy, 1, 0), ValueError, "batch_size must be >= 1, got 0"),
        (("sgd", nn.functional.cross_entropy, 1, 4), TypeError, "optimizer_factory must be a function"),
        ((lambda p: None, nn.functional.cross_entropy, 1, 4), TypeError, "must return a torch.optim.Optimizer, got NoneType"),
        ((SGD, None, 1, 4), TypeError, "loss_fn must be callable"),
    ],
)
def test_train_on_memory_refuses_with_the_model_unchanged(arguments, error, message):
    model = net()
    gdumb = GDumb(model, memory_size=6, seed=0)
    gdumb.add_to_memory(*class_incremental_tasks()[0][:], task_id=0)
    with torch.no_grad():
        model[0].weight.add_(1.0)  # not the initial weights: a reset would show
    before = {n: v.clone() for n, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        gdumb.train_on_memory(*arguments)
    assert all(torch.equal(model.state_dict()[n], v) for n, v in before.items())
    assert gdumb.memory_trainings == 0


def test_refusals_of_the_stream_and_of_empty_memories():
    gdumb = GDumb(net(), memory_size=6, seed=0)
    with pytest.raises(ValueError, match="the memory is empty"):
        gdumb.train_on_memory(SGD, nn.functional.cross_entropy, 1, 4)
    with pytest.raises(TypeError, match="GDumb does not train on the stream.*add_to_memory.*train_on_memory"):
        gdumb.train_step(SGD(net().parameters()), nn.functional.cross_entropy, torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="needs class labels"):
        gdumb.add_to_memory(torch.zeros(2, 4), torch.zeros(2, 4), 0)
    assert len(gdumb.memory) == 0 and gdumb.active_task is None


def test_trainer_setups_refused():
    tasks = class_incremental_tasks()
    module = lit_classifier(net(), mixin=False)
    gdumb = GDumb(module.net, memory_size=6)
    with pytest.raises(ValueError, match="needs a neurenix.data.TaskSequenceDataModule.*got datamodule=NoneType"):
        quiet_trainer(callbacks=[gdumb]).fit(module, train_dataloaders=torch.utils.data.DataLoader(tasks[0]))
    module = lit_classifier(net())
    gdumb = GDumb(module.net, memory_size=6)
    datamodule = TaskSequenceDataModule(tasks, tasks, batch_size=3)
    with pytest.raises(ValueError, match="GDumb and EWC are on one Trainer"):
        fit_sequence(quiet_trainer(callbacks=[gdumb, EWC(module.net)]), module, datamodule, epochs_per_task=1)
    assert len(gdumb.memory) == 0 and gdumb.filled_task == -1


def test_multi_head_memory_serves_each_samples_task_id():
    gdumb = GDumb(net(), memory_size=4, seed=0)
    tasks = [TaskDataset(t.inputs, t.targets, i, with_task_ids=True) for i, t in enumerate(class_incremental_tasks(4))]
    for task_id, task in enumerate(tasks):
        gdumb.add_to_memory(*task[:][:2], task_id)
    gdumb.filled_task = 1
    served = gdumb.training_dataset(1, tasks[1])
    assert served.with_task_ids and sorted(int(served[i][2]) for i in range(len(served))) == [0, 0, 1, 1]
    assert all(int(served[i][1]) // 2 == int(served[i][2]) for i in range(len(served)))
    assert gdumb.training_dataset(0, tasks[0]) is None  # only the task that filled the memory is served it
