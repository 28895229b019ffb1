"""scikit-learn's handwritten digits as a torchvision-style dataset, with a fixed train/test split.

``sklearn.datasets.load_digits`` ships 1,797 real 8×8 images (values 0..16) inside scikit-learn,
so it works offline. :class:`Digits` stores them the way :class:`~neurenix.data.MNIST` stores its
images, ``uint8`` in ``0..255`` (``round(v · 255 / 16)``), so one input pipeline (``/ 255``)
serves both sources.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["Digits"]

#: Largest pixel value of ``load_digits`` (16 shades of ink, 0..16 inclusive).
_DIGITS_MAX = 16
#: Largest value of a ``uint8`` image, the range MNIST uses.
_UINT8_MAX = 255


class Digits(Dataset):
    """The 1,797 handwritten digits of scikit-learn, split into a fixed train or test part.

    The split is stratified: for every digit, ``round(test_fraction · count)`` of its images,
    chosen with ``seed``, form the test part; the rest (in their original order) the train part.
    The same ``seed`` and ``test_fraction`` always give the same split, and the two parts never
    share an image.

    Attributes:
        data: ``uint8`` images, ``(N, 8, 8)``, values ``0..255``.
        targets: ``int64`` labels, ``(N,)``, ``0..9``.
        classes: ``["0", ..., "9"]``.

    Args:
        root: not used (the data ships with scikit-learn); accepted so that ``Digits`` and
            ``MNIST`` can be swapped.
        train: the train part (``True``) or the test part.
        download: not used, for the same reason.
        transform: applied to each image (a ``uint8`` tensor ``(8, 8)``) in ``__getitem__``.
        target_transform: applied to each label (an ``int``) in ``__getitem__``.
        filter_labels: keep only the samples whose label passes this predicate.
        test_fraction: the share of each digit held out for the test part, in ``(0, 1)``.
        seed: the seed of the split.

    Raises:
        ImportError: scikit-learn is not installed.
        ValueError: ``test_fraction`` is not in ``(0, 1)``, or ``seed`` is not an int.

    Example::

        train, test = Digits(train=True), Digits(train=False)
        train.data.shape, test.data.shape        # (1438, 8, 8), (359, 8, 8)
    """

    classes = [str(digit) for digit in range(10)]

    def __init__(
        self,
        root: Any = None,
        train: bool = True,
        download: bool = False,
        transform: Optional[Callable[[Tensor], Any]] = None,
        target_transform: Optional[Callable[[int], Any]] = None,
        filter_labels: Optional[Callable[[int], bool]] = None,
        *,
        test_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.root, self.train = root, bool(train)
        self.transform, self.target_transform = transform, target_transform
        images, labels = _load_digits()
        test_mask = _stratified_test_mask(labels, test_fraction, seed)
        keep = ~test_mask if self.train else test_mask
        if filter_labels is not None:
            keep &= torch.tensor([bool(filter_labels(label)) for label in labels.tolist()])
        self.data: Tensor = images[keep]
        self.targets: Tensor = labels[keep]

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, target = self.data[index], int(self.targets[index])
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    def __repr__(self) -> str:
        return f"Digits(train={self.train}, samples={len(self)})"


def _load_digits() -> tuple[Tensor, Tensor]:
    """All 1,797 images as ``uint8`` ``0..255`` and their ``int64`` labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("Digits needs scikit-learn: pip install scikit-learn") from error
    digits = load_digits()
    ink = torch.as_tensor(digits.images, dtype=torch.float64)
    images = torch.round(ink * (_UINT8_MAX / _DIGITS_MAX)).to(torch.uint8)
    return images, torch.as_tensor(digits.target, dtype=torch.int64)


def _stratified_test_mask(labels: Tensor, test_fraction: float, seed: int) -> Tensor:
    """Which samples form the test part: ``round(test_fraction · count)`` of each label."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(labels.shape[0], dtype=torch.bool)
    for label in torch.unique(labels).tolist():  # sorted, so the draws do not depend on data order
        members = torch.nonzero(labels == label).squeeze(1)
        chosen = torch.randperm(members.shape[0], generator=generator)[: round(test_fraction * members.shape[0])]
        mask[members[chosen]] = True
    return mask
