"""A-GEM and GEM: the projections against hand computations, the Lightning door against the standalone
one (accumulation, clipping, EWC alongside), checkpoints, precisions and bad input."""

from __future__ import annotations

import copy
import re

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from neurenix.continual import EWC, ExperienceReplay
from neurenix.continual import functional as CF
from neurenix.continual.gradient_episodic import AGEM, GEM
from tests.helpers import lit_classifier, make_mlp, make_task, quiet_trainer, saved_and_loaded

METHODS = {"AGEM": lambda net, **kw: AGEM(net, **kw), "GEM": lambda net, **kw: GEM(net, **kw)}


class TwoParameters(nn.Module):
    """Logits ``(x·θ, 0)``. At ``θ = 0`` a sample of label 1 has loss gradient ``x/2``
    (``∂CE/∂s = softmax(s, 0)_0 − 0 = 1/2``, ``∂s/∂θ = x``): any 2-D vector we choose."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(2, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x @ self.theta
        return torch.stack([s, torch.zeros_like(s)], dim=1)


class MultiHead(nn.Module):
    """A shared layer and one output head per task: ``forward(x, task_ids)``."""

    def __init__(self, tasks: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(6, 8), nn.Tanh()).double()
        self.heads = nn.ModuleList(nn.Linear(8, 2).double() for _ in range(tasks))

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.trunk(x)
        every_head = torch.stack([head(hidden) for head in self.heads], dim=1)
        return every_head[torch.arange(x.shape[0]), task_ids]


def sample(*x: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample ``x`` of label 1 (its gradient at θ = 0 is ``x/2``)."""
    return torch.tensor([x], dtype=torch.float64), torch.tensor([1])


def remember_without_moving(method, x: torch.Tensor, y: torch.Tensor, task_id: int) -> None:
    """A step at learning rate 0: the batch enters the memory, θ stays 0."""
    method.train_step(torch.optim.SGD(method.model.parameters(), lr=0.0), F.cross_entropy, x, y, task_id=task_id)


def float_task(seed: int, samples: int = 32) -> TensorDataset:
    x, y = make_task(samples=samples, seed=seed).tensors
    return TensorDataset(x.float(), y)


def relabelled(dataset: TensorDataset) -> TensorDataset:
    """The same inputs with other labels: its gradients conflict with the original task's."""
    x, y = dataset.tensors
    return TensorDataset(x, (y + 1) % 3)


def fit(net: nn.Module, callbacks: list, dataset: TensorDataset, batch_size: int = 8, **kwargs) -> L.Trainer:
    trainer = quiet_trainer(callbacks=callbacks, **kwargs)
    trainer.fit(lit_classifier(net, lr=0.1, mixin=False), DataLoader(dataset, batch_size=batch_size))
    return trainer


def assert_same_state(a, b, atol: float = 1e-6) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_state(a[key], b[key], atol)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.allclose(a.double(), b.double(), atol=atol, rtol=0), (a, b)
    else:
        assert a == b


def assert_same_parameters(a: nn.Module, b: nn.Module, atol: float = 1e-6) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=atol, rtol=0), name


# ------------------------------------------------------------------------------------ constructor


