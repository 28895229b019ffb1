"""DarkExperienceReplay (DER, DER++): the loss and its gradient by hand, the memory batches, the
stored logits, Lightning against train_step, combinations, checkpoints, precisions, bad input."""

from __future__ import annotations

import copy
import functools
import math
import re

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from neurenix.continual import EWC, ContinualLossMixin, ExperienceReplay, KnowledgeDistillation
from neurenix.continual.dark_replay import DarkExperienceReplay
from tests.helpers import Recorder, lit_classifier, lit_multi_head, loader, make_mlp, make_task, quiet_trainer, saved_and_loaded


class MultiHead(nn.Module):
    """A shared trunk and one 3-way head per task, ``model(x, task_ids)``; records the task ids."""

    def __init__(self, heads: int = 2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(6, 5), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(5, 3) for _ in range(heads))
        self.task_ids: list[torch.Tensor] = []
        self.double()

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        self.task_ids.append(task_ids.clone())
        every_head = torch.stack([head(self.trunk(x)) for head in self.heads], dim=1)
        return every_head[torch.arange(len(x)), task_ids]


def rows_of(rows: torch.Tensor, table: torch.Tensor) -> list[int]:
    """For each row of ``rows``, the index of the one equal row of ``table``."""
    matches = (rows[:, None, :] == table[None, :, :]).flatten(2).all(-1)
    assert bool((matches.sum(1) == 1).all()), "a row is not (uniquely) in the table"
    return matches.int().argmax(1).tolist()


def stored(der: DarkExperienceReplay) -> dict:
    return der.memory.state_dict()


def float_task(seed: int, samples: int = 32) -> TensorDataset:
    x, y = make_task(samples=samples, seed=seed).tensors
    return TensorDataset(x.float(), y)


