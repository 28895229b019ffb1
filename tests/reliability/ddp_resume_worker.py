"""A two-task sequence as a two-process DDP job (CPU, gloo): uninterrupted, checkpointed every few
steps, then resumed in the same processes from one of those checkpoints.

    python tests/reliability/ddp_resume_worker.py OUT [--resume-step 12]

Each rank writes ``OUT/rank{r}.pt``: its parameters and every method's ``state_dict`` at the end
of both runs. Lightning gives each rank a ``DistributedSampler`` in place of the data module's
shuffling; a checkpoint written in the middle of an epoch holds the rank-0 loader's place (batches
served, the sampler's epoch), which every rank resumes from. The second ``Trainer`` joins the
process group the first one made (Lightning launches the processes once), which saves a launch.
``tests/reliability/test_resume_ddp.py`` runs it.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for `neurenix` and `tests` from a checkout

from neurenix.continual import EWC, ExperienceReplay, SynapticIntelligence  # noqa: E402
from neurenix.data import TaskSequenceDataModule, fit_sequence  # noqa: E402
from tests.distributed.workers import Classifier, cloned_params, ddp_trainer, main, threshold_task, uninterrupted_and_resumed  # noqa: E402

SAMPLES, BATCH_PER_RANK, EVERY = 40, 4, 3  # 20 samples a rank: five batches an epoch; 20 steps in all
task = functools.partial(threshold_task, samples=SAMPLES)


def run(out: Path, resume: str | None) -> dict:
    """The sequence, checkpointed every EVERY steps (or resumed from ``resume``); what it ends with."""
    shift = 100 if resume else 0  # a resumed run starts from other weights and seeds
    model = Classifier(seed=shift, lr=0.05, optimizer=torch.optim.Adam)
    methods = [
        EWC(model.net, importance=50.0, fisher_sample_size=16, seed=shift),
        SynapticIntelligence(model.net, importance=0.5),
        ExperienceReplay(model.net, memory_size=8, replay_ratio=0.5, seed=shift + 1),
    ]
    trainer = ddp_trainer(methods, out, resume, EVERY)
    datamodule = TaskSequenceDataModule([task(0), task(1)], [task(10), task(11)], batch_size=BATCH_PER_RANK, seed=shift)
    fit_sequence(trainer, model, datamodule, epochs_per_task=2, ckpt_path=resume)
    return {
        "params": cloned_params(model),
        "methods": [method.state_dict() for method in methods],
        "global_step": trainer.global_step,
    }


if __name__ == "__main__":
    main(__doc__, 12, lambda out, resume_step: uninterrupted_and_resumed(run, out / "checkpoints", resume_step))
