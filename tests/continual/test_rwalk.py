"""RWalk: its formulas by hand, a step-by-step reference trace over two tasks, Lightning against
the standalone door, state, skipped 16-bit steps and 16-bit models."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from neurenix.continual import RWalk
from neurenix.continual import functional as CF
from tests.helpers import lit_classifier, loader, make_mlp, make_task, quiet_trainer

ALPHA, EPSILON, LAMBDA, LR, INTERVAL = 0.6, 1e-3, 2.0, 0.1, 3


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_online_fisher_step_by_hand_and_non_finite_entries_keep_theirs():
    fisher = [t(1.0, 2.0, 3.0)]
    CF.rwalk_fisher_update_(fisher, [t(2.0, float("inf"), float("nan"))], 0.25)
    # 0.25·4 + 0.75·1 = 1.75; the non-finite entries keep 2 and 3
    torch.testing.assert_close(fisher[0], t(1.75, 2.0, 3.0))
    CF.rwalk_fisher_update_(fisher, [None], 0.25)  # no gradient: unchanged
    torch.testing.assert_close(fisher[0], t(1.75, 2.0, 3.0))


def test_interval_score_average_and_weights_by_hand():
    # relu(ω / (½·F·Δ² + ε)): (0.3 / (½·2·0.25 + 0.05), −1 → 0, 0.2 / (0 + 0.05))
    score = CF.rwalk_interval_score(t(0.3, -1.0, 0.2), t(0.5, 1.0, 0.0), t(2.0, 1.0, 4.0), 0.05)
    torch.testing.assert_close(score, t(1.0, 0.0, 4.0))
    torch.testing.assert_close(CF.rwalk_average_scores(None, t(2.0)), t(2.0))
    torch.testing.assert_close(CF.rwalk_average_scores(t(2.0), t(4.0)), t(3.0))
    weights = CF.rwalk_weights({"a": t(1.0, 4.0), "b": t(2.0)}, {"a": t(0.0, 0.0), "b": t(5.0)})
    # F / 4 + s / 5 (max over all parameters); a zero term stays zero
    torch.testing.assert_close(weights["a"], t(0.25, 1.0))
    torch.testing.assert_close(weights["b"], t(1.5))
    zero = CF.rwalk_weights({"a": t(0.0)}, {"a": t(0.0)})
    torch.testing.assert_close(zero["a"], t(0.0))


def _linear() -> nn.Linear:
    layer = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(t(0.5, -0.3, 0.2).unsqueeze(0))
    return layer


def _batches(seed: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(4, 3, generator=generator, dtype=torch.float64), torch.randn(4, 1, generator=generator, dtype=torch.float64))
        for _ in range(count)
    ]


def _mse(outputs, targets):
    return nn.functional.mse_loss(outputs, targets)


def _reference(tasks: list[list[tuple[torch.Tensor, torch.Tensor]]]):
    """RWalk written out step by step: returns the final weight and the penalty weights."""
    w = t(0.5, -0.3, 0.2)
    fisher, score, anchor, weight = torch.zeros(3, dtype=torch.float64), None, None, None
    for batches in tasks:
        task_score = torch.zeros(3, dtype=torch.float64)
        omega, start, steps = torch.zeros(3, dtype=torch.float64), w.clone(), 0
        for x, y in batches:
            g = 2 * ((x @ w - y[:, 0]).unsqueeze(1) * x).mean(0)  # ∂ mean((x·w − y)²)/∂w
            fisher = ALPHA * g**2 + (1 - ALPHA) * fisher
            total = g if anchor is None else g + 2 * LAMBDA * weight * (w - anchor)
            new_w = w - LR * total
            omega = omega - g * (new_w - w)
            w, steps = new_w, steps + 1
            if steps == INTERVAL:
                task_score += torch.relu(omega / (0.5 * fisher * (w - start) ** 2 + EPSILON))
                omega, start, steps = torch.zeros(3, dtype=torch.float64), w.clone(), 0
        if steps:
            task_score += torch.relu(omega / (0.5 * fisher * (w - start) ** 2 + EPSILON))
        score = task_score if score is None else 0.5 * (score + task_score)
        weight = fisher / fisher.max() + score / score.max()
        anchor = w.clone()
    return w, weight, fisher, score


def test_two_tasks_follow_the_reference_trace():
    tasks = [_batches(1, 7), _batches(2, 5)]
    model = _linear()
    rwalk = RWalk(model, importance=LAMBDA, alpha=ALPHA, epsilon=EPSILON, interval=INTERVAL)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for task_id, batches in enumerate(tasks):
        for x, y in batches:
            rwalk.train_step(optimizer, _mse, x, y, task_id)
    rwalk.register_task(2)
    w, weight, fisher, score = _reference(tasks)
    torch.testing.assert_close(model.weight.detach()[0], w, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(rwalk.fisher["weight"][0], fisher, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(rwalk.scores["weight"][0], score, rtol=1e-12, atol=1e-14)
    # the penalty importance · Σ W (θ − θ*)², no ½
    with torch.no_grad():
        model.weight.add_(0.1)
    expected = LAMBDA * (weight * 0.01).sum()
    torch.testing.assert_close(rwalk.get_regularization_loss(), expected, rtol=1e-12, atol=1e-14)


def test_lightning_equals_the_standalone_door_over_two_tasks():
    tasks = [make_task(seed=s) for s in (1, 2)]
    plain = make_mlp()
    lit_net = copy.deepcopy(plain)
    standalone = RWalk(plain, importance=LAMBDA, alpha=ALPHA, interval=INTERVAL)
    optimizer = torch.optim.SGD(plain.parameters(), lr=LR)
    for task_id, data in enumerate(tasks):
        for x, y in loader(data):
            standalone.train_step(optimizer, nn.functional.cross_entropy, x, y, task_id)
    standalone.register_task(2)

    callback = RWalk(lit_net, importance=LAMBDA, alpha=ALPHA, interval=INTERVAL)
    module = lit_classifier(lit_net, lr=LR)
    for data in tasks:
        quiet_trainer(callbacks=[callback]).fit(module, loader(data))
    assert callback.finished_tasks == standalone.finished_tasks == [0, 1]
    for name, p in plain.named_parameters():
        torch.testing.assert_close(dict(lit_net.named_parameters())[name], p, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(callback.fisher[name], standalone.fisher[name], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(callback.scores[name], standalone.scores[name], rtol=1e-12, atol=1e-12)


def test_state_round_trip_mid_interval_resumes_exactly():
    tasks = [_batches(1, 7), _batches(2, 6)]
    model = _linear()
    rwalk = RWalk(model, importance=LAMBDA, alpha=ALPHA, interval=INTERVAL)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for x, y in tasks[0]:
        rwalk.train_step(optimizer, _mse, x, y, 0)
    for x, y in tasks[1][:2]:  # two steps into an interval of three, one step pending
        rwalk.train_step(optimizer, _mse, x, y, 1)

    buffer = io.BytesIO()
    torch.save(rwalk.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["has_pending"] and state["interval_steps"] == 2
    copy_model = copy.deepcopy(model)
    restored = RWalk(copy_model, importance=LAMBDA, alpha=ALPHA, interval=INTERVAL)
    restored.load_state_dict(state)
    for net, method in ((model, rwalk), (copy_model, restored)):
        opt = torch.optim.SGD(net.parameters(), lr=LR)
        for x, y in tasks[1][2:]:
            method.train_step(opt, _mse, x, y, 1)
        method.register_task(2)
    assert torch.equal(copy_model.weight, model.weight)
    for name in ("fisher", "scores"):
        assert torch.equal(getattr(restored, name)["weight"], getattr(rwalk, name)["weight"]), name
    assert torch.equal(restored.penalty(), rwalk.penalty())


def test_a_step_with_an_overflowed_gradient_adds_nothing():
    model = _linear()
    rwalk = RWalk(model, alpha=ALPHA, interval=100)
    rwalk.register_task(0)
    model.weight.grad = torch.tensor([[1.0, float("inf"), 2.0]], dtype=torch.float64)
    rwalk.observe_gradients()
    # F = α·g² where g is finite; the inf entry keeps its zero
    torch.testing.assert_close(rwalk.fisher["weight"][0], t(ALPHA, 0.0, 4 * ALPHA))
    assert all(bool(torch.isfinite(f).all()) for f in rwalk.fisher.values())


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "16-true"])
def test_16_bit_precisions_keep_fisher_and_scores_in_float32(precision):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = make_task().tensors
    train = torch.utils.data.TensorDataset(x.float(), y)
    rwalk = RWalk(net, interval=2)
    quiet_trainer(callbacks=[rwalk], precision=precision).fit(lit_classifier(net), loader(train))
    assert rwalk.finished_tasks == [0]
    for name in rwalk.fisher:
        for values in (rwalk.fisher, rwalk.scores, rwalk._weight):
            assert values[name].dtype == torch.float32 and bool(torch.isfinite(values[name]).all()), name
        assert bool((rwalk.fisher[name] > 0).any()) and bool((rwalk.scores[name] > 0).any()), name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"importance": -1.0}, "importance must be >= 0.0, got -1.0"),
        ({"alpha": 1.5}, "alpha must be"),
        ({"epsilon": 0.0}, "epsilon must be > 0.0, got 0.0"),
        ({"interval": 0}, "interval must be"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RWalk(make_mlp(), **kwargs)


def test_repr():
    assert repr(RWalk(nn.Linear(2, 2))) == "RWalk(Linear, importance=1.0, alpha=0.9, epsilon=0.001, interval=10)"
