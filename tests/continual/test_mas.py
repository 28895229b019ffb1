"""MAS: the importance against hand-computed values and a per-sample loop, its accumulation over
tasks, the penalty's gradient, Lightning against the standalone door, state, and 16-bit models."""

from __future__ import annotations

import copy
import io

import lightning as L
import pytest
import torch
from torch import nn

from neurenix.continual import MAS
from neurenix.continual import functional as CF
from tests.helpers import lit_classifier, loader, make_mlp, make_task, quiet_trainer


def _per_sample_reference(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``mean_n |∂‖f(x_n)‖²/∂θ|`` one sample at a time with autograd."""
    total = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for sample in x:
        model.zero_grad()
        model(sample.unsqueeze(0)).square().sum().backward()
        for name, p in model.named_parameters():
            total[name] += p.grad.abs()
    return {name: t / len(x) for name, t in total.items()}


def test_importance_of_a_linear_unit_by_hand():
    # f(x) = w·x + b with w = (1, -2), b = 0.5; ‖f‖² = f², ∂/∂w = 2f·x, ∂/∂b = 2f.
    layer = nn.Linear(2, 1).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0]]))
        layer.bias.fill_(0.5)
    x = torch.tensor([[1.0, 1.0], [2.0, 0.5]], dtype=torch.float64)  # f = -0.5 and 1.5
    sums = CF.mas_importance_sum(layer, dict(layer.named_parameters()), {}, x)
    # |2·(-0.5)·(1, 1)| + |2·1.5·(2, 0.5)| = (1, 1) + (6, 1.5); |2·(-0.5)| + |2·1.5| = 4
    torch.testing.assert_close(sums["weight"], torch.tensor([[7.0, 2.5]], dtype=torch.float64))
    torch.testing.assert_close(sums["bias"], torch.tensor([4.0], dtype=torch.float64))

    mas = MAS(layer, sample_size=10)
    mas.register_task(0, (x, torch.zeros(2)))
    with torch.no_grad():
        layer.weight.add_(0.1)  # trained
    mas.register_task(1)
    # at the task's end w = (1.1, -1.9): f = -0.3 and 1.75; Ω = mean of |2f·x| and |2f|
    torch.testing.assert_close(mas.omega["weight"], torch.tensor([[(0.6 + 7.0) / 2, (0.6 + 1.75) / 2]], dtype=torch.float64))
    torch.testing.assert_close(mas.omega["bias"], torch.tensor([(0.6 + 3.5) / 2], dtype=torch.float64))


@pytest.mark.parametrize("batch_norm", [False, True], ids=["closed-form", "vmap"])
def test_importance_equals_a_per_sample_loop(batch_norm):
    model = make_mlp(batch_norm=batch_norm)
    x = make_task().tensors[0]
    model.eval()  # batch norm with running statistics: each sample's output is its own
    expected = _per_sample_reference(model, x)
    params = {n: p.detach() for n, p in model.named_parameters()}
    sums = CF.mas_importance_sum(model, params, dict(model.named_buffers()), x)
    for name, value in expected.items():
        torch.testing.assert_close(sums[name] / len(x), value, rtol=1e-10, atol=1e-12)

    mas = MAS(model, sample_size=1000)
    model.train()
    mas.register_task(0, loader(make_task()))
    mas.register_task(1)  # untrained: consolidated as given (the parameters never moved)
    for name, value in expected.items():
        torch.testing.assert_close(mas.omega[name], value, rtol=1e-10, atol=1e-12)
    assert model.training  # the importance ran in eval mode, and the mode came back


def _sgd_task(model, mas, data, task_id, steps=5):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data.tensors
    for step in range(steps):
        rows = slice(step * 8, step * 8 + 8)
        mas.train_step(optimizer, nn.functional.cross_entropy, x[rows], y[rows], task_id)


def test_importances_add_up_over_tasks_and_the_penalty_pulls_to_the_last_end():
    model = make_mlp()
    mas = MAS(model, importance=3.0, sample_size=1000)
    tasks = [make_task(seed=s) for s in (1, 2)]
    omegas, ends = [], []
    for task_id, data in enumerate(tasks):
        mas.register_task(task_id, loader(data))
        _sgd_task(model, mas, data, task_id)
        model.eval()
        omegas.append(_per_sample_reference(model, data.tensors[0]))
        model.train()
        ends.append({n: p.detach().clone() for n, p in model.named_parameters()})
    mas.register_task(2)
    for name in omegas[0]:
        torch.testing.assert_close(mas.omega[name], omegas[0][name] + omegas[1][name], rtol=1e-10, atol=1e-12)
    # the penalty: 3 · Σ Ω (θ − θ*_1)², no ½, and its gradient 2·3·Ω·(θ − θ*_1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    penalty = mas.get_regularization_loss()
    by_hand = sum((mas.omega[n] * (p - ends[1][n]).square()).sum() for n, p in model.named_parameters()) * 3.0
    torch.testing.assert_close(penalty, by_hand)
    model.zero_grad()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    mas.add_penalty_gradients()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 6.0 * mas.omega[n] * (p.detach() - ends[1][n]))


def test_lightning_equals_the_standalone_door_over_two_tasks():
    tasks = [make_task(seed=s) for s in (1, 2)]

    plain = make_mlp()
    lit_net = copy.deepcopy(plain)
    standalone = MAS(plain, importance=2.0, sample_size=24, seed=7)
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.1)
    for task_id, data in enumerate(tasks):
        standalone.register_task(task_id, loader(data))
        for x, y in loader(data):
            standalone.train_step(optimizer, nn.functional.cross_entropy, x, y, task_id)
    standalone.register_task(2)

    module = lit_classifier(lit_net)
    callback = MAS(lit_net, importance=2.0, sample_size=24, seed=7)
    for data in tasks:
        quiet_trainer(callbacks=[callback]).fit(module, loader(data))

    assert callback.finished_tasks == [0, 1] and standalone.finished_tasks == [0, 1]
    for (name, p), q in zip(plain.named_parameters(), lit_net.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(callback.omega[name], standalone.omega[name], rtol=1e-12, atol=1e-12)


def test_state_round_trip_mid_task_resumes_exactly():
    tasks = [make_task(seed=s) for s in (1, 2)]
    model = make_mlp()
    mas = MAS(model, importance=2.0, sample_size=16, seed=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    mas.register_task(0, loader(tasks[0]))
    _sgd_task(model, mas, tasks[0], 0, steps=3)
    mas.register_task(1, loader(tasks[1]))
    x, y = tasks[1].tensors
    mas.train_step(optimizer, nn.functional.cross_entropy, x[:8], y[:8], 1)

    buffer = io.BytesIO()
    torch.save(mas.state_dict(), buffer)
    buffer.seek(0)
    copy_model = copy.deepcopy(model)
    restored = MAS(copy_model, importance=2.0, sample_size=16, seed=99)  # the generator comes from the state
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    restored.set_task_data(loader(tasks[1]))  # the data is not part of the state

    for net, method in ((model, mas), (copy_model, restored)):
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for start in (8, 16):
            method.train_step(opt, nn.functional.cross_entropy, x[start : start + 8], y[start : start + 8], 1)
        method.register_task(2)
    for name, value in mas.omega.items():
        assert torch.equal(restored.omega[name], value), name
    for p, q in zip(model.parameters(), copy_model.parameters()):
        assert torch.equal(p, q)


def test_a_task_consolidated_without_data_adds_nothing_and_warns():
    model = make_mlp()
    mas = MAS(model)
    mas.register_task(0)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.warns(UserWarning, match="MAS consolidated task 0 without data: it adds no importance"):
        mas.register_task(1)
    assert all(bool((o == 0).all()) for o in mas.omega.values())


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "16-true"])
def test_16_bit_precisions_keep_the_importance_in_float32(precision):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    reference = copy.deepcopy(net).double()
    data = make_task()
    x, y = data.tensors[0].float(), data.tensors[1]
    train = torch.utils.data.TensorDataset(x, y)
    module = lit_classifier(net, lr=0.0)  # no step: Ω is taken at the initial parameters
    mas = MAS(net, sample_size=1000)
    trainer = quiet_trainer(callbacks=[mas], precision=precision, max_steps=1)
    trainer.fit(module, loader(train))
    assert mas.finished_tasks == [0]
    expected = _per_sample_reference(reference.eval(), x.double())
    for name, value in mas.omega.items():
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value.double(), expected[name], rtol=0.05, atol=0.05 * float(expected[name].abs().max()))


def test_a_multi_head_model_gets_the_importance_of_its_task_head():
    from tests.helpers import lit_multi_head

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.body, self.heads = nn.Linear(6, 4), nn.Linear(4, 6)

        def forward(self, x, task_ids):
            return self.heads(torch.tanh(self.body(x))).view(len(x), 2, 3)[torch.arange(len(x)), task_ids]

    model = TwoHeads().double()
    x, y = make_task().tensors
    ids = torch.ones(len(x), dtype=torch.long)
    mas = MAS(model, sample_size=1000)
    module = lit_multi_head(model, lr=0.0)
    quiet_trainer(callbacks=[mas], max_steps=1).fit(module, loader(torch.utils.data.TensorDataset(x, y, ids)))
    heads = mas.omega["heads.weight"]
    assert bool((heads[:3] == 0).all()) and bool((heads[3:] > 0).all())  # only task 1's head's rows matter


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"importance": -1.0}, ValueError, "importance must be >= 0.0, got -1.0"),
        ({"sample_size": 0}, ValueError, "sample_size must be"),
        ({"seed": -1}, ValueError, "seed must be"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        MAS(make_mlp(), **kwargs)


def test_repr_and_hyperparameters():
    mas = MAS(nn.Linear(2, 2), importance=0.5, sample_size=10)
    assert repr(mas) == "MAS(Linear, importance=0.5, sample_size=10)"
    assert mas.state_key == "MAS{'importance': 0.5, 'sample_size': 10}"
    assert isinstance(mas, L.Callback)
