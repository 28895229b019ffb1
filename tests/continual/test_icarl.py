"""iCaRL: its loss and NCM against hand-computed values, the task's end, both doors, state.

What iCaRL shares with BiC (bad arguments, Lightning, checkpoints, precisions, bad input) is
checked for both in ``test_distilled_exemplars.py``."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from neurenix.continual import functional as CF
from neurenix.continual.exemplars import NearestMeanClassifier
from neurenix.continual.icarl import ICaRL
from neurenix.continual.memory import ExemplarMemory
from tests.continual.test_distilled_exemplars import D, class_task, fit, make_net
from tests.helpers import lit_classifier, loader, saved_and_loaded


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _bce(q: float, z: float) -> float:
    """−[q log σ(z) + (1 − q) log(1 − σ(z))]."""
    return -(q * math.log(_sigmoid(z)) + (1 - q) * math.log(1 - _sigmoid(z)))


# ------------------------------------------------------------------------- the loss, by hand
def test_icarl_loss_without_a_teacher_is_the_mean_bce_against_one_hot_labels():
    logits = torch.tensor([[2.0, -1.0, 0.0], [0.5, 1.5, -2.0]], dtype=D)
    targets = torch.tensor([0, 2])
    hand = (_bce(1, 2.0) + _bce(0, -1.0) + _bce(0, 0.0) + _bce(0, 0.5) + _bce(0, 1.5) + _bce(1, -2.0)) / 6
    assert CF.icarl_loss(logits, targets).item() == pytest.approx(hand, abs=1e-14)


def test_icarl_loss_takes_the_old_networks_sigmoid_as_the_old_classes_targets():
    # Unit 1 is an old class: its target is σ(ln 3) = 0.75 for every sample, also for the
    # exemplar labelled 1 (the paper's Alg. 3: old classes' targets are the old network's outputs,
    # never the label); units 0 and 2 get the one-hot label.
    logits = torch.tensor([[2.0, -1.0, 0.0], [0.5, 1.5, -2.0]], dtype=D)
    old_logits = torch.tensor([[4.0, math.log(3.0), 7.0], [-3.0, math.log(3.0), 1.0]], dtype=D)
    old_classes = torch.tensor([False, True, False])
    targets = torch.tensor([0, 1])
    expected_targets = torch.tensor([[1.0, 0.75, 0.0], [0.0, 0.75, 0.0]], dtype=D)
    torch.testing.assert_close(CF.icarl_targets(targets, 3, old_logits, old_classes), expected_targets, rtol=0, atol=1e-15)
    hand = (_bce(1, 2.0) + _bce(0.75, -1.0) + _bce(0, 0.0) + _bce(0, 0.5) + _bce(0.75, 1.5) + _bce(0, -2.0)) / 6
    assert CF.icarl_loss(logits, targets, old_logits, old_classes).item() == pytest.approx(hand, abs=1e-14)


def test_icarl_loss_gradient_is_sigmoid_minus_target_over_the_element_count():
    logits = torch.tensor([[2.0, -1.0, 0.0], [0.5, 1.5, -2.0]], dtype=D, requires_grad=True)
    old_logits = torch.tensor([[0.0, 1.0, 0.0], [0.0, -2.0, 0.0]], dtype=D)
    old_classes = torch.tensor([False, True, False])
    CF.icarl_loss(logits, torch.tensor([2, 0]), old_logits, old_classes).backward()
    q = torch.tensor([[0.0, _sigmoid(1.0), 1.0], [1.0, _sigmoid(-2.0), 0.0]], dtype=D)
    torch.testing.assert_close(logits.grad, (torch.sigmoid(logits.detach()) - q) / 6, rtol=0, atol=1e-15)
    assert old_logits.grad is None  # the teacher's outputs are targets, not trained


def test_icarl_loss_of_16_bit_logits_is_float32_and_close_to_float64():
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=D) * 3
    old = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=D)
    mask, targets = torch.tensor([True, True, False, False]), torch.tensor([2, 3, 0, 2, 3])
    exact = CF.icarl_loss(logits, targets, old, mask)
    half = CF.icarl_loss(logits.bfloat16(), targets, old.bfloat16(), mask)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(exact.item(), abs=2e-2)


def test_icarl_loss_of_extreme_logits_is_finite():
    logits = torch.tensor([[80.0, -80.0]], dtype=torch.float32)
    loss = CF.icarl_loss(logits, torch.tensor([1]))  # both units confidently wrong: 80 each
    assert loss.item() == pytest.approx(80.0, rel=1e-6)


def test_icarl_loss_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match=r"logits must be \(N, C\) and targets \(N,\) class labels, got \(2, 3\) and \(3,\)"):
        CF.icarl_loss(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="old_logits were given without old_classes"):
        CF.icarl_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"old_logits must be \(N, C\) = \(2, 3\) and old_classes a boolean \(3,\) mask, got \(2, 4\)"):
        CF.icarl_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.zeros(2, 4), torch.ones(3, dtype=torch.bool))


# ------------------------------------------------------------------------- the method
def test_constructor_defaults_and_hyperparameters():
    net = make_net()
    icarl = ICaRL(net)
    assert icarl.hyperparameters() == {"memory_size": 2000, "replay_ratio": 0.5, "selection": "herding"}
    assert icarl.features.module is net[0]  # nn.Sequential: its second-to-last child
    assert isinstance(icarl.memory, ExemplarMemory) and isinstance(icarl.classifier, NearestMeanClassifier)
    assert icarl.teacher is None and icarl.needs_loss_mixin


def test_ncm_predicts_the_nearest_mean_of_normalized_exemplars_by_hand():
    # Features are the inputs (an Identity backbone). Class 0's exemplars (10, 0), (5, 0) have the
    # normalized mean (1, 0); class 1's (0, 1), (1, 1): ((0, 1) + (1, 1)/√2)/2, normalized again.
    net = nn.Sequential(nn.Identity(), nn.Linear(2, 3)).double()
    icarl = ICaRL(net, memory_size=10, feature_extractor=net[0])
    exemplars = torch.tensor([[10.0, 0.0], [5.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=D)
    icarl.memory.add_ranked(exemplars, torch.tensor([0, 0, 1, 1]), 0, torch.tensor([0, 1, 0, 1]))
    r = 1 / math.sqrt(2)
    m1 = (r / 2, (1 + r) / 2)
    n1 = math.hypot(*m1)
    mu = [(1.0, 0.0), (m1[0] / n1, m1[1] / n1)]
    # (1, 0.2) is nearer class 1's raw mean (0.5, 1) than class 0's (7.5, 0), but normalized it is class 0's.
    points = torch.tensor([[1.0, 0.2], [0.2, 1.0]], dtype=D)
    expected = []
    for px, py in points.tolist():
        n = math.hypot(px, py)
        expected.append([-((px / n - a) ** 2 + (py / n - b) ** 2) for a, b in mu])
    scores = icarl.classifier(points)
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=scores.dtype), rtol=0, atol=1e-6)
    assert icarl.classifier.predict(points).tolist() == [0, 1]


def _herded(net: nn.Sequential, x: Tensor, y: Tensor, label: int, count: int) -> Tensor:
    """The first ``count`` inputs of class ``label`` in herding order of the normalized features now."""
    rows = x[y == label]
    with torch.no_grad():
        features = F.normalize(net[0](rows), dim=1)
    return rows[CF.herding_order(features, count)]


def _held(icarl: ICaRL, label: int) -> Tensor:
    """The inputs the memory holds for class ``label``, in rank order."""
    state = icarl.memory.state_dict()
    mine = state["targets"] == label
    return state["inputs"][mine][torch.argsort(state["ranks"][mine])]


def test_the_tasks_end_herds_each_class_and_a_new_class_shrinks_the_old_to_their_prefix():
    net = make_net(seed=2)
    icarl = ICaRL(net, memory_size=12, replay_ratio=0.0)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    x0, y0 = class_task((0, 1), seed=3).tensors
    for inputs, targets in loader(TensorDataset(x0, y0)):
        icarl.train_step(optimizer, F.cross_entropy, inputs, targets, task_id=0)
    icarl.register_task(0, loader(TensorDataset(x0, y0)))  # consolidated now: 6 exemplars per class
    herded_at_0 = {label: _herded(net, x0, y0, label, 12) for label in (0, 1)}
    for label in (0, 1):
        assert torch.equal(_held(icarl, label), herded_at_0[label][:6])
    assert icarl.teacher is not None and not icarl.teacher.training
    assert icarl._old_classes.tolist() == [True, True, False, False]

    x1, y1 = class_task((2, 3), seed=4).tensors
    for inputs, targets in loader(TensorDataset(x1, y1)):
        icarl.train_step(optimizer, F.cross_entropy, inputs, targets, task_id=1)
    icarl.register_task(1, loader(TensorDataset(x1, y1)))
    for label in (0, 1):  # ReduceExemplarSet: the first 3 of the order chosen at task 0's end
        assert torch.equal(_held(icarl, label), herded_at_0[label][:3])
    for label in (2, 3):  # ConstructExemplarSet with the network at task 1's end
        assert torch.equal(_held(icarl, label), _herded(net, x1, y1, label, 3))
    # NCM's means: every class's normalized exemplar features, averaged, normalized again.
    with torch.no_grad():
        means = torch.stack([F.normalize(F.normalize(net[0](_held(icarl, c)), dim=1).mean(0), dim=0) for c in range(4)])
    probe = torch.randn(5, 6, dtype=D)
    with torch.no_grad():
        features = F.normalize(net[0](probe), dim=1)
    torch.testing.assert_close(icarl.classifier(probe), -torch.cdist(features, means).square().to(icarl.classifier(probe).dtype), rtol=0, atol=1e-6)


def test_one_step_by_hand_with_the_teacher_and_the_whole_memory_replayed():
    net = make_net(seed=5)
    icarl = ICaRL(net, memory_size=4, replay_ratio=1.0)
    x0, y0 = class_task((0, 1), samples=8, seed=6).tensors
    icarl.train_step(torch.optim.SGD(net.parameters(), lr=0.1), F.cross_entropy, x0, y0, task_id=0)
    icarl.register_task(0, loader(TensorDataset(x0, y0)))
    teacher = copy.deepcopy(net)
    exemplars = icarl.memory.state_dict()
    x, y = class_task((2, 3), samples=4, seed=7).tensors

    # By hand: the step trains on the 4 new samples and all 4 exemplars (a mean over samples:
    # their order does not matter); old units 0 and 1 take the teacher's sigmoid as targets.
    reference = copy.deepcopy(net)
    all_x, all_y = torch.cat([x, exemplars["inputs"]]), torch.cat([y, exemplars["targets"]])
    logits, old = reference(all_x), torch.sigmoid(teacher(all_x)).detach()
    q = F.one_hot(all_y, 4).double()
    q[:, :2] = old[:, :2]
    hand = -(q * torch.log(torch.sigmoid(logits)) + (1 - q) * torch.log(1 - torch.sigmoid(logits))).mean()
    hand.backward()

    loss = icarl.train_step(torch.optim.SGD(net.parameters(), lr=0.1), F.cross_entropy, x, y, task_id=1)
    assert loss.item() == pytest.approx(hand.item(), abs=1e-12)
    for p, r in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(p, r.detach() - 0.1 * r.grad, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------- Lightning
def test_lightning_without_the_mixin_is_refused_at_setup():
    net = make_net()
    with pytest.raises(TypeError, match="ContinualLossMixin"):
        fit(lit_classifier(net, mixin=False), [ICaRL(net)], class_task((0, 1)))


# ------------------------------------------------------------------------- state and checkpoints
def _trained(seed: int = 0) -> tuple[nn.Sequential, ICaRL, torch.optim.Optimizer]:
    net = make_net(seed=2)
    icarl = ICaRL(net, memory_size=8, replay_ratio=0.5, seed=seed)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    data = class_task((0, 1), seed=3)
    for inputs, targets in loader(data):
        icarl.train_step(optimizer, F.cross_entropy, inputs, targets, task_id=0)
    icarl.register_task(0, loader(data))
    return net, icarl, optimizer


def test_state_round_trip_through_weights_only_continues_exactly():
    net, icarl, optimizer = _trained()
    twin = copy.deepcopy(net)
    restored = ICaRL(twin, memory_size=8, replay_ratio=0.5, seed=77)
    restored.load_state_dict(saved_and_loaded(icarl.state_dict()))
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.1)
    data = class_task((2, 3), seed=4)
    for inputs, targets in loader(data):
        icarl.train_step(optimizer, F.cross_entropy, inputs, targets, task_id=1)
        restored.train_step(twin_optimizer, F.cross_entropy, inputs, targets, task_id=1)
    icarl.register_task(1, loader(data))
    restored.register_task(1, loader(data))
    for p, q in zip(net.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    for key, value in icarl.memory.state_dict().items():
        theirs = restored.memory.state_dict()[key]
        assert torch.equal(value, theirs) if isinstance(value, Tensor) else value == theirs, key
    probe = torch.randn(5, 6, dtype=D)
    assert torch.equal(icarl.classifier(probe), restored.classifier(probe))


# ------------------------------------------------------------------------- bad input
def test_a_trained_task_ending_without_data_is_refused_before_any_change():
    net, icarl, optimizer = _trained()
    x, y = class_task((0, 1), seed=5).tensors
    icarl.train_step(optimizer, F.cross_entropy, x, y, task_id=1)
    state = copy.deepcopy(icarl.state_dict())
    with pytest.raises(ValueError, match=re.escape("ICaRL chooses task 1's exemplars from its data when the task ends, and got none: pass the task's data to register_task(1, dataloader)")):
        icarl.train_step(optimizer, F.cross_entropy, x, y, task_id=2)
    assert icarl.active_task == 1 and icarl.finished_tasks == [0]
    assert torch.equal(icarl.memory.state_dict()["inputs"], state["memory"]["inputs"])


def test_add_to_memory_is_refused_exemplars_come_from_a_tasks_data():
    net, icarl, optimizer = _trained()
    held = icarl.memory.state_dict()["inputs"].clone()
    x, y = class_task((2, 3), samples=8, seed=5).tensors
    with pytest.raises(ValueError, match=re.escape("chooses its exemplars from each task's data at the task's end")):
        icarl.add_to_memory(x, y, 1)
    assert torch.equal(icarl.memory.state_dict()["inputs"], held)


