"""MNIST and Fashion-MNIST, read from IDX files into tensors.

The files are looked for where torchvision keeps them, so an existing torchvision cache is reused::

    root/MNIST/raw/train-images-idx3-ubyte[.gz]          root/FashionMNIST/raw/...
    root/MNIST/raw/train-labels-idx1-ubyte[.gz]
    root/MNIST/raw/t10k-images-idx3-ubyte[.gz]
    root/MNIST/raw/t10k-labels-idx1-ubyte[.gz]

and, failing that, directly in ``root`` (a flat folder such as Debian's
``/usr/share/datasets/fashion-mnist``). Each file may be plain or gzip-compressed.

The two datasets share their file names and format, so a folder of one is easily given as the
other. A split is recognized by its labels, which are exact fingerprints of the full datasets:
Fashion-MNIST's by a digest of the label sequence, MNIST's by its class counts (uneven, and the
same in every copy). The compressed files' MD5s cannot serve: recompressed copies (Debian's) hold
the same data under other checksums.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Union

import torch
from torch import Tensor
from torch.utils.data import Dataset

from neurenix.data.download import DownloadError, download_file
from neurenix.data.idx import IDXFormatError, read_idx

__all__ = ["FashionMNIST", "MNIST"]

_TRAIN_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
_TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_ARCHIVE_SUFFIX = ".gz"  # what the mirrors serve, and what a download stores

#: Each full split's class counts (labels 0..9), by dataset and ``train``.
_CLASS_COUNTS: dict[tuple[str, bool], tuple[int, ...]] = {
    ("MNIST", True): (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
    ("MNIST", False): (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
    ("Fashion-MNIST", True): (6000,) * 10,
    ("Fashion-MNIST", False): (1000,) * 10,
}
#: SHA-256 of each full split's labels as uint8 bytes. Balanced counts alone would not tell
#: Fashion-MNIST from other balanced sets of this format (Kuzushiji-MNIST); its label order does.
_LABEL_DIGESTS: dict[tuple[str, bool], str] = {
    ("Fashion-MNIST", True): "657fbd221bfc9f4198cc14b5619cc33ec57c58dd0e47af4d99d6650759e869a7",
    ("Fashion-MNIST", False): "3d0e6c6ea990b53b6f8f500a41cac93881d981b315f84578b7d915342ade01e9",
}


class MNIST(Dataset):
    """The MNIST handwritten digits (LeCun et al. 1998): 60,000 training and 10,000 test images.

    All samples of the split are held in memory as tensors: ``data`` (uint8, ``(N, 28, 28)``)
    and ``targets`` (int64, ``(N,)``), so that code which wants speed can slice them directly.

    Args:
        root: the data folder: files are looked for in ``root/MNIST/raw/`` (torchvision's layout),
            then in ``root`` itself.
        train: the 60,000 training images if ``True``, the 10,000 test images if ``False``.
        download: fetch the dataset's files that are missing (all four, as torchvision does)
            from ``mirrors`` into ``root/MNIST/raw/``, verifying each against ``checksums``.
            Files already present are used as they are; the IDX reader rejects damaged ones.
            Under DDP, download once (Lightning's ``prepare_data``) before every rank reads.
        transform: called on each image, a uint8 tensor of shape ``(28, 28)``; for example
            ``lambda x: x.reshape(-1) / 255.0`` gives float32 vectors of 784 values in [0, 1].
        target_transform: called on each label, a Python ``int`` in ``0..9``.
        filter_labels: a predicate on the original label (before ``target_transform``); only
            the samples it accepts are kept. It is first tried once on the tensor of all labels
            (``lambda y: y < 5`` works that way); if that does not give a boolean tensor of the
            same shape, it is called on each distinct label as an ``int``. So it must be free of
            side effects.

    Attributes:
        recognized_as: ``"MNIST"`` or ``"Fashion-MNIST"`` when the split read is that dataset's
            full split (recognized by its labels), ``None`` for anything else (a subset, other
            data in this format). Given Fashion-MNIST's files, ``MNIST`` reads them with a
            warning: Fashion-MNIST was made as MNIST's drop-in replacement, so running MNIST
            code on it is a legitimate use, but the results are not about digits.

    Raises:
        FileNotFoundError: files are missing (or ``root`` does not exist) and ``download`` is
            ``False``; the message lists the paths looked at.
        IDXFormatError: a file is not valid IDX (corrupt, truncated).
        ValueError: the files do not form a dataset of this kind (images and labels of
            different counts, labels out of range; for :class:`FashionMNIST`, MNIST's files).
        DownloadError: ``download`` is ``True`` and no mirror delivered a verified file; the
            message says how to use a copy you have (``root=``). Folders the download created
            are removed again if it left them empty.
        TypeError: an argument has the wrong type.

    Example::

        task2 = MNIST("./data", train=True, download=True,
                      transform=lambda x: x.reshape(-1) / 255.0,
                      target_transform=lambda y: y - 5,   # digits 5..9 become labels 0..4
                      filter_labels=lambda y: y >= 5)
        loader = DataLoader(task2, batch_size=32, shuffle=True)
    """

    #: The folder under ``root`` in torchvision's layout.
    folder: ClassVar[str] = "MNIST"
    #: The dataset's name, as messages and ``recognized_as`` give it.
    dataset_name: ClassVar[str] = "MNIST"
    #: Base URLs tried in order; a file's URL is the base followed by its ``.gz`` name.
    mirrors: ClassVar[tuple[str, ...]] = (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    )
    #: MD5 of each ``.gz`` file the mirrors serve (torchvision's values).
    checksums: ClassVar[dict[str, str]] = {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    }
    #: Class names, indexed by label (torchvision's names).
    classes: ClassVar[list[str]] = [
        "0 - zero", "1 - one", "2 - two", "3 - three", "4 - four",
        "5 - five", "6 - six", "7 - seven", "8 - eight", "9 - nine",
    ]  # fmt: skip

    def __init__(
        self,
        root: Union[str, os.PathLike],
        train: bool = True,
        download: bool = False,
        transform: Optional[Callable[[Tensor], Any]] = None,
        target_transform: Optional[Callable[[int], Any]] = None,
        filter_labels: Optional[Callable[[Any], Any]] = None,
    ) -> None:
        self.root = _check_root(root)
        self.train = _check_bool("train", train)
        download = _check_bool("download", download)
        self.transform = _check_optional_callable("transform", transform)
        self.target_transform = _check_optional_callable("target_transform", target_transform)
        filter_labels = _check_optional_callable("filter_labels", filter_labels)

        if download:
            self._download_missing_files()
        images_path, labels_path = self._find_split_files()
        images, labels = self._read_split(images_path, labels_path)
        self.recognized_as: Optional[str] = _recognize(labels, self.train)
        self._check_recognized(labels_path)
        if filter_labels is not None:
            images, labels = self._keep_accepted(filter_labels, images, labels)
        self.data: Tensor = images
        self.targets: Tensor = labels

    @property
    def raw_folder(self) -> Path:
        """``root/<folder>/raw``, where torchvision keeps the files and where downloads go."""
        return self.root / self.folder / "raw"

    @property
    def class_to_idx(self) -> dict[str, int]:
        """Each class name and its label."""
        return {name: label for label, name in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        """``(transform(image), target_transform(label))``; without transforms a uint8 ``(28, 28)`` tensor and an ``int``."""
        # A copy, not a view: a view would pin (and, sent between DataLoader workers, share) the
        # whole ``data`` storage, and an in-place transform would alter the dataset.
        image: Any = self.data[index].clone()
        label: Any = int(self.targets[index])
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return image, label

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, train={self.train}, samples={len(self)})"

    def _description(self) -> str:
        return f"{type(self).__name__} {'training' if self.train else 'test'} set under root={str(self.root)!r}"

    def _split_files(self) -> tuple[str, str]:
        return _TRAIN_FILES if self.train else _TEST_FILES

    def _find(self, name: str) -> Optional[Path]:
        """The first of ``raw_folder/name``, ``raw_folder/name.gz``, ``root/name``, ``root/name.gz`` that exists."""
        for candidate in self._candidates(name):
            if candidate.is_file():
                return candidate
        return None

    def _candidates(self, name: str) -> list[Path]:
        return [folder / file for folder in (self.raw_folder, self.root) for file in (name, name + _ARCHIVE_SUFFIX)]

    def _check_recognized(self, labels_path: Path) -> None:
        """Warn when the files are Fashion-MNIST's: a legitimate stand-in for MNIST, but not digits."""
        if self.recognized_as == "Fashion-MNIST":
            warnings.warn(
                f"{self._description()} holds Fashion-MNIST (clothing), not MNIST's digits: {labels_path} has "
                "Fashion-MNIST's labels. It is read as given (Fashion-MNIST is made as MNIST's drop-in "
                "replacement), so results are about clothing classes; use neurenix.data.FashionMNIST for its "
                "class names, or point root= at MNIST's files",
                stacklevel=3,
            )

    def _download_missing_files(self) -> None:
        for name in _TRAIN_FILES + _TEST_FILES:
            if self._find(name) is None:
                archive = name + _ARCHIVE_SUFFIX
                urls = [f"{mirror.rstrip('/')}/{archive}" for mirror in self.mirrors]
                try:
                    download_file(urls, self.raw_folder / archive, md5=self.checksums[archive])
                except DownloadError as error:
                    raise DownloadError(error.path, error.failures, self._use_a_copy_note(error.note)) from error

    def _use_a_copy_note(self, note: str) -> str:
        """The way out of a failed download (after ``note``, if any): a copy of the files the user has."""
        files = ", ".join(f"{name}[.gz]" for name in _TRAIN_FILES + _TEST_FILES)
        way_out = (
            f"{self.dataset_name} could not be downloaded into {self.raw_folder}. If you have its files (no network "
            f"here?), pass root= a folder that holds them ({files}), in ROOT/{self.folder}/raw/ or in ROOT itself."
        )
        return f"{note}\n{way_out}" if note else way_out

    def _find_split_files(self) -> tuple[Path, Path]:
        names = self._split_files()
        found = [self._find(name) for name in names]
        missing = [name for name, path in zip(names, found) if path is None]
        if missing:
            raise FileNotFoundError(self._missing_files_message(missing))
        return found[0], found[1]  # type: ignore[return-value]

    def _missing_files_message(self, missing: list[str]) -> str:
        if not self.root.is_dir():
            return f"root={str(self.root)!r} does not exist; pass download=True to download {type(self).__name__} into it"
        looked_at = "\n".join(f"  {name}: looked for {', '.join(map(str, self._candidates(name)))}" for name in missing)
        return (
            f"{self._description()}: {len(missing)} file(s) not found\n{looked_at}\n"
            f"Pass download=True to download them into {self.raw_folder}"
        )

    def _keep_accepted(self, filter_labels: Callable[[Any], Any], images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        keep = _labels_accepted_by(filter_labels, labels)
        if not keep.any():  # most likely a mistake (``y > 9``), but an empty dataset is not wrong in itself
            warnings.warn(f"filter_labels kept none of the samples of the {self._description()}", stacklevel=3)
        return images[keep], labels[keep]

    def _read_split(self, images_path: Path, labels_path: Path) -> tuple[Tensor, Tensor]:
        """The images (uint8, ``(N, H, W)``) and labels (int64, ``(N,)``), checked to belong together."""
        images, labels = _read_with_hint(images_path), _read_with_hint(labels_path)
        if images.dtype != torch.uint8 or images.dim() != 3:
            found = f"{images.dtype} of shape {tuple(images.shape)}"
            raise ValueError(f"{images_path}: expected uint8 images of shape (N, H, W), got {found}")
        if labels.dtype != torch.uint8 or labels.dim() != 1:
            found = f"{labels.dtype} of shape {tuple(labels.shape)}"
            raise ValueError(f"{labels_path}: expected uint8 labels of shape (N,), got {found}")
        if len(images) != len(labels):
            raise ValueError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
        if len(labels) and int(labels.max()) >= len(self.classes):
            raise ValueError(f"{labels_path}: label {int(labels.max())} is out of range for {len(self.classes)} classes")
        return images, labels.long()


class FashionMNIST(MNIST):
    """Fashion-MNIST (Xiao et al. 2017): Zalando's 28x28 images of 10 kinds of clothing.

    A drop-in replacement for MNIST with the same file names, sizes and arguments; see
    :class:`MNIST`. Files are looked for in ``root/FashionMNIST/raw/``, then in ``root`` itself,
    so Debian's package is read with ``FashionMNIST("/usr/share/datasets/fashion-mnist")``.
    """

    folder: ClassVar[str] = "FashionMNIST"
    dataset_name: ClassVar[str] = "Fashion-MNIST"
    mirrors: ClassVar[tuple[str, ...]] = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
    #: MD5 of the ``.gz`` files upstream serves (Debian's package recompresses them, so its
    #: ``.gz`` files differ while holding the same data; they are used as found, not downloaded).
    checksums: ClassVar[dict[str, str]] = {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    }
    classes: ClassVar[list[str]] = [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ]  # fmt: skip

    def _check_recognized(self, labels_path: Path) -> None:
        """Refuse MNIST's digits: nobody wants them named as clothing, so it can only be a mistake."""
        if self.recognized_as == "MNIST":
            raise ValueError(
                f"{self._description()}: {labels_path} holds MNIST's digits (its exact class counts), not "
                "Fashion-MNIST; read them with neurenix.data.MNIST, or point root= at Fashion-MNIST's files"
            )


def _recognize(labels: Tensor, train: bool) -> Optional[str]:
    """``"MNIST"`` or ``"Fashion-MNIST"`` if ``labels`` are that dataset's full ``train`` or test split, else ``None``."""
    counts = tuple(torch.bincount(labels, minlength=10).tolist()) if len(labels) else ()
    for name in ("MNIST", "Fashion-MNIST"):
        if counts != _CLASS_COUNTS[name, train]:
            continue
        digest = _LABEL_DIGESTS.get((name, train))
        if digest is None or hashlib.sha256(labels.to(torch.uint8).numpy().tobytes()).hexdigest() == digest:
            return name
    return None


def _labels_accepted_by(predicate: Callable[[Any], Any], labels: Tensor) -> Tensor:
    """A boolean mask of the labels ``predicate`` accepts: one call on the whole tensor if it
    supports that, else one call per distinct label (there are only ten)."""
    mask = _try_on_tensor(predicate, labels)
    if mask is not None:
        return mask
    accepted = [label for label in labels.unique().tolist() if predicate(label)]
    return torch.isin(labels, torch.tensor(accepted, dtype=labels.dtype))


def _try_on_tensor(predicate: Callable[[Any], Any], labels: Tensor) -> Optional[Tensor]:
    try:
        # A copy, so that a predicate that modifies its argument cannot change the labels.
        result = predicate(labels.clone())
    except Exception:  # written for ints only (``y in (1, 3)``, ``y.bit_length()``): ask per label
        return None
    if isinstance(result, Tensor) and result.dtype == torch.bool and result.shape == labels.shape:
        return result
    return None


def _read_with_hint(path: Path) -> Tensor:
    try:
        return read_idx(path)
    except IDXFormatError as error:
        raise IDXFormatError(path, f"{error.problem}; delete the file and pass download=True to fetch it again") from error


def _check_root(root: object) -> Path:
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a path (str or os.PathLike), got {type(root).__name__}: {root!r:.80}")
    return Path(os.fspath(root)).expanduser()


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__}: {value!r:.80}")
    return value


def _check_optional_callable(name: str, value: Any) -> Any:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable or None, got {type(value).__name__}: {value!r:.80}")
    return value
