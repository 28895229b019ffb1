"""Each metric against values worked out by hand on a hand-written accuracy matrix."""

from __future__ import annotations

import math

import pytest
import torch

from neurenix.metrics import functional as MF

# R[i, j]: accuracy on task j after training task i (three tasks).
R = torch.tensor(
    [
        [0.90, 0.10, 0.20],
        [0.70, 0.80, 0.30],
        [0.60, 0.85, 0.95],
    ]
)
B = torch.tensor([0.10, 0.12, 0.25])  # the untrained model's accuracies


def test_average_accuracy_over_the_tasks_seen():
    assert MF.average_accuracy(R, 0).item() == pytest.approx(0.90)
    assert MF.average_accuracy(R, 1).item() == pytest.approx((0.70 + 0.80) / 2)
    assert MF.average_accuracy(R).item() == pytest.approx((0.60 + 0.85 + 0.95) / 3)


def test_backward_transfer():
    assert MF.backward_transfer(R, 1).item() == pytest.approx(0.70 - 0.90)
    # after task 2: ((0.60 - 0.90) + (0.85 - 0.80)) / 2 = -0.125
    assert MF.backward_transfer(R).item() == pytest.approx(-0.125)


def test_forward_transfer():
    assert MF.forward_transfer(R, B, 1).item() == pytest.approx(0.10 - 0.12)
    # after task 2: ((R[0,1] - b1) + (R[1,2] - b2)) / 2 = ((0.10 - 0.12) + (0.30 - 0.25)) / 2
    assert MF.forward_transfer(R, B).item() == pytest.approx(0.015)


def test_forgetting_is_best_earlier_minus_current():
    assert MF.forgetting(R, 1).item() == pytest.approx(0.90 - 0.70)
    # after task 2: task 0: max(0.90, 0.70) - 0.60 = 0.30; task 1: max(0.10, 0.80) - 0.85 = -0.05
    assert MF.forgetting(R).item() == pytest.approx((0.30 - 0.05) / 2)


@pytest.mark.parametrize("metric", ["backward_transfer", "forgetting"])
def test_undefined_after_the_first_task_is_nan(metric):
    assert math.isnan(getattr(MF, metric)(R, 0).item())
    assert math.isnan(MF.forward_transfer(R, B, 0).item())


def test_a_single_task_sequence():
    single = torch.tensor([[0.75]])
    assert MF.average_accuracy(single).item() == 0.75
    assert math.isnan(MF.backward_transfer(single).item())


@pytest.mark.parametrize(
    ("matrix", "after_task", "message"),
    [
        (torch.zeros(2, 3), None, r"square .* got \(2, 3\)"),
        (torch.zeros(3), None, r"square .* got \(3,\)"),
        ([[1.0]], None, "got list"),
        (R, 3, r"after_task must be an int in \[0, 2\], got 3"),
        (R, -1, "got -1"),
        (R, True, "got True"),
    ],
)
def test_bad_input(matrix, after_task, message):
    with pytest.raises(ValueError, match=message):
        MF.average_accuracy(matrix, after_task)


def test_forward_transfer_needs_one_initial_accuracy_per_task():
    with pytest.raises(ValueError, match=r"initial must hold one accuracy per task, shape \(3,\), got \(2,\)"):
        MF.forward_transfer(R, B[:2])
