"""DarkExperienceReplay (DER++) on a two-process DDP job (CPU, gloo): two tasks uninterrupted,
checkpointed every few steps, then resumed in the same processes from one of those checkpoints.

    python tests/distributed/dark_replay_worker.py OUT [--resume-step 6]

Each rank writes ``OUT/rank{r}.pt``: the inputs of every training batch it saw (its shard of the
stream), and its parameters and the method's ``state_dict`` at the end of both runs. The second
``Trainer`` joins the process group the first one made (Lightning launches the processes once).
``tests/distributed/test_ddp_dark_replay.py`` runs it.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import lightning as L
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for `neurenix` and `tests` from a checkout

from neurenix.continual.dark_replay import DarkExperienceReplay  # noqa: E402
from neurenix.data import TaskSequenceDataModule, fit_sequence  # noqa: E402
from tests.distributed.workers import Classifier, cloned_params, ddp_trainer, main, threshold_task, uninterrupted_and_resumed  # noqa: E402

# 16 samples a rank per task: four batches, one epoch a task (so that the two ranks' shards of the
# stream are disjoint), 8 steps in all.
SAMPLES, BATCH_PER_RANK, EVERY, MEMORY = 32, 4, 3, 8
task = functools.partial(threshold_task, samples=SAMPLES)


class SeenInputs(L.Callback):
    """The inputs of every training batch this rank trains on."""

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.inputs.append(batch[0].detach().clone())


def make_method(net: nn.Module, seed: int) -> DarkExperienceReplay:
    return DarkExperienceReplay(net, memory_size=MEMORY, alpha=0.5, beta=0.5, replay_ratio=1.0, seed=seed)


def run(out: Path, resume: str | None) -> dict:
    """The sequence, checkpointed every EVERY steps (or resumed from ``resume``); what it ends with."""
    shift = 100 if resume else 0  # a resumed run starts from other weights and seeds
    model = Classifier(seed=shift)
    der, seen = make_method(model.net, seed=shift + 1), SeenInputs()
    trainer = ddp_trainer([der, seen], out, resume, EVERY)
    datamodule = TaskSequenceDataModule([task(0), task(1)], [task(10), task(11)], batch_size=BATCH_PER_RANK, seed=shift)
    fit_sequence(trainer, model, datamodule, epochs_per_task=1, ckpt_path=resume)
    return {"params": cloned_params(model), "method": der.state_dict(), "seen": torch.cat(seen.inputs)}


if __name__ == "__main__":
    main(__doc__, 6, lambda out, resume_step: uninterrupted_and_resumed(run, out / "checkpoints", resume_step))
