"""Data for continual learning: datasets held as tensors, task sequences, standard benchmarks.

``DataLoader``, ``Dataset`` and ``TensorDataset`` are PyTorch's own classes.
"""

from torch.utils.data import DataLoader, Dataset, TensorDataset

from neurenix.data.benchmarks import SCENARIOS, TaskSequence, permuted_benchmark, split_benchmark
from neurenix.data.datamodule import TRAINING_REGIMES, TaskSequenceDataModule
from neurenix.data.sequence import fit_sequence
from neurenix.data.digits import Digits
from neurenix.data.download import DownloadError, download_file
from neurenix.data.idx import IDXFormatError, read_idx
from neurenix.data.mnist import MNIST, FashionMNIST
from neurenix.data.stream import StreamDataset, StreamSampler, TaskStream, task_free_stream
from neurenix.data.tasks import (
    AddChannel,
    Compose,
    ConcatTaskDataset,
    Flatten,
    PermutePixels,
    TaskDataLoader,
    TaskDataset,
    TensorBatchSampler,
    ToFloat,
    collate_batch,
)

__all__ = [
    "StreamDataset",
    "StreamSampler",
    "TaskStream",
    "task_free_stream",
    "AddChannel",
    "Compose",
    "ConcatTaskDataset",
    "DataLoader",
    "Dataset",
    "Digits",
    "DownloadError",
    "FashionMNIST",
    "Flatten",
    "IDXFormatError",
    "MNIST",
    "PermutePixels",
    "SCENARIOS",
    "TRAINING_REGIMES",
    "TaskDataset",
    "TaskSequence",
    "TaskSequenceDataModule",
    "TaskDataLoader",
    "TensorBatchSampler",
    "TensorDataset",
    "ToFloat",
    "collate_batch",
    "download_file",
    "fit_sequence",
    "permuted_benchmark",
    "read_idx",
    "split_benchmark",
]
