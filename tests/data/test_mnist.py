"""MNIST and Fashion-MNIST from IDX files the tests write, from a local mirror, and from Debian's real Fashion-MNIST."""

from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from neurenix.data.download import DownloadError
from neurenix.data.idx import IDXFormatError
from neurenix.data.mnist import MNIST, FashionMNIST
from tests.data.test_download import LocalServer, closed_port_url, server  # noqa: F401 (server is a fixture)
from tests.data.test_idx import write_file, write_idx

SPLIT_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SPLIT_SIZES = {True: 30, False: 20}  # every label 0..9 three and two times
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def make_split(train: bool) -> tuple[np.ndarray, np.ndarray]:
    """Random 28x28 uint8 images and shuffled labels, different for each split."""
    rng = np.random.default_rng(1 if train else 2)
    count = SPLIT_SIZES[train]
    images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    labels = rng.permutation(np.arange(count) % 10).astype(np.uint8)
    return images, labels


def write_dataset(folder: Path, suffix: str = "") -> dict[bool, tuple[np.ndarray, np.ndarray]]:
    """Both splits' four files in ``folder``; returns the arrays written."""
    splits = {train: make_split(train) for train in (True, False)}
    for train, arrays in splits.items():
        for name, array in zip(SPLIT_FILES[train], arrays):
            write_idx(folder / f"{name}{suffix}", array)
    return splits


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("layout", ["torchvision", "flat"])
@pytest.mark.parametrize("train", [True, False])
def test_reads_the_split_in_either_layout(tmp_path: Path, layout: str, suffix: str, train: bool) -> None:
    folder = tmp_path / "MNIST" / "raw" if layout == "torchvision" else tmp_path
    images, labels = write_dataset(folder, suffix)[train]
    dataset = MNIST(tmp_path, train=train)
    assert len(dataset) == SPLIT_SIZES[train]
    assert dataset.data.dtype == torch.uint8 and dataset.data.shape == (SPLIT_SIZES[train], 28, 28)
    assert dataset.targets.dtype == torch.int64
    assert torch.equal(dataset.data, torch.from_numpy(images))
    assert dataset.targets.tolist() == labels.tolist()


def test_items_without_transforms_are_a_uint8_image_and_an_int(tmp_path: Path) -> None:
    images, labels = write_dataset(tmp_path)[True]
    dataset = MNIST(tmp_path)
    image, label = dataset[3]
    assert image.dtype == torch.uint8 and image.shape == (28, 28)
    assert torch.equal(image, torch.from_numpy(images[3]))
    assert type(label) is int and label == labels[3]
    image.fill_(0)  # the item is a copy: changing it leaves the dataset as it was
    assert torch.equal(dataset.data[3], torch.from_numpy(images[3]))


def test_the_tutorial_task_split(tmp_path: Path) -> None:
    """The API document's task 2: digits 5..9 relabelled 0..4, flattened and scaled to [0, 1]."""
    images, labels = write_dataset(tmp_path / "MNIST" / "raw", ".gz")[True]
    task2 = MNIST(
        root=tmp_path,
        train=True,
        download=True,  # as in the tutorial: the files are there, so nothing is fetched
        transform=lambda x: x.reshape(-1) / 255.0,
        target_transform=lambda y: y - 5,
        filter_labels=lambda y: y >= 5,
    )
    kept = labels >= 5
    assert len(task2) == kept.sum() == 15
    assert task2.targets.tolist() == labels[kept].tolist()  # original labels; target_transform applies per item
    inputs, targets = next(iter(DataLoader(task2, batch_size=len(task2), shuffle=False)))
    assert inputs.dtype == torch.float32 and inputs.shape == (15, 784)
    assert torch.allclose(inputs, torch.from_numpy(images[kept].reshape(15, 784) / 255.0).float())
    assert targets.dtype == torch.int64
    assert targets.tolist() == (labels[kept].astype(int) - 5).tolist()
    outputs = torch.nn.functional.one_hot(targets, 5).float()
    assert (outputs.argmax(dim=1) == targets).all()  # how the tutorial scores predictions


