"""The Lightning way: methods as callbacks, a TaskSequenceDataModule, forgetting curves in TensorBoard.

    python examples/lightning_sequence.py [--epochs 4] [--output lightning-sequence]
    tensorboard --logdir lightning-sequence     # accuracy/task_0..4 curves, continual/* scalars, the accuracy-matrix figure

Split digits (scikit-learn's load_digits, offline), five domain-incremental tasks of two
digits each; EWC and experience replay protect the earlier tasks while one Trainer learns them
one after the other.
"""

from __future__ import annotations

import argparse
import logging
import warnings

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from neurenix.continual import EWC, ContinualLossMixin, ExperienceReplay
from neurenix.data import TaskSequenceDataModule, fit_sequence, split_benchmark
from neurenix.metrics import ForgettingCurves


class DigitClassifier(ContinualLossMixin, L.LightningModule):  # the mixin: the one change replay needs
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, classes))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per task")
    parser.add_argument("--output", default="lightning-sequence", help="TensorBoard log folder")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")

    L.seed_everything(0, verbose=False)
    benchmark = split_benchmark("digits", num_tasks=5, scenario="domain", seed=0)
    datamodule = TaskSequenceDataModule.from_benchmark(benchmark, batch_size=32)
    model = DigitClassifier(benchmark.num_classes)
    curves = ForgettingCurves(every_n_epochs=1)
    methods = [EWC(model.net, importance=2000.0, fisher_sample_size=200), ExperienceReplay(model.net, memory_size=200, replay_ratio=1.0)]
    trainer = L.Trainer(
        callbacks=[*methods, curves],
        logger=TensorBoardLogger(args.output, name="ewc+replay"),
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    fit_sequence(trainer, model, datamodule, epochs_per_task=args.epochs)

    print("accuracy after each task (rows) on each task (columns):")
    for i, row in enumerate(curves.matrix.accuracies().tolist()):
        print(f"  after task {i}: " + " ".join(f"{a:.3f}" for a in row))
    print(f"average accuracy {curves.matrix.average_accuracy():.3f}, forgetting {curves.matrix.forgetting():.3f}")
    print(f"TensorBoard logs: {trainer.logger.log_dir}")


if __name__ == "__main__":
    main()
