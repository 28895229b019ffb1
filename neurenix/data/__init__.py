"""Data for continual learning: datasets held as tensors, task sequences, standard benchmarks.

``DataLoader``, ``Dataset`` and ``TensorDataset`` are PyTorch's own classes.
"""

from torch.utils.data import DataLoader, Dataset, TensorDataset

from neurenix.data.download import DownloadError, download_file
from neurenix.data.idx import IDXFormatError, read_idx
from neurenix.data.mnist import MNIST, FashionMNIST

__all__ = [
    "DataLoader",
    "Dataset",
    "DownloadError",
    "FashionMNIST",
    "IDXFormatError",
    "MNIST",
    "TensorDataset",
    "download_file",
    "read_idx",
]
