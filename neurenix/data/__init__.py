"""Data utilities. ``DataLoader``, ``Dataset`` and ``TensorDataset`` are PyTorch's own classes."""

from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = ["DataLoader", "Dataset", "TensorDataset"]
