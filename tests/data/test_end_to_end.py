"""A short continual-learning sequence on the real Fashion-MNIST, end to end.

Debian's ``dataset-fashion-mnist`` (installed by ``.ci/run``) puts the data in
/usr/share/datasets/fashion-mnist; the test is skipped where it is absent.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from neurenix.continual import EWC, ContinualLossMixin
from neurenix.data import TaskSequenceDataModule, fit_sequence, split_benchmark
from neurenix.metrics import ForgettingCurves

FASHION = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(), reason="no local Fashion-MNIST")


class _MultiHead(ContinualLossMixin, L.LightningModule):
    """Task-incremental: a shared body and one two-way head per task, picked by the task id."""

    def __init__(self, tasks: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(784, 100), nn.ReLU())
        self.heads = nn.Linear(100, 2 * tasks)

    def forward(self, x, task_ids):
        logits = self.heads(self.body(x)).view(x.shape[0], -1, 2)
        return logits[torch.arange(x.shape[0]), task_ids]

    def training_step(self, batch, batch_idx):
        x, y, task_ids = batch
        return nn.functional.cross_entropy(self(x, task_ids), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def test_split_fashion_mnist_with_ewc_learns_each_task_and_logs_the_matrix(tmp_path):
    L.seed_everything(0, verbose=False)
    benchmark = split_benchmark("fashion_mnist", num_tasks=5, root=str(FASHION), scenario="task", seed=0)
    benchmark.train = benchmark.train[:3]  # a short sequence: three of the five class pairs
    benchmark.test = benchmark.test[:3]
    datamodule = TaskSequenceDataModule.from_benchmark(benchmark, batch_size=128, eval_batch_size=1000)
    model = _MultiHead(tasks=3)
    ewc, curves = EWC(model, importance=100.0, fisher_sample_size=500), ForgettingCurves()
    trainer = L.Trainer(
        callbacks=[ewc, curves], logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    fit_sequence(trainer, model, datamodule, steps_per_task=60)

    r = curves.matrix.compute()
    assert ewc.finished_tasks == [0, 1, 2] and trainer.global_step == 180
    assert all(ewc._tasks[t]["samples"] == 500 for t in range(3))
    assert (r.diagonal() > 0.85).all(), r  # each pair of classes is learned...
    assert (r[2, :2] > 0.6).all(), r  # ...and still well above chance after the later tasks
    assert torch.isclose(curves.matrix.average_accuracy(), r[2].mean(), atol=1e-12)
