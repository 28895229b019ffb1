"""L2 regularization: ``importance/2 · Σ (θ − θ*)²`` towards the parameters the last task ended with.

References are written independently: the test keeps its own copy of θ* and trains a twin model
with the penalty written out in the loss (autograd), step for step against ``train_step``.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from neurenix.continual import L2Regularization
from tests.helpers import loader, make_mlp, make_task

LR = 0.1


def _net(seed: int = 0) -> nn.Sequential:
    return make_mlp(inputs=4, hidden=3, classes=3, seed=seed)


def _task(seed: int):
    return loader(make_task(samples=24, inputs=4, classes=3, seed=seed), batch_size=8)


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _close(actual: list[torch.Tensor], expected: list[torch.Tensor], atol: float = 1e-12) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=atol)


def _train_plainly(model: nn.Module, data, optimizer) -> None:
    loss_fn = nn.CrossEntropyLoss()
    for x, y in data:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()


def _penalized_step(model, optimizer, x, y, anchor, importance) -> None:
    """One step on ``CE + importance/2·Σ(θ − θ*)²`` written out, autograd for the gradient."""
    optimizer.zero_grad()
    penalty = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
    (nn.functional.cross_entropy(model(x), y) + importance / 2 * penalty).backward()
    optimizer.step()


def test_penalty_value_and_gradient_by_hand():
    model = nn.Linear(2, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0]]))
        model.bias.fill_(0.5)
    l2 = L2Regularization(model, importance=3.0)
    l2.register_task(task_id=1)
    with torch.no_grad():  # "training" of task 1: θ* = ([1.5, −2.0], 0.25)
        model.weight.copy_(torch.tensor([[1.5, -2.0]]))
        model.bias.fill_(0.25)
    l2.register_task(task_id=2)  # consolidates task 1 at θ*
    assert l2.get_regularization_loss().item() == 0.0
    with torch.no_grad():  # θ − θ* = ([0.5, 1.0], −0.25)
        model.weight.copy_(torch.tensor([[2.0, -1.0]]))
        model.bias.fill_(0.0)
    penalty = l2.get_regularization_loss()
    assert penalty.item() == pytest.approx(3.0 / 2 * (0.25 + 1.0 + 0.0625), rel=1e-15)
    penalty.backward()
    torch.testing.assert_close(model.weight.grad, torch.tensor([[1.5, 3.0]], dtype=torch.float64), rtol=0, atol=1e-15)
    assert model.bias.grad.item() == pytest.approx(-0.75, rel=1e-15)


def test_closed_form_gradient_equals_autograd_of_the_penalized_loss():
    model = _net()
    l2 = L2Regularization(model, importance=2.5)
    _train_plainly(model, _task(1), torch.optim.SGD(model.parameters(), lr=LR))
    l2.register_task(task_id=1)
    _train_plainly(model, _task(2), torch.optim.SGD(model.parameters(), lr=LR))  # move away from θ*
    x, y = next(iter(_task(3)))

    model.zero_grad()
    (nn.functional.cross_entropy(model(x), y) + l2.get_regularization_loss()).backward()
    autograd = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    l2.add_penalty_gradients()
    _close([p.grad for p in model.parameters()], autograd)
    assert max((g - p.grad).abs().max().item() for g, p in zip(autograd, model.parameters())) < 1e-12
    assert l2.get_regularization_loss().item() > 1e-3  # the penalty is not trivially zero here


@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, torch.optim.Adam])
def test_documented_flow_matches_a_hand_written_penalized_loop(optimizer_class):
    importance = 4.0
    model = _net()
    l2 = L2Regularization(model, importance=importance)
    optimizer = optimizer_class(model.parameters(), lr=LR if optimizer_class is torch.optim.SGD else 0.01)
    _train_plainly(model, _task(1), optimizer)
    end_of_task_1 = _params(model)
    l2.register_task(task_id=1)
    _close(list(l2.state_dict()["anchor"].values()), end_of_task_1, atol=0)

    twin = copy.deepcopy(model)
    twin_optimizer = optimizer_class(twin.parameters())
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # no shared moments
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(2):
        for x, y in _task(2):
            returned = l2.train_step(optimizer, loss_fn, x, y, task_id=2)
            expected_loss = loss_fn(twin(x), y).detach()
            _penalized_step(twin, twin_optimizer, x, y, end_of_task_1, importance)
            _close(_params(model), _params(twin))
            assert returned.item() == pytest.approx(expected_loss.item(), rel=1e-12)  # task loss only
    expected = importance / 2 * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), end_of_task_1))
    assert l2.get_regularization_loss().item() == pytest.approx(expected.item(), rel=1e-12)
    assert expected.item() > 1e-4


def test_only_the_most_recent_task_is_the_anchor():
    importance = 4.0
    model = _net()
    l2 = L2Regularization(model, importance=importance)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    for x, y in _task(1):
        l2.train_step(optimizer, loss_fn, x, y, task_id=1)
    end_of_task_1 = _params(model)
    for x, y in _task(2):
        l2.train_step(optimizer, loss_fn, x, y, task_id=2)
    end_of_task_2 = _params(model)

    twin = copy.deepcopy(model)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=LR)
    for x, y in _task(3):  # the first step of task 3 consolidates task 2
        l2.train_step(optimizer, loss_fn, x, y, task_id=3)
        _penalized_step(twin, twin_optimizer, x, y, end_of_task_2, importance)
        _close(_params(model), _params(twin))
    assert l2.finished_tasks == [1, 2]
    _close(list(l2.state_dict()["anchor"].values()), end_of_task_2, atol=0)
    to_anchor = lambda anchor: importance / 2 * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))  # noqa: E731
    assert l2.get_regularization_loss().item() == pytest.approx(to_anchor(end_of_task_2).item(), rel=1e-12)
    assert abs(to_anchor(end_of_task_1).item() - to_anchor(end_of_task_2).item()) > 1e-4


def test_no_penalty_before_the_first_task_ends():
    model = _net()
    l2 = L2Regularization(model, importance=10.0)
    assert l2.get_regularization_loss().item() == 0.0
    l2.register_task(task_id=1)  # registered before training: nothing to anchor yet
    assert l2.get_regularization_loss().item() == 0.0 and not l2.has_penalty

    twin = copy.deepcopy(model)
    optimizer, twin_optimizer = (torch.optim.SGD(m.parameters(), lr=LR) for m in (model, twin))
    for x, y in _task(1):
        l2.train_step(optimizer, nn.CrossEntropyLoss(), x, y, task_id=1)
        _penalized_step(twin, twin_optimizer, x, y, _params(twin), importance=0.0)
    _close(_params(model), _params(twin))


def test_zero_importance_trains_like_a_plain_step():
    model = _net()
    l2 = L2Regularization(model, importance=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    _train_plainly(model, _task(1), optimizer)
    l2.register_task(task_id=1)
    twin = copy.deepcopy(model)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=LR)
    for x, y in _task(2):
        l2.train_step(optimizer, nn.CrossEntropyLoss(), x, y, task_id=2)
    _train_plainly(twin, _task(2), twin_optimizer)
    _close(_params(model), _params(twin), atol=0)
    assert l2.get_regularization_loss().item() == 0.0


@pytest.mark.parametrize(
    "importance, error, message",
    [
        (-1.0, ValueError, r"importance must be >= 0.0, got -1.0"),
        (float("nan"), ValueError, r"importance must be finite, got nan"),
        ("1.0", TypeError, r"importance must be a real number, got str: '1.0'"),
        (True, TypeError, r"importance must be a real number, got bool: True"),
    ],
)
def test_bad_importance_is_named(importance, error, message):
    with pytest.raises(error, match=message):
        L2Regularization(_net(), importance=importance)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got str"):
        L2Regularization("model")


def test_a_consolidated_task_id_cannot_come_back():
    model = _net()
    l2 = L2Regularization(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    _train_plainly(model, _task(1), optimizer)
    l2.register_task(task_id=1)
    anchor = list(l2.state_dict()["anchor"].values())
    x, y = next(iter(_task(2)))
    with pytest.raises(ValueError, match=r"task_id=1 was already trained and consolidated"):
        l2.register_task(task_id=1)
    before = _params(model)
    with pytest.raises(ValueError, match=r"task_id=1 was already trained and consolidated"):
        l2.train_step(optimizer, nn.CrossEntropyLoss(), x, y, task_id=1)
    _close(_params(model), before, atol=0)  # nothing changed
    _close(list(l2.state_dict()["anchor"].values()), anchor, atol=0)


def test_state_round_trip_in_the_middle_of_task_2():
    model = _net()
    l2 = L2Regularization(model, importance=3.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    for x, y in _task(1):
        l2.train_step(optimizer, loss_fn, x, y, task_id=1)
    task_2 = list(_task(2))
    l2.train_step(optimizer, loss_fn, *task_2[0], task_id=2)

    buffer = io.BytesIO()
    torch.save(l2.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    model_copy = copy.deepcopy(model)
    restored = L2Regularization(model_copy, importance=3.0)
    restored.load_state_dict(state)
    assert restored.active_task == 2 and restored.finished_tasks == [1]
    assert restored.get_regularization_loss().item() == pytest.approx(l2.get_regularization_loss().item(), rel=1e-15)

    copy_optimizer = torch.optim.SGD(model_copy.parameters(), lr=LR)
    for x, y in task_2[1:]:
        l2.train_step(optimizer, loss_fn, x, y, task_id=2)
        restored.train_step(copy_optimizer, loss_fn, x, y, task_id=2)
    _close(_params(model_copy), _params(model), atol=0)
    for method in (l2, restored):  # task 3 anchors both at the same end of task 2
        method.register_task(task_id=3)
    _close(list(restored.state_dict()["anchor"].values()), list(l2.state_dict()["anchor"].values()), atol=0)