@pytest.mark.parametrize(
    "name, kwargs, error, message",
    [
        ("AGEM", {"memory_size": -1}, ValueError, "memory_size must be >= 0, got -1"),
        ("AGEM", {"memory_size": 1.5}, TypeError, "memory_size must be an int, got float: 1.5"),
        ("AGEM", {"reference_size": 0}, ValueError, "reference_size must be >= 1, got 0"),
        ("AGEM", {"reference_size": 8.0}, TypeError, "reference_size must be an int, got float: 8.0"),
        ("AGEM", {"seed": -1}, ValueError, "seed must be >= 0, got -1"),
        ("GEM", {"memory_size": -3}, ValueError, "memory_size must be >= 0, got -3"),
        ("GEM", {"margin": -0.1}, ValueError, "margin must be >= 0.0, got -0.1"),
        ("GEM", {"margin": float("inf")}, ValueError, "margin must be finite, got inf"),
        ("GEM", {"margin": "0.5"}, TypeError, "margin must be a real number, got str: '0.5'"),
    ],
)
def test_constructor_rejects_bad_arguments(name, kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        METHODS[name](make_mlp(), **kwargs)


def test_defaults_and_hyperparameters():
    agem, gem = AGEM(make_mlp()), GEM(make_mlp())
    assert agem.hyperparameters() == {"memory_size": 1000, "reference_size": 256}
    assert gem.hyperparameters() == {"memory_size": 1000, "margin": 0.5}
    assert agem.needs_class_labels and not agem.needs_loss_mixin and not gem.needs_loss_mixin
    assert (agem.memory.capacity, len(agem.memory)) == (1000, 0)


# ------------------------------------------------------------------------------------ the maths by hand


@pytest.mark.parametrize(
    "memory_x, step_task, batch_x, expected_theta, dot_after",
    [
        # g_ref = (2,0)/2 = (1,0); g = (-2,2)/2 = (-1,1); g·g_ref = -1 < 0:
        # g̃ = g − (−1/1)·(1,0) = (0,1), so g̃·g_ref = 0; θ = 0 − 0.1·(0,1).
        ((2.0, 0.0), 1, (-2.0, 2.0), (0.0, -0.1), 0.0),
        # g = (1,1); g·g_ref = 1 ≥ 0: no projection, θ = −0.1·(1,1).
        ((2.0, 0.0), 1, (2.0, 2.0), (-0.1, -0.1), 1.0),
        # g_ref = 0 (the memory sample has x = 0): no projection, θ = −0.1·(−1,1).
        ((0.0, 0.0), 1, (-2.0, 2.0), (0.1, -0.1), 0.0),
        # Still task 0: the memory holds only the current task's own sample, which is no
        # reference: g stays (−1,1) although it conflicts with that sample's gradient.
        ((2.0, 0.0), 0, (-2.0, 2.0), (0.1, -0.1), -1.0),
    ],
    ids=["conflict", "no-conflict", "zero-reference", "first-task"],
)
def test_agem_step_by_hand(memory_x, step_task, batch_x, expected_theta, dot_after):
    model = TwoParameters()
    agem = AGEM(model, memory_size=10, reference_size=4, seed=0)
    remember_without_moving(agem, *sample(*memory_x), task_id=0)

    agem.train_step(torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, *sample(*batch_x), task_id=step_task)

    expected = torch.tensor(expected_theta, dtype=torch.float64)
    assert torch.allclose(model.theta.detach(), expected, atol=1e-12, rtol=0)
    step_gradient = -expected / 0.1
    reference = torch.tensor(memory_x, dtype=torch.float64) / 2
    assert float(step_gradient @ reference) == pytest.approx(dot_after, abs=1e-12)
    assert len(agem.memory) == 2  # each train_step stored its batch after the step


@pytest.mark.parametrize(
    "margin, expected_z",
    [
        # G rows g1 = (1,0), g2 = (1,1); g = (−1, 0.25); Gg = (−1, −0.75): task 0 conflicts.
        # M = GGᵀ = [[1,1],[1,2]]. margin 0: the unconstrained v = −M⁻¹Gg = (1.25, −0.25) is
        # infeasible; with v2 = 0, v1 = 1: z = g + g1 = (0, 0.25), KKT: ∂/∂v2 = v1 + q2 = 0.25 ≥ 0.
        (0.0, (0.0, 0.25)),
        # margin 0.5: v2 = 0.5 (bound), v1 = −q1 − v2 = 0.5 (∂/∂v2 = 0.5 + 1 − 0.75 = 0.75 ≥ 0):
        # z = g + 0.5·g1 + 0.5·g2 = (0, 0.75).
        (0.5, (0.0, 0.75)),
    ],
)
def test_gem_step_by_hand_with_two_finished_tasks(margin, expected_z):
    model = TwoParameters()
    gem = GEM(model, memory_size=10, margin=margin, seed=0)
    remember_without_moving(gem, *sample(2.0, 0.0), task_id=0)
    remember_without_moving(gem, *sample(2.0, 2.0), task_id=1)

    gem.train_step(torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, *sample(-2.0, 0.5), task_id=2)

    z = -model.theta.detach() / 0.1
    assert torch.allclose(z, torch.tensor(expected_z, dtype=torch.float64), atol=1e-12, rtol=0)
    G = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    assert bool((G @ z >= -1e-12).all())


def test_gem_without_conflict_leaves_the_step_alone():
    model = TwoParameters()
    gem = GEM(model, memory_size=10, seed=0)
    remember_without_moving(gem, *sample(2.0, 0.0), task_id=0)
    gem.train_step(torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, *sample(2.0, 1.0), task_id=1)
    assert torch.allclose(model.theta.detach(), torch.tensor([-0.1, -0.05], dtype=torch.float64), atol=1e-12, rtol=0)


def _memory_gradients(model: nn.Module, memory: dict, tasks: list[int]) -> torch.Tensor:
    """Row k: the gradient of the mean cross-entropy on task k's stored samples, by hand."""
    rows = []
    for task in tasks:
        held = memory["task_ids"] == task
        x, y, ids = memory["inputs"][held], memory["targets"][held], memory["task_ids"][held]
        grads = torch.autograd.grad(F.cross_entropy(model(x, ids), y), list(model.parameters()), allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, model.parameters())]))
    return torch.stack(rows)