# ------------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"memory_size": -1}, ValueError, "memory_size must be >= 0, got -1"),
        ({"memory_size": 2.0}, TypeError, "memory_size must be an int, got float: 2.0"),
        ({"alpha": -0.1}, ValueError, "alpha must be >= 0.0, got -0.1"),
        ({"alpha": float("nan")}, ValueError, "alpha must be finite, got nan"),
        ({"alpha": "0.2"}, TypeError, "alpha must be a real number, got str: '0.2'"),
        ({"beta": -1}, ValueError, "beta must be >= 0.0, got -1.0"),
        ({"beta": float("inf")}, ValueError, "beta must be finite, got inf"),
        ({"beta": None}, TypeError, "beta must be a real number, got NoneType: None"),
        ({"replay_ratio": -0.5}, ValueError, "replay_ratio must be >= 0.0, got -0.5"),
        ({"replay_ratio": True}, TypeError, "replay_ratio must be a real number, got bool: True"),
        ({"seed": -3}, ValueError, "seed must be >= 0, got -3"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        DarkExperienceReplay(make_mlp(), **kwargs)


def test_documented_defaults_and_hyperparameters():
    der = DarkExperienceReplay(make_mlp())
    assert (der.memory_size, der.alpha, der.beta, der.replay_ratio, len(der.memory)) == (1000, 0.2, 0.0, 1.0, 0)
    assert der.hyperparameters() == {"memory_size": 1000, "alpha": 0.2, "beta": 0.0, "replay_ratio": 1.0}
    assert der.needs_loss_mixin and der.needs_class_labels


# ------------------------------------------------------------------------------------ the loss, by hand


def _ce(z: list[float], label: int) -> float:
    return math.log(sum(math.exp(v) for v in z)) - z[label]


def _ce_gradient(z: list[float], label: int, batch: int) -> list[float]:
    """d(mean cross-entropy)/dz of one sample of a batch of ``batch``: (softmax(z) − onehot) / batch."""
    total = sum(math.exp(v) for v in z)
    return [(math.exp(v) / total - (k == label)) / batch for k, v in enumerate(z)]


@pytest.mark.parametrize("alpha, beta", [(0.5, 0.0), (0.5, 0.25), (0.0, 0.25)], ids=["DER", "DER++", "beta-only"])
def test_one_step_loss_and_gradient_by_hand(alpha, beta):
    model = nn.Linear(2, 2).double()
    der = DarkExperienceReplay(model, memory_size=10, alpha=alpha, beta=beta, replay_ratio=1.0, seed=0)
    # Preloaded through add_to_memory with W = I, b = 0: the stored logits are the inputs themselves.
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
        model.bias.zero_()
    memory_x = torch.tensor([[1.0, 2.0], [-1.0, 1.0]], dtype=torch.float64)
    der.add_to_memory(memory_x, torch.tensor([0, 1]), task_id=0)
    assert torch.equal(der.memory.field("logits", torch.arange(2)), memory_x)

    # The step: W = [[0.5, -0.5], [1, 0]], b = [0.1, -0.1], a new batch of two samples, and
    # replay_ratio 1.0: both memory batches are the whole memory (their order does not matter).
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -0.5], [1.0, 0.0]]))
        model.bias.copy_(torch.tensor([0.1, -0.1], dtype=torch.float64))
    new_x, new_y = [[2.0, 0.0], [0.0, -1.0]], [1, 0]
    memory_in, memory_y = [[1.0, 2.0], [-1.0, 1.0]], [0, 1]
    stored_z = memory_in  # stored at W = I, b = 0
    new_z = [[1.1, 1.9], [0.6, -0.1]]  # z = W x + b on the new samples
    memory_z = [[-0.4, 0.9], [-0.9, -1.1]]  # and on the memory samples

    task = (_ce(new_z[0], 1) + _ce(new_z[1], 0)) / 2
    mse = ((-0.4 - 1) ** 2 + (0.9 - 2) ** 2 + (-0.9 + 1) ** 2 + (-1.1 - 1) ** 2) / 4  # mean over 2 samples x 2 units
    assert mse == pytest.approx(7.59 / 4)
    memory_ce = (_ce(memory_z[0], 0) + _ce(memory_z[1], 1)) / 2
    expected_loss = task + alpha * mse + beta * memory_ce
    # dL/dz for every sample that enters the loss, then dL/dW = Σ dz xᵀ and dL/db = Σ dz.
    per_sample = [(x, _ce_gradient(z, y, 2)) for x, z, y in zip(new_x, new_z, new_y)]
    per_sample += [(x, [alpha * 2 * (z[k] - s[k]) / 4 for k in range(2)]) for x, z, s in zip(memory_in, memory_z, stored_z)]
    per_sample += [(x, [beta * g for g in _ce_gradient(z, y, 2)]) for x, z, y in zip(memory_in, memory_z, memory_y)]
    grad_w = torch.tensor([[sum(g[i] * x[j] for x, g in per_sample) for j in range(2)] for i in range(2)], dtype=torch.float64)
    grad_b = torch.tensor([sum(g[i] for _, g in per_sample) for i in range(2)], dtype=torch.float64)

    before = (model.weight.detach().clone(), model.bias.detach().clone())
    x = torch.tensor(new_x, dtype=torch.float64)
    loss = der.train_step(torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, x, torch.tensor(new_y), task_id=0)

    assert loss.item() == pytest.approx(expected_loss, abs=1e-12)
    torch.testing.assert_close((before[0] - model.weight) / 0.1, grad_w, rtol=0, atol=1e-12)
    torch.testing.assert_close((before[1] - model.bias) / 0.1, grad_b, rtol=0, atol=1e-12)
    # The new batch joined the memory with the step's own outputs (before the update).
    memory = stored(der)
    assert memory["num_seen"] == 4 and memory["logits"].dtype == torch.float64
    rows = rows_of(x, memory["inputs"])
    torch.testing.assert_close(memory["logits"][rows], torch.tensor(new_z, dtype=torch.float64), rtol=0, atol=1e-12)
    assert memory["targets"][rows].tolist() == new_y


