"""The shared argument checks: check_finite_samples finds every non-finite sample, and only those."""

from __future__ import annotations

import pytest
import torch

from neurenix.continual._checks import check_finite_samples


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.complex64])
def test_finite_batches_pass_even_when_their_sum_overflows(dtype):
    check_finite_samples("inputs", torch.randn(5, 3).to(dtype))
    real = torch.float32 if dtype.is_complex else dtype
    huge = torch.full((4, 2), torch.finfo(real).max / 2, dtype=real).to(dtype)
    assert not torch.isfinite(huge.sum())  # the fast path cannot decide: every sample is looked at
    check_finite_samples("inputs", huge)
    check_finite_samples("targets", torch.tensor([1, 2, 3]))  # integers hold no NaN


@pytest.mark.parametrize(
    "values, bad, first",
    [
        ({1: float("nan")}, 1, 1),
        ({3: float("inf")}, 1, 3),
        ({0: float("-inf"), 2: float("nan")}, 2, 0),
        ({2: float("inf"), 3: float("-inf")}, 2, 2),  # +inf and -inf sum to NaN: still caught
    ],
)
def test_non_finite_samples_are_counted_and_the_first_named(values, bad, first):
    batch = torch.randn(5, 3)
    for sample, value in values.items():
        batch[sample, 1] = value
    with pytest.raises(ValueError, match=rf"inputs must hold finite values, got NaN or infinity in {bad} of 5 samples \(the first: sample {first}\)"):
        check_finite_samples("inputs", batch)


@pytest.mark.parametrize(
    "batches, expected",
    [
        ((torch.ones(3, 2), torch.tensor([0, 1, 2])), False),
        ((torch.tensor([[1.0, float("nan")]]), torch.tensor([0])), True),
        ((torch.ones(2, 2), torch.tensor([0.5, float("-inf")])), True),  # float targets are looked at too
        ((torch.full((2,), torch.finfo(torch.float32).max),), False),  # finite values whose sum overflows
        ((torch.tensor([1 + 1j, complex(float("inf"), 0)]),), True),
    ],
)
def test_any_non_finite_is_a_flag_on_the_device_that_reads_nothing(batches, expected):
    from neurenix.continual._checks import any_non_finite
    from tests.host_reads import host_reads

    with host_reads() as reads:
        flag = any_non_finite(*batches)
    assert not reads, str(reads)
    assert flag.shape == () and flag.dtype == torch.bool and flag.device == batches[0].device
    assert bool(flag) is expected
