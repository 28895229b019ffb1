"""ERACE over two class-incremental tasks as a two-process DDP job (CPU, gloo): uninterrupted,
checkpointed every few steps, then resumed in the same processes from a checkpoint in task 1.

    python tests/distributed/er_ace_worker.py OUT [--resume-step 9]

Each rank writes ``OUT/rank{r}.pt``: the initial parameters, the batches it trained on (its share
of each global batch, in order, with their task), and, for both runs, its parameters and ERACE's
``state_dict`` at the end. ``tests/distributed/test_ddp_er_ace.py`` runs it.
"""

from __future__ import annotations

import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for `neurenix` and `tests` from a checkout

from neurenix.continual.er_ace import ERACE  # noqa: E402
from neurenix.data import TaskDataset, TaskSequenceDataModule, fit_sequence  # noqa: E402
from tests.distributed.workers import (  # noqa: E402
    Classifier,
    RecordBatches,
    cloned_params,
    ddp_trainer,
    main,
    two_class_task,
    uninterrupted_and_resumed,
)

SAMPLES, BATCH_PER_RANK, EVERY, RESUME_STEP = 32, 4, 3, 9  # 4 steps an epoch, 2 epochs a task: step 9 is in task 1
LR, MEMORY_SIZE, REPLAY_RATIO, SEED = 0.2, 6, 1.0, 4
OUTPUTS = 4  # every class of both tasks



def task(task_id: int) -> TaskDataset:
    return two_class_task(task_id, SAMPLES)


def run(out: Path, resume: str | None) -> dict:
    shift = 100 if resume else 0  # a resumed run starts from other weights and seeds
    model = Classifier(seed=shift, outputs=OUTPUTS, lr=LR)
    initial = cloned_params(model)
    ace = ERACE(model.net, memory_size=MEMORY_SIZE, replay_ratio=REPLAY_RATIO, seed=SEED + shift)
    recorder = RecordBatches()
    trainer = ddp_trainer([ace, recorder], out, resume, EVERY)
    datamodule = TaskSequenceDataModule([task(0), task(1)], [task(0), task(1)], batch_size=BATCH_PER_RANK, seed=shift)
    fit_sequence(trainer, model, datamodule, epochs_per_task=2, ckpt_path=resume)
    return {
        "initial": initial,
        "batches": recorder.batches,
        "params": cloned_params(model),
        "state": ace.state_dict(),
        "global_step": trainer.global_step,
    }


if __name__ == "__main__":
    main(__doc__, RESUME_STEP, lambda out, resume_step: uninterrupted_and_resumed(run, out / "checkpoints", resume_step))