def test_gem_step_on_a_multi_head_model_keeps_every_earlier_task_from_getting_worse():
    model = MultiHead()
    gem = GEM(model, memory_size=24, margin=0.5, seed=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for task in (0, 1):
        x, y = make_task(24, classes=2, seed=task + 10).tensors
        for start in range(0, 24, 8):
            gem.train_step(optimizer, F.cross_entropy, x[start : start + 8], y[start : start + 8], task_id=task)
    x, y = make_task(8, classes=2, seed=3).tensors
    y = 1 - y  # (seed chosen so that this batch conflicts with task 0)
    before = copy.deepcopy(model)
    memory = gem.memory.state_dict()
    assert sorted(memory["task_ids"].tolist()) == [0] * 12 + [1] * 12  # two finished tasks, 12 samples each
    G = _memory_gradients(before, memory, [0, 1])
    step_grads = torch.autograd.grad(F.cross_entropy(before(x, torch.full((8,), 2)), y), list(before.parameters()), allow_unused=True)
    g = torch.cat([(s if s is not None else torch.zeros_like(p)).flatten() for s, p in zip(step_grads, before.parameters())])
    assert bool((G @ g < 0).any())  # a constraint is violated: the projection has work to do

    gem.train_step(optimizer, F.cross_entropy, x, y, task_id=2)

    z = torch.cat([(p - q).flatten() for p, q in zip(before.parameters(), model.parameters())]) / 0.1
    assert bool((G @ z >= -1e-9).all())
    assert torch.allclose(z, CF.gem_project(g, G, 0.5), atol=1e-10, rtol=0)
    assert not torch.equal(model.heads[0].weight, before.heads[0].weight)  # old heads moved: z has components there


def test_the_reference_forward_leaves_batch_norm_statistics_and_the_mode_alone():
    model = make_mlp(batch_norm=True)
    agem = AGEM(model, memory_size=16, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x0, y0 = make_task(16, seed=1).tensors
    agem.train_step(optimizer, F.cross_entropy, x0, y0, task_id=0)
    x, y = make_task(8, seed=2).tensors
    alone = copy.deepcopy(model)
    alone(x)  # the step's own forward, in train mode
    agem.train_step(optimizer, F.cross_entropy, x, y, task_id=1)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(model[1], name), getattr(alone[1], name)), name
    assert model.training and model[1].training


def test_the_reference_gradient_is_float32_outside_autocast():
    net = make_mlp(seed=2).float()
    agem = AGEM(net, memory_size=16, seed=0)
    x, y = float_task(1, samples=16).tensors
    agem.train_step(torch.optim.SGD(net.parameters(), lr=0.1), F.cross_entropy, x, y, task_id=0)
    agem.finish_task()
    params = list(net.parameters())
    plain, _ = agem._reference_gradients(params, agem._reference_groups())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # where a bf16-mixed step would run it
        under_autocast, _ = agem._reference_gradients(params, agem._reference_groups())
    assert under_autocast.dtype == torch.float32 and torch.equal(under_autocast, plain)
    net.to(torch.bfloat16)  # bf16-true: the forward in bfloat16, the gradient kept in float32
    rows, _ = agem._reference_gradients(list(net.parameters()), agem._reference_groups())
    assert rows.dtype == torch.float32 and torch.allclose(rows, plain, atol=0.05, rtol=0.05)


# ------------------------------------------------------------------------------------ Lightning = standalone


def standalone_run(net: nn.Module, method, tasks: list[TensorDataset], batch_size: int = 8, epochs: int = 1) -> None:
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for task_id, dataset in enumerate(tasks):
        for _ in range(epochs):
            for x, y in DataLoader(dataset, batch_size=batch_size):
                method.train_step(optimizer, F.cross_entropy, x, y, task_id=task_id)


@pytest.mark.parametrize(
    "name, kwargs", [("AGEM", {"reference_size": 5}), ("GEM", {"margin": 0.5})], ids=["AGEM", "GEM"]
)
def test_lightning_equals_standalone_over_two_tasks(name, kwargs):
    tasks = [float_task(1), relabelled(float_task(1))]
    net = make_mlp(seed=4).float()
    standalone_net, untouched = copy.deepcopy(net), copy.deepcopy(net)
    method = METHODS[name](net, memory_size=12, seed=7, **kwargs)
    for dataset in tasks:
        fit(net, [method], dataset)  # a LightningModule without ContinualLossMixin
    twin = METHODS[name](standalone_net, memory_size=12, seed=7, **kwargs)
    standalone_run(standalone_net, twin, tasks)

    assert_same_parameters(net, standalone_net)
    assert_same_state(method.memory.state_dict(), twin.memory.state_dict())
    assert method.finished_tasks == [0, 1] and twin.finished_tasks == [0]
    # Reservoirs drew: 32 samples a task for shares of 12 then 6.
    assert sorted(twin.memory.state_dict()["task_ids"].tolist()) == [0] * 6 + [1] * 6
    standalone_run(untouched, AGEM(untouched, memory_size=0), tasks)  # fine-tuning: no memory
    assert not torch.allclose(untouched[0].weight, net[0].weight, atol=1e-3)  # the projection acted


@pytest.mark.parametrize("name", ["AGEM", "GEM"])
def test_gradient_accumulation_projects_once_per_step_on_the_accumulated_gradient(name):
    """Two micro-batches of 4 accumulated: the same step as train_step on their 8 samples at once."""
    tasks = [float_task(1, samples=16), relabelled(float_task(1, samples=16))]
    net = make_mlp(seed=5).float()
    standalone_net = copy.deepcopy(net)
    method = METHODS[name](net, memory_size=64, seed=3)  # every sample kept: the memories must be equal
    for dataset in tasks:
        fit(net, [method], dataset, batch_size=4, accumulate_grad_batches=2, max_epochs=2)
    twin = METHODS[name](standalone_net, memory_size=64, seed=3)
    standalone_run(standalone_net, twin, tasks, batch_size=8, epochs=2)

    assert_same_parameters(net, standalone_net)
    assert_same_state(method.memory.state_dict(), twin.memory.state_dict())
    # Projecting each micro-batch's gradient (or the first one alone) would give other parameters.
    per_micro_batch = copy.deepcopy(standalone_net)
    standalone_run(per_micro_batch, METHODS[name](per_micro_batch, memory_size=64, seed=3), tasks, batch_size=4, epochs=2)
    assert not torch.allclose(per_micro_batch[0].weight, net[0].weight, atol=1e-4)


def test_gradient_clipping_clips_the_projected_gradient():
    task_0 = float_task(1, samples=16)
    net = make_mlp(seed=6).float()
    agem = AGEM(net, memory_size=16, reference_size=16, seed=0)
    fit(net, [agem], task_0, batch_size=16)
    before, stored = copy.deepcopy(net), agem.memory.state_dict()
    x, y = relabelled(task_0).tensors
    fit(net, [agem], TensorDataset(x, y), batch_size=16, gradient_clip_val=0.05)  # one step

    # By hand: g on the batch, g_ref on task 0's 16 remembered samples, projected, then clipped.
    params = list(before.parameters())
    g = torch.cat([t.flatten() for t in torch.autograd.grad(F.cross_entropy(before(x), y), params)])
    old = stored["task_ids"] == 0
    assert int(old.sum()) == 16
    reference = torch.autograd.grad(F.cross_entropy(before(stored["inputs"][old]), stored["targets"][old]), params)
    g_ref = torch.cat([t.flatten() for t in reference])
    assert float(g @ g_ref) < 0  # they conflict
    projected = g - (g @ g_ref) / (g_ref @ g_ref) * g_ref
    norm = projected.norm()
    assert norm > 0.05  # clipping acts
    clipped = projected * (0.05 / (norm + 1e-6))  # clip_grad_norm_'s factor
    step = torch.cat([(p - q).flatten() for p, q in zip(params, net.parameters())]) / 0.1
    assert torch.allclose(step, clipped, atol=1e-6, rtol=0)
    clipped_first = g * (0.05 / (g.norm() + 1e-6))  # clipping before projecting would give this, projected
    assert not torch.allclose(step, clipped_first - (clipped_first @ g_ref) / (g_ref @ g_ref) * g_ref, atol=1e-4)


# ------------------------------------------------------------------------------------ combinations


@pytest.mark.parametrize("other", ["ExperienceReplay", "GEM"])
def test_a_second_rehearsal_method_is_refused_at_setup(other):
    net = make_mlp().float()
    agem = AGEM(net, memory_size=8, seed=0)
    second = ExperienceReplay(net, memory_size=8, seed=0) if other == "ExperienceReplay" else GEM(net, memory_size=8)
    with pytest.raises(ValueError, match=f"AGEM and {other} are on one Trainer"):
        quiet_trainer(callbacks=[agem, second]).fit(lit_classifier(net), DataLoader(float_task(1), batch_size=8))
    assert agem.active_task is None and len(agem.memory) == 0


def test_with_ewc_the_projection_sees_the_penalty_gradient():
    """EWC's closed-form penalty is added before GEM projects: the Lightning run equals a hand
    loop that back-propagates task loss + EWC penalty, then projects with GEM's public hook."""
    tasks = [float_task(1), relabelled(float_task(1))]
    net = make_mlp(seed=8).float()
    hand_net = copy.deepcopy(net)
    ewc, gem = EWC(net, importance=50.0, fisher_sample_size=16, seed=1), GEM(net, memory_size=16, seed=2)
    for dataset in tasks:
        fit(net, [ewc, gem], dataset)

    h_ewc, h_gem = EWC(hand_net, importance=50.0, fisher_sample_size=16, seed=1), GEM(hand_net, memory_size=16, seed=2)
    optimizer = torch.optim.SGD(hand_net.parameters(), lr=0.1)
    for task_id, dataset in enumerate(tasks):
        loader = DataLoader(dataset, batch_size=8)
        h_gem.enter_task(task_id)
        for x, y in loader:
            optimizer.zero_grad()
            (F.cross_entropy(hand_net(x), y) + h_ewc.get_ewc_loss()).backward()
            h_gem.project_gradients()
            optimizer.step()
            h_gem.after_optimizer_step((x,), y)
        h_ewc.register_task(task_id, dataloader=loader)
        h_gem.finish_task()
    assert_same_parameters(net, hand_net)
    assert ewc.finished_tasks == gem.finished_tasks == [0, 1]


# ------------------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("name, kwargs", [("AGEM", {"reference_size": 3}), ("GEM", {"margin": 0.2})], ids=["AGEM", "GEM"])
def test_state_round_trip_continues_exactly(name, kwargs):
    model = make_mlp(seed=2)
    method = METHODS[name](model, memory_size=10, seed=5, **kwargs)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(task, *make_task(6, seed=10 * task + k).tensors) for task in (0, 1, 2) for k in range(3)]
    for task, x, y in batches[:5]:  # task 0, then the middle of task 1
        method.train_step(optimizer, F.cross_entropy, x, y, task_id=task)

    twin_model = copy.deepcopy(model)
    twin = METHODS[name](twin_model, memory_size=10, seed=99, **kwargs)  # another seed: the state must win
    twin.load_state_dict(saved_and_loaded(method.state_dict()))
    twin_optimizer = torch.optim.SGD(twin_model.parameters(), lr=0.1)

    for task, x, y in batches[5:]:
        method.train_step(optimizer, F.cross_entropy, x, y, task_id=task)
        twin.train_step(twin_optimizer, F.cross_entropy, x, y, task_id=task)
    assert_same_parameters(model, twin_model, atol=0)
    assert_same_state(method.state_dict(), twin.state_dict(), atol=0)
    assert twin.finished_tasks == [0, 1]


