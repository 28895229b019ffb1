"""AccuracyMatrix counts per (after task, task), divides only at the end, and persists."""

from __future__ import annotations

import io
import math

import pytest
import torch

from neurenix.metrics import AccuracyMatrix
from neurenix.metrics import functional as MF


def _logits_for(labels: list[int], classes: int = 3) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(labels), classes).float()


def test_counts_batches_and_divides_sums():
    matrix = AccuracyMatrix(num_tasks=2)
    # task 0 after task 0: 3 of 4, then 1 of 1 -> 4/5 (not the mean of batch accuracies, 0.875)
    matrix.update(_logits_for([0, 1, 2, 0]), torch.tensor([0, 1, 2, 1]), task=0, after_task=0)
    matrix.update(_logits_for([2]), torch.tensor([2]), task=0, after_task=0)
    matrix.update(torch.tensor([1, 1]), torch.tensor([1, 0]), task=1, after_task=1)  # labels, not logits
    matrix.update(_logits_for([0, 0]), torch.tensor([1, 2]), task=0, after_task=None)
    r = matrix.compute()
    assert r[0, 0].item() == pytest.approx(0.8)
    assert r[1, 1].item() == pytest.approx(0.5)
    assert math.isnan(r[0, 1].item()) and math.isnan(r[1, 0].item())
    assert matrix.initial[0].item() == 0.0 and math.isnan(matrix.initial[1].item())


def test_derived_metrics_equal_the_functional_ones():
    matrix = AccuracyMatrix(num_tasks=2)
    for after_task, task, hits in [(0, 0, 9), (0, 1, 2), (1, 0, 6), (1, 1, 8)]:
        predictions = torch.tensor([1] * hits + [0] * (10 - hits))
        matrix.update(predictions, torch.ones(10, dtype=torch.long), task=task, after_task=after_task)
    for task, hits in [(0, 1), (1, 3)]:
        matrix.update(torch.tensor([1] * hits + [0] * (10 - hits)), torch.ones(10, dtype=torch.long), task=task, after_task=None)
    r = torch.tensor([[0.9, 0.2], [0.6, 0.8]], dtype=torch.float64)
    assert torch.allclose(matrix.compute(), r)
    assert matrix.backward_transfer().item() == pytest.approx(0.6 - 0.9)
    assert matrix.forgetting().item() == pytest.approx(0.9 - 0.6)
    assert matrix.forward_transfer().item() == pytest.approx(0.2 - 0.3)
    assert matrix.average_accuracy().item() == pytest.approx(0.7)
    assert matrix.average_accuracy(0).item() == pytest.approx(MF.average_accuracy(r, 0).item())


def test_state_is_persistent_and_loads_with_weights_only():
    matrix = AccuracyMatrix(num_tasks=2)
    matrix.update(torch.tensor([0, 1]), torch.tensor([0, 0]), task=1, after_task=0)
    buffer = io.BytesIO()
    torch.save(matrix.state_dict(), buffer)
    buffer.seek(0)
    restored = AccuracyMatrix(num_tasks=2)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(restored.correct, matrix.correct) and torch.equal(restored.total, matrix.total)
    assert restored.compute()[0, 1].item() == 0.5


def test_states_reduce_by_summing_counts():
    matrix = AccuracyMatrix(num_tasks=1)
    assert all(matrix._reductions[name].__name__ == "dim_zero_sum" for name in ("correct", "total", "initial_correct", "initial_total"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": 2, "after_task": 0}, r"task must be an int in \[0, 1\], got 2"),
        ({"task": 0, "after_task": -1}, r"after_task must be an int in \[0, 1\], got -1"),
        ({"task": "0", "after_task": 0}, "got '0'"),
    ],
)
def test_bad_task_indices(kwargs, message):
    matrix = AccuracyMatrix(num_tasks=2)
    with pytest.raises(ValueError, match=message):
        matrix.update(torch.tensor([0]), torch.tensor([0]), **kwargs)
    assert matrix.total.sum() == 0


def test_mismatched_predictions_and_bad_size():
    with pytest.raises(ValueError, match="different samples"):
        AccuracyMatrix(2).update(torch.tensor([0, 1, 1]), torch.tensor([0, 1]), task=0, after_task=0)
    with pytest.raises(ValueError, match="num_tasks must be >= 1, got 0"):
        AccuracyMatrix(0)


def test_a_one_task_matrix_stays_a_matrix():
    matrix = AccuracyMatrix(num_tasks=1)
    matrix.update(torch.tensor([1, 1]), torch.tensor([1, 0]), task=0, after_task=0)
    assert matrix.accuracies().shape == (1, 1) and matrix.accuracies()[0, 0].item() == 0.5
    assert matrix.average_accuracy().item() == 0.5


def test_record_replaces_a_row_with_counts_measured_elsewhere():
    matrix = AccuracyMatrix(num_tasks=2)
    matrix.update(torch.tensor([1, 1, 0]), torch.tensor([1, 1, 1]), task=0, after_task=0)  # 2 of 3
    assert torch.allclose(matrix.compute()[0, 0], torch.tensor(2 / 3, dtype=torch.float64))
    matrix.record(torch.tensor([3, 1]), torch.tensor([4, 5]), after_task=0)  # replaces, not adds
    matrix.record(torch.tensor([1, 0]), torch.tensor([2, 2]), after_task=None)
    expected = torch.tensor([[0.75, 0.2], [float("nan"), float("nan")]], dtype=torch.float64)
    assert torch.allclose(matrix.compute(), expected, equal_nan=True)
    assert torch.equal(matrix.initial, torch.tensor([0.5, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"correct must hold one count per task, shape \(2,\), got \(3,\)"):
        matrix.record(torch.tensor([1, 1, 1]), torch.tensor([2, 2]), after_task=1)
    with pytest.raises(ValueError, match=r"after_task must be an int in \[0, 1\], got 2"):
        matrix.record(torch.tensor([1, 1]), torch.tensor([2, 2]), after_task=2)
