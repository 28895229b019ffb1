"""KnowledgeDistillation: the loss against a hand computation, the frozen teacher, units, Lightning, state."""

from __future__ import annotations

import copy
import functools
import re

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from neurenix.continual import ContinualLossMixin, KnowledgeDistillation
from tests.helpers import lit_multi_head, loader, make_mlp, make_task, saved_and_loaded

# The library evaluates the KL in float32 (see test_float64_logits_keep_float64_precision), so
# comparisons of the formula itself use a float32-sized tolerance.
TOL = dict(rtol=1e-5, atol=1e-6)


def softmax(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def hand_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float, units=None) -> torch.Tensor:
    """``T² · mean_n Σ_c p_c (log p_c − log q_c)``, p = softmax(teacher/T), q = softmax(student/T)."""
    if units is not None:
        student, teacher = student[:, units], teacher[:, units]
    p, q = softmax(teacher / temperature), softmax(student / temperature)
    return temperature**2 * (p * (torch.log(p) - torch.log(q))).sum(-1).mean()


def dropout_mlp(classes: int = 3, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Dropout(0.5), nn.Tanh(), nn.Linear(5, classes)).double()


def sgd_step(model: nn.Module, loss: torch.Tensor, lr: float) -> None:
    grads = torch.autograd.grad(loss, list(model.parameters()))
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p -= lr * g


def train_plain(model: nn.Module, data: TensorDataset, lr: float = 0.1) -> None:
    """Task 1 of the API document: an ordinary loop, no continual method involved."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for x, y in loader(data):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def distilled_after_task_1(model: nn.Module, **kwargs) -> KnowledgeDistillation:
    """The API document's flow up to task 2: train task 1 plainly, then register it."""
    kd = KnowledgeDistillation(model, **kwargs)
    data = make_task(seed=1, classes=model[-1].out_features)
    train_plain(model, data)
    kd.register_task(task_id=1, dataloader=loader(data))
    return kd