@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint need to be provided")
@pytest.mark.parametrize("name, kwargs", [("AGEM", {"reference_size": 4}), ("GEM", {})], ids=["AGEM", "GEM"])
def test_a_lightning_checkpoint_in_the_middle_of_task_1_resumes_to_the_uninterrupted_result(tmp_path, name, kwargs):
    init = make_mlp(seed=7).float()
    tasks = [float_task(1), relabelled(float_task(1))]

    net = copy.deepcopy(init)
    method = METHODS[name](net, memory_size=10, seed=1, **kwargs)
    fit(net, [method], tasks[0])
    fit(net, [method], tasks[1], max_epochs=2)

    stopped = copy.deepcopy(init)
    stopped_method = METHODS[name](stopped, memory_size=10, seed=1, **kwargs)
    fit(stopped, [stopped_method], tasks[0])
    saver = ModelCheckpoint(dirpath=tmp_path, save_on_train_epoch_end=True, save_top_k=-1)
    fit(stopped, [stopped_method, saver], tasks[1], enable_checkpointing=True)  # one epoch of two
    (checkpoint,) = tmp_path.glob("*.ckpt")
    torch.load(checkpoint, weights_only=True)  # plain data

    resumed_net = make_mlp(seed=98).float()  # other weights and seed: the checkpoint restores them
    resumed = METHODS[name](resumed_net, memory_size=10, seed=55, **kwargs)
    trainer = quiet_trainer(callbacks=[resumed], max_epochs=2)
    trainer.fit(lit_classifier(resumed_net, lr=0.1, mixin=False), DataLoader(tasks[1], batch_size=8), ckpt_path=checkpoint)

    assert_same_parameters(net, resumed_net)
    assert_same_state(method.memory.state_dict(), resumed.memory.state_dict())
    assert resumed.finished_tasks == method.finished_tasks == [0, 1]


