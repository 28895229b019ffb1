"""A two-task sequence with every method, run by test_ddp.py as one process or as a DDP job.

    python tests/distributed/sequence_worker.py OUT_DIR DEVICES [--without-replay] [--fail-on-rank R]

Every rank writes ``OUT_DIR/rank{r}.pt`` (parameters, method states, accuracy matrix); rank 0
also saves a Lightning checkpoint mid-way through task 1 (``OUT_DIR/mid.ckpt``). The global
batch is 16 whatever the number of processes, so results can be compared across them.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for `tests.helpers`

from neurenix.continual import (  # noqa: E402
    EWC,
    ContinualLossMixin,
    ExperienceReplay,
    KnowledgeDistillation,
    L2Regularization,
    MAS,
    RWalk,
    SynapticIntelligence,
)
from neurenix.continual.distributed import rank_and_world_size  # noqa: E402
from neurenix.data import TaskSequenceDataModule, fit_sequence  # noqa: E402
from neurenix.metrics import ForgettingCurves  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

GLOBAL_BATCH = 16


class Classifier(ContinualLossMixin, L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        self.evaluated_samples = 0  # in eval mode only ForgettingCurves calls forward

    def forward(self, x):
        if not self.training:
            self.evaluated_samples += x.shape[0]
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


class FailOnRank(L.Callback):
    """Raises on one rank at the end of task 0, just before the methods' collectives there
    (listed first, it runs before them), to show that the other ranks do not hang."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_train_end(self, trainer, pl_module):
        if trainer.global_rank == self.rank:
            raise RuntimeError(f"deliberate failure on rank {self.rank}")


class SaveMidTask(L.Callback):
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.datamodule.current_task == 1 and batch_idx == 1:
            trainer.save_checkpoint(self.path)


class TwoRankOrder:
    """One process's batches in the order a two-process DDP run sees them.

    Lightning gives each DDP rank a shuffled ``DistributedSampler`` (seed 0, reseeded per
    epoch); the union of the two ranks' i-th batches is the i-th global batch, taken here.
    """

    def __init__(self, dataset: TensorDataset) -> None:
        self.dataset, self.epoch = dataset, 0

    def __iter__(self):
        shards = []
        for rank in (0, 1):
            sampler = DistributedSampler(self.dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
            sampler.set_epoch(self.epoch)
            shards.append(list(sampler))
        per_rank = GLOBAL_BATCH // 2
        for start in range(0, len(shards[0]), per_rank):
            yield shards[0][start : start + per_rank] + shards[1][start : start + per_rank]

    def __len__(self) -> int:
        return -(-len(self.dataset) // GLOBAL_BATCH)


class SingleProcessLikeDDP(TaskSequenceDataModule):
    def train_dataloader(self):
        self.order = TwoRankOrder(self.train_tasks[self.current_task])
        return DataLoader(self.order.dataset, batch_sampler=self.order)


class FollowEpochs(L.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        trainer.datamodule.order.epoch = trainer.current_epoch


def tasks(seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 6, generator=generator)
    return TensorDataset(x, (x[:, seed % 6] > 0).long() + (x[:, (seed + 1) % 6] > 1).long())


def main(out: Path, devices: int, fail_on_rank: int | None, replay: bool) -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    model = Classifier()
    methods = [
        EWC(model.net, importance=50.0, fisher_sample_size=40, seed=3),
        SynapticIntelligence(model.net, importance=0.5),
        L2Regularization(model.net, importance=0.1),
        KnowledgeDistillation(model.net, alpha=0.3),
    ]
    # issue 17: MAS's importance from each rank's share of one subset, RWalk's statistics from the
    # all-reduced gradient
    mas, rwalk = MAS(model.net, importance=0.5, sample_size=40, seed=5), RWalk(model.net, importance=0.5, interval=3)
    methods += [mas, rwalk]
    if replay:  # per-rank reservoirs: replay differs from one process by design
        methods.append(ExperienceReplay(model.net, memory_size=20, replay_ratio=0.5, seed=4))
    curves = ForgettingCurves()
    # One process trains on the global batches the two DDP ranks see together.
    module_class = TaskSequenceDataModule if devices > 1 else SingleProcessLikeDDP
    datamodule = module_class([tasks(1), tasks(2)], [tasks(11), tasks(12)], batch_size=GLOBAL_BATCH // devices)
    extra = [SaveMidTask(out / "mid.ckpt")] + ([FollowEpochs()] if devices == 1 else [])
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        callbacks=[*([FailOnRank(fail_on_rank)] if fail_on_rank is not None else []), *methods, curves, *extra],
        logger=TensorBoardLogger(out, name="tensorboard", version=0),  # rank 0 draws the heatmap
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    fit_sequence(trainer, model, datamodule, epochs_per_task=2)
    rank, _ = rank_and_world_size()
    torch.save(
        {
            "params": {name: p.detach().clone() for name, p in model.named_parameters()},
            "ewc_fisher": methods[0]._tasks[0]["fisher"],
            "ewc_samples": methods[0]._tasks[0]["samples"],
            "si_big_omega": methods[1].big_omega,
            "teacher": methods[3].teacher.state_dict(),
            "replay_seen": methods[-1].memory.num_seen if replay else None,
            "mas_omega": mas.omega,
            "rwalk_fisher": rwalk.fisher,
            "rwalk_scores": rwalk.scores,
            "matrix": curves.matrix.compute(),
            "matrix_counts": curves.matrix.total.clone(),
            "evaluated_samples": model.evaluated_samples,
        },
        out / f"rank{rank}.pt",
    )
    if torch.distributed.is_initialized():
        # Leave the group before the interpreter exits: gloo's threads torn down at exit can
        # abort the process ("terminate called without an active exception").
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    arguments = sys.argv[1:]
    fail = int(arguments[arguments.index("--fail-on-rank") + 1]) if "--fail-on-rank" in arguments else None
    main(Path(arguments[0]), int(arguments[1]), fail, replay="--without-replay" not in arguments)