def inputs_and_outputs(classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """16 inputs and arbitrary student logits (float64) for them."""
    outputs = 3 * torch.randn(16, classes, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return make_task(16, seed=5).tensors[0], outputs


def assert_close(a: torch.Tensor, b: torch.Tensor, **tol) -> None:
    torch.testing.assert_close(a, b.to(a.dtype), check_dtype=False, **(tol or TOL))


# ------------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"temperature": 0.0}, ValueError, "temperature must be > 0.0, got 0.0"),
        ({"temperature": -1}, ValueError, "temperature must be > 0.0, got -1.0"),
        ({"temperature": float("inf")}, ValueError, "temperature must be finite, got inf"),
        ({"temperature": "2"}, TypeError, "temperature must be a real number, got str"),
        ({"alpha": -0.1}, ValueError, "alpha must be >= 0.0, got -0.1"),
        ({"alpha": 1.5}, ValueError, "alpha must be <= 1.0, got 1.5"),
        ({"alpha": "sometimes"}, ValueError, r"alpha must be a number in \[0, 1\], one of '1-1/t' or a callable of the task index; got 'sometimes'"),
        ({"alpha": None}, TypeError, "alpha must be a real number, got NoneType: None"),
        ({"units": "new"}, ValueError, "units must be one of 'all', 'seen'; got 'new'"),
        ({"units": None}, ValueError, "units must be one of 'all', 'seen'; got None"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        KnowledgeDistillation(make_mlp(), **kwargs)


def test_documented_defaults_and_alpha_bounds_accepted():
    kd = KnowledgeDistillation(make_mlp())
    assert (kd.temperature, kd.alpha, kd.units, kd.teacher) == (2.0, 0.5, "all", None)
    assert KnowledgeDistillation(make_mlp(), alpha=0).alpha == 0.0
    assert KnowledgeDistillation(make_mlp(), alpha=1).alpha == 1.0


def test_get_distillation_loss_rejects_non_tensors():
    kd = KnowledgeDistillation(make_mlp())
    x = torch.zeros(2, 6, dtype=torch.float64)
    with pytest.raises(TypeError, match="inputs must be a torch.Tensor, got list"):
        kd.get_distillation_loss(x.tolist(), torch.zeros(2, 3))
    with pytest.raises(TypeError, match="outputs must be a torch.Tensor, got ndarray"):
        kd.get_distillation_loss(x, torch.zeros(2, 3).numpy())


# ------------------------------------------------------------------------------------ the loss


def test_no_teacher_means_zero_distillation_and_the_plain_task_loss():
    model = make_mlp()
    kd = KnowledgeDistillation(model, alpha=0.7)
    x, y = make_task(8).tensors
    assert kd.get_distillation_loss(x, model(x)).item() == 0.0
    reference = copy.deepcopy(model)
    loss = kd.train_step(torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, x, y, task_id=1)
    assert loss.item() == pytest.approx(F.cross_entropy(reference(x), y).item(), abs=1e-12)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 5.0])
def test_get_distillation_loss_is_t_squared_kl_teacher_to_student(temperature):
    model = make_mlp()
    kd = distilled_after_task_1(model, temperature=temperature)
    teacher = copy.deepcopy(model).eval()
    x, outputs = inputs_and_outputs()
    loss = kd.get_distillation_loss(x, outputs)
    expected = hand_kd(outputs, teacher(x), temperature)
    assert expected.item() > 0.1
    assert_close(loss, expected)
    # Same outputs as the teacher: zero.
    assert abs(kd.get_distillation_loss(x, teacher(x)).item()) < 1e-6


def test_float64_logits_keep_float64_precision():
    """A float64 model's distillation term should be computed in float64, like its task loss."""
    model = make_mlp()
    kd = distilled_after_task_1(model, temperature=2.0)
    teacher = copy.deepcopy(model).eval()
    x, outputs = inputs_and_outputs()
    loss = kd.get_distillation_loss(x, outputs)
    assert loss.dtype == torch.float64
    assert_close(loss, hand_kd(outputs, teacher(x), 2.0), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------ the teacher


def test_teacher_is_a_frozen_eval_mode_snapshot_of_the_end_of_task_1():
    model = dropout_mlp()
    model.train()
    kd = KnowledgeDistillation(model, temperature=2.0, alpha=0.5)
    data = make_task(seed=1)
    train_plain(model, data)
    end_of_task_1 = copy.deepcopy(model)
    kd.register_task(task_id=1, dataloader=loader(data))

    teacher = kd.teacher
    assert teacher is not None and teacher is not model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in loader(make_task(seed=2)):
        kd.train_step(optimizer, F.cross_entropy, x, y, task_id=2)

    assert not torch.equal(model[0].weight, end_of_task_1[0].weight)  # the student moved
    for p, q in zip(teacher.parameters(), end_of_task_1.parameters()):
        assert torch.equal(p, q) and not p.requires_grad
    assert not any(m.training for m in teacher.modules())
    assert all(m.training for m in model.modules())  # the student's own mode is untouched
    x = make_task(32, seed=6).tensors[0]
    assert torch.equal(teacher(x), teacher(x))
    assert torch.equal(teacher(x), end_of_task_1.eval()(x))  # dropout off: eval mode
    outputs = model(x)
    assert torch.equal(kd.get_distillation_loss(x, outputs), kd.get_distillation_loss(x, outputs))


@pytest.mark.parametrize("alpha, temperature", [(0.5, 2.0), (0.25, 1.0), (1.0, 3.0), (0.0, 2.0)])
def test_task_2_step_is_sgd_on_mixed_loss(alpha, temperature):
    model = make_mlp()
    kd = distilled_after_task_1(model, temperature=temperature, alpha=alpha)
    teacher, reference = copy.deepcopy(model).eval(), copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in loader(make_task(seed=2)):
        loss = kd.train_step(optimizer, nn.CrossEntropyLoss(), x, y, task_id=2)
        out = reference(x)
        expected = (1 - alpha) * F.cross_entropy(out, y) + alpha * hand_kd(out, teacher(x), temperature)
        assert_close(loss, expected.detach())
        sgd_step(reference, expected, lr=0.1)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert_close(p, q)


# ------------------------------------------------------------------------------------ units="seen"


def class_incremental_tasks():
    """Task 1: labels {0, 1}; task 2: labels {2, 3} (one 4-way head)."""
    (x1, y1), (x2, y2) = make_task(seed=1, classes=2).tensors, make_task(seed=2, classes=2).tensors
    return TensorDataset(x1, y1), TensorDataset(x2, y2 + 2)


def check_task_2_distils_seen_units(model: nn.Module, kd: KnowledgeDistillation, task_2: TensorDataset) -> None:
    teacher, reference = copy.deepcopy(model).eval(), copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    differs = False
    for x, y in loader(task_2):
        loss = kd.train_step(optimizer, F.cross_entropy, x, y, task_id=2)
        out, soft = reference(x), teacher(x)
        seen = hand_kd(out, soft, 2.0, units=[0, 1])
        differs |= abs(seen.item() - hand_kd(out, soft, 2.0).item()) > 1e-3
        expected = 0.5 * F.cross_entropy(out, y) + 0.5 * seen
        assert_close(loss, expected.detach())
        sgd_step(reference, expected, lr=0.1)
    assert differs  # all-unit and seen-unit distillation give different losses on this run
    for p, q in zip(model.parameters(), reference.parameters()):
        assert_close(p, q)


def test_units_seen_distils_only_task_1_classes_after_train_step():
    task_1, task_2 = class_incremental_tasks()
    model = make_mlp(classes=4)
    kd = KnowledgeDistillation(model, temperature=2.0, alpha=0.5, units="seen")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in loader(task_1):
        kd.train_step(optimizer, F.cross_entropy, x, y, task_id=1)
    check_task_2_distils_seen_units(model, kd, task_2)


def test_units_seen_distils_only_task_1_classes_in_the_api_document_flow():
    """Task 1 trained by a plain loop, then register_task(1, dataloader=...): its labels are there."""
    task_1, task_2 = class_incremental_tasks()
    model = make_mlp(classes=4)
    kd = KnowledgeDistillation(model, temperature=2.0, alpha=0.5, units="seen")
    train_plain(model, task_1)
    kd.register_task(task_id=1, dataloader=loader(task_1))
    check_task_2_distils_seen_units(model, kd, task_2)


# ------------------------------------------------------------------------------------ state


@pytest.mark.parametrize("units", ["all", "seen"])
def test_state_round_trip_restores_the_teacher(units):
    task_1, _ = class_incremental_tasks()
    model = dropout_mlp(classes=4)
    kd = KnowledgeDistillation(model, temperature=3.0, alpha=0.5, units=units)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in loader(task_1):
        kd.train_step(optimizer, F.cross_entropy, x, y, task_id=1)
    kd.register_task(task_id=2)

    fresh_model = dropout_mlp(classes=4, seed=7)
    restored = KnowledgeDistillation(fresh_model, temperature=3.0, alpha=0.5, units=units)
    restored.load_state_dict(saved_and_loaded(kd.state_dict()))

    assert restored.teacher is not None and restored.teacher is not fresh_model
    assert not any(m.training for m in restored.teacher.modules())
    assert not any(p.requires_grad for p in restored.teacher.parameters())
    x, outputs = inputs_and_outputs(classes=4)
    assert torch.equal(restored.get_distillation_loss(x, outputs), kd.get_distillation_loss(x, outputs))
    assert kd.get_distillation_loss(x, outputs).item() > 0.01


# ------------------------------------------------------------------------------------ Lightning


class Classifier(ContinualLossMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_mlp()
        self.shadow = make_mlp(seed=1)
        self.use_shadow = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy((self.shadow if self.use_shadow else self.net)(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.1)


def fit(module: pl.LightningModule, callbacks: list, data: TensorDataset) -> None:
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    trainer.fit(module, loader(data, batch_size=8, shuffle=False))


def test_lightning_second_fit_trains_on_the_distilled_loss():
    module = Classifier()
    kd = KnowledgeDistillation(module.net, temperature=2.0, alpha=0.3)
    task_1, task_2 = make_task(seed=1), make_task(seed=2)
    fit(module, [kd], task_1)
    teacher_of_task_2 = kd.teacher
    fit(module, [kd], task_2)

    reference = make_mlp()
    for x, y in loader(task_1):
        sgd_step(reference, F.cross_entropy(reference(x), y), lr=0.1)
    teacher = copy.deepcopy(reference).eval()
    for p, q in zip(teacher_of_task_2.parameters(), teacher.parameters()):
        assert_close(p, q)
    for x, y in loader(task_2):
        out = reference(x)
        sgd_step(reference, 0.7 * F.cross_entropy(out, y) + 0.3 * hand_kd(out, teacher(x), 2.0), lr=0.1)
    for p, q in zip(module.net.parameters(), reference.parameters()):
        assert_close(p, q)
    # Without the distillation term the second task would have ended elsewhere.
    plain = copy.deepcopy(teacher).train()
    for x, y in loader(task_2):
        sgd_step(plain, F.cross_entropy(plain(x), y), lr=0.1)
    assert (module.net[0].weight - plain[0].weight).abs().max() > 1e-4


def test_lightning_training_step_that_skips_the_model_is_refused():
    module = Classifier()
    kd = KnowledgeDistillation(module.net)
    with torch.no_grad():
        module.net[0].weight.add_(0.1)  # "trained" outside: register_task snapshots a teacher
    kd.register_task(task_id=0)
    assert kd.teacher is not None
    module.use_shadow = True
    with pytest.raises(RuntimeError, match=r"KnowledgeDistillation saw no forward of its model \(Sequential\)"):
        fit(module, [kd], make_task(seed=2))


def test_given_the_lightning_module_while_training_step_calls_a_submodule_it_fails_at_the_first_step():
    # The first task has no teacher yet: the mistake used to surface only at task 2, after task 1 trained.
    module = Classifier()
    kd, steps = KnowledgeDistillation(module), []

    class Steps(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            steps.append(batch_idx)

    with pytest.raises(RuntimeError) as raised:
        fit(module, [kd, Steps()], make_task(seed=2))
    assert steps == [] and kd.teacher is None
    assert str(raised.value) == (
        "KnowledgeDistillation saw no forward of its model (Classifier) in training_step: the student's outputs must "
        "come from the model given to it (with gradients enabled). Classifier is the LightningModule: if training_step "
        "calls a submodule (`self.net(x)`) rather than `self(x)`, give that submodule, e.g. KnowledgeDistillation(model.net)"
    )


# ------------------------------------------------------------------------------------ multi-head
class MultiHead(nn.Module):
    """A shared trunk (with batch norm) and one 2-way head per task: ``model(x, task_ids)``."""

    def __init__(self, heads: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(5, 2) for _ in range(heads))
        self.double()

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        features = self.trunk(x)
        every_head = torch.stack([head(features) for head in self.heads], dim=1)
        return every_head[torch.arange(len(x)), task_ids]


def two_way_task(seed: int) -> TensorDataset:
    x, y = make_task(seed=seed, classes=2).tensors
    return TensorDataset(x, y)


def train_task(model: MultiHead, kd: KnowledgeDistillation, task_id: int, data: TensorDataset) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in loader(data):
        kd.train_step(optimizer, F.cross_entropy, x, y, task_id=task_id)


def test_a_multi_head_model_distils_the_heads_of_learned_tasks_on_every_sample():
    # LwF: the term used to be taken on the head of the task being learned, whose teacher head
    # was never trained: it pulled the new head towards its initial outputs (task-incremental
    # Fashion-MNIST: average accuracy 0.68 against 0.96 with the heads of learned tasks).
    model, temperature = MultiHead(), 2.0
    kd = KnowledgeDistillation(model, temperature=temperature, alpha=0.5)
    train_task(model, kd, 0, two_way_task(1))
    train_task(model, kd, 1, two_way_task(2))
    kd.register_task(task_id=2)  # consolidates task 1: the teacher knows heads 0 and 1
    assert kd.finished_tasks == [0, 1]
    x = two_way_task(3).tensors[0][:8]
    new_head = torch.full((8,), 2)
    model.train()
    loss = kd.get_distillation_loss((x, new_head), model(x, new_head))
    teacher = kd.teacher
    expected = sum(
        hand_kd(model(x, torch.full((8,), t)), teacher(x, torch.full((8,), t)), temperature) for t in (0, 1)
    ) / 2
    assert_close(loss, expected, **TOL)
    # The new task's head gets nothing from the term; the learned heads and the trunk do.
    model.zero_grad()
    loss.backward()
    assert torch.count_nonzero(model.heads[2].weight.grad) == 0
    assert model.heads[0].weight.grad.abs().sum() > 0 and model.trunk[0].weight.grad.abs().sum() > 0


def test_the_extra_forward_leaves_batch_norm_statistics_to_the_step_s_own_forward():
    # alpha = 0: the step must be the plain step exactly, parameters and running statistics.
    distilled, plain = MultiHead(), MultiHead()
    kd = KnowledgeDistillation(distilled, alpha=0.0)
    train_task(distilled, kd, 0, two_way_task(1))
    plain.load_state_dict(distilled.state_dict())
    kd.register_task(task_id=1)
    train_task(distilled, kd, 1, two_way_task(2))
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.1)
    for x, y in loader(two_way_task(2)):
        optimizer.zero_grad()
        F.cross_entropy(plain(x, torch.full((len(x),), 1)), y).backward()
        optimizer.step()
    for (name, ours), theirs in zip(distilled.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12, msg=name)


def test_lightning_distils_a_multi_head_model_as_train_step_does():
    standalone, lightning_model = MultiHead(), MultiHead()
    kd_a = KnowledgeDistillation(standalone, temperature=2.0, alpha=0.4)
    kd_b = KnowledgeDistillation(lightning_model, temperature=2.0, alpha=0.4)
    module = lit_multi_head(lightning_model)
    for task_id in (0, 1, 2):
        data = two_way_task(task_id + 1)
        train_task(standalone, kd_a, task_id, data)
        x, y = data.tensors
        fit(module, [kd_b], TensorDataset(x, y, torch.full((len(x),), task_id)))
    assert kd_a.finished_tasks == [0, 1] and kd_b.finished_tasks == [0, 1, 2]  # each fit ends its task
    for (name, ours), theirs in zip(lightning_model.state_dict().items(), standalone.state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10, msg=name)


# ------------------------------------------------------------------------------------ alpha's schedule


def train_tasks(model: nn.Module, kd: KnowledgeDistillation, tasks: list, check_step=None) -> None:
    """Each task by train_step (SGD 0.1), ``check_step(task, loss, reference, teacher, x, y)`` on every step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for task, data in enumerate(tasks):
        kd.register_task(task)  # ends the previous task: the teacher is the model now
        teacher, reference = copy.deepcopy(model).eval(), copy.deepcopy(model)
        for x, y in loader(data):
            loss = kd.train_step(optimizer, F.cross_entropy, x, y, task_id=task)
            if check_step is not None:
                check_step(task, loss, reference, teacher, x, y)


@pytest.mark.parametrize(
    "alpha, by_task",
    [("1-1/t", [0.0, 1 / 2, 2 / 3]), (0.25, [0.25, 0.25, 0.25]), (lambda index: [0.9, 0.1, 0.6][index], [0.9, 0.1, 0.6])],
    ids=["1-1/t", "constant", "callable"],
)
def test_each_task_s_loss_uses_alpha_of_its_task_index(alpha, by_task):
    model = make_mlp()
    kd = KnowledgeDistillation(model, temperature=2.0, alpha=alpha)
    alphas, state_keys = [], {kd.state_key}

    def check_step(task, loss, reference, teacher, x, y):
        out = reference(x)
        a = by_task[task] if task > 0 else 0.0  # no teacher in the first task: the task loss alone
        expected = (1 - a) * F.cross_entropy(out, y) + a * hand_kd(out, teacher(x), 2.0)
        assert_close(loss, expected.detach())
        sgd_step(reference, expected, lr=0.1)
        alphas.append(kd.current_alpha)
        state_keys.add(kd.state_key)

    train_tasks(model, kd, [make_task(16, seed=s) for s in (1, 2, 3)], check_step)
    assert alphas == pytest.approx([a for a in by_task for _ in range(2)], abs=1e-15)
    assert len(state_keys) == 1  # the checkpoint's key never changes during the run


def test_one_minus_one_over_t_at_task_indices_0_1_2_by_hand():
    kd = KnowledgeDistillation(make_mlp(), alpha="1-1/t")
    values = []
    for task in range(3):
        kd.register_task(task)
        values.append(kd.current_alpha)
        with torch.no_grad():
            kd.model[0].bias.add_(0.1)  # "trained": the next register_task ends this task
    assert values == [0.0, 0.5, pytest.approx(2 / 3, abs=1e-15)]
    assert kd.hyperparameters()["alpha"] == "1-1/t"


def test_a_callable_alpha_gets_the_number_of_finished_tasks_and_names_the_state_key():
    calls = []

    def halves(index: int) -> float:
        calls.append(index)
        return 1 - 0.5**index

    model = make_mlp()
    kd = KnowledgeDistillation(model, alpha=halves)
    assert kd.state_key == "KnowledgeDistillation{'temperature': 2.0, 'alpha': '" + halves.__qualname__ + "', 'units': 'all'}"
    train_tasks(model, kd, [make_task(16, seed=s) for s in (1, 2, 3)])
    assert set(calls) == {1, 2} and kd.current_alpha == 0.75
    partial = KnowledgeDistillation(make_mlp(), alpha=functools.partial(min, 0.5))
    assert partial.hyperparameters()["alpha"] == "min"


@pytest.mark.parametrize("value", [1.5, -0.25, float("nan"), "0.5", True])
def test_a_callable_s_value_outside_0_1_is_refused_naming_the_value_and_the_task(value):
    model = make_mlp()
    kd = KnowledgeDistillation(model, alpha=lambda index: 0.5 if index != 1 else value)
    x, y = make_task(8, seed=1).tensors
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    kd.train_step(optimizer, F.cross_entropy, x, y, task_id=0)
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match=rf"alpha=.*<lambda> returned {re.escape(repr(value))} for task index 1 \(task 1, after 1 finished task\): it must be a number in \[0, 1\]"):
        kd.train_step(optimizer, F.cross_entropy, x, y, task_id=1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters()))  # no step taken


def test_lightning_follows_the_schedule_as_train_step_does():
    tasks = [make_task(16, seed=s) for s in (1, 2, 3)]
    module = Classifier()
    lightning_kd = KnowledgeDistillation(module.net, temperature=2.0, alpha="1-1/t")
    for data in tasks:
        fit(module, [lightning_kd], data)
    standalone = make_mlp()
    kd = KnowledgeDistillation(standalone, temperature=2.0, alpha="1-1/t")
    train_tasks(standalone, kd, tasks)
    assert lightning_kd.finished_tasks == [0, 1, 2] and lightning_kd.current_alpha == 0.75
    for p, q in zip(module.net.parameters(), standalone.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    # A constant alpha of 1/2 ends elsewhere: the third task's 2/3 mattered.
    constant = make_mlp()
    train_tasks(constant, KnowledgeDistillation(constant, temperature=2.0, alpha=0.5), tasks)
    assert (constant[0].weight - standalone[0].weight).abs().max() > 1e-4


def sequence_run(tasks, alpha, callbacks=(), ckpt_path=None):
    """Three tasks under fit_sequence, two epochs of three batches each; the module and the method."""
    from neurenix.data import TaskSequenceDataModule, fit_sequence
    from tests.helpers import lit_classifier, quiet_trainer

    module = lit_classifier(make_mlp())
    kd = KnowledgeDistillation(module.net, temperature=2.0, alpha=alpha)
    datamodule = TaskSequenceDataModule(tasks, tasks, batch_size=4, seed=5)
    trainer = quiet_trainer(callbacks=[kd, *callbacks], enable_checkpointing=bool(callbacks))
    fit_sequence(trainer, module, datamodule, epochs_per_task=2, ckpt_path=ckpt_path)
    return module, kd


@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint need to be provided")
def test_resumed_in_the_middle_of_task_2_the_schedule_continues_as_the_uninterrupted_run(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from neurenix.data import TaskDataset

    tasks = [TaskDataset(*make_task(12, seed=s).tensors, task_id=t) for t, s in enumerate((1, 2, 3))]
    saving = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=2, save_top_k=-1)
    uninterrupted, kd = sequence_run(tasks, "1-1/t", callbacks=[saving])
    # Step 16: task 2's steps are 13-18, three a epoch; 16 is its second epoch's first batch.
    path = tmp_path / "step=16.ckpt"
    states = [torch.load(p, weights_only=True)["callbacks"] for p in sorted(tmp_path.glob("*.ckpt"))]
    assert {key for state in states for key in state if key.startswith("KnowledgeDistillation")} == {kd.state_key}
    saved = torch.load(path, weights_only=True)["callbacks"][kd.state_key]
    assert (saved["active_task"], saved["finished_tasks"]) == (2, [0, 1])

    resumed, resumed_kd = sequence_run(tasks, "1-1/t", ckpt_path=str(path))
    for name, value in uninterrupted.net.state_dict().items():
        assert torch.equal(resumed.net.state_dict()[name], value), name
    assert resumed_kd.finished_tasks == [0, 1, 2] and resumed_kd.current_alpha == 0.75
    for name, value in kd.teacher.state_dict().items():
        assert torch.equal(resumed_kd.teacher.state_dict()[name], value), name
    # The schedule mattered: alpha 1/2 throughout ends elsewhere.
    constant, _ = sequence_run(tasks, 0.5)
    assert (constant.net[0].weight - uninterrupted.net[0].weight).abs().max() > 1e-4