@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint need to be provided")
@pytest.mark.parametrize(
    "saved, wanted",
    [(AGEM, {"memory_size": 10, "reference_size": 8}), (GEM, {"memory_size": 10, "margin": 0.1})],
    ids=["AGEM", "GEM"],
)
def test_a_checkpoint_saved_with_other_hyperparameters_is_refused(tmp_path, saved, wanted):
    net = make_mlp(seed=7).float()
    trainer = quiet_trainer(callbacks=[saved(net, memory_size=10, seed=0)])
    trainer.fit(lit_classifier(net, mixin=False), DataLoader(float_task(1), batch_size=8))
    path = tmp_path / "task0.ckpt"
    trainer.save_checkpoint(path)

    other = saved(make_mlp(seed=8).float(), **wanted, seed=0)
    with pytest.raises(ValueError, match=re.escape(f"not for {other.state_key}: build the method with the hyper-parameters")):
        quiet_trainer(callbacks=[other], max_epochs=2).fit(lit_classifier(other.model, mixin=False), DataLoader(float_task(1), batch_size=8), ckpt_path=path)
    assert other.finished_tasks == [] and len(other.memory) == 0


# ------------------------------------------------------------------------------------ precision


@pytest.mark.parametrize("name", ["AGEM", "GEM"])
@pytest.mark.parametrize(
    "precision, stored_dtype, atol",
    [("bf16-mixed", torch.float32, 2e-3), ("bf16-true", torch.bfloat16, 1e-2), ("16-true", torch.float16, 3e-3)],
)
def test_lower_precisions_train_close_to_32_bit(name, precision, stored_dtype, atol):
    """The stored samples keep the dtype the batches came in (16-bit under *-true); the reference
    gradient runs outside autocast, in float32 (bf16-mixed) or the 16-bit parameters' dtype. The
    parameters end within ``atol`` of a 32-bit run (measured: at most 4e-4, 5e-3 and 1e-3), while
    the projection itself moves them by more than ``3·atol`` (against fine-tuning)."""
    tasks = [float_task(1), relabelled(float_task(1))]
    nets = {p: make_mlp(seed=9).float() for p in ("32-true", precision)}
    methods = {p: METHODS[name](net, memory_size=12, seed=0) for p, net in nets.items()}
    for epochs, dataset in zip((1, 3), tasks):
        for p, net in nets.items():
            fit(net, [methods[p]], dataset, precision=p, max_epochs=epochs)
    assert methods[precision].memory.state_dict()["inputs"].dtype == stored_dtype
    for (param_name, low), full in zip(nets[precision].named_parameters(), nets["32-true"].parameters()):
        assert torch.allclose(low.float(), full, atol=atol, rtol=0), param_name
    fine_tuned = make_mlp(seed=9).float()
    optimizer = torch.optim.SGD(fine_tuned.parameters(), lr=0.1)
    for epochs, dataset in zip((1, 3), tasks):
        for _ in range(epochs):
            for x, y in DataLoader(dataset, batch_size=8):
                optimizer.zero_grad()
                F.cross_entropy(fine_tuned(x), y).backward()
                optimizer.step()
    effect = max(float((p - q).detach().abs().max()) for p, q in zip(fine_tuned.parameters(), nets["32-true"].parameters()))
    assert effect > 3 * atol


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["AGEM", "GEM"])
def test_16_mixed_on_a_gpu_projects_the_unscaled_gradient(name):
    """Under a grad scaler the projection sees unscaled gradients (GEM's margin is not scale-free):
    the parameters end within float16 rounding of a 32-bit CPU run."""
    tasks = [float_task(1), relabelled(float_task(1))]
    gpu_net, cpu_net = make_mlp(seed=9).float(), make_mlp(seed=9).float()
    # The memory's generator lives on the model's device and draws otherwise on a GPU: a memory
    # that keeps every sample and a reference of all of them leave nothing to chance.
    gpu_method, cpu_method = (METHODS[name](net, memory_size=64, seed=0) for net in (gpu_net, cpu_net))
    for dataset in tasks:
        fit(gpu_net, [gpu_method], dataset, accelerator="gpu", devices=1, precision="16-mixed", deterministic=False, max_epochs=2)
        fit(cpu_net, [cpu_method], dataset, accelerator="cpu", max_epochs=2)
    assert gpu_method.memory.state_dict()["inputs"].shape[0] == 64
    for (param_name, ours), theirs in zip(gpu_net.named_parameters(), cpu_net.parameters()):
        assert torch.allclose(ours.cpu(), theirs, atol=2e-3, rtol=0), param_name


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("name", ["AGEM", "GEM"])
def test_targets_that_are_not_class_labels_are_refused_before_any_change(name):
    model = make_mlp()
    method = METHODS[name](model, memory_size=8, seed=0)
    before = copy.deepcopy(model.state_dict())
    x = make_task(4).tensors[0]
    soft = torch.rand(4, 3, dtype=torch.float64)
    message = f"{name} needs class labels as targets (a 1-D integer tensor"
    with pytest.raises(ValueError, match=re.escape(message)):
        method.train_step(torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss, x, soft, task_id=0)
    with pytest.raises(ValueError, match=re.escape(message)):
        method.add_to_memory(x, soft, task_id=0)
    assert_same_state(model.state_dict(), before, atol=0)
    assert (method.active_task, method.steps_in_active_task, len(method.memory)) == (None, 0, 0)

    net = make_mlp().float()
    lightning_method = METHODS[name](net, memory_size=8, seed=0)

    weights = copy.deepcopy(net.state_dict())
    data = TensorDataset(torch.randn(8, 6), torch.rand(8, 3))
    with pytest.raises(ValueError, match=re.escape(message)):
        quiet_trainer(callbacks=[lightning_method]).fit(lit_classifier(net, mixin=False, loss_fn=F.mse_loss), DataLoader(data, batch_size=4))
    assert_same_state(net.state_dict(), weights, atol=0)
    assert len(lightning_method.memory) == 0 and lightning_method.steps_in_active_task == 0