def test_filter_labels_sees_the_original_labels_before_target_transform(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    seen: list[object] = []
    dataset = MNIST(tmp_path, target_transform=lambda y: y + 100, filter_labels=lambda y: seen.append(y) or y < 5)
    assert isinstance(seen[0], torch.Tensor) and sorted(seen[0].unique().tolist()) == list(range(10))
    assert len(seen) == 1  # vectorized: one call on the tensor of all labels
    assert sorted({dataset[i][1] for i in range(len(dataset))}) == [100, 101, 102, 103, 104]


def test_filter_labels_written_for_ints_is_asked_once_per_distinct_label(tmp_path: Path) -> None:
    _, labels = write_dataset(tmp_path)[True]
    asked: list[object] = []

    def is_odd_prime(label: int) -> bool:
        asked.append(label)
        return label in (3, 5, 7)  # on a tensor this is an error, so the dataset asks per label

    dataset = MNIST(tmp_path, filter_labels=is_odd_prime)
    per_label = [label for label in asked if isinstance(label, int)]
    assert sorted(per_label) == list(range(10))
    assert dataset.targets.tolist() == [label for label in labels.tolist() if label in (3, 5, 7)]


def test_a_filter_that_keeps_nothing_warns(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    with pytest.warns(UserWarning, match="filter_labels kept none of the samples"):
        dataset = MNIST(tmp_path, filter_labels=lambda y: y > 9)
    assert len(dataset) == 0 and dataset.data.shape == (0, 28, 28)


def test_fashion_mnist_has_its_own_folder_and_classes(tmp_path: Path) -> None:
    images, _ = write_dataset(tmp_path / "FashionMNIST" / "raw", ".gz")[False]
    fashion = FashionMNIST(tmp_path, train=False)
    assert torch.equal(fashion.data, torch.from_numpy(images))
    assert fashion.classes[9] == "Ankle boot" and fashion.class_to_idx["Trouser"] == 1
    assert MNIST.classes[0] == "0 - zero"
    with pytest.raises(FileNotFoundError):  # MNIST does not mistake Fashion-MNIST's folder for its own
        MNIST(tmp_path, train=False)


def test_missing_files_name_root_the_paths_and_download(tmp_path: Path) -> None:
    write_idx(tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz", make_split(False)[0])
    message = re.escape(str(tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"))
    with pytest.raises(FileNotFoundError, match=message) as caught:
        MNIST(tmp_path, train=False)
    text = str(caught.value)
    assert f"root={str(tmp_path)!r}" in text and "1 file(s) not found" in text and "download=True" in text
    assert str(tmp_path / "t10k-labels-idx1-ubyte") in text  # the flat layout was looked at too
    nowhere = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(f"root={str(nowhere)!r} does not exist; pass download=True")):
        MNIST(nowhere)


def test_files_that_do_not_belong_together_are_refused(tmp_path: Path) -> None:
    images, labels = make_split(True)
    write_idx(tmp_path / "train-images-idx3-ubyte", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels[:-1])
    with pytest.raises(ValueError, match="holds 30 images but .* holds 29 labels"):
        MNIST(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.full(30, 10, np.uint8))
    with pytest.raises(ValueError, match="label 10 is out of range for 10 classes"):
        MNIST(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels.astype(np.int32))
    with pytest.raises(ValueError, match=r"expected uint8 labels of shape \(N,\), got torch.int32"):
        MNIST(tmp_path)


def test_a_damaged_file_is_named_with_a_way_out(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    damaged = tmp_path / "train-images-idx3-ubyte"
    write_file(damaged, damaged.read_bytes()[:-10])
    expected = f"{re.escape(str(damaged))}: truncated data.*delete the file and pass download=True"
    with pytest.raises(IDXFormatError, match=expected):
        MNIST(tmp_path)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"root": 3}, "root must be a path (str or os.PathLike), got int: 3"),
        ({"train": "yes"}, "train must be True or False, got str: 'yes'"),
        ({"download": 1}, "download must be True or False, got int: 1"),
        ({"transform": "flatten"}, "transform must be callable or None, got str: 'flatten'"),
        ({"target_transform": 5}, "target_transform must be callable or None, got int: 5"),
        ({"filter_labels": [1, 2]}, "filter_labels must be callable or None, got list: [1, 2]"),
    ],
)
def test_invalid_arguments_are_named(tmp_path: Path, arguments: dict, message: str) -> None:
    with pytest.raises(TypeError, match=re.escape(message)):
        MNIST(**{"root": tmp_path, **arguments})


@pytest.fixture
def mirror(server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: F811 (fixture argument)
    """MNIST's mirrors replaced by a refused port and the local server, which serves the four .gz files."""
    splits = write_dataset(tmp_path / "served", ".gz")
    checksums = {}
    for path in (tmp_path / "served").iterdir():
        server.serve(f"/mnist/{path.name}", path.read_bytes())
        checksums[path.name] = hashlib.md5(path.read_bytes()).hexdigest()
    monkeypatch.setattr(MNIST, "mirrors", (closed_port_url("/mnist/"), server.url("/mnist")))
    monkeypatch.setattr(MNIST, "checksums", checksums)
    return server, splits


def test_download_fetches_verifies_and_is_reused(mirror, tmp_path: Path) -> None:
    server, splits = mirror
    root = tmp_path / "data"
    dataset = MNIST(root, train=False, download=True)
    assert torch.equal(dataset.data, torch.from_numpy(splits[False][0]))
    assert sorted(server.requests) == sorted(f"/mnist/{name}.gz" for name in SPLIT_FILES[True] + SPLIT_FILES[False])
    assert sorted(path.name for path in (root / "MNIST" / "raw").iterdir()) == sorted(MNIST.checksums)
    server.requests.clear()
    assert len(MNIST(root, train=True, download=True)) == SPLIT_SIZES[True]
    assert len(MNIST(root, train=True, download=False)) == SPLIT_SIZES[True]
    assert server.requests == []


def test_download_fetches_only_missing_files(mirror, tmp_path: Path) -> None:
    server, _ = mirror
    write_dataset(tmp_path / "MNIST" / "raw")  # uncompressed, as torchvision leaves them
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    MNIST(tmp_path, train=False, download=True)
    assert server.requests == ["/mnist/t10k-labels-idx1-ubyte.gz"]


def test_download_with_a_wrong_checksum_leaves_nothing(mirror, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(MNIST.checksums, "train-images-idx3-ubyte.gz", "0" * 32)
    with pytest.raises(DownloadError, match="md5 mismatch"):
        MNIST(tmp_path, download=True)
    assert not list((tmp_path / "MNIST" / "raw").glob("train-images*"))


def test_a_failed_download_says_how_to_use_a_copy_and_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(MNIST, "mirrors", (closed_port_url("/mnist/"),))
    root = tmp_path / "data"
    with pytest.raises(DownloadError) as caught:
        MNIST(root, download=True)
    message = str(caught.value)
    assert f"MNIST could not be downloaded into {root / 'MNIST' / 'raw'}" in message
    assert "pass root= a folder that holds them (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz]" in message
    assert "in ROOT/MNIST/raw/ or in ROOT itself" in message
    assert not root.exists()  # root, root/MNIST and root/MNIST/raw were made for the download: all gone
    root.mkdir()
    with pytest.raises(DownloadError, match="Fashion-MNIST could not be downloaded"):
        FashionMNIST(root, download=True, train=False)
    assert files_in_folder(root) == []  # the user's root stays; FashionMNIST/raw, made for the download, does not


def files_in_folder(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def write_labels_with_counts(folder: Path, counts: list[int], seed: int = 0) -> np.ndarray:
    """A test split (black images) whose labels have exactly ``counts``, in shuffled order."""
    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(10), counts)).astype(np.uint8)
    write_idx(folder / "t10k-images-idx3-ubyte", np.zeros((len(labels), 28, 28), np.uint8))
    write_idx(folder / "t10k-labels-idx1-ubyte", labels)
    return labels


MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]  # every copy of MNIST's test set


def test_mnist_files_are_recognized_and_refused_as_fashion_mnist(tmp_path: Path) -> None:
    write_labels_with_counts(tmp_path, MNIST_TEST_COUNTS)
    with pytest.raises(ValueError, match=r"holds MNIST's digits \(its exact class counts\), not Fashion-MNIST; read them with neurenix.data.MNIST"):
        FashionMNIST(tmp_path, train=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MNIST reads its own files without a word
        assert MNIST(tmp_path, train=False).recognized_as == "MNIST"


def test_other_data_in_the_format_is_not_taken_for_either_dataset(tmp_path: Path) -> None:
    write_labels_with_counts(tmp_path, [1000] * 10)  # balanced like Fashion-MNIST, but not its labels
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert MNIST(tmp_path, train=False).recognized_as is None
        assert FashionMNIST(tmp_path, train=False).recognized_as is None
    write_dataset(tmp_path)
    assert MNIST(tmp_path).recognized_as is None


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
@pytest.mark.parametrize("train", [True, False])
def test_fashion_mnist_given_as_mnist_is_read_with_a_warning_that_names_it(train: bool) -> None:
    """Fashion-MNIST is made as MNIST's drop-in replacement, so this is allowed, but said."""
    labels = DEBIAN_FASHION_MNIST / f"{'train' if train else 't10k'}-labels-idx1-ubyte.gz"
    expected = f"holds Fashion-MNIST (clothing), not MNIST's digits: {labels} has Fashion-MNIST's labels"
    with pytest.warns(UserWarning, match=re.escape(expected)) as caught:
        as_mnist = MNIST(DEBIAN_FASHION_MNIST, train=train, filter_labels=lambda y: y < 5)
    assert "use neurenix.data.FashionMNIST for its class names" in str(caught[0].message)
    assert caught[0].filename == __file__  # the warning points at the line that made the dataset
    assert as_mnist.recognized_as == "Fashion-MNIST" and len(as_mnist) == (30_000 if train else 5_000)
    fashion = FashionMNIST(DEBIAN_FASHION_MNIST, train=train)
    assert fashion.recognized_as == "Fashion-MNIST"
    assert torch.equal(as_mnist.data, fashion.data[fashion.targets < 5])


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_from_debians_flat_folder() -> None:
    for train, count in ((True, 60_000), (False, 10_000)):
        dataset = FashionMNIST(DEBIAN_FASHION_MNIST, train=train)
        assert dataset.data.shape == (count, 28, 28) and dataset.data.dtype == torch.uint8
        assert torch.bincount(dataset.targets).tolist() == [count // 10] * 10
    assert len(dataset.classes) == 10
    assert dataset.data.max() == 255 and dataset.data.min() == 0
    first_image, first_label = FashionMNIST(DEBIAN_FASHION_MNIST, train=True)[0]
    assert first_label == 9  # the famous ankle boot of Fashion-MNIST's README
    assert first_image.shape == (28, 28)


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_files_found_are_used_as_they_are_even_with_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """Debian recompressed the archives, so their md5 is not upstream's; they must still be used, not fetched."""
    monkeypatch.setattr(FashionMNIST, "mirrors", (closed_port_url("/"),))
    assert len(FashionMNIST(DEBIAN_FASHION_MNIST, train=False, download=True)) == 10_000
