"""GDumb over two class-incremental tasks as a two-process DDP job (CPU, gloo): uninterrupted,
checkpointed every few steps, then resumed in the same processes from a checkpoint in task 1.

    python tests/distributed/gdumb_worker.py OUT [--resume-step 6]

The ranks build their networks and GDumb from different seeds: GDumb's initial weights and memory
must still be rank 0's on both. Each rank writes ``OUT/rank{r}.pt``: for both runs its batches
(its share of each global batch, with their task), its parameters, GDumb's ``state_dict`` and the
global step. ``tests/distributed/test_ddp_gdumb.py`` runs it.
"""

from __future__ import annotations

import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for `neurenix` and `tests` from a checkout

from neurenix.continual.distributed import rank_and_world_size  # noqa: E402
from neurenix.continual.gdumb import GDumb  # noqa: E402
from neurenix.data import TaskDataset, TaskSequenceDataModule, fit_sequence  # noqa: E402
from tests.distributed.workers import (  # noqa: E402
    PlainClassifier,
    RecordBatches,
    cloned_params,
    ddp_trainer,
    main,
    two_class_task,
    uninterrupted_and_resumed,
)

SAMPLES, BATCH_PER_RANK, EVAL_BATCH, EVERY, RESUME_STEP = 32, 2, 8, 2, 6  # 2 steps an epoch, 2 epochs a task
LR, MEMORY_SIZE, SEED, OUTPUTS = 0.2, 6, 4, 4



def task(task_id: int) -> TaskDataset:
    return two_class_task(task_id, SAMPLES)


def run(out: Path, resume: str | None) -> dict:
    rank, _ = rank_and_world_size()
    model = PlainClassifier(seed=10 * rank + (100 if resume else 0), outputs=OUTPUTS, lr=LR)
    gdumb = GDumb(model.net, memory_size=MEMORY_SIZE, seed=SEED + rank)
    recorder = RecordBatches()
    trainer = ddp_trainer([gdumb, recorder], out, resume, EVERY)
    tasks = [task(0), task(1)]
    datamodule = TaskSequenceDataModule(tasks, tasks, batch_size=BATCH_PER_RANK, eval_batch_size=EVAL_BATCH)
    fit_sequence(trainer, model, datamodule, epochs_per_task=2, ckpt_path=resume)
    return {"batches": recorder.batches, "params": cloned_params(model), "state": gdumb.state_dict(), "global_step": trainer.global_step}


if __name__ == "__main__":
    main(__doc__, RESUME_STEP, lambda out, resume_step: uninterrupted_and_resumed(run, out / "checkpoints", resume_step))