@pytest.mark.parametrize(
    "replay_ratio, batch_size, memory_held, expected",
    [
        (1.0, 8, 40, 8),
        (0.5, 3, 40, 2),  # round(1.5)
        (0.1, 3, 40, 1),  # round(0.3) = 0, raised to 1: the terms stay present
        (2.5, 2, 40, 5),
        (1.0, 8, 5, 5),  # only 5 stored
        (0.0, 8, 40, 0),
    ],
)
@pytest.mark.parametrize("beta", [0.0, 0.7])
def test_each_memory_batch_holds_max_1_round_ratio_b_distinct_samples(replay_ratio, batch_size, memory_held, expected, beta):
    recorder = Recorder(make_mlp())
    der = DarkExperienceReplay(recorder, memory_size=100, alpha=0.3, beta=beta, replay_ratio=replay_ratio, seed=1)
    memory_x, memory_y = make_task(memory_held, seed=7).tensors
    der.add_to_memory(memory_x, memory_y, task_id=0)
    recorder.inputs.clear()
    x, y = make_task(batch_size, seed=8).tensors
    der.train_step(torch.optim.SGD(recorder.parameters(), lr=0.1), F.cross_entropy, x, y, task_id=0)

    new, *memory_batches = recorder.inputs
    assert torch.equal(new, x)
    assert [len(batch) for batch in memory_batches] == ([expected] * (2 if beta else 1) if expected else [])
    for batch in memory_batches:
        rows = rows_of(batch, memory_x)  # memory samples only: the new batch is stored after the draws
        assert len(set(rows)) == len(rows)
    if beta and 1 < expected < memory_held:  # DER++'s batch is a draw of its own, not DER's again
        assert not torch.equal(*memory_batches)


def test_an_empty_memory_trains_on_the_task_loss_and_stores_the_batch():
    recorder = Recorder(make_mlp())
    der = DarkExperienceReplay(recorder, memory_size=20, alpha=0.5, beta=0.5, seed=0)
    reference = copy.deepcopy(recorder.net)
    x, y = make_task(8).tensors
    loss = der.train_step(torch.optim.SGD(recorder.parameters(), lr=0.1), F.cross_entropy, x, y, task_id=0)
    assert len(recorder.inputs) == 1  # no memory forward
    assert loss.item() == pytest.approx(F.cross_entropy(reference(x), y).item(), abs=1e-12)
    memory = stored(der)
    assert torch.equal(memory["inputs"], x) and torch.equal(memory["targets"], y)
    torch.testing.assert_close(memory["logits"], reference(x).detach(), rtol=0, atol=1e-12)


def test_add_to_memory_stores_the_logits_of_the_model_now_and_changes_nothing_else():
    model = make_mlp(batch_norm=True)
    model.train()
    der = DarkExperienceReplay(model, memory_size=20, seed=0)
    x, y = make_task(8).tensors
    statistics = copy.deepcopy(model[1].state_dict())
    rng = torch.get_rng_state()
    der.add_to_memory(x, y, task_id=3)
    for name, value in model[1].state_dict().items():
        assert torch.equal(value, statistics[name]), name  # running statistics untouched
    assert torch.equal(torch.get_rng_state(), rng)
    memory = stored(der)
    torch.testing.assert_close(memory["logits"], model(x).detach(), rtol=0, atol=1e-12)  # train mode: batch statistics
    assert memory["task_ids"].tolist() == [3] * 8 and not memory["logits"].requires_grad