def test_a_batch_the_memory_cannot_store_is_refused_before_the_step():
    model = make_mlp()
    agem = AGEM(model, memory_size=8, seed=0)
    x, y = make_task(4).tensors
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    agem.train_step(optimizer, F.cross_entropy, x, y, task_id=0)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=re.escape("targets of shape (4,) and dtype torch.int32 do not match the replay memory")):
        agem.train_step(optimizer, F.cross_entropy, x, y.int(), task_id=0)
    assert_same_state(model.state_dict(), before, atol=0)
    assert (agem.steps_in_active_task, agem.memory.num_seen) == (1, 4)


@pytest.mark.parametrize("add_first", [False, True], ids=["train-then-add", "add-then-train"])
def test_the_replay_tutorial_loop_stores_each_batch_once(add_first):
    """The continual-learning API's replay tutorial calls train_step and add_to_memory on each batch:
    the same run as train_step alone, with a warning naming the double offer."""
    batches = [(task, *make_task(6, seed=10 * task + k).tensors) for task in (0, 1) for k in range(3)]
    models = [make_mlp(seed=3), make_mlp(seed=3)]
    methods = [AGEM(model, memory_size=10, reference_size=4, seed=2) for model in models]
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.1) for model in models]
    for task, x, y in batches:
        methods[0].train_step(optimizers[0], F.cross_entropy, x, y, task_id=task)
        with pytest.warns(UserWarning, match="got the tensor of inputs that (train_step|add_to_memory) has just stored"):
            if add_first:
                methods[1].add_to_memory(x, y, task_id=task)
                methods[1].train_step(optimizers[1], F.cross_entropy, x, y, task_id=task)
            else:
                methods[1].train_step(optimizers[1], F.cross_entropy, x, y, task_id=task)
                methods[1].add_to_memory(x, y, task_id=task)
    assert methods[1].memory.num_seen == 36  # 6 batches of 6, each stored once
    if not add_first:  # stored at the same moments as by train_step alone: the same run
        assert_same_parameters(*models, atol=0)
        assert_same_state(methods[0].memory.state_dict(), methods[1].memory.state_dict(), atol=0)
    methods[1].add_to_memory(x.clone(), y, task_id=1)  # another tensor: stored
    assert methods[1].memory.num_seen == 42
