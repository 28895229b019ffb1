"""Synaptic Intelligence (Zenke, Poole & Ganguli 2017), traced by hand.

A bias-free linear model under MSE has the closed-form gradient ``2/N · xᵀ(x·w − y)``, so every
reference here follows SGD step by step without autograd: ``ω += −g·Δθ`` with ``g`` the gradient
of the *unregularized* task loss and ``Δθ`` the step actually taken, ``Ω += relu(ω/(Δ² + ξ))``,
penalty ``c·ΣΩ(θ − θ*)²`` with gradient ``2cΩ(θ − θ*)``.
"""

from __future__ import annotations

import copy
import math
import io

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from neurenix.continual import EWC, L2Regularization, SynapticIntelligence
from tests.helpers import lit_classifier, make_task, quiet_trainer

LR = 0.1
W0 = [0.5, -0.3]


def _linear(w: list[float]) -> nn.Linear:
    model = nn.Linear(len(w), 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([w], dtype=torch.float64))
    return model


def _mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ((outputs.squeeze(-1) - targets) ** 2).mean()


def _grad(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """∇_w mean((x·w − y)²), written out."""
    return 2.0 / x.shape[0] * x.T @ (x @ w - y)


def _batches(seed: int, count: int = 3, size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count * size, 2, generator=generator, dtype=torch.float64)
    y = torch.randn(count * size, generator=generator, dtype=torch.float64)
    return list(zip(x.split(size), y.split(size)))


def _trace(w, batches, pull=None, weight_decay=0.0, omega_from_total=False):
    """SGD by hand; ``pull(w)`` (a penalty's gradient) moves θ but is not part of ω (unless
    ``omega_from_total``, the wrong variant). Returns (ω, θ_end)."""
    omega = torch.zeros_like(w)
    for x, y in batches:
        g = _grad(w, x, y)
        step = g + weight_decay * w + (0.0 if pull is None else pull(w))
        w_next = w - LR * step
        omega -= (step if omega_from_total else g) * (w_next - w)
        w = w_next
    return omega, w


def _importance(omega, start, end, xi):
    return torch.clamp(omega / ((end - start) ** 2 + xi), min=0.0)


def _train_documented_loop(model, si, batches, weight_decay=0.0):
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, weight_decay=weight_decay)
    for x, y in batches:
        optimizer.zero_grad()
        loss = _mse(model(x), y)
        loss.backward()
        si.update_importance(loss)
        optimizer.step()


def _weight(model) -> torch.Tensor:
    return model.weight.detach().flatten().clone()


def _close(actual, expected):
    torch.testing.assert_close(actual.flatten(), expected.flatten(), rtol=0, atol=1e-12)


def test_one_parameter_by_hand():
    # loss = w², g = 2w, lr 0.1: w 1 -> 0.8 -> 0.64; ω = 2·0.2 + 1.6·0.16 = 0.656; Δ = −0.36.
    model = _linear([1.0])
    si = SynapticIntelligence(model, importance=2.0, xi=0.1)
    si.register_task(task_id=1)
    batch = (torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))  # loss = w²
    _train_documented_loop(model, si, [batch, batch])
    assert model.weight.item() == pytest.approx(0.64, abs=1e-15)
    si.register_task(task_id=2)
    omega_big = 0.656 / (0.36**2 + 0.1)
    assert si.big_omega["weight"].item() == pytest.approx(omega_big, rel=1e-12)
    assert si.get_regularization_loss().item() == pytest.approx(0.0, abs=1e-15)  # θ = θ*
    with torch.no_grad():
        model.weight.fill_(1.0)
    penalty = si.get_regularization_loss()
    assert penalty.item() == pytest.approx(2.0 * omega_big * 0.36**2, rel=1e-12)
    model.weight.grad = None
    penalty.backward()
    assert model.weight.grad.item() == pytest.approx(2 * 2.0 * omega_big * 0.36, rel=1e-12)


def test_running_omega_includes_every_step_taken():
    # ``si.omega`` read after optimizer.step(): ω of every step taken (0.4, then 0.656 as above).
    model = _linear([1.0])
    si = SynapticIntelligence(model, xi=0.1)
    si.register_task(task_id=1)
    batch = (torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))  # loss = w²
    _train_documented_loop(model, si, [batch])
    assert si.omega["weight"].item() == pytest.approx(0.4, rel=1e-12)
    _train_documented_loop(model, si, [batch])
    assert si.omega["weight"].item() == pytest.approx(0.656, rel=1e-12)