def test_the_api_document_loop_stores_each_batch_once():
    """The replay tutorial's loop calls train_step, then add_to_memory, on each batch: DER's
    train_step has stored it already (with the step's logits), so add_to_memory does not again."""
    model = make_mlp()
    der = DarkExperienceReplay(model, memory_size=50, alpha=0.3, seed=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = list(loader(make_task(24), batch_size=8))
    with pytest.warns(UserWarning, match="add_to_memory got the tensor of inputs that train_step has just stored"):
        for x, y in batches[:2]:
            der.train_step(optimizer, F.cross_entropy, x, y, task_id=0)
            der.add_to_memory(x, y, task_id=0)
    with pytest.warns(UserWarning, match="train_step got the tensor of inputs that add_to_memory has just stored"):
        der.add_to_memory(*batches[2], task_id=0)
        der.train_step(optimizer, F.cross_entropy, *batches[2], task_id=0)
    assert der.memory.num_seen == len(der.memory) == 24
    # Training on one batch again is a new offer of it, as every epoch is.
    der.train_step(optimizer, F.cross_entropy, *batches[2], task_id=0)
    assert der.memory.num_seen == 32


def test_a_multi_head_model_replays_each_sample_with_its_stored_task_id():
    model = MultiHead()
    der = DarkExperienceReplay(model, memory_size=50, alpha=0.5, beta=0.5, replay_ratio=1.0, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    task_0, task_1 = make_task(8, seed=1).tensors, make_task(8, seed=2).tensors
    der.train_step(optimizer, F.cross_entropy, *task_0, task_id=0)
    model.task_ids.clear()
    der.train_step(optimizer, F.cross_entropy, *task_1, task_id=1)
    assert [ids.tolist() for ids in model.task_ids] == [[1] * 8, [0] * 8, [0] * 8]  # new batch, DER, DER++
    assert sorted(stored(der)["task_ids"].tolist()) == [0] * 8 + [1] * 8


# ------------------------------------------------------------------------------------ Lightning


def fit(module: L.LightningModule, callbacks: list, data: TensorDataset, ckpt_path=None, **kwargs) -> L.Trainer:
    trainer = quiet_trainer(callbacks=callbacks, **kwargs)
    trainer.fit(module, DataLoader(data, batch_size=8, shuffle=False), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("multi_head", [False, True], ids=["single-head", "multi-head"])
def test_lightning_equals_train_step_over_two_tasks(multi_head):
    net, twin = (MultiHead(), MultiHead()) if multi_head else (make_mlp(seed=3), make_mlp(seed=3))
    options = dict(memory_size=12, alpha=0.4, beta=0.3, replay_ratio=0.75, seed=5)
    standalone, callback = DarkExperienceReplay(net, **options), DarkExperienceReplay(twin, **options)
    module = lit_multi_head(twin) if multi_head else lit_classifier(twin)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for task_id in (0, 1):
        x, y = make_task(36, seed=task_id + 1).tensors  # 4 batches of 8 and one of 4
        for inputs, targets in loader(TensorDataset(x, y)):
            standalone.train_step(optimizer, F.cross_entropy, inputs, targets, task_id=task_id)
        data = TensorDataset(x, y, torch.full((36,), task_id)) if multi_head else TensorDataset(x, y)
        fit(module, [callback], data)

    assert callback.finished_tasks == [0, 1] and standalone.memory.num_seen == callback.memory.num_seen == 72
    for (name, ours), theirs in zip(twin.named_parameters(), net.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6, msg=name)
    ours, theirs = stored(callback), stored(standalone)
    for field in ("inputs", "targets", "task_ids", "logits", "generator"):
        torch.testing.assert_close(ours[field], theirs[field], rtol=0, atol=1e-6, msg=field)
    assert not twin._forward_hooks  # the capture is removed when training ends


class TwoModels(ContinualLossMixin, L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net, self.shadow = make_mlp(), make_mlp(seed=1)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.shadow(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_training_step_that_skips_the_model_is_refused_at_the_first_step():
    module = TwoModels()
    der = DarkExperienceReplay(module.net, memory_size=10, seed=0)
    with pytest.raises(RuntimeError, match=re.escape(
        "DarkExperienceReplay saw no forward of its model (Sequential) in training_step: the logits it stores"
    )):
        fit(module, [der], make_task(16))
    assert len(der.memory) == 0 and not module.net._forward_hooks  # removed on the exception too


def test_lightning_without_the_mixin_is_refused_at_setup():
    net = make_mlp()
    with pytest.raises(TypeError, match=r"DarkExperienceReplay changes the training batch or loss.*ContinualLossMixin"):
        fit(lit_classifier(net, mixin=False), [DarkExperienceReplay(net, seed=0)], make_task(16))


# ------------------------------------------------------------------------------------ combinations


def test_a_second_rehearsal_method_is_refused_at_setup():
    net = make_mlp()
    methods = [DarkExperienceReplay(net, seed=0), ExperienceReplay(net, memory_size=10, seed=0)]
    with pytest.raises(ValueError, match=r"^DarkExperienceReplay and ExperienceReplay are on one Trainer"):
        fit(lit_classifier(net), methods, make_task(16))
    assert all(len(method.memory) == 0 for method in methods)


def test_with_ewc_both_act_on_every_step():
    net = make_mlp(seed=2)
    der, ewc = DarkExperienceReplay(net, memory_size=16, alpha=0.5, beta=0.5, seed=0), EWC(net, importance=10.0, seed=0)
    alone_net = make_mlp(seed=2)
    alone = DarkExperienceReplay(alone_net, memory_size=16, alpha=0.5, beta=0.5, seed=0)
    for task_id in (0, 1):
        fit(lit_classifier(net), [der, ewc], make_task(24, seed=task_id + 1))
        fit(lit_classifier(alone_net), [alone], make_task(24, seed=task_id + 1))
    assert der.finished_tasks == ewc.finished_tasks == [0, 1] and ewc.has_penalty
    # The memory is the same (EWC does not change what is stored or drawn); the parameters are not.
    assert torch.equal(stored(der)["inputs"], stored(alone)["inputs"])
    assert (net[0].weight - alone_net[0].weight).abs().max() > 1e-4


@pytest.mark.parametrize("der_first", [True, False], ids=["der-first", "distillation-first"])
def test_with_distillation_the_teacher_term_is_taken_on_the_step_s_batch(der_first):
    # Distillation reads the step's outputs from its own forward capture: DER's memory forwards,
    # run before it when DER is listed first, used to be what it read (the memory batch's).
    net = make_mlp(seed=2)
    der, kd = DarkExperienceReplay(net, memory_size=16, alpha=0.5, seed=0), KnowledgeDistillation(net, alpha=0.5)
    distilled_inputs = []
    distillation_loss = kd.get_distillation_loss

    def recording(inputs, outputs):
        distilled_inputs.append(inputs[0].clone())
        return distillation_loss(inputs, outputs)

    kd.get_distillation_loss = recording
    tasks = [make_task(16, seed=1), make_task(16, seed=2)]
    for task in tasks:
        fit(lit_classifier(net), [der, kd] if der_first else [kd, der], task)
    assert [len(x) for x in distilled_inputs] == [8, 8]  # task 1's two steps (a teacher from task 0 on)
    for step, inputs in enumerate(distilled_inputs):
        assert torch.equal(inputs, tasks[1].tensors[0][8 * step : 8 * step + 8])


# ------------------------------------------------------------------------------------ state


def test_state_round_trip_continues_exactly():
    model = make_mlp(seed=2)
    der = DarkExperienceReplay(model, memory_size=10, alpha=0.3, beta=0.6, seed=5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = list(loader(make_task(48, seed=3), batch_size=6))
    for x, y in batches[:4]:
        der.train_step(optimizer, F.cross_entropy, x, y, task_id=0)

    twin = copy.deepcopy(model)
    restored = DarkExperienceReplay(twin, memory_size=10, alpha=0.3, beta=0.6, seed=77)
    restored.load_state_dict(saved_and_loaded(der.state_dict()))
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.1)
    for x, y in batches[4:]:
        der.train_step(optimizer, F.cross_entropy, x, y, task_id=0)
        restored.train_step(twin_optimizer, F.cross_entropy, x, y, task_id=0)

    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    ours, theirs = stored(der), stored(restored)
    assert ours.keys() == theirs.keys()
    for field, value in ours.items():
        same = torch.equal(value, theirs[field]) if isinstance(value, torch.Tensor) else value == theirs[field]
        assert same, field


def _methods(net: nn.Module, seed: int) -> list:
    return [DarkExperienceReplay(net, memory_size=10, alpha=0.4, beta=0.3, replay_ratio=0.5, seed=seed)]


@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint need to be provided")
def test_a_lightning_checkpoint_in_the_middle_of_task_1_resumes_to_the_uninterrupted_run(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    init = make_mlp(seed=7).float()
    net = copy.deepcopy(init)
    (der,) = methods = _methods(net, seed=1)
    fit(lit_classifier(net), methods, float_task(1))
    fit(lit_classifier(net), methods, float_task(2), max_epochs=2)

    stopped = copy.deepcopy(init)
    stopped_methods = _methods(stopped, seed=1)
    fit(lit_classifier(stopped), stopped_methods, float_task(1))
    saver = ModelCheckpoint(dirpath=tmp_path, save_on_train_epoch_end=True, save_top_k=-1)
    fit(lit_classifier(stopped), [*stopped_methods, saver], float_task(2), enable_checkpointing=True)  # epoch 1 of 2
    (checkpoint,) = tmp_path.glob("*.ckpt")
    saved = torch.load(checkpoint, weights_only=True)["callbacks"][der.state_key]
    assert saved["active_task"] == 1 and saved["memory"]["logits"].shape == (10, 3)

    resumed_net = make_mlp(seed=98).float()  # other weights and seed: the checkpoint's must win
    (resumed,) = resumed_methods = _methods(resumed_net, seed=9)
    fit(lit_classifier(resumed_net), resumed_methods, float_task(2), max_epochs=2, ckpt_path=checkpoint)
    for (name, a), b in zip(net.named_parameters(), resumed_net.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    for field in ("inputs", "targets", "task_ids", "logits", "generator"):
        torch.testing.assert_close(stored(resumed)[field], stored(der)[field], rtol=0, atol=1e-6, msg=field)
    assert resumed.finished_tasks == [0, 1]


@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint need to be provided")
def test_a_checkpoint_saved_with_other_hyperparameters_is_refused(tmp_path):
    net = make_mlp(seed=7).float()
    trainer = fit(lit_classifier(net), [DarkExperienceReplay(net, memory_size=10, alpha=0.4, seed=0)], float_task(1))
    trainer.save_checkpoint(tmp_path / "task0.ckpt")
    other = DarkExperienceReplay(net, memory_size=10, alpha=0.4, beta=0.5, seed=0)  # DER++ against DER
    saved = "DarkExperienceReplay{'memory_size': 10, 'alpha': 0.4, 'beta': 0.0, 'replay_ratio': 1.0}"
    wanted = "DarkExperienceReplay{'memory_size': 10, 'alpha': 0.4, 'beta': 0.5, 'replay_ratio': 1.0}"
    with pytest.raises(ValueError, match=re.escape(f"the checkpoint holds state for {saved}, not for {wanted}")):
        fit(lit_classifier(net), [other], float_task(1), max_epochs=2, ckpt_path=tmp_path / "task0.ckpt")
    assert other.finished_tasks == [] and len(other.memory) == 0


# ------------------------------------------------------------------------------------ precision


def _precision_run(precision: str, accelerator: str = "cpu") -> tuple[nn.Module, DarkExperienceReplay]:
    net = make_mlp(seed=4).float()
    der = DarkExperienceReplay(net, memory_size=16, alpha=0.5, beta=0.5, seed=0)
    for task_id in (0, 1):
        fit(lit_classifier(net, lr=0.05), [der], float_task(task_id + 1), precision=precision, accelerator=accelerator,
            deterministic=False)
    return net, der


@functools.cache
def _32_bit_run() -> tuple[nn.Module, DarkExperienceReplay]:
    return _precision_run("32-true")


# Tolerances: about 5x the largest differences seen from the 32-bit run (logits 2.3e-3, 4.1e-3 and
# 4.5e-4; parameters 1.3e-4, 2.4e-3 and 3.3e-4 for bf16-mixed, bf16-true and 16-true).
@pytest.mark.parametrize(
    "precision, logits_atol, params_atol", [("bf16-mixed", 0.02, 1e-3), ("bf16-true", 0.02, 0.01), ("16-true", 3e-3, 2e-3)]
)
def test_16_bit_precisions_keep_the_stored_logits_in_float32(precision, logits_atol, params_atol):
    reference, reference_der = _32_bit_run()
    net, der = _precision_run(precision)
    memory = stored(der)
    assert memory["logits"].dtype == torch.float32 and memory["num_seen"] == 64
    # The same samples were stored (the draws do not depend on the values) ...
    assert torch.equal(memory["targets"], stored(reference_der)["targets"])
    # ... with logits and parameters within 16-bit rounding of the 32-bit run.
    torch.testing.assert_close(memory["logits"], stored(reference_der)["logits"], rtol=0, atol=logits_atol)
    for (name, ours), theirs in zip(net.named_parameters(), reference.parameters()):
        torch.testing.assert_close(ours.float(), theirs, rtol=0, atol=params_atol, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_cuda_mixed_precision_keeps_the_stored_logits_in_float32(precision):
    reference, reference_der = _precision_run("32-true", accelerator="gpu")
    net, der = _precision_run(precision, accelerator="gpu")
    memory = stored(der)
    assert memory["logits"].dtype == torch.float32 and memory["logits"].device.type == "cuda"
    torch.testing.assert_close(memory["logits"], stored(reference_der)["logits"], rtol=0, atol=0.1)
    for (name, ours), theirs in zip(net.named_parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0.01, msg=name)


# ------------------------------------------------------------------------------------ bad input

NOT_LABELS = [
    (torch.rand(8), "shape (8,) and dtype torch.float32"),
    (torch.zeros(8, 3, dtype=torch.long), "shape (8, 3) and dtype torch.int64"),
]


@pytest.mark.parametrize("targets, described", NOT_LABELS)
def test_train_step_refuses_targets_that_are_not_labels_before_any_change(targets, described):
    model = make_mlp()
    der = DarkExperienceReplay(model, memory_size=10, seed=0)
    before = copy.deepcopy(model.state_dict())
    x = make_task(8).tensors[0]
    message = (
        "DarkExperienceReplay needs class labels as targets (a 1-D integer tensor: its memory terms are "
        f"cross-entropies), got targets of {described}"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        der.train_step(torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss, x, targets, task_id=0)
    assert der.active_task is None and der.memory.num_seen == 0
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())


@pytest.mark.parametrize("targets, described", NOT_LABELS)
def test_add_to_memory_refuses_targets_that_are_not_labels(targets, described):
    der = DarkExperienceReplay(make_mlp(), memory_size=10, seed=0)
    with pytest.raises(ValueError, match=re.escape(f"got targets of {described}")):
        der.add_to_memory(make_task(8).tensors[0], targets, task_id=0)
    assert der.memory.num_seen == 0


def test_a_lightning_fit_refuses_targets_that_are_not_labels_at_the_first_batch():
    net = make_mlp()
    before = copy.deepcopy(net.state_dict())
    der = DarkExperienceReplay(net, memory_size=10, seed=0)

    x = make_task(16).tensors[0]
    with pytest.raises(ValueError, match=re.escape("got targets of shape (8, 3) and dtype torch.float64")):
        fit(lit_classifier(net, loss_fn=F.mse_loss), [der], TensorDataset(x, torch.rand(16, 3, dtype=torch.float64)))
    assert der.memory.num_seen == 0
    assert all(torch.equal(value, before[name]) for name, value in net.state_dict().items())


def test_a_model_whose_outputs_are_not_one_row_of_logits_per_sample_is_refused():
    model = nn.Sequential(nn.Linear(6, 3).double(), nn.Flatten(0))  # (8, 3) -> (24,)
    der = DarkExperienceReplay(model, memory_size=10, seed=0)
    message = "as class logits, (samples, classes): the model (Sequential) returned outputs of shape (24,)"
    with pytest.raises(ValueError, match=re.escape(message)):
        der.add_to_memory(*make_task(8).tensors, task_id=0)
    assert der.memory.num_seen == 0


# ------------------------------------------------------------------------------------ exemplars
def herded_by_hand(net: nn.Module, x: torch.Tensor, y: torch.Tensor, per_class: int) -> list[int]:
    """Each class's first ``per_class`` samples in herding order on the hidden layer's normalized output."""
    from neurenix.continual import functional as CF

    with torch.no_grad():
        features = F.normalize(net[:2](x), dim=1)
    chosen = []
    for label in y.unique().tolist():
        rows = torch.nonzero(y == label).squeeze(1)
        chosen += rows[CF.herding_order(features[rows], per_class)].tolist()
    return chosen


def rows_of(stored: torch.Tensor, x: torch.Tensor) -> list[int]:
    """Which row of ``x`` each stored input is."""
    return [int(torch.nonzero((x == row).all(1)).squeeze()) for row in stored]


def test_with_selection_the_memory_holds_herded_exemplars_with_their_logits_at_the_tasks_end():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    der = DarkExperienceReplay(net, memory_size=6, alpha=0.5, selection="herding", feature_extractor="1", seed=0)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, 4, generator=generator, dtype=torch.float64), torch.arange(20) % 2
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    der.register_task(0, DataLoader(TensorDataset(x, y), batch_size=5))
    for start in range(0, 20, 5):
        der.train_step(optimizer, F.cross_entropy, x[start:start + 5], y[start:start + 5], 0)
    assert len(der.memory) == 0  # nothing enters during a task
    expected = herded_by_hand(net, x, y, per_class=3)
    with torch.no_grad():
        logits_at_end = net(x)
    der.register_task(1)  # ends task 0: its exemplars are chosen at the parameters it ended with
    state = der.memory.state_dict()
    assert sorted(rows_of(state["inputs"], x)) == sorted(expected)
    torch.testing.assert_close(state["logits"], logits_at_end[rows_of(state["inputs"], x)], rtol=0, atol=1e-12)
    assert der.hyperparameters()["selection"] == "herding"
    with pytest.raises(ValueError, match="chooses its exemplars from each task's data at the task's end"):
        der.add_to_memory(x[:2], y[:2], 1)
