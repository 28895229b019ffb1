"""BiC: its loss and bias fit against hand-computed values, the held-out split, the task's end,
the corrected predictor, both doors, state, precisions and bad input.

What BiC shares with iCaRL (bad arguments, Lightning, checkpoints, precisions, bad input) is
checked for both in ``test_distilled_exemplars.py``."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from neurenix.continual import functional as CF
from neurenix.continual.bic import BIAS_L2, BiasCorrectedClassifier, BiC, held_out_ranks
from neurenix.continual.memory import ExemplarMemory
from tests.continual.test_distilled_exemplars import TASKS, D, class_task, make_net
from tests.helpers import loader, saved_and_loaded


# ------------------------------------------------------------------------- the maths, by hand
def test_bias_fit_recovers_the_saturated_logistic_answer():
    # Old class 0 has logit 0, new class 1 logit z ∈ {+1, −1}: P(new) = σ(α z + β), a logistic
    # regression on two points, whose fit is saturated: σ(α + β) = 3/4 (3 of 4 samples at z = +1
    # are new) and σ(−α + β) = 1/2, so α + β = ln 3 and β − α = 0: α = β = ln(3)/2.
    logits = torch.tensor([[0.0, 1.0]] * 4 + [[0.0, -1.0]] * 4, dtype=D)
    labels = torch.tensor([1, 1, 1, 0, 1, 1, 0, 0])
    alpha, beta = CF.fit_bias_correction(logits, labels, torch.tensor([False, True]))
    assert alpha == pytest.approx(math.log(3) / 2, abs=1e-12) and beta == pytest.approx(math.log(3) / 2, abs=1e-12)


def test_bias_fit_leaves_old_units_alone_and_corrects_every_new_unit_alike():
    # Classes 0 (old) and 1, 2 (new). With z_1 = z_2 = 0 on every sample the new units only move
    # by β: P(class 0) = 1 / (1 + 2 e^β) at logit 0 for class 0; 2 of 6 samples are class 0, so
    # 1 / (1 + 2 e^β) = 1/3, β = 0 (and α is free: the l2 pull holds it at 1).
    logits = torch.zeros(6, 3, dtype=D)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    alpha, beta = CF.fit_bias_correction(logits, labels, torch.tensor([False, True, True]), l2=1e-3)
    assert alpha == pytest.approx(1.0, abs=1e-9) and beta == pytest.approx(0.0, abs=1e-9)
    # 4 of 6 class 0: 1 / (1 + 2 e^β) = 2/3, e^β = 1/4.
    labels = torch.tensor([0, 0, 0, 0, 1, 2])
    _, beta = CF.fit_bias_correction(logits, labels, torch.tensor([False, True, True]))
    assert beta == pytest.approx(math.log(0.25), abs=1e-10)


def test_bias_fit_with_l2_is_finite_on_a_separable_set_and_its_gradient_vanishes():
    logits = torch.tensor([[0.0, 2.0], [0.0, -2.0]], dtype=D)  # z > 0 always new: separable
    labels = torch.tensor([1, 0])
    alpha, beta = CF.fit_bias_correction(logits, labels, torch.tensor([False, True]), l2=BIAS_L2)
    assert math.isfinite(alpha) and alpha > 1
    theta = torch.tensor([alpha, beta], dtype=D, requires_grad=True)
    corrected = torch.stack([logits[:, 0], theta[0] * logits[:, 1] + theta[1]], 1)
    (F.cross_entropy(corrected, labels) + BIAS_L2 / 2 * ((theta[0] - 1) ** 2 + theta[1] ** 2)).backward()
    assert theta.grad.abs().max().item() < 1e-10


def test_bias_fit_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match=r"new_classes a boolean \(C,\) mask, got \(2, 3\), \(2,\) and torch.bool \(2,\)"):
        CF.fit_bias_correction(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="l2 must be >= 0, got -1.0"):
        CF.fit_bias_correction(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.ones(3, dtype=torch.bool), l2=-1.0)
    assert CF.fit_bias_correction(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), torch.ones(3, dtype=torch.bool)) == (1.0, 0.0)


def _softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def test_bic_loss_mixes_cross_entropy_and_distillation_by_the_old_classes_share():
    # Classes learned: 0, 1 (old) and 2 (new); unit 3 never learned is outside both terms.
    # λ = 2/3. L_c: cross-entropy over units 0-2. L_d: −Σ softmax(ẑ/2) log softmax(z/2) over units 0, 1.
    logits = torch.tensor([[1.0, 0.0, 2.0, 9.0], [0.5, -1.0, 0.0, -9.0]], dtype=D)
    old = torch.tensor([[2.0, 0.0, 5.0, 5.0], [0.0, 2.0, -5.0, 5.0]], dtype=D)
    targets = torch.tensor([2, 0])
    classes, old_classes = torch.tensor([True, True, True, False]), torch.tensor([True, True, False, False])
    rows = logits.tolist()
    ce = (-math.log(_softmax(rows[0][:3])[2]) - math.log(_softmax(rows[1][:3])[0])) / 2
    kd = 0.0
    for z, zo in zip(rows, old.tolist()):
        p_hat, p = _softmax([zo[0] / 2, zo[1] / 2]), _softmax([z[0] / 2, z[1] / 2])
        kd -= sum(a * math.log(b) for a, b in zip(p_hat, p)) / 2
    hand = 2 / 3 * kd + 1 / 3 * ce
    assert CF.bic_loss(logits, targets, classes, old, old_classes, 2.0).item() == pytest.approx(hand, abs=1e-13)
    assert CF.bic_loss(logits, targets, classes).item() == pytest.approx(ce, abs=1e-13)  # the first task: L_c alone


def test_bic_loss_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match=r"classes a boolean \(C,\) mask, got \(2, 3\), \(3,\)"):
        CF.bic_loss(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"old_logits must be \(N, C\) = \(2, 3\) with old_classes a boolean \(3,\) mask, got \(2, 3\) and None"):
        CF.bic_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.ones(3, dtype=torch.bool), torch.zeros(2, 3))


def test_held_out_ranks_spread_a_share_over_every_prefix():
    ranks = torch.arange(30)
    assert torch.nonzero(held_out_ranks(ranks, 0.1)).flatten().tolist() == [9, 19, 29]
    assert torch.nonzero(held_out_ranks(ranks[:10], 0.5)).flatten().tolist() == [1, 3, 5, 7, 9]
    assert torch.nonzero(held_out_ranks(ranks[:12], 0.25)).flatten().tolist() == [3, 7, 11]


# ------------------------------------------------------------------------- the method
def test_constructor_defaults_and_hyperparameters():
    net = make_net()
    bic = BiC(net)
    assert bic.hyperparameters() == {"memory_size": 2000, "replay_ratio": 0.5, "selection": "herding", "held_out": 0.1, "temperature": 2.0}
    assert bic._extractor.module is net[0]
    assert isinstance(bic.memory, ExemplarMemory) and isinstance(bic.classifier, BiasCorrectedClassifier)
    assert bic.teacher is None and bic.scale is None and bic.corrections == []


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(held_out=0.0), ValueError, "held_out must be > 0.0, got 0.0"),
        (dict(held_out=0.75), ValueError, "held_out must be <= 0.5, got 0.75"),
        (dict(held_out="0.1"), TypeError, "held_out must be a real number, got str: '0.1'"),
        (dict(temperature=0), ValueError, "temperature must be > 0.0, got 0.0"),
    ],
)
def test_constructor_rejects_bad_bic_arguments(kwargs, error, message):
    # The arguments every distilled exemplar method takes: test_distilled_exemplars.py.
    with pytest.raises(error, match=re.escape(message)):
        BiC(make_net(), **kwargs)


def _two_tasks(bic: BiC, net: nn.Module, samples: int = 24) -> list[TensorDataset]:
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    tasks = [class_task((0, 1), samples, seed=3), class_task((2, 3), samples, seed=4)]
    for task_id, data in enumerate(tasks):
        for inputs, targets in loader(data):
            bic.train_step(optimizer, F.cross_entropy, inputs, targets, task_id=task_id)
        bic.register_task(task_id, loader(data))
    return tasks


def test_the_correction_is_fitted_on_the_held_out_exemplars_logits_at_the_tasks_end():
    net = make_net(seed=2)
    bic = BiC(net, memory_size=16, held_out=0.25, seed=0)
    _two_tasks(bic, net)
    assert [c[0] for c in bic.corrections] == [1]  # the first task has no old classes: no correction
    state = bic.memory.state_dict()
    held = held_out_ranks(state["ranks"], 0.25)
    assert sorted(state["targets"][held].tolist()) == [0, 1, 2, 3]  # 4 exemplars a class, rank 3 held out
    with torch.no_grad():
        logits = net(state["inputs"][held])
    alpha, beta = CF.fit_bias_correction(logits, state["targets"][held], torch.tensor([False, False, True, True]), l2=BIAS_L2)
    assert bic.corrections[0][1:] == (pytest.approx(alpha, abs=1e-12), pytest.approx(beta, abs=1e-12))
    assert bic.scale.tolist() == [1.0, 1.0, alpha, alpha] and bic.shift.tolist() == [0.0, 0.0, beta, beta]
    probe = torch.randn(5, 6, dtype=D)
    with torch.no_grad():
        expected = net(probe) * torch.tensor([1, 1, alpha, alpha], dtype=D) + torch.tensor([0, 0, beta, beta], dtype=D)
    torch.testing.assert_close(bic.classifier(probe), expected, rtol=0, atol=1e-12)
    assert bic.teacher is not None and not bic.teacher.training


def test_held_out_exemplars_are_never_replayed():
    net = make_net(seed=2)
    bic = BiC(net, memory_size=16, held_out=0.25, replay_ratio=4.0, seed=0)  # every step replays all it may
    _two_tasks(bic, net)
    state = bic.memory.state_dict()
    held_inputs = state["inputs"][held_out_ranks(state["ranks"], 0.25)]
    for _ in range(5):
        inputs, _, _ = bic.extend_batch(torch.zeros(8, 6, dtype=D), torch.zeros(8, dtype=torch.long), None)
        replayed = inputs[8:]
        assert replayed.shape[0] == 12  # the 12 training exemplars
        assert not bool((replayed[:, None, :] == held_inputs[None, :, :]).all(-1).any())


def test_the_classifier_gives_unlearned_classes_no_chance():
    net = make_net(seed=2, classes=6)
    bic = BiC(net, memory_size=16, held_out=0.25, seed=0)
    _two_tasks(bic, net)
    scores = bic.classifier(torch.randn(3, 6, dtype=D))
    assert torch.isinf(scores[:, 4:]).all() and torch.isfinite(scores[:, :4]).all()
    assert bic.classifier.predict(torch.randn(3, 6, dtype=D)).lt(4).all()


def test_one_step_by_hand_with_teacher_corrections_and_replay():
    net = make_net(seed=5)
    bic = BiC(net, memory_size=8, held_out=0.5, replay_ratio=1.0, seed=0)
    tasks = _two_tasks(bic, net, samples=8)  # corrections on classes 2, 3
    teacher = copy.deepcopy(net)
    scale, shift = bic.scale.clone(), bic.shift.clone()
    state = bic.memory.state_dict()
    train = ~held_out_ranks(state["ranks"], 0.5)  # 4 training exemplars, one per class
    x, y = class_task((0, 1, 2, 3), samples=4, seed=7).tensors
    x, y = x, y + 0  # task 2's new classes: none (all 4 learned), λ = 4/4 → the step is distillation only
    reference = copy.deepcopy(net)
    all_x, all_y = torch.cat([x, state["inputs"][train]]), torch.cat([y, state["targets"][train]])
    z = reference(all_x) * scale + shift
    with torch.no_grad():
        zo = teacher(all_x) * scale + shift
    hand = -(F.softmax(zo / 2, 1) * F.log_softmax(z / 2, 1)).sum(1).mean()
    hand.backward()
    loss = bic.train_step(torch.optim.SGD(net.parameters(), lr=0.1), F.cross_entropy, x, y, task_id=2)
    assert loss.item() == pytest.approx(hand.item(), abs=1e-12)
    for p, r in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(p, r.detach() - 0.1 * r.grad, rtol=0, atol=1e-12)
    del tasks


# ------------------------------------------------------------------------- state and checkpoints
def _trained(seed: int = 0) -> tuple[nn.Sequential, BiC, torch.optim.Optimizer]:
    net = make_net(seed=2)
    bic = BiC(net, memory_size=12, replay_ratio=0.5, seed=seed, held_out=0.34)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for task_id, labels in enumerate(TASKS):
        data = class_task(labels, seed=3 + task_id)
        for inputs, targets in loader(data):
            bic.train_step(optimizer, F.cross_entropy, inputs, targets, task_id=task_id)
        bic.register_task(task_id, loader(data))
    return net, bic, optimizer


def test_state_round_trip_through_weights_only_continues_exactly():
    net, bic, optimizer = _trained()
    twin = copy.deepcopy(net)
    restored = BiC(twin, memory_size=12, replay_ratio=0.5, seed=77, held_out=0.34)
    restored.load_state_dict(saved_and_loaded(bic.state_dict()))
    assert restored.corrections == bic.corrections and torch.equal(restored.scale, bic.scale)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.1)
    twin_optimizer.load_state_dict(optimizer.state_dict())
    data = class_task((0, 3), seed=9)
    for inputs, targets in loader(data):
        bic.train_step(optimizer, F.cross_entropy, inputs, targets, task_id=2)
        restored.train_step(twin_optimizer, F.cross_entropy, inputs, targets, task_id=2)
    bic.register_task(2, loader(data))
    restored.register_task(2, loader(data))
    for p, q in zip(net.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert restored.corrections == bic.corrections
    probe = torch.randn(5, 6, dtype=D)
    assert torch.equal(bic.classifier(probe), restored.classifier(probe))


# ------------------------------------------------------------------------- bad input
def test_a_trained_task_ending_without_data_is_refused_before_any_change():
    net, bic, optimizer = _trained()
    x, y = class_task((0, 1), seed=5).tensors
    bic.train_step(optimizer, F.cross_entropy, x, y, task_id=2)
    corrections = list(bic.corrections)
    with pytest.raises(ValueError, match=re.escape("BiC chooses task 2's exemplars from its data when the task ends, and got none: pass the task's data to register_task(2, dataloader)")):
        bic.train_step(optimizer, F.cross_entropy, x, y, task_id=3)
    assert bic.active_task == 2 and bic.finished_tasks == [0, 1] and bic.corrections == corrections