def test_documented_flow_then_train_step_follows_the_hand_trace():
    c, xi = 1.5, 0.05
    model = _linear(W0)
    si = SynapticIntelligence(model, importance=c, xi=xi)
    si.register_task(task_id=1)
    _train_documented_loop(model, si, _batches(1))
    w_start = torch.tensor(W0, dtype=torch.float64)
    omega_1, w_1 = _trace(w_start, _batches(1))
    big_1 = _importance(omega_1, w_start, w_1, xi)
    _close(_weight(model), w_1)
    si.register_task(task_id=2)
    _close(si.big_omega["weight"], big_1)

    # Task 2: the step feels 2cΩ(θ − θ*), but ω reads the task gradient alone.
    pull = lambda w: 2 * c * big_1 * (w - w_1)  # noqa: E731
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    w = w_1
    for x, y in _batches(2):
        si.train_step(optimizer, _mse, x, y, task_id=2)
        _, w = _trace(w, [(x, y)], pull)
        _close(_weight(model), w)
    omega_2, w_2 = _trace(w_1, _batches(2), pull)
    assert si.get_regularization_loss().item() == pytest.approx((c * big_1 * (w_2 - w_1) ** 2).sum().item(), rel=1e-12)
    si.register_task(task_id=3)
    _close(si.big_omega["weight"], big_1 + _importance(omega_2, w_1, w_2, xi))

    # The test tells the two gradients apart: ω from the regularized gradient differs.
    omega_regularized, _ = _trace(w_1, _batches(2), pull, omega_from_total=True)
    assert (omega_regularized - omega_2).abs().max() > 1e-3


def test_negative_path_integral_gets_zero_importance():
    # Weight decay drags w[0] down against a task gradient that wants it up: ω[0] < 0, Ω[0] = 0.
    # Δθ is the step SGD actually took (weight decay included), g the loss gradient alone.
    xi, decay = 0.1, 1.0
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(12, 2, generator=generator, dtype=torch.float64)
    y = x @ torch.tensor([2.2, -1.0], dtype=torch.float64)
    batches = list(zip(x.split(4), y.split(4)))
    model = _linear([2.0, 0.0])
    si = SynapticIntelligence(model, xi=xi)
    si.register_task(task_id=1)
    _train_documented_loop(model, si, batches, weight_decay=decay)
    si.register_task(task_id=2)
    start = torch.tensor([2.0, 0.0], dtype=torch.float64)
    omega, end = _trace(start, batches, weight_decay=decay)
    assert omega[0] < 0 < omega[1]
    expected = torch.stack([torch.zeros_like(omega[0]), omega[1] / ((end[1] - start[1]) ** 2 + xi)])
    _close(si.big_omega["weight"], expected)


def test_registering_after_training_consolidates_like_the_next_registration():
    results = []
    for register_again_after_training in (False, True):
        model = _linear(W0)
        si = SynapticIntelligence(model, importance=2.0, xi=0.05)
        si.register_task(task_id=1)
        _train_documented_loop(model, si, _batches(1))
        if register_again_after_training:
            si.register_task(task_id=1)  # task 1 is consolidated now ...
            assert si.finished_tasks == [1]
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        for x, y in _batches(2):  # ... else by the first step of task 2
            si.train_step(optimizer, _mse, x, y, task_id=2)
        results.append((si.big_omega["weight"].clone(), _weight(model)))
    _close(results[0][0], results[1][0])
    _close(results[0][1], results[1][1])


