"""A task sequence under DDP: two CPU processes here, the same script on GPUs or nodes.

    python examples/ddp_sequence.py                                  # 2 CPU processes (gloo)
    python examples/ddp_sequence.py --accelerator gpu --devices 4    # 4 GPUs (NCCL)
    python examples/ddp_sequence.py --accelerator gpu --devices 8 --num_nodes 2   # per node, under a launcher

Lightning starts the other processes itself (it re-runs this script), so run it as a script.
Every method keeps its state identical on all ranks; ForgettingCurves evaluates every task on
rank-summed counts and rank 0 prints the accuracy matrix.
"""

from __future__ import annotations

import argparse
import logging
import warnings

import lightning as L
import torch
from torch import nn

from neurenix.continual import EWC, ContinualLossMixin, ExperienceReplay, SynapticIntelligence
from neurenix.data import TaskSequenceDataModule, fit_sequence, split_benchmark
from neurenix.metrics import ForgettingCurves


class Classifier(ContinualLossMixin, L.LightningModule):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, classes))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--num_nodes", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per task")
    parser.add_argument("--batch_size", type=int, default=32, help="per process; the global batch is devices x this")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")

    L.seed_everything(0, verbose=False)  # the same seed on every rank: the same model and methods
    benchmark = split_benchmark("digits", num_tasks=5, scenario="domain", seed=0)
    datamodule = TaskSequenceDataModule.from_benchmark(benchmark, batch_size=args.batch_size)
    model = Classifier(benchmark.num_classes)
    curves = ForgettingCurves()
    methods = [EWC(model.net, importance=200.0, fisher_sample_size=200), SynapticIntelligence(model.net, importance=1.0),
               ExperienceReplay(model.net, memory_size=200, replay_ratio=0.5)]
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy="ddp",
        callbacks=[*methods, curves],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    fit_sequence(trainer, model, datamodule, epochs_per_task=args.epochs)
    if trainer.is_global_zero:
        matrix = curves.matrix.compute()
        print(f"accuracy matrix (row: after task i; column: task j), {trainer.world_size} processes:")
        for i, row in enumerate(matrix.tolist()):
            print(f"  after task {i}: " + " ".join(f"{a:.3f}" for a in row))
        print(f"average accuracy {curves.matrix.average_accuracy():.3f}, backward transfer "
              f"{curves.matrix.backward_transfer():+.3f}, forgetting {curves.matrix.forgetting():.3f}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # leave the group cleanly before exiting


if __name__ == "__main__":
    main()
