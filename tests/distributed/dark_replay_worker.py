"""DarkExperienceReplay (DER++) on a two-process DDP job (CPU, gloo): two tasks uninterrupted,
checkpointed every few steps, then resumed in the same processes from one of those checkpoints.

    python tests/distributed/dark_replay_worker.py OUT [--resume-step 6]

Each rank writes ``OUT/rank{r}.pt``: the inputs of every training batch it saw (its shard of the
stream), and its parameters and the method's ``state_dict`` at the end of both runs. The second
``Trainer`` joins the process group the first one made (Lightning launches the processes once).
``tests/distributed/test_ddp_dark_replay.py`` runs it.
"""

from __future__ import annotations

import argparse
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
from neurenix.continual.dark_replay import DarkExperienceReplay  # noqa: E402
from neurenix.continual.distributed import rank_and_world_size  # noqa: E402
from neurenix.data import TaskDataset, TaskSequenceDataModule, fit_sequence  # noqa: E402

# 16 samples a rank per task: four batches, one epoch a task (so that the two ranks' shards of the
# stream are disjoint), 8 steps in all.
SAMPLES, BATCH_PER_RANK, EVERY, MEMORY = 32, 4, 3, 8


class Classifier(ContinualLossMixin, L.LightningModule):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SeenInputs(L.Callback):
    """The inputs of every training batch this rank trains on."""

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.inputs.append(batch[0].detach().clone())


def task(seed: int) -> TaskDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SAMPLES, 6, generator=generator)
    return TaskDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long(), seed % 10)


def make_method(net: nn.Module, seed: int) -> DarkExperienceReplay:
    return DarkExperienceReplay(net, memory_size=MEMORY, alpha=0.5, beta=0.5, replay_ratio=1.0, seed=seed)


def run(out: Path, resume: str | None) -> dict:
    """The sequence, checkpointed every EVERY steps (or resumed from ``resume``); what it ends with."""
    shift = 100 if resume else 0  # a resumed run starts from other weights and seeds
    model = Classifier(seed=shift)
    der, seen = make_method(model.net, seed=shift + 1), SeenInputs()
    checkpoints = [] if resume else [ModelCheckpoint(dirpath=out, filename="{step}", every_n_train_steps=EVERY, save_top_k=-1)]
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", callbacks=[der, seen, *checkpoints], logger=False,
        enable_checkpointing=not resume, enable_progress_bar=False, enable_model_summary=False, deterministic=True,
    )  # fmt: skip
    datamodule = TaskSequenceDataModule([task(0), task(1)], [task(10), task(11)], batch_size=BATCH_PER_RANK, seed=shift)
    fit_sequence(trainer, model, datamodule, epochs_per_task=1, ckpt_path=resume)
    return {
        "params": {name: p.detach().clone() for name, p in model.named_parameters()},
        "method": der.state_dict(),
        "seen": torch.cat(seen.inputs),
    }


def main(out: Path, resume_step: int) -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    uninterrupted = run(out / "checkpoints", None)
    resumed = run(out / "checkpoints", str(out / "checkpoints" / f"step={resume_step}.ckpt"))
    rank, _ = rank_and_world_size()
    torch.save({"uninterrupted": uninterrupted, "resumed": resumed}, out / f"rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # before exit: gloo's threads torn down at exit can abort


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--resume-step", type=int, default=6, help="the step whose checkpoint the second run resumes from")
    args = parser.parse_args()
    main(args.out, args.resume_step)