def test_task_trained_without_the_method_anchors_its_end_with_no_importance():
    # No update_importance was seen, so ω = 0 and Ω = 0: the anchor is still θ at its end.
    model = _linear(W0)
    si = SynapticIntelligence(model, importance=2.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for x, y in _batches(1):
        optimizer.zero_grad()
        _mse(model(x), y).backward()
        optimizer.step()
    si.register_task(task_id=1)
    assert si.finished_tasks == [1]
    _close(si.big_omega["weight"], torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="register_task"):
        si.update_importance(_mse(model(_batches(1)[0][0]), _batches(1)[0][1]))


def _si_module(w, overflow_at=None):
    """A Lightning linear model; its loss overflows (× inf) at batch ``overflow_at``."""

    class LitLinear(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _linear(w)
            self.overflow_at = overflow_at

        def training_step(self, batch, batch_idx):
            return _mse(self.net(batch[0]), batch[1]) * (math.inf if batch_idx == self.overflow_at else 1.0)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

    return LitLinear()


def _as_loader(batches) -> DataLoader:
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    return DataLoader(TensorDataset(x, y), batch_size=batches[0][0].shape[0], shuffle=False)


def test_lightning_callback_matches_the_hand_trace():
    c, xi = 1.5, 0.05
    module = _si_module(W0)
    si = SynapticIntelligence(module.net, importance=c, xi=xi)
    quiet_trainer(callbacks=[si]).fit(module, _as_loader(_batches(1)))
    w_start = torch.tensor(W0, dtype=torch.float64)
    omega_0, w_0 = _trace(w_start, _batches(1))
    big_0 = _importance(omega_0, w_start, w_0, xi)
    assert si.finished_tasks == [0]
    _close(si.big_omega["weight"], big_0)

    quiet_trainer(callbacks=[si]).fit(module, _as_loader(_batches(2)))
    omega_1, w_1 = _trace(w_0, _batches(2), lambda w: 2 * c * big_0 * (w - w_0))
    assert si.finished_tasks == [0, 1]
    _close(_weight(module.net), w_1)
    _close(si.big_omega["weight"], big_0 + _importance(omega_1, w_0, w_1, xi))


# A gradient scaler (AMP "16-mixed") skips every step whose gradient overflowed; SI must then
# add nothing to ω. Recording inf and closing with Δθ = 0 gave NaN (inf · 0) for the rest of the
# task: Ω, the penalty and every later gradient. The float64 models are exact under the scaler
# (powers of two) and under CPU autocast (which leaves float64 alone).
def test_a_step_skipped_by_the_gradient_scaler_adds_nothing():
    batches = _batches(1, count=4)
    model = _linear(W0)
    si = SynapticIntelligence(model, importance=1.5, xi=0.05)
    si.register_task(task_id=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scaler = torch.amp.GradScaler("cpu")
    for index, (x, y) in enumerate(batches):
        optimizer.zero_grad()
        loss = _mse(model(x), y) * (math.inf if index == 1 else 1.0)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        si.update_importance(loss)
        scaler.step(optimizer)
        scaler.update()
    assert scaler.get_scale() < 2.0**16  # the step was skipped
    w_start = torch.tensor(W0, dtype=torch.float64)
    omega, w_end = _trace(w_start, [batches[0]] + batches[2:])
    _close(si.omega["weight"], omega)
    si.register_task(task_id=2)
    _close(si.big_omega["weight"], _importance(omega, w_start, w_end, 0.05))


def test_lightning_16_mixed_with_a_skipped_step_matches_the_hand_trace():
    from lightning.pytorch.plugins import MixedPrecision

    c, xi = 1.5, 0.05
    batches = _batches(1, count=4)
    module = _si_module(W0, overflow_at=2)
    si = SynapticIntelligence(module.net, importance=c, xi=xi)
    scaler = torch.amp.GradScaler("cpu")
    quiet_trainer(callbacks=[si], plugins=[MixedPrecision("16-mixed", "cpu", scaler)]).fit(module, _as_loader(batches))
    assert scaler.get_scale() < 2.0**16
    w_start = torch.tensor(W0, dtype=torch.float64)
    omega, w_end = _trace(w_start, batches[:2] + batches[3:])
    _close(_weight(module.net), w_end)
    big = _importance(omega, w_start, w_end, xi)
    _close(si.big_omega["weight"], big)
    # The penalty of the next task is finite and pulls towards θ*.
    module.overflow_at = None
    quiet_trainer(callbacks=[si]).fit(module, _as_loader(_batches(2)))
    _, w_next = _trace(w_end, _batches(2), lambda w: 2 * c * big * (w - w_end))
    _close(_weight(module.net), w_next)


def test_a_bfloat16_model_accumulates_its_path_integral_in_float32():
    # In bfloat16 (8 bits of mantissa) ω stops taking up steps much smaller than itself: after
    # 300 steps it was off by 4 to 6%. The reference sums the same trajectory in float64.
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(512, 20, generator=generator), torch.randint(0, 4, (512,), generator=generator)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 4)).bfloat16()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    si = SynapticIntelligence(model)
    si.register_task(task_id=1)
    reference = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    in_bfloat16 = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for step in range(300):
        rows = slice(step * 32 % 512, step * 32 % 512 + 32)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x[rows].bfloat16()), y[rows])
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        si.update_importance(loss)
        optimizer.step()
        for n, p in model.named_parameters():
            reference[n] -= grads[n].double() * (p.detach().double() - before[n].double())
            in_bfloat16[n] -= grads[n] * (p.detach() - before[n])
    omega = si.omega
    for n, expected in reference.items():
        assert omega[n].dtype == torch.float32 and si._state["pending_grad"][n].dtype == torch.bfloat16
        torch.testing.assert_close(omega[n].double(), expected, rtol=1e-5, atol=1e-9)
    worst = max(((in_bfloat16[n].double() - e).norm() / e.norm()).item() for n, e in reference.items())
    assert worst > 0.01  # what keeping ω in the parameters' dtype would give
    si.register_task(task_id=2)
    assert all(omega.dtype == torch.float32 for omega in si.big_omega.values())


