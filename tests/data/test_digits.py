"""Digits: scikit-learn's 1,797 images as uint8 0..255, in a fixed stratified train/test split."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

pytest.importorskip("sklearn")

from sklearn.datasets import load_digits  # noqa: E402

from neurenix.data.digits import Digits  # noqa: E402


def image_counts(*parts: Digits) -> Counter:
    return Counter((bytes(image.flatten().tolist()), int(label)) for part in parts for image, label in zip(part.data, part.targets))


def test_shapes_and_types():
    train, test = Digits(), Digits(train=False)
    assert train.data.shape == (1438, 8, 8) and test.data.shape == (359, 8, 8)
    assert train.data.dtype == torch.uint8 and train.targets.dtype == torch.int64
    assert len(train) + len(test) == 1797
    assert int(train.data.max()) == 255 and int(train.data.min()) == 0


def test_values_are_the_sklearn_digits_scaled_to_255():
    digits = load_digits()
    reference = torch.round(torch.as_tensor(digits.images, dtype=torch.float64) * 255 / 16).to(torch.uint8)
    expected = Counter((bytes(image.flatten().tolist()), int(label)) for image, label in zip(reference, digits.target))
    assert image_counts(Digits(), Digits(train=False)) == expected  # every image in exactly one part


def test_split_is_stratified():
    digits = load_digits()
    full = torch.bincount(torch.as_tensor(digits.target))
    test = torch.bincount(Digits(train=False, test_fraction=0.25).targets)
    assert test.tolist() == [round(0.25 * count) for count in full.tolist()]


def test_split_is_fixed_for_a_seed_and_differs_across_seeds():
    assert torch.equal(Digits(seed=3).data, Digits(seed=3).data)
    assert torch.equal(Digits(train=False, seed=3).targets, Digits(train=False, seed=3).targets)
    assert not torch.equal(Digits(train=False, seed=3).data, Digits(train=False, seed=4).data)


def test_getitem_transforms_and_filter():
    train = Digits(transform=lambda image: image.float() / 255, target_transform=lambda label: label + 100)
    image, label = train[0]
    assert image.dtype == torch.float32 and image.shape == (8, 8) and label == int(train.targets[0]) + 100
    even = Digits(filter_labels=lambda label: label % 2 == 0)
    assert set(even.targets.tolist()) == {0, 2, 4, 6, 8}
    assert len(even) == int((Digits().targets % 2 == 0).sum())


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1, True])
def test_bad_test_fraction(fraction):
    with pytest.raises(ValueError, match=f"test_fraction must be a number in \\(0, 1\\), got {fraction!r}"):
        Digits(test_fraction=fraction)


def test_bad_seed():
    with pytest.raises(ValueError, match="seed must be an int, got '1'"):
        Digits(seed="1")
