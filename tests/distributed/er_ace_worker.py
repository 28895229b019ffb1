"""ERACE over two class-incremental tasks as a two-process DDP job (CPU, gloo): uninterrupted,
checkpointed every few steps, then resumed in the same processes from a checkpoint in task 1.

    python tests/distributed/er_ace_worker.py OUT

Each rank writes ``OUT/rank{r}.pt``: the initial parameters, the batches it trained on (its share
of each global batch, in order, with their task), and, for both runs, its parameters and ERACE's
``state_dict`` at the end. ``tests/distributed/test_ddp_er_ace.py`` runs it.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for `neurenix` from a checkout

from neurenix.continual import ContinualLossMixin  # noqa: E402
from neurenix.continual.distributed import rank_and_world_size  # noqa: E402
from neurenix.continual.er_ace import ERACE  # noqa: E402
from neurenix.data import TaskDataset, TaskSequenceDataModule, fit_sequence  # noqa: E402

SAMPLES, BATCH_PER_RANK, EVERY, RESUME_STEP = 32, 4, 3, 9  # 4 steps an epoch, 2 epochs a task: step 9 is in task 1
LR, MEMORY_SIZE, REPLAY_RATIO, SEED = 0.2, 6, 1.0, 4
CLASSES = {0: (0, 1), 1: (2, 3)}


def network(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4))


class Classifier(ContinualLossMixin, L.LightningModule):
    def __init__(self, seed: int) -> None:
        super().__init__()
        self.net = network(seed)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


class RecordBatches(L.Callback):
    """This rank's share of every global batch, with its task."""

    def __init__(self) -> None:
        self.batches: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append((trainer.datamodule.current_task, batch[0].clone(), batch[1].clone()))


def task(task_id: int) -> TaskDataset:
    generator = torch.Generator().manual_seed(task_id)
    x = torch.randn(SAMPLES, 6, generator=generator)
    classes = torch.tensor(CLASSES[task_id])
    return TaskDataset(x, classes[torch.randint(0, 2, (SAMPLES,), generator=generator)], task_id)


def run(out: Path, resume: str | None) -> dict:
    shift = 100 if resume else 0  # a resumed run starts from other weights and seeds
    model = Classifier(seed=shift)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    ace = ERACE(model.net, memory_size=MEMORY_SIZE, replay_ratio=REPLAY_RATIO, seed=SEED + shift)
    recorder = RecordBatches()
    checkpoints = [] if resume else [ModelCheckpoint(dirpath=out, filename="{step}", every_n_train_steps=EVERY, save_top_k=-1)]
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", callbacks=[ace, recorder, *checkpoints], logger=False,
        enable_checkpointing=not resume, enable_progress_bar=False, enable_model_summary=False, deterministic=True,
    )  # fmt: skip
    datamodule = TaskSequenceDataModule([task(0), task(1)], [task(0), task(1)], batch_size=BATCH_PER_RANK, seed=shift)
    fit_sequence(trainer, model, datamodule, epochs_per_task=2, ckpt_path=resume)
    return {
        "initial": initial,
        "batches": recorder.batches,
        "params": {name: p.detach().clone() for name, p in model.named_parameters()},
        "state": ace.state_dict(),
        "global_step": trainer.global_step,
    }


def main(out: Path) -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    uninterrupted = run(out / "checkpoints", None)
    resumed = run(out / "checkpoints", str(out / "checkpoints" / f"step={RESUME_STEP}.ckpt"))
    rank, _ = rank_and_world_size()
    torch.save({"uninterrupted": uninterrupted, "resumed": resumed}, out / f"rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # before exit: gloo's threads torn down at exit can abort


if __name__ == "__main__":
    main(Path(sys.argv[1]))
