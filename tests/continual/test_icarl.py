"""iCaRL: its loss and NCM against hand-computed values, the task's end, both doors, state."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from neurenix.continual import functional as CF

D = torch.float64


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
