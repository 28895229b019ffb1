"""BiC on a two-process DDP job (CPU, gloo): two class-incremental tasks uninterrupted,
checkpointed every few steps, then resumed in the same processes from one of those checkpoints.

    python tests/distributed/bic_worker.py OUT [--resume-step 6]

Each rank writes ``OUT/rank{r}.pt``: the inputs of every training batch it saw (its shard of the
stream), and, at the end of both runs, its parameters, the method's ``state_dict`` and its
corrected scores on fixed probe inputs. ``tests/distributed/test_ddp_bic.py`` runs it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for `neurenix` and `tests` from a checkout

from neurenix.continual.bic import BiC  # noqa: E402
from neurenix.data import TaskDataset, TaskSequenceDataModule, fit_sequence  # noqa: E402
from tests.distributed.workers import (  # noqa: E402
    Classifier,
    cloned_params,
    ddp_trainer,
    main,
    uninterrupted_and_resumed,
)

# 32 samples per task, 16 a rank: four batches of 4 per rank, one epoch a task, 8 steps in all.
SAMPLES, BATCH_PER_RANK, EVERY, MEMORY = 32, 4, 3, 8
LABELS = ((0, 1), (2, 3))


def task(index: int) -> TaskDataset:
    """Task ``index``: random inputs labelled with its two classes by the sign of the first input."""
    generator = torch.Generator().manual_seed(index + 1)
    x = torch.randn(SAMPLES, 6, generator=generator)
    labels = torch.tensor(LABELS[index])
    return TaskDataset(x, labels[(x[:, 0] > 0).long()], index)


def probe() -> torch.Tensor:
    return torch.randn(10, 6, generator=torch.Generator().manual_seed(99))


class SeenInputs(L.Callback):
    """The inputs of every training batch this rank trains on (before replay extends it)."""

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.inputs.append(batch[0].detach().clone())


def make_method(net: torch.nn.Module, seed: int) -> BiC:
    return BiC(net, memory_size=MEMORY, replay_ratio=0.5, seed=seed, held_out=0.5)


def run(out: Path, resume: str | None) -> dict:
    """The sequence, checkpointed every EVERY steps (or resumed from ``resume``); what it ends with."""
    shift = 100 if resume else 0  # a resumed run starts from other weights and seeds
    model = Classifier(seed=shift, outputs=4)
    bic, seen = make_method(model.net, seed=shift + 1), SeenInputs()
    trainer = ddp_trainer([bic, seen], out, resume, EVERY)
    datamodule = TaskSequenceDataModule([task(0), task(1)], [task(0), task(1)], batch_size=BATCH_PER_RANK, seed=shift)
    fit_sequence(trainer, model, datamodule, epochs_per_task=1, ckpt_path=resume)
    with torch.no_grad():
        scores = bic.classifier(probe())
    return {"params": cloned_params(model), "method": bic.state_dict(), "seen": torch.cat(seen.inputs), "scores": scores}


if __name__ == "__main__":
    main(__doc__, 6, lambda out, resume_step: uninterrupted_and_resumed(run, out / "checkpoints", resume_step))