class _Recorder(L.Callback):
    """Task gradients (``on_after_backward``: before any penalty) and θ around each step."""

    def __init__(self, param: torch.nn.Parameter) -> None:
        self.param, self.grads, self.before, self.after = param, [], [], []

    def on_after_backward(self, trainer, pl_module):
        self.grads.append(self.param.grad.detach().clone())
        self.before.append(self.param.detach().clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append(self.param.detach().clone())


@pytest.mark.parametrize("other_class", [L2Regularization, EWC])
def test_a_penalty_listed_before_si_does_not_reach_its_gradient(other_class):
    xi = 0.05
    x, y = make_task(samples=24, inputs=2, classes=2, seed=4).tensors
    net = nn.Linear(2, 2, bias=False).double()
    other = other_class(net, importance=40.0) if other_class is L2Regularization else EWC(net, importance=40.0, seed=0)
    si = SynapticIntelligence(net, importance=3.0, xi=xi)
    expected = torch.zeros_like(net.weight)
    for task, (xs, ys) in enumerate([(x[:12], y[:12]), (x[12:], y[12:])]):
        recorder = _Recorder(net.weight)
        trainer = quiet_trainer(callbacks=[other, si, recorder])
        trainer.fit(lit_classifier(net, lr=LR, mixin=False), DataLoader(TensorDataset(xs, ys), batch_size=4))
        omega = sum(-g * (a - b) for g, b, a in zip(recorder.grads, recorder.before, recorder.after))
        expected = expected + _importance(omega, recorder.before[0], recorder.after[-1], xi)
        _close(si.big_omega["weight"], expected)
    # In task 2 the penalties moved θ: ω from the total gradient ((θ_before − θ_after)/lr) differs.
    omega_total = sum((b - a) ** 2 / LR for b, a in zip(recorder.before, recorder.after))
    assert (omega_total - omega).abs().max() > 1e-3


def test_state_dict_round_trip_in_the_middle_of_task_2():
    c, xi = 1.5, 0.05
    model = _linear(W0)
    si = SynapticIntelligence(model, importance=c, xi=xi)
    si.register_task(task_id=1)
    _train_documented_loop(model, si, _batches(1))
    task_2 = _batches(2, count=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for x, y in task_2[:2]:
        si.train_step(optimizer, _mse, x, y, task_id=2)

    buffer = io.BytesIO()
    torch.save(si.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["has_pending"] and state["active_task"] == 2
    model_copy = copy.deepcopy(model)
    restored = SynapticIntelligence(model_copy, importance=c, xi=xi)
    restored.load_state_dict(state)
    for method in (si, restored):  # the pending gradients are views of one buffer (one kernel on a GPU)
        storage = method._pending_grads_storage
        assert storage is not None and storage.numel() == 2
        assert method._state["pending_grad"]["weight"].data_ptr() == storage.data_ptr()

    runs = [(model, si, optimizer), (model_copy, restored, torch.optim.SGD(model_copy.parameters(), lr=LR))]
    for net, method, opt in runs:
        for x, y in task_2[2:]:
            method.train_step(opt, _mse, x, y, task_id=2)
        method.register_task(task_id=3)
    _close(restored.big_omega["weight"], si.big_omega["weight"])
    _close(_weight(model_copy), _weight(model))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"importance": -1.0}, ValueError, r"importance must be >= 0.0, got -1.0"),
        ({"xi": -0.5}, ValueError, r"xi must be >= 0.0, got -0.5"),
        ({"importance": "high"}, TypeError, r"importance must be a real number, got str: 'high'"),
        ({"xi": None}, TypeError, r"xi must be a real number, got NoneType: None"),
        ({"xi": float("nan")}, ValueError, r"xi must be finite, got nan"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        SynapticIntelligence(_linear(W0), **kwargs)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got list"):
        SynapticIntelligence([1.0, 2.0])


def test_update_importance_rejects_bad_calls():
    model = _linear(W0)
    si = SynapticIntelligence(model)
    x, y = _batches(1)[0]
    with pytest.raises(ValueError, match=r"no task is being trained; call register_task"):
        si.update_importance(_mse(model(x), y))
    si.register_task(task_id=1)
    with pytest.raises(TypeError, match=r"loss must be a torch.Tensor, got float"):
        si.update_importance(0.5)
    with pytest.raises(ValueError, match=r"loss must be a scalar, got a tensor of shape \(4,\)"):
        si.update_importance((model(x).squeeze(-1) - y) ** 2)
    with pytest.raises(ValueError, match=r"no gradients: call loss.backward\(\) before it"):
        si.update_importance(_mse(model(x), y))
    assert si.steps_in_active_task == 0
