"""Small models and data sets that make tests fast and exact."""

from __future__ import annotations

import io

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


def quiet_trainer(**kwargs):
    """A Trainer that writes and prints nothing unless asked to."""
    import lightning as L

    options = dict(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    options.update(kwargs)
    return L.Trainer(**options)


def lit_classifier(net: nn.Module, lr: float = 0.1, *, mixin: bool = True, loss_fn=nn.functional.cross_entropy):
    """A LightningModule around ``net`` trained with SGD on ``loss_fn`` (cross-entropy)."""
    import lightning as L

    from neurenix.continual import ContinualLossMixin

    bases = (ContinualLossMixin, L.LightningModule) if mixin else (L.LightningModule,)

    def __init__(self, net: nn.Module = net) -> None:
        L.LightningModule.__init__(self)
        self.net = net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        return loss_fn(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=lr)

    namespace = dict(__init__=__init__, forward=forward, training_step=training_step, configure_optimizers=configure_optimizers)
    return type("LitClassifier", bases, namespace)()


def lit_multi_head(model: nn.Module, lr: float = 0.1):
    """A LightningModule around a multi-head ``model(x, task_ids)``, trained with SGD on
    cross-entropy over batches ``(x, y, task_ids)``."""
    import lightning as L

    from neurenix.continual import ContinualLossMixin

    def __init__(self, model: nn.Module = model) -> None:
        L.LightningModule.__init__(self)
        self.model = model

    def training_step(self, batch, batch_idx):
        x, y, task_ids = batch
        return nn.functional.cross_entropy(self.model(x, task_ids), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=lr)

    namespace = dict(__init__=__init__, training_step=training_step, configure_optimizers=configure_optimizers)
    return type("MultiHeadModule", (ContinualLossMixin, L.LightningModule), namespace)()


class Recorder(nn.Module):
    """Wraps a network; keeps a copy of every input batch its forward receives."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return self.net(x)


def saved_and_loaded(state: dict) -> dict:
    """``state`` written by ``torch.save`` and read back (weights only), as a checkpoint would be."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)
