"""Small models and data sets that make tests fast and exact."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def make_mlp(inputs: int = 6, hidden: int = 5, classes: int = 3, *, seed: int = 0, batch_norm: bool = False) -> nn.Sequential:
    """A small MLP in float64 so that references computed another way agree to ~1e-12."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(inputs, hidden)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(hidden))
    layers += [nn.Tanh(), nn.Linear(hidden, classes)]
    return nn.Sequential(*layers).double()


def make_task(samples: int = 40, inputs: int = 6, classes: int = 3, *, seed: int = 1) -> TensorDataset:
    """A random classification task (float64 inputs, int64 labels)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, inputs, generator=generator, dtype=torch.float64)
    y = torch.randint(0, classes, (samples,), generator=generator)
    return TensorDataset(x, y)



def loader(dataset: TensorDataset, batch_size: int = 8, shuffle: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)
